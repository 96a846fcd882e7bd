//! The planner: a pure function from (config, facts) to a backend-neutral ruleset
//! ([`crate::rules`]) plus the status of every configured forward. No I/O here.
//!
//! - this file: the plan itself (conflicts first, each forward, anti-spoofing, refusals,
//!   then accepts and hairpins from the rules and their networks);
//! - `forward`: one forward of a running domain (NIC, bridge, listen key, rule ids) and
//!   the refusals of stopped domains;
//! - `addresses`: where a guest address comes from, which it may never be, and
//!   anti-spoofing across domains;
//! - `conflicts`: a planned rule against what another domain holds (spec conflicts are
//!   [`crate::model::conflicts`]).

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use addresses::{Index, drop_contested_neighbours};
use forward::{plan_forward, refusals, status};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::facts::{DomainFacts, Facts, LibvirtFirewall, NetworkFacts};
pub use crate::model::conflicts::{
    Conflict, find_conflicts, find_conflicts_by, find_conflicts_naive,
};
use crate::model::{DomainConfig, Family, ForwardSpec, Listen, PortRange, Proto, WhenStopped};
pub use crate::rules::{
    BridgeAccept, Hairpin, Held, ListenOn, REFUSAL_BRIDGE, Rule, Ruleset, sanitize_comment,
    sort_rules,
};

mod addresses;

pub mod conflicts;

mod forward;

/// Where a guest address came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AddrSource {
    Config,
    Reservation,
    Lease,
    Neighbour,
    /// Seen on the guest's tap by the daemon (DHCP ACK, ARP, first packet).
    Snooped,
}

/// The state of one configured forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ForwardState {
    Active,
    Pending,
    Stopped,
    Conflict,
    Drifted,
}

impl Ruleset {
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Builds accepts and hairpins from the rules and the networks they use.
    /// `xt_forward`: families whose iptables filter `FORWARD` chain exists (see [`Facts`]).
    pub fn from_rules(
        rules: Vec<Rule>,
        networks: &[NetworkFacts],
        xt_forward: &[Family],
    ) -> Ruleset {
        Ruleset::from_rules_and(rules, &[], networks, xt_forward)
    }

    /// [`Ruleset::from_rules`], the accepts and hairpins also covering `others` (rules
    /// installed for other domains that are not in `rules`: planning one domain).
    pub fn from_rules_and(
        mut rules: Vec<Rule>,
        others: &[Held],
        networks: &[NetworkFacts],
        xt_forward: &[Family],
    ) -> Ruleset {
        sort_rules(&mut rules);
        rules.dedup();
        // what accepts and hairpins depend on: (bridge, family), and the guest address
        // where the bridge is no libvirt network
        let mut keys: BTreeSet<(&str, Family, Option<IpAddr>)> = BTreeSet::new();
        let mut last = None;
        // refusals have no guest: no accept, no hairpin
        let all = rules
            .iter()
            .filter(|r| !r.refuses())
            .map(|r| (r.bridge.as_str(), r.family, r.guest_ip))
            .chain(
                others
                    .iter()
                    .filter(|h| !h.refuses())
                    .map(|h| (h.bridge, h.family, h.guest_ip)),
            );
        for (bridge, family, guest_ip) in all {
            let known = networks.iter().any(|n| n.bridge == bridge);
            let k = (bridge, family, (!known).then_some(guest_ip));
            if last != Some(k) {
                keys.insert(k);
                last = Some(k);
            }
        }
        let mut accepts = BTreeSet::new();
        let mut hairpins = BTreeSet::new();
        for (bridge, family, guest) in keys {
            let net = networks.iter().find(|n| n.bridge == bridge);
            let firewall = net.map(|n| n.firewall).unwrap_or_default();
            accepts.insert(BridgeAccept {
                bridge: bridge.to_string(),
                family,
                firewall,
            });
            // someone else's iptables FORWARD sees the packet too (Docker on an nft host)
            if firewall == LibvirtFirewall::Nftables && xt_forward.contains(&family) {
                accepts.insert(BridgeAccept {
                    bridge: bridge.to_string(),
                    family,
                    firewall: LibvirtFirewall::Iptables,
                });
            }
            match (net, guest) {
                (Some(n), _) => {
                    for s in n.subnets().filter(|s| Family::of_net(s) == family) {
                        hairpins.insert(Hairpin {
                            bridge: bridge.to_string(),
                            subnet: s,
                        });
                    }
                }
                (None, Some(ip)) => {
                    let host = match ip {
                        IpAddr::V4(_) => 32,
                        IpAddr::V6(_) => 128,
                    };
                    if let Ok(n) = IpNet::new(ip, host) {
                        hairpins.insert(Hairpin {
                            bridge: bridge.to_string(),
                            subnet: n,
                        });
                    }
                }
                (None, None) => {}
            }
        }
        Ruleset {
            rules,
            accepts: accepts.into_iter().collect(),
            hairpins: hairpins.into_iter().collect(),
            hairpin_ports: Vec::new(),
        }
    }
}

/// A guest address with its source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestAddr {
    pub ip: IpAddr,
    pub source: AddrSource,
}

/// The status of one configured forward.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardStatus {
    pub domain: String,
    pub spec: ForwardSpec,
    pub state: ForwardState,
    pub guest: Vec<GuestAddr>,
    pub bridge: Option<String>,
    /// Why it is not active, or notes.
    pub reason: Option<String>,
    pub rule_ids: Vec<String>,
}

/// Planner output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Plan {
    pub ruleset: Ruleset,
    pub forwards: Vec<ForwardStatus>,
}

/// Installed rules by domain, protocol and host ports.
struct Holding<'r>(HashMap<(&'r str, Proto, PortRange), Vec<&'r Rule>>);

impl<'r> Holding<'r> {
    fn of(installed: &'r [Rule]) -> Holding<'r> {
        let mut m: HashMap<_, Vec<&Rule>> = HashMap::new();
        for r in installed {
            m.entry((r.domain.as_str(), r.proto, r.host_ports))
                .or_default()
                .push(r);
        }
        Holding(m)
    }

    /// A forward holds its ports where its domain has a rule of its protocol and ports
    /// that it could have made: another forward of the domain on the same ports (another
    /// address, other sources) does not hold them through that rule.
    fn holds(&self, domain: &str, spec: &ForwardSpec) -> bool {
        self.0
            .get(&(domain, spec.proto, spec.host_ports))
            .is_some_and(|rules| rules.iter().any(|r| made_by(spec, r)))
    }
}

/// Whether `spec` could have made `rule` (its domain, protocol and host ports compared
/// apart): as much of the forward as its rules carry, so that another forward of the
/// domain on the same ports (other sources, another address) is not taken for it.
fn made_by(spec: &ForwardSpec, rule: &Rule) -> bool {
    let listen = match (&spec.listen, &rule.listen) {
        (Listen::Any, ListenOn::Any) => true,
        (Listen::Address(a), ListenOn::Address(b)) => a == b,
        (Listen::Interface(i), ListenOn::Interface(j)) => i == j,
        // the default route's address when it was planned
        (Listen::DefaultRoute, ListenOn::Address(_)) => true,
        _ => false,
    };
    listen
        && spec.allows_family(rule.family)
        && spec.guest_ports == rule.guest_ports
        && forward::family_sources(spec, rule.family) == rule.sources
        && spec.description == rule.description
}

/// The planner. Forwards of domains earlier in `domains` win conflicts. `carried` are rules installed before for running domains
/// whose config is now invalid: they are kept as they are.
pub fn plan(domains: &[DomainConfig], facts: &Facts, carried: &[Rule]) -> Plan {
    plan_with(domains, facts, carried.to_vec())
}

/// [`plan`], taking the carried rules by value (no copy of what is installed).
pub fn plan_with(domains: &[DomainConfig], facts: &Facts, carried: Vec<Rule>) -> Plan {
    plan_against(domains, facts, carried, &[], &[])
}

/// [`plan_with`], `others` holding their ports and addresses too without being part of
/// the plan's rules (the accepts and hairpins count them), and `installed` the rules
/// installed now for the domains planned: a forward that has rules keeps its port against
/// one that has none, whatever their order (then the order decides). Planning again with
/// what a plan installed gives the same plan.
pub fn plan_against(
    domains: &[DomainConfig],
    facts: &Facts,
    carried: Vec<Rule>,
    others: &[Held],
    installed: &[Rule],
) -> Plan {
    // only running domains compete for ports
    let running = running_domains(domains, facts);
    let running_of: BTreeMap<usize, &DomainFacts> = running.iter().copied().collect();
    let competing: Vec<DomainConfig> = running.iter().map(|(i, _)| domains[*i].clone()).collect();
    let holding = Holding::of(installed);
    let holds =
        |(d, f): (usize, usize)| holding.holds(&competing[d].name, &competing[d].forwards[f]);
    let conflicts: BTreeMap<(usize, usize), Conflict> = find_conflicts_by(&competing, &holds)
        .into_iter()
        .map(|c| ((running[c.second.0].0, c.second.1), c))
        .collect();
    let ix = claims_index(domains, facts, &running, &carried, others);
    // sized once: grown by doubling, 10,000 statuses and rules were copied (and fresh
    // memory faulted in) again and again, ~15% of a whole `apply`'s time
    let n: usize = domains.iter().map(|d| d.forwards.len()).sum();
    let mut rules: Vec<Rule> = Vec::with_capacity(n);
    let mut statuses = Vec::with_capacity(n);
    // stopped domains' forwards that refuse: (status index, domain, forward)
    let mut refusing = Vec::new();
    for (di, d) in domains.iter().enumerate() {
        let dom = running_of.get(&di).copied();
        for (fi, spec) in d.forwards.iter().enumerate() {
            if let Some(c) = conflicts.get(&(di, fi)) {
                let winner = &competing[c.first.0];
                let reason = format!(
                    "conflicts with {} of domain {:?}",
                    winner.forwards[c.first.1].short(),
                    winner.name
                );
                statuses.push(status(d, spec, ForwardState::Conflict, Some(reason)));
                continue;
            }
            let Some(dom) = dom else {
                if d.when_stopped == WhenStopped::Reject {
                    refusing.push((statuses.len(), di, fi));
                }
                statuses.push(status(d, spec, ForwardState::Stopped, None));
                continue;
            };
            let (st, rs) = plan_forward(d, dom, spec, facts, &ix);
            match held_elsewhere(&d.name, &rs, &carried, others) {
                Some(holder) => statuses.push(kept_by(st, &holder)),
                None => {
                    rules.extend(rs);
                    statuses.push(st);
                }
            }
        }
    }
    drop_contested_neighbours(&mut statuses, &mut rules);
    drop(ix);
    let refusals = refusals(
        domains,
        facts,
        &refusing,
        &mut statuses,
        &rules,
        &carried,
        others,
    );
    rules.extend(refusals);
    let mut all = carried;
    all.extend(rules);
    let mut ruleset = Ruleset::from_rules_and(all, others, &facts.networks, &facts.xt_forward);
    ruleset.hairpin_ports = hairpin_ports(&ruleset, facts);
    Plan {
        ruleset,
        forwards: statuses,
    }
}

/// The configured domains that run, by their index in `domains`: [`Facts::domain`]'s
/// lookup, indexed (one pass instead of one scan per domain).
fn running_domains<'f>(
    domains: &[DomainConfig],
    facts: &'f Facts,
) -> Vec<(usize, &'f DomainFacts)> {
    let mut by_uuid: HashMap<&str, &DomainFacts> = HashMap::new();
    let mut by_name: HashMap<&str, &DomainFacts> = HashMap::new();
    let mut unpinned: HashMap<&str, &DomainFacts> = HashMap::new();
    for d in facts.domains.iter().rev() {
        if let Some(u) = d.uuid.as_deref() {
            by_uuid.insert(u, d);
        } else {
            unpinned.insert(&d.name, d);
        }
        by_name.insert(&d.name, d);
    }
    let lookup = |name: &str, uuid: Option<&str>| match uuid {
        Some(u) => by_uuid.get(u).or_else(|| unpinned.get(name)).copied(),
        None => by_name.get(name).copied(),
    };
    domains
        .iter()
        .enumerate()
        .filter_map(|(i, d)| lookup(&d.name, d.uuid.as_deref()).map(|f| (i, f)))
        .collect()
}

/// The address index of the running domains' NICs, with every address claimed: explicit
/// guest addresses, and the guests of installed rules, by the domains that use them.
fn claims_index<'a>(
    domains: &'a [DomainConfig],
    facts: &'a Facts,
    running: &[(usize, &DomainFacts)],
    carried: &'a [Rule],
    others: &[Held<'a>],
) -> Index<'a> {
    let macs: std::collections::HashSet<String> = running
        .iter()
        .flat_map(|(_, f)| &f.nics)
        .map(|n| n.mac.to_ascii_lowercase())
        .collect();
    let mut ix = Index::new(facts, &macs);
    for o in domains {
        for ip in o.forwards.iter().flat_map(|f| f.guest_addresses.iter()) {
            ix.claims.push((*ip, o.name.as_str()));
        }
    }
    for r in carried {
        ix.claims.push((r.guest_ip, r.domain.as_str()));
    }
    for h in others {
        ix.claims.push((h.guest_ip, h.domain));
    }
    ix
}

/// A port of `rules` still held by a rule installed for another domain and kept as it is
/// (its config is invalid now, or only this domain is being planned).
fn held_elsewhere<'a>(
    domain: &str,
    rules: &[Rule],
    carried: &'a [Rule],
    others: &[Held<'a>],
) -> Option<Held<'a>> {
    rules.iter().find_map(|r| {
        carried
            .iter()
            .map(Held::of)
            .chain(others.iter().copied())
            .find(|x| x.domain != domain && !x.refuses() && conflicts::held_overlaps(r, x))
    })
}

/// A forward that lost its port to `holder`.
fn kept_by(mut st: ForwardStatus, holder: &Held) -> ForwardStatus {
    st.state = ForwardState::Conflict;
    st.reason = Some(format!(
        "conflicts with {}/{} installed for domain {:?}, which keeps it",
        holder.host_ports, holder.proto, holder.domain
    ));
    st.rule_ids.clear();
    st
}

/// With bridged traffic seen by iptables, the guests' taps hairpin: one per guest NIC,
/// shared by its rules (sorted as borrowed names, copied once).
fn hairpin_ports(ruleset: &Ruleset, facts: &Facts) -> Vec<String> {
    if facts.sysctls.bridge_nf_call_iptables != Some(true) {
        return Vec::new();
    }
    let ports: BTreeSet<&str> = ruleset
        .rules
        .iter()
        .filter_map(|r| r.tap.as_deref())
        .collect();
    ports.into_iter().map(str::to_string).collect()
}
