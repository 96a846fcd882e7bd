//! Plans narrowed to one domain, and the rules kept for domains whose config is invalid.

use super::{Context, desired};
use crate::config::Config;
use crate::facts::Facts;
use std::collections::HashSet;
use std::net::IpAddr;

use crate::model::{DomainConfig, ForwardSpec};
use crate::plan::{self, ForwardState, ForwardStatus, Plan, Rule};
use crate::state::State;

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
    plan_merged(&desired(config, &facts.domains), facts, state, name, others)
}

/// [`plan_domain_against`] of a config already merged ([`desired`]).
fn plan_merged(
    config: &Config,
    facts: &Facts,
    state: &State,
    name: &str,
    others: &[plan::Held],
) -> Plan {
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
    let mut plan = plan::plan_against(&domains, facts, carried, others, &state.ruleset.rules);
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

/// What the last whole plan said of a domain that changed since, and of the others.
pub struct Before<'a> {
    /// The domain's config (None: it was not configured).
    pub config: Option<&'a DomainConfig>,
    /// Its forwards' statuses.
    pub statuses: &'a [ForwardStatus],
    /// Every guest address the other domains' forwards had (their statuses').
    pub others_guests: &'a HashSet<IpAddr>,
}

/// The whole plan after only `name`'s config changed since `before`, planned for that
/// domain alone, if that is exactly what planning everything gives: `merged` (the config
/// with the domains' metadata) is the config now, `state` holds the whole plan made from
/// the config before with the same facts (and `others` the rules of the domains not
/// decoded). None where the domain's forwards could touch another domain's:
/// - its forwards, before or after, overlap another domain's (a conflict's winner, a
///   refusal, a port held);
/// - its pin or its explicit guest addresses changed (who claims which address);
/// - a config is invalid (its rules are carried as they were);
/// - planned now or before, a forward is neither active nor stopped (pending, in
///   conflict), or has a guest address another domain names or uses (an address learned
///   from traffic that two domains use is trusted for neither).
pub fn plan_one_changed(
    merged: &Config,
    before: &Before,
    facts: &Facts,
    state: &State,
    name: &str,
    others: &[plan::Held],
) -> Option<Plan> {
    let now = merged.domains.get(name).map(|d| &d.domain);
    if !merged.invalid_domains.is_empty() || !independent(merged, name, before.config, now) {
        return None;
    }
    let plan = plan_merged(merged, facts, state, name, others);
    let named: HashSet<IpAddr> = merged
        .domains
        .iter()
        .filter(|(n, _)| n.as_str() != name)
        .flat_map(|(_, d)| &d.domain.forwards)
        .flat_map(|f| f.guest_addresses.iter().copied())
        .collect();
    let exact = plan.forwards.iter().chain(before.statuses).all(|f| {
        matches!(f.state, ForwardState::Active | ForwardState::Stopped)
            && f.guest
                .iter()
                .all(|g| !named.contains(&g.ip) && !before.others_guests.contains(&g.ip))
    });
    exact.then_some(plan)
}

/// Whether `name`'s config `before` and `now` leave every other domain's plan as it was.
fn independent(
    merged: &Config,
    name: &str,
    before: Option<&DomainConfig>,
    now: Option<&DomainConfig>,
) -> bool {
    let uuid = |d: Option<&DomainConfig>| d.and_then(|d| d.uuid.clone());
    let named = |d: Option<&DomainConfig>| {
        let mut v: Vec<IpAddr> = d
            .iter()
            .flat_map(|d| &d.forwards)
            .flat_map(|f| f.guest_addresses.iter().copied())
            .collect();
        v.sort();
        v
    };
    if uuid(before) != uuid(now) || named(before) != named(now) {
        return false;
    }
    let mine: Vec<&ForwardSpec> = before
        .into_iter()
        .chain(now)
        .flat_map(|d| &d.forwards)
        .collect();
    merged
        .domains
        .iter()
        .filter(|(n, _)| n.as_str() != name)
        .flat_map(|(_, d)| &d.domain.forwards)
        .all(|o| {
            !mine
                .iter()
                .any(|m| crate::model::conflicts::specs_overlap(m, o))
        })
}

/// This domain's forwards that collide with forwards installed for other domains running
/// now (they keep their ports).
pub fn conflicts_with_running(
    ctx: &Context,
    cfg: &Config,
    cfg_name: &str,
    name: &str,
) -> Vec<String> {
    let Some(me) = cfg.domains.get(cfg_name) else {
        return Vec::new();
    };
    let (st, inst) =
        crate::state::read_state_for(&crate::state::state_file(&ctx.state_dir), cfg_name)
            .unwrap_or_default();
    // recorded before a reboot: none of it runs
    let others = if st.from_this_boot() {
        inst.others()
    } else {
        Vec::new()
    };
    me.domain
        .forwards
        .iter()
        .filter_map(|f| {
            let r = others
                .iter()
                .filter(|r| r.domain != cfg_name && r.domain != name)
                .find(|r| plan::conflicts::spec_overlaps_rule(f, r))?;
            Some(format!(
                "forward {} conflicts with {}/{} of running domain {:?}",
                f.short(),
                r.host_ports,
                r.proto,
                r.domain
            ))
        })
        .collect()
}
