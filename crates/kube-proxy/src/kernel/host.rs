//! Facts about the host read from the kernel: interface addresses.

use std::net::IpAddr;

use kube_proxy_model::IpFamily;

/// Every address configured on this host's interfaces in `family` but ipvs mode's
/// `kube-ipvs0` (loopback included; the
/// dataplane decides what to exclude). Errors yield an empty list, logged once by the caller
/// through the empty NodePort set.
pub fn local_addresses(family: IpFamily) -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out: Vec<IpAddr> = addrs
        // ipvs mode's service addresses are not the node's (upstream excludes the device).
        .filter(|ifa| ifa.interface_name != "kube-ipvs0")
        .filter_map(|ifa| ifa.address)
        .filter_map(|addr| {
            if let Some(v4) = addr.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .filter(|ip| IpFamily::of(ip) == family)
        .collect();
    out.sort();
    out.dedup();
    out
}
