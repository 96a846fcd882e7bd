//! Property tests of the planner: it is pure and deterministic, never emits two rules for
//! one listen key, only targets addresses inside the guest's network, and planning with
//! nothing configured yields nothing to install.

use std::net::IpAddr;

use ipnet::IpNet;
use proptest::prelude::*;
use virtgate::facts::{Facts, FactsBuilder};
use virtgate::model::{DomainConfig, ForwardSpec, Listen, PortRange, Proto};
use virtgate::plan::{self, ListenOn};

fn facts(n: usize) -> Facts {
    let mut b = FactsBuilder::network("default", "virbr0", &["192.168.122.1/24", "fd00::1/64"]);
    for i in 0..n {
        let mac = format!("52:54:00:00:01:{i:02x}");
        b = b
            .reservation(&mac, &format!("192.168.122.{}", 10 + i))
            .domain(&format!("d{i}"), &mac, &format!("vnet{i}"));
    }
    b.build()
}

fn forward() -> impl Strategy<Value = ForwardSpec> {
    (
        prop_oneof![Just(Proto::Tcp), Just(Proto::Udp), Just(Proto::Sctp)],
        prop_oneof![
            Just(Listen::Any),
            Just(Listen::Address("203.0.113.1".parse().unwrap())),
            Just(Listen::Address("203.0.113.2".parse().unwrap())),
            Just(Listen::Address("2001:db8::1".parse().unwrap())),
        ],
        8000u16..8012,
        0u16..3,
        1u16..1000,
        any::<bool>(),
        prop_oneof![
            Just(vec![]),
            Just(vec!["203.0.113.0/24".parse::<IpNet>().unwrap()])
        ],
    )
        .prop_map(
            |(proto, listen, start, extra, guest, localhost, sources)| ForwardSpec {
                proto,
                listen,
                host_ports: PortRange::new(start, start + extra).unwrap(),
                guest_ports: PortRange::new(guest, guest + extra).unwrap(),
                sources,
                localhost,
                guest_addresses: if guest % 2 == 0 {
                    vec!["fd00::99".parse().unwrap()]
                } else {
                    vec![]
                },
                ..Default::default()
            },
        )
}

fn domains() -> impl Strategy<Value = Vec<DomainConfig>> {
    prop::collection::vec(prop::collection::vec(forward(), 0..5), 1..5).prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(i, forwards)| DomainConfig {
                name: format!("d{i}"),
                forwards,
                ..Default::default()
            })
            .collect()
    })
}

fn assert_disjoint(rules: &[plan::Rule]) -> Result<(), TestCaseError> {
    for (i, a) in rules.iter().enumerate() {
        for b in &rules[i + 1..] {
            let listen_overlap = match (&a.listen, &b.listen) {
                (ListenOn::Address(x), ListenOn::Address(y)) => x == y,
                (ListenOn::Interface(x), ListenOn::Interface(y)) => x == y,
                _ => true,
            } || (a.localhost && b.localhost);
            prop_assert!(
                !(a.family == b.family
                    && a.proto == b.proto
                    && listen_overlap
                    && a.host_ports.overlaps(&b.host_ports)),
                "overlapping rules {:?} and {:?}",
                a,
                b
            );
        }
    }
    Ok(())
}

proptest! {
    #[test]
    fn carried_rules_never_overlap_new_ones(a in domains(), b in domains()) {
        // d0's rules from one config are kept (its config turned invalid); another config
        // for the other domains must not produce a rule that collides with them
        let f = facts(a.len().max(b.len()));
        let carried: Vec<plan::Rule> = plan::plan(&a, &f, &[]).ruleset.rules.into_iter().filter(|r| r.domain == "d0").collect();
        let rest: Vec<DomainConfig> = b.into_iter().filter(|d| d.name != "d0").collect();
        let p = plan::plan(&rest, &f, &carried);
        assert_disjoint(&p.ruleset.rules)?;
        for c in &carried {
            prop_assert!(p.ruleset.rules.contains(c), "carried rule dropped: {:?}", c);
        }
    }

    #[test]
    fn planner_invariants(doms in domains()) {
        let f = facts(doms.len());
        let p = plan::plan(&doms, &f, &[]);
        // deterministic
        prop_assert_eq!(&p, &plan::plan(&doms, &f, &[]));
        // no two rules can receive the same packet
        assert_disjoint(&p.ruleset.rules)?;
        let rules = &p.ruleset.rules;
        // every target lies in the guest's network, ranges keep their length
        for r in rules {
            prop_assert!(f.networks[0].contains(&r.guest_ip), "{:?}", r);
            prop_assert_eq!(r.host_ports.len(), r.guest_ports.len());
            prop_assert!(!r.localhost || matches!(r.guest_ip, IpAddr::V4(_)));
        }
        // every forward got a status; a conflict is never active: it has no rules
        let n: usize = doms.iter().map(|d| d.forwards.len()).sum();
        prop_assert_eq!(p.forwards.len(), n);
        let installed: std::collections::BTreeSet<&str> =
            p.ruleset.rules.iter().map(|r| r.id.as_str()).collect();
        for f in p.forwards.iter().filter(|f| f.state == plan::ForwardState::Conflict) {
            prop_assert!(f.rule_ids.iter().all(|id| !installed.contains(id.as_str())), "{:?}", f);
        }
        for f in p.forwards.iter().filter(|f| f.state == plan::ForwardState::Active) {
            prop_assert!(!f.rule_ids.is_empty() && f.rule_ids.iter().all(|id| installed.contains(id.as_str())), "{:?}", f);
        }
        // nothing configured: nothing to install (removal is complete)
        let empty = plan::plan(&[], &f, &[]);
        prop_assert!(empty.ruleset.is_empty() && empty.ruleset.accepts.is_empty() && empty.ruleset.hairpins.is_empty());
        // removing one domain removes exactly its rules
        let rest = plan::plan(&doms[1..], &f, &[]);
        prop_assert!(rest.ruleset.rules.iter().all(|r| r.domain != "d0"));
    }

    #[test]
    fn planning_again_with_what_was_installed_changes_nothing(doms in domains(), stopped in 0usize..6) {
        // level-triggered: a second apply with the same inputs must not flip who holds a
        // port (a pending forward of one domain against an active one of another)
        let mut f = facts(doms.len());
        if stopped < f.domains.len() {
            f.domains.remove(stopped);
        }
        let first = plan::plan(&doms, &f, &[]);
        let again = plan::plan_against(&doms, &f, vec![], &[], &first.ruleset.rules);
        prop_assert_eq!(&again.ruleset, &first.ruleset);
        prop_assert_eq!(&again.forwards, &first.forwards);
    }

    #[test]
    fn stopped_domains_get_no_rules(doms in domains()) {
        let mut f = facts(doms.len());
        f.domains.clear();
        let p = plan::plan(&doms, &f, &[]);
        prop_assert!(p.ruleset.is_empty());
        prop_assert!(p.forwards.iter().all(|s| matches!(s.state, plan::ForwardState::Stopped | plan::ForwardState::Conflict)));
    }
}

#[test]
fn hostile_names_never_collide() {
    let names = [
        "a b".to_string(),
        "a\"b".to_string(),
        "a;b".to_string(),
        "$(reboot)".to_string(),
        "line\nbreak".to_string(),
        "ünïcødé".to_string(),
        "x".repeat(200),
        format!("{}y", "x".repeat(199)),
    ];
    let mut b = FactsBuilder::network("default", "virbr0", &["192.168.122.1/24", "fd00::1/64"]);
    let mut doms = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let mac = format!("52:54:00:00:02:{i:02x}");
        b = b
            .reservation(&mac, &format!("192.168.122.{}", 50 + i))
            .domain(n, &mac, &format!("vnet{i}"));
        doms.push(DomainConfig {
            name: n.clone(),
            forwards: vec![ForwardSpec {
                host_ports: PortRange::single(9000 + i as u16).unwrap(),
                guest_ports: PortRange::single(80).unwrap(),
                ..Default::default()
            }],
            ..Default::default()
        });
    }
    let f = b.build();
    let p = plan::plan(&doms, &f, &[]);
    let mut ids: Vec<&str> = p.ruleset.rules.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids.len(), names.len() * 2 - names.len()); // IPv4 only (no IPv6 address known)
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), names.len());
    for r in &p.ruleset.rules {
        let c = r.comment();
        assert!(
            !c.contains('"') && !c.contains('\n') && c.len() <= 100,
            "{c:?}"
        );
        assert!(r.id.chars().all(|c| c.is_ascii_hexdigit()) && r.id.len() == 16);
    }
}
