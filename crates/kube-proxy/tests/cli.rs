//! The binary as an operator runs it.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kube-proxy"))
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kp-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn write_config_to_writes_the_effective_config_and_exits() {
    let dir = temp_dir("write");
    let out = dir.join("config.yaml");
    let status = bin()
        .args([
            "--proxy-mode=nftables",
            "--cluster-cidr=198.18.0.0/16",
            "--write-config-to",
        ])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(
        text.starts_with("apiVersion: kubeproxy.config.k8s.io/v1alpha1\n"),
        "{text}"
    );
    assert!(text.contains("\nmode: nftables\n"), "{text}");
    assert!(text.contains("\nnodePortAddresses:\n- primary\n"), "{text}");
    assert!(text.contains("\nclusterCIDR: 198.18.0.0/16\n"), "{text}");
    // The written file is a valid --config that reproduces itself.
    let again = dir.join("again.yaml");
    let status = bin()
        .arg("--config")
        .arg(&out)
        .arg("--write-config-to")
        .arg(&again)
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(std::fs::read_to_string(&again).unwrap(), text);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn invalid_configuration_fails_before_anything_else() {
    let output = bin()
        .args([
            "--proxy-mode=kernelspace",
            "--iptables-masquerade-bit=40",
            "--proxy-port-range=9-1",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("mode: invalid value \"kernelspace\": must be one of \"iptables\", \"ipvs\", \"nftables\", \"userspace\""),
        "{stderr}"
    );
    assert!(
        stderr.contains("portRange: invalid value \"9-1\""),
        "{stderr}"
    );
    assert!(
        stderr.contains("iptables.masqueradeBit: invalid value \"40\""),
        "{stderr}"
    );
    assert!(!stderr.contains("Starting"), "nothing started: {stderr}");

    let dir = temp_dir("badfile");
    let config = dir.join("bad.yaml");
    std::fs::write(&config, "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nconntrack:\n  min: lots\n").unwrap();
    let output = bin().arg("--config").arg(&config).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("bad.yaml") && stderr.contains("conntrack.min"),
        "{stderr}"
    );

    let output = bin()
        .args(["--iptables-sync-period=soon"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--iptables-sync-period"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn version_and_help() {
    let output = bin().arg("--version").output().unwrap();
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("Kubernetes v1."));
    let output = bin().arg("--help").output().unwrap();
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in [
        "--kubeconfig",
        "--hostname-override",
        "--proxy-mode",
        "--cluster-cidr",
        "--conntrack-max-per-core",
        "--nodeport-addresses",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
}

const SERVICE: &str = "kind: Service\napiVersion: v1\nmetadata: {name: __NAME__, namespace: demo}\nspec:\n  clusterIP: __IP__\n  ports: [{name: p, port: 80}]\n";

fn write_service(path: &std::path::Path, name: &str, ip: &str) {
    std::fs::write(
        path,
        SERVICE.replace("__NAME__", name).replace("__IP__", ip),
    )
    .unwrap();
}

/// The main job on a manifest directory: prints the state as JSON and follows file changes.
#[test]
fn main_job_follows_manifest_changes() {
    let dir = temp_dir("follow");
    write_service(&dir.join("a.yaml"), "a", "198.19.0.1");
    let mut child = bin()
        .arg("--manifests")
        .arg(&dir)
        .args(["--hostname-override=node-a", "--print-state=json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let next_v4 = |rx: &mpsc::Receiver<String>| -> serde_json::Value {
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(20))
                .expect("no state printed");
            let doc: serde_json::Value = serde_json::from_str(&line).unwrap();
            if doc["family"] == "IPv4" {
                return doc;
            }
        }
    };
    let first = next_v4(&rx);
    assert_eq!(first["servicePorts"].as_array().unwrap().len(), 1);
    assert_eq!(
        first["servicePorts"][0]["internal"], "Reject",
        "no endpoints yet"
    );

    write_service(&dir.join("b.yaml"), "b", "198.19.0.2");
    let second = next_v4(&rx);
    assert_eq!(second["servicePorts"].as_array().unwrap().len(), 2);
    assert_eq!(second["changed"], serde_json::json!(["demo/b:p"]));

    // A broken file does not remove anything.
    std::fs::write(dir.join("c.yaml"), "kind: Service\n  oops: [\n").unwrap();
    std::fs::write(
        dir.join("a-slice.yaml"),
        "kind: EndpointSlice\napiVersion: discovery.k8s.io/v1\nmetadata: {name: a-1, namespace: demo, labels: {kubernetes.io/service-name: a}}\naddressType: IPv4\nports: [{name: p, port: 8080}]\nendpoints: [{addresses: [198.18.0.9]}]\n",
    )
    .unwrap();
    let third = next_v4(&rx);
    assert_eq!(third["servicePorts"].as_array().unwrap().len(), 2);
    assert_eq!(third["servicePorts"][0]["internal"]["Endpoints"], "Cluster");
    assert_eq!(
        third["servicePorts"][0]["cluster_endpoints"][0]["ip"],
        "198.18.0.9"
    );

    child.kill().unwrap();
    child.wait().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `kube-proxy ... | head`: once the reader of standard output has gone, the process ends (as
/// a command-line tool does on a closed pipe) instead of retrying the failed write forever.
#[test]
fn a_closed_standard_output_ends_the_process() {
    let manifests = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/manifests");
    for args in [
        &["--proxy-mode=nftables", "--dry-run", "--once"][..],
        &["--print-state"][..],
        &["--print-state=json"][..],
    ] {
        let mut child = bin()
            .args(["--manifests", manifests, "--hostname-override=node-a"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The reader goes away before anything is written.
        drop(child.stdout.take());
        let start = std::time::Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if start.elapsed() > Duration::from_secs(20) {
                child.kill().unwrap();
                panic!("{args:?}: still running 20 s after its standard output was closed");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut log = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut log).unwrap();
        assert!(status.success(), "{args:?}: {status:?}\n{log}");
        assert!(
            log.contains("Standard output was closed"),
            "{args:?}: the reason is logged\n{log}"
        );
        assert!(
            !log.contains("will retry"),
            "{args:?}: a closed output is not retried\n{log}"
        );
    }
}

#[test]
fn sigterm_exits_promptly_and_cleanly() {
    let dir = temp_dir("term");
    let mut child = bin()
        .arg("--manifests")
        .arg(&dir)
        .args(["--hostname-override=node-a", "--print-state"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status:?}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `GET path` on 127.0.0.1:port: (status code, headers lower-cased, body).
fn http_get(port: u16, path: &str) -> Option<(u16, String, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, head.to_lowercase(), body.to_string()))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts the proxy on manifests in `dir` as node-a, output discarded, with `args`.
fn spawn_standalone(dir: &std::path::Path, args: &[String]) -> std::process::Child {
    bin()
        .arg("--manifests")
        .arg(dir)
        .arg("--hostname-override=node-a")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Polls `GET path` until `accept` takes the answer (20 s at most): (status, head, body).
fn wait_http(port: u16, path: &str, accept: impl Fn(u16, &str) -> bool) -> (u16, String, String) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some((status, head, body)) = http_get(port, path) {
            if accept(status, &body) {
                return (status, head, body);
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{path} never answered as expected"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stop(mut child: std::process::Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a__DELETING__}\n";

/// The proxy health server: /healthz follows node eligibility, /livez does not.
#[test]
fn health_server_reports_node_eligibility() {
    let dir = temp_dir("health");
    write_service(&dir.join("svc.yaml"), "a", "198.19.0.1");
    let port = free_port();
    let child = spawn_standalone(
        &dir,
        &[
            "--print-state".into(),
            format!("--healthz-bind-address=127.0.0.1:{port}"),
        ],
    );
    let wait_for = |path: &str, code: u16| -> (String, String) {
        let (_, head, body) = wait_http(port, path, |status, _| status == code);
        (head, body)
    };
    // No Node object yet: not eligible.
    let (head, body) = wait_for("/healthz", 503);
    assert!(
        head.contains("content-type: application/json")
            && head.contains("x-content-type-options: nosniff"),
        "{head}"
    );
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["nodeEligible"], false);
    let (_, body) = wait_for("/livez", 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["healthy"], true);
    assert!(json.get("nodeEligible").is_none());
    assert!(json["status"]["IPv4"]["lastUpdated"].is_string());
    // The Node appears: eligible.
    std::fs::write(dir.join("node.yaml"), NODE.replace("__DELETING__", "")).unwrap();
    let (_, body) = wait_for("/healthz", 200);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["nodeEligible"],
        true
    );
    // Being deleted: /healthz drains, /livez stays up.
    std::fs::write(
        dir.join("node.yaml"),
        NODE.replace(
            "__DELETING__",
            ", deletionTimestamp: \"2026-11-22T00:00:00Z\"",
        ),
    )
    .unwrap();
    wait_for("/healthz", 503);
    wait_for("/livez", 200);
    assert_eq!(http_get(port, "/metrics").map(|r| r.0), Some(404));
    stop(child);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A change that cannot be programmed for longer than 2 x syncPeriod makes the proxy
/// unhealthy: here `nft` on PATH is a stand-in that rejects every transaction.
#[test]
fn failing_syncs_turn_livez_unhealthy() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("unhealthy");
    let fake_bin = dir.join("bin");
    std::fs::create_dir_all(&fake_bin).unwrap();
    let nft = fake_bin.join("nft");
    std::fs::write(&nft, "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'nftables v1.0.6 (stand-in)'; exit 0; fi\ncat >/dev/null\necho '/dev/stdin:1:1-3: Error: rejected by the test' >&2\nexit 1\n").unwrap();
    std::fs::set_permissions(&nft, std::fs::Permissions::from_mode(0o755)).unwrap();
    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    write_service(&manifests.join("svc.yaml"), "a", "198.19.0.1");
    std::fs::write(
        manifests.join("node.yaml"),
        NODE.replace("__DELETING__", ""),
    )
    .unwrap();
    let port = free_port();
    let metrics_port = free_port();
    let path = format!(
        "{}:{}",
        fake_bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // Outside any test namespace: nothing may reach the machine's kernel. The stand-in nft
    // takes every transaction (no netlink, no reading the kernel's table), and the conntrack
    // sysctls are left alone.
    let mut child = bin()
        .env("PATH", path)
        .env("KUBE_PROXY_NFT_NETLINK", "off")
        .arg("--manifests")
        .arg(&manifests)
        .args([
            "--hostname-override=node-a",
            "--proxy-mode=nftables",
            "--iptables-sync-period=1s",
            "--iptables-min-sync-period=0s",
            "--conntrack-max-per-core=0",
            "--conntrack-tcp-timeout-established=0s",
            "--conntrack-tcp-timeout-close-wait=0s",
        ])
        .arg(format!("--healthz-bind-address=127.0.0.1:{port}"))
        .arg(format!("--metrics-bind-address=127.0.0.1:{metrics_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut seen_unhealthy = false;
    while std::time::Instant::now() < deadline {
        if let Some((503, _, body)) = http_get(port, "/livez") {
            let json: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(json["healthy"], false);
            assert_eq!(json["status"]["IPv4"]["healthy"], false);
            seen_unhealthy = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // The failures and the 503 are counted.
    let metrics = http_get(metrics_port, "/metrics").map(|r| r.2);
    child.kill().unwrap();
    child.wait().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let metrics = metrics.expect("the metrics server answers");
    let value = |series: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{series} missing in\n{metrics}"))
    };
    assert!(
        value("kubeproxy_sync_proxy_rules_nftables_sync_failures_total{ip_family=\"IPv4\"}") >= 1.0
    );
    assert!(value("kubeproxy_proxy_livez_total{code=\"503\"}") >= 1.0);
    assert!(
        seen_unhealthy,
        "/livez never reported 503 while every sync failed"
    );
}

/// Every kube-proxy metric of the reference (§6.2) with the proxy mode(s) upstream registers
/// it in ("all" = every mode).
const UPSTREAM_METRICS: &[(&str, &str, &str)] = &[
    (
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "histogram",
        "all",
    ),
    (
        "kubeproxy_sync_full_proxy_rules_duration_seconds",
        "histogram",
        "iptables nftables",
    ),
    (
        "kubeproxy_sync_partial_proxy_rules_duration_seconds",
        "histogram",
        "iptables nftables",
    ),
    (
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "gauge",
        "all",
    ),
    (
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
        "gauge",
        "all",
    ),
    (
        "kubeproxy_network_programming_duration_seconds",
        "histogram",
        "all",
    ),
    (
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
        "gauge",
        "all",
    ),
    (
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "counter",
        "all",
    ),
    (
        "kubeproxy_sync_proxy_rules_service_changes_pending",
        "gauge",
        "all",
    ),
    (
        "kubeproxy_sync_proxy_rules_service_changes_total",
        "counter",
        "all",
    ),
    (
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
        "gauge",
        "all",
    ),
    (
        "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
        "counter",
        "iptables ipvs",
    ),
    (
        "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total",
        "counter",
        "iptables",
    ),
    (
        "kubeproxy_sync_proxy_rules_iptables_last",
        "gauge",
        "iptables",
    ),
    (
        "kubeproxy_sync_proxy_rules_iptables_total",
        "gauge",
        "iptables",
    ),
    (
        "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
        "counter",
        "nftables",
    ),
    (
        "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total",
        "counter",
        "nftables",
    ),
    ("kubeproxy_proxy_healthz_total", "counter", "all"),
    ("kubeproxy_proxy_livez_total", "counter", "all"),
    (
        "kubeproxy_conntrack_reconciler_sync_duration_seconds",
        "histogram",
        "all",
    ),
    (
        "kubeproxy_conntrack_reconciler_deleted_entries_total",
        "counter",
        "all",
    ),
];

/// Labels upstream puts on each metric (besides histogram `le`).
fn upstream_labels(name: &str) -> &'static [&'static str] {
    match name {
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending"
        | "kubeproxy_sync_proxy_rules_endpoint_changes_total"
        | "kubeproxy_sync_proxy_rules_service_changes_pending"
        | "kubeproxy_sync_proxy_rules_service_changes_total" => &[],
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total" => &["ip_family", "traffic_policy"],
        "kubeproxy_sync_proxy_rules_iptables_last"
        | "kubeproxy_sync_proxy_rules_iptables_total" => &["ip_family", "table"],
        "kubeproxy_proxy_healthz_total" | "kubeproxy_proxy_livez_total" => &["code"],
        _ => &["ip_family"],
    }
}

/// The metrics server exports exactly upstream's kube-proxy metrics for the mode (names,
/// types and labels), the process metrics, and upstream's other paths.
#[test]
fn metrics_server_exports_upstreams_metrics() {
    let dir = temp_dir("metrics");
    write_service(&dir.join("svc.yaml"), "a", "198.19.0.1");
    for mode in ["iptables", "nftables", "ipvs"] {
        let port = free_port();
        let child = spawn_standalone(
            &dir,
            &[
                format!("--proxy-mode={mode}"),
                "--print-state".into(),
                format!("--metrics-bind-address=127.0.0.1:{port}"),
                format!("--healthz-bind-address=127.0.0.1:{}", free_port()),
            ],
        );
        // Wait for the first sync, so the timestamps are set.
        let (_, head, metrics) = wait_http(port, "/metrics", |status, body| {
            status == 200
                && body.contains(
                    "kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"} 1",
                )
        });
        assert!(
            head.contains("content-type: text/plain; version=0.0.4"),
            "{head}"
        );
        let exported: std::collections::BTreeMap<&str, &str> = metrics
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_once(' '))
            .collect();
        for (name, kind, modes) in UPSTREAM_METRICS {
            let expected = *modes == "all" || modes.split(' ').any(|m| m == mode);
            assert_eq!(exported.contains_key(name), expected, "{mode}: {name}");
            if expected {
                assert_eq!(exported[name], *kind, "{mode}: type of {name}");
                let labels = upstream_labels(name);
                let sample = metrics
                    .lines()
                    .find(|l| l.starts_with(name) && !l.starts_with('#'))
                    .unwrap_or_else(|| panic!("{mode}: no sample of {name}"));
                let label_names: Vec<&str> = sample
                    .split_once('{')
                    .map(|(_, rest)| rest.split('}').next().unwrap())
                    .map(|l| {
                        l.split(',')
                            .map(|kv| kv.split('=').next().unwrap())
                            .filter(|k| *k != "le")
                            .collect()
                    })
                    .unwrap_or_default();
                let mut sorted = label_names.clone();
                sorted.sort();
                assert_eq!(sorted, labels, "{mode}: labels of {name}: {sample}");
            }
        }
        for name in exported.keys().filter(|n| n.starts_with("kubeproxy_")) {
            assert!(
                UPSTREAM_METRICS.iter().any(|(n, _, _)| n == name),
                "{mode}: {name} is not an upstream metric"
            );
        }
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_start_time_seconds",
            "process_open_fds",
            "process_max_fds",
            "process_virtual_memory_bytes",
        ] {
            assert!(exported.contains_key(name), "{mode}: {name}");
        }
        // Network programming buckets as upstream: 0.25, 0.5, 1..59, 60..115, 120..300, +Inf.
        let buckets = metrics
            .lines()
            .filter(|l| {
                l.starts_with("kubeproxy_network_programming_duration_seconds_bucket")
                    && l.contains("IPv4")
            })
            .count();
        assert_eq!(buckets, 2 + 59 + 12 + 7 + 1);
        assert!(metrics.contains("le=\"16.384\""));

        let (status, head, body) = http_get(port, "/proxyMode").unwrap();
        assert_eq!((status, body.as_str()), (200, mode));
        assert!(head.contains("text/plain; charset=utf-8") && head.contains("nosniff"));
        assert_eq!(
            http_get(port, "/healthz").map(|r| (r.0, r.2)),
            Some((200, "ok".into()))
        );
        let (status, head, body) = http_get(port, "/configz").unwrap();
        assert_eq!(status, 200);
        assert!(head.contains("application/json"));
        let configz: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(configz["kubeproxy.config.k8s.io"]["mode"], mode);
        assert_eq!(
            configz["kubeproxy.config.k8s.io"]["metricsBindAddress"],
            format!("127.0.0.1:{port}")
        );
        // Profiling is off by default.
        assert_eq!(http_get(port, "/debug/flags/v").map(|r| r.0), Some(404));
        stop(child);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--profiling`: the log verbosity can be read and changed at run time.
#[test]
fn profiling_exposes_the_verbosity_flag() {
    let dir = temp_dir("profiling");
    let port = free_port();
    let child = spawn_standalone(
        &dir,
        &[
            "--print-state".into(),
            "--profiling".into(),
            "--v=2".into(),
            format!("--metrics-bind-address=127.0.0.1:{port}"),
            format!("--healthz-bind-address=127.0.0.1:{}", free_port()),
        ],
    );
    let (_, _, body) = wait_http(port, "/debug/flags/v", |status, _| status == 200);
    assert_eq!(body.trim(), "2");
    let put = {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(stream, "PUT /debug/flags/v HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nConnection: close\r\n\r\n5").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    };
    assert!(put.starts_with("HTTP/1.1 200"), "{put}");
    assert_eq!(http_get(port, "/debug/flags/v").unwrap().2.trim(), "5");
    assert_eq!(http_get(port, "/debug/pprof/").map(|r| r.0), Some(501));
    stop(child);
    std::fs::remove_dir_all(&dir).unwrap();
}
