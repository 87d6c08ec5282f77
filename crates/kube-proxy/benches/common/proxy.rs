//! The proxy binary as the benchmarks run it: with upstream's flags against the fake API
//! server, its log lines read by a thread, its RSS and its kernel tools' peak RSS measured.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The dataplane a child measures (`KP_BENCH_MODE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Nftables,
    Iptables(&'static str),
    /// ipvs mode (in the VM: scripts/vm/bench.sh), iptables on the nf_tables backend.
    Ipvs,
}

impl Mode {
    pub fn current() -> Mode {
        match std::env::var("KP_BENCH_MODE").as_deref() {
            Ok("iptables-nft") => Mode::Iptables("nft"),
            Ok("iptables-legacy") => Mode::Iptables("legacy"),
            Ok("ipvs") => Mode::Ipvs,
            _ => Mode::Nftables,
        }
    }

    /// The kernel tools whose runs are metered.
    pub fn tools(self) -> Vec<String> {
        match self {
            Mode::Nftables => vec!["nft".into()],
            Mode::Ipvs => vec!["ipvsadm".into(), "ipset".into()],
            Mode::Iptables(backend) => ["iptables", "ip6tables"]
                .iter()
                .map(|base| format!("{base}-{backend}-restore"))
                .collect(),
        }
    }

    pub fn name(self) -> String {
        match self {
            Mode::Nftables => "nftables".into(),
            Mode::Ipvs => "ipvs".into(),
            Mode::Iptables(backend) => format!("iptables ({backend} backend)"),
        }
    }
}

/// The proxy binary with upstream's flags, its log lines read by a thread (with the instant
/// each was read), so it keeps running while changes are measured.
pub struct Proxy {
    pub child: std::process::Child,
    pub pid: u32,
    pub started: Instant,
    pub lines: std::sync::mpsc::Receiver<(Instant, String)>,
}

/// Process start to both families in the kernel, with the marks on the way and the first
/// IPv4 sync's size.
pub struct Synced {
    pub marks: Vec<(&'static str, Duration)>,
    pub total: Duration,
    pub statements: usize,
    pub transactions: usize,
}

impl Proxy {
    pub fn start(url: &str, mode: Mode) -> Proxy {
        let started = Instant::now();
        let mut command = Command::new(env!("CARGO_BIN_EXE_kube-proxy"));
        if let Some((path, _)) = nft_meter(mode) {
            command.env("PATH", path);
        }
        match mode {
            Mode::Iptables(backend) => {
                command.env("KUBE_PROXY_IPTABLES_BACKEND", backend);
            }
            Mode::Ipvs => {
                command.env("KUBE_PROXY_IPTABLES_BACKEND", "nft");
            }
            Mode::Nftables => {}
        }
        let proxy_mode = match mode {
            Mode::Nftables => "--proxy-mode=nftables",
            Mode::Iptables(_) => "--proxy-mode=iptables",
            Mode::Ipvs => "--proxy-mode=ipvs",
        };
        let mut child = command
            .args([
                "--master",
                url,
                "--hostname-override=node-a",
                proxy_mode,
                "--cluster-cidr=198.18.0.0/16",
                "--healthz-bind-address=",
                "--metrics-bind-address=",
                "--conntrack-max-per-core=0",
                // KP_BENCH_V=4: the proxy's detail (with KP_BENCH_VERBOSE=all to see it).
                &format!(
                    "-v={}",
                    std::env::var("KP_BENCH_V").unwrap_or_else(|_| "2".into())
                ),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let stderr = child.stderr.take().unwrap();
        let (lines_tx, lines) = std::sync::mpsc::channel::<(Instant, String)>();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if lines_tx.send((Instant::now(), line)).is_err() {
                    return;
                }
            }
        });
        Proxy {
            child,
            pid,
            started,
            lines,
        }
    }

    pub fn wait_synced(&mut self) -> Synced {
        let mut marks: Vec<(&str, Duration)> = Vec::new();
        let mut synced = [false, false];
        let mut errors = Vec::new();
        let (mut statements, mut transactions) = (0, 0);
        let field = |line: &str, name: &str| -> usize {
            line.split(&format!(" {name}="))
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        // Long enough for a large cold start on the nf_tables iptables backend.
        while let Ok((read_at, line)) = self.lines.recv_timeout(Duration::from_secs(900)) {
            let at = read_at - self.started;
            // KP_BENCH_VERBOSE=1: show how each sync went.
            let verbose = std::env::var("KP_BENCH_VERBOSE").unwrap_or_default();
            if verbose == "all"
                || !verbose.is_empty()
                    && (line.contains("\"Synced\"")
                        || line.contains("Read the kernel")
                        || line.contains("nft"))
            {
                eprintln!("  | {line}");
            }
            if line.contains("Listed objects") && line.contains("kind=\"Services\"") {
                marks.push(("Services listed", at));
            } else if line.contains("Listed objects") && line.contains("kind=\"EndpointSlices\"") {
                marks.push(("EndpointSlices listed", at));
            } else if line.contains("starting to sync") {
                marks.push(("sync started", at));
            } else if line.contains("\"Synced\" family=\"IPv4\"") && !synced[0] {
                synced[0] = true;
                statements = field(&line, "statements");
                transactions = field(&line, "transactions");
                marks.push(("IPv4 in the kernel", at));
            } else if line.contains("\"Synced\" family=\"IPv6\"") && !synced[1] {
                synced[1] = true;
                marks.push(("IPv6 in the kernel", at));
            }
            if line.starts_with('E') {
                errors.push(line.clone());
            }
            if synced == [true, true] {
                break;
            }
        }
        assert!(errors.is_empty(), "errors logged: {errors:#?}");
        assert_eq!(synced, [true, true], "both families synced");
        let total = marks.iter().map(|(_, at)| *at).max().unwrap_or_default();
        Synced {
            marks,
            total,
            statements,
            transactions,
        }
    }

    pub fn stop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// The mode's kernel tools wrapped to record the peak RSS of every run (`/usr/bin/time -f
/// %M`), first in the proxy's PATH: (PATH for the proxy, the record). None without
/// /usr/bin/time.
pub fn nft_meter(mode: Mode) -> Option<(String, std::path::PathBuf)> {
    static METER: std::sync::OnceLock<Option<(String, std::path::PathBuf)>> =
        std::sync::OnceLock::new();
    METER
        .get_or_init(|| {
            let time = std::path::Path::new("/usr/bin/time");
            if !time.exists() {
                return None;
            }
            let dir = std::env::temp_dir().join(format!("kp-nft-meter-{}", std::process::id()));
            std::fs::create_dir_all(&dir).ok()?;
            let record = dir.join("peaks");
            for tool in mode.tools() {
                let real = Command::new("sh")
                    .args(["-c", &format!("command -v {tool}")])
                    .output()
                    .ok()
                    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                    .filter(|p| !p.is_empty())?;
                let script = format!(
                    "#!/bin/sh\nexec /usr/bin/time -a -o {} -f %M {real} \"$@\"\n",
                    record.display()
                );
                let wrapper = dir.join(&tool);
                std::fs::write(&wrapper, script).ok()?;
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).ok()?;
            }
            let path = format!(
                "{}:{}",
                dir.display(),
                std::env::var("PATH").unwrap_or_default()
            );
            Some((path, record))
        })
        .clone()
}

/// The largest peak RSS (KiB) of the tool runs recorded so far, and forgets them.
pub fn take_nft_peak(mode: Mode) -> Option<u64> {
    let (_, record) = nft_meter(mode)?;
    let text = std::fs::read_to_string(&record).unwrap_or_default();
    let _ = std::fs::remove_file(&record);
    Some(
        text.lines()
            .filter_map(|l| l.trim().parse().ok())
            .max()
            .unwrap_or(0),
    )
}
