//! The planner: a pure function from (config, facts) to a backend-neutral ruleset plus the
//! status of every configured forward. No I/O here.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::facts::{DomainFacts, Facts, LibvirtFirewall, NetworkFacts, Nic};
use crate::model::{
    DomainConfig, Family, ForwardSpec, Listen, NicSelector, PortRange, Proto, RateLimit,
    WhenStopped,
};

pub mod conflicts;
use crate::model::conflicts::families;
pub use crate::model::conflicts::{Conflict, find_conflicts, find_conflicts_naive};

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

/// A listen selector after resolution: no `DefaultRoute` left.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "value")]
pub enum ListenOn {
    Any,
    Address(IpAddr),
    Interface(String),
}

/// One forward of one family, ready to render.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Rule {
    /// The domain first: a ruleset sorted by [`Rule`]'s order is grouped by domain, as the
    /// state stores it (reading it back needs no sort).
    pub domain: String,
    /// Stable identifier (hash of domain identity and listen key), used for chain names.
    pub id: String,
    pub family: Family,
    pub proto: Proto,
    pub listen: ListenOn,
    pub host_ports: PortRange,
    pub guest_ip: IpAddr,
    pub guest_ports: PortRange,
    /// Allowed sources of this family; empty = everyone.
    pub sources: Vec<IpNet>,
    pub localhost: bool,
    /// The bridge the guest sits on.
    pub bridge: String,
    /// The guest's bridge port (tap), if known.
    pub tap: Option<String>,
    pub description: Option<String>,
    /// New connections over this rate are dropped.
    pub rate: Option<RateLimit>,
}

impl Rule {
    /// A refusal of a stopped domain's forward (`when_stopped = "reject"`): the ports are
    /// refused on the host, there is no guest. Stored as a rule whose guest address is the
    /// unspecified one (which no forward can have) on the loopback "bridge".
    pub fn refusal(
        domain: &DomainConfig,
        family: Family,
        spec: &ForwardSpec,
        listen: &ListenOn,
    ) -> Rule {
        let unspecified = match family {
            Family::Ipv4 => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            Family::Ipv6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        };
        Rule {
            id: rule_id(domain, family, spec, listen),
            domain: domain.name.clone(),
            family,
            proto: spec.proto,
            listen: listen.clone(),
            host_ports: spec.host_ports,
            guest_ip: unspecified,
            guest_ports: spec.host_ports,
            sources: family_sources(spec, family),
            localhost: false,
            bridge: REFUSAL_BRIDGE.to_string(),
            tap: None,
            description: spec.description.clone(),
            rate: None,
        }
    }

    /// Whether this is a stopped domain's refusal, not a forward.
    pub fn refuses(&self) -> bool {
        self.guest_ip.is_unspecified()
    }

    /// The key no two rules may share.
    pub fn listen_key(&self) -> (Family, Proto, ListenOn, PortRange) {
        (
            self.family,
            self.proto,
            self.listen.clone(),
            self.host_ports,
        )
    }

    /// A human comment, safe to embed (no quotes, backslashes or control characters).
    pub fn comment(&self) -> String {
        let mut c = format!("virtgate {} {}", self.domain, self.proto);
        if let Some(d) = &self.description {
            c.push(' ');
            c.push_str(d);
        }
        sanitize_comment(&c)
    }
}

/// The "bridge" of a refusal (it has no guest).
pub const REFUSAL_BRIDGE: &str = "lo";

/// A forward's allowed sources of one family, merged (so overlapping entries never
/// collide in an interval set).
fn family_sources(spec: &ForwardSpec, family: Family) -> Vec<IpNet> {
    IpNet::aggregate(
        &spec
            .sources
            .iter()
            .filter(|s| Family::of_net(s) == family)
            .copied()
            .collect::<Vec<_>>(),
    )
}

/// Makes text safe inside a quoted nft/iptables comment: printable ASCII, no quotes or
/// backslashes, at most 100 bytes (nft allows 128, iptables 256).
pub fn sanitize_comment(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        let c = if c == '"' || c == '\'' || c == '\\' || c.is_control() || !c.is_ascii() {
            '_'
        } else {
            c
        };
        if out.len() + c.len_utf8() > 100 {
            break;
        }
        out.push(c);
    }
    out
}

/// The one accept virtgate must place in libvirt's (or the host's) forward path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BridgeAccept {
    pub bridge: String,
    pub family: Family,
    pub firewall: LibvirtFirewall,
}

/// Hairpin: DNAT'ed flows leaving `bridge` whose source is in `subnet` get masqueraded.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Hairpin {
    pub bridge: String,
    pub subnet: IpNet,
}

/// Sorts rules into the ruleset's order (`Rule`'s `Ord`) by sorting their positions:
/// a rule is large, and moving each one once beats moving them on every swap (10,000
/// rules: a tenth of the instructions of `sort()`). Sorted input costs one pass.
pub fn sort_rules(rules: &mut Vec<Rule>) {
    if rules.is_sorted() {
        return;
    }
    let mut order: Vec<usize> = (0..rules.len()).collect();
    if rules.is_sorted_by(|a, b| a.domain <= b.domain) {
        // grouped by domain already (the planner's order): each domain's rules alone
        let mut start = 0;
        while start < order.len() {
            let d = &rules[start].domain;
            let end = start + rules[start..].iter().take_while(|r| &r.domain == d).count();
            order[start..end].sort_unstable_by(|&a, &b| rules[a].cmp(&rules[b]));
            start = end;
        }
    } else {
        order.sort_unstable_by(|&a, &b| rules[a].cmp(&rules[b]));
    }
    let mut slots: Vec<Option<Rule>> = std::mem::take(rules).into_iter().map(Some).collect();
    rules.extend(order.into_iter().filter_map(|i| slots[i].take()));
}

/// A rule installed for another domain, as far as planning one domain needs it: the
/// ports it holds, the guest address it claims, the bridge and port it uses. Borrowed
/// from the state's index (the hook decodes no other domain's rules) or from a [`Rule`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held<'a> {
    pub domain: &'a str,
    pub family: Family,
    pub proto: Proto,
    pub listen: &'a ListenOn,
    pub localhost: bool,
    pub host_ports: PortRange,
    pub guest_ip: IpAddr,
    pub bridge: &'a str,
    pub tap: Option<&'a str>,
}

impl<'a> Held<'a> {
    /// Whether this is a stopped domain's refusal (see [`Rule::refusal`]).
    pub fn refuses(&self) -> bool {
        self.guest_ip.is_unspecified()
    }

    pub fn of(r: &'a Rule) -> Held<'a> {
        Held {
            domain: &r.domain,
            family: r.family,
            proto: r.proto,
            listen: &r.listen,
            localhost: r.localhost,
            host_ports: r.host_ports,
            guest_ip: r.guest_ip,
            bridge: &r.bridge,
            tap: r.tap.as_deref(),
        }
    }
}

/// The backend-neutral ruleset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Ruleset {
    pub rules: Vec<Rule>,
    pub accepts: Vec<BridgeAccept>,
    pub hairpins: Vec<Hairpin>,
    /// Bridge ports that need hairpin mode: with br_netfilter active, a guest reaching its
    /// own forward through the public address gets its reply back through the port it
    /// came in on.
    #[serde(default)]
    pub hairpin_ports: Vec<String>,
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

/// Stable rule identifier: domain identity (UUID if known, else name) + listen key.
fn rule_id(domain: &DomainConfig, family: Family, spec: &ForwardSpec, listen: &ListenOn) -> String {
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
fn select_nic<'a>(
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

fn nic_network<'a>(nic: &Nic, facts: &'a Facts) -> Option<&'a NetworkFacts> {
    nic.network
        .as_deref()
        .and_then(|n| facts.network_by_name(n))
        .or_else(|| {
            nic.bridge
                .as_deref()
                .and_then(|b| facts.network_by_bridge(b))
        })
}

fn nic_bridge(nic: &Nic, facts: &Facts) -> Option<String> {
    nic.bridge
        .clone()
        .or_else(|| nic_network(nic, facts).map(|n| n.bridge.clone()))
}

/// Lookups the planner needs per forward, built once per plan so that planning stays
/// linear in the number of forwards.
struct Index<'a> {
    /// Explicit guest addresses and installed guests, with the domains that use them
    /// (built on first use: only the neighbour-table fallback needs it).
    explicit: std::cell::OnceCell<BTreeMap<IpAddr, BTreeSet<&'a str>>>,
    claims: Vec<(IpAddr, &'a str)>,
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
    fn new(facts: &'a Facts, macs: &std::collections::HashSet<String>) -> Index<'a> {
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
fn claimed_by_other(
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
fn resolve_address<'a>(
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
    // by the NIC's MAC; else a reservation without a MAC, by the domain's name (one NIC
    // on the network: with more, the name cannot say which one it is)
    let nics_here = dom
        .nics
        .iter()
        .filter(|n| n.network.as_deref() == Some(net.name.as_str()))
        .count();
    let by_mac = ix.reservations.get(&(net.name.as_str(), mac.clone()));
    let by_name = ix
        .named
        .get(&(net.name.as_str(), dom.name.as_str()))
        .filter(|_| nics_here == 1);
    if let Some(ip) = by_mac
        .into_iter()
        .chain(by_name)
        .flatten()
        .find(|ip| fam_ok(ip))
    {
        return Ok(GuestAddr {
            ip: *ip,
            source: AddrSource::Reservation,
        });
    }
    if let Some(l) = ix
        .leases
        .get(&mac)
        .into_iter()
        .flatten()
        .filter(|l| l.bridge == net.bridge)
        .filter(|l| l.expiry > facts.now && fam_ok(&l.ip))
        .max_by_key(|l| l.expiry)
    {
        return Ok(GuestAddr {
            ip: l.ip,
            source: AddrSource::Lease,
        });
    }
    let own: Vec<&str> = dom.nics.iter().map(|n| n.mac.as_str()).collect();
    if let Some(n) = facts.neighbours.iter().find(|n| {
        n.ifname == net.bridge
            && n.mac.eq_ignore_ascii_case(&nic.mac)
            && fam_ok(&n.ip)
            && !is_link_local(&n.ip)
            && !claimed_by_other(facts, ix, domain, &own, &n.ip)
    }) {
        return Ok(GuestAddr {
            ip: n.ip,
            source: AddrSource::Neighbour,
        });
    }
    Err(Unresolved::NoAddress(family, &nic.mac))
}

/// Why a forward has no guest address of one family (written out only when it is said:
/// most guests have no IPv6 address, and that is no news).
#[derive(Debug)]
enum Unresolved<'a> {
    Configured(IpAddr, String),
    NoNetwork,
    NoAddress(Family, &'a str),
}

impl std::fmt::Display for Unresolved<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unresolved::Configured(ip, why) => write!(f, "configured guest address {ip} {why}"),
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
fn guest_ip_problem(
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

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => (a.segments()[0] & 0xffc0) == 0xfe80,
    }
}

fn resolve_listen(listen: &Listen, facts: &Facts) -> Result<ListenOn, String> {
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

/// Plans one forward of a running domain.
fn plan_forward(
    domain: &DomainConfig,
    dom: &DomainFacts,
    spec: &ForwardSpec,
    facts: &Facts,
    ix: &Index,
) -> (ForwardStatus, Vec<Rule>) {
    let mut st = ForwardStatus {
        domain: domain.name.clone(),
        spec: spec.clone(),
        state: ForwardState::Pending,
        guest: vec![],
        bridge: None,
        reason: None,
        rule_ids: vec![],
    };
    let listen = match resolve_listen(&spec.listen, facts) {
        Ok(l) => l,
        Err(e) => {
            st.reason = Some(e);
            return (st, vec![]);
        }
    };
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
        st.reason = Some("the domain has no NIC matching 'nic'".into());
        return (st, vec![]);
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
        .or_else(|| net.map(|n| n.bridge.clone()));
    let Some(bridge) = bridge else {
        st.reason = Some("cannot tell which bridge the guest is on".into());
        return (st, vec![]);
    };
    st.bridge = Some(bridge.clone());
    if let Some(n) = net
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
        match resolve_address(family, spec, nic, net, facts, (dom, &domain.name), ix) {
            Ok(ga) => {
                let id = rule_id(domain, family, spec, &listen);
                st.rule_ids.push(id.clone());
                rules.push(Rule {
                    id,
                    domain: domain.name.clone(),
                    family,
                    proto: spec.proto,
                    listen: listen.clone(),
                    host_ports: spec.host_ports,
                    guest_ip: ga.ip,
                    guest_ports: spec.guest_ports,
                    sources: family_sources(spec, family),
                    localhost: spec.localhost && family == Family::Ipv4,
                    bridge: bridge.clone(),
                    tap: nic.and_then(|n| n.tap.clone()),
                    description: spec.description.clone(),
                    rate: spec.rate,
                });
                st.guest.push(ga);
            }
            Err(e) => reasons.push(e),
        }
    }
    if !rules.is_empty() {
        st.state = ForwardState::Active;
        // a missing second family is normal (most guests have no IPv6)
        if spec
            .guest_addresses
            .iter()
            .any(|a| !st.guest.iter().any(|g| g.ip == *a))
        {
            st.reason = reasons.into_iter().next().map(|e| e.to_string());
        }
    } else {
        st.reason = reasons.into_iter().next().map(|e| e.to_string());
    }
    (st, rules)
}

fn status(
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

/// Anti-spoofing across domains: an address learned from the neighbour table that another
/// domain also uses (from any source) is not trusted; that forward waits (pending).
fn drop_contested_neighbours(statuses: &mut [ForwardStatus], rules: &mut Vec<Rule>) {
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
                g.source == AddrSource::Neighbour && users.get(&g.ip).is_some_and(|u| u.len() > 1)
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
            "address {} seen in the neighbour table is also used by another domain; not trusted",
            contested[0]
        ));
        if st.guest.is_empty() {
            st.state = ForwardState::Pending;
        }
    }
}

/// The planner. Domains earlier in `domains` win conflicts (the caller puts the ones
/// holding their ports first). `carried` are rules installed before for running domains
/// whose config is now invalid: they are kept as they are.
/// The refusals of stopped domains' forwards (`when_stopped = "reject"`), each one
/// unless a forward or an earlier refusal (planned, carried or held) has its port: a
/// running domain's forward always wins.
fn refusals(
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
            let r = Rule::refusal(d, family, spec, &listen);
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
    use crate::facts::Reservation;

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
