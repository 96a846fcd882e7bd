//! The nftables backend: virtgate's own `table inet virtgate`.
//!
//! Forwards are elements of hash maps keyed by (listen, protocol, port) ([`layout`]), so
//! the cost per packet does not grow with the number of forwards, and a change of a few
//! forwards is a few `add element`/`delete element` statements. A missing table is made
//! as its shape in one `nft -f` and its elements in one netlink batch after it
//! ([`Nftables::create`]); a table of the wrong shape is replaced whole (counters carried
//! over) in one `nft -f`; every other change is a delta in one transaction: a netlink
//! batch when it is elements alone, else `nft -f` together with the accepts placed in
//! libvirt's nftables chains. The kernel is read back over
//! netlink ([`super::nfnl`]), never by listing with `nft`.

mod delta;
mod render;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use self::layout::{Layout, declarations};
use super::{Backend, Counters, FirewallError, nfnl, placement, xtables};
use crate::exec;
use crate::model::Family;
use crate::rules::Ruleset;
use delta::{delta, rate_limited, touched_layouts};
pub use render::table_batch;
use render::{Kept, fixed_chains, full_batch, shape_batch};

pub mod encode;

pub mod layout;

pub const TABLE: &str = "virtgate";

#[derive(Debug, Default, Clone, Copy)]
pub struct Nftables;

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
                kept.insert((d.name.clone(), e.key), c);
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

/// Whether the kernel's table has `l`'s shape: its chains with their number of rules,
/// and its sets.
fn shape_in_sync(l: &Layout) -> Result<bool, FirewallError> {
    let mut want_rules: BTreeMap<String, usize> = fixed_chains(l)
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
    let mut want_sets: BTreeSet<String> = declarations().into_iter().map(|d| d.name).collect();
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
    Ok(true)
}

/// Whether every map and set of the table holds exactly `l`'s elements.
fn elements_in_sync(l: &Layout) -> Result<bool, FirewallError> {
    for d in &declarations() {
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

    /// Makes the table where there is none, in two transactions: its shape (chains,
    /// rules, empty maps and sets) with the accepts in one `nft -f`, then every element
    /// in one netlink batch. Nothing is forwarded before the second commits, and `nft`
    /// never parses 10,000 elements' text (most of a whole `apply`'s time). Should the
    /// elements be refused, the table goes again.
    fn create(&self, rs: &Ruleset) -> Result<(), FirewallError> {
        let l = Layout::of(rs);
        let mut batch = shape_batch(&l);
        batch.push_str(&placement::nft_batch(&rs.accepts)?);
        self.commit(rs, &batch, true)?;
        let mut b = nfnl::Batch::default();
        for d in declarations() {
            if let Some(elems) = l.elements.get(&d.name) {
                let bytes: Vec<nfnl::ElemBytes> = elems
                    .iter()
                    .map(|e| encode::elem_netlink(e, d.interval))
                    .collect();
                b.add(TABLE, &d.name, &bytes);
            }
        }
        b.commit().map_err(|e| {
            if let Err(undo) = nft_apply(&full_batch(&Ruleset::default(), &Kept::new())) {
                tracing::warn!("nftables: removing the table without its elements: {undo}");
            }
            FirewallError::Rejected(format!("nf_tables refused the elements: {e}"))
        })
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
        if !rs.is_empty() && !nfnl::table_exists(inet(), TABLE).unwrap_or(true) {
            return self.create(rs);
        }
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
        if !shape_in_sync(&l)? || !elements_in_sync(&l)? {
            return Ok(false);
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
        for ((set, key), (packets, bytes)) in kept_counters()? {
            let Some(e) = encode::target_of(&key) else {
                continue;
            };
            if let Some(r) = layout::traffic_owner(&index, &e) {
                let c: &mut Counters = m.entry(r.id.clone()).or_default();
                if set.starts_with("conns") {
                    c.connections += packets;
                } else {
                    c.packets += packets;
                    c.bytes += bytes;
                }
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
