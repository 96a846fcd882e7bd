//! The conflict finder (sorted interval index, O(n log n)) agrees with the pairwise
//! definition on random configs: every listen kind, both families, localhost, ranges.

use ipnet::IpNet;
use proptest::prelude::*;
use virtgate::model::conflicts::{
    find_conflicts_by, find_conflicts_indexed, find_conflicts_indexed_by, find_conflicts_naive_by,
};
use virtgate::model::{DomainConfig, ForwardSpec, Listen, PortRange, Proto};
use virtgate::plan::{find_conflicts, find_conflicts_naive};

fn listen() -> impl Strategy<Value = Listen> {
    prop_oneof![
        Just(Listen::Any),
        Just(Listen::DefaultRoute),
        Just(Listen::Address("203.0.113.1".parse().unwrap())),
        Just(Listen::Address("203.0.113.2".parse().unwrap())),
        Just(Listen::Address("2001:db8::1".parse().unwrap())),
        Just(Listen::Interface("eth0".into())),
        Just(Listen::Interface("eth1".into())),
    ]
}

fn forward() -> impl Strategy<Value = ForwardSpec> {
    (
        prop_oneof![Just(Proto::Tcp), Just(Proto::Udp)],
        listen(),
        1u16..40,
        prop_oneof![Just(0u16), Just(0), 0u16..5, 0u16..40],
        any::<bool>(),
        prop_oneof![
            Just(vec![]),
            Just(vec!["203.0.113.0/24".parse::<IpNet>().unwrap()]),
            Just(vec!["2001:db8::/32".parse::<IpNet>().unwrap()]),
        ],
    )
        .prop_map(
            |(proto, listen, start, extra, localhost, sources)| ForwardSpec {
                proto,
                listen,
                host_ports: PortRange::new(start, start + extra).unwrap(),
                guest_ports: PortRange::new(start, start + extra).unwrap(),
                sources,
                localhost,
                ..Default::default()
            },
        )
}

fn domains() -> impl Strategy<Value = Vec<DomainConfig>> {
    prop::collection::vec(prop::collection::vec(forward(), 0..8), 0..8).prop_map(|ds| {
        ds.into_iter()
            .enumerate()
            .map(|(i, forwards)| DomainConfig {
                name: format!("d{i}"),
                forwards,
                ..Default::default()
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn indexed_finder_matches_pairwise_definition(ds in domains()) {
        let naive = find_conflicts_naive(&ds);
        prop_assert_eq!(find_conflicts_indexed(&ds), naive.clone());
        // small configs take the pairwise path: the same answer
        prop_assert_eq!(find_conflicts(&ds), naive);
    }

    #[test]
    fn forwards_put_first_win_the_same_way_in_both_finders(ds in domains(), seed in any::<u64>()) {
        // some forwards (installed ones, in the planner) claim their ports first
        let first = |(d, f): (usize, usize)| (seed >> ((d * 7 + f) % 64)) & 1 == 1;
        let naive = find_conflicts_naive_by(&ds, &first);
        prop_assert_eq!(find_conflicts_indexed_by(&ds, &first), naive.clone());
        prop_assert_eq!(find_conflicts_by(&ds, &first), naive.clone());
        // a forward put first never loses to one that is not
        for c in &naive {
            prop_assert!(first(c.first) || !first(c.second), "{:?}", c);
        }
    }
}

#[test]
fn many_forwards_are_checked_without_pairs() {
    // 20,000 forwards on distinct ports: the pairwise finder would compare 2e8 pairs
    let ds: Vec<DomainConfig> = (0..2000)
        .map(|d| DomainConfig {
            name: format!("d{d}"),
            forwards: (0..10)
                .map(|k| {
                    let p = 20000 + d * 10 + k;
                    ForwardSpec {
                        host_ports: PortRange::single(p as u16).unwrap(),
                        guest_ports: PortRange::single(80).unwrap(),
                        ..Default::default()
                    }
                })
                .collect(),
            ..Default::default()
        })
        .collect();
    assert!(find_conflicts(&ds).is_empty());
    let mut ds = ds;
    ds[1999].forwards[9].host_ports = PortRange::single(20000).unwrap();
    let c = find_conflicts(&ds);
    assert_eq!(c.len(), 1);
    assert_eq!((c[0].first, c[0].second), ((0, 0), (1999, 9)));
}
