//! `explain --check`: is each kernel object of the packet's path really in the kernel, as
//! the plan says it should be? Asks the kernel object by object with the tools an operator
//! would use (`nft get element`, `nft list chain`, `iptables -C`), so what it reports can be
//! reproduced by hand.

use std::process::Command;

use kube_proxy_iptables::restore::is_service_port_chain;
use kube_proxy_nftables::explain::Object;
use kube_proxy_nftables::skeleton::TABLE;

use super::explainer::Objects;

/// One object and whether the kernel has it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Checked {
    pub object: String,
    pub present: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// Checks every object of `objects` in the kernel of family `ip` (`ip`/`ip6`).
pub fn check(objects: &Objects, ip: &str, iptables: &str) -> Vec<Checked> {
    match objects {
        Objects::Nftables(objects) => {
            // How packets enter the table at all: the base and dispatch chains have rules.
            let entry = ["nat-prerouting", "nat-output", "services"].map(|chain| {
                let (ok, out) = run(
                    "nft",
                    &["list", "chain", ip, TABLE, chain].map(String::from),
                );
                let rules = rule_lines(&out);
                Checked {
                    object: format!("chain {chain} (traffic enters through it)"),
                    present: ok && rules > 0,
                    detail: match ok {
                        true if rules == 0 => {
                            "the chain has no rules: no traffic enters the table".into()
                        }
                        true => String::new(),
                        false => out,
                    },
                }
            });
            objects
                .iter()
                .map(|o| check_nft(o, ip))
                .chain(entry)
                .collect()
        }
        Objects::Ipvs(objects) => check_ipvs(objects),
        // The listener's port is chosen at run time: nothing to ask the kernel for by name.
        Objects::Userspace(_) => Vec::new(),
        Objects::Iptables(rules) => {
            let mut checked: Vec<Checked> = rules
                .iter()
                .map(|r| {
                    let mut args = vec![
                        "-w".to_string(),
                        "-t".into(),
                        r.table.into(),
                        "-C".into(),
                        r.chain.clone(),
                    ];
                    args.extend(split_args(&r.rule));
                    let (ok, detail) = run(iptables, &args);
                    Checked {
                        object: format!("{} -t {} {}", iptables, r.table, r.line()),
                        present: ok,
                        detail: if ok { String::new() } else { detail },
                    }
                })
                .collect();
            // `-C` finds a rule but not one too many: the port's own chains must hold
            // exactly the planned rules (a removed endpoint's rule must be gone).
            let mut own: Vec<(&str, &str, usize)> = Vec::new();
            for r in rules.iter().filter(|r| is_service_port_chain(&r.chain)) {
                match own.iter_mut().find(|(_, chain, _)| *chain == r.chain) {
                    Some(entry) => entry.2 += 1,
                    None => own.push((r.table, &r.chain, 1)),
                }
            }
            for (table, chain, expected) in own {
                let (ok, out) = run(
                    iptables,
                    &["-w", "-t", table, "-S", chain].map(String::from),
                );
                let count = out.lines().filter(|l| l.starts_with("-A ")).count();
                checked.push(counted(
                    format!("{iptables} -t {table} -S {chain}: {expected} rules"),
                    ok,
                    out,
                    count,
                    expected,
                ));
            }
            checked
        }
    }
}

/// ipvs objects, asked of `ipvsadm --save -n`, `ipset test` and kube-ipvs0's addresses. A
/// virtual server must hold exactly the planned real servers with weight 1 (others may be
/// draining with weight 0).
fn check_ipvs(objects: &[kube_proxy_ipvs::explain::Object]) -> Vec<Checked> {
    use kube_proxy_ipvs::explain::Object as Ipvs;
    let (saved_ok, saved) = run("ipvsadm", &["--save", "-n"].map(String::from));
    let lines: Vec<&str> = saved.lines().map(str::trim).collect();
    objects
        .iter()
        .map(|object| match object {
            Ipvs::VirtualServer { service, reals } => {
                let prefix = service
                    .split(" -s ")
                    .next()
                    .unwrap_or(service)
                    .replacen("-A ", "-a ", 1);
                let weighted: Vec<&str> = lines
                    .iter()
                    .filter(|l| l.starts_with(&format!("{prefix} ")) && l.ends_with(" -w 1"))
                    .copied()
                    .collect();
                let present = saved_ok
                    && lines.contains(&service.as_str())
                    && reals.iter().all(|r| weighted.contains(&r.as_str()))
                    && weighted.len() == reals.len();
                Checked {
                    object: format!("{service} with {} real servers", reals.len()),
                    present,
                    detail: if present {
                        String::new()
                    } else if !saved_ok {
                        saved.clone()
                    } else {
                        format!(
                            "the kernel has: {}",
                            lines
                                .iter()
                                .filter(|l| l.starts_with(&prefix.replacen("-a ", "-A ", 1))
                                    || l.starts_with(&format!("{prefix} ")))
                                .copied()
                                .collect::<Vec<_>>()
                                .join("; ")
                        )
                    },
                }
            }
            Ipvs::SetEntry { set, entry } => {
                let (ok, out) = run("ipset", &["test", set, entry].map(String::from));
                Checked {
                    object: format!("ipset {set} {entry}"),
                    present: ok,
                    detail: if ok { String::new() } else { out },
                }
            }
            Ipvs::Address { address } => {
                let (ok, out) = run(
                    "ip",
                    &["-o", "addr", "show", "dev", "kube-ipvs0"].map(String::from),
                );
                let present = ok && out.contains(&format!(" {address}/"));
                Checked {
                    object: format!("address {address} on kube-ipvs0"),
                    present,
                    detail: if present { String::new() } else { out },
                }
            }
        })
        .collect()
}

fn check_nft(object: &Object, ip: &str) -> Checked {
    match object {
        Object::Element { set, element, key } => {
            let (ok, out) = run(
                "nft",
                &["get", "element", ip, TABLE, set, &format!("{{ {key} }}")].map(String::from),
            );
            // A map element must also lead where the plan says.
            let value = element.split_once(" : ").map(|(_, v)| squash(v));
            let present = ok && value.is_none_or(|v| squash(&out).contains(&v));
            Checked {
                object: format!("element {set} {{ {element} }}"),
                present,
                detail: if present {
                    String::new()
                } else if ok {
                    format!("the kernel has: {}", squash(&out))
                } else {
                    out
                },
            }
        }
        Object::Chain { chain, rules } => {
            let (ok, out) = run(
                "nft",
                &["list", "chain", ip, TABLE, chain].map(String::from),
            );
            counted(
                format!("chain {chain} ({} rules)", rules.len()),
                ok,
                out.clone(),
                rule_lines(&out),
                rules.len(),
            )
        }
        Object::AffinitySet { set, .. } => {
            let (ok, out) = run("nft", &["list", "set", ip, TABLE, set].map(String::from));
            Checked {
                object: format!("set {set}"),
                present: ok,
                detail: if ok { String::new() } else { out },
            }
        }
    }
}

/// A chain that must hold `expected` rules, listed (`ok`, `out`) with `count` of them.
fn counted(object: String, ok: bool, out: String, count: usize, expected: usize) -> Checked {
    let present = ok && count == expected;
    Checked {
        object,
        present,
        detail: match (ok, present) {
            (false, _) => out,
            (true, false) => format!("the kernel's chain has {count} rules"),
            _ => String::new(),
        },
    }
}

/// The rules in an `nft list chain` output.
fn rule_lines(listing: &str) -> usize {
    listing
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty()
                && !l.starts_with("table ")
                && !l.starts_with("chain ")
                && !l.starts_with("type ")
                && !l.starts_with("comment ")
                && *l != "}"
        })
        .count()
}

/// Runs a tool; (succeeded, stdout or the error).
fn run(program: &str, args: &[String]) -> (bool, String) {
    match Command::new(program).args(args).output() {
        Ok(out) if out.status.success() => {
            (true, String::from_utf8_lossy(&out.stdout).into_owned())
        }
        Ok(out) => (
            false,
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ),
        Err(e) => (false, format!("cannot run {program}: {e}")),
    }
}

fn squash(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Splits a rule into arguments as a shell would: double-quoted words stay whole.
pub fn split_args(rule: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in rule.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            ' ' if !quoted => {
                if any {
                    args.push(std::mem::take(&mut current));
                    any = false;
                }
            }
            c => {
                current.push(c);
                any = true;
            }
        }
    }
    if any {
        args.push(current);
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_split_like_a_shell() {
        assert_eq!(
            split_args("-m comment --comment \"ns/s:p cluster IP\" -m tcp -p tcp -d 198.19.0.1 --dport 80 -j KUBE-SVC-X"),
            ["-m", "comment", "--comment", "ns/s:p cluster IP", "-m", "tcp", "-p", "tcp", "-d", "198.19.0.1", "--dport", "80", "-j", "KUBE-SVC-X"]
        );
        assert_eq!(split_args("  -j  DROP "), ["-j", "DROP"]);
        assert_eq!(split_args("--comment \"\""), ["--comment", ""]);
    }
}
