use super::*;

fn flags(args: &[&str]) -> Flags {
    let mut all = vec!["kube-proxy"];
    all.extend_from_slice(args);
    Flags::parse_from_args(all).unwrap()
}

fn effective(args: &[&str], file: Option<&str>) -> EffectiveConfig {
    build(&flags(args), file).unwrap()
}

#[track_caller]
fn invalid(args: &[&str], file: Option<&str>) -> Vec<FieldError> {
    match build(&flags(args), file) {
        Err(ConfigError::Invalid(errors)) => errors,
        other => panic!("expected validation errors, got {other:?}"),
    }
}

/// What upstream's `kube-proxy --write-config-to F` writes on Linux with no other flags:
/// the defaulted document after Complete() (mode and detectLocalMode resolved) and the
/// internal round trip (sync periods only in the active mode's section).
const UPSTREAM_WRITE_CONFIG_DEFAULT: &str = r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 10
  contentType: application/vnd.kubernetes.protobuf
  kubeconfig: ""
  qps: 5
clusterCIDR: ""
configSyncPeriod: 15m0s
conntrack:
  maxPerCore: 32768
  min: 131072
  tcpBeLiberal: false
  tcpCloseWaitTimeout: 1h0m0s
  tcpEstablishedTimeout: 24h0m0s
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ClusterCIDR
enableProfiling: false
healthzBindAddress: 0.0.0.0:10256
hostnameOverride: ""
iptables:
  localhostNodePorts: true
  masqueradeAll: false
  masqueradeBit: 14
  minSyncPeriod: 1s
  syncPeriod: 30s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 0s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 5s
  format: text
  options:
    json:
      infoBufferSize: "0"
    text:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: 127.0.0.1:10249
mode: iptables
nftables:
  masqueradeAll: false
  masqueradeBit: 14
  minSyncPeriod: 0s
  syncPeriod: 0s
nodePortAddresses: null
oomScoreAdj: -999
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
"#;

#[test]
fn write_config_default_matches_upstream() {
    assert_eq!(
        effective(&[], None).document.to_yaml(),
        UPSTREAM_WRITE_CONFIG_DEFAULT
    );
}

#[test]
fn nftables_mode_from_flags_moves_sync_values_and_defaults_primary() {
    let eff = effective(
        &[
            "--proxy-mode=nftables",
            "--iptables-min-sync-period=2s",
            "--masquerade-all",
            "--cluster-cidr=198.18.0.0/16",
        ],
        None,
    );
    let yaml = eff.document.to_yaml();
    let expected_sections = "nftables:\n  masqueradeAll: true\n  masqueradeBit: 14\n  minSyncPeriod: 2s\n  syncPeriod: 30s\nnodePortAddresses:\n- primary\n";
    assert!(yaml.contains(expected_sections), "{yaml}");
    assert!(yaml.contains("iptables:\n  localhostNodePorts: true\n  masqueradeAll: false\n  masqueradeBit: 14\n  minSyncPeriod: 0s\n  syncPeriod: 0s\n"), "{yaml}");
    let s = &eff.settings;
    assert_eq!(s.mode, ProxyMode::Nftables);
    assert_eq!(s.min_sync_period, Duration::from_secs(2));
    assert_eq!(s.sync_period, Duration::from_secs(30));
    assert!(s.masquerade_all);
    assert_eq!(s.node_port_addresses, NodePortAddresses::Primary);
    assert_eq!(
        s.detect_local,
        DetectLocal::ClusterCidr(vec!["198.18.0.0/16".parse().unwrap()])
    );
}

#[test]
fn ipvs_mode_reads_ipvs_sync_flags() {
    let eff = effective(
        &[
            "--proxy-mode=ipvs",
            "--ipvs-sync-period=45s",
            "--iptables-sync-period=10s",
        ],
        None,
    );
    assert_eq!(eff.settings.sync_period, Duration::from_secs(45));
    assert_eq!(eff.settings.min_sync_period, Duration::ZERO);
}

#[test]
fn file_wins_over_flags_except_logging_and_hostname() {
    let file = "mode: nftables\nhostnameOverride: from-file\nclusterCIDR: 198.18.0.0/16\nlogging:\n  verbosity: 1\nnftables:\n  minSyncPeriod: 3s\n";
    let eff = effective(
        &[
            "--config=/etc/kp.yaml",
            "--proxy-mode=iptables",
            "--cluster-cidr=10.0.0.0/8",
            "--hostname-override=Node-A",
            "-v=4",
        ],
        Some(file),
    );
    let s = &eff.settings;
    assert_eq!(s.mode, ProxyMode::Nftables, "file wins for mode");
    assert_eq!(
        s.detect_local,
        DetectLocal::ClusterCidr(vec!["198.18.0.0/16".parse().unwrap()])
    );
    assert_eq!(
        s.hostname_override.as_deref(),
        Some("node-a"),
        "flag wins, lowercased"
    );
    assert_eq!(s.verbosity, 4, "logging flag wins");
    assert_eq!(s.min_sync_period, Duration::from_secs(3));
    assert_eq!(
        s.sync_period,
        Duration::from_secs(30),
        "defaulted in the nftables section"
    );
}

#[test]
fn unknown_file_fields_are_warnings() {
    let eff = effective(&["--config=/c.yaml"], Some("mode: nftables\nnewThing: 1\n"));
    assert!(
        eff.warnings.iter().any(|w| w.contains("newThing")),
        "{:?}",
        eff.warnings
    );
}

#[test]
fn dual_stack_cluster_cidr() {
    let eff = effective(&["--cluster-cidr=198.18.0.0/16,2001:db8:42::/56"], None);
    match &eff.settings.detect_local {
        DetectLocal::ClusterCidr(cidrs) => assert_eq!(cidrs.len(), 2),
        other => panic!("{other:?}"),
    }
}

#[test]
fn invalid_values_name_field_value_and_allowed() {
    let errors = invalid(&["--proxy-mode=kernelspace"], None);
    assert_eq!(errors[0].field, "mode");
    assert_eq!(errors[0].value, "kernelspace");
    assert!(errors[0].allowed.contains("nftables"));
    assert!(errors[0].allowed.contains("userspace"));

    let errors = invalid(
        &["--proxy-mode=userspace", "--proxy-port-range=3000-2000"],
        None,
    );
    assert_eq!(errors[0].field, "portRange");
    assert!(
        errors[0].allowed.contains("begin-end"),
        "{}",
        errors[0].allowed
    );
    let errors = invalid(&["--proxy-mode=userspace", "--udp-timeout=0s"], None);
    assert_eq!(errors[0].field, "udpIdleTimeout");

    let errors = invalid(&["--iptables-masquerade-bit=32"], None);
    assert_eq!(errors[0].field, "iptables.masqueradeBit");

    let errors = invalid(
        &[
            "--iptables-min-sync-period=1m",
            "--iptables-sync-period=30s",
        ],
        None,
    );
    assert_eq!(errors[0].field, "iptables.minSyncPeriod");

    let errors = invalid(&["--oom-score-adj=-1001"], None);
    assert_eq!(errors[0].field, "oomScoreAdj");

    let errors = invalid(&["--cluster-cidr=198.18.0.0/16,198.19.0.0/16"], None);
    assert_eq!(errors[0].field, "clusterCIDR");

    let errors = invalid(&["--detect-local-mode=BridgeInterface"], None);
    assert_eq!(errors[0].field, "detectLocal.bridgeInterface");

    let errors = invalid(&["--detect-local-mode=Magic"], None);
    assert_eq!(errors[0].field, "detectLocalMode");

    let errors = invalid(&["--nodeport-addresses=primary,192.0.2.0/24"], None);
    assert_eq!(errors[0].field, "nodePortAddresses");

    let errors = invalid(&["--nodeport-addresses=not-a-cidr"], None);
    assert_eq!(errors[0].value, "not-a-cidr");

    let errors = invalid(&["--healthz-bind-address=localhost:10256"], None);
    assert_eq!(errors[0].field, "healthzBindAddress");

    let errors = invalid(&["--bind-address=nope"], None);
    assert_eq!(errors[0].field, "bindAddress");

    let errors = invalid(&["--conntrack-max-per-core=-1"], None);
    assert_eq!(errors[0].field, "conntrack.maxPerCore");

    let errors = invalid(&["--logging-format=xml"], None);
    assert_eq!(errors[0].field, "logging.format");

    let errors = invalid(&["--config-sync-period=0s"], None);
    assert_eq!(errors[0].field, "configSyncPeriod");

    let errors = invalid(
        &["--config=/c"],
        Some("mode: nftables\nnftables:\n  syncPeriod: -1s\n"),
    );
    assert_eq!(errors[0].field, "nftables.syncPeriod");
}

#[test]
fn all_errors_are_reported_together() {
    let errors = invalid(
        &[
            "--proxy-mode=bogus",
            "--oom-score-adj=5000",
            "--iptables-masquerade-bit=-1",
        ],
        None,
    );
    assert_eq!(errors.len(), 3, "{errors:?}");
}

#[test]
fn file_decode_errors_name_path_and_field() {
    let err = build(
        &flags(&["--config=/etc/kp.yaml"]),
        Some("conntrack:\n  min: many\n"),
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("/etc/kp.yaml") && text.contains("conntrack.min"),
        "{text}"
    );
}

#[test]
fn disabled_listeners_and_ipv6_bind() {
    let eff = effective(
        &["--healthz-bind-address=", "--metrics-bind-address="],
        None,
    );
    assert_eq!(eff.settings.healthz_bind_address, None);
    assert_eq!(eff.settings.metrics_bind_address, None);
    let eff = effective(&["--bind-address=2001:db8::1"], None);
    assert_eq!(
        eff.settings.healthz_bind_address,
        Some("[::]:10256".parse().unwrap())
    );
    assert_eq!(
        eff.settings.metrics_bind_address,
        Some("[::1]:10249".parse().unwrap())
    );
    assert_eq!(
        eff.settings.bind_address,
        Some("2001:db8::1".parse().unwrap())
    );
}

#[test]
fn deprecated_port_flags_apply_only_without_write_config() {
    let eff = effective(&["--healthz-port=12345"], None);
    assert_eq!(
        eff.settings.healthz_bind_address,
        Some("0.0.0.0:12345".parse().unwrap())
    );
    let eff = effective(&["--healthz-port=12345", "--write-config-to=/tmp/x"], None);
    assert_eq!(
        eff.settings.healthz_bind_address,
        Some("0.0.0.0:10256".parse().unwrap())
    );
}

#[test]
fn written_config_reads_back_to_the_same_settings() {
    let first = effective(
        &[
            "--proxy-mode=nftables",
            "--cluster-cidr=198.18.0.0/16",
            "--masquerade-all",
            "-v=3",
        ],
        None,
    );
    let text = first.document.to_yaml();
    let second = effective(&["--config=/written.yaml"], Some(&text));
    assert_eq!(second.document.to_yaml(), text);
    assert_eq!(
        second.settings.masquerade_all,
        first.settings.masquerade_all
    );
    assert_eq!(second.settings.verbosity, 3);
}

#[test]
fn conntrack_zero_means_leave_alone() {
    let eff = effective(
        &[
            "--conntrack-max-per-core=0",
            "--conntrack-tcp-timeout-established=0s",
        ],
        None,
    );
    assert_eq!(eff.settings.conntrack.max_per_core, 0);
    assert_eq!(eff.settings.conntrack.tcp_established_timeout, None);
    assert_eq!(
        eff.settings.conntrack.tcp_close_wait_timeout,
        Some(Duration::from_secs(3600))
    );
}

#[test]
fn userspace_mode_port_range_and_udp_timeout() {
    use crate::effective::{parse_port_range, InvalidPortRange};
    assert_eq!(parse_port_range(""), Ok(None));
    assert_eq!(parse_port_range("30000-30010"), Ok(Some((30000, 30010))));
    assert_eq!(parse_port_range("30000+10"), Ok(Some((30000, 30010))));
    assert_eq!(parse_port_range("8080"), Ok(Some((8080, 8080))));
    for bad in ["0-10", "10-5", "a-b", "65535+1", "70000"] {
        assert_eq!(parse_port_range(bad), Err(InvalidPortRange), "{bad}");
    }
    let config = effective(&["--proxy-mode=userspace"], None);
    assert_eq!(config.settings.mode, ProxyMode::Userspace);
    assert_eq!(config.settings.userspace.port_range, None);
    assert_eq!(
        config.settings.userspace.udp_idle_timeout,
        std::time::Duration::from_millis(250)
    );
    let config = effective(
        &[
            "--proxy-mode=userspace",
            "--proxy-port-range=40000+99",
            "--udp-timeout=2s",
        ],
        None,
    );
    assert_eq!(config.settings.userspace.port_range, Some((40000, 40099)));
    assert_eq!(
        config.settings.userspace.udp_idle_timeout,
        std::time::Duration::from_secs(2)
    );
    // The flags land in the document (--write-config-to, /configz), and a file sets them too.
    assert_eq!(config.document.port_range, "40000+99");
    let yaml = config.document.to_yaml();
    assert!(yaml.contains("udpIdleTimeout: 2s"), "{yaml}");
    // Other modes take the flag but say it does nothing there.
    let config = effective(&["--proxy-port-range=40000+99"], None);
    assert!(
        config
            .warnings
            .iter()
            .any(|w| w.contains("no effect outside")),
        "{:?}",
        config.warnings
    );
}
