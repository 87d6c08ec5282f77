//! UDP: one socket connected to an endpoint per client address (upstream's `ClientCache`),
//! closed after `udpIdleTimeout` without a datagram either way, or at once when its endpoint
//! leaves the listener's endpoints (the client's next datagram goes to a live one) or
//! answers with ICMP port unreachable.
//!
//! Datagrams are read into one buffer per relay thread, never one per client, so an idle
//! client costs its socket and task only. A datagram that finds a socket buffer full is
//! dropped, as the network would.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::net::UdpSocket;
use tracing::debug;

use super::{Counters, Frontend};

thread_local! {
    static BUFFER: RefCell<Vec<u8>> = RefCell::new(vec![0; 65536]);
}

struct Flow {
    backend: UdpSocket,
    endpoint: SocketAddr,
    /// The balancer's version this flow's endpoint was last found in.
    version: AtomicU64,
    /// Milliseconds since `epoch` of the last datagram either way.
    last: AtomicU64,
}

type Flows = Arc<Mutex<HashMap<SocketAddr, Arc<Flow>>>>;

fn millis(epoch: Instant) -> u64 {
    epoch.elapsed().as_millis() as u64
}

pub(crate) async fn receive(socket: Arc<UdpSocket>, frontend: Arc<Frontend>) {
    let flows: Flows = Arc::default();
    let epoch = Instant::now();
    loop {
        if socket.readable().await.is_err() {
            return;
        }
        loop {
            let received = BUFFER.with(|buffer| {
                let mut buffer = buffer.borrow_mut();
                let (n, client) = socket.try_recv_from(&mut buffer)?;
                forward(&socket, &flows, &frontend, client, &buffer[..n], epoch);
                Ok::<(), io::Error>(())
            });
            match received {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    // An ICMP error for an earlier reply, or a transient failure: go on.
                    debug!(listener = %frontend.label, error = %e, "UDP receive failed");
                    break;
                }
            }
        }
    }
}

/// Sends a client's datagram on to its endpoint, through its flow (made if new).
fn forward(
    socket: &Arc<UdpSocket>,
    flows: &Flows,
    frontend: &Arc<Frontend>,
    client: SocketAddr,
    datagram: &[u8],
    epoch: Instant,
) {
    let flow = match current_flow(flows, frontend, client) {
        Some(flow) => flow,
        None => match new_flow(socket, flows, frontend, client, epoch) {
            Some(flow) => flow,
            None => return,
        },
    };
    flow.last.store(millis(epoch), Ordering::Relaxed);
    // Straight to the socket: tokio's try_send would wait for a readiness event a new
    // socket has not had yet. A full buffer drops the datagram, as a network would.
    if socket2::SockRef::from(&flow.backend).send(datagram).is_ok() {
        Counters::add(&frontend.counters.bytes_to_endpoint, datagram.len());
    }
}

/// The client's flow, unless its endpoint left the listener (then it is closed).
fn current_flow(flows: &Flows, frontend: &Frontend, client: SocketAddr) -> Option<Arc<Flow>> {
    let flow = flows
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&client)
        .cloned()?;
    let balancer = frontend.balancer.lock().unwrap_or_else(|e| e.into_inner());
    if flow.version.load(Ordering::Relaxed) == balancer.version() {
        return Some(flow);
    }
    if balancer.endpoints().contains(&flow.endpoint) {
        flow.version.store(balancer.version(), Ordering::Relaxed);
        return Some(flow);
    }
    drop(balancer);
    flows
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&client);
    None
}

fn new_flow(
    socket: &Arc<UdpSocket>,
    flows: &Flows,
    frontend: &Arc<Frontend>,
    client: SocketAddr,
    epoch: Instant,
) -> Option<Arc<Flow>> {
    let (endpoint, version) = {
        let mut balancer = frontend.balancer.lock().unwrap_or_else(|e| e.into_inner());
        (
            balancer.next(client.ip(), false, Instant::now())?,
            balancer.version(),
        )
    };
    let any = match endpoint.ip() {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let connected = std::net::UdpSocket::bind(SocketAddr::new(any, 0)).and_then(|backend| {
        backend.set_nonblocking(true)?;
        backend.connect(endpoint)?;
        UdpSocket::from_std(backend)
    });
    let backend = match connected {
        Ok(backend) => backend,
        Err(e) => {
            frontend
                .counters
                .connect_failures
                .fetch_add(1, Ordering::Relaxed);
            debug!(listener = %frontend.label, %endpoint, error = %e, "Cannot open a UDP socket to the endpoint");
            return None;
        }
    };
    let flow = Arc::new(Flow {
        backend,
        endpoint,
        version: AtomicU64::new(version),
        last: AtomicU64::new(millis(epoch)),
    });
    flows
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(client, flow.clone());
    frontend.counters.opened.fetch_add(1, Ordering::Relaxed);
    frontend.counters.active.fetch_add(1, Ordering::Relaxed);
    debug!(listener = %frontend.label, %client, %endpoint, "New UDP client");
    tokio::spawn(replies(
        socket.clone(),
        flows.clone(),
        flow.clone(),
        frontend.clone(),
        client,
        epoch,
    ));
    Some(flow)
}

/// Relays the endpoint's datagrams to the client until the flow is idle for the timeout,
/// replaced, or refused by the endpoint.
async fn replies(
    socket: Arc<UdpSocket>,
    flows: Flows,
    flow: Arc<Flow>,
    frontend: Arc<Frontend>,
    client: SocketAddr,
    epoch: Instant,
) {
    let timeout = frontend.udp_timeout;
    let timeout_ms = timeout.as_millis() as u64;
    'flow: loop {
        let idle = millis(epoch).saturating_sub(flow.last.load(Ordering::Relaxed));
        if idle >= timeout_ms {
            break;
        }
        let still_ours = flows
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&client)
            .is_some_and(|f| Arc::ptr_eq(f, &flow));
        if !still_ours {
            break;
        }
        let wait = std::time::Duration::from_millis(timeout_ms - idle);
        tokio::select! {
            ready = flow.backend.readable() => {
                if ready.is_err() {
                    break;
                }
                loop {
                    let result = BUFFER.with(|buffer| {
                        let mut buffer = buffer.borrow_mut();
                        let n = flow.backend.try_recv(&mut buffer)?;
                        let _ = socket2::SockRef::from(&*socket).send_to(&buffer[..n], &client.into());
                        Ok::<usize, io::Error>(n)
                    });
                    match result {
                        Ok(n) => {
                            flow.last.store(millis(epoch), Ordering::Relaxed);
                            Counters::add(&frontend.counters.bytes_to_client, n);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            debug!(listener = %frontend.label, endpoint = %flow.endpoint, error = %e, "UDP endpoint refused; closing the client's flow");
                            break 'flow;
                        }
                    }
                }
            }
            _ = tokio::time::sleep(wait) => {}
        }
    }
    let mut map = flows.lock().unwrap_or_else(|e| e.into_inner());
    if map.get(&client).is_some_and(|f| Arc::ptr_eq(f, &flow)) {
        map.remove(&client);
    }
    drop(map);
    frontend.counters.active.fetch_sub(1, Ordering::Relaxed);
    debug!(listener = %frontend.label, %client, "UDP client flow closed");
}
