//! `virtgate import-hooks-json FILE [--write]`: the TOML equivalent of a
//! libvirt-hook-qemu `hooks.json` (short form where it can be, long form otherwise),
//! with every difference in meaning said as a comment. It reads to the same forwards as
//! the hooks.json itself (tested).

use std::path::Path;

use toml_edit::{Array, ArrayOfTables, DocumentMut, Item, Table, value};

use super::Context;
use crate::config::{self, hooks_json};
use crate::model::{ForwardSpec, Listen, PortRange};

fn port(r: PortRange) -> Item {
    if r.start == r.end {
        value(i64::from(r.start))
    } else {
        value(r.to_string())
    }
}

fn listen(l: &Listen) -> Option<String> {
    match l {
        Listen::Any => None,
        Listen::Address(a) => Some(a.to_string()),
        Listen::DefaultRoute => Some("default-route".into()),
        Listen::Interface(i) => Some(i.clone()),
    }
}

/// The long form of one forward; `guest` is left out when the domain's default says it.
fn long_form(f: &ForwardSpec, with_guest: bool) -> Table {
    let mut t = Table::new();
    t["host_port"] = port(f.host_ports);
    t["guest_port"] = port(f.guest_ports);
    t["proto"] = value(f.proto.to_string());
    if let Some(l) = listen(&f.listen) {
        t["listen"] = value(l);
    }
    if !f.sources.is_empty() {
        let mut a = Array::new();
        for s in &f.sources {
            a.push(s.to_string());
        }
        t["source"] = value(a);
    }
    if with_guest {
        let mut a = Array::new();
        for g in &f.guest_addresses {
            a.push(g.to_string());
        }
        t["guest_address"] = value(a);
    }
    t
}

/// The TOML text for a hooks.json's text.
pub fn convert(file: &Path, text: &str) -> Result<String, String> {
    let parsed = hooks_json::parse(file, text).map_err(|d| d.to_string())?;
    let mut doc = DocumentMut::new();
    let mut head = format!(
        "# Converted from {} by `virtgate import-hooks-json`.\n# It reads to the same forwards; where the meaning differs from libvirt-hook-qemu, a note says how.\n",
        file.display()
    );
    for d in &parsed.diagnostics {
        head.push_str(&format!("# note: {d}\n"));
    }
    for name in &parsed.invalid_domains {
        head.push_str(&format!(
            "# not converted: domain {name:?} has an error (above); fix it in the hooks.json and convert again\n"
        ));
    }
    let mut domains = Table::new();
    domains.set_implicit(true);
    for ((dc, configured), _) in &parsed.domains {
        let forwards: Vec<&ForwardSpec> = configured.iter().map(|c| &c.spec).collect();
        let mut t = Table::new();
        // one guest address for all its forwards (hooks.json's private_ip): said once
        let shared = forwards
            .first()
            .map(|f| f.guest_addresses.clone())
            .filter(|g| forwards.iter().all(|f| &f.guest_addresses == g));
        if let Some(g) = &shared {
            let mut a = Array::new();
            for ip in g {
                a.push(ip.to_string());
            }
            t["guest_address"] = value(a);
        }
        let mut short = Array::new();
        let mut long = ArrayOfTables::new();
        for f in forwards {
            let plain = f.sources.is_empty()
                && f.nic.is_none()
                && !f.localhost
                && f.description.is_none()
                && !matches!(f.listen, Listen::Interface(_));
            if plain && shared.is_some() {
                short.push(f.short());
            } else {
                long.push(long_form(f, shared.is_none()));
            }
        }
        if !short.is_empty() {
            t["forwards"] = value(short);
        }
        if !long.is_empty() {
            t["forward"] = Item::ArrayOfTables(long);
        }
        domains.insert(&dc.name, Item::Table(t));
    }
    doc["domain"] = Item::Table(domains);
    Ok(format!("{head}\n{doc}"))
}

pub fn run(ctx: &Context, file: &Path, write: bool) -> Result<bool, String> {
    let text = crate::files::read_text(file, config::MAX_CONFIG_BYTES, crate::files::Follow::Yes)
        .map_err(|e| format!("{}: {e}", file.display()))?;
    let toml = convert(file, &text)?;
    if !write {
        print!("{toml}");
        return Ok(true);
    }
    let dir = ctx
        .config_path
        .parent()
        .unwrap_or(Path::new("/etc/virtgate"))
        .join("conf.d");
    let out = dir.join("hooks-json.toml");
    if out.exists() {
        return Err(format!(
            "{} exists: nothing written (remove it to convert again)",
            out.display()
        ));
    }
    crate::files::write_atomic(&out, toml.as_bytes(), 0o644)
        .map_err(|e| format!("{}: {e}", out.display()))?;
    println!(
        "wrote {}; `virtgate check` reads it beside {} (take the same domains out of a hooks.json you keep as --config)",
        out.display(),
        ctx.config_path.display()
    );
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOOKS: &str = r#"{
    "web": {
        "private_ip": "192.168.122.10",
        "port_map": {"tcp": [[80, 8080], 443], "udp": [[53, 5353]]},
        "port_range": [{"init_port": 9000, "ports_num": 3, "protocol": "tcp"}]
    },
    "db": {
        "private_ip": "192.168.122.20",
        "public_ip": "203.0.113.5",
        "source_ip": "198.51.100.0/24",
        "port_map": {"tcp": [5432]}
    },
    "bad": {"private_ip": "192.168.122.30", "port_map": {"icmp": [1]}}
}"#;

    #[test]
    fn the_toml_reads_to_the_same_forwards() {
        let p = Path::new("hooks.json");
        let direct = config::merge(vec![hooks_json::parse(p, HOOKS).unwrap()]);
        let toml = convert(p, HOOKS).unwrap();
        let parsed = config::toml_file::parse(Path::new("hooks-json.toml"), &toml)
            .unwrap_or_else(|d| panic!("{d}\n{toml}"));
        let back = config::merge(vec![parsed]);
        assert_eq!(back.errors().count(), 0, "{:?}\n{toml}", back.diagnostics);
        assert_eq!(back.domain_configs(), direct.domain_configs(), "{toml}");
        // short form where it can be, and what was not converted is said
        assert!(toml.contains("\"default-route:80:8080/tcp\""), "{toml}");
        assert!(toml.contains("[[domain.db.forward]]"), "{toml}");
        assert!(toml.contains("# not converted: domain \"bad\""), "{toml}");
    }
}
