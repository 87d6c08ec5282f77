//! nfacct accounting objects (`nfnetlink_acct`): the two named packet counters upstream's
//! iptables mode attaches to rules with `-m nfacct` (the INVALID drop, localhost NodePorts)
//! and exports as metrics. Created at start, read at each scrape; per network namespace.
//!
//! The messages are encoded and parsed here (pure, unit-tested); the socket is
//! `netlink_sys`'s.

use std::io;
use std::time::Duration;

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

/// Counts the packets the `KUBE-FORWARD` INVALID rule drops.
pub use kube_proxy_iptables::service::INVALID_DROPPED_COUNTER as INVALID_DROPPED;
/// Counts the packets accepted on localhost NodePorts.
pub use kube_proxy_iptables::service::LOCALHOST_NODEPORTS_COUNTER as LOCALHOST_NODEPORTS_ACCEPTED;

const NFNL_SUBSYS_ACCT: u16 = 7;
const NFNL_MSG_ACCT_NEW: u16 = 0;
const NFNL_MSG_ACCT_GET: u16 = 1;
const NFACCT_NAME: u16 = 1;
const NFACCT_PKTS: u16 = 2;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const EBUSY: i32 = 16;
const EEXIST: i32 = 17;

/// A request about the object `name`: `NEW` (create) or `GET`.
fn request(message: u16, flags: u16, name: &str, seq: u32) -> Vec<u8> {
    let mut attribute = Vec::new();
    let value_len = name.len() + 1; // NUL-terminated
    attribute.extend_from_slice(&((4 + value_len) as u16).to_ne_bytes());
    attribute.extend_from_slice(&NFACCT_NAME.to_ne_bytes());
    attribute.extend_from_slice(name.as_bytes());
    attribute.push(0);
    while attribute.len() % 4 != 0 {
        attribute.push(0);
    }
    let len = 16 + 4 + attribute.len();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&(len as u32).to_ne_bytes());
    out.extend_from_slice(&((NFNL_SUBSYS_ACCT << 8) | message).to_ne_bytes());
    out.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK | flags).to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: family AF_UNSPEC, version 0, resource id 0.
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&attribute);
    out
}

/// What the kernel answered to request `seq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reply {
    /// The acknowledgement: 0, or the errno.
    Status(i32),
    /// An object's packet count.
    Packets(u64),
}

fn replies(datagram: &[u8], seq: u32) -> Vec<Reply> {
    let mut out = Vec::new();
    let mut rest = datagram;
    while rest.len() >= 16 {
        let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
        if len < 16 || len > rest.len() {
            break;
        }
        let kind = u16::from_ne_bytes(rest[4..6].try_into().unwrap());
        let message_seq = u32::from_ne_bytes(rest[8..12].try_into().unwrap());
        let body = &rest[16..len];
        if message_seq == seq {
            if kind == NLMSG_ERROR && body.len() >= 4 {
                let error = i32::from_ne_bytes(body[0..4].try_into().unwrap());
                out.push(Reply::Status(-error));
            } else if kind == (NFNL_SUBSYS_ACCT << 8) | NFNL_MSG_ACCT_NEW && body.len() >= 4 {
                let mut attributes = &body[4..];
                while attributes.len() >= 4 {
                    let attr_len =
                        u16::from_ne_bytes(attributes[0..2].try_into().unwrap()) as usize;
                    let attr_type =
                        u16::from_ne_bytes(attributes[2..4].try_into().unwrap()) & 0x3fff;
                    if attr_len < 4 || attr_len > attributes.len() {
                        break;
                    }
                    if attr_type == NFACCT_PKTS && attr_len >= 12 {
                        let value = u64::from_be_bytes(attributes[4..12].try_into().unwrap());
                        out.push(Reply::Packets(value));
                    }
                    let padded = (attr_len + 3) & !3;
                    attributes = &attributes[padded.min(attributes.len())..];
                }
            }
        }
        let padded = (len + 3) & !3;
        rest = &rest[padded.min(rest.len())..];
    }
    out
}

/// A socket for nfacct requests.
pub struct Nfacct {
    socket: Socket,
    seq: u32,
}

impl Nfacct {
    pub fn open() -> io::Result<Nfacct> {
        let mut socket = Socket::new(NETLINK_NETFILTER)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(Duration::from_secs(2).as_secs() as i64, 0),
        )
        .map_err(io::Error::from)?;
        Ok(Nfacct { socket, seq: 1 })
    }

    fn ask(&mut self, message: u16, flags: u16, name: &str) -> io::Result<Vec<Reply>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        self.socket.send(&request(message, flags, name, seq), 0)?;
        let mut found = Vec::new();
        loop {
            let mut datagram = Vec::with_capacity(8192);
            self.socket.recv(&mut datagram, 0)?;
            for reply in replies(&datagram, seq) {
                match reply {
                    Reply::Status(0) => return Ok(found),
                    Reply::Status(errno) => return Err(io::Error::from_raw_os_error(errno)),
                    other => found.push(other),
                }
            }
        }
    }

    /// Creates the counter `name` unless it exists.
    pub fn ensure(&mut self, name: &str) -> io::Result<()> {
        match self.ask(NFNL_MSG_ACCT_NEW, NLM_F_CREATE, name) {
            Err(e) if matches!(e.raw_os_error(), Some(EBUSY) | Some(EEXIST)) => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// The packets counted by `name`.
    pub fn packets(&mut self, name: &str) -> io::Result<u64> {
        self.ask(NFNL_MSG_ACCT_GET, 0, name)?
            .into_iter()
            .find_map(|reply| match reply {
                Reply::Packets(value) => Some(value),
                _ => None,
            })
            .ok_or_else(|| io::Error::other(format!("no packet count in the answer for {name}")))
    }
}

/// Creates both counters; true when they are there to be used by rules (as upstream, a
/// failure only loses the metrics, and is logged).
pub fn ensure_counters() -> bool {
    let result = Nfacct::open().and_then(|mut nfacct| {
        nfacct.ensure(INVALID_DROPPED)?;
        nfacct.ensure(LOCALHOST_NODEPORTS_ACCEPTED)
    });
    match result {
        Ok(()) => true,
        Err(error) => {
            tracing::error!(%error, "Cannot create the nfacct counters; the nfacct-based metrics will not be updated");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_as_the_kernel_spells_them() {
        let new = request(NFNL_MSG_ACCT_NEW, NLM_F_CREATE, "ab", 7);
        assert_eq!(new.len(), 16 + 4 + 8, "header, nfgenmsg, padded name");
        assert_eq!(u32::from_ne_bytes(new[0..4].try_into().unwrap()), 28);
        assert_eq!(u16::from_ne_bytes(new[4..6].try_into().unwrap()), 7 << 8);
        assert_eq!(
            u16::from_ne_bytes(new[6..8].try_into().unwrap()),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE
        );
        assert_eq!(&new[20..27], &[7, 0, 1, 0, b'a', b'b', 0]);

        // An object (NFACCT_NAME, NFACCT_PKTS = 42), then the acknowledgement.
        let mut object = Vec::new();
        let attrs: Vec<u8> = [
            &[8u8, 0, 1, 0, b'a', b'b', 0, 0][..],
            &[12, 0, 2, 0x40], // NFACCT_PKTS | NLA_F_NET_BYTEORDER
            &42u64.to_be_bytes(),
        ]
        .concat();
        object.extend_from_slice(&((16 + 4 + attrs.len()) as u32).to_ne_bytes());
        object.extend_from_slice(&(7u16 << 8).to_ne_bytes());
        object.extend_from_slice(&0u16.to_ne_bytes());
        object.extend_from_slice(&9u32.to_ne_bytes());
        object.extend_from_slice(&0u32.to_ne_bytes());
        object.extend_from_slice(&[0, 0, 0, 0]);
        object.extend_from_slice(&attrs);
        let mut ack = Vec::new();
        ack.extend_from_slice(&36u32.to_ne_bytes());
        ack.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        ack.extend_from_slice(&0u16.to_ne_bytes());
        ack.extend_from_slice(&9u32.to_ne_bytes());
        ack.extend_from_slice(&0u32.to_ne_bytes());
        ack.extend_from_slice(&(-16i32).to_ne_bytes());
        ack.extend_from_slice(&[0; 16]);
        let datagram = [object, ack].concat();
        assert_eq!(
            replies(&datagram, 9),
            vec![Reply::Packets(42), Reply::Status(16)]
        );
        assert_eq!(replies(&datagram, 8), vec![]);
    }
}
