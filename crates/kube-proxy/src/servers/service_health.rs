//! Per-service health-check node ports (reference §2.4 "healthCheckNodePort", §6.4): for
//! every `type: LoadBalancer` Service with `externalTrafficPolicy: Local`, an HTTP server on
//! its `healthCheckNodePort` tells the cloud load balancer whether this node has a local,
//! ready endpoint: 200 with the count if so (and the proxy itself is healthy), 503
//! otherwise, so the LB sends traffic only to nodes that can serve it without a second hop.
//!
//! * Listens on the `nodePortAddresses` (all addresses, one dual-stack socket, when every
//!   address matches). Any method, any path.
//! * The count is the number of distinct local **ready** endpoint IPs of the Service over
//!   all its ports, of the family the request arrived on (as upstream's per-family servers).
//!   Serving-but-terminating endpoints do not count, so a draining node reports 503.
//! * Listeners are opened, moved and closed as Services, ports and node addresses change;
//!   a Service that goes away has its socket closed at once.
//!
//! What to serve is computed by pure functions ([`target_for`], [`reply`],
//! [`listen_addresses`]); [`HealthCheckServers`] owns the sockets.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use hyper::StatusCode;
use kube_proxy_config::NodePortAddresses;
use kube_proxy_model::endpoints::merge_slices;
use kube_proxy_model::{ClusterState, IpFamily, NamespacedName, NodeView};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::servers::health::HealthState;

/// What one Service's health check serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub port: u16,
    /// Distinct local ready endpoint IPs per family.
    pub local_endpoints: BTreeMap<IpFamily, usize>,
}

/// The health check of `service`, if it needs one.
pub fn target_for(state: &ClusterState, service: &NamespacedName) -> Option<Target> {
    let port = state
        .service_ports(service)
        .iter()
        .find_map(|p| p.health_check_node_port)?
        .get();
    let mut ips: BTreeMap<IpFamily, HashSet<IpAddr>> = BTreeMap::new();
    for family in IpFamily::ALL {
        let endpoints = merge_slices(
            state.slices_of(service).filter(|s| s.family == family),
            state.node_name(),
        );
        for endpoint in endpoints.values().flatten() {
            if endpoint.is_local && endpoint.ready {
                ips.entry(family).or_default().insert(endpoint.ip);
            }
        }
    }
    Some(Target {
        port,
        local_endpoints: ips.into_iter().map(|(f, set)| (f, set.len())).collect(),
    })
}

/// Status and body of a health-check reply (upstream's exact text: tab-indented JSON).
pub fn reply(
    service: &NamespacedName,
    local_endpoints: usize,
    proxy_healthy: bool,
) -> (StatusCode, String) {
    let status = if local_endpoints > 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let body = format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {local_endpoints},\n\t\"serviceProxyHealthy\": {proxy_healthy}\n}}",
        quote(&service.namespace),
        quote(&service.name)
    );
    (status, body)
}

/// Where health-check servers listen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenOn {
    /// Every address: one dual-stack wildcard socket.
    Wildcard,
    /// Per family: every address of the family (its wildcard, `0.0.0.0` or `::` IPv6-only),
    /// or these addresses.
    PerFamily(Vec<(IpFamily, Option<Vec<IpAddr>>)>),
}

impl ListenOn {
    /// The sockets to bind for `port`. Link-local IPv6 addresses are left out: they are
    /// bound only with their interface's scope, and a load balancer never probes them.
    fn sockets(&self, port: u16) -> Vec<SocketAddr> {
        match self {
            ListenOn::Wildcard => vec![SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)],
            ListenOn::PerFamily(families) => families
                .iter()
                .flat_map(|(family, addresses)| match addresses {
                    None => vec![SocketAddr::new(family.unspecified(), port)],
                    Some(ips) => ips
                        .iter()
                        .filter(|ip| !is_unscoped_link_local(ip))
                        .map(|ip| SocketAddr::new(*ip, port))
                        .collect(),
                })
                .collect(),
        }
    }
}

fn is_unscoped_link_local(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}

/// The addresses selected by `nodePortAddresses`, per family: a family the setting does not
/// restrict (no CIDR of it in the list, as upstream) listens on all its addresses.
pub fn listen_addresses(
    setting: &NodePortAddresses,
    views: &BTreeMap<IpFamily, NodeView>,
) -> ListenOn {
    if *setting == NodePortAddresses::All {
        return ListenOn::Wildcard;
    }
    ListenOn::PerFamily(
        views
            .iter()
            .map(|(family, view)| {
                let selected = setting.select(
                    *family == IpFamily::V6,
                    &view.node_ips,
                    &view.local_addresses,
                );
                (*family, selected)
            })
            .collect(),
    )
}

/// One Service's running server.
struct Instance {
    port: u16,
    counts: Arc<Mutex<BTreeMap<IpFamily, usize>>>,
    stop: CancellationToken,
    bound: Vec<SocketAddr>,
    /// Addresses that could not be bound yet (retried at every sync).
    unbound: Vec<SocketAddr>,
}

/// Opens, updates and closes the health-check servers.
pub struct HealthCheckServers {
    runtime: tokio::runtime::Handle,
    health: HealthState,
    setting: NodePortAddresses,
    listen: Option<ListenOn>,
    targets: BTreeMap<NamespacedName, Target>,
    running: BTreeMap<NamespacedName, Instance>,
}

impl HealthCheckServers {
    /// Servers run on `runtime`; `health` gives the proxy's own health for the replies.
    pub fn new(
        runtime: tokio::runtime::Handle,
        health: HealthState,
        setting: NodePortAddresses,
    ) -> Self {
        HealthCheckServers {
            runtime,
            health,
            setting,
            listen: None,
            targets: BTreeMap::new(),
            running: BTreeMap::new(),
        }
    }

    /// The ports currently served, by Service.
    pub fn serving(&self) -> BTreeMap<NamespacedName, (u16, Vec<SocketAddr>)> {
        self.running
            .iter()
            .map(|(name, i)| (name.clone(), (i.port, i.bound.clone())))
            .collect()
    }

    /// Brings the servers in line with `state`: re-evaluates the `changed` Services (every
    /// Service when `full`), then opens what is missing (including servers that could not
    /// bind before), closes what is no longer wanted, and moves all servers when the
    /// listening addresses changed.
    pub fn sync(
        &mut self,
        state: &ClusterState,
        changed: &BTreeSet<NamespacedName>,
        full: bool,
        views: &BTreeMap<IpFamily, NodeView>,
    ) {
        if full {
            self.targets = state
                .service_names()
                .filter_map(|name| Some((name.clone(), target_for(state, name)?)))
                .collect();
        } else {
            for name in changed {
                match target_for(state, name) {
                    Some(target) => self.targets.insert(name.clone(), target),
                    None => self.targets.remove(name),
                };
            }
        }
        let listen = listen_addresses(&self.setting, views);
        if self.listen.as_ref() != Some(&listen) {
            if self.listen.is_some() {
                info!(addresses = ?listen, "Node port addresses changed; moving the health-check servers");
            }
            for (_, instance) in std::mem::take(&mut self.running) {
                instance.stop.cancel();
            }
            self.listen = Some(listen.clone());
        }
        // Close what is gone or moved to another port.
        let stale: Vec<NamespacedName> = self
            .running
            .iter()
            .filter(|(name, instance)| {
                self.targets.get(*name).map(|t| t.port) != Some(instance.port)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let Some(instance) = self.running.remove(&name) {
                instance.stop.cancel();
                info!(service = %name, port = instance.port, "Closed health check node port");
            }
        }
        for (name, target) in &self.targets {
            match self.running.remove(name) {
                Some(mut instance) => {
                    *instance.counts.lock().unwrap() = target.local_endpoints.clone();
                    if !instance.unbound.is_empty() {
                        self.bind_missing(name, &mut instance, &listen);
                    }
                    self.running.insert(name.clone(), instance);
                }
                None => {
                    if let Some(instance) = self.open(name, target, &listen) {
                        self.running.insert(name.clone(), instance);
                    }
                }
            }
        }
    }

    fn open(&self, name: &NamespacedName, target: &Target, listen: &ListenOn) -> Option<Instance> {
        let mut instance = Instance {
            port: target.port,
            counts: Arc::new(Mutex::new(target.local_endpoints.clone())),
            stop: CancellationToken::new(),
            bound: Vec::new(),
            unbound: listen.sockets(target.port),
        };
        self.bind_missing(name, &mut instance, listen);
        if instance.bound.is_empty() {
            instance.stop.cancel();
            return None;
        }
        info!(service = %name, port = target.port, addresses = ?instance.bound, "Opened health check node port");
        debug!(service = %name, local_endpoints = ?target.local_endpoints, "Health check counts");
        Some(instance)
    }

    /// Binds and serves the addresses of `instance` not bound yet. One address that cannot
    /// be bound (taken, not configured yet) must not take the others down: it is retried at
    /// the next sync.
    fn bind_missing(&self, name: &NamespacedName, instance: &mut Instance, listen: &ListenOn) {
        let dual_stack = *listen == ListenOn::Wildcard;
        for address in std::mem::take(&mut instance.unbound) {
            let bound = bind(address, dual_stack).or_else(|e| match dual_stack {
                // A host without IPv6: all IPv4 addresses instead.
                true => bind(
                    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), address.port()),
                    false,
                ),
                false => Err(e),
            });
            let listener = match bound {
                Ok(listener) => listener,
                Err(error) => {
                    warn!(
                        service = %name,
                        address = %address,
                        error = %error,
                        "Cannot open the health check node port on this address; load balancers probing it will see this node as unhealthy for the Service. Retrying at the next sync"
                    );
                    instance.unbound.push(address);
                    continue;
                }
            };
            if let Ok(local) = listener.local_addr() {
                instance.bound.push(local);
            }
            let handler = self.handler(name.clone(), instance.counts.clone());
            let stop = instance.stop.clone();
            self.runtime.spawn(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => crate::servers::http::serve(listener, handler, stop).await,
                    Err(e) => warn!(error = %e, "Cannot serve a health check node port"),
                }
            });
        }
    }

    fn handler(
        &self,
        name: NamespacedName,
        counts: Arc<Mutex<BTreeMap<IpFamily, usize>>>,
    ) -> crate::servers::http::Handler {
        let health = self.health.clone();
        Arc::new(move |req| {
            // The family of the address the request arrived on (IPv4-mapped is IPv4).
            let family = match req.local.map(|a| a.ip()) {
                Some(IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_none() => IpFamily::V6,
                _ => IpFamily::V4,
            };
            let count = counts.lock().unwrap().get(&family).copied().unwrap_or(0);
            let healthy = health
                .status
                .lock()
                .unwrap()
                .healthy(SystemTime::now(), health.timeout);
            let (status, body) = reply(&name, count, healthy);
            let mut response = crate::servers::http::with_type(status, "application/json", body);
            if let Ok(value) = count.to_string().parse() {
                response
                    .headers_mut()
                    .insert("X-Load-Balancing-Endpoint-Weight", value);
            }
            response
        })
    }
}

/// A listening socket on `address`. IPv6 sockets are IPv6-only unless `dual_stack`, so that an
/// IPv6 wildcard and IPv4 addresses can be bound side by side.
fn bind(address: SocketAddr, dual_stack: bool) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if address.is_ipv6() {
        socket.set_only_v6(!dual_stack)?;
    }
    socket.bind(&address.into())?;
    socket.listen(128)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

impl Drop for HealthCheckServers {
    fn drop(&mut self) {
        for instance in self.running.values() {
            instance.stop.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn state() -> ClusterState {
        let mut state = ClusterState::new("node-a");
        let svc = serde_json::from_value(json!({"metadata": {"namespace": "ns", "name": "lb"},
            "spec": {"type": "LoadBalancer", "clusterIP": "198.19.0.9", "clusterIPs": ["198.19.0.9", "2001:db8:19::9"],
                     "ipFamilies": ["IPv4", "IPv6"], "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000,
                     "ports": [{"name": "p", "port": 80, "nodePort": 30080}, {"name": "q", "port": 81, "nodePort": 30081}]}}))
        .unwrap();
        state.apply_service(&svc);
        for (family, ips) in [
            (
                "IPv4",
                ["198.18.1.2", "198.18.1.3", "198.18.2.2", "198.18.1.4"],
            ),
            (
                "IPv6",
                [
                    "2001:db8:18:1::2",
                    "2001:db8:18:1::3",
                    "2001:db8:18:2::2",
                    "2001:db8:18:1::4",
                ],
            ),
        ] {
            let slice = serde_json::from_value(json!({"metadata": {"namespace": "ns", "name": format!("lb-{family}"),
                    "labels": {"kubernetes.io/service-name": "lb"}},
                "addressType": family,
                "ports": [{"name": "p", "port": 8080}, {"name": "q", "port": 8081}],
                "endpoints": [
                    {"addresses": [ips[0]], "nodeName": "node-a"},
                    {"addresses": [ips[1]], "nodeName": "node-a", "conditions": {"ready": false, "serving": true, "terminating": true}},
                    {"addresses": [ips[2]], "nodeName": "node-b"},
                    {"addresses": [ips[3]], "nodeName": "node-a"}]}))
            .unwrap();
            state.apply_slice(&slice);
        }
        state
    }

    #[test]
    fn counts_distinct_local_ready_ips_per_family() {
        let state = state();
        let name = NamespacedName::new("ns", "lb");
        let target = target_for(&state, &name).unwrap();
        assert_eq!(target.port, 32000);
        // Two local ready IPs (over both ports); the terminating and the remote ones don't count.
        assert_eq!(
            target.local_endpoints,
            BTreeMap::from([(IpFamily::V4, 2), (IpFamily::V6, 2)])
        );
        assert_eq!(
            target_for(&state, &NamespacedName::new("ns", "other")),
            None
        );
    }

    #[test]
    fn reply_is_upstreams() {
        let name = NamespacedName::new("ns", "lb");
        let (status, body) = reply(&name, 2, true);
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            "{\n\t\"service\": {\n\t\t\"namespace\": \"ns\",\n\t\t\"name\": \"lb\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
        let parsed: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(parsed["service"]["name"], "lb");
        assert_eq!(reply(&name, 0, true).0, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(reply(&name, 3, false).0, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn listen_addresses_follow_node_port_addresses() {
        let views = BTreeMap::from([
            (
                IpFamily::V4,
                NodeView {
                    node_ips: vec!["192.0.2.10".parse().unwrap()],
                    pod_cidrs: vec![],
                    local_addresses: vec![
                        "127.0.0.1".parse().unwrap(),
                        "192.0.2.10".parse().unwrap(),
                        "198.51.100.3".parse().unwrap(),
                    ],
                },
            ),
            (
                IpFamily::V6,
                NodeView {
                    node_ips: vec!["2001:db8:2::10".parse().unwrap()],
                    pod_cidrs: vec![],
                    local_addresses: vec![
                        "::1".parse().unwrap(),
                        "2001:db8:2::10".parse().unwrap(),
                    ],
                },
            ),
        ]);
        let ips = |list: &[&str]| Some(list.iter().map(|s| s.parse().unwrap()).collect());
        assert_eq!(
            listen_addresses(&NodePortAddresses::All, &views),
            ListenOn::Wildcard
        );
        assert_eq!(
            listen_addresses(&NodePortAddresses::Primary, &views),
            ListenOn::PerFamily(vec![
                (IpFamily::V4, ips(&["192.0.2.10"])),
                (IpFamily::V6, ips(&["2001:db8:2::10"]))
            ])
        );
        // A family without a CIDR listens on all its addresses (its wildcard), as upstream;
        // the IPv6 wildcard is IPv6-only, so it and the IPv4 address bind side by side.
        let v4_only = listen_addresses(
            &NodePortAddresses::Cidrs(vec!["198.51.100.0/24".parse().unwrap()]),
            &views,
        );
        assert_eq!(
            v4_only,
            ListenOn::PerFamily(vec![
                (IpFamily::V4, ips(&["198.51.100.3"])),
                (IpFamily::V6, None)
            ])
        );
        assert_eq!(
            v4_only.sockets(32000),
            vec![
                "198.51.100.3:32000".parse::<SocketAddr>().unwrap(),
                "[::]:32000".parse().unwrap()
            ]
        );
        // Link-local addresses cannot be bound without their interface: left out.
        let link_local =
            ListenOn::PerFamily(vec![(IpFamily::V6, ips(&["fe80::1", "2001:db8:2::10"]))]);
        assert_eq!(
            link_local.sockets(1),
            vec!["[2001:db8:2::10]:1".parse::<SocketAddr>().unwrap()]
        );
    }
}
