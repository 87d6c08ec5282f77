//! Element-only transactions sent as nf_tables netlink batches leave the kernel exactly as the
//! same transactions sent as nft text do, are atomic, and name the failing line as nft does.
//!
//! Two fresh network namespaces get the same table; one is changed over netlink, the other
//! with `nft -f -`, and `nft list table` must print the same in both after every step.

mod testbed;

use testbed::Netns;

use std::sync::Arc;

use kube_proxy::kernel::nft_runner::NftCommand;
use kube_proxy_model::{IpFamily, NamespacedName, Protocol, ServicePortName};
use kube_proxy_nftables::elements::{Key, SetName, Value};
use kube_proxy_nftables::{ElementCommand, RunError, Runner, Transaction};

const SETS: [SetName; 6] = [
    SetName::ClusterIps,
    SetName::Backends(0),
    SetName::NodePortBackends(0),
    SetName::ServiceIps,
    SetName::HairpinConnections,
    SetName::NoEndpointReject,
];

fn skeleton(fam: &str, family: IpFamily) -> String {
    let mut text = format!("add table {fam} kube-proxy\n");
    text.push_str(&format!(
        "add chain {fam} kube-proxy service-ULMVA6XW-ns/a/tcp/p\n"
    ));
    for set in SETS {
        let declaration = set.declaration(family);
        let (kind, rest) = declaration.split_once(' ').unwrap();
        text.push_str(&format!("add {kind} {fam} kube-proxy {rest}\n"));
    }
    text
}

/// The i-th address of a range: IPv4 `198.19.x.y`, IPv6 `2001:db8:19::i`.
fn addr(family: IpFamily, range: u8, i: usize) -> std::net::IpAddr {
    match family {
        IpFamily::V4 => ip(&format!("198.{range}.{}.{}", i / 250, 1 + i % 250)),
        IpFamily::V6 => ip(&format!("2001:db8:{range}::{:x}", i + 1)),
    }
}

fn ip(text: &str) -> std::net::IpAddr {
    text.parse().unwrap()
}

/// One transaction of element commands, written for service port ns/a:p.
fn transaction(fam: &str, commands: Vec<ElementCommand>) -> Transaction {
    let owner = Arc::new(ServicePortName {
        service: NamespacedName::new("ns", "a"),
        port: "p".into(),
        protocol: Protocol::Tcp,
    });
    let mut tx = Transaction::new();
    for command in commands {
        tx.element_command(fam, Some(&owner), command);
    }
    tx
}

fn adds(family: IpFamily, first: usize, n: usize) -> Vec<ElementCommand> {
    let frontend = |i: usize, proto| Key::Frontend(addr(family, 19, i), proto, 80);
    let endpoint = |i: usize| Value::Endpoint(addr(family, 18, i), 8080);
    let range = first..first + n;
    let command = |set, elements| ElementCommand {
        delete: false,
        set,
        elements,
    };
    vec![
        command(
            SetName::ClusterIps,
            range
                .clone()
                .map(|i| (Key::Addr(addr(family, 19, i)), Value::None))
                .collect(),
        ),
        command(
            SetName::Backends(0),
            range
                .clone()
                .map(|i| (frontend(i, Protocol::Tcp), endpoint(i)))
                .collect(),
        ),
        command(
            SetName::NodePortBackends(0),
            range
                .clone()
                .map(|i| (Key::NodePort(Protocol::Udp, 30000 + i as u16), endpoint(i)))
                .collect(),
        ),
        command(
            SetName::ServiceIps,
            range
                .clone()
                .map(|i| {
                    (
                        frontend(i, Protocol::Sctp),
                        Value::Goto("service-ULMVA6XW-ns/a/tcp/p".into()),
                    )
                })
                .collect(),
        ),
        command(
            SetName::HairpinConnections,
            range
                .clone()
                .map(|i| {
                    (
                        Key::Hairpin(addr(family, 18, i), Protocol::Tcp, 8080),
                        Value::None,
                    )
                })
                .collect(),
        ),
        command(
            SetName::NoEndpointReject,
            range
                .map(|i| (frontend(i, Protocol::Udp), Value::None))
                .collect(),
        ),
    ]
}

fn deletes(commands: &[ElementCommand], every: usize) -> Vec<ElementCommand> {
    commands
        .iter()
        .map(|c| ElementCommand {
            delete: true,
            set: c.set,
            elements: c.elements.iter().step_by(every).cloned().collect(),
        })
        .collect()
}

#[test]
fn netlink_element_batches_equal_nft_text() {
    if !testbed::available() {
        return;
    }
    let by_netlink = Netns::new("nla");
    let by_text = Netns::new("nlb");
    for (family, fam) in [(IpFamily::V4, "ip"), (IpFamily::V6, "ip6")] {
        for ns in [&by_netlink, &by_text] {
            ns.nft(&["-f", "-"], Some(&skeleton(fam, family)));
        }
        let added = adds(family, 0, 300);
        let removed = deletes(&added, 3);
        let steps = [
            transaction(fam, added.clone()),
            transaction(fam, removed),
            transaction(fam, adds(family, 300, 5)),
        ];
        for (step, tx) in steps.iter().enumerate() {
            let commands = tx.element_commands().map(|c| c.len());
            assert!(commands.is_some(), "step {step} has a data form");
            let ns = by_netlink.0.clone();
            let tx_text = tx.text().to_string();
            let netlink_commands = tx.element_commands().unwrap().to_vec();
            let batches = testbed::in_netns(&ns, move || {
                let mut runner = NftCommand::default();
                let tx = transaction(fam, netlink_commands);
                runner
                    .apply_transaction(family, &tx)
                    .map(|()| runner.netlink_batches())
            });
            assert_eq!(batches.unwrap(), 1, "step {step} went over netlink");
            let ns = by_text.0.clone();
            testbed::in_netns(&ns, move || NftCommand::text_only().apply(&tx_text)).unwrap();
            let listing = |ns: &Netns| ns.nft(&["list", "table", fam, "kube-proxy"], None);
            let text = listing(&by_text);
            assert!(
                text.contains(&addr(family, 18, 1).to_string()) && text.contains("goto service-"),
                "{text}"
            );
            assert_eq!(
                listing(&by_netlink),
                listing(&by_text),
                "{fam} after step {step}:\n{}",
                tx.text()
            );
        }
        // Atomic, and the failing line is named: an add, then a delete of a missing element.
        let mut failing = adds(family, 400, 1);
        failing.truncate(1);
        failing.extend(deletes(&adds(family, 900, 1), 1).into_iter().take(2));
        let tx = transaction(fam, failing.clone());
        let ns = by_netlink.0.clone();
        let result = testbed::in_netns(&ns, move || {
            NftCommand::default().apply_transaction(family, &transaction(fam, failing))
        });
        let Err(RunError::Rejected(message)) = result else {
            panic!("a delete of a missing element must be rejected: {result:?}");
        };
        let explained = tx.explain(&message);
        assert!(
            explained.starts_with("line 2 (written for service port ns/a:p)")
                && explained.contains("No such file or directory"),
            "{explained}"
        );
        let listing = by_netlink.nft(&["list", "set", fam, "kube-proxy", "cluster-ips"], None);
        let first = addr(family, 19, 400).to_string();
        assert!(
            !listing.contains(&first),
            "nothing of a rejected batch is applied: {listing}"
        );
    }
}

/// A batch of many messages (here 2,000, one per command): the kernel acks each before the
/// proxy reads any, which overflowed the socket's default receive buffer (`ENOBUFS`, found by
/// the soak benchmark with 125 changed ports). Applied whole, over netlink or through nft.
#[test]
fn a_batch_with_thousands_of_messages_is_applied() {
    if !testbed::available() {
        return;
    }
    let ns = Netns::new("nlc");
    ns.nft(&["-f", "-"], Some(&skeleton("ip", IpFamily::V4)));
    let commands: Vec<ElementCommand> = (0..2000)
        .map(|i| ElementCommand {
            delete: false,
            set: SetName::ClusterIps,
            elements: vec![(Key::Addr(addr(IpFamily::V4, 19, i)), Value::None)],
        })
        .collect();
    let result = testbed::in_netns(&ns.0, move || {
        NftCommand::default().apply_transaction(IpFamily::V4, &transaction("ip", commands))
    });
    assert!(result.is_ok(), "{result:?}");
    let listing = ns.nft(&["list", "set", "ip", "kube-proxy", "cluster-ips"], None);
    for i in [0, 999, 1999] {
        assert!(
            listing.contains(&addr(IpFamily::V4, 19, i).to_string()),
            "{i}: {listing}"
        );
    }
}
