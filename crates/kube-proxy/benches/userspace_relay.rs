//! userspace mode's relay against two anchors, side by side in one run: HAProxy (Debian's
//! `haproxy`, TCP mode, the same server) and this proxy's nftables mode (kernel NAT, the
//! ceiling). Three network namespaces this benchmark makes (as root):
//!
//! ```text
//!   client 203.0.113.5 ── node 203.0.113.1 / 198.18.0.1 ── server 198.18.0.2
//! ```
//!
//! The node runs the proxy under test (ClusterIPs 198.19.0.10-12, standalone manifests) or
//! HAProxy (203.0.113.1:9000-9002); the server runs a byte sink (8082), an echo (8080) and a
//! holder of idle connections (8083). Printed per target: bulk throughput with 1 and 16
//! connections, new connections per second with a short request each, the latency of a
//! 64-byte round trip on an open connection (p50/p99, and what the proxy adds to the direct
//! path), and the proxy's RSS per 10,000 idle connections.
//!
//! `KP_BENCH_ROUNDS` (default 3) rounds alternate the targets and each figure is the median
//! of its rounds; `KP_BENCH_SECONDS` (default 3) sets each load's duration; `KP_BENCH_IDLE` (default
//! 10000, capped by the open-files limit: each connection takes two descriptors in the proxy
//! and two here) the idle connections; `KP_BENCH_TARGETS` (default
//! `userspace,userspace-listener,haproxy,nftables`; `userspace-listener` is userspace mode
//! reached at its listeners' ports, without the REDIRECT in front: the relay alone).
//! `KP_BENCH_PERF=<dir>` records each proxy with `perf record -g` during the connection-rate
//! load into `<dir>/<target>-<round>.perf.data` (where a connection's CPU goes).

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

fn run(args: &[&str]) {
    let status = Command::new(args[0]).args(&args[1..]).status().unwrap();
    assert!(status.success(), "{args:?}: {status}");
}

/// Runs `f` on a thread inside namespace `ns` (threads it spawns stay there too).
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    thread::spawn(move || {
        let file = File::open(&path).unwrap();
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

/// Starts a thread inside namespace `ns` that runs `f` (and goes on).
fn spawn_in_netns(ns: &str, f: impl FnOnce() + Send + 'static) -> thread::JoinHandle<()> {
    let path = format!("/run/netns/{ns}");
    thread::spawn(move || {
        let file = File::open(&path).unwrap();
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
}

struct Bed {
    prefix: String,
    dir: std::path::PathBuf,
}

impl Bed {
    fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }

    fn new() -> Bed {
        let prefix = format!("kpus{}", std::process::id() % 100000);
        let dir = std::env::temp_dir().join(format!("{prefix}-bench"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("manifests")).unwrap();
        let bed = Bed { prefix, dir };
        for role in ["client", "node", "server"] {
            run(&["ip", "netns", "add", &bed.ns(role)]);
            run(&["ip", "-n", &bed.ns(role), "link", "set", "lo", "up"]);
        }
        let (client, node, server) = (bed.ns("client"), bed.ns("node"), bed.ns("server"));
        run(&[
            "ip", "-n", &client, "link", "add", "eth0", "type", "veth", "peer", "name", "c0",
            "netns", &node,
        ]);
        run(&[
            "ip", "-n", &server, "link", "add", "eth0", "type", "veth", "peer", "name", "s0",
            "netns", &node,
        ]);
        for (ns, dev, addr) in [
            (&client, "eth0", "203.0.113.5/24"),
            (&node, "c0", "203.0.113.1/24"),
            (&node, "s0", "198.18.0.1/24"),
            (&server, "eth0", "198.18.0.2/24"),
        ] {
            run(&["ip", "-n", ns, "addr", "add", addr, "dev", dev]);
            run(&["ip", "-n", ns, "link", "set", dev, "up"]);
        }
        run(&[
            "ip",
            "-n",
            &client,
            "route",
            "add",
            "default",
            "via",
            "203.0.113.1",
        ]);
        run(&[
            "ip",
            "-n",
            &server,
            "route",
            "add",
            "default",
            "via",
            "198.18.0.1",
        ]);
        run(&[
            "ip",
            "netns",
            "exec",
            &node,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
        bed
    }

    fn manifests(&self) -> std::path::PathBuf {
        self.dir.join("manifests")
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        for role in ["client", "node", "server"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(role)])
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const BULK: u16 = 8082;
const ECHO: u16 = 8080;
const IDLE: u16 = 8083;

/// The idle connections the server holds (emptied after each target).
type Held = Arc<Mutex<Vec<TcpStream>>>;

/// The servers: a sink counting bytes, an echo, a holder of idle connections.
fn start_servers(bed: &Bed, sunk: Arc<AtomicU64>, held: Held) {
    let ns = bed.ns("server");
    let listeners = in_netns(&ns, || {
        [BULK, ECHO, IDLE].map(|p| TcpListener::bind(("198.18.0.2", p)).unwrap())
    });
    let [bulk, echo, idle] = listeners;
    thread::spawn(move || {
        for conn in bulk.incoming().flatten() {
            let sunk = sunk.clone();
            thread::spawn(move || {
                let mut conn = conn;
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sunk.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
        }
    });
    // The echo answers on its accepting threads (a small pool), so new connections per
    // second measure the proxy rather than thread creation.
    let echo = Arc::new(echo);
    for _ in 0..4 {
        let echo = echo.clone();
        thread::spawn(move || {
            for conn in echo.incoming().flatten() {
                let mut conn = conn;
                let _ = conn.set_nodelay(true);
                let mut buf = [0u8; 64];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        });
    }
    thread::spawn(move || {
        for conn in idle.incoming().flatten() {
            held.lock().unwrap().push(conn);
        }
    });
}

fn write_manifests(bed: &Bed) {
    let mut yaml = String::from("apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nstatus:\n  addresses:\n  - {type: InternalIP, address: 203.0.113.1}\n");
    for (i, (name, port)) in [("bulk", BULK), ("echo", ECHO), ("idle", IDLE)]
        .iter()
        .enumerate()
    {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: b}}\nspec:\n  clusterIP: 198.19.0.{}\n  ports:\n  - {{name: p, port: 80, targetPort: {port}}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: b\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports:\n- {{name: p, port: {port}, protocol: TCP}}\nendpoints:\n- {{addresses: [198.18.0.2], conditions: {{ready: true}}}}\n",
            10 + i
        ));
    }
    std::fs::write(bed.manifests().join("all.yaml"), yaml).unwrap();
}

/// A target: where the client connects for each server, and the process to weigh.
struct Target {
    name: &'static str,
    bulk: SocketAddr,
    echo: SocketAddr,
    idle: SocketAddr,
    child: Option<Child>,
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn proxy(bed: &Bed, mode: &str) -> Child {
    let log = File::create(bed.dir.join(format!("{mode}.log"))).unwrap();
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &bed.ns("node"),
            env!("CARGO_BIN_EXE_kube-proxy"),
        ])
        .arg(format!("--proxy-mode={mode}"))
        .arg("--hostname-override=node-a")
        .arg(format!("--manifests={}", bed.manifests().display()))
        .args(["--healthz-bind-address=", "--metrics-bind-address="])
        .env("KUBE_PROXY_IPTABLES_BACKEND", "nft")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    child
}

/// HAProxy in TCP mode with its defaults for it; `defer_accept` adds `option
/// tcp-smart-accept` (TCP_DEFER_ACCEPT: the kernel hands a connection over only with its
/// first data, one wake-up and one ACK less). HAProxy turns that on by itself only in HTTP
/// mode: it holds back server-speaks-first protocols (SMTP, MySQL, SSH) for up to a second,
/// so a Service proxy cannot use it; it is measured as `haproxy-defer` for comparison.
fn haproxy(bed: &Bed, defer_accept: bool) -> Child {
    let config = bed.dir.join("haproxy.cfg");
    let option = if defer_accept {
        "  option tcp-smart-accept\n"
    } else {
        ""
    };
    let mut text = String::from("global\n  maxconn 9000\n  nbthread 2\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 5m\n  timeout server 5m\n");
    for (name, listen, port) in [
        ("bulk", 9000, BULK),
        ("echo", 9001, ECHO),
        ("idle", 9002, IDLE),
    ] {
        text.push_str(&format!(
            "listen {name}\n  bind 203.0.113.1:{listen}\n{option}  server s1 198.18.0.2:{port}\n"
        ));
    }
    std::fs::write(&config, text).unwrap();
    Command::new("ip")
        .args(["netns", "exec", &bed.ns("node"), "haproxy", "-db", "-f"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(File::create(bed.dir.join("haproxy.log")).unwrap())
        .spawn()
        .unwrap()
}

/// The userspace listener port `vip:80` is redirected to.
fn listener_port(bed: &Bed, vip: &str) -> u16 {
    let saved = Command::new("ip")
        .args([
            "netns",
            "exec",
            &bed.ns("node"),
            "iptables-nft-save",
            "-t",
            "nat",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&saved.stdout)
        .lines()
        .find(|l| l.contains("KUBE-PORTALS-CONTAINER") && l.contains(&format!("-d {vip}/32")))
        .and_then(|l| l.split("--to-ports ").nth(1))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no redirect of {vip}"))
}

/// Waits until a request through `to` is answered by the echo.
fn wait_ready(bed: &Bed, to: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let ok = in_netns(&bed.ns("client"), move || round_trip_once(to).is_ok());
        if ok {
            return;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let mut logs = String::new();
    for entry in std::fs::read_dir(&bed.dir).unwrap().flatten() {
        if entry.path().extension().is_some_and(|e| e == "log") {
            logs.push_str(&format!(
                "--- {}\n{}",
                entry.path().display(),
                std::fs::read_to_string(entry.path()).unwrap_or_default()
            ));
        }
    }
    panic!("{to} never answered\n{logs}");
}

fn round_trip_once(to: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.write_all(b"ping")?;
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf)
}

/// Bytes per second the sink received from `parallel` connections writing for `seconds`.
fn throughput(bed: &Bed, to: SocketAddr, parallel: usize, seconds: f64, sunk: &AtomicU64) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let before = sunk.load(Ordering::Relaxed);
    let started = Instant::now();
    let workers: Vec<_> = (0..parallel)
        .map(|_| {
            let stop = stop.clone();
            spawn_in_netns(&bed.ns("client"), move || {
                let mut s = TcpStream::connect(to).unwrap();
                let buf = vec![0x5au8; 256 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    if s.write_all(&buf).is_err() {
                        break;
                    }
                }
            })
        })
        .collect();
    thread::sleep(Duration::from_secs_f64(seconds));
    let bytes = sunk.load(Ordering::Relaxed) - before;
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    bytes as f64 / elapsed
}

/// CPU seconds (user + system) process `pid` has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat(5), 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// Completed connect + 64-byte request + answer + close per second (4 clients), and the
/// relaying process's CPU microseconds per connection.
fn connections_per_second(
    bed: &Bed,
    to: SocketAddr,
    seconds: f64,
    pid: Option<u32>,
    profile: Option<std::path::PathBuf>,
) -> (f64, f64) {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (stop, done) = (stop.clone(), done.clone());
            spawn_in_netns(&bed.ns("client"), move || {
                let request = [7u8; 64];
                let mut answer = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut s) = TcpStream::connect(to) else {
                        continue;
                    };
                    let _ = s.set_nodelay(true);
                    if s.write_all(&request).is_ok() && s.read_exact(&mut answer).is_ok() {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    // Reset rather than linger in TIME_WAIT: the client would run out of
                    // ports long before the proxy runs out of breath.
                    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                }
            })
        })
        .collect();
    let started = Instant::now();
    let cpu_before = pid.map(cpu_seconds);
    let n_before = done.load(Ordering::Relaxed);
    let perf = pid.zip(profile).and_then(|(pid, file)| {
        Command::new("perf")
            .args([
                "record",
                "-q",
                "-g",
                "-F",
                "4000",
                "-p",
                &pid.to_string(),
                "-o",
            ])
            .arg(file)
            .args(["--", "sleep", &format!("{seconds}")])
            .stdout(Stdio::null())
            .spawn()
            .ok()
    });
    thread::sleep(Duration::from_secs_f64(seconds));
    let n = done.load(Ordering::Relaxed) - n_before;
    let cpu = pid
        .map(cpu_seconds)
        .zip(cpu_before)
        .map_or(0.0, |(a, b)| a - b);
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    if let Some(mut perf) = perf {
        let _ = perf.wait();
    }
    (n as f64 / elapsed, cpu * 1e6 / n.max(1) as f64)
}

/// p50 and p99 of a 64-byte round trip on one open connection, in microseconds.
fn latency(bed: &Bed, to: SocketAddr) -> (f64, f64) {
    in_netns(&bed.ns("client"), move || {
        let mut s = TcpStream::connect(to).unwrap();
        s.set_nodelay(true).unwrap();
        let request = [7u8; 64];
        let mut answer = [0u8; 64];
        let mut samples = Vec::with_capacity(5000);
        for i in 0..5200 {
            let started = Instant::now();
            s.write_all(&request).unwrap();
            s.read_exact(&mut answer).unwrap();
            if i >= 200 {
                samples.push(started.elapsed().as_secs_f64() * 1e6);
            }
        }
        samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize];
        (at(0.5), at(0.99))
    })
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The process doing the relaying (`ip netns exec` execs it, so it is the child itself).
fn relay_pid(target: &Target) -> Option<u32> {
    target.child.as_ref().map(|c| c.id())
}

/// The proxy's RSS growth per 10,000 idle connections (KiB), opened `n` at a time.
fn idle_rss(bed: &Bed, target: &Target, n: usize) -> Option<(f64, usize)> {
    let pid = relay_pid(target)?;
    let before = rss_kib(pid);
    let to = target.idle;
    let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    let sink = held.clone();
    in_netns(&bed.ns("client"), move || {
        for _ in 0..n {
            match TcpStream::connect(to) {
                Ok(s) => sink.lock().unwrap().push(s),
                Err(e) => {
                    eprintln!("idle connection {}: {e}", sink.lock().unwrap().len());
                    break;
                }
            }
        }
    });
    // The relay connects to the server after accepting: let it finish.
    thread::sleep(Duration::from_secs(2));
    let after = rss_kib(pid);
    let opened = held.lock().unwrap().len();
    drop(held);
    Some((
        (after.saturating_sub(before)) as f64 * 10_000.0 / opened.max(1) as f64,
        opened,
    ))
}

struct Figures {
    name: &'static str,
    one: f64,
    sixteen: f64,
    cps: f64,
    /// CPU µs the relaying process spent per connection (0 in kernel mode).
    cpu_per_conn: f64,
    p50: f64,
    p99: f64,
    idle_kib: Option<(f64, usize)>,
}

/// Empties the connection-tracking tables of the bed: every namespace's entries count
/// against the host's one limit, and the connection-rate load leaves tens of thousands of
/// closing ones behind (a full table drops new connections: the rate collapses).
fn forget_connections(bed: &Bed) {
    for role in ["client", "node", "server"] {
        let _ = Command::new("ip")
            .args(["netns", "exec", &bed.ns(role), "conntrack", "-F"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn measure(
    bed: &Bed,
    target: &Target,
    seconds: f64,
    idle: usize,
    sunk: &AtomicU64,
    held: &Held,
    round: usize,
) -> Figures {
    wait_ready(bed, target.echo);
    let one = throughput(bed, target.bulk, 1, seconds, sunk);
    let sixteen = throughput(bed, target.bulk, 16, seconds, sunk);
    forget_connections(bed);
    let profile = std::env::var_os("KP_BENCH_PERF")
        .map(|dir| std::path::Path::new(&dir).join(format!("{}-{round}.perf.data", target.name)));
    let (cps, cpu_per_conn) =
        connections_per_second(bed, target.echo, seconds, relay_pid(target), profile);
    forget_connections(bed);
    let (p50, p99) = latency(bed, target.echo);
    let idle_kib = idle_rss(bed, target, idle);
    held.lock().unwrap().clear();
    Figures {
        name: target.name,
        one,
        sixteen,
        cps,
        cpu_per_conn,
        p50,
        p99,
        idle_kib,
    }
}

/// The targets `KP_BENCH_TARGETS` may name.
const TARGETS: [&str; 5] = [
    "userspace",
    "userspace-listener",
    "haproxy",
    "haproxy-defer",
    "nftables",
];

fn main() {
    if !nix::unistd::geteuid().is_root() {
        println!("userspace_relay: needs root (it creates its own network namespaces); skipped");
        return;
    }
    // Room for the idle connections: both ends are in this process, and the proxies
    // (children) inherit the limit. Where the hard limit is lower (20,000 here), the idle
    // connections are capped below it and the RSS is scaled to 10,000.
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    let seconds: f64 = std::env::var("KP_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let fit = (hard as usize).saturating_sub(4_000) / 2;
    let idle: usize = std::env::var("KP_BENCH_IDLE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000)
        .min(fit);
    let rounds_wanted: usize = std::env::var("KP_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .max(1);
    let targets: Vec<&'static str> = std::env::var("KP_BENCH_TARGETS")
        .unwrap_or_else(|_| "userspace,userspace-listener,haproxy,nftables".into())
        .split(',')
        .map(|asked| {
            *TARGETS
                .iter()
                .find(|t| **t == asked)
                .unwrap_or_else(|| panic!("unknown target {asked}: one of {TARGETS:?}"))
        })
        .collect();
    let bed = Bed::new();
    let sunk = Arc::new(AtomicU64::new(0));
    let held: Held = Arc::default();
    start_servers(&bed, sunk.clone(), held.clone());
    write_manifests(&bed);
    let cluster = |i: u8| SocketAddr::from(([198, 19, 0, 10 + i], 80));
    let node = |port: u16| SocketAddr::from(([203, 0, 113, 1], port));

    // The direct path (routed by the node, no proxy): what every proxy adds to.
    let (direct_p50, direct_p99) = latency(&bed, SocketAddr::from(([198, 18, 0, 2], ECHO)));
    println!("userspace_relay: {seconds} s per load, {idle} idle connections; direct path (routed, no proxy): round trip p50 {direct_p50:.0} µs, p99 {direct_p99:.0} µs");

    // Rounds alternate the targets, so a busy moment of this shared machine hits them all;
    // each figure is the median of its rounds.
    let mut rounds: Vec<Vec<Figures>> = Vec::new();
    for round in 0..rounds_wanted {
        let mut this = Vec::new();
        for &name in &targets {
            let target = match name {
                "userspace" | "nftables" => Target {
                    name,
                    bulk: cluster(0),
                    echo: cluster(1),
                    idle: cluster(2),
                    child: Some(proxy(&bed, name)),
                },
                // The same relay reached at its listeners' ports, without the REDIRECT (and
                // its connection tracking) in front: relay against relay with HAProxy.
                "userspace-listener" => {
                    let child = proxy(&bed, "userspace");
                    wait_ready(&bed, cluster(1));
                    let port = |vip: &str| SocketAddr::new(node(0).ip(), listener_port(&bed, vip));
                    Target {
                        name: "userspace-listener",
                        bulk: port("198.19.0.10"),
                        echo: port("198.19.0.11"),
                        idle: port("198.19.0.12"),
                        child: Some(child),
                    }
                }
                "haproxy" | "haproxy-defer"
                    if Command::new("haproxy").arg("-v").output().is_err() =>
                {
                    if round == 0 {
                        println!("haproxy is not installed (apt-get install haproxy): that anchor is skipped");
                    }
                    continue;
                }
                "haproxy" | "haproxy-defer" => Target {
                    name,
                    bulk: node(9000),
                    echo: node(9001),
                    idle: node(9002),
                    child: Some(haproxy(&bed, name == "haproxy-defer")),
                },
                other => unreachable!("{other} is in TARGETS"),
            };
            let figures = measure(&bed, &target, seconds, idle, &sunk, &held, round);
            eprintln!(
                "round {round} {name}: {:.2} / {:.2} Gbit/s, {:.0} conn/s ({:.1} CPU µs each), p50 {:.0} µs",
                figures.one * 8e-9,
                figures.sixteen * 8e-9,
                figures.cps,
                figures.cpu_per_conn,
                figures.p50
            );
            drop(target);
            // Let the held connections and the proxy's rules go before the next target.
            thread::sleep(Duration::from_secs(1));
            let _ = Command::new("ip")
                .args(["netns", "exec", &bed.ns("node"), "nft", "flush", "ruleset"])
                .status();
            this.push(figures);
        }
        rounds.push(this);
    }
    let all: Vec<Figures> = (0..rounds[0].len())
        .map(|t| {
            let median = |f: &dyn Fn(&Figures) -> f64| {
                let mut v: Vec<f64> = rounds.iter().map(|r| f(&r[t])).collect();
                v.sort_by(|a, b| a.partial_cmp(b).unwrap());
                v[v.len() / 2]
            };
            Figures {
                name: rounds[0][t].name,
                one: median(&|f| f.one),
                sixteen: median(&|f| f.sixteen),
                cps: median(&|f| f.cps),
                cpu_per_conn: median(&|f| f.cpu_per_conn),
                p50: median(&|f| f.p50),
                p99: median(&|f| f.p99),
                idle_kib: rounds[0][t]
                    .idle_kib
                    .map(|(_, n)| (median(&|f| f.idle_kib.map_or(0.0, |(k, _)| k)), n)),
            }
        })
        .collect();
    println!("medians of {rounds_wanted} rounds:");

    println!(
        "{:<10} {:>14} {:>14} {:>9} {:>13} {:>16} {:>16} {:>26}",
        "target",
        "1 conn Gbit/s",
        "16 conn Gbit/s",
        "conn/s",
        "CPU µs/conn",
        "p50 µs (+added)",
        "p99 µs (+added)",
        "RSS MiB/10k idle (opened)"
    );
    for f in &all {
        println!(
            "{:<10} {:>14.2} {:>14.2} {:>9.0} {:>13.1} {:>8.0} ({:+5.0}) {:>8.0} ({:+5.0}) {:>26}",
            f.name,
            f.one * 8.0 / 1e9,
            f.sixteen * 8.0 / 1e9,
            f.cps,
            f.cpu_per_conn,
            f.p50,
            f.p50 - direct_p50,
            f.p99,
            f.p99 - direct_p99,
            f.idle_kib
                .map_or("-".into(), |(k, n)| format!("{:.1} ({n})", k / 1024.0)),
        );
    }
    let find = |n: &str| all.iter().find(|f| f.name == n);
    if let (Some(u), Some(h)) = (find("userspace"), find("haproxy")) {
        println!(
            "userspace / haproxy: throughput 1 conn {:.2}x, 16 conn {:.2}x, conn/s {:.2}x, CPU per connection {:.2}x, added p50 {:.2}x, RSS per idle connection {}",
            u.one / h.one,
            u.sixteen / h.sixteen,
            u.cps / h.cps,
            u.cpu_per_conn / h.cpu_per_conn,
            (u.p50 - direct_p50) / (h.p50 - direct_p50),
            match (u.idle_kib, h.idle_kib) {
                (Some((a, _)), Some((b, _))) if b > 0.0 => format!("{:.2}x", a / b),
                _ => "-".into(),
            }
        );
    }
    if let (Some(u), Some(h)) = (find("userspace-listener"), find("haproxy")) {
        println!(
            "userspace relay alone (no REDIRECT) / haproxy: throughput 1 conn {:.2}x, 16 conn {:.2}x, conn/s {:.2}x, CPU per connection {:.2}x",
            u.one / h.one,
            u.sixteen / h.sixteen,
            u.cps / h.cps,
            u.cpu_per_conn / h.cpu_per_conn,
        );
    }
    if let (Some(u), Some(n)) = (find("userspace"), find("nftables")) {
        println!(
            "userspace / nftables (kernel NAT): throughput 1 conn {:.2}x, 16 conn {:.2}x, conn/s {:.2}x",
            u.one / n.one,
            u.sixteen / n.sixteen,
            u.cps / n.cps
        );
    }
}
