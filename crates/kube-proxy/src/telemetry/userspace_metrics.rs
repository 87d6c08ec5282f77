//! userspace mode's relay counters, per service port, read at each scrape (the relays keep
//! them in atomics): connections opened, failed connects to endpoints, connections left
//! unserved, bytes each way, relays active now.

use std::sync::Arc;

use kube_proxy_userspace::relay::{PortStats, Stats};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

#[derive(Debug)]
pub struct UserspaceCollector(pub Arc<Stats>);

type Labels = Vec<(&'static str, String)>;

fn labels(port: &PortStats) -> Labels {
    vec![
        ("service_port", port.service_port.clone()),
        ("protocol", port.protocol.to_string()),
    ]
}

fn counters(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: &[(Labels, u64)],
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in values {
        ConstCounter::new(*value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for UserspaceCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let ports = self.0.snapshot();
        let each = |value: &dyn Fn(&PortStats) -> u64| -> Vec<(Labels, u64)> {
            ports.iter().map(|p| (labels(p), value(p))).collect()
        };
        counters(
            &mut encoder,
            "kubeproxy_userspace_connections_opened",
            "Connections accepted (TCP) and client flows started (UDP) by the relays",
            &each(&|p| p.opened),
        )?;
        counters(
            &mut encoder,
            "kubeproxy_userspace_connect_failures",
            "Failed or timed-out connects to an endpoint (each is retried on the next endpoint)",
            &each(&|p| p.connect_failures),
        )?;
        counters(
            &mut encoder,
            "kubeproxy_userspace_connections_unserved",
            "Connections closed because no endpoint could be reached",
            &each(&|p| p.unserved),
        )?;
        let mut bytes = Vec::new();
        for p in &ports {
            for (direction, value) in [
                ("to_endpoint", p.bytes_to_endpoint),
                ("to_client", p.bytes_to_client),
            ] {
                let mut l = labels(p);
                l.push(("direction", direction.to_string()));
                bytes.push((l, value));
            }
        }
        counters(
            &mut encoder,
            "kubeproxy_userspace_relayed_bytes",
            "Bytes relayed, per direction",
            &bytes,
        )?;
        let mut family = encoder.encode_descriptor(
            "kubeproxy_userspace_active_relays",
            "TCP connections and UDP client flows being relayed now",
            None,
            MetricType::Gauge,
        )?;
        for p in &ports {
            ConstGauge::new(p.active).encode(family.encode_family(&labels(p))?)?;
        }
        Ok(())
    }
}
