//! Cold start end to end: the `kube-proxy` binary, started with upstream's flags against a
//! fake API server that serves the lists at scale (pre-serialized, streamed in 64 KiB chunks
//! like a real API server's watch cache answers), in a network namespace of its own, until
//! every Service of both families is in the kernel.
//!
//! Run as root: `cargo bench --bench cold_start` (scales from `KP_BENCH_SCALES`, default
//! `10000x2,50000x5`; each in a child process with its own namespace). Prints, per scale:
//! process start to each kind listed, to the first sync and to both families programmed, the
//! list and sync parts apart, the proxy's peak RSS and the peak RSS of its largest child
//! (`nft` loading the first transaction).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};

#[path = "../tests/fakeapi/mod.rs"]
mod fakeapi;

fn cluster_ip(i: usize) -> String {
    format!("198.19.{}.{}", (i / 250) % 256, 1 + i % 250)
}

fn pod_ip(j: usize) -> String {
    format!("198.18.{}.{}", (j / 250) % 256, 1 + j % 250)
}

fn cluster_port(i: usize) -> usize {
    // Enough distinct (ip, port) frontends at 50k Services.
    80 + i / 64000
}

/// A Service as a real API server returns it (managedFields included: the proxy must read
/// past them).
fn service(i: usize) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc-{i}"), "namespace": "bench", "uid": format!("5c1a3e2e-0000-4000-8000-{i:012}"),
            "resourceVersion": format!("{}", 1000 + i), "creationTimestamp": "2026-11-30T10:00:00Z",
            "labels": {"app": format!("svc-{i}"), "team": "bench"},
            "managedFields": [{"manager": "kubectl-client-side-apply", "operation": "Update", "apiVersion": "v1",
                "time": "2026-11-30T10:00:00Z", "fieldsType": "FieldsV1",
                "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:app": {}, "f:team": {}}},
                    "f:spec": {"f:internalTrafficPolicy": {}, "f:ports": {".": {}, "k:{\"port\":80,\"protocol\":\"TCP\"}": {".": {}, "f:name": {}, "f:port": {}, "f:protocol": {}, "f:targetPort": {}}},
                    "f:selector": {}, "f:sessionAffinity": {}, "f:type": {}}}}]},
        "spec": {"type": "ClusterIP", "clusterIP": cluster_ip(i), "clusterIPs": [cluster_ip(i)],
            "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack", "internalTrafficPolicy": "Cluster",
            "sessionAffinity": "None", "selector": {"app": format!("svc-{i}")},
            "ports": [{"name": "http", "port": cluster_port(i), "protocol": "TCP", "targetPort": 8080}]},
        "status": {"loadBalancer": {}}})
}

fn slice(i: usize, m: usize) -> Value {
    let endpoints: Vec<Value> = (0..m)
        .map(|k| {
            let j = i * m + k;
            json!({"addresses": [pod_ip(j)], "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": if k == 0 { "node-a" } else { "node-b" },
                "targetRef": {"kind": "Pod", "name": format!("svc-{i}-pod-{k}"), "namespace": "bench", "uid": format!("9d0e-{j:012}")},
                "zone": "zone-a"})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{i}-abcde"), "namespace": "bench", "uid": format!("77aa-{i:012}"),
            "resourceVersion": format!("{}", 100000 + i), "generateName": format!("svc-{i}-"),
            "labels": {"kubernetes.io/service-name": format!("svc-{i}"), "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-11-30T10:00:01Z"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": format!("svc-{i}"), "uid": format!("5c1a3e2e-0000-4000-8000-{i:012}"), "controller": true, "blockOwnerDeletion": true}]},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints})
}

fn list_body(kind: &str, items: impl Iterator<Item = Value>) -> Bytes {
    let mut text = format!(
        "{{\"kind\":\"{kind}\",\"apiVersion\":\"v1\",\"metadata\":{{\"resourceVersion\":\"999999\"}},\"items\":["
    );
    for (index, item) in items.enumerate() {
        if index > 0 {
            text.push(',');
        }
        text.push_str(&item.to_string());
    }
    text.push_str("]}");
    Bytes::from(text)
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn run_scale(n: usize, m: usize) {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .expect("unshare a network namespace (run as root)");
    let up = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .unwrap();
    assert!(up.success());
    let services = list_body("ServiceList", (0..n).map(service));
    let slices = list_body("EndpointSliceList", (0..n).map(|i| slice(i, m)));
    let (service_bytes, slice_bytes) = (services.len(), slices.len());

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _guard = runtime.enter();
    let fake = Arc::new(Mutex::new(fakeapi::Fake::default()));
    {
        let mut f = fake.lock().unwrap();
        f.prepared.insert("/api/v1/services".into(), services);
        f.prepared
            .insert("/apis/discovery.k8s.io/v1/endpointslices".into(), slices);
        f.nodes = vec![
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "resourceVersion": "5"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.10"}]}}),
        ];
        f.service_cidrs = Some(vec![
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
            "metadata": {"name": "kubernetes", "resourceVersion": "2"}, "spec": {"cidrs": ["198.19.0.0/16"]}}),
        ]);
    }
    let url = runtime.block_on(fakeapi::serve(fake.clone()));

    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kube-proxy"))
        .args([
            "--master",
            &url,
            "--hostname-override=node-a",
            "--proxy-mode=nftables",
            "--cluster-cidr=198.18.0.0/16",
            "--healthz-bind-address=",
            "--metrics-bind-address=",
            "--conntrack-max-per-core=0",
            "-v=2",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let stderr = child.stderr.take().unwrap();
    let mut marks: Vec<(&str, Duration)> = Vec::new();
    let mut synced = [false, false];
    let mut log = Vec::new();
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        let at = started.elapsed();
        if line.contains("Listed objects") && line.contains("kind=\"Services\"") {
            marks.push(("Services listed", at));
        } else if line.contains("Listed objects") && line.contains("kind=\"EndpointSlices\"") {
            marks.push(("EndpointSlices listed", at));
        } else if line.contains("starting to sync") {
            marks.push(("sync started", at));
        } else if line.contains("\"Synced\" family=\"IPv4\"") && !synced[0] {
            synced[0] = true;
            marks.push(("IPv4 in the kernel", at));
        } else if line.contains("\"Synced\" family=\"IPv6\"") && !synced[1] {
            synced[1] = true;
            marks.push(("IPv6 in the kernel", at));
        }
        if line.starts_with('E') {
            log.push(line.clone());
        }
        if synced == [true, true] {
            break;
        }
    }
    let total = started.elapsed();
    let proxy_peak = rss_kib(pid, "VmHWM:");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
    // The largest of the proxy and the children it waited for (nft), in KiB.
    let children_peak =
        nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
            .map(|u| u.max_rss() as u64)
            .unwrap_or(0);
    let programmed = Command::new("nft")
        .args(["list", "set", "ip", "kube-proxy", "cluster-ips"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .matches("198.19.")
                .count()
        })
        .unwrap_or(0);
    assert!(log.is_empty(), "errors logged: {log:#?}");
    assert_eq!(programmed, n, "every ClusterIP is in the kernel");

    let at = |what: &str| {
        marks
            .iter()
            .find(|(w, _)| *w == what)
            .map(|(_, d)| *d)
            .unwrap_or_default()
    };
    let lists_done = at("sync started");
    println!(
        "cold start {n} Services x {m} endpoints (Services list {:.1} MB, EndpointSlices list {:.1} MB):",
        service_bytes as f64 / 1e6,
        slice_bytes as f64 / 1e6
    );
    for (what, when) in &marks {
        println!("  {what:<24} {}", secs(*when));
    }
    println!(
        "  process start to kernel  {}  (lists {}, sync {})",
        secs(total),
        secs(lists_done),
        secs(total.saturating_sub(lists_done))
    );
    let nft_peak = if children_peak > proxy_peak {
        children_peak
    } else {
        0
    };
    println!(
        "  peak RSS: proxy {:.0} MiB, largest child (nft) {}, sum {:.0} MiB",
        proxy_peak as f64 / 1024.0,
        if nft_peak > 0 {
            format!("{:.0} MiB", nft_peak as f64 / 1024.0)
        } else {
            "below the proxy's".into()
        },
        (proxy_peak + nft_peak) as f64 / 1024.0
    );
}

fn main() {
    common::run_scales("cold_start", run_scale);
}
