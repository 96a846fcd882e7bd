//! The shared part (accepts, hairpins, the index of every rule) and [`Installed`]: the
//! ruleset as one domain sees it, the other domains' rows kept encoded.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::Grouped;
use super::codec::{
    Names, b64, decode_domain, encode_domain, fam, ifname, shared_ruleset, take_all, unb64, unfam,
};
use crate::model::LibvirtFirewall;
use crate::model::{Family, PortRange, Proto};
use crate::rules::{Held, ListenOn, Rule, Ruleset};

/// One index entry: domain, family, proto, listen (0 any, 1 address, 2 interface), the
/// listen address, the listen interface, localhost, host ports, guest address, bridge, tap
/// (0: none, else name + 1). Names are indexes into [`Shared::names`].
pub(super) type Entry = (
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
pub(super) struct Shared<'a> {
    #[serde(borrow)]
    pub(super) names: Vec<Cow<'a, str>>,
    pub(super) index: Vec<Entry>,
    pub(super) accepts: Vec<(Cow<'a, str>, u8, LibvirtFirewall)>,
    pub(super) hairpins: Vec<(Cow<'a, str>, IpNet)>,
    pub(super) hairpin_ports: Vec<Cow<'a, str>>,
}

/// The index and shared part of `rs`'s rules (grouped: `groups` in domain order).
pub(super) fn shared_of<'a>(
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
pub(super) type SharedParts<'a> = (
    Vec<(Cow<'a, str>, u8, LibvirtFirewall)>,
    Vec<(Cow<'a, str>, IpNet)>,
    Vec<Cow<'a, str>>,
);

pub(super) fn shared_parts(rs: &Ruleset) -> SharedParts<'_> {
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
pub(super) fn by_domain(rs: &Ruleset) -> BTreeMap<&str, Vec<&Rule>> {
    let mut m: BTreeMap<&str, Vec<&Rule>> = BTreeMap::new();
    for r in &rs.rules {
        m.entry(r.domain.as_str()).or_default().push(r);
    }
    m
}

/// The installed ruleset as one domain sees it: every rule's index entry, and the other
/// domains' rows still encoded (decoded only when a change needs them), as ranges of the
/// state file's text, which it keeps: they are written back without a copy or a scan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Installed {
    pub(super) names: Vec<String>,
    pub(super) entries: Vec<HeldEntry>,
    /// Per name: whether it is a domain whose rows are still encoded.
    pub(super) pending: Vec<bool>,
    /// Still encoded: domain -> its rows' base64, a range of `text`.
    pub(super) encoded: BTreeMap<String, std::ops::Range<usize>>,
    pub(super) text: Vec<u8>,
}

/// An index entry with its names as indexes into [`Installed::names`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct HeldEntry {
    pub(super) domain: u32,
    pub(super) family: Family,
    pub(super) proto: Proto,
    pub(super) listen: ListenOn,
    pub(super) localhost: bool,
    pub(super) host_ports: PortRange,
    pub(super) guest_ip: IpAddr,
    pub(super) bridge: u32,
    pub(super) tap: Option<u32>,
}

impl Installed {
    pub(super) fn is_pending(&self, h: &HeldEntry) -> bool {
        self.pending
            .get(h.domain as usize)
            .copied()
            .unwrap_or(false)
    }

    pub(super) fn chunk(&self, r: &std::ops::Range<usize>) -> &str {
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

    /// Decodes (and takes out of the encoded part) `domain`'s rows.
    pub fn take_domain(&mut self, domain: &str) -> Result<Vec<Rule>, String> {
        if let Some(i) = self.names.iter().position(|n| n == domain) {
            self.pending[i] = false;
        }
        match self.encoded.remove(domain) {
            Some(r) => decode_domain(domain, self.chunk(&r)),
            None => Ok(Vec::new()),
        }
    }

    /// The whole ruleset: `part` (the decoded domains, with the shared part) and every
    /// domain still encoded.
    pub fn merged(&self, part: &Ruleset) -> Result<Ruleset, String> {
        let mut rules = part.rules.clone();
        for (d, r) in &self.encoded {
            rules.extend(decode_domain(d, self.chunk(r))?);
        }
        crate::rules::sort_rules(&mut rules);
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

/// The index entries, every name checked (each used as an interface name validated once).
fn decode_index(index: Vec<Entry>, names: &[String]) -> Result<Vec<HeldEntry>, String> {
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
    let mut entries = Vec::with_capacity(index.len());
    for (domain, family, proto, kind, addr, ifname_ix, localhost, h, guest_ip, bridge, tap) in index
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
    Ok(entries)
}

/// The shared part decoded; the rows of `only` (every domain: None) decoded.
pub(super) fn split(
    g: Grouped,
    only: Option<&str>,
    base: usize,
) -> Result<(Ruleset, Installed), String> {
    let bytes = unb64(&g.shared)?;
    let sh: Shared = take_all(&bytes)?;
    let names = sh
        .names
        .into_iter()
        .map(Cow::into_owned)
        .collect::<Vec<String>>();
    let entries = decode_index(sh.index, &names)?;
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
