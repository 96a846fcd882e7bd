//! libvirt-hook-qemu's `hooks.json`, read as it is (SEED-COMPAT.md): `//` and `/* */`
//! comments and a trailing comma are tolerated, an entry or a list of entries per domain.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use serde_json::{Map, Value};

use super::diag::{Diagnostic, Origin, Severity};
use super::toml_file::{parse_cidr, validate_ifname};
use super::{ConfiguredForward, ParsedFile};
use crate::model::{DomainConfig, ForwardSpec, Listen, NicSelector, PortRange, Proto};

const ENTRY_KEYS: &[&str] = &[
    "private_ip",
    "public_ip",
    "source_ip",
    "interface",
    "port_map",
    "port_range",
];

/// Replaces comments and trailing commas with spaces, keeping every byte offset and
/// newline, so JSON error positions still point into the user's file. Returns the
/// cleaned text and the offsets of removed trailing commas.
pub fn clean_jsonc(text: &str) -> (String, Vec<usize>) {
    let b = text.as_bytes();
    let mut out = b.to_vec();
    let mut commas = Vec::new();
    let mut i = 0;
    let mut in_str = false;
    let mut last_comma: Option<usize> = None;
    while i < b.len() {
        let c = b[i];
        if in_str {
            if c == b'\\' {
                i += 2;
                continue;
            }
            if c == b'"' {
                in_str = false;
            }
            i += 1;
            continue;
        }
        match c {
            b'"' => {
                in_str = true;
                last_comma = None;
            }
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    out[i] = b' ';
                    i += 1;
                }
                continue;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let start = i;
                i += 2;
                while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                    i += 1;
                }
                let end = (i + 2).min(b.len());
                for (j, o) in out.iter_mut().enumerate().take(end).skip(start) {
                    if b[j] != b'\n' {
                        *o = b' ';
                    }
                }
                i = end;
                continue;
            }
            b',' => last_comma = Some(i),
            b'}' | b']' => {
                if let Some(p) = last_comma.take() {
                    out[p] = b' ';
                    commas.push(p);
                }
            }
            c if c.is_ascii_whitespace() => {}
            _ => last_comma = None,
        }
        i += 1;
    }
    // only ASCII bytes were replaced by ASCII spaces, so this stays valid UTF-8
    (String::from_utf8(out).unwrap_or_default(), commas)
}

/// The top-level object's entries in file order, duplicates kept (to be refused).
struct Entries(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of domains")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<Entries, A::Error> {
                let mut v = Vec::new();
                while let Some(e) = m.next_entry::<String, Value>()? {
                    v.push(e);
                }
                Ok(Entries(v))
            }
        }
        d.deserialize_map(V)
    }
}

pub fn parse(file: &Path, text: &str) -> Result<ParsedFile, Diagnostic> {
    let (clean, commas) = clean_jsonc(text);
    let Entries(entries) = serde_json::from_str(&clean).map_err(|e| Diagnostic {
        origin: Origin {
            file: file.to_path_buf(),
            line: e.line(),
            col: e.column(),
        },
        severity: Severity::Error,
        domain: None,
        message: format!("hooks.json: {e}"),
    })?;
    let mut out = ParsedFile::default();
    // a key given twice: JSON parsers keep one of the two silently; TOML refuses it
    let mut top = Map::new();
    for (name, value) in entries {
        if top.contains_key(&name) {
            return Err(Diagnostic {
                origin: Origin::at(file, text, find_key(text, &name)),
                severity: Severity::Error,
                domain: Some(name.clone()),
                message: format!("hooks.json: domain {name:?} is given twice"),
            });
        }
        top.insert(name, value);
    }
    for p in commas {
        out.diagnostics.push(Diagnostic {
            origin: Origin::at(file, text, p),
            severity: Severity::Warning,
            domain: None,
            message: "trailing comma (accepted by virtgate; strict JSON and the original hook reject it, failing every domain)".into(),
        });
    }
    for (name, value) in &top {
        let origin = Origin::at(file, text, find_key(text, name));
        match parse_domain(name, value) {
            Ok((forwards, notes)) => {
                for n in notes {
                    out.diagnostics.push(Diagnostic {
                        origin: origin.clone(),
                        severity: Severity::Warning,
                        domain: Some(name.clone()),
                        message: n,
                    });
                }
                let forwards = forwards
                    .into_iter()
                    .map(|spec| ConfiguredForward {
                        spec,
                        origin: origin.clone(),
                    })
                    .collect();
                let dc = DomainConfig {
                    name: name.clone(),
                    ..Default::default()
                };
                out.domains.push(((dc, forwards), origin));
            }
            Err(msg) => {
                out.diagnostics.push(Diagnostic {
                    origin,
                    severity: Severity::Error,
                    domain: Some(name.clone()),
                    message: msg,
                });
                out.invalid_domains.push(name.clone());
            }
        }
    }
    Ok(out)
}

/// Byte offset of `"name"` used as an object key, for error positions.
fn find_key(text: &str, name: &str) -> usize {
    let needle = serde_json::to_string(name).unwrap_or_default();
    let mut from = 0;
    while let Some(p) = text[from..].find(&needle) {
        let at = from + p;
        let rest = text[at + needle.len()..].trim_start();
        if rest.starts_with(':') {
            return at;
        }
        from = at + needle.len();
    }
    0
}

type Parsed = (Vec<ForwardSpec>, Vec<String>);

fn parse_domain(name: &str, value: &Value) -> Result<Parsed, String> {
    let entries: Vec<&Value> = match value {
        Value::Array(a) => a.iter().collect(),
        v => vec![v],
    };
    let mut forwards = Vec::new();
    let mut notes = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let which = if entries.len() > 1 {
            format!("entry {i}: ")
        } else {
            String::new()
        };
        let (f, n) = parse_entry(e).map_err(|m| format!("{which}{m}"))?;
        forwards.extend(f);
        notes.extend(n.into_iter().map(|m| format!("{which}{m}")));
    }
    let _ = name;
    Ok((forwards, notes))
}

fn get_str<'a>(o: &'a Map<String, Value>, k: &str) -> Result<Option<&'a str>, String> {
    match o.get(k) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("'{k}' must be a string")),
    }
}

fn port_of(v: &Value, what: &str) -> Result<u16, String> {
    let n = v
        .as_u64()
        .ok_or_else(|| format!("{what}: {v} is not a port number"))?;
    if n == 0 || n > 65535 {
        return Err(format!("{what}: port {n} is out of range 1-65535"));
    }
    Ok(n as u16)
}

fn parse_entry(v: &Value) -> Result<Parsed, String> {
    let o = v
        .as_object()
        .ok_or_else(|| "an entry must be an object".to_string())?;
    if let Some(k) = o.keys().find(|k| !ENTRY_KEYS.contains(&k.as_str())) {
        return Err(format!(
            "unknown key '{k}' (expected one of: {})",
            ENTRY_KEYS.join(", ")
        ));
    }
    let base = entry_base(o)?;
    let mut out = Vec::new();
    let mut notes = Vec::new();
    if let Some(pm) = o.get("port_map") {
        let pm = pm.as_object().ok_or("'port_map' must be an object")?;
        for (proto, items) in pm {
            out.extend(port_map(proto, items, &base)?);
        }
    }
    if let Some(pr) = o.get("port_range") {
        let pr = pr.as_array().ok_or("'port_range' must be a list")?;
        if !base.sources.is_empty() && !pr.is_empty() {
            notes.push("source_ip now also restricts port_range (the original hook applied it to port_map only)".into());
        }
        for r in pr {
            out.push(port_range(r, &base)?);
        }
    }
    Ok((out, notes))
}

/// What every forward of an entry shares: the guest, listen address, sources, bridge.
fn entry_base(o: &Map<String, Value>) -> Result<ForwardSpec, String> {
    let private: Ipv4Addr = get_str(o, "private_ip")?
        .ok_or("missing 'private_ip'")?
        .parse()
        .map_err(|_| "'private_ip' is not an IPv4 address".to_string())?;
    let listen = match get_str(o, "public_ip")? {
        // the same refusals as a TOML listen address (0.0.0.0: every address, as there)
        Some(s) => crate::config::short::listen_from_ip(
            s.parse::<IpAddr>()
                .map_err(|_| format!("'public_ip' {s:?} is not an IP address"))?,
        )
        .map_err(|e| format!("'public_ip': {e}"))?,
        None => Listen::DefaultRoute,
    };
    let sources = match get_str(o, "source_ip")? {
        Some(s) => vec![parse_cidr(s).map_err(|e| format!("source_ip: {e}"))?],
        None => vec![],
    };
    let nic = match get_str(o, "interface")? {
        Some(s) => {
            validate_ifname(s)?;
            Some(NicSelector::Bridge(s.to_string()))
        }
        None => None,
    };
    Ok(ForwardSpec {
        listen,
        sources,
        nic,
        guest_addresses: vec![IpAddr::V4(private)],
        ..Default::default()
    })
}

/// `port_map.PROTO`: ports and `[public, private]` pairs.
fn port_map(proto: &str, items: &Value, base: &ForwardSpec) -> Result<Vec<ForwardSpec>, String> {
    let proto = match proto {
        "icmp" => {
            return Err("port_map: 'icmp' has no ports and cannot be forwarded".into());
        }
        p => Proto::parse(p)
            .filter(|p| *p != Proto::Sctp)
            .ok_or_else(|| format!("port_map: unknown protocol '{p}' (expected tcp or udp)"))?,
    };
    let items = items
        .as_array()
        .ok_or_else(|| format!("port_map.{proto} must be a list"))?;
    let mut out = Vec::new();
    for it in items {
        let (h, g) = match it {
            Value::Array(pair) if pair.len() == 2 => (
                port_of(&pair[0], "port_map")?,
                port_of(&pair[1], "port_map")?,
            ),
            Value::Array(_) => {
                return Err(format!(
                    "port_map.{proto}: a pair must be [public, private]"
                ));
            }
            other => {
                let p = port_of(other, "port_map")?;
                (p, p)
            }
        };
        out.push(ForwardSpec {
            proto,
            host_ports: PortRange::single(h)?,
            guest_ports: PortRange::single(g)?,
            ..base.clone()
        });
    }
    Ok(out)
}

/// One `port_range` entry: `init_port`, `ports_num`, `protocol`.
fn port_range(r: &Value, base: &ForwardSpec) -> Result<ForwardSpec, String> {
    let r = r.as_object().ok_or("port_range entries must be objects")?;
    let init = port_of(
        r.get("init_port")
            .ok_or("port_range: missing 'init_port'")?,
        "init_port",
    )?;
    let num = r
        .get("ports_num")
        .and_then(Value::as_u64)
        .ok_or("port_range: 'ports_num' must be a positive number")?;
    let last = num
        .checked_sub(1)
        .and_then(|n| u64::from(init).checked_add(n))
        .filter(|l| *l <= 65535);
    let Some(last) = last else {
        return Err(format!(
            "port_range: {init} + {num} ports exceeds 65535 or is empty"
        ));
    };
    let proto = r
        .get("protocol")
        .and_then(Value::as_str)
        .and_then(Proto::parse)
        .filter(|p| *p != Proto::Sctp)
        .ok_or("port_range: 'protocol' must be \"tcp\" or \"udp\"")?;
    let range = PortRange::new(init, last as u16)?;
    Ok(ForwardSpec {
        proto,
        host_ports: range,
        guest_ports: range,
        ..base.clone()
    })
}

#[cfg(test)]
mod tests;
