//! Upstream's names: the dummy interface, the ipsets (with their types and the comments the
//! iptables rules carry) and the iptables chains of ipvs mode.

use kube_proxy_model::IpFamily;

/// The dummy interface holding ClusterIPs, external IPs and load-balancer IPs.
pub const DUMMY_INTERFACE: &str = "kube-ipvs0";

/// The ipsets of ipvs mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Set {
    LoopBack,
    ClusterIp,
    ExternalIp,
    ExternalIpLocal,
    LoadBalancer,
    LoadBalancerFw,
    LoadBalancerLocal,
    LoadBalancerSourceIp,
    LoadBalancerSourceCidr,
    NodePortTcp,
    NodePortLocalTcp,
    NodePortUdp,
    NodePortLocalUdp,
    NodePortSctp,
    NodePortLocalSctp,
    HealthCheckNodePort,
    IpvsIps,
}

impl Set {
    pub const ALL: [Set; 17] = [
        Set::LoopBack,
        Set::ClusterIp,
        Set::ExternalIp,
        Set::ExternalIpLocal,
        Set::LoadBalancer,
        Set::LoadBalancerFw,
        Set::LoadBalancerLocal,
        Set::LoadBalancerSourceIp,
        Set::LoadBalancerSourceCidr,
        Set::NodePortTcp,
        Set::NodePortLocalTcp,
        Set::NodePortUdp,
        Set::NodePortLocalUdp,
        Set::NodePortSctp,
        Set::NodePortLocalSctp,
        Set::HealthCheckNodePort,
        Set::IpvsIps,
    ];

    /// The IPv4 name; IPv6 sets are named `KUBE-6-…` (upstream, so both families coexist).
    pub fn base_name(self) -> &'static str {
        match self {
            Set::LoopBack => "KUBE-LOOP-BACK",
            Set::ClusterIp => "KUBE-CLUSTER-IP",
            Set::ExternalIp => "KUBE-EXTERNAL-IP",
            Set::ExternalIpLocal => "KUBE-EXTERNAL-IP-LOCAL",
            Set::LoadBalancer => "KUBE-LOAD-BALANCER",
            Set::LoadBalancerFw => "KUBE-LOAD-BALANCER-FW",
            Set::LoadBalancerLocal => "KUBE-LOAD-BALANCER-LOCAL",
            Set::LoadBalancerSourceIp => "KUBE-LOAD-BALANCER-SOURCE-IP",
            Set::LoadBalancerSourceCidr => "KUBE-LOAD-BALANCER-SOURCE-CIDR",
            Set::NodePortTcp => "KUBE-NODE-PORT-TCP",
            Set::NodePortLocalTcp => "KUBE-NODE-PORT-LOCAL-TCP",
            Set::NodePortUdp => "KUBE-NODE-PORT-UDP",
            Set::NodePortLocalUdp => "KUBE-NODE-PORT-LOCAL-UDP",
            Set::NodePortSctp => "KUBE-NODE-PORT-SCTP-HASH",
            Set::NodePortLocalSctp => "KUBE-NODE-PORT-LOCAL-SCTP-HASH",
            Set::HealthCheckNodePort => "KUBE-HEALTH-CHECK-NODE-PORT",
            Set::IpvsIps => "KUBE-IPVS-IPS",
        }
    }

    /// The set's name in `family` (at most 31 characters, as ipset allows).
    pub fn name(self, family: IpFamily) -> String {
        let base = self.base_name();
        match family {
            IpFamily::V4 => base.to_string(),
            IpFamily::V6 => {
                let mut name = base.replacen("KUBE-", "KUBE-6-", 1);
                name.truncate(31);
                name
            }
        }
    }

    /// The ipset type.
    pub fn kind(self) -> &'static str {
        match self {
            Set::LoopBack | Set::LoadBalancerSourceIp => "hash:ip,port,ip",
            Set::LoadBalancerSourceCidr => "hash:ip,port,net",
            Set::NodePortTcp
            | Set::NodePortLocalTcp
            | Set::NodePortUdp
            | Set::NodePortLocalUdp
            | Set::HealthCheckNodePort => "bitmap:port",
            Set::IpvsIps => "hash:ip",
            _ => "hash:ip,port",
        }
    }

    /// Upstream's comment, which the iptables rules matching the set carry.
    pub fn comment(self) -> &'static str {
        match self {
            Set::LoopBack => "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose",
            Set::ClusterIp => "Kubernetes service cluster ip + port for masquerade purpose",
            Set::ExternalIp => "Kubernetes service external ip + port for masquerade and filter purpose",
            Set::ExternalIpLocal => "Kubernetes service external ip + port with externalTrafficPolicy=local",
            Set::LoadBalancer => "Kubernetes service lb portal",
            Set::LoadBalancerFw => "Kubernetes service load balancer ip + port for load balancer with sourceRange",
            Set::LoadBalancerLocal => "Kubernetes service load balancer ip + port with externalTrafficPolicy=local",
            Set::LoadBalancerSourceIp => "Kubernetes service load balancer ip + port + source IP for packet filter purpose",
            Set::LoadBalancerSourceCidr => "Kubernetes service load balancer ip + port + source cidr for packet filter purpose",
            Set::NodePortTcp => "Kubernetes nodeport TCP port for masquerade purpose",
            Set::NodePortLocalTcp => "Kubernetes nodeport TCP port with externalTrafficPolicy=local",
            Set::NodePortUdp => "Kubernetes nodeport UDP port for masquerade purpose",
            Set::NodePortLocalUdp => "Kubernetes nodeport UDP port with externalTrafficPolicy=local",
            Set::NodePortSctp => "Kubernetes nodeport SCTP port for masquerade purpose with type 'hash ip:port'",
            Set::NodePortLocalSctp => "Kubernetes nodeport SCTP port with externalTrafficPolicy=local with type 'hash ip:port'",
            Set::HealthCheckNodePort => "Kubernetes health check node port",
            Set::IpvsIps => "Kubernetes service addresses on kube-ipvs0",
        }
    }

    /// Every set name of both families (what `--cleanup` destroys).
    pub fn all_names() -> Vec<String> {
        IpFamily::ALL
            .iter()
            .flat_map(|f| Set::ALL.iter().map(move |s| s.name(*f)))
            .collect()
    }
}

pub const KUBE_SERVICES: &str = "KUBE-SERVICES";
pub const KUBE_POSTROUTING: &str = "KUBE-POSTROUTING";
pub const KUBE_NODE_PORT: &str = "KUBE-NODE-PORT";
pub const KUBE_LOAD_BALANCER: &str = "KUBE-LOAD-BALANCER";
pub const KUBE_MARK_MASQ: &str = "KUBE-MARK-MASQ";
pub const KUBE_FORWARD: &str = "KUBE-FORWARD";
pub const KUBE_PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
pub const KUBE_SOURCE_RANGES_FIREWALL: &str = "KUBE-SOURCE-RANGES-FIREWALL";
pub const KUBE_IPVS_FILTER: &str = "KUBE-IPVS-FILTER";
pub const KUBE_IPVS_OUT_FILTER: &str = "KUBE-IPVS-OUT-FILTER";

/// Our chains per table, in upstream's order.
pub const NAT_CHAINS: [&str; 5] = [
    KUBE_SERVICES,
    KUBE_POSTROUTING,
    KUBE_NODE_PORT,
    KUBE_LOAD_BALANCER,
    KUBE_MARK_MASQ,
];
pub const FILTER_CHAINS: [&str; 6] = [
    KUBE_FORWARD,
    KUBE_NODE_PORT,
    KUBE_PROXY_FIREWALL,
    KUBE_SOURCE_RANGES_FIREWALL,
    KUBE_IPVS_FILTER,
    KUBE_IPVS_OUT_FILTER,
];

/// The jumps from the built-in chains: (table, from, to, comment), inserted first.
pub const JUMPS: [(&str, &str, &str, &str); 9] = [
    ("nat", "OUTPUT", KUBE_SERVICES, "kubernetes service portals"),
    (
        "nat",
        "PREROUTING",
        KUBE_SERVICES,
        "kubernetes service portals",
    ),
    (
        "nat",
        "POSTROUTING",
        KUBE_POSTROUTING,
        "kubernetes postrouting rules",
    ),
    (
        "filter",
        "FORWARD",
        KUBE_FORWARD,
        "kubernetes forwarding rules",
    ),
    (
        "filter",
        "INPUT",
        KUBE_NODE_PORT,
        "kubernetes health check rules",
    ),
    (
        "filter",
        "INPUT",
        KUBE_PROXY_FIREWALL,
        "kube-proxy firewall rules",
    ),
    (
        "filter",
        "FORWARD",
        KUBE_PROXY_FIREWALL,
        "kube-proxy firewall rules",
    ),
    (
        "filter",
        "INPUT",
        KUBE_IPVS_FILTER,
        "kubernetes ipvs access filter",
    ),
    (
        "filter",
        "OUTPUT",
        KUBE_IPVS_OUT_FILTER,
        "kubernetes ipvs access filter",
    ),
];
