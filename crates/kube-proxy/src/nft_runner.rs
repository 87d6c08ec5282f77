//! Runs nft transactions: the only code that spawns `nft`.

use std::io::Write;
use std::process::{Command, Stdio};

use kube_proxy_nftables::{RunError, Runner};

/// `nft -f -`: one atomic transaction per call.
#[derive(Debug, Default)]
pub struct NftCommand;

impl Runner for NftCommand {
    fn apply(&mut self, script: &str) -> Result<(), RunError> {
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                RunError::Unavailable(format!(
                    "cannot run nft: {e} (is the nftables package installed?)"
                ))
            })?;
        let written = child
            .stdin
            .take()
            .map(|mut stdin| stdin.write_all(script.as_bytes()));
        let output = child
            .wait_with_output()
            .map_err(|e| RunError::Unavailable(format!("nft did not finish: {e}")))?;
        if let Some(Err(e)) = written {
            if output.status.success() {
                return Err(RunError::Unavailable(format!(
                    "cannot write the transaction to nft: {e}"
                )));
            }
        }
        if output.status.success() {
            Ok(())
        } else {
            Err(RunError::Rejected(
                String::from_utf8_lossy(&output.stderr).into_owned(),
            ))
        }
    }
}

/// Prints each transaction to stdout instead of applying it (`--dry-run`; needs no root).
#[derive(Debug, Default)]
pub struct PrintTransactions;

impl Runner for PrintTransactions {
    fn apply(&mut self, script: &str) -> Result<(), RunError> {
        let mut out = std::io::stdout().lock();
        out.write_all(script.as_bytes())
            .and_then(|_| out.write_all(b"\n"))
            .and_then(|_| out.flush())
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::BrokenPipe => RunError::OutputClosed,
                _ => RunError::Unavailable(format!("cannot write to standard output: {e}")),
            })
    }
}

/// Checks that `nft` is installed and recent enough (upstream requires 1.0.1).
pub fn check_nft() -> Result<String, String> {
    let output = Command::new("nft").arg("--version").output().map_err(|e| {
        format!("the nftables proxy mode needs the nft command: {e}; install the nftables package")
    })?;
    let text = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let version = text
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .trim_start_matches('v');
    let parts: Vec<u32> = version.split('.').filter_map(|p| p.parse().ok()).collect();
    if parts.len() >= 2 && (parts[0], parts[1], parts.get(2).copied().unwrap_or(0)) < (1, 0, 1) {
        return Err(format!(
            "nft {version} is too old; the nftables mode needs nft 1.0.1 or later"
        ));
    }
    Ok(text)
}
