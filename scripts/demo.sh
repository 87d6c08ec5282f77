#!/usr/bin/env bash
# The main job on the embedded default: kube-proxy-rs in nftables mode on the example
# manifests (examples/manifests), inside throwaway network namespaces, with requests to a
# ClusterIP answered by pods; everything is removed afterwards. No cluster is needed.
# `./scripts/demo.sh iptables` runs it in iptables mode (upstream's default) instead, and
# `./scripts/demo.sh ipvs` in ipvs mode, which needs a kernel with IP_VS (this project's
# machines have none: run it in the test VM, see docs/ipvs.md; KP_DEMO_BIN=path skips the build),
# and `./scripts/demo.sh userspace` in userspace mode (the proxy relays every connection;
# KUBE_PROXY_USERSPACE_REDIRECT=nftables for its nftables redirect path, as on a node without
# iptables).
#
# As root it installs what it needs (nftables, iproute2) when missing. Without root it
# cannot create namespaces, so it prints the nftables ruleset the proxy would program
# instead (kube-proxy --dry-run --once), which needs no privilege.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-nftables}
case "$MODE" in
  nftables | iptables | ipvs | userspace) ;;
  *) echo "usage: $0 [nftables|iptables|ipvs|userspace]" >&2; exit 2 ;;
esac

if [ "$(id -u)" = 0 ] && { ! command -v nft >/dev/null || ! command -v ip >/dev/null || ! command -v iptables-restore >/dev/null; }; then
  echo "==> installing nftables, iptables and iproute2"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends nftables iptables iproute2 >/dev/null
fi

if [ -n "${KP_DEMO_BIN:-}" ]; then
  BIN=$KP_DEMO_BIN
else
  echo "==> building kube-proxy (release)"
  cargo build --release --locked -p kube-proxy
  BIN=${CARGO_TARGET_DIR:-$PWD/target}/release/kube-proxy
fi
PROXY_ARGS=(--proxy-mode=$MODE --manifests=examples/manifests --hostname-override=node-a
            --cluster-cidr=198.18.0.0/16,2001:db8:18::/48)

if [ "$(id -u)" != 0 ] || ! command -v python3 >/dev/null; then
  echo "==> not root (or no python3 for the demo pods): printing the ruleset the proxy would program"
  exec "$BIN" "${PROXY_ARGS[@]}" --dry-run --once
fi

NODE=kpdemo-node PODA=kpdemo-web-a PODB=kpdemo-web-b CLIENT=kpdemo-client
PROXY_PID= POD_PIDS=()
cleanup() {
  [ -n "$PROXY_PID" ] && kill "$PROXY_PID" 2>/dev/null && wait "$PROXY_PID" 2>/dev/null || true
  for pid in "${POD_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for ns in $PODA $PODB $CLIENT $NODE; do ip netns del "$ns" 2>/dev/null || true; done
  echo "==> cleaned up (namespaces deleted)"
}
trap cleanup EXIT
cleanup >/dev/null

echo "==> creating namespaces: node-a ($NODE) with two pods of demo/web on a bridge"
ip netns add $NODE
ip -n $NODE link set lo up
ip -n $NODE link add br0 type bridge
ip -n $NODE link set br0 up
ip -n $NODE addr add 198.18.1.1/24 dev br0
ip -n $NODE addr add 198.18.2.1/24 dev br0
ip -n $NODE route add default dev br0      # like a node: packets the proxy does not DNAT are routed on
ip netns exec $NODE sysctl -q -w net.ipv4.ip_forward=1
for spec in "$PODA 198.18.1.5 198.18.1.1" "$PODB 198.18.2.7 198.18.2.1"; do
  set -- $spec
  ip netns add "$1"
  ip -n "$1" link set lo up
  ip -n "$1" link add eth0 type veth peer name "v${2##*.}" netns $NODE
  ip -n $NODE link set "v${2##*.}" master br0
  ip -n $NODE link set "v${2##*.}" up
  ip -n "$1" link set eth0 up
  ip -n "$1" addr add "$2/24" dev eth0
  ip -n "$1" route add default via "$3"
  # A pod: answers every TCP connection on 8080 with its name and the client address it saw.
  ip netns exec "$1" python3 -c '
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080)); s.listen(16)
while True:
    c, a = s.accept(); c.sendall(("answered by pod %s, which saw the client as %s\n" % (sys.argv[1], a[0])).encode()); c.close()
' "${1#kpdemo-}" >/dev/null 2>&1 &
  POD_PIDS+=($!)
done

# A client pod (no server) in a third pod subnet, so answers come back through the node.
ip -n $NODE addr add 198.18.3.1/24 dev br0
ip netns add $CLIENT
ip -n $CLIENT link set lo up
ip -n $CLIENT link add eth0 type veth peer name v9 netns $NODE
ip -n $NODE link set v9 master br0
ip -n $NODE link set v9 up
ip -n $CLIENT link set eth0 up
ip -n $CLIENT addr add 198.18.3.9/24 dev eth0
ip -n $CLIENT route add default via 198.18.3.1

echo "==> starting kube-proxy-rs in $NODE: ${PROXY_ARGS[*]}"
ip netns exec $NODE "$BIN" "${PROXY_ARGS[@]}" --healthz-bind-address= --metrics-bind-address= >/dev/null 2>/tmp/kpdemo-proxy.log &
PROXY_PID=$!
programmed() {
  if [ "$MODE" = ipvs ]; then
    ip netns exec $NODE ipvsadm --save -n 2>/dev/null | grep -q -- "-a -t 198.19.0.10:80 -r 198.18.2.7"
  elif [ "$MODE" = iptables ]; then
    ip netns exec $NODE iptables-save -t nat 2>/dev/null | grep -q "DNAT --to-destination 198.18.2.7"
  elif [ "$MODE" = userspace ] && [ "${KUBE_PROXY_USERSPACE_REDIRECT:-}" = nftables ]; then
    ip netns exec $NODE nft list table ip kube-proxy-userspace 2>/dev/null | grep -q "ip daddr 198.19.0.10 tcp dport 80 redirect"
  elif [ "$MODE" = userspace ]; then
    ip netns exec $NODE iptables-save -t nat 2>/dev/null | grep -q -- "-d 198.19.0.10/32 .*-j REDIRECT"
  else
    ip netns exec $NODE nft list set ip kube-proxy cluster-ips 2>/dev/null | grep -q 198.19.0.10
  fi
}
for _ in $(seq 1 300); do
  programmed && break
  sleep 0.1
done
if ! programmed; then
  echo "==> the proxy did not program demo/web within 30 s; its log:" >&2
  tail -20 /tmp/kpdemo-proxy.log >&2
  exit 1
fi

echo "==> the ruleset it programmed (excerpt):"
if [ "$MODE" = ipvs ]; then
  ip netns exec $NODE ipvsadm -Ln -t 198.19.0.10:80 | sed 's/^/    /'
elif [ "$MODE" = iptables ]; then
  ip netns exec $NODE iptables-save -t nat | grep -E "demo/web" | head -8 | sed 's/^/    /'
elif [ "$MODE" = userspace ]; then
  if [ "${KUBE_PROXY_USERSPACE_REDIRECT:-}" = nftables ]; then
    ip netns exec $NODE nft list table ip kube-proxy-userspace | grep -E "chain|demo/web" | head -8 | sed 's/^/    /'
  else
    ip netns exec $NODE iptables-save -t nat | grep -E "KUBE-PORTALS|KUBE-NODEPORT" | grep -E "demo/web|-j KUBE" | head -8 | sed 's/^/    /'
  fi
  echo "    listening (the proxy's own sockets):"
  ip netns exec $NODE ss -Htlnp | grep kube-proxy | sed 's/^/      /' | head -6
else
  ip netns exec $NODE nft list table ip kube-proxy | grep -E "198.19.0.10|dnat-2|slot-[01] " | head -8 | sed 's/^/    /'
fi
echo "==> requests from the node to the ClusterIP of demo/web (198.19.0.10:80):"
for _ in 1 2 3 4 5 6; do
  ip netns exec $NODE python3 -c '
import socket
s = socket.create_connection(("198.19.0.10", 80), timeout=2); print("    " + s.recv(200).decode().strip())'
done
echo "==> requests from a client pod (198.18.3.9) to the same ClusterIP:"
for _ in 1 2 3 4; do
  ip netns exec $CLIENT python3 -c '
import socket
s = socket.create_connection(("198.19.0.10", 80), timeout=2); print("    " + s.recv(200).decode().strip())'
done
if [ "$MODE" = nftables ] || [ "$MODE" = ipvs ]; then
  echo "==> a request to a port demo/web does not have (198.19.0.10:81):"
  ip netns exec $NODE python3 -c '
import socket
try:
    socket.create_connection(("198.19.0.10", 81), timeout=2); print("    connected?!")
except ConnectionRefusedError:
    print("    refused, as upstream'"'"'s nftables and ipvs modes reject unknown ports of a ClusterIP")'
fi
echo "==> proxy log: /tmp/kpdemo-proxy.log"
