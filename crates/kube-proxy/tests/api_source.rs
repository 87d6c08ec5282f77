//! The API-server source against a fake API server that speaks list and watch.
//!
//! Services: the first list returns `a`; its watch delivers `b` and then the connection is
//! cut mid-stream; the watcher must resume from `b`'s resourceVersion; that watch answers
//! `410 Gone`; the watcher must relist, which now returns `a` and `c` (so `b` is gone).
//! The events are then applied to the model to check the end state.

mod fakeapi;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fakeapi::{serve, service, Fake, WatchReply};
use kube_proxy::source::{api, ObjectEvent, SourceEvent};
use kube_proxy_model::ClusterState;
use serde_json::json;
use tokio::sync::mpsc;

/// The next Service event, with a streamed list (ListStart, Listed..., ListDone) assembled
/// into one `Replace`.
async fn next_service_event(
    rx: &mut mpsc::Receiver<SourceEvent>,
    seen: &mut Vec<SourceEvent>,
) -> ObjectEvent<k8s_openapi::api::core::v1::Service> {
    let mut listing: Option<Vec<k8s_openapi::api::core::v1::Service>> = None;
    loop {
        let event = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("timed out waiting for a Service event")
            .expect("source ended");
        seen.push(event.clone());
        match event {
            SourceEvent::Services(ObjectEvent::ListStart) => listing = Some(Vec::new()),
            SourceEvent::Services(ObjectEvent::Listed(svc)) => {
                listing.as_mut().expect("Listed outside a list").push(svc)
            }
            SourceEvent::Services(ObjectEvent::ListDone) => {
                return ObjectEvent::Replace(listing.take().expect("ListDone without ListStart"))
            }
            SourceEvent::Services(other) => return other,
            _ => {}
        }
    }
}

fn names(list: &[k8s_openapi::api::core::v1::Service]) -> Vec<String> {
    list.iter()
        .map(|s| s.metadata.name.clone().unwrap())
        .collect()
}

#[tokio::test]
async fn list_watch_disconnect_and_410_gone() {
    let fake = Arc::new(Mutex::new(Fake::default()));
    {
        let mut f = fake.lock().unwrap();
        f.nodes = vec![
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "resourceVersion": "7"}}),
        ];
        f.service_lists
            .push_back(("10".into(), vec![service("a", "198.19.0.1", "10")]));
        f.service_watches.push_back(WatchReply::EventsThenCut(vec![
            json!({"type": "ADDED", "object": service("b", "198.19.0.2", "11")}),
        ]));
        f.service_watches.push_back(WatchReply::Events(vec![
            json!({"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "too old resource version: 11 (15)", "reason": "Expired", "code": 410}}),
        ]));
        f.service_lists.push_back((
            "20".into(),
            vec![
                service("a", "198.19.0.1", "10"),
                service("c", "198.19.0.3", "19"),
            ],
        ));
    }
    let url = serve(fake.clone()).await;
    let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
    let (tx, mut rx) = mpsc::channel(64);
    let source = tokio::spawn(api::run(client, "node-a".into(), tx));

    let mut seen = Vec::new();
    match next_service_event(&mut rx, &mut seen).await {
        ObjectEvent::Replace(list) => {
            assert_eq!(names(&list), vec!["a"]);
            assert!(
                list[0]
                    .metadata
                    .managed_fields
                    .as_ref()
                    .is_none_or(|m| m.is_empty()),
                "managedFields stripped"
            );
        }
        other => panic!("expected the initial list, got {}", other.describe()),
    }
    match next_service_event(&mut rx, &mut seen).await {
        ObjectEvent::Apply(svc) => assert_eq!(svc.metadata.name.as_deref(), Some("b")),
        other => panic!("expected b from the watch, got {}", other.describe()),
    }
    match next_service_event(&mut rx, &mut seen).await {
        ObjectEvent::Replace(list) => {
            assert_eq!(names(&list), vec!["a", "c"], "relisted after 410 Gone")
        }
        other => panic!("expected a relist, got {}", other.describe()),
    }

    let requests = fake.lock().unwrap().requests.clone();
    let service_watches: Vec<&String> = requests
        .iter()
        .filter(|r| r.starts_with("/api/v1/services?") && r.contains("watch=true"))
        .collect();
    assert!(service_watches.len() >= 2, "{requests:#?}");
    assert!(
        service_watches[0].contains("resourceVersion=10"),
        "first watch starts at the list's version: {}",
        service_watches[0]
    );
    assert!(
        service_watches[1].contains("resourceVersion=11"),
        "after the cut the watch resumes from b: {}",
        service_watches[1]
    );
    let service_lists = requests
        .iter()
        .filter(|r| r.starts_with("/api/v1/services?") && !r.contains("watch=true"))
        .count();
    assert_eq!(
        service_lists, 2,
        "one list at start, one relist after 410: {requests:#?}"
    );
    for list in requests.iter().filter(|r| !r.contains("watch=true")) {
        assert!(
            list.contains("resourceVersion=0") && !list.contains("limit="),
            "lists are served from the API server's watch cache, unpaged: {list}"
        );
    }
    assert!(
        requests.iter().any(|r| r.starts_with("/api/v1/services?") && r.contains("labelSelector=%21service.kubernetes.io%2Fservice-proxy-name%2C%21service.kubernetes.io%2Fheadless")),
        "upstream's label selector is used: {requests:#?}"
    );
    assert!(
        requests.iter().any(|r| r.starts_with("/api/v1/nodes?")
            && r.contains("fieldSelector=metadata.name%3Dnode-a")),
        "only this proxy's Node is watched: {requests:#?}"
    );

    // Through the model: b appeared and disappeared, the Node and the (empty) slices arrived.
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
        seen.push(event);
    }
    let mut state = ClusterState::new("node-a");
    for event in seen {
        match event {
            SourceEvent::Services(ObjectEvent::ListStart) => state.begin_service_list(),
            SourceEvent::Services(ObjectEvent::Listed(svc)) => drop(state.listed_service(&svc)),
            SourceEvent::Services(ObjectEvent::ListDone) => state.finish_service_list(),
            SourceEvent::Services(ObjectEvent::Apply(svc)) => drop(state.apply_service(&svc)),
            SourceEvent::EndpointSlices(ObjectEvent::ListStart) => state.begin_slice_list(),
            SourceEvent::EndpointSlices(ObjectEvent::Listed(slice)) => {
                drop(state.listed_slice(&slice))
            }
            SourceEvent::EndpointSlices(ObjectEvent::ListDone) => state.finish_slice_list(),
            SourceEvent::Node(ObjectEvent::Listed(node)) => drop(state.set_node(Some(&node))),
            _ => {}
        }
    }
    let mut services: Vec<String> = state.service_names().map(|n| n.to_string()).collect();
    services.sort();
    assert_eq!(services, vec!["ns/a", "ns/c"]);
    assert!(state.ready_to_sync());
    assert_eq!(state.node().map(|n| n.name.as_str()), Some("node-a"));
    source.abort();
}

/// At start the proxy posts upstream's `Starting` event on its Node (events.k8s.io/v1).
#[tokio::test]
async fn starting_event_on_the_node() {
    let fake = Arc::new(Mutex::new(Fake::default()));
    let url = serve(fake.clone()).await;
    let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
    kube_proxy::source::events::announce_start(client, "node-a".into(), false).await;
    let posted = fake.lock().unwrap().posted.clone();
    assert_eq!(posted.len(), 1, "{posted:?}");
    let (path, event) = &posted[0];
    assert_eq!(path, "/apis/events.k8s.io/v1/namespaces/default/events");
    assert_eq!(event["type"], "Normal");
    assert_eq!(event["reason"], "Starting");
    assert_eq!(event["action"], "StartKubeProxy");
    assert_eq!(event["reportingController"], "kube-proxy");
    assert_eq!(event["reportingInstance"], "node-a");
    assert_eq!(event["regarding"]["kind"], "Node");
    assert_eq!(event["regarding"]["name"], "node-a");
    assert_eq!(event["regarding"]["uid"], "node-a");
}

/// In ipvs mode upstream also warns on the Node that the mode is deprecated.
#[tokio::test]
async fn ipvs_mode_posts_the_deprecation_warning() {
    let fake = Arc::new(Mutex::new(Fake::default()));
    let url = serve(fake.clone()).await;
    let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
    kube_proxy::source::events::announce_start(client, "node-a".into(), true).await;
    let posted = fake.lock().unwrap().posted.clone();
    assert_eq!(posted.len(), 2, "{posted:?}");
    let (_, event) = &posted[1];
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "IPVSDeprecation");
    assert!(event["note"].as_str().unwrap().contains("nftables"));
    assert_eq!(event["regarding"]["name"], "node-a");
}

/// ServiceCIDRs are listed and watched like the other kinds; an API server that does not serve
/// them (before 1.33) is no error: nothing is sent, and Services still flow.
#[tokio::test]
async fn service_cidrs_are_listed_when_served() {
    for served in [true, false] {
        let fake = Arc::new(Mutex::new(Fake::default()));
        {
            let mut f = fake.lock().unwrap();
            f.service_lists.push_back(("10".into(), vec![]));
            f.service_cidrs = served.then(|| {
                vec![
                    json!({"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
                    "metadata": {"name": "kubernetes", "resourceVersion": "3"},
                    "spec": {"cidrs": ["198.19.0.0/16", "2001:db8:19::/112"]}}),
                ]
            });
        }
        let url = serve(fake.clone()).await;
        let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
        let (tx, mut rx) = mpsc::channel(64);
        let source = tokio::spawn(api::run(client, "node-a".into(), tx));
        let mut state = ClusterState::new("node-a");
        let mut listing = Vec::new();
        let mut services_listed = false;
        while let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await {
            match event {
                SourceEvent::ServiceCidrs(ObjectEvent::Listed(cidr)) => listing.push(cidr),
                SourceEvent::ServiceCidrs(ObjectEvent::ListDone) => {
                    state.replace_service_cidrs(listing.iter());
                }
                SourceEvent::Services(ObjectEvent::ListDone) => services_listed = true,
                _ => {}
            }
        }
        assert!(services_listed, "served={served}");
        let v4: Vec<String> = state
            .service_cidrs(kube_proxy_model::IpFamily::V4)
            .iter()
            .map(|c| c.to_string())
            .collect();
        if served {
            assert_eq!(v4, ["198.19.0.0/16"]);
        } else {
            assert!(v4.is_empty());
        }
        let requests = fake.lock().unwrap().requests.clone();
        assert!(
            requests
                .iter()
                .any(|r| r.starts_with("/apis/networking.k8s.io/v1/servicecidrs?")),
            "{requests:#?}"
        );
        source.abort();
    }
}

/// An API server that answers the watch request itself with HTTP 410 (after an outage, the
/// version the watch resumes from is too old): the source relists at once instead of
/// retrying the watch from that version with a growing backoff, which never recovers.
#[tokio::test]
async fn a_watch_answered_410_relists_at_once() {
    let fake = Arc::new(Mutex::new(Fake::default()));
    {
        let mut f = fake.lock().unwrap();
        f.nodes = vec![
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "resourceVersion": "7"}}),
        ];
        f.service_lists
            .push_back(("10".into(), vec![service("a", "198.19.0.1", "10")]));
        f.service_watches.push_back(WatchReply::HttpGone);
        f.service_lists.push_back((
            "20".into(),
            vec![
                service("a", "198.19.0.1", "10"),
                service("c", "198.19.0.3", "19"),
            ],
        ));
    }
    let url = serve(fake.clone()).await;
    let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
    let (tx, mut rx) = mpsc::channel(64);
    let source = tokio::spawn(api::run(client, "node-a".into(), tx));
    let mut seen = Vec::new();
    match next_service_event(&mut rx, &mut seen).await {
        ObjectEvent::Replace(list) => assert_eq!(names(&list), vec!["a"]),
        other => panic!("expected the initial list, got {}", other.describe()),
    }
    match next_service_event(&mut rx, &mut seen).await {
        ObjectEvent::Replace(list) => assert_eq!(names(&list), vec!["a", "c"], "relisted"),
        other => panic!("expected a relist, got {}", other.describe()),
    }
    let requests = fake.lock().unwrap().requests.clone();
    let watches = requests
        .iter()
        .filter(|r| r.starts_with("/api/v1/services?") && r.contains("watch=true"))
        .take_while(|r| r.contains("resourceVersion=10"))
        .count();
    assert_eq!(
        watches, 1,
        "no retry from the expired version: {requests:#?}"
    );
    source.abort();
}
