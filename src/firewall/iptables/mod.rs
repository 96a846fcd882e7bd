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

mod nat;
mod rules;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use super::xtables::{self};
use super::{Backend, Counters, FirewallError, nfnl, nftables, placement};
use crate::exec;
use crate::model::Family;
use crate::rules::Ruleset;
use rules::delta_scripts;
pub use rules::specs;

#[derive(Debug, Default, Clone)]
pub struct Iptables {
    /// The tables and chains that existed before virtgate first added any (iptables-nft
    /// creates them lazily; exact removal deletes what it created): the backend's
    /// memory, kept in the state by reconcile.
    preexisting: std::cell::RefCell<Option<BTreeSet<String>>>,
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
    /// Remembers, before virtgate first adds anything, what already existed.
    fn remember_preexisting(&self) {
        if self.preexisting.borrow().is_some() || !is_nft_variant() {
            return;
        }
        *self.preexisting.borrow_mut() = Some(present_chains());
    }

    /// After removing everything: iptables-nft created tables and built-in chains lazily;
    /// delete the empty ones that did not exist before virtgate.
    fn cleanup_created(&self) -> Result<(), FirewallError> {
        let Some(pre) = self.preexisting.borrow_mut().take() else {
            return Ok(());
        };
        let now = present_chains();
        let mut batch = String::new();
        for f in [Family::Ipv4, Family::Ipv6] {
            let fam = placement::nft_family(f);
            for t in ["nat", "filter", "mangle"] {
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
        if !batch.is_empty()
            && let Err(e) = nftables::nft_apply(&batch)
        {
            // tried again next time
            *self.preexisting.borrow_mut() = Some(pre);
            return Err(e);
        }
        Ok(())
    }
}

impl Backend for Iptables {
    fn name(&self) -> &'static str {
        "iptables"
    }

    fn memory(&self) -> Option<BTreeSet<String>> {
        self.preexisting.borrow().clone()
    }

    fn set_memory(&self, memory: Option<BTreeSet<String>>) {
        *self.preexisting.borrow_mut() = memory;
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

    fn apply_delta(&self, old: &Ruleset, new: &Ruleset) -> Result<(), FirewallError> {
        if old.is_empty() || new.is_empty() {
            return self.apply(new);
        }
        let mut scripts = Vec::new();
        for f in [Family::Ipv4, Family::Ipv6] {
            // filter (accept) before nat (DNAT), as in apply
            let Some(script) = delta_scripts(old, new, f) else {
                return self.apply(new);
            };
            if !script.is_empty() {
                scripts.push((f, script));
            }
        }
        let nft = placement::nft_batch(&new.accepts)?;
        if !nft.is_empty() {
            nftables::nft_apply(&nft)?;
        }
        for (f, script) in scripts {
            xtables::restore(f, &script)?;
        }
        Ok(())
    }

    fn has_delta(&self) -> bool {
        true
    }

    fn generation(&self, _rs: &Ruleset) -> Result<Option<u32>, FirewallError> {
        if ![Family::Ipv4, Family::Ipv6]
            .into_iter()
            .all(xtables::on_nf_tables)
        {
            return Ok(None);
        }
        // iptables-restore's own commits said it (reading it now would wait for the
        // kernel to free what they deleted)
        if let Some(g) = nfnl::take_seen_generation() {
            return Ok(Some(g));
        }
        Ok(nfnl::generation().ok())
    }

    fn in_sync(&self, rs: &Ruleset) -> Result<bool, FirewallError> {
        if !placement::nft_batch(&rs.accepts)?.is_empty() {
            return Ok(false);
        }
        for f in [Family::Ipv4, Family::Ipv6] {
            for spec in specs(rs, f) {
                let cur = xtables::try_save(f, spec.table, false)?;
                if !xtables::in_sync(&spec, &cur) {
                    tracing::debug!("iptables: {f:?} {} differs from the plan", spec.table);
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    fn counters(&self, rs: &Ruleset) -> Result<BTreeMap<String, Counters>, FirewallError> {
        let mut forward: BTreeMap<String, Counters> = BTreeMap::new();
        let mut dnat: BTreeMap<String, Counters> = BTreeMap::new();
        let mut limited: BTreeMap<String, Counters> = BTreeMap::new();
        let limits = rs.rules.iter().any(|r| r.rate.is_some());
        for f in [Family::Ipv4, Family::Ipv6] {
            let tables = [
                ("filter", &mut forward),
                ("nat", &mut dnat),
                ("mangle", &mut limited),
            ];
            for (t, map) in tables {
                if t == "mangle" && !limits {
                    continue;
                }
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
        // the DNAT rules count the first packet of each connection; the forward accept
        // every packet (without it, on libvirt's nftables form, the DNAT rules count both)
        for (k, v) in dnat {
            let c = forward.entry(k).or_insert(v);
            c.connections = v.packets;
        }
        // the drops of a rate limit: one packet per refused new connection
        for (k, v) in limited {
            forward.entry(k).or_default().rate_limited += v.packets;
        }
        Ok(forward)
    }
}
