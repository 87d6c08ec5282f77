//! The state printer: a dataplane (see `kube_proxy_model::dataplane`) that programs nothing
//! and prints the computed state.

use std::collections::BTreeSet;
use std::io::Write;
use std::sync::Arc;
use std::time::SystemTime;

pub use kube_proxy_model::dataplane::{Dataplane, NodeView, SyncError, SyncInput, SyncReport};
use kube_proxy_model::plan::{EndpointSet, FamilyPlan, ServicePortPlan, Target};
use kube_proxy_model::{IpFamily, ServicePortName};

/// Output format of the state printer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrintFormat {
    Text,
    Json,
}

impl PrintFormat {
    pub fn parse(value: &str) -> Option<PrintFormat> {
        match value {
            "text" => Some(PrintFormat::Text),
            "json" => Some(PrintFormat::Json),
            _ => None,
        }
    }
}

/// A dataplane that programs nothing and prints the computed state after each sync that
/// changed something: what each service port's frontends are and which endpoints each kind
/// of traffic would reach.
pub struct StatePrinter {
    format: PrintFormat,
    out: Box<dyn Write + Send>,
    printed_once: [bool; 2],
}

impl StatePrinter {
    pub fn new(format: PrintFormat, out: Box<dyn Write + Send>) -> Self {
        StatePrinter {
            format,
            out,
            printed_once: [false; 2],
        }
    }
}

impl Dataplane for StatePrinter {
    fn name(&self) -> &'static str {
        "state printer"
    }

    fn sync(&mut self, input: SyncInput<'_>) -> Result<SyncReport, SyncError> {
        let SyncInput {
            family,
            plan,
            changed,
            full,
            ..
        } = input;
        let index = family as usize;
        let report = SyncReport {
            service_ports: plan.services.len(),
            changed: changed.len(),
            full,
            statements: 0,
            transactions: 1,
            ..Default::default()
        };
        if changed.is_empty() && self.printed_once[index] {
            return Ok(report);
        }
        self.printed_once[index] = true;
        let text = match self.format {
            PrintFormat::Text => render_text(family, plan, changed),
            PrintFormat::Json => render_json(family, plan, changed),
        };
        self.out
            .write_all(text.as_bytes())
            .and_then(|_| self.out.flush())
            .map_err(|e| SyncError::from_output(family, &e))?;
        Ok(report)
    }
}

/// The state of one family as one JSON document (one line).
pub fn render_json(
    family: IpFamily,
    plan: &FamilyPlan,
    changed: &BTreeSet<ServicePortName>,
) -> String {
    let ports: Vec<&Arc<ServicePortPlan>> = plan.services.values().collect();
    let doc = serde_json::json!({
        "family": family,
        "time": crate::telemetry::logging::rfc3339_nanos(SystemTime::now()),
        "changed": changed,
        "servicePorts": ports,
    });
    format!("{doc}\n")
}

/// The state of one family in a form meant for people.
pub fn render_text(
    family: IpFamily,
    plan: &FamilyPlan,
    changed: &BTreeSet<ServicePortName>,
) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "=== {family}: {} service ports, {} changed ===",
        plan.services.len(),
        changed.len()
    );
    for (name, p) in &plan.services {
        let port = &p.port;
        let mark = if changed.contains(name) { "*" } else { " " };
        let _ = writeln!(out, "{mark} {name} {}", port.protocol);
        let mut frontends = vec![format!("clusterIP {}", socket(port.cluster_ip, port.port))];
        if let Some(np) = port.node_port {
            frontends.push(format!("nodePort {np}"));
        }
        for ip in &port.external_ips {
            frontends.push(format!("externalIP {}", socket(*ip, port.port)));
        }
        for ip in &port.load_balancer_vips {
            frontends.push(format!("loadBalancer {}", socket(*ip, port.port)));
        }
        let _ = writeln!(out, "    frontends: {}", frontends.join(", "));
        let mut traits = Vec::new();
        if !port.load_balancer_source_ranges.is_empty() {
            let ranges: Vec<String> = port
                .load_balancer_source_ranges
                .iter()
                .map(|r| r.to_string())
                .collect();
            traits.push(format!("sourceRanges {}", ranges.join(" ")));
        }
        if let Some(timeout) = port.session_affinity_timeout {
            traits.push(format!("affinity ClientIP {timeout}s"));
        }
        if port.internal_policy_local {
            traits.push("internalTrafficPolicy Local".into());
        }
        if port.external_traffic_local() {
            traits.push("externalTrafficPolicy Local".into());
        }
        if let Some(hc) = port.health_check_node_port {
            traits.push(format!("healthCheckNodePort {hc}"));
        }
        if !traits.is_empty() {
            let _ = writeln!(out, "    {}", traits.join("; "));
        }
        let _ = writeln!(
            out,
            "    ClusterIP traffic:           {}",
            describe(p, p.internal)
        );
        if let Some(ext) = &p.external {
            if ext.policy_local {
                let _ = writeln!(
                    out,
                    "    external, outside clients:   {} (client IP kept)",
                    describe(p, ext.from_outside)
                );
                let _ = writeln!(
                    out,
                    "    external, local pods/node:   {}",
                    describe(p, ext.from_pods_and_node)
                );
            } else {
                let _ = writeln!(
                    out,
                    "    external traffic:            {} (masqueraded)",
                    describe(p, ext.from_outside)
                );
            }
        }
    }
    out
}

fn socket(ip: std::net::IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

fn describe(p: &ServicePortPlan, target: Target) -> String {
    match target {
        Target::Drop => "DROP (no local endpoint; endpoints exist elsewhere)".into(),
        Target::Reject => "REJECT (no usable endpoint)".into(),
        Target::Endpoints(set) => {
            let list: Vec<String> = p
                .endpoints_for(target)
                .iter()
                .map(|e| {
                    let mut s = e.to_string();
                    let mut notes = Vec::new();
                    if e.is_local {
                        notes.push("local");
                    }
                    if !e.ready {
                        notes.push("terminating");
                    }
                    if !notes.is_empty() {
                        s.push_str(&format!(" ({})", notes.join(", ")));
                    }
                    s
                })
                .collect();
            let which = match set {
                EndpointSet::Cluster => "cluster endpoints",
                EndpointSet::Local => "local endpoints",
            };
            format!("{which} [{}]", list.join(", "))
        }
    }
}
