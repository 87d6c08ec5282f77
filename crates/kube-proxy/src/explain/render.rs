//! explain's answer, for a person (text) or a program (JSON).

use std::fmt::Write as _;

use kube_proxy_model::explain::{FrontendKind, Verdict};
use kube_proxy_model::plan::EndpointSet;

use super::check::Checked;
use super::explainer::{Found, Objects};

pub fn json(found: &Found, checked: Option<&[Checked]>) -> String {
    let mut value = serde_json::to_value(found).unwrap_or_default();
    if let Some(checked) = checked {
        value["check"] = serde_json::json!({
            "drift": checked.iter().any(|c| !c.present),
            "objects": checked,
        });
    }
    format!(
        "{}\n",
        serde_json::to_string_pretty(&value).unwrap_or_default()
    )
}

pub fn text(found: &Found, checked: Option<&[Checked]>) -> String {
    let e = &found.explanation;
    let mut out = String::new();
    let _ = writeln!(out, "Packet      {} → {} ({})", e.from, e.to, e.family);
    let _ = writeln!(
        out,
        "From        {}: {}",
        e.origin.origin.as_str(),
        e.origin.reason
    );
    match (&e.service_port, e.frontend_kind, &e.frontend) {
        (Some(port), Some(FrontendKind::NodePort), Some(frontend)) => {
            let _ = writeln!(out, "Service     {port}, {frontend}");
        }
        (Some(port), Some(kind), Some(frontend)) => {
            let _ = writeln!(out, "Service     {port}, {} {frontend}", kind.as_str());
        }
        _ => {
            let _ = writeln!(out, "Service     none");
        }
    }
    for other in &e.also_claimed_by {
        let _ = writeln!(
            out,
            "            (also claimed by {other}, which does not own it)"
        );
    }
    let verdict = match e.verdict {
        Verdict::Dnat => "DNAT",
        Verdict::Relay => "RELAY",
        Verdict::Drop => "DROP",
        Verdict::Reject => "REJECT",
        Verdict::NotHandled => "not handled",
    };
    let _ = writeln!(out, "Verdict     {verdict}: {}", e.reason);
    if !e.endpoints.is_empty() {
        let set = match e.endpoint_set {
            Some(EndpointSet::Local) => "local",
            _ => "cluster",
        };
        let how = match e.verdict {
            Verdict::Relay => "the proxy takes them in turn",
            _ => "each new connection picks one at random",
        };
        let _ = writeln!(out, "Endpoints   ({set} set, {how})");
        for ep in &e.endpoints {
            let _ = writeln!(
                out,
                "            {:<28} {:>6}%  {}{}{}",
                ep.address,
                ep.percent,
                ep.node.as_deref().unwrap_or("(no node)"),
                if ep.local { " (this node)" } else { "" },
                if ep.terminating { " terminating" } else { "" }
            );
        }
    }
    if let Some(timeout) = e.affinity_timeout_seconds {
        let _ = writeln!(out, "Affinity    ClientIP: a client keeps its endpoint for {timeout} s after its last connection");
    }
    if let Some(m) = &e.masquerade {
        let _ = writeln!(
            out,
            "Masquerade  {}: {}",
            if m.masquerade { "yes" } else { "no" },
            m.reason
        );
    }
    let (mode, count) = match &found.kernel_objects {
        Objects::Nftables(o) => ("nftables, table kube-proxy", o.len()),
        Objects::Iptables(r) => ("iptables", r.len()),
        Objects::Ipvs(o) => ("ipvs: IPVS, ipsets, kube-ipvs0", o.len()),
        Objects::Userspace(r) => (
            "userspace: the redirects to the proxy's listener, iptables path; the nftables path has the same in table kube-proxy-userspace",
            r.len(),
        ),
    };
    if count > 0 {
        let _ = writeln!(out, "Kernel      ({mode}; shared chains not listed)");
        let lines: Vec<String> = match &found.kernel_objects {
            Objects::Nftables(objects) => objects
                .iter()
                .map(|o| match o {
                    kube_proxy_nftables::explain::Object::Element { set, element, .. } => {
                        format!("element {set} {{ {element} }}")
                    }
                    kube_proxy_nftables::explain::Object::Chain { chain, rules } => {
                        let mut s = format!("chain {chain}");
                        for rule in rules {
                            let _ = write!(s, "\n                {rule}");
                        }
                        s
                    }
                    kube_proxy_nftables::explain::Object::AffinitySet {
                        set,
                        timeout_seconds,
                    } => {
                        format!("set {set} (timeout {timeout_seconds}s)")
                    }
                })
                .collect(),
            Objects::Iptables(rules) => rules
                .iter()
                .map(|r| format!("-t {} {}", r.table, r.line()))
                .collect(),
            Objects::Ipvs(objects) => objects.iter().map(ipvs_line).collect(),
            Objects::Userspace(rules) => rules.clone(),
        };
        for (i, line) in lines.iter().enumerate() {
            let mark = match checked.and_then(|c| c.get(i)) {
                Some(c) if c.present => "  [ok] ",
                Some(_) => "  [MISSING] ",
                None => "  ",
            };
            let _ = writeln!(out, "          {mark}{line}");
        }
    }
    if let (Some(_), Objects::Userspace(_)) = (checked, &found.kernel_objects) {
        let _ = writeln!(
            out,
            "Check       not in userspace mode: its listener ports are chosen at run time (see `ss -tlnp` and the proxy's log at -v=2)"
        );
        return out;
    }
    if let Some(checked) = checked {
        let missing: Vec<&Checked> = checked.iter().filter(|c| !c.present).collect();
        if missing.is_empty() {
            let _ = writeln!(
                out,
                "Check       all {} objects are in the kernel as planned",
                checked.len()
            );
        } else {
            let _ = writeln!(
                out,
                "Check       DRIFT: {} of {} objects differ from the plan (the next sync repairs them; see the proxy's log if it does not)",
                missing.len(),
                checked.len()
            );
            for c in missing {
                let _ = writeln!(out, "            {}: {}", c.object, c.detail);
            }
        }
    }
    out
}

/// One ipvs object as the tools print it.
pub fn ipvs_line(object: &kube_proxy_ipvs::explain::Object) -> String {
    use kube_proxy_ipvs::explain::Object;
    match object {
        Object::VirtualServer { service, reals } => {
            let mut s = service.clone();
            for real in reals {
                let _ = write!(s, "\n                {real}");
            }
            if reals.is_empty() {
                s.push_str("\n                (no real server: IPVS refuses)");
            }
            s
        }
        Object::SetEntry { set, entry } => format!("ipset {set} {entry}"),
        Object::Address { address } => format!("address {address} on kube-ipvs0"),
    }
}
