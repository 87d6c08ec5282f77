use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;

use super::*;
use crate::dataplane::{SyncError, SyncInput, SyncReport};

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
            return Err(SyncError {
                family,
                message: "injected failure".into(),
            });
        }
        Ok(SyncReport {
            service_ports: plan.services.len(),
            changed: changed.len(),
            full,
            statements: 0,
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
    task.await.unwrap();
}
