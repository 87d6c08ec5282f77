//! Cold start end to end: the `kube-proxy` binary, started with upstream's flags against a
//! fake API server that serves the lists at scale (pre-serialized, streamed in 64 KiB chunks
//! like a real API server's watch cache answers), in a network namespace of its own, until
//! every Service of both families is in the kernel.
//!
//! Run as root: `cargo bench --bench cold_start` (modes from `KP_BENCH_MODES`, default
//! `nftables,iptables-nft,iptables-legacy`; scales from `KP_BENCH_SCALES`, default
//! `10000x2,50000x5`; each pair in a child process with its own namespace). Prints, per mode
//! and scale: process start to each kind listed, to the first sync and to both families
//! programmed, the list and sync parts apart, the proxy's peak RSS and the largest peak RSS
//! of its kernel tool runs (`nft`, `iptables-restore`; measured with /usr/bin/time through a
//! wrapper in the proxy's PATH); the same for a restart over the rules it built; then, with
//! the restarted proxy idle, the time from an API write (an endpoint change; a new Service
//! with its EndpointSlice) to the kernel. In iptables mode also the floor, in the same run:
//! `iptables-restore` of the ruleset the proxy wrote, alone, into empty tables, and of a
//! minimal ruleset with one DNAT rule per endpoint.

mod common;

use common::cluster::{cluster_ip, cluster_port, list_body, pod_ip, service, slice};
use common::proxy::{rss_kib, take_nft_peak, Mode, Proxy, Synced};

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

#[path = "../tests/fakeapi/mod.rs"]
mod fakeapi;

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn run_scale(n: usize, m: usize) {
    let mode = Mode::current();
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

    // The cold start: a new node, no table.
    let mut first = Proxy::start(&url, mode);
    let cold = first.wait_synced();
    let proxy_peak = rss_kib(first.pid, "VmHWM:");
    first.stop();
    let nft_peak = take_nft_peak(mode);
    assert_eq!(
        cluster_ips_in_kernel(mode),
        n,
        "every ClusterIP is in the kernel"
    );
    let written = match mode {
        Mode::Iptables(backend) => Some(saved_rules(backend)),
        _ => None,
    };
    // ipvs mode's floor: `ipvsadm --restore` of the same virtual servers alone.
    let ipvs_floor = (mode == Mode::Ipvs).then(ipvs_restore_floor);

    // A restart over that table (a DaemonSet rollout), then changes through the API.
    let mut second = Proxy::start(&url, mode);
    let restart = second.wait_synced();
    let restart_nft_peak = take_nft_peak(mode);
    let endpoint_changes = change_latencies(&fake, &second.lines, n, m, ChangeKind::Endpoint, mode);
    let new_services = change_latencies(&fake, &second.lines, n, m, ChangeKind::NewService, mode);
    second.stop();
    assert_eq!(
        cluster_ips_in_kernel(mode),
        n + CHANGE_SAMPLES,
        "every ClusterIP is in the kernel (the new Services too)"
    );
    let Synced {
        marks,
        total,
        statements,
        transactions,
    } = cold;
    let at = |what: &str| {
        marks
            .iter()
            .find(|(w, _)| *w == what)
            .map(|(_, d)| *d)
            .unwrap_or_default()
    };
    let lists_done = at("sync started");
    println!(
        "{}: cold start {n} Services x {m} endpoints (Services list {:.1} MB, EndpointSlices list {:.1} MB):",
        mode.name(),
        service_bytes as f64 / 1e6,
        slice_bytes as f64 / 1e6
    );
    for (what, when) in &marks {
        println!("  {what:<24} {}", secs(*when));
    }
    let unit = match mode {
        Mode::Nftables => "nft commands",
        Mode::Iptables(_) => "restore lines",
        Mode::Ipvs => "ipvsadm/ipset/address changes",
    };
    println!(
        "  process start to kernel  {}  (lists {}, sync {}; IPv4: {statements} {unit} in {transactions} transactions)",
        secs(total),
        secs(lists_done),
        secs(total.saturating_sub(lists_done))
    );
    let restart_lists = restart
        .marks
        .iter()
        .find(|(w, _)| *w == "sync started")
        .map(|(_, d)| *d)
        .unwrap_or_default();
    println!(
        "  restart over that table: process start to kernel {}  (lists {}, sync {}; IPv4: {} {unit} in {} transaction(s))",
        secs(restart.total),
        secs(restart_lists),
        secs(restart.total.saturating_sub(restart_lists)),
        restart.statements,
        restart.transactions
    );
    let tool = match mode {
        Mode::Nftables => "nft",
        Mode::Iptables(_) => "iptables-restore",
        Mode::Ipvs => "ipvsadm/ipset",
    };
    if let Some((floor, servers, reals)) = ipvs_floor {
        let sync = total.saturating_sub(lists_done);
        println!(
            "  floor: ipvsadm --restore of the same {servers} virtual servers and {reals} real servers alone {} (the proxy's sync: {:.1}x that)",
            secs(floor),
            sync.as_secs_f64() / floor.as_secs_f64()
        );
    }
    match nft_peak {
        Some(nft) => println!(
            "  peak RSS: proxy {:.0} MiB, largest {tool} run {:.0} MiB, sum {:.0} MiB",
            proxy_peak as f64 / 1024.0,
            nft as f64 / 1024.0,
            (proxy_peak + nft) as f64 / 1024.0
        ),
        None => println!(
            "  peak RSS: proxy {:.0} MiB ({tool}'s unknown: install the time package)",
            proxy_peak as f64 / 1024.0
        ),
    }
    if let Some(nft) = restart_nft_peak {
        println!(
            "  restart: largest {tool} run {:.0} MiB",
            nft as f64 / 1024.0
        );
    }
    if let (Mode::Iptables(backend), Some(written)) = (mode, &written) {
        let lines = written.lines().filter(|l| l.starts_with("-A ")).count();
        println!(
            "  ruleset written: {lines} rules, {:.1} MB of iptables-save text (IPv4)",
            written.len() as f64 / 1e6
        );
        let (alone, minimal, minimal_rules) = restore_floor(backend, written, n, m);
        let alone = alone.map_or_else(
            || "skipped (over 40k chains in one nf_tables input: beyond half an hour)".into(),
            secs,
        );
        println!(
            "  floor: iptables-{backend}-restore of that ruleset alone {alone}, of a minimal ruleset ({minimal_rules} DNAT rules, one per endpoint) {}",
            secs(minimal)
        );
    }
    for (what, samples) in [
        ("endpoint change, API write to kernel", endpoint_changes),
        (
            "new Service + EndpointSlice, API write to kernel",
            new_services,
        ),
    ] {
        println!(
            "  {what}: median {:.1} ms, max {:.1} ms ({} samples, {} apart)",
            ms(median(&samples)),
            ms(samples.iter().copied().max().unwrap_or_default()),
            samples.len(),
            secs(CHANGE_SPACING)
        );
    }
}

/// `ipvsadm --save -n` of what the proxy wrote, cleared and restored alone, timed: (time,
/// virtual servers, real servers). The kernel holds the same servers afterwards.
fn ipvs_restore_floor() -> (Duration, usize, usize) {
    let saved = ipvsadm_saved();
    let servers = saved.lines().filter(|l| l.starts_with("-A ")).count();
    let reals = saved.lines().filter(|l| l.starts_with("-a ")).count();
    assert!(Command::new("ipvsadm")
        .arg("-C")
        .status()
        .unwrap()
        .success());
    let started = Instant::now();
    let mut restore = Command::new("ipvsadm");
    restore.arg("--restore");
    feed(restore, &saved);
    (started.elapsed(), servers, reals)
}

/// Runs `command` with `input` on its standard input; panics with its error output unless it
/// succeeds.
fn feed(mut command: Command, input: &str) {
    let mut child = command
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `ipvsadm --save -n`.
fn ipvsadm_saved() -> String {
    let saved = Command::new("ipvsadm")
        .args(["--save", "-n"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&saved.stdout).into_owned()
}

fn cluster_ips_in_kernel(mode: Mode) -> usize {
    if mode == Mode::Ipvs {
        return ipvsadm_saved()
            .lines()
            .filter(|l| l.starts_with("-A -t 198.19."))
            .count();
    }
    if let Mode::Iptables(backend) = mode {
        return saved_rules(backend)
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES -d 198.19.") && l.contains("cluster IP"))
            .count();
    }
    Command::new("nft")
        .args(["list", "set", "ip", "kube-proxy", "cluster-ips"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .matches("198.19.")
                .count()
        })
        .unwrap_or(0)
}

/// Samples per kind of change, and their spacing: longer than the default minSyncPeriod
/// (1 s), so each change meets an idle proxy, as an isolated change in a cluster does.
const CHANGE_SAMPLES: usize = 10;
const CHANGE_SPACING: Duration = Duration::from_millis(1200);

#[derive(Clone, Copy, PartialEq)]
enum ChangeKind {
    /// One endpoint of an existing Service moves to a new pod IP (MODIFIED EndpointSlice).
    Endpoint,
    /// A Service and its EndpointSlice are created (ADDED, ADDED), as the API server sends
    /// them when the endpointslice controller follows a `kubectl create`.
    NewService,
}

/// Writes `CHANGE_SAMPLES` changes through the fake API server's open watches and measures,
/// for each, the time from the write to the end of the nft transaction that carries it (the
/// proxy logs "Synced" after `nft` returned, i.e. after the kernel committed); checks each
/// change in the kernel afterwards.
fn change_latencies(
    fake: &Arc<Mutex<fakeapi::Fake>>,
    lines: &std::sync::mpsc::Receiver<(Instant, String)>,
    n: usize,
    m: usize,
    kind: ChangeKind,
    mode: Mode,
) -> Vec<Duration> {
    let mut samples = Vec::new();
    for k in 0..CHANGE_SAMPLES {
        std::thread::sleep(CHANGE_SPACING);
        while lines.try_recv().is_ok() {}
        let (i, new_ip) = match kind {
            ChangeKind::Endpoint => (k * (n / CHANGE_SAMPLES), format!("198.18.255.{}", 1 + k)),
            ChangeKind::NewService => (n + k, pod_ip(n * m + k)),
        };
        let mut changed_slice = slice(i, m);
        changed_slice["endpoints"][0]["addresses"] = json!([new_ip]);
        changed_slice["metadata"]["resourceVersion"] = json!(format!("{}", 2000000 + i));
        let written = Instant::now();
        {
            let mut f = fake.lock().unwrap();
            if kind == ChangeKind::NewService {
                let delivered = f.push_event(
                    "/api/v1/services",
                    &json!({"type": "ADDED", "object": service(i)}),
                );
                assert_eq!(delivered, 1, "one Service watch is open");
            }
            let event_type = if kind == ChangeKind::NewService {
                "ADDED"
            } else {
                "MODIFIED"
            };
            let delivered = f.push_event(
                "/apis/discovery.k8s.io/v1/endpointslices",
                &json!({"type": event_type, "object": changed_slice}),
            );
            assert_eq!(delivered, 1, "one EndpointSlice watch is open");
        }
        loop {
            let (at, line) = lines
                .recv_timeout(Duration::from_secs(30))
                .expect("the proxy syncs the change");
            assert!(!line.starts_with('E'), "error logged: {line}");
            if line.contains("\"Synced\" family=\"IPv4\"") && !line.contains("changed=0") {
                samples.push(at - written);
                break;
            }
        }
        if mode == Mode::Ipvs {
            let real = format!("-r {new_ip}:8080 -m -w 1");
            assert!(ipvsadm_saved().contains(&real), "{real} not in the kernel");
            continue;
        }
        if let Mode::Iptables(backend) = mode {
            // The new endpoint's own chain (listing only it: the whole table is 1M+ rules at
            // 50k Services).
            let port = kube_proxy_model::ServicePortName::new(
                "bench",
                &format!("svc-{i}"),
                "http",
                kube_proxy_model::Protocol::Tcp,
            );
            let chain =
                kube_proxy_iptables::names::endpoint_chain(&port, new_ip.parse().unwrap(), 8080);
            let listed = Command::new(format!("iptables-{backend}"))
                .args(["-t", "nat", "-S", &chain])
                .output()
                .unwrap();
            let rule = format!("-j DNAT --to-destination {new_ip}:8080");
            assert!(
                String::from_utf8_lossy(&listed.stdout).contains(&rule),
                "{rule} not in the kernel"
            );
            continue;
        }
        // The endpoint lands in whichever slot its order gives it.
        let element = format!("{{ {} . tcp . {} }}", cluster_ip(i), cluster_port(i));
        let text: String = (0..m)
            .map(|slot| {
                let kernel = Command::new("nft")
                    .args([
                        "get",
                        "element",
                        "ip",
                        "kube-proxy",
                        &format!("backends-{slot}"),
                        &element,
                    ])
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&kernel.stdout).into_owned()
            })
            .collect();
        assert!(text.contains(&new_ip), "{new_ip} not in the kernel: {text}");
    }
    samples
}

/// `iptables-save` of the nat and filter tables of the backend (IPv4).
fn saved_rules(backend: &str) -> String {
    let mut text = String::new();
    for table in ["filter", "nat"] {
        let out = Command::new(format!("iptables-{backend}-save"))
            .args(["-t", table])
            .output()
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    text
}

/// The floor of iptables mode: how long `iptables-restore` itself takes, in a fresh network
/// namespace (empty tables), for `written` (the ruleset the proxy wrote, as `iptables-save`
/// printed it) and for a minimal ruleset of one DNAT rule per endpoint of the same cluster.
/// Returns (written, unless too large to wait for; minimal, the minimal ruleset's rules).
fn restore_floor(
    backend: &str,
    written: &str,
    n: usize,
    m: usize,
) -> (Option<Duration>, Duration, usize) {
    let timed = |input: &str| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("a fresh namespace");
        // The ruleset counts in upstream's nfacct objects, which must exist first.
        kube_proxy::kernel::nfacct::ensure_counters();
        let started = Instant::now();
        let mut restore = Command::new(format!("iptables-{backend}-restore"));
        restore.arg("--noflush");
        feed(restore, input);
        started.elapsed()
    };
    // One input is superlinear in its chains on the nf_tables backend (30k: 23-31 s).
    let chains = written.lines().filter(|l| l.starts_with(':')).count();
    let alone = (backend != "nft" || chains <= 40_000).then(|| timed(written));
    let mut minimal = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
    let mut rules = 0;
    for i in 0..n {
        for k in 0..m {
            minimal.push_str(&format!(
                "-A KUBE-SERVICES -d {}/32 -p tcp -m tcp --dport {} -j DNAT --to-destination {}:8080\n",
                cluster_ip(i),
                cluster_port(i),
                pod_ip(i * m + k)
            ));
            rules += 1;
        }
    }
    minimal.push_str("COMMIT\n");
    (alone, timed(&minimal), rules)
}

fn median(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted.get(sorted.len() / 2).copied().unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    common::run_scales(
        "cold_start",
        "nftables,iptables-nft,iptables-legacy",
        run_scale,
    );
}
