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

/// The dataplane a child measures (`KP_BENCH_MODE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Nftables,
    Iptables(&'static str),
}

impl Mode {
    fn current() -> Mode {
        match std::env::var("KP_BENCH_MODE").as_deref() {
            Ok("iptables-nft") => Mode::Iptables("nft"),
            Ok("iptables-legacy") => Mode::Iptables("legacy"),
            _ => Mode::Nftables,
        }
    }

    /// The kernel tools whose runs are metered.
    fn tools(self) -> Vec<String> {
        match self {
            Mode::Nftables => vec!["nft".into()],
            Mode::Iptables(backend) => ["iptables", "ip6tables"]
                .iter()
                .map(|base| format!("{base}-{backend}-restore"))
                .collect(),
        }
    }

    fn name(self) -> String {
        match self {
            Mode::Nftables => "nftables".into(),
            Mode::Iptables(backend) => format!("iptables ({backend} backend)"),
        }
    }
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
        Mode::Nftables => None,
    };

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
    };
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

/// The proxy binary with upstream's flags, its log lines read by a thread (with the instant
/// each was read), so it keeps running while changes are measured.
struct Proxy {
    child: std::process::Child,
    pid: u32,
    started: Instant,
    lines: std::sync::mpsc::Receiver<(Instant, String)>,
}

/// Process start to both families in the kernel, with the marks on the way and the first
/// IPv4 sync's size.
struct Synced {
    marks: Vec<(&'static str, Duration)>,
    total: Duration,
    statements: usize,
    transactions: usize,
}

impl Proxy {
    fn start(url: &str, mode: Mode) -> Proxy {
        let started = Instant::now();
        let mut command = Command::new(env!("CARGO_BIN_EXE_kube-proxy"));
        if let Some((path, _)) = nft_meter(mode) {
            command.env("PATH", path);
        }
        if let Mode::Iptables(backend) = mode {
            command.env("KUBE_PROXY_IPTABLES_BACKEND", backend);
        }
        let proxy_mode = match mode {
            Mode::Nftables => "--proxy-mode=nftables",
            Mode::Iptables(_) => "--proxy-mode=iptables",
        };
        let mut child = command
            .args([
                "--master",
                url,
                "--hostname-override=node-a",
                proxy_mode,
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
        let (lines_tx, lines) = std::sync::mpsc::channel::<(Instant, String)>();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if lines_tx.send((Instant::now(), line)).is_err() {
                    return;
                }
            }
        });
        Proxy {
            child,
            pid,
            started,
            lines,
        }
    }

    fn wait_synced(&mut self) -> Synced {
        let mut marks: Vec<(&str, Duration)> = Vec::new();
        let mut synced = [false, false];
        let mut errors = Vec::new();
        let (mut statements, mut transactions) = (0, 0);
        let field = |line: &str, name: &str| -> usize {
            line.split(&format!(" {name}="))
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        // Long enough for a large cold start on the nf_tables iptables backend.
        while let Ok((read_at, line)) = self.lines.recv_timeout(Duration::from_secs(900)) {
            let at = read_at - self.started;
            // KP_BENCH_VERBOSE=1: show how each sync went.
            if std::env::var_os("KP_BENCH_VERBOSE").is_some()
                && (line.contains("\"Synced\"")
                    || line.contains("Read the kernel")
                    || line.contains("nft"))
            {
                eprintln!("  | {line}");
            }
            if line.contains("Listed objects") && line.contains("kind=\"Services\"") {
                marks.push(("Services listed", at));
            } else if line.contains("Listed objects") && line.contains("kind=\"EndpointSlices\"") {
                marks.push(("EndpointSlices listed", at));
            } else if line.contains("starting to sync") {
                marks.push(("sync started", at));
            } else if line.contains("\"Synced\" family=\"IPv4\"") && !synced[0] {
                synced[0] = true;
                statements = field(&line, "statements");
                transactions = field(&line, "transactions");
                marks.push(("IPv4 in the kernel", at));
            } else if line.contains("\"Synced\" family=\"IPv6\"") && !synced[1] {
                synced[1] = true;
                marks.push(("IPv6 in the kernel", at));
            }
            if line.starts_with('E') {
                errors.push(line.clone());
            }
            if synced == [true, true] {
                break;
            }
        }
        assert!(errors.is_empty(), "errors logged: {errors:#?}");
        assert_eq!(synced, [true, true], "both families synced");
        let total = marks.iter().map(|(_, at)| *at).max().unwrap_or_default();
        Synced {
            marks,
            total,
            statements,
            transactions,
        }
    }

    fn stop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// The mode's kernel tools wrapped to record the peak RSS of every run (`/usr/bin/time -f
/// %M`), first in the proxy's PATH: (PATH for the proxy, the record). None without
/// /usr/bin/time.
fn nft_meter(mode: Mode) -> Option<(String, std::path::PathBuf)> {
    static METER: std::sync::OnceLock<Option<(String, std::path::PathBuf)>> =
        std::sync::OnceLock::new();
    METER
        .get_or_init(|| {
            let time = std::path::Path::new("/usr/bin/time");
            if !time.exists() {
                return None;
            }
            let dir = std::env::temp_dir().join(format!("kp-nft-meter-{}", std::process::id()));
            std::fs::create_dir_all(&dir).ok()?;
            let record = dir.join("peaks");
            for tool in mode.tools() {
                let real = Command::new("sh")
                    .args(["-c", &format!("command -v {tool}")])
                    .output()
                    .ok()
                    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                    .filter(|p| !p.is_empty())?;
                let script = format!(
                    "#!/bin/sh\nexec /usr/bin/time -a -o {} -f %M {real} \"$@\"\n",
                    record.display()
                );
                let wrapper = dir.join(&tool);
                std::fs::write(&wrapper, script).ok()?;
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).ok()?;
            }
            let path = format!(
                "{}:{}",
                dir.display(),
                std::env::var("PATH").unwrap_or_default()
            );
            Some((path, record))
        })
        .clone()
}

/// The largest peak RSS (KiB) of the tool runs recorded so far, and forgets them.
fn take_nft_peak(mode: Mode) -> Option<u64> {
    let (_, record) = nft_meter(mode)?;
    let text = std::fs::read_to_string(&record).unwrap_or_default();
    let _ = std::fs::remove_file(&record);
    Some(
        text.lines()
            .filter_map(|l| l.trim().parse().ok())
            .max()
            .unwrap_or(0),
    )
}

fn cluster_ips_in_kernel(mode: Mode) -> usize {
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
        let mut child = Command::new(format!("iptables-{backend}-restore"))
            .arg("--noflush")
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
