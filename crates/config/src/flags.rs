//! Upstream kube-proxy's command line, flag for flag.
//!
//! Every flag is an `Option` so that "given on the command line" is explicit: with `--config`
//! the file replaces all flag values except logging flags and `--hostname-override`, exactly
//! as upstream. Booleans accept `--flag`, `--flag=true` and `--flag=false` like Go's pflag.
//! Defaults shown in help are upstream's; they are applied by `effective`, not by clap.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Parser;

use crate::duration::GoDuration;

/// kube-proxy-rs: the Kubernetes network proxy, a drop-in replacement for kube-proxy.
///
/// It watches Services, EndpointSlices and its own Node, and programs the kernel so that
/// traffic to a Service reaches a healthy endpoint.
#[derive(Parser, Debug, Default, Clone)]
#[command(name = "kube-proxy", disable_version_flag = true, max_term_width = 100)]
pub struct Flags {
    // ---- configuration file and lifecycle ----
    /// The path to the configuration file (KubeProxyConfiguration, YAML or JSON).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// If set, write the effective configuration to this file and exit.
    #[arg(long, value_name = "FILE")]
    pub write_config_to: Option<PathBuf>,
    /// If true, remove every rule kube-proxy may have created and exit.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub cleanup: Option<bool>,
    /// If true, do the privileged one-time setup and exit (for an init container).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub init_only: Option<bool>,
    /// Print version information and exit (--version=raw for details).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "raw|true|false")]
    pub version: Option<String>,

    // ---- API client ----
    /// Path to a kubeconfig file with authorization information (the master location can be
    /// overridden by --master).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<String>,
    /// The address of the Kubernetes API server (overrides any value in kubeconfig).
    #[arg(long, value_name = "URL")]
    pub master: Option<String>,
    /// Content type of requests sent to apiserver. [default: application/vnd.kubernetes.protobuf]
    #[arg(long, value_name = "TYPE")]
    pub kube_api_content_type: Option<String>,
    /// QPS to use while talking with kubernetes apiserver. [default: 5]
    #[arg(long, value_name = "QPS")]
    pub kube_api_qps: Option<f32>,
    /// Burst to use while talking with kubernetes apiserver. [default: 10]
    #[arg(long, value_name = "N")]
    pub kube_api_burst: Option<i32>,
    /// How often configuration from the apiserver is refreshed. Must be greater than 0. [default: 15m0s]
    #[arg(long, value_name = "DURATION")]
    pub config_sync_period: Option<GoDuration>,
    /// If non-empty, will be used as the name of the Node that kube-proxy is running on.
    #[arg(long, value_name = "NAME")]
    pub hostname_override: Option<String>,
    /// A set of key=value pairs that describe feature gates for alpha/experimental features.
    #[arg(long, value_name = "GATES", value_parser = parse_feature_gates)]
    pub feature_gates: Option<BTreeMap<String, bool>>,

    // ---- servers ----
    /// Overrides kube-proxy's idea of what its node's primary IP is. [default: 0.0.0.0]
    #[arg(long, value_name = "IP")]
    pub bind_address: Option<String>,
    /// The IP address and port for the health check server to serve on; empty disables it. [default: 0.0.0.0:10256]
    #[arg(long, value_name = "IP:PORT")]
    pub healthz_bind_address: Option<String>,
    /// The IP address and port for the metrics server to serve on; empty disables it. [default: 127.0.0.1:10249]
    #[arg(long, value_name = "IP:PORT")]
    pub metrics_bind_address: Option<String>,
    /// If true kube-proxy will treat failure to bind to a port as fatal and exit.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub bind_address_hard_fail: Option<bool>,
    /// If true enables profiling via web interface on /debug/pprof handler.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub profiling: Option<bool>,
    /// The previous version for which you want to show hidden metrics.
    #[arg(long, value_name = "VERSION")]
    pub show_hidden_metrics_for_version: Option<String>,
    /// Deprecated: the port to bind the health check server; use --healthz-bind-address.
    #[arg(long, value_name = "PORT", hide = true)]
    pub healthz_port: Option<u16>,
    /// Deprecated: the port to bind the metrics server; use --metrics-bind-address.
    #[arg(long, value_name = "PORT", hide = true)]
    pub metrics_port: Option<u16>,

    // ---- proxy mode and rules ----
    /// Which proxy mode to use: 'iptables', 'ipvs' or 'nftables' (Linux). [default: iptables]
    #[arg(long, value_name = "MODE")]
    pub proxy_mode: Option<String>,
    /// If set, SNAT everything that goes through Service cluster IPs.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub masquerade_all: Option<bool>,
    /// The bit of the fwmark space to mark packets requiring SNAT, in [0, 31]. [default: 14]
    #[arg(long, value_name = "BIT", allow_negative_numbers = true)]
    pub iptables_masquerade_bit: Option<i32>,
    /// If false, kube-proxy disables the legacy behavior of allowing NodePort services to be
    /// accessed via localhost (iptables mode, IPv4 only). [default: true]
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub iptables_localhost_nodeports: Option<bool>,
    /// An interval (e.g. '5s', '1m', '2h22m') indicating how frequently various re-synchronizing
    /// and cleanup operations are performed. Must be greater than 0. [default: 30s]
    #[arg(long, value_name = "DURATION")]
    pub iptables_sync_period: Option<GoDuration>,
    /// The minimum period between rule resyncs in response to Service or EndpointSlice
    /// changes; 0 resyncs immediately. [default: 1s]
    #[arg(long, value_name = "DURATION")]
    pub iptables_min_sync_period: Option<GoDuration>,
    /// The ipvs-mode equivalent of --iptables-sync-period. [default: 30s]
    #[arg(long, value_name = "DURATION")]
    pub ipvs_sync_period: Option<GoDuration>,
    /// The ipvs-mode equivalent of --iptables-min-sync-period. [default: 0s]
    #[arg(long, value_name = "DURATION")]
    pub ipvs_min_sync_period: Option<GoDuration>,
    /// The ipvs scheduler type when proxy mode is ipvs.
    #[arg(long, value_name = "NAME")]
    pub ipvs_scheduler: Option<String>,
    /// A comma-separated list of CIDRs which the ipvs proxier should not touch when cleaning up.
    #[arg(long, value_name = "CIDRS", value_delimiter = ',')]
    pub ipvs_exclude_cidrs: Option<Vec<String>>,
    /// Enable strict ARP by setting arp_ignore to 1 and arp_announce to 2.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub ipvs_strict_arp: Option<bool>,
    /// The timeout for idle IPVS TCP connections, 0 to leave as-is.
    #[arg(long, value_name = "DURATION")]
    pub ipvs_tcp_timeout: Option<GoDuration>,
    /// The timeout for IPVS TCP connections after receiving a FIN packet, 0 to leave as-is.
    #[arg(long = "ipvs-tcpfin-timeout", value_name = "DURATION")]
    pub ipvs_tcpfin_timeout: Option<GoDuration>,
    /// The timeout for IPVS UDP packets, 0 to leave as-is.
    #[arg(long, value_name = "DURATION")]
    pub ipvs_udp_timeout: Option<GoDuration>,
    /// A list of CIDR ranges that contain valid node IPs, or 'primary'. NodePort connections are
    /// accepted only on node IPs in these ranges. [default: all (iptables), primary (nftables)]
    #[arg(
        long = "nodeport-addresses",
        value_name = "CIDRS",
        value_delimiter = ','
    )]
    pub nodeport_addresses: Option<Vec<String>>,
    /// Mode used to detect local traffic: ClusterCIDR, NodeCIDR, BridgeInterface or
    /// InterfaceNamePrefix. [default: ClusterCIDR]
    #[arg(long, value_name = "MODE")]
    pub detect_local_mode: Option<String>,
    /// The CIDR range of the pods in the cluster (for dual-stack, a comma-separated pair), used
    /// to tell local pod traffic apart from external traffic.
    #[arg(long, value_name = "CIDRS")]
    pub cluster_cidr: Option<String>,
    /// A bridge interface name; with --detect-local-mode=BridgeInterface, traffic arriving on it
    /// is local.
    #[arg(long, value_name = "NAME")]
    pub pod_bridge_interface: Option<String>,
    /// An interface name prefix; with --detect-local-mode=InterfaceNamePrefix, traffic arriving
    /// on a matching interface is local.
    #[arg(long, value_name = "PREFIX")]
    pub pod_interface_name_prefix: Option<String>,
    /// The oom-score-adj value for kube-proxy process, in [-1000, 1000]. [default: -999]
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub oom_score_adj: Option<i32>,
    /// Range of host ports (beginPort-endPort, single port or beginPort+offset, inclusive) that
    /// userspace mode's listeners take. Empty: any free port.
    #[arg(long, value_name = "RANGE")]
    pub proxy_port_range: Option<String>,
    /// How long an idle UDP connection is kept open in userspace mode (e.g. '250ms', '2s').
    /// Must be greater than 0. [default: 250ms]
    #[arg(long, value_name = "DURATION")]
    pub udp_timeout: Option<GoDuration>,

    // ---- conntrack ----
    /// Maximum number of NAT connections to track per CPU core (0 to leave the limit as-is and
    /// ignore --conntrack-min). [default: 32768]
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub conntrack_max_per_core: Option<i32>,
    /// Minimum number of conntrack entries to allocate, regardless of
    /// --conntrack-max-per-core. [default: 131072]
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub conntrack_min: Option<i32>,
    /// Idle timeout for established TCP connections (0 to leave as-is). [default: 24h0m0s]
    #[arg(long, value_name = "DURATION")]
    pub conntrack_tcp_timeout_established: Option<GoDuration>,
    /// NAT timeout for TCP connections in the CLOSE_WAIT state. [default: 1h0m0s]
    #[arg(long, value_name = "DURATION")]
    pub conntrack_tcp_timeout_close_wait: Option<GoDuration>,
    /// Enable liberal mode for tracking TCP packets by setting nf_conntrack_tcp_be_liberal to 1.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub conntrack_tcp_be_liberal: Option<bool>,
    /// Idle timeout for UNREPLIED UDP connections (0 to leave as-is).
    #[arg(long, value_name = "DURATION")]
    pub conntrack_udp_timeout: Option<GoDuration>,
    /// Idle timeout for ASSURED UDP connections (0 to leave as-is).
    #[arg(long, value_name = "DURATION")]
    pub conntrack_udp_timeout_stream: Option<GoDuration>,

    // ---- logging (component-base) ----
    /// Number for the log level verbosity.
    #[arg(short = 'v', long = "v", value_name = "LEVEL")]
    pub v: Option<u32>,
    /// Comma-separated list of pattern=N settings for file-filtered logging.
    #[arg(long, value_name = "PATTERN=N,...")]
    pub vmodule: Option<String>,
    /// Sets the log format: 'text' or 'json'. [default: text]
    #[arg(long, value_name = "FORMAT")]
    pub logging_format: Option<String>,
    /// Maximum number of seconds between log flushes. [default: 5s]
    #[arg(long, value_name = "DURATION")]
    pub log_flush_frequency: Option<GoDuration>,
    /// [Alpha] In JSON format with split output streams, the info messages can be buffered.
    #[arg(long, value_name = "QUANTITY")]
    pub log_json_info_buffer_size: Option<String>,
    /// [Alpha] In JSON format, write error messages to stderr and info messages to stdout.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub log_json_split_stream: Option<bool>,
    /// [Alpha] In text format with split output streams, the info messages can be buffered.
    #[arg(long, value_name = "QUANTITY")]
    pub log_text_info_buffer_size: Option<String>,
    /// [Alpha] In text format, write error messages to stderr and info messages to stdout.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub log_text_split_stream: Option<bool>,

    // ---- Windows ----
    /// Enable Windows Service Control Manager API integration (Windows only; ignored here).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL", hide = true)]
    pub windows_service: Option<bool>,

    // ---- kube-proxy-rs extensions (not in upstream) ----
    /// [kube-proxy-rs] Read Services, EndpointSlices and Nodes from this directory of YAML/JSON
    /// manifests instead of an API server (standalone mode; the directory is watched).
    #[arg(long, value_name = "DIR")]
    pub manifests: Option<PathBuf>,
    /// [kube-proxy-rs] After every sync, print the computed service state to stdout, as
    /// 'text' or 'json'.
    #[arg(long, value_name = "FORMAT", num_args = 0..=1, require_equals = true, default_missing_value = "text")]
    pub print_state: Option<String>,
    /// [kube-proxy-rs] Print the nft transactions the proxy would apply instead of applying
    /// them (no root needed). With --manifests and --once, prints the ruleset for a set of
    /// manifests.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub dry_run: Option<bool>,
    /// [kube-proxy-rs] Exit after the first successful sync.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub once: Option<bool>,
    /// [kube-proxy-rs] Delete stale UDP conntrack entries after syncs (default true, as
    /// upstream always does). Only for diagnosing; turning it off leaves UDP clients stuck
    /// on removed endpoints until their entries time out.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub conntrack_cleanup: Option<bool>,
}

/// Parses `--feature-gates=A=true,B=false` as Go's `featuregate` flag does.
pub fn parse_feature_gates(text: &str) -> Result<BTreeMap<String, bool>, String> {
    let mut gates = BTreeMap::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, value) = item.split_once('=').ok_or_else(|| {
            format!("missing bool value for {item} (use {item}=true or {item}=false)")
        })?;
        let value = parse_go_bool(value.trim()).ok_or_else(|| {
            format!("invalid value of {name}={value}, err: must be true or false")
        })?;
        gates.insert(name.trim().to_string(), value);
    }
    Ok(gates)
}

/// Go's `strconv.ParseBool`.
pub fn parse_go_bool(text: &str) -> Option<bool> {
    match text {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

impl Flags {
    /// Parses a command line (the first item is the program name).
    pub fn parse_from_args<I, T>(args: I) -> Result<Flags, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Flags::try_parse_from(args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Flags {
        let mut all = vec!["kube-proxy"];
        all.extend_from_slice(args);
        Flags::parse_from_args(all).unwrap()
    }

    #[test]
    fn go_style_booleans() {
        assert_eq!(parse(&["--masquerade-all"]).masquerade_all, Some(true));
        assert_eq!(
            parse(&["--masquerade-all=false"]).masquerade_all,
            Some(false)
        );
        assert_eq!(parse(&[]).masquerade_all, None);
    }

    #[test]
    fn verbosity_forms() {
        assert_eq!(parse(&["-v=2"]).v, Some(2));
        assert_eq!(parse(&["-v", "3"]).v, Some(3));
        assert_eq!(parse(&["--v=4"]).v, Some(4));
        assert_eq!(parse(&["--v", "5"]).v, Some(5));
    }

    #[test]
    fn upstream_issue_command_line_parses() {
        let flags = parse(&[
            "--kubeconfig",
            "/k",
            "--hostname-override",
            "node-a",
            "--proxy-mode",
            "nftables",
            "--cluster-cidr",
            "198.18.0.0/16",
            "--healthz-bind-address",
            "0.0.0.0:10256",
            "--metrics-bind-address",
            "127.0.0.1:10249",
            "--conntrack-max-per-core=0",
            "-v=2",
        ]);
        assert_eq!(flags.proxy_mode.as_deref(), Some("nftables"));
        assert_eq!(flags.conntrack_max_per_core, Some(0));
        assert_eq!(flags.v, Some(2));
    }

    #[test]
    fn lists_durations_and_gates() {
        let flags = parse(&[
            "--nodeport-addresses=192.0.2.0/24,2001:db8::/64",
            "--iptables-sync-period=1m30s",
            "--feature-gates=A=true,B=false",
            "--oom-score-adj=-500",
        ]);
        assert_eq!(
            flags.nodeport_addresses.unwrap(),
            vec!["192.0.2.0/24", "2001:db8::/64"]
        );
        assert_eq!(flags.iptables_sync_period, Some(GoDuration::from_secs(90)));
        let gates = flags.feature_gates.unwrap();
        assert_eq!(gates.get("A"), Some(&true));
        assert_eq!(gates.get("B"), Some(&false));
        assert_eq!(flags.oom_score_adj, Some(-500));
    }

    #[test]
    fn malformed_flag_values_fail_with_the_flag_named() {
        let err =
            Flags::parse_from_args(["kube-proxy", "--iptables-sync-period=soon"]).unwrap_err();
        assert!(err.to_string().contains("--iptables-sync-period"), "{err}");
        let err = Flags::parse_from_args(["kube-proxy", "--feature-gates=A=maybe"]).unwrap_err();
        assert!(err.to_string().contains("--feature-gates"), "{err}");
    }
}
