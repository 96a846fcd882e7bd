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

mod codec;
mod index;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::rules::Ruleset;
use codec::{decode_domain, decode_v2, shared_ruleset, take_all, unb64};
pub use index::Installed;
use index::{Shared, split};

/// The `ruleset` value of `state.json`: the shared part, and each domain's rows (read
/// borrowed: base64 has no escapes; written by [`Installed::write`]).
#[derive(Deserialize)]
struct Grouped<'a> {
    #[serde(borrow)]
    shared: Cow<'a, str>,
    #[serde(borrow)]
    domains: BTreeMap<Cow<'a, str>, &'a str>,
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

/// Every domain's rows, in the ruleset's order, with the shared part (its index is
/// not needed: the rules are all there).
fn whole(g: Grouped) -> Result<Ruleset, String> {
    let bytes = unb64(&g.shared)?;
    let sh: Shared = take_all(&bytes)?;
    let mut rs = shared_ruleset(sh.accepts, sh.hairpins, sh.hairpin_ports)?;
    for (d, text) in &g.domains {
        rs.rules.extend(decode_domain(d, text)?);
    }
    crate::rules::sort_rules(&mut rs.rules);
    Ok(rs)
}
