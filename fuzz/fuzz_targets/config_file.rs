//! The `KubeProxyConfiguration` file (`--config`): any text must give a configuration or an
//! error naming the field, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = kube_proxy_config::build(&kube_proxy_config::Flags::default(), Some(text));
});
