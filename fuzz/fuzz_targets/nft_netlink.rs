//! nf_tables netlink answers as the nftables dataplane reads the kernel's table back
//! (responses, listed elements, element keys of every set type): any bytes.
#![no_main]
use kube_proxy_model::IpFamily;
use kube_proxy_nftables::elements::SetName;
use kube_proxy_nftables::netlink::{answers, decode_key, responses};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = responses(data);
    let _ = answers(data, 1);
    for set in [
        SetName::ClusterIps,
        SetName::Dnat(2),
        SetName::NodePortDnat(1),
        SetName::Backends(0),
        SetName::NodePortBackends(0),
        SetName::FirewallAllow,
        SetName::HairpinConnections,
        SetName::ServiceIps,
        SetName::ServiceNodePorts,
    ] {
        for family in IpFamily::ALL {
            let _ = decode_key(set, family, data);
        }
    }
});
