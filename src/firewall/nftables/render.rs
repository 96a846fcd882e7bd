//! The table as `nft -f` text: base chains, per-port chains, sets and maps, whole or as
//! the element lines of one layout.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;

use super::TABLE;
use super::layout::{Elem, Layout, ListenKind, SetDecl, declarations, dnat_map, range_map};
use crate::firewall::placement;
use crate::model::Family;
use crate::rules::{Rule, Ruleset};

pub(super) fn ipkw(f: Family) -> &'static str {
    placement::nft_family(f)
}

pub(super) fn nfproto(f: Family) -> &'static str {
    match f {
        Family::Ipv4 => "ipv4",
        Family::Ipv6 => "ipv6",
    }
}

pub(super) fn addr(ip: &IpAddr) -> String {
    ip.to_string()
}

pub(super) fn with_port(ip: &IpAddr, port: u16) -> String {
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
pub(super) struct Chain {
    pub(super) name: &'static str,
    pub(super) hook: Option<&'static str>,
    pub(super) rules: Vec<String>,
}

/// The DNAT lookups of one listen kind, exact ports first, then port ranges.
pub(super) fn dnat_rules(kind: ListenKind) -> Vec<String> {
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
pub(super) fn base_chains() -> Vec<Chain> {
    let (forwards, host) = dispatch_rules();
    let chain = |name, hook, rules| Chain { name, hook, rules };
    vec![
        chain("forwards", None, forwards),
        chain("forwards_host", None, host),
        chain("localhost", None, dnat_rules(ListenKind::Lo)),
        chain("count", None, count_rules()),
        chain(
            "prerouting",
            Some("type nat hook prerouting priority dstnat; policy accept;"),
            vec!["fib daddr type local jump forwards".into()],
        ),
        chain(
            "output",
            Some("type nat hook output priority -100; policy accept;"),
            vec![
                "ip daddr 127.0.0.0/8 jump localhost".into(),
                "ip daddr 127.0.0.0/8 return".into(),
                "ip6 daddr ::1 return".into(),
                "fib daddr type local jump forwards_host".into(),
            ],
        ),
        chain(
            "postrouting",
            Some("type nat hook postrouting priority srcnat; policy accept;"),
            postrouting_rules(),
        ),
        chain(
            "forward",
            Some("type filter hook forward priority filter; policy accept;"),
            vec!["ct status dnat jump count".into()],
        ),
    ]
}

/// The rules of `forwards` (traffic from outside) and `forwards_host` (locally generated:
/// no listen interface applies): the listen keys' verdict maps, then the DNAT maps.
fn dispatch_rules() -> (Vec<String>, Vec<String>) {
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
    let mut host: Vec<String> = vmaps
        .iter()
        .filter(|s| !s.contains("iifname"))
        .map(|s| s.to_string())
        .collect();
    host.extend(dnat_rules(ListenKind::Addr));
    host.extend(dnat_rules(ListenKind::Any));
    (forwards, host)
}

/// Masquerade of hairpinned and localhost flows to their guests.
fn postrouting_rules() -> Vec<String> {
    let mut post = Vec::new();
    for f in [Family::Ipv4, Family::Ipv6] {
        let (fam, s) = (ipkw(f), if f == Family::Ipv4 { "4" } else { "6" });
        for set in ["targets", "targets_range"] {
            post.push(format!(
                "ct status dnat oifname . {fam} saddr @hairpin{s} {fam} daddr . meta l4proto . th dport @{set}{s} masquerade"
            ));
        }
    }
    for set in ["lo_targets4", "lo_targets_range4"] {
        post.push(format!(
            "ct status dnat ip saddr 127.0.0.0/8 ip daddr . meta l4proto . th dport @{set} masquerade"
        ));
    }
    post
}

/// Counting each forward's traffic, both directions, by its guest address and port.
fn count_rules() -> Vec<String> {
    let mut count = Vec::new();
    for f in [Family::Ipv4, Family::Ipv6] {
        let (fam, s) = (ipkw(f), if f == Family::Ipv4 { "4" } else { "6" });
        for set in ["traffic", "traffic_range"] {
            count.push(format!(
                "ct direction original {fam} daddr . meta l4proto . th dport @{set}{s}"
            ));
            count.push(format!(
                "ct direction reply {fam} saddr . meta l4proto . th sport @{set}{s}"
            ));
        }
        // new connections: the first packet of each (TCP, UDP and SCTP alike)
        for set in ["conns", "conns_range"] {
            count.push(format!(
                "ct state new {fam} daddr . meta l4proto . th dport @{set}{s}"
            ));
        }
    }
    count
}

/// The chains of stopped domains' refused ports, only while there are any (no hook on
/// the host's input otherwise). Loopback is never forwarded by a listen key: left alone.
pub(super) fn refusal_chains() -> Vec<Chain> {
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
pub(super) fn fixed_chains(l: &Layout) -> Vec<Chain> {
    let mut v = base_chains();
    if l.refusals {
        v.extend(refusal_chains());
    }
    v
}

pub(super) fn set_decl_text(out: &mut String, d: &SetDecl, elems: &[String]) {
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

pub(super) fn source_set_decl(name: &str, family: Family, nets: &[IpNet]) -> SetDecl {
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
pub(super) fn meter_decl(family: Family, timeout: u64) -> String {
    format!(
        "type {}_addr; size 65535; flags dynamic,timeout; timeout {timeout}s;",
        nfproto(family)
    )
}

/// Counter values by set and the canonical key bytes of their element.
pub(super) type Kept = HashMap<(String, Vec<u8>), (u64, u64)>;

/// The element lines of a set: each element's text (`texts`: already written for a set
/// of the same elements, as `conns*` has `traffic*`'s), with its kept counter.
pub(super) fn elem_lines(
    d: &SetDecl,
    elems: &BTreeSet<Elem>,
    kept: &Kept,
    texts: Option<&[String]>,
) -> Vec<String> {
    let with_counters = d.counter && !kept.is_empty();
    elems
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let t = match texts.and_then(|t| t.get(i)) {
                Some(t) => t.clone(),
                None => super::encode::elem_text(e),
            };
            match with_counters
                .then(|| kept.get(&(d.name.clone(), super::encode::elem_bytes(e).0)))
                .flatten()
            {
                Some((p, b)) => format!("{t} counter packets {p} bytes {b}"),
                None => t,
            }
        })
        .collect()
}

/// Renders `table inet virtgate` (without the delete preamble); `kept` carries counter
/// values over from the table being replaced. Without `elements`, the maps and sets of
/// [`declarations`] are declared empty (their elements go in over netlink).
fn render_table(l: &Layout, kept: &Kept, elements: bool) -> String {
    let mut out = format!("table inet {TABLE} {{\n");
    let none = BTreeSet::new();
    // `traffic*`'s texts (without counters), for `conns*`, which holds the same elements
    let mut texts: HashMap<String, Vec<String>> = HashMap::new();
    for d in declarations() {
        let elems = match l.elements.get(&d.name) {
            Some(e) if elements => e,
            _ => &none,
        };
        let same = d
            .name
            .strip_prefix("conns")
            .and_then(|rest| texts.get(&format!("traffic{rest}")));
        let lines = elem_lines(&d, elems, kept, same.map(Vec::as_slice));
        if d.name.starts_with("traffic") {
            let plain = if kept.is_empty() {
                lines.clone()
            } else {
                elems.iter().map(super::encode::elem_text).collect()
            };
            texts.insert(d.name.clone(), plain);
        }
        set_decl_text(&mut out, &d, &lines);
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
    for c in fixed_chains(l) {
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

pub(super) fn full_batch(rs: &Ruleset, kept: &Kept) -> String {
    let mut b = format!("table inet {TABLE}\ndelete table inet {TABLE}\n");
    if !rs.is_empty() {
        b.push_str(&render_table(&Layout::of(rs), kept, true));
    }
    b
}

/// The batch that makes `l`'s table with every map and set of [`declarations`] empty:
/// chains, rules, source sets and meters.
pub(super) fn shape_batch(l: &Layout) -> String {
    let mut b = format!("table inet {TABLE}\ndelete table inet {TABLE}\n");
    b.push_str(&render_table(l, &Kept::new(), false));
    b
}

pub(super) fn elements_stmt(out: &mut String, verb: &str, set: &str, elems: &[String]) {
    if !elems.is_empty() {
        let _ = writeln!(
            out,
            "{verb} element inet {TABLE} {set} {{ {} }}",
            elems.join(", ")
        );
    }
}
