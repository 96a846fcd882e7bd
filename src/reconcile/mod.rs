//! The one level-triggered reconcile: desired state (config + facts) -> plan -> compare
//! with what is installed (the state, and the kernel read back) -> at most one atomic
//! change, the delta where the kernel holds what the state says. CLI `apply`, the libvirt
//! hook (narrowed to its domain: [`plan_domain`]) and (later) the daemon all call this.

mod apply;
mod inputs;
mod narrow;
mod one_domain;
pub mod statuses;

use std::borrow::Cow;
use std::path::PathBuf;

use crate::config::{BackendChoice, Config};
use crate::facts::{DomainFacts, Facts, LibvirtPaths};
/// Every nf_tables commit from now on: what the hook's reload follower and the daemon wait on.
pub use crate::firewall::nfnl::Commits;
use crate::firewall::{self, Backend, FirewallError};
use crate::plan::{self, Plan};
use crate::state::{PlannedInputs, State, StateDir, StateError};
use apply::{apply_part, apply_plan};
pub use narrow::{
    Before, carried_rules, conflicts_with_running, plan_domain, plan_domain_against,
    plan_one_changed,
};

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

    /// The state directory, where it may keep libvirt's files parsed
    /// ([`crate::facts::cache`]): only one nobody else can write.
    pub fn cache_dir(&self) -> Option<&std::path::Path> {
        let dir = self.state_dir.as_path();
        crate::files::untrusted_dir(dir).is_none().then_some(dir)
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
    /// How many forwards are active.
    pub active: usize,
    pub changed: bool,
    pub backend: &'static str,
    /// The state after the reconcile (what is installed now).
    pub state: State,
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
pub(crate) fn plan_desired(config: &Config, facts: &Facts, state: &State) -> Plan {
    // forwards installed now keep their ports against newcomers
    let domains = config.domain_configs();
    let carried = carried_rules(config, facts, state);
    plan::plan_against(&domains, facts, carried, &[], &state.ruleset.rules)
}

/// The facts a reconcile works with: libvirt's files, plus the domains hooks reported as
/// started, minus those hooks reported as stopped.
pub fn facts_for(ctx: &Context, st: &State) -> Facts {
    let extra: Vec<_> = st.started.values().cloned().collect();
    let mut f = crate::facts::gather(&ctx.libvirt, &extra, &KernelProbe, ctx.cache_dir());
    f.domains.retain(|d| !st.stopped.contains(&d.name));
    f.snooped = crate::facts::snoop::read(&ctx.state_dir);
    f
}

/// The facts a hook for one domain needs: libvirt's networks, leases, the neighbour table
/// and sysctls, and that domain (from its XML); other domains' status files are not read
/// (what is installed for them stays as it is).
pub fn facts_for_domain(ctx: &Context, domain: Option<&crate::facts::DomainFacts>) -> Facts {
    let domains: Vec<_> = domain.into_iter().cloned().collect();
    let mut f = crate::facts::gather_only(&ctx.libvirt, domains, &KernelProbe, ctx.cache_dir());
    f.snooped = crate::facts::snoop::read(&ctx.state_dir);
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
    let (mut state, mut inst) = load(ctx, &dir, backend.as_ref(), scope)?;
    let before = state.without_ruleset();
    backend.set_memory(state.xt_preexisting.clone());
    begin(ctx, &mut state, update);
    let facts = gather(&state);
    let inputs = match scope {
        Scope::All => inputs::of(config, &facts, backend.name()),
        Scope::Domain(_) => None,
    };
    let digest = inputs.as_ref().map(|i| i.digest.as_str());
    let (forwards, result) = match unchanged_inputs(&mut state, digest, backend.as_ref())? {
        Some(active) => (Known::Unchanged(active), Ok(false)),
        None => {
            let parts = (config, &facts, inputs.as_ref());
            let (forwards, result) =
                plan_changed(ctx, parts, (&mut state, &mut inst), backend.as_ref(), scope)?;
            (Known::Forwards(forwards), result)
        }
    };
    if state.backend.as_deref().is_none_or(|b| b == backend.name()) {
        state.xt_preexisting = backend.memory();
    }
    let active = forwards.active();
    // recorded only where the kernel's generation says it still holds the plan
    if let (Known::Forwards(f), Ok(_), Some(inputs), Some(_)) =
        (&forwards, &result, inputs, state.generation)
    {
        statuses::record(&ctx.state_dir, &inputs, &desired(config, &facts.domains), f);
        state.inputs = Some(PlannedInputs {
            digest: inputs.digest,
            active,
        });
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
        forwards: match forwards {
            Known::Forwards(f) => f,
            Known::Unchanged(_) => Vec::new(),
        },
        rules: state.ruleset.rules.len() + others,
        active,
        changed,
        backend: backend.name(),
        state,
    })
}

/// What a reconcile knows of the forwards: their statuses, or (nothing planned) only how
/// many are active.
enum Known {
    Forwards(Vec<plan::ForwardStatus>),
    Unchanged(usize),
}

impl Known {
    fn active(&self) -> usize {
        match self {
            Known::Forwards(f) => f
                .iter()
                .filter(|f| f.state == plan::ForwardState::Active)
                .count(),
            Known::Unchanged(n) => *n,
        }
    }
}

/// The state a reconcile of `scope` starts from: a hook with a local delta (and a whole
/// reconcile, until it knows it has something to plan) decodes only the index and its
/// own domain's rows; switching backends needs the whole ruleset.
fn load(
    ctx: &Context,
    dir: &StateDir,
    backend: &dyn Backend,
    scope: Scope,
) -> Result<(State, Option<crate::state::Installed>), ReconcileError> {
    let (mut state, inst) = match scope {
        Scope::Domain(name) if backend.local_delta() => {
            let (st, inst) = dir.load_for(name)?;
            (st, Some(inst))
        }
        Scope::Domain(_) => (dir.load()?, None),
        Scope::All => {
            let (st, inst) = dir.load_for("")?;
            (st, Some(inst))
        }
    };
    // switching backends: the old one removes what it installed, from the whole ruleset
    if let Some(i) = &inst
        && state
            .backend
            .as_deref()
            .is_some_and(|b| b != backend.name())
    {
        state.ruleset = i.merged(&state.ruleset).map_err(|msg| corrupt(ctx, msg))?;
        return Ok((state, None));
    }
    Ok((state, inst))
}

/// A reconcile that has something to plan: one domain alone where only its config changed
/// since the last whole reconcile ([`one_domain`]), else `scope`.
fn plan_changed(
    ctx: &Context,
    (config, facts, inputs): (&Config, &Facts, Option<&inputs::Inputs>),
    (state, inst): (&mut State, &mut Option<crate::state::Installed>),
    backend: &dyn Backend,
    scope: Scope,
) -> Result<one_domain::Done, ReconcileError> {
    // what a hook changes is not a whole reconcile's: the next one plans again
    let recorded = state.inputs.take();
    if let (Some(r), Some(now), Some(i)) = (&recorded, inputs, inst.as_mut())
        && let Some(done) =
            one_domain::reconcile(ctx, (config, facts), (state, i), backend, (&r.digest, now))?
    {
        return Ok(done);
    }
    if scope == Scope::All
        && let Some(i) = inst.take()
    {
        state.ruleset = i.merged(&state.ruleset).map_err(|msg| corrupt(ctx, msg))?;
    }
    Ok(plan_and_apply(
        ctx, config, facts, state, inst, backend, scope,
    ))
}

/// Plans `scope` and changes the kernel: a hook's domain as a part, else the whole plan.
fn plan_and_apply(
    ctx: &Context,
    config: &Config,
    facts: &Facts,
    state: &mut State,
    inst: &mut Option<crate::state::Installed>,
    backend: &dyn Backend,
    scope: Scope,
) -> (Vec<plan::ForwardStatus>, Result<bool, ReconcileError>) {
    match (inst, scope) {
        (Some(i), Scope::Domain(name)) => {
            let plan = plan_domain_against(config, facts, state, name, &i.others());
            let Plan { ruleset, forwards } = plan;
            (forwards, apply_part(ctx, state, i, ruleset, backend, name))
        }
        _ => {
            let plan = match scope {
                Scope::All => plan_only(config, facts, state).plan,
                Scope::Domain(name) => plan_domain(config, facts, state, name),
            };
            let Plan { ruleset, forwards } = plan;
            (forwards, apply_plan(state, ruleset, backend, scope))
        }
    }
}

/// The number of active forwards, if a whole reconcile has nothing to plan: its inputs
/// digest to what the last one recorded and the kernel's generation is the one it left.
/// The bridge ports' hairpin modes are checked as an unchanged apply checks them.
fn unchanged_inputs(
    state: &mut State,
    digest: Option<&str>,
    backend: &dyn Backend,
) -> Result<Option<usize>, ReconcileError> {
    let (Some(digest), Some(recorded)) = (digest, &state.inputs) else {
        return Ok(None);
    };
    if recorded.digest != digest
        || state.generation.is_none()
        || backend.generation(&state.ruleset)? != state.generation
    {
        return Ok(None);
    }
    let active = recorded.active;
    tracing::debug!(
        "the config, the facts and the kernel are as the last apply left them: nothing to plan"
    );
    crate::bridge::sync(&state.ruleset.hairpin_ports, &mut state.hairpin_saved, None);
    Ok(Some(active))
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

/// Where facts and the firewall meet: what gathering facts asks of the kernel's firewall
/// (libvirt's nftables bridges, iptables' FORWARD chains), answered by the firewall side.
struct KernelProbe;

impl crate::facts::FirewallProbe for KernelProbe {
    fn libvirt_nft_bridges(&self) -> std::collections::BTreeSet<String> {
        firewall::placement::libvirt_nft_bridges()
    }
    fn xt_forward_families(&self) -> Vec<crate::model::Family> {
        firewall::placement::xt_forward_families()
    }
}
