#!/usr/bin/env bash
# Boots the ipvs test VM (prepared by prepare.sh) under TCG and runs one shell script inside
# it, chrooted into the host's root (read-only, fresh /tmp and /run): `run.sh job.sh`. The
# job's output is printed; the exit status is the job's. KP_VM_CPUS (2), KP_VM_MEMORY (3072 MiB)
# and KP_VM_TIMEOUT (seconds, 900) size it.
set -euo pipefail
dir=${KP_VM_DIR:-/var/cache/kube-proxy-rs/vm}
job=$(realpath "$1")
[ -f "$dir/vmlinux" ] || { echo "run.sh: run scripts/vm/prepare.sh first" >&2; exit 2; }
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
timeout --foreground "${KP_VM_TIMEOUT:-900}" qemu-system-x86_64 \
  -accel tcg,thread=multi -machine q35 -cpu max -smp "${KP_VM_CPUS:-2}" -m "${KP_VM_MEMORY:-3072}" \
  -kernel "$dir/vmlinux" -initrd "$dir/initramfs.gz" \
  -append "console=ttyS0 quiet loglevel=3 panic=-1 kp_job=$job" \
  -virtfs local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap \
  -display none -serial stdio -monitor none -no-reboot -nodefaults \
  | tee "$log"
set -e
status=$(sed -n 's/.*KP_VM_EXIT=\([0-9]*\).*/\1/p' "$log" | tail -1)
[ -n "$status" ] || { echo "run.sh: the VM ended without reporting the job's status" >&2; exit 99; }
exit "$status"
