//! TCP: accept, connect to an endpoint (retrying the next one on failure, upstream's
//! `tryConnect`), then relay both directions with splice(2).
//!
//! Each direction copies small exchanges through its thread's buffer and, from the first
//! read that fills it, moves bytes socket → pipe → socket inside the kernel. The pipe is
//! made when needed (an idle connection holds none) and bounds what is in flight (64 KiB),
//! so a slow reader slows the writer (backpressure, both ways independently). End of stream on
//! one side is passed on as a half-close (`shutdown(SHUT_WR)`) once the pipe is drained; an
//! error on either side resets both.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::fcntl::{splice, OFlag, SpliceFFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::{Counters, Frontend, CONNECT_TIMEOUTS};

/// What one splice asks for: a pipe's default capacity.
const CHUNK: usize = 64 * 1024;

/// Accepts connections on one listening socket of the listener's group and relays each on
/// this thread (accept4 makes them non-blocking; they inherit TCP_NODELAY).
pub(crate) async fn accept(listener: tokio::net::TcpListener, frontend: Arc<Frontend>) {
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                tokio::spawn(serve(client, peer, frontend.clone()));
            }
            Err(e) => {
                // Out of file descriptors (or another transient error): the pending
                // connections wait in the backlog; retry shortly rather than spin.
                warn!(listener = %frontend.label, error = %e, "Accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve(client: TcpStream, peer: SocketAddr, frontend: Arc<Frontend>) {
    let counters = &frontend.counters;
    counters.opened.fetch_add(1, Ordering::Relaxed);
    let Some(endpoint) = connect(&frontend, peer).await else {
        counters.unserved.fetch_add(1, Ordering::Relaxed);
        // Reset rather than close: the client learns at once that nothing serves it.
        let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
        return;
    };
    let _ = endpoint.set_nodelay(true);
    counters.active.fetch_add(1, Ordering::Relaxed);
    let result = tokio::try_join!(
        async {
            pump(&client, &endpoint, &counters.bytes_to_endpoint)
                .await
                .map_err(|e| io::Error::new(e.kind(), format!("client to endpoint: {e}")))
        },
        async {
            pump(&endpoint, &client, &counters.bytes_to_client)
                .await
                .map_err(|e| io::Error::new(e.kind(), format!("endpoint to client: {e}")))
        },
    );
    if let Err(e) = result {
        debug!(listener = %frontend.label, client = %peer, error = %e, "Relay ended with an error; resetting both sides");
        let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
        let _ = socket2::SockRef::from(&endpoint).set_linger(Some(Duration::ZERO));
    }
    counters.active.fetch_sub(1, Ordering::Relaxed);
}

/// Connects to an endpoint for `peer`: up to four attempts with upstream's growing timeouts,
/// each to the balancer's next endpoint (affinity is not followed after a failure).
async fn connect(frontend: &Frontend, peer: SocketAddr) -> Option<TcpStream> {
    let mut reset = false;
    for timeout in CONNECT_TIMEOUTS {
        let endpoint = frontend
            .balancer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .next(peer.ip(), reset, Instant::now())?;
        match tokio::time::timeout(timeout, TcpStream::connect(endpoint)).await {
            Ok(Ok(stream)) => {
                debug!(listener = %frontend.label, client = %peer, %endpoint, "Mapped a connection to an endpoint");
                return Some(stream);
            }
            Ok(Err(e)) => {
                debug!(listener = %frontend.label, %endpoint, error = %e, "Connect to endpoint failed; trying the next");
            }
            Err(_) => {
                debug!(listener = %frontend.label, %endpoint, ?timeout, "Connect to endpoint timed out; trying the next");
            }
        }
        frontend
            .counters
            .connect_failures
            .fetch_add(1, Ordering::Relaxed);
        reset = true;
    }
    None
}

fn io_error(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

fn splice_once(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
    splice(
        from,
        None,
        to,
        None,
        len,
        SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
    )
    .map_err(io_error)
}

/// Bytes a direction copies through user space before it turns to splice: a read that fills
/// this is a bulk transfer, which goes through the pipe from then on.
const COPY: usize = 16 * 1024;

thread_local! {
    /// The copy buffer of a relay thread (one per thread, never one per connection).
    static BUFFER: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; COPY]);
}

fn new_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).map_err(io_error)
}

/// Reads what `src` has into the thread's buffer and sends it on to `dst`; what `dst` does
/// not take now goes into the pipe (made then; an empty pipe holds a whole buffer).
/// Returns (read, sent), read 0 at end of stream. `WouldBlock` only when `src` has nothing.
fn copy_once(
    src: &TcpStream,
    dst: &TcpStream,
    pipe: &mut Option<(OwnedFd, OwnedFd)>,
) -> io::Result<(usize, usize)> {
    BUFFER.with(|buffer| {
        let mut buffer = buffer.borrow_mut();
        let n = nix::unistd::read(src, &mut buffer[..]).map_err(io_error)?;
        if n == 0 {
            return Ok((0, 0));
        }
        let sent = match socket2::SockRef::from(dst).send(&buffer[..n]) {
            Ok(sent) => sent,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(io::Error::new(e.kind(), format!("writing: {e}"))),
        };
        if sent < n {
            if pipe.is_none() {
                *pipe = Some(new_pipe()?);
            }
            let (_, write) = pipe.as_ref().expect("made above");
            let queued = nix::unistd::write(write, &buffer[sent..n]).map_err(io_error)?;
            debug_assert_eq!(queued, n - sent, "an empty pipe takes a whole buffer");
        }
        Ok((n, sent))
    })
}

/// Moves everything `src` sends to `dst` until `src` ends, then half-closes `dst`.
///
/// Small exchanges (requests, answers) are copied through the thread's buffer: a read and a
/// send, no pipe. Once a read fills the buffer the direction is a bulk transfer and moves
/// socket → pipe → socket with splice(2), never through user space.
///
/// Readiness is cleared (`try_io`) only by an attempt whose `EAGAIN` can only be the socket's:
/// reading into an empty pipe, writing from a non-empty one. A read into a pipe that still
/// holds bytes may fail because the pipe is full, so it does not clear the socket's readiness.
async fn pump(src: &TcpStream, dst: &TcpStream, bytes: &AtomicU64) -> io::Result<()> {
    let mut pipe: Option<(OwnedFd, OwnedFd)> = None;
    let mut in_pipe = 0usize;
    let mut eof = false;
    let mut bulk = false;
    loop {
        if !eof {
            if in_pipe == 0 && !bulk {
                src.readable().await?;
                // A short read took everything the socket had: it is reported as
                // `WouldBlock` so tokio forgets the readiness (unless an event came since the
                // read began), which saves the read that would only find the socket empty.
                let mut short = None;
                let copied = src.try_io(Interest::READABLE, || {
                    match copy_once(src, dst, &mut pipe) {
                        Ok((n, sent)) if n > 0 && n < COPY => {
                            short = Some((n, sent));
                            Err(io::ErrorKind::WouldBlock.into())
                        }
                        other => other,
                    }
                });
                match short.map(Ok).unwrap_or(copied) {
                    Ok((0, _)) => eof = true,
                    Ok((n, sent)) => {
                        Counters::add(bytes, sent);
                        in_pipe += n - sent;
                        bulk = n == COPY;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(io::Error::new(e.kind(), format!("reading: {e}"))),
                }
            } else if in_pipe == 0 {
                src.readable().await?;
                if pipe.is_none() {
                    pipe = Some(new_pipe()?);
                }
                let (_, write) = pipe.as_ref().expect("made above");
                match src.try_io(Interest::READABLE, || splice_once(src, write, CHUNK)) {
                    Ok(0) => eof = true,
                    Ok(n) => in_pipe += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(io::Error::new(e.kind(), format!("reading: {e}"))),
                }
            } else if let Some((_, write)) = &pipe {
                match splice_once(src, write, CHUNK) {
                    Ok(0) => eof = true,
                    Ok(n) => in_pipe += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(io::Error::new(e.kind(), format!("reading: {e}"))),
                }
            }
        }
        if in_pipe > 0 {
            let (read, _) = pipe.as_ref().expect("bytes are in it");
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || splice_once(read, dst, in_pipe)) {
                Ok(n) => {
                    in_pipe -= n;
                    Counters::add(bytes, n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(io::Error::new(e.kind(), format!("writing: {e}"))),
            }
        } else if eof {
            break;
        }
    }
    // Passes the end of stream on; the other direction goes on until it ends too.
    let _ = socket2::SockRef::from(dst).shutdown(std::net::Shutdown::Write);
    Ok(())
}
