//! `kube-proxy explain --from IP --to IP:PORT[/PROTO]`: where a connection goes and which
//! kernel objects carry it, computed from the same configuration, flags and cluster state
//! (`--manifests` or the API server) as the proxy itself, through the same event loop and
//! plan; `--check` then asks the live kernel for each of those objects.
//!
//! It only reads: nothing is programmed, no sysctl is set, no health server is started.

mod check;
pub use check::split_args;
mod explainer;
mod render;

use std::ffi::OsString;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use kube_proxy_config::{Flags, ProxyMode};
use kube_proxy_model::explain::{Origin, Packet, SourceHints};
use kube_proxy_model::IpFamily;
use tokio::sync::mpsc;

use crate::sync::event_loop::{EventLoop, NodeAddressing, NodeWait};
use crate::sync::scheduler::SchedulerConfig;
use explainer::{Explainer, Found, Mode};

/// What `explain` was asked, besides the proxy's own flags.
#[derive(Debug, Default)]
struct Question {
    from: Option<String>,
    to: Option<String>,
    from_kind: Option<Origin>,
    json: bool,
    check: bool,
}

const USAGE: &str = "usage: kube-proxy explain --from IP --to IP:PORT[/tcp|udp|sctp] \
[--from-kind pod|node|outside] [--check] [--output text|json] [kube-proxy flags: --config, \
--manifests, --kubeconfig, --proxy-mode, --hostname-override, ...]";

/// Takes explain's own options out of `args` (after `explain`), leaving the proxy's flags.
fn split_question(args: &[OsString]) -> Result<(Question, Vec<OsString>), String> {
    let mut question = Question::default();
    let mut rest = Vec::new();
    let mut iter = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .peekable();
    while let Some(arg) = iter.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |what: &str| -> Result<String, String> {
            inline
                .clone()
                .or_else(|| iter.next())
                .ok_or_else(|| format!("{what} needs a value; {USAGE}"))
        };
        match name.as_str() {
            "--from" => question.from = Some(value("--from")?),
            "--to" => question.to = Some(value("--to")?),
            "--from-kind" => {
                question.from_kind = Some(match value("--from-kind")?.as_str() {
                    "pod" => Origin::LocalPod,
                    "node" => Origin::Node,
                    "outside" => Origin::Outside,
                    other => {
                        return Err(format!(
                            "--from-kind: invalid value {other:?}: must be \"pod\", \"node\" or \"outside\""
                        ))
                    }
                })
            }
            "--output" | "-o" => {
                question.json = match value("--output")?.as_str() {
                    "json" => true,
                    "text" => false,
                    other => {
                        return Err(format!(
                            "--output: invalid value {other:?}: must be \"text\" or \"json\""
                        ))
                    }
                }
            }
            "--json" => question.json = true,
            "--check" => question.check = true,
            "--help" | "-h" => return Err(USAGE.into()),
            _ => rest.push(OsString::from(arg)),
        }
    }
    Ok((question, rest))
}

/// Entry point for `kube-proxy explain ...` (`args` without the program and `explain`).
pub fn main(args: &[OsString]) -> ExitCode {
    let (question, rest) = match split_question(args) {
        Ok(split) => split,
        Err(message) => {
            eprintln!("kube-proxy explain: {message}");
            return ExitCode::from(2);
        }
    };
    let packet = match packet_of(&question) {
        Ok(packet) => packet,
        Err(message) => {
            eprintln!("kube-proxy explain: {message}");
            return ExitCode::from(2);
        }
    };
    let mut argv = vec![OsString::from("kube-proxy")];
    argv.extend(rest);
    let flags = match Flags::try_parse_from(argv) {
        Ok(flags) => flags,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(2);
        }
    };
    let effective = match crate::app::load_config(&flags) {
        Ok(effective) => effective,
        Err(message) => {
            eprintln!("kube-proxy explain: {message}");
            return ExitCode::FAILURE;
        }
    };
    let settings = &effective.settings;
    let mode = match settings.mode {
        ProxyMode::Nftables => Mode::Nftables,
        ProxyMode::Iptables => Mode::Iptables,
        ProxyMode::Ipvs => Mode::Ipvs,
        ProxyMode::Userspace => Mode::Userspace,
    };
    // Logs go to stderr at the configured verbosity (quiet by default), the answer to stdout.
    crate::telemetry::logging::init(settings.verbosity.min(1));
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("kube-proxy explain: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let hints = SourceHints {
        assume: question.from_kind,
        interface: match settings.detect_local {
            kube_proxy_config::DetectLocal::BridgeInterface(_)
            | kube_proxy_config::DetectLocal::InterfaceNamePrefix(_) => {
                route_interface(packet.from)
            }
            _ => None,
        },
    };
    let found = match runtime.block_on(compute(&flags, &effective, mode, packet, hints)) {
        Ok(found) => found,
        Err(e) => {
            eprintln!("kube-proxy explain: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let checked = question.check.then(|| {
        let ip = match packet.family() {
            IpFamily::V4 => "ip",
            IpFamily::V6 => "ip6",
        };
        let requested = crate::kernel::iptables_backend::from_env().unwrap_or(None);
        let backend = match (mode, requested) {
            (Mode::Iptables | Mode::Ipvs, None) => crate::kernel::iptables_backend::select(None).0,
            (_, requested) => requested.unwrap_or_default(),
        };
        let iptables = backend.tool(
            match packet.family() {
                IpFamily::V4 => "iptables",
                IpFamily::V6 => "ip6tables",
            },
            "",
        );
        check::check(&found.kernel_objects, ip, &iptables)
    });
    let drift = checked
        .as_ref()
        .is_some_and(|c| c.iter().any(|o| !o.present));
    let text = if question.json {
        render::json(&found, checked.as_deref())
    } else {
        render::text(&found, checked.as_deref())
    };
    print!("{text}");
    if drift {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    }
}

fn packet_of(question: &Question) -> Result<Packet, String> {
    let from = question
        .from
        .as_deref()
        .ok_or_else(|| format!("--from is required; {USAGE}"))?;
    let to = question
        .to
        .as_deref()
        .ok_or_else(|| format!("--to is required; {USAGE}"))?;
    let from: std::net::IpAddr = from
        .parse()
        .map_err(|_| format!("--from {from:?} is not an IP address"))?;
    let (to, port, protocol) = Packet::parse_destination(to).map_err(|e| format!("--to {e}"))?;
    if IpFamily::of(&from) != IpFamily::of(&to) {
        return Err(format!(
            "--from {from} and --to {to} are of different IP families"
        ));
    }
    Ok(Packet {
        from: from.to_canonical(),
        to,
        port,
        protocol,
    })
}

/// The interface this node routes `address` through (`ip route get`), for the
/// interface-based local-traffic detectors.
fn route_interface(address: std::net::IpAddr) -> Option<String> {
    let out = std::process::Command::new("ip")
        .args(["-o", "route", "get", &address.to_string()])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    words.find(|w| *w == "dev")?;
    words.next().map(str::to_string)
}

/// Runs the proxy's event loop once with the explainer as its dataplane.
async fn compute(
    flags: &Flags,
    effective: &kube_proxy_config::EffectiveConfig,
    mode: Mode,
    packet: Packet,
    hints: SourceHints,
) -> anyhow::Result<Found> {
    let settings = &effective.settings;
    let node_name = crate::app::node_name(effective);
    let (tx, rx) = mpsc::channel(4096);
    // No Starting event: explain is not the proxy starting.
    crate::app::start_source(flags, settings, &node_name, tx, false).await?;
    let policy = match mode {
        Mode::Iptables | Mode::Userspace => crate::app::iptables_policy(settings),
        Mode::Nftables => crate::app::nftables_config(settings).policy(),
        Mode::Ipvs => crate::app::ipvs_config(settings).policy,
    };
    let found = Arc::new(Mutex::new(None));
    let explainer = Explainer {
        mode,
        policy,
        bind_address: settings.bind_address,
        scheduling: kube_proxy_ipvs::desired::Scheduling::new(&settings.ipvs.scheduler),
        packet,
        hints,
        found: found.clone(),
    };
    let mut event_loop = EventLoop::new(
        &node_name,
        &[packet.family()],
        SchedulerConfig::new(Duration::ZERO, settings.sync_period),
        crate::app::plan_context(settings),
        Box::new(explainer),
        Arc::default(),
        NodeAddressing {
            bind_address: settings.bind_address,
            local_addresses: Box::new(crate::kernel::host::local_addresses),
        },
    )
    .exit_after_first_sync(true);
    if flags.manifests.is_none() {
        event_loop = event_loop.wait_for_node(NodeWait {
            need_pod_cidrs: settings.detect_local == kube_proxy_config::DetectLocal::NodeCidr,
            timeout: NodeWait::UPSTREAM_TIMEOUT,
        });
    }
    event_loop.run(rx).await?;
    let found = found.lock().unwrap().take();
    found.ok_or_else(|| {
        anyhow::anyhow!(
            "the cluster state was never complete (Services and EndpointSlices not listed)"
        )
    })
}
