//! virtgate's chains as `iptables-restore` lines, per table, whole or as a delta.

use std::collections::BTreeMap;
use std::fmt::Write as _;
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

pub(super) fn proto_match(r: &Rule, ports: &PortRange) -> String {
    format!("-p {0} -m {0} --dport {1}", r.proto, dport(ports))
}

pub(super) fn comment(r: &Rule) -> String {
    format!("-m comment --comment \"vg:{} {}\"", r.id, r.comment())
}

/// A family's rules: stopped domains' refusals, and the others.
fn by_refusal(rs: &Ruleset, family: Family) -> (Vec<&Rule>, Vec<&Rule>) {
    rs.rules
        .iter()
        .filter(|r| r.family == family)
        .partition(|r| r.refuses())
}

/// Both families' table specs: nat (DNAT, hairpin and localhost masquerade), filter
/// (the accept where libvirt's iptables form needs it, stopped domains' refusals) and
/// mangle (rate limits).
pub fn specs(rs: &Ruleset, family: Family) -> Vec<TableSpec> {
    let (refusals, rules) = by_refusal(rs, family);
    vec![
        super::nat::nat_spec(rs, &rules, family),
        filter_spec(rs, &refusals, family),
        mangle_spec(&rules),
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
    let changed: Vec<(&String, Vec<String>)> = new
        .chains
        .iter()
        .filter(|(n, r)| before.get(n) != Some(&r))
        .map(|(n, r)| (n, r.clone()))
        .collect();
    let removed: Vec<&String> = old
        .chains
        .iter()
        .map(|(n, _)| n)
        .filter(|n| !after.contains_key(n))
        .collect();
    Some(script(new.table, &changed, &removed))
}

/// The `--noflush` restore script that rewrites the `changed` chains whole and deletes
/// the `removed` ones (nothing when neither has any).
pub(super) fn script(
    table: &str,
    changed: &[(&String, Vec<String>)],
    removed: &[&String],
) -> String {
    if changed.is_empty() && removed.is_empty() {
        return String::new();
    }
    let mut s = format!("*{table}\n");
    // declaring a chain in --noflush mode creates it or flushes it
    for (name, _) in changed {
        let _ = writeln!(s, ":{name} - [0:0]");
    }
    for (name, rules) in changed {
        for r in rules {
            let _ = writeln!(s, "-A {name} {r}");
        }
    }
    for name in removed {
        let _ = writeln!(s, ":{name} - [0:0]");
    }
    for name in removed {
        let _ = writeln!(s, "-X {name}");
    }
    s.push_str("COMMIT\n");
    s
}

/// The restore script that turns `old`'s rules of `family` into `new`'s, table by table
/// (mangle, filter, then nat: the rate limit and the accept before the DNAT), or None
/// where a table's jumps change (the whole ruleset is written then).
pub fn delta_scripts(old: &Ruleset, new: &Ruleset, family: Family) -> Option<String> {
    let (o_refused, o_rules) = by_refusal(old, family);
    let (n_refused, n_rules) = by_refusal(new, family);
    let mut out = delta_script(&mangle_spec(&o_rules), &mangle_spec(&n_rules))?;
    out.push_str(&delta_script(
        &filter_spec(old, &o_refused, family),
        &filter_spec(new, &n_refused, family),
    )?);
    out.push_str(&super::nat::nat_delta(
        &super::nat::nat_chains(old, &o_rules, family),
        &super::nat::nat_chains(new, &n_rules, family),
    )?);
    Some(out)
}
