//! Firewall backends. One trait, one module per backend (as netavark does). A backend
//! renders the backend-neutral [`Ruleset`] into its own language, applies it (whole, or as
//! the delta from what is installed) in one atomic transaction per tool, and reads the
//! kernel back: [`Backend::in_sync`] compares it with a ruleset (drift), counters feed
//! `status`.
//!
//! Placement of the accept in libvirt's forward path is shared by both backends and lives
//! in [`placement`]: it depends on libvirt's firewall form, not on virtgate's.

pub mod foreign;
pub mod iptables;
pub mod nfnl;
pub mod nftables;
pub mod placement;
pub mod xtables;

use std::collections::BTreeMap;

use crate::exec::ExecError;
use crate::model::BackendChoice;
use crate::rules::Ruleset;

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error("the kernel refused the change, nothing was changed: {0}")]
    Rejected(String),
    #[error("cannot read the ruleset back: {0}")]
    Parse(String),
}

/// Packet and byte counters of one rule id.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    /// New connections dropped by the forward's rate limit.
    pub rate_limited: u64,
    /// New connections forwarded (their first packets).
    pub connections: u64,
}

/// A firewall backend.
pub trait Backend {
    fn name(&self) -> &'static str;

    /// What the backend keeps between runs; reconcile stores it in the state, gives it
    /// back before a change ([`Backend::set_memory`]) and reads it after. The iptables
    /// backend: the tables and chains that existed before it first added any, so that
    /// removing everything deletes only what it created. Backends never write files.
    fn memory(&self) -> Option<std::collections::BTreeSet<String>> {
        None
    }

    fn set_memory(&self, memory: Option<std::collections::BTreeSet<String>>) {
        let _ = memory;
    }

    /// The exact text `apply` loads for virtgate's own rules (placement included as the
    /// backend would write it), without touching the kernel.
    fn render(&self, rs: &Ruleset) -> String;

    /// Makes the kernel hold `rs`, atomically: the old state or the new, never half.
    /// An empty ruleset removes everything virtgate owns.
    fn apply(&self, rs: &Ruleset) -> Result<(), FirewallError>;

    /// Changes the kernel from `old` (what it holds, as far as virtgate knows) to `new`,
    /// touching only what differs, in one transaction per tool. Fails if the kernel does
    /// not hold `old` where the change touches it; the caller then falls back to
    /// [`Backend::apply`].
    fn apply_delta(&self, old: &Ruleset, new: &Ruleset) -> Result<(), FirewallError> {
        let _ = old;
        self.apply(new)
    }

    /// Whether [`Backend::apply_delta`] writes only the difference (else it is
    /// [`Backend::apply`]).
    fn has_delta(&self) -> bool {
        false
    }

    /// Whether [`Backend::apply_part`] works: a delta that needs to know only the rules it
    /// changes, every installed rule for the same guest addresses, and the shared parts
    /// (accepts, hairpins, hairpin ports) whole. A hook then decodes no other rule.
    fn local_delta(&self) -> bool {
        false
    }

    /// [`Backend::apply_delta`] between two parts of the installed ruleset (see
    /// [`Backend::local_delta`]), while other rules are installed beside them and stay.
    fn apply_part(&self, old: &Ruleset, new: &Ruleset) -> Result<(), FirewallError> {
        let _ = (old, new);
        Err(FirewallError::Rejected(format!(
            "the {} backend changes the whole ruleset only",
            self.name()
        )))
    }

    /// The kernel's count of committed ruleset changes, when it counts every change to
    /// what `rs` puts there (the nf_tables generation: `nft` and iptables-nft alike); `None`
    /// when part of it is not counted (iptables-legacy). See [`holds`].
    fn generation(&self, rs: &Ruleset) -> Result<Option<u32>, FirewallError> {
        let _ = rs;
        Ok(None)
    }

    /// Whether the kernel holds exactly `rs`, read back in full.
    fn in_sync(&self, rs: &Ruleset) -> Result<bool, FirewallError>;

    /// Counters per rule id of `rs`.
    fn counters(&self, rs: &Ruleset) -> Result<BTreeMap<String, Counters>, FirewallError>;
}

/// Whether the kernel holds exactly `rs`, and the generation at which it was seen to.
///
/// `seen`: the generation at which the kernel last held `rs` (recorded in the state).
/// When nothing was committed since, nothing changed and nothing is read back; else the
/// kernel is compared in full, and the comparison counts for a generation only if none
/// was committed while it read.
pub fn holds(
    backend: &dyn Backend,
    rs: &Ruleset,
    seen: Option<u32>,
) -> Result<(bool, Option<u32>), FirewallError> {
    let before = backend.generation(rs)?;
    if before.is_some() && before == seen {
        return Ok((true, before));
    }
    let holds = backend.in_sync(rs)?;
    let after = backend.generation(rs)?;
    Ok((holds, before.filter(|_| holds && after == before)))
}

/// The generation after `g` once one transaction was committed (the kernel skips 0).
pub fn next_generation(g: u32) -> u32 {
    match g.wrapping_add(1) {
        0 => 1,
        n => n,
    }
}

/// The backend chosen by name; `auto` prefers nftables when `nft` is installed.
pub fn backend(choice: BackendChoice) -> Box<dyn Backend> {
    match resolve(choice) {
        BackendChoice::Iptables => Box::new(iptables::Iptables::default()),
        _ => Box::new(nftables::Nftables),
    }
}

pub fn resolve(choice: BackendChoice) -> BackendChoice {
    match choice {
        BackendChoice::Auto => {
            if crate::exec::installed("nft") {
                BackendChoice::Nftables
            } else {
                BackendChoice::Iptables
            }
        }
        c => c,
    }
}

/// Removes `counter packets N bytes M` / `[N:M]` so that listings compare without traffic.
pub fn strip_counters(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let mut l = line.to_string();
        while let Some(p) = l.find("packets ") {
            // nft: "packets 12 bytes 3400"
            let rest = &l[p..];
            let end = rest
                .find("bytes ")
                .map(|b| {
                    let after = &rest[b + 6..];
                    b + 6
                        + after
                            .find(|c: char| !c.is_ascii_digit())
                            .unwrap_or(after.len())
                })
                .unwrap_or(rest.len());
            l.replace_range(p..p + end, "");
        }
        if l.starts_with('[') && !l.starts_with("[0:0]") {
            // iptables-save -c: "[12:3400] -A ..."
            if let Some(e) = l.find(']') {
                l.replace_range(..=e, "");
            }
        }
        if let Some(p) = l.find(" [") {
            // chain policy counters ":FORWARD ACCEPT [1:2]"
            if l.starts_with(':') {
                l.truncate(p);
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    }
    out
}
