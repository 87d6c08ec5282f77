//! A fake Kubernetes API server that speaks list and watch for Services, EndpointSlices and
//! Nodes, with scripted watch replies (events, a cut connection, 410 Gone).

#![allow(dead_code)]

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
use serde_json::{json, Value};
use tokio::sync::mpsc;

type Body = BoxBody<Bytes, std::io::Error>;
/// The sending end of a streamed response body.
type BodySender = mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>;

/// What a watch request is answered with.
pub enum WatchReply {
    /// Send these events, then cut the connection.
    EventsThenCut(Vec<Value>),
    /// Send these events and end the response normally.
    Events(Vec<Value>),
    /// Keep the watch open forever.
    Hang,
    /// Answer the watch request itself with HTTP 410 (the version is too old), as an API
    /// server does when it no longer has it.
    HttpGone,
}

enum ReplyKind {
    Cut,
    End,
}

#[derive(Default)]
pub struct Fake {
    pub requests: Vec<String>,
    /// Successive answers to Service lists (resourceVersion, items).
    pub service_lists: VecDeque<(String, Vec<Value>)>,
    /// Successive answers to Service watches; when empty, watches hang.
    pub service_watches: VecDeque<WatchReply>,
    /// The EndpointSlices every list returns.
    pub slices: Vec<Value>,
    /// The Nodes every list returns.
    pub nodes: Vec<Value>,
    /// Objects created with POST: (path, body).
    pub posted: Vec<(String, Value)>,
    /// The ServiceCIDRs every list returns; `None`: the API is not served (404).
    pub service_cidrs: Option<Vec<Value>>,
    /// Pre-serialized list bodies by path, served in 64 KiB chunks as a real API server
    /// streams a large list (for benchmarks at scale; takes precedence over the fields above).
    pub prepared: std::collections::HashMap<String, Bytes>,
    /// Delay before answering Node lists (a Node that shows up after the other kinds).
    pub node_delay: Option<Duration>,
    /// Watches from a resourceVersion below this are answered `410 Expired`, as an API
    /// server answers them after a restart (its watch cache starts at the current version).
    pub expired_below: u64,
    /// The resourceVersion of EndpointSlice, Node and ServiceCIDR lists (default 5, 7, 3).
    pub list_version: Option<String>,
    /// Open watches that wait for events: (path, sender).
    hanging: Vec<(String, BodySender)>,
}

impl Fake {
    /// Sends one watch event (`{"type": …, "object": …}`) to every open watch of `path`, as
    /// a real API server does after a write; returns how many watches got it.
    pub fn push_event(&mut self, path: &str, event: &Value) -> usize {
        let line = Bytes::from(format!("{event}\n"));
        self.hanging.retain(|(_, tx)| !tx.is_closed());
        self.hanging
            .iter()
            .filter(|(watched, _)| watched == path)
            .filter(|(_, tx)| tx.try_send(Ok(Frame::data(line.clone()))).is_ok())
            .count()
    }
}

pub fn service(name: &str, ip: &str, rv: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "ns", "resourceVersion": rv, "managedFields": [{"manager": "x"}]},
           "spec": {"clusterIP": ip, "ports": [{"name": "p", "port": 80, "protocol": "TCP"}]}})
}

pub fn list(kind: &str, rv: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": rv}, "items": items})
}

fn body_of(value: &Value) -> Body {
    Full::new(Bytes::from(value.to_string()))
        .map_err(|never: Infallible| match never {})
        .boxed()
}

fn streaming(fake: &Arc<Mutex<Fake>>, path: &str, reply: WatchReply) -> Body {
    // Room for a burst of pushed events (tests push thousands at once).
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(100_000);
    let reply_kind = match &reply {
        WatchReply::EventsThenCut(_) => ReplyKind::Cut,
        _ => ReplyKind::End,
    };
    match reply {
        WatchReply::Hang | WatchReply::HttpGone => {
            fake.lock().unwrap().hanging.push((path.to_string(), tx))
        }
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
    let watch_version = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("resourceVersion="))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(u64::MAX);
    if watching && watch_version < fake.lock().unwrap().expired_below {
        return Ok(gone());
    }
    if req.method() == hyper::Method::POST {
        let bytes = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let object: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        fake.lock().unwrap().posted.push((path, object.clone()));
        let mut resp = Response::new(body_of(&object));
        *resp.status_mut() = hyper::StatusCode::CREATED;
        resp.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        return Ok(resp);
    }
    let prepared = if watching {
        None
    } else {
        fake.lock().unwrap().prepared.get(&path).cloned()
    };
    if let Some(bytes) = prepared {
        let chunks: Vec<Result<Frame<Bytes>, std::io::Error>> = (0..bytes.len())
            .step_by(65536)
            .map(|i| Ok(Frame::data(bytes.slice(i..bytes.len().min(i + 65536)))))
            .collect();
        let mut resp = Response::new(BodyExt::boxed(StreamBody::new(futures::stream::iter(
            chunks,
        ))));
        resp.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        return Ok(resp);
    }
    if path == "/api/v1/nodes" && !watching {
        let delay = fake.lock().unwrap().node_delay;
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
    }
    let body = match (path.as_str(), watching) {
        ("/apis/networking.k8s.io/v1/servicecidrs", false) => {
            let cidrs = fake.lock().unwrap().service_cidrs.clone();
            let rv = fake.lock().unwrap().list_version.clone();
            match cidrs {
                Some(items) => body_of(&list(
                    "ServiceCIDRList",
                    rv.as_deref().unwrap_or("3"),
                    items,
                )),
                None => {
                    let mut resp = Response::new(body_of(
                        &json!({"kind": "Status", "code": 404, "message": "the server could not find the requested resource"}),
                    ));
                    *resp.status_mut() = hyper::StatusCode::NOT_FOUND;
                    return Ok(resp);
                }
            }
        }
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
            if matches!(reply, WatchReply::HttpGone) {
                return Ok(gone());
            }
            streaming(&fake, &path, reply)
        }
        ("/apis/discovery.k8s.io/v1/endpointslices", false) => {
            let (items, rv) = {
                let f = fake.lock().unwrap();
                (f.slices.clone(), f.list_version.clone())
            };
            body_of(&list(
                "EndpointSliceList",
                rv.as_deref().unwrap_or("5"),
                items,
            ))
        }
        ("/api/v1/nodes", false) => {
            let (items, rv) = {
                let f = fake.lock().unwrap();
                (f.nodes.clone(), f.list_version.clone())
            };
            body_of(&list("NodeList", rv.as_deref().unwrap_or("7"), items))
        }
        (_, true) => streaming(&fake, &path, WatchReply::Hang),
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

/// `410 Expired` for a watch from a version the server no longer has.
fn gone() -> Response<Body> {
    let mut resp = Response::new(body_of(&json!({"kind": "Status", "apiVersion": "v1",
        "metadata": {}, "status": "Failure", "message": "too old resource version: 10 (15)",
        "reason": "Expired", "code": 410})));
    *resp.status_mut() = hyper::StatusCode::GONE;
    resp
}

/// A server that can be stopped as an API server goes down: the listening socket closes
/// (new connections are refused) and every open connection, watches included, is cut.
pub struct Server {
    pub url: String,
    accept: tokio::task::JoinHandle<()>,
    connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Server {
    pub fn stop(&self) {
        self.accept.abort();
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Serves on an already bound listener until the returned server is stopped.
pub fn serve_stoppable(fake: Arc<Mutex<Fake>>, listener: std::net::TcpListener) -> Server {
    listener.set_nonblocking(true).unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let addr = listener.local_addr().unwrap();
    let connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Default::default();
    let tracked = connections.clone();
    let accept = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let fake = fake.clone();
            let task = tokio::spawn(async move {
                let service = service_fn(move |req| handle(fake.clone(), req));
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
            tracked.lock().unwrap().push(task.abort_handle());
        }
    });
    Server {
        url: format!("http://{addr}"),
        accept,
        connections,
    }
}

/// Serves on 127.0.0.1 (an ephemeral port); returns the URL.
pub async fn serve(fake: Arc<Mutex<Fake>>) -> String {
    serve_on(fake, std::net::TcpListener::bind("127.0.0.1:0").unwrap())
}

/// Serves on an already bound listener (e.g. one bound inside a test network namespace).
pub fn serve_on(fake: Arc<Mutex<Fake>>, listener: std::net::TcpListener) -> String {
    listener.set_nonblocking(true).unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
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
