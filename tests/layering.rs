//! The tree's imports run one way (ARCHITECTURE.md): value types at the bottom, then
//! config and facts (which never import each other), the planner, the state and the
//! backends (which never read config or facts), reconcile, and the entry points on top.
//! Read from the source: every `crate::MODULE` a module's code (not its comments or
//! tests) names must be allowed here, and the graph has no circle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// What each top-level module may use.
const ALLOWED: &[(&str, &[&str])] = &[
    ("model", &[]),
    ("files", &[]),
    ("exec", &[]),
    ("logging", &[]),
    ("heap", &[]),
    ("rtnl", &[]),
    ("rules", &["model"]),
    ("config", &["model", "files"]),
    ("facts", &["model", "files", "exec", "rtnl"]),
    ("plan", &["model", "rules", "facts"]),
    ("state", &["model", "rules", "files"]),
    ("firewall", &["model", "rules", "exec", "files"]),
    ("bridge", &["model", "files", "exec", "rtnl"]),
    (
        "reconcile",
        &[
            "model", "rules", "config", "facts", "plan", "state", "firewall", "bridge", "files",
            "exec",
        ],
    ),
    (
        "fuzz",
        &["model", "config", "facts", "state", "rules", "files"],
    ),
    (
        "daemon",
        &[
            "model",
            "config",
            "facts",
            "plan",
            "state",
            "reconcile",
            "files",
            "exec",
            "firewall",
        ],
    ),
    (
        "hook",
        &[
            "model",
            "rules",
            "config",
            "facts",
            "plan",
            "state",
            "reconcile",
            "files",
            "exec",
            "logging",
        ],
    ),
];

/// Top-level module -> the modules its code names.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let rel = p.strip_prefix(&src).unwrap().to_string_lossy().to_string();
            if !rel.ends_with(".rs") || rel.ends_with("tests.rs") {
                continue;
            }
            let top = rel
                .split('/')
                .next()
                .unwrap()
                .trim_end_matches(".rs")
                .to_string();
            let text = std::fs::read_to_string(&p).unwrap();
            // code only: up to an inline test module, without comment lines
            let code = text.split("#[cfg(test)]\nmod tests {").next().unwrap();
            let uses = out.entry(top.clone()).or_default();
            for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
                for (i, _) in line.match_indices("crate::") {
                    let name: String = line[i + 7..]
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if name != top && !name.is_empty() {
                        uses.insert(name);
                    }
                }
            }
        }
    }
    out
}

#[test]
fn every_import_runs_the_allowed_way() {
    let allowed: BTreeMap<&str, BTreeSet<&str>> = ALLOWED
        .iter()
        .map(|(m, a)| (*m, a.iter().copied().collect()))
        .collect();
    let mut wrong = Vec::new();
    for (m, uses) in imports() {
        // the entry points' dispatcher and the binary use everything
        if m == "cli" || m == "main" || m == "lib" {
            continue;
        }
        let Some(ok) = allowed.get(m.as_str()) else {
            wrong.push(format!("module {m} is not in ALLOWED: say what it may use"));
            continue;
        };
        for u in uses {
            if !ok.contains(u.as_str()) {
                wrong.push(format!("{m} uses {u}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layering:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_module_graph_has_no_circle() {
    let g = imports();
    // depth-first search for a back edge
    fn visit<'a>(
        g: &'a BTreeMap<String, BTreeSet<String>>,
        n: &'a str,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| *p == n) {
            return Some(path[i..].iter().map(|s| s.to_string()).collect());
        }
        if !done.insert(n) {
            return None;
        }
        path.push(n);
        for m in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(g, m, path, done) {
                return Some(c);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    for n in g.keys() {
        if let Some(c) = visit(&g, n, &mut Vec::new(), &mut done) {
            panic!("import circle: {}", c.join(" -> "));
        }
    }
}

/// Every `.rs` file under `dir`, with its path relative to the crate.
fn rust_files(dir: &str) -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    let mut stack = vec![root.join(dir)];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().to_string();
                out.push((rel, std::fs::read_to_string(&p).unwrap()));
            }
        }
    }
    out
}

/// Functions (name, first line, lines) as rustfmt lays them out: from the `fn` line to
/// the closing brace at its indentation.
fn functions(text: &str) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let t = l.trim_start();
        let indent = &l[..l.len() - t.len()];
        let mut rest = t;
        for p in [
            "pub(crate) ",
            "pub(super) ",
            "pub ",
            "const ",
            "async ",
            "unsafe ",
            "extern \"C\" ",
        ] {
            rest = rest.strip_prefix(p).unwrap_or(rest);
        }
        let Some(sig) = rest.strip_prefix("fn ") else {
            continue;
        };
        if l.trim_end().ends_with(';') {
            continue;
        }
        let name: String = sig
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let close = format!("{indent}}}");
        if let Some(j) = lines[i + 1..].iter().position(|x| *x == close) {
            out.push((name, i + 1, j + 2));
        }
    }
    out
}

#[test]
fn no_source_file_over_500_lines_nor_function_over_80() {
    let mut wrong = Vec::new();
    for dir in ["src", "benches", "fuzz"] {
        if !Path::new(env!("CARGO_MANIFEST_DIR")).join(dir).is_dir() {
            continue;
        }
        for (path, text) in rust_files(dir) {
            let n = text.lines().count();
            if n > 520 {
                wrong.push(format!("{path}: {n} lines"));
            }
            for (name, at, len) in functions(&text) {
                if len > 85 {
                    wrong.push(format!("{path}:{at}: fn {name} has {len} lines"));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "too long:\n{}", wrong.join("\n"));
}
