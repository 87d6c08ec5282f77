//! Sources of cluster state, behind one event type, so nothing downstream knows whether it
//! runs against an API server or a directory of manifests.
//!
//! A source sends [`SourceEvent`]s on a channel. A complete list of one kind (an initial list,
//! a relist after `410 Gone`, or a re-read directory) arrives as `Replace`, or streamed as
//! `ListStart`, `Listed`..., `ListDone`: the receiver diffs it against what it holds, and the
//! first complete list of a kind marks that kind synced.

pub mod api;
pub mod events;
pub mod list_splitter;
pub mod manifests;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;

/// A change to one kind of object.
#[derive(Clone, Debug)]
pub enum ObjectEvent<T> {
    Apply(T),
    Delete(T),
    /// The complete current set of this kind.
    Replace(Vec<T>),
    /// A (re)list begins: the objects follow as `Listed`, then `ListDone`; objects not listed
    /// are deleted then. Streaming keeps the raw list out of memory.
    ListStart,
    Listed(T),
    ListDone,
}

impl<T> ObjectEvent<T> {
    pub fn describe(&self) -> &'static str {
        match self {
            ObjectEvent::Apply(_) => "apply",
            ObjectEvent::Delete(_) => "delete",
            ObjectEvent::Replace(_) => "replace",
            ObjectEvent::ListStart => "list start",
            ObjectEvent::Listed(_) => "listed",
            ObjectEvent::ListDone => "list done",
        }
    }
}

// Events are moved once through a channel; boxing each object would only add allocations.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum SourceEvent {
    Services(ObjectEvent<Service>),
    EndpointSlices(ObjectEvent<EndpointSlice>),
    /// The proxy's own Node (a `Replace` holds zero or one Node).
    Node(ObjectEvent<Node>),
    /// The cluster's ServiceCIDRs (networking.k8s.io/v1): where ClusterIPs are allocated.
    ServiceCidrs(ObjectEvent<ServiceCIDR>),
}

/// Label selector for Services and EndpointSlices, as upstream's informers use it.
pub const PROXY_LABEL_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

pub type EventSender = tokio::sync::mpsc::Sender<SourceEvent>;
