//! Runs test cases inside the ipvs test VM (scripts/vm: Debian's kernel with IP_VS, booted
//! under TCG, the host's root shared read-only): this very test binary is started in the VM
//! with `--ignored <filter>`, so the cases that need IP_VS are ordinary `#[ignore]`d tests
//! here and run for real only there. The VM's console output is the test's output.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The folder scripts/vm/prepare.sh filled.
fn vm_dir() -> PathBuf {
    std::env::var_os("KP_VM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/kube-proxy-rs/vm"))
}

/// Whether this process runs inside the VM.
pub fn inside() -> bool {
    std::env::var_os("KP_IN_VM").is_some()
}

/// Runs the ignored tests matching `filter` of this binary in the VM, `threads` at a time,
/// and fails unless they all pass. Without a prepared VM the run is skipped, unless
/// `KP_REQUIRE_VM` says it must run (CI).
pub fn run_ignored(filter: &str, threads: usize) {
    if inside() {
        return;
    }
    let dir = vm_dir();
    if !dir.join("vmlinux").exists() {
        assert!(
            std::env::var_os("KP_REQUIRE_VM").is_none(),
            "KP_REQUIRE_VM is set but {} has no VM: run scripts/vm/prepare.sh",
            dir.display()
        );
        eprintln!(
            "skipped: no VM prepared in {} (scripts/vm/prepare.sh)",
            dir.display()
        );
        return;
    }
    let exe = std::env::current_exe().expect("test binary path");
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/vm");
    let job = std::env::temp_dir().join(format!("kp-vm-job-{}.sh", std::process::id()));
    // Only what the cases read from the environment goes in.
    let mut env = String::new();
    for key in ["KP_EXPLAIN_PACKETS", "RUST_BACKTRACE"] {
        if let Ok(value) = std::env::var(key) {
            env.push_str(&format!("export {key}='{value}'\n"));
        }
    }
    std::fs::write(
        &job,
        format!(
            "export KP_IN_VM=1 KP_REQUIRE_NETNS=1 PATH=/usr/sbin:/usr/bin:/sbin:/bin\n{env}\
             exec '{}' --ignored --color never --test-threads={threads} '{filter}'\n",
            exe.display()
        ),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let output = Command::new("bash")
        .arg(scripts.join("run.sh"))
        .arg(&job)
        .env("KP_VM_DIR", &dir)
        .output()
        .expect("run scripts/vm/run.sh");
    let _ = std::fs::remove_file(&job);
    let console = String::from_utf8_lossy(&output.stdout);
    eprintln!(
        "--- VM console ({:.0?}) ---\n{console}\n{}",
        started.elapsed(),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "the cases {filter:?} failed in the VM (status {:?})",
        output.status.code()
    );
    assert!(
        console.contains("test result: ok.") && !console.contains(" 0 passed"),
        "no case ran in the VM"
    );
}
