//! A ruleset's rules as the elements of the layout's maps and sets.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::declarations::{fam_suffix, ip_field, limit_rule, meter_timeout, port_field};
use super::{Data, Elem, Field, Layout, ListenKind, dnat_map, range_map};
use crate::model::{Family, PortRange, Proto, RatePer};
use crate::rules::{ListenOn, Rule};

/// The listen key fields of a rule for a listen kind (without proto and port).
pub(super) fn listen_fields(r: &Rule) -> (ListenKind, Vec<Field>) {
    match &r.listen {
        ListenOn::Address(a) => (ListenKind::Addr, vec![ip_field(*a)]),
        ListenOn::Interface(i) => (ListenKind::If, vec![Field::Ifname(i.clone())]),
        ListenOn::Any => (ListenKind::Any, vec![]),
    }
}

pub(super) fn key(prefix: &[Field], proto: Proto, ports: Field) -> Vec<Field> {
    let mut k = prefix.to_vec();
    k.push(Field::Proto(proto));
    k.push(ports);
    k
}

/// Adds the DNAT elements of a rule for a listen kind.
pub(super) fn add_dnat(layout: &mut Layout, r: &Rule, kind: ListenKind, prefix: &[Field]) {
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

pub(super) fn target_elem(r: &Rule) -> Elem {
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
pub(super) fn merged(targets: Vec<(IpAddr, Proto, PortRange)>) -> Vec<(IpAddr, Proto, PortRange)> {
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

pub(super) fn add_targets(layout: &mut Layout, prefix: &str, rules: &[&Rule]) {
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

/// Counting elements (packets and bytes in `traffic*`, new connections in `conns*`, the
/// same elements): one per guest target; a target shared by two rules counts for the first
/// of them (see [`traffic_owner`]).
pub(super) fn add_traffic(layout: &mut Layout, rules: &[&Rule]) {
    let mut seen_ranges: Vec<&Rule> = Vec::new();
    for r in rules {
        let s = fam_suffix(r.family);
        let range = if r.guest_ports.start == r.guest_ports.end {
            ""
        } else if !seen_ranges.iter().any(|s| {
            s.guest_ip == r.guest_ip && s.proto == r.proto && s.guest_ports.overlaps(&r.guest_ports)
        }) {
            seen_ranges.push(r);
            "_range"
        } else {
            continue;
        };
        layout
            .elements
            .entry(format!("traffic{range}{s}"))
            .or_default()
            .insert(target_elem(r));
    }
    // a copy, not the inserts again (a set's clone compares nothing)
    for set in ["4", "6", "_range4", "_range6"] {
        if let Some(elems) = layout.elements.get(&format!("traffic{set}")) {
            let copy = elems.clone();
            layout.elements.insert(format!("conns{set}"), copy);
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
pub(super) fn add_vmap_elem(layout: &mut Layout, prefix: &str, r: &Rule, chain: &str) {
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
pub(super) fn add_refusal(layout: &mut Layout, r: &Rule) {
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

pub(super) fn add_chain(layout: &mut Layout, r: &Rule) {
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
        crate::firewall::nftables::render::dnat_stmt(r),
        r.comment()
    ));
    layout.chains.insert(chain, rules);
}
