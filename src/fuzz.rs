//! Fuzz targets: one function per parser of untrusted input, called by the cargo-fuzz
//! targets in `fuzz/` (coverage-guided) and by `tests/fuzz_corpus.rs`, which replays every
//! committed corpus input in the ordinary test run. Each one must never panic; where two
//! ways of reading the same input exist, they must agree (a panic reports the input).

use std::path::Path;

fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

/// The TOML config; and a hook's reading of one domain's sections
/// ([`crate::config::toml_file::parse_for`]) equals reading the whole file for it.
pub fn toml_config(data: &[u8]) {
    use crate::config::toml_file::{Only, parse_for, parse_only};
    let Some(t) = text(data) else { return };
    let file = Path::new("/etc/virtgate/virtgate.toml");
    let whole = parse_only(file, t, None);
    if whole.is_err() {
        // a syntax error anywhere; the hook may still read its own sections
        let _ = parse_for(
            file,
            t,
            Only {
                name: "web",
                uuid: None,
            },
        );
        return;
    }
    for only in [
        Only {
            name: "web",
            uuid: None,
        },
        Only {
            name: "a",
            uuid: None,
        },
        Only {
            name: "x",
            uuid: Some("6f1d3b2a-0000-4000-8000-000000000001"),
        },
    ] {
        let a = format!("{:?}", parse_only(file, t, Some(only)));
        let b = format!("{:?}", parse_for(file, t, only));
        assert_eq!(
            a, b,
            "domain {:?}: its sections read differently",
            only.name
        );
    }
}

/// Short-form specs: what parses has ranges of equal length, start <= end.
pub fn short_spec(data: &[u8]) {
    let Some(t) = text(data) else { return };
    if let Ok(f) = crate::config::short::parse_short(t) {
        assert!(f.host_ports.start <= f.host_ports.end && f.guest_ports.start <= f.guest_ports.end);
        assert_eq!(f.host_ports.len(), f.guest_ports.len(), "{t:?}");
    }
}

/// A libvirt-hook-qemu hooks.json.
pub fn hooks_json(data: &[u8]) {
    let Some(t) = text(data) else { return };
    let _ = crate::config::hooks_json::parse(Path::new("/etc/libvirt/hooks/hooks.json"), t);
    let _ = crate::config::hooks_json::clean_jsonc(t);
}

/// Domain XML (with virtgate's `<metadata>`) and network XML.
pub fn libvirt_xml(data: &[u8]) {
    let Some(t) = text(data) else { return };
    let _ = crate::facts::libvirt::parse_domain_xml(t);
    let _ = crate::facts::libvirt::parse_network_xml(t);
    let _ = crate::facts::libvirt::recorded_firewall(t);
}

/// dnsmasq's lease status files.
pub fn leases(data: &[u8]) {
    let Some(t) = text(data) else { return };
    let strict = crate::facts::leases::parse_leases(t, "virbr0");
    let (lenient, _) = crate::facts::leases::parse_leases_lenient(t, "virbr0");
    // what the strict reader accepts, the lenient one reads the same
    if let Ok(s) = strict {
        assert_eq!(s, lenient);
    }
}

/// `state.json`: read whole, and as one domain's hook reads it; where both read it, they
/// agree on every rule, and a partial write read back whole gives the same ruleset.
pub fn state(data: &[u8]) {
    let whole = crate::state::parse_bytes(data);
    let mut domains: Vec<String> = whole
        .as_ref()
        .map(|s| s.ruleset.rules.iter().map(|r| r.domain.clone()).collect())
        .unwrap_or_default();
    domains.dedup();
    domains.truncate(3);
    domains.push("web".into());
    for d in &domains {
        let Ok((part, inst)) = crate::state::parse_bytes_for(data, d) else {
            continue;
        };
        let Ok(all) = inst.merged(&part.ruleset) else {
            continue;
        };
        if let Ok(w) = &whole {
            assert_eq!(
                all, w.ruleset,
                "domain {d:?}: partial and whole reads differ"
            );
        }
        let mut out = String::new();
        if inst.write(&part.ruleset, &mut out).is_ok() {
            let text = format!("{{\"backend\":null,\"ruleset\":{out},\"started\":{{}}}}");
            let back =
                crate::state::parse_bytes(text.as_bytes()).expect("a written state reads back");
            assert_eq!(back.ruleset, all, "domain {d:?}: written back differently");
        }
    }
}

/// A fuzz target: one input, a panic on a finding.
pub type Target = fn(&[u8]);

/// Every target by name (for the corpus replay).
pub const TARGETS: &[(&str, Target)] = &[
    ("toml_config", toml_config),
    ("short_spec", short_spec),
    ("hooks_json", hooks_json),
    ("libvirt_xml", libvirt_xml),
    ("leases", leases),
    ("state", state),
];
