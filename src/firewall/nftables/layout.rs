//! The shape of `table inet virtgate`: which sets and maps exist, and which typed elements
//! each forward puts in them. Both the `nft -f` text and the bytes the kernel returns on a
//! netlink dump are derived from these types, so a read-back compares exactly.
//!
//! A plain forward (no source allow-list) is nothing but elements: a DNAT map entry keyed
//! by (listen, protocol, port), a target for hairpin masquerade and a counting element.
//! Single ports live in hash maps (exact match, O(1) per packet whatever the number of
//! elements); only port ranges need interval maps. A forward with a source allow-list gets
//! a small chain of its own, reached through a verdict map.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use crate::model::{Family, PortRange, Proto, RateLimit, RatePer};
use crate::plan::{ListenOn, Rule, Ruleset};

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

/// How long a per-source meter keeps a client's bucket: long enough to refill its burst,
/// at least a minute.
pub fn meter_timeout(l: &RateLimit) -> u64 {
    let period = l.unit.seconds();
    (u64::from(l.burst) * period / u64::from(l.count) + period).max(60)
}

/// The rule that drops new connections over a rate (`fam`: `ip` or `ip6`).
fn limit_rule(r: &Rule, l: &RateLimit, fam: &str) -> String {
    let rate = format!(
        "limit rate over {}/{} burst {} packets",
        l.count,
        l.unit.as_str(),
        l.burst
    );
    match l.per {
        RatePer::Forward => format!("{rate} counter drop"),
        RatePer::Source => format!("update @l_{} {{ {fam} saddr {rate} }} counter drop", r.id),
    }
}

fn fam_suffix(f: Family) -> &'static str {
    match f {
        Family::Ipv4 => "4",
        Family::Ipv6 => "6",
    }
}

fn addr_type(f: Family) -> &'static str {
    match f {
        Family::Ipv4 => "ipv4_addr",
        Family::Ipv6 => "ipv6_addr",
    }
}

fn ip_field(ip: IpAddr) -> Field {
    match ip {
        IpAddr::V4(a) => Field::V4(a, a),
        IpAddr::V6(a) => Field::V6(a, a),
    }
}

fn net_field(n: &IpNet) -> Field {
    match n {
        IpNet::V4(n) => Field::V4(n.network(), n.broadcast()),
        IpNet::V6(n) => Field::V6(n.network(), n.broadcast()),
    }
}

fn port_field(p: &PortRange) -> Field {
    Field::Port(p.start, p.end)
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

/// Every set and map of the table, in declaration order.
pub fn declarations() -> Vec<SetDecl> {
    let mut v = Vec::new();
    for kind in ListenKind::ALL {
        for &f in kind.families() {
            v.push(SetDecl {
                name: dnat_map(kind, f),
                key_type: kind.key_type(f),
                data_type: Some(match f {
                    Family::Ipv4 => "ipv4_addr . inet_service",
                    Family::Ipv6 => "ipv6_addr . inet_service",
                }),
                interval: false,
                counter: false,
            });
            v.push(SetDecl {
                name: range_map(kind, f),
                key_type: kind.key_type(f),
                data_type: Some(addr_type(f)),
                interval: true,
                counter: false,
            });
        }
    }
    // verdict maps for forwards with a source allow-list, and for stopped domains'
    // refused ports
    for prefix in ["listen", "stopped"] {
        for (name, ty) in [
            ("addr4", "ipv4_addr . inet_proto . inet_service"),
            ("addr6", "ipv6_addr . inet_proto . inet_service"),
            ("if", "ifname . nf_proto . inet_proto . inet_service"),
            ("any", "nf_proto . inet_proto . inet_service"),
        ] {
            v.push(SetDecl {
                name: format!("{prefix}_{name}"),
                key_type: ty.into(),
                data_type: Some("verdict"),
                interval: true,
                counter: false,
            });
        }
    }
    for f in [Family::Ipv4, Family::Ipv6] {
        let s = fam_suffix(f);
        let target = format!("{} . inet_proto . inet_service", addr_type(f));
        v.push(SetDecl {
            name: format!("hairpin{s}"),
            key_type: format!("ifname . {}", addr_type(f)),
            data_type: None,
            interval: true,
            counter: false,
        });
        for (prefix, count) in [("targets", false), ("traffic", true)] {
            v.push(SetDecl {
                name: format!("{prefix}{s}"),
                key_type: target.clone(),
                data_type: None,
                interval: false,
                counter: count,
            });
            v.push(SetDecl {
                name: format!("{prefix}_range{s}"),
                key_type: target.clone(),
                data_type: None,
                interval: true,
                counter: count,
            });
        }
    }
    for name in ["lo_targets4", "lo_targets_range4"] {
        v.push(SetDecl {
            name: name.into(),
            key_type: "ipv4_addr . inet_proto . inet_service".into(),
            data_type: None,
            interval: name.contains("range"),
            counter: false,
        });
    }
    v
}

/// Whether a rule needs its own chain (a source allow-list, a rate limit).
pub fn has_chain(r: &Rule) -> bool {
    !r.sources.is_empty() || r.rate.is_some()
}

/// The listen key fields of a rule for a listen kind (without proto and port).
fn listen_fields(r: &Rule) -> (ListenKind, Vec<Field>) {
    match &r.listen {
        ListenOn::Address(a) => (ListenKind::Addr, vec![ip_field(*a)]),
        ListenOn::Interface(i) => (ListenKind::If, vec![Field::Ifname(i.clone())]),
        ListenOn::Any => (ListenKind::Any, vec![]),
    }
}

fn key(prefix: &[Field], proto: Proto, ports: Field) -> Vec<Field> {
    let mut k = prefix.to_vec();
    k.push(Field::Proto(proto));
    k.push(ports);
    k
}

/// Adds the DNAT elements of a rule for a listen kind.
fn add_dnat(layout: &mut Layout, r: &Rule, kind: ListenKind, prefix: &[Field]) {
    let (h, g) = (r.host_ports, r.guest_ports);
    let ip = ip_field(r.guest_ip);
    if h.start == h.end || h != g {
        // exact keys: a single port, or a shifted range expanded port by port
        let set = layout.elements.entry(dnat_map(kind, r.family)).or_default();
        for (hp, gp) in (h.start..=h.end).zip(g.start..=g.end) {
            set.insert(Elem {
                key: key(prefix, r.proto, Field::Port(hp, hp)),
                data: Some(Data::Fields(vec![ip.clone(), Field::Port(gp, gp)])),
            });
        }
    } else {
        layout
            .elements
            .entry(range_map(kind, r.family))
            .or_default()
            .insert(Elem {
                key: key(prefix, r.proto, port_field(&h)),
                data: Some(Data::Fields(vec![ip])),
            });
    }
}

fn target_elem(r: &Rule) -> Elem {
    Elem {
        key: vec![
            ip_field(r.guest_ip),
            Field::Proto(r.proto),
            port_field(&r.guest_ports),
        ],
        data: None,
    }
}

/// Merges overlapping (ip, proto, port range) keys so an interval set accepts them.
fn merged(targets: Vec<(IpAddr, Proto, PortRange)>) -> Vec<(IpAddr, Proto, PortRange)> {
    let mut by: BTreeMap<(IpAddr, Proto), Vec<PortRange>> = BTreeMap::new();
    for (ip, p, r) in targets {
        by.entry((ip, p)).or_default().push(r);
    }
    let mut out = Vec::new();
    for ((ip, p), mut ranges) in by {
        ranges.sort();
        let mut cur: Option<PortRange> = None;
        for r in ranges {
            cur = match cur {
                Some(c) if u32::from(r.start) <= u32::from(c.end) + 1 => Some(PortRange {
                    start: c.start,
                    end: c.end.max(r.end),
                }),
                Some(c) => {
                    out.push((ip, p, c));
                    Some(r)
                }
                None => Some(r),
            };
        }
        if let Some(c) = cur {
            out.push((ip, p, c));
        }
    }
    out
}

fn add_targets(layout: &mut Layout, prefix: &str, rules: &[&Rule]) {
    let (single, ranges): (Vec<&&Rule>, Vec<&&Rule>) = rules
        .iter()
        .partition(|r| r.guest_ports.start == r.guest_ports.end);
    for r in single {
        let s = format!("{prefix}{}", fam_suffix(r.family));
        layout.elements.entry(s).or_default().insert(target_elem(r));
    }
    let m = merged(
        ranges
            .iter()
            .map(|r| (r.guest_ip, r.proto, r.guest_ports))
            .collect(),
    );
    for (ip, p, range) in m {
        let s = format!("{prefix}_range{}", fam_suffix(Family::of(&ip)));
        layout.elements.entry(s).or_default().insert(Elem {
            key: vec![ip_field(ip), Field::Proto(p), port_field(&range)],
            data: None,
        });
    }
}

/// Counting elements: one per guest target; a target shared by two rules counts for the
/// first of them (see [`traffic_owner`]).
fn add_traffic(layout: &mut Layout, rules: &[&Rule]) {
    let mut seen_ranges: Vec<&Rule> = Vec::new();
    for r in rules {
        if r.guest_ports.start == r.guest_ports.end {
            layout
                .elements
                .entry(format!("traffic{}", fam_suffix(r.family)))
                .or_default()
                .insert(target_elem(r));
        } else if !seen_ranges.iter().any(|s| {
            s.guest_ip == r.guest_ip && s.proto == r.proto && s.guest_ports.overlaps(&r.guest_ports)
        }) {
            seen_ranges.push(r);
            layout
                .elements
                .entry(format!("traffic_range{}", fam_suffix(r.family)))
                .or_default()
                .insert(target_elem(r));
        }
    }
}

/// Rules by (guest address, protocol), to find the owner of a counting element.
pub type TrafficIndex<'a> = std::collections::HashMap<(IpAddr, Proto), Vec<&'a Rule>>;

pub fn traffic_index(rules: &[Rule]) -> TrafficIndex<'_> {
    let mut m: TrafficIndex = Default::default();
    for r in rules {
        m.entry((r.guest_ip, r.proto)).or_default().push(r);
    }
    m
}

/// Which rule a counting element belongs to: the first rule (in ruleset order) with that
/// guest target.
pub fn traffic_owner<'a>(index: &TrafficIndex<'a>, e: &Elem) -> Option<&'a Rule> {
    let ip = match e.key.first()? {
        Field::V4(a, _) => IpAddr::V4(*a),
        Field::V6(a, _) => IpAddr::V6(*a),
        _ => return None,
    };
    let Field::Proto(p) = e.key.get(1)? else {
        return None;
    };
    let Field::Port(lo, hi) = e.key.get(2)? else {
        return None;
    };
    index
        .get(&(ip, *p))?
        .iter()
        .copied()
        .find(|r| r.guest_ports.start <= *hi && *lo <= r.guest_ports.end)
}

/// The element of a rule in a verdict map of listen keys (`listen_*` for forwards with an
/// allow-list, `stopped_*` for refusals), going to `chain`.
fn add_vmap_elem(layout: &mut Layout, prefix: &str, r: &Rule, chain: &str) {
    let (kind, fields) = listen_fields(r);
    let (set, key) = match kind {
        ListenKind::Addr => (
            format!("{prefix}_addr{}", fam_suffix(r.family)),
            key(&fields, r.proto, port_field(&r.host_ports)),
        ),
        ListenKind::If => {
            let mut k = fields.clone();
            k.push(Field::NfProto(r.family));
            (
                format!("{prefix}_if"),
                key(&k, r.proto, port_field(&r.host_ports)),
            )
        }
        _ => (
            format!("{prefix}_any"),
            key(
                &[Field::NfProto(r.family)],
                r.proto,
                port_field(&r.host_ports),
            ),
        ),
    };
    layout.elements.entry(set).or_default().insert(Elem {
        key,
        data: Some(Data::Goto(chain.to_string())),
    });
}

/// A stopped domain's refused port: to the `refuse` chain, through a chain of its own
/// when only some sources may reach the forward (the others reach the host, as they do
/// while the domain runs).
fn add_refusal(layout: &mut Layout, r: &Rule) {
    if r.sources.is_empty() {
        add_vmap_elem(layout, "stopped", r, "refuse");
        return;
    }
    let chain = format!("r_{}", r.id);
    add_vmap_elem(layout, "stopped", r, &chain);
    let fam = super::super::placement::nft_family(r.family);
    layout.chains.insert(
        chain,
        vec![
            format!("{fam} saddr != @s_{} return", r.id),
            format!("jump refuse comment \"{}\"", r.comment()),
        ],
    );
    layout
        .source_sets
        .insert(format!("s_{}", r.id), (r.family, r.sources.clone()));
}

fn add_chain(layout: &mut Layout, r: &Rule) {
    let chain = format!("f_{}", r.id);
    add_vmap_elem(layout, "listen", r, &chain);
    let fam = super::super::placement::nft_family(r.family);
    let mut rules = Vec::new();
    if !r.sources.is_empty() {
        let lo = if r.localhost {
            " ip saddr != 127.0.0.0/8"
        } else {
            ""
        };
        rules.push(format!("{fam} saddr != @s_{}{lo} return", r.id));
        layout
            .source_sets
            .insert(format!("s_{}", r.id), (r.family, r.sources.clone()));
    }
    if let Some(l) = &r.rate {
        rules.push(limit_rule(r, l, fam));
        if l.per == RatePer::Source {
            layout
                .meters
                .insert(format!("l_{}", r.id), (r.family, meter_timeout(l)));
        }
    }
    rules.push(format!(
        "{} comment \"{}\"",
        super::render::dnat_stmt(r),
        r.comment()
    ));
    layout.chains.insert(chain, rules);
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
