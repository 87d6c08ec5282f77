#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) with cargo-fuzz/libFuzzer for a bounded time
# (KP_FUZZ_SECONDS, default 60 each), starting from the seed corpora in fuzz/seeds, and prints
# the executions per target. A crash fails the run; libFuzzer's reproducer is left under
# fuzz/artifacts/<target>/ (turn it into a regression test, then fix). Installs the nightly
# toolchain and cargo-fuzz (under the shared cache) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET=${KP_FUZZ_SECONDS:-60}
TOOLS=${KP_TOOLS:-/var/cache/kube-proxy-rs/tools}
CARGO_FUZZ_VERSION=0.13.2
export PATH="$TOOLS/bin:$PATH"

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "==> installing the nightly toolchain (cargo-fuzz needs it for the sanitizer flags)"
  rustup toolchain install nightly --profile minimal
fi
if ! cargo-fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
  echo "==> installing cargo-fuzz $CARGO_FUZZ_VERSION into $TOOLS"
  cargo +nightly install --quiet --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION" --root "$TOOLS"
fi

# Its own target folder: the sanitizer flags would otherwise rebuild the main build's crates.
export CARGO_TARGET_DIR="${KP_FUZZ_TARGET_DIR:-/var/cache/kube-proxy-rs/fuzz-target}"
cd fuzz
cargo +nightly fuzz build --release
# One target: its seeds copied to a fresh corpus, libFuzzer for the bounded time; prints
# one summary line, or the end of the log and fails.
fuzz_one() {
  local target=$1 corpus log runs units
  corpus=$(mktemp -d)
  cp -r "seeds/$target/." "$corpus/"
  log=$(mktemp)
  if ! cargo +nightly fuzz run --release "$target" "$corpus" -- \
      -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    tail -40 "$log"
    echo "fuzz target $target FAILED (reproducer under fuzz/artifacts/$target/)"
    return 1
  fi
  runs=$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$' || echo "?")
  units=$(find "$corpus" -type f | wc -l)
  echo "  $target: $runs executions, corpus $units inputs, no crash"
  rm -rf "$corpus" "$log"
}
export -f fuzz_one
export SECONDS_PER_TARGET
echo "==> fuzzing each target for ${SECONDS_PER_TARGET}s, ${KP_FUZZ_JOBS:-2} at a time"
cargo +nightly fuzz list | xargs -P "${KP_FUZZ_JOBS:-2}" -I{} bash -c 'fuzz_one {}'
