//! The metrics server on `metricsBindAddress` (default 127.0.0.1:10249), with upstream's
//! paths:
//!
//! * `/metrics`: every registered metric. Prometheus' classic text format (version 0.0.4, as
//!   Go's client writes it) by default; OpenMetrics when the scraper asks for it in `Accept`.
//! * `/healthz`: plain `ok` (the generic handler, not the proxy health of port 10256).
//! * `/proxyMode`: the mode name, no newline.
//! * `/configz`: `{"kubeproxy.config.k8s.io": <configuration>}`.
//! * with `enableProfiling`: `/debug/flags/v` (GET shows, PUT sets the log verbosity) and
//!   `/debug/pprof/*` (Go profiles do not exist here; it says so and names the alternative).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Response, StatusCode};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::servers::http::{not_found, text, with_type, SimpleRequest};

/// What the metrics server serves.
pub struct MetricsServer {
    pub registry: Registry,
    pub mode: &'static str,
    /// The `/configz` body.
    pub configz: String,
    pub enable_profiling: bool,
}

const OPENMETRICS: &str = "application/openmetrics-text";

impl MetricsServer {
    pub fn respond(&self, req: &SimpleRequest) -> Response<Full<Bytes>> {
        match req.path.as_str() {
            "/metrics" => self.metrics(req.accept.as_deref()),
            "/healthz" => text(StatusCode::OK, "ok".into()),
            "/proxyMode" => text(StatusCode::OK, self.mode.into()),
            "/configz" => with_type(StatusCode::OK, "application/json", self.configz.clone()),
            "/debug/flags/v" if self.enable_profiling => verbosity_flag(req),
            path if self.enable_profiling && path.starts_with("/debug/pprof") => text(
                StatusCode::NOT_IMPLEMENTED,
                "kube-proxy-rs is not a Go program: Go pprof profiles do not exist. \
                 Profile the process with perf (perf record -g -p <pid>) instead.\n"
                    .into(),
            ),
            _ => not_found(),
        }
    }

    fn metrics(&self, accept: Option<&str>) -> Response<Full<Bytes>> {
        let mut encoded = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut encoded, &self.registry) {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot encode metrics: {e}\n"),
            );
        }
        if accept.is_some_and(|a| a.contains(OPENMETRICS)) {
            with_type(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                encoded,
            )
        } else {
            with_type(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                openmetrics_to_classic(&encoded),
            )
        }
    }
}

/// `GET` prints the current `-v`; `PUT` with a number sets it (upstream's `/debug/flags/v`).
fn verbosity_flag(req: &SimpleRequest) -> Response<Full<Bytes>> {
    match req.method {
        Method::GET => text(
            StatusCode::OK,
            format!("{}\n", crate::telemetry::logging::verbosity()),
        ),
        Method::PUT => {
            let value = String::from_utf8_lossy(&req.body).trim().to_string();
            match value.parse::<u32>() {
                Ok(v) => {
                    crate::telemetry::logging::set_verbosity(v);
                    info!(
                        verbosity = v,
                        "Log verbosity changed through /debug/flags/v"
                    );
                    text(
                        StatusCode::OK,
                        format!("successfully set klog.logging.verbosity to {v}\n"),
                    )
                }
                Err(_) => text(
                    StatusCode::BAD_REQUEST,
                    format!("invalid verbosity {value:?}: must be a non-negative integer\n"),
                ),
            }
        }
        _ => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and PUT are allowed\n".into(),
        ),
    }
}

/// Rewrites OpenMetrics text as Prometheus' classic text format, the way Go's client prints
/// it: counters are named with their `_total` suffix in `# HELP`/`# TYPE`, help texts lose
/// the trailing period the encoder adds, floats print in their shortest form (`1`, not
/// `1.0`, also in `le` labels), and there is no `# EOF`.
pub fn openmetrics_to_classic(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, text.strip_suffix('.').unwrap_or(text)));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" if !name.ends_with("_total") => (format!("{name}_total"), "counter"),
                "unknown" => (name.to_string(), "untyped"),
                _ => (name.to_string(), kind),
            };
            if let Some((_, text)) = help.take() {
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
        } else if line.starts_with('#') {
            // `# EOF`, `# UNIT`: not part of the classic format.
        } else if !line.is_empty() {
            out.push_str(&classic_sample(line));
            out.push('\n');
        }
    }
    out
}

/// One sample line with Go's number formatting (value and `le` label).
fn classic_sample(line: &str) -> String {
    let (series, value) = match line.rsplit_once(' ') {
        Some(parts) => parts,
        None => return line.to_string(),
    };
    let series = match series.split_once("le=\"") {
        Some((before, rest)) => match rest.split_once('"') {
            Some((le, after)) => format!("{before}le=\"{}\"{after}", go_float(le)),
            None => series.to_string(),
        },
        None => series.to_string(),
    };
    format!("{series} {}", go_float(value))
}

/// `1.0` -> `1`, `0.25` -> `0.25`, `+Inf` stays; anything unparsable is kept.
fn go_float(value: &str) -> String {
    if !value.contains('.') {
        return value.to_string();
    }
    match value.parse::<f64>() {
        Ok(f) if f.is_finite() => format!("{f}"),
        _ => value.to_string(),
    }
}

/// Serves the metrics server on `address` until the process ends.
pub async fn serve(
    address: SocketAddr,
    server: Arc<MetricsServer>,
    hard_fail: bool,
) -> anyhow::Result<()> {
    let listener = crate::servers::http::bind(address, "metrics server", hard_fail).await?;
    info!(address = %address, "Serving /metrics, /healthz, /proxyMode and /configz");
    let handler: crate::servers::http::Handler = Arc::new(move |req| server.respond(&req));
    crate::servers::http::serve(listener, handler, CancellationToken::new()).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::metrics::Metrics;
    use kube_proxy_config::ProxyMode;
    use kube_proxy_model::IpFamily;

    fn server(profiling: bool) -> MetricsServer {
        let metrics = Metrics::new(ProxyMode::Nftables);
        metrics.initialize(&IpFamily::ALL);
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        metrics.endpoint_changes_total.inc_by(3);
        metrics.observe_sync(IpFamily::V4, true, std::time::Duration::from_millis(3));
        MetricsServer {
            registry,
            mode: "nftables",
            configz: r#"{"kubeproxy.config.k8s.io":{}}"#.into(),
            enable_profiling: profiling,
        }
    }

    fn get(path: &str, accept: Option<&str>) -> SimpleRequest {
        SimpleRequest {
            method: Method::GET,
            path: path.into(),
            query: None,
            accept: accept.map(str::to_string),
            body: Bytes::new(),
            local: None,
        }
    }

    fn body(response: Response<Full<Bytes>>) -> (u16, String, String) {
        use http_body_util::BodyExt;
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let bytes = futures::executor::block_on(response.into_body().collect())
            .unwrap()
            .to_bytes();
        (
            status,
            content_type,
            String::from_utf8(bytes.to_vec()).unwrap(),
        )
    }

    #[test]
    fn classic_format_matches_gos() {
        let (status, content_type, text) = body(server(false).respond(&get("/metrics", None)));
        assert_eq!(status, 200);
        assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
        assert!(
            text.contains("# HELP kubeproxy_sync_proxy_rules_endpoint_changes_total Cumulative proxy rules Endpoint changes\n# TYPE kubeproxy_sync_proxy_rules_endpoint_changes_total counter\nkubeproxy_sync_proxy_rules_endpoint_changes_total 3\n"),
            "{text}"
        );
        assert!(
            text.contains("kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.004\",ip_family=\"IPv4\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} 1\n"
            ),
            "{text}"
        );
        assert!(!text.contains("# EOF"));
        assert!(!text.contains("Cumulative proxy rules Endpoint changes."));
    }

    #[test]
    fn openmetrics_on_request() {
        let (status, content_type, text) = body(server(false).respond(&get(
            "/metrics",
            Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5"),
        )));
        assert_eq!(status, 200);
        assert!(content_type.starts_with("application/openmetrics-text"));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn other_paths() {
        let s = server(false);
        assert_eq!(body(s.respond(&get("/healthz", None))).2, "ok");
        let (status, content_type, mode) = body(s.respond(&get("/proxyMode", None)));
        assert_eq!((status, mode.as_str()), (200, "nftables"));
        assert_eq!(content_type, "text/plain; charset=utf-8");
        let (_, content_type, configz) = body(s.respond(&get("/configz", None)));
        assert_eq!(content_type, "application/json");
        assert!(configz.starts_with(r#"{"kubeproxy.config.k8s.io""#));
        assert_eq!(body(s.respond(&get("/debug/flags/v", None))).0, 404);
        assert_eq!(body(s.respond(&get("/debug/pprof/", None))).0, 404);
        assert_eq!(body(s.respond(&get("/nope", None))).0, 404);
    }

    #[test]
    fn profiling_paths() {
        let s = server(true);
        assert_eq!(body(s.respond(&get("/debug/pprof/heap", None))).0, 501);
        let mut put = get("/debug/flags/v", None);
        put.method = Method::PUT;
        put.body = Bytes::from_static(b"x");
        assert_eq!(body(s.respond(&put)).0, 400);
        let (status, _, text) = body(s.respond(&get("/debug/flags/v", None)));
        assert_eq!(status, 200);
        assert!(text.trim().parse::<u32>().is_ok());
    }

    #[test]
    fn float_formatting() {
        assert_eq!(go_float("1.0"), "1");
        assert_eq!(go_float("0.001"), "0.001");
        assert_eq!(go_float("+Inf"), "+Inf");
        assert_eq!(go_float("17"), "17");
        assert_eq!(
            classic_sample("x_bucket{le=\"60.0\",ip_family=\"IPv4\"} 0"),
            "x_bucket{le=\"60\",ip_family=\"IPv4\"} 0"
        );
    }
}
