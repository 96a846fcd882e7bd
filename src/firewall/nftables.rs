//! The nftables backend: virtgate's own `table inet virtgate`, replaced as a whole in one
//! `nft -f` transaction together with the accepts placed in libvirt's nftables chains.
//!
//! Lookups go through verdict maps keyed by (listen, protocol, port), so the cost per
//! packet does not grow with the number of forwards: each forward has a small chain
//! `f_<id>` (its source allow-list and its DNAT), reached by one map lookup.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;

use super::{Backend, Counters, FirewallError, digest, placement, strip_counters, xtables};
use crate::exec;
use crate::model::{Family, PortRange, Proto};
use crate::plan::{ListenOn, Rule, Ruleset};

pub const TABLE: &str = "virtgate";

#[derive(Debug, Default, Clone, Copy)]
pub struct Nftables;

fn fam4(f: Family) -> &'static str {
    match f {
        Family::Ipv4 => "4",
        Family::Ipv6 => "6",
    }
}

fn ipkw(f: Family) -> &'static str {
    placement::nft_family(f)
}

fn nfproto(f: Family) -> &'static str {
    match f {
        Family::Ipv4 => "ipv4",
        Family::Ipv6 => "ipv6",
    }
}

fn ports(p: &PortRange) -> String {
    p.to_string()
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
fn dnat_stmt(r: &Rule) -> String {
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

fn set_decl(out: &mut String, kind: &str, name: &str, ty: &str, elems: &[String]) {
    let _ = writeln!(out, "\t{kind} {name} {{\n\t\ttype {ty}\n\t\tflags interval");
    if !elems.is_empty() {
        let _ = writeln!(out, "\t\telements = {{ {} }}", elems.join(",\n\t\t\t     "));
    }
    out.push_str("\t}\n");
}

/// Merges overlapping (ip, proto, port range) keys so interval sets accept them.
fn merged_targets(rules: &[&Rule]) -> Vec<(IpAddr, Proto, PortRange)> {
    let mut by: BTreeMap<(IpAddr, Proto), Vec<PortRange>> = BTreeMap::new();
    for r in rules {
        by.entry((r.guest_ip, r.proto))
            .or_default()
            .push(r.guest_ports);
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

/// Renders `table inet virtgate` (without the delete preamble); `kept` carries counter
/// values over from the table being replaced.
pub fn render_table(rs: &Ruleset, kept: &BTreeMap<String, Counters>) -> String {
    let mut out = format!("table inet {TABLE} {{\n");
    let mut addr_elems: BTreeMap<Family, Vec<String>> = BTreeMap::new();
    let mut if_elems = Vec::new();
    let mut any_elems = Vec::new();
    let mut lo_elems = Vec::new();
    for r in &rs.rules {
        let key = format!("{} . {}", r.proto, ports(&r.host_ports));
        let verdict = format!("goto f_{}", r.id);
        match &r.listen {
            ListenOn::Address(a) => addr_elems
                .entry(r.family)
                .or_default()
                .push(format!("{} . {key} : {verdict}", addr(a))),
            ListenOn::Interface(i) => if_elems.push(format!(
                "\"{i}\" . {} . {key} : {verdict}",
                nfproto(r.family)
            )),
            ListenOn::Any => any_elems.push(format!("{} . {key} : {verdict}", nfproto(r.family))),
        }
        if r.localhost {
            lo_elems.push(format!("{key} : goto l_{}", r.id));
        }
    }
    for f in [Family::Ipv4, Family::Ipv6] {
        let ty = format!("{}_addr . inet_proto . inet_service : verdict", nfproto(f));
        let e = addr_elems.remove(&f).unwrap_or_default();
        set_decl(&mut out, "map", &format!("listen_addr{}", fam4(f)), &ty, &e);
    }
    set_decl(
        &mut out,
        "map",
        "listen_if",
        "ifname . nf_proto . inet_proto . inet_service : verdict",
        &if_elems,
    );
    set_decl(
        &mut out,
        "map",
        "listen_any",
        "nf_proto . inet_proto . inet_service : verdict",
        &any_elems,
    );
    set_decl(
        &mut out,
        "map",
        "localhost4",
        "inet_proto . inet_service : verdict",
        &lo_elems,
    );
    for f in [Family::Ipv4, Family::Ipv6] {
        let hp: Vec<String> = rs
            .hairpins
            .iter()
            .filter(|h| Family::of_net(&h.subnet) == f)
            .map(|h| format!("\"{}\" . {}", h.bridge, h.subnet))
            .collect();
        set_decl(
            &mut out,
            "set",
            &format!("hairpin{}", fam4(f)),
            &format!("ifname . {}_addr", nfproto(f)),
            &hp,
        );
        let fam_rules: Vec<&Rule> = rs.rules.iter().filter(|r| r.family == f).collect();
        let targets: Vec<String> = merged_targets(&fam_rules)
            .iter()
            .map(|(ip, p, r)| format!("{ip} . {p} . {r}"))
            .collect();
        set_decl(
            &mut out,
            "set",
            &format!("targets{}", fam4(f)),
            &format!("{}_addr . inet_proto . inet_service", nfproto(f)),
            &targets,
        );
        // counters: one per rule; a target shared by two rules counts for the first
        let mut seen: Vec<&Rule> = Vec::new();
        let mut cnt = Vec::new();
        for r in &fam_rules {
            if seen.iter().any(|s| {
                s.guest_ip == r.guest_ip
                    && s.proto == r.proto
                    && s.guest_ports.overlaps(&r.guest_ports)
            }) {
                continue;
            }
            seen.push(r);
            cnt.push(format!(
                "{} . {} . {} : \"c_{}\"",
                r.guest_ip, r.proto, r.guest_ports, r.id
            ));
        }
        set_decl(
            &mut out,
            "map",
            &format!("counters{}", fam4(f)),
            &format!("{}_addr . inet_proto . inet_service : counter", nfproto(f)),
            &cnt,
        );
        let lo_targets: Vec<&Rule> = fam_rules.iter().copied().filter(|r| r.localhost).collect();
        if f == Family::Ipv4 {
            let lt: Vec<String> = merged_targets(&lo_targets)
                .iter()
                .map(|(ip, p, r)| format!("{ip} . {p} . {r}"))
                .collect();
            set_decl(
                &mut out,
                "set",
                "localhost_targets4",
                "ipv4_addr . inet_proto . inet_service",
                &lt,
            );
        }
    }
    for r in &rs.rules {
        match kept.get(&r.id) {
            Some(c) => {
                let _ = writeln!(
                    out,
                    "\tcounter c_{} {{\n\t\tpackets {} bytes {}\n\t}}",
                    r.id, c.packets, c.bytes
                );
            }
            None => {
                let _ = writeln!(out, "\tcounter c_{} {{\n\t}}", r.id);
            }
        }
    }
    for r in &rs.rules {
        if !r.sources.is_empty() {
            let elems: Vec<String> = r.sources.iter().map(IpNet::to_string).collect();
            set_decl(
                &mut out,
                "set",
                &format!("s_{}", r.id),
                &format!("{}_addr", nfproto(r.family)),
                &elems,
            );
        }
    }
    for r in &rs.rules {
        let fam = ipkw(r.family);
        let comment = r.comment();
        let _ = writeln!(out, "\tchain f_{} {{", r.id);
        if !r.sources.is_empty() {
            let lo = if r.localhost {
                " ip saddr != 127.0.0.0/8"
            } else {
                ""
            };
            let _ = writeln!(out, "\t\t{fam} saddr != @s_{}{lo} return", r.id);
        }
        let _ = writeln!(out, "\t\t{} comment \"{comment}\"", dnat_stmt(r));
        out.push_str("\t}\n");
        if r.localhost {
            let _ = writeln!(
                out,
                "\tchain l_{} {{\n\t\t{} comment \"{comment}\"\n\t}}",
                r.id,
                dnat_stmt(r)
            );
        }
    }
    out.push_str(
        "\tchain forwards {
\t\tip daddr . meta l4proto . th dport vmap @listen_addr4
\t\tip6 daddr . meta l4proto . th dport vmap @listen_addr6
\t\tiifname . meta nfproto . meta l4proto . th dport vmap @listen_if
\t\tmeta nfproto . meta l4proto . th dport vmap @listen_any
\t}
\tchain forwards_host {
\t\tip daddr . meta l4proto . th dport vmap @listen_addr4
\t\tip6 daddr . meta l4proto . th dport vmap @listen_addr6
\t\tmeta nfproto . meta l4proto . th dport vmap @listen_any
\t}
\tchain prerouting {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tfib daddr type local jump forwards
\t}
\tchain output {
\t\ttype nat hook output priority -100; policy accept;
\t\tip daddr 127.0.0.0/8 meta l4proto . th dport vmap @localhost4
\t\tip daddr 127.0.0.0/8 return
\t\tip6 daddr ::1 return
\t\tfib daddr type local jump forwards_host
\t}
\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tct status dnat oifname . ip saddr @hairpin4 ip daddr . meta l4proto . th dport @targets4 masquerade
\t\tct status dnat oifname . ip6 saddr @hairpin6 ip6 daddr . meta l4proto . th dport @targets6 masquerade
\t\tct status dnat ip saddr 127.0.0.0/8 ip daddr . meta l4proto . th dport @localhost_targets4 masquerade
\t}
\tchain forward {
\t\ttype filter hook forward priority filter; policy accept;
\t\tct status dnat ct direction original counter name ip daddr . meta l4proto . th dport map @counters4
\t\tct status dnat ct direction reply counter name ip saddr . meta l4proto . th sport map @counters4
\t\tct status dnat ct direction original counter name ip6 daddr . meta l4proto . th dport map @counters6
\t\tct status dnat ct direction reply counter name ip6 saddr . meta l4proto . th sport map @counters6
\t}
}
",
    );
    out
}

/// The whole `nft -f` batch for virtgate's table (placement not included).
pub fn table_batch(rs: &Ruleset, kept: &BTreeMap<String, Counters>) -> String {
    let mut b = format!("table inet {TABLE}\ndelete table inet {TABLE}\n");
    if !rs.is_empty() {
        b.push_str(&render_table(rs, kept));
    }
    b
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
/// libvirt firewall is the iptables form.
fn xt_specs(rs: &Ruleset) -> Vec<(Family, xtables::TableSpec)> {
    [Family::Ipv4, Family::Ipv6]
        .into_iter()
        .map(|f| {
            let mut spec = xtables::TableSpec {
                table: "filter",
                ..Default::default()
            };
            if placement::needs_xt(&rs.accepts, f) {
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

impl Backend for Nftables {
    fn name(&self) -> &'static str {
        "nftables"
    }

    fn render(&self, rs: &Ruleset) -> String {
        let mut s = String::from("#!/usr/sbin/nft -f\n");
        s.push_str(&table_batch(rs, &BTreeMap::new()));
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
        let mut xt: Vec<(Family, String)> = Vec::new();
        for (f, spec) in xt_specs(rs) {
            let cur = xtables::try_save(f, "filter", false)?;
            if let Some(s) = xtables::table_script(&spec, &cur) {
                xt.push((f, s));
            }
        }
        // the table is replaced whole: its counters are carried over
        let kept = if rs.is_empty() {
            BTreeMap::new()
        } else {
            self.counters().unwrap_or_default()
        };
        let mut batch = table_batch(rs, &kept);
        batch.push_str(&placement::nft_batch(&rs.accepts)?);
        // adding: accept first, then DNAT; removing: DNAT first, then accept
        if !rs.is_empty() {
            for (f, s) in &xt {
                xtables::restore(*f, s)?;
            }
            nft_apply(&batch)
        } else {
            nft_apply(&batch)?;
            for (f, s) in &xt {
                xtables::restore(*f, s)?;
            }
            Ok(())
        }
    }

    fn fingerprint(&self) -> Result<Option<String>, FirewallError> {
        let table = exec::run_raw(
            &["nft", "list", "table", "inet", TABLE],
            None,
            exec::DEFAULT_TIMEOUT,
        )?;
        let mut text = if table.success {
            table.stdout
        } else {
            String::new()
        };
        placement::describe(&mut text)?;
        xtables::describe(&["filter"], &mut text)?;
        if text.is_empty() {
            return Ok(None);
        }
        Ok(Some(digest(&strip_counters(&text))))
    }

    fn counters(&self) -> Result<BTreeMap<String, Counters>, FirewallError> {
        let out = exec::run_raw(
            &["nft", "-j", "list", "counters", "table", "inet", TABLE],
            None,
            exec::DEFAULT_TIMEOUT,
        )?;
        let mut m = BTreeMap::new();
        if !out.success {
            return Ok(m);
        }
        let v: serde_json::Value =
            serde_json::from_str(&out.stdout).map_err(|e| FirewallError::Parse(e.to_string()))?;
        for item in v["nftables"].as_array().into_iter().flatten() {
            let c = &item["counter"];
            if let Some(name) = c["name"].as_str().and_then(|n| n.strip_prefix("c_")) {
                m.insert(
                    name.to_string(),
                    Counters {
                        packets: c["packets"].as_u64().unwrap_or(0),
                        bytes: c["bytes"].as_u64().unwrap_or(0),
                    },
                );
            }
        }
        Ok(m)
    }
}
