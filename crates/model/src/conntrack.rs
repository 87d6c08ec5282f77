//! Which UDP conntrack entries are stale (upstream's `CleanStaleEntries`, reference §2.4).
//!
//! UDP has no connection teardown, so an entry created towards a Service keeps sending a
//! client's packets (same source port) to whatever it was DNATed to, or keeps them
//! black-holed if it was created while the Service had no endpoint. After a sync, an entry is
//! stale when its original destination is a UDP Service frontend (cluster IP, external IP or
//! load-balancer IP with the port, or a NodePort on this node) and its reply source, the
//! endpoint it was DNATed to, is not a serving endpoint of that Service port any more.
//!
//! Deliberately like upstream: serving endpoints are taken from all of the port's
//! endpoints (traffic policies, topology and terminating state do not matter, so UDP keeps
//! the semantics of TCP, whose established connections also survive such changes).
//! More precise than upstream: frontends are matched with their port (upstream matches the
//! IP alone), and NodePort entries only when addressed to this host.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use crate::endpoints::merge_slices;
use crate::names::{IpFamily, Protocol};
use crate::state::ClusterState;

/// The fields of a conntrack entry the decision needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowKey {
    /// Original direction destination (what the client sent to).
    pub orig_dst: IpAddr,
    pub orig_dst_port: u16,
    /// Reply direction source (the endpoint the flow was DNATed to, or the original
    /// destination if it was not translated).
    pub reply_src: IpAddr,
}

/// UDP frontends of one family with the serving endpoint IPs behind each.
#[derive(Clone, Debug, Default)]
pub struct StaleFlowFilter {
    frontends: HashMap<(IpAddr, u16), HashSet<IpAddr>>,
    node_ports: HashMap<u16, HashSet<IpAddr>>,
    local_addresses: HashSet<IpAddr>,
}

impl StaleFlowFilter {
    /// Collects the UDP service ports of `family`; `local_addresses` are this host's
    /// addresses (where NodePort traffic is addressed).
    pub fn build(state: &ClusterState, family: IpFamily, local_addresses: &[IpAddr]) -> Self {
        let mut filter = StaleFlowFilter {
            local_addresses: local_addresses.iter().copied().collect(),
            ..Default::default()
        };
        for service in state.service_names() {
            let udp_ports: Vec<_> = state
                .service_ports(service)
                .iter()
                .filter(|p| p.family == family && p.protocol == Protocol::Udp)
                .collect();
            if udp_ports.is_empty() {
                continue;
            }
            let endpoints = merge_slices(
                state.slices_of(service).filter(|s| s.family == family),
                state.node_name(),
            );
            for port in udp_ports {
                let serving: HashSet<IpAddr> = endpoints
                    .get(&port.name)
                    .into_iter()
                    .flatten()
                    .filter(|e| e.serving)
                    .map(|e| e.ip)
                    .collect();
                let ips = std::iter::once(port.cluster_ip)
                    .chain(port.external_ips.iter().copied())
                    .chain(port.load_balancer_vips.iter().copied());
                for ip in ips {
                    filter.frontends.insert((ip, port.port), serving.clone());
                }
                if let Some(node_port) = port.node_port {
                    filter.node_ports.insert(node_port.get(), serving);
                }
            }
        }
        filter
    }

    /// Whether there is any UDP frontend at all (nothing to look at otherwise).
    pub fn is_empty(&self) -> bool {
        self.frontends.is_empty() && self.node_ports.is_empty()
    }

    /// Whether a UDP entry is stale and must be deleted.
    pub fn is_stale(&self, flow: &FlowKey) -> bool {
        if let Some(serving) = self.frontends.get(&(flow.orig_dst, flow.orig_dst_port)) {
            return !serving.contains(&flow.reply_src);
        }
        if let Some(serving) = self.node_ports.get(&flow.orig_dst_port) {
            return self.local_addresses.contains(&flow.orig_dst)
                && !serving.contains(&flow.reply_src);
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn state() -> ClusterState {
        let mut state = ClusterState::new("node-a");
        let svc = serde_json::from_value(json!({"metadata": {"namespace": "ns", "name": "dns"},
            "spec": {"type": "NodePort", "clusterIP": "198.19.0.10", "externalIPs": ["198.51.100.7"],
                     "ports": [{"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053},
                               {"name": "tcp", "port": 53, "protocol": "TCP", "nodePort": 30054}]}}))
        .unwrap();
        state.apply_service(&svc);
        let slice = serde_json::from_value(json!({"metadata": {"namespace": "ns", "name": "dns-1",
                "labels": {"kubernetes.io/service-name": "dns"}},
            "addressType": "IPv4",
            "ports": [{"name": "dns", "port": 5353, "protocol": "UDP"}, {"name": "tcp", "port": 5353, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["198.18.1.2"], "nodeName": "node-a"},
                {"addresses": ["198.18.2.2"], "nodeName": "node-b", "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["198.18.2.3"], "conditions": {"ready": false, "serving": false}}]}))
        .unwrap();
        state.apply_slice(&slice);
        state
    }

    fn flow(dst: &str, port: u16, reply_src: &str) -> FlowKey {
        FlowKey {
            orig_dst: dst.parse().unwrap(),
            orig_dst_port: port,
            reply_src: reply_src.parse().unwrap(),
        }
    }

    #[test]
    fn stale_when_not_dnated_to_a_serving_endpoint() {
        let filter =
            StaleFlowFilter::build(&state(), IpFamily::V4, &["192.0.2.10".parse().unwrap()]);
        // Cluster IP: ready and serving-terminating endpoints are live, others stale.
        assert!(!filter.is_stale(&flow("198.19.0.10", 53, "198.18.1.2")));
        assert!(!filter.is_stale(&flow("198.19.0.10", 53, "198.18.2.2")));
        assert!(
            filter.is_stale(&flow("198.19.0.10", 53, "198.18.2.3")),
            "not serving"
        );
        assert!(
            filter.is_stale(&flow("198.19.0.10", 53, "198.18.9.9")),
            "gone"
        );
        // Created while there were no endpoints: never translated, reply from the VIP.
        assert!(filter.is_stale(&flow("198.19.0.10", 53, "198.19.0.10")));
        // External IP and NodePort on this host.
        assert!(filter.is_stale(&flow("198.51.100.7", 53, "198.18.9.9")));
        assert!(!filter.is_stale(&flow("198.51.100.7", 53, "198.18.1.2")));
        assert!(filter.is_stale(&flow("192.0.2.10", 30053, "198.18.9.9")));
        assert!(!filter.is_stale(&flow("192.0.2.10", 30053, "198.18.1.2")));
        // Not ours: another port of the VIP, a NodePort-numbered port elsewhere, TCP ports.
        assert!(!filter.is_stale(&flow("198.19.0.10", 54, "198.18.9.9")));
        assert!(!filter.is_stale(&flow("203.0.113.5", 30053, "203.0.113.5")));
        assert!(!filter.is_stale(&flow("192.0.2.10", 30054, "198.18.9.9")));
        assert!(StaleFlowFilter::build(&state(), IpFamily::V6, &[]).is_empty());
    }
}
