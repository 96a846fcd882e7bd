//! virtgate's chains as `iptables-restore` lines, per table, whole or as a delta.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::firewall::placement;
use crate::firewall::xtables::{Jump, TableSpec};
use crate::model::{Family, PortRange, Proto};
use crate::rules::{ListenOn, Rule, Ruleset};

pub(super) fn host(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}/32"),
        IpAddr::V6(a) => format!("{a}/128"),
    }
}

pub(super) fn dport(p: &PortRange) -> String {
    if p.start == p.end {
        p.start.to_string()
    } else {
        format!("{}:{}", p.start, p.end)
    }
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

pub(super) fn proto_match(r: &Rule, ports: &PortRange) -> String {
    format!("-p {0} -m {0} --dport {1}", r.proto, dport(ports))
}

pub(super) fn comment(r: &Rule) -> String {
    format!("-m comment --comment \"vg:{} {}\"", r.id, r.comment())
}

/// DNAT rules keyed by (protocol, host ports), spread over chains by port so that a new
/// connection walks a few dozen rules, not one per forward: `VIRTGATE_DNAT` jumps by
/// `port >> 10` to `VIRTGATE_D<p><hi>`, which jumps by `port >> 5` to
/// `VIRTGATE_D<p><hi>_<lo>` holding the rules of 32 ports. A port range that does not fit
/// one such chain stays in the top chain. Few rules stay in the top chain as they are.
pub(super) fn bucketed(
    top: &str,
    rules: Vec<(Proto, PortRange, String)>,
) -> Vec<(String, Vec<String>)> {
    const FLAT: usize = 32;
    if rules.len() <= FLAT {
        return vec![(top.to_string(), rules.into_iter().map(|r| r.2).collect())];
    }
    let mut wide = Vec::new();
    // (proto, hi) -> lo -> rules
    let mut tree: BTreeMap<(Proto, u16), BTreeMap<u16, Vec<String>>> = BTreeMap::new();
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
        top_rules.push(format!(
            "-p {proto} -m {proto} --dport {}:{} -j {mid}",
            lo_port,
            lo_port | 1023
        ));
        let mut mid_rules = Vec::new();
        for (lo, rules) in leaves {
            let leaf = format!("{mid}_{lo}");
            let start = lo_port | (lo << 5);
            mid_rules.push(format!(
                "-p {proto} -m {proto} --dport {}:{} -j {leaf}",
                start,
                start | 31
            ));
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
pub(super) fn bucketed_by_address(
    top: &str,
    rules: Vec<(IpAddr, String)>,
) -> Vec<(String, Vec<String>)> {
    const FLAT: usize = 32;
    let mut seen = std::collections::BTreeSet::new();
    let rules: Vec<(IpAddr, String)> = rules
        .into_iter()
        .filter(|(_, r)| seen.insert(r.clone()))
        .collect();
    if rules.len() <= FLAT {
        return vec![(top.to_string(), rules.into_iter().map(|r| r.1).collect())];
    }
    // (address >> 10) -> (address >> 5) -> rules; the numbers in the names are their low
    // bits (two blocks sharing a name share its chain: every rule matches one address)
    let mut tree: BTreeMap<(u128, u8), BTreeMap<u128, Vec<String>>> = BTreeMap::new();
    for (ip, rule) in rules {
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
    let mut by_name: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut top_rules = Vec::new();
    for ((hi, width), leaves) in tree {
        let mid = format!("{top}_{}", hi & 0x3fff);
        top_rules.push(format!("-d {} -j {mid}", prefix(hi, 10, width)));
        for (lo, rules) in leaves {
            let leaf = format!("{mid}_{}", lo & 31);
            by_name
                .entry(mid.clone())
                .or_default()
                .push(format!("-d {} -j {leaf}", prefix(lo, 5, width)));
            by_name.entry(leaf).or_default().extend(rules);
        }
    }
    let mut chains = vec![(top.to_string(), top_rules)];
    chains.extend(by_name);
    chains
}

/// Both families' table specs: nat (DNAT, hairpin and localhost masquerade), filter
/// (the accept where libvirt's iptables form needs it, stopped domains' refusals) and
/// mangle (rate limits).
pub fn specs(rs: &Ruleset, family: Family) -> Vec<TableSpec> {
    let (refusals, rules): (Vec<&Rule>, Vec<&Rule>) = rs
        .rules
        .iter()
        .filter(|r| r.family == family)
        .partition(|r| r.refuses());
    vec![
        nat_spec(rs, &rules, family),
        filter_spec(rs, &refusals, family),
        mangle_spec(&rules),
    ]
}

/// DNAT by listen key (bucketed by port), localhost DNAT, and masquerade for hairpin and
/// localhost flows.
pub(super) fn nat_spec(rs: &Ruleset, rules: &[&Rule], family: Family) -> TableSpec {
    let mut nat = TableSpec {
        table: "nat",
        ..Default::default()
    };
    if rules.is_empty() {
        return nat;
    }
    let mut l = NatLines::default();
    for r in rules {
        l.add(rs, r);
    }
    let NatLines {
        mut pre,
        dnat,
        mut out,
        hairpin,
        lo_masq,
    } = l;
    pre.push("-j VIRTGATE_DNAT".into());
    if family == Family::Ipv4 {
        out.push("-d 127.0.0.0/8 -j RETURN".into());
    } else {
        out.push("-d ::1/128 -j RETURN".into());
    }
    out.push("-j VIRTGATE_DNAT".into());
    // postrouting: only DNAT'ed flows, dispatched by where they come from
    let mut post = vec!["-m conntrack ! --ctstate DNAT -j RETURN".to_string()];
    let mut post_chains = Vec::new();
    if !lo_masq.is_empty() {
        post.push("-s 127.0.0.0/8 -j VIRTGATE_LOCALHOST".into());
        post_chains.push(("VIRTGATE_LOCALHOST".to_string(), lo_masq));
    }
    for (i, ((bridge, subnet), rules)) in hairpin.into_iter().enumerate() {
        let chain = format!("VIRTGATE_HAIRPIN{i}");
        post.push(format!("-s {subnet} -o {bridge} -j {chain}"));
        post_chains.extend(bucketed_by_address(&chain, rules));
    }
    nat.chains = bucketed("VIRTGATE_DNAT", dnat);
    nat.chains.push(("VIRTGATE_PREROUTING".into(), pre));
    nat.chains.push(("VIRTGATE_OUTPUT".into(), out));
    nat.chains.push(("VIRTGATE_POSTROUTING".into(), post));
    nat.chains.extend(post_chains);
    nat.jumps = nat_jumps();
    nat
}

/// The nat lines of the rules, by the chain they go to.
#[derive(Default)]
struct NatLines {
    /// By listen interface (PREROUTING only).
    pre: Vec<String>,
    /// By port (bucketed): listen on every or one address.
    dnat: Vec<(Proto, PortRange, String)>,
    /// localhost DNAT (OUTPUT).
    out: Vec<String>,
    /// Hairpin masquerade per (bridge, subnet), by guest address (duplicates included).
    hairpin: BTreeMap<(String, String), Vec<(IpAddr, String)>>,
    /// localhost masquerade.
    lo_masq: Vec<String>,
}

impl NatLines {
    fn add(&mut self, rs: &Ruleset, r: &Rule) {
        let m = proto_match(r, &r.host_ports);
        let target = format!("{} -j DNAT --to-destination {}", comment(r), to_dest(r));
        let srcs: Vec<String> = if r.sources.is_empty() {
            vec![String::new()]
        } else {
            r.sources.iter().map(|s| format!("-s {s} ")).collect()
        };
        for s in &srcs {
            match &r.listen {
                ListenOn::Any => {
                    self.dnat
                        .push((r.proto, r.host_ports, format!("{s}{m} {target}")))
                }
                ListenOn::Address(a) => self.dnat.push((
                    r.proto,
                    r.host_ports,
                    format!("{s}-d {} {m} {target}", host(a)),
                )),
                ListenOn::Interface(i) => self.pre.push(format!("{s}-i {i} {m} {target}")),
            }
        }
        if r.localhost {
            self.out.push(format!("-d 127.0.0.0/8 {m} {target}"));
            self.lo_masq.push(format!(
                "-s 127.0.0.0/8 -d {} {} -j MASQUERADE",
                host(&r.guest_ip),
                proto_match(r, &r.guest_ports)
            ));
        }
        for h in rs
            .hairpins
            .iter()
            .filter(|h| h.bridge == r.bridge && h.subnet.contains(&r.guest_ip))
        {
            self.hairpin
                .entry((h.bridge.clone(), h.subnet.to_string()))
                .or_default()
                .push((
                    r.guest_ip,
                    format!(
                        "-s {} -d {} -o {} {} -j MASQUERADE",
                        h.subnet,
                        host(&r.guest_ip),
                        h.bridge,
                        proto_match(r, &r.guest_ports)
                    ),
                ));
        }
    }
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

/// The accept per bridge where libvirt's iptables form (or someone's `FORWARD`) needs
/// it, and stopped domains' refusals in `INPUT`.
pub(super) fn filter_spec(rs: &Ruleset, refusals: &[&Rule], family: Family) -> TableSpec {
    let mut filter = TableSpec {
        table: "filter",
        ..Default::default()
    };
    if placement::needs_xt(&rs.accepts, family) {
        // one accept per bridge for DNAT'ed flows (per forward, every packet of every
        // flow would walk one rule per forward)
        filter.chains = vec![(
            placement::XT_FORWARD.into(),
            placement::xt_bridge_rules(&rs.accepts, family),
        )];
        filter.jumps = vec![Jump {
            builtin: "FORWARD",
            matches: "",
            target: placement::XT_FORWARD.into(),
        }];
    }
    if !refusals.is_empty() {
        filter
            .chains
            .push((XT_INPUT.into(), refusal_rules(refusals, family)));
        filter.jumps.push(Jump {
            builtin: "INPUT",
            matches: "",
            target: XT_INPUT.into(),
        });
    }
    filter
}

/// Rate limits: before DNAT (nat cannot drop), for what reaches a listen key of the host.
pub(super) fn mangle_spec(rules: &[&Rule]) -> TableSpec {
    let mut mangle = TableSpec {
        table: "mangle",
        ..Default::default()
    };
    let limited: Vec<&Rule> = rules.iter().copied().filter(|r| r.rate.is_some()).collect();
    if !limited.is_empty() {
        mangle.chains = vec![(XT_LIMIT.into(), limit_rules(&limited))];
        for builtin in ["PREROUTING", "OUTPUT"] {
            mangle.jumps.push(Jump {
                builtin,
                matches: "-m addrtype --dst-type LOCAL",
                target: XT_LIMIT.into(),
            });
        }
    }
    mangle
}

/// The matches of a rule's listen key (address or interface, protocol, host ports), one
/// per allowed source, as iptables-save writes them.
pub(super) fn listen_matches(r: &Rule) -> Vec<String> {
    let m = proto_match(r, &r.host_ports);
    let on = match &r.listen {
        ListenOn::Any => String::new(),
        ListenOn::Address(a) => format!("-d {} ", host(a)),
        ListenOn::Interface(i) => format!("-i {i} "),
    };
    if r.sources.is_empty() {
        return vec![format!("{on}{m}")];
    }
    r.sources
        .iter()
        .map(|s| format!("-s {s} {on}{m}"))
        .collect()
}

/// The chain of rate limits, jumped to from mangle's `PREROUTING` and `OUTPUT`.
pub const XT_LIMIT: &str = "VIRTGATE_LIMIT";

/// New connections over a forward's rate are dropped: one hashlimit per forward (its
/// name from the rule id, at most 15 characters), by client address or for all.
pub(super) fn limit_rules(limited: &[&Rule]) -> Vec<String> {
    let mut v = Vec::new();
    for r in limited {
        let Some(l) = r.rate else { continue };
        let unit = match l.unit {
            crate::model::RateUnit::Second => "sec",
            crate::model::RateUnit::Minute => "min",
            crate::model::RateUnit::Hour => "hour",
            crate::model::RateUnit::Day => "day",
        };
        let mode = match l.per {
            crate::model::RatePer::Source => " --hashlimit-mode srcip",
            crate::model::RatePer::Forward => "",
        };
        let name: String = format!("vg{}", &r.id[..r.id.len().min(13)]);
        let hl = format!(
            "-m conntrack --ctstate NEW -m hashlimit --hashlimit-above {}/{unit} --hashlimit-burst {}{mode} --hashlimit-name {name}",
            l.count, l.burst
        );
        for m in listen_matches(r) {
            v.push(format!("{m} {hl} {} -j DROP", comment(r)));
        }
    }
    v
}

/// The chain of stopped domains' refused ports, jumped to from `INPUT`.
pub const XT_INPUT: &str = "VIRTGATE_INPUT";

/// Stopped domains' refused ports: a TCP reset, an ICMP port unreachable otherwise
/// (loopback is never forwarded by a listen key: left alone).
pub(super) fn refusal_rules(refusals: &[&Rule], family: Family) -> Vec<String> {
    let mut v = vec![match family {
        Family::Ipv4 => "-d 127.0.0.0/8 -j RETURN".to_string(),
        Family::Ipv6 => "-d ::1/128 -j RETURN".to_string(),
    }];
    for r in refusals {
        let how = match (r.proto, family) {
            (Proto::Tcp, _) => "--reject-with tcp-reset",
            (_, Family::Ipv4) => "--reject-with icmp-port-unreachable",
            (_, Family::Ipv6) => "--reject-with icmp6-port-unreachable",
        };
        for m in listen_matches(r) {
            v.push(format!("{m} {} -j REJECT {how}", comment(r)));
        }
    }
    v
}

/// The restore script that turns `old` into `new` for one table, touching only the chains
/// whose rules differ (each rewritten whole), or None when the jumps from built-in
/// chains would change too (then the whole table is rewritten).
pub(super) fn delta_script(old: &TableSpec, new: &TableSpec) -> Option<String> {
    if old.jumps != new.jumps || old.chains.is_empty() != new.chains.is_empty() {
        return None;
    }
    let before: BTreeMap<&String, &Vec<String>> = old.chains.iter().map(|(n, r)| (n, r)).collect();
    let after: BTreeMap<&String, &Vec<String>> = new.chains.iter().map(|(n, r)| (n, r)).collect();
    let changed: Vec<(&String, &Vec<String>)> = new
        .chains
        .iter()
        .filter(|(n, r)| before.get(n) != Some(&r))
        .map(|(n, r)| (n, r))
        .collect();
    let removed: Vec<&String> = old
        .chains
        .iter()
        .map(|(n, _)| n)
        .filter(|n| !after.contains_key(n))
        .collect();
    if changed.is_empty() && removed.is_empty() {
        return Some(String::new());
    }
    let mut s = format!("*{}\n", new.table);
    // declaring a chain in --noflush mode creates it or flushes it
    for (name, _) in &changed {
        s.push_str(&format!(":{name} - [0:0]\n"));
    }
    for (name, rules) in &changed {
        for r in rules.iter() {
            s.push_str(&format!("-A {name} {r}\n"));
        }
    }
    for name in &removed {
        s.push_str(&format!(":{name} - [0:0]\n"));
    }
    for name in &removed {
        s.push_str(&format!("-X {name}\n"));
    }
    s.push_str("COMMIT\n");
    Some(s)
}
