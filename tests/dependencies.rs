//! The checks `cargo deny check licenses advisories` would make, without a tool to
//! install or a network to reach:
//! - every crate virtgate is built from (and tested with) has a licence compatible with
//!   virtgate's own (MIT OR Apache-2.0). The licences come from `cargo tree` (the crates'
//!   own manifests, as Cargo.lock pins them); an SPDX expression passes when the licences
//!   it requires can all be taken from the allow list;
//! - no locked version is one a RustSec advisory names (vulnerable, unsound or
//!   unmaintained), from the advisories vendored in tests/advisories (refreshed by
//!   `scripts/advisories-update`, which says the database's revision in SOURCE).

use std::path::Path;
use std::process::Command;

/// Permissive licences whose terms MIT OR Apache-2.0 code can meet by shipping notices
/// (the .deb's copyright file lists every crate in the binary with its licence).
const ALLOWED: &[&str] = &[
    "MIT",
    "Apache-2.0",
    "Apache-2.0 WITH LLVM-exception",
    "BSD-2-Clause",
    "BSD-3-Clause",
    "ISC",
    "Zlib",
    "Unicode-3.0",
    "Unicode-DFS-2016",
    "Unlicense",
    "0BSD",
    "CC0-1.0",
];

/// Whether an SPDX licence expression (`A OR B`, `A AND (B OR C)`, `A WITH E`, and the
/// old `A/B` for OR) can be satisfied with allowed licences only.
fn acceptable(expr: &str) -> Result<bool, String> {
    let spaced = expr
        .replace('(', " ( ")
        .replace(')', " ) ")
        .replace('/', " OR ");
    let tokens: Vec<&str> = spaced.split_whitespace().collect();
    let mut pos = 0;
    let ok = or_expr(&tokens, &mut pos)?;
    if pos != tokens.len() {
        return Err(format!("unexpected {:?} in {expr:?}", tokens[pos]));
    }
    Ok(ok)
}

fn or_expr(t: &[&str], pos: &mut usize) -> Result<bool, String> {
    let mut ok = and_expr(t, pos)?;
    while t.get(*pos) == Some(&"OR") {
        *pos += 1;
        ok |= and_expr(t, pos)?;
    }
    Ok(ok)
}

fn and_expr(t: &[&str], pos: &mut usize) -> Result<bool, String> {
    let mut ok = term(t, pos)?;
    while t.get(*pos) == Some(&"AND") {
        *pos += 1;
        ok &= term(t, pos)?;
    }
    Ok(ok)
}

fn term(t: &[&str], pos: &mut usize) -> Result<bool, String> {
    match t.get(*pos) {
        Some(&"(") => {
            *pos += 1;
            let ok = or_expr(t, pos)?;
            if t.get(*pos) != Some(&")") {
                return Err("unbalanced parenthesis".into());
            }
            *pos += 1;
            Ok(ok)
        }
        Some(id) if !matches!(*id, "AND" | "OR" | "WITH" | ")") => {
            *pos += 1;
            let mut name = id.to_string();
            if t.get(*pos) == Some(&"WITH") {
                let exception = t.get(*pos + 1).ok_or("WITH without an exception")?;
                name = format!("{name} WITH {exception}");
                *pos += 2;
            }
            Ok(ALLOWED.contains(&name.as_str()))
        }
        other => Err(format!("expected a licence, found {other:?}")),
    }
}

#[test]
fn the_expression_check_itself() {
    for ok in [
        "MIT",
        "MIT OR Apache-2.0",
        "MIT/Apache-2.0",
        "Apache-2.0 WITH LLVM-exception OR Apache-2.0 OR MIT",
        "(MIT OR Apache-2.0) AND Unicode-3.0",
        "MIT OR Apache-2.0 OR LGPL-2.1-or-later",
        "Unlicense OR MIT",
    ] {
        assert_eq!(acceptable(ok), Ok(true), "{ok}");
    }
    for bad in [
        "GPL-3.0-only",
        "MIT AND GPL-2.0-or-later",
        "(MIT OR Apache-2.0) AND AGPL-3.0",
        "LGPL-2.1-or-later",
        "GPL-2.0 WITH Classpath-exception-2.0",
    ] {
        assert_eq!(acceptable(bad), Ok(false), "{bad}");
    }
    assert!(acceptable("MIT OR").is_err());
    assert!(acceptable("(MIT").is_err());
}

/// `(name version, licence)` of every crate in the Linux build, tests and build scripts
/// included, from `cargo tree`.
fn locked_crates() -> Vec<(String, String)> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "tree",
            "--locked",
            "--edges",
            "normal,build,dev",
            "--prefix",
            "none",
            "--format",
            "{p}|{l}",
            "--target",
            "x86_64-unknown-linux-gnu",
            "--manifest-path",
            concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"),
        ])
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo tree: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let mut crates: Vec<(String, String)> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let l = l.trim_end_matches(" (*)");
            let (k, lic) = l.split_once('|').unwrap_or((l, ""));
            // "name v1.2.3" or "name v1.2.3 (/path)" for the root
            let k = k.split(" (").next().unwrap_or(k);
            (k.to_string(), lic.to_string())
        })
        .collect();
    crates.sort();
    crates.dedup();
    assert!(crates.len() > 50, "too few crates listed: {crates:?}");
    crates
}

#[test]
fn every_dependency_has_a_compatible_licence() {
    let crates = locked_crates();
    let mut problems = Vec::new();
    for (krate, licence) in &crates {
        match acceptable(licence) {
            Ok(true) => {}
            Ok(false) => problems.push(format!("{krate}: {licence:?} is not in the allow list")),
            Err(e) => problems.push(format!("{krate}: licence {licence:?}: {e}")),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // virtgate itself
    let own = crates
        .iter()
        .find(|(k, _)| k.starts_with("virtgate "))
        .expect("virtgate listed");
    assert_eq!(own.1, "MIT OR Apache-2.0");
}

/// One advisory's front matter: its id, what kind it is, and the versions it spares.
struct Advisory {
    id: String,
    kind: String,
    spared: Vec<semver::VersionReq>,
    withdrawn: bool,
}

fn parse_advisory(text: &str) -> Result<Advisory, String> {
    let body = text
        .strip_prefix("```toml")
        .and_then(|t| t.split_once("\n```"))
        .map(|(front, _)| front)
        .ok_or("no ```toml front matter")?;
    let doc: toml_edit::DocumentMut = body.parse().map_err(|e| format!("{e}"))?;
    let adv = doc.get("advisory").ok_or("no [advisory]")?;
    let id = adv
        .get("id")
        .and_then(|v| v.as_str())
        .ok_or("no id")?
        .to_string();
    let kind = adv
        .get("informational")
        .and_then(|v| v.as_str())
        .unwrap_or("vulnerability")
        .to_string();
    let mut spared = Vec::new();
    for key in ["patched", "unaffected"] {
        let Some(list) = doc.get("versions").and_then(|v| v.get(key)) else {
            continue;
        };
        for req in list.as_array().ok_or(format!("{key}: not a list"))? {
            let req = req.as_str().ok_or(format!("{key}: not a string"))?;
            spared.push(semver::VersionReq::parse(req).map_err(|e| format!("{req:?}: {e}"))?);
        }
    }
    Ok(Advisory {
        id,
        kind,
        spared,
        withdrawn: adv.get("withdrawn").is_some(),
    })
}

/// The advisories that name `version` of `name`, from a database laid out as advisory-db.
fn advisories_for(db: &Path, name: &str, version: &semver::Version) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(db.join("crates").join(name)) else {
        return Vec::new();
    };
    let mut hits = Vec::new();
    for entry in dir.flatten() {
        let path = entry.path();
        let text = std::fs::read_to_string(&path).expect("readable advisory");
        let adv = parse_advisory(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if !adv.withdrawn && !adv.spared.iter().any(|r| r.matches(version)) {
            hits.push(format!("{name} {version}: {} ({})", adv.id, adv.kind));
        }
    }
    hits
}

#[test]
fn the_advisory_check_itself() {
    let db = tempfile::tempdir().unwrap();
    let dir = db.path().join("crates/demo");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("RUSTSEC-0000-0001.md"),
        "```toml\n[advisory]\nid = \"RUSTSEC-0000-0001\"\npackage = \"demo\"\n\n[versions]\npatched = [\">= 1.2.0\", \"^0.9.3\"]\nunaffected = [\"< 0.5\"]\n```\n\n# demo\n",
    )
    .unwrap();
    let hit = |v: &str| {
        !advisories_for(db.path(), "demo", &semver::Version::parse(v).unwrap()).is_empty()
    };
    assert!(hit("1.1.0") && hit("0.9.2") && hit("0.5.0"));
    assert!(!hit("1.2.0") && !hit("0.9.3") && !hit("0.4.9") && !hit("2.0.0"));
    assert!(advisories_for(db.path(), "other", &semver::Version::new(1, 0, 0)).is_empty());
}

#[test]
fn no_locked_version_has_an_advisory() {
    let db = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/advisories");
    let source = std::fs::read_to_string(db.join("SOURCE")).expect("tests/advisories/SOURCE");
    let mut hits = Vec::new();
    for (krate, _) in locked_crates() {
        let (name, version) = krate.split_once(" v").expect("name vX.Y.Z");
        let version = semver::Version::parse(version).expect("a semver version");
        hits.extend(advisories_for(&db, name, &version));
    }
    assert!(
        hits.is_empty(),
        "advisories ({}):\n{}",
        source.lines().next().unwrap_or(""),
        hits.join("\n")
    );
}
