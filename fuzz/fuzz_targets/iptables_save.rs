//! `iptables-save` output as the iptables dataplane reads it (its chains, a table's lines,
//! whether a jump exists): any text, including another program's odd rules.
#![no_main]
use kube_proxy_iptables::proxier::{saved_chains, saved_jump, table_lines};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    for table in ["nat", "filter", "mangle"] {
        let chains = saved_chains(text, table);
        let _ = table_lines(text, table).count();
        for chain in chains.iter().take(4) {
            let _ = saved_jump(text, table, "PREROUTING", chain);
        }
    }
});
