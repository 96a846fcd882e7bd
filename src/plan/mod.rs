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

mod addresses;
pub mod conflicts;
mod forward;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::facts::{DomainFacts, Facts, LibvirtFirewall, NetworkFacts};
pub use crate::model::conflicts::{Conflict, find_conflicts, find_conflicts_naive};
use crate::model::{DomainConfig, Family, ForwardSpec, WhenStopped};
pub use crate::rules::{
    BridgeAccept, Hairpin, Held, ListenOn, REFUSAL_BRIDGE, Rule, Ruleset, sanitize_comment,
    sort_rules,
};
use addresses::{Index, drop_contested_neighbours};
use forward::{plan_forward, refusals, status};

/// Where a guest address came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AddrSource {
    Config,
    Reservation,
    Lease,
    Neighbour,
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

/// The planner. Domains earlier in `domains` win conflicts (the caller puts the ones
/// holding their ports first). `carried` are rules installed before for running domains
/// whose config is now invalid: they are kept as they are.
pub fn plan(domains: &[DomainConfig], facts: &Facts, carried: &[Rule]) -> Plan {
    plan_with(domains, facts, carried.to_vec())
}

/// [`plan`], taking the carried rules by value (no copy of what is installed).
pub fn plan_with(domains: &[DomainConfig], facts: &Facts, carried: Vec<Rule>) -> Plan {
    plan_against(domains, facts, carried, &[])
}

/// [`plan_with`], `others` holding their ports and addresses too without being part of
/// the plan's rules (the accepts and hairpins count them).
pub fn plan_against(
    domains: &[DomainConfig],
    facts: &Facts,
    carried: Vec<Rule>,
    others: &[Held],
) -> Plan {
    // only running domains compete for ports
    // Facts::domain's lookup, indexed (one pass instead of one scan per domain)
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
    let running: Vec<(usize, &DomainFacts)> = domains
        .iter()
        .enumerate()
        .filter_map(|(i, d)| lookup(&d.name, d.uuid.as_deref()).map(|f| (i, f)))
        .collect();
    let running_of: BTreeMap<usize, &DomainFacts> = running.iter().copied().collect();
    let competing: Vec<DomainConfig> = running.iter().map(|(i, _)| domains[*i].clone()).collect();
    let conflicts: BTreeMap<(usize, usize), Conflict> = find_conflicts(&competing)
        .into_iter()
        .map(|c| ((running[c.second.0].0, c.second.1), c))
        .collect();
    // explicit guest addresses and installed guests, by the domains that use them
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
    for r in &carried {
        ix.claims.push((r.guest_ip, r.domain.as_str()));
    }
    for h in others {
        ix.claims.push((h.guest_ip, h.domain));
    }
    let mut rules: Vec<Rule> = Vec::new();
    let mut statuses = Vec::new();
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
            let (mut st, rs) = plan_forward(d, dom, spec, facts, &ix);
            // a port still held by a rule installed for another domain and kept as it is
            // (its config is invalid now, or only this domain is being planned)
            if let Some(holder) = rs.iter().find_map(|r| {
                carried
                    .iter()
                    .map(Held::of)
                    .chain(others.iter().copied())
                    .find(|x| x.domain != d.name && !x.refuses() && conflicts::held_overlaps(r, x))
            }) {
                st.state = ForwardState::Conflict;
                st.reason = Some(format!(
                    "conflicts with {}/{} installed for domain {:?}, which keeps it",
                    holder.host_ports, holder.proto, holder.domain
                ));
                st.rule_ids.clear();
                statuses.push(st);
                continue;
            }
            rules.extend(rs);
            statuses.push(st);
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
    if facts.sysctls.bridge_nf_call_iptables == Some(true) {
        // one tap per guest NIC, shared by its rules: sorted as borrowed names, copied once
        let ports: BTreeSet<&str> = ruleset
            .rules
            .iter()
            .filter_map(|r| r.tap.as_deref())
            .collect();
        let ports: Vec<String> = ports.into_iter().map(str::to_string).collect();
        ruleset.hairpin_ports = ports;
    }
    Plan {
        ruleset,
        forwards: statuses,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::facts::Nic;
    use crate::facts::Reservation;
    use crate::model::PortRange;

    fn facts() -> Facts {
        Facts {
            domains: vec![DomainFacts {
                name: "web".into(),
                uuid: None,
                nics: vec![Nic {
                    mac: "52:54:00:00:00:01".into(),
                    network: Some("default".into()),
                    bridge: Some("virbr0".into()),
                    tap: Some("vnet0".into()),
                }],
                metadata: None,
            }],
            networks: vec![NetworkFacts {
                name: "default".into(),
                bridge: "virbr0".into(),
                addresses: vec!["192.168.122.1/24".parse().unwrap()],
                reservations: vec![Reservation {
                    mac: "52:54:00:00:00:99".into(),
                    ip: "192.168.122.99".parse().unwrap(),
                    name: None,
                }],
                active: true,
                ..Default::default()
            }],
            now: 1000,
            ..Default::default()
        }
    }

    fn web(spec: ForwardSpec) -> Vec<DomainConfig> {
        vec![DomainConfig {
            name: "web".into(),
            forwards: vec![spec],
            ..Default::default()
        }]
    }

    fn lease(mac: &str, ip: &str, expiry: u64) -> crate::facts::Lease {
        crate::facts::Lease {
            bridge: "virbr0".into(),
            mac: mac.into(),
            ip: ip.parse().unwrap(),
            expiry,
        }
    }

    fn neigh(mac: &str, ip: &str) -> crate::facts::Neighbour {
        crate::facts::Neighbour {
            ifname: "virbr0".into(),
            mac: mac.into(),
            ip: ip.parse().unwrap(),
        }
    }

    fn spec() -> ForwardSpec {
        ForwardSpec {
            host_ports: PortRange::single(8080).unwrap(),
            guest_ports: PortRange::single(80).unwrap(),
            ..Default::default()
        }
    }

    #[test]
    fn iptables_forward_beside_libvirts_nftables_form_gets_an_accept_too() {
        let mut f = facts();
        f.networks[0].firewall = LibvirtFirewall::Nftables;
        f.leases = vec![lease("52:54:00:00:00:01", "192.168.122.10", u64::MAX)];
        let kinds = |f: &Facts| -> Vec<LibvirtFirewall> {
            plan(&web(spec()), f, &[])
                .ruleset
                .accepts
                .iter()
                .map(|a| a.firewall)
                .collect()
        };
        assert_eq!(kinds(&f), [LibvirtFirewall::Nftables]);
        // Docker (iptables-nft) created iptables' FORWARD for IPv4
        f.xt_forward = vec![Family::Ipv4];
        let mut k = kinds(&f);
        k.sort_by_key(|x| format!("{x:?}"));
        assert_eq!(k, [LibvirtFirewall::Iptables, LibvirtFirewall::Nftables]);
        // on libvirt's iptables form the one xtables accept is already there
        f.networks[0].firewall = LibvirtFirewall::Iptables;
        assert_eq!(kinds(&f), [LibvirtFirewall::Iptables]);
    }

    #[test]
    fn no_forward_relays_elsewhere_or_to_the_host() {
        let state_of = |f: &Facts, addr: &str| {
            let p = plan(
                &web(ForwardSpec {
                    guest_addresses: vec![addr.parse().unwrap()],
                    ..spec()
                }),
                f,
                &[],
            );
            (p.forwards[0].state, p.forwards[0].reason.clone())
        };
        let f = facts();
        for bad in [
            "192.168.122.1",
            "192.168.122.0",
            "192.168.122.255",
            "127.0.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "8.8.8.8",
        ] {
            let (st, why) = state_of(&f, bad);
            assert_eq!(st, ForwardState::Pending, "{bad}: {why:?}");
        }
        assert_eq!(state_of(&f, "192.168.122.20").0, ForwardState::Active);
        // a NIC on a bridge that is no libvirt network: only the host's subnets there
        let mut f = facts();
        f.domains[0].nics[0].network = None;
        f.domains[0].nics[0].bridge = Some("br9".into());
        f.host_addresses = vec![
            ("br9".into(), "10.9.0.1/24".parse().unwrap()),
            ("eth0".into(), "203.0.113.1/24".parse().unwrap()),
        ];
        assert_eq!(state_of(&f, "10.9.0.5").0, ForwardState::Active);
        for bad in ["8.8.8.8", "203.0.113.7", "10.9.0.1", "10.9.0.255"] {
            let (st, why) = state_of(&f, bad);
            assert_eq!(st, ForwardState::Pending, "{bad}: {why:?}");
        }
        // learned addresses are held to the same: a lease for the network address
        let mut f = facts();
        f.leases = vec![lease("52:54:00:00:00:01", "192.168.122.0", u64::MAX)];
        let p = plan(&web(spec()), &f, &[]);
        assert_eq!(p.forwards[0].state, ForwardState::Pending);
    }

    #[test]
    fn address_outside_the_subnet_is_refused() {
        let p = plan(
            &web(ForwardSpec {
                guest_addresses: vec!["10.9.9.9".parse().unwrap()],
                ..spec()
            }),
            &facts(),
            &[],
        );
        assert!(p.ruleset.is_empty());
        assert_eq!(p.forwards[0].state, ForwardState::Pending);
        assert!(
            p.forwards[0]
                .reason
                .as_deref()
                .unwrap()
                .contains("outside the subnet")
        );
    }

    #[test]
    fn learned_addresses_are_checked() {
        let mut f = facts();
        // a lease outside the subnet, an expired one, and a neighbour entry that is
        // another domain's reservation: none of them is used
        f.leases.push(lease("52:54:00:00:00:01", "10.0.0.5", 5000));
        f.leases
            .push(lease("52:54:00:00:00:01", "192.168.122.7", 10));
        f.neighbours
            .push(neigh("52:54:00:00:00:01", "192.168.122.99"));
        let p = plan(&web(spec()), &f, &[]);
        assert_eq!(
            p.forwards[0].state,
            ForwardState::Pending,
            "{:?}",
            p.forwards[0]
        );
        assert!(
            p.forwards[0]
                .reason
                .as_deref()
                .unwrap()
                .contains("reservation")
        );
        // a fresh lease in the subnet is used, and shown as such
        f.leases
            .push(lease("52:54:00:00:00:01", "192.168.122.8", 5000));
        let p = plan(&web(spec()), &f, &[]);
        assert_eq!(
            p.forwards[0].guest[0],
            GuestAddr {
                ip: "192.168.122.8".parse().unwrap(),
                source: AddrSource::Lease
            }
        );
    }

    #[test]
    fn inactive_network_means_pending() {
        let mut f = facts();
        f.networks[0].active = false;
        f.networks[0].reservations[0].mac = "52:54:00:00:00:01".into();
        let p = plan(&web(spec()), &f, &[]);
        assert_eq!(p.forwards[0].state, ForwardState::Pending);
        assert!(
            p.forwards[0]
                .reason
                .as_deref()
                .unwrap()
                .contains("not running")
        );
    }

    #[test]
    fn hairpin_ports_only_with_br_netfilter() {
        let mut f = facts();
        f.networks[0].reservations[0].mac = "52:54:00:00:00:01".into();
        assert!(plan(&web(spec()), &f, &[]).ruleset.hairpin_ports.is_empty());
        f.sysctls.bridge_nf_call_iptables = Some(true);
        assert_eq!(
            plan(&web(spec()), &f, &[]).ruleset.hairpin_ports,
            vec!["vnet0".to_string()]
        );
    }

    #[test]
    fn uuid_pins_the_domain() {
        let mut f = facts();
        f.networks[0].reservations[0].mac = "52:54:00:00:00:01".into();
        f.domains[0].uuid = Some("u-other".into());
        let pinned = vec![DomainConfig {
            name: "web".into(),
            uuid: Some("u-mine".into()),
            forwards: vec![spec()],
            ..Default::default()
        }];
        let p = plan(&pinned, &f, &[]);
        assert_eq!(
            p.forwards[0].state,
            ForwardState::Stopped,
            "same name, other UUID"
        );
        f.domains[0].uuid = Some("u-mine".into());
        f.domains[0].name = "renamed".into();
        assert_eq!(
            plan(&pinned, &f, &[]).forwards[0].state,
            ForwardState::Active,
            "renamed, same UUID"
        );
    }

    #[test]
    fn explicit_address_picks_its_nic() {
        let mut f = facts();
        f.networks.push(NetworkFacts {
            name: "second".into(),
            bridge: "virbr1".into(),
            addresses: vec!["192.168.100.1/24".parse().unwrap()],
            active: true,
            ..Default::default()
        });
        f.domains[0].nics.push(Nic {
            mac: "52:54:00:00:00:02".into(),
            network: Some("second".into()),
            bridge: Some("virbr1".into()),
            tap: Some("vnet1".into()),
        });
        let p = plan(
            &web(ForwardSpec {
                guest_addresses: vec!["192.168.100.5".parse().unwrap()],
                ..spec()
            }),
            &f,
            &[],
        );
        assert_eq!(
            p.forwards[0].state,
            ForwardState::Active,
            "{:?}",
            p.forwards[0]
        );
        assert_eq!(p.ruleset.rules[0].bridge, "virbr1");
        assert_eq!(p.ruleset.rules[0].tap.as_deref(), Some("vnet1"));
    }

    #[test]
    fn neighbour_address_claimed_by_another_domains_config_is_refused() {
        let mut f = facts();
        f.neighbours
            .push(neigh("52:54:00:00:00:01", "192.168.122.44"));
        let mut doms = web(spec());
        doms.push(DomainConfig {
            name: "other".into(),
            forwards: vec![ForwardSpec {
                guest_addresses: vec!["192.168.122.44".parse().unwrap()],
                host_ports: PortRange::single(9).unwrap(),
                ..spec()
            }],
            ..Default::default()
        });
        let p = plan(&doms, &f, &[]);
        assert_eq!(
            p.forwards[0].state,
            ForwardState::Pending,
            "{:?}",
            p.forwards[0]
        );
    }

    #[test]
    fn neighbour_address_claimed_by_two_domains_is_not_trusted() {
        let mut f = facts();
        f.domains.push(DomainFacts {
            name: "twin".into(),
            uuid: None,
            nics: vec![Nic {
                mac: "52:54:00:00:00:03".into(),
                network: Some("default".into()),
                bridge: Some("virbr0".into()),
                tap: None,
            }],
            metadata: None,
        });
        for mac in ["52:54:00:00:00:01", "52:54:00:00:00:03"] {
            f.neighbours.push(neigh(mac, "192.168.122.60"));
        }
        let mut doms = web(spec());
        doms.push(DomainConfig {
            name: "twin".into(),
            forwards: vec![ForwardSpec {
                host_ports: PortRange::single(9).unwrap(),
                ..spec()
            }],
            ..Default::default()
        });
        let p = plan(&doms, &f, &[]);
        assert!(p.ruleset.rules.is_empty(), "{:?}", p.ruleset.rules);
        assert!(p.forwards.iter().all(|s| s.state == ForwardState::Pending));
    }
}
