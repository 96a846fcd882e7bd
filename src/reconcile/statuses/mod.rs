//! The forwards' statuses of the last whole reconcile, kept in the state directory under
//! its inputs digest: while the config, the facts and the kernel are as that reconcile
//! left them, `status` shows them without planning again (at 10,000 forwards planning is
//! most of what `status` costs). Written only where the digest is recorded (the kernel
//! holds that plan), read only where the digest and the generation still match; a
//! missing, older or unreadable file just means planning.
//!
//! Kept compact (postcard), by domain: each domain's config as planned (with its
//! `<metadata>`), its forwards' statuses in the same order, and the digest of what is not
//! the config ([`inputs::Inputs::rest`]): what a reconcile after one domain's change
//! compares with ([`super::one_domain`]).

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod kept;

use super::inputs::{self, Inputs};
use super::{Context, desired, plan_desired};
use crate::config::Config;
use crate::facts::Facts;
use crate::firewall::Backend;
use crate::model::DomainConfig;
use crate::plan::{ForwardState, ForwardStatus, GuestAddr};
use crate::rules::Ruleset;
use crate::state::State;
use kept::KeptConfig;

const FILE: &str = "statuses";
/// Largest file read.
const MAX_BYTES: u64 = 64 << 20;

/// One forward's status without its spec (its domain's, at the same place): borrowed
/// from the plan when written, owned when read back.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Kept<'a> {
    state: ForwardState,
    guest: Cow<'a, [GuestAddr]>,
    bridge: Cow<'a, Option<String>>,
    reason: Cow<'a, Option<String>>,
    rule_ids: Cow<'a, [String]>,
}

/// A domain's config as planned, with its forwards' statuses.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct KeptDomain<'a> {
    config: KeptConfig,
    forwards: Vec<Kept<'a>>,
}

/// A domain's config as planned, read back, with its forwards' statuses.
struct Planned {
    config: DomainConfig,
    forwards: Vec<Kept<'static>>,
}

#[derive(Serialize, Deserialize)]
struct Cached<'a> {
    digest: Cow<'a, str>,
    rest: Cow<'a, str>,
    /// By name, as the config holds them.
    domains: Vec<KeptDomain<'a>>,
}

/// The last whole reconcile, as read back: what every domain's config said and what
/// became of its forwards.
pub(super) struct Record {
    pub(super) rest: String,
    domains: Vec<Planned>,
}

impl Record {
    /// The domains whose config differs from `merged`'s (added and removed ones too).
    pub(super) fn changed<'a>(&'a self, merged: &'a Config) -> Vec<&'a str> {
        let mut out = Vec::new();
        let mut old = self.domains.iter().peekable();
        let mut new = merged.domains.iter().peekable();
        loop {
            match (old.peek(), new.peek()) {
                (None, None) => return out,
                (Some(o), Some((n, d))) if o.config.name == **n => {
                    if o.config != d.domain {
                        out.push(n.as_str());
                    }
                    old.next();
                    new.next();
                }
                (Some(o), Some((n, _))) if o.config.name.as_str() < n.as_str() => {
                    out.push(&o.config.name);
                    old.next();
                }
                (Some(o), None) => {
                    out.push(&o.config.name);
                    old.next();
                }
                (_, Some((n, _))) => {
                    out.push(n.as_str());
                    new.next();
                }
            }
        }
    }

    /// `name`'s config as it was planned.
    pub(super) fn domain(&self, name: &str) -> Option<&DomainConfig> {
        self.position(name).ok().map(|i| &self.domains[i].config)
    }

    /// `name`'s forwards' statuses as they were planned.
    pub(super) fn statuses_of(&self, name: &str) -> Vec<ForwardStatus> {
        let Ok(i) = self.position(name) else {
            return Vec::new();
        };
        let d = &self.domains[i];
        statuses_of(d.config.clone(), d.forwards.clone()).collect()
    }

    /// Every guest address of the forwards of the domains other than `name`.
    pub(super) fn guests_except(&self, name: &str) -> std::collections::HashSet<std::net::IpAddr> {
        self.domains
            .iter()
            .filter(|d| d.config.name != name)
            .flat_map(|d| &d.forwards)
            .flat_map(|k| k.guest.iter().map(|g| g.ip))
            .collect()
    }

    fn position(&self, name: &str) -> Result<usize, usize> {
        self.domains
            .binary_search_by(|d| d.config.name.as_str().cmp(name))
    }

    /// The record with `name` planned again: its config now (None: gone) and the statuses
    /// of its forwards.
    pub(super) fn replace(
        &mut self,
        name: &str,
        config: Option<&DomainConfig>,
        forwards: &[ForwardStatus],
    ) {
        let at = self.position(name);
        let Some(config) = config else {
            if let Ok(i) = at {
                self.domains.remove(i);
            }
            return;
        };
        let kept = Planned {
            config: config.clone(),
            forwards: forwards.iter().map(|f| kept(f).into_owned()).collect(),
        };
        match at {
            Ok(i) => self.domains[i] = kept,
            Err(i) => self.domains.insert(i, kept),
        }
    }

    /// Every forward's status, in the config's order.
    pub(super) fn statuses(self) -> Vec<ForwardStatus> {
        let mut out = Vec::new();
        for d in self.domains {
            out.extend(statuses_of(d.config, d.forwards));
        }
        out
    }
}

/// A domain's forwards' statuses, each with its spec.
fn statuses_of(config: DomainConfig, kept: Vec<Kept>) -> impl Iterator<Item = ForwardStatus> {
    let name = config.name;
    config
        .forwards
        .into_iter()
        .zip(kept)
        .map(move |(spec, k)| ForwardStatus {
            domain: name.clone(),
            spec,
            state: k.state,
            guest: k.guest.into_owned(),
            bridge: k.bridge.into_owned(),
            reason: k.reason.into_owned(),
            rule_ids: k.rule_ids.into_owned(),
        })
}

impl Kept<'_> {
    fn into_owned(self) -> Kept<'static> {
        Kept {
            state: self.state,
            guest: Cow::Owned(self.guest.into_owned()),
            bridge: Cow::Owned(self.bridge.into_owned()),
            reason: Cow::Owned(self.reason.into_owned()),
            rule_ids: Cow::Owned(self.rule_ids.into_owned()),
        }
    }
}

fn kept(f: &ForwardStatus) -> Kept<'_> {
    Kept {
        state: f.state,
        guest: Cow::Borrowed(&f.guest),
        bridge: Cow::Borrowed(&f.bridge),
        reason: Cow::Borrowed(&f.reason),
        rule_ids: Cow::Borrowed(&f.rule_ids),
    }
}

fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// Records the statuses a whole reconcile planned from `merged` (the config with the
/// domains' metadata) under its inputs. `forwards` are in the config's order, one per
/// configured forward, as the planner gives them.
pub(super) fn record(
    state_dir: &Path,
    inputs: &Inputs,
    merged: &Config,
    forwards: &[ForwardStatus],
) {
    let file = path(state_dir);
    let Some(domains) = by_domain(merged, forwards) else {
        let _ = std::fs::remove_file(&file);
        return;
    };
    let cached = Cached {
        digest: Cow::Borrowed(&inputs.digest),
        rest: Cow::Borrowed(&inputs.rest),
        domains,
    };
    let written = postcard::to_allocvec(&cached)
        .map_err(std::io::Error::other)
        .and_then(|b| crate::state::write_this_boot(&file, &b));
    if let Err(e) = written {
        // only a shortcut: without it, `status` and the next `apply` plan
        tracing::debug!("cannot keep the forwards' statuses: {e}");
        let _ = std::fs::remove_file(&file);
    }
}

/// `forwards` by domain, each with its config; None if they are not one status per
/// configured forward in the config's order.
fn by_domain<'a>(merged: &'a Config, forwards: &'a [ForwardStatus]) -> Option<Vec<KeptDomain<'a>>> {
    let mut rest = forwards;
    let mut out = Vec::with_capacity(merged.domains.len());
    for (name, d) in &merged.domains {
        let n = d.domain.forwards.len();
        if rest.len() < n {
            return None;
        }
        let (mine, after) = rest.split_at(n);
        let same = mine
            .iter()
            .zip(&d.domain.forwards)
            .all(|(f, spec)| f.domain == *name && f.spec == *spec);
        if !same {
            return None;
        }
        out.push(KeptDomain {
            config: KeptConfig::from(&d.domain),
            forwards: mine.iter().map(kept).collect(),
        });
        rest = after;
    }
    rest.is_empty().then_some(out)
}

/// The record of the last whole reconcile, if it is the one of `digest`.
pub(super) fn read(state_dir: &Path, digest: &str) -> Option<Record> {
    let bytes =
        crate::files::read_bounded(&path(state_dir), MAX_BYTES, crate::files::Follow::No).ok()?;
    let cached: Cached = postcard::from_bytes(&bytes).ok()?;
    if cached.digest != digest {
        return None;
    }
    let domains = cached
        .domains
        .into_iter()
        .map(|d| Planned {
            config: d.config.into(),
            forwards: d.forwards.into_iter().map(Kept::into_owned).collect(),
        })
        .collect();
    Some(Record {
        rest: cached.rest.into_owned(),
        domains,
    })
}

/// The statuses of the last whole reconcile, if its inputs digest is this config's, these
/// facts' and this backend's, and the kernel's generation is the one it left.
fn unchanged(
    ctx: &Context,
    config: &Config,
    facts: &Facts,
    state: &State,
    backend: &dyn Backend,
) -> Option<Vec<ForwardStatus>> {
    let recorded = state.inputs.as_ref()?;
    let digest = inputs::digest(config, facts, backend.name())?;
    if recorded.digest != digest
        || state.generation.is_none()
        || backend.generation(&state.ruleset).ok()? != state.generation
    {
        return None;
    }
    let forwards = read(&ctx.state_dir, &digest)?.statuses();
    tracing::debug!("nothing changed since the last apply: its statuses, not planned again");
    Some(forwards)
}

/// What `status` and a metrics scrape show.
pub struct Shown<'c> {
    /// The config with the domains' metadata.
    pub config: Cow<'c, Config>,
    pub forwards: Vec<ForwardStatus>,
    /// The planned rules; None when nothing changed since the last reconcile, whose plan
    /// the kernel and the state hold.
    pub ruleset: Option<Ruleset>,
}

/// The last whole reconcile's statuses while nothing changed since (see [`unchanged`]),
/// else a plan made now (read-only).
pub fn shown<'c>(
    ctx: &Context,
    config: &'c Config,
    facts: &Facts,
    state: &State,
    backend: &dyn Backend,
) -> Shown<'c> {
    let merged = desired(config, &facts.domains);
    if let Some(forwards) = unchanged(ctx, config, facts, state, backend) {
        return Shown {
            config: merged,
            forwards,
            ruleset: None,
        };
    }
    let plan = plan_desired(&merged, facts, state);
    Shown {
        config: merged,
        forwards: plan.forwards,
        ruleset: Some(plan.ruleset),
    }
}

#[cfg(test)]
mod tests;
