//! Property test on the real kernel: any valid config loads (the kernel accepts every
//! rendered ruleset), and removing it leaves the ruleset exactly as before:
//! remove(apply(x)) == original, for both backends.

mod common;

use common::{Lab, LibvirtForm, diff};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn forward() -> impl Strategy<Value = String> {
    (
        prop_oneof![Just("tcp"), Just("udp"), Just("sctp")],
        prop_oneof![
            Just(String::new()),
            Just("listen = \"203.0.113.1\"\n".to_string()),
            Just("listen = [\"198.51.100.1\", \"2001:db8:1::1\"]\n".to_string()),
            Just("interface = \"eth1\"\n".to_string()),
        ],
        7000u16..7040,
        0u16..4,
        1u16..60000,
        prop_oneof![
            Just(String::new()),
            Just("source = [\"203.0.113.0/24\", \"203.0.113.0/25\", \"2001:db8::/32\"]\n".to_string()),
        ],
        any::<bool>(),
    )
        .prop_map(|(proto, listen, start, extra, guest, source, localhost)| {
            format!(
                "host_port = \"{start}-{}\"\nguest_port = \"{guest}-{}\"\nproto = \"{proto}\"\n{listen}{source}localhost = {localhost}\n",
                start + extra,
                guest + extra
            )
        })
}

fn config() -> impl Strategy<Value = String> {
    prop::collection::vec((0usize..3, forward()), 1..8).prop_map(|v| {
        let mut out = String::from("[domain.g1]\nguest_address = \"fd00:122::10\"\n");
        for (d, f) in v {
            out.push_str(&format!("[[domain.g{}.forward]]\n{f}", d + 1));
        }
        out
    })
}

#[test]
fn any_config_loads_and_removal_restores_the_ruleset() {
    if !common::can_run_netns("any_config_loads_and_removal_restores_the_ruleset") {
        return;
    }
    for (form, backend) in [
        (LibvirtForm::Nftables, "nftables"),
        (LibvirtForm::Iptables, "iptables"),
    ] {
        let lab = Lab::new(form);
        lab.ping_from_host("192.168.100.10");
        let before = lab.ruleset();
        let mut runner = TestRunner::new(Config {
            cases: 12,
            failure_persistence: None,
            ..Config::default()
        });
        runner
            .run(&config(), |cfg| {
                lab.write_config(&cfg);
                // conflicting forwards are reported (exit 1) and skipped; everything
                // else must load
                let (ok, out, err) = lab.virtgate(backend, &["apply"]);
                prop_assert!(
                    !err.contains("kernel refused") && !err.contains("apply failed"),
                    "{backend}: {err}\n{out}\nconfig:\n{cfg}"
                );
                // exit 1 only for the config errors it reported
                prop_assert!(
                    ok || err.contains("config error"),
                    "{backend}: apply failed: {err}\n{out}\nconfig:\n{cfg}"
                );
                lab.write_config("");
                lab.apply(backend);
                let after = lab.ruleset();
                prop_assert!(
                    before == after,
                    "{backend}: not restored:\n{}\nconfig:\n{cfg}",
                    diff(&before, &after)
                );
                Ok(())
            })
            .unwrap();
    }
}
