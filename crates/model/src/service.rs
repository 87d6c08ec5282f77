//! `v1.Service` → per-family [`ServicePort`]s: the only code that reads Service objects.
//!
//! Everything upstream's `newBaseServiceInfo` does to sanitise a Service happens here, once:
//! IPs filtered to the family, leading-zero IPv4 forms normalised, whitespace trimmed from
//! source ranges, load-balancer ingress with `ipMode: Proxy` or no IP dropped, and the
//! health-check node port kept only where a health check is needed. Nothing downstream sees
//! a `k8s-openapi` type.

use std::net::IpAddr;
use std::num::NonZeroU16;
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Service;

use crate::names::{
    parse_cidr_sloppy, parse_ip_sloppy, IpFamily, NamespacedName, Protocol, ServicePortName,
};

/// Label that hands a Service to another proxy; kube-proxy ignores such Services.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Label the EndpointSlice controller puts on slices of headless Services.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// API default for `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: u32 = 10800;

/// One port of one Service in one IP family, with every frontend kube-proxy programs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ServicePort {
    pub name: ServicePortName,
    pub family: IpFamily,
    pub cluster_ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub node_port: Option<NonZeroU16>,
    pub external_ips: Vec<IpAddr>,
    /// VIP-mode load-balancer ingress IPs (ipMode unset or `VIP`).
    pub load_balancer_vips: Vec<IpAddr>,
    /// Allowed sources for load-balancer traffic; empty means no filtering.
    pub load_balancer_source_ranges: Vec<IpNet>,
    /// `Some(timeout seconds)` with `sessionAffinity: ClientIP`.
    pub session_affinity_timeout: Option<u32>,
    /// Service-level `externalTrafficPolicy: Local` on an externally accessible Service type.
    pub external_policy_local: bool,
    pub internal_policy_local: bool,
    /// Set only for LoadBalancer Services with `externalTrafficPolicy: Local`.
    pub health_check_node_port: Option<NonZeroU16>,
}

impl ServicePort {
    /// Upstream's port-level `ExternallyAccessible`: any NodePort, LB VIP or external IP.
    pub fn externally_accessible(&self) -> bool {
        self.node_port.is_some()
            || !self.load_balancer_vips.is_empty()
            || !self.external_ips.is_empty()
    }
    /// Cluster endpoints are needed unless internal traffic is Local and there is no external
    /// traffic (even with eTP Local, pods and the node short-circuit to cluster endpoints).
    pub fn uses_cluster_endpoints(&self) -> bool {
        !self.internal_policy_local || self.externally_accessible()
    }
    pub fn uses_local_endpoints(&self) -> bool {
        self.internal_policy_local || (self.external_policy_local && self.externally_accessible())
    }
    /// eTP Local applies to this port's external traffic.
    pub fn external_traffic_local(&self) -> bool {
        self.external_policy_local && self.externally_accessible()
    }
}

/// A Service that kube-proxy does not handle at all (not an error).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ignored {
    Headless,
    ExternalName,
    OtherProxy(String),
}

/// Why a Service could not be converted. The whole Service is skipped and logged; other
/// Services are not affected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    #[error("metadata.name and metadata.namespace are required")]
    MissingName,
    #[error("{field} {value:?} is not a valid Kubernetes name (lower-case letters, digits, '-' and '.')")]
    InvalidName { field: &'static str, value: String },
    #[error("spec.clusterIPs[{index}] {value:?} is not a valid IP address")]
    InvalidClusterIp { index: usize, value: String },
    #[error("spec.ports[{index}].protocol {value:?} is not TCP, UDP or SCTP")]
    InvalidProtocol { index: usize, value: String },
    #[error("spec.ports[{index}].port {value} is not in [1, 65535]")]
    InvalidPort { index: usize, value: i32 },
    #[error("spec.ports[{index}].nodePort {value} is not in [0, 65535]")]
    InvalidNodePort { index: usize, value: i32 },
}

/// What converting one Service produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConvertedService {
    /// The Service's ports for every family it has a cluster IP in. Non-fatal problems
    /// (an unparsable external IP, say) are listed so the caller can log them.
    Ports {
        ports: Vec<Arc<ServicePort>>,
        warnings: Vec<String>,
    },
    Ignored(Ignored),
}

/// The key a Service is stored under.
pub fn service_key(service: &Service) -> Option<NamespacedName> {
    let name = service.metadata.name.as_deref().filter(|s| !s.is_empty())?;
    let namespace = service.metadata.namespace.as_deref().unwrap_or("default");
    Some(NamespacedName::new(namespace, name))
}

/// Converts one Service into its per-family ports.
/// DNS-1123 subdomain, as the API server enforces for namespaces and Service names (manifest
/// files are not validated by anyone else, and names end up in nftables object names).
pub fn valid_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric())
}

/// IANA_SVC_NAME (a port name), or empty.
pub fn valid_port_name(name: &str) -> bool {
    name.is_empty()
        || (name.len() <= 15
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && name.bytes().any(|b| b.is_ascii_lowercase()))
}

pub fn convert_service(service: &Service) -> Result<ConvertedService, ServiceError> {
    let key = service_key(service).ok_or(ServiceError::MissingName)?;
    for (field, value) in [
        ("metadata.namespace", &key.namespace),
        ("metadata.name", &key.name),
    ] {
        if !valid_dns_name(value) {
            return Err(ServiceError::InvalidName {
                field,
                value: value.to_string(),
            });
        }
    }
    if let Some(proxy) = service
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_SERVICE_PROXY_NAME))
    {
        return Ok(ConvertedService::Ignored(Ignored::OtherProxy(
            proxy.clone(),
        )));
    }
    let Some(spec) = service.spec.as_ref() else {
        return Ok(ConvertedService::Ignored(Ignored::Headless));
    };
    let service_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if service_type == "ExternalName" {
        return Ok(ConvertedService::Ignored(Ignored::ExternalName));
    }

    // Cluster IPs, one per family; `clusterIPs` wins over the legacy `clusterIP`.
    let raw_cluster_ips: Vec<String> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.clone(),
        (_, Some(ip)) if !ip.is_empty() => vec![ip.clone()],
        _ => Vec::new(),
    };
    if raw_cluster_ips.is_empty() || raw_cluster_ips.iter().any(|ip| ip == "None") {
        return Ok(ConvertedService::Ignored(Ignored::Headless));
    }
    let mut cluster_ips: Vec<IpAddr> = Vec::new();
    for (index, raw) in raw_cluster_ips.iter().enumerate() {
        let ip = parse_ip_sloppy(raw).ok_or_else(|| ServiceError::InvalidClusterIp {
            index,
            value: raw.clone(),
        })?;
        if !cluster_ips
            .iter()
            .any(|existing| IpFamily::of(existing) == IpFamily::of(&ip))
        {
            cluster_ips.push(ip);
        }
    }

    let mut warnings = Vec::new();
    let external_ips: Vec<IpAddr> = spec
        .external_ips
        .iter()
        .flatten()
        .filter_map(|raw| {
            let parsed = parse_ip_sloppy(raw);
            if parsed.is_none() {
                warnings.push(format!("ignoring invalid spec.externalIPs entry {raw:?}"));
            }
            parsed
        })
        .collect();
    let source_ranges: Vec<IpNet> = spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .filter_map(|raw| {
            let parsed = parse_cidr_sloppy(raw);
            if parsed.is_none() {
                warnings.push(format!(
                    "ignoring invalid spec.loadBalancerSourceRanges entry {raw:?}"
                ));
            }
            parsed
        })
        .collect();
    // Only VIP-mode ingress IPs get rules; `ipMode: Proxy` traffic goes to the LB itself.
    let lb_vips: Vec<IpAddr> = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter(|ingress| matches!(ingress.ip_mode.as_deref(), None | Some("VIP")))
        .filter_map(|ingress| ingress.ip.as_deref().and_then(parse_ip_sloppy))
        .collect();

    let externally_accessible_type = matches!(service_type, "LoadBalancer" | "NodePort")
        || (service_type == "ClusterIP"
            && spec.external_ips.as_ref().is_some_and(|v| !v.is_empty()));
    let external_policy_local =
        externally_accessible_type && spec.external_traffic_policy.as_deref() == Some("Local");
    let internal_policy_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let needs_health_check = service_type == "LoadBalancer" && external_policy_local;
    let health_check_node_port = if needs_health_check {
        spec.health_check_node_port
            .and_then(|p| u16::try_from(p).ok())
            .and_then(NonZeroU16::new)
    } else {
        None
    };
    let session_affinity_timeout =
        (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            spec.session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .and_then(|t| u32::try_from(t).ok())
                .filter(|t| *t > 0)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECONDS)
        });

    let mut ports = Vec::new();
    for (index, port) in spec.ports.iter().flatten().enumerate() {
        let protocol = Protocol::from_api(port.protocol.as_deref()).ok_or_else(|| {
            ServiceError::InvalidProtocol {
                index,
                value: port.protocol.clone().unwrap_or_default(),
            }
        })?;
        let number =
            u16::try_from(port.port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or(ServiceError::InvalidPort {
                    index,
                    value: port.port,
                })?;
        let node_port = match port.node_port {
            None => None,
            Some(value) => {
                let p = u16::try_from(value)
                    .map_err(|_| ServiceError::InvalidNodePort { index, value })?;
                NonZeroU16::new(p)
            }
        };
        let port_name = port.name.as_deref().unwrap_or("");
        if !valid_port_name(port_name) {
            return Err(ServiceError::InvalidName {
                field: "spec.ports[].name",
                value: port_name.to_string(),
            });
        }
        let name = ServicePortName {
            service: key.clone(),
            port: port_name.into(),
            protocol,
        };
        for cluster_ip in &cluster_ips {
            let family = IpFamily::of(cluster_ip);
            let of_family = |ip: &&IpAddr| IpFamily::of(ip) == family;
            let ranges: Vec<IpNet> = source_ranges
                .iter()
                .filter(|n| IpFamily::of_net(n) == family)
                .copied()
                .collect();
            // A range covering everything means no filtering at all.
            let ranges = if ranges.iter().any(|n| n.prefix_len() == 0) {
                Vec::new()
            } else {
                ranges
            };
            ports.push(Arc::new(ServicePort {
                name: name.clone(),
                family,
                cluster_ip: *cluster_ip,
                port: number,
                protocol,
                node_port,
                external_ips: external_ips.iter().filter(of_family).copied().collect(),
                load_balancer_vips: lb_vips.iter().filter(of_family).copied().collect(),
                load_balancer_source_ranges: ranges,
                session_affinity_timeout,
                external_policy_local,
                internal_policy_local,
                health_check_node_port,
            }));
        }
    }
    Ok(ConvertedService::Ports { ports, warnings })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(value: serde_json::Value) -> Service {
        serde_json::from_value(value).unwrap()
    }

    fn ports(service: Service) -> Vec<Arc<ServicePort>> {
        match convert_service(&service).unwrap() {
            ConvertedService::Ports { ports, .. } => ports,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn dual_stack_load_balancer_splits_everything_by_family() {
        let p = ports(svc(json!({
            "metadata": {"namespace": "ns", "name": "lb"},
            "spec": {
                "type": "LoadBalancer", "clusterIP": "198.19.0.10",
                "clusterIPs": ["198.19.0.10", "2001:db8:19::a"],
                "externalIPs": ["198.51.100.20", "2001:db8:51::20", "bogus"],
                "loadBalancerSourceRanges": [" 203.0.113.0/25", "2001:db8:203::/64"],
                "externalTrafficPolicy": "Local", "healthCheckNodePort": 30000,
                "ports": [{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}]
            },
            "status": {"loadBalancer": {"ingress": [
                {"ip": "198.51.100.1"}, {"ip": "198.51.100.2", "ipMode": "Proxy"},
                {"ip": "2001:db8:51::1", "ipMode": "VIP"}, {"hostname": "lb.example"}
            ]}}
        })));
        assert_eq!(p.len(), 2);
        let v4 = &p[0];
        assert_eq!(v4.family, IpFamily::V4);
        assert_eq!(v4.name.to_string(), "ns/lb:http");
        assert_eq!(
            v4.external_ips,
            vec!["198.51.100.20".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            v4.load_balancer_vips,
            vec!["198.51.100.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            v4.load_balancer_source_ranges,
            vec!["203.0.113.0/25".parse::<IpNet>().unwrap()]
        );
        assert_eq!(v4.node_port.map(|p| p.get()), Some(30080));
        assert_eq!(v4.health_check_node_port.map(|p| p.get()), Some(30000));
        assert!(v4.external_policy_local && v4.external_traffic_local());
        let v6 = &p[1];
        assert_eq!(v6.cluster_ip, "2001:db8:19::a".parse::<IpAddr>().unwrap());
        assert_eq!(
            v6.load_balancer_vips,
            vec!["2001:db8:51::1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(v6.load_balancer_source_ranges.len(), 1);
    }

    #[test]
    fn invalid_external_ip_is_a_warning() {
        let converted = convert_service(&svc(json!({
            "metadata": {"namespace": "ns", "name": "s"},
            "spec": {"clusterIP": "198.19.0.1", "externalIPs": ["nope"], "ports": [{"port": 80}]}
        })))
        .unwrap();
        match converted {
            ConvertedService::Ports { warnings, ports } => {
                assert_eq!(ports.len(), 1);
                assert!(warnings[0].contains("nope"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ignored_services() {
        let headless = svc(
            json!({"metadata": {"namespace": "n", "name": "h"}, "spec": {"clusterIP": "None", "ports": [{"port": 80}]}}),
        );
        assert_eq!(
            convert_service(&headless).unwrap(),
            ConvertedService::Ignored(Ignored::Headless)
        );
        let empty = svc(
            json!({"metadata": {"namespace": "n", "name": "h"}, "spec": {"ports": [{"port": 80}]}}),
        );
        assert_eq!(
            convert_service(&empty).unwrap(),
            ConvertedService::Ignored(Ignored::Headless)
        );
        let external = svc(
            json!({"metadata": {"namespace": "n", "name": "e"}, "spec": {"type": "ExternalName", "externalName": "example.com"}}),
        );
        assert_eq!(
            convert_service(&external).unwrap(),
            ConvertedService::Ignored(Ignored::ExternalName)
        );
        let other = svc(
            json!({"metadata": {"namespace": "n", "name": "o", "labels": {"service.kubernetes.io/service-proxy-name": "x"}}, "spec": {"clusterIP": "198.19.0.1", "ports": [{"port": 80}]}}),
        );
        assert!(matches!(
            convert_service(&other).unwrap(),
            ConvertedService::Ignored(Ignored::OtherProxy(_))
        ));
    }

    #[test]
    fn invalid_services_are_errors_naming_the_field() {
        let bad_ip = svc(
            json!({"metadata": {"namespace": "n", "name": "b"}, "spec": {"clusterIP": "198.19.0.300", "ports": [{"port": 80}]}}),
        );
        assert!(convert_service(&bad_ip)
            .unwrap_err()
            .to_string()
            .contains("spec.clusterIPs[0]"));
        let bad_proto = svc(
            json!({"metadata": {"namespace": "n", "name": "b"}, "spec": {"clusterIP": "198.19.0.3", "ports": [{"port": 80, "protocol": "ICMP"}]}}),
        );
        assert!(convert_service(&bad_proto)
            .unwrap_err()
            .to_string()
            .contains("spec.ports[0].protocol"));
        let bad_port = svc(
            json!({"metadata": {"namespace": "n", "name": "b"}, "spec": {"clusterIP": "198.19.0.3", "ports": [{"port": 70000}]}}),
        );
        assert!(matches!(
            convert_service(&bad_port),
            Err(ServiceError::InvalidPort { .. })
        ));
    }

    #[test]
    fn names_must_be_kubernetes_names() {
        let bad = svc(
            json!({"metadata": {"namespace": "ns", "name": "My Service"}, "spec": {"clusterIP": "198.19.0.3", "ports": [{"port": 80}]}}),
        );
        assert!(matches!(
            convert_service(&bad),
            Err(ServiceError::InvalidName {
                field: "metadata.name",
                ..
            })
        ));
        let bad_port = svc(
            json!({"metadata": {"namespace": "ns", "name": "s"}, "spec": {"clusterIP": "198.19.0.3", "ports": [{"name": "http port", "port": 80}]}}),
        );
        assert!(matches!(
            convert_service(&bad_port),
            Err(ServiceError::InvalidName { .. })
        ));
        assert!(
            valid_dns_name("kube-system")
                && valid_dns_name("a.b-c")
                && !valid_dns_name("-a")
                && !valid_dns_name("A")
        );
        assert!(
            valid_port_name("")
                && valid_port_name("http-2")
                && !valid_port_name("8080")
                && !valid_port_name("x".repeat(16).as_str())
        );
    }

    #[test]
    fn policies_and_affinity() {
        let p = ports(svc(json!({
            "metadata": {"namespace": "n", "name": "c"},
            "spec": {"clusterIP": "198.19.0.4", "externalTrafficPolicy": "Local", "internalTrafficPolicy": "Local",
                     "sessionAffinity": "ClientIP", "ports": [{"port": 53, "protocol": "UDP"}],
                     "loadBalancerSourceRanges": ["0.0.0.0/0"], "healthCheckNodePort": 30001}
        })));
        let p = &p[0];
        // eTP Local on a plain ClusterIP Service without external IPs has no effect.
        assert!(!p.external_policy_local);
        assert!(p.internal_policy_local);
        assert!(!p.uses_cluster_endpoints() && p.uses_local_endpoints());
        assert_eq!(
            p.session_affinity_timeout,
            Some(DEFAULT_AFFINITY_TIMEOUT_SECONDS)
        );
        assert!(
            p.load_balancer_source_ranges.is_empty(),
            "0.0.0.0/0 means no filtering"
        );
        assert_eq!(
            p.health_check_node_port, None,
            "only LoadBalancer services need health checks"
        );
        assert_eq!(p.protocol, Protocol::Udp);
    }

    #[test]
    fn leading_zero_cluster_ip_is_normalised() {
        let p = ports(svc(
            json!({"metadata": {"namespace": "n", "name": "z"}, "spec": {"clusterIP": "172.30.0.041", "ports": [{"port": 80}]}}),
        ));
        assert_eq!(p[0].cluster_ip, "172.30.0.41".parse::<IpAddr>().unwrap());
    }
}
