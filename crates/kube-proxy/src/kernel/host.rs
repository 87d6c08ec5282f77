//! Facts about the host read from the kernel: interface addresses.

use std::net::IpAddr;

use kube_proxy_model::IpFamily;

/// Every address configured on this host's interfaces in `family` but ipvs mode's
/// `kube-ipvs0` (loopback included; the dataplane decides what to exclude). Errors yield an
/// empty list, logged once by the caller through the empty NodePort set.
pub fn local_addresses(family: IpFamily) -> Vec<IpAddr> {
    // ipvs mode's service addresses are not the node's (upstream excludes the device).
    let mut out = interface_addresses(family, |name| name != "kube-ipvs0").unwrap_or_default();
    out.sort();
    out.dedup();
    out
}

/// The addresses of `family` on the interfaces whose name `wanted` accepts, in this process's
/// network namespace.
pub fn interface_addresses(
    family: IpFamily,
    wanted: impl Fn(&str) -> bool,
) -> nix::Result<Vec<IpAddr>> {
    Ok(nix::ifaddrs::getifaddrs()?
        .filter(|ifa| wanted(&ifa.interface_name))
        .filter_map(|ifa| ifa.address)
        .filter_map(|addr| {
            if let Some(v4) = addr.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .filter(|ip| IpFamily::of(ip) == family)
        .collect())
}
