//! The rules that carry one service port's traffic for one frontend, as this dataplane writes
//! them: its dispatch rules in the shared chains (`KUBE-SERVICES`, `KUBE-NODEPORTS`, the
//! filter chains) for that frontend, and every rule of the port's own chains, for
//! `kube-proxy explain`.

use kube_proxy_model::context::FamilyContext;
use kube_proxy_model::plan::ServicePortPlan;
use kube_proxy_model::Frontend;

use crate::restore::JUMPS;
use crate::service::{render, KUBE_SERVICES};

/// One rule: `-A <chain> <rule>` in `table`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Rule {
    pub table: &'static str,
    pub chain: String,
    pub rule: String,
}

impl Rule {
    /// The rule as `iptables-save` lists it, before the kernel's normalisation.
    pub fn line(&self) -> String {
        format!("-A {} {}", self.chain, self.rule)
    }
}

/// The rules of `plan` for traffic to `frontend`, filter table first.
pub fn rules(plan: &ServicePortPlan, ctx: &FamilyContext, frontend: &Frontend) -> Vec<Rule> {
    let rendered = render(plan, ctx);
    let own = |chain: &str| rendered.chains.iter().any(|c| c == chain);
    let for_frontend = |rule: &str| match frontend {
        Frontend::Address(ip, _, port) => rule.contains(&format!("-d {ip} --dport {port} ")),
        Frontend::NodePort(_, port) => {
            !rule.contains(" -d ") && rule.contains(&format!("--dport {port} "))
        }
    };
    let filter = rendered
        .filter
        .iter()
        .filter(|(_, rule)| for_frontend(rule))
        .map(|(chain, rule)| Rule {
            table: "filter",
            chain: chain.to_string(),
            rule: rule.clone(),
        });
    let nat = rendered
        .nat
        .iter()
        .filter(|(chain, rule)| own(chain) || for_frontend(rule))
        .map(|(chain, rule)| Rule {
            table: "nat",
            chain: chain.clone(),
            rule: rule.clone(),
        });
    // How packets reach KUBE-SERVICES at all: the jumps from the built-in nat chains.
    let entry = JUMPS
        .iter()
        .filter(|(table, _, rule)| {
            *table == "nat" && rule.ends_with(&format!("-j {KUBE_SERVICES}"))
        })
        .map(|(table, chain, rule)| Rule {
            table,
            chain: chain.to_string(),
            rule: rule.to_string(),
        });
    entry.chain(filter).chain(nat).collect()
}
