//! What every dataplane's rules depend on besides the Services, resolved per family and per
//! sync from the configuration and the node: the masquerade mark, how traffic from local pods
//! is recognised, which addresses accept NodePorts, the node's IPs and the ServiceCIDRs.
//!
//! Resolved here, once, so the nftables and iptables renderers cannot disagree about who is a
//! local pod or where NodePorts are served; they only translate the result into their syntax.

use std::net::IpAddr;

use ipnet::IpNet;
use kube_proxy_config::{DetectLocal, NodePortAddresses};

use crate::dataplane::NodeView;
use crate::names::IpFamily;

/// The configuration the context is resolved from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyPolicy {
    pub masquerade_bit: u32,
    pub masquerade_all: bool,
    pub detect_local: DetectLocal,
    pub node_port_addresses: NodePortAddresses,
    /// iptables mode's `localhostNodePorts`: NodePorts answer on 127.0.0.1 too (IPv4 only).
    pub localhost_node_ports: bool,
    /// iptables mode drops forwarded packets conntrack finds INVALID, unless the node's
    /// conntrack is liberal about TCP windows (`nf_conntrack_tcp_be_liberal`, read at start).
    pub drop_invalid: bool,
}

impl Default for ProxyPolicy {
    fn default() -> Self {
        ProxyPolicy {
            masquerade_bit: 14,
            masquerade_all: false,
            detect_local: DetectLocal::ClusterCidr(Vec::new()),
            node_port_addresses: NodePortAddresses::Primary,
            localhost_node_ports: false,
            drop_invalid: true,
        }
    }
}

/// How traffic from local pods is recognised (upstream's local-traffic detector).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalTraffic {
    /// Source address in one of these CIDRs (the cluster's or this node's pod CIDRs).
    FromCidrs(Vec<IpNet>),
    /// Arriving on this interface (a bridge).
    FromInterface(String),
    /// Arriving on an interface whose name starts with this.
    FromInterfacePrefix(String),
}

/// Which destination addresses accept NodePort traffic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodePortDestinations {
    /// Every local address but loopback.
    AllLocal,
    /// Exactly these addresses.
    Addresses(Vec<IpAddr>),
}

/// The context of one family for one sync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FamilyContext {
    pub family: IpFamily,
    /// The packet mark that asks for masquerading (`1 << masqueradeBit`).
    pub mark: u32,
    pub masquerade_all: bool,
    /// `None`: no detector (no `clusterCIDR` of this family, or no pod CIDR of the node).
    pub local: Option<LocalTraffic>,
    pub nodeports: NodePortDestinations,
    pub node_ips: Vec<IpAddr>,
    /// ServiceCIDRs of the family: unallocated addresses in them are dropped.
    pub service_cidrs: Vec<IpNet>,
    /// NodePorts answer on 127.0.0.1 (IPv4, every local address accepting NodePorts, and
    /// `localhostNodePorts`); needs `route_localnet` and upstream's `KUBE-FIREWALL` guard.
    pub localhost_nodeports: bool,
    /// Drop forwarded INVALID packets (iptables mode; see [`ProxyPolicy::drop_invalid`]).
    pub drop_invalid: bool,
}

impl FamilyContext {
    pub fn resolve(policy: &ProxyPolicy, family: IpFamily, node: &NodeView) -> FamilyContext {
        let of_family = |net: &&IpNet| IpFamily::of_net(net) == family;
        let local = match &policy.detect_local {
            DetectLocal::ClusterCidr(cidrs) => {
                let cidrs: Vec<IpNet> = cidrs.iter().filter(of_family).copied().collect();
                (!cidrs.is_empty()).then_some(LocalTraffic::FromCidrs(cidrs))
            }
            DetectLocal::NodeCidr => {
                let cidrs: Vec<IpNet> = node.pod_cidrs.iter().filter(of_family).copied().collect();
                (!cidrs.is_empty()).then_some(LocalTraffic::FromCidrs(cidrs))
            }
            DetectLocal::BridgeInterface(name) => Some(LocalTraffic::FromInterface(name.clone())),
            DetectLocal::InterfaceNamePrefix(prefix) => {
                Some(LocalTraffic::FromInterfacePrefix(prefix.clone()))
            }
        };
        let nodeports = match policy.node_port_addresses.select(
            family == IpFamily::V6,
            &node.node_ips,
            &node.local_addresses,
        ) {
            None => NodePortDestinations::AllLocal,
            Some(ips) => NodePortDestinations::Addresses(ips),
        };
        FamilyContext {
            family,
            mark: 1 << policy.masquerade_bit,
            masquerade_all: policy.masquerade_all,
            local,
            node_ips: node.node_ips.clone(),
            service_cidrs: Vec::new(),
            localhost_nodeports: policy.localhost_node_ports
                && family == IpFamily::V4
                && nodeports == NodePortDestinations::AllLocal,
            nodeports,
            drop_invalid: policy.drop_invalid,
        }
    }

    /// The same context with these ServiceCIDRs.
    pub fn with_service_cidrs(mut self, cidrs: &[IpNet]) -> FamilyContext {
        self.service_cidrs = cidrs.to_vec();
        self
    }

    /// Whether NodePorts are limited to a list of addresses.
    pub fn nodeports_restricted(&self) -> bool {
        matches!(self.nodeports, NodePortDestinations::Addresses(_))
    }

    /// Upstream's exception to `loadBalancerSourceRanges`: when a range holds one of the
    /// node's IPs, load balancers that send traffic back to the node with the load-balancer
    /// IP as source are allowed, so the Service's load-balancer IPs join the allowed sources.
    pub fn lb_ips_allowed_as_sources(&self, ranges: &[IpNet]) -> bool {
        self.node_ips
            .iter()
            .any(|ip| ranges.iter().any(|r| r.contains(ip)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> NodeView {
        NodeView {
            node_ips: vec!["192.0.2.10".parse().unwrap()],
            pod_cidrs: vec!["198.18.1.0/24".parse().unwrap()],
            local_addresses: vec![
                "127.0.0.1".parse().unwrap(),
                "192.0.2.10".parse().unwrap(),
                "192.0.2.11".parse().unwrap(),
                "10.9.9.9".parse().unwrap(),
            ],
        }
    }

    #[test]
    fn node_port_addresses() {
        let mut policy = ProxyPolicy::default();
        let ctx = FamilyContext::resolve(&policy, IpFamily::V4, &node());
        assert_eq!(
            ctx.nodeports,
            NodePortDestinations::Addresses(vec!["192.0.2.10".parse().unwrap()]),
            "primary"
        );
        policy.node_port_addresses =
            NodePortAddresses::Cidrs(vec!["192.0.2.0/24".parse().unwrap()]);
        let ctx = FamilyContext::resolve(&policy, IpFamily::V4, &node());
        assert_eq!(
            ctx.nodeports,
            NodePortDestinations::Addresses(vec![
                "192.0.2.10".parse().unwrap(),
                "192.0.2.11".parse().unwrap()
            ])
        );
        let ctx6 = FamilyContext::resolve(&policy, IpFamily::V6, &NodeView::default());
        assert_eq!(
            ctx6.nodeports,
            NodePortDestinations::AllLocal,
            "no IPv6 CIDR in the list: all IPv6 addresses"
        );
        policy.node_port_addresses = NodePortAddresses::All;
        assert!(!FamilyContext::resolve(&policy, IpFamily::V4, &node()).nodeports_restricted());
    }

    #[test]
    fn local_detection() {
        let mut policy = ProxyPolicy::default();
        assert_eq!(
            FamilyContext::resolve(&policy, IpFamily::V4, &node()).local,
            None,
            "no clusterCIDR: no detector"
        );
        policy.detect_local = DetectLocal::ClusterCidr(vec![
            "198.18.0.0/16".parse().unwrap(),
            "2001:db8:18::/48".parse().unwrap(),
        ]);
        assert_eq!(
            FamilyContext::resolve(&policy, IpFamily::V4, &node()).local,
            Some(LocalTraffic::FromCidrs(vec!["198.18.0.0/16"
                .parse()
                .unwrap()]))
        );
        policy.detect_local = DetectLocal::NodeCidr;
        assert_eq!(
            FamilyContext::resolve(&policy, IpFamily::V4, &node()).local,
            Some(LocalTraffic::FromCidrs(vec!["198.18.1.0/24"
                .parse()
                .unwrap()]))
        );
        assert_eq!(
            FamilyContext::resolve(&policy, IpFamily::V6, &node()).local,
            None,
            "the node has no IPv6 pod CIDR"
        );
        policy.detect_local = DetectLocal::InterfaceNamePrefix("veth".into());
        assert_eq!(
            FamilyContext::resolve(&policy, IpFamily::V6, &node()).local,
            Some(LocalTraffic::FromInterfacePrefix("veth".into()))
        );
        assert_eq!(
            FamilyContext::resolve(&policy, IpFamily::V4, &node()).mark,
            0x4000
        );
    }

    #[test]
    fn load_balancer_ips_as_sources_only_when_a_range_holds_a_node_ip() {
        let ctx = FamilyContext::resolve(&ProxyPolicy::default(), IpFamily::V4, &node());
        assert!(ctx.lb_ips_allowed_as_sources(&["192.0.2.0/24".parse().unwrap()]));
        assert!(!ctx.lb_ips_allowed_as_sources(&["203.0.113.0/24".parse().unwrap()]));
    }
}
