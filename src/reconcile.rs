//! The one level-triggered reconcile: desired state (config + facts) -> plan -> compare
//! with what is installed (the state, and the kernel read back) -> at most one atomic
//! change, the delta where the kernel holds what the state says. CLI `apply`, the libvirt
//! hook (narrowed to its domain: [`plan_domain`]) and (later) the daemon all call this.

use std::borrow::Cow;
use std::path::PathBuf;

use crate::config::{BackendChoice, Config};
use crate::facts::{DomainFacts, Facts, LibvirtPaths};
use crate::firewall::{self, Backend, FirewallError};
use crate::plan::{self, Plan, Rule};
use crate::state::{State, StateDir, StateError};

/// Where things are, from the global options.
#[derive(Debug, Clone)]
pub struct Context {
    pub config_path: PathBuf,
    pub state_dir: PathBuf,
    pub backend: BackendChoice,
    pub libvirt: LibvirtPaths,
}

impl Context {
    /// The backend: the command line wins over the config file.
    pub fn backend_for(&self, config: &Config) -> Box<dyn Backend> {
        let choice = match (self.backend, config.backend) {
            (BackendChoice::Auto, Some(c)) => c,
            (c, _) => c,
        };
        firewall::backend(choice)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Firewall(#[from] FirewallError),
}

/// What a reconcile did.
#[derive(Debug)]
pub struct Outcome {
    /// The status of every forward planned.
    pub forwards: Vec<plan::ForwardStatus>,
    /// Rules installed now.
    pub rules: usize,
    pub changed: bool,
    pub backend: &'static str,
    /// The state after the reconcile (what is installed now).
    pub state: State,
}

/// Rules installed before for domains whose config is invalid now: kept unchanged while
/// the domain runs (a stopped domain loses its rules whatever its config says).
pub fn carried_rules(config: &Config, facts: &Facts, state: &State) -> Vec<Rule> {
    state
        .ruleset
        .rules
        .iter()
        .filter(|r| config.invalid_domains.contains(&r.domain))
        .filter(|r| facts.domains.iter().any(|d| d.name == r.domain))
        .cloned()
        .collect()
}

/// The config as it is planned: the files', with the forwards in the `<metadata>` of
/// `domains` (running) joined to it. The one place they join: every plan and every
/// command that shows the config as planned goes through here.
pub fn desired<'c>(config: &'c Config, domains: &[DomainFacts]) -> Cow<'c, Config> {
    config.with_metadata(domains)
}

/// A plan with the config it was made from ([`desired`]).
pub struct Planned<'c> {
    pub config: Cow<'c, Config>,
    pub plan: Plan,
}

/// Plans without touching anything.
pub fn plan_only<'c>(config: &'c Config, facts: &Facts, state: &State) -> Planned<'c> {
    let config = desired(config, &facts.domains);
    let plan = plan_desired(&config, facts, state);
    Planned { config, plan }
}

/// [`plan_only`] of a config already merged.
fn plan_desired(config: &Config, facts: &Facts, state: &State) -> Plan {
    // domains that hold their ports now keep them against newcomers
    let mut domains = config.domain_configs();
    let installed: std::collections::HashSet<&str> = state
        .ruleset
        .rules
        .iter()
        .map(|r| r.domain.as_str())
        .collect();
    domains.sort_by_cached_key(|d| !installed.contains(d.name.as_str()));
    plan::plan(&domains, facts, &carried_rules(config, facts, state))
}

/// The facts a reconcile works with: libvirt's files, plus the domains hooks reported as
/// started, minus those hooks reported as stopped.
pub fn facts_for(ctx: &Context, st: &State) -> Facts {
    let extra: Vec<_> = st.started.values().cloned().collect();
    let mut f = crate::facts::gather(&ctx.libvirt, &extra, &crate::firewall::placement::Probe);
    f.domains.retain(|d| !st.stopped.contains(&d.name));
    f
}

/// The facts a hook for one domain needs: libvirt's networks, leases, the neighbour table
/// and sysctls, and that domain (from its XML); other domains' status files are not read
/// (what is installed for them stays as it is).
pub fn facts_for_domain(ctx: &Context, domain: Option<&crate::facts::DomainFacts>) -> Facts {
    let domains: Vec<_> = domain.into_iter().cloned().collect();
    crate::facts::gather_only(&ctx.libvirt, domains, &crate::firewall::placement::Probe)
}

/// Which domains a reconcile may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    /// Everything (level-triggered).
    All,
    /// Only this config domain's rules; every other domain keeps what is installed.
    Domain(&'a str),
}

/// Reconciles under the state lock. `update` may edit the state first (a hook records
/// a started or stopped domain), given the facts it then reconciles with.
pub fn reconcile(
    ctx: &Context,
    config: &Config,
    gather: impl FnOnce(&State) -> Facts,
    update: impl FnOnce(&mut State),
) -> Result<Outcome, ReconcileError> {
    reconcile_scoped(ctx, config, gather, update, Scope::All)
}

/// [`reconcile`], limited to `scope`.
///
/// A hook (`Scope::Domain`) with a backend whose delta is local loads only its domain's
/// rules and the index of the others ([`crate::state::Installed`]): its cost does not grow
/// with what other domains have installed. The [`Outcome`]'s state then holds only the
/// rules that were decoded.
pub fn reconcile_scoped(
    ctx: &Context,
    config: &Config,
    gather: impl FnOnce(&State) -> Facts,
    update: impl FnOnce(&mut State),
    scope: Scope,
) -> Result<Outcome, ReconcileError> {
    let dir = StateDir::lock(&ctx.state_dir)?;
    let backend = ctx.backend_for(config);
    let (mut state, mut inst) = match scope {
        Scope::Domain(name) if backend.local_delta() => {
            let (st, inst) = dir.load_for(name)?;
            (st, Some(inst))
        }
        _ => (dir.load()?, None),
    };
    // switching backends: the old one removes what it installed, from the whole ruleset
    if let Some(i) = &inst
        && state
            .backend
            .as_deref()
            .is_some_and(|b| b != backend.name())
    {
        state.ruleset = i.merged(&state.ruleset).map_err(|msg| corrupt(ctx, msg))?;
        inst = None;
    }
    let before = state.without_ruleset();
    backend.set_memory(state.xt_preexisting.clone());
    begin(ctx, &mut state, update);
    let facts = gather(&state);
    let (plan, result) = match (&mut inst, scope) {
        (Some(i), Scope::Domain(name)) => {
            let plan = plan_domain_against(config, &facts, &state, name, &i.others());
            let Plan { ruleset, forwards } = plan;
            let r = apply_part(ctx, &mut state, i, ruleset, backend.as_ref(), name);
            (forwards, r)
        }
        _ => {
            let plan = match scope {
                Scope::All => plan_only(config, &facts, &state).plan,
                Scope::Domain(name) => plan_domain(config, &facts, &state, name),
            };
            let Plan { ruleset, forwards } = plan;
            let r = apply_plan(&mut state, ruleset, backend.as_ref(), scope);
            (forwards, r)
        }
    };
    if state.backend.as_deref().is_none_or(|b| b == backend.name()) {
        state.xt_preexisting = backend.memory();
    }
    // what the hook recorded (started, stopped) is kept even if the change failed; an
    // unchanged state is not written again
    if !matches!(result, Ok(false)) || state.without_ruleset() != before {
        match &inst {
            Some(i) => dir.save_partial(&state, i)?,
            None => dir.save(&state)?,
        }
    }
    let changed = result?;
    let others = inst.as_ref().map_or(0, |i| i.other_rules());
    Ok(Outcome {
        forwards: plan,
        rules: state.ruleset.rules.len() + others,
        changed,
        backend: backend.name(),
        state,
    })
}

fn corrupt(ctx: &Context, msg: String) -> ReconcileError {
    ReconcileError::State(StateError::Corrupt {
        path: crate::state::state_file(&ctx.state_dir),
        msg,
    })
}

/// What every reconcile does to the state first: a new boot forgets what ran before,
/// `update` records what the caller knows (a hook: started or stopped), and a stopped
/// domain counts as stopped until libvirt has deleted its status file.
fn begin(ctx: &Context, state: &mut State, update: impl FnOnce(&mut State)) {
    state.forget_previous_boot();
    update(state);
    // a stopped domain's status file is gone once libvirt is done with it
    let qemu_dir = ctx.libvirt.qemu_status_dir();
    state
        .stopped
        .retain(|n| qemu_dir.join(format!("{n}.xml")).exists());
}

/// The plan narrowed to one config domain: its forwards are planned against the facts,
/// every other domain keeps exactly what is installed for it (and holds its ports).
/// Costs what the domain has, not what is installed.
pub fn plan_domain(config: &Config, facts: &Facts, state: &State, name: &str) -> Plan {
    plan_domain_against(config, facts, state, name, &[])
}

/// [`plan_domain`] where the rules of the other domains are `others` (from the state's
/// index) besides those in `state.ruleset`.
pub fn plan_domain_against(
    config: &Config,
    facts: &Facts,
    state: &State,
    name: &str,
    others: &[plan::Held],
) -> Plan {
    let config = desired(config, &facts.domains);
    let domains: Vec<crate::model::DomainConfig> = config
        .domains
        .get(name)
        .map(|d| vec![d.domain.clone()])
        .unwrap_or_default();
    // an invalid config keeps what is installed for the domain while it runs
    let keep_mine =
        config.invalid_domains.contains(name) && facts.domains.iter().any(|d| d.name == name);
    let carried: Vec<Rule> = state
        .ruleset
        .rules
        .iter()
        .filter(|r| keep_mine || r.domain != name)
        .cloned()
        .collect();
    let mut plan = plan::plan_against(&domains, facts, carried, others);
    // ports of other domains' bridge ports stay as they are
    let mut ports: Vec<String> = Vec::new();
    if !state.ruleset.hairpin_ports.is_empty() {
        let other_taps: std::collections::HashSet<&str> = state
            .ruleset
            .rules
            .iter()
            .filter(|r| r.domain != name)
            .filter_map(|r| r.tap.as_deref())
            .chain(others.iter().filter_map(|h| h.tap))
            .collect();
        ports.extend(
            state
                .ruleset
                .hairpin_ports
                .iter()
                .filter(|p| other_taps.contains(p.as_str()))
                .cloned(),
        );
    }
    if facts.sysctls.bridge_nf_call_iptables == Some(true) {
        let own = plan.ruleset.rules.iter().filter(|r| r.domain == name);
        ports.extend(own.filter_map(|r| r.tap.clone()));
    }
    ports.sort();
    ports.dedup();
    plan.ruleset.hairpin_ports = ports;
    plan
}

/// The bridge ports of `name`'s rules.
fn own_taps<'a>(rs: &'a plan::Ruleset, name: &'a str) -> impl Iterator<Item = String> + 'a {
    rs.rules
        .iter()
        .filter(move |r| r.domain == name)
        .filter_map(|r| r.tap.clone())
}

/// The generation at which the kernel is known to hold what was just applied: only if
/// the change is all that was committed since `before`, itself trusted.
fn generation_after(trusted: bool, before: Option<u32>, after: Option<u32>) -> Option<u32> {
    match (trusted, before, after) {
        (true, Some(b), Some(a)) if a == firewall::next_generation(b) => Some(a),
        _ => None,
    }
}

/// The hook's change with a local delta: `state.ruleset` and `new` hold the domain's
/// rules (before and after), to which every other domain's rule for the same guest
/// addresses is added from `inst`; the kernel gets their delta. If it refuses, the whole
/// ruleset (decoded from `inst` then) is written instead.
fn apply_part(
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
    state.generation = generation_after(trusted, before, after);
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
fn switch_backend(state: &mut State, backend: &dyn Backend) -> Result<(), ReconcileError> {
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
fn apply_plan(
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

/// Where config and facts meet: a running domain's `<metadata>` for the config to merge.
impl crate::config::CarriesMetadata for crate::facts::DomainFacts {
    fn name(&self) -> &str {
        &self.name
    }
    fn uuid(&self) -> Option<&str> {
        self.uuid.as_deref()
    }
    fn metadata_xml(&self) -> Option<&str> {
        self.metadata.as_deref()
    }
}
