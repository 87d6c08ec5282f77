//! Events kube-proxy posts to the API server (events.k8s.io/v1), as upstream: the `Starting`
//! "birth cry" on this proxy's Node, and in ipvs mode the `IPVSDeprecation` warning.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::Client;
use tracing::{info, warn};

/// The reference upstream uses for its Node: kind Node, the node name as name and UID.
pub fn node_reference(node_name: &str) -> ObjectReference {
    ObjectReference {
        kind: Some("Node".into()),
        name: Some(node_name.into()),
        uid: Some(node_name.into()),
        ..Default::default()
    }
}

/// Posts the Normal `Starting` event (action `StartKubeProxy`) on this node, and with `ipvs`
/// upstream's Warning `IPVSDeprecation`. A failure (no RBAC for events, API server away) is
/// logged and otherwise ignored, as upstream.
pub async fn announce_start(client: Client, node_name: String, ipvs: bool) {
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: "kube-proxy".into(),
            instance: Some(node_name.clone()),
        },
    );
    let event = Event {
        type_: EventType::Normal,
        reason: "Starting".into(),
        note: None,
        action: "StartKubeProxy".into(),
        secondary: None,
    };
    match recorder.publish(&event, &node_reference(&node_name)).await {
        Ok(()) => info!(node = %node_name, "Posted the Starting event on the Node"),
        Err(e) => {
            warn!(node = %node_name, error = %e, "Cannot post the Starting event on the Node (check the RBAC rule for events.k8s.io events)")
        }
    }
    if ipvs {
        let deprecation = Event {
            type_: EventType::Warning,
            reason: "IPVSDeprecation".into(),
            note: Some(
                "The ipvs proxier is deprecated and may be removed in a future release; please use 'nftables' instead"
                    .into(),
            ),
            action: "StartKubeProxy".into(),
            secondary: None,
        };
        if let Err(e) = recorder
            .publish(&deprecation, &node_reference(&node_name))
            .await
        {
            warn!(node = %node_name, error = %e, "Cannot post the IPVSDeprecation event on the Node");
        }
    }
}
