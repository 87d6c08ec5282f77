//! The proxy health server on `healthzBindAddress` (default 0.0.0.0:10256): `/healthz` and
//! `/livez` with upstream's semantics, status codes, headers and JSON body.
//!
//! * A family is unhealthy iff a change has been queued for longer than 2 x syncPeriod without
//!   being programmed; start-up and idle are healthy.
//! * `/livez`: 200 if every family is healthy, else 503.
//! * `/healthz`: 200 only if healthy **and** the Node is eligible (known, not being deleted,
//!   not tainted `ToBeDeletedByClusterAutoscaler`), so load balancers drain a node the
//!   autoscaler is removing; 503 otherwise.
//! * When healthy, `lastUpdated` is the current time (upstream keeps that for old clients).
//!
//! The reply is computed by a pure function of the shared status and the time.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::sync::sync_status::{SharedSyncStatus, SyncStatus};
use crate::telemetry::logging::rfc3339_nanos;
use crate::telemetry::metrics::{CodeLabels, Metrics};

/// One family's part of the body.
#[derive(serde::Serialize)]
struct FamilyHealth {
    #[serde(rename = "lastUpdated")]
    last_updated: String,
    healthy: bool,
}

/// The body, with upstream's field order.
#[derive(serde::Serialize)]
struct Body {
    #[serde(rename = "lastUpdated")]
    last_updated: String,
    #[serde(rename = "currentTime")]
    current_time: String,
    #[serde(rename = "nodeEligible", skip_serializing_if = "Option::is_none")]
    node_eligible: Option<bool>,
    healthy: bool,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    status: BTreeMap<&'static str, FamilyHealth>,
}

/// A computed reply: status code and JSON body (empty for unknown paths).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

/// Which endpoint is asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    Healthz,
    Livez,
}

/// The reply to `probe` given the sync status at `now`.
pub fn reply(status: &SyncStatus, probe: Probe, now: SystemTime, timeout: Duration) -> Reply {
    let mut families = BTreeMap::new();
    let mut healthy = true;
    let mut last_updated = SystemTime::UNIX_EPOCH;
    for (family, state) in &status.families {
        let family_last = state.last_updated.unwrap_or(SystemTime::UNIX_EPOCH);
        last_updated = last_updated.max(family_last);
        let family_healthy = status.family_healthy(*family, now, timeout);
        healthy &= family_healthy;
        families.insert(
            family.as_str(),
            FamilyHealth {
                last_updated: rfc3339_nanos(family_last),
                healthy: family_healthy,
            },
        );
    }
    let node_eligible = match probe {
        Probe::Healthz => Some(status.node_eligible()),
        Probe::Livez => None,
    };
    let healthy = healthy && node_eligible.unwrap_or(true);
    if healthy {
        last_updated = now;
    }
    let body = Body {
        last_updated: rfc3339_nanos(last_updated),
        current_time: rfc3339_nanos(now),
        node_eligible,
        healthy,
        status: families,
    };
    Reply {
        status: if healthy { 200 } else { 503 },
        body: serde_json::to_string(&body).expect("health body serializes"),
    }
}

/// The health server's shared inputs.
#[derive(Clone)]
pub struct HealthState {
    pub status: SharedSyncStatus,
    pub timeout: Duration,
    pub metrics: Arc<Metrics>,
}

/// Serves `/healthz` and `/livez` on `address` until the process ends (bind failures: see
/// [`crate::servers::http::bind`]).
pub async fn serve(address: SocketAddr, state: HealthState, hard_fail: bool) -> anyhow::Result<()> {
    let listener = crate::servers::http::bind(address, "health server", hard_fail).await?;
    info!(address = %address, "Serving /healthz and /livez");
    let handler: crate::servers::http::Handler = Arc::new(move |req| respond(&req.path, &state));
    crate::servers::http::serve(listener, handler, CancellationToken::new()).await;
    Ok(())
}

/// The HTTP response for `path`; counts the reply in `kubeproxy_proxy_{healthz,livez}_total`.
pub fn respond(path: &str, state: &HealthState) -> Response<Full<Bytes>> {
    let probe = match path {
        "/healthz" => Probe::Healthz,
        "/livez" => Probe::Livez,
        _ => return crate::servers::http::not_found(),
    };
    let computed = reply(
        &state.status.lock().unwrap(),
        probe,
        SystemTime::now(),
        state.timeout,
    );
    let code = if computed.status == 200 { "200" } else { "503" };
    let counter = match probe {
        Probe::Healthz => &state.metrics.healthz_total,
        Probe::Livez => &state.metrics.livez_total,
    };
    counter.get_or_create(&CodeLabels { code }).inc();
    crate::servers::http::with_type(
        StatusCode::from_u16(computed.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        "application/json",
        computed.body,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::sync_status::NodeHealth;
    use kube_proxy_model::IpFamily;

    const TIMEOUT: Duration = Duration::from_secs(60);

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_348_800 + secs)
    }

    fn status(node: Option<NodeHealth>) -> SyncStatus {
        let mut s = SyncStatus {
            node,
            ..Default::default()
        };
        s.updated(IpFamily::V4, t(0));
        s.updated(IpFamily::V6, t(0));
        s
    }

    fn json(reply: &Reply) -> serde_json::Value {
        serde_json::from_str(&reply.body).unwrap()
    }

    #[test]
    fn healthy_with_an_eligible_node() {
        let s = status(Some(NodeHealth::default()));
        let r = reply(&s, Probe::Healthz, t(10), TIMEOUT);
        assert_eq!(r.status, 200);
        assert_eq!(
            r.body,
            r#"{"lastUpdated":"2026-11-22T12:00:10Z","currentTime":"2026-11-22T12:00:10Z","nodeEligible":true,"healthy":true,"status":{"IPv4":{"lastUpdated":"2026-11-22T12:00:00Z","healthy":true},"IPv6":{"lastUpdated":"2026-11-22T12:00:00Z","healthy":true}}}"#
        );
        let live = reply(&s, Probe::Livez, t(10), TIMEOUT);
        assert_eq!(live.status, 200);
        assert!(
            json(&live).get("nodeEligible").is_none(),
            "livez has no nodeEligible"
        );
    }

    #[test]
    fn unknown_deleting_or_tainted_node_fails_healthz_only() {
        for node in [
            None,
            Some(NodeHealth {
                deleting: true,
                to_be_deleted: false,
            }),
            Some(NodeHealth {
                deleting: false,
                to_be_deleted: true,
            }),
        ] {
            let s = status(node);
            let r = reply(&s, Probe::Healthz, t(10), TIMEOUT);
            assert_eq!(r.status, 503, "{node:?}");
            assert_eq!(json(&r)["nodeEligible"], false);
            assert_eq!(json(&r)["healthy"], false);
            assert_eq!(
                json(&r)["lastUpdated"],
                "2026-11-22T12:00:00Z",
                "unhealthy: the real last update"
            );
            assert_eq!(
                reply(&s, Probe::Livez, t(10), TIMEOUT).status,
                200,
                "livez ignores the node"
            );
        }
    }

    #[test]
    fn a_change_queued_too_long_is_unhealthy() {
        let mut s = status(Some(NodeHealth::default()));
        s.queued(IpFamily::V6, t(100));
        assert_eq!(
            reply(&s, Probe::Livez, t(160), TIMEOUT).status,
            200,
            "exactly the timeout is still healthy"
        );
        let r = reply(&s, Probe::Livez, t(161), TIMEOUT);
        assert_eq!(r.status, 503);
        assert_eq!(json(&r)["status"]["IPv4"]["healthy"], true);
        assert_eq!(json(&r)["status"]["IPv6"]["healthy"], false);
        assert_eq!(reply(&s, Probe::Healthz, t(161), TIMEOUT).status, 503);
        s.updated(IpFamily::V6, t(170));
        assert_eq!(
            reply(&s, Probe::Livez, t(500), TIMEOUT).status,
            200,
            "programmed: healthy again"
        );
    }
}
