//! The one level-triggered reconcile: desired state (config + facts) -> plan -> compare
//! with what is installed (state + kernel fingerprint) -> at most one atomic change.
//! CLI `apply`, the libvirt hook and (later) the daemon all call this.

use std::path::PathBuf;

use crate::config::{BackendChoice, Config};
use crate::facts::{Facts, LibvirtPaths};
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
        firewall::backend_with_state(choice, &self.state_dir)
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
    pub plan: Plan,
    pub changed: bool,
    pub backend: &'static str,
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

/// Plans without touching anything. Forwards in running domains' `<metadata>` join the
/// config here, where the facts are known.
pub fn plan_only(config: &Config, facts: &Facts, state: &State) -> Plan {
    let config = config.with_metadata(&facts.domains);
    // domains that hold their ports now keep them against newcomers
    let mut domains = config.domain_configs();
    domains.sort_by_key(|d| !state.ruleset.rules.iter().any(|r| r.domain == d.name));
    plan::plan(&domains, facts, &carried_rules(&config, facts, state))
}

/// The facts a reconcile works with: libvirt's files, plus the domains hooks reported as
/// started, minus those hooks reported as stopped.
pub fn facts_for(ctx: &Context, st: &State) -> Facts {
    let extra: Vec<_> = st.started.values().cloned().collect();
    let mut f = crate::facts::gather(&ctx.libvirt, &extra);
    f.domains.retain(|d| !st.stopped.contains(&d.name));
    f
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
pub fn reconcile_scoped(
    ctx: &Context,
    config: &Config,
    gather: impl FnOnce(&State) -> Facts,
    update: impl FnOnce(&mut State),
    scope: Scope,
) -> Result<Outcome, ReconcileError> {
    let dir = StateDir::lock(&ctx.state_dir)?;
    let mut state = dir.load()?;
    // a new boot: nothing a hook reported as running before runs now
    let boot = crate::state::boot_id();
    if boot.is_some() && state.boot_id != boot {
        state.started.clear();
        state.stopped.clear();
        state.hairpin_saved.clear();
        state.boot_id = boot;
    }
    update(&mut state);
    // a stopped domain's status file is gone once libvirt is done with it
    let qemu_dir = ctx.libvirt.qemu_status_dir();
    state
        .stopped
        .retain(|n| qemu_dir.join(format!("{n}.xml")).exists());
    let facts = gather(&state);
    let mut plan = plan_only(config, &facts, &state);
    if let Scope::Domain(name) = scope {
        let mut rules: Vec<Rule> = state
            .ruleset
            .rules
            .iter()
            .filter(|r| r.domain != name)
            .cloned()
            .collect();
        rules.extend(
            plan.ruleset
                .rules
                .iter()
                .filter(|r| r.domain == name)
                .cloned(),
        );
        let ports = plan.ruleset.hairpin_ports.clone();
        plan.ruleset = plan::Ruleset::from_rules(rules, &facts.networks);
        plan.ruleset.hairpin_ports = ports;
    }
    let backend = ctx.backend_for(config);
    let result = apply_plan(ctx, &mut state, &plan, backend.as_ref());
    // what the hook recorded (started, stopped) is kept even if the change failed
    dir.save(&state)?;
    let changed = result?;
    Ok(Outcome {
        plan,
        changed,
        backend: backend.name(),
    })
}

/// Applies `plan` unless the kernel already holds it; updates `state` on success.
fn apply_plan(
    ctx: &Context,
    state: &mut State,
    plan: &Plan,
    backend: &dyn Backend,
) -> Result<bool, ReconcileError> {
    // switching backends: the old one removes what it installed
    if let Some(old) = state.backend.clone()
        && old != backend.name()
        && !state.ruleset.is_empty()
    {
        let choice = BackendChoice::parse(&old).unwrap_or_default();
        firewall::backend_with_state(choice, &ctx.state_dir).apply(&Default::default())?;
        state.ruleset = Default::default();
        state.fingerprint = None;
    }
    // the kernel is read only when the plan is unchanged (drift check); a changed plan is
    // applied straight away (the hook's hot path)
    let unchanged = plan.ruleset == state.ruleset && backend.fingerprint()? == state.fingerprint;
    let changed = if unchanged {
        false
    } else {
        if let Err(e) = backend.apply(&plan.ruleset) {
            // one transaction per tool (nft, iptables, ip6tables): if a later one failed,
            // put back what was there so the kernel holds the old ruleset, not a half
            if let Err(r) = backend.apply(&state.ruleset) {
                tracing::error!("rolling back after a failed change also failed: {r}");
            }
            return Err(e.into());
        }
        state.ruleset = plan.ruleset.clone();
        state.fingerprint = backend.fingerprint()?;
        true
    };
    crate::bridge::sync(&plan.ruleset.hairpin_ports, &mut state.hairpin_saved);
    state.backend = (!state.ruleset.is_empty()).then(|| backend.name().to_string());
    Ok(changed)
}
