//! Element-only transactions as nf_tables netlink batches, for syncs that change nothing but
//! set and map elements (most endpoint changes, Services added and removed).
//!
//! Why: `nft` is a process to start and a cache to fill before it sends anything, and nft
//! 1.0.6 reads every element of a set before it deletes one (~12 ms at 50k elements). Most
//! changes are a handful of element additions and deletions; sent as the netlink batch nft
//! itself would send, they take well under a millisecond and are exactly as atomic (one
//! batch is one kernel transaction). Anything else (chains, rules, declarations, interval
//! sets) stays text for `nft -f -`.
//!
//! Pure: this module only encodes bytes and decodes the kernel's answers; the socket lives
//! with the runner in the binary.

use std::net::IpAddr;

use kube_proxy_model::{IpFamily, Protocol};

use crate::elements::{Key, SetName, Value};
use crate::skeleton::TABLE;
use crate::transaction::ElementCommand;

// linux/netlink.h, linux/netfilter/nfnetlink.h, linux/netfilter/nf_tables.h.
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 0x2;
const NLA_F_NESTED: u16 = 0x8000;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFT_GOTO: i32 = -4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_DONE: u16 = 0x3;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_GETSET: u16 = 10;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFT_MSG_GETTABLE: u16 = 1;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFT_SET_INTERVAL: u32 = 0x2;
const NFT_SET_TIMEOUT: u32 = 0x10;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

/// Elements per message: an attribute's length is 16 bits, so the element list of one
/// message must stay under 64 KiB (libnftnl splits the same way).
const ELEMENTS_PER_MESSAGE: usize = 256;

/// A batch ready to send, and which transaction line each message carries.
#[derive(Debug)]
pub struct Batch {
    pub bytes: Vec<u8>,
    /// Sequence number of the batch-begin message; message `i` (0-based) of the body has
    /// `first_seq + 1 + i`.
    pub first_seq: u32,
    /// Transaction line (1-based) of each body message.
    pub lines: Vec<usize>,
}

impl Batch {
    /// The transaction line of the message with sequence number `seq`, if it is one of ours.
    pub fn line_of(&self, seq: u32) -> Option<usize> {
        let index = seq.checked_sub(self.first_seq + 1)? as usize;
        self.lines.get(index).copied()
    }
}

/// Whether every element of `set` can be written as netlink data here (interval sets need
/// range ends and are left to nft).
pub fn encodable(set: SetName) -> bool {
    set != SetName::FirewallAllow
}

/// Encodes `commands` (command `i` is transaction line `i + 1`) as one batch.
pub fn encode(family: IpFamily, commands: &[ElementCommand], first_seq: u32) -> Batch {
    let mut bytes = Vec::with_capacity(256 + commands.len() * 128);
    let mut lines = Vec::new();
    let mut seq = first_seq;
    message(
        &mut bytes,
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        seq,
        0,
        NFNL_SUBSYS_NFTABLES,
        |_| {},
    );
    let nfproto = nfproto(family);
    for (index, command) in commands.iter().enumerate() {
        let (kind, flags) = if command.delete {
            (NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK)
        } else {
            (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE)
        };
        for chunk in command.elements.chunks(ELEMENTS_PER_MESSAGE) {
            seq += 1;
            lines.push(index + 1);
            let set = command.set.name();
            message(
                &mut bytes,
                (NFNL_SUBSYS_NFTABLES << 8) | kind,
                flags,
                seq,
                nfproto,
                0,
                |out| {
                    attr_str(out, NFTA_SET_ELEM_LIST_TABLE, TABLE);
                    attr_str(out, NFTA_SET_ELEM_LIST_SET, &set);
                    nest(out, NFTA_SET_ELEM_LIST_ELEMENTS, |out| {
                        for (key, value) in chunk {
                            nest(out, NFTA_LIST_ELEM, |out| {
                                nest(out, NFTA_SET_ELEM_KEY, |out| {
                                    attr(out, NFTA_DATA_VALUE, &key_bytes(key));
                                });
                                if command.delete {
                                    return;
                                }
                                match ElementData::of(value) {
                                    ElementData::None => {}
                                    ElementData::Value(data) => {
                                        nest(out, NFTA_SET_ELEM_DATA, |out| {
                                            attr(out, NFTA_DATA_VALUE, &data);
                                        });
                                    }
                                    ElementData::Verdict(code, chain) => {
                                        nest(out, NFTA_SET_ELEM_DATA, |out| {
                                            nest(out, NFTA_DATA_VERDICT, |out| {
                                                attr(out, NFTA_VERDICT_CODE, &code.to_be_bytes());
                                                attr_str(out, NFTA_VERDICT_CHAIN, &chain);
                                            });
                                        });
                                    }
                                }
                            });
                        }
                    });
                },
            );
        }
    }
    message(
        &mut bytes,
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        seq + 1,
        0,
        NFNL_SUBSYS_NFTABLES,
        |_| {},
    );
    Batch {
        bytes,
        first_seq,
        lines,
    }
}

/// The kernel's answers in one datagram: `(sequence number, errno)` of each NLMSG_ERROR
/// (errno 0 is an acknowledgement).
pub fn responses(datagram: &[u8]) -> Vec<(u32, i32)> {
    let mut found = Vec::new();
    let mut rest = datagram;
    while rest.len() >= 16 {
        let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes(rest[4..6].try_into().unwrap());
        let seq = u32::from_ne_bytes(rest[8..12].try_into().unwrap());
        if len < 16 || len > rest.len() {
            break;
        }
        if kind == NLMSG_ERROR && len >= 20 {
            let errno = i32::from_ne_bytes(rest[16..20].try_into().unwrap());
            found.push((seq, -errno));
        }
        rest = &rest[align(len).min(rest.len())..];
    }
    found
}

/// A map element's data as the kernel holds it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ElementData {
    None,
    Value(Vec<u8>),
    Verdict(i32, String),
}

impl ElementData {
    /// The data `value` is stored as.
    pub fn of(value: &Value) -> ElementData {
        match value {
            Value::None => ElementData::None,
            Value::Endpoint(ip, port) => {
                let mut data = Vec::with_capacity(20);
                push_ip(&mut data, ip);
                push_port(&mut data, *port);
                ElementData::Value(data)
            }
            Value::Goto(chain) => ElementData::Verdict(NFT_GOTO, chain.to_string()),
        }
    }
}

impl ElementData {
    /// Whether this is the data `value` is stored as (without building it).
    pub fn holds(&self, value: &Value) -> bool {
        match (self, value) {
            (ElementData::None, Value::None) => true,
            (ElementData::Value(data), Value::Endpoint(ip, port)) => {
                let ip_len = if ip.is_ipv4() { 4 } else { 16 };
                data.len() == ip_len + 4
                    && match ip {
                        IpAddr::V4(v4) => data[..4] == v4.octets(),
                        IpAddr::V6(v6) => data[..16] == v6.octets(),
                    }
                    && data[ip_len..] == [(port >> 8) as u8, *port as u8, 0, 0]
            }
            (ElementData::Verdict(code, chain), Value::Goto(target)) => {
                *code == NFT_GOTO && chain.as_str() == &**target
            }
            _ => false,
        }
    }
}

/// What to ask the kernel for, as one request message (a dump unless `Table`).
#[derive(Clone, Copy, Debug)]
pub enum Query<'a> {
    /// The table itself (ENOENT when it does not exist).
    Table,
    Chains,
    Sets,
    Elements(&'a str),
    /// The rules of one chain.
    Rules(&'a str),
}

/// A request for `query` about our table of `family`.
pub fn query(family: IpFamily, query: Query<'_>, seq: u32) -> Vec<u8> {
    let mut bytes = Vec::new();
    let dump = NLM_F_REQUEST | NLM_F_DUMP;
    let (kind, flags) = match query {
        Query::Table => (NFT_MSG_GETTABLE, NLM_F_REQUEST | NLM_F_ACK),
        Query::Chains => (NFT_MSG_GETCHAIN, dump),
        Query::Sets => (NFT_MSG_GETSET, dump),
        Query::Elements(_) => (NFT_MSG_GETSETELEM, dump),
        Query::Rules(_) => (NFT_MSG_GETRULE, dump),
    };
    message(
        &mut bytes,
        (NFNL_SUBSYS_NFTABLES << 8) | kind,
        flags,
        seq,
        nfproto(family),
        0,
        |out| match query {
            Query::Table => attr_str(out, NFTA_TABLE_NAME, TABLE),
            Query::Chains => attr_str(out, NFTA_CHAIN_TABLE, TABLE),
            Query::Sets => attr_str(out, NFTA_SET_TABLE, TABLE),
            Query::Elements(set) => {
                attr_str(out, NFTA_SET_ELEM_LIST_TABLE, TABLE);
                attr_str(out, NFTA_SET_ELEM_LIST_SET, set);
            }
            Query::Rules(chain) => {
                attr_str(out, NFTA_RULE_TABLE, TABLE);
                attr_str(out, NFTA_RULE_CHAIN, chain);
            }
        },
    );
    bytes
}

/// One piece of the kernel's answer to a query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// A chain of our table.
    Chain(String),
    /// A set of our table, and whether its elements can be compared here (not an interval
    /// set, no timeouts).
    Set { name: String, comparable: bool },
    /// A rule of the dumped chain.
    Rule,
    /// Elements of the dumped set: key bytes and data.
    Elements(Vec<(Vec<u8>, ElementData)>),
    /// The end of a dump.
    Done,
    /// An acknowledgement (0) or an error (errno) for the request with this sequence number.
    Status(i32),
}

/// Decodes the messages of one datagram answering the request `seq`; messages of other
/// requests are skipped.
pub fn answers(datagram: &[u8], seq: u32) -> Vec<Answer> {
    let mut found = Vec::new();
    let mut rest = datagram;
    while rest.len() >= 16 {
        let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes(rest[4..6].try_into().unwrap());
        let message_seq = u32::from_ne_bytes(rest[8..12].try_into().unwrap());
        if len < 16 || len > rest.len() {
            break;
        }
        let body = &rest[16..len];
        rest = &rest[align(len).min(rest.len())..];
        if message_seq != seq {
            continue;
        }
        match kind {
            NLMSG_DONE => found.push(Answer::Done),
            NLMSG_ERROR if body.len() >= 4 => found.push(Answer::Status(-i32::from_ne_bytes(
                body[0..4].try_into().unwrap(),
            ))),
            _ if body.len() >= 4 => {
                let attrs = &body[4..]; // after nfgenmsg
                match kind & 0xff {
                    NFT_MSG_NEWCHAIN => {
                        let table = find_str(attrs, NFTA_CHAIN_TABLE);
                        if let (Some(TABLE), Some(name)) =
                            (table.as_deref(), find_str(attrs, NFTA_CHAIN_NAME))
                        {
                            found.push(Answer::Chain(name));
                        }
                    }
                    NFT_MSG_NEWSET => {
                        let table = find_str(attrs, NFTA_SET_TABLE);
                        if let (Some(TABLE), Some(name)) =
                            (table.as_deref(), find_str(attrs, NFTA_SET_NAME))
                        {
                            let flags = find(attrs, NFTA_SET_FLAGS)
                                .and_then(|v| v.get(0..4))
                                .map_or(0, |v| u32::from_be_bytes(v.try_into().unwrap()));
                            let comparable = flags & (NFT_SET_INTERVAL | NFT_SET_TIMEOUT) == 0;
                            found.push(Answer::Set { name, comparable });
                        }
                    }
                    NFT_MSG_NEWRULE
                        if find_str(attrs, NFTA_RULE_TABLE).as_deref() == Some(TABLE) =>
                    {
                        found.push(Answer::Rule);
                    }
                    NFT_MSG_NEWSETELEM => {
                        let elements = find(attrs, NFTA_SET_ELEM_LIST_ELEMENTS)
                            .map(|list| {
                                attributes(list)
                                    .filter(|(kind, _)| *kind == NFTA_LIST_ELEM)
                                    .filter_map(|(_, element)| decode_element(element))
                                    .collect()
                            })
                            .unwrap_or_default();
                        found.push(Answer::Elements(elements));
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
    found
}

fn decode_element(element: &[u8]) -> Option<(Vec<u8>, ElementData)> {
    let key = find(element, NFTA_SET_ELEM_KEY).and_then(|k| find(k, NFTA_DATA_VALUE))?;
    let data = match find(element, NFTA_SET_ELEM_DATA) {
        None => ElementData::None,
        Some(data) => {
            if let Some(value) = find(data, NFTA_DATA_VALUE) {
                ElementData::Value(value.to_vec())
            } else {
                let verdict = find(data, NFTA_DATA_VERDICT)?;
                let code = find(verdict, NFTA_VERDICT_CODE)
                    .and_then(|c| c.get(0..4))
                    .map(|c| i32::from_be_bytes(c.try_into().unwrap()))?;
                let chain = find_str(verdict, NFTA_VERDICT_CHAIN).unwrap_or_default();
                ElementData::Verdict(code, chain)
            }
        }
    };
    Some((key.to_vec(), data))
}

/// The attributes of a buffer: (type without flags, payload).
fn attributes(mut buffer: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buffer.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes(buffer[0..2].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes(buffer[2..4].try_into().unwrap()) & 0x3fff;
        if len < 4 || len > buffer.len() {
            return None;
        }
        let payload = &buffer[4..len];
        buffer = &buffer[align(len).min(buffer.len())..];
        Some((kind, payload))
    })
}

fn find(buffer: &[u8], kind: u16) -> Option<&[u8]> {
    attributes(buffer).find(|(k, _)| *k == kind).map(|(_, p)| p)
}

fn find_str(buffer: &[u8], kind: u16) -> Option<String> {
    find(buffer, kind)
        .map(|p| String::from_utf8_lossy(p.split(|b| *b == 0).next().unwrap_or(&[])).into_owned())
}

/// The key of an element of `set` from the bytes the kernel holds (the inverse of
/// [`key_bytes`]); `None` for bytes this proxy would not have written.
pub fn decode_key(set: SetName, family: IpFamily, bytes: &[u8]) -> Option<Key> {
    let ip_len = match family {
        IpFamily::V4 => 4,
        IpFamily::V6 => 16,
    };
    let ip = |b: &[u8]| -> Option<IpAddr> {
        match family {
            IpFamily::V4 => Some(IpAddr::from(<[u8; 4]>::try_from(b).ok()?)),
            IpFamily::V6 => Some(IpAddr::from(<[u8; 16]>::try_from(b).ok()?)),
        }
    };
    let proto = |b: &[u8]| match b.first()? {
        6 => Some(Protocol::Tcp),
        17 => Some(Protocol::Udp),
        132 => Some(Protocol::Sctp),
        _ => None,
    };
    let port = |b: &[u8]| Some(u16::from_be_bytes(b.get(0..2)?.try_into().ok()?));
    let frontend = |b: &[u8]| -> Option<Key> {
        if b.len() != ip_len + 8 {
            return None;
        }
        Some(Key::Frontend(
            ip(&b[..ip_len])?,
            proto(&b[ip_len..])?,
            port(&b[ip_len + 4..])?,
        ))
    };
    let node_port = |b: &[u8]| -> Option<Key> {
        if b.len() != 8 {
            return None;
        }
        Some(Key::NodePort(proto(b)?, port(&b[4..])?))
    };
    let key = match set {
        SetName::ClusterIps | SetName::NodePortIps => Key::Addr(ip(bytes)?),
        SetName::Dnat(_)
        | SetName::Backends(_)
        | SetName::ExternalMasquerade
        | SetName::NoEndpointReject
        | SetName::NoEndpointDrop
        | SetName::FirewallIps
        | SetName::ServiceIps => frontend(bytes)?,
        SetName::NodePortDnat(_)
        | SetName::NodePortBackends(_)
        | SetName::NodePortMasquerade
        | SetName::NodePortNoEndpointReject
        | SetName::NodePortNoEndpointDrop
        | SetName::ServiceNodePorts => node_port(bytes)?,
        SetName::HairpinConnections => {
            if bytes.len() != 2 * ip_len + 8 || bytes[..ip_len] != bytes[ip_len..2 * ip_len] {
                return None;
            }
            let rest = &bytes[2 * ip_len..];
            Key::Hairpin(ip(&bytes[..ip_len])?, proto(rest)?, port(&rest[4..])?)
        }
        SetName::FirewallAllow => return None,
    };
    // Only bytes this proxy writes (padding included) decode.
    (key_bytes(&key) == bytes).then_some(key)
}

fn nfproto(family: IpFamily) -> u8 {
    match family {
        IpFamily::V4 => NFPROTO_IPV4,
        IpFamily::V6 => NFPROTO_IPV6,
    }
}

/// The key as the kernel stores it: each field of a concatenation padded to 4 bytes, ports
/// in network order.
pub fn key_bytes(key: &Key) -> Vec<u8> {
    let mut out = Vec::with_capacity(40);
    match key {
        Key::Addr(ip) => push_ip(&mut out, ip),
        Key::Frontend(ip, proto, port) => {
            push_ip(&mut out, ip);
            push_proto(&mut out, *proto);
            push_port(&mut out, *port);
        }
        Key::NodePort(proto, port) => {
            push_proto(&mut out, *proto);
            push_port(&mut out, *port);
        }
        Key::Hairpin(ip, proto, port) => {
            push_ip(&mut out, ip);
            push_ip(&mut out, ip);
            push_proto(&mut out, *proto);
            push_port(&mut out, *port);
        }
        Key::Allow(..) => unreachable!("interval elements are never encoded (see `encodable`)"),
    }
    out
}

fn push_ip(out: &mut Vec<u8>, ip: &IpAddr) {
    match ip {
        IpAddr::V4(v4) => out.extend_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out.extend_from_slice(&v6.octets()),
    }
}

fn push_proto(out: &mut Vec<u8>, proto: Protocol) {
    let number = match proto {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    };
    out.extend_from_slice(&[number, 0, 0, 0]);
}

fn push_port(out: &mut Vec<u8>, port: u16) {
    let [hi, lo] = port.to_be_bytes();
    out.extend_from_slice(&[hi, lo, 0, 0]);
}

fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// One netlink message: header, nfgenmsg, then what `body` writes.
fn message(
    out: &mut Vec<u8>,
    kind: u16,
    flags: u16,
    seq: u32,
    nfproto: u8,
    res_id: u16,
    body: impl FnOnce(&mut Vec<u8>),
) {
    let start = out.len();
    out.extend_from_slice(&0u32.to_ne_bytes()); // length, set below
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
    out.extend_from_slice(&[nfproto, 0]); // nfgenmsg: family, version 0
    out.extend_from_slice(&res_id.to_be_bytes());
    body(out);
    let len = (out.len() - start) as u32;
    out[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

fn attr(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(out.len() + (align(len) - len), 0);
}

fn attr_str(out: &mut Vec<u8>, kind: u16, text: &str) {
    let mut payload = Vec::with_capacity(text.len() + 1);
    payload.extend_from_slice(text.as_bytes());
    payload.push(0);
    attr(out, kind, &payload);
}

fn nest(out: &mut Vec<u8>, kind: u16, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&0u16.to_ne_bytes());
    out.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    body(out);
    let len = out.len() - start;
    out[start..start + 2].copy_from_slice(&(len as u16).to_ne_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_padded_per_field_with_ports_in_network_order() {
        let key = Key::Frontend("198.19.0.1".parse().unwrap(), Protocol::Tcp, 80);
        assert_eq!(key_bytes(&key), [198, 19, 0, 1, 6, 0, 0, 0, 0, 80, 0, 0]);
        let key = Key::NodePort(Protocol::Udp, 30053);
        assert_eq!(key_bytes(&key), [17, 0, 0, 0, 0x75, 0x65, 0, 0]);
        let key = Key::Addr("2001:db8::1".parse().unwrap());
        assert_eq!(key_bytes(&key).len(), 16);
        let key = Key::Hairpin("198.18.0.5".parse().unwrap(), Protocol::Sctp, 9);
        assert_eq!(
            key_bytes(&key),
            [198, 18, 0, 5, 198, 18, 0, 5, 132, 0, 0, 0, 0, 9, 0, 0]
        );
    }

    fn command(delete: bool, n: usize) -> ElementCommand {
        ElementCommand {
            delete,
            set: SetName::Backends(0),
            elements: (0..n)
                .map(|i| {
                    (
                        Key::Frontend(
                            format!("198.19.{}.{}", i / 250, i % 250).parse().unwrap(),
                            Protocol::Tcp,
                            80,
                        ),
                        Value::Endpoint("198.18.0.2".parse().unwrap(), 8080),
                    )
                })
                .collect(),
        }
    }

    /// Walks the messages of a batch: (type, flags, seq, length).
    fn messages(bytes: &[u8]) -> Vec<(u16, u16, u32, usize)> {
        let mut out = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
            out.push((
                u16::from_ne_bytes(rest[4..6].try_into().unwrap()),
                u16::from_ne_bytes(rest[6..8].try_into().unwrap()),
                u32::from_ne_bytes(rest[8..12].try_into().unwrap()),
                len,
            ));
            assert_eq!(len % 4, 0, "messages stay 4-byte aligned");
            rest = &rest[len..];
        }
        out
    }

    #[test]
    fn a_batch_is_begin_messages_end_with_one_line_per_message() {
        let commands = [command(true, 1), command(false, 600)];
        let batch = encode(IpFamily::V4, &commands, 100);
        let msgs = messages(&batch.bytes);
        // begin, 1 delete, 600 adds in 3 messages of at most 256, end.
        assert_eq!(msgs.len(), 6);
        assert_eq!(msgs[0].0, NFNL_MSG_BATCH_BEGIN);
        assert_eq!(msgs[1].0, (10 << 8) | NFT_MSG_DELSETELEM);
        assert_eq!(msgs[1].1 & NLM_F_CREATE, 0);
        assert_eq!(msgs[2].0, (10 << 8) | NFT_MSG_NEWSETELEM);
        assert_ne!(msgs[2].1 & NLM_F_CREATE, 0);
        assert_eq!(msgs[5].0, NFNL_MSG_BATCH_END);
        let seqs: Vec<u32> = msgs.iter().map(|m| m.2).collect();
        assert_eq!(seqs, [100, 101, 102, 103, 104, 105]);
        assert!(msgs.iter().all(|m| m.3 < 65536));
        assert_eq!(batch.lines, [1, 2, 2, 2]);
        assert_eq!(batch.line_of(101), Some(1));
        assert_eq!(batch.line_of(104), Some(2));
        assert_eq!(batch.line_of(100), None);
        assert_eq!(batch.line_of(105), None);
    }

    #[test]
    fn keys_decode_back_only_from_bytes_this_proxy_writes() {
        let keys = [
            (
                SetName::ClusterIps,
                Key::Addr("198.19.0.1".parse().unwrap()),
            ),
            (
                SetName::Backends(3),
                Key::Frontend("2001:db8::1".parse().unwrap(), Protocol::Udp, 53),
            ),
            (
                SetName::ServiceNodePorts,
                Key::NodePort(Protocol::Sctp, 30000),
            ),
            (
                SetName::HairpinConnections,
                Key::Hairpin("198.18.0.5".parse().unwrap(), Protocol::Tcp, 8080),
            ),
        ];
        for (set, key) in keys {
            let family = match &key {
                Key::Frontend(ip, ..) | Key::Addr(ip) | Key::Hairpin(ip, ..) if ip.is_ipv6() => {
                    IpFamily::V6
                }
                _ => IpFamily::V4,
            };
            assert_eq!(decode_key(set, family, &key_bytes(&key)), Some(key.clone()));
        }
        // Unknown protocol, non-zero padding, wrong length: not ours.
        let foreign: [(SetName, &[u8]); 3] = [
            (SetName::NodePortDnat(1), &[47, 0, 0, 0, 0, 80, 0, 0]),
            (SetName::NodePortDnat(1), &[6, 1, 0, 0, 0, 80, 0, 0]),
            (SetName::ClusterIps, &[1, 2, 3]),
        ];
        for (set, bytes) in foreign {
            assert_eq!(decode_key(set, IpFamily::V4, bytes), None, "{bytes:?}");
        }
    }

    #[test]
    fn element_dumps_decode_to_key_bytes_and_data() {
        // A dump message as the kernel sends it, built with this module's own writers.
        let elements = [
            (
                Key::Frontend("198.19.0.1".parse().unwrap(), Protocol::Tcp, 80),
                Value::Endpoint("198.18.0.2".parse().unwrap(), 8080),
            ),
            (
                Key::Frontend("198.19.0.2".parse().unwrap(), Protocol::Tcp, 80),
                Value::Goto("service-X".into()),
            ),
        ];
        let batch = encode(
            IpFamily::V4,
            &[ElementCommand {
                delete: false,
                set: SetName::Backends(0),
                elements: elements.to_vec(),
            }],
            41,
        );
        // The body message (seq 42) has the layout of a dump answer; make it one.
        let mut rest = &batch.bytes[..];
        let mut datagram = Vec::new();
        while !rest.is_empty() {
            let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
            let seq = u32::from_ne_bytes(rest[8..12].try_into().unwrap());
            if seq == 42 {
                datagram.extend_from_slice(&rest[..len]);
            }
            rest = &rest[len..];
        }
        let mut done = Vec::new();
        done.extend_from_slice(&20u32.to_ne_bytes());
        done.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        done.extend_from_slice(&0u16.to_ne_bytes());
        done.extend_from_slice(&42u32.to_ne_bytes());
        done.extend_from_slice(&0u32.to_ne_bytes());
        done.extend_from_slice(&0u32.to_ne_bytes());
        datagram.extend_from_slice(&done);
        let found = answers(&datagram, 42);
        assert_eq!(found.len(), 2);
        let Answer::Elements(decoded) = &found[0] else {
            panic!("{found:?}")
        };
        let expected: Vec<(Vec<u8>, ElementData)> = elements
            .iter()
            .map(|(k, v)| (key_bytes(k), ElementData::of(v)))
            .collect();
        assert_eq!(decoded, &expected);
        for ((_, value), (_, data)) in elements.iter().zip(decoded) {
            assert!(data.holds(value));
        }
        assert!(!decoded[0].1.holds(&elements[1].1));
        assert!(!decoded[0]
            .1
            .holds(&Value::Endpoint("198.18.0.2".parse().unwrap(), 8081)));
        assert_eq!(found[1], Answer::Done);
        assert!(
            answers(&datagram, 7).is_empty(),
            "other requests' answers are skipped"
        );
    }

    #[test]
    fn answers_are_read_as_sequence_and_errno() {
        // Two NLMSG_ERROR messages: an ack for 7 and ENOENT (2) for 8.
        let mut datagram = Vec::new();
        for (seq, error) in [(7u32, 0i32), (8, -2)] {
            datagram.extend_from_slice(&36u32.to_ne_bytes());
            datagram.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            datagram.extend_from_slice(&0u16.to_ne_bytes());
            datagram.extend_from_slice(&seq.to_ne_bytes());
            datagram.extend_from_slice(&0u32.to_ne_bytes());
            datagram.extend_from_slice(&error.to_ne_bytes());
            datagram.extend_from_slice(&[0u8; 16]); // the request's header
        }
        assert_eq!(responses(&datagram), [(7, 0), (8, 2)]);
    }
}
