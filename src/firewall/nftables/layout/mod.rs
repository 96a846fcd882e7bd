//! The shape of `table inet virtgate`: which sets and maps exist, and which typed elements
//! each forward puts in them. Both the `nft -f` text and the bytes the kernel returns on a
//! netlink dump are derived from these types, so a read-back compares exactly.
//!
//! A plain forward (no source allow-list) is nothing but elements: a DNAT map entry keyed
//! by (listen, protocol, port), a target for hairpin masquerade and a counting element.
//! Single ports live in hash maps (exact match, O(1) per packet whatever the number of
//! elements); only port ranges need interval maps. A forward with a source allow-list gets
//! a small chain of its own, reached through a verdict map.

mod declarations;
mod elements;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use crate::model::{Family, Proto};
use crate::rules::{Rule, Ruleset};
use declarations::{addr_type, fam_suffix, net_field};
pub use declarations::{declarations, has_chain};
pub use elements::{TrafficIndex, traffic_index, traffic_owner};
use elements::{add_chain, add_dnat, add_refusal, add_targets, add_traffic, listen_fields};

/// One field of a concatenated key or of map data, as an inclusive range (lo == hi for a
/// single value).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Field {
    V4(Ipv4Addr, Ipv4Addr),
    V6(Ipv6Addr, Ipv6Addr),
    Proto(Proto),
    Port(u16, u16),
    Ifname(String),
    NfProto(Family),
}

/// Map data.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Data {
    Fields(Vec<Field>),
    Goto(String),
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Elem {
    pub key: Vec<Field>,
    pub data: Option<Data>,
}

/// A set or map declaration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetDecl {
    pub name: String,
    pub key_type: String,
    pub data_type: Option<&'static str>,
    pub interval: bool,
    pub counter: bool,
}

/// Everything of the table that depends on the forwards.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    /// Elements per set name (every fixed set is present, possibly empty).
    pub elements: BTreeMap<String, BTreeSet<Elem>>,
    /// Chains of forwards with a source allow-list: name -> rules.
    pub chains: BTreeMap<String, Vec<String>>,
    /// Source sets of those forwards: name -> networks.
    pub source_sets: BTreeMap<String, (Family, Vec<IpNet>)>,
    /// Whether a stopped domain's port is refused (the `input` and `refuse` chains).
    pub refusals: bool,
    /// Per-source rate limits' dynamic sets: name -> (family, element timeout in seconds).
    pub meters: BTreeMap<String, (Family, u64)>,
}

/// The listen kinds, each with its key prefix type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenKind {
    Addr,
    If,
    Any,
    Lo,
}

impl ListenKind {
    pub const ALL: [ListenKind; 4] = [
        ListenKind::Addr,
        ListenKind::If,
        ListenKind::Any,
        ListenKind::Lo,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ListenKind::Addr => "addr",
            ListenKind::If => "if",
            ListenKind::Any => "any",
            ListenKind::Lo => "lo",
        }
    }

    pub fn families(self) -> &'static [Family] {
        match self {
            ListenKind::Lo => &[Family::Ipv4],
            _ => &[Family::Ipv4, Family::Ipv6],
        }
    }

    /// The key expression before `. meta l4proto . th dport`.
    pub fn key_expr(self, f: Family) -> Option<&'static str> {
        match (self, f) {
            (ListenKind::Addr, Family::Ipv4) => Some("ip daddr"),
            (ListenKind::Addr, Family::Ipv6) => Some("ip6 daddr"),
            (ListenKind::If, _) => Some("iifname"),
            _ => None,
        }
    }

    fn key_type(self, f: Family) -> String {
        let prefix = match self {
            ListenKind::Addr => format!("{} . ", addr_type(f)),
            ListenKind::If => "ifname . ".to_string(),
            _ => String::new(),
        };
        format!("{prefix}inet_proto . inet_service")
    }
}

/// Name of the exact-port DNAT map of a listen kind.
pub fn dnat_map(kind: ListenKind, f: Family) -> String {
    format!("dnat_{}{}", kind.name(), fam_suffix(f))
}

/// Name of the port-range DNAT map (ports kept) of a listen kind.
pub fn range_map(kind: ListenKind, f: Family) -> String {
    format!("range_{}{}", kind.name(), fam_suffix(f))
}

impl Layout {
    /// The layout of a ruleset (or of a part of it: every element a rule produces depends
    /// only on rules with the same guest address, see [`Layout::of_guests`]).
    pub fn of(rs: &Ruleset) -> Layout {
        let rules: Vec<&Rule> = rs.rules.iter().collect();
        let mut l = Layout::of_rules(&rules);
        for h in &rs.hairpins {
            let f = Family::of_net(&h.subnet);
            l.elements
                .entry(format!("hairpin{}", fam_suffix(f)))
                .or_default()
                .insert(Elem {
                    key: vec![Field::Ifname(h.bridge.clone()), net_field(&h.subnet)],
                    data: None,
                });
        }
        l
    }

    /// The layout of the given rules only (no hairpins).
    pub fn of_rules(rules: &[&Rule]) -> Layout {
        let mut l = Layout::default();
        for d in declarations() {
            l.elements.insert(d.name, BTreeSet::new());
        }
        for r in rules {
            if r.refuses() {
                add_refusal(&mut l, r);
                l.refusals = true;
                continue;
            }
            if has_chain(r) {
                add_chain(&mut l, r);
            } else {
                let (kind, prefix) = listen_fields(r);
                add_dnat(&mut l, r, kind, &prefix);
            }
            if r.localhost {
                add_dnat(&mut l, r, ListenKind::Lo, &[]);
            }
        }
        let rules: Vec<&Rule> = rules.iter().copied().filter(|r| !r.refuses()).collect();
        add_targets(&mut l, "targets", &rules);
        let lo: Vec<&Rule> = rules.iter().copied().filter(|r| r.localhost).collect();
        add_targets(&mut l, "lo_targets", &lo);
        add_traffic(&mut l, &rules);
        l
    }

    /// The layout of the rules whose guest is one of `guests`.
    pub fn of_guests(rs: &Ruleset, guests: &BTreeSet<IpAddr>) -> Layout {
        let rules: Vec<&Rule> = rs
            .rules
            .iter()
            .filter(|r| guests.contains(&r.guest_ip))
            .collect();
        Layout::of_rules(&rules)
    }
}
