//! kube-proxy's service model: from Services, EndpointSlices and the Node to, per IP family,
//! every service port's frontends, its endpoints and the decision for each kind of traffic.
//!
//! Pure by construction: this crate depends on `k8s-openapi` for types only (and a YAML parser
//! for manifest text), never on `kube`,
//! `tokio` or anything that does I/O, reads a clock or a global. Invalid objects are returned
//! as values for the caller to log; nothing here panics on bad input.

pub mod conntrack;
pub mod context;
pub mod dataplane;
pub mod endpoints;
pub mod explain;
pub mod frontends;
pub mod manifest;
pub mod names;
pub mod node;
pub mod plan;
pub mod service;
pub mod state;
#[cfg(feature = "testing")]
pub mod testing;
pub mod topology;

pub use dataplane::{Dataplane, NodeView, SyncError, SyncInput, SyncReport};
pub use endpoints::Endpoint;
pub use frontends::Frontend;
pub use names::{IpFamily, NamespacedName, Protocol, ServicePortName};
pub use node::NodeInfo;
pub use plan::{
    EndpointSet, ExternalPlan, FamilyPlan, LocalPolicy, PlanContext, ServicePortPlan, Target,
};
pub use service::ServicePort;
pub use state::{Changes, ClusterState, Outcome, Synced};
pub use topology::SelectionGates;
