//! What deploy/ ships: the kubeadm-style manifests (every object decodes as its Kubernetes
//! type with no field the type does not know, the binary accepts the ConfigMap's config.conf
//! (`--write-config-to` round trip) and kubeconfig.conf, and the DaemonSet runs the binary
//! with a command line it takes, the config where the ConfigMap is mounted), and the systemd
//! unit (`systemd-analyze verify`, its command line).

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde_json::Value;

const MANIFEST: &str = include_str!("../../../deploy/kubeadm/kube-proxy.yaml");

fn documents() -> Vec<Value> {
    serde_saphyr::from_multiple(MANIFEST).expect("deploy/kubeadm/kube-proxy.yaml parses")
}

/// `document` as `T`, checking that encoding it again gives the same document (a field the
/// type does not know would be lost, as the API server would drop it).
fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(document: &Value) -> T {
    let object: T =
        serde_json::from_value(document.clone()).unwrap_or_else(|e| panic!("{e}: {document:#}"));
    assert_eq!(
        serde_json::to_value(&object).unwrap(),
        *document,
        "every field is one the type knows"
    );
    object
}

fn of_kind<'a>(documents: &'a [Value], kind: &str) -> Vec<&'a Value> {
    documents.iter().filter(|d| d["kind"] == kind).collect()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kp-deploy-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `binary` with `args` and `--write-config-to` a file in `dir`; the configuration it
/// wrote (the run must succeed).
fn written_config(binary: &Path, args: &[String], dir: &Path) -> String {
    let written = dir.join("written.yaml");
    let out = Command::new(binary)
        .args(args)
        .arg(format!("--write-config-to={}", written.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(&written).unwrap()
}

/// `systemd-analyze verify` of `UNIT` with its ExecStart binary replaced by `binary`: the
/// warnings and errors it printed (empty: clean).
fn verify_unit(binary: &Path, dir: &Path) -> String {
    let unit = dir.join("kube-proxy.service");
    std::fs::write(
        &unit,
        UNIT.replace("/usr/bin/kube-proxy", &binary.display().to_string()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    match out.status.success() {
        true => stderr,
        false => format!("failed: {stderr}"),
    }
}

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_kube-proxy"))
}

#[test]
fn every_object_is_its_kubernetes_type() {
    let documents = documents();
    let kinds: Vec<&str> = documents
        .iter()
        .filter_map(|d| d["kind"].as_str())
        .collect();
    assert_eq!(
        kinds,
        [
            "ServiceAccount",
            "ClusterRoleBinding",
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet"
        ]
    );
    let account: ServiceAccount = typed(of_kind(&documents, "ServiceAccount")[0]);
    assert_eq!(account.metadata.name.as_deref(), Some("kube-proxy"));
    let bindings: Vec<ClusterRoleBinding> = of_kind(&documents, "ClusterRoleBinding")
        .into_iter()
        .map(typed)
        .collect();
    assert_eq!(
        bindings[0].role_ref.name, "system:node-proxier",
        "kubeadm's binding"
    );
    for binding in &bindings {
        let subject = &binding.subjects.as_ref().unwrap()[0];
        assert_eq!(
            (
                subject.kind.as_str(),
                subject.name.as_str(),
                subject.namespace.as_deref()
            ),
            ("ServiceAccount", "kube-proxy", Some("kube-system"))
        );
    }
    let extra: ClusterRole = typed(of_kind(&documents, "ClusterRole")[0]);
    assert_eq!(
        bindings[1].role_ref.name,
        extra.metadata.name.clone().unwrap()
    );
    let _: ConfigMap = typed(of_kind(&documents, "ConfigMap")[0]);
    let _: DaemonSet = typed(of_kind(&documents, "DaemonSet")[0]);
}

/// The ConfigMap's files, written into `dir` (where the DaemonSet mounts them:
/// /var/lib/kube-proxy).
fn write_config_map(dir: &Path) -> ConfigMap {
    let documents = documents();
    let config_map: ConfigMap = typed(of_kind(&documents, "ConfigMap")[0]);
    for (key, text) in config_map.data.as_ref().unwrap() {
        std::fs::write(dir.join(key), text).unwrap();
    }
    config_map
}

#[test]
fn the_binary_takes_the_config_map() {
    let dir = temp_dir("config");
    write_config_map(&dir);
    let text = written_config(
        binary(),
        &[format!("--config={}", dir.join("config.conf").display())],
        &dir,
    );
    // kubeadm's zero values mean upstream's defaults (the empty mode is iptables).
    for line in [
        "clusterCIDR: 10.244.0.0/16",
        "kubeconfig: /var/lib/kube-proxy/kubeconfig.conf",
        "configSyncPeriod: 15m0s",
        "healthzBindAddress: 0.0.0.0:10256",
        "metricsBindAddress: 127.0.0.1:10249",
        "  syncPeriod: 30s",
        "mode: iptables",
    ] {
        assert!(text.contains(line), "{line} in\n{text}");
    }

    // kubeconfig.conf: the in-cluster service account's CA and token files.
    let kubeconfig =
        kube::config::Kubeconfig::read_from(dir.join("kubeconfig.conf")).expect("kubeconfig");
    let cluster = kubeconfig.clusters[0].cluster.as_ref().unwrap();
    assert_eq!(
        cluster.certificate_authority.as_deref(),
        Some("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")
    );
    assert!(cluster
        .server
        .as_deref()
        .is_some_and(|s| s.starts_with("https://")));
    let user = kubeconfig.auth_infos[0].auth_info.as_ref().unwrap();
    assert_eq!(
        user.token_file.as_deref(),
        Some("/var/run/secrets/kubernetes.io/serviceaccount/token")
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_daemon_set_runs_the_binary_as_kubeadm_does() {
    let documents = documents();
    let daemon_set: DaemonSet = typed(of_kind(&documents, "DaemonSet")[0]);
    let pod = daemon_set.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.service_account_name.as_deref(), Some("kube-proxy"));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(
        pod.tolerations.as_ref().unwrap()[0].operator.as_deref(),
        Some("Exists")
    );
    let container = &pod.containers[0];
    assert_eq!(container.name, "kube-proxy");
    assert_eq!(
        container
            .security_context
            .as_ref()
            .and_then(|c| c.privileged),
        Some(true)
    );
    let mounts: Vec<(&str, &str)> = container
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .map(|m| (m.name.as_str(), m.mount_path.as_str()))
        .collect();
    assert_eq!(
        mounts,
        [
            ("kube-proxy", "/var/lib/kube-proxy"),
            ("xtables-lock", "/run/xtables.lock"),
            ("lib-modules", "/lib/modules"),
        ]
    );
    let volumes = pod.volumes.as_ref().unwrap();
    assert_eq!(
        volumes[0].config_map.as_ref().map(|c| c.name.as_str()),
        Some("kube-proxy")
    );
    assert_eq!(
        volumes[1]
            .host_path
            .as_ref()
            .and_then(|h| h.type_.as_deref()),
        Some("FileOrCreate")
    );

    // The command, with the ConfigMap where the pod mounts it and $(NODE_NAME) expanded as
    // the kubelet expands it, is one the binary takes.
    let command = container.command.as_ref().unwrap();
    assert_eq!(
        command[0], "/usr/local/bin/kube-proxy",
        "where the image has it"
    );
    let env = &container.env.as_ref().unwrap()[0];
    assert_eq!(env.name, "NODE_NAME");
    assert_eq!(
        env.value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("spec.nodeName")
    );
    let dir = temp_dir("daemonset");
    write_config_map(&dir);
    let mount = format!("{}/", dir.display());
    let args: Vec<String> = command[1..]
        .iter()
        .map(|a| {
            a.replace("/var/lib/kube-proxy/", &mount)
                .replace("$(NODE_NAME)", "node-a")
        })
        .collect();
    assert_eq!(
        args,
        [
            format!("--config={mount}config.conf"),
            "--hostname-override=node-a".to_string()
        ]
    );
    let text = written_config(binary(), &args, &dir);
    assert!(text.contains("hostnameOverride: node-a"), "{text}");
    let _ = std::fs::remove_dir_all(dir);
}

const UNIT: &str = include_str!("../../../deploy/systemd/kube-proxy.service");

/// deploy/systemd/kube-proxy.service passes `systemd-analyze verify` with no warning (with
/// ExecStart pointed at the built binary, since nothing is installed here), and its command
/// line is one the binary takes.
#[test]
fn the_systemd_unit_verifies() {
    let analyze = Command::new("systemd-analyze").arg("--version").output();
    if analyze.is_err() {
        assert!(
            std::env::var_os("KP_REQUIRE_NETNS").is_none(),
            "systemd-analyze is missing (install systemd)"
        );
        eprintln!("skipped: no systemd-analyze");
        return;
    }
    let dir = temp_dir("systemd");
    let warnings = verify_unit(binary(), &dir);
    assert!(warnings.is_empty(), "{warnings}");
    for needed in [
        "After=network-online.target",
        "Wants=network-online.target",
        "Restart=always",
        "StandardError=journal",
    ] {
        assert!(UNIT.contains(needed), "{needed}");
    }

    let exec = UNIT
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap();
    let args: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(args[0], "/usr/bin/kube-proxy");
    assert_eq!(
        args[2], "$KUBE_PROXY_ARGS",
        "flags from /etc/default/kube-proxy"
    );
    write_config_map(&dir);
    let config = args[1].replace("/var/lib/kube-proxy/", &format!("{}/", dir.display()));
    written_config(
        binary(),
        &[config, "--hostname-override=node-1".into(), "-v=2".into()],
        &dir,
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// The Debian package (`KP_DEB`, built by scripts/deb.sh in .ci/run), unpacked into a fresh
/// root: its dependencies, its files, the binary running with the packaged configuration, and
/// the packaged unit verified against the packaged binary; then installed with `dpkg -i` on
/// the machine (only CI sets `KP_DEB`) and purged.
#[test]
fn the_debian_package_installs_the_binary_unit_and_config() {
    let deb = match std::env::var("KP_DEB") {
        Ok(deb) if !deb.is_empty() => deb,
        _ => {
            assert!(
                std::env::var_os("KP_REQUIRE_NETNS").is_none(),
                "KP_DEB is not set: build the package with scripts/deb.sh first"
            );
            return;
        }
    };
    let field = |name: &str| {
        let out = Command::new("dpkg-deb")
            .args(["-f", &deb, name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(field("Package"), "kube-proxy-rs");
    let depends = field("Depends");
    for needed in ["nftables", "iptables", "conntrack", "iproute2"] {
        assert!(depends.contains(needed), "{depends}");
    }
    let recommends = field("Recommends");
    for tool in ["ipset", "ipvsadm"] {
        assert!(recommends.contains(tool), "ipvs mode's tools: {recommends}");
    }
    let root = temp_dir("deb");
    let unpacked = Command::new("dpkg")
        .arg("-x")
        .arg(&deb)
        .arg(&root)
        .status()
        .unwrap();
    assert!(unpacked.success());
    let binary = root.join("usr/bin/kube-proxy");
    let unit = root.join("lib/systemd/system/kube-proxy.service");
    let config = root.join("var/lib/kube-proxy/config.conf");
    assert_eq!(std::fs::read_to_string(&unit).unwrap(), UNIT);
    let written = written_config(
        &binary,
        &[
            format!("--config={}", config.display()),
            "--hostname-override=node-1".into(),
        ],
        &root,
    );
    assert!(
        written.contains("kubeconfig: /var/lib/kube-proxy/kubeconfig.conf"),
        "{written}"
    );
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok()
    {
        let warnings = verify_unit(&binary, &root);
        assert!(warnings.is_empty(), "{warnings}");
    }
    let _ = std::fs::remove_dir_all(root);

    // And installed for real with dpkg (CI's machine has the dependencies), then purged.
    let dpkg = |args: &[&str]| {
        let out = Command::new("dpkg").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "dpkg {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    dpkg(&["-i", &deb]);
    let status = dpkg(&["-s", "kube-proxy-rs"]);
    assert!(status.contains("Status: install ok installed"), "{status}");
    let version = Command::new("/usr/bin/kube-proxy")
        .arg("--version")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&version.stdout).contains("kube-proxy-rs"));
    assert!(Path::new("/lib/systemd/system/kube-proxy.service").exists());
    assert!(Path::new("/var/lib/kube-proxy/config.conf").exists());
    dpkg(&["--purge", "kube-proxy-rs"]);
    assert!(!Path::new("/usr/bin/kube-proxy").exists());
}
