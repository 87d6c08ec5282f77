//! What the process tells operators: klog-style logs with `-v` levels, upstream's metrics,
//! and the process metrics.

pub mod logging;
pub mod metrics;
pub mod nfacct_metrics;
pub mod process_metrics;
pub mod userspace_metrics;
