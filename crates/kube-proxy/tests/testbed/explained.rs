//! Every connection the packet cases make is also asked of `kube-proxy explain`, run in the
//! node's namespace with the proxy's own flags: its verdict must be what the packet met.
//! DNAT: the pod that answered is one of the explained endpoints, and the source it saw is
//! the client's unless explain said masquerade (or the pod reached itself); REJECT: refused;
//! DROP: no answer. So the packet table proves explain as much as the dataplanes.
//!
//! A test may look while the proxy is still catching up with a manifest it just wrote
//! (`eventually` loops): a disagreement then only counts when `explain --check` finds the
//! kernel holding every object of the explained path and the packet, sent again for three
//! seconds, still disagrees.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use serde_json::Value;

use super::{in_netns, Outcome, TestBed, PODS};

/// What explain said for one (source, destination, protocol) and manifest state.
#[derive(Default)]
pub struct ExplainLog {
    answers: HashMap<String, Value>,
    pub agreed: usize,
    pub skipped_catching_up: usize,
}

/// The source address the kernel picks from `ns` towards `to`.
fn source_towards(ns: &str, to: SocketAddr) -> IpAddr {
    in_netns(ns, move || {
        let bind: SocketAddr = if to.is_ipv4() {
            "0.0.0.0:0".parse().unwrap()
        } else {
            "[::]:0".parse().unwrap()
        };
        let socket = std::net::UdpSocket::bind(bind).unwrap();
        socket.connect(to).unwrap();
        socket.local_addr().unwrap().ip()
    })
}

fn pod_ips(name: &str) -> [IpAddr; 2] {
    let pod = PODS.iter().find(|p| p.0 == name).unwrap();
    [pod.2.parse().unwrap(), pod.3.parse().unwrap()]
}

impl TestBed {
    /// Runs `kube-proxy explain` with the proxy's flags in node-a; the JSON answer.
    pub fn explain(&self, from: IpAddr, to: SocketAddr, proto: &str, check: bool) -> Value {
        let mut command = std::process::Command::new("ip");
        command
            .args(["netns", "exec", &self.ns("node")])
            .arg(env!("CARGO_BIN_EXE_kube-proxy"))
            .arg("explain")
            .args(&self.proxy_args)
            .args([
                "--from",
                &from.to_string(),
                "--to",
                &format!("{to}/{proto}"),
                "--json",
            ]);
        if let Some(backend) = self.mode.backend() {
            command.env("KUBE_PROXY_IPTABLES_BACKEND", backend);
        }
        if check {
            command.arg("--check");
        }
        let out = command.output().unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "explain's answer is not JSON ({e}): {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Whether explain agrees with `outcome` (of a connection `resend` makes again); panics
    /// when it does not, the kernel holds the explained path, and sending again still
    /// disagrees.
    pub(super) fn agree_with_explain(
        &self,
        from: &str,
        to: SocketAddr,
        source: Option<IpAddr>,
        proto: &str,
        outcome: &Outcome,
        resend: impl Fn() -> Outcome,
    ) {
        if !self.proxy_args.iter().any(|a| a.starts_with("--manifests"))
            || std::env::var("KP_EXPLAIN_PACKETS").as_deref() == Ok("0")
            || matches!(outcome, Outcome::Other(_))
        {
            return;
        }
        let client = source.unwrap_or_else(|| source_towards(&self.ns(from), to));
        let key = format!(
            "{client} {to}/{proto} {} {:?}",
            manifest_fingerprint(&self.manifests),
            self.proxy_args
        );
        let cached = self.explained.borrow().answers.get(&key).cloned();
        let answer = match cached {
            Some(answer) => answer,
            None => {
                let answer = self.explain(client, to, proto, false);
                self.explained
                    .borrow_mut()
                    .answers
                    .insert(key, answer.clone());
                answer
            }
        };
        let Some(problem) = disagreement(&answer["explanation"], client, outcome) else {
            self.explained.borrow_mut().agreed += 1;
            return;
        };
        // The proxy may not have programmed the state explain read yet.
        let checked = self.explain(client, to, proto, true);
        if checked["check"]["drift"].as_bool() == Some(true) {
            self.explained.borrow_mut().skipped_catching_up += 1;
            return;
        }
        // The kernel holds the path now (the packet may have been sent just before), or the
        // check cannot see what is still to be removed (a deleted Service's elements): send
        // again for a while; a real disagreement persists.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        let mut again = resend();
        while disagreement(&checked["explanation"], client, &again).is_some()
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(200));
            again = resend();
        }
        if disagreement(&checked["explanation"], client, &again).is_none() {
            self.explained.borrow_mut().skipped_catching_up += 1;
            return;
        }
        panic!(
            "explain disagrees with a packet {client} → {to}/{proto} from {from}: {problem}\n\
             (the kernel holds every object of the explained path; sent again: {again:?})\n{}\n--- proxy log ---\n{}",
            serde_json::to_string_pretty(&checked).unwrap(),
            self.proxy_log()
        );
    }
}

/// How `outcome` contradicts explanation `e` of a connection from `client`, if it does.
fn disagreement(e: &Value, client: IpAddr, outcome: &Outcome) -> Option<String> {
    let verdict = e["verdict"].as_str().unwrap_or_default();
    match (verdict, outcome) {
        // userspace mode: relayed from the node (explain says masquerade).
        ("dnat" | "relay", Outcome::Answered { pod, source: seen }) => {
            let ips = pod_ips(pod);
            let endpoints: Vec<&str> = e["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|ep| ep["address"].as_str())
                .collect();
            let listed = endpoints
                .iter()
                .any(|a| a.parse::<SocketAddr>().is_ok_and(|a| ips.contains(&a.ip())));
            let masquerade = e["masquerade"]["masquerade"].as_bool() == Some(true);
            let hairpin = ips.contains(&client);
            // The node masqueraded towards another node keeps its own address.
            let from_node = e["origin"]["origin"] == "node";
            if !listed {
                Some(format!(
                    "{pod} answered but is not among the endpoints {endpoints:?}"
                ))
            } else if masquerade && *seen == client && !from_node {
                Some(format!(
                    "explain says masquerade, but {pod} saw the client's {client}"
                ))
            } else if !masquerade && !hairpin && *seen != client {
                Some(format!(
                    "explain says no masquerade, but {pod} saw {seen}, not {client}"
                ))
            } else {
                None
            }
        }
        // ipvs mode's eTP Local fallback: DNATed to a remote endpoint unmasqueraded, whose
        // answer never reaches the client (explain says so).
        ("dnat", Outcome::Timeout) if e["reply_lost"].as_bool() == Some(true) => None,
        ("reject", Outcome::Refused) => None,
        ("drop", Outcome::Timeout) => None,
        // Not a Service frontend: kube-proxy leaves the packet alone; whatever the network
        // does with it is no verdict of the proxy's.
        ("not-handled", _) => None,
        (verdict, outcome) => Some(format!(
            "explain says {verdict}, the packet met {outcome:?}"
        )),
    }
}

/// The manifests' names and contents, hashed: explain's answer depends on nothing else.
fn manifest_fingerprint(dir: &std::path::Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for path in entries {
        path.hash(&mut hasher);
        std::fs::read(&path).unwrap_or_default().hash(&mut hasher);
    }
    hasher.finish()
}
