//! The nat table: DNAT by listen key (bucketed by port), localhost DNAT, and masquerade
//! for hairpin and localhost flows.
//!
//! Its chains hold [`Line`]s, each what one line is made of (a rule, and which of its
//! lines), and text is written only for the chains that are written. A hook's delta
//! compares the chains of the installed and the planned ruleset line by line and renders
//! the few its domain changes: rendering every forward's lines twice (old and new) was
//! most of a hook's own time at 1,000 forwards.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use super::rules::{comment, host, proto_match, script};
use crate::firewall::xtables::{Jump, TableSpec};
use crate::model::{Family, PortRange, Proto};
use crate::rules::{ListenOn, Rule, Ruleset};

/// One line of a nat chain.
#[derive(Debug, Clone)]
pub(super) enum Line<'a> {
    /// A jump or a fixed line.
    Text(String),
    /// A listen key's DNAT, for one allowed source (or all).
    Dnat(&'a Rule, Option<&'a IpNet>),
    /// localhost's DNAT (`OUTPUT`).
    LoDnat(&'a Rule),
    /// localhost's masquerade.
    LoMasq(&'a Rule),
    /// A hairpin flow's masquerade on a bridge's subnet.
    Hairpin(&'a Rule, &'a str, &'a IpNet),
}

impl PartialEq for Line<'_> {
    /// Lines are equal exactly when their texts are: they compare what the text shows.
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Line::Text(a), Line::Text(b)) => a == b,
            (Line::Dnat(a, s), Line::Dnat(b, t)) => {
                s == t && a.listen == b.listen && dnat_key(a) == dnat_key(b)
            }
            (Line::LoDnat(a), Line::LoDnat(b)) => dnat_key(a) == dnat_key(b),
            (Line::LoMasq(a), Line::LoMasq(b)) => hairpin_key(a) == hairpin_key(b),
            (Line::Hairpin(a, ab, an), Line::Hairpin(b, bb, bn)) => {
                ab == bb && an == bn && hairpin_key(a) == hairpin_key(b)
            }
            _ => false,
        }
    }
}

/// What a DNAT line shows of its rule besides its listen key and source: ports, target,
/// and the comment's id, domain and description.
type DnatKey<'a> = (
    &'a str,
    &'a str,
    Option<&'a str>,
    Proto,
    PortRange,
    IpAddr,
    PortRange,
);

fn dnat_key(r: &Rule) -> DnatKey<'_> {
    (
        &r.id,
        &r.domain,
        r.description.as_deref(),
        r.proto,
        r.host_ports,
        r.guest_ip,
        r.guest_ports,
    )
}

/// What a masquerade line shows of its rule (two forwards to one guest port share it).
fn hairpin_key(r: &Rule) -> (IpAddr, Proto, PortRange) {
    (r.guest_ip, r.proto, r.guest_ports)
}

impl Line<'_> {
    fn text(&self) -> String {
        match self {
            Line::Text(t) => t.clone(),
            Line::Dnat(r, src) => {
                let s = src.map(|s| format!("-s {s} ")).unwrap_or_default();
                let m = proto_match(r, &r.host_ports);
                match &r.listen {
                    ListenOn::Any => format!("{s}{m} {}", dnat_target(r)),
                    ListenOn::Address(a) => format!("{s}-d {} {m} {}", host(a), dnat_target(r)),
                    ListenOn::Interface(i) => format!("{s}-i {i} {m} {}", dnat_target(r)),
                }
            }
            Line::LoDnat(r) => format!(
                "-d 127.0.0.0/8 {} {}",
                proto_match(r, &r.host_ports),
                dnat_target(r)
            ),
            Line::LoMasq(r) => format!(
                "-s 127.0.0.0/8 -d {} {} -j MASQUERADE",
                host(&r.guest_ip),
                proto_match(r, &r.guest_ports)
            ),
            Line::Hairpin(r, bridge, subnet) => format!(
                "-s {subnet} -d {} -o {bridge} {} -j MASQUERADE",
                host(&r.guest_ip),
                proto_match(r, &r.guest_ports)
            ),
        }
    }
}

fn dnat_target(r: &Rule) -> String {
    format!("{} -j DNAT --to-destination {}", comment(r), to_dest(r))
}

pub(super) fn to_dest(r: &Rule) -> String {
    let ip = match r.guest_ip {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    };
    let (h, g) = (&r.host_ports, &r.guest_ports);
    if h.start == h.end {
        format!("{ip}:{}", g.start)
    } else if h == g {
        ip
    } else {
        // shifted port map: host port h maps to g.start + (h - h.start)
        format!("{ip}:{}-{}/{}", g.start, g.end, h.start)
    }
}

/// The chains of the nat table, in order, with their lines.
pub(super) type Chains<'a> = Vec<(String, Vec<Line<'a>>)>;

/// DNAT rules keyed by (protocol, host ports), spread over chains by port so that a new
/// connection walks a few dozen rules, not one per forward: `VIRTGATE_DNAT` jumps by
/// `port >> 10` to `VIRTGATE_D<p><hi>`, which jumps by `port >> 5` to
/// `VIRTGATE_D<p><hi>_<lo>` holding the rules of 32 ports. A port range that does not fit
/// one such chain stays in the top chain. Few rules stay in the top chain as they are.
pub(super) fn bucketed<'a>(top: &str, rules: Vec<(Proto, PortRange, Line<'a>)>) -> Chains<'a> {
    const FLAT: usize = 32;
    if rules.len() <= FLAT {
        return vec![(top.to_string(), rules.into_iter().map(|r| r.2).collect())];
    }
    let mut wide = Vec::new();
    // (proto, hi) -> lo -> rules
    let mut tree: BTreeMap<(Proto, u16), BTreeMap<u16, Vec<Line>>> = BTreeMap::new();
    for (proto, ports, rule) in rules {
        if ports.start >> 5 == ports.end >> 5 {
            tree.entry((proto, ports.start >> 10))
                .or_default()
                .entry((ports.start >> 5) & 31)
                .or_default()
                .push(rule);
        } else {
            wide.push(rule);
        }
    }
    let letter = |p: Proto| match p {
        Proto::Tcp => "T",
        Proto::Udp => "U",
        Proto::Sctp => "S",
    };
    let mut top_rules = wide;
    let mut chains = Vec::new();
    for ((proto, hi), leaves) in tree {
        let mid = format!("{top}_{}{hi}", letter(proto));
        let lo_port = hi << 10;
        top_rules.push(Line::Text(format!(
            "-p {proto} -m {proto} --dport {}:{} -j {mid}",
            lo_port,
            lo_port | 1023
        )));
        let mut mid_rules = Vec::new();
        for (lo, rules) in leaves {
            let leaf = format!("{mid}_{lo}");
            let start = lo_port | (lo << 5);
            mid_rules.push(Line::Text(format!(
                "-p {proto} -m {proto} --dport {}:{} -j {leaf}",
                start,
                start | 31
            )));
            chains.push((leaf, rules));
        }
        chains.push((mid, mid_rules));
    }
    chains.insert(0, (top.to_string(), top_rules));
    chains
}

/// Rules that each match one guest address, without duplicates (forwards of several host
/// ports to one guest port masquerade alike), spread over chains by address the way
/// [`bucketed`] spreads by port: `TOP` jumps by the address's `/22` (IPv4; `/118` for
/// IPv6) to `TOP_<n>`, which jumps by its `/27` (`/123`) to `TOP_<n>_<m>` holding the
/// rules of 32 addresses. So a domain starting or stopping rewrites the chain of its own
/// 32 addresses, not one rule per forward installed. Few rules stay in `TOP` as they are.
pub(super) fn bucketed_by_address<'a>(top: &str, rules: Vec<(IpAddr, Line<'a>)>) -> Chains<'a> {
    const FLAT: usize = 32;
    let mut unique: Vec<(IpAddr, Line)> = Vec::with_capacity(rules.len());
    let (mut seen, mut seen_text) = (BTreeSet::new(), BTreeSet::new());
    for (ip, line) in rules {
        let new = match &line {
            Line::Hairpin(r, ..) => seen.insert(hairpin_key(r)),
            other => seen_text.insert(other.text()),
        };
        if new {
            unique.push((ip, line));
        }
    }
    if unique.len() <= FLAT {
        return vec![(top.to_string(), unique.into_iter().map(|r| r.1).collect())];
    }
    // (address >> 10) -> (address >> 5) -> rules; the numbers in the names are their low
    // bits (two blocks sharing a name share its chain: every rule matches one address)
    let mut tree: BTreeMap<(u128, u8), BTreeMap<u128, Vec<Line>>> = BTreeMap::new();
    for (ip, rule) in unique {
        let (bits, width) = match ip {
            IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
            IpAddr::V6(a) => (u128::from(a), 128),
        };
        tree.entry((bits >> 10, width))
            .or_default()
            .entry(bits >> 5)
            .or_default()
            .push(rule);
    }
    let prefix = |block: u128, shift: u8, width: u8| -> String {
        let base = block << shift;
        let ip = if width == 32 {
            IpAddr::V4(std::net::Ipv4Addr::from(base as u32))
        } else {
            IpAddr::V6(std::net::Ipv6Addr::from(base))
        };
        format!("{ip}/{}", width - shift)
    };
    let mut by_name: BTreeMap<String, Vec<Line>> = BTreeMap::new();
    let mut top_rules = Vec::new();
    for ((hi, width), leaves) in tree {
        let mid = format!("{top}_{}", hi & 0x3fff);
        top_rules.push(Line::Text(format!("-d {} -j {mid}", prefix(hi, 10, width))));
        for (lo, rules) in leaves {
            let leaf = format!("{mid}_{}", lo & 31);
            by_name
                .entry(mid.clone())
                .or_default()
                .push(Line::Text(format!("-d {} -j {leaf}", prefix(lo, 5, width))));
            by_name.entry(leaf).or_default().extend(rules);
        }
    }
    let mut chains = vec![(top.to_string(), top_rules)];
    chains.extend(by_name);
    chains
}

/// The hairpin lines of one (bridge, subnet), by guest address.
type HairpinGroup<'a> = ((&'a str, &'a IpNet), Vec<(IpAddr, Line<'a>)>);

/// The nat lines of the rules, by the chain they go to.
#[derive(Default)]
struct NatLines<'a> {
    /// By listen interface (PREROUTING only).
    pre: Vec<Line<'a>>,
    /// By port (bucketed): listen on every or one address.
    dnat: Vec<(Proto, PortRange, Line<'a>)>,
    /// localhost DNAT (OUTPUT).
    out: Vec<Line<'a>>,
    /// Hairpin masquerade per (bridge, subnet), by guest address (duplicates included).
    /// Few: one per libvirt network.
    hairpin: Vec<HairpinGroup<'a>>,
    /// localhost masquerade.
    lo_masq: Vec<Line<'a>>,
}

impl<'a> NatLines<'a> {
    fn add(&mut self, rs: &'a Ruleset, r: &'a Rule) {
        let srcs: Vec<Option<&IpNet>> = if r.sources.is_empty() {
            vec![None]
        } else {
            r.sources.iter().map(Some).collect()
        };
        for s in srcs {
            match &r.listen {
                ListenOn::Interface(_) => self.pre.push(Line::Dnat(r, s)),
                _ => self.dnat.push((r.proto, r.host_ports, Line::Dnat(r, s))),
            }
        }
        if r.localhost {
            self.out.push(Line::LoDnat(r));
            self.lo_masq.push(Line::LoMasq(r));
        }
        for h in rs
            .hairpins
            .iter()
            .filter(|h| h.bridge == r.bridge && h.subnet.contains(&r.guest_ip))
        {
            let key = (h.bridge.as_str(), &h.subnet);
            let line = (r.guest_ip, Line::Hairpin(r, &h.bridge, &h.subnet));
            match self.hairpin.iter_mut().find(|(k, _)| *k == key) {
                Some((_, lines)) => lines.push(line),
                None => self.hairpin.push((key, vec![line])),
            }
        }
    }
}

/// The nat chains of a family's rules (none without rules).
pub(super) fn nat_chains<'a>(rs: &'a Ruleset, rules: &[&'a Rule], family: Family) -> Chains<'a> {
    if rules.is_empty() {
        return Vec::new();
    }
    let mut l = NatLines::default();
    for r in rules {
        l.add(rs, r);
    }
    let NatLines {
        mut pre,
        dnat,
        mut out,
        mut hairpin,
        lo_masq,
    } = l;
    // numbered in the order of (bridge, subnet as written)
    hairpin.sort_by_cached_key(|((bridge, subnet), _)| (*bridge, subnet.to_string()));
    let text = |s: &str| Line::Text(s.to_string());
    pre.push(text("-j VIRTGATE_DNAT"));
    out.push(text(match family {
        Family::Ipv4 => "-d 127.0.0.0/8 -j RETURN",
        Family::Ipv6 => "-d ::1/128 -j RETURN",
    }));
    out.push(text("-j VIRTGATE_DNAT"));
    // postrouting: only DNAT'ed flows, dispatched by where they come from
    let mut post = vec![text("-m conntrack ! --ctstate DNAT -j RETURN")];
    let mut post_chains = Vec::new();
    if !lo_masq.is_empty() {
        post.push(text("-s 127.0.0.0/8 -j VIRTGATE_LOCALHOST"));
        post_chains.push(("VIRTGATE_LOCALHOST".to_string(), lo_masq));
    }
    for (i, ((bridge, subnet), rules)) in hairpin.into_iter().enumerate() {
        let chain = format!("VIRTGATE_HAIRPIN{i}");
        post.push(Line::Text(format!("-s {subnet} -o {bridge} -j {chain}")));
        post_chains.extend(bucketed_by_address(&chain, rules));
    }
    let mut chains = bucketed("VIRTGATE_DNAT", dnat);
    chains.push(("VIRTGATE_PREROUTING".into(), pre));
    chains.push(("VIRTGATE_OUTPUT".into(), out));
    chains.push(("VIRTGATE_POSTROUTING".into(), post));
    chains.extend(post_chains);
    chains
}

pub(super) fn rendered(lines: &[Line]) -> Vec<String> {
    lines.iter().map(Line::text).collect()
}

/// The whole nat table of a family's rules.
pub(super) fn nat_spec(rs: &Ruleset, rules: &[&Rule], family: Family) -> TableSpec {
    let chains = nat_chains(rs, rules, family);
    TableSpec {
        table: "nat",
        jumps: if chains.is_empty() {
            Vec::new()
        } else {
            nat_jumps()
        },
        chains: chains
            .into_iter()
            .map(|(name, lines)| {
                let text = rendered(&lines);
                (name, text)
            })
            .collect(),
    }
}

/// The restore script that turns the nat chains `old` into `new`, rendering only the
/// chains whose lines differ, or None when the table appears or goes (its jumps change:
/// the whole table is written then).
pub(super) fn nat_delta(old: &Chains, new: &Chains) -> Option<String> {
    if old.is_empty() != new.is_empty() {
        return None;
    }
    let before: BTreeMap<&str, &Vec<Line>> = old.iter().map(|(n, l)| (n.as_str(), l)).collect();
    let after: BTreeSet<&str> = new.iter().map(|(n, _)| n.as_str()).collect();
    let changed: Vec<(&String, Vec<String>)> = new
        .iter()
        .filter(|(n, l)| before.get(n.as_str()) != Some(&l))
        .map(|(n, l)| (n, rendered(l)))
        .collect();
    let removed: Vec<&String> = old
        .iter()
        .map(|(n, _)| n)
        .filter(|n| !after.contains(n.as_str()))
        .collect();
    Some(script("nat", &changed, &removed))
}

/// The jumps from the built-in nat chains to virtgate's.
fn nat_jumps() -> Vec<Jump> {
    vec![
        Jump {
            builtin: "PREROUTING",
            matches: "-m addrtype --dst-type LOCAL",
            target: "VIRTGATE_PREROUTING".into(),
        },
        Jump {
            builtin: "OUTPUT",
            matches: "-m addrtype --dst-type LOCAL",
            target: "VIRTGATE_OUTPUT".into(),
        },
        Jump {
            builtin: "POSTROUTING",
            matches: "",
            target: "VIRTGATE_POSTROUTING".into(),
        },
    ]
}
