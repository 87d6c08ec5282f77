//! Runs `iptables-restore`/`iptables-save` (`ip6tables-…` for IPv6): the only code that
//! spawns them for the iptables dataplane.

use std::io::Write;
use std::process::{Command, Stdio};

use kube_proxy_iptables::proxier::{RestoreError, Restorer};
use kube_proxy_model::IpFamily;

use super::iptables_backend::Backend;

/// How long to wait for the xtables lock (upstream waits 5 s).
const LOCK_WAIT_SECONDS: &str = "5";

/// `iptables-restore --noflush --wait` and `iptables-save` of one backend (nft or legacy).
#[derive(Debug, Default)]
pub struct IptablesCommand {
    pub backend: Backend,
}

impl IptablesCommand {
    pub fn new(backend: Backend) -> Self {
        IptablesCommand { backend }
    }

    /// `iptables-nft-restore`, `ip6tables-legacy-save`, `iptables-nft` (`what` empty)...
    fn tool(&self, family: IpFamily, what: &str) -> String {
        let base = match family {
            IpFamily::V4 => "iptables",
            IpFamily::V6 => "ip6tables",
        };
        self.backend.tool(base, what)
    }

    fn run_restore(&mut self, family: IpFamily, input: &str) -> Result<(), RestoreError> {
        let program = self.tool(family, "restore");
        let mut child = Command::new(&program)
            .args(["--noflush", "--wait", LOCK_WAIT_SECONDS])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| unavailable(&program, e))?;
        let written = child
            .stdin
            .take()
            .map(|mut stdin| stdin.write_all(input.as_bytes()));
        let output = child
            .wait_with_output()
            .map_err(|e| unavailable(&program, e))?;
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        match output.status.code() {
            Some(0) => match written {
                Some(Err(e)) => Err(unavailable(&program, e)),
                _ => Ok(()),
            },
            // RESOURCE_PROBLEM: another program held the xtables lock.
            Some(4) => Err(RestoreError::Busy(format!("{program}: {stderr}"))),
            _ => Err(RestoreError::Rejected(format!("{program}: {stderr}"))),
        }
    }
}

fn unavailable(program: &str, error: std::io::Error) -> RestoreError {
    RestoreError::Unavailable(format!(
        "cannot run {program}: {error} (is the iptables package installed?)"
    ))
}

impl Restorer for IptablesCommand {
    fn restore(&mut self, family: IpFamily, input: &str) -> Result<(), RestoreError> {
        let started = std::time::Instant::now();
        let result = self.run_restore(family, input);
        // A large input (a full sync of a large cluster, in stages on the nf_tables
        // backend) takes seconds: report each, so a long sync shows its progress.
        let lines = input.bytes().filter(|b| *b == b'\n').count();
        if lines >= LARGE_INPUT_LINES {
            tracing::info!(
                family = %family,
                lines,
                elapsed = ?started.elapsed(),
                ok = result.is_ok(),
                "Ran iptables-restore"
            );
        }
        result
    }

    fn save(&mut self, family: IpFamily) -> Result<String, RestoreError> {
        let program = self.tool(family, "save");
        let mut text = String::new();
        for table in ["filter", "nat"] {
            let output = Command::new(&program)
                .args(["-t", table])
                .output()
                .map_err(|e| unavailable(&program, e))?;
            if !output.status.success() {
                return Err(RestoreError::Rejected(format!(
                    "{program} -t {table}: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                )));
            }
            text.push_str(&String::from_utf8_lossy(&output.stdout));
        }
        Ok(text)
    }

    fn chain_rules(
        &mut self,
        family: IpFamily,
        table: &str,
        chain: &str,
    ) -> Result<Option<usize>, RestoreError> {
        let program = self.tool(family, "");
        let output = Command::new(&program)
            .args(["--wait", LOCK_WAIT_SECONDS, "-t", table, "-S", chain])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| unavailable(&program, e))?;
        match output.status.code() {
            Some(0) => Ok(Some(
                String::from_utf8_lossy(&output.stdout)
                    .lines()
                    .filter(|l| l.starts_with("-A "))
                    .count(),
            )),
            // "No chain/target/match by that name" (or the table itself is gone).
            Some(1) => Ok(None),
            Some(4) => Err(RestoreError::Busy(format!(
                "{program}: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ))),
            _ => Err(RestoreError::Rejected(format!(
                "{program} -t {table} -S {chain}: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ))),
        }
    }
}

/// Inputs of at least this many lines are logged with their duration.
const LARGE_INPUT_LINES: usize = 10_000;

/// Prints each restore input to stdout instead of applying it (`--dry-run`; needs no root).
/// It cannot read the kernel: every full sync writes everything.
#[derive(Debug, Default)]
pub struct PrintRestores;

impl Restorer for PrintRestores {
    fn restore(&mut self, _family: IpFamily, input: &str) -> Result<(), RestoreError> {
        let mut out = std::io::stdout().lock();
        out.write_all(input.as_bytes())
            .and_then(|_| out.flush())
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::BrokenPipe => RestoreError::OutputClosed,
                _ => RestoreError::Unavailable(format!("cannot write to standard output: {e}")),
            })
    }

    fn save(&mut self, _family: IpFamily) -> Result<String, RestoreError> {
        Ok(String::new())
    }

    fn reads_kernel(&self) -> bool {
        false
    }

    fn chain_rules(
        &mut self,
        _: IpFamily,
        _: &str,
        _: &str,
    ) -> Result<Option<usize>, RestoreError> {
        Ok(None)
    }
}

/// Checks that the backend's `iptables-restore` can be run; its version line.
pub fn check_iptables(backend: Backend) -> Result<String, String> {
    let program = backend.tool("iptables", "restore");
    let output = Command::new(&program)
        .arg("--version")
        .output()
        .map_err(|e| {
            format!("the iptables proxy mode needs {program}: {e}; install the iptables package")
        })?;
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}
