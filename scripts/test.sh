#!/usr/bin/env bash
# Runs every test: formatting, lints, and the whole workspace test suite (the ipvs VM tier
# last, alone), then prints one closing line with the totals over every test binary.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
# The ipvs VM (a TCG guest that wants both cores) runs alone, after everything else.
cargo test --workspace --locked -- --skip ipvs_cases_in_a_vm 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
cargo test -p kube-proxy --locked --test packets ipvs_cases_in_a_vm 2>&1 | tee -a "$log"
vm_status=${PIPESTATUS[0]}
[ "$status" -ne 0 ] || status=$vm_status
set -e
passed=$(grep -Eo '^test result: [A-Za-z]+\. [0-9]+ passed' "$log" | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo '; [0-9]+ failed' "$log" | awk '{s+=$2} END {print s+0}')
echo "tests: ${passed} passed, ${failed} failed"
exit "$status"
