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
