//! Runs the tools of ipvs mode: `ipvsadm` (IPVS), `ipset` and `ip` (the `kube-ipvs0` dummy
//! interface); the start-up check that the kernel has IP_VS and the configured scheduler; the
//! IPVS sysctls and timeouts; and ipvs mode's part of `--cleanup`.

use std::io::Write;
use std::net::IpAddr;
use std::path::Path;
use std::process::{Command, Stdio};

use ipnet::IpNet;
use kube_proxy_ipvs::desired::{ServiceSettings, VirtualAddress};
use kube_proxy_ipvs::ipvsadm::{self, Commands};
use kube_proxy_ipvs::names::{Set, DUMMY_INTERFACE};
use kube_proxy_ipvs::proxier::{IpvsKernel, KernelError};
use kube_proxy_model::{IpFamily, Protocol};
use tracing::{info, warn};

/// Runs `program args`, feeding `input` on standard input; its standard output, or an error
/// naming the command and what it printed.
fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<String, KernelError> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            KernelError(format!(
                "cannot run {program}: {e} (is the {} package installed?)",
                package_of(program)
            ))
        })?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        // A tool that stops early closes its input; its status tells why.
        let _ = stdin.write_all(text.as_bytes());
    }
    let output = child
        .wait_with_output()
        .map_err(|e| KernelError(format!("{program}: {e}")))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(KernelError(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

fn package_of(program: &str) -> &str {
    match program {
        "ip" => "iproute2",
        other => other,
    }
}

/// The binary's IPVS, ipset and address tools.
#[derive(Debug, Default)]
pub struct IpvsCommand;

impl IpvsKernel for IpvsCommand {
    fn ipvs_save(&mut self) -> Result<String, KernelError> {
        run("ipvsadm", &["--save", "-n"], None)
    }

    fn ipvs_restore(&mut self, commands: &str) -> Result<(), KernelError> {
        run("ipvsadm", &["--restore"], Some(commands)).map(drop)
    }

    fn connections(
        &mut self,
    ) -> Result<std::collections::BTreeMap<(VirtualAddress, std::net::SocketAddr), u64>, KernelError>
    {
        // The kernel's own listing, read in-process: no tool run per sync while endpoints
        // drain.
        std::fs::read_to_string("/proc/net/ip_vs")
            .map(|text| ipvsadm::parse_proc_connections(&text))
            .map_err(|e| KernelError(format!("cannot read /proc/net/ip_vs: {e}")))
    }

    fn ipset_save(&mut self) -> Result<String, KernelError> {
        run("ipset", &["save"], None)
    }

    fn ipset_restore(&mut self, input: &str) -> Result<(), KernelError> {
        run("ipset", &["restore"], Some(input)).map(drop)
    }

    fn bound_addresses(&mut self, family: IpFamily) -> Result<Vec<IpAddr>, KernelError> {
        // Asked of this network namespace (/sys may show another one's interfaces).
        if nix::net::if_::if_nametoindex(DUMMY_INTERFACE).is_err() {
            // Left down, as upstream leaves it: its addresses are local all the same.
            run(
                "ip",
                &["link", "add", DUMMY_INTERFACE, "type", "dummy"],
                None,
            )?;
            info!(
                interface = DUMMY_INTERFACE,
                "Created the ipvs dummy interface"
            );
        }
        super::host::interface_addresses(family, |name| name == DUMMY_INTERFACE)
            .map_err(|e| KernelError(format!("cannot list interface addresses: {e}")))
    }

    fn change_addresses(&mut self, add: &[IpAddr], remove: &[IpAddr]) -> Result<(), KernelError> {
        let mut batch = String::new();
        for ip in add {
            match ip {
                IpAddr::V4(_) => {
                    batch.push_str(&format!("address add {ip}/32 dev {DUMMY_INTERFACE}\n"))
                }
                // No duplicate address detection: the address must be usable at once.
                IpAddr::V6(_) => batch.push_str(&format!(
                    "address add {ip}/128 dev {DUMMY_INTERFACE} nodad\n"
                )),
            }
        }
        for ip in remove {
            let prefix = if ip.is_ipv4() { 32 } else { 128 };
            batch.push_str(&format!(
                "address del {ip}/{prefix} dev {DUMMY_INTERFACE}\n"
            ));
        }
        run("ip", &["-batch", "-"], Some(&batch)).map(drop)
    }
}

/// The upstream probe address for the scheduler check (TEST-NET-2; upstream's choice).
const PROBE: &str = "198.51.100.0:20000";

/// Upstream's start-up check, before anything is changed: the tools exist, the kernel has
/// IP_VS (loading the module if needed) and the scheduler. The error is one line naming
/// what is missing; the proxy exits with it (upstream no longer falls back to iptables).
pub fn check_ipvs(scheduler: &str) -> Result<String, String> {
    if !Path::new("/proc/net/ip_vs").exists() {
        let _ = Command::new("modprobe")
            .arg("ip_vs")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    if !Path::new("/proc/net/ip_vs").exists() {
        return Err(format!(
            "ipvs mode needs the kernel's IP Virtual Server (CONFIG_IP_VS): /proc/net/ip_vs is missing and `modprobe ip_vs` did not load it on kernel {}; use --proxy-mode nftables or iptables on this node",
            std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim()
        ));
    }
    let version = run("ipvsadm", &["--version"], None).map_err(|e| e.0)?;
    let ipset = run("ipset", &["version"], None).map_err(|e| e.0)?;
    let ipset_major = ipset
        .split_whitespace()
        .find_map(|w| {
            w.trim_start_matches('v')
                .split('.')
                .next()?
                .parse::<u32>()
                .ok()
        })
        .unwrap_or(0);
    if ipset_major < 6 {
        return Err(format!(
            "ipvs mode needs ipset 6 or newer; found {:?}",
            ipset.trim()
        ));
    }
    let scheduler = if scheduler.is_empty() {
        "rr"
    } else {
        scheduler
    };
    let in_use = run("ipvsadm", &["--save", "-n"], None)
        .map(|saved| {
            ipvsadm::parse_save(&saved)
                .values()
                .any(|s| s.settings.scheduler == scheduler)
        })
        .unwrap_or(false);
    if !in_use {
        let address = VirtualAddress {
            ip: "198.51.100.0".parse().expect("probe address"),
            protocol: Protocol::Tcp,
            port: 20000,
        };
        let mut add = Commands::default();
        add.add_service(
            &address,
            &ServiceSettings {
                scheduler: scheduler.to_string(),
                persistence: None,
                flags: None,
            },
        );
        if let Err(e) = run("ipvsadm", &["--restore"], Some(&add.text)) {
            return Err(format!(
                "ipvs mode cannot use the IPVS scheduler {scheduler:?} (kernel module ip_vs_{scheduler}): adding a probe virtual server {PROBE} failed: {e}"
            ));
        }
        let mut delete = Commands::default();
        delete.delete_service(&address);
        let _ = run("ipvsadm", &["--restore"], Some(&delete.text));
    }
    Ok(format!("{} / ipset {}", version.trim(), ipset.trim()))
}

/// Sets upstream's IPVS timeouts (`ipvs.tcpTimeout`, `tcpFinTimeout`, `udpTimeout`; 0 keeps
/// the kernel's). Failure is logged, as upstream.
pub fn set_timeouts(tcp: u64, tcp_fin: u64, udp: u64) {
    if tcp == 0 && tcp_fin == 0 && udp == 0 {
        return;
    }
    let values = [tcp.to_string(), tcp_fin.to_string(), udp.to_string()];
    match run(
        "ipvsadm",
        &["--set", &values[0], &values[1], &values[2]],
        None,
    ) {
        Ok(_) => info!(tcp, tcp_fin, udp, "Set IPVS timeouts (seconds)"),
        Err(e) => warn!(error = %e, "Cannot set the IPVS timeouts"),
    }
}

/// Removes ipvs mode's IPVS virtual servers (all but those in `exclude`) and ipsets; for
/// `--cleanup` and when another mode takes over. Call after the iptables chains are gone
/// (an ipset a rule references cannot be destroyed). False if something could not go.
pub fn remove_leftovers(exclude: &[IpNet]) -> bool {
    let mut ok = true;
    if Path::new("/proc/net/ip_vs").exists() {
        match run("ipvsadm", &["--save", "-n"], None) {
            Ok(saved) => {
                let mut commands = Commands::default();
                for address in ipvsadm::parse_save(&saved).keys() {
                    if !exclude.iter().any(|c| c.contains(&address.ip)) {
                        commands.delete_service(address);
                    }
                }
                if !commands.is_empty() {
                    match run("ipvsadm", &["--restore"], Some(&commands.text)) {
                        Ok(_) => info!(count = commands.count, "Removed IPVS virtual servers"),
                        Err(e) => {
                            ok = false;
                            warn!(error = %e, "Cannot remove IPVS virtual servers");
                        }
                    }
                }
            }
            Err(e) => {
                ok = false;
                warn!(error = %e, "Cannot list IPVS virtual servers");
            }
        }
    }
    if Path::new("/proc/net/ip_set").exists() || Path::new("/sys/module/ip_set").exists() {
        if let Ok(listed) = run("ipset", &["list", "-n"], None) {
            let ours: Vec<String> = Set::all_names();
            let existing: Vec<&str> = listed
                .lines()
                .map(str::trim)
                .filter(|name| ours.iter().any(|o| o == name))
                .collect();
            for name in &existing {
                if let Err(e) = run("ipset", &["destroy", name], None) {
                    ok = false;
                    warn!(set = name, error = %e, "Cannot destroy ipset");
                }
            }
            if !existing.is_empty() {
                info!(count = existing.len(), "Removed ipvs mode's ipsets");
            }
        }
    }
    ok
}
