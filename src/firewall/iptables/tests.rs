//! The iptables backend's chain layout, without a kernel.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::nat::{Line, bucketed_by_address, rendered};

/// The chains a packet to `to` walks from `top`, following `-d PREFIX -j CHAIN` jumps,
/// and the rules it sees that match its address exactly.
fn reached(chains: &BTreeMap<String, Vec<String>>, top: &str, to: IpAddr) -> Vec<String> {
    let mut out = Vec::new();
    for rule in &chains[top] {
        let mut words = rule.split_whitespace();
        let (Some("-d"), Some(net), Some("-j"), Some(chain)) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            out.push(rule.clone());
            continue;
        };
        let net: ipnet::IpNet = net.parse().expect("a prefix");
        if chains.contains_key(chain) && !rule.contains("MASQUERADE") && net.contains(&to) {
            out.extend(reached(chains, chain, to));
        } else if net.contains(&to) {
            out.push(rule.clone());
        }
    }
    out
}

/// The chains `bucketed_by_address` makes of text lines, as text.
fn by_address(rules: Vec<(IpAddr, String)>) -> Vec<(String, Vec<String>)> {
    let lines = rules
        .into_iter()
        .map(|(ip, t)| (ip, Line::Text(t)))
        .collect();
    bucketed_by_address("VIRTGATE_HAIRPIN0", lines)
        .into_iter()
        .map(|(name, lines)| (name, rendered(&lines)))
        .collect()
}

fn rule(ip: &str, port: u16) -> (IpAddr, String) {
    let ip: IpAddr = ip.parse().unwrap();
    let host = if ip.is_ipv4() {
        format!("{ip}/32")
    } else {
        format!("{ip}/128")
    };
    (ip, format!("-d {host} -j MASQUERADE --to-ports {port}"))
}

#[test]
fn few_rules_stay_flat_and_duplicates_go() {
    let rules = vec![
        rule("192.168.0.10", 80),
        rule("192.168.0.10", 80),
        rule("192.168.0.11", 80),
    ];
    let chains = by_address(rules);
    assert_eq!(chains.len(), 1);
    assert_eq!(chains[0].1.len(), 2, "{chains:?}");
}

#[test]
fn every_address_reaches_its_own_rules_and_only_them() {
    // addresses far apart (other /22s, other /16s, IPv6), many per /27, duplicates
    let mut addrs: Vec<String> = Vec::new();
    for i in 0..300u32 {
        let a = std::net::Ipv4Addr::from(0x0a00_0000 + i * 37);
        addrs.push(a.to_string());
    }
    for i in 0..50u128 {
        addrs
            .push(std::net::Ipv6Addr::from((0xfd00_0122_u128 << 96) | (i * 1_000_003)).to_string());
    }
    let mut rules = Vec::new();
    for (k, a) in addrs.iter().enumerate() {
        rules.push(rule(a, 80));
        rules.push(rule(a, 80));
        rules.push(rule(a, 1000 + k as u16));
    }
    let chains: BTreeMap<String, Vec<String>> = by_address(rules).into_iter().collect();
    assert!(chains.keys().all(|c| c.len() <= 28), "iptables' name limit");
    let flat: usize = chains
        .values()
        .flatten()
        .filter(|r| r.contains("MASQUERADE"))
        .count();
    assert_eq!(flat, addrs.len() * 2, "each distinct rule once");
    for (k, a) in addrs.iter().enumerate() {
        let ip: IpAddr = a.parse().unwrap();
        let mut seen = reached(&chains, "VIRTGATE_HAIRPIN0", ip);
        seen.sort();
        let mut want = vec![rule(a, 80).1, rule(a, 1000 + k as u16).1];
        want.sort();
        assert_eq!(seen, want, "{a}");
    }
}

#[test]
fn one_guest_more_changes_only_its_own_chains() {
    let many = |n: u32| -> BTreeMap<String, Vec<String>> {
        let rules = (0..n)
            .map(|i| rule(&std::net::Ipv4Addr::from(0xc0a8_0000 + i).to_string(), 80))
            .collect();
        by_address(rules).into_iter().collect()
    };
    let (before, after) = (many(1000), many(1001));
    let changed: Vec<&String> = after
        .iter()
        .filter(|(name, rules)| before.get(*name) != Some(rules))
        .map(|(name, _)| name)
        .collect();
    // 192.168.3.232 (the 1001st) joins the leaf of .224-.255, which exists already
    assert_eq!(changed, vec!["VIRTGATE_HAIRPIN0_10752_31"], "{changed:?}");
}

mod nat_delta {
    use proptest::prelude::*;

    use super::super::nat::{nat_chains, nat_delta, nat_spec};
    use super::super::rules::delta_script;
    use crate::model::{Family, PortRange, Proto};
    use crate::rules::{Hairpin, ListenOn, Rule, Ruleset};

    /// A rule of domain `d` from a few random numbers: listen kinds, ports near each
    /// other (shared buckets) and far apart, ranges, sources, localhost, two bridges.
    fn rule(d: u8, n: u16, kind: u8, guest: u8) -> Rule {
        let start = 20000 + n * 7 % 3000;
        let end = if kind.is_multiple_of(5) {
            start + kind as u16
        } else {
            start
        };
        let bridge = if guest.is_multiple_of(3) {
            "virbr1"
        } else {
            "virbr0"
        };
        Rule {
            domain: format!("d{d}"),
            id: format!("{d:02x}{n:014x}"),
            family: Family::Ipv4,
            proto: if kind % 4 == 1 {
                Proto::Udp
            } else {
                Proto::Tcp
            },
            listen: match kind % 3 {
                0 => ListenOn::Any,
                1 => ListenOn::Address("203.0.113.1".parse().unwrap()),
                _ => ListenOn::Interface("eth1".into()),
            },
            host_ports: PortRange::new(start, end).unwrap(),
            guest_ip: format!("192.168.{}.{}", guest % 3, 10 + d).parse().unwrap(),
            guest_ports: PortRange::new(80, 80 + end - start).unwrap(),
            sources: if kind.is_multiple_of(7) {
                vec!["198.51.100.0/24".parse().unwrap()]
            } else {
                vec![]
            },
            localhost: kind.is_multiple_of(6),
            bridge: bridge.into(),
            tap: None,
            description: None,
            rate: None,
        }
    }

    fn ruleset(mut rules: Vec<Rule>) -> Ruleset {
        crate::rules::sort_rules(&mut rules);
        let mut rs = Ruleset {
            rules,
            ..Default::default()
        };
        rs.hairpins = vec![
            Hairpin {
                bridge: "virbr0".into(),
                subnet: "192.168.0.0/16".parse().unwrap(),
            },
            Hairpin {
                bridge: "virbr1".into(),
                subnet: "192.168.0.0/24".parse().unwrap(),
            },
        ];
        rs
    }

    fn rules(spec: &[(u8, u16, u8, u8)]) -> Vec<Rule> {
        let mut seen = std::collections::BTreeSet::new();
        spec.iter()
            .map(|&(d, n, k, g)| rule(d, n, k, g))
            // one rule per listen key, as the planner leaves them
            .filter(|r| seen.insert(r.listen_key()))
            .collect()
    }

    proptest! {
        /// Comparing lines and rendering only what differs writes exactly what comparing
        /// every chain's text writes, whatever one domain's change.
        #[test]
        fn equals_the_whole_text_delta(
            others in prop::collection::vec((1u8..12, 0u16..400, any::<u8>(), any::<u8>()), 0..120),
            before in prop::collection::vec((0u8..1, 0u16..400, any::<u8>(), any::<u8>()), 0..12),
            after in prop::collection::vec((0u8..1, 0u16..400, any::<u8>(), any::<u8>()), 0..12),
        ) {
            let old = ruleset(rules(&[before.clone(), others.clone()].concat()));
            let new = ruleset(rules(&[after.clone(), others.clone()].concat()));
            let o: Vec<&Rule> = old.rules.iter().collect();
            let n: Vec<&Rule> = new.rules.iter().collect();
            let text = delta_script(
                &nat_spec(&old, &o, Family::Ipv4),
                &nat_spec(&new, &n, Family::Ipv4),
            );
            let lines = nat_delta(
                &nat_chains(&old, &o, Family::Ipv4),
                &nat_chains(&new, &n, Family::Ipv4),
            );
            prop_assert_eq!(lines, text);
        }
    }
}
