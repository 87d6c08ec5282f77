//! IPVS state in `ipvsadm`'s words: the commands that change it (fed to `ipvsadm --restore`,
//! one command per line) and the parsers of what `ipvsadm --save -n` and `ipvsadm -Ln` print.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use kube_proxy_model::Protocol;

use crate::desired::{ServiceSettings, VirtualAddress};

/// A virtual server as the kernel has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelService {
    pub settings: ServiceSettings,
    /// Real servers and their weights.
    pub reals: BTreeMap<SocketAddr, u32>,
}

/// Every virtual server the kernel has (both families), by address.
pub type KernelTable = BTreeMap<VirtualAddress, KernelService>;

fn proto_option(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "-t",
        Protocol::Udp => "-u",
        Protocol::Sctp => "--sctp-service",
    }
}

/// `-t 198.19.0.10:80`, `-u [2001:db8::10]:53`.
pub fn service_option(address: &VirtualAddress) -> String {
    format!(
        "{} {}",
        proto_option(address.protocol),
        SocketAddr::new(address.ip, address.port)
    )
}

fn settings_options(settings: &ServiceSettings) -> String {
    let mut text = format!("-s {}", settings.scheduler);
    if let Some(timeout) = settings.persistence {
        let _ = write!(text, " -p {timeout}");
    }
    if let Some(flags) = &settings.flags {
        let _ = write!(text, " -b {flags}");
    }
    text
}

/// Commands for `ipvsadm --restore`, accumulated in the order they must run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Commands {
    pub text: String,
    pub count: usize,
}

impl Commands {
    fn line(&mut self, line: std::fmt::Arguments<'_>) {
        let _ = self.text.write_fmt(line);
        self.text.push('\n');
        self.count += 1;
    }

    pub fn add_service(&mut self, address: &VirtualAddress, settings: &ServiceSettings) {
        self.line(format_args!(
            "-A {} {}",
            service_option(address),
            settings_options(settings)
        ));
    }

    pub fn edit_service(&mut self, address: &VirtualAddress, settings: &ServiceSettings) {
        self.line(format_args!(
            "-E {} {}",
            service_option(address),
            settings_options(settings)
        ));
    }

    pub fn delete_service(&mut self, address: &VirtualAddress) {
        self.line(format_args!("-D {}", service_option(address)));
    }

    /// Real servers are reached by masquerading (NAT), as upstream's.
    pub fn add_real(&mut self, address: &VirtualAddress, real: &SocketAddr, weight: u32) {
        self.line(format_args!(
            "-a {} -r {real} -m -w {weight}",
            service_option(address)
        ));
    }

    pub fn set_weight(&mut self, address: &VirtualAddress, real: &SocketAddr, weight: u32) {
        self.line(format_args!(
            "-e {} -r {real} -m -w {weight}",
            service_option(address)
        ));
    }

    pub fn delete_real(&mut self, address: &VirtualAddress, real: &SocketAddr) {
        self.line(format_args!("-d {} -r {real}", service_option(address)));
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

fn parse_socket(text: &str) -> Option<SocketAddr> {
    text.parse().ok()
}

/// Parses `ipvsadm --save -n`. Lines it does not understand (firewall-mark services) are
/// skipped: they are not ours.
pub fn parse_save(text: &str) -> KernelTable {
    let mut table = KernelTable::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(command) = words.first() else {
            continue;
        };
        let mut address = None;
        let mut real = None;
        let mut scheduler = None;
        let mut persistence = None;
        let mut flags = None;
        let mut weight = 1;
        let mut i = 1;
        while i < words.len() {
            let value = words.get(i + 1).copied();
            let protocol = match words[i] {
                "-t" | "--tcp-service" => Some(Protocol::Tcp),
                "-u" | "--udp-service" => Some(Protocol::Udp),
                "--sctp-service" => Some(Protocol::Sctp),
                _ => None,
            };
            if let Some(protocol) = protocol {
                address = value.and_then(parse_socket).map(|s| VirtualAddress {
                    ip: s.ip(),
                    protocol,
                    port: s.port(),
                });
                i += 2;
                continue;
            }
            match words[i] {
                "-r" | "--real-server" => real = value.and_then(parse_socket),
                "-s" | "--scheduler" => scheduler = value.map(str::to_string),
                "-p" | "--persistent" => persistence = value.and_then(|v| v.parse().ok()),
                "-b" | "--sched-flags" => flags = value.map(str::to_string),
                "-w" | "--weight" => weight = value.and_then(|v| v.parse().ok()).unwrap_or(1),
                // Options without a value.
                "-m" | "-g" | "-i" | "--masquerading" | "--gatewaying" | "--ipip" => {
                    i += 1;
                    continue;
                }
                _ => {}
            }
            i += 2;
        }
        let Some(address) = address else {
            continue;
        };
        match *command {
            "-A" => {
                table.insert(
                    address,
                    KernelService {
                        settings: ServiceSettings {
                            scheduler: scheduler.unwrap_or_default(),
                            persistence,
                            flags,
                        },
                        reals: BTreeMap::new(),
                    },
                );
            }
            "-a" => {
                if let (Some(service), Some(real)) = (table.get_mut(&address), real) {
                    service.reals.insert(real, weight);
                }
            }
            _ => {}
        }
    }
    table
}

/// Parses `ipvsadm -Ln`: the active plus inactive connections of every real server.
pub fn parse_connections(text: &str) -> BTreeMap<(VirtualAddress, SocketAddr), u64> {
    connections(text, parse_socket)
}

/// Parses `/proc/net/ip_vs` (the kernel's own listing, read without running a tool): the
/// active plus inactive connections of every real server. Addresses and ports are hex there
/// (`C613000A:0050`), IPv6 addresses bracketed in full.
pub fn parse_proc_connections(text: &str) -> BTreeMap<(VirtualAddress, SocketAddr), u64> {
    fn socket(text: &str) -> Option<SocketAddr> {
        let (ip, port) = text.rsplit_once(':')?;
        let port = u16::from_str_radix(port, 16).ok()?;
        let ip: IpAddr = match ip.strip_prefix('[').and_then(|i| i.strip_suffix(']')) {
            Some(v6) => v6.parse().ok()?,
            None => std::net::Ipv4Addr::from(u32::from_str_radix(ip, 16).ok()?).into(),
        };
        Some(SocketAddr::new(ip, port))
    }
    connections(text, socket)
}

/// The connection counts of a listing in `ipvsadm -Ln`'s layout (which `/proc/net/ip_vs`
/// shares), its addresses read by `socket`.
fn connections(
    text: &str,
    socket: fn(&str) -> Option<SocketAddr>,
) -> BTreeMap<(VirtualAddress, SocketAddr), u64> {
    let mut out = BTreeMap::new();
    let mut current: Option<VirtualAddress> = None;
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [proto, address, ..] if ["TCP", "UDP", "SCTP"].contains(proto) => {
                let protocol = match *proto {
                    "TCP" => Protocol::Tcp,
                    "UDP" => Protocol::Udp,
                    _ => Protocol::Sctp,
                };
                current = socket(address).map(|s| VirtualAddress {
                    ip: s.ip(),
                    protocol,
                    port: s.port(),
                });
            }
            ["->", real, _forward, _weight, active, inactive] => {
                if let (Some(vs), Some(real), Ok(a), Ok(i)) = (
                    current,
                    socket(real),
                    active.parse::<u64>(),
                    inactive.parse::<u64>(),
                ) {
                    out.insert((vs, real), a + i);
                }
            }
            [first, ..] if !first.starts_with("->") && *first != "Prot" => current = None,
            _ => {}
        }
    }
    out
}

/// Whether an address is of the family.
pub fn same_family(ip: &IpAddr, v6: bool) -> bool {
    ip.is_ipv6() == v6
}
