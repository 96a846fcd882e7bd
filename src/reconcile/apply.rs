//! Turning what is installed into what is planned: the whole ruleset, a delta, or (a
//! hook) the part of one domain; rolled back whole if a tool refuses.

use super::{Context, ReconcileError, Scope, corrupt};
use crate::config::BackendChoice;
use crate::firewall::{self, Backend};
use crate::plan::{self, Plan};
use crate::state::State;

/// The bridge ports of `name`'s rules.
pub(super) fn own_taps<'a>(
    rs: &'a plan::Ruleset,
    name: &'a str,
) -> impl Iterator<Item = String> + 'a {
    rs.rules
        .iter()
        .filter(move |r| r.domain == name)
        .filter_map(|r| r.tap.clone())
}

/// The generation at which the kernel is known to hold what was just applied: only if
/// the change is all that was committed since `before`, itself trusted.
pub(super) fn generation_after(
    trusted: bool,
    before: Option<u32>,
    after: Option<u32>,
) -> Option<u32> {
    match (trusted, before, after) {
        (true, Some(b), Some(a)) if a == firewall::next_generation(b) => Some(a),
        _ => None,
    }
}

/// The hook's change with a local delta: `state.ruleset` and `new` hold the domain's
/// rules (before and after), to which every other domain's rule for the same guest
/// addresses is added from `inst`; the kernel gets their delta. If it refuses, the whole
/// ruleset (decoded from `inst` then) is written instead.
pub(super) fn apply_part(
    ctx: &Context,
    state: &mut State,
    inst: &mut crate::state::Installed,
    mut new: plan::Ruleset,
    backend: &dyn Backend,
    name: &str,
) -> Result<bool, ReconcileError> {
    let guests: std::collections::BTreeSet<std::net::IpAddr> = state
        .ruleset
        .rules
        .iter()
        .chain(&new.rules)
        .map(|r| r.guest_ip)
        .collect();
    let sharing = inst
        .take_sharing(&guests)
        .map_err(|msg| corrupt(ctx, msg))?;
    if !sharing.is_empty() {
        state.ruleset.rules.extend(sharing.iter().cloned());
        plan::sort_rules(&mut state.ruleset.rules);
        new.rules.extend(sharing);
        plan::sort_rules(&mut new.rules);
    }
    let same = new == state.ruleset;
    let old_taps: Vec<String> = own_taps(&state.ruleset, name).collect();
    // nothing else installed: the parts are the whole (the table may not exist yet)
    let alone = inst.other_rules() == 0;
    let before = backend.generation(&state.ruleset)?;
    let trusted = before.is_some() && before == state.generation;
    let mut result = if alone {
        backend.apply_delta(&state.ruleset, &new)
    } else {
        backend.apply_part(&state.ruleset, &new)
    };
    if let Err(e) = &result {
        tracing::warn!("the kernel refused the change of a part ({e}); writing the whole ruleset");
        let whole = inst.merged(&new).map_err(|msg| corrupt(ctx, msg))?;
        result = backend.apply(&whole);
    }
    if let Err(e) = result {
        // put back what was there so the kernel holds the old ruleset, not a half
        match inst.merged(&state.ruleset) {
            Ok(old) => {
                if let Err(r) = backend.apply(&old) {
                    tracing::error!("rolling back after a failed change also failed: {r}");
                }
            }
            Err(msg) => tracing::error!("cannot roll back: {msg}"),
        }
        state.generation = None;
        return Err(e.into());
    }
    let after = backend.generation(&new)?;
    // nothing to change, nothing committed: the kernel holds it where it did
    state.generation = if same && trusted && after == before {
        before
    } else {
        generation_after(trusted, before, after)
    };
    let own: std::collections::BTreeSet<String> =
        old_taps.into_iter().chain(own_taps(&new, name)).collect();
    crate::bridge::sync(&new.hairpin_ports, &mut state.hairpin_saved, Some(&own));
    let installed = !new.is_empty() || !alone;
    state.ruleset = new;
    state.backend = installed.then(|| backend.name().to_string());
    Ok(!same)
}

/// Switching backends: the old one removes what it installed, and the new one starts
/// from nothing (and remembers from here).
pub(super) fn switch_backend(
    state: &mut State,
    backend: &dyn Backend,
) -> Result<(), ReconcileError> {
    let Some(old) = state.backend.clone() else {
        return Ok(());
    };
    if old == backend.name() || state.ruleset.is_empty() {
        return Ok(());
    }
    let old = firewall::backend(BackendChoice::parse(&old).unwrap_or_default());
    old.set_memory(state.xt_preexisting.take());
    let removed = old.apply(&Default::default());
    state.xt_preexisting = old.memory();
    removed?;
    backend.set_memory(None);
    state.ruleset = Default::default();
    state.generation = None;
    Ok(())
}

/// Applies `plan` unless the kernel already holds it; updates `state` on success.
///
/// `Scope::All` (apply, daemon, network hooks) reads the kernel: nothing is written when
/// it holds the plan; a change is a delta when the kernel holds what the state says, else
/// the whole ruleset is written. `Scope::Domain` (the qemu hook) trusts the state and
/// writes the delta straight away (only libvirt's chain is read, for the placement); if
/// the kernel refuses it, the whole ruleset is written instead.
pub(super) fn apply_plan(
    state: &mut State,
    ruleset: plan::Ruleset,
    backend: &dyn Backend,
    scope: Scope,
) -> Result<bool, ReconcileError> {
    let plan = Plan {
        ruleset,
        forwards: Vec::new(),
    };
    switch_backend(state, backend)?;
    let same = plan.ruleset == state.ruleset;
    // whether the kernel holds the state's ruleset (a delta can start from it), and the
    // generation at which it is known to
    let (held, known) = match scope {
        Scope::Domain(_) if backend.has_delta() => (true, state.generation),
        _ => {
            let (holds, seen) = firewall::holds(backend, &state.ruleset, state.generation)?;
            if same && holds {
                state.generation = seen;
                crate::bridge::sync(&plan.ruleset.hairpin_ports, &mut state.hairpin_saved, None);
                return Ok(false);
            }
            (holds, seen)
        }
    };
    let delta_ok = backend.has_delta() && held;
    let old_taps: Vec<String> = match scope {
        Scope::Domain(name) => own_taps(&state.ruleset, name).collect(),
        Scope::All => Vec::new(),
    };
    let old = &state.ruleset;
    let before = backend.generation(old)?;
    // the change is all that is committed between `before` and after it: the kernel then
    // holds the plan at the generation after, as far as the delta started from what it held
    let trusted = !delta_ok || (before.is_some() && before == known);
    let mut result = if delta_ok {
        backend.apply_delta(old, &plan.ruleset)
    } else {
        backend.apply(&plan.ruleset)
    };
    if let Err(e) = &result
        && delta_ok
    {
        tracing::warn!("the kernel refused the change of a part ({e}); writing the whole ruleset");
        result = backend.apply(&plan.ruleset);
    }
    if let Err(e) = result {
        // one transaction per tool (nft, iptables, ip6tables): if a later one failed,
        // put back what was there so the kernel holds the old ruleset, not a half
        if let Err(r) = backend.apply(old) {
            tracing::error!("rolling back after a failed change also failed: {r}");
        }
        state.generation = None;
        return Err(e.into());
    }
    let after = backend.generation(&plan.ruleset)?;
    state.generation = generation_after(trusted, before, after);
    let changed = !same || !delta_ok;
    // a hook looks at its own domain's ports only
    let own: Option<std::collections::BTreeSet<String>> = match scope {
        Scope::All => None,
        Scope::Domain(name) => Some(
            old_taps
                .into_iter()
                .chain(own_taps(&plan.ruleset, name))
                .collect(),
        ),
    };
    crate::bridge::sync(
        &plan.ruleset.hairpin_ports,
        &mut state.hairpin_saved,
        own.as_ref(),
    );
    state.ruleset = plan.ruleset;
    state.backend = (!state.ruleset.is_empty()).then(|| backend.name().to_string());
    Ok(changed)
}
