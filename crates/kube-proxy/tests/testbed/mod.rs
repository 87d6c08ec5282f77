//! A real-traffic test bed in network namespaces this test creates (never the root one):
//!
//! ```text
//!   client (203.0.113.5, .200; 2001:db8:203::5) ─┐
//!   node-a (192.0.2.10; 2001:db8:2::10) ─────────┼─ lan bridge (own namespace)
//!   node-b (192.0.2.11; 2001:db8:2::11) ─────────┘
//!   node-a br0 198.18.1.1/24 ── pod a1 198.18.1.2, pod a2 198.18.1.3   (kube-proxy runs in node-a)
//!   node-b br0 198.18.2.1/24 ── pod b1 198.18.2.2
//! ```
//! IPv6 mirrors it under 2001:db8::/32. Pods run servers on TCP and UDP port 8080 that answer
//! `<pod> <source address seen>`. Addresses are documentation/benchmark ranges, and the
//! namespaces have no route to anything outside themselves.

#![allow(dead_code)]

mod explained;
pub mod vm;

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

pub const NODE_A: &str = "192.0.2.10";
pub const NODE_A6: &str = "2001:db8:2::10";
pub const CLIENT: &str = "203.0.113.5";
pub const CLIENT_OUT_OF_RANGE: &str = "203.0.113.200";
pub const CLIENT6: &str = "2001:db8:203::5";

/// The pods: (name, node, IPv4, IPv6).
pub const PODS: &[(&str, &str, &str, &str)] = &[
    ("a1", "a", "198.18.1.2", "2001:db8:18:1::2"),
    ("a2", "a", "198.18.1.3", "2001:db8:18:1::3"),
    ("b1", "b", "198.18.2.2", "2001:db8:18:2::2"),
];

/// How a connection attempt ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Answered by `pod`, which saw the connection come from `source`.
    Answered {
        pod: String,
        source: IpAddr,
    },
    Refused,
    /// No answer within the timeout (dropped).
    Timeout,
    Other(String),
}

impl Outcome {
    pub fn pod(&self) -> Option<&str> {
        match self {
            Outcome::Answered { pod, .. } => Some(pod),
            _ => None,
        }
    }
}

/// A dataplane the packet cases run against: nftables mode, iptables mode on one backend,
/// or ipvs mode (inside the VM only: see `vm`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Nftables,
    IptablesNft,
    IptablesLegacy,
    Ipvs,
    /// The proxy relays every connection (redirect rules through iptables-nft).
    Userspace,
    /// userspace mode with its redirect rules in its nftables table
    /// (`KUBE_PROXY_USERSPACE_REDIRECT=nftables`, the path of nodes without iptables).
    UserspaceNft,
}

impl Mode {
    /// `--proxy-mode`.
    pub fn proxy_mode(self) -> &'static str {
        match self {
            Mode::Nftables => "nftables",
            Mode::Ipvs => "ipvs",
            Mode::Userspace | Mode::UserspaceNft => "userspace",
            _ => "iptables",
        }
    }

    pub fn is_userspace(self) -> bool {
        matches!(self, Mode::Userspace | Mode::UserspaceNft)
    }

    pub fn is_iptables(self) -> bool {
        matches!(self, Mode::IptablesNft | Mode::IptablesLegacy)
    }

    /// The iptables backend (`KUBE_PROXY_IPTABLES_BACKEND`), for iptables mode.
    pub fn backend(self) -> Option<&'static str> {
        match self {
            Mode::Nftables | Mode::UserspaceNft => None,
            Mode::IptablesNft | Mode::Ipvs | Mode::Userspace => Some("nft"),
            Mode::IptablesLegacy => Some("legacy"),
        }
    }

    /// `iptables-save` of the backend (`ip6tables-…` for `ip6`).
    pub fn save_tool(self, family: &str) -> String {
        let base = if family == "ip6" {
            "ip6tables"
        } else {
            "iptables"
        };
        format!("{base}-{}-save", self.backend().unwrap_or("nft"))
    }
}

thread_local! {
    /// The container image the beds of this thread run the proxy from (see `with_image`).
    static IMAGE: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Runs `case` with every bed it creates running the proxy from `image` (`podman run` in the
/// bed's node namespace) instead of the built binary.
pub fn with_image<T>(image: &str, case: impl FnOnce() -> T) -> T {
    IMAGE.with(|i| *i.borrow_mut() = Some(image.to_string()));
    let result = case();
    IMAGE.with(|i| *i.borrow_mut() = None);
    result
}

/// The image the image cases run from: `KP_IMAGE` (set by .ci/run after building it).
/// Without it they are skipped, unless `KP_REQUIRE_NETNS` says everything must run (CI).
pub fn test_image() -> Option<String> {
    match std::env::var("KP_IMAGE") {
        Ok(image) if !image.is_empty() => Some(image),
        _ => {
            assert!(
                std::env::var_os("KP_REQUIRE_NETNS").is_none(),
                "KP_IMAGE is not set: build the image with scripts/image.sh first"
            );
            None
        }
    }
}

pub struct TestBed {
    pub prefix: String,
    pub manifests: PathBuf,
    proxy: Option<Child>,
    log: PathBuf,
    namespaces: Vec<String>,
    /// Environment of the next proxy started.
    pub proxy_env: Vec<(String, String)>,
    /// The dataplane of the proxies `start_proxy` starts.
    pub mode: Mode,
    /// Run the proxy from this container image (`with_image`).
    pub image: Option<String>,
    /// The flags of the proxy last started (explain is asked with the same).
    pub proxy_args: Vec<String>,
    /// How long a started proxy may take to its first sync (20 s; more for large clusters).
    pub first_sync_bound: Duration,
    /// explain's answers for the connections made, and how many agreed.
    explained: std::cell::RefCell<explained::ExplainLog>,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn run(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{args:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Runs `ip -n <ns> <args...>` (the command line is split on spaces).
fn ip(ns: &str, args: &str) {
    let mut all = vec!["ip", "-n", ns];
    all.extend(args.split_whitespace());
    run(&all).unwrap();
}

fn sysctl(ns: &str, key: &str, value: &str) -> Result<String, String> {
    run(&[
        "ip",
        "netns",
        "exec",
        ns,
        "sysctl",
        "-q",
        "-w",
        &format!("{key}={value}"),
    ])
}

/// Whether this process may create namespaces; without it the kernel tests are skipped,
/// unless KP_REQUIRE_NETNS=1 (CI) makes that a failure.
pub fn available() -> bool {
    let root = nix::unistd::geteuid().is_root();
    let tools = Command::new("nft")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
        && Command::new("ip")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
    if root && tools {
        return true;
    }
    let why = if root {
        "nft or ip is not installed"
    } else {
        "not running as root"
    };
    if std::env::var("KP_REQUIRE_NETNS").as_deref() == Ok("1") {
        panic!("network-namespace tests are required (KP_REQUIRE_NETNS=1) but {why}");
    }
    eprintln!("SKIPPING network-namespace test: {why}");
    false
}

impl TestBed {
    pub fn new(test: &str) -> TestBed {
        let id = COUNTER.fetch_add(1, Ordering::SeqCst);
        let prefix = format!(
            "kp{}{}{}",
            std::process::id() % 100000,
            &test[..test.len().min(3)],
            id
        );
        let manifests = std::env::temp_dir().join(format!("{prefix}-manifests"));
        let _ = std::fs::remove_dir_all(&manifests);
        std::fs::create_dir_all(&manifests).unwrap();
        let log = std::env::temp_dir().join(format!("{prefix}-proxy.log"));
        let mut bed = TestBed {
            prefix,
            manifests,
            proxy: None,
            log,
            namespaces: Vec::new(),
            proxy_env: Vec::new(),
            mode: Mode::Nftables,
            image: IMAGE.with(|i| i.borrow().clone()),
            proxy_args: Vec::new(),
            first_sync_bound: Duration::from_secs(20),
            explained: Default::default(),
        };
        bed.build();
        bed
    }

    pub fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }

    /// `ip <args>` in the namespace of `role` (test-specific addresses and routes).
    pub fn ip(&self, role: &str, args: &str) {
        ip(&self.ns(role), args);
    }

    fn add_ns(&mut self, role: &str) -> String {
        let name = self.ns(role);
        run(&["ip", "netns", "add", &name]).unwrap();
        self.namespaces.push(name.clone());
        // Without duplicate-address detection, new links' IPv6 link-local addresses are usable
        // at once (otherwise the first IPv6 connections wait ~2 s for neighbour discovery).
        for key in [
            "net.ipv6.conf.all.accept_dad",
            "net.ipv6.conf.default.accept_dad",
        ] {
            sysctl(&name, key, "0").unwrap();
        }
        ip(&name, "link set lo up");
        name
    }

    fn build(&mut self) {
        let lan = self.add_ns("lan");
        ip(&lan, "link add lan0 type bridge");
        ip(&lan, "link set lan0 up");
        // The three hosts on the LAN.
        for (role, v4, v6) in [
            ("node", "192.0.2.10/24", "2001:db8:2::10/64"),
            ("nodeb", "192.0.2.11/24", "2001:db8:2::11/64"),
            ("client", "203.0.113.5/24", "2001:db8:203::5/64"),
        ] {
            let ns = self.add_ns(role);
            let peer = format!("p{role}");
            ip(
                &ns,
                &format!("link add eth0 type veth peer name {peer} netns {lan}"),
            );
            ip(&lan, &format!("link set {peer} master lan0"));
            ip(&lan, &format!("link set {peer} up"));
            ip(&ns, "link set eth0 up");
            ip(&ns, &format!("addr add {v4} dev eth0"));
            ip(&ns, &format!("-6 addr add {v6} dev eth0 nodad"));
        }
        let client = self.ns("client");
        ip(&client, "addr add 203.0.113.200/24 dev eth0");
        for route in [
            "192.0.2.0/24 dev eth0",
            "198.51.100.0/24 via 192.0.2.10",
            "198.19.0.0/16 via 192.0.2.10",
        ] {
            ip(&client, &format!("route add {route}"));
        }
        for route in [
            "2001:db8:2::/64 dev eth0",
            "2001:db8:51::/64 via 2001:db8:2::10",
            "2001:db8:19::/64 via 2001:db8:2::10",
        ] {
            ip(&client, &format!("-6 route add {route}"));
        }
        // The nodes: a pod bridge each, forwarding, routes to the other node's pods.
        for (role, bridge4, bridge6, other4, other6, other_pods4, other_pods6) in [
            (
                "node",
                "198.18.1.1/24",
                "2001:db8:18:1::1/64",
                "192.0.2.11",
                "2001:db8:2::11",
                "198.18.2.0/24",
                "2001:db8:18:2::/64",
            ),
            (
                "nodeb",
                "198.18.2.1/24",
                "2001:db8:18:2::1/64",
                "192.0.2.10",
                "2001:db8:2::10",
                "198.18.1.0/24",
                "2001:db8:18:1::/64",
            ),
        ] {
            let ns = self.ns(role);
            ip(&ns, "link add br0 type bridge");
            ip(&ns, "link set br0 up");
            ip(&ns, &format!("addr add {bridge4} dev br0"));
            ip(&ns, &format!("-6 addr add {bridge6} dev br0 nodad"));
            ip(&ns, &format!("route add {other_pods4} via {other4}"));
            ip(&ns, &format!("-6 route add {other_pods6} via {other6}"));
            ip(&ns, "route add 203.0.113.0/24 dev eth0");
            ip(&ns, "-6 route add 2001:db8:203::/64 dev eth0");
            // Like a real node, a default route (to a router that does not exist on the test
            // LAN), so that packets the proxy does not DNAT reach its REJECT/DROP rules rather
            // than failing routing first.
            ip(&ns, "route add default via 192.0.2.254");
            ip(&ns, "-6 route add default via 2001:db8:2::fe");
            sysctl(&ns, "net.ipv4.ip_forward", "1").unwrap();
            // REJECT answers with ICMP, which the kernel rate-limits per destination (1/s after
            // a burst); tests tell refused from dropped on every attempt, so no limit here.
            sysctl(&ns, "net.ipv4.icmp_ratelimit", "0").unwrap();
            sysctl(&ns, "net.ipv6.icmp.ratelimit", "0").unwrap();
            sysctl(&ns, "net.ipv6.conf.all.forwarding", "1").unwrap();
            // Replies between pods of one bridge are bridged, not routed; they must still
            // meet conntrack to be un-NATed, as on every Kubernetes node with a bridge CNI.
            let _ = sysctl(&ns, "net.bridge.bridge-nf-call-iptables", "1");
            let _ = sysctl(&ns, "net.bridge.bridge-nf-call-ip6tables", "1");
        }
        for (pod, node, v4, v6) in PODS {
            let ns = self.add_ns(pod);
            let node_ns = self.ns(if *node == "a" { "node" } else { "nodeb" });
            let gw4 = if *node == "a" {
                "198.18.1.1"
            } else {
                "198.18.2.1"
            };
            let gw6 = if *node == "a" {
                "2001:db8:18:1::1"
            } else {
                "2001:db8:18:2::1"
            };
            let peer = format!("v{pod}");
            ip(
                &ns,
                &format!("link add eth0 type veth peer name {peer} netns {node_ns}"),
            );
            ip(&node_ns, &format!("link set {peer} master br0"));
            // The bridge CNI's hairpinMode: a pod reaching itself through a Service is
            // forwarded back out of the port it came in on.
            ip(
                &node_ns,
                &format!("link set {peer} type bridge_slave hairpin on"),
            );
            ip(&node_ns, &format!("link set {peer} up"));
            ip(&ns, "link set eth0 up");
            ip(&ns, &format!("addr add {v4}/24 dev eth0"));
            ip(&ns, &format!("-6 addr add {v6}/64 dev eth0 nodad"));
            ip(&ns, &format!("route add default via {gw4}"));
            ip(&ns, &format!("-6 route add default via {gw6}"));
            start_servers(&ns, pod);
            start_echo_server(&ns, pod);
            start_byte_echo_server(&ns);
        }
    }

    /// Writes a manifest file (YAML) for the proxy to pick up.
    pub fn write_manifest(&self, name: &str, yaml: &str) {
        let tmp = self.manifests.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, self.manifests.join(format!("{name}.yaml"))).unwrap();
    }

    pub fn remove_manifest(&self, name: &str) {
        let _ = std::fs::remove_file(self.manifests.join(format!("{name}.yaml")));
    }

    /// Starts kube-proxy in node-a with the standard flags (standalone manifests, no servers)
    /// plus `extra`, and waits for its first sync.
    pub fn start_proxy(&mut self, extra: &[&str]) {
        self.write_manifest(
            "node-a",
            "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nspec: {podCIDRs: [198.18.1.0/24, \"2001:db8:18:1::/64\"]}\nstatus:\n  addresses:\n  - {type: InternalIP, address: 192.0.2.10}\n  - {type: InternalIP, address: \"2001:db8:2::10\"}\n",
        );
        let mut args: Vec<String> = vec![
            format!("--proxy-mode={}", self.mode.proxy_mode()),
            "--hostname-override=node-a".into(),
            format!("--manifests={}", self.manifests.display()),
            "-v=4".into(),
        ];
        // No servers, unless `extra` binds one.
        for server in ["--healthz-bind-address", "--metrics-bind-address"] {
            if !extra.iter().any(|a| a.starts_with(server)) {
                args.push(format!("{server}="));
            }
        }
        if !extra
            .iter()
            .any(|a| a.starts_with("--cluster-cidr") || a.starts_with("--detect-local-mode"))
        {
            args.push("--cluster-cidr=198.18.0.0/16,2001:db8:18::/48".into());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        self.start_proxy_with(&args);
    }

    /// Starts kube-proxy in node-a with exactly `args` and waits for its first sync.
    pub fn start_proxy_with(&mut self, args: &[String]) {
        self.spawn_proxy(args);
        // Rules of a previous proxy are still in the kernel: wait for this one's first sync.
        self.eventually("the proxy's first sync of both families", || {
            self.proxy_synced()
        });
    }

    /// Starts kube-proxy in node-a with exactly `args`, without waiting for anything.
    pub fn spawn_proxy(&mut self, args: &[String]) {
        self.stop_proxy();
        self.proxy_args = args.to_vec();
        let log = File::create(&self.log).unwrap();
        let backend = self
            .mode
            .backend()
            .map(|b| ("KUBE_PROXY_IPTABLES_BACKEND".to_string(), b.to_string()));
        let redirect = (self.mode == Mode::UserspaceNft).then(|| {
            (
                "KUBE_PROXY_USERSPACE_REDIRECT".to_string(),
                "nftables".to_string(),
            )
        });
        let env: Vec<(String, String)> = backend
            .into_iter()
            .chain(redirect)
            .chain(self.proxy_env.iter().cloned())
            .collect();
        let mut command = match &self.image {
            // The image's binary, in the node's namespace, privileged as the DaemonSet runs it;
            // the manifests mounted where the host has them.
            Some(image) => {
                let mut command = Command::new("podman");
                // scripts/image.sh's settings for this machine (runc, ulimits).
                let conf = "/var/cache/kube-proxy-rs/image/containers.conf";
                if std::env::var_os("CONTAINERS_CONF").is_none() && Path::new(conf).exists() {
                    command.env("CONTAINERS_CONF", conf);
                }
                command.args([
                    "run".to_string(),
                    "--rm".into(),
                    "--privileged".into(),
                    format!("--network=ns:/run/netns/{}", self.ns("node")),
                    format!(
                        "--volume={}:{}",
                        self.manifests.display(),
                        self.manifests.display()
                    ),
                ]);
                for (key, value) in &env {
                    command.arg(format!("--env={key}={value}"));
                }
                command.arg(image).arg("/usr/local/bin/kube-proxy");
                command
            }
            None => {
                let mut command = Command::new("ip");
                command
                    .args(["netns", "exec", &self.ns("node")])
                    .arg(env!("CARGO_BIN_EXE_kube-proxy"))
                    .envs(env.iter().map(|(k, v)| (k, v)));
                command
            }
        };
        let child = command
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.proxy = Some(child);
    }

    /// Whether the running proxy's log shows its first sync of both families.
    /// The running proxy's process id.
    pub fn proxy_pid(&self) -> Option<u32> {
        self.proxy.as_ref().map(|c| c.id())
    }

    pub fn proxy_synced(&self) -> bool {
        let log = self.proxy_log();
        log.contains("\"Synced\" family=\"IPv4\"") && log.contains("\"Synced\" family=\"IPv6\"")
    }

    /// Kills the proxy with SIGKILL, wherever it is (rules stay as far as it got).
    pub fn kill_proxy(&mut self) {
        if let Some(mut child) = self.proxy.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the proxy with SIGTERM (rules stay in place).
    pub fn stop_proxy(&mut self) {
        if let Some(mut child) = self.proxy.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
        }
    }

    pub fn proxy_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs a command in a namespace: its output, or the error.
    pub fn ip_netns_exec_checked(&self, role: &str, args: &[&str]) -> Result<String, String> {
        let ns = self.ns(role);
        let mut all = vec!["ip", "netns", "exec", ns.as_str()];
        all.extend_from_slice(args);
        run(&all)
    }

    /// Runs `args` in the namespace of `role`; its standard output ("" when it failed).
    pub fn ip_netns_exec(&self, role: &str, args: &[&str]) -> String {
        let ns = self.ns(role);
        let mut all = vec!["ip", "netns", "exec", ns.as_str()];
        all.extend_from_slice(args);
        run(&all).unwrap_or_default()
    }

    /// The proxy's rules of `family` (`ip`, `ip6`) in node-a, as the mode shows them: `nft
    /// list table <family> kube-proxy`, or `iptables-save`/`ip6tables-save` in iptables mode.
    pub fn ruleset(&self, family: &str) -> String {
        let save = self.mode.save_tool(family);
        let args: Vec<&str> = match self.mode {
            Mode::Nftables => vec!["nft", "list", "table", family, "kube-proxy"],
            Mode::UserspaceNft => vec!["nft", "list", "table", family, "kube-proxy-userspace"],
            // The family's virtual servers, then the iptables rules.
            Mode::Ipvs => {
                let v6 = family == "ip6";
                let servers: String = self
                    .ip_netns_exec("node", &["ipvsadm", "--save", "-n"])
                    .lines()
                    .filter(|l| l.contains('[') == v6)
                    .map(|l| format!("{l}\n"))
                    .collect();
                return servers + &self.ip_netns_exec("node", &[&save]);
            }
            _ => vec![&save],
        };
        self.ip_netns_exec("node", &args)
    }

    /// Waits until `check` holds (the proxy follows manifests asynchronously).
    pub fn eventually(&self, what: &str, check: impl FnMut() -> bool) {
        self.eventually_within(Duration::from_secs(20), what, check)
    }

    /// [`TestBed::eventually`] with another bound.
    pub fn eventually_within(&self, bound: Duration, what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + bound;
        while Instant::now() < deadline {
            if check() {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "timed out waiting for: {what}\n--- proxy log ---\n{}\n--- ruleset ---\n{}",
            self.proxy_log(),
            self.ruleset("ip")
        );
    }

    /// Waits until set `set` of the `family` table lists an element containing `text`.
    pub fn wait_for_element(&self, family: &str, set: &str, text: &str) {
        let ns = self.ns("node");
        self.eventually(&format!("{text:?} in {family} set {set}"), || {
            run(&[
                "ip",
                "netns",
                "exec",
                &ns,
                "nft",
                "list",
                "set",
                family,
                "kube-proxy",
                set,
            ])
            .is_ok_and(|out| out.contains(text))
        });
    }

    /// Waits until the IPv4 ruleset mentions `text`.
    pub fn wait_for_rules(&self, family: &str, text: &str) {
        self.eventually(&format!("{text:?} in the {family} ruleset"), || {
            self.ruleset(family).contains(text)
        });
    }

    /// One TCP connection from namespace `from` (a role such as "client", "node" or a pod).
    pub fn tcp(&self, from: &str, to: SocketAddr, source: Option<IpAddr>) -> Outcome {
        let ns = self.ns(from);
        let outcome = in_netns(&ns, move || tcp_request(to, source));
        self.agree_with_explain(from, to, source, "tcp", &outcome, || {
            in_netns(&ns, move || tcp_request(to, source))
        });
        outcome
    }

    pub fn udp(&self, from: &str, to: SocketAddr, source: Option<IpAddr>) -> Outcome {
        let ns = self.ns(from);
        let outcome = in_netns(&ns, move || udp_request(to, source));
        self.agree_with_explain(from, to, source, "udp", &outcome, || {
            in_netns(&ns, move || udp_request(to, source))
        });
        outcome
    }

    /// One UDP request from a fixed source port, so that every request belongs to the same
    /// conntrack entry (like a DNS resolver or a game client reusing its socket).
    pub fn udp_from_port(&self, from: &str, to: SocketAddr, source_port: u16) -> Outcome {
        let ns = self.ns(from);
        let bind = match to {
            SocketAddr::V4(_) => SocketAddr::new("0.0.0.0".parse().unwrap(), source_port),
            SocketAddr::V6(_) => SocketAddr::new("::".parse().unwrap(), source_port),
        };
        in_netns(&ns, move || udp_request_from(to, bind))
    }

    /// The set of pods answering `n` TCP connections, and every source they saw.
    pub fn tcp_spread(&self, from: &str, to: SocketAddr, n: usize) -> (Vec<String>, Vec<IpAddr>) {
        spread((0..n).map(|_| self.tcp(from, to, None)).collect())
    }

    pub fn udp_spread(&self, from: &str, to: SocketAddr, n: usize) -> (Vec<String>, Vec<IpAddr>) {
        spread((0..n).map(|_| self.udp(from, to, None)).collect())
    }
}

fn spread(outcomes: Vec<Outcome>) -> (Vec<String>, Vec<IpAddr>) {
    let mut pods = Vec::new();
    let mut sources = Vec::new();
    for outcome in outcomes {
        match outcome {
            Outcome::Answered { pod, source } => {
                if !pods.contains(&pod) {
                    pods.push(pod);
                }
                if !sources.contains(&source) {
                    sources.push(source);
                }
            }
            other => pods.push(format!("{other:?}")),
        }
    }
    pods.sort();
    pods.dedup();
    sources.sort();
    (pods, sources)
}

impl Drop for TestBed {
    fn drop(&mut self) {
        let explained = self.explained.borrow();
        if explained.agreed + explained.skipped_catching_up > 0 {
            println!(
                "{}: explain agreed with {} connections ({} looked at while the kernel was catching up)",
                self.prefix, explained.agreed, explained.skipped_catching_up
            );
        }
        drop(explained);
        // KP_KEEP_NETNS=1 leaves the namespaces and the proxy for inspection by hand.
        if std::env::var("KP_KEEP_NETNS").as_deref() == Ok("1") {
            eprintln!(
                "keeping test bed {} (ip netns list | grep {0})",
                self.prefix
            );
            std::mem::forget(self.proxy.take());
            return;
        }
        self.stop_proxy();
        for ns in self.namespaces.iter().rev() {
            let _ = run(&["ip", "netns", "del", ns]);
        }
        let _ = std::fs::remove_dir_all(&self.manifests);
    }
}

/// Runs `f` on a new thread inside network namespace `ns` (never in a shared runtime).
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

/// Starts TCP and UDP servers on port 8080 (IPv4 and IPv6) in `ns`, answering
/// `<pod> <source>`; they live as long as the test process.
fn start_servers(ns: &str, pod: &str) {
    let pod = pod.to_string();
    let (tcp4, tcp6, udp4, udp6) = in_netns(ns, || {
        let tcp4 = TcpListener::bind("0.0.0.0:8080").unwrap();
        let tcp6 = bind_v6_only_tcp();
        let udp4 = UdpSocket::bind("0.0.0.0:8080").unwrap();
        let udp6 = bind_v6_only_udp();
        (tcp4, tcp6, udp4, udp6)
    });
    for listener in [tcp4, tcp6] {
        let pod = pod.clone();
        thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let peer = conn.peer_addr().map(|a| a.ip().to_canonical()).ok();
                let _ = conn.write_all(
                    format!(
                        "{pod} {}\n",
                        peer.map(|p| p.to_string()).unwrap_or_default()
                    )
                    .as_bytes(),
                );
            }
        });
    }
    for socket in [udp4, udp6] {
        let pod = pod.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 64];
            while let Ok((_, peer)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(
                    format!("{pod} {}\n", peer.ip().to_canonical()).as_bytes(),
                    peer,
                );
            }
        });
    }
}

/// A line-echo server on TCP 8081 (IPv4): answers each line with `<pod> <line>`, keeping the
/// connection open, for tests of long-lived connections.
fn start_echo_server(ns: &str, pod: &str) {
    let pod = pod.to_string();
    let listener = in_netns(ns, || TcpListener::bind("0.0.0.0:8081").unwrap());
    thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let pod = pod.clone();
            thread::spawn(move || {
                let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
                let mut writer = conn;
                let mut line = String::new();
                while std::io::BufRead::read_line(&mut reader, &mut line).is_ok_and(|n| n > 0) {
                    if writer
                        .write_all(format!("{pod} {line}").as_bytes())
                        .is_err()
                    {
                        return;
                    }
                    line.clear();
                }
            });
        }
    });
}

/// A byte-echo server on TCP 8082 (IPv4): sends back every byte it receives, and ends its
/// side when the client ends its own (for transfers both ways and half-closes).
fn start_byte_echo_server(ns: &str) {
    let listener = in_netns(ns, || TcpListener::bind("0.0.0.0:8082").unwrap());
    thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut reader = conn.try_clone().unwrap();
                let mut writer = conn;
                if std::io::copy(&mut reader, &mut writer).is_ok() {
                    let _ = writer.shutdown(std::net::Shutdown::Write);
                }
            });
        }
    });
}

/// What a bulk transfer through the byte-echo server sent and got back.
#[derive(Debug, PartialEq, Eq)]
pub struct Transfer {
    pub sent: usize,
    pub received: usize,
    pub sent_hash: u64,
    pub received_hash: u64,
}

/// Sends `bytes` pseudo-random bytes from namespace `from` to a byte-echo server at `to`
/// while reading the echo, then half-closes and reads to the end: both directions' bytes,
/// hashed.
pub fn bulk_echo(ns: &str, to: SocketAddr, bytes: usize) -> Result<Transfer, String> {
    use std::hash::Hasher;
    let stream = in_netns(ns, move || {
        TcpStream::connect_timeout(&to, Duration::from_secs(2))
    })
    .map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let sender = thread::spawn(move || {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut chunk = vec![0u8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            for b in chunk.iter_mut() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                *b = seed as u8;
            }
            let n = left.min(chunk.len());
            writer.write_all(&chunk[..n]).map_err(|e| e.to_string())?;
            hasher.write(&chunk[..n]);
            left -= n;
        }
        writer
            .shutdown(std::net::Shutdown::Write)
            .map_err(|e| e.to_string())?;
        Ok::<u64, String>(hasher.finish())
    });
    let mut reader = stream;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let mut received = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hasher.write(&buf[..n]);
                received += n;
            }
            Err(e) => return Err(format!("after {received} bytes: {e}")),
        }
    }
    let sent_hash = sender.join().unwrap()?;
    Ok(Transfer {
        sent: bytes,
        received,
        sent_hash,
        received_hash: hasher.finish(),
    })
}

/// A long-lived TCP connection opened from a namespace (the socket stays in it).
pub struct Connection {
    reader: std::io::BufReader<TcpStream>,
    writer: TcpStream,
}

impl Connection {
    /// Sends `text` and returns the answer line, or the error.
    pub fn exchange(&mut self, text: &str) -> Result<String, String> {
        self.writer
            .write_all(format!("{text}\n").as_bytes())
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        match std::io::BufRead::read_line(&mut self.reader, &mut line) {
            Ok(0) => Err("connection closed".into()),
            Ok(_) => Ok(line.trim_end().to_string()),
            Err(e) => Err(e.to_string()),
        }
    }
}

impl TestBed {
    /// Opens a TCP connection from namespace `from` to `to`.
    pub fn connect(&self, from: &str, to: SocketAddr) -> Connection {
        let stream = in_netns(&self.ns(from), move || {
            TcpStream::connect_timeout(&to, Duration::from_secs(2)).unwrap()
        });
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        Connection {
            reader: std::io::BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        }
    }
}

fn bind_v6_only_tcp() -> TcpListener {
    let socket = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).unwrap();
    socket.set_only_v6(true).unwrap();
    socket.set_reuse_address(true).unwrap();
    socket
        .bind(&SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 8080).into())
        .unwrap();
    socket.listen(128).unwrap();
    socket.into()
}

fn bind_v6_only_udp() -> UdpSocket {
    let socket = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::DGRAM, None).unwrap();
    socket.set_only_v6(true).unwrap();
    socket
        .bind(&SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 8080).into())
        .unwrap();
    socket.into()
}

const TIMEOUT: Duration = Duration::from_millis(700);

fn parse_answer(text: &str) -> Outcome {
    let mut parts = text.split_whitespace();
    match (parts.next(), parts.next().and_then(|s| s.parse().ok())) {
        (Some(pod), Some(source)) => Outcome::Answered {
            pod: pod.to_string(),
            source,
        },
        _ => Outcome::Other(format!("bad answer {text:?}")),
    }
}

fn classify(e: std::io::Error) -> Outcome {
    match e.kind() {
        ErrorKind::ConnectionRefused => Outcome::Refused,
        ErrorKind::TimedOut | ErrorKind::WouldBlock => Outcome::Timeout,
        _ if e.raw_os_error() == Some(libc_ehostunreach()) => Outcome::Refused,
        _ => Outcome::Other(e.to_string()),
    }
}

fn libc_ehostunreach() -> i32 {
    nix::errno::Errno::EHOSTUNREACH as i32
}

fn tcp_request(to: SocketAddr, source: Option<IpAddr>) -> Outcome {
    let domain = if to.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None).unwrap();
    if let Some(src) = source {
        socket.bind(&SocketAddr::new(src, 0).into()).unwrap();
    }
    if let Err(e) = socket.connect_timeout(&to.into(), TIMEOUT) {
        return classify(e);
    }
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut text = String::new();
    match stream.read_to_string(&mut text) {
        Ok(_) => parse_answer(&text),
        Err(e) => classify(e),
    }
}

fn udp_request(to: SocketAddr, source: Option<IpAddr>) -> Outcome {
    let bind: SocketAddr = match (source, to) {
        (Some(src), _) => SocketAddr::new(src, 0),
        (None, SocketAddr::V4(_)) => "0.0.0.0:0".parse().unwrap(),
        (None, SocketAddr::V6(_)) => "[::]:0".parse().unwrap(),
    };
    udp_request_from(to, bind)
}

fn udp_request_from(to: SocketAddr, bind: SocketAddr) -> Outcome {
    // A fixed source port can still be held for a moment by the previous request's socket
    // (seen once in CI as EADDRINUSE): try again shortly.
    let mut attempts = 0;
    let socket = loop {
        match UdpSocket::bind(bind) {
            Ok(socket) => break socket,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && attempts < 40 => {
                attempts += 1;
                thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("binding {bind}: {e}"),
        }
    };
    socket.set_read_timeout(Some(TIMEOUT)).unwrap();
    if let Err(e) = socket.connect(to) {
        return classify(e);
    }
    if let Err(e) = socket.send(b"hello") {
        return classify(e);
    }
    let mut buf = [0u8; 128];
    match socket.recv(&mut buf) {
        Ok(n) => parse_answer(&String::from_utf8_lossy(&buf[..n])),
        Err(e) => classify(e),
    }
}

pub fn sock(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

pub fn ipaddr(ip: &str) -> IpAddr {
    ip.parse().unwrap()
}

/// A bare network namespace (no test bed around it), deleted on drop: for tests that only
/// load rules into a kernel.
pub struct Netns(pub String);

impl Netns {
    pub fn new(name: &str) -> Netns {
        let name = format!("kp{}{name}", std::process::id() % 100000);
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap();
        assert!(ok.success(), "ip netns add {name}");
        Netns(name)
    }

    /// Runs `program args` in the namespace, with `stdin`; its stdout, or its stderr.
    pub fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.0, program])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            let mut input = input;
            input.write_all(text.as_bytes()).unwrap();
        }
        let output = child.wait_with_output().unwrap();
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    }

    /// `nft args`, which must succeed.
    pub fn nft(&self, args: &[&str], stdin: Option<&str>) -> String {
        self.run("nft", args, stdin)
            .unwrap_or_else(|e| panic!("nft {args:?}: {e}"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}
