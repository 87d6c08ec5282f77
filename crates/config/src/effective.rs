//! From flags and an optional file to the effective configuration, as upstream's
//! `options.go` does it: defaults, then either flags or the file (plus logging flags and
//! `--hostname-override` on top), then platform defaults, then validation into typed settings.
//!
//! Upstream keeps a single internal sync period, minimum sync period and masqueradeAll, read
//! from the section of the active mode (`conversion.go`); converting back for
//! `--write-config-to` and `/configz` writes them into that section only and leaves the
//! others zero. [`EffectiveConfig::document`] reproduces exactly that.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;

use crate::duration::GoDuration;
use crate::flags::Flags;
use crate::v1alpha1::{self, KubeProxyConfiguration, QuantityString, VModuleItem};

/// The proxy modes upstream accepts on Linux.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyMode {
    Iptables,
    Ipvs,
    Nftables,
    /// The proxy relays each connection itself (upstream's v1.25 userspace proxier).
    Userspace,
}

impl ProxyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyMode::Iptables => "iptables",
            ProxyMode::Ipvs => "ipvs",
            ProxyMode::Nftables => "nftables",
            ProxyMode::Userspace => "userspace",
        }
    }
}

/// How "traffic from a local pod" is recognised (`detectLocalMode`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DetectLocal {
    /// Source address inside the cluster's pod CIDR(s) (at most one per family). An empty list
    /// means no detector at all, as upstream does when `clusterCIDR` is unset.
    ClusterCidr(Vec<IpNet>),
    /// Source address inside this Node's `spec.podCIDRs` (known once the Node is seen).
    NodeCidr,
    /// Packet arrived on this bridge interface.
    BridgeInterface(String),
    /// Packet arrived on an interface whose name starts with this prefix.
    InterfaceNamePrefix(String),
}

/// Which node addresses accept NodePort traffic (`nodePortAddresses`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// Every local address (upstream iptables' default: the list is unset).
    All,
    /// The node's primary IPs from the Node object (nftables' default).
    Primary,
    /// Local addresses inside these CIDRs. A family with no CIDR in the list accepts all of
    /// that family's addresses, as upstream does.
    Cidrs(Vec<IpNet>),
}

impl NodePortAddresses {
    /// The addresses of one IP family (`v6`) that accept NodePort traffic, given the node's
    /// IPs of that family (primary first) and every address on the host of that family;
    /// `None` means every local address. Loopback addresses are never selected.
    pub fn select(
        &self,
        v6: bool,
        node_ips: &[IpAddr],
        local_addresses: &[IpAddr],
    ) -> Option<Vec<IpAddr>> {
        match self {
            NodePortAddresses::All => None,
            NodePortAddresses::Primary => Some(
                node_ips
                    .iter()
                    .take(1)
                    .filter(|ip| !ip.is_loopback())
                    .copied()
                    .collect(),
            ),
            NodePortAddresses::Cidrs(cidrs) => {
                let cidrs: Vec<&IpNet> = cidrs
                    .iter()
                    .filter(|c| matches!(c, IpNet::V6(_)) == v6)
                    .collect();
                if cidrs.is_empty() || cidrs.iter().any(|c| c.prefix_len() == 0) {
                    // A family without any CIDR in the list accepts all its addresses (upstream).
                    return None;
                }
                let mut ips: Vec<IpAddr> = local_addresses
                    .iter()
                    .filter(|ip| !ip.is_loopback() && cidrs.iter().any(|c| c.contains(*ip)))
                    .copied()
                    .collect();
                ips.sort();
                ips.dedup();
                Some(ips)
            }
        }
    }
}

/// Conntrack sysctls to set at start (each `None` means "leave it alone").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConntrackSettings {
    pub max_per_core: i32,
    pub min: i32,
    pub tcp_established_timeout: Option<Duration>,
    pub tcp_close_wait_timeout: Option<Duration>,
    pub tcp_be_liberal: bool,
    pub udp_timeout: Option<Duration>,
    pub udp_stream_timeout: Option<Duration>,
}

/// Typed, validated settings that the rest of the program runs on.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub mode: ProxyMode,
    pub hostname_override: Option<String>,
    pub kubeconfig: Option<String>,
    pub master: Option<String>,
    pub qps: f32,
    pub burst: i32,
    pub content_type: String,
    pub sync_period: Duration,
    pub min_sync_period: Duration,
    pub config_sync_period: Duration,
    pub masquerade_all: bool,
    /// The mark bit of the active mode's section.
    pub masquerade_bit: u32,
    pub localhost_node_ports: bool,
    pub detect_local: DetectLocal,
    pub node_port_addresses: NodePortAddresses,
    /// `bindAddress` when it is not the unspecified address: the node's primary IP override.
    pub bind_address: Option<IpAddr>,
    pub healthz_bind_address: Option<SocketAddr>,
    pub metrics_bind_address: Option<SocketAddr>,
    pub bind_address_hard_fail: bool,
    pub enable_profiling: bool,
    pub oom_score_adj: i32,
    pub conntrack: ConntrackSettings,
    pub ipvs: IpvsSettings,
    pub userspace: UserspaceSettings,
    pub feature_gates: BTreeMap<String, bool>,
    pub verbosity: u32,
    pub logging_format: String,
}

/// ipvs mode's settings (`ipvs.*`), validated in ipvs mode only, as upstream.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct IpvsSettings {
    /// `ipvs.scheduler`, `rr` when empty.
    pub scheduler: String,
    /// `ipvs.excludeCIDRs`: virtual servers there are never deleted.
    pub exclude_cidrs: Vec<IpNet>,
    pub strict_arp: bool,
    /// IPVS connection timeouts; zero keeps the kernel's.
    pub tcp_timeout: Duration,
    pub tcp_fin_timeout: Duration,
    pub udp_timeout: Duration,
}

/// userspace mode's settings (`portRange`, `udpIdleTimeout`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserspaceSettings {
    /// `portRange`: the ports the proxy's listeners take (inclusive); `None`: any free port.
    pub port_range: Option<(u16, u16)>,
    /// `udpIdleTimeout`: a UDP client's relay closes after this long without a packet.
    pub udp_idle_timeout: Duration,
}

impl Default for UserspaceSettings {
    fn default() -> Self {
        UserspaceSettings {
            port_range: None,
            udp_idle_timeout: Duration::from_millis(250),
        }
    }
}

/// A `portRange` that does not parse.
#[derive(Debug, PartialEq, Eq)]
pub struct InvalidPortRange;

/// Upstream's `utilnet.ParsePortRange`: `""` (any port), `base-end`, `base+size` or one port;
/// ports 1-65535 and `base <= end`.
pub fn parse_port_range(text: &str) -> Result<Option<(u16, u16)>, InvalidPortRange> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let port = |s: &str| {
        s.trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or(InvalidPortRange)
    };
    let (base, end) = if let Some((a, b)) = text.split_once('-') {
        (port(a)?, port(b)?)
    } else if let Some((a, b)) = text.split_once('+') {
        let base = port(a)?;
        let size: u16 = b.trim().parse().map_err(|_| InvalidPortRange)?;
        (base, base.checked_add(size).ok_or(InvalidPortRange)?)
    } else {
        let p = port(text)?;
        (p, p)
    };
    if base > end {
        return Err(InvalidPortRange);
    }
    Ok(Some((base, end)))
}

/// The effective configuration: the v1alpha1 document (what `--write-config-to` and
/// `/configz` show) and the typed settings derived from it.
#[derive(Clone, Debug)]
pub struct EffectiveConfig {
    pub document: KubeProxyConfiguration,
    pub settings: ProxyConfig,
    /// Non-fatal findings to log at start (unknown fields, deprecated flags, unknown gates...).
    pub warnings: Vec<String>,
}

/// One invalid setting: which field, which value, and what is allowed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: invalid value {value:?}: {allowed}")]
pub struct FieldError {
    pub field: String,
    pub value: String,
    pub allowed: String,
}

/// Why the configuration could not be built. Every variant names the file or field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read config file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to decode config file {path}: {source}")]
    Decode {
        path: String,
        #[source]
        source: v1alpha1::DecodeError,
    },
    #[error("invalid configuration:\n{}", .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<FieldError>),
}

/// Builds the effective configuration from parsed flags and, with `--config`, the file's text
/// (read by the caller, so that this stays free of I/O).
pub fn build(flags: &Flags, file_text: Option<&str>) -> Result<EffectiveConfig, ConfigError> {
    let mut warnings = Vec::new();
    let config_path = flags
        .config
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();

    let mut doc = match file_text {
        Some(text) => {
            let decoded = v1alpha1::decode(text).map_err(|source| ConfigError::Decode {
                path: config_path.clone(),
                source,
            })?;
            for field in decoded.unknown_fields {
                warnings.push(format!(
                    "unknown field {field:?} in config file {config_path} was ignored"
                ));
            }
            let mut doc = decoded.config;
            doc.set_defaults();
            apply_logging_flags(&mut doc, flags);
            if let Some(name) = &flags.hostname_override {
                doc.hostname_override = name.clone();
            }
            doc
        }
        None => flag_document(flags, &mut warnings),
    };

    // Platform defaults (Linux), applied by upstream's Complete() before anything else.
    if doc.mode.is_empty() {
        doc.mode = "iptables".into();
    }
    if doc.detect_local_mode.is_empty() {
        doc.detect_local_mode = "ClusterCIDR".into();
    }
    if doc.mode == "nftables"
        && doc
            .node_port_addresses
            .as_ref()
            .is_none_or(|v| v.is_empty())
    {
        doc.node_port_addresses = Some(vec!["primary".into()]);
    }
    normalize_mode_sections(&mut doc);

    if doc.mode != "userspace" {
        if let Some(range) = &flags.proxy_port_range {
            warnings.push(format!(
                "--proxy-port-range={range} has no effect outside --proxy-mode userspace"
            ));
        }
    }
    if doc.mode == "iptables" && doc.node_port_addresses.is_none() {
        warnings.push(
            "nodePortAddresses is unset; NodePort connections will be accepted on all local IPs. \
             Consider using `--nodeport-addresses primary`"
                .into(),
        );
    }

    let settings = validate(&doc, flags)?;
    Ok(EffectiveConfig {
        document: doc,
        settings,
        warnings,
    })
}

/// The configuration in flag-only mode: defaults with every given flag applied.
fn flag_document(flags: &Flags, warnings: &mut Vec<String>) -> KubeProxyConfiguration {
    let mut doc = KubeProxyConfiguration::defaulted();
    macro_rules! set {
        ($flag:ident => $($field:tt)+) => {
            if let Some(value) = &flags.$flag {
                doc.$($field)+ = value.clone().into();
            }
        };
    }
    set!(kubeconfig => client_connection.kubeconfig);
    set!(kube_api_content_type => client_connection.content_type);
    set!(kube_api_qps => client_connection.qps);
    set!(kube_api_burst => client_connection.burst);
    set!(config_sync_period => config_sync_period);
    set!(hostname_override => hostname_override);
    set!(feature_gates => feature_gates);
    set!(bind_address => bind_address);
    set!(healthz_bind_address => healthz_bind_address);
    set!(metrics_bind_address => metrics_bind_address);
    set!(bind_address_hard_fail => bind_address_hard_fail);
    set!(profiling => enable_profiling);
    set!(show_hidden_metrics_for_version => show_hidden_metrics_for_version);
    set!(proxy_mode => mode);
    set!(ipvs_scheduler => ipvs.scheduler);
    set!(ipvs_strict_arp => ipvs.strict_arp);
    set!(ipvs_tcp_timeout => ipvs.tcp_timeout);
    set!(ipvs_tcpfin_timeout => ipvs.tcp_fin_timeout);
    set!(ipvs_udp_timeout => ipvs.udp_timeout);
    set!(detect_local_mode => detect_local_mode);
    set!(cluster_cidr => cluster_cidr);
    set!(pod_bridge_interface => detect_local.bridge_interface);
    set!(pod_interface_name_prefix => detect_local.interface_name_prefix);
    set!(conntrack_tcp_be_liberal => conntrack.tcp_be_liberal);
    set!(conntrack_udp_timeout => conntrack.udp_timeout);
    set!(proxy_port_range => port_range);
    if let Some(timeout) = flags.udp_timeout {
        doc.udp_idle_timeout = Some(timeout);
    }
    set!(conntrack_udp_timeout_stream => conntrack.udp_stream_timeout);
    set!(windows_service => windows_run_as_service);
    if let Some(v) = flags.iptables_masquerade_bit {
        doc.iptables.masquerade_bit = Some(v);
    }
    if let Some(v) = flags.iptables_localhost_nodeports {
        doc.iptables.localhost_node_ports = Some(v);
    }
    if let Some(v) = &flags.ipvs_exclude_cidrs {
        doc.ipvs.exclude_cidrs = Some(v.clone());
    }
    if let Some(v) = &flags.nodeport_addresses {
        doc.node_port_addresses = Some(v.iter().filter(|s| !s.is_empty()).cloned().collect());
    }
    if let Some(v) = flags.oom_score_adj {
        doc.oom_score_adj = Some(v);
    }
    if let Some(v) = flags.conntrack_max_per_core {
        doc.conntrack.max_per_core = Some(v);
    }
    if let Some(v) = flags.conntrack_min {
        doc.conntrack.min = Some(v);
    }
    if let Some(v) = flags.conntrack_tcp_timeout_established {
        doc.conntrack.tcp_established_timeout = Some(v);
    }
    if let Some(v) = flags.conntrack_tcp_timeout_close_wait {
        doc.conntrack.tcp_close_wait_timeout = Some(v);
    }

    // There are no nftables flags upstream: the iptables sync flags (ipvs flags in ipvs mode)
    // and --masquerade-all feed the single internal values every mode uses.
    let ipvs = doc.mode == "ipvs";
    let (sync, min_sync) = if ipvs {
        (
            flags.ipvs_sync_period.unwrap_or(GoDuration::from_secs(30)),
            flags.ipvs_min_sync_period.unwrap_or(GoDuration::ZERO),
        )
    } else {
        (
            flags
                .iptables_sync_period
                .unwrap_or(GoDuration::from_secs(30)),
            flags
                .iptables_min_sync_period
                .unwrap_or(GoDuration::from_secs(1)),
        )
    };
    let masquerade_all = flags.masquerade_all.unwrap_or(false);
    set_mode_section(&mut doc, sync, min_sync, masquerade_all);

    // Deprecated port flags only apply in pure flag mode, as upstream.
    if flags.write_config_to.is_none() {
        if let Some(port) = flags.healthz_port {
            warnings.push("--healthz-port is deprecated; use --healthz-bind-address".into());
            doc.healthz_bind_address = replace_port(&doc.healthz_bind_address, port);
        }
        if let Some(port) = flags.metrics_port {
            warnings.push("--metrics-port is deprecated; use --metrics-bind-address".into());
            doc.metrics_bind_address = replace_port(&doc.metrics_bind_address, port);
        }
    }
    // An IPv6 --bind-address moves the default listeners to IPv6, as defaulting does.
    if flags.bind_address.is_some() {
        let mut probe = KubeProxyConfiguration {
            bind_address: doc.bind_address.clone(),
            ..Default::default()
        };
        probe.set_defaults();
        if flags.healthz_bind_address.is_none() && flags.healthz_port.is_none() {
            doc.healthz_bind_address = probe.healthz_bind_address;
        }
        if flags.metrics_bind_address.is_none() && flags.metrics_port.is_none() {
            doc.metrics_bind_address = probe.metrics_bind_address;
        }
    }
    apply_logging_flags(&mut doc, flags);
    doc
}

fn replace_port(address: &str, port: u16) -> String {
    match address.rsplit_once(':') {
        Some((host, _)) => format!("{host}:{port}"),
        None => format!("{address}:{port}"),
    }
}

/// Logging flags win over the file, as upstream merges them on top.
fn apply_logging_flags(doc: &mut KubeProxyConfiguration, flags: &Flags) {
    if let Some(v) = flags.v {
        doc.logging.verbosity = v;
    }
    if let Some(format) = &flags.logging_format {
        doc.logging.format = format.clone();
    }
    if let Some(d) = flags.log_flush_frequency {
        doc.logging.flush_frequency = d;
    }
    if let Some(spec) = &flags.vmodule {
        doc.logging.vmodule = spec
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|item| {
                let (pattern, level) = item.split_once('=').unwrap_or((item, "0"));
                VModuleItem {
                    file_pattern: pattern.to_string(),
                    verbosity: level.parse().unwrap_or(0),
                }
            })
            .collect();
    }
    if let Some(size) = &flags.log_json_info_buffer_size {
        doc.logging.options.json.info_buffer_size = QuantityString(size.clone());
    }
    if let Some(split) = flags.log_json_split_stream {
        doc.logging.options.json.split_stream = split;
    }
    if let Some(size) = &flags.log_text_info_buffer_size {
        doc.logging.options.text.info_buffer_size = QuantityString(size.clone());
    }
    if let Some(split) = flags.log_text_split_stream {
        doc.logging.options.text.split_stream = split;
    }
}

/// The (syncPeriod, minSyncPeriod, masqueradeAll) that the active mode reads.
fn mode_values(doc: &KubeProxyConfiguration) -> (GoDuration, GoDuration, bool) {
    match doc.mode.as_str() {
        "ipvs" => (
            doc.ipvs.sync_period,
            doc.ipvs.min_sync_period,
            doc.iptables.masquerade_all,
        ),
        "nftables" => (
            doc.nftables.sync_period,
            doc.nftables.min_sync_period,
            doc.nftables.masquerade_all,
        ),
        _ => (
            doc.iptables.sync_period,
            doc.iptables.min_sync_period,
            doc.iptables.masquerade_all,
        ),
    }
}

/// Writes the single internal values into the active mode's section and zeroes them
/// elsewhere: upstream's v1alpha1 → internal → v1alpha1 round trip.
fn normalize_mode_sections(doc: &mut KubeProxyConfiguration) {
    let (sync, min_sync, masquerade_all) = mode_values(doc);
    set_mode_section(doc, sync, min_sync, masquerade_all);
}

fn set_mode_section(
    doc: &mut KubeProxyConfiguration,
    sync: GoDuration,
    min_sync: GoDuration,
    masquerade_all: bool,
) {
    doc.iptables.sync_period = GoDuration::ZERO;
    doc.iptables.min_sync_period = GoDuration::ZERO;
    doc.iptables.masquerade_all = false;
    doc.ipvs.sync_period = GoDuration::ZERO;
    doc.ipvs.min_sync_period = GoDuration::ZERO;
    doc.nftables.sync_period = GoDuration::ZERO;
    doc.nftables.min_sync_period = GoDuration::ZERO;
    doc.nftables.masquerade_all = false;
    match doc.mode.as_str() {
        "ipvs" => {
            doc.ipvs.sync_period = sync;
            doc.ipvs.min_sync_period = min_sync;
            doc.iptables.masquerade_all = masquerade_all;
        }
        "nftables" => {
            doc.nftables.sync_period = sync;
            doc.nftables.min_sync_period = min_sync;
            doc.nftables.masquerade_all = masquerade_all;
        }
        _ => {
            doc.iptables.sync_period = sync;
            doc.iptables.min_sync_period = min_sync;
            doc.iptables.masquerade_all = masquerade_all;
        }
    }
}

/// Upstream's validation.go, with every error naming the field, the value and what is allowed.
fn validate(doc: &KubeProxyConfiguration, flags: &Flags) -> Result<ProxyConfig, ConfigError> {
    let mut errors = Vec::new();
    let mut fail = |field: &str, value: &dyn std::fmt::Display, allowed: &str| {
        errors.push(FieldError {
            field: field.to_string(),
            value: value.to_string(),
            allowed: allowed.to_string(),
        });
    };

    let mode = match doc.mode.as_str() {
        "iptables" => ProxyMode::Iptables,
        "ipvs" => ProxyMode::Ipvs,
        "nftables" => ProxyMode::Nftables,
        "userspace" => ProxyMode::Userspace,
        other => {
            fail(
                "mode",
                &other,
                "must be one of \"iptables\", \"ipvs\", \"nftables\", \"userspace\" (Linux)",
            );
            ProxyMode::Iptables
        }
    };
    let section = mode.as_str();
    let (sync, min_sync, masquerade_all) = mode_values(doc);
    if sync.as_nanos() <= 0 {
        fail(
            &format!("{section}.syncPeriod"),
            &sync,
            "must be greater than 0",
        );
    }
    if min_sync.is_negative() {
        fail(
            &format!("{section}.minSyncPeriod"),
            &min_sync,
            "must be greater than or equal to 0",
        );
    } else if min_sync > sync && sync.as_nanos() > 0 {
        fail(
            &format!("{section}.minSyncPeriod"),
            &min_sync,
            &format!("must be less than or equal to {section}.syncPeriod ({sync})"),
        );
    }
    let masquerade_bit = match mode {
        ProxyMode::Nftables => ("nftables.masqueradeBit", doc.nftables.masquerade_bit),
        _ => ("iptables.masqueradeBit", doc.iptables.masquerade_bit),
    };
    for (field, bit) in [
        ("iptables.masqueradeBit", doc.iptables.masquerade_bit),
        ("nftables.masqueradeBit", doc.nftables.masquerade_bit),
    ] {
        if let Some(bit) = bit {
            if !(0..=31).contains(&bit) {
                fail(field, &bit, "must be in the range [0, 31]");
            }
        }
    }
    if doc.config_sync_period.as_nanos() <= 0 {
        fail(
            "configSyncPeriod",
            &doc.config_sync_period,
            "must be greater than 0",
        );
    }
    let oom_score_adj = doc.oom_score_adj.unwrap_or(-999);
    if !(-1000..=1000).contains(&oom_score_adj) {
        fail(
            "oomScoreAdj",
            &oom_score_adj,
            "must be within the range [-1000, 1000]",
        );
    }
    if doc.client_connection.qps < 0.0 {
        fail(
            "clientConnection.qps",
            &doc.client_connection.qps,
            "must be greater than or equal to 0",
        );
    }
    if doc.client_connection.burst < 0 {
        fail(
            "clientConnection.burst",
            &doc.client_connection.burst,
            "must be greater than or equal to 0",
        );
    }

    let bind_address = match doc.bind_address.parse::<IpAddr>() {
        Ok(ip) if ip.is_unspecified() => None,
        Ok(ip) => Some(ip),
        Err(_) => {
            fail(
                "bindAddress",
                &doc.bind_address,
                "must be a valid IP address",
            );
            None
        }
    };
    let mut listener = |field: &str, value: &str| -> Option<SocketAddr> {
        if value.is_empty() {
            return None; // disabled
        }
        match value.parse::<SocketAddr>() {
            Ok(addr) if addr.port() != 0 => Some(addr),
            _ => {
                fail(
                    field,
                    &value,
                    "must be IP:port with a port in [1, 65535], e.g. 0.0.0.0:10256 or [::]:10256",
                );
                None
            }
        }
    };
    let healthz_bind_address = listener("healthzBindAddress", &doc.healthz_bind_address);
    let metrics_bind_address = listener("metricsBindAddress", &doc.metrics_bind_address);

    // Conntrack.
    let conntrack = &doc.conntrack;
    let max_per_core = conntrack.max_per_core.unwrap_or(32768);
    let min = conntrack.min.unwrap_or(131072);
    if max_per_core < 0 {
        fail(
            "conntrack.maxPerCore",
            &max_per_core,
            "must be greater than or equal to 0",
        );
    }
    if min < 0 {
        fail("conntrack.min", &min, "must be greater than or equal to 0");
    }
    let mut timeout = |field: &str, d: GoDuration| -> Option<Duration> {
        if d.is_negative() {
            fail(field, &d, "must be greater than or equal to 0");
            None
        } else if d.is_zero() {
            None
        } else {
            Some(d.to_std())
        }
    };
    let conntrack = ConntrackSettings {
        max_per_core,
        min,
        tcp_established_timeout: timeout(
            "conntrack.tcpEstablishedTimeout",
            conntrack.tcp_established_timeout.unwrap_or_default(),
        ),
        tcp_close_wait_timeout: timeout(
            "conntrack.tcpCloseWaitTimeout",
            conntrack.tcp_close_wait_timeout.unwrap_or_default(),
        ),
        tcp_be_liberal: conntrack.tcp_be_liberal,
        udp_timeout: timeout("conntrack.udpTimeout", conntrack.udp_timeout),
        udp_stream_timeout: timeout("conntrack.udpStreamTimeout", conntrack.udp_stream_timeout),
    };

    // userspace mode's listeners (upstream v1.25's validation of portRange and udpIdleTimeout).
    let port_range = match parse_port_range(&doc.port_range) {
        Ok(range) => range,
        Err(InvalidPortRange) => {
            fail(
                "portRange",
                &doc.port_range,
                "must be empty (any free port), a port, \"begin-end\" or \"begin+size\" within 1-65535",
            );
            None
        }
    };
    let udp_idle_timeout = doc.udp_idle_timeout.unwrap_or(GoDuration::from_millis(250));
    if udp_idle_timeout.as_nanos() <= 0 {
        fail(
            "udpIdleTimeout",
            &udp_idle_timeout,
            "must be greater than 0",
        );
    }
    let userspace = UserspaceSettings {
        port_range,
        udp_idle_timeout: udp_idle_timeout.to_std(),
    };

    // IPVS settings are validated only in ipvs mode, as upstream.
    if mode == ProxyMode::Ipvs {
        const SCHEDULERS: &[&str] = &[
            "", "rr", "wrr", "lc", "wlc", "lblc", "lblcr", "sh", "dh", "sed", "nq", "mh",
        ];
        if !SCHEDULERS.contains(&doc.ipvs.scheduler.as_str()) {
            fail(
                "ipvs.scheduler",
                &doc.ipvs.scheduler,
                "must be one of rr, wrr, lc, wlc, lblc, lblcr, sh, dh, sed, nq, mh",
            );
        }
        for cidr in doc.ipvs.exclude_cidrs.iter().flatten() {
            if cidr.parse::<IpNet>().is_err() {
                fail(
                    "ipvs.excludeCIDRs",
                    cidr,
                    "must be a valid CIDR, e.g. 10.0.0.0/8",
                );
            }
        }
        for (field, d) in [
            ("ipvs.tcpTimeout", doc.ipvs.tcp_timeout),
            ("ipvs.tcpFinTimeout", doc.ipvs.tcp_fin_timeout),
            ("ipvs.udpTimeout", doc.ipvs.udp_timeout),
        ] {
            if d.is_negative() {
                fail(field, &d, "must be greater than or equal to 0");
            }
        }
    }

    // Local traffic detection.
    let cluster_cidrs: Vec<IpNet> = parse_cluster_cidrs(&doc.cluster_cidr, &mut fail);
    let detect_local = match doc.detect_local_mode.as_str() {
        "ClusterCIDR" => DetectLocal::ClusterCidr(cluster_cidrs),
        "NodeCIDR" => DetectLocal::NodeCidr,
        "BridgeInterface" => {
            if doc.detect_local.bridge_interface.is_empty() {
                fail(
                    "detectLocal.bridgeInterface",
                    &"",
                    "must be set (e.g. cbr0) when detectLocalMode is BridgeInterface",
                );
            }
            DetectLocal::BridgeInterface(doc.detect_local.bridge_interface.clone())
        }
        "InterfaceNamePrefix" => {
            if doc.detect_local.interface_name_prefix.is_empty() {
                fail(
                    "detectLocal.interfaceNamePrefix",
                    &"",
                    "must be set (e.g. veth) when detectLocalMode is InterfaceNamePrefix",
                );
            }
            DetectLocal::InterfaceNamePrefix(doc.detect_local.interface_name_prefix.clone())
        }
        other => {
            fail(
                "detectLocalMode",
                &other,
                "must be one of ClusterCIDR, NodeCIDR, BridgeInterface, InterfaceNamePrefix",
            );
            DetectLocal::ClusterCidr(Vec::new())
        }
    };

    // NodePort addresses.
    let node_port_addresses = match doc.node_port_addresses.as_deref() {
        None | Some([]) => NodePortAddresses::All,
        Some([only]) if only == "primary" => NodePortAddresses::Primary,
        Some(list) => {
            let mut cidrs = Vec::new();
            for entry in list {
                if entry == "primary" {
                    fail(
                        "nodePortAddresses",
                        entry,
                        "\"primary\" must be the only entry of the list",
                    );
                    continue;
                }
                match entry.trim().parse::<IpNet>() {
                    Ok(net) => cidrs.push(net.trunc()),
                    Err(_) => fail(
                        "nodePortAddresses",
                        entry,
                        "must be a CIDR such as 192.0.2.0/24, or the single keyword \"primary\"",
                    ),
                }
            }
            NodePortAddresses::Cidrs(cidrs)
        }
    };

    let logging_format = doc.logging.format.clone();
    if !["text", "json"].contains(&logging_format.as_str()) {
        fail(
            "logging.format",
            &logging_format,
            "must be \"text\" or \"json\"",
        );
    }
    if !doc.show_hidden_metrics_for_version.is_empty() {
        let v = &doc.show_hidden_metrics_for_version;
        let ok = v
            .split_once('.')
            .is_some_and(|(a, b)| a.parse::<u32>().is_ok() && b.parse::<u32>().is_ok());
        if !ok {
            fail(
                "showHiddenMetricsForVersion",
                v,
                "must be a previous minor version such as 1.35",
            );
        }
    }
    for name in doc.feature_gates.keys() {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric()) {
            fail(
                "featureGates",
                name,
                "feature gate names are alphanumeric, e.g. MultiCIDRServiceAllocator",
            );
        }
    }

    if !errors.is_empty() {
        return Err(ConfigError::Invalid(errors));
    }
    Ok(ProxyConfig {
        mode,
        hostname_override: Some(doc.hostname_override.trim().to_lowercase())
            .filter(|s| !s.is_empty()),
        kubeconfig: Some(doc.client_connection.kubeconfig.clone()).filter(|s| !s.is_empty()),
        master: flags.master.clone().filter(|s| !s.is_empty()),
        qps: doc.client_connection.qps,
        burst: doc.client_connection.burst,
        content_type: doc.client_connection.content_type.clone(),
        sync_period: sync.to_std(),
        min_sync_period: min_sync.to_std(),
        config_sync_period: doc.config_sync_period.to_std(),
        masquerade_all,
        masquerade_bit: masquerade_bit.1.unwrap_or(14) as u32,
        localhost_node_ports: doc.iptables.localhost_node_ports.unwrap_or(true),
        detect_local,
        node_port_addresses,
        bind_address,
        healthz_bind_address,
        metrics_bind_address,
        bind_address_hard_fail: doc.bind_address_hard_fail,
        enable_profiling: doc.enable_profiling,
        oom_score_adj,
        conntrack,
        userspace,
        ipvs: IpvsSettings {
            scheduler: match doc.ipvs.scheduler.as_str() {
                "" => "rr".to_string(),
                other => other.to_string(),
            },
            exclude_cidrs: doc
                .ipvs
                .exclude_cidrs
                .iter()
                .flatten()
                .filter_map(|c| c.parse().ok())
                .collect(),
            strict_arp: doc.ipvs.strict_arp,
            tcp_timeout: doc.ipvs.tcp_timeout.max(GoDuration::ZERO).to_std(),
            tcp_fin_timeout: doc.ipvs.tcp_fin_timeout.max(GoDuration::ZERO).to_std(),
            udp_timeout: doc.ipvs.udp_timeout.max(GoDuration::ZERO).to_std(),
        },
        feature_gates: doc.feature_gates.clone(),
        verbosity: doc.logging.verbosity,
        logging_format,
    })
}

/// `clusterCIDR`: comma-separated, valid CIDRs, at most one per family.
fn parse_cluster_cidrs(
    text: &str,
    fail: &mut impl FnMut(&str, &dyn std::fmt::Display, &str),
) -> Vec<IpNet> {
    let mut cidrs: Vec<IpNet> = Vec::new();
    for entry in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match entry.parse::<IpNet>() {
            Ok(net) => cidrs.push(net.trunc()),
            Err(_) => fail(
                "clusterCIDR",
                &entry,
                "must be a CIDR such as 198.18.0.0/16, or a comma-separated IPv4,IPv6 pair",
            ),
        }
    }
    let v4 = cidrs.iter().filter(|c| matches!(c, IpNet::V4(_))).count();
    let v6 = cidrs.len() - v4;
    if v4 > 1 || v6 > 1 {
        fail(
            "clusterCIDR",
            &text,
            "at most one CIDR per IP family is allowed",
        );
    }
    cidrs
}

#[cfg(test)]
mod tests;
