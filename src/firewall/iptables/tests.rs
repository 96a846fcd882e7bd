//! The iptables backend's chain layout, without a kernel.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::rules::bucketed_by_address;

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
    let chains = bucketed_by_address("VIRTGATE_HAIRPIN0", rules);
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
    let chains: BTreeMap<String, Vec<String>> = bucketed_by_address("VIRTGATE_HAIRPIN0", rules)
        .into_iter()
        .collect();
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
        bucketed_by_address("VIRTGATE_HAIRPIN0", rules)
            .into_iter()
            .collect()
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
