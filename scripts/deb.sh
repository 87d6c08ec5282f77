#!/usr/bin/env bash
# Builds the Debian package (kube-proxy-rs_<version>_amd64.deb) with cargo-deb: the binary at
# /usr/bin/kube-proxy, deploy/systemd/kube-proxy.service, a default
# /var/lib/kube-proxy/config.conf; depends on nftables, iptables, conntrack, iproute2 and
# recommends ipset and ipvsadm (ipvs mode).
#   scripts/deb.sh [OUTPUT] [PROFILE]   (default: target/debian/, release; CI packages the
#                                        dev build its tests use, to compile once)
set -euo pipefail
cd "$(dirname "$0")/.."
OUTPUT=${1:-${CARGO_TARGET_DIR:-$PWD/target}/debian/}
PROFILE=${2:-release}
TOOLS=${KP_TOOLS:-/var/cache/kube-proxy-rs/tools}
CARGO_DEB_VERSION=2.7.0
if [ ! -x "$TOOLS/bin/cargo-deb" ]; then
  echo "==> installing cargo-deb $CARGO_DEB_VERSION into $TOOLS"
  cargo install --quiet --locked cargo-deb --version "$CARGO_DEB_VERSION" --root "$TOOLS"
fi
if [ "$PROFILE" = release ]; then
  cargo build --release --locked -p kube-proxy
else
  cargo build --locked -p kube-proxy
fi
"$TOOLS/bin/cargo-deb" -p kube-proxy --no-build --profile "$PROFILE" -o "$OUTPUT" 2>&1 \
  | grep -v "dev profile is not supported\|To enable debug symbols" || true
