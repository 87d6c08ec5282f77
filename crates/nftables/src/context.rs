//! The nftables dataplane's settings, and the model's per-family context (the masquerade
//! mark, how local pod traffic is recognised, which addresses accept NodePorts) spelled in
//! nft. When the context changes, the static chains are rewritten.

use ipnet::IpNet;
use kube_proxy_config::{DetectLocal, NodePortAddresses};
use kube_proxy_model::context::{FamilyContext, LocalTraffic, NodePortDestinations, ProxyPolicy};
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

impl NftConfig {
    /// The configuration the per-family context is resolved from.
    pub fn policy(&self) -> ProxyPolicy {
        ProxyPolicy {
            masquerade_bit: self.masquerade_bit,
            masquerade_all: self.masquerade_all,
            detect_local: self.detect_local.clone(),
            node_port_addresses: self.node_port_addresses.clone(),
            // Upstream's nftables mode never accepts NodePorts on loopback, nor drops INVALID.
            localhost_node_ports: false,
            drop_invalid: false,
        }
    }
}

/// The model's per-family context (`kube_proxy_model::context`), with its nft spelling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Context(pub FamilyContext);

impl std::ops::Deref for Context {
    type Target = FamilyContext;
    fn deref(&self) -> &FamilyContext {
        &self.0
    }
}

impl Context {
    pub fn resolve(config: &NftConfig, family: IpFamily, node: &NodeView) -> Context {
        Context(FamilyContext::resolve(&config.policy(), family, node))
    }

    /// The same context with these ServiceCIDRs.
    pub fn with_service_cidrs(self, cidrs: &[IpNet]) -> Context {
        Context(self.0.with_service_cidrs(cidrs))
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
            LocalTraffic::FromCidrs(cidrs) => {
                let list: Vec<String> = cidrs.iter().map(|c| c.to_string()).collect();
                format!("{} saddr {op}{{ {} }}", self.ip(), list.join(", "))
            }
            LocalTraffic::FromInterface(name) => format!("iifname {op}\"{name}\""),
            LocalTraffic::FromInterfacePrefix(prefix) => format!("iifname {op}\"{prefix}*\""),
        })
    }

    /// Match for packets addressed to a NodePort-accepting address.
    pub fn nodeport_match(&self) -> String {
        match self.nodeports {
            NodePortDestinations::AllLocal => match self.family {
                IpFamily::V4 => "fib daddr type local ip daddr != 127.0.0.0/8".into(),
                IpFamily::V6 => "fib daddr type local ip6 daddr != ::1".into(),
            },
            NodePortDestinations::Addresses(_) => format!("{} daddr @nodeport-ips", self.ip()),
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
            local_addresses: vec!["192.0.2.10".parse().unwrap()],
        }
    }

    #[test]
    fn node_port_addresses_in_nft() {
        let mut config = NftConfig::default();
        assert_eq!(
            Context::resolve(&config, IpFamily::V4, &node()).nodeport_match(),
            "ip daddr @nodeport-ips"
        );
        config.node_port_addresses = NodePortAddresses::All;
        assert_eq!(
            Context::resolve(&config, IpFamily::V4, &node()).nodeport_match(),
            "fib daddr type local ip daddr != 127.0.0.0/8"
        );
    }

    #[test]
    fn local_detection_in_nft() {
        let mut config = NftConfig::default();
        assert_eq!(
            Context::resolve(&config, IpFamily::V4, &node()).local_match(true),
            None
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
