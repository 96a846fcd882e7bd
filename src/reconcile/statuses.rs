//! The forwards' statuses of the last whole reconcile, kept in the state directory under
//! its inputs digest: while the config, the facts and the kernel are as that reconcile
//! left them, `status` shows them without planning again (at 10,000 forwards planning is
//! most of what `status` costs). Written only where the digest is recorded (the kernel
//! holds that plan), read only where the digest and the generation still match; a
//! missing, older or unreadable file just means planning.
//!
//! Kept compact (postcard): each forward's spec as its place in the config it was planned
//! from (the same config, since the digest covers its bytes), the rest as planned.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Context, desired, inputs, plan_desired};
use crate::config::Config;
use crate::facts::Facts;
use crate::firewall::Backend;
use crate::plan::{ForwardState, ForwardStatus, GuestAddr};
use crate::rules::Ruleset;
use crate::state::State;

const FILE: &str = "statuses";
/// Largest file read.
const MAX_BYTES: u64 = 64 << 20;

/// One forward's status, its spec as (domain, index in the domain's forwards): borrowed
/// from the plan when written, owned when read back.
#[derive(Serialize, Deserialize)]
struct Kept<'a> {
    domain: Cow<'a, str>,
    index: u32,
    state: ForwardState,
    guest: Cow<'a, [GuestAddr]>,
    bridge: Cow<'a, Option<String>>,
    reason: Cow<'a, Option<String>>,
    rule_ids: Cow<'a, [String]>,
}

#[derive(Serialize, Deserialize)]
struct Cached<'a> {
    digest: Cow<'a, str>,
    forwards: Vec<Kept<'a>>,
}

fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// Records the statuses a whole reconcile planned from `merged` (the config with the
/// domains' metadata) under its inputs digest.
pub(super) fn record(state_dir: &Path, digest: &str, merged: &Config, forwards: &[ForwardStatus]) {
    let kept: Option<Vec<Kept>> = forwards
        .iter()
        .map(|f| {
            let d = merged.domains.get(&f.domain)?;
            let index = d.domain.forwards.iter().position(|s| *s == f.spec)?;
            Some(Kept {
                domain: Cow::Borrowed(&f.domain),
                index: u32::try_from(index).ok()?,
                state: f.state,
                guest: Cow::Borrowed(&f.guest),
                bridge: Cow::Borrowed(&f.bridge),
                reason: Cow::Borrowed(&f.reason),
                rule_ids: Cow::Borrowed(&f.rule_ids),
            })
        })
        .collect();
    let file = path(state_dir);
    let Some(forwards) = kept else {
        let _ = std::fs::remove_file(&file);
        return;
    };
    let cached = Cached {
        digest: Cow::Borrowed(digest),
        forwards,
    };
    let written = postcard::to_allocvec(&cached)
        .map_err(std::io::Error::other)
        .and_then(|b| crate::state::write_atomic(&file, &b));
    if let Err(e) = written {
        // only a shortcut for `status`: it plans without it
        tracing::debug!("cannot keep the forwards' statuses: {e}");
        let _ = std::fs::remove_file(&file);
    }
}

/// The statuses of the last whole reconcile, if its inputs digest is this config's, these
/// facts' and this backend's, and the kernel's generation is the one it left. `merged`:
/// the config with the domains' metadata, as planned.
fn unchanged(
    ctx: &Context,
    (config, merged): (&Config, &Config),
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
    let bytes =
        crate::files::read_bounded(&path(&ctx.state_dir), MAX_BYTES, crate::files::Follow::No)
            .ok()?;
    let cached: Cached = postcard::from_bytes(&bytes).ok()?;
    if cached.digest != digest {
        return None;
    }
    let forwards = cached
        .forwards
        .into_iter()
        .map(|k| {
            let spec = merged
                .domains
                .get(k.domain.as_ref())?
                .domain
                .forwards
                .get(usize::try_from(k.index).ok()?)?
                .clone();
            Some(ForwardStatus {
                domain: k.domain.into_owned(),
                spec,
                state: k.state,
                guest: k.guest.into_owned(),
                bridge: k.bridge.into_owned(),
                reason: k.reason.into_owned(),
                rule_ids: k.rule_ids.into_owned(),
            })
        })
        .collect::<Option<Vec<_>>>()?;
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
    if let Some(forwards) = unchanged(ctx, (config, &merged), facts, state, backend) {
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
