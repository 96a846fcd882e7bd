//! A domain as libvirt describes it (name, UUID, NICs, virtgate's `<metadata>`): read by
//! facts, kept by the state for domains a hook reported as started, planned for.

use serde::{Deserialize, Serialize};

/// One NIC of a domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Nic {
    pub mac: String,
    pub network: Option<String>,
    pub bridge: Option<String>,
    pub tap: Option<String>,
}

/// A domain libvirt runs (or a hook said it started).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DomainFacts {
    pub name: String,
    pub uuid: Option<String>,
    pub nics: Vec<Nic>,
    /// virtgate's element of the domain's `<metadata>`, if it has one, as XML that parses
    /// on its own (its namespace declared on a wrapper); the config reads it. A state
    /// written by an earlier release kept it parsed: that is dropped (the next hook or
    /// apply reads it again from libvirt's files).
    #[serde(default, deserialize_with = "metadata_text")]
    pub metadata: Option<String>,
}

fn metadata_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    // compact formats (the facts cache) never held the earlier release's form
    if !d.is_human_readable() {
        return Option::<String>::deserialize(d);
    }
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => Some(s),
        _ => None,
    })
}
