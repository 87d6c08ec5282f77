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
        .args(["--proxy-mode=userspace", "--iptables-masquerade-bit=40"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("mode: invalid value \"userspace\""),
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

/// The main job on a manifest directory: prints the state as JSON and follows file changes.
#[test]
fn main_job_follows_manifest_changes() {
    let dir = temp_dir("follow");
    std::fs::write(
        dir.join("a.yaml"),
        SERVICE
            .replace("__NAME__", "a")
            .replace("__IP__", "198.19.0.1"),
    )
    .unwrap();
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

    std::fs::write(
        dir.join("b.yaml"),
        SERVICE
            .replace("__NAME__", "b")
            .replace("__IP__", "198.19.0.2"),
    )
    .unwrap();
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

const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a__DELETING__}\n";

/// The proxy health server: /healthz follows node eligibility, /livez does not.
#[test]
fn health_server_reports_node_eligibility() {
    let dir = temp_dir("health");
    std::fs::write(
        dir.join("svc.yaml"),
        SERVICE
            .replace("__NAME__", "a")
            .replace("__IP__", "198.19.0.1"),
    )
    .unwrap();
    let port = free_port();
    let mut child = bin()
        .arg("--manifests")
        .arg(&dir)
        .args([
            "--hostname-override=node-a",
            "--print-state",
            &format!("--healthz-bind-address=127.0.0.1:{port}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let wait_for = |path: &str, code: u16| -> (String, String) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some((status, head, body)) = http_get(port, path) {
                if status == code {
                    return (head, body);
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{path} never answered {code}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
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
    child.kill().unwrap();
    child.wait().unwrap();
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
    std::fs::write(
        manifests.join("svc.yaml"),
        SERVICE
            .replace("__NAME__", "a")
            .replace("__IP__", "198.19.0.1"),
    )
    .unwrap();
    std::fs::write(
        manifests.join("node.yaml"),
        NODE.replace("__DELETING__", ""),
    )
    .unwrap();
    let port = free_port();
    let path = format!(
        "{}:{}",
        fake_bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut child = bin()
        .env("PATH", path)
        .arg("--manifests")
        .arg(&manifests)
        .args([
            "--hostname-override=node-a",
            "--proxy-mode=nftables",
            "--iptables-sync-period=1s",
            "--iptables-min-sync-period=0s",
        ])
        .arg(format!("--healthz-bind-address=127.0.0.1:{port}"))
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
    child.kill().unwrap();
    child.wait().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        seen_unhealthy,
        "/livez never reported 503 while every sync failed"
    );
}
