//! The kernel objects that carry one service port's traffic for one frontend, as this
//! dataplane writes them: set and map elements (keyed by the frontend, plus the ClusterIP and
//! hairpin entries) and the port's own chains, for `kube-proxy explain`.

use kube_proxy_model::plan::ServicePortPlan;
use kube_proxy_model::Frontend;

use crate::context::Context;
use crate::contribution::contribute;
use crate::elements::{write_element, Key, SetName, Value};
use crate::skeleton::TABLE;

/// One object of the `kube-proxy` table.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Object {
    /// An element of a set or map: `key` or `key : value` as nft spells it.
    Element {
        set: String,
        element: String,
        /// The key alone (what `nft get element` is asked for).
        key: String,
    },
    /// A chain of the port and its rules in order.
    Chain { chain: String, rules: Vec<String> },
    /// A dynamic set remembering ClientIP affinity.
    AffinitySet { set: String, timeout_seconds: u32 },
}

impl Object {
    /// How an operator lists this object (`nft ...`).
    pub fn command(&self, ctx: &Context) -> String {
        let ip = ctx.ip();
        match self {
            Object::Element { set, key, .. } => {
                format!("nft get element {ip} {TABLE} {set} {{ {key} }}")
            }
            Object::Chain { chain, .. } => format!("nft list chain {ip} {TABLE} {chain}"),
            Object::AffinitySet { set, .. } => format!("nft list set {ip} {TABLE} {set}"),
        }
    }
}

/// Whether an element belongs to `frontend`'s path.
fn concerns(key: &Key, frontend: &Frontend, plan: &ServicePortPlan) -> bool {
    match (key, frontend) {
        (Key::Frontend(ip, proto, port), Frontend::Address(fip, fproto, fport))
        | (Key::Allow(ip, proto, port, _), Frontend::Address(fip, fproto, fport)) => {
            (ip, proto, port) == (fip, fproto, fport)
        }
        (Key::NodePort(proto, port), Frontend::NodePort(fproto, fport)) => {
            (proto, port) == (fproto, fport)
        }
        (Key::Addr(ip), Frontend::Address(fip, ..)) => ip == fip && *ip == plan.port.cluster_ip,
        (Key::Hairpin(..), _) => true,
        _ => false,
    }
}

/// The objects `plan` has in the table for traffic to `frontend`.
pub fn objects(plan: &ServicePortPlan, ctx: &Context, frontend: &Frontend) -> Vec<Object> {
    let contribution = contribute(plan, ctx);
    let mut out: Vec<Object> = contribution
        .elements
        .iter()
        .filter(|(_, key, _)| concerns(key, frontend, plan))
        .map(|(set, key, value)| element(*set, key, value))
        .collect();
    out.extend(contribution.chains.iter().map(|c| Object::Chain {
        chain: c.name.to_string(),
        rules: c.rules.clone(),
    }));
    out.extend(
        contribution
            .affinity_sets
            .iter()
            .map(|s| Object::AffinitySet {
                set: s.name.to_string(),
                timeout_seconds: s.timeout_seconds,
            }),
    );
    out
}

fn element(set: SetName, key: &Key, value: &Value) -> Object {
    let mut element = String::new();
    write_element(&mut element, key, value);
    let mut key_text = String::new();
    write_element(&mut key_text, key, &Value::None);
    Object::Element {
        set: set.name(),
        element,
        key: key_text,
    }
}
