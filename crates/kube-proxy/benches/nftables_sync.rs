//! Benchmark of the nftables dataplane through the real proxy code path (event loop, model,
//! plan, nftables proxier, `nft`) into the kernel, in a network namespace it creates.
//!
//! Run as root: `cargo bench --bench nftables_sync` (scales from `KP_BENCH_SCALES`, default
//! `10000x2,50000x5`). Each scale runs in a child process, so peak RSS is per scale. Prints,
//! per scale: cold full sync, one added Service and one changed endpoint (partial syncs),
//! end-to-end latency through the sync loop under the default minSyncPeriod, peak RSS,
//! and, for scale, the same number of elements loaded into one plain map by one `nft -f`.

// The only unsafe code of the project: a counting global allocator that measures live heap.
#![allow(unsafe_code)]

mod common;

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube_proxy::kernel::nft_runner::NftCommand;
use kube_proxy::source::{ObjectEvent, SourceEvent};
use kube_proxy::sync::event_loop::{EventLoop, NodeAddressing};
use kube_proxy::sync::scheduler::{SchedulerConfig, SyncKind};
use kube_proxy_config::{DetectLocal, NodePortAddresses};
use kube_proxy_model::{IpFamily, PlanContext};
use kube_proxy_nftables::{Kernel, NftConfig, NftProxier, RunError, Runner, Transaction};
use serde_json::json;

/// Counts live heap bytes, to tell the proxy's own data from allocator overhead.
struct CountingAlloc;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn heap_mib() -> (f64, f64) {
    (
        LIVE.load(Ordering::Relaxed) as f64 / 1048576.0,
        PEAK.load(Ordering::Relaxed) as f64 / 1048576.0,
    )
}

/// What the runner saw: transactions applied, when the last one finished, and for each
/// transaction its commands, elements and nft time.
#[derive(Default)]
struct Stats {
    applied: AtomicUsize,
    last_done: Mutex<Option<Instant>>,
    transactions: Mutex<Vec<(usize, usize, Duration)>>,
    /// Send every transaction as nft text (to compare with netlink element batches).
    text_only: std::sync::atomic::AtomicBool,
}

struct CountingRunner {
    inner: NftCommand,
    text: NftCommand,
    stats: Arc<Stats>,
}

impl Runner for CountingRunner {
    fn apply(&mut self, script: &str) -> Result<(), RunError> {
        self.text.apply(script)
    }

    fn snapshot(&mut self, family: IpFamily) -> Result<Kernel, RunError> {
        if self.stats.text_only.load(Ordering::SeqCst) {
            self.text.snapshot(family)
        } else {
            self.inner.snapshot(family)
        }
    }

    fn apply_transaction(&mut self, family: IpFamily, tx: &Transaction) -> Result<(), RunError> {
        let started = Instant::now();
        let result = if self.stats.text_only.load(Ordering::SeqCst) {
            self.text.apply_transaction(family, tx)
        } else {
            self.inner.apply_transaction(family, tx)
        };
        let done = Instant::now();
        let script = tx.text();
        let size = (
            script.lines().count(),
            count_elements(script),
            done - started,
        );
        self.stats.transactions.lock().unwrap().push(size);
        *self.stats.last_done.lock().unwrap() = Some(done);
        self.stats.applied.fetch_add(1, Ordering::SeqCst);
        result
    }
}

fn cluster_ip(i: usize) -> String {
    format!("198.19.{}.{}", (i >> 8) & 255, i & 255)
}

fn pod_ip(j: usize) -> String {
    let j = j % 65536;
    format!("198.18.{}.{}", j >> 8, j & 255)
}

fn service(i: usize) -> Service {
    serde_json::from_value(json!({
        "metadata": {"namespace": "bench", "name": format!("svc-{i}")},
        "spec": {"clusterIP": cluster_ip(i), "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
    }))
    .unwrap()
}

/// Slice of service `i` with `m` endpoints; `shift` moves the endpoints (to change them).
fn slice(i: usize, m: usize, shift: usize) -> EndpointSlice {
    let endpoints: Vec<_> = (0..m)
        .map(|k| {
            let j = i * m + k + shift;
            json!({"addresses": [pod_ip(j)], "nodeName": if k == 0 { "node-a" } else { "node-b" }})
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"namespace": "bench", "name": format!("svc-{i}-abc"), "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints
    }))
    .unwrap()
}

fn node() -> Node {
    serde_json::from_value(json!({"metadata": {"name": "node-a"}, "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.10"}]}})).unwrap()
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

fn count_elements(script: &str) -> usize {
    script
        .lines()
        .filter(|l| l.starts_with("add element"))
        .map(|l| l.matches(',').count() + 1)
        .sum()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// Loads `elements` elements into one plain map of a fresh table with one `nft -f` (what one
/// nft transaction of that many elements costs; the staged build sends them as netlink).
fn kernel_floor(elements: usize) -> Duration {
    let mut text = String::from("add table ip floor\nadd map ip floor m { type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service; }\n");
    for chunk_start in (0..elements).step_by(1000) {
        text.push_str("add element ip floor m { ");
        for j in chunk_start..(chunk_start + 1000).min(elements) {
            if j > chunk_start {
                text.push_str(", ");
            }
            text.push_str(&format!(
                "{} . tcp . {} : {} . 8080",
                cluster_ip(j % 65536),
                1 + j / 65536,
                pod_ip(j)
            ));
        }
        text.push_str(" }\n");
    }
    let started = Instant::now();
    NftCommand::text_only().apply(&text).expect("floor load");
    let took = started.elapsed();
    NftCommand::text_only()
        .apply("delete table ip floor\n")
        .expect("floor cleanup");
    took
}

fn run_scale(n: usize, m: usize) {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .expect("unshare a network namespace (run as root)");
    let stats = Arc::new(Stats::default());
    let config = NftConfig {
        detect_local: DetectLocal::ClusterCidr(vec!["198.18.0.0/16".parse().unwrap()]),
        node_port_addresses: NodePortAddresses::Primary,
        ..Default::default()
    };
    let proxier = NftProxier::new(
        config,
        CountingRunner {
            inner: NftCommand::default(),
            text: NftCommand::text_only(),
            stats: stats.clone(),
        },
        Box::new(Instant::now),
    );
    let mut el = EventLoop::new(
        "node-a",
        &IpFamily::ALL,
        SchedulerConfig::new(Duration::from_secs(1), Duration::from_secs(30)),
        PlanContext::default(),
        Box::new(proxier),
        Default::default(),
        NodeAddressing::default(),
    );

    // The initial lists, streamed as the API source streams them.
    let listed = Instant::now();
    el.handle(SourceEvent::Node(ObjectEvent::Replace(vec![node()])));
    el.handle(SourceEvent::Services(ObjectEvent::ListStart));
    for i in 0..n {
        el.handle(SourceEvent::Services(ObjectEvent::Listed(service(i))));
    }
    el.handle(SourceEvent::Services(ObjectEvent::ListDone));
    el.handle(SourceEvent::EndpointSlices(ObjectEvent::ListStart));
    for i in 0..n {
        el.handle(SourceEvent::EndpointSlices(ObjectEvent::Listed(slice(
            i, m, 0,
        ))));
    }
    el.handle(SourceEvent::EndpointSlices(ObjectEvent::ListDone));
    let ingest = listed.elapsed();
    let rss_after_ingest = peak_rss_mib();
    let heap_after_ingest = heap_mib();

    let started = Instant::now();
    el.sync(SyncKind::Full);
    let cold = started.elapsed();
    let (statements, elements, nft_cold) = stats
        .transactions
        .lock()
        .unwrap()
        .iter()
        .fold((0, 0, Duration::ZERO), |(s, e, t), (s2, e2, t2)| {
            (s + s2, e + e2, t + *t2)
        });
    let rss_after_cold = peak_rss_mib();
    let heap_after_cold = heap_mib();
    assert_eq!(
        el.plan(IpFamily::V4).unwrap().services.len(),
        n,
        "every service planned"
    );

    // Partial syncs at this scale, called directly (no rate limit).
    let mut adds = Vec::new();
    let mut changes = Vec::new();
    let mut changes_text = Vec::new();
    for k in 0..14 {
        // The second half sends the same kind of transactions as nft text.
        let text_only = k >= 7;
        stats.text_only.store(text_only, Ordering::SeqCst);
        el.handle(SourceEvent::Services(ObjectEvent::Apply(service(n + k))));
        el.handle(SourceEvent::EndpointSlices(ObjectEvent::Apply(slice(
            n + k,
            m,
            0,
        ))));
        let started = Instant::now();
        el.sync(SyncKind::Partial);
        if !text_only {
            adds.push(started.elapsed());
        }
        el.handle(SourceEvent::EndpointSlices(ObjectEvent::Apply(slice(
            k * 7,
            m,
            1 + k / 7,
        ))));
        let started = Instant::now();
        el.sync(SyncKind::Partial);
        if text_only {
            changes_text.push(started.elapsed());
        } else {
            changes.push(started.elapsed());
        }
    }
    stats.text_only.store(false, Ordering::SeqCst);

    // End to end through the running sync loop, default minSyncPeriod (1 s).
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let loop_thread = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(el.run(rx))
            .expect("the sync loop failed");
    });
    let send = |event: SourceEvent| tx.blocking_send(event).unwrap();
    let wait_applied = |before: usize| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while stats.applied.load(Ordering::SeqCst) <= before {
            assert!(Instant::now() < deadline, "no transaction");
            std::thread::sleep(Duration::from_micros(200));
        }
        stats.last_done.lock().unwrap().unwrap()
    };
    std::thread::sleep(Duration::from_millis(1500));
    let before = stats.applied.load(Ordering::SeqCst);
    let written = Instant::now();
    send(SourceEvent::Services(ObjectEvent::Apply(service(n + 100))));
    send(SourceEvent::EndpointSlices(ObjectEvent::Apply(slice(
        n + 100,
        m,
        0,
    ))));
    let e2e_service = wait_applied(before) - written;
    std::thread::sleep(Duration::from_millis(1500));
    let service_transactions = stats.applied.load(Ordering::SeqCst) - before;
    let before = stats.applied.load(Ordering::SeqCst);
    let written = Instant::now();
    send(SourceEvent::EndpointSlices(ObjectEvent::Apply(slice(
        3, m, 2,
    ))));
    let e2e_endpoint = wait_applied(before) - written;
    drop(tx);
    loop_thread.join().unwrap();

    let rss = peak_rss_mib();
    let floor = kernel_floor(elements);

    let (cold_target, change_target, rss_target) = if n <= 10_000 {
        (1.5, 20.0, 60.0)
    } else {
        (15.0, 50.0, 200.0)
    };
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    let change = median(changes.clone());
    let change_text = median(changes_text.clone());
    let add = median(adds.clone());
    println!("== {n} Services x {m} endpoints ==");
    println!(
        "  ingest the initial lists:        {:.2} s",
        ingest.as_secs_f64()
    );
    println!("  cold full sync:                  {:.2} s  (kernel transactions {:.2} s; {statements} commands, {elements} elements)  target <= {cold_target} s: {}", cold.as_secs_f64(), nft_cold.as_secs_f64(), verdict(cold.as_secs_f64() <= cold_target));
    println!("  the same {elements} elements into one plain map by one nft -f: {:.2} s  (cold sync / that = {:.1}x)", floor.as_secs_f64(), cold.as_secs_f64() / floor.as_secs_f64());
    println!(
        "  add one Service + slice:         median {}  (of {}: {:?})",
        ms(add),
        adds.len(),
        adds.iter().map(|d| ms(*d)).collect::<Vec<_>>()
    );
    println!(
        "  change one endpoint:             median {}  target <= {change_target} ms: {}; the same as nft text: median {} ({:.1}x)",
        ms(change),
        verdict(change.as_secs_f64() * 1000.0 <= change_target),
        ms(change_text),
        change_text.as_secs_f64() / change.as_secs_f64()
    );
    println!("  end to end (write -> kernel), new Service + slice after a quiet period: {} in {service_transactions} transaction(s)", ms(e2e_service));
    println!(
        "  end to end, endpoint change after a quiet period: {}",
        ms(e2e_endpoint)
    );
    println!(
        "  heap (live, peak) after ingest: {:.0}, {:.0} MiB; after the cold sync: {:.0}, {:.0} MiB",
        heap_after_ingest.0, heap_after_ingest.1, heap_after_cold.0, heap_after_cold.1
    );
    println!("  peak RSS:                        {rss:.0} MiB (after ingesting the lists: {rss_after_ingest:.0} MiB, after the cold sync: {rss_after_cold:.0} MiB)  target <= {rss_target} MiB: {}", verdict(rss <= rss_target));
    std::io::stdout().flush().unwrap();
}

fn main() {
    common::run_scales("nftables_sync", "nftables", run_scale);
}
