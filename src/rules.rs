//! The backend-neutral rule model: what the planner produces, the state stores and the
//! backends render. Built by [`crate::plan`]; no I/O here.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::model::LibvirtFirewall;
use crate::model::{Family, PortRange, Proto, RateLimit};

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
    // sized once (10,000 rules grown by doubling cost ~5% of a whole `apply`)
    let mut sorted = Vec::with_capacity(slots.len());
    sorted.extend(order.into_iter().filter_map(|i| slots[i].take()));
    *rules = sorted;
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
