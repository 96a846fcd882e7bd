//! A whole reconcile after a config edit that changed one domain: planned and applied
//! for that domain alone, as a hook does, where that is provably what planning
//! everything gives ([`super::plan_one_changed`]). It needs the record of the last whole
//! reconcile ([`super::statuses`]) with the same facts, and a kernel that has committed
//! nothing since; anything else plans everything. Its cost is the domain's, not the
//! 10,000 forwards' installed (the config and the facts are still read whole).

use super::inputs::Inputs;
use super::statuses;
use super::{Context, ReconcileError, corrupt, desired};
use crate::config::Config;
use crate::facts::Facts;
use crate::firewall::Backend;
use crate::plan::ForwardStatus;
use crate::state::{Installed, State};

/// What the narrowed reconcile did: every forward's status, and whether it changed the
/// kernel.
pub(super) type Done = (Vec<ForwardStatus>, Result<bool, ReconcileError>);

/// The reconcile of `config` planned for the one domain whose config changed since the
/// last whole reconcile (`recorded`: its digest), or None where it must plan everything.
/// `state` and `inst` are as loaded for a whole reconcile (no domain's rows decoded); on
/// None, the domain's rows may have been decoded into `state`.
pub(super) fn reconcile(
    ctx: &Context,
    (config, facts): (&Config, &Facts),
    (state, inst): (&mut State, &mut Installed),
    backend: &dyn Backend,
    (recorded, now): (&str, &Inputs),
) -> Result<Option<Done>, ReconcileError> {
    if !backend.local_delta()
        || state.generation.is_none()
        || backend.generation(&state.ruleset)? != state.generation
    {
        return Ok(None);
    }
    let Some(mut record) = statuses::read(&ctx.state_dir, recorded) else {
        tracing::debug!("no record of the last whole reconcile: planning everything");
        return Ok(None);
    };
    if record.rest != now.rest {
        tracing::debug!("the facts changed since the last whole reconcile: planning everything");
        return Ok(None);
    }
    let merged = desired(config, &facts.domains);
    let changed = record.changed(&merged);
    let name = match changed.as_slice() {
        // the files' bytes changed, not what they say: nothing to plan
        [] => {
            tracing::debug!("the config's files changed, not what they say: nothing to plan");
            crate::bridge::sync(&state.ruleset.hairpin_ports, &mut state.hairpin_saved, None);
            return Ok(Some((record.statuses(), Ok(false))));
        }
        [one] => one.to_string(),
        more => {
            tracing::debug!(
                "{} domains' config changed: planning everything",
                more.len()
            );
            return Ok(None);
        }
    };
    let mine = inst.take_domain(&name).map_err(|m| corrupt(ctx, m))?;
    state.ruleset.rules.extend(mine);
    crate::rules::sort_rules(&mut state.ruleset.rules);
    let config = record.domain(&name).cloned();
    let statuses = record.statuses_of(&name);
    let others_guests = record.guests_except(&name);
    let before = super::Before {
        config: config.as_ref(),
        statuses: &statuses,
        others_guests: &others_guests,
    };
    let Some(plan) = super::plan_one_changed(&merged, &before, facts, state, &name, &inst.others())
    else {
        tracing::debug!("{name}'s change may touch other domains: planning everything");
        return Ok(None);
    };
    tracing::debug!("only {name}'s config changed: planning it alone");
    record.replace(
        &name,
        merged.domains.get(&name).map(|d| &d.domain),
        &plan.forwards,
    );
    let result = super::apply::apply_part(ctx, state, inst, plan.ruleset, backend, &name);
    Ok(Some((record.statuses(), result)))
}
