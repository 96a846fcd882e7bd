//! How the installed ruleset is stored in `state.json`: one flat row per rule, names
//! stored once, encoded with postcard (a compact serde binary format) and base64.
//!
//! The rows are grouped by domain, one base64 string each, beside a shared part: the
//! accepts, hairpins and hairpin ports, and an index of every rule (the ports it holds,
//! its guest address, bridge and port, as integers and indexes into one name table). A
//! hook decodes the index and its own domain's rows only, and writes the other domains'
//! strings back as they were ([`Installed`]): what it costs does not grow with what the
//! other domains have, beyond the index. Every value read back is validated into the same
//! types config values have before it can reach a rule. The format of earlier releases
//! (one string for every row, or rules as JSON objects) still loads.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::model::LibvirtFirewall;
use crate::model::{Family, PortRange, Proto, RateLimit, RatePer, RateUnit};
use crate::plan::{BridgeAccept, Hairpin, Held, ListenOn, Rule, Ruleset};

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
    crate::model::validate_ifname(&s).map(|_| s.into_owned())
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
    // a refusal (unspecified guest) is nothing else
    if guest_ip.is_unspecified()
        && (bridge != crate::plan::REFUSAL_BRIDGE
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
type RateRow = (u32, u32, RateUnit, u32, RatePer);

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

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes)
}

fn unb64(text: &str) -> Result<Vec<u8>, String> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(text.as_bytes())
        .map_err(|e| e.to_string())
}

fn take_all<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, String> {
    let (v, rest): (T, _) = postcard::take_from_bytes(bytes).map_err(|e| e.to_string())?;
    if !rest.is_empty() {
        return Err(format!("{} bytes after the end", rest.len()));
    }
    Ok(v)
}

/// One index entry: domain, family, proto, listen (0 any, 1 address, 2 interface), the
/// listen address, the listen interface, localhost, host ports, guest address, bridge, tap
/// (0: none, else name + 1). Names are indexes into [`Shared::names`].
type Entry = (
    u32,
    u8,
    Proto,
    u8,
    Option<IpAddr>,
    u32,
    bool,
    (u16, u16),
    IpAddr,
    u32,
    u32,
);

/// The part every reader decodes.
#[derive(Serialize, Deserialize, Default)]
struct Shared<'a> {
    #[serde(borrow)]
    names: Vec<Cow<'a, str>>,
    index: Vec<Entry>,
    accepts: Vec<(Cow<'a, str>, u8, LibvirtFirewall)>,
    hairpins: Vec<(Cow<'a, str>, IpNet)>,
    hairpin_ports: Vec<Cow<'a, str>>,
}

/// The `ruleset` value of `state.json`: the shared part, and each domain's rows (read
/// borrowed: base64 has no escapes; written by [`Installed::write`]).
#[derive(Deserialize)]
struct Grouped<'a> {
    #[serde(borrow)]
    shared: Cow<'a, str>,
    #[serde(borrow)]
    domains: BTreeMap<Cow<'a, str>, &'a str>,
}

/// One domain's rows, as [`Stored`] (its own name and bridge tables).
fn encode_domain(rules: &[&Rule]) -> String {
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

fn decode_domain(name: &str, text: &str) -> Result<Vec<Rule>, String> {
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

/// The index and shared part of `rs`'s rules (grouped: `groups` in domain order).
fn shared_of<'a>(
    rs: &'a Ruleset,
    rules: &[&'a Rule],
    extra: Option<(&'a Installed, &[bool])>,
) -> Shared<'a> {
    let mut names = Names::default();
    let mut index: Vec<Entry> = Vec::new();
    if let Some((inst, keep)) = extra {
        // entries of domains left as they were (`keep`, by name): names re-interned
        let mut remap: Vec<u32> = vec![u32::MAX; inst.names.len()];
        let mut map = |i: u32, names: &mut Names<'a>| -> u32 {
            let slot = &mut remap[i as usize];
            if *slot == u32::MAX {
                *slot = names.index(&inst.names[i as usize]) as u32;
            }
            *slot
        };
        for h in &inst.entries {
            if !keep.get(h.domain as usize).copied().unwrap_or(false) {
                continue;
            }
            let (kind, addr, ifname) = match &h.listen {
                ListenOn::Any => (0, None, 0),
                ListenOn::Address(a) => (1, Some(*a), 0),
                ListenOn::Interface(i) => (2, None, names.index(i) as u32),
            };
            index.push((
                map(h.domain, &mut names),
                fam(h.family),
                h.proto,
                kind,
                addr,
                ifname,
                h.localhost,
                (h.host_ports.start, h.host_ports.end),
                h.guest_ip,
                map(h.bridge, &mut names),
                h.tap.map_or(0, |t| map(t, &mut names) + 1),
            ));
        }
    }
    for r in rules {
        let (kind, addr, ifname) = match &r.listen {
            ListenOn::Any => (0, None, 0),
            ListenOn::Address(a) => (1, Some(*a), 0),
            ListenOn::Interface(i) => (2, None, names.index(i) as u32),
        };
        index.push((
            names.index(&r.domain) as u32,
            fam(r.family),
            r.proto,
            kind,
            addr,
            ifname,
            r.localhost,
            (r.host_ports.start, r.host_ports.end),
            r.guest_ip,
            names.index(&r.bridge) as u32,
            r.tap.as_deref().map_or(0, |t| names.index(t) as u32 + 1),
        ));
    }
    let (accepts, hairpins, hairpin_ports) = shared_parts(rs);
    Shared {
        names: names.names,
        index,
        accepts,
        hairpins,
        hairpin_ports,
    }
}

/// Accepts, hairpins and hairpin ports, as stored (borrowed from `rs`).
type SharedParts<'a> = (
    Vec<(Cow<'a, str>, u8, LibvirtFirewall)>,
    Vec<(Cow<'a, str>, IpNet)>,
    Vec<Cow<'a, str>>,
);

fn shared_parts(rs: &Ruleset) -> SharedParts<'_> {
    (
        rs.accepts
            .iter()
            .map(|a| (Cow::Borrowed(a.bridge.as_str()), fam(a.family), a.firewall))
            .collect(),
        rs.hairpins
            .iter()
            .map(|h| (Cow::Borrowed(h.bridge.as_str()), h.subnet))
            .collect(),
        rs.hairpin_ports
            .iter()
            .map(|p| Cow::Borrowed(p.as_str()))
            .collect(),
    )
}

/// `rs`'s rules by domain, in ruleset order within each.
fn by_domain(rs: &Ruleset) -> BTreeMap<&str, Vec<&Rule>> {
    let mut m: BTreeMap<&str, Vec<&Rule>> = BTreeMap::new();
    for r in &rs.rules {
        m.entry(r.domain.as_str()).or_default().push(r);
    }
    m
}

pub fn serialize<S: Serializer>(rs: &Ruleset, s: S) -> Result<S::Ok, S::Error> {
    let mut out = String::new();
    Installed::default()
        .write(rs, &mut out)
        .map_err(serde::ser::Error::custom)?;
    serde_json::value::RawValue::from_string(out)
        .map_err(serde::ser::Error::custom)?
        .serialize(s)
}

/// The installed ruleset as one domain sees it: every rule's index entry, and the other
/// domains' rows still encoded (decoded only when a change needs them), as ranges of the
/// state file's text, which it keeps: they are written back without a copy or a scan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Installed {
    names: Vec<String>,
    entries: Vec<HeldEntry>,
    /// Per name: whether it is a domain whose rows are still encoded.
    pending: Vec<bool>,
    /// Still encoded: domain -> its rows' base64, a range of `text`.
    encoded: BTreeMap<String, std::ops::Range<usize>>,
    text: Vec<u8>,
}

/// An index entry with its names as indexes into [`Installed::names`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct HeldEntry {
    domain: u32,
    family: Family,
    proto: Proto,
    listen: ListenOn,
    localhost: bool,
    host_ports: PortRange,
    guest_ip: IpAddr,
    bridge: u32,
    tap: Option<u32>,
}

impl Installed {
    fn is_pending(&self, h: &HeldEntry) -> bool {
        self.pending
            .get(h.domain as usize)
            .copied()
            .unwrap_or(false)
    }

    fn chunk(&self, r: &std::ops::Range<usize>) -> &str {
        // ranges of base64 text, checked when the file was read
        std::str::from_utf8(&self.text[r.clone()]).unwrap_or_default()
    }

    /// The rules held by domains whose rows are still encoded.
    pub fn others(&self) -> Vec<Held<'_>> {
        self.entries
            .iter()
            .filter(|h| self.is_pending(h))
            .map(|h| Held {
                domain: &self.names[h.domain as usize],
                family: h.family,
                proto: h.proto,
                listen: &h.listen,
                localhost: h.localhost,
                host_ports: h.host_ports,
                guest_ip: h.guest_ip,
                bridge: &self.names[h.bridge as usize],
                tap: h.tap.map(|t| self.names[t as usize].as_str()),
            })
            .collect()
    }

    /// How many rules the still-encoded domains hold.
    pub fn other_rules(&self) -> usize {
        self.entries.iter().filter(|h| self.is_pending(h)).count()
    }

    /// Decodes (and takes out of the encoded part) the rows of every other domain with a
    /// rule for one of `guests`: a change touching a guest address needs all its rules.
    pub fn take_sharing(&mut self, guests: &BTreeSet<IpAddr>) -> Result<Vec<Rule>, String> {
        let domains: BTreeSet<u32> = self
            .entries
            .iter()
            .filter(|h| self.is_pending(h) && guests.contains(&h.guest_ip))
            .map(|h| h.domain)
            .collect();
        let mut out = Vec::new();
        for d in domains {
            let name = self.names[d as usize].clone();
            self.pending[d as usize] = false;
            if let Some(r) = self.encoded.remove(&name) {
                out.extend(decode_domain(&name, self.chunk(&r))?);
            }
        }
        Ok(out)
    }

    /// The whole ruleset: `part` (the decoded domains, with the shared part) and every
    /// domain still encoded.
    pub fn merged(&self, part: &Ruleset) -> Result<Ruleset, String> {
        let mut rules = part.rules.clone();
        for (d, r) in &self.encoded {
            rules.extend(decode_domain(d, self.chunk(r))?);
        }
        crate::plan::sort_rules(&mut rules);
        Ok(Ruleset {
            rules,
            ..part.clone()
        })
    }

    /// The `ruleset` value of a state whose decoded domains now have `part`'s rules (and
    /// the shared part is `part`'s), the other domains' rows as they were read.
    pub fn write(&self, part: &Ruleset, out: &mut String) -> Result<(), String> {
        let groups = by_domain(part);
        // the index entries kept as they are: of domains still encoded
        let keep: Vec<bool> = self
            .names
            .iter()
            .zip(&self.pending)
            .map(|(n, p)| *p && !groups.contains_key(n.as_str()))
            .collect();
        let mine: Vec<&Rule> = groups.values().flatten().copied().collect();
        let shared = shared_of(part, &mine, Some((self, &keep)));
        let shared = b64(&postcard::to_allocvec(&shared).map_err(|e| e.to_string())?);
        let mut domains: BTreeMap<&str, Cow<str>> = self
            .encoded
            .iter()
            .filter(|(d, _)| !groups.contains_key(d.as_str()))
            .map(|(d, r)| (d.as_str(), Cow::Borrowed(self.chunk(r))))
            .collect();
        for (d, rules) in &groups {
            domains.insert(d, Cow::Owned(encode_domain(rules)));
        }
        // by hand: base64 needs no JSON escaping, only the names do
        out.reserve(self.text.len() + shared.len() + 64);
        out.push_str("{\"shared\":\"");
        out.push_str(&shared);
        out.push_str("\",\"domains\":{");
        for (i, (d, rows)) in domains.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&serde_json::to_string(d).map_err(|e| e.to_string())?);
            out.push_str(":\"");
            out.push_str(rows);
            out.push('"');
        }
        out.push_str("}}");
        Ok(())
    }
}

fn bad<E: serde::de::Error>(e: String) -> E {
    E::custom(format!("installed ruleset: {e}"))
}

/// The whole installed ruleset (every format).
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Ruleset, D::Error> {
    let v = Stored2or3::deserialize(d)?;
    match v {
        Stored2or3::V2(text) => decode_v2(&text).map_err(bad),
        Stored2or3::V3(g) => whole(g).map_err(bad),
    }
}

/// The installed ruleset for one domain: its rules (with the whole shared part), and the
/// rest still encoded. `range` is the `ruleset` value in `text` (the state file), which
/// the [`Installed`] keeps.
pub fn parse_for(
    text: Vec<u8>,
    range: std::ops::Range<usize>,
    domain: &str,
) -> Result<(Ruleset, Installed), String> {
    let value = text.get(range).ok_or("no ruleset")?;
    let mut de = serde_json::Deserializer::from_slice(value);
    let (part, mut inst) = match Stored2or3::deserialize(&mut de).map_err(|e| e.to_string())? {
        Stored2or3::V2(_) => return Err("the previous release's format".into()),
        Stored2or3::V3(g) => split(g, Some(domain), text.as_ptr() as usize)?,
    };
    if inst.encoded.values().any(|r| r.end > text.len()) {
        return Err("rows outside the file".into());
    }
    inst.text = text;
    Ok((part, inst))
}

/// The `ruleset` value: a string (the previous release: every row in one) or the
/// grouped object.
enum Stored2or3<'a> {
    V2(Cow<'a, str>),
    V3(Grouped<'a>),
}

impl<'de> Deserialize<'de> for Stored2or3<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Stored2or3<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an installed ruleset (a string or an object)")
            }
            fn visit_borrowed_str<E: serde::de::Error>(
                self,
                v: &'de str,
            ) -> Result<Self::Value, E> {
                Ok(Stored2or3::V2(Cow::Borrowed(v)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Stored2or3::V2(Cow::Owned(v.to_string())))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                m: A,
            ) -> Result<Self::Value, A::Error> {
                Grouped::deserialize(serde::de::value::MapAccessDeserializer::new(m))
                    .map(Stored2or3::V3)
            }
        }
        d.deserialize_any(V)
    }
}

/// The shared part read back: a ruleset with no rules, every value validated.
fn shared_ruleset(
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

/// Every domain's rows, in the ruleset's order, with the shared part (its index is
/// not needed: the rules are all there).
fn whole(g: Grouped) -> Result<Ruleset, String> {
    let bytes = unb64(&g.shared)?;
    let sh: Shared = take_all(&bytes)?;
    let mut rs = shared_ruleset(sh.accepts, sh.hairpins, sh.hairpin_ports)?;
    for (d, text) in &g.domains {
        rs.rules.extend(decode_domain(d, text)?);
    }
    crate::plan::sort_rules(&mut rs.rules);
    Ok(rs)
}

/// The shared part decoded; the rows of `only` (every domain: None) decoded.
fn split(g: Grouped, only: Option<&str>, base: usize) -> Result<(Ruleset, Installed), String> {
    let bytes = unb64(&g.shared)?;
    let sh: Shared = take_all(&bytes)?;
    let names = sh
        .names
        .into_iter()
        .map(Cow::into_owned)
        .collect::<Vec<String>>();
    let name = |i: u32| -> Result<&String, String> {
        names.get(i as usize).ok_or_else(|| format!("no name {i}"))
    };
    // each name used as an interface name is validated once
    let mut valid = vec![false; names.len()];
    let mut check_if = |i: u32| -> Result<(), String> {
        let n = name(i)?;
        if !valid[i as usize] {
            ifname(Cow::Borrowed(n))?;
            valid[i as usize] = true;
        }
        Ok(())
    };
    let mut entries = Vec::with_capacity(sh.index.len());
    for (domain, family, proto, kind, addr, ifname_ix, localhost, h, guest_ip, bridge, tap) in
        sh.index
    {
        name(domain)?;
        check_if(bridge)?;
        let listen = match (kind, addr) {
            (0, _) => ListenOn::Any,
            (1, Some(a)) => ListenOn::Address(a),
            (2, _) => {
                check_if(ifname_ix)?;
                ListenOn::Interface(names[ifname_ix as usize].clone())
            }
            _ => return Err(format!("listen kind {kind}")),
        };
        let tap = match tap {
            0 => None,
            t => {
                check_if(t - 1)?;
                Some(t - 1)
            }
        };
        entries.push(HeldEntry {
            domain,
            family: unfam(family)?,
            proto,
            listen,
            localhost,
            host_ports: PortRange::new(h.0, h.1)?,
            guest_ip,
            bridge,
            tap,
        });
    }
    let shared = shared_ruleset(sh.accepts, sh.hairpins, sh.hairpin_ports)?;
    let mut rules = Vec::new();
    let mut encoded = BTreeMap::new();
    for (d, text) in g.domains {
        if only.is_none_or(|o| o == d) {
            rules.extend(decode_domain(&d, text)?);
        } else {
            // where the rows are in the file's text (`base`: where that starts)
            let start = (text.as_ptr() as usize).wrapping_sub(base);
            encoded.insert(d.into_owned(), start..start + text.len());
        }
    }
    let pending = names.iter().map(|n| encoded.contains_key(n)).collect();
    Ok((
        Ruleset { rules, ..shared },
        Installed {
            names,
            entries,
            pending,
            encoded,
            text: Vec::new(),
        },
    ))
}

/// The format of the previous release: every row in one string.
fn decode_v2(text: &str) -> Result<Ruleset, String> {
    let bytes = unb64(text)?;
    decode_stored(take_all(&bytes)?)
}

fn decode_stored(st: Stored) -> Result<Ruleset, String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(domain: &str, n: u8, guest: &str, tap: Option<&str>) -> Rule {
        Rule {
            id: format!("{n:02x}{:016x}", domain.len()),
            domain: domain.into(),
            family: Family::Ipv4,
            proto: Proto::Tcp,
            listen: if n.is_multiple_of(2) {
                ListenOn::Any
            } else {
                ListenOn::Interface("eth0".into())
            },
            host_ports: PortRange::new(8000 + u16::from(n), 8000 + u16::from(n)).unwrap(),
            guest_ip: guest.parse().unwrap(),
            guest_ports: PortRange::new(80, 80).unwrap(),
            sources: vec![],
            localhost: n.is_multiple_of(3),
            bridge: "virbr0".into(),
            tap: tap.map(str::to_string),
            description: Some(format!("{domain} {n}")),
            // some rows with a rate: stored after the rows, read back in place
            rate: (n % 4 == 1)
                .then(|| RateLimit::new(10, RateUnit::Minute, 3, RatePer::Forward).unwrap()),
        }
    }

    fn world() -> Ruleset {
        let mut rs = Ruleset::from_rules(
            vec![
                rule("a", 1, "192.168.122.10", Some("vnet0")),
                rule("a", 2, "192.168.122.10", Some("vnet0")),
                rule("b \"q\"", 3, "192.168.122.11", None),
                rule("c", 4, "192.168.122.12", Some("vnet2")),
                // c shares a's guest address (a stale rule, say)
                rule("c", 5, "192.168.122.10", Some("vnet2")),
            ],
            &[],
            &[],
        );
        rs.hairpin_ports = vec!["vnet0".into(), "vnet2".into()];
        rs
    }

    fn json(rs: &Ruleset) -> String {
        let mut buf = Vec::new();
        serialize(rs, &mut serde_json::Serializer::new(&mut buf)).unwrap();
        String::from_utf8(buf).unwrap()
    }

    fn whole(text: &str) -> Ruleset {
        deserialize(&mut serde_json::Deserializer::from_str(text)).unwrap()
    }

    fn part(text: &str, domain: &str) -> (Ruleset, Installed) {
        parse_for(text.as_bytes().to_vec(), 0..text.len(), domain).unwrap()
    }

    #[test]
    fn grouped_round_trip() {
        let rs = world();
        assert_eq!(whole(&json(&rs)), rs);
        assert_eq!(whole(&json(&Ruleset::default())), Ruleset::default());
    }

    #[test]
    fn the_previous_format_loads() {
        // it had no rate limits
        let mut rs = world();
        for r in &mut rs.rules {
            r.rate = None;
        }
        let (mut domains, mut bridges) = (Names::default(), Names::default());
        let rows = rs
            .rules
            .iter()
            .map(|r| row(r, domains.index(&r.domain), bridges.index(&r.bridge)))
            .collect();
        let (accepts, hairpins, hairpin_ports) = shared_parts(&rs);
        let st = Stored {
            domains: domains.names,
            bridges: bridges.names,
            rules: rows,
            accepts,
            hairpins,
            hairpin_ports,
        };
        let v2 = format!("\"{}\"", b64(&postcard::to_allocvec(&st).unwrap()));
        assert_eq!(whole(&v2), rs);
        // a hook reads it through the whole state (converted, see super::read_state_for)
        assert!(parse_for(v2.as_bytes().to_vec(), 0..v2.len(), "a").is_err());
    }

    #[test]
    fn one_domain_sees_its_rules_and_the_index_of_the_others() {
        let rs = world();
        let text = json(&rs);
        let (mine, mut inst) = part(&text, "a");
        assert!(mine.rules.iter().all(|r| r.domain == "a") && mine.rules.len() == 2);
        assert_eq!(
            (&mine.accepts, &mine.hairpins, &mine.hairpin_ports),
            (&rs.accepts, &rs.hairpins, &rs.hairpin_ports),
            "the shared part is whole"
        );
        // the others' index says what planning needs, exactly as their rules would
        let mut others = inst.others();
        let mut expected: Vec<Held> = rs
            .rules
            .iter()
            .filter(|r| r.domain != "a")
            .map(Held::of)
            .collect();
        let key = |h: &Held| (h.domain.to_string(), h.host_ports);
        others.sort_by_key(key);
        expected.sort_by_key(key);
        assert_eq!(others, expected);
        assert_eq!(inst.other_rules(), 3);
        // a guest address of a: c's rules come along, b's stay encoded
        let sharing = inst
            .take_sharing(&["192.168.122.10".parse().unwrap()].into())
            .unwrap();
        assert!(sharing.iter().all(|r| r.domain == "c") && sharing.len() == 2);
        assert_eq!(inst.other_rules(), 1);
        let mut decoded = mine.clone();
        decoded.rules.extend(sharing);
        decoded.rules.sort();
        assert_eq!(inst.merged(&decoded).unwrap(), rs);
    }

    #[test]
    fn a_partial_write_keeps_every_other_domain() {
        let rs = world();
        let text = json(&rs);
        let (mut mine, inst) = part(&text, "a");
        // a's rules change; a new domain's too; the shared part changes
        mine.rules
            .retain(|r| r.id != rule("a", 1, "192.168.122.10", None).id);
        mine.rules
            .push(rule("a", 7, "192.168.122.20", Some("vnet9")));
        mine.rules.push(rule("new", 8, "192.168.122.30", None));
        mine.rules.sort();
        mine.hairpin_ports.push("vnet9".into());
        let mut written = String::new();
        inst.write(&mine, &mut written).unwrap();
        let mut expected = rs.clone();
        expected.rules.retain(|r| r.domain != "a");
        expected.rules.extend(mine.rules.iter().cloned());
        expected.rules.sort();
        expected.hairpin_ports = mine.hairpin_ports.clone();
        assert_eq!(whole(&written), expected);
        // the index of the written state agrees with its rules
        let (_, inst2) = part(&written, "nobody");
        let mut idx = inst2.others();
        let mut exp: Vec<Held> = expected.rules.iter().map(Held::of).collect();
        let key = |h: &Held| (h.domain.to_string(), h.host_ports);
        idx.sort_by_key(key);
        exp.sort_by_key(key);
        assert_eq!(idx, exp);
        // a domain whose rules all went: none left, in rows or index
        let (mut a, inst3) = part(&written, "a");
        a.rules.clear();
        let mut gone = String::new();
        inst3.write(&a, &mut gone).unwrap();
        assert!(whole(&gone).rules.iter().all(|r| r.domain != "a"));
        assert!(part(&gone, "x").1.others().iter().all(|h| h.domain != "a"));
    }

    #[test]
    fn a_rule_stored_under_another_domain_is_refused() {
        let rs = world();
        let text = json(&rs).replacen("\"a\":", "\"zz\":", 1);
        assert!(deserialize(&mut serde_json::Deserializer::from_str(&text)).is_err());
        assert!(parse_for(text.as_bytes().to_vec(), 0..text.len(), "zz").is_err());
    }
}
