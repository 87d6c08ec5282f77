//! The command line: arguments (one per input line) parsed as upstream's flags, then merged
//! into a configuration with the defaults.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let args = std::iter::once("kube-proxy").chain(text.lines());
    if let Ok(flags) = kube_proxy_config::Flags::parse_from_args(args) {
        let _ = kube_proxy_config::build(&flags, None);
    }
});
