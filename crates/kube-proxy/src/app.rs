//! Process start-up, in upstream's order: parse flags, read and validate the configuration
//! (failing before anything else happens), `--write-config-to`, logging, then the sources of
//! cluster state, the sync loop and the signal handlers.

use std::ffi::OsString;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use kube_proxy_config::{EffectiveConfig, Flags, ProxyMode};
use kube_proxy_model::{IpFamily, LocalPolicy, PlanContext, SelectionGates};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::source;
use crate::sync::dataplane::{Dataplane, PrintFormat, StatePrinter};
use crate::sync::event_loop::EventLoop;
use crate::sync::scheduler::SchedulerConfig;
use crate::sync::sync_status::SharedSyncStatus;

pub fn main(args: Vec<OsString>) -> ExitCode {
    if args.get(1).is_some_and(|a| a == "explain") {
        return crate::explain::main(&args[2..]);
    }
    let flags = match Flags::try_parse_from(args) {
        Ok(flags) => flags,
        Err(e) => {
            // --help prints and exits 0; a bad flag prints the flag, the value and usage.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if let Some(version) = &flags.version {
        match version.as_str() {
            "false" => {}
            "raw" => {
                println!(
                    "kube-proxy-rs {} (compatible with Kubernetes kube-proxy {})",
                    env!("CARGO_PKG_VERSION"),
                    crate::KUBERNETES_VERSION
                );
                return ExitCode::SUCCESS;
            }
            _ => {
                println!(
                    "Kubernetes {}-kube-proxy-rs.{}",
                    crate::KUBERNETES_VERSION,
                    env!("CARGO_PKG_VERSION")
                );
                return ExitCode::SUCCESS;
            }
        }
    }
    let effective = match load_config(&flags) {
        Ok(effective) => effective,
        Err(message) => {
            eprintln!("kube-proxy: {message}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(path) = &flags.write_config_to {
        return match std::fs::write(path, effective.document.to_yaml()) {
            Ok(()) => {
                eprintln!("Wrote configuration to: {}", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!(
                    "kube-proxy: failed to write configuration to {}: {e}",
                    path.display()
                );
                ExitCode::FAILURE
            }
        };
    }
    let print_format = match flags.print_state.as_deref() {
        None => None,
        Some(value) => match PrintFormat::parse(value) {
            Some(format) => Some(format),
            None => {
                eprintln!("kube-proxy: --print-state: invalid value {value:?}: must be \"text\" or \"json\"");
                return ExitCode::FAILURE;
            }
        },
    };
    if effective.settings.mode == ProxyMode::Userspace {
        use kube_proxy_userspace::redirect::{Path, PATH_ENV};
        if let Err(e) = Path::parse(&std::env::var(PATH_ENV).unwrap_or_default()) {
            eprintln!("kube-proxy: {e}");
            return ExitCode::FAILURE;
        }
    }
    if let Err(e) = crate::kernel::iptables_backend::from_env() {
        if matches!(
            effective.settings.mode,
            ProxyMode::Iptables | ProxyMode::Ipvs | ProxyMode::Userspace
        ) {
            eprintln!("kube-proxy: {e}");
            return ExitCode::FAILURE;
        }
    }

    crate::telemetry::logging::init(effective.settings.verbosity);
    for warning in &effective.warnings {
        warn!("{warning}");
    }
    info!(
        version = env!("CARGO_PKG_VERSION"),
        mode = effective.settings.mode.as_str(),
        "Starting kube-proxy-rs"
    );
    if flags.cleanup == Some(true) {
        return cleanup(&effective.settings);
    }
    let touches_kernel =
        programs_kernel(&flags, &effective.settings, print_format) || flags.init_only == Some(true);
    if effective.settings.mode == ProxyMode::Ipvs && touches_kernel {
        // As upstream, before anything is changed: no IP_VS, no ipvs mode (and no fallback).
        match crate::kernel::ipvs_runner::check_ipvs(&effective.settings.ipvs.scheduler) {
            Ok(versions) => info!(tools = %versions, "The kernel has IP_VS"),
            Err(e) => {
                error!("{e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if touches_kernel {
        privileged_setup(&effective);
    }
    if flags.init_only == Some(true) {
        if effective.settings.mode == ProxyMode::Nftables {
            if let Err(e) = crate::kernel::nft_runner::check_nft() {
                error!("{e}");
                return ExitCode::FAILURE;
            }
        }
        info!("--init-only: privileged set-up done; exiting");
        return ExitCode::SUCCESS;
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            error!(error = %e, "Cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(flags, effective, print_format)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Whether this run programs the kernel (rather than printing state or transactions).
fn programs_kernel(
    flags: &Flags,
    settings: &kube_proxy_config::ProxyConfig,
    print_format: Option<PrintFormat>,
) -> bool {
    matches!(
        settings.mode,
        ProxyMode::Nftables | ProxyMode::Iptables | ProxyMode::Ipvs | ProxyMode::Userspace
    ) && flags.dry_run != Some(true)
        && print_format.is_none()
}

/// The privileged one-time steps (upstream's platform setup): conntrack sysctls and the OOM
/// score. Failures are logged, never fatal, as upstream.
fn privileged_setup(effective: &EffectiveConfig) {
    crate::kernel::node_setup::apply_conntrack(&effective.settings.conntrack);
    crate::kernel::node_setup::apply_oom_score_adj(effective.settings.oom_score_adj);
    if effective.settings.mode == ProxyMode::Ipvs {
        let ipvs = &effective.settings.ipvs;
        crate::kernel::node_setup::apply_ipvs(ipvs.strict_arp);
        crate::kernel::ipvs_runner::set_timeouts(
            ipvs.tcp_timeout.as_secs(),
            ipvs.tcp_fin_timeout.as_secs(),
            ipvs.udp_timeout.as_secs(),
        );
    }
}

/// `--cleanup`: removes everything the nftables mode programs (upstream's and ours: the
/// `kube-proxy` tables of both families), iptables and ipvs mode's chains, the ipvs
/// interface, IPVS virtual servers (but those in `ipvs.excludeCIDRs`) and ipsets, and exits;
/// non-zero if something could not be removed. What does not exist is not an error.
fn cleanup(settings: &kube_proxy_config::ProxyConfig) -> ExitCode {
    let mut failed = !remove_nft_tables(NFT_TABLE);
    failed |= !remove_nft_tables(kube_proxy_userspace::redirect::nft::TABLE);
    failed |= !crate::kernel::iptables_cleanup::remove_leftovers(
        crate::kernel::iptables_cleanup::Leftovers::All,
    );
    failed |= !crate::kernel::ipvs_runner::remove_leftovers(&settings.ipvs.exclude_cidrs);
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// nftables mode's table (ours or upstream's).
const NFT_TABLE: &str = "kube-proxy";

/// Removes the nftables tables `name` of both families; false if one could not be removed.
/// A table that does not exist is not an error, and neither is a node without nft.
fn remove_nft_tables(name: &str) -> bool {
    use kube_proxy_nftables::Runner;
    if crate::kernel::nft_runner::check_nft().is_err() {
        return true;
    }
    let mut ok = true;
    for family in ["ip", "ip6"] {
        let mut nft = crate::kernel::nft_runner::NftCommand::default();
        // `add` first makes the delete succeed whether or not the table existed.
        match nft.apply(&format!(
            "add table {family} {name}\ndelete table {family} {name}\n"
        )) {
            Ok(()) => info!(family, table = name, "Removed nftables table"),
            Err(e) => {
                ok = false;
                error!(family, table = name, error = %e.to_string().trim(), "Cannot remove nftables table");
            }
        }
    }
    ok
}

/// Reads `--config` (if any) and builds the validated configuration.
pub(crate) fn load_config(flags: &Flags) -> Result<EffectiveConfig, String> {
    let text = match &flags.config {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| format!("failed to read config file {}: {e}", path.display()))?,
        ),
        None => None,
    };
    kube_proxy_config::build(flags, text.as_deref()).map_err(|e| e.to_string())
}

/// This node's name: `--hostname-override`, else the OS host name, lower-cased.
pub fn node_name(effective: &EffectiveConfig) -> String {
    if let Some(name) = &effective.settings.hostname_override {
        return name.clone();
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|s| s.trim().to_lowercase())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

async fn run(
    flags: Flags,
    effective: EffectiveConfig,
    print_format: Option<PrintFormat>,
) -> anyhow::Result<()> {
    let settings = &effective.settings;
    let node_name = node_name(&effective);
    info!(node = %node_name, "Using node name");
    let (tx, rx) = mpsc::channel(4096);

    if let Some(dir) = &flags.manifests {
        info!(path = %dir.display(), "Standalone mode: reading Services, EndpointSlices and Nodes from manifests");
    }
    start_source(&flags, settings, &node_name, tx, true).await?;

    let Built {
        dataplane,
        relay_stats,
        redirect_path,
    } = build_dataplane(&flags, settings, print_format)?;
    if settings.mode == ProxyMode::Ipvs {
        warn!("The ipvs proxy mode is deprecated upstream (Kubernetes 1.35, KEP-5495) and may be removed; consider --proxy-mode nftables");
    }
    let status: SharedSyncStatus = Arc::default();
    let metrics = Arc::new(crate::telemetry::metrics::Metrics::new(settings.mode));
    metrics.initialize(&IpFamily::ALL);
    // Upstream's timeout: a change queued longer than twice the sync period is unhealthy.
    let health = crate::servers::health::HealthState {
        status: status.clone(),
        timeout: settings.sync_period * 2,
        metrics: metrics.clone(),
    };
    if let Some(address) = settings.healthz_bind_address {
        spawn_server(crate::servers::health::serve(
            address,
            health.clone(),
            settings.bind_address_hard_fail,
        ));
    }
    if let Some(address) = settings.metrics_bind_address {
        let mut registry = prometheus_client::registry::Registry::default();
        metrics.register(&mut registry);
        registry.register_collector(Box::new(
            crate::telemetry::process_metrics::ProcessCollector,
        ));
        if settings.mode == ProxyMode::Iptables {
            registry
                .register_collector(Box::new(crate::telemetry::nfacct_metrics::NfacctCollector));
        }
        if let Some(stats) = relay_stats {
            registry.register_collector(Box::new(
                crate::telemetry::userspace_metrics::UserspaceCollector(stats),
            ));
        }
        let server = crate::servers::metrics_server::MetricsServer {
            registry,
            mode: settings.mode.as_str(),
            configz: configz(&effective),
            enable_profiling: settings.enable_profiling,
        };
        spawn_server(crate::servers::metrics_server::serve(
            address,
            Arc::new(server),
            settings.bind_address_hard_fail,
        ));
    }
    let event_loop = EventLoop::new(
        &node_name,
        &IpFamily::ALL,
        SchedulerConfig::new(settings.min_sync_period, settings.sync_period),
        plan_context(settings),
        dataplane,
        status,
        crate::sync::event_loop::NodeAddressing {
            bind_address: settings.bind_address,
            local_addresses: Box::new(crate::kernel::host::local_addresses),
        },
    );
    let mut event_loop = event_loop
        .exit_after_first_sync(flags.once == Some(true))
        .with_metrics(metrics);
    if flags.manifests.is_none() {
        // As upstream: the first ruleset is written with the node's IPs (and pod CIDRs when
        // they tell local traffic), so wait for the Node. Standalone manifests may not have one.
        event_loop = event_loop.wait_for_node(crate::sync::event_loop::NodeWait {
            need_pod_cidrs: settings.detect_local == kube_proxy_config::DetectLocal::NodeCidr,
            timeout: crate::sync::event_loop::NodeWait::UPSTREAM_TIMEOUT,
        });
    }
    if programs_kernel(&flags, settings, print_format) {
        // Taking over from another mode: its rules go once ours are in place (not before, so
        // traffic keeps flowing during the switch). In iptables and ipvs mode the other modes
        // are nftables and userspace (the other iptables chains are partly our own then);
        // userspace mode removes every other mode's, as upstream's did.
        use crate::kernel::iptables_cleanup::{remove_leftovers, Leftovers};
        let mode = settings.mode;
        let exclude = settings.ipvs.exclude_cidrs.clone();
        use kube_proxy_userspace::redirect::{nft::TABLE as USERSPACE_TABLE, Path};
        event_loop = event_loop.after_first_sync(Box::new(move || match mode {
            ProxyMode::Nftables => {
                remove_nft_tables(USERSPACE_TABLE);
                remove_leftovers(Leftovers::All);
                crate::kernel::ipvs_runner::remove_leftovers(&exclude);
            }
            ProxyMode::Userspace => {
                remove_nft_tables(NFT_TABLE);
                if redirect_path == Some(Path::Nftables) {
                    remove_leftovers(Leftovers::All);
                } else {
                    remove_nft_tables(USERSPACE_TABLE);
                    remove_leftovers(Leftovers::IptablesAndIpvs);
                }
                crate::kernel::ipvs_runner::remove_leftovers(&exclude);
            }
            ProxyMode::Iptables | ProxyMode::Ipvs => {
                remove_nft_tables(NFT_TABLE);
                remove_nft_tables(USERSPACE_TABLE);
                remove_leftovers(Leftovers::Userspace);
            }
        }));
        // Health-check node ports belong to a proxy that programs the node's traffic.
        event_loop =
            event_loop.with_health_checks(crate::servers::service_health::HealthCheckServers::new(
                tokio::runtime::Handle::current(),
                health,
                settings.node_port_addresses.clone(),
            ));
        if flags.conntrack_cleanup == Some(false) {
            warn!("--conntrack-cleanup=false: stale UDP conntrack entries are not deleted");
        } else {
            event_loop =
                event_loop.with_conntrack_cleanup(Box::new(crate::kernel::conntrack::reconcile));
        }
    }
    // The loop owns all state and blocks while a dataplane applies rules, so it gets its own
    // thread and runtime; sources and servers stay responsive on the main runtime.
    let (done_tx, done_rx) =
        tokio::sync::oneshot::channel::<Result<(), crate::sync::event_loop::LoopError>>();
    std::thread::Builder::new()
        .name("sync-loop".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let result = match runtime {
                Ok(runtime) => runtime.block_on(event_loop.run(rx)),
                Err(e) => {
                    error!(error = %e, "Cannot start the sync loop runtime");
                    Ok(())
                }
            };
            let _ = done_tx.send(result);
        })?;

    tokio::select! {
        _ = shutdown_signal() => {
            // Rules stay in place, so traffic keeps flowing while the proxy restarts.
            info!("Received termination signal; exiting and leaving the programmed rules in place");
        }
        done = done_rx => {
            if let Ok(Err(e)) = done {
                return Err(e.into());
            }
        }
    }
    Ok(())
}

/// What the planner takes from the configuration (feature gates).
pub(crate) fn plan_context(settings: &kube_proxy_config::ProxyConfig) -> PlanContext {
    PlanContext {
        // Upstream's ipvs mode sends Local-policy traffic to cluster endpoints when this
        // node has none (one virtual server serves every client).
        local_policy: if settings.mode == ProxyMode::Ipvs {
            LocalPolicy::FallBackToCluster
        } else {
            LocalPolicy::Strict
        },
        gates: SelectionGates {
            prefer_same_traffic_distribution: settings
                .feature_gates
                .get("PreferSameTrafficDistribution")
                .copied()
                .unwrap_or(true),
        },
    }
}

/// Starts the source of cluster state: the manifests directory, or the API server (with
/// upstream's `Starting` event on the Node when `announce`).
pub(crate) async fn start_source(
    flags: &Flags,
    settings: &kube_proxy_config::ProxyConfig,
    node_name: &str,
    tx: source::EventSender,
    announce: bool,
) -> anyhow::Result<()> {
    match &flags.manifests {
        Some(dir) => {
            tokio::spawn(source::manifests::run(
                dir.clone(),
                node_name.to_string(),
                Duration::from_millis(500),
                tx,
            ));
        }
        None => {
            let client = source::api::client(&source::api::ClientSettings {
                kubeconfig: settings.kubeconfig.clone(),
                master: settings.master.clone(),
                qps: settings.qps,
                burst: settings.burst,
                content_type: settings.content_type.clone(),
            })
            .await?;
            if announce {
                tokio::spawn(source::events::announce_start(
                    client.clone(),
                    node_name.to_string(),
                    settings.mode == ProxyMode::Ipvs,
                ));
            }
            tokio::spawn(source::api::run(client, node_name.to_string(), tx));
        }
    }
    Ok(())
}

/// A dataplane, with what userspace mode adds: its relay counters (for the metrics) and the
/// redirect path it chose (what it cleans up after its first sync).
struct Built {
    dataplane: Box<dyn Dataplane>,
    relay_stats: Option<Arc<kube_proxy_userspace::relay::Stats>>,
    redirect_path: Option<kube_proxy_userspace::redirect::Path>,
}

impl Built {
    fn kernel(dataplane: Box<dyn Dataplane>) -> Built {
        Built {
            dataplane,
            relay_stats: None,
            redirect_path: None,
        }
    }
}

/// The dataplane for the configured mode, and userspace mode's relay counters.
fn build_dataplane(
    flags: &Flags,
    settings: &kube_proxy_config::ProxyConfig,
    print_format: Option<PrintFormat>,
) -> anyhow::Result<Built> {
    if let Some(format) = print_format {
        return Ok(Built::kernel(Box::new(StatePrinter::new(
            format,
            Box::new(std::io::stdout()),
        ))));
    }
    match settings.mode {
        ProxyMode::Userspace => userspace_dataplane(flags, settings),
        _ => kernel_dataplane(flags, settings).map(Built::kernel),
    }
}

/// userspace mode: the relays (their own threads) and the redirect rules, through iptables
/// or (where iptables is absent, or `KUBE_PROXY_USERSPACE_REDIRECT=nftables`) nftables.
fn userspace_dataplane(
    flags: &Flags,
    settings: &kube_proxy_config::ProxyConfig,
) -> anyhow::Result<Built> {
    use kube_proxy_userspace::redirect::{
        iptables::IptablesRedirects, nft::NftRedirects, Path, PATH_ENV,
    };
    if flags.dry_run == Some(true) {
        info!("--dry-run in userspace mode: printing the computed state instead of listening");
        return Ok(Built::kernel(Box::new(StatePrinter::new(
            PrintFormat::Text,
            Box::new(std::io::stdout()),
        ))));
    }
    // Checked before anything starts: the path, and the commands it needs.
    let requested =
        Path::parse(&std::env::var(PATH_ENV).unwrap_or_default()).map_err(anyhow::Error::msg)?;
    let (backend, backend_why) = crate::kernel::iptables_backend::select(
        crate::kernel::iptables_backend::from_env().map_err(anyhow::Error::msg)?,
    );
    // iptables "works" when its tool runs and reads the nat table (a kernel without the
    // backend's iptables support fails there, not at `--version`).
    let iptables = || {
        let version = crate::kernel::iptables_runner::check_iptables(backend)?;
        let save = backend.tool("iptables", "save");
        match std::process::Command::new(&save)
            .args(["-t", "nat"])
            .output()
        {
            Ok(out) if out.status.success() => Ok(version),
            Ok(out) => Err(format!(
                "{save} -t nat failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => Err(format!("cannot run {save}: {e}")),
        }
    };
    let (path, tool, why) = match requested {
        Some(Path::Iptables) => (Path::Iptables, iptables().map_err(anyhow::Error::msg)?, format!("{PATH_ENV}=iptables; backend {}: {backend_why}", backend.as_str())),
        Some(Path::Nftables) => (
            Path::Nftables,
            crate::kernel::nft_runner::check_nft().map_err(anyhow::Error::msg)?,
            format!("{PATH_ENV}=nftables"),
        ),
        None => match iptables() {
            Ok(version) => (Path::Iptables, version, format!("iptables works; backend {}: {backend_why}", backend.as_str())),
            Err(iptables_error) => match crate::kernel::nft_runner::check_nft() {
                Ok(version) => (Path::Nftables, version, format!("iptables is not usable ({iptables_error})")),
                Err(nft_error) => anyhow::bail!(
                    "userspace mode redirects Service traffic with iptables or nftables, and neither works: {iptables_error}; {nft_error}"
                ),
            },
        },
    };
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 8);
    let relay = kube_proxy_userspace::relay::Relay::new(kube_proxy_userspace::relay::RelayConfig {
        threads,
        listen_ip: settings.bind_address,
        udp_timeout: settings.userspace.udp_idle_timeout,
    })
    .map_err(|e| anyhow::anyhow!("cannot start the relay threads: {e}"))?;
    let stats = relay.stats();
    let range = match settings.userspace.port_range {
        Some((first, last)) => format!("{first}-{last}"),
        None => "any free port".into(),
    };
    info!(
        redirects = path.as_str(),
        tool = %tool,
        reason = %why,
        relay_threads = threads,
        listen = %settings.bind_address.map_or("every address".to_string(), |ip| ip.to_string()),
        ports = %range,
        udp_timeout = ?settings.userspace.udp_idle_timeout,
        "Using the userspace dataplane: the proxy relays every connection; frontends are redirected to its listeners"
    );
    warn!("The userspace proxy mode was removed upstream in Kubernetes 1.26; it serves every connection through this process (see docs/userspace.md)");
    let config = kube_proxy_userspace::proxier::UserspaceConfig {
        listen_ip: settings.bind_address,
        port_range: settings.userspace.port_range,
        verify_interval: settings.sync_period,
    };
    use kube_proxy_userspace::proxier::UserspaceProxier;
    let dataplane: Box<dyn Dataplane> = match path {
        Path::Iptables => Box::new(UserspaceProxier::new(
            config,
            relay,
            IptablesRedirects::new(crate::kernel::iptables_runner::IptablesCommand::new(
                backend,
            )),
        )),
        Path::Nftables => Box::new(UserspaceProxier::new(
            config,
            relay,
            NftRedirects::new(
                crate::kernel::nft_runner::NftCommand::text_only(),
                Box::new(list_userspace_table),
            ),
        )),
    };
    Ok(Built {
        dataplane,
        relay_stats: Some(stats),
        redirect_path: Some(path),
    })
}

/// `nft list table` of userspace mode's table; `None` when it does not exist.
fn list_userspace_table(family: IpFamily) -> Result<Option<String>, String> {
    use kube_proxy_userspace::redirect::nft::{family_name, TABLE};
    let out = std::process::Command::new("nft")
        .args(["list", "table", family_name(family), TABLE])
        .output()
        .map_err(|e| format!("cannot run nft: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.success() {
        true => Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned())),
        false if stderr.contains("No such file or directory") => Ok(None),
        false => Err(format!("nft list table: {}", stderr.trim())),
    }
}

/// The kernel modes' dataplanes (or, with --dry-run, their printers).
fn kernel_dataplane(
    flags: &Flags,
    settings: &kube_proxy_config::ProxyConfig,
) -> anyhow::Result<Box<dyn Dataplane>> {
    match settings.mode {
        ProxyMode::Nftables => {
            let config = nftables_config(settings);
            let clock: kube_proxy_nftables::Clock = Box::new(std::time::Instant::now);
            if flags.dry_run == Some(true) {
                info!("--dry-run: printing nft transactions instead of applying them");
                return Ok(Box::new(kube_proxy_nftables::NftProxier::new(
                    config,
                    crate::kernel::nft_runner::PrintTransactions,
                    clock,
                )));
            }
            let version = crate::kernel::nft_runner::check_nft().map_err(anyhow::Error::msg)?;
            info!(nft = %version, "Using the nftables dataplane");
            // KUBE_PROXY_NFT_NETLINK=off: every transaction through nft, the kernel never read
            // (a diagnostic knob, and what tests outside a namespace use).
            let runner = if std::env::var("KUBE_PROXY_NFT_NETLINK").as_deref() == Ok("off") {
                info!("KUBE_PROXY_NFT_NETLINK=off: every transaction goes through nft");
                crate::kernel::nft_runner::NftCommand::text_only()
            } else {
                crate::kernel::nft_runner::NftCommand::default()
            };
            Ok(Box::new(
                kube_proxy_nftables::NftProxier::new(config, runner, clock)
                    .with_verify_interval(settings.sync_period),
            ))
        }
        ProxyMode::Iptables => {
            let policy = iptables_policy(settings);
            if flags.dry_run == Some(true) {
                info!("--dry-run: printing iptables-restore inputs instead of applying them");
                return Ok(Box::new(
                    kube_proxy_iptables::proxier::IptablesProxier::new(
                        policy,
                        crate::kernel::iptables_runner::PrintRestores,
                    ),
                ));
            }
            let requested = crate::kernel::iptables_backend::from_env().unwrap_or(None);
            let (backend, why) = crate::kernel::iptables_backend::select(requested);
            let version = crate::kernel::iptables_runner::check_iptables(backend)
                .map_err(anyhow::Error::msg)?;
            info!(iptables = %version, backend = backend.as_str(), reason = why, "Using the iptables dataplane");
            if policy.localhost_node_ports {
                // As upstream: NodePorts on 127.0.0.1 need martian-source routing of loopback
                // (guarded by KUBE-FIREWALL).
                crate::kernel::node_setup::enable_route_localnet();
            }
            Ok(Box::new(
                kube_proxy_iptables::proxier::IptablesProxier::new(
                    policy,
                    crate::kernel::iptables_runner::IptablesCommand::new(backend),
                )
                .with_canary_interval(settings.sync_period)
                .with_staged_full_syncs(backend.full_sync_stage_chains())
                .with_nfacct_counters(crate::kernel::nfacct::ensure_counters()),
            ))
        }
        ProxyMode::Ipvs => {
            if flags.dry_run == Some(true) {
                info!("--dry-run in ipvs mode: printing the computed state instead of applying it");
                return Ok(Box::new(StatePrinter::new(
                    PrintFormat::Text,
                    Box::new(std::io::stdout()),
                )));
            }
            let requested = crate::kernel::iptables_backend::from_env().unwrap_or(None);
            let (backend, why) = crate::kernel::iptables_backend::select(requested);
            let version = crate::kernel::iptables_runner::check_iptables(backend)
                .map_err(anyhow::Error::msg)?;
            info!(iptables = %version, backend = backend.as_str(), reason = why, scheduler = %settings.ipvs.scheduler, "Using the ipvs dataplane");
            Ok(Box::new(kube_proxy_ipvs::proxier::IpvsProxier::new(
                ipvs_config(settings),
                crate::kernel::ipvs_runner::IpvsCommand,
                crate::kernel::iptables_runner::IptablesCommand::new(backend),
                Box::new(std::time::Instant::now),
            )))
        }
        ProxyMode::Userspace => {
            anyhow::bail!("userspace mode relays in the process: see userspace_dataplane")
        }
    }
}

/// The ipvs dataplane's settings from the configuration.
pub(crate) fn ipvs_config(
    settings: &kube_proxy_config::ProxyConfig,
) -> kube_proxy_ipvs::proxier::IpvsConfig {
    kube_proxy_ipvs::proxier::IpvsConfig {
        policy: kube_proxy_model::context::ProxyPolicy {
            localhost_node_ports: false,
            drop_invalid: false,
            ..iptables_policy(settings)
        },
        scheduling: kube_proxy_ipvs::desired::Scheduling::new(&settings.ipvs.scheduler),
        exclude_cidrs: settings.ipvs.exclude_cidrs.clone(),
        ..Default::default()
    }
}

/// The nftables dataplane's settings from the configuration.
pub(crate) fn nftables_config(
    settings: &kube_proxy_config::ProxyConfig,
) -> kube_proxy_nftables::NftConfig {
    kube_proxy_nftables::NftConfig {
        masquerade_bit: settings.masquerade_bit,
        masquerade_all: settings.masquerade_all,
        detect_local: settings.detect_local.clone(),
        node_port_addresses: settings.node_port_addresses.clone(),
        staged_build_above: staged_build_above(),
    }
}

/// The iptables dataplane's policy from the configuration and the node's conntrack setting.
pub(crate) fn iptables_policy(
    settings: &kube_proxy_config::ProxyConfig,
) -> kube_proxy_model::context::ProxyPolicy {
    kube_proxy_model::context::ProxyPolicy {
        masquerade_bit: settings.masquerade_bit,
        masquerade_all: settings.masquerade_all,
        detect_local: settings.detect_local.clone(),
        node_port_addresses: settings.node_port_addresses.clone(),
        localhost_node_ports: settings.localhost_node_ports,
        // As upstream: read once, after the sysctls were set at start.
        drop_invalid: crate::kernel::node_setup::read_value(
            "net/netfilter/nf_conntrack_tcp_be_liberal",
        )
        .unwrap_or(0)
            == 0,
    }
}

/// Runs a server in the background; a server that gives up (bindAddressHardFail) ends the
/// process with an error, as upstream.
fn spawn_server(server: impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static) {
    tokio::spawn(async move {
        if let Err(e) = server.await {
            error!("{e:#}");
            std::process::exit(1);
        }
    });
}

/// The `/configz` body: the configuration in effect, with defaults applied.
fn configz(effective: &EffectiveConfig) -> String {
    serde_json::json!({ "kubeproxy.config.k8s.io": &effective.document }).to_string()
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Elements above which a new nftables table is built in stages; the default unless
/// `KUBE_PROXY_NFT_STAGED_BUILD_ABOVE` (a diagnostic and test knob, not a flag) says otherwise.
fn staged_build_above() -> usize {
    let default = kube_proxy_nftables::NftConfig::default().staged_build_above;
    match std::env::var("KUBE_PROXY_NFT_STAGED_BUILD_ABOVE") {
        Err(_) => default,
        Ok(text) => text.parse().unwrap_or_else(|_| {
            warn!(value = %text, default, "KUBE_PROXY_NFT_STAGED_BUILD_ABOVE is not a number of elements; using the default");
            default
        }),
    }
}
