//! How the installed ruleset is stored in `state.json`: one flat row per rule, names
//! stored once, encoded with postcard (a compact serde binary format) and base64 into one
//! JSON string. Every hook reads and writes the whole installed ruleset, so this is on
//! the hot path: 10,000 rules decode in a few milliseconds, where serde_json objects took
//! tens (BENCHMARKS.md). Every value read back is validated into the same types config
//! values have before it can reach a rule.

use std::borrow::Cow;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::facts::LibvirtFirewall;
use crate::model::{Family, PortRange, Proto};
use crate::plan::{BridgeAccept, Hairpin, ListenOn, Rule, Ruleset};

/// id, domain (index into `domains`), family (4|6), proto, listen (`*`, `a:ADDR`,
/// `i:IFNAME`), host ports, guest address, guest ports, sources, localhost, bridge (index
/// into `bridges`), tap, description.
type Row<'a> = (
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
struct Stored<'a> {
    /// Domain and bridge names, once each.
    domains: Vec<Cow<'a, str>>,
    bridges: Vec<Cow<'a, str>>,
    /// In ruleset order.
    #[serde(borrow)]
    rules: Vec<Row<'a>>,
    /// bridge, family, libvirt firewall
    accepts: Vec<(Cow<'a, str>, u8, LibvirtFirewall)>,
    hairpins: Vec<(Cow<'a, str>, IpNet)>,
    hairpin_ports: Vec<Cow<'a, str>>,
}

fn fam(f: Family) -> u8 {
    match f {
        Family::Ipv4 => 4,
        Family::Ipv6 => 6,
    }
}

fn unfam(f: u8) -> Result<Family, String> {
    match f {
        4 => Ok(Family::Ipv4),
        6 => Ok(Family::Ipv6),
        _ => Err(format!("family {f} is neither 4 nor 6")),
    }
}

fn ifname(s: Cow<'_, str>) -> Result<String, String> {
    crate::config::toml_file::validate_ifname(&s).map(|_| s.into_owned())
}

fn row(r: &Rule, domain: usize, bridge: usize) -> Row<'_> {
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

fn unrow(domains: &[Cow<'_, str>], bridges: &[String], r: Row<'_>) -> Result<Rule, String> {
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
    })
}

/// Names stored once, referred to by index.
#[derive(Default)]
struct Names<'a> {
    names: Vec<Cow<'a, str>>,
    index: std::collections::HashMap<&'a str, usize>,
}

impl<'a> Names<'a> {
    fn index(&mut self, name: &'a str) -> usize {
        if let Some(i) = self.index.get(name) {
            return *i;
        }
        self.names.push(Cow::Borrowed(name));
        self.index.insert(name, self.names.len() - 1);
        self.names.len() - 1
    }
}

pub fn serialize<S: Serializer>(rs: &Ruleset, s: S) -> Result<S::Ok, S::Error> {
    use base64::Engine as _;
    let bytes = postcard::to_allocvec(&stored(rs)).map_err(serde::ser::Error::custom)?;
    // base64 needs no JSON escaping: written as it is, which spares a scan of every byte
    let mut quoted = String::with_capacity(bytes.len() * 4 / 3 + 4);
    quoted.push('"');
    base64::engine::general_purpose::STANDARD_NO_PAD.encode_string(bytes, &mut quoted);
    quoted.push('"');
    serde_json::value::RawValue::from_string(quoted)
        .map_err(serde::ser::Error::custom)?
        .serialize(s)
}

fn stored(rs: &Ruleset) -> Stored<'_> {
    let (mut domains, mut bridges) = (Names::default(), Names::default());
    let rules: Vec<Row> = rs
        .rules
        .iter()
        .map(|r| row(r, domains.index(&r.domain), bridges.index(&r.bridge)))
        .collect();
    Stored {
        domains: domains.names,
        bridges: bridges.names,
        rules,
        accepts: rs
            .accepts
            .iter()
            .map(|a| (Cow::Borrowed(a.bridge.as_str()), fam(a.family), a.firewall))
            .collect(),
        hairpins: rs
            .hairpins
            .iter()
            .map(|h| (Cow::Borrowed(h.bridge.as_str()), h.subnet))
            .collect(),
        hairpin_ports: rs
            .hairpin_ports
            .iter()
            .map(|p| Cow::Borrowed(p.as_str()))
            .collect(),
    }
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Ruleset, D::Error> {
    use base64::Engine as _;
    let bad = |e: String| serde::de::Error::custom(format!("installed ruleset: {e}"));
    let text = std::borrow::Cow::<str>::deserialize(d)?;
    let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(text.as_bytes())
        .map_err(|e| bad(e.to_string()))?;
    let (st, rest): (Stored, _) =
        postcard::take_from_bytes(&bytes).map_err(|e| bad(e.to_string()))?;
    if !rest.is_empty() {
        return Err(bad(format!("{} bytes after the end", rest.len())));
    }
    let bridges = st
        .bridges
        .into_iter()
        .map(ifname)
        .collect::<Result<Vec<_>, String>>()
        .map_err(bad)?;
    let rules = st
        .rules
        .into_iter()
        .map(|r| unrow(&st.domains, &bridges, r))
        .collect::<Result<Vec<_>, _>>()
        .map_err(bad)?;
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
        .collect::<Result<Vec<_>, String>>()
        .map_err(bad)?;
    let hairpins = st
        .hairpins
        .into_iter()
        .map(|(b, subnet)| {
            Ok(Hairpin {
                bridge: ifname(b)?,
                subnet,
            })
        })
        .collect::<Result<Vec<_>, String>>()
        .map_err(bad)?;
    let hairpin_ports = st
        .hairpin_ports
        .into_iter()
        .map(ifname)
        .collect::<Result<Vec<_>, String>>()
        .map_err(bad)?;
    Ok(Ruleset {
        rules,
        accepts,
        hairpins,
        hairpin_ports,
    })
}
