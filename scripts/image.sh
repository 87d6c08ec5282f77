#!/usr/bin/env bash
# Builds the container image (localhost/kube-proxy-rs:latest) from the Dockerfile with podman,
# without a registry: the Debian base is made with debootstrap (cached under $CACHE) and
# imported. Prints the image size and the build time. As root.
#   scripts/image.sh [BINARY]     (default: the release binary, built here first; CI passes
#                                  the debug binary its tests build anyway)
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${KP_IMAGE_CACHE:-/var/cache/kube-proxy-rs/image}
IMAGE=${KP_IMAGE:-localhost/kube-proxy-rs:latest}
BASE=localhost/debian:bookworm-slim
mkdir -p "$CACHE"

if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null; then
  echo "==> installing podman, runc, debootstrap"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends podman runc debootstrap >/dev/null
fi

# This machine's limits: runc (crun refuses hybrid cgroups), and ulimits root may set.
cat > "$CACHE/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=$(ulimit -Hn):$(ulimit -Hn)", "nproc=$(( $(ulimit -Hu) < 32768 ? $(ulimit -Hu) : 32768 )):$(( $(ulimit -Hu) < 32768 ? $(ulimit -Hu) : 32768 ))"]
[engine]
runtime = "runc"
CONF
export CONTAINERS_CONF="$CACHE/containers.conf"

binary=${1:-}
if [ -z "$binary" ]; then
  cargo build --release --locked -p kube-proxy
  binary=${CARGO_TARGET_DIR:-$PWD/target}/release/kube-proxy
fi

started=$(date +%s.%N)
if ! podman image exists "$BASE"; then
  if [ ! -f "$CACHE/bookworm-slim.tar" ]; then
    echo "==> debootstrap bookworm (minbase)"
    root=$(mktemp -d)
    mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
    debootstrap --variant=minbase bookworm "$root" "${mirror:-http://deb.debian.org/debian}" >/dev/null
    # As the official slim image: no apt caches, docs or man pages in layers.
    cat > "$root/etc/apt/apt.conf.d/docker-clean" <<'APT'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
APT
    rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/*
    tar -C "$root" -cf "$CACHE/bookworm-slim.tar" .
    rm -rf "$root"
  fi
  podman import "$CACHE/bookworm-slim.tar" "$BASE" >/dev/null
fi

# The build context: the Dockerfile and the binary only.
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
cp Dockerfile "$context/"
cp "$binary" "$context/kube-proxy"
echo "==> podman build $IMAGE"
podman build --network=host --build-arg BASE="$BASE" --build-arg BINARY=kube-proxy -t "$IMAGE" "$context" >/dev/null
elapsed=$(printf '%.1f' "$(echo "$(date +%s.%N) - $started" | bc)")
size=$(podman image inspect "$IMAGE" --format '{{.Size}}')
echo "==> built $IMAGE: $(( size / 1000000 )) MB, in $elapsed s (the base image included when it was not cached)"
echo "==> to run the image cases: export KP_IMAGE=$IMAGE CONTAINERS_CONF=$CONTAINERS_CONF"
