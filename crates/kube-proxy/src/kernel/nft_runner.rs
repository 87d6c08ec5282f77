//! Runs nft transactions: the only code that spawns `nft` or writes nf_tables netlink.

use std::io::{self, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use kube_proxy_model::IpFamily;
use kube_proxy_nftables::netlink::{self, Answer, Batch, Query};
use kube_proxy_nftables::{ElementCommand, Kernel, KernelTable, RunError, Runner, Transaction};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};
use tracing::{debug, info, trace, warn};

/// Send buffer asked for (a batch is one message and must fit it; the default is 208 KiB).
const NETLINK_SEND_BUFFER: usize = 8 << 20;

/// A base chain whose rules show whether the table is hooked (see `snapshot`).
const BASE_CHAIN_PROBE: &str = "nat-prerouting";

/// Receive buffer for the kernel's answers (see `ElementSocket::receive`).
const RECEIVE_BUFFER: usize = 64 * 1024;

/// Socket receive buffer asked for: the kernel acks every message of a batch before we read
/// any, and each ack costs about 1 KiB of the socket's buffer (default 208 KiB, ~200 acks);
/// a larger batch lost acks (`ENOBUFS`) and the sync failed.
const NETLINK_RECEIVE_BUFFER: usize = 8 << 20;
/// What one queued ack costs of the receive buffer, conservatively (its skb's true size).
const ACK_COST: usize = 1024;

/// How long to wait for the kernel's answer to a batch.
const NETLINK_TIMEOUT: Duration = Duration::from_secs(10);

/// Applies transactions to the kernel: `nft -f -`, one atomic transaction per call; a
/// transaction of nothing but element additions and deletions goes as one nf_tables netlink
/// batch instead (equally atomic, without nft's start-up and set reads; see
/// `kube_proxy_nftables::netlink`).
#[derive(Debug, Default)]
pub struct NftCommand {
    netlink: NetlinkState,
    netlink_batches: u64,
}

#[derive(Debug, Default)]
enum NetlinkState {
    #[default]
    Untried,
    Ready(ElementSocket),
    /// Text only: asked for, or the socket could not be opened.
    Off,
}

impl NftCommand {
    /// Every transaction through `nft`, never netlink (benchmarks compare the two).
    pub fn text_only() -> Self {
        NftCommand {
            netlink: NetlinkState::Off,
            netlink_batches: 0,
        }
    }

    /// Transactions applied as netlink batches so far.
    pub fn netlink_batches(&self) -> u64 {
        self.netlink_batches
    }

    fn element_socket(&mut self) -> Option<&mut ElementSocket> {
        if let NetlinkState::Untried = self.netlink {
            self.netlink = match ElementSocket::open() {
                Ok(socket) => {
                    info!("Element-only changes are applied as nf_tables netlink batches");
                    NetlinkState::Ready(socket)
                }
                Err(error) => {
                    warn!(%error, "Cannot open an nf_tables netlink socket; every change goes through nft");
                    NetlinkState::Off
                }
            };
        }
        match &mut self.netlink {
            NetlinkState::Ready(socket) => Some(socket),
            _ => None,
        }
    }
}

impl Runner for NftCommand {
    fn apply_transaction(&mut self, family: IpFamily, tx: &Transaction) -> Result<(), RunError> {
        if let Some(commands) = tx.element_commands().filter(|c| !c.is_empty()) {
            if let Some(socket) = self.element_socket() {
                let batch = socket.encode(family, commands);
                // Else it goes through nft, equally atomic.
                if batch.bytes.len() <= socket.batch_limit && batch.lines.len() <= socket.ack_limit
                {
                    socket.apply(&batch)?;
                    self.netlink_batches += 1;
                    return Ok(());
                }
            }
        }
        self.apply(tx.text())
    }

    fn snapshot(&mut self, family: IpFamily) -> Result<Kernel, RunError> {
        match self.element_socket() {
            Some(socket) => socket.snapshot(family),
            None => Ok(Kernel::Unknown),
        }
    }

    fn apply(&mut self, script: &str) -> Result<(), RunError> {
        const SHOWN: usize = 200;
        let lines = script.lines().count();
        if lines <= SHOWN {
            trace!(lines, transaction = %script, "Running nft -f -");
        } else {
            let head: String = script.lines().take(SHOWN).collect::<Vec<_>>().join("\n");
            trace!(lines, transaction = %head, "Running nft -f - (first {SHOWN} lines shown)");
        }
        let started = std::time::Instant::now();
        let result = self.run_nft(script);
        trace!(elapsed = ?started.elapsed(), ok = result.is_ok(), "nft finished");
        result
    }
}

impl NftCommand {
    fn run_nft(&mut self, script: &str) -> Result<(), RunError> {
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                RunError::Unavailable(format!(
                    "cannot run nft: {e} (is the nftables package installed?)"
                ))
            })?;
        let written = child
            .stdin
            .take()
            .map(|mut stdin| stdin.write_all(script.as_bytes()));
        let output = child
            .wait_with_output()
            .map_err(|e| RunError::Unavailable(format!("nft did not finish: {e}")))?;
        if let Some(Err(e)) = written {
            if output.status.success() {
                return Err(RunError::Unavailable(format!(
                    "cannot write the transaction to nft: {e}"
                )));
            }
        }
        if output.status.success() {
            Ok(())
        } else {
            Err(RunError::Rejected(
                String::from_utf8_lossy(&output.stderr).into_owned(),
            ))
        }
    }
}

/// An `NETLINK_NETFILTER` socket that sends element batches and reads their answers.
#[derive(Debug)]
struct ElementSocket {
    socket: Socket,
    seq: u32,
    /// Largest batch sent in one message (half the send buffer the kernel granted).
    batch_limit: usize,
    /// Most messages in one batch whose acks fit the receive buffer the kernel granted.
    ack_limit: usize,
}

impl ElementSocket {
    fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_NETFILTER)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        // Answers without a copy of each request.
        socket.set_cap_ack(true)?;
        nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(NETLINK_TIMEOUT.as_secs() as i64, 0),
        )
        .map_err(io::Error::from)?;
        // A larger send buffer than the default lets a staged build send thousands of
        // elements per batch; without the privilege for it, the default serves small changes.
        use nix::sys::socket::{getsockopt, setsockopt, sockopt};
        let _ = setsockopt(&socket, sockopt::SndBufForce, &NETLINK_SEND_BUFFER);
        let granted = getsockopt(&socket, sockopt::SndBuf).unwrap_or(212_992);
        let _ = setsockopt(&socket, sockopt::RcvBufForce, &NETLINK_RECEIVE_BUFFER);
        let receive = getsockopt(&socket, sockopt::RcvBuf).unwrap_or(212_992);
        Ok(ElementSocket {
            socket,
            seq: 1,
            batch_limit: granted / 2,
            ack_limit: receive / ACK_COST / 2,
        })
    }

    /// Receives one datagram. The buffer is large on purpose: the kernel sizes its dump
    /// messages after the reader's buffer (up to 32 KiB), and every dump message of a set
    /// makes it walk the set from the start again, so small messages make a dump of a large
    /// set quadratic (2.4 s instead of a fraction for 360k elements).
    fn receive(&mut self) -> io::Result<Vec<u8>> {
        let mut datagram = Vec::with_capacity(RECEIVE_BUFFER);
        self.socket.recv(&mut datagram, 0)?;
        Ok(datagram)
    }

    /// Sends one query and collects its answers (until the end of a dump, or the ack).
    fn query(
        &mut self,
        family: IpFamily,
        query: Query<'_>,
    ) -> io::Result<Result<Vec<Answer>, i32>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        self.socket.send(&netlink::query(family, query, seq), 0)?;
        let mut found = Vec::new();
        loop {
            let datagram = self.receive()?;
            for answer in netlink::answers(&datagram, seq) {
                match answer {
                    Answer::Done | Answer::Status(0) => return Ok(Ok(found)),
                    Answer::Status(errno) => return Ok(Err(errno)),
                    other => found.push(other),
                }
            }
        }
    }

    /// Reads our table of `family`: its chains, its sets, and the elements of every set
    /// whose elements a full sync compares.
    fn snapshot(&mut self, family: IpFamily) -> Result<Kernel, RunError> {
        let started = std::time::Instant::now();
        let failed = |what: &str, e: String| {
            RunError::Unavailable(format!(
                "cannot list the {family} kube-proxy table's {what}: {e}"
            ))
        };
        let io = |what: &'static str| move |e: io::Error| failed(what, e.to_string());
        let errno = |e: i32| io::Error::from_raw_os_error(e).to_string();
        match self.query(family, Query::Table).map_err(io("table"))? {
            Err(2) => return Ok(Kernel::Absent), // ENOENT
            Err(e) => return Err(failed("table", errno(e))),
            Ok(_) => {}
        }
        let mut table = KernelTable::default();
        let chains = self.query(family, Query::Chains).map_err(io("chains"))?;
        for answer in chains.map_err(|e| failed("chains", errno(e)))? {
            if let Answer::Chain(name) = answer {
                table.chains.insert(name);
            }
        }
        // The base chains' rules come in one transaction (the last of a staged build): one
        // chain tells whether traffic enters the table.
        let rules = self
            .query(family, Query::Rules(BASE_CHAIN_PROBE))
            .map_err(io("rules"))?;
        table.hooked = rules.is_ok_and(|answers| answers.contains(&Answer::Rule));
        let sets = self.query(family, Query::Sets).map_err(io("sets"))?;
        for answer in sets.map_err(|e| failed("sets", errno(e)))? {
            if let Answer::Set { name, comparable } = answer {
                let elements = (comparable && !name.starts_with("affinity-")).then(Vec::new);
                table.sets.insert(name, elements);
            }
        }
        for (name, elements) in table.sets.iter_mut() {
            let Some(elements) = elements else { continue };
            let answers = self
                .query(family, Query::Elements(name))
                .map_err(io("elements"))?
                .map_err(|e| failed("elements", format!("{name}: {}", errno(e))))?;
            for answer in answers {
                if let Answer::Elements(found) = answer {
                    elements.extend(found);
                }
            }
        }
        debug!(
            family = %family,
            chains = table.chains.len(),
            sets = table.sets.len(),
            elements = table.sets.values().flatten().map(Vec::len).sum::<usize>(),
            elapsed = ?started.elapsed(),
            "Read the kernel's kube-proxy table"
        );
        Ok(Kernel::Present(table))
    }

    fn encode(&mut self, family: IpFamily, commands: &[ElementCommand]) -> Batch {
        let batch = netlink::encode(family, commands, self.seq);
        self.seq = self.seq.wrapping_add(batch.lines.len() as u32 + 2);
        batch
    }

    /// Sends the batch and waits for an answer to every message; the kernel answers each
    /// one (ack or error) and applies all or nothing.
    fn apply(&mut self, batch: &Batch) -> Result<(), RunError> {
        let unavailable =
            |e: io::Error| RunError::Unavailable(format!("nf_tables netlink batch failed: {e}"));
        self.socket.send(&batch.bytes, 0).map_err(unavailable)?;
        let mut answered = 0;
        let mut first_error: Option<(usize, i32)> = None;
        while answered < batch.lines.len() {
            let datagram = self.receive().map_err(unavailable)?;
            for (seq, errno) in netlink::responses(&datagram) {
                if seq == batch.first_seq && errno != 0 {
                    // The batch itself was refused (e.g. no permission): nothing follows.
                    return Err(RunError::Rejected(format!(
                        "netlink:1:0: Error: {}",
                        io::Error::from_raw_os_error(errno)
                    )));
                }
                let Some(line) = batch.line_of(seq) else {
                    continue; // an answer to an earlier batch that timed out
                };
                answered += 1;
                if errno != 0 && first_error.is_none() {
                    first_error = Some((line, errno));
                }
            }
        }
        match first_error {
            None => Ok(()),
            Some((line, errno)) => Err(RunError::Rejected(format!(
                "netlink:{line}:0: Error: Could not process rule: {}",
                io::Error::from_raw_os_error(errno)
            ))),
        }
    }
}

/// Prints each transaction to stdout instead of applying it (`--dry-run`; needs no root).
#[derive(Debug, Default)]
pub struct PrintTransactions;

impl Runner for PrintTransactions {
    fn apply(&mut self, script: &str) -> Result<(), RunError> {
        let mut out = std::io::stdout().lock();
        out.write_all(script.as_bytes())
            .and_then(|_| out.write_all(b"\n"))
            .and_then(|_| out.flush())
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::BrokenPipe => RunError::OutputClosed,
                _ => RunError::Unavailable(format!("cannot write to standard output: {e}")),
            })
    }
}

/// Checks that `nft` is installed and recent enough (upstream requires 1.0.1).
pub fn check_nft() -> Result<String, String> {
    let output = Command::new("nft").arg("--version").output().map_err(|e| {
        format!("the nftables proxy mode needs the nft command: {e}; install the nftables package")
    })?;
    let text = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let version = text
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .trim_start_matches('v');
    let parts: Vec<u32> = version.split('.').filter_map(|p| p.parse().ok()).collect();
    if parts.len() >= 2 && (parts[0], parts[1], parts.get(2).copied().unwrap_or(0)) < (1, 0, 1) {
        return Err(format!(
            "nft {version} is too old; the nftables mode needs nft 1.0.1 or later"
        ));
    }
    Ok(text)
}
