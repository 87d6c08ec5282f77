//! An in-memory IPVS table, ipsets and `kube-ipvs0`, applying what the proxier sends the way
//! the tools do (an `ipvsadm --restore` command on a missing or existing object fails and
//! stops the batch), so tests check without root that partial syncs and one full sync agree
//! and that draining follows the connection counts the test sets.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use kube_proxy_model::IpFamily;

use crate::desired::VirtualAddress;
use crate::ipvsadm::{self, KernelService, KernelTable};
use crate::proxier::{IpvsKernel, KernelError};

#[derive(Clone, Debug, Default)]
pub struct FakeIpvs {
    pub table: KernelTable,
    /// Set name -> (type line, entries).
    pub sets: BTreeMap<String, BTreeSet<String>>,
    pub bound: BTreeSet<IpAddr>,
    /// Connections per real server (missing: 0).
    pub connections: BTreeMap<(VirtualAddress, SocketAddr), u64>,
    /// Commands run by `ipvs_restore`, in total.
    pub commands: usize,
    pub restores: usize,
    /// `ipvsadm --save` runs (full syncs' reads).
    pub reads: usize,
    /// Fail the next `ipvs_restore` after this many commands.
    pub fail_after: Option<usize>,
}

impl FakeIpvs {
    fn apply(&mut self, line: &str) -> Result<(), String> {
        let parsed = ipvsadm::parse_save(&line.replacen("-E", "-A", 1).replacen("-e", "-a", 1));
        let words: Vec<&str> = line.split_whitespace().collect();
        let command = words.first().copied().unwrap_or("");
        let (address, service) = match parsed.into_iter().next() {
            Some(found) => found,
            None => {
                // -D/-d lines lack what parse_save needs to build a service: parse by hand.
                let probe = format!("-A {} -s rr", words[1..3].join(" "));
                let (address, service) = ipvsadm::parse_save(&probe)
                    .into_iter()
                    .next()
                    .ok_or_else(|| format!("cannot parse {line:?}"))?;
                (address, service)
            }
        };
        let real = words
            .windows(2)
            .find(|w| w[0] == "-r")
            .and_then(|w| w[1].parse::<SocketAddr>().ok());
        let weight = words
            .windows(2)
            .find(|w| w[0] == "-w")
            .and_then(|w| w[1].parse::<u32>().ok())
            .unwrap_or(1);
        match command {
            "-A" => {
                if self.table.contains_key(&address) {
                    return Err("Service already exists".into());
                }
                self.table.insert(address, service);
            }
            "-E" => {
                let have = self.table.get_mut(&address).ok_or("No such service")?;
                have.settings = service.settings;
            }
            "-D" => {
                self.table.remove(&address).ok_or("No such service")?;
            }
            "-a" | "-e" | "-d" => {
                let have = self.table.get_mut(&address).ok_or("No such service")?;
                let real = real.ok_or("no real server")?;
                match command {
                    "-a" if have.reals.contains_key(&real) => {
                        return Err("Destination already exists".into())
                    }
                    "-a" => {
                        have.reals.insert(real, weight);
                    }
                    "-e" => {
                        *have.reals.get_mut(&real).ok_or("No such destination")? = weight;
                    }
                    _ => {
                        have.reals.remove(&real).ok_or("No such destination")?;
                    }
                }
            }
            _ => return Err(format!("unsupported {line:?}")),
        }
        Ok(())
    }

    /// Servers of one family, as `(address, scheduler, persistence, reals with weights)`.
    pub fn services(&self, v6: bool) -> BTreeMap<VirtualAddress, KernelService> {
        self.table
            .iter()
            .filter(|(a, _)| a.ip.is_ipv6() == v6)
            .map(|(a, s)| (*a, s.clone()))
            .collect()
    }
}

impl IpvsKernel for FakeIpvs {
    fn ipvs_save(&mut self) -> Result<String, KernelError> {
        self.reads += 1;
        let mut text = String::new();
        for (address, service) in &self.table {
            let mut commands = ipvsadm::Commands::default();
            commands.add_service(address, &service.settings);
            for (real, weight) in &service.reals {
                commands.add_real(address, real, *weight);
            }
            text.push_str(&commands.text);
        }
        Ok(text)
    }

    fn ipvs_restore(&mut self, commands: &str) -> Result<(), KernelError> {
        self.restores += 1;
        for (index, line) in commands.lines().enumerate() {
            if self.fail_after == Some(index) {
                self.fail_after = None;
                return Err(KernelError(format!("line {}: injected failure", index + 1)));
            }
            self.apply(line)
                .map_err(|e| KernelError(format!("line {} ({line}): {e}", index + 1)))?;
            self.commands += 1;
        }
        Ok(())
    }

    fn connections(&mut self) -> Result<BTreeMap<(VirtualAddress, SocketAddr), u64>, KernelError> {
        Ok(ipvsadm::parse_connections(&self.listing()))
    }

    fn ipset_save(&mut self) -> Result<String, KernelError> {
        let mut text = String::new();
        for (name, entries) in &self.sets {
            let _ = writeln!(text, "create {name} hash:ip,port");
            for entry in entries {
                let _ = writeln!(text, "add {name} {entry}");
            }
        }
        Ok(text)
    }

    fn ipset_restore(&mut self, input: &str) -> Result<(), KernelError> {
        for line in input.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["create", name, ..] => {
                    self.sets.entry(name.to_string()).or_default();
                }
                ["add", name, entry, ..] => {
                    self.sets
                        .get_mut(*name)
                        .ok_or_else(|| KernelError(format!("no set {name}")))?
                        .insert(entry.to_string());
                }
                ["del", name, entry, ..] => {
                    self.sets
                        .get_mut(*name)
                        .ok_or_else(|| KernelError(format!("no set {name}")))?
                        .remove(*entry);
                }
                _ => return Err(KernelError(format!("unsupported {line:?}"))),
            }
        }
        Ok(())
    }

    fn bound_addresses(&mut self, family: IpFamily) -> Result<Vec<IpAddr>, KernelError> {
        Ok(self
            .bound
            .iter()
            .filter(|ip| IpFamily::of(ip) == family)
            .copied()
            .collect())
    }

    fn change_addresses(&mut self, add: &[IpAddr], remove: &[IpAddr]) -> Result<(), KernelError> {
        for ip in add {
            if !self.bound.insert(*ip) {
                return Err(KernelError(format!("{ip} is already on kube-ipvs0")));
            }
        }
        for ip in remove {
            if !self.bound.remove(ip) {
                return Err(KernelError(format!("{ip} is not on kube-ipvs0")));
            }
        }
        Ok(())
    }
}

impl FakeIpvs {
    /// What `ipvsadm -Ln` would print.
    pub fn listing(&self) -> String {
        let mut text = String::from("Prot LocalAddress:Port Scheduler Flags\n");
        for (address, service) in &self.table {
            let _ = writeln!(
                text,
                "{}  {} {}",
                address.protocol.upper(),
                SocketAddr::new(address.ip, address.port),
                service.settings.scheduler
            );
            for (real, weight) in &service.reals {
                let n = self.connections.get(&(*address, *real)).unwrap_or(&0);
                let _ = writeln!(text, "  -> {real}  Masq  {weight}  {n}  0");
            }
        }
        text
    }
}
