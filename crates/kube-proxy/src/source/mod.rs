//! Sources of cluster state, behind one event type, so nothing downstream knows whether it
//! runs against an API server or a directory of manifests.
//!
//! A source sends [`SourceEvent`]s on a channel. `Replace` carries a complete list of one kind
//! (an initial list, a relist after `410 Gone`, or a re-read directory): the receiver diffs it
//! against what it holds, and the first `Replace` of a kind marks that kind synced.

pub mod api;
pub mod manifests;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// A change to one kind of object.
#[derive(Clone, Debug)]
pub enum ObjectEvent<T> {
    Apply(T),
    Delete(T),
    /// The complete current set of this kind.
    Replace(Vec<T>),
}

impl<T> ObjectEvent<T> {
    pub fn describe(&self) -> &'static str {
        match self {
            ObjectEvent::Apply(_) => "apply",
            ObjectEvent::Delete(_) => "delete",
            ObjectEvent::Replace(_) => "replace",
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
}

/// Label selector for Services and EndpointSlices, as upstream's informers use it.
pub const PROXY_LABEL_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

pub type EventSender = tokio::sync::mpsc::Sender<SourceEvent>;
