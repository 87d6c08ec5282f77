//! HTTP servers: `/healthz` and `/livez`, `/metrics`, and the per-Service health-check node
//! ports, on one small HTTP layer.

pub mod health;
pub mod http;
pub mod metrics_server;
pub mod service_health;
