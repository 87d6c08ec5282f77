//! Memory and time under churn: an hour of realistic churn at 10k Services, fast-forwarded.
//!
//! The `kube-proxy` binary runs against the fake API server (as in `cold_start`) with 10k
//! Services x 2 endpoints, in a network namespace of its own. Then each simulated minute of
//! the hour is written through the open watches at once: 120 endpoint flaps (an endpoint
//! turns unready, or ready again), 6 Services created and 6 deleted (with their slices), and
//! every 5 minutes a change of the Node's zone label (which replans every Service). After
//! each minute the time from the write to the end of the sync that carries it is measured,
//! and the proxy's RSS and open file descriptors are sampled.
//!
//! Prints RSS at start (after the first sync and a warm-up minute), its peak and at the end,
//! the drift (end against start; the target is 5 % at most), the sync latency percentiles
//! over the 60 minutes, and the file descriptors at start and end (no growth). Run as root:
//! `cargo bench --bench soak` (modes from `KP_BENCH_MODES`, default `nftables,iptables-nft`;
//! scale from `KP_BENCH_SCALES`, default `10000x2`; minutes from `KP_SOAK_MINUTES`, 60).

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::{list_body, service, slice};
use common::proxy::{rss_kib, Mode, Proxy};
use serde_json::json;

#[path = "../tests/fakeapi/mod.rs"]
mod fakeapi;

const FLAPS_PER_MINUTE: usize = 120;
const SERVICES_PER_MINUTE: usize = 6;
const NODE_CHANGE_EVERY: usize = 5;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn node(zone: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node-a", "resourceVersion": "5", "labels": {"topology.kubernetes.io/zone": zone}},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.10"}]}})
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn run_scale(n: usize, m: usize) {
    let mode = Mode::current();
    let minutes: usize = std::env::var("KP_SOAK_MINUTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .expect("unshare a network namespace (run as root)");
    let up = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .unwrap();
    assert!(up.success());

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _guard = runtime.enter();
    let fake = Arc::new(Mutex::new(fakeapi::Fake::default()));
    {
        let mut f = fake.lock().unwrap();
        f.prepared.insert(
            "/api/v1/services".into(),
            list_body("ServiceList", (0..n).map(service)),
        );
        f.prepared.insert(
            "/apis/discovery.k8s.io/v1/endpointslices".into(),
            list_body("EndpointSliceList", (0..n).map(|i| slice(i, m))),
        );
        f.nodes = vec![node("zone-a")];
    }
    let url = runtime.block_on(fakeapi::serve(fake.clone()));
    let mut proxy = Proxy::start(&url, mode);
    let cold = proxy.wait_synced();

    // Live Services: the first n, then those created minus those deleted (oldest first).
    let mut next_service = n;
    let mut oldest = 0;
    let mut unready: Vec<bool> = vec![false; n];
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut random = |limit: usize| -> usize {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % limit as u64) as usize
    };
    let mut latencies = Vec::new();
    let mut rss = Vec::new();
    let mut fds = Vec::new();
    let mut events = 0usize;
    let soak_started = Instant::now();
    // Minute 0 is a warm-up: the start figures are taken after it.
    for minute in 0..=minutes {
        let written = Instant::now();
        {
            let mut f = fake.lock().unwrap();
            for _ in 0..FLAPS_PER_MINUTE {
                // Flap an endpoint of a Service that was not deleted yet.
                let i = oldest + random(n.min(unready.len() - oldest));
                unready[i] = !unready[i];
                let mut s = slice(i, m);
                s["endpoints"][0]["conditions"]["ready"] = json!(!unready[i]);
                s["endpoints"][0]["conditions"]["serving"] = json!(!unready[i]);
                s["metadata"]["resourceVersion"] = json!(format!("{}", 3_000_000 + events));
                f.push_event(
                    "/apis/discovery.k8s.io/v1/endpointslices",
                    &json!({"type": "MODIFIED", "object": s}),
                );
                events += 1;
            }
            for _ in 0..SERVICES_PER_MINUTE {
                let i = next_service;
                next_service += 1;
                unready.resize(next_service, false);
                f.push_event(
                    "/api/v1/services",
                    &json!({"type": "ADDED", "object": service(i)}),
                );
                f.push_event(
                    "/apis/discovery.k8s.io/v1/endpointslices",
                    &json!({"type": "ADDED", "object": slice(i, m)}),
                );
                let gone = oldest;
                oldest += 1;
                f.push_event(
                    "/api/v1/services",
                    &json!({"type": "DELETED", "object": service(gone)}),
                );
                f.push_event(
                    "/apis/discovery.k8s.io/v1/endpointslices",
                    &json!({"type": "DELETED", "object": slice(gone, m)}),
                );
                events += 4;
            }
            if minute > 0 && minute.is_multiple_of(NODE_CHANGE_EVERY) {
                let zone = if (minute / NODE_CHANGE_EVERY).is_multiple_of(2) {
                    "zone-a"
                } else {
                    "zone-b"
                };
                f.push_event(
                    "/api/v1/nodes",
                    &json!({"type": "MODIFIED", "object": node(zone)}),
                );
                events += 1;
            }
        }
        // The minute's changes are in the kernel once a sync has carried them and the
        // proxy is idle again (a quiet second without another sync).
        let mut last_sync = None;
        loop {
            match proxy.lines.recv_timeout(Duration::from_millis(1500)) {
                Ok((at, line)) => {
                    assert!(!line.starts_with('E'), "error logged: {line}");
                    if line.contains("\"Synced\" family=\"IPv4\"") && !line.contains("changed=0") {
                        last_sync = Some(at);
                    }
                }
                Err(_) if last_sync.is_some() => break,
                Err(_) => {}
            }
            assert!(
                written.elapsed() < Duration::from_secs(120),
                "minute {minute} never synced"
            );
        }
        let latency = last_sync.unwrap() - written;
        if minute == 0 {
            rss.clear();
            fds.clear();
        } else {
            latencies.push(latency);
        }
        rss.push(rss_kib(proxy.pid, "VmRSS:"));
        fds.push(open_fds(proxy.pid));
    }
    let soak = soak_started.elapsed();
    let peak = rss_kib(proxy.pid, "VmHWM:");
    proxy.stop();
    latencies.sort();
    let (start, end) = (rss[0], *rss.last().unwrap());
    let peak_after_warmup = *rss.iter().max().unwrap();
    let drift = (end as f64 - start as f64) / start as f64 * 100.0;
    // The working set grows for the first minutes of churn (allocator arenas, maps sized for
    // the churn) and then stays; drift from there is what a leak would show.
    let settled = rss[rss.len().min(16) - 1];
    let settled_drift = (end as f64 - settled as f64) / settled as f64 * 100.0;
    println!(
        "{}: soak at {n} Services x {m} endpoints: {minutes} simulated minutes in {:.0} s ({events} API events: {} endpoint flaps, {} Services created and deleted, {} Node label changes); cold start {:.2} s",
        mode.name(),
        soak.as_secs_f64(),
        FLAPS_PER_MINUTE * (minutes + 1),
        SERVICES_PER_MINUTE * (minutes + 1),
        minutes / NODE_CHANGE_EVERY,
        cold.total.as_secs_f64()
    );
    println!(
        "  RSS: start {:.1} MiB, peak {:.1} MiB (sampled after each minute; {:.1} MiB high-water mark incl. the cold start), end {:.1} MiB: drift {drift:+.1} % from the start, {settled_drift:+.1} % from minute 15 ({:.1} MiB) (target at most 5 %)",
        mib(start),
        mib(peak_after_warmup),
        mib(peak),
        mib(end),
        mib(settled)
    );
    println!(
        "  sync latency per minute of churn (write to kernel): p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        percentile(&latencies, 0.5).as_secs_f64() * 1000.0,
        percentile(&latencies, 0.9).as_secs_f64() * 1000.0,
        percentile(&latencies, 0.99).as_secs_f64() * 1000.0,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1000.0
    );
    let series: Vec<String> = rss
        .iter()
        .step_by(5.max(minutes / 12))
        .map(|kib| format!("{:.1}", mib(*kib)))
        .collect();
    println!(
        "  RSS every {} minutes (MiB): {}",
        5.max(minutes / 12),
        series.join(" ")
    );
    println!(
        "  open file descriptors: start {}, max {}, end {}",
        fds[0],
        fds.iter().max().unwrap(),
        fds.last().unwrap()
    );
}

fn main() {
    if std::env::var_os("KP_BENCH_SCALES").is_none() {
        std::env::set_var("KP_BENCH_SCALES", "10000x2");
    }
    common::run_scales("soak", "nftables,iptables-nft", run_scale);
}
