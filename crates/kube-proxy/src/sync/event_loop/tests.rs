use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;

use super::*;
use crate::sync::dataplane::{SyncError, SyncInput, SyncReport};

/// Records every sync; fails while `fail` is set.
/// One recorded sync: family, number of service ports, changed ports, full.
type Call = (IpFamily, usize, Vec<String>, bool);

#[derive(Clone, Default)]
struct Recorder {
    calls: Arc<Mutex<Vec<Call>>>,
    fail: Arc<Mutex<bool>>,
}

impl Dataplane for Recorder {
    fn name(&self) -> &'static str {
        "recorder"
    }
    fn sync(&mut self, input: SyncInput<'_>) -> Result<SyncReport, SyncError> {
        let SyncInput {
            family,
            plan,
            changed,
            full,
            ..
        } = input;
        self.calls.lock().unwrap().push((
            family,
            plan.services.len(),
            changed.iter().map(|c| c.to_string()).collect(),
            full,
        ));
        if *self.fail.lock().unwrap() {
            return Err(SyncError::retry(family, "injected failure"));
        }
        Ok(SyncReport {
            service_ports: plan.services.len(),
            changed: changed.len(),
            full,
            statements: 0,
            transactions: 1,
            ..Default::default()
        })
    }
}

fn service(name: &str, ip: &str) -> Service {
    serde_json::from_value(json!({"metadata": {"namespace": "ns", "name": name}, "spec": {"clusterIP": ip, "ports": [{"name": "p", "port": 80}]}})).unwrap()
}

fn slice(svc: &str, ip: &str) -> EndpointSlice {
    serde_json::from_value(json!({"metadata": {"namespace": "ns", "name": format!("{svc}-x"), "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4", "ports": [{"name": "p", "port": 8080}], "endpoints": [{"addresses": [ip]}]})).unwrap()
}

fn event_loop(recorder: &Recorder) -> EventLoop {
    EventLoop::new(
        "node-a",
        &[IpFamily::V4, IpFamily::V6],
        SchedulerConfig::new(Duration::from_millis(50), Duration::from_secs(30)),
        PlanContext::default(),
        Box::new(recorder.clone()),
        Default::default(),
        Default::default(),
    )
}

#[test]
fn nothing_syncs_before_both_caches_are_listed() {
    let recorder = Recorder::default();
    let mut el = event_loop(&recorder);
    el.handle(SourceEvent::Services(ObjectEvent::Replace(vec![service(
        "a",
        "198.19.0.1",
    )])));
    el.handle(SourceEvent::Services(ObjectEvent::Apply(service(
        "b",
        "198.19.0.2",
    ))));
    assert!(!el.state().ready_to_sync());
    assert_eq!(
        el.scheduler.due(Instant::now() + Duration::from_secs(1)),
        None,
        "no sync requested before both lists"
    );
    el.handle(SourceEvent::EndpointSlices(ObjectEvent::Replace(vec![
        slice("a", "198.18.0.1"),
    ])));
    assert!(el.state().ready_to_sync());
    el.sync(SyncKind::Full);
    let calls = recorder.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2, "one call per family");
    assert_eq!(
        calls[0],
        (
            IpFamily::V4,
            2,
            vec!["ns/a:p".to_string(), "ns/b:p".to_string()],
            true
        )
    );
    assert_eq!(calls[1].0, IpFamily::V6);
    assert_eq!(calls[1].1, 0);
}

#[test]
fn partial_sync_gets_only_what_changed() {
    let recorder = Recorder::default();
    let mut el = event_loop(&recorder);
    el.handle(SourceEvent::Services(ObjectEvent::Replace(vec![
        service("a", "198.19.0.1"),
        service("b", "198.19.0.2"),
    ])));
    el.handle(SourceEvent::EndpointSlices(ObjectEvent::Replace(vec![])));
    el.sync(SyncKind::Full);
    el.handle(SourceEvent::EndpointSlices(ObjectEvent::Apply(slice(
        "b",
        "198.18.0.2",
    ))));
    el.sync(SyncKind::Partial);
    let calls = recorder.calls.lock().unwrap().clone();
    assert_eq!(
        calls[2],
        (IpFamily::V4, 2, vec!["ns/b:p".to_string()], false)
    );
    assert_eq!(calls[3], (IpFamily::V6, 0, vec![], false));
}

#[test]
fn failed_sync_keeps_changes_and_retries_full() {
    let recorder = Recorder::default();
    let mut el = event_loop(&recorder);
    el.handle(SourceEvent::Services(ObjectEvent::Replace(vec![service(
        "a",
        "198.19.0.1",
    )])));
    el.handle(SourceEvent::EndpointSlices(ObjectEvent::Replace(vec![])));
    el.sync(SyncKind::Full);
    *recorder.fail.lock().unwrap() = true;
    el.handle(SourceEvent::Services(ObjectEvent::Apply(service(
        "b",
        "198.19.0.2",
    ))));
    el.sync(SyncKind::Partial);
    *recorder.fail.lock().unwrap() = false;
    el.handle(SourceEvent::Services(ObjectEvent::Apply(service(
        "c",
        "198.19.0.3",
    ))));
    let now = Instant::now();
    assert_eq!(
        el.scheduler.due(now + Duration::from_secs(2)),
        Some(SyncKind::Full),
        "retry is a full sync"
    );
    el.sync(SyncKind::Full);
    let calls = recorder.calls.lock().unwrap().clone();
    let last_v4 = calls.iter().rev().find(|c| c.0 == IpFamily::V4).unwrap();
    assert_eq!(
        last_v4.2,
        vec!["ns/b:p".to_string(), "ns/c:p".to_string()],
        "b's change survived the failure"
    );
    assert!(last_v4.3);
}

#[test]
fn invalid_objects_do_not_block_others() {
    let recorder = Recorder::default();
    let mut el = event_loop(&recorder);
    el.handle(SourceEvent::Services(ObjectEvent::Replace(vec![
        service("bad", "nope"),
        service("good", "198.19.0.9"),
    ])));
    el.handle(SourceEvent::EndpointSlices(ObjectEvent::Replace(vec![])));
    el.sync(SyncKind::Full);
    assert_eq!(el.plan(IpFamily::V4).unwrap().services.len(), 1);
}

#[tokio::test]
async fn run_loop_syncs_once_listed_and_follows_changes() {
    let recorder = Recorder::default();
    let el = event_loop(&recorder);
    let (tx, rx) = mpsc::channel(16);
    let task = tokio::spawn(el.run(rx));
    tx.send(SourceEvent::Services(ObjectEvent::Replace(vec![service(
        "a",
        "198.19.0.1",
    )])))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        recorder.calls.lock().unwrap().is_empty(),
        "no sync before EndpointSlices are listed"
    );
    tx.send(SourceEvent::EndpointSlices(ObjectEvent::Replace(vec![])))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(recorder.calls.lock().unwrap().len(), 2);
    // A Service and its slice sent together land in one sync.
    tx.send(SourceEvent::Services(ObjectEvent::Apply(service(
        "b",
        "198.19.0.2",
    ))))
    .await
    .unwrap();
    tx.send(SourceEvent::EndpointSlices(ObjectEvent::Apply(slice(
        "b",
        "198.18.0.2",
    ))))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let calls = recorder.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 4, "{calls:?}");
    assert_eq!(calls[2].2, vec!["ns/b:p".to_string()]);
    drop(tx);
    task.await.unwrap().unwrap();
}

/// Reads one sample of the encoded registry (classic format), e.g.
/// `kubeproxy_sync_proxy_rules_endpoint_changes_total`.
fn sample(metrics: &Metrics, series: &str) -> Option<f64> {
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let text = crate::servers::metrics_server::openmetrics_to_classic(&text);
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn syncs_are_reported_in_metrics() {
    let recorder = Recorder::default();
    let metrics = Arc::new(Metrics::new(kube_proxy_config::ProxyMode::Nftables));
    let mut el = event_loop(&recorder).with_metrics(metrics.clone());
    // As if the proxy had started a minute ago.
    el.started_at = SystemTime::now() - Duration::from_secs(60);
    // An eTP-Local LoadBalancer whose only endpoint is on another node.
    let lb: Service = serde_json::from_value(json!({"metadata": {"namespace": "ns", "name": "lb"},
        "spec": {"type": "LoadBalancer", "clusterIP": "198.19.0.9", "externalTrafficPolicy": "Local",
                 "healthCheckNodePort": 30999,
                 "ports": [{"name": "p", "port": 80, "nodePort": 30080}]}})).unwrap();
    el.handle(SourceEvent::Services(ObjectEvent::Replace(vec![
        service("a", "198.19.0.1"),
        lb,
    ])));
    let mut remote: EndpointSlice = serde_json::from_value(json!({"metadata": {"namespace": "ns", "name": "lb-x", "labels": {"kubernetes.io/service-name": "lb"}},
        "addressType": "IPv4", "ports": [{"name": "p", "port": 8080}],
        "endpoints": [{"addresses": ["198.18.2.2"], "nodeName": "node-b"}]})).unwrap();
    el.handle(SourceEvent::EndpointSlices(ObjectEvent::Replace(vec![
        slice("a", "198.18.0.1"),
        remote.clone(),
    ])));
    assert_eq!(
        sample(&metrics, "kubeproxy_sync_proxy_rules_service_changes_total"),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &metrics,
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending"
        ),
        Some(2.0)
    );
    el.sync(SyncKind::Full);
    assert_eq!(
        sample(
            &metrics,
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending"
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &metrics,
            "kubeproxy_sync_proxy_rules_endpoint_changes_total"
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &metrics,
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"}"
        ),
        Some(1.0)
    );
    assert!(
        sample(
            &metrics,
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv6\"}"
        )
        .unwrap()
            > 1.7e9
    );
    assert_eq!(
        sample(&metrics, "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"external\"}"),
        Some(1.0)
    );

    // A slice update carrying a trigger time 2 s ago is programmed: one latency sample of
    // about 2 s. A trigger time from before the proxy started is ignored.
    let two_seconds_ago = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(2);
    remote.metadata.annotations = Some(
        [(
            TRIGGER_TIME_ANNOTATION.to_string(),
            two_seconds_ago.to_string(),
        )]
        .into(),
    );
    remote.endpoints[0].addresses = vec!["198.18.2.3".into()];
    el.handle(SourceEvent::EndpointSlices(ObjectEvent::Apply(
        remote.clone(),
    )));
    let mut old = slice("a", "198.18.0.7");
    old.metadata.annotations = Some(
        [(
            TRIGGER_TIME_ANNOTATION.to_string(),
            "2020-01-01T00:00:00Z".to_string(),
        )]
        .into(),
    );
    el.handle(SourceEvent::EndpointSlices(ObjectEvent::Apply(old)));
    el.sync(SyncKind::Partial);
    let count = |le: &str| {
        sample(
            &metrics,
            &format!("kubeproxy_network_programming_duration_seconds_bucket{{le=\"{le}\",ip_family=\"IPv4\"}}"),
        )
    };
    assert_eq!(count("1"), Some(0.0));
    assert_eq!(count("60"), Some(1.0), "one sample, not the 2020 one");
    assert_eq!(
        sample(
            &metrics,
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"}"
        ),
        Some(1.0)
    );
    let external = "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"external\"}";
    assert_eq!(sample(&metrics, external), Some(1.0), "still remote only");
    // The endpoint moves to this node: counted no more (updated by a partial sync).
    remote.endpoints[0].node_name = Some("node-a".into());
    el.handle(SourceEvent::EndpointSlices(ObjectEvent::Apply(remote)));
    el.sync(SyncKind::Partial);
    assert_eq!(sample(&metrics, external), Some(0.0));
}

/// Conntrack cleanup runs after full syncs and after syncs that changed a UDP port, not
/// after TCP-only changes; what it deletes is counted.
#[test]
fn conntrack_cleanup_runs_when_udp_ports_change() {
    let recorder = Recorder::default();
    let metrics = Arc::new(Metrics::new(kube_proxy_config::ProxyMode::Nftables));
    let calls = Arc::new(Mutex::new(Vec::new()));
    let seen = calls.clone();
    let mut el = event_loop(&recorder)
        .with_metrics(metrics.clone())
        .with_conntrack_cleanup(Box::new(move |family, _state, _addresses| {
            seen.lock().unwrap().push(family);
            Ok(crate::kernel::conntrack::Reconciled {
                listed: 5,
                deleted: 2,
            })
        }));
    let udp: Service = serde_json::from_value(json!({"metadata": {"namespace": "ns", "name": "dns"},
        "spec": {"clusterIP": "198.19.0.53", "ports": [{"name": "p", "port": 53, "protocol": "UDP"}]}}))
    .unwrap();
    el.handle(SourceEvent::Services(ObjectEvent::Replace(vec![
        service("a", "198.19.0.1"),
        udp,
    ])));
    el.handle(SourceEvent::EndpointSlices(ObjectEvent::Replace(vec![])));
    el.sync(SyncKind::Full);
    assert_eq!(*calls.lock().unwrap(), vec![IpFamily::V4, IpFamily::V6]);
    // TCP only.
    el.handle(SourceEvent::EndpointSlices(ObjectEvent::Apply(slice(
        "a",
        "198.18.0.1",
    ))));
    el.sync(SyncKind::Partial);
    assert_eq!(calls.lock().unwrap().len(), 2);
    // The UDP Service gets an endpoint: IPv4 only.
    let udp_slice: EndpointSlice = serde_json::from_value(json!({"metadata": {"namespace": "ns", "name": "dns-x", "labels": {"kubernetes.io/service-name": "dns"}},
        "addressType": "IPv4", "ports": [{"name": "p", "port": 5353, "protocol": "UDP"}], "endpoints": [{"addresses": ["198.18.0.9"]}]}))
    .unwrap();
    el.handle(SourceEvent::EndpointSlices(ObjectEvent::Apply(udp_slice)));
    el.sync(SyncKind::Partial);
    assert_eq!(
        *calls.lock().unwrap(),
        vec![IpFamily::V4, IpFamily::V6, IpFamily::V4]
    );
    assert_eq!(
        sample(
            &metrics,
            "kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family=\"IPv4\"}"
        ),
        Some(4.0)
    );
    assert_eq!(
        sample(
            &metrics,
            "kubeproxy_conntrack_reconciler_sync_duration_seconds_count{ip_family=\"IPv4\"}"
        ),
        Some(2.0)
    );
}

fn node(addresses: &[&str]) -> k8s_openapi::api::core::v1::Node {
    let addresses: Vec<serde_json::Value> = addresses
        .iter()
        .map(|a| json!({"type": "InternalIP", "address": a}))
        .collect();
    serde_json::from_value(
        json!({"metadata": {"name": "node-a"}, "status": {"addresses": addresses}}),
    )
    .unwrap()
}

/// As upstream's NodeManager: the first sync waits until the Node exists with addresses, so
/// the first ruleset already has the node's IPs; the Node arriving last is the normal case.
#[test]
fn first_sync_waits_for_the_node_with_addresses() {
    let recorder = Recorder::default();
    let wait = NodeWait {
        need_pod_cidrs: false,
        timeout: Duration::from_secs(300),
    };
    let mut el = event_loop(&recorder).wait_for_node(wait);
    el.handle(SourceEvent::Services(ObjectEvent::Replace(vec![service(
        "a",
        "198.19.0.1",
    )])));
    el.handle(SourceEvent::EndpointSlices(ObjectEvent::Replace(vec![])));
    let now = Instant::now();
    assert!(!el.ready(now).unwrap(), "no Node yet");
    el.handle(SourceEvent::Node(ObjectEvent::Replace(vec![node(&[])])));
    assert!(!el.ready(now).unwrap(), "a Node without addresses");
    el.handle(SourceEvent::Node(ObjectEvent::Apply(node(&["192.0.2.10"]))));
    assert!(el.ready(now).unwrap());
    // Once ready, a later loss of the Node does not stop syncing.
    el.handle(SourceEvent::Node(ObjectEvent::Delete(node(&[
        "192.0.2.10",
    ]))));
    assert!(el.ready(now).unwrap());
}

#[test]
fn waiting_for_pod_cidrs_and_giving_up() {
    let recorder = Recorder::default();
    let wait = NodeWait {
        need_pod_cidrs: true,
        timeout: Duration::from_secs(300),
    };
    let mut el = event_loop(&recorder).wait_for_node(wait);
    el.handle(SourceEvent::Services(ObjectEvent::Replace(vec![])));
    el.handle(SourceEvent::EndpointSlices(ObjectEvent::Replace(vec![])));
    el.handle(SourceEvent::Node(ObjectEvent::Replace(vec![node(&[
        "192.0.2.10",
    ])])));
    let now = Instant::now();
    assert!(!el.ready(now).unwrap(), "NodeCIDR mode needs the pod CIDRs");
    let err = el.ready(now + Duration::from_secs(301)).unwrap_err();
    assert!(
        err.to_string().contains("has no PodCIDR allocated"),
        "{err}"
    );
}

/// Without a Node wait (standalone manifests) syncing starts once both kinds are listed.
#[test]
fn standalone_mode_does_not_wait_for_a_node() {
    let recorder = Recorder::default();
    let mut el = event_loop(&recorder);
    el.handle(SourceEvent::Services(ObjectEvent::Replace(vec![])));
    el.handle(SourceEvent::EndpointSlices(ObjectEvent::Replace(vec![])));
    assert!(el.ready(Instant::now()).unwrap());
}
