//! kube-proxy's configuration: the `KubeProxyConfiguration` v1alpha1 file, upstream's flags,
//! their defaults and precedence, and validation into typed settings.
//!
//! Pure: no file, socket, clock or global is touched here. The binary reads the file and
//! passes its text in, so every rule in this crate is unit-tested without root or disk.

pub mod duration;
pub mod effective;
pub mod flags;
pub mod v1alpha1;
mod yaml;

pub use duration::GoDuration;
pub use effective::{
    build, ConfigError, ConntrackSettings, DetectLocal, EffectiveConfig, FieldError, IpvsSettings,
    NodePortAddresses, ProxyConfig, ProxyMode,
};
pub use flags::Flags;
