//! Guest addresses: where each comes from (configuration, DHCP reservation, lease,
//! neighbour table, snooping on the guest's tap), which addresses a guest may never have,
//! and anti-spoofing across domains.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;

use super::{AddrSource, ForwardState, ForwardStatus, GuestAddr, Rule};
use crate::facts::{DomainFacts, Facts, NetworkFacts, Nic};
use crate::model::{Family, ForwardSpec};

/// Lookups the planner needs per forward, built once per plan so that planning stays
/// linear in the number of forwards.
pub(super) struct Index<'a> {
    /// Explicit guest addresses and installed guests, with the domains that use them
    /// (built on first use: only the neighbour-table fallback needs it).
    explicit: std::cell::OnceCell<BTreeMap<IpAddr, BTreeSet<&'a str>>>,
    pub(super) claims: Vec<(IpAddr, &'a str)>,
    /// Reservations by (network name, MAC).
    reservations: HashMap<(&'a str, String), Vec<IpAddr>>,
    /// Reservations that name no MAC (IPv6, DUID without one), by (network, host name).
    named: HashMap<(&'a str, &'a str), Vec<IpAddr>>,
    /// Leases by MAC.
    leases: HashMap<String, Vec<&'a crate::facts::Lease>>,
}

impl<'a> Index<'a> {
    /// `macs`: the (lowercase) MACs of the NICs being planned; only their reservations
    /// and leases are indexed (a hook plans one domain among thousands of reservations).
    pub(super) fn new(facts: &'a Facts, macs: &std::collections::HashSet<String>) -> Index<'a> {
        let lower = |m: &str| -> Option<String> {
            if m.bytes().any(|b| b.is_ascii_uppercase()) {
                Some(m.to_ascii_lowercase()).filter(|l| macs.contains(l))
            } else {
                macs.contains(m).then(|| m.to_string())
            }
        };
        let mut reservations: HashMap<(&str, String), Vec<IpAddr>> = HashMap::new();
        let mut named: HashMap<(&str, &str), Vec<IpAddr>> = HashMap::new();
        for n in &facts.networks {
            for r in &n.reservations {
                if r.mac.is_empty() {
                    if let Some(name) = r.name.as_deref() {
                        named.entry((n.name.as_str(), name)).or_default().push(r.ip);
                    }
                    continue;
                }
                if let Some(mac) = lower(&r.mac) {
                    reservations
                        .entry((n.name.as_str(), mac))
                        .or_default()
                        .push(r.ip);
                }
            }
        }
        let mut leases: HashMap<String, Vec<&crate::facts::Lease>> = HashMap::new();
        for l in &facts.leases {
            if let Some(mac) = lower(&l.mac) {
                leases.entry(mac).or_default().push(l);
            }
        }
        Index {
            explicit: Default::default(),
            claims: Vec::new(),
            reservations,
            named,
            leases,
        }
    }

    fn explicit(&self) -> &BTreeMap<IpAddr, BTreeSet<&'a str>> {
        self.explicit.get_or_init(|| {
            let mut m: BTreeMap<IpAddr, BTreeSet<&str>> = BTreeMap::new();
            for (ip, d) in &self.claims {
                m.entry(*ip).or_default().insert(d);
            }
            m
        })
    }
}

/// Whether an address is claimed by another domain (its configured or installed address,
/// or a reservation or lease of a NIC that is not `own_macs`): a learned (neighbour)
/// address that belongs to someone else is refused.
pub(super) fn claimed_by_other(
    facts: &Facts,
    ix: &Index,
    domain: &str,
    own_macs: &[&str],
    ip: &IpAddr,
) -> bool {
    let not_own = |mac: &str| !own_macs.iter().any(|m| m.eq_ignore_ascii_case(mac));
    ix.explicit()
        .get(ip)
        .is_some_and(|users| users.iter().any(|u| *u != domain))
        || facts
            .networks
            .iter()
            .flat_map(|n| &n.reservations)
            .any(|r| {
                let named_mine = r.mac.is_empty() && r.name.as_deref() == Some(domain);
                r.ip == *ip && not_own(&r.mac) && !named_mine
            })
        || facts
            .leases
            .iter()
            .any(|l| l.ip == *ip && l.expiry > facts.now && not_own(&l.mac))
}

/// Finds the guest address of one family for a NIC, in the documented order.
pub(super) fn resolve_address<'a>(
    family: Family,
    spec: &ForwardSpec,
    nic: Option<&'a Nic>,
    net: Option<&NetworkFacts>,
    facts: &Facts,
    (dom, domain): (&DomainFacts, &str),
    ix: &Index,
) -> Result<GuestAddr, Unresolved<'a>> {
    let bridge = nic.and_then(|n| n.bridge.as_deref());
    if let Some(ip) = spec
        .guest_addresses
        .iter()
        .find(|a| Family::of(a) == family)
    {
        if let Some(why) = guest_ip_problem(ip, net, bridge, facts) {
            return Err(Unresolved::Configured(*ip, why));
        }
        return Ok(GuestAddr {
            ip: *ip,
            source: AddrSource::Config,
        });
    }
    let (Some(nic), Some(net)) = (nic, net) else {
        return Err(Unresolved::NoNetwork);
    };
    let fam_ok = |ip: &IpAddr| {
        Family::of(ip) == family && guest_ip_problem(ip, Some(net), bridge, facts).is_none()
    };
    let mac = nic.mac.to_ascii_lowercase();
    let g = Learner {
        dom,
        domain,
        nic,
        net,
        facts,
        ix,
    };
    let learned = reserved(dom, &mac, net, ix, &fam_ok)
        .map(|ip| (ip, AddrSource::Reservation))
        .or_else(|| leased(&mac, net, facts, ix, &fam_ok).map(|ip| (ip, AddrSource::Lease)))
        .or_else(|| neighbour(&g, &fam_ok).map(|ip| (ip, AddrSource::Neighbour)));
    if let Some((ip, source)) = learned {
        return Ok(GuestAddr { ip, source });
    }
    match snooped(&g, family) {
        Some(Ok(ip)) => Ok(GuestAddr {
            ip,
            source: AddrSource::Snooped,
        }),
        Some(Err((ip, why))) => Err(Unresolved::SnoopRefused(ip, why)),
        None => Err(Unresolved::NoAddress(family, &nic.mac)),
    }
}

/// A NIC whose address is learned from what others saw of it (the neighbour table, the
/// daemon's snooping): the checks against the other domains need all of this.
struct Learner<'a, 'f> {
    dom: &'f DomainFacts,
    domain: &'f str,
    nic: &'f Nic,
    net: &'f NetworkFacts,
    facts: &'f Facts,
    ix: &'f Index<'a>,
}

impl Learner<'_, '_> {
    /// Whether another domain claims `ip` (see [`claimed_by_other`]).
    fn someone_elses(&self, ip: &IpAddr) -> bool {
        let own: Vec<&str> = self.dom.nics.iter().map(|n| n.mac.as_str()).collect();
        claimed_by_other(self.facts, self.ix, self.domain, &own, ip)
    }
}

/// The address the daemon snooped on the NIC's own tap for `family`, or why it is not
/// trusted (outside the network, the host's own, someone else's).
fn snooped(g: &Learner, family: Family) -> Option<Result<IpAddr, (IpAddr, String)>> {
    let tap = g.nic.tap.as_deref()?;
    let s = g.facts.snooped.iter().find(|s| {
        s.tap == tap && s.mac.eq_ignore_ascii_case(&g.nic.mac) && Family::of(&s.ip) == family
    })?;
    if let Some(why) = guest_ip_problem(&s.ip, Some(g.net), Some(&g.net.bridge), g.facts) {
        return Some(Err((s.ip, why)));
    }
    if g.someone_elses(&s.ip) {
        return Some(Err((
            s.ip,
            "is another domain's address, reservation or lease".into(),
        )));
    }
    Some(Ok(s.ip))
}

/// A reservation by the NIC's MAC (`mac`, lower case); else one without a MAC, by the
/// domain's name (one NIC on the network: with more, the name cannot say which one it is).
fn reserved(
    dom: &DomainFacts,
    mac: &str,
    net: &NetworkFacts,
    ix: &Index,
    fam_ok: &dyn Fn(&IpAddr) -> bool,
) -> Option<IpAddr> {
    let nics_here = dom
        .nics
        .iter()
        .filter(|n| n.network.as_deref() == Some(net.name.as_str()))
        .count();
    let by_mac = ix.reservations.get(&(net.name.as_str(), mac.to_string()));
    let by_name = ix
        .named
        .get(&(net.name.as_str(), dom.name.as_str()))
        .filter(|_| nics_here == 1);
    by_mac
        .into_iter()
        .chain(by_name)
        .flatten()
        .find(|ip| fam_ok(ip))
        .copied()
}

/// The NIC's latest valid lease on the network's bridge.
fn leased(
    mac: &str,
    net: &NetworkFacts,
    facts: &Facts,
    ix: &Index,
    fam_ok: &dyn Fn(&IpAddr) -> bool,
) -> Option<IpAddr> {
    ix.leases
        .get(mac)
        .into_iter()
        .flatten()
        .filter(|l| l.bridge == net.bridge)
        .filter(|l| l.expiry > facts.now && fam_ok(&l.ip))
        .max_by_key(|l| l.expiry)
        .map(|l| l.ip)
}

/// A neighbour entry of the NIC's MAC on the bridge that no other domain claims.
fn neighbour(g: &Learner, fam_ok: &dyn Fn(&IpAddr) -> bool) -> Option<IpAddr> {
    g.facts
        .neighbours
        .iter()
        .find(|n| {
            n.ifname == g.net.bridge
                && n.mac.eq_ignore_ascii_case(&g.nic.mac)
                && fam_ok(&n.ip)
                && !is_link_local(&n.ip)
                && !g.someone_elses(&n.ip)
        })
        .map(|n| n.ip)
}

/// Why a forward has no guest address of one family (written out only when it is said:
/// most guests have no IPv6 address, and that is no news).
#[derive(Debug)]
pub(super) enum Unresolved<'a> {
    Configured(IpAddr, String),
    NoNetwork,
    NoAddress(Family, &'a str),
    /// The only address seen on the guest's tap is refused (anti-spoofing).
    SnoopRefused(IpAddr, String),
}

impl Unresolved<'_> {
    pub(super) fn is_refusal(&self) -> bool {
        matches!(self, Unresolved::SnoopRefused(..))
    }
}

impl std::fmt::Display for Unresolved<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unresolved::Configured(ip, why) => write!(f, "configured guest address {ip} {why}"),
            Unresolved::SnoopRefused(ip, why) => write!(
                f,
                "the guest claims address {ip} on its tap, which {why}; not trusted"
            ),
            Unresolved::NoNetwork => f.write_str(
                "the domain has no NIC on a known libvirt network and no guest_address is configured",
            ),
            Unresolved::NoAddress(family, mac) => write!(
                f,
                "no {} address known for NIC {mac} yet (add a <dhcp><host mac='{mac}' ip=.../> reservation or guest_address, or wait for its DHCP lease)",
                match family {
                    Family::Ipv4 => "IPv4",
                    Family::Ipv6 => "IPv6",
                },
            ),
        }
    }
}

/// Why `ip` cannot be a guest's address behind `net` (or, on a bridge that is no libvirt
/// network, behind the host's subnets on `bridge`), if it cannot: a DNAT to it would make
/// the host a relay to somewhere else, or to itself.
pub(super) fn guest_ip_problem(
    ip: &IpAddr,
    net: Option<&NetworkFacts>,
    bridge: Option<&str>,
    facts: &Facts,
) -> Option<String> {
    let v4_broadcast = matches!(ip, IpAddr::V4(a) if a.is_broadcast());
    if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() || v4_broadcast {
        return Some("is a loopback, unspecified, multicast or broadcast address".into());
    }
    // what to call the place in a message (written only for one)
    let what = || match (net, bridge) {
        (Some(n), _) => format!("network {}", n.name),
        (None, Some(b)) => format!("the host's addresses on bridge {b}"),
        (None, None) => String::new(),
    };
    let (subnet, own) = match (net, bridge) {
        (Some(n), _) => (
            n.subnets().find(|s| s.contains(ip)),
            n.addresses.iter().any(|a| a.addr() == *ip),
        ),
        (None, Some(b)) => {
            let mine = facts
                .host_addresses
                .iter()
                .filter(|(i, _)| i == b)
                .map(|(_, n)| n);
            (
                mine.clone().map(|n| n.trunc()).find(|s| s.contains(ip)),
                mine.clone().any(|n| n.addr() == *ip),
            )
        }
        (None, None) => {
            return Some(
                "is on no network the host knows (the domain has no NIC on a bridge)".into(),
            );
        }
    };
    let Some(subnet) = subnet else {
        return Some(format!("is outside the subnet of {}", what()));
    };
    if own {
        return Some(format!("is the host's own address ({})", what()));
    }
    if let IpNet::V4(s) = subnet
        && s.prefix_len() < 31
        && (IpAddr::V4(s.network()) == *ip || IpAddr::V4(s.broadcast()) == *ip)
    {
        return Some(format!("is the network or broadcast address of {subnet}"));
    }
    None
}

pub(super) fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => (a.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// Anti-spoofing across domains: an address learned from the neighbour table that another
/// domain also uses (from any source) is not trusted; that forward waits (pending).
pub(super) fn drop_contested_neighbours(statuses: &mut [ForwardStatus], rules: &mut Vec<Rule>) {
    let mut users: BTreeMap<IpAddr, BTreeSet<String>> = BTreeMap::new();
    for st in statuses.iter() {
        for g in &st.guest {
            users.entry(g.ip).or_default().insert(st.domain.clone());
        }
    }
    for st in statuses.iter_mut() {
        let contested: Vec<IpAddr> = st
            .guest
            .iter()
            .filter(|g| {
                matches!(g.source, AddrSource::Neighbour | AddrSource::Snooped)
                    && users.get(&g.ip).is_some_and(|u| u.len() > 1)
            })
            .map(|g| g.ip)
            .collect();
        if contested.is_empty() {
            continue;
        }
        rules.retain(|r| !(st.rule_ids.contains(&r.id) && contested.contains(&r.guest_ip)));
        st.guest.retain(|g| !contested.contains(&g.ip));
        st.rule_ids.retain(|id| rules.iter().any(|r| &r.id == id));
        st.reason = Some(format!(
            "address {} learned from the guest's traffic is also used by another domain; not trusted",
            contested[0]
        ));
        if st.guest.is_empty() {
            st.state = ForwardState::Pending;
        }
    }
}
