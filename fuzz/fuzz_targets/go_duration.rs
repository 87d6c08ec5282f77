//! Go durations (`1m30s`, `250ms`, `-1.5h`): parsed, and a parsed one prints back to itself.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(duration) = kube_proxy_config::GoDuration::parse(text) {
        let again = kube_proxy_config::GoDuration::parse(&duration.to_string())
            .expect("a printed duration parses");
        assert_eq!(again, duration, "{text:?} printed as {duration}");
    }
});
