//! The small HTTP/1 server shared by the health server, the metrics server and the
//! per-service health-check node ports: binding with upstream's retry / hard-fail rule, an
//! accept loop that can be stopped, and response helpers. Handlers are plain functions of
//! the request (method, path, body), so they are unit-tested without sockets.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// What a handler sees of a request.
#[derive(Clone, Debug)]
pub struct SimpleRequest {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub accept: Option<String>,
    pub body: Bytes,
    /// The address the connection arrived on.
    pub local: Option<SocketAddr>,
}

pub type Handler = Arc<dyn Fn(SimpleRequest) -> Response<Full<Bytes>> + Send + Sync>;

/// Request bodies are only used by `PUT /debug/flags/v`; anything larger is refused.
const MAX_BODY: usize = 64 * 1024;

/// Binds `address`. If it cannot: with `hard_fail` the error is returned (the caller exits,
/// as upstream's `bindAddressHardFail`), otherwise binding is retried every 5 s, logged.
pub async fn bind(address: SocketAddr, what: &str, hard_fail: bool) -> anyhow::Result<TcpListener> {
    loop {
        match TcpListener::bind(address).await {
            Ok(listener) => return Ok(listener),
            Err(e) if hard_fail => {
                return Err(anyhow::anyhow!(
                    "cannot bind the {what} to {address}: {e} (bindAddressHardFail is set)"
                ));
            }
            Err(e) => {
                warn!(address = %address, error = %e, "Cannot bind the {what}; retrying in 5s");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
}

/// Serves `handler` on `listener` until `stop` is cancelled (then the listening socket is
/// closed; requests in flight finish).
pub async fn serve(listener: TcpListener, handler: Handler, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                debug!(error = %e, "Accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handler = handler.clone();
        let local = stream.local_addr().ok();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(dispatch(req, local, &handler).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn dispatch(
    req: Request<hyper::body::Incoming>,
    local: Option<SocketAddr>,
    handler: &Handler,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large\n".into(),
            )
        }
    };
    handler(SimpleRequest {
        method: parts.method,
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        accept: parts
            .headers
            .get(hyper::header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        body,
        local,
    })
}

/// A `text/plain; charset=utf-8` response with `X-Content-Type-Options: nosniff`.
pub fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    with_type(status, "text/plain; charset=utf-8", body)
}

/// A response with the given content type and `X-Content-Type-Options: nosniff`.
pub fn with_type(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    if let Ok(value) = content_type.parse() {
        headers.insert(hyper::header::CONTENT_TYPE, value);
    }
    headers.insert("X-Content-Type-Options", "nosniff".parse().unwrap());
    response
}

/// Go's `http.NotFound`.
pub fn not_found() -> Response<Full<Bytes>> {
    text(StatusCode::NOT_FOUND, "404 page not found\n".into())
}
