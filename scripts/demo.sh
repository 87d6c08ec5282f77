#!/usr/bin/env bash
# The main job on the embedded default: runs the proxy on the example manifests (no cluster
# needed) and prints the computed service state, following changes to the files.
# Extra arguments are passed to kube-proxy (e.g. --print-state=json, -v=2).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p kube-proxy
args=("$@")
case " ${args[*]-} " in *" --print-state"*) ;; *) args+=(--print-state=text) ;; esac
exec ./target/release/kube-proxy --manifests examples/manifests --hostname-override node-a "${args[@]}"
