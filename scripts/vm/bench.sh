#!/usr/bin/env bash
# The cold-start benchmark in ipvs mode, inside the test VM (the host's kernel has no IP_VS):
# builds the bench binary (release), boots the VM and runs it there with KP_BENCH_MODES=ipvs.
# Scales from KP_BENCH_SCALES (default 10000x2). TCG emulates the CPU, so compare the ratios
# it prints (the proxy's sync against `ipvsadm --restore` of the same servers alone), not
# seconds with other modes measured on the host.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/kube-proxy-rs/target}"
./scripts/vm/prepare.sh >/dev/null
bench=$(cargo bench --no-run --bench cold_start --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "cold_start" and m.get("executable"):
        print(m["executable"])')
[ -n "$bench" ] || { echo "bench.sh: cannot build the cold_start bench" >&2; exit 1; }
job=$(mktemp /tmp/kp-vm-bench-XXXX.sh)
trap 'rm -f "$job"' EXIT
cat > "$job" <<JOB
export KP_BENCH_MODES=ipvs KP_BENCH_SCALES=${KP_BENCH_SCALES:-10000x2} KP_BENCH_VERBOSE=${KP_BENCH_VERBOSE:-} PATH=/usr/sbin:/usr/bin:/sbin:/bin
exec $bench --bench
JOB
KP_VM_TIMEOUT=${KP_VM_TIMEOUT:-3600} KP_VM_MEMORY=${KP_VM_MEMORY:-4096} exec ./scripts/vm/run.sh "$job"
