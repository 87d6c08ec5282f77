//! What the static part of the ruleset depends on, resolved for one family and one sync:
//! the masquerade mark, how local pod traffic is recognised, and which addresses accept
//! NodePorts. When it changes, the static chains are rewritten.

use std::net::IpAddr;

use ipnet::IpNet;
use kube_proxy_config::{DetectLocal, NodePortAddresses};
use kube_proxy_model::{IpFamily, NodeView};

/// Static settings of the nftables dataplane (from the configuration).
#[derive(Clone, Debug)]
pub struct NftConfig {
    pub masquerade_bit: u32,
    pub masquerade_all: bool,
    pub detect_local: DetectLocal,
    pub node_port_addresses: NodePortAddresses,
    /// A new table with more elements than this is built in stages (see `proxier`).
    pub staged_build_above: usize,
}

impl Default for NftConfig {
    fn default() -> Self {
        NftConfig {
            masquerade_bit: 14,
            masquerade_all: false,
            detect_local: DetectLocal::ClusterCidr(Vec::new()),
            node_port_addresses: NodePortAddresses::Primary,
            staged_build_above: 20_000,
        }
    }
}

/// How "from a local pod" is matched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalMatch {
    Saddr(Vec<IpNet>),
    Interface(String),
    InterfacePrefix(String),
}

/// Which destinations accept NodePort traffic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodePortMatch {
    /// Every local address but loopback (`fib daddr type local`).
    AllLocal,
    /// These addresses (the `nodeport-ips` set).
    Ips(Vec<IpAddr>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Context {
    pub family: IpFamily,
    pub mark: u32,
    pub masquerade_all: bool,
    pub local: Option<LocalMatch>,
    pub nodeports: NodePortMatch,
    pub node_ips: Vec<IpAddr>,
    /// ServiceCIDRs of the family: unallocated addresses in them are dropped.
    pub service_cidrs: Vec<IpNet>,
}

impl Context {
    pub fn resolve(config: &NftConfig, family: IpFamily, node: &NodeView) -> Context {
        let of_family = |net: &&IpNet| IpFamily::of_net(net) == family;
        let local = match &config.detect_local {
            DetectLocal::ClusterCidr(cidrs) => {
                let cidrs: Vec<IpNet> = cidrs.iter().filter(of_family).copied().collect();
                (!cidrs.is_empty()).then_some(LocalMatch::Saddr(cidrs))
            }
            DetectLocal::NodeCidr => {
                let cidrs: Vec<IpNet> = node.pod_cidrs.iter().filter(of_family).copied().collect();
                (!cidrs.is_empty()).then_some(LocalMatch::Saddr(cidrs))
            }
            DetectLocal::BridgeInterface(name) => Some(LocalMatch::Interface(name.clone())),
            DetectLocal::InterfaceNamePrefix(prefix) => {
                Some(LocalMatch::InterfacePrefix(prefix.clone()))
            }
        };
        let nodeports = match config.node_port_addresses.select(
            family == IpFamily::V6,
            &node.node_ips,
            &node.local_addresses,
        ) {
            None => NodePortMatch::AllLocal,
            Some(ips) => NodePortMatch::Ips(ips),
        };
        Context {
            family,
            mark: 1 << config.masquerade_bit,
            masquerade_all: config.masquerade_all,
            local,
            nodeports,
            node_ips: node.node_ips.clone(),
            service_cidrs: Vec::new(),
        }
    }

    /// The same context with these ServiceCIDRs.
    pub fn with_service_cidrs(mut self, cidrs: &[IpNet]) -> Context {
        self.service_cidrs = cidrs.to_vec();
        self
    }

    /// `ip` or `ip6`.
    pub fn ip(&self) -> &'static str {
        match self.family {
            IpFamily::V4 => "ip",
            IpFamily::V6 => "ip6",
        }
    }

    /// The mark as upstream writes it (`0x004000`).
    pub fn mark_text(&self) -> String {
        format!("{:#08x}", self.mark)
    }

    /// Match for traffic from local pods (`negate`: traffic not from local pods).
    pub fn local_match(&self, negate: bool) -> Option<String> {
        let op = if negate { "!= " } else { "" };
        self.local.as_ref().map(|m| match m {
            LocalMatch::Saddr(cidrs) => {
                let list: Vec<String> = cidrs.iter().map(|c| c.to_string()).collect();
                format!("{} saddr {op}{{ {} }}", self.ip(), list.join(", "))
            }
            LocalMatch::Interface(name) => format!("iifname {op}\"{name}\""),
            LocalMatch::InterfacePrefix(prefix) => format!("iifname {op}\"{prefix}*\""),
        })
    }

    /// Match for packets addressed to a NodePort-accepting address.
    pub fn nodeport_match(&self) -> String {
        match self.nodeports {
            NodePortMatch::AllLocal => match self.family {
                IpFamily::V4 => "fib daddr type local ip daddr != 127.0.0.0/8".into(),
                IpFamily::V6 => "fib daddr type local ip6 daddr != ::1".into(),
            },
            NodePortMatch::Ips(_) => format!("{} daddr @nodeport-ips", self.ip()),
        }
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
        let mut config = NftConfig::default();
        let ctx = Context::resolve(&config, IpFamily::V4, &node());
        assert_eq!(
            ctx.nodeports,
            NodePortMatch::Ips(vec!["192.0.2.10".parse().unwrap()]),
            "primary"
        );
        config.node_port_addresses =
            NodePortAddresses::Cidrs(vec!["192.0.2.0/24".parse().unwrap()]);
        let ctx = Context::resolve(&config, IpFamily::V4, &node());
        assert_eq!(
            ctx.nodeports,
            NodePortMatch::Ips(vec![
                "192.0.2.10".parse().unwrap(),
                "192.0.2.11".parse().unwrap()
            ])
        );
        let ctx6 = Context::resolve(&config, IpFamily::V6, &NodeView::default());
        assert_eq!(
            ctx6.nodeports,
            NodePortMatch::AllLocal,
            "no IPv6 CIDR in the list: all IPv6 addresses"
        );
        config.node_port_addresses = NodePortAddresses::All;
        assert_eq!(
            Context::resolve(&config, IpFamily::V4, &node()).nodeport_match(),
            "fib daddr type local ip daddr != 127.0.0.0/8"
        );
    }

    #[test]
    fn local_detection() {
        let mut config = NftConfig::default();
        assert_eq!(
            Context::resolve(&config, IpFamily::V4, &node()).local,
            None,
            "no clusterCIDR: no detector"
        );
        config.detect_local = DetectLocal::ClusterCidr(vec![
            "198.18.0.0/16".parse().unwrap(),
            "2001:db8:18::/48".parse().unwrap(),
        ]);
        let ctx = Context::resolve(&config, IpFamily::V4, &node());
        assert_eq!(
            ctx.local_match(true).unwrap(),
            "ip saddr != { 198.18.0.0/16 }"
        );
        config.detect_local = DetectLocal::NodeCidr;
        assert_eq!(
            Context::resolve(&config, IpFamily::V4, &node())
                .local_match(false)
                .unwrap(),
            "ip saddr { 198.18.1.0/24 }"
        );
        config.detect_local = DetectLocal::InterfaceNamePrefix("veth".into());
        assert_eq!(
            Context::resolve(&config, IpFamily::V6, &node())
                .local_match(true)
                .unwrap(),
            "iifname != \"veth*\""
        );
        assert_eq!(
            Context::resolve(&config, IpFamily::V4, &node()).mark_text(),
            "0x004000"
        );
    }
}
