//! What the benchmarks share: one child process per scale, so each measures its own peak RSS
//! in its own network namespace.

#![allow(dead_code)]

pub mod cluster;
pub mod proxy;

use std::process::Command;

/// Runs `run_scale(n, m)` for each `NxM` of `KP_BENCH_SCALES` (default `10000x2,50000x5`)
/// and each mode of `KP_BENCH_MODES` (the benchmark reads `KP_BENCH_MODE`; default
/// `default_modes`), each in a child process of this benchmark; as root only.
pub fn run_scales(name: &str, default_modes: &str, run_scale: fn(usize, usize)) {
    if let Ok(scale) = std::env::var("KP_BENCH_CHILD") {
        let (n, m) = scale.split_once('x').expect("NxM");
        run_scale(n.parse().unwrap(), m.parse().unwrap());
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        println!("{name}: needs root (it creates its own network namespaces); skipped");
        return;
    }
    let scales = std::env::var("KP_BENCH_SCALES").unwrap_or_else(|_| "10000x2,50000x5".into());
    let modes = std::env::var("KP_BENCH_MODES").unwrap_or_else(|_| default_modes.into());
    let exe = std::env::current_exe().unwrap();
    for mode in modes.split(',') {
        for scale in scales.split(',') {
            let status = Command::new(&exe)
                .env("KP_BENCH_CHILD", scale)
                .env("KP_BENCH_MODE", mode)
                .status()
                .unwrap();
            if !status.success() {
                eprintln!("{mode} at scale {scale} failed: {status}");
                std::process::exit(1);
            }
        }
    }
}
