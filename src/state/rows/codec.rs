//! One domain's rows (and the format of earlier releases) encoded and decoded; every
//! value read back validated into the types config values have.

use std::borrow::Cow;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::model::LibvirtFirewall;
use crate::model::{Family, PortRange, Proto, RateLimit, RatePer, RateUnit};
use crate::rules::{BridgeAccept, Hairpin, ListenOn, Rule, Ruleset};

/// id, domain (index into `domains`), family (4|6), proto, listen (`*`, `a:ADDR`,
/// `i:IFNAME`), host ports, guest address, guest ports, sources, localhost, bridge (index
/// into `bridges`), tap, description.
pub(super) type Row<'a> = (
    Cow<'a, str>,
    usize,
    u8,
    Proto,
    Cow<'a, str>,
    (u16, u16),
    IpAddr,
    (u16, u16),
    Vec<IpNet>,
    bool,
    usize,
    Option<Cow<'a, str>>,
    Option<Cow<'a, str>>,
);

/// Strings are borrowed from the ruleset when writing (no copies), owned when reading.
#[derive(Serialize, Deserialize)]
pub(super) struct Stored<'a> {
    /// Domain and bridge names, once each.
    pub(super) domains: Vec<Cow<'a, str>>,
    pub(super) bridges: Vec<Cow<'a, str>>,
    /// In ruleset order.
    #[serde(borrow)]
    pub(super) rules: Vec<Row<'a>>,
    /// bridge, family, libvirt firewall
    pub(super) accepts: Vec<(Cow<'a, str>, u8, LibvirtFirewall)>,
    pub(super) hairpins: Vec<(Cow<'a, str>, IpNet)>,
    pub(super) hairpin_ports: Vec<Cow<'a, str>>,
}

pub(super) fn fam(f: Family) -> u8 {
    match f {
        Family::Ipv4 => 4,
        Family::Ipv6 => 6,
    }
}

pub(super) fn unfam(f: u8) -> Result<Family, String> {
    match f {
        4 => Ok(Family::Ipv4),
        6 => Ok(Family::Ipv6),
        _ => Err(format!("family {f} is neither 4 nor 6")),
    }
}

pub(super) fn ifname(s: Cow<'_, str>) -> Result<String, String> {
    crate::model::validate_ifname(&s).map(|_| s.into_owned())
}

pub(super) fn row(r: &Rule, domain: usize, bridge: usize) -> Row<'_> {
    let listen = match &r.listen {
        ListenOn::Any => Cow::Borrowed("*"),
        ListenOn::Address(a) => Cow::Owned(format!("a:{a}")),
        ListenOn::Interface(i) => Cow::Owned(format!("i:{i}")),
    };
    (
        Cow::Borrowed(&r.id),
        domain,
        fam(r.family),
        r.proto,
        listen,
        (r.host_ports.start, r.host_ports.end),
        r.guest_ip,
        (r.guest_ports.start, r.guest_ports.end),
        r.sources.clone(),
        r.localhost,
        bridge,
        r.tap.as_deref().map(Cow::Borrowed),
        r.description.as_deref().map(Cow::Borrowed),
    )
}

pub(super) fn unrow(
    domains: &[Cow<'_, str>],
    bridges: &[String],
    r: Row<'_>,
) -> Result<Rule, String> {
    let (
        id,
        domain,
        family,
        proto,
        listen,
        h,
        guest_ip,
        g,
        sources,
        localhost,
        bridge,
        tap,
        description,
    ) = r;
    let domain = domains
        .get(domain)
        .ok_or_else(|| format!("rule {id}: no domain {domain}"))?
        .to_string();
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) || id.len() > 64 {
        return Err(format!("rule id {id:?} is not a hexadecimal identifier"));
    }
    let family = unfam(family)?;
    let listen = match listen.split_once(':') {
        _ if listen == "*" => ListenOn::Any,
        Some(("a", a)) => {
            ListenOn::Address(a.parse().map_err(|_| format!("listen address {a:?}"))?)
        }
        Some(("i", i)) => ListenOn::Interface(ifname(Cow::Borrowed(i))?),
        _ => return Err(format!("listen {listen:?}")),
    };
    let host_ports = PortRange::new(h.0, h.1)?;
    let guest_ports = PortRange::new(g.0, g.1)?;
    if host_ports.len() != guest_ports.len() {
        return Err("host and guest port ranges differ in length".into());
    }
    if crate::model::Family::of(&guest_ip) != family
        || sources
            .iter()
            .any(|s| crate::model::Family::of_net(s) != family)
    {
        return Err(format!("rule {id}: addresses of another family"));
    }
    let bridge = bridges
        .get(bridge)
        .ok_or_else(|| format!("rule {id}: no bridge {bridge}"))?
        .clone();
    // a refusal (unspecified guest) is nothing else
    if guest_ip.is_unspecified()
        && (bridge != crate::rules::REFUSAL_BRIDGE
            || localhost
            || tap.is_some()
            || guest_ports != host_ports)
    {
        return Err(format!("rule {id}: a refusal with a guest's fields"));
    }
    Ok(Rule {
        id: id.into_owned(),
        domain,
        family,
        proto,
        listen,
        host_ports,
        guest_ip,
        guest_ports,
        sources,
        localhost,
        bridge,
        tap: tap.map(ifname).transpose()?,
        description: description.map(Cow::into_owned),
        rate: None,
    })
}

/// A rule's rate limit, stored after a domain's rows (rows of earlier releases have
/// none): row index, count, unit, burst, per.
pub(super) type RateRow = (u32, u32, RateUnit, u32, RatePer);

/// Names stored once, referred to by index.
#[derive(Default)]
pub(super) struct Names<'a> {
    pub(super) names: Vec<Cow<'a, str>>,
    pub(super) index: std::collections::HashMap<&'a str, usize>,
}

impl<'a> Names<'a> {
    pub(super) fn index(&mut self, name: &'a str) -> usize {
        if let Some(i) = self.index.get(name) {
            return *i;
        }
        self.names.push(Cow::Borrowed(name));
        self.index.insert(name, self.names.len() - 1);
        self.names.len() - 1
    }
}

pub(super) fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes)
}

pub(super) fn unb64(text: &str) -> Result<Vec<u8>, String> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(text.as_bytes())
        .map_err(|e| e.to_string())
}

pub(super) fn take_all<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, String> {
    let (v, rest): (T, _) = postcard::take_from_bytes(bytes).map_err(|e| e.to_string())?;
    if !rest.is_empty() {
        return Err(format!("{} bytes after the end", rest.len()));
    }
    Ok(v)
}

/// One domain's rows, as [`Stored`] (its own name and bridge tables).
pub(super) fn encode_domain(rules: &[&Rule]) -> String {
    let (mut domains, mut bridges) = (Names::default(), Names::default());
    let rows: Vec<Row> = rules
        .iter()
        .map(|r| row(r, domains.index(&r.domain), bridges.index(&r.bridge)))
        .collect();
    let st = Stored {
        domains: domains.names,
        bridges: bridges.names,
        rules: rows,
        accepts: Vec::new(),
        hairpins: Vec::new(),
        hairpin_ports: Vec::new(),
    };
    // a Vec of borrowed rows cannot fail to encode
    let mut bytes = postcard::to_allocvec(&st).unwrap_or_default();
    let rates: Vec<RateRow> = rules
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.rate.map(|l| (i as u32, l.count, l.unit, l.burst, l.per)))
        .collect();
    if !rates.is_empty() {
        bytes.extend(postcard::to_allocvec(&rates).unwrap_or_default());
    }
    b64(&bytes)
}

pub(super) fn decode_domain(name: &str, text: &str) -> Result<Vec<Rule>, String> {
    let at = |e: String| format!("domain {name:?}: {e}");
    let bytes = unb64(text).map_err(at)?;
    let (st, rest): (Stored, _) =
        postcard::take_from_bytes(&bytes).map_err(|e| at(e.to_string()))?;
    let mut rs = decode_stored(st)?;
    if !rest.is_empty() {
        let rates: Vec<RateRow> = take_all(rest).map_err(at)?;
        for (i, count, unit, burst, per) in rates {
            let r = rs
                .rules
                .get_mut(i as usize)
                .ok_or_else(|| at(format!("a rate of row {i}, which is not there")))?;
            r.rate = Some(RateLimit::new(count, unit, burst, per).map_err(at)?);
        }
    }
    if let Some(r) = rs.rules.iter().find(|r| r.domain != name) {
        return Err(format!(
            "rule {} of domain {:?} stored under {name:?}",
            r.id, r.domain
        ));
    }
    Ok(rs.rules)
}

/// The shared part read back: a ruleset with no rules, every value validated.
pub(super) fn shared_ruleset(
    accepts: Vec<(Cow<'_, str>, u8, LibvirtFirewall)>,
    hairpins: Vec<(Cow<'_, str>, IpNet)>,
    hairpin_ports: Vec<Cow<'_, str>>,
) -> Result<Ruleset, String> {
    decode_stored(Stored {
        domains: Vec::new(),
        bridges: Vec::new(),
        rules: Vec::new(),
        accepts,
        hairpins,
        hairpin_ports,
    })
}

/// The format of the previous release: every row in one string.
pub(super) fn decode_v2(text: &str) -> Result<Ruleset, String> {
    let bytes = unb64(text)?;
    decode_stored(take_all(&bytes)?)
}

pub(super) fn decode_stored(st: Stored) -> Result<Ruleset, String> {
    let bridges = st
        .bridges
        .into_iter()
        .map(ifname)
        .collect::<Result<Vec<_>, String>>()?;
    let rules = st
        .rules
        .into_iter()
        .map(|r| unrow(&st.domains, &bridges, r))
        .collect::<Result<Vec<_>, _>>()?;
    let accepts = st
        .accepts
        .into_iter()
        .map(|(b, f, firewall)| {
            Ok(BridgeAccept {
                bridge: ifname(b)?,
                family: unfam(f)?,
                firewall,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let hairpins = st
        .hairpins
        .into_iter()
        .map(|(b, subnet)| {
            Ok(Hairpin {
                bridge: ifname(b)?,
                subnet,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let hairpin_ports = st
        .hairpin_ports
        .into_iter()
        .map(ifname)
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Ruleset {
        rules,
        accepts,
        hairpins,
        hairpin_ports,
    })
}
