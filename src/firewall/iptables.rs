//! The iptables backend (iptables + ip6tables, whichever of -nft/-legacy the host's
//! `iptables` is): virtgate's own `VIRTGATE_*` chains, rewritten in one
//! `iptables-restore --noflush` per family and table set, with one jump at the top of each
//! built-in chain it hooks.
//!
//! Why a few rules per forward and not ipset: ipset is a separate kernel object with its
//! own tool, so a change would be two transactions, not one; and the hosts that choose
//! this backend are the ones without nftables. The cost per packet grows with the number
//! of forwards (PERF-FACTS.md: 9% of the throughput at 10,000 forwards); use the
//! nftables backend for thousands of forwards.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;

use super::xtables::{self, Jump, TableSpec};
use super::{Backend, Counters, FirewallError, digest, nftables, placement, strip_counters};
use crate::exec;
use crate::model::{Family, PortRange};
use crate::plan::{ListenOn, Rule, Ruleset};

#[derive(Debug, Default, Clone)]
pub struct Iptables {
    /// Where to remember which tables/chains virtgate created (iptables-nft creates them
    /// lazily; exact removal deletes them again).
    pub state_dir: Option<PathBuf>,
}

fn host(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}/32"),
        IpAddr::V6(a) => format!("{a}/128"),
    }
}

fn dport(p: &PortRange) -> String {
    if p.start == p.end {
        p.start.to_string()
    } else {
        format!("{}:{}", p.start, p.end)
    }
}

fn to_dest(r: &Rule) -> String {
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

fn proto_match(r: &Rule, ports: &PortRange) -> String {
    format!("-p {0} -m {0} --dport {1}", r.proto, dport(ports))
}

fn comment(r: &Rule) -> String {
    format!("-m comment --comment \"vg:{} {}\"", r.id, r.comment())
}

/// Both families' table specs.
pub fn specs(rs: &Ruleset, family: Family) -> Vec<TableSpec> {
    let rules: Vec<&Rule> = rs.rules.iter().filter(|r| r.family == family).collect();
    let mut nat = TableSpec {
        table: "nat",
        ..Default::default()
    };
    let mut filter = TableSpec {
        table: "filter",
        ..Default::default()
    };
    if !rules.is_empty() {
        let (mut pre, mut dnat, mut out, mut post) = (vec![], vec![], vec![], vec![]);
        for r in &rules {
            let m = proto_match(r, &r.host_ports);
            let target = format!("{} -j DNAT --to-destination {}", comment(r), to_dest(r));
            let srcs: Vec<String> = if r.sources.is_empty() {
                vec![String::new()]
            } else {
                r.sources.iter().map(|s| format!("-s {s} ")).collect()
            };
            for s in &srcs {
                match &r.listen {
                    ListenOn::Any => dnat.push(format!("{s}{m} {target}")),
                    ListenOn::Address(a) => dnat.push(format!("{s}-d {} {m} {target}", host(a))),
                    ListenOn::Interface(i) => pre.push(format!("{s}-i {i} {m} {target}")),
                }
            }
            if r.localhost {
                out.push(format!("-d 127.0.0.0/8 {m} {target}"));
                post.push(format!(
                    "-s 127.0.0.0/8 -d {} {} -m conntrack --ctstate DNAT -j MASQUERADE",
                    host(&r.guest_ip),
                    proto_match(r, &r.guest_ports)
                ));
            }
            for h in rs
                .hairpins
                .iter()
                .filter(|h| h.bridge == r.bridge && h.subnet.contains(&r.guest_ip))
            {
                post.push(format!(
                    "-s {} -d {} -o {} {} -m conntrack --ctstate DNAT -j MASQUERADE",
                    h.subnet,
                    host(&r.guest_ip),
                    h.bridge,
                    proto_match(r, &r.guest_ports)
                ));
            }
        }
        pre.push("-j VIRTGATE_DNAT".into());
        if family == Family::Ipv4 {
            out.push("-d 127.0.0.0/8 -j RETURN".into());
        } else {
            out.push("-d ::1/128 -j RETURN".into());
        }
        out.push("-j VIRTGATE_DNAT".into());
        nat.chains = vec![
            ("VIRTGATE_DNAT".into(), dnat),
            ("VIRTGATE_PREROUTING".into(), pre),
            ("VIRTGATE_OUTPUT".into(), out),
            ("VIRTGATE_POSTROUTING".into(), post),
        ];
        nat.jumps = vec![
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
        ];
    }
    if placement::needs_xt(&rs.accepts, family) {
        let accepts = rules
            .iter()
            .filter(|r| {
                rs.accepts.iter().any(|a| {
                    a.bridge == r.bridge
                        && a.family == family
                        && a.firewall == crate::facts::LibvirtFirewall::Iptables
                })
            })
            .map(|r| {
                format!(
                    "-d {} -o {} {} -m conntrack --ctstate DNAT {} -j ACCEPT",
                    host(&r.guest_ip),
                    r.bridge,
                    proto_match(r, &r.guest_ports),
                    comment(r)
                )
            })
            .collect();
        filter.chains = vec![(placement::XT_FORWARD.into(), accepts)];
        filter.jumps = vec![Jump {
            builtin: "FORWARD",
            matches: "",
            target: placement::XT_FORWARD.into(),
        }];
    }
    vec![nat, filter]
}

/// Tables and chains of iptables-nft present now, as `family table [chain]` (from nft:
/// iptables-nft-save prints built-in chains even when they do not exist yet).
fn present_chains() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let Ok(o) = exec::run_raw(
        &["nft", "-j", "list", "chains"],
        None,
        exec::DEFAULT_TIMEOUT,
    ) else {
        return out;
    };
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap_or_default();
    for item in v["nftables"].as_array().into_iter().flatten() {
        let c = &item["chain"];
        if let (Some(f), Some(t), Some(n)) = (
            c["family"].as_str(),
            c["table"].as_str(),
            c["name"].as_str(),
        ) {
            out.insert(format!("{f} {t}"));
            out.insert(format!("{f} {t} {n}"));
        }
    }
    if let Ok(o) = exec::run_raw(
        &["nft", "-j", "list", "tables"],
        None,
        exec::DEFAULT_TIMEOUT,
    ) {
        let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap_or_default();
        for item in v["nftables"].as_array().into_iter().flatten() {
            let t = &item["table"];
            if let (Some(f), Some(n)) = (t["family"].as_str(), t["name"].as_str()) {
                out.insert(format!("{f} {n}"));
            }
        }
    }
    out
}

const BUILTIN: [&str; 5] = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];

fn is_nft_variant() -> bool {
    exec::run(&["iptables", "-V"], None).is_ok_and(|v| v.contains("nf_tables"))
}

impl Iptables {
    fn created_path(&self) -> Option<PathBuf> {
        self.state_dir
            .as_ref()
            .map(|d| d.join("iptables-created.json"))
    }

    /// Remembers, before virtgate first adds anything, what already existed.
    fn remember_preexisting(&self) {
        let Some(p) = self.created_path() else { return };
        if p.exists() {
            return;
        }
        if !is_nft_variant() {
            return;
        }
        let pre = present_chains();
        if let Ok(text) = serde_json::to_string(&pre) {
            let _ = crate::state::write_atomic(&p, text.as_bytes());
        }
    }

    /// After removing everything: iptables-nft created tables and built-in chains lazily;
    /// delete the empty ones that did not exist before virtgate.
    fn cleanup_created(&self) -> Result<(), FirewallError> {
        let Some(p) = self.created_path() else {
            return Ok(());
        };
        let Ok(text) = std::fs::read_to_string(&p) else {
            return Ok(());
        };
        let pre: BTreeSet<String> = serde_json::from_str(&text).unwrap_or_default();
        let now = present_chains();
        let mut batch = String::new();
        for f in [Family::Ipv4, Family::Ipv6] {
            let fam = placement::nft_family(f);
            for t in ["nat", "filter"] {
                let table = format!("{fam} {t}");
                if !now.contains(&table) {
                    continue;
                }
                let save = xtables::save(f, t, false);
                let rules = xtables::parse_save(&save);
                let chains: Vec<&String> = now
                    .iter()
                    .filter(|c| c.starts_with(&format!("{table} ")))
                    .collect();
                let mut remaining = 0;
                for c in &chains {
                    let name = &c[table.len() + 1..];
                    let empty = rules.get(name).is_none_or(|r| r.is_empty());
                    // only built-in chains virtgate's jumps created, still empty and with
                    // the default policy: anyone else's chain stays
                    let builtin = BUILTIN.contains(&name);
                    let accept = save
                        .lines()
                        .any(|l| l.starts_with(&format!(":{name} ACCEPT")));
                    if !pre.contains(*c) && empty && builtin && accept {
                        let _ = writeln!(batch, "delete chain {fam} {t} {name}");
                    } else {
                        remaining += 1;
                    }
                }
                if remaining == 0 && !pre.contains(&table) {
                    let _ = writeln!(batch, "delete table {fam} {t}");
                }
            }
        }
        if !batch.is_empty() {
            nftables::nft_apply(&batch)?;
        }
        let _ = std::fs::remove_file(p);
        Ok(())
    }
}

impl Backend for Iptables {
    fn name(&self) -> &'static str {
        "iptables"
    }

    fn render(&self, rs: &Ruleset) -> String {
        let mut s = String::new();
        for f in [Family::Ipv4, Family::Ipv6] {
            let scripts: Vec<String> = specs(rs, f)
                .iter()
                .filter_map(|spec| xtables::table_script(spec, ""))
                .collect();
            if !scripts.is_empty() {
                let _ = writeln!(s, "# {} --noflush", xtables::restore_cmd(f));
                for sc in scripts {
                    s.push_str(&sc);
                }
            }
        }
        let nft = placement::nft_render(&rs.accepts);
        if !nft.is_empty() {
            s.push_str("# nft -f - (libvirt's nftables chains)\n");
            s.push_str(&nft);
        }
        s
    }

    fn apply(&self, rs: &Ruleset) -> Result<(), FirewallError> {
        if !rs.is_empty() {
            self.remember_preexisting();
        }
        let nft = placement::nft_batch(&rs.accepts)?;
        if !rs.is_empty() && !nft.is_empty() {
            nftables::nft_apply(&nft)?;
        }
        for f in [Family::Ipv4, Family::Ipv6] {
            let mut script = String::new();
            // filter (accept) before nat (DNAT) when adding; the restore is one transaction
            for spec in specs(rs, f).iter().rev() {
                let cur = xtables::try_save(f, spec.table, false)?;
                if let Some(s) = xtables::table_script(spec, &cur) {
                    script.push_str(&s);
                }
            }
            if !script.is_empty() {
                xtables::restore(f, &script)?;
            }
        }
        if rs.is_empty() {
            if !nft.is_empty() {
                nftables::nft_apply(&nft)?;
            }
            self.cleanup_created()?;
        }
        Ok(())
    }

    fn fingerprint(&self) -> Result<Option<String>, FirewallError> {
        let mut text = String::new();
        xtables::describe(&["nat", "filter"], &mut text)?;
        placement::describe(&mut text)?;
        if text.is_empty() {
            return Ok(None);
        }
        Ok(Some(digest(&strip_counters(&text))))
    }

    fn counters(&self, _rs: &Ruleset) -> Result<BTreeMap<String, Counters>, FirewallError> {
        let mut forward: BTreeMap<String, Counters> = BTreeMap::new();
        let mut dnat: BTreeMap<String, Counters> = BTreeMap::new();
        for f in [Family::Ipv4, Family::Ipv6] {
            for (t, map) in [("filter", &mut forward), ("nat", &mut dnat)] {
                for line in xtables::save(f, t, true).lines() {
                    let Some(rest) = line.strip_prefix('[') else {
                        continue;
                    };
                    let Some((nums, rule)) = rest.split_once("] ") else {
                        continue;
                    };
                    let Some(p) = rule.find("\"vg:") else {
                        continue;
                    };
                    let id: String = rule[p + 4..]
                        .chars()
                        .take_while(|c| c.is_ascii_hexdigit())
                        .collect();
                    let (pk, by) = nums.split_once(':').unwrap_or(("0", "0"));
                    let c = map.entry(id).or_default();
                    c.packets += pk.parse::<u64>().unwrap_or(0);
                    c.bytes += by.parse::<u64>().unwrap_or(0);
                }
            }
        }
        // the forward accept counts every packet; without it (libvirt on nftables) the
        // DNAT rules count the first packet of each connection
        for (k, v) in dnat {
            forward.entry(k).or_insert(v);
        }
        Ok(forward)
    }
}
