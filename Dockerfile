# kube-proxy-rs image: the binary where kubeadm's DaemonSet calls it, and the kernel tools of
# every mode (nftables; iptables with its nf_tables and legacy backends, chosen at start as
# upstream's image does; conntrack; ipset and ipvsadm for ipvs mode). Built by
# scripts/image.sh from a binary built outside (no registry or crates mirror is needed in the
# build): `podman build --build-arg BINARY=... .`.
ARG BASE=docker.io/library/debian:bookworm-slim
FROM ${BASE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables iptables conntrack iproute2 ipset ipvsadm kmod \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /usr/share/doc/* /usr/share/man/*
ARG BINARY=target/release/kube-proxy
COPY ${BINARY} /usr/local/bin/kube-proxy
# As upstream's image: no entrypoint; the DaemonSet gives the command.
CMD ["/usr/local/bin/kube-proxy", "--help"]
