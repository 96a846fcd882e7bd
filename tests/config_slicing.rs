//! A hook parses only its domain's sections of the config (config::sections): on random
//! configs full of what can hide or fake a table header (multi-line arrays, strings of
//! all four kinds with brackets and quotes, comments, quoted names, dotted keys, array
//! tables), what the hook gets for each domain is exactly what parsing the whole file
//! gives for it: the same domain, forwards, errors, and line:column positions.

use std::path::Path;

use proptest::prelude::*;
use virtgate::config::sections;
use virtgate::config::toml_file::{Only, parse_for, parse_only};

fn name() -> impl Strategy<Value = (String, String)> {
    // (the name, how a header spells it)
    prop_oneof![
        "[a-z][a-z0-9_-]{0,6}".prop_map(|n| (n.clone(), n)),
        "[a-z][a-z .\\]\\[#]{0,6}".prop_map(|n| (n.clone(), format!("\"{n}\""))),
        "[a-z][a-z .\\]#]{0,6}".prop_map(|n| (n.clone(), format!("'{n}'"))),
    ]
}

/// Text that may look like a header but is not one.
fn decoy() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("# [domain.decoy]\n".to_string()),
        Just("KEY = \"\"\"\n[domain.decoy]\n\"\"\"\n".to_string()),
        Just("KEY = '''\n[[domain.decoy.forward]]\n'''\n".to_string()),
        Just("KEY = \"[domain.decoy] \\\" ] #\"\n".to_string()),
        Just("KEY = 'x ] [ \" #'\n".to_string()),
        Just("KEY = [\n  [1, 2],\n  # ]\n  [\"]\"],\n]\n".to_string()),
        Just("KEY = { a = [\n], b = \"}\" }\n".to_string()),
        Just(String::new()),
    ]
}

fn forward() -> impl Strategy<Value = String> {
    (1000u16..1100, 1u16..100, any::<bool>(), decoy()).prop_map(|(h, g, udp, d)| {
        let proto = if udp { "/udp" } else { "" };
        format!(
            "  \"{h}:{g}{proto}\", # [domain.x]\n{}",
            if d.starts_with('#') { "  # ]\n" } else { "" }
        )
    })
}

fn section(header: String, uuid: Option<String>) -> impl Strategy<Value = String> {
    (
        prop::collection::vec(forward(), 0..3),
        decoy(),
        prop::option::of((1200u16..1300, decoy())),
        any::<bool>(),
    )
        .prop_map(move |(fw, d, long, bad)| {
            let mut s = format!("[domain.{header}]\n");
            if let Some(u) = &uuid {
                s.push_str(&format!("uuid = \"{u}\"\n"));
            }
            s.push_str("forwards = [\n");
            for f in &fw {
                s.push_str(f);
            }
            s.push_str("]\n");
            if bad {
                s.push_str("unknown_key = 1\n");
            }
            s.push_str(&d);
            if let Some((p, d2)) = long {
                s.push_str(&format!(
                    "\n[[domain.{header}.forward]]\nhost_port = {p}\ndescription = \"x [y] \\\"z\\\"\"\n{d2}"
                ));
            }
            s
        })
}

fn config() -> impl Strategy<Value = (String, Vec<String>)> {
    prop::collection::vec((name(), any::<bool>()), 1..5)
        .prop_flat_map(|names| {
            let mut parts: Vec<BoxedStrategy<String>> =
                vec![Just("[settings]\nbackend = \"auto\"\n\n".to_string()).boxed()];
            let mut seen = std::collections::BTreeSet::new();
            let mut plain = Vec::new();
            for (i, ((n, spelled), pinned)) in names.into_iter().enumerate() {
                if !seen.insert(n.clone()) {
                    continue;
                }
                let uuid = pinned.then(|| format!("6f1d3b2a-0000-4000-8000-{i:012}"));
                parts.push(section(spelled, uuid).boxed());
                parts.push(decoy().boxed());
                plain.push(n);
            }
            (parts, Just(plain))
        })
        .prop_map(|(parts, names)| {
            // every decoy's key made unique (they may land in one table)
            let text = parts.concat();
            let mut out = String::new();
            for (i, piece) in text.split("KEY = ").enumerate() {
                if i > 0 {
                    out.push_str(&format!("note{i} = "));
                }
                out.push_str(piece);
            }
            (out, names)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn a_domain_reads_the_same_from_its_sections_as_from_the_whole_file((text, names) in config()) {
        let file = Path::new("/etc/virtgate/virtgate.toml");
        prop_assert!(parse_only(file, &text, None).is_ok(), "the generator writes valid TOML:\n{text}");
        // valid TOML is always understood: another domain's sections are blanked
        if names.len() > 1 {
            let sliced = sections::only_domains(&text, |d, _| d == names[0]);
            prop_assert!(sliced.is_some(), "not understood:\n{}", text);
        }
        for (i, n) in names.iter().chain(std::iter::once(&"absent".to_string())).enumerate() {
            let uuid = format!("6f1d3b2a-0000-4000-8000-{i:012}");
            for only in [
                Only { name: n, uuid: None },
                Only { name: "by-uuid", uuid: Some(&uuid) },
            ] {
                let whole = format!("{:?}", parse_only(file, &text, Some(only)));
                let part = format!("{:?}", parse_for(file, &text, only));
                prop_assert_eq!(whole, part, "domain {:?} of\n{}", n, text);
            }
        }
    }
}

#[test]
fn a_pinned_uuid_is_found_in_any_case_and_an_escaped_one_is_kept() {
    let file = Path::new("/etc/virtgate/virtgate.toml");
    for text in [
        "[domain.other]\nforwards = [\"1:1\"]\n[domain.pinned]\nuuid = \"6F1D3B2A-0000-4000-8000-000000000001\"\nforwards = [\"8080:80\"]\n",
        "[domain.other]\nforwards = [\"1:1\"]\n[domain.pinned]\nuuid = \"\\u0036f1d3b2a-0000-4000-8000-000000000001\"\nforwards = [\"8080:80\"]\n",
    ] {
        let only = Only {
            name: "renamed",
            uuid: Some("6f1d3b2a-0000-4000-8000-000000000001"),
        };
        let part = parse_for(file, text, only).unwrap();
        assert_eq!(part.domains.len(), 1, "{text}");
        assert_eq!(
            format!("{:?}", parse_only(file, text, Some(only)).unwrap()),
            format!("{part:?}")
        );
    }
}
