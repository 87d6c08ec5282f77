//! The rules of one service port, as upstream's iptables proxier writes them (§4.2 of the
//! reference): dispatch rules in `KUBE-SERVICES`/`KUBE-NODEPORTS` (nat), REJECT/DROP and
//! firewall rules in the filter table, and the port's own chains (`KUBE-SVC`, `KUBE-SVL`,
//! `KUBE-EXT`, `KUBE-FW`, `KUBE-SEP`).
//!
//! Every decision comes from the plan and the family context; this module only spells them.

use std::net::IpAddr;
use std::sync::Arc;

use kube_proxy_model::context::{FamilyContext, LocalTraffic};
use kube_proxy_model::plan::{EndpointSet, ServicePortPlan, Target};
use kube_proxy_model::Endpoint;

use crate::names;
use crate::probability::probability;

pub const KUBE_SERVICES: &str = "KUBE-SERVICES";
pub const KUBE_EXTERNAL_SERVICES: &str = "KUBE-EXTERNAL-SERVICES";
pub const KUBE_NODEPORTS: &str = "KUBE-NODEPORTS";
pub const KUBE_PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
pub const KUBE_MARK_MASQ: &str = "KUBE-MARK-MASQ";

/// Rules of one service port, per table: (chain, rule arguments after `-A <chain>`), in the
/// order they are written, and the port's own nat chains.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortRules {
    pub filter: Vec<(&'static str, String)>,
    pub nat: Vec<(String, String)>,
    /// The port's own nat chains (declared, then filled by `nat` rules).
    pub chains: Vec<String>,
}

/// `-m <p> -p <p>`.
fn proto_match(plan: &ServicePortPlan) -> String {
    let p = plan.port.protocol.lower();
    format!("-m {p} -p {p}")
}

fn host(ip: IpAddr) -> String {
    ip.to_string()
}

/// `ip:port`, IPv6 in brackets.
fn endpoint_text(ep: &Endpoint) -> String {
    std::net::SocketAddr::new(ep.ip, ep.port).to_string()
}

/// Whether traffic of `target` has somewhere to go.
fn has(target: Target) -> bool {
    matches!(target, Target::Endpoints(_))
}

/// The filter verdict for a target without endpoints.
fn no_endpoints(name: &str, target: Target) -> (String, &'static str) {
    match target {
        Target::Drop => (format!("{name} has no local endpoints"), "DROP"),
        _ => (format!("{name} has no endpoints"), "REJECT"),
    }
}

/// `! -s <cidrs>` / `! -i <if>` (negated) or `-s` / `-i` for traffic from local pods.
fn local_match(local: &LocalTraffic, negate: bool) -> Vec<String> {
    let not = if negate { "! " } else { "" };
    match local {
        LocalTraffic::FromCidrs(cidrs) => cidrs.iter().map(|c| format!("{not}-s {c}")).collect(),
        LocalTraffic::FromInterface(name) => vec![format!("{not}-i {name}")],
        LocalTraffic::FromInterfacePrefix(prefix) => vec![format!("{not}-i {prefix}+")],
    }
}

/// Past this many endpoints in all, the per-endpoint rules go without their comment
/// (upstream's large-cluster mode: the restore input shrinks by about 40%).
pub const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

/// How the rules are spelled, beyond what the plan decides.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Style {
    /// Large-cluster mode ([`LARGE_CLUSTER_ENDPOINTS`]): no comment on the endpoint
    /// selection rules and in the `KUBE-SEP` chains.
    pub large_cluster: bool,
    /// The nfacct counters exist: the INVALID drop and localhost NodePorts count packets
    /// (`-m nfacct`), as upstream.
    pub nfacct: bool,
}

/// The nfacct counter of packets accepted on localhost NodePorts.
pub const LOCALHOST_NODEPORTS_COUNTER: &str = "localhost_nps_accepted_pkts";
/// The nfacct counter of packets the INVALID rule drops.
pub const INVALID_DROPPED_COUNTER: &str = "ct_state_invalid_dropped_pkts";

/// The rules of one service port, in the default style.
pub fn render(plan: &ServicePortPlan, ctx: &FamilyContext) -> PortRules {
    render_in(plan, ctx, Style::default())
}

/// The rules of one service port, spelled in `style`.
pub fn render_in(plan: &ServicePortPlan, ctx: &FamilyContext, style: Style) -> PortRules {
    let mut out = PortRules::default();
    let port = &plan.port;
    let name = port.name.to_string();
    let proto = proto_match(plan);
    let dport = port.port;
    let served = |ip: IpAddr| {
        plan.serves(&kube_proxy_model::Frontend::Address(
            ip,
            port.protocol,
            port.port,
        ))
    };

    let svc_chain = names::service_chain(&port.name);
    let svl_chain = names::local_chain(&port.name);
    let ext_chain = names::external_chain(&port.name);
    let fw_chain = names::firewall_chain(&port.name);
    let uses_cluster_chain = !plan.cluster_endpoints.is_empty() && port.uses_cluster_endpoints();
    let uses_local_chain = !plan.local_endpoints.is_empty() && port.uses_local_endpoints();
    let chain_of = |set: EndpointSet| match set {
        EndpointSet::Cluster => svc_chain.clone(),
        EndpointSet::Local => svl_chain.clone(),
    };
    let uses_ext_chain = plan.has_endpoints && plan.external.is_some();
    let uses_fw_chain = uses_ext_chain
        && !port.load_balancer_source_ranges.is_empty()
        && !port.load_balancer_vips.is_empty();

    // ClusterIP.
    if served(port.cluster_ip) {
        let cip = host(port.cluster_ip);
        match plan.internal {
            Target::Endpoints(set) => out.nat.push((
                KUBE_SERVICES.into(),
                format!(
                    "-m comment --comment \"{name} cluster IP\" {proto} -d {cip} --dport {dport} -j {}",
                    chain_of(set)
                ),
            )),
            other => {
                let (comment, verdict) = no_endpoints(&name, other);
                out.filter.push((
                    KUBE_SERVICES,
                    format!("-m comment --comment \"{comment}\" {proto} -d {cip} --dport {dport} -j {verdict}"),
                ));
            }
        }
    }

    // External IPs, load-balancer IPs, NodePort.
    if let Some(ext) = &plan.external {
        let to_outside = ext.from_outside;
        // `matches`: what selects the frontend's packets (protocol and destination).
        let external_filter = |out: &mut PortRules, matches: String| {
            if !has(to_outside) {
                let (comment, verdict) = no_endpoints(&name, to_outside);
                out.filter.push((
                    KUBE_EXTERNAL_SERVICES,
                    format!("-m comment --comment \"{comment}\" {matches} -j {verdict}"),
                ));
            }
        };
        for ip in port.external_ips.iter().copied().filter(|ip| served(*ip)) {
            let d = format!("{proto} -d {} --dport {dport}", host(ip));
            if uses_ext_chain {
                out.nat.push((
                    KUBE_SERVICES.into(),
                    format!("-m comment --comment \"{name} external IP\" {d} -j {ext_chain}"),
                ));
            }
            external_filter(&mut out, d);
        }
        for ip in port
            .load_balancer_vips
            .iter()
            .copied()
            .filter(|ip| served(*ip))
        {
            let d = format!("{proto} -d {} --dport {dport}", host(ip));
            if uses_ext_chain {
                let target = if uses_fw_chain { &fw_chain } else { &ext_chain };
                out.nat.push((
                    KUBE_SERVICES.into(),
                    format!("-m comment --comment \"{name} loadbalancer IP\" {d} -j {target}"),
                ));
            }
            if uses_fw_chain {
                out.filter.push((
                    KUBE_PROXY_FIREWALL,
                    format!("-m comment --comment \"{name} traffic not accepted by {fw_chain}\" {d} -j DROP"),
                ));
            }
            external_filter(&mut out, d);
        }
        if let Some(node_port) = port.node_port.filter(|np| {
            plan.serves(&kube_proxy_model::Frontend::NodePort(
                port.protocol,
                np.get(),
            ))
        }) {
            if uses_ext_chain {
                if style.nfacct && ctx.localhost_nodeports {
                    // Counted separately, as upstream (then the same way as the rule below).
                    out.nat.push((
                        KUBE_NODEPORTS.into(),
                        format!(
                            "-m comment --comment {name} {proto} -d 127.0.0.0/8 --dport {node_port} -m nfacct --nfacct-name {LOCALHOST_NODEPORTS_COUNTER} -j {ext_chain}"
                        ),
                    ));
                }
                out.nat.push((
                    KUBE_NODEPORTS.into(),
                    format!(
                        "-m comment --comment {name} {proto} --dport {node_port} -j {ext_chain}"
                    ),
                ));
            }
            external_filter(
                &mut out,
                format!("-m addrtype --dst-type LOCAL {proto} --dport {node_port}"),
            );
        }
        if let Some(hc) = port.health_check_node_port {
            out.filter.push((
                KUBE_NODEPORTS,
                format!("-m comment --comment \"{name} health check node port\" -m tcp -p tcp --dport {hc} -j ACCEPT"),
            ));
        }

        if uses_ext_chain {
            out.chains.push(ext_chain.clone());
            let mut ext_rules = Vec::new();
            if ext.policy_local {
                if let Some(local) = &ctx.local {
                    for m in local_match(local, false) {
                        ext_rules.push(format!("-m comment --comment \"pod traffic for {name} external destinations\" {m} -j {svc_chain}"));
                    }
                }
                ext_rules.push(format!("-m comment --comment \"masquerade LOCAL traffic for {name} external destinations\" -m addrtype --src-type LOCAL -j {KUBE_MARK_MASQ}"));
                ext_rules.push(format!("-m comment --comment \"route LOCAL traffic for {name} external destinations\" -m addrtype --src-type LOCAL -j {svc_chain}"));
            } else {
                ext_rules.push(format!("-m comment --comment \"masquerade traffic for {name} external destinations\" -j {KUBE_MARK_MASQ}"));
            }
            if let Target::Endpoints(set) = to_outside {
                ext_rules.push(format!("-j {}", chain_of(set)));
            }
            out.nat
                .extend(ext_rules.into_iter().map(|r| (ext_chain.clone(), r)));
        }
        if uses_fw_chain {
            out.chains.push(fw_chain.clone());
            let mut sources: Vec<String> = port
                .load_balancer_source_ranges
                .iter()
                .map(|r| r.to_string())
                .collect();
            if ctx.lb_ips_allowed_as_sources(&port.load_balancer_source_ranges) {
                sources.extend(port.load_balancer_vips.iter().map(|ip| host(*ip)));
            }
            for source in sources {
                out.nat.push((
                    fw_chain.clone(),
                    format!("-m comment --comment \"{name} loadbalancer IP\" -s {source} -j {ext_chain}"),
                ));
            }
            out.nat.push((
                fw_chain.clone(),
                format!("-m comment --comment \"other traffic to {name} will be dropped by KUBE-PROXY-FIREWALL\""),
            ));
        }
    }

    // Endpoint selection chains; the internal-traffic one masquerades off-cluster clients.
    let internal_chain = match plan.internal {
        Target::Endpoints(set) => Some(chain_of(set)),
        _ => None,
    };
    for (uses, chain, endpoints) in [
        (uses_cluster_chain, &svc_chain, &plan.cluster_endpoints),
        (uses_local_chain, &svl_chain, &plan.local_endpoints),
    ] {
        if !uses {
            continue;
        }
        out.chains.push(chain.clone());
        if internal_chain.as_ref() == Some(chain) {
            let cip = host(port.cluster_ip);
            let base = format!(
                "-m comment --comment \"{name} cluster IP\" {proto} -d {cip} --dport {dport}"
            );
            if ctx.masquerade_all {
                out.nat
                    .push((chain.clone(), format!("{base} -j {KUBE_MARK_MASQ}")));
            } else if let Some(local) = &ctx.local {
                for m in local_match(local, true) {
                    out.nat
                        .push((chain.clone(), format!("{base} {m} -j {KUBE_MARK_MASQ}")));
                }
            }
        }
        render_selection(&mut out, plan, &name, chain, endpoints, style);
    }
    out
}

/// The endpoint rules of a selection chain (affinity checks first, then one rule per
/// endpoint with its probability), and each endpoint's `KUBE-SEP` chain.
fn render_selection(
    out: &mut PortRules,
    plan: &ServicePortPlan,
    name: &str,
    chain: &str,
    endpoints: &[Arc<Endpoint>],
    style: Style,
) {
    let port = &plan.port;
    // `-m comment --comment X ` before the matches, or nothing in large-cluster mode.
    let comment = |text: String| match style.large_cluster {
        true => String::new(),
        false if text.contains(' ') => format!("-m comment --comment \"{text}\" "),
        false => format!("-m comment --comment {text} "),
    };
    let seps: Vec<String> = endpoints
        .iter()
        .map(|ep| names::endpoint_chain(&port.name, ep.ip, ep.port))
        .collect();
    if let Some(timeout) = port.session_affinity_timeout {
        for (ep, sep) in endpoints.iter().zip(&seps) {
            out.nat.push((
                chain.to_string(),
                format!(
                    "{}-m recent --name {sep} --rcheck --seconds {timeout} --reap -j {sep}",
                    comment(format!("{name} -> {}", endpoint_text(ep)))
                ),
            ));
        }
    }
    let n = endpoints.len();
    for (i, (ep, sep)) in endpoints.iter().zip(&seps).enumerate() {
        let statistic = if i + 1 < n {
            format!(
                "-m statistic --mode random --probability {} ",
                probability(n - i)
            )
        } else {
            String::new()
        };
        out.nat.push((
            chain.to_string(),
            format!(
                "{}{statistic}-j {sep}",
                comment(format!("{name} -> {}", endpoint_text(ep)))
            ),
        ));
    }
    let proto = proto_match(plan);
    for (ep, sep) in endpoints.iter().zip(seps) {
        if out.chains.contains(&sep) {
            continue; // in both the cluster and the local chain
        }
        out.chains.push(sep.clone());
        let recent = match port.session_affinity_timeout {
            Some(_) => format!(" -m recent --name {sep} --set"),
            None => String::new(),
        };
        out.nat.push((
            sep.clone(),
            format!(
                "{}-s {} -j {KUBE_MARK_MASQ}",
                comment(name.to_string()),
                host(ep.ip)
            ),
        ));
        out.nat.push((
            sep.clone(),
            format!(
                "{}{proto}{recent} -j DNAT --to-destination {}",
                comment(name.to_string()),
                endpoint_text(ep)
            ),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{context, plan};
    use serde_json::json;

    fn lines(rules: &PortRules) -> Vec<String> {
        rules
            .nat
            .iter()
            .map(|(chain, rule)| format!("-A {chain} {rule}"))
            .collect()
    }

    /// The example of the reference (§4.6): upstream's nat rules for one ClusterIP Service
    /// with two endpoints, character for character.
    #[test]
    fn cluster_ip_service_as_upstream_writes_it() {
        let plan = plan(&[
            json!({"kind": "Service", "metadata": {"namespace": "default", "name": "web"},
                "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}),
            json!({"kind": "EndpointSlice", "metadata": {"namespace": "default", "name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
                "endpoints": [{"addresses": ["10.244.1.5"], "nodeName": "node-a"}, {"addresses": ["10.244.2.7"], "nodeName": "node-b"}]}),
        ]);
        let rules = render(
            plan.services.values().next().unwrap(),
            &context("10.244.0.0/16"),
        );
        let expected = [
            r#"-A KUBE-SERVICES -m comment --comment "default/web:http cluster IP" -m tcp -p tcp -d 10.96.0.10 --dport 80 -j KUBE-SVC-CDGGSHYLG3RE2FKL"#,
            r#"-A KUBE-SVC-CDGGSHYLG3RE2FKL -m comment --comment "default/web:http cluster IP" -m tcp -p tcp -d 10.96.0.10 --dport 80 ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ"#,
            r#"-A KUBE-SVC-CDGGSHYLG3RE2FKL -m comment --comment "default/web:http -> 10.244.1.5:8080" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-AFGSLHOD2HFNCBX4"#,
            r#"-A KUBE-SVC-CDGGSHYLG3RE2FKL -m comment --comment "default/web:http -> 10.244.2.7:8080" -j KUBE-SEP-2RIJ5GIYXEFH6G4D"#,
            r#"-A KUBE-SEP-AFGSLHOD2HFNCBX4 -m comment --comment default/web:http -s 10.244.1.5 -j KUBE-MARK-MASQ"#,
            r#"-A KUBE-SEP-AFGSLHOD2HFNCBX4 -m comment --comment default/web:http -m tcp -p tcp -j DNAT --to-destination 10.244.1.5:8080"#,
            r#"-A KUBE-SEP-2RIJ5GIYXEFH6G4D -m comment --comment default/web:http -s 10.244.2.7 -j KUBE-MARK-MASQ"#,
            r#"-A KUBE-SEP-2RIJ5GIYXEFH6G4D -m comment --comment default/web:http -m tcp -p tcp -j DNAT --to-destination 10.244.2.7:8080"#,
        ];
        assert_eq!(lines(&rules), expected);
        assert!(rules.filter.is_empty());
        assert_eq!(
            rules.chains,
            [
                "KUBE-SVC-CDGGSHYLG3RE2FKL",
                "KUBE-SEP-AFGSLHOD2HFNCBX4",
                "KUBE-SEP-2RIJ5GIYXEFH6G4D"
            ]
        );
    }

    /// Upstream's svc2 of TestOverallIPTablesRules: eTP Local without a local endpoint, with
    /// an external IP, a load-balancer IP, a NodePort and a health-check node port.
    #[test]
    fn external_traffic_policy_local_without_local_endpoints() {
        let plan = plan(&[
            json!({"kind": "Service", "metadata": {"namespace": "ns2", "name": "svc2"},
                "spec": {"type": "LoadBalancer", "clusterIP": "172.30.0.42", "externalIPs": ["192.168.99.22"],
                    "externalTrafficPolicy": "Local", "healthCheckNodePort": 30000,
                    "ports": [{"name": "p80", "port": 80, "nodePort": 3001}]},
                "status": {"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}}}),
            json!({"kind": "EndpointSlice", "metadata": {"namespace": "ns2", "name": "svc2-1", "labels": {"kubernetes.io/service-name": "svc2"}},
                "addressType": "IPv4", "ports": [{"name": "p80", "port": 80}],
                "endpoints": [{"addresses": ["10.180.0.2"]}]}),
        ]);
        let rules = render(
            plan.services.values().next().unwrap(),
            &context("10.0.0.0/8"),
        );
        let nat = lines(&rules);
        let ext = "KUBE-EXT-GNZBNJ2PO5MGZ6GT";
        let svc = "KUBE-SVC-GNZBNJ2PO5MGZ6GT";
        for expected in [
            format!(r#"-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 external IP" -m tcp -p tcp -d 192.168.99.22 --dport 80 -j {ext}"#),
            format!(r#"-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 loadbalancer IP" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j {ext}"#),
            format!("-A KUBE-NODEPORTS -m comment --comment ns2/svc2:p80 -m tcp -p tcp --dport 3001 -j {ext}"),
            format!(r#"-A {ext} -m comment --comment "pod traffic for ns2/svc2:p80 external destinations" -s 10.0.0.0/8 -j {svc}"#),
            format!(r#"-A {ext} -m comment --comment "masquerade LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ"#),
            format!(r#"-A {ext} -m comment --comment "route LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j {svc}"#),
        ] {
            assert!(nat.contains(&expected), "missing {expected}\nin {nat:#?}");
        }
        assert!(
            !nat.iter().any(|l| l.contains("KUBE-SVL-")),
            "no local endpoint: no SVL chain"
        );
        let filter: Vec<String> = rules
            .filter
            .iter()
            .map(|(c, r)| format!("-A {c} {r}"))
            .collect();
        assert_eq!(
            filter,
            [
                r#"-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m tcp -p tcp -d 192.168.99.22 --dport 80 -j DROP"#,
                r#"-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j DROP"#,
                r#"-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 3001 -j DROP"#,
                r#"-A KUBE-NODEPORTS -m comment --comment "ns2/svc2:p80 health check node port" -m tcp -p tcp --dport 30000 -j ACCEPT"#,
            ]
        );
    }
}
