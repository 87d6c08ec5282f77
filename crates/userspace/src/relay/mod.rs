//! The listeners and relays of userspace mode.
//!
//! They run on a fixed number of relay threads of their own ([`shards`]), apart from the
//! sync loop, so a slow sync never stalls traffic and a flood of connections never stalls a
//! sync. Per connection there is one task, the two sockets and,
//! once bytes flow, one pipe per direction (TCP bytes move socket → pipe → socket with
//! splice(2), never copied into user space); per UDP client one task and one socket.
//!
//! The proxier drives it through [`ListenerControl`] (a fake in unit tests): a listener is
//! opened before the redirect rules point at it and closed after they stop; closing one stops
//! accepting at once while its established connections go on to their end.

mod shards;
mod stats;
mod tcp;
mod udp;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube_proxy_model::{IpFamily, Protocol};
use socket2::{Domain, SockAddr, Socket, Type};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::balancer::Balancer;
use crate::desired::{ListenerKey, ListenerSpec};

pub use stats::{Counters, PortStats, Stats};

/// What the proxier asks of the relays (implemented by [`Relay`]).
pub trait ListenerControl: Send {
    /// Binds a listener for `key` on the first free port of `candidates` (`0`: any) and
    /// serves `spec` with it; returns the port.
    fn open(
        &mut self,
        family: IpFamily,
        key: &ListenerKey,
        spec: &ListenerSpec,
        candidates: &[u16],
    ) -> io::Result<u16>;
    /// New endpoints or affinity for an open listener (it starts or stops accepting).
    fn update(
        &mut self,
        family: IpFamily,
        key: &ListenerKey,
        spec: &ListenerSpec,
    ) -> io::Result<()>;
    /// Stops accepting; established connections go on.
    fn close(&mut self, family: IpFamily, key: &ListenerKey);
    /// Holds a NodePort on every address, so no other program takes it (upstream's claim).
    fn claim_node_port(
        &mut self,
        family: IpFamily,
        protocol: Protocol,
        port: u16,
    ) -> io::Result<()>;
    fn release_node_port(&mut self, family: IpFamily, protocol: Protocol, port: u16);
    /// Once per sync, after the closes: drops what closed listeners left (their counters).
    fn tidy(&mut self) {}
}

/// How long a connect to an endpoint may take, per attempt; each failed attempt moves to the
/// next endpoint (upstream's `endpointDialTimeout`).
pub const CONNECT_TIMEOUTS: [Duration; 4] = [
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
];

/// What a listener's tasks share: its name, its balancer and its counters.
pub(crate) struct Frontend {
    pub label: String,
    pub balancer: Mutex<Balancer>,
    pub counters: Arc<Counters>,
    pub udp_timeout: Duration,
}

/// How an open listener serves.
enum Serving {
    /// TCP, accepting: one task per relay thread, each owning a listening socket of the
    /// port's `SO_REUSEPORT` group (the kernel spreads connections over them).
    Accepting(Vec<JoinHandle<()>>),
    /// TCP without endpoints: the port is bound but not listening, so connections are
    /// refused (a SYN to it gets a RST).
    Held(Socket),
    /// UDP, receiving.
    Receiving(JoinHandle<()>),
    /// UDP without endpoints: nothing bound, so datagrams get ICMP port unreachable.
    Unbound,
}

struct Open {
    port: u16,
    protocol: Protocol,
    frontend: Arc<Frontend>,
    serving: Serving,
}

pub struct RelayConfig {
    /// Relay threads.
    pub threads: usize,
    /// `bindAddress` when it is one address (else the listeners take every address).
    pub listen_ip: Option<IpAddr>,
    pub udp_timeout: Duration,
}

/// The relays: the relay threads and the listeners open on them.
pub struct Relay {
    shards: Arc<shards::Shards>,
    config: RelayConfig,
    open: HashMap<(IpFamily, ListenerKey), Open>,
    claims: HashMap<(IpFamily, Protocol, u16), Socket>,
    stats: Arc<Stats>,
}

impl Relay {
    pub fn new(config: RelayConfig) -> io::Result<Relay> {
        raise_open_files_limit();
        Ok(Relay {
            shards: Arc::new(shards::Shards::start(config.threads)?),
            config,
            open: HashMap::new(),
            claims: HashMap::new(),
            stats: Arc::default(),
        })
    }

    /// The counters the metrics read.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    fn listen_address(&self, family: IpFamily, port: u16) -> SocketAddr {
        let ip = match (self.config.listen_ip, family) {
            (Some(ip @ IpAddr::V4(_)), IpFamily::V4) | (Some(ip @ IpAddr::V6(_)), IpFamily::V6) => {
                ip
            }
            (_, IpFamily::V4) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            (_, IpFamily::V6) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        SocketAddr::new(ip, port)
    }

    /// Starts serving `open` as its endpoints say (accepting or refusing).
    fn serve(&self, family: IpFamily, open: &mut Open, spec: &ListenerSpec) -> io::Result<()> {
        let want = !spec.endpoints.is_empty();
        let address = self.listen_address(family, open.port);
        let serving = std::mem::replace(&mut open.serving, Serving::Unbound);
        open.serving = match (open.protocol, serving, want) {
            (Protocol::Tcp, Serving::Held(socket), true) => {
                self.accept_on(socket, address, open)?
            }
            // After a failed step (a bind or listen that did not work) the port is not held:
            // take it again, so a listener never stays stuck without its socket.
            (Protocol::Tcp, Serving::Unbound, true) => {
                let socket = bind(address, Type::STREAM)?;
                self.accept_on(socket, address, open)?
            }
            (Protocol::Tcp, Serving::Unbound, false) => hold_tcp(address, 1)?,
            (Protocol::Tcp, Serving::Accepting(tasks), false) => {
                tasks.iter().for_each(JoinHandle::abort);
                // The accept tasks drop their listening sockets as they end: bind again
                // once they are gone (the bind is exclusive; SO_REUSEADDR: their accepted
                // connections keep running).
                hold_tcp(address, 50)?
            }
            (Protocol::Udp, Serving::Unbound, true) => {
                let socket = bind(address, Type::DGRAM)?;
                let (_, shard) = self.shards.next();
                let _guard = shard.enter();
                let socket = Arc::new(tokio::net::UdpSocket::from_std(socket.into())?);
                Serving::Receiving(shard.spawn(udp::receive(socket, open.frontend.clone())))
            }
            (Protocol::Udp, Serving::Receiving(task), false) => {
                task.abort();
                Serving::Unbound
            }
            (_, same, _) => same,
        };
        Ok(())
    }

    /// Listens on `socket` (bound to `address`) and on one more socket per further relay
    /// thread, all in one `SO_REUSEPORT` group, each accepting on its own thread: the
    /// kernel spreads new connections over the threads and a connection is relayed where it
    /// was accepted (no hand-off between threads). The first socket was bound exclusively,
    /// so the group is only ever this listener's. A further socket that cannot be made
    /// (out of descriptors) leaves its thread out: fewer threads serve, nothing fails.
    fn accept_on(&self, socket: Socket, address: SocketAddr, open: &Open) -> io::Result<Serving> {
        let mut sockets = vec![socket];
        sockets[0].set_reuse_port(true)?;
        sockets[0].set_tcp_nodelay(true)?;
        sockets[0].listen(LISTEN_BACKLOG)?;
        for _ in 1..self.shards.len() {
            match join_group(address) {
                Ok(socket) => sockets.push(socket),
                Err(e) => {
                    debug!(listener = %open.frontend.label, error = %e, threads = sockets.len(), "Cannot add a listening socket for another relay thread; fewer threads accept");
                    break;
                }
            }
        }
        let mut tasks = Vec::with_capacity(sockets.len());
        for socket in sockets {
            let (_, shard) = self.shards.next();
            let _guard = shard.enter();
            match tokio::net::TcpListener::from_std(socket.into()) {
                Ok(listener) => {
                    tasks.push(shard.spawn(tcp::accept(listener, open.frontend.clone())))
                }
                Err(e) => {
                    tasks.iter().for_each(JoinHandle::abort);
                    return Err(e);
                }
            }
        }
        Ok(Serving::Accepting(tasks))
    }
}

/// Pending connections a listening socket holds before they are accepted.
const LISTEN_BACKLOG: i32 = 4096;

/// A further listening socket of the `SO_REUSEPORT` group on `address`. TCP_NODELAY is set
/// on listening sockets: accepted connections inherit it (one system call less each).
fn join_group(address: SocketAddr) -> io::Result<Socket> {
    let socket = new_socket(address, Type::STREAM)?;
    socket.set_reuse_port(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.bind(&SockAddr::from(address))?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket)
}

impl ListenerControl for Relay {
    fn open(
        &mut self,
        family: IpFamily,
        key: &ListenerKey,
        spec: &ListenerSpec,
        candidates: &[u16],
    ) -> io::Result<u16> {
        let mut last_error = io::Error::new(io::ErrorKind::AddrInUse, "no free port in portRange");
        let kind = socket_type(spec.protocol);
        // Bind first (the port is then known), whatever the endpoints; a UDP listener
        // without endpoints lets its port go again at once (nothing else may answer on it
        // meanwhile: it is in our allocator).
        let mut bound = None;
        for port in candidates {
            match bind(self.listen_address(family, *port), kind) {
                Ok(socket) => {
                    bound = Some(socket);
                    break;
                }
                Err(e) => last_error = e,
            }
        }
        let socket = bound.ok_or(last_error)?;
        let port = socket
            .local_addr()?
            .as_socket()
            .map(|a| a.port())
            .unwrap_or_default();
        let frontend = Arc::new(Frontend {
            label: key.name.to_string(),
            balancer: Mutex::new(Balancer::new(spec.endpoints.clone(), spec.affinity)),
            counters: self.stats.port(&key.name.to_string(), spec.protocol),
            udp_timeout: self.config.udp_timeout,
        });
        let mut open = Open {
            port,
            protocol: spec.protocol,
            frontend,
            serving: match spec.protocol {
                Protocol::Udp => Serving::Unbound,
                _ => Serving::Held(socket),
            },
        };
        self.serve(family, &mut open, spec)?;
        debug!(listener = %key, family = %family, port, protocol = spec.protocol.upper(), endpoints = spec.endpoints.len(), "Opened listener");
        self.open.insert((family, key.clone()), open);
        Ok(port)
    }

    fn update(
        &mut self,
        family: IpFamily,
        key: &ListenerKey,
        spec: &ListenerSpec,
    ) -> io::Result<()> {
        let Some(mut open) = self.open.remove(&(family, key.clone())) else {
            return Err(io::Error::new(io::ErrorKind::NotFound, "listener not open"));
        };
        open.frontend
            .balancer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .update(spec.endpoints.clone(), spec.affinity);
        let result = self.serve(family, &mut open, spec);
        debug!(listener = %key, family = %family, endpoints = spec.endpoints.len(), "Updated listener");
        self.open.insert((family, key.clone()), open);
        result
    }

    fn close(&mut self, family: IpFamily, key: &ListenerKey) {
        if let Some(open) = self.open.remove(&(family, key.clone())) {
            match open.serving {
                Serving::Accepting(tasks) => tasks.iter().for_each(JoinHandle::abort),
                Serving::Receiving(task) => task.abort(),
                Serving::Held(_) | Serving::Unbound => {}
            }
            debug!(listener = %key, family = %family, port = open.port, "Closed listener");
        }
    }

    fn tidy(&mut self) {
        self.stats.forget_unused();
    }

    fn claim_node_port(
        &mut self,
        family: IpFamily,
        protocol: Protocol,
        port: u16,
    ) -> io::Result<()> {
        let kind = socket_type(protocol);
        let address = match family {
            IpFamily::V4 => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
            IpFamily::V6 => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
        };
        let socket = bind(address, kind)?;
        self.claims.insert((family, protocol, port), socket);
        Ok(())
    }

    fn release_node_port(&mut self, family: IpFamily, protocol: Protocol, port: u16) {
        self.claims.remove(&(family, protocol, port));
    }
}

/// The socket type serving `protocol` (SCTP never gets here: it is not relayed).
fn socket_type(protocol: Protocol) -> Type {
    match protocol {
        Protocol::Udp => Type::DGRAM,
        _ => Type::STREAM,
    }
}

/// A socket bound to `address` (not listening), exclusively: not `SO_REUSEPORT` (a TCP
/// listener turns that on once it holds the port, see [`Relay::accept_on`]).
fn bind(address: SocketAddr, kind: Type) -> io::Result<Socket> {
    let socket = new_socket(address, kind)?;
    socket.bind(&SockAddr::from(address))?;
    Ok(socket)
}

/// A non-blocking socket for `address`, with SO_REUSEADDR so a listener can be bound again
/// while connections it accepted are open, and IPv6 sockets IPv6-only.
fn new_socket(address: SocketAddr, kind: Type) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(address), kind, None)?;
    socket.set_reuse_address(true)?;
    if address.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_cloexec(true)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Binds `address` again after its listener was closed, retrying while the closing accept
/// task still holds it.
fn hold_tcp(address: SocketAddr, attempts: usize) -> io::Result<Serving> {
    let mut last = None;
    for _ in 0..attempts {
        match bind(address, Type::STREAM) {
            Ok(socket) => return Ok(Serving::Held(socket)),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Err(last.unwrap_or_else(|| io::Error::other("cannot bind")))
}

/// Each relayed connection holds two sockets and up to two pipes: raise the soft limit on
/// open files to the hard one (upstream set 64000).
fn raise_open_files_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => info!(
                from = soft,
                to = hard,
                "Raised the open files limit for relays"
            ),
            Err(e) => warn!(error = %e, soft, "Cannot raise the open files limit"),
        },
        Ok(_) => {}
        Err(e) => warn!(error = %e, "Cannot read the open files limit"),
    }
}
