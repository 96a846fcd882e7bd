//! `virtgate add DOMAIN SPEC` / `virtgate remove DOMAIN SPEC`: edit the main config file
//! keeping its comments and layout (toml_edit), check the whole config as it would be
//! (an invalid or conflicting result writes nothing), write it atomically, then apply.

use std::os::unix::fs::PermissionsExt;

use toml_edit::{ArrayOfTables, DocumentMut, Item, Table, value};

use super::{Context, apply};
use crate::config::{self, short::ShortForward};

/// The main config's text (empty if there is none yet) and its document.
fn open(ctx: &Context) -> Result<(String, DocumentMut), String> {
    let p = &ctx.config_path;
    if p.extension().is_some_and(|e| e == "json") {
        return Err(format!(
            "{} is a hooks.json: add and remove edit a TOML config (convert it first)",
            p.display()
        ));
    }
    let text = if p.exists() {
        crate::files::read_text(p, config::MAX_CONFIG_BYTES, crate::files::Follow::Yes)
            .map_err(|e| format!("{}: {e}", p.display()))?
    } else {
        String::new()
    };
    let doc = text
        .parse::<DocumentMut>()
        .map_err(|e| format!("{}: {e} (run `virtgate check`)", p.display()))?;
    Ok((text, doc))
}

/// `[domain.NAME]`, created (after the others) if missing.
fn domain_table<'a>(doc: &'a mut DocumentMut, name: &str) -> Result<&'a mut Table, String> {
    let domains = doc
        .entry("domain")
        .or_insert_with(|| {
            let mut t = Table::new();
            t.set_implicit(true);
            Item::Table(t)
        })
        .as_table_mut()
        .ok_or("`domain` in the config is not a table")?;
    domains
        .entry(name)
        .or_insert_with(|| Item::Table(Table::new()))
        .as_table_mut()
        .ok_or_else(|| format!("domain.{name} in the config is not a table"))
}

/// A long-form entry for `f`.
fn long_form(f: &ShortForward, description: &str) -> Table {
    let port = |r: crate::model::PortRange| {
        if r.start == r.end {
            value(i64::from(r.start))
        } else {
            value(r.to_string())
        }
    };
    let mut t = Table::new();
    t["host_port"] = port(f.host_ports);
    t["guest_port"] = port(f.guest_ports);
    t["proto"] = value(f.proto.to_string());
    if let crate::model::Listen::Address(a) = f.listen {
        t["listen"] = value(a.to_string());
    }
    t["description"] = value(description);
    t
}

/// Whether a long-form entry describes `f`.
fn long_matches(t: &Table, f: &ShortForward) -> bool {
    let port = |k: &str| {
        t.get(k).and_then(|v| {
            v.as_integer()
                .and_then(|n| u16::try_from(n).ok())
                .and_then(|n| crate::model::PortRange::single(n).ok())
                .or_else(|| {
                    v.as_str()
                        .and_then(|s| crate::model::PortRange::parse(s).ok())
                })
        })
    };
    let proto = t
        .get("proto")
        .and_then(|v| v.as_str())
        .and_then(crate::model::Proto::parse)
        .unwrap_or(crate::model::Proto::Tcp);
    let listen = match t.get("listen").and_then(|v| v.as_str()) {
        None => crate::model::Listen::Any,
        Some(s) => match s.parse() {
            Ok(ip) => crate::model::Listen::Address(ip),
            Err(_) => return false,
        },
    };
    port("host_port") == Some(f.host_ports)
        && port("guest_port").unwrap_or(f.host_ports) == f.guest_ports
        && proto == f.proto
        && listen == f.listen
}

/// Checks the config as it would be, writes it, applies.
fn commit(ctx: &Context, domain: &str, text: &str) -> Result<bool, String> {
    let cfg = config::load_edited(&ctx.config_path, text)
        .map_err(|e| format!("the config would not load, nothing written: {e}"))?;
    let mine: Vec<String> = cfg
        .errors()
        .filter(|d| d.domain.as_deref() == Some(domain) || d.domain.is_none())
        .map(|d| d.to_string())
        .collect();
    if !mine.is_empty() {
        return Err(format!("nothing written:\n{}", mine.join("\n")));
    }
    let mode = std::fs::metadata(&ctx.config_path)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0o644);
    crate::files::write_atomic(&ctx.config_path, text.as_bytes(), mode)
        .map_err(|e| format!("{}: {e}", ctx.config_path.display()))?;
    println!("wrote {}", ctx.config_path.display());
    apply(ctx)
}

pub fn add(
    ctx: &Context,
    domain: &str,
    spec: &str,
    description: Option<&str>,
) -> Result<bool, String> {
    let f = config::short::parse_short(spec).map_err(|e| format!("{spec:?}: {e}"))?;
    let (_, mut doc) = open(ctx)?;
    let t = domain_table(&mut doc, domain)?;
    match description {
        None => {
            let arr = t
                .entry("forwards")
                .or_insert_with(|| value(toml_edit::Array::new()))
                .as_array_mut()
                .ok_or_else(|| format!("domain.{domain}.forwards is not a list"))?;
            arr.push(spec.trim());
        }
        Some(d) => {
            let aot = t
                .entry("forward")
                .or_insert_with(|| Item::ArrayOfTables(ArrayOfTables::new()))
                .as_array_of_tables_mut()
                .ok_or_else(|| format!("domain.{domain}.forward is not a [[table]] list"))?;
            aot.push(long_form(&f, d));
        }
    }
    commit(ctx, domain, &doc.to_string())
}

pub fn remove(ctx: &Context, domain: &str, spec: &str) -> Result<bool, String> {
    let f = config::short::parse_short(spec).map_err(|e| format!("{spec:?}: {e}"))?;
    let (_, mut doc) = open(ctx)?;
    let Some(t) = doc
        .get_mut("domain")
        .and_then(|d| d.get_mut(domain))
        .and_then(|d| d.as_table_mut())
    else {
        return Err(format!(
            "no [domain.{domain}] in {}",
            ctx.config_path.display()
        ));
    };
    let mut have = Vec::new();
    let mut removed = false;
    if let Some(arr) = t.get_mut("forwards").and_then(|v| v.as_array_mut()) {
        let at = arr.iter().position(|v| {
            v.as_str()
                .and_then(|s| config::short::parse_short(s).ok())
                .is_some_and(|x| x == f)
        });
        have.extend(arr.iter().filter_map(|v| v.as_str().map(str::to_string)));
        if let Some(i) = at {
            arr.remove(i);
            removed = true;
        }
    }
    if !removed
        && let Some(aot) = t
            .get_mut("forward")
            .and_then(|v| v.as_array_of_tables_mut())
    {
        let at = aot.iter().position(|x| long_matches(x, &f));
        have.extend(aot.iter().map(|x| {
            let g = |k: &str| x.get(k).map(|v| v.to_string().trim().to_string());
            format!(
                "[[forward]] host_port {} guest_port {}",
                g("host_port").unwrap_or_default(),
                g("guest_port").unwrap_or_default()
            )
        }));
        if let Some(i) = at {
            aot.remove(i);
            removed = true;
        }
    }
    if !removed {
        return Err(format!(
            "domain {domain:?} has no forward {spec:?} in {}; it has: {}",
            ctx.config_path.display(),
            if have.is_empty() {
                "none".to_string()
            } else {
                have.join(", ")
            }
        ));
    }
    // an entry left with nothing in it goes (a domain in the file hides its <metadata>)
    let empty = t.iter().all(|(k, v)| match k {
        "forwards" => v.as_array().is_some_and(|a| a.is_empty()),
        "forward" => v.as_array_of_tables().is_some_and(|a| a.is_empty()),
        _ => false,
    });
    if empty && let Some(d) = doc.get_mut("domain").and_then(|d| d.as_table_mut()) {
        d.remove(domain);
    }
    commit(ctx, domain, &doc.to_string())
}
