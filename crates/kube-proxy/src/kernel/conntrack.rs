//! The kernel's conntrack table over netlink (`NETLINK_NETFILTER`, ctnetlink): dump the UDP
//! entries of one family and delete entries by their original tuple. No `conntrack` binary
//! is needed (upstream dropped it too).
//!
//! The decision which entries are stale is pure (`kube_proxy_model::conntrack`); this module
//! only talks to the kernel (behind [`UdpFlows`], with an in-memory [`FakeUdpFlows`] for
//! tests), and [`reconcile`] ties both to the sync loop.

use std::io;
use std::net::IpAddr;
use std::time::Instant;

use kube_proxy_model::conntrack::{FlowKey, StaleFlowFilter};
use kube_proxy_model::{ClusterState, IpFamily};
use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP,
    NLM_F_REQUEST,
};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol, Tuple,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};
use tracing::{debug, trace};

/// One UDP entry: its original tuple (to delete it by) and what the decision needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdpEntry {
    pub orig_src: IpAddr,
    pub orig_dst: IpAddr,
    pub orig_src_port: u16,
    pub orig_dst_port: u16,
    pub reply_src: IpAddr,
}

impl UdpEntry {
    pub fn key(&self) -> FlowKey {
        FlowKey {
            orig_dst: self.orig_dst,
            orig_dst_port: self.orig_dst_port,
            reply_src: self.reply_src,
        }
    }
}

fn nf_family(family: IpFamily) -> NetfilterProtoFamily {
    match family {
        IpFamily::V4 => NetfilterProtoFamily::IPv4,
        IpFamily::V6 => NetfilterProtoFamily::IPv6,
    }
}

/// The UDP entries of the conntrack table, as the reconciler needs them: the kernel's
/// ([`Conntrack`]) or an in-memory one for tests ([`FakeUdpFlows`]).
pub trait UdpFlows {
    fn list_udp(&mut self, family: IpFamily) -> io::Result<Vec<UdpEntry>>;
    /// Deletes one entry by its original tuple; false when it was already gone.
    fn delete_udp(&mut self, family: IpFamily, entry: &UdpEntry) -> io::Result<bool>;
}

/// An in-memory conntrack table.
#[derive(Clone, Debug, Default)]
pub struct FakeUdpFlows {
    pub entries: Vec<(IpFamily, UdpEntry)>,
}

impl UdpFlows for FakeUdpFlows {
    fn list_udp(&mut self, family: IpFamily) -> io::Result<Vec<UdpEntry>> {
        Ok(self
            .entries
            .iter()
            .filter(|(f, _)| *f == family)
            .map(|(_, e)| e.clone())
            .collect())
    }

    fn delete_udp(&mut self, family: IpFamily, entry: &UdpEntry) -> io::Result<bool> {
        let before = self.entries.len();
        self.entries.retain(|(f, e)| !(*f == family && e == entry));
        Ok(self.entries.len() < before)
    }
}

impl UdpFlows for Conntrack {
    fn list_udp(&mut self, family: IpFamily) -> io::Result<Vec<UdpEntry>> {
        Conntrack::list_udp(self, family)
    }
    fn delete_udp(&mut self, family: IpFamily, entry: &UdpEntry) -> io::Result<bool> {
        Conntrack::delete_udp(self, family, entry)
    }
}

/// A ctnetlink socket.
pub struct Conntrack {
    socket: Socket,
    sequence: u32,
}

impl Conntrack {
    pub fn open() -> io::Result<Conntrack> {
        let mut socket = Socket::new(NETLINK_NETFILTER)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Conntrack {
            socket,
            sequence: 0,
        })
    }

    fn send(&mut self, family: IpFamily, message: ConntrackMessage, flags: u16) -> io::Result<u32> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.sequence;
        let mut packet = NetlinkMessage::new(
            header,
            NetlinkPayload::from(NetfilterMessage::new(
                NetfilterHeader::new(nf_family(family), 0, 0),
                message,
            )),
        );
        packet.finalize();
        let mut buffer = vec![0; packet.buffer_len()];
        packet.serialize(&mut buffer);
        self.socket.send(&buffer, 0)?;
        Ok(self.sequence)
    }

    /// Receives the answers to request `sequence`, calling `each` with every conntrack
    /// message, until the kernel says done (dump) or acknowledges (single request).
    fn receive(
        &mut self,
        sequence: u32,
        mut each: impl FnMut(Vec<ConntrackAttribute>),
    ) -> io::Result<()> {
        loop {
            let (datagram, _) = self.socket.recv_from_full()?;
            let mut offset = 0;
            while offset < datagram.len() {
                let length = NetlinkBuffer::new_checked(&datagram[offset..])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?
                    .length() as usize;
                let bytes = &datagram[offset..offset + length];
                offset += (length + 3) & !3;
                let message = NetlinkMessage::<NetfilterMessage>::deserialize(bytes)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                if message.header.sequence_number != sequence {
                    continue;
                }
                match message.payload {
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::Error(error) => {
                        return match error.code {
                            // An acknowledgement.
                            None => Ok(()),
                            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                        };
                    }
                    NetlinkPayload::InnerMessage(NetfilterMessage {
                        inner: NetfilterMessageInner::Conntrack(ConntrackMessage::New(attributes)),
                        ..
                    }) => each(attributes),
                    _ => {}
                }
            }
        }
    }

    /// Every UDP entry of `family`.
    pub fn list_udp(&mut self, family: IpFamily) -> io::Result<Vec<UdpEntry>> {
        let sequence = self.send(
            family,
            ConntrackMessage::Get(Vec::new()),
            NLM_F_REQUEST | NLM_F_DUMP,
        )?;
        let mut entries = Vec::new();
        self.receive(sequence, |attributes| {
            if let Some(entry) = udp_entry(&attributes) {
                entries.push(entry);
            }
        })?;
        Ok(entries)
    }

    /// Deletes one entry by its original tuple. An entry that is already gone is not an
    /// error (it expired or was deleted meanwhile).
    pub fn delete_udp(&mut self, family: IpFamily, entry: &UdpEntry) -> io::Result<bool> {
        let tuple = vec![
            Tuple::Ip(vec![
                IPTuple::SourceAddress(entry.orig_src),
                IPTuple::DestinationAddress(entry.orig_dst),
            ]),
            Tuple::Proto(vec![
                ProtoTuple::Protocol(Protocol::Udp),
                ProtoTuple::SourcePort(entry.orig_src_port),
                ProtoTuple::DestinationPort(entry.orig_dst_port),
            ]),
        ];
        let sequence = self.send(
            family,
            ConntrackMessage::Delete(vec![ConntrackAttribute::CtaTupleOrig(tuple)]),
            NLM_F_REQUEST | NLM_F_ACK,
        )?;
        match self.receive(sequence, |_| {}) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Addresses, protocol and ports of a tuple.
#[derive(Default)]
struct TupleParts {
    src: Option<IpAddr>,
    dst: Option<IpAddr>,
    proto: Option<u8>,
    src_port: Option<u16>,
    dst_port: Option<u16>,
}

fn tuple_parts(tuple: &[Tuple]) -> TupleParts {
    let mut parts = TupleParts::default();
    for part in tuple {
        match part {
            Tuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => parts.src = Some(*a),
                        IPTuple::DestinationAddress(a) => parts.dst = Some(*a),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(fields) => {
                for field in fields {
                    match field {
                        ProtoTuple::Protocol(p) => parts.proto = Some(u8::from(*p)),
                        ProtoTuple::SourcePort(p) => parts.src_port = Some(*p),
                        ProtoTuple::DestinationPort(p) => parts.dst_port = Some(*p),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    parts
}

const IPPROTO_UDP: u8 = 17;

/// The UDP entry in a dumped conntrack message (`None` for other protocols).
fn udp_entry(attributes: &[ConntrackAttribute]) -> Option<UdpEntry> {
    let mut orig = None;
    let mut reply = None;
    for attribute in attributes {
        match attribute {
            ConntrackAttribute::CtaTupleOrig(t) => orig = Some(tuple_parts(t)),
            ConntrackAttribute::CtaTupleReply(t) => reply = Some(tuple_parts(t)),
            _ => {}
        }
    }
    let orig = orig?;
    if orig.proto? != IPPROTO_UDP {
        return None;
    }
    Some(UdpEntry {
        orig_src: orig.src?,
        orig_dst: orig.dst?,
        orig_src_port: orig.src_port?,
        orig_dst_port: orig.dst_port?,
        reply_src: reply?.src?,
    })
}

/// What one reconciliation did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    pub listed: usize,
    pub deleted: usize,
}

/// Deletes the stale UDP entries of `family` after a sync.
pub fn reconcile(
    family: IpFamily,
    state: &ClusterState,
    local_addresses: &[IpAddr],
) -> io::Result<Reconciled> {
    let filter = StaleFlowFilter::build(state, family, local_addresses);
    if filter.is_empty() {
        return Ok(Reconciled::default());
    }
    reconcile_with(&mut Conntrack::open()?, family, &filter)
}

/// Deletes the entries of `flows` that `filter` finds stale.
pub fn reconcile_with(
    conntrack: &mut dyn UdpFlows,
    family: IpFamily,
    filter: &StaleFlowFilter,
) -> io::Result<Reconciled> {
    let started = Instant::now();
    let entries = conntrack.list_udp(family)?;
    let mut result = Reconciled {
        listed: entries.len(),
        deleted: 0,
    };
    for entry in entries.iter().filter(|e| filter.is_stale(&e.key())) {
        trace!(
            family = %family,
            orig_dst = %entry.orig_dst,
            orig_dst_port = entry.orig_dst_port,
            reply_src = %entry.reply_src,
            "Deleting stale UDP conntrack entry"
        );
        if conntrack.delete_udp(family, entry)? {
            result.deleted += 1;
        }
    }
    debug!(
        family = %family,
        listed = result.listed,
        deleted = result.deleted,
        elapsed = ?started.elapsed(),
        "Reconciled UDP conntrack entries"
    );
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry(dst: &str, port: u16, reply_src: &str) -> UdpEntry {
        UdpEntry {
            orig_src: "198.18.9.9".parse().unwrap(),
            orig_dst: dst.parse().unwrap(),
            orig_src_port: 40000,
            orig_dst_port: port,
            reply_src: reply_src.parse().unwrap(),
        }
    }

    /// A UDP Service whose endpoint moved: the flow DNATed to the old endpoint is deleted,
    /// the one to the current endpoint and an unrelated one are kept.
    #[test]
    fn only_flows_to_endpoints_no_longer_serving_are_deleted() {
        let mut state = ClusterState::new("node-a");
        state.apply_service(
            &serde_json::from_value(json!({"metadata": {"namespace": "ns", "name": "dns"},
                "spec": {"clusterIP": "198.19.0.53", "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}}))
            .unwrap(),
        );
        state.apply_slice(
            &serde_json::from_value(json!({"metadata": {"namespace": "ns", "name": "dns-1", "labels": {"kubernetes.io/service-name": "dns"}},
                "addressType": "IPv4", "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}],
                "endpoints": [{"addresses": ["198.18.1.2"], "conditions": {"ready": true}}]}))
            .unwrap(),
        );
        let stale = entry("198.19.0.53", 53, "198.18.1.1");
        let current = entry("198.19.0.53", 53, "198.18.1.2");
        let unrelated = entry("203.0.113.7", 53, "203.0.113.7");
        let mut flows = FakeUdpFlows {
            entries: [&stale, &current, &unrelated]
                .into_iter()
                .map(|e| (IpFamily::V4, e.clone()))
                .collect(),
        };
        let filter = StaleFlowFilter::build(&state, IpFamily::V4, &[]);
        let done = reconcile_with(&mut flows, IpFamily::V4, &filter).unwrap();
        assert_eq!(
            done,
            Reconciled {
                listed: 3,
                deleted: 1
            }
        );
        let left: Vec<&UdpEntry> = flows.entries.iter().map(|(_, e)| e).collect();
        assert_eq!(left, [&current, &unrelated]);
    }
}
