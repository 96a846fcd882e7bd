//! A change as a delta: the elements, chains and sets that differ between the installed
//! and the planned ruleset, in one transaction.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use super::TABLE;
use super::layout::{Elem, Layout, declarations};
use super::render::{elements_stmt, meter_decl, refusal_chains, source_set_decl};
use crate::exec;
use crate::firewall::{FirewallError, nfnl};
use crate::rules::{Rule, Ruleset};

/// What turns one layout into another: element changes per set, and `nft` statements for
/// the chains and source sets of forwards with an allow-list.
#[derive(Debug, Default)]
pub(super) struct Delta<'a> {
    pub(super) gone: Vec<(&'a String, Vec<&'a Elem>)>,
    pub(super) added: Vec<(&'a String, Vec<&'a Elem>)>,
    /// Statements between the element deletions and additions.
    pub(super) statements: String,
}

impl Delta<'_> {
    /// The whole delta as `nft -f` text.
    pub(super) fn text(&self) -> String {
        let mut out = String::new();
        let texts = |v: &[&Elem]| {
            v.iter()
                .map(|e| super::encode::elem_text(e))
                .collect::<Vec<_>>()
        };
        for (set, gone) in &self.gone {
            elements_stmt(&mut out, "delete", set, &texts(gone));
        }
        out.push_str(&self.statements);
        for (set, added) in &self.added {
            elements_stmt(&mut out, "add", set, &texts(added));
        }
        out
    }

    /// The delta as a netlink batch, when it is element changes only.
    pub(super) fn batch(&self) -> Option<nfnl::Batch> {
        if !self.statements.is_empty() {
            return None;
        }
        let interval: BTreeSet<String> = declarations()
            .into_iter()
            .filter(|d| d.interval)
            .map(|d| d.name)
            .collect();
        let mut b = nfnl::Batch::default();
        let bytes = |set: &String, v: &[&Elem]| {
            v.iter()
                .map(|e| super::encode::elem_netlink(e, interval.contains(set)))
                .collect::<Vec<_>>()
        };
        for (set, gone) in &self.gone {
            b.delete(TABLE, set, &bytes(set, gone));
        }
        for (set, added) in &self.added {
            b.add(TABLE, set, &bytes(set, added));
        }
        Some(b)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.gone.is_empty() && self.added.is_empty() && self.statements.is_empty()
    }
}

/// The changes that turn `old` into `new` (elements, chains and source sets only).
pub(super) fn delta<'a>(old: &'a Layout, new: &'a Layout) -> Delta<'a> {
    static EMPTY: BTreeSet<Elem> = BTreeSet::new();
    let mut d = Delta::default();
    let empty = &EMPTY;
    let sets: BTreeSet<&String> = old.elements.keys().chain(new.elements.keys()).collect();
    for set in sets {
        let o = old.elements.get(set).unwrap_or(empty);
        let n = new.elements.get(set).unwrap_or(empty);
        let gone: Vec<&Elem> = o.difference(n).collect();
        let added: Vec<&Elem> = n.difference(o).collect();
        if !gone.is_empty() {
            d.gone.push((set, gone));
        }
        if !added.is_empty() {
            d.added.push((set, added));
        }
    }
    let out = &mut d.statements;
    // the refusal chains come first and go last: other chains jump to `refuse`
    if new.refusals && !old.refusals {
        for c in refusal_chains() {
            let hook = c.hook.map(|h| format!(" {{ {h} }}")).unwrap_or_default();
            let _ = writeln!(out, "add chain inet {TABLE} {}{hook}", c.name);
            for r in &c.rules {
                let _ = writeln!(out, "add rule inet {TABLE} {} {r}", c.name);
            }
        }
    }
    take_out_changed(out, old, new);
    put_in_changed(out, old, new);
    if old.refusals && !new.refusals {
        for c in refusal_chains().iter().rev() {
            let _ = writeln!(out, "delete chain inet {TABLE} {}", c.name);
        }
    }
    d
}

/// Flushes or deletes the chains, source sets and meters of `old` that `new` has not, or
/// has otherwise.
fn take_out_changed(out: &mut String, old: &Layout, new: &Layout) {
    for (name, rules) in &old.chains {
        match new.chains.get(name) {
            Some(r) if r == rules => {}
            _ => {
                let _ = writeln!(out, "flush chain inet {TABLE} {name}");
            }
        }
        if !new.chains.contains_key(name) {
            let _ = writeln!(out, "delete chain inet {TABLE} {name}");
        }
    }
    for (name, (fam, nets)) in &old.source_sets {
        match new.source_sets.get(name) {
            Some((f, n)) if f == fam && n == nets => {}
            Some(_) => {
                let _ = writeln!(out, "flush set inet {TABLE} {name}");
            }
            None => {
                let _ = writeln!(out, "delete set inet {TABLE} {name}");
            }
        }
    }
    for (name, m) in &old.meters {
        if new.meters.get(name) != Some(m) {
            let _ = writeln!(out, "delete set inet {TABLE} {name}");
        }
    }
}

/// Adds the meters, source sets and chains of `new` that `old` has not, or has otherwise
/// (sets before the chains that use them).
fn put_in_changed(out: &mut String, old: &Layout, new: &Layout) {
    for (name, m) in &new.meters {
        if old.meters.get(name) != Some(m) {
            let _ = writeln!(
                out,
                "add set inet {TABLE} {name} {{ {} }}",
                meter_decl(m.0, m.1)
            );
        }
    }
    for (name, (fam, nets)) in &new.source_sets {
        if old.source_sets.get(name) == Some(&(*fam, nets.clone())) {
            continue;
        }
        let decl = source_set_decl(name, *fam, nets);
        let _ = writeln!(
            out,
            "add set inet {TABLE} {name} {{ type {}; flags interval; }}",
            decl.key_type
        );
        let e: Vec<String> = nets.iter().map(IpNet::to_string).collect();
        elements_stmt(out, "add", name, &e);
    }
    for (name, rules) in &new.chains {
        if old.chains.get(name) == Some(rules) {
            continue;
        }
        let _ = writeln!(out, "add chain inet {TABLE} {name}");
        for r in rules {
            let _ = writeln!(out, "add rule inet {TABLE} {name} {r}");
        }
    }
}

/// Rules in one list but not the other (both sorted, as [`Ruleset`] keeps them): a merge,
/// linear in the number of rules.
pub(super) fn changed_rules<'a>(a: &'a [Rule], b: &'a [Rule]) -> impl Iterator<Item = &'a Rule> {
    let sorted = |v: &'a [Rule]| {
        let mut r: Vec<&Rule> = v.iter().collect();
        if !v.is_sorted() {
            r.sort();
        }
        r
    };
    let (a, b) = (sorted(a), sorted(b));
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() || j < b.len() {
        match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) if x == y => {
                i += 1;
                j += 1;
            }
            (Some(x), Some(y)) if x < y => {
                out.push(*x);
                i += 1;
            }
            (Some(_), Some(y)) => {
                out.push(*y);
                j += 1;
            }
            (Some(x), None) => {
                out.push(*x);
                i += 1;
            }
            (None, Some(y)) => {
                out.push(*y);
                j += 1;
            }
            (None, None) => break,
        }
    }
    out.into_iter()
}

/// The part of the layout that the rules which differ between `old` and `new` touch:
/// every element depends only on rules with the same guest address (and hairpins only on
/// the hairpin list), so diffing these parts gives the whole difference.
pub(super) fn touched_layouts(old: &Ruleset, new: &Ruleset) -> (Layout, Layout) {
    let mut guests: BTreeSet<IpAddr> = changed_rules(&old.rules, &new.rules)
        .map(|r| r.guest_ip)
        .collect();
    // whether any refusal is left depends on both families' refusals
    if guests.iter().any(IpAddr::is_unspecified) {
        guests.insert(Ipv4Addr::UNSPECIFIED.into());
        guests.insert(Ipv6Addr::UNSPECIFIED.into());
    }
    let part = |rs: &Ruleset| {
        let mut l = Layout::of_guests(rs, &guests);
        let h = Layout::of(&Ruleset {
            hairpins: rs.hairpins.clone(),
            ..Default::default()
        });
        for s in ["hairpin4", "hairpin6"] {
            if let Some(e) = h.elements.get(s) {
                l.elements.insert(s.to_string(), e.clone());
            }
        }
        l
    };
    (part(old), part(new))
}

/// The counters of the rate limits' drops, by rule id (from the rules of the forwards'
/// chains: `f_ID`).
pub(super) fn rate_limited() -> Result<BTreeMap<String, u64>, FirewallError> {
    let out = exec::run(&["nft", "-j", "list", "table", "inet", TABLE], None)?;
    let v: serde_json::Value = serde_json::from_str(&out)
        .map_err(|e| FirewallError::Parse(format!("nft -j list table: {e}")))?;
    let mut m = BTreeMap::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        let r = &item["rule"];
        let Some(id) = r["chain"].as_str().and_then(|c| c.strip_prefix("f_")) else {
            continue;
        };
        let exprs = r["expr"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        if !exprs.iter().any(|e| e.get("drop").is_some()) {
            continue;
        }
        let packets: u64 = exprs
            .iter()
            .filter_map(|e| e["counter"]["packets"].as_u64())
            .sum();
        *m.entry(id.to_string()).or_default() += packets;
    }
    Ok(m)
}
