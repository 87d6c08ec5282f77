//! The API-server source against a fake API server that speaks list and watch.
//!
//! Services: the first list returns `a`; its watch delivers `b` and then the connection is
//! cut mid-stream; the watcher must resume from `b`'s resourceVersion; that watch answers
//! `410 Gone`; the watcher must relist, which now returns `a` and `c` (so `b` is gone).
//! The events are then applied to the model to check the end state.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use kube_proxy::source::{api, ObjectEvent, SourceEvent};
use kube_proxy_model::ClusterState;
use serde_json::{json, Value};
use tokio::sync::mpsc;

type Body = BoxBody<Bytes, std::io::Error>;

/// What a watch request is answered with.
enum WatchReply {
    /// Send these events, then cut the connection.
    EventsThenCut(Vec<Value>),
    /// Send these events and end the response normally.
    Events(Vec<Value>),
    /// Keep the watch open forever.
    Hang,
}

enum ReplyKind {
    Cut,
    End,
}

#[derive(Default)]
struct Fake {
    requests: Vec<String>,
    service_lists: VecDeque<(String, Vec<Value>)>,
    service_watches: VecDeque<WatchReply>,
    hanging: Vec<mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>>,
}

fn service(name: &str, ip: &str, rv: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "ns", "resourceVersion": rv, "managedFields": [{"manager": "x"}]},
           "spec": {"clusterIP": ip, "ports": [{"name": "p", "port": 80, "protocol": "TCP"}]}})
}

fn list(kind: &str, rv: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": rv}, "items": items})
}

fn body_of(value: &Value) -> Body {
    Full::new(Bytes::from(value.to_string()))
        .map_err(|never: Infallible| match never {})
        .boxed()
}

fn streaming(fake: &Arc<Mutex<Fake>>, reply: WatchReply) -> Body {
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(16);
    let reply_kind = match &reply {
        WatchReply::EventsThenCut(_) => ReplyKind::Cut,
        _ => ReplyKind::End,
    };
    match reply {
        WatchReply::Hang => fake.lock().unwrap().hanging.push(tx),
        WatchReply::Events(events) | WatchReply::EventsThenCut(events) => {
            let cut = matches!(reply_kind, ReplyKind::Cut);
            tokio::spawn(async move {
                for e in events {
                    let _ = tx
                        .send(Ok(Frame::data(Bytes::from(format!("{e}\n")))))
                        .await;
                }
                if cut {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let _ = tx
                        .send(Err(std::io::Error::other("connection cut by the test")))
                        .await;
                }
            });
        }
    }
    let stream = tokio_stream_from(rx);
    BodyExt::boxed(StreamBody::new(stream))
}

fn tokio_stream_from(
    mut rx: mpsc::Receiver<Result<Frame<Bytes>, std::io::Error>>,
) -> impl futures::Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Send + Sync + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

async fn handle(
    fake: Arc<Mutex<Fake>>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, Infallible> {
    let uri = req.uri().clone();
    let path = uri.path().to_string();
    let query = uri.query().unwrap_or("").to_string();
    fake.lock()
        .unwrap()
        .requests
        .push(format!("{path}?{query}"));
    let watching = query.split('&').any(|kv| kv == "watch=true");
    let body = match (path.as_str(), watching) {
        ("/api/v1/services", false) => {
            let (rv, items) = fake
                .lock()
                .unwrap()
                .service_lists
                .pop_front()
                .expect("unexpected extra Service list");
            body_of(&list("ServiceList", &rv, items))
        }
        ("/api/v1/services", true) => {
            let reply = fake
                .lock()
                .unwrap()
                .service_watches
                .pop_front()
                .unwrap_or(WatchReply::Hang);
            streaming(&fake, reply)
        }
        ("/apis/discovery.k8s.io/v1/endpointslices", false) => {
            body_of(&list("EndpointSliceList", "5", vec![]))
        }
        ("/api/v1/nodes", false) => body_of(&list(
            "NodeList",
            "7",
            vec![
                json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "resourceVersion": "7"}}),
            ],
        )),
        (_, true) => streaming(&fake, WatchReply::Hang),
        _ => {
            let mut resp = Response::new(body_of(&json!({"kind": "Status", "code": 404})));
            *resp.status_mut() = hyper::StatusCode::NOT_FOUND;
            return Ok(resp);
        }
    };
    let mut resp = Response::new(body);
    resp.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    Ok(resp)
}

async fn serve(fake: Arc<Mutex<Fake>>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let fake = fake.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| handle(fake.clone(), req));
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

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
