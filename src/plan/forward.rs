//! Planning one forward of a running domain: which NIC and bridge, the listen key, the
//! rule of each family (its id stable across releases), and the refusals of stopped
//! domains' forwards.

use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;
use sha2::{Digest, Sha256};

use super::addresses::{Index, resolve_address};
use super::{ForwardState, ForwardStatus, Held, ListenOn, REFUSAL_BRIDGE, Rule, conflicts};
use crate::facts::{DomainFacts, Facts, NetworkFacts, Nic};
use crate::model::conflicts::families;
use crate::model::{DomainConfig, Family, ForwardSpec, Listen, NicSelector};

/// A forward's allowed sources of one family, merged (so overlapping entries never
/// collide in an interval set).
pub(super) fn family_sources(spec: &ForwardSpec, family: Family) -> Vec<IpNet> {
    IpNet::aggregate(
        &spec
            .sources
            .iter()
            .filter(|s| Family::of_net(s) == family)
            .copied()
            .collect::<Vec<_>>(),
    )
}

/// Stable rule identifier: domain identity (UUID if known, else name) + listen key.
pub(super) fn rule_id(
    domain: &DomainConfig,
    family: Family,
    spec: &ForwardSpec,
    listen: &ListenOn,
) -> String {
    // the hasher fed as `format!` would have written it (the same ids), without the string
    struct Feed(Sha256);
    impl std::fmt::Write for Feed {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.0.update(s.as_bytes());
            Ok(())
        }
    }
    let mut h = Feed(Sha256::new());
    h.0.update(domain.uuid.as_deref().unwrap_or(&domain.name).as_bytes());
    h.0.update([0]);
    let _ = write!(
        h,
        "{family:?}|{}|{listen:?}|{}",
        spec.proto, spec.host_ports
    );
    let d = h.0.finalize();
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = String::with_capacity(16);
    for b in d.iter().take(8) {
        id.push(HEX[usize::from(b >> 4)] as char);
        id.push(HEX[usize::from(b & 15)] as char);
    }
    id
}

/// Picks the NIC a forward targets.
pub(super) fn select_nic<'a>(
    dom: &'a DomainFacts,
    sel: Option<&NicSelector>,
    facts: &Facts,
) -> Option<&'a Nic> {
    match sel {
        Some(NicSelector::Mac(m)) => dom.nics.iter().find(|n| n.mac.eq_ignore_ascii_case(m)),
        Some(NicSelector::Network(net)) => {
            dom.nics.iter().find(|n| n.network.as_deref() == Some(net))
        }
        Some(NicSelector::Bridge(b)) => dom
            .nics
            .iter()
            .find(|n| nic_bridge(n, facts).as_deref() == Some(b)),
        // the first NIC on a libvirt network, else the first on any bridge
        None => dom
            .nics
            .iter()
            .find(|n| nic_network(n, facts).is_some())
            .or_else(|| dom.nics.iter().find(|n| n.bridge.is_some())),
    }
}

pub(super) fn nic_network<'a>(nic: &Nic, facts: &'a Facts) -> Option<&'a NetworkFacts> {
    nic.network
        .as_deref()
        .and_then(|n| facts.network_by_name(n))
        .or_else(|| {
            nic.bridge
                .as_deref()
                .and_then(|b| facts.network_by_bridge(b))
        })
}

pub(super) fn nic_bridge(nic: &Nic, facts: &Facts) -> Option<String> {
    nic.bridge
        .clone()
        .or_else(|| nic_network(nic, facts).map(|n| n.bridge.clone()))
}

pub(super) fn resolve_listen(listen: &Listen, facts: &Facts) -> Result<ListenOn, String> {
    Ok(match listen {
        Listen::Any => ListenOn::Any,
        Listen::Address(a) => ListenOn::Address(*a),
        Listen::Interface(i) => ListenOn::Interface(i.clone()),
        Listen::DefaultRoute => {
            ListenOn::Address(IpAddr::V4(facts.default_route_v4.ok_or(
                "no public_ip given and the host has no IPv4 default route to take it from",
            )?))
        }
    })
}

/// Where a forward's guest is: its NIC (if the domain has one that matches), the network
/// that NIC or the guest's address is on, and the bridge.
struct Placed<'f> {
    nic: Option<&'f Nic>,
    net: Option<&'f NetworkFacts>,
    bridge: String,
}

fn place<'f>(
    dom: &'f DomainFacts,
    spec: &ForwardSpec,
    facts: &'f Facts,
) -> Result<Placed<'f>, String> {
    // with an explicit address and no 'nic', the NIC on the network holding that address
    let by_address = spec.nic.is_none().then(|| {
        dom.nics.iter().find(|n| {
            nic_network(n, facts)
                .is_some_and(|net| spec.guest_addresses.iter().any(|a| net.contains(a)))
        })
    });
    let nic = by_address
        .flatten()
        .or_else(|| select_nic(dom, spec.nic.as_ref(), facts));
    if spec.nic.is_some() && nic.is_none() {
        return Err("the domain has no NIC matching 'nic'".into());
    }
    let mut net = nic.and_then(|n| nic_network(n, facts));
    // an explicit address picks its network by subnet when the NIC does not say
    if net.is_none()
        && let Some(ip) = spec.guest_addresses.first()
    {
        net = facts.networks.iter().find(|n| n.contains(ip));
    }
    let bridge = nic
        .and_then(|n| nic_bridge(n, facts))
        .or_else(|| net.map(|n| n.bridge.clone()))
        .ok_or("cannot tell which bridge the guest is on")?;
    Ok(Placed { nic, net, bridge })
}

/// Plans one forward of a running domain.
pub(super) fn plan_forward(
    domain: &DomainConfig,
    dom: &DomainFacts,
    spec: &ForwardSpec,
    facts: &Facts,
    ix: &Index,
) -> (ForwardStatus, Vec<Rule>) {
    let mut st = status(domain, spec, ForwardState::Pending, None);
    let listen = match resolve_listen(&spec.listen, facts) {
        Ok(l) => l,
        Err(e) => {
            st.reason = Some(e);
            return (st, vec![]);
        }
    };
    let placed = match place(dom, spec, facts) {
        Ok(p) => p,
        Err(e) => {
            st.reason = Some(e);
            return (st, vec![]);
        }
    };
    st.bridge = Some(placed.bridge.clone());
    if let Some(n) = placed.net
        && !n.active
    {
        st.reason = Some(format!("network {:?} is not running", n.name));
        return (st, vec![]);
    }
    let mut rules = Vec::new();
    let mut reasons = Vec::new();
    for family in families(spec) {
        if let ListenOn::Address(a) = &listen
            && Family::of(a) != family
        {
            continue;
        }
        let who = (dom, domain.name.as_str());
        match resolve_address(family, spec, placed.nic, placed.net, facts, who, ix) {
            Ok(ga) => {
                let rule = family_rule(domain, family, spec, &listen, &placed, ga.ip);
                st.rule_ids.push(rule.id.clone());
                rules.push(rule);
                st.guest.push(ga);
            }
            Err(e) => reasons.push(e),
        }
    }
    // a missing second family is normal (most guests have no IPv6), unless it was asked for
    let asked_missing = spec
        .guest_addresses
        .iter()
        .any(|a| !st.guest.iter().any(|g| g.ip == *a));
    if !rules.is_empty() {
        st.state = ForwardState::Active;
    }
    if rules.is_empty() || asked_missing {
        // an address the guest claimed and was refused says more than "none yet"
        reasons.sort_by_key(|e| !e.is_refusal());
        st.reason = reasons.into_iter().next().map(|e| e.to_string());
    }
    (st, rules)
}

/// The rule of one family of a forward whose guest is at `guest_ip`.
fn family_rule(
    domain: &DomainConfig,
    family: Family,
    spec: &ForwardSpec,
    listen: &ListenOn,
    placed: &Placed,
    guest_ip: IpAddr,
) -> Rule {
    Rule {
        id: rule_id(domain, family, spec, listen),
        domain: domain.name.clone(),
        family,
        proto: spec.proto,
        listen: listen.clone(),
        host_ports: spec.host_ports,
        guest_ip,
        guest_ports: spec.guest_ports,
        sources: family_sources(spec, family),
        localhost: spec.localhost && family == Family::Ipv4,
        bridge: placed.bridge.clone(),
        tap: placed.nic.and_then(|n| n.tap.clone()),
        description: spec.description.clone(),
        rate: spec.rate,
    }
}

pub(super) fn status(
    d: &DomainConfig,
    spec: &ForwardSpec,
    state: ForwardState,
    reason: Option<String>,
) -> ForwardStatus {
    ForwardStatus {
        domain: d.name.clone(),
        spec: spec.clone(),
        state,
        guest: vec![],
        bridge: None,
        reason,
        rule_ids: vec![],
    }
}

/// A refusal of a stopped domain's forward (`when_stopped = "reject"`): the ports are
/// refused on the host, there is no guest. Stored as a rule whose guest address is the
/// unspecified one (which no forward can have) on the loopback "bridge".
pub(super) fn refusal(
    domain: &DomainConfig,
    family: Family,
    spec: &ForwardSpec,
    listen: &ListenOn,
) -> Rule {
    let unspecified = match family {
        Family::Ipv4 => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        Family::Ipv6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
    };
    let nowhere = Placed {
        nic: None,
        net: None,
        bridge: REFUSAL_BRIDGE.to_string(),
    };
    Rule {
        guest_ports: spec.host_ports,
        localhost: false,
        rate: None,
        ..family_rule(domain, family, spec, listen, &nowhere, unspecified)
    }
}

/// The refusals of stopped domains' forwards (`when_stopped = "reject"`), each one
/// unless a forward or an earlier refusal (planned, carried or held) has its port: a
/// running domain's forward always wins.
pub(super) fn refusals(
    domains: &[DomainConfig],
    facts: &Facts,
    refusing: &[(usize, usize, usize)],
    statuses: &mut [ForwardStatus],
    rules: &[Rule],
    carried: &[Rule],
    others: &[Held],
) -> Vec<Rule> {
    let mut out: Vec<Rule> = Vec::new();
    for &(si, di, fi) in refusing {
        let (d, spec) = (&domains[di], &domains[di].forwards[fi]);
        let Ok(listen) = resolve_listen(&spec.listen, facts) else {
            continue;
        };
        for family in families(spec) {
            if let ListenOn::Address(a) = &listen
                && Family::of(a) != family
            {
                continue;
            }
            let r = refusal(d, family, spec, &listen);
            let taken = rules
                .iter()
                .chain(carried)
                .chain(&out)
                .map(Held::of)
                .chain(others.iter().copied())
                .any(|x| x.domain != d.name && conflicts::held_overlaps(&r, &x));
            if !taken {
                statuses[si].rule_ids.push(r.id.clone());
                statuses[si].reason =
                    Some("refused while stopped (when_stopped = \"reject\")".into());
                out.push(r);
            }
        }
    }
    out
}
