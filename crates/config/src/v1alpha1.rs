//! `kubeproxy.config.k8s.io/v1alpha1` `KubeProxyConfiguration`: the wire type, its defaults,
//! decoding (lenient, as upstream's v1alpha1 retry) and encoding (byte-compatible with
//! upstream's `--write-config-to`).
//!
//! Field names, nesting, `null`-ness and defaults follow the upstream staging type
//! `k8s.io/kube-proxy/config/v1alpha1` and `pkg/proxy/apis/config/v1alpha1/defaults.go`.
//! Pointer fields in Go are `Option` here, so that "unset" and "zero" stay distinct exactly
//! where upstream distinguishes them (`masqueradeBit`, `oomScoreAdj`, conntrack limits...).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::duration::GoDuration;
use crate::yaml;

pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
pub const KIND: &str = "KubeProxyConfiguration";

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct KubeProxyConfiguration {
    pub api_version: String,
    pub kind: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub feature_gates: BTreeMap<String, bool>,
    pub bind_address: String,
    pub healthz_bind_address: String,
    pub metrics_bind_address: String,
    pub bind_address_hard_fail: bool,
    pub enable_profiling: bool,
    pub show_hidden_metrics_for_version: String,
    pub client_connection: ClientConnection,
    pub hostname_override: String,
    pub logging: Logging,
    pub iptables: IptablesSection,
    pub ipvs: IpvsSection,
    pub nftables: NftablesSection,
    pub winkernel: WinkernelSection,
    pub detect_local_mode: String,
    pub detect_local: DetectLocal,
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: String,
    pub node_port_addresses: Option<Vec<String>>,
    pub oom_score_adj: Option<i32>,
    pub conntrack: Conntrack,
    pub config_sync_period: GoDuration,
    pub port_range: String,
    /// userspace mode's UDP idle timeout (upstream v1.25's field; default 250ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp_idle_timeout: Option<GoDuration>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub windows_run_as_service: bool,
    pub mode: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ClientConnection {
    pub kubeconfig: String,
    pub accept_content_types: String,
    pub content_type: String,
    #[serde(rename = "qps")]
    pub qps: f32,
    pub burst: i32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Logging {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub format: String,
    pub flush_frequency: GoDuration,
    pub verbosity: u32,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub vmodule: Vec<VModuleItem>,
    pub options: LoggingOptions,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct VModuleItem {
    pub file_pattern: String,
    pub verbosity: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LoggingOptions {
    pub text: OutputRouting,
    pub json: OutputRouting,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct OutputRouting {
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub split_stream: bool,
    /// A Kubernetes quantity; upstream always writes it quoted (`"0"`).
    pub info_buffer_size: QuantityString,
}

/// A `resource.Quantity` kept as its string form; accepts a YAML number or string.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(transparent)]
pub struct QuantityString(pub String);

impl Default for QuantityString {
    fn default() -> Self {
        QuantityString("0".into())
    }
}

impl<'de> Deserialize<'de> for QuantityString {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        match value {
            serde_json::Value::String(s) => Ok(QuantityString(s)),
            serde_json::Value::Number(n) => Ok(QuantityString(n.to_string())),
            other => Err(serde::de::Error::custom(format!(
                "expected a quantity such as \"0\" or \"64Ki\", got {other}"
            ))),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct IptablesSection {
    pub masquerade_bit: Option<i32>,
    pub masquerade_all: bool,
    pub localhost_node_ports: Option<bool>,
    pub sync_period: GoDuration,
    pub min_sync_period: GoDuration,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct IpvsSection {
    pub sync_period: GoDuration,
    pub min_sync_period: GoDuration,
    pub scheduler: String,
    #[serde(rename = "excludeCIDRs")]
    pub exclude_cidrs: Option<Vec<String>>,
    #[serde(rename = "strictARP")]
    pub strict_arp: bool,
    pub tcp_timeout: GoDuration,
    pub tcp_fin_timeout: GoDuration,
    pub udp_timeout: GoDuration,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NftablesSection {
    pub masquerade_bit: Option<i32>,
    pub masquerade_all: bool,
    pub sync_period: GoDuration,
    pub min_sync_period: GoDuration,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct WinkernelSection {
    pub network_name: String,
    pub source_vip: String,
    #[serde(rename = "enableDSR")]
    pub enable_dsr: bool,
    pub root_hns_endpoint_name: String,
    pub forward_health_check_vip: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DetectLocal {
    pub bridge_interface: String,
    pub interface_name_prefix: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Conntrack {
    pub max_per_core: Option<i32>,
    pub min: Option<i32>,
    pub tcp_established_timeout: Option<GoDuration>,
    pub tcp_close_wait_timeout: Option<GoDuration>,
    pub tcp_be_liberal: bool,
    pub udp_timeout: GoDuration,
    pub udp_stream_timeout: GoDuration,
}

impl KubeProxyConfiguration {
    /// Upstream's `SetDefaults_KubeProxyConfiguration` plus the component-base logging
    /// defaults: fills only what is unset, so explicit values (including explicit zeros in
    /// pointer fields) survive.
    pub fn set_defaults(&mut self) {
        if self.api_version.is_empty() {
            self.api_version = API_VERSION.into();
        }
        if self.kind.is_empty() {
            self.kind = KIND.into();
        }
        if self.bind_address.is_empty() {
            self.bind_address = "0.0.0.0".into();
        }
        let ipv6_bind = self
            .bind_address
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_ipv6())
            .unwrap_or(false);
        let (healthz_host, metrics_host) = if ipv6_bind {
            ("[::]", "[::1]")
        } else {
            ("0.0.0.0", "127.0.0.1")
        };
        if self.healthz_bind_address.is_empty() {
            self.healthz_bind_address = format!("{healthz_host}:10256");
        } else {
            self.healthz_bind_address = append_port_if_needed(&self.healthz_bind_address, 10256);
        }
        if self.metrics_bind_address.is_empty() {
            self.metrics_bind_address = format!("{metrics_host}:10249");
        } else {
            self.metrics_bind_address = append_port_if_needed(&self.metrics_bind_address, 10249);
        }
        self.oom_score_adj.get_or_insert(-999);
        default_duration(&mut self.iptables.sync_period, GoDuration::from_secs(30));
        default_duration(&mut self.iptables.min_sync_period, GoDuration::from_secs(1));
        self.iptables.masquerade_bit.get_or_insert(14);
        self.iptables.localhost_node_ports.get_or_insert(true);
        default_duration(&mut self.ipvs.sync_period, GoDuration::from_secs(30));
        default_duration(&mut self.nftables.sync_period, GoDuration::from_secs(30));
        default_duration(&mut self.nftables.min_sync_period, GoDuration::from_secs(1));
        self.nftables.masquerade_bit.get_or_insert(14);
        self.conntrack.max_per_core.get_or_insert(32 * 1024);
        self.conntrack.min.get_or_insert(128 * 1024);
        self.conntrack
            .tcp_established_timeout
            .get_or_insert(GoDuration::from_hours(24));
        self.conntrack
            .tcp_close_wait_timeout
            .get_or_insert(GoDuration::from_hours(1));
        default_duration(&mut self.config_sync_period, GoDuration::from_mins(15));
        if self.client_connection.content_type.is_empty() {
            self.client_connection.content_type = "application/vnd.kubernetes.protobuf".into();
        }
        if self.client_connection.qps == 0.0 {
            self.client_connection.qps = 5.0;
        }
        if self.client_connection.burst == 0 {
            self.client_connection.burst = 10;
        }
        // component-base LoggingConfiguration defaults.
        if self.logging.format.is_empty() {
            self.logging.format = "text".into();
        }
        default_duration(&mut self.logging.flush_frequency, GoDuration::from_secs(5));
    }

    /// A fully defaulted configuration, as upstream starts from before flags are applied.
    pub fn defaulted() -> Self {
        let mut config = KubeProxyConfiguration::default();
        config.set_defaults();
        config
    }

    /// The document `--write-config-to` writes: JSON with sorted keys turned into YAML, which
    /// is what upstream's `sigs.k8s.io/yaml` encoder produces.
    pub fn to_yaml(&self) -> String {
        let value = serde_json::to_value(self).expect("configuration always serializes");
        yaml::emit(&value)
    }
}

fn default_duration(field: &mut GoDuration, default: GoDuration) {
    if field.is_zero() {
        *field = default;
    }
}

/// Upstream's `proxyutil.AppendPortIfNeeded`: a bare IP gets the default port.
fn append_port_if_needed(address: &str, port: u16) -> String {
    if address.parse::<std::net::SocketAddr>().is_ok() {
        return address.to_string();
    }
    match address.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(ip)) => format!("{ip}:{port}"),
        Ok(std::net::IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
        Err(_) => address.to_string(),
    }
}

/// A decoded configuration file, with the unknown fields it contained (named, not fatal).
#[derive(Debug)]
pub struct Decoded {
    pub config: KubeProxyConfiguration,
    pub unknown_fields: Vec<String>,
}

/// Why a configuration file could not be decoded. The message names the field path and the
/// offending value where the decoder knows them.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not valid YAML or JSON: {0}")]
    Syntax(String),
    #[error("field {path}: {message}")]
    Field { path: String, message: String },
    #[error("apiVersion {found:?} is not supported; use {API_VERSION:?}")]
    ApiVersion { found: String },
    #[error("kind {found:?} is not supported; use {KIND:?}")]
    Kind { found: String },
}

/// Decodes a `KubeProxyConfiguration` from YAML or JSON text. Unknown fields are tolerated and
/// reported (as upstream's lenient v1alpha1 decoding does), so files written for newer
/// versions keep working. Defaults are not applied here.
pub fn decode(text: &str) -> Result<Decoded, DecodeError> {
    // YAML 1.2 booleans only, so that a string field such as `hostnameOverride: n` stays a
    // string; a YAML 1.1 `yes` in a boolean field is reported with its field name.
    let mut options = serde_saphyr::Options::default();
    options.strict_booleans = true;
    let value: serde_json::Value = serde_saphyr::from_str_with_options(text, options)
        .map_err(|e| DecodeError::Syntax(e.to_string()))?;
    let value = match value {
        serde_json::Value::Null => serde_json::Value::Object(Default::default()),
        other => other,
    };
    if !value.is_object() {
        return Err(DecodeError::Syntax(
            "the document must be a mapping of KubeProxyConfiguration fields".into(),
        ));
    }
    let mut unknown_fields = Vec::new();
    let mut on_ignored = |path: serde_ignored::Path| unknown_fields.push(path.to_string());
    let ignored = serde_ignored::Deserializer::new(&value, &mut on_ignored);
    let config: KubeProxyConfiguration =
        serde_path_to_error::deserialize(ignored).map_err(|e| DecodeError::Field {
            path: e.path().to_string(),
            message: e.inner().to_string(),
        })?;
    if !config.api_version.is_empty() && config.api_version != API_VERSION {
        return Err(DecodeError::ApiVersion {
            found: config.api_version,
        });
    }
    if !config.kind.is_empty() && config.kind != KIND {
        return Err(DecodeError::Kind { found: config.kind });
    }
    Ok(Decoded {
        config,
        unknown_fields,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Upstream's golden defaulted document for the current field set
    /// (pkg/proxy/apis/config/scheme/testdata/KubeProxyConfiguration/after/v1alpha1.yaml),
    /// with the sections the current defaults.go fills.
    const DEFAULTED: &str = r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
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
detectLocalMode: ""
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
  syncPeriod: 30s
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
mode: ""
nftables:
  masqueradeAll: false
  masqueradeBit: 14
  minSyncPeriod: 1s
  syncPeriod: 30s
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
    fn defaults_equal_upstream_golden_document() {
        assert_eq!(KubeProxyConfiguration::defaulted().to_yaml(), DEFAULTED);
    }

    #[test]
    fn golden_document_round_trips() {
        let decoded = decode(DEFAULTED).unwrap();
        assert!(
            decoded.unknown_fields.is_empty(),
            "{:?}",
            decoded.unknown_fields
        );
        assert_eq!(decoded.config.to_yaml(), DEFAULTED);
    }

    #[test]
    fn explicit_zero_pointer_fields_survive_defaulting() {
        let mut config = decode("conntrack:\n  maxPerCore: 0\n  min: 0\noomScoreAdj: 0\niptables:\n  masqueradeBit: 0\n")
            .unwrap()
            .config;
        config.set_defaults();
        assert_eq!(config.conntrack.max_per_core, Some(0));
        assert_eq!(config.conntrack.min, Some(0));
        assert_eq!(config.oom_score_adj, Some(0));
        assert_eq!(config.iptables.masquerade_bit, Some(0));
    }

    #[test]
    fn ipv6_bind_address_moves_default_listeners() {
        let mut config = decode("bindAddress: \"::\"\n").unwrap().config;
        config.set_defaults();
        assert_eq!(config.healthz_bind_address, "[::]:10256");
        assert_eq!(config.metrics_bind_address, "[::1]:10249");
    }

    #[test]
    fn bare_ip_listener_gets_default_port() {
        let mut config = decode("healthzBindAddress: 127.0.0.1\nmetricsBindAddress: \"::1\"\n")
            .unwrap()
            .config;
        config.set_defaults();
        assert_eq!(config.healthz_bind_address, "127.0.0.1:10256");
        assert_eq!(config.metrics_bind_address, "[::1]:10249");
    }

    #[test]
    fn unknown_fields_are_named_not_fatal() {
        let decoded =
            decode("mode: nftables\nfutureField: 1\nnftables:\n  someNewKnob: true\n").unwrap();
        assert_eq!(decoded.config.mode, "nftables");
        assert_eq!(
            decoded.unknown_fields,
            vec!["futureField", "nftables.someNewKnob"]
        );
    }

    #[test]
    fn json_documents_decode() {
        let decoded = decode(r#"{"apiVersion":"kubeproxy.config.k8s.io/v1alpha1","kind":"KubeProxyConfiguration","mode":"nftables","conntrack":{"maxPerCore":0}}"#).unwrap();
        assert_eq!(decoded.config.mode, "nftables");
        assert_eq!(decoded.config.conntrack.max_per_core, Some(0));
    }

    #[test]
    fn malformed_value_names_the_field_and_value() {
        let err = decode("iptables:\n  syncPeriod: 30x\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("iptables.syncPeriod"), "{err}");
        assert!(err.contains("30x"), "{err}");
        let err = decode("conntrack:\n  maxPerCore: lots\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("conntrack.maxPerCore"), "{err}");
    }

    #[test]
    fn wrong_kind_or_version_is_refused() {
        assert!(matches!(
            decode("apiVersion: kubeproxy.config.k8s.io/v1alpha2\n"),
            Err(DecodeError::ApiVersion { .. })
        ));
        assert!(matches!(
            decode("kind: KubeletConfiguration\n"),
            Err(DecodeError::Kind { .. })
        ));
    }

    #[test]
    fn yaml_1_1_words_stay_strings() {
        let decoded = decode("hostnameOverride: n\nmode: nftables\n").unwrap();
        assert_eq!(decoded.config.hostname_override, "n");
        let err = decode("enableProfiling: yes\n").unwrap_err().to_string();
        assert!(err.contains("enableProfiling"), "{err}");
    }

    #[test]
    fn logging_flush_frequency_accepts_nanoseconds() {
        let decoded = decode("logging:\n  flushFrequency: 0\n  verbosity: 4\n").unwrap();
        assert_eq!(decoded.config.logging.flush_frequency, GoDuration::ZERO);
        assert_eq!(decoded.config.logging.verbosity, 4);
    }
}
