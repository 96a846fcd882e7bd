//! Plans narrowed to one domain, and the rules kept for domains whose config is invalid.

use super::{Context, desired};
use crate::config::Config;
use crate::facts::Facts;
use crate::plan::{self, Plan, Rule};
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
