//! The interface between the control plane and a dataplane (nftables, iptables, the state
//! printer). Defined here, with the plan it consumes, so backends depend only on this crate.
//!
//! A dataplane is handed, per IP family, the complete desired state and the service ports
//! whose plan changed since its last *successful* sync, so it can apply only the difference.
//! `full` asks it to rewrite everything (first sync, after a failure, hourly). It must apply
//! atomically and report failure without having half-applied anything.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::names::{IpFamily, ServicePortName};
use crate::plan::FamilyPlan;

/// Node facts a dataplane needs besides the plan (one family's view).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeView {
    /// This node's IPs of the family, primary first (`bindAddress` override, else the Node's).
    pub node_ips: Vec<IpAddr>,
    /// The Node's `spec.podCIDRs` of the family (for `detectLocalMode: NodeCIDR`).
    pub pod_cidrs: Vec<IpNet>,
    /// Every address on this host's interfaces of the family (for `nodePortAddresses` CIDRs).
    pub local_addresses: Vec<IpAddr>,
}

/// One sync request for one family.
#[derive(Clone, Copy, Debug)]
pub struct SyncInput<'a> {
    pub family: IpFamily,
    pub plan: &'a FamilyPlan,
    pub changed: &'a BTreeSet<ServicePortName>,
    pub full: bool,
    pub node: &'a NodeView,
    /// The cluster's ServiceCIDRs of the family (empty until known): traffic to an address in
    /// them that no Service holds is dropped (upstream's nftables mode).
    pub service_cidrs: &'a [IpNet],
}

/// What one successful sync did, for logs and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub service_ports: usize,
    pub changed: usize,
    pub full: bool,
    /// Size of what was sent to the kernel (e.g. nft transaction lines), 0 if nothing.
    pub statements: usize,
    /// Kernel transactions it took (more than one only for a table built in stages).
    pub transactions: usize,
    /// Rules per kernel table, where the dataplane counts them (iptables).
    pub rules: Vec<TableRules>,
}

/// The rules of one table: written by this sync, and ours in the kernel after it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableRules {
    pub table: &'static str,
    pub written: usize,
    pub total: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("{family} sync failed: {message}")]
pub struct SyncError {
    pub family: IpFamily,
    pub message: String,
    pub kind: SyncErrorKind,
    /// The failed sync was a partial one (it wrote only changed service ports).
    pub partial: bool,
}

/// What the caller should do about a failed sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncErrorKind {
    /// Nothing was applied; retry later with a full sync (a rejected transaction, a held lock,
    /// a missing tool that may be installed meanwhile).
    Retry,
    /// The output the dataplane writes to (`--dry-run`, `--print-state`) was closed by its
    /// reader: stop, as a command-line tool does on a closed pipe.
    OutputClosed,
}

impl SyncError {
    pub fn retry(family: IpFamily, message: impl Into<String>) -> Self {
        SyncError {
            family,
            message: message.into(),
            kind: SyncErrorKind::Retry,
            partial: false,
        }
    }

    /// The error for a failed write to the dataplane's output: `OutputClosed` when the reader
    /// went away (broken pipe), else retryable.
    pub fn from_output(family: IpFamily, error: &std::io::Error) -> Self {
        SyncError {
            family,
            message: format!("cannot write to standard output: {error}"),
            kind: if error.kind() == std::io::ErrorKind::BrokenPipe {
                SyncErrorKind::OutputClosed
            } else {
                SyncErrorKind::Retry
            },
            partial: false,
        }
    }
}

pub trait Dataplane: Send {
    /// The dataplane's name for logs (`nftables`, `state printer`, ...).
    fn name(&self) -> &'static str;

    fn sync(&mut self, input: SyncInput<'_>) -> Result<SyncReport, SyncError>;

    /// Non-fatal problems found by the last sync (e.g. two Services claiming one frontend),
    /// for the caller to log.
    fn take_warnings(&mut self) -> Vec<String> {
        Vec::new()
    }
}
