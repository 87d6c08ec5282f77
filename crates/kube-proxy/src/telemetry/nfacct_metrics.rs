//! iptables mode's nfacct-based counters (upstream's custom collector): read from the kernel
//! at each scrape; absent when the counters cannot be read.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;

use crate::kernel::nfacct::{Nfacct, INVALID_DROPPED, LOCALHOST_NODEPORTS_ACCEPTED};

#[derive(Debug, Default)]
pub struct NfacctCollector;

/// (metric name without `_total`, help, nfacct counter).
const COUNTERS: [(&str, &str, &str); 2] = [
    (
        "kubeproxy_iptables_ct_state_invalid_dropped_packets",
        "packets dropped by iptables to work around conntrack problems",
        INVALID_DROPPED,
    ),
    (
        "kubeproxy_iptables_localhost_nodeports_accepted_packets",
        "Number of packets accepted on nodeports of loopback interface",
        LOCALHOST_NODEPORTS_ACCEPTED,
    ),
];

impl Collector for NfacctCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let Ok(mut nfacct) = Nfacct::open() else {
            return Ok(());
        };
        for (name, help, counter) in COUNTERS {
            let Ok(packets) = nfacct.packets(counter) else {
                continue;
            };
            let metric = ConstCounter::new(packets);
            let metric_encoder =
                encoder.encode_descriptor(name, help, None, metric.metric_type())?;
            metric.encode(metric_encoder)?;
        }
        Ok(())
    }
}
