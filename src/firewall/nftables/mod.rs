//! The nftables backend: virtgate's own `table inet virtgate`.
//!
//! Forwards are elements of hash maps keyed by (listen, protocol, port) ([`layout`]), so
//! the cost per packet does not grow with the number of forwards, and a change of a few
//! forwards is a few `add element`/`delete element` statements. The table is created (or
//! replaced, counters carried over) whole in one `nft -f` only when it is missing or its
//! shape is wrong; every other change is a delta in one `nft -f` transaction, together
//! with the accepts placed in libvirt's nftables chains. The kernel is read back over
//! netlink ([`super::nfnl`]), never by listing with `nft`.

pub mod encode;
pub mod layout;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use self::layout::{Elem, Layout, ListenKind, SetDecl, declarations, dnat_map, range_map};
use super::{Backend, Counters, FirewallError, nfnl, placement, xtables};
use crate::exec;
use crate::model::Family;
use crate::plan::{Rule, Ruleset};

pub const TABLE: &str = "virtgate";

#[derive(Debug, Default, Clone, Copy)]
pub struct Nftables;

fn ipkw(f: Family) -> &'static str {
    placement::nft_family(f)
}

fn nfproto(f: Family) -> &'static str {
    match f {
        Family::Ipv4 => "ipv4",
        Family::Ipv6 => "ipv6",
    }
}

fn addr(ip: &IpAddr) -> String {
    ip.to_string()
}

fn with_port(ip: &IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// The DNAT statement of one rule.
pub(crate) fn dnat_stmt(r: &Rule) -> String {
    let fam = ipkw(r.family);
    let p = r.proto.as_str();
    let g = &r.guest_ports;
    let h = &r.host_ports;
    if h.start == h.end {
        format!(
            "meta l4proto {p} dnat {fam} to {}",
            with_port(&r.guest_ip, g.start)
        )
    } else if h == g {
        format!("meta l4proto {p} dnat {fam} to {}", addr(&r.guest_ip))
    } else {
        let elems: Vec<String> = (h.start..=h.end)
            .zip(g.start..=g.end)
            .map(|(hp, gp)| format!("{hp} : {} . {gp}", addr(&r.guest_ip)))
            .collect();
        format!(
            "meta l4proto {p} dnat {fam} to {p} dport map {{ {} }}",
            elems.join(", ")
        )
    }
}

/// A base or helper chain of the table: name, hook line, rules.
struct Chain {
    name: &'static str,
    hook: Option<&'static str>,
    rules: Vec<String>,
}

/// The DNAT lookups of one listen kind, exact ports first, then port ranges.
fn dnat_rules(kind: ListenKind) -> Vec<String> {
    let mut v = Vec::new();
    for &f in kind.families() {
        let key = match kind.key_expr(f) {
            Some(k) => format!("{k} . meta l4proto . th dport"),
            None => "meta l4proto . th dport".to_string(),
        };
        let guard = match kind {
            ListenKind::Addr | ListenKind::Lo => String::new(),
            _ => format!("meta nfproto {} ", nfproto(f)),
        };
        let fam = ipkw(f);
        v.push(format!(
            "{guard}dnat {fam} addr . port to {key} map @{}",
            dnat_map(kind, f)
        ));
        v.push(format!(
            "{guard}dnat {fam} to {key} map @{}",
            range_map(kind, f)
        ));
    }
    v
}

/// The fixed chains; only the elements of the maps they use change.
fn base_chains() -> Vec<Chain> {
    let vmaps = [
        "ip daddr . meta l4proto . th dport vmap @listen_addr4",
        "ip6 daddr . meta l4proto . th dport vmap @listen_addr6",
        "iifname . meta nfproto . meta l4proto . th dport vmap @listen_if",
        "meta nfproto . meta l4proto . th dport vmap @listen_any",
    ];
    let mut forwards: Vec<String> = vmaps.iter().map(|s| s.to_string()).collect();
    forwards.extend(dnat_rules(ListenKind::Addr));
    forwards.extend(dnat_rules(ListenKind::If));
    forwards.extend(dnat_rules(ListenKind::Any));
    // locally generated traffic: no listen interface applies
    let mut host: Vec<String> = vmaps
        .iter()
        .filter(|s| !s.contains("iifname"))
        .map(|s| s.to_string())
        .collect();
    host.extend(dnat_rules(ListenKind::Addr));
    host.extend(dnat_rules(ListenKind::Any));
    let mut post = Vec::new();
    let mut count = Vec::new();
    for f in [Family::Ipv4, Family::Ipv6] {
        let (fam, s) = (ipkw(f), if f == Family::Ipv4 { "4" } else { "6" });
        for set in ["targets", "targets_range"] {
            post.push(format!(
                "ct status dnat oifname . {fam} saddr @hairpin{s} {fam} daddr . meta l4proto . th dport @{set}{s} masquerade"
            ));
        }
        for set in ["traffic", "traffic_range"] {
            count.push(format!(
                "ct direction original {fam} daddr . meta l4proto . th dport @{set}{s}"
            ));
            count.push(format!(
                "ct direction reply {fam} saddr . meta l4proto . th sport @{set}{s}"
            ));
        }
    }
    for set in ["lo_targets4", "lo_targets_range4"] {
        post.push(format!(
            "ct status dnat ip saddr 127.0.0.0/8 ip daddr . meta l4proto . th dport @{set} masquerade"
        ));
    }
    vec![
        Chain {
            name: "forwards",
            hook: None,
            rules: forwards,
        },
        Chain {
            name: "forwards_host",
            hook: None,
            rules: host,
        },
        Chain {
            name: "localhost",
            hook: None,
            rules: dnat_rules(ListenKind::Lo),
        },
        Chain {
            name: "count",
            hook: None,
            rules: count,
        },
        Chain {
            name: "prerouting",
            hook: Some("type nat hook prerouting priority dstnat; policy accept;"),
            rules: vec!["fib daddr type local jump forwards".into()],
        },
        Chain {
            name: "output",
            hook: Some("type nat hook output priority -100; policy accept;"),
            rules: vec![
                "ip daddr 127.0.0.0/8 jump localhost".into(),
                "ip daddr 127.0.0.0/8 return".into(),
                "ip6 daddr ::1 return".into(),
                "fib daddr type local jump forwards_host".into(),
            ],
        },
        Chain {
            name: "postrouting",
            hook: Some("type nat hook postrouting priority srcnat; policy accept;"),
            rules: post,
        },
        Chain {
            name: "forward",
            hook: Some("type filter hook forward priority filter; policy accept;"),
            rules: vec!["ct status dnat jump count".into()],
        },
    ]
}

/// The chains of stopped domains' refused ports, only while there are any (no hook on
/// the host's input otherwise). Loopback is never forwarded by a listen key: left alone.
fn refusal_chains() -> Vec<Chain> {
    vec![
        Chain {
            name: "refuse",
            hook: None,
            rules: vec![
                "meta l4proto tcp reject with tcp reset".into(),
                "reject".into(),
            ],
        },
        Chain {
            name: "input",
            hook: Some("type filter hook input priority filter - 5; policy accept;"),
            rules: vec![
                "ip daddr 127.0.0.0/8 return".into(),
                "ip6 daddr ::1 return".into(),
                "ip daddr . meta l4proto . th dport vmap @stopped_addr4".into(),
                "ip6 daddr . meta l4proto . th dport vmap @stopped_addr6".into(),
                "iifname . meta nfproto . meta l4proto . th dport vmap @stopped_if".into(),
                "meta nfproto . meta l4proto . th dport vmap @stopped_any".into(),
            ],
        },
    ]
}

/// The fixed chains of a layout.
fn fixed_chains(l: &Layout) -> Vec<Chain> {
    let mut v = base_chains();
    if l.refusals {
        v.extend(refusal_chains());
    }
    v
}

fn set_decl_text(out: &mut String, d: &SetDecl, elems: &[String]) {
    let kind = if d.data_type.is_some() { "map" } else { "set" };
    let ty = match d.data_type {
        Some(dt) => format!("{} : {dt}", d.key_type),
        None => d.key_type.clone(),
    };
    let _ = writeln!(out, "\t{kind} {} {{\n\t\ttype {ty}", d.name);
    if d.interval {
        out.push_str("\t\tflags interval\n");
    }
    if d.counter {
        out.push_str("\t\tcounter\n");
    }
    if !elems.is_empty() {
        let _ = writeln!(out, "\t\telements = {{ {} }}", elems.join(",\n\t\t\t     "));
    }
    out.push_str("\t}\n");
}

fn source_set_decl(name: &str, family: Family, nets: &[IpNet]) -> SetDecl {
    let _ = nets;
    SetDecl {
        name: name.to_string(),
        key_type: format!("{}_addr", nfproto(family)),
        data_type: None,
        interval: true,
        counter: false,
    }
}

/// The body of a per-source rate limit's dynamic set.
fn meter_decl(family: Family, timeout: u64) -> String {
    format!(
        "type {}_addr; size 65535; flags dynamic,timeout; timeout {timeout}s;",
        nfproto(family)
    )
}

/// Counter values by the canonical key bytes of their element.
type Kept = HashMap<Vec<u8>, (u64, u64)>;

fn elem_lines(d: &SetDecl, elems: &BTreeSet<Elem>, kept: &Kept) -> Vec<String> {
    elems
        .iter()
        .map(|e| {
            let t = encode::elem_text(e);
            match d
                .counter
                .then(|| kept.get(&encode::elem_bytes(e).0))
                .flatten()
            {
                Some((p, b)) => format!("{t} counter packets {p} bytes {b}"),
                None => t,
            }
        })
        .collect()
}

/// Renders `table inet virtgate` (without the delete preamble); `kept` carries counter
/// values over from the table being replaced.
fn render_table(rs: &Ruleset, kept: &Kept) -> String {
    let l = Layout::of(rs);
    let mut out = format!("table inet {TABLE} {{\n");
    for d in declarations() {
        let elems = l.elements.get(&d.name).cloned().unwrap_or_default();
        set_decl_text(&mut out, &d, &elem_lines(&d, &elems, kept));
    }
    for (name, (fam, nets)) in &l.source_sets {
        let e: Vec<String> = nets.iter().map(IpNet::to_string).collect();
        set_decl_text(&mut out, &source_set_decl(name, *fam, nets), &e);
    }
    for (name, (fam, timeout)) in &l.meters {
        let _ = writeln!(
            out,
            "\tset {name} {{\n\t\t{}\n\t}}",
            meter_decl(*fam, *timeout)
        );
    }
    for (name, rules) in &l.chains {
        let _ = writeln!(out, "\tchain {name} {{");
        for r in rules {
            let _ = writeln!(out, "\t\t{r}");
        }
        out.push_str("\t}\n");
    }
    for c in fixed_chains(&l) {
        let _ = writeln!(out, "\tchain {} {{", c.name);
        if let Some(h) = c.hook {
            let _ = writeln!(out, "\t\t{h}");
        }
        for r in &c.rules {
            let _ = writeln!(out, "\t\t{r}");
        }
        out.push_str("\t}\n");
    }
    out.push_str("}\n");
    out
}

/// The whole `nft -f` batch for virtgate's table (placement not included).
pub fn table_batch(rs: &Ruleset) -> String {
    full_batch(rs, &Kept::new())
}

fn full_batch(rs: &Ruleset, kept: &Kept) -> String {
    let mut b = format!("table inet {TABLE}\ndelete table inet {TABLE}\n");
    if !rs.is_empty() {
        b.push_str(&render_table(rs, kept));
    }
    b
}

fn elements_stmt(out: &mut String, verb: &str, set: &str, elems: &[String]) {
    if !elems.is_empty() {
        let _ = writeln!(
            out,
            "{verb} element inet {TABLE} {set} {{ {} }}",
            elems.join(", ")
        );
    }
}

/// What turns one layout into another: element changes per set, and `nft` statements for
/// the chains and source sets of forwards with an allow-list.
#[derive(Debug, Default)]
struct Delta<'a> {
    gone: Vec<(&'a String, Vec<&'a Elem>)>,
    added: Vec<(&'a String, Vec<&'a Elem>)>,
    /// Statements between the element deletions and additions.
    statements: String,
}

impl Delta<'_> {
    /// The whole delta as `nft -f` text.
    fn text(&self) -> String {
        let mut out = String::new();
        let texts = |v: &[&Elem]| v.iter().map(|e| encode::elem_text(e)).collect::<Vec<_>>();
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
    fn batch(&self) -> Option<nfnl::Batch> {
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
                .map(|e| encode::elem_netlink(e, interval.contains(set)))
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

    fn is_empty(&self) -> bool {
        self.gone.is_empty() && self.added.is_empty() && self.statements.is_empty()
    }
}

/// The changes that turn `old` into `new` (elements, chains and source sets only).
fn delta<'a>(old: &'a Layout, new: &'a Layout) -> Delta<'a> {
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
    if old.refusals && !new.refusals {
        for c in refusal_chains().iter().rev() {
            let _ = writeln!(out, "delete chain inet {TABLE} {}", c.name);
        }
    }
    d
}

/// Rules in one list but not the other (both sorted, as [`Ruleset`] keeps them): a merge,
/// linear in the number of rules.
fn changed_rules<'a>(a: &'a [Rule], b: &'a [Rule]) -> impl Iterator<Item = &'a Rule> {
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
fn touched_layouts(old: &Ruleset, new: &Ruleset) -> (Layout, Layout) {
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
fn rate_limited() -> Result<BTreeMap<String, u64>, FirewallError> {
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

/// Runs one `nft -f -` transaction.
pub fn nft_apply(batch: &str) -> Result<(), FirewallError> {
    let out = exec::run_raw(
        &["nft", "-f", "-"],
        Some(batch.as_bytes()),
        exec::DEFAULT_TIMEOUT,
    )?;
    if !out.success {
        return Err(FirewallError::Rejected(format!(
            "nft: {}",
            out.stderr.trim()
        )));
    }
    Ok(())
}

/// The xtables part: per-bridge accepts in `VIRTGATE_FORWARD`, for bridges whose
/// libvirt firewall is the iptables form. Where a family's iptables tools are not
/// installed there is none: no iptables chain can be in the way then (libvirt's iptables
/// form runs those tools), and a host with nftables alone must not need them.
fn xt_specs(rs: &Ruleset) -> Vec<(Family, xtables::TableSpec)> {
    [Family::Ipv4, Family::Ipv6]
        .into_iter()
        .map(|f| {
            let mut spec = xtables::TableSpec {
                table: "filter",
                ..Default::default()
            };
            if placement::needs_xt(&rs.accepts, f) && xtables::installed(f) {
                spec.chains.push((
                    placement::XT_FORWARD.to_string(),
                    placement::xt_bridge_rules(&rs.accepts, f),
                ));
                spec.jumps.push(xtables::Jump {
                    builtin: "FORWARD",
                    matches: "",
                    target: placement::XT_FORWARD.to_string(),
                });
            }
            (f, spec)
        })
        .collect()
}

fn inet() -> u8 {
    nfnl::NFPROTO_INET
}

fn io_err(what: &str) -> impl Fn(std::io::Error) -> FirewallError + '_ {
    move |e| FirewallError::Parse(format!("reading {what} over netlink: {e}"))
}

/// Counter values of the counting sets now in the kernel.
fn kept_counters() -> Result<Kept, FirewallError> {
    let mut kept = Kept::new();
    for d in declarations().iter().filter(|d| d.counter) {
        for e in nfnl::elements(inet(), TABLE, &d.name)
            .map_err(io_err("counters"))?
            .unwrap_or_default()
        {
            if let Some(c) = e.counter {
                kept.insert(e.key, c);
            }
        }
    }
    Ok(kept)
}

/// Whether virtgate's xtables rules (the nftables backend's accepts for bridges on
/// libvirt's iptables form) are exactly what `rs` needs.
fn xt_in_sync(rs: &Ruleset) -> Result<bool, FirewallError> {
    for (f, spec) in xt_specs(rs) {
        let cur = xtables::try_save(f, "filter", false)?;
        if !xtables::in_sync(&spec, &cur) {
            return Ok(false);
        }
    }
    Ok(true)
}

impl Nftables {
    /// Runs the xtables part and the nft batch in the safe order: adding, the accept goes
    /// first; removing, the DNAT goes first.
    fn commit(&self, rs: &Ruleset, batch: &str, xt: bool) -> Result<(), FirewallError> {
        let mut scripts: Vec<(Family, String)> = Vec::new();
        if xt {
            for (f, spec) in xt_specs(rs) {
                let cur = xtables::try_save(f, "filter", false)?;
                if let Some(s) = xtables::table_script(&spec, &cur) {
                    scripts.push((f, s));
                }
            }
        }
        if !rs.is_empty() {
            for (f, s) in &scripts {
                xtables::restore(*f, s)?;
            }
            if !batch.is_empty() {
                nft_apply(batch)?;
            }
        } else {
            if !batch.is_empty() {
                nft_apply(batch)?;
            }
            for (f, s) in &scripts {
                xtables::restore(*f, s)?;
            }
        }
        Ok(())
    }
}

impl Backend for Nftables {
    fn name(&self) -> &'static str {
        "nftables"
    }

    fn render(&self, rs: &Ruleset) -> String {
        let mut s = String::from("#!/usr/sbin/nft -f\n");
        s.push_str(&table_batch(rs));
        s.push_str(&placement::nft_render(&rs.accepts));
        for (f, spec) in xt_specs(rs) {
            if !spec.chains.is_empty()
                && let Some(script) = xtables::table_script(&spec, "")
            {
                let _ = writeln!(s, "# {} --noflush:", xtables::restore_cmd(f));
                for l in script.lines() {
                    let _ = writeln!(s, "# {l}");
                }
            }
        }
        s
    }

    fn apply(&self, rs: &Ruleset) -> Result<(), FirewallError> {
        // the table is replaced whole: its counters are carried over
        let kept = if rs.is_empty() {
            Kept::new()
        } else {
            kept_counters().unwrap_or_default()
        };
        let mut batch = full_batch(rs, &kept);
        batch.push_str(&placement::nft_batch(&rs.accepts)?);
        self.commit(rs, &batch, true)
    }

    fn apply_delta(&self, old: &Ruleset, new: &Ruleset) -> Result<(), FirewallError> {
        if old.is_empty() || new.is_empty() {
            return self.apply(new);
        }
        self.apply_part(old, new)
    }

    fn local_delta(&self) -> bool {
        true
    }

    /// The elements and chains of the guests the change touches (every rule of a guest
    /// address is in `old`/`new`: the layout of a guest is derived from its rules alone).
    fn apply_part(&self, old: &Ruleset, new: &Ruleset) -> Result<(), FirewallError> {
        let (o, n) = touched_layouts(old, new);
        let d = delta(&o, &n);
        let placement = placement::nft_batch(&new.accepts)?;
        let xt = xt_specs(old) != xt_specs(new);
        // element changes alone go in-process, as one netlink transaction
        if placement.is_empty() && !xt {
            if d.is_empty() {
                return Ok(());
            }
            if let Some(b) = d.batch() {
                return b.commit().map_err(|e| {
                    FirewallError::Rejected(format!("nf_tables refused the change: {e}"))
                });
            }
        }
        let mut batch = d.text();
        batch.push_str(&placement);
        self.commit(new, &batch, xt)
    }

    fn has_delta(&self) -> bool {
        true
    }

    fn generation(&self, rs: &Ruleset) -> Result<Option<u32>, FirewallError> {
        if xt_specs(rs).iter().any(|(f, _)| !xtables::on_nf_tables(*f)) {
            return Ok(None);
        }
        Ok(nfnl::generation().ok())
    }

    fn in_sync(&self, rs: &Ruleset) -> Result<bool, FirewallError> {
        if !placement::nft_batch(&rs.accepts)?.is_empty() {
            tracing::debug!("nftables: placement differs");
            return Ok(false);
        }
        let exists = nfnl::table_exists(inet(), TABLE).map_err(io_err("the table"))?;
        if rs.is_empty() || !exists {
            return Ok(rs.is_empty() && !exists && xt_in_sync(rs)?);
        }
        let l = Layout::of(rs);
        // the shape: chains with their number of rules, sets
        let mut want_rules: BTreeMap<String, usize> = fixed_chains(&l)
            .into_iter()
            .map(|c| (c.name.to_string(), c.rules.len()))
            .collect();
        want_rules.extend(l.chains.iter().map(|(n, r)| (n.clone(), r.len())));
        let chains: BTreeSet<String> = nfnl::chains(inet(), TABLE)
            .map_err(io_err("chains"))?
            .unwrap_or_default()
            .into_iter()
            .collect();
        if chains != want_rules.keys().cloned().collect() {
            tracing::debug!("nftables: chains differ: {chains:?}");
            return Ok(false);
        }
        let mut have_rules: BTreeMap<String, usize> = BTreeMap::new();
        for r in nfnl::rules(inet(), TABLE, None)
            .map_err(io_err("rules"))?
            .unwrap_or_default()
        {
            *have_rules.entry(r.chain).or_default() += 1;
        }
        want_rules.retain(|_, n| *n > 0);
        if have_rules != want_rules {
            tracing::debug!("nftables: rules differ: {have_rules:?} vs {want_rules:?}");
            return Ok(false);
        }
        let decls = declarations();
        let mut want_sets: BTreeSet<String> = decls.iter().map(|d| d.name.clone()).collect();
        want_sets.extend(l.source_sets.keys().cloned());
        want_sets.extend(l.meters.keys().cloned());
        let sets: BTreeSet<String> = nfnl::sets(inet(), TABLE)
            .map_err(io_err("sets"))?
            .unwrap_or_default()
            .into_iter()
            .collect();
        if sets != want_sets {
            tracing::debug!("nftables: sets differ: {sets:?}");
            return Ok(false);
        }
        // the elements, exactly
        for d in &decls {
            let want: BTreeSet<(Vec<u8>, Vec<u8>)> = l
                .elements
                .get(&d.name)
                .into_iter()
                .flatten()
                .map(encode::elem_bytes)
                .collect();
            let have: BTreeSet<(Vec<u8>, Vec<u8>)> = nfnl::elements(inet(), TABLE, &d.name)
                .map_err(io_err("elements"))?
                .unwrap_or_default()
                .into_iter()
                .map(|e| (e.key, e.data))
                .collect();
            if want != have {
                tracing::debug!(
                    "nftables: set {} differs from the plan: {:?} vs {:?}",
                    d.name,
                    have,
                    want
                );
                return Ok(false);
            }
        }
        // last: it runs `iptables-save` (two processes), netlink above is cheap and
        // answers most "no" at once (a deleted table after a flush)
        if !xt_in_sync(rs)? {
            tracing::debug!("nftables: xtables accepts differ");
            return Ok(false);
        }
        Ok(true)
    }

    fn counters(&self, rs: &Ruleset) -> Result<BTreeMap<String, Counters>, FirewallError> {
        let index = layout::traffic_index(&rs.rules);
        let mut m = BTreeMap::new();
        // one read of the counting sets; their keys say which guest target they count
        for (key, (packets, bytes)) in kept_counters()? {
            let Some(e) = encode::target_of(&key) else {
                continue;
            };
            if let Some(r) = layout::traffic_owner(&index, &e) {
                let c: &mut Counters = m.entry(r.id.clone()).or_default();
                c.packets += packets;
                c.bytes += bytes;
            }
        }
        if rs.rules.iter().any(|r| r.rate.is_some()) {
            for (id, dropped) in rate_limited()? {
                m.entry(id).or_default().rate_limited += dropped;
            }
        }
        Ok(m)
    }
}
