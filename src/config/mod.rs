//! Loading the config: the main file (TOML, or a libvirt-hook-qemu `hooks.json`) plus
//! `conf.d/*.toml` beside it, with per-domain error isolation.

pub mod diag;
pub mod hooks_json;
pub mod metadata;
pub mod sections;
pub mod short;
pub mod toml_file;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::Digest as _;

pub use diag::{Diagnostic, Origin, Severity};

use crate::model::{DomainConfig, ForwardSpec};

/// Largest config file read, in bytes.
pub const MAX_CONFIG_BYTES: u64 = 4 * 1024 * 1024;

/// Marks a conflict diagnostic (conflicts depend on which domains run, unlike other
/// errors).
pub const CONFLICT_MARK: &str = " conflicts with forward ";

/// The default main config file.
pub const DEFAULT_CONFIG: &str = "/etc/virtgate/virtgate.toml";

pub use crate::model::BackendChoice;

/// A running domain as far as merging its `<metadata>` needs it (the facts implement it:
/// config never reads libvirt's files).
pub trait CarriesMetadata {
    fn name(&self) -> &str;
    fn uuid(&self) -> Option<&str>;
    /// virtgate's element of the domain's `<metadata>`, as XML that parses on its own.
    fn metadata_xml(&self) -> Option<&str>;
}

/// A forward with the position it was written at.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ConfiguredForward {
    pub spec: ForwardSpec,
    pub origin: Origin,
}

/// What one file yielded.
#[derive(Debug, Default)]
pub struct ParsedFile {
    pub domains: Vec<((DomainConfig, Vec<ConfiguredForward>), Origin)>,
    pub invalid_domains: Vec<String>,
    /// Domains that ask for `fail_closed`, valid or not.
    pub fail_closed: Vec<String>,
    pub diagnostics: Vec<Diagnostic>,
    pub backend: Option<BackendChoice>,
}

/// One configured domain with its forwards and their positions.
#[derive(Debug, Clone)]
pub struct ConfiguredDomain {
    pub domain: DomainConfig,
    pub origins: Vec<Origin>,
    pub origin: Origin,
}

/// The whole config.
#[derive(Debug, Default, Clone)]
pub struct Config {
    pub domains: BTreeMap<String, ConfiguredDomain>,
    /// Domains with an error: they are skipped, and whatever virtgate installed for them
    /// before is kept unchanged.
    pub invalid_domains: BTreeSet<String>,
    /// Domains that ask for `fail_closed` (also when their entry is invalid).
    pub fail_closed: BTreeSet<String>,
    pub diagnostics: Vec<Diagnostic>,
    pub backend: Option<BackendChoice>,
    pub files: Vec<PathBuf>,
    /// SHA-256 of the files read (names and contents, in order), for `reconcile` to tell
    /// an unchanged config without comparing what was parsed; empty when only part of a
    /// file was read.
    pub fingerprint: Vec<u8>,
}

/// A config that cannot be used at all: nothing is changed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: larger than {MAX_CONFIG_BYTES} bytes, refused")]
    TooLarge { path: PathBuf },
    #[error(
        "{path}: writable by a user other than root (mode {mode:o}, owner uid {uid}); refused, fix with: chown root: {path} && chmod go-w {path}"
    )]
    Insecure { path: PathBuf, mode: u32, uid: u32 },
    #[error("{0}")]
    Syntax(Diagnostic),
}

impl Config {
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
    }

    /// This config plus the forwards that running domains carry in their `<metadata>`
    /// (a domain in the config file wins over its metadata).
    pub fn with_metadata<D: CarriesMetadata>(&self, domains: &[D]) -> std::borrow::Cow<'_, Config> {
        if domains.iter().all(|d| d.metadata_xml().is_none()) {
            return std::borrow::Cow::Borrowed(self);
        }
        let mut cfg = Config {
            domains: self.domains.clone(),
            invalid_domains: self.invalid_domains.clone(),
            fail_closed: self.fail_closed.clone(),
            diagnostics: self.diagnostics.clone(),
            backend: self.backend,
            files: self.files.clone(),
            fingerprint: self.fingerprint.clone(),
        };
        let mut added = false;
        for d in domains {
            let Some(md) = d.metadata_xml().and_then(metadata::from_xml) else {
                continue;
            };
            let (name, uuid) = (d.name(), d.uuid());
            let origin = Origin {
                file: PathBuf::from(format!("<metadata of domain {name:?}>")),
                line: 1,
                col: 1,
            };
            if let Some(c) = cfg.domains.get(name) {
                cfg.diagnostics.push(Diagnostic {
                    origin,
                    severity: Severity::Warning,
                    domain: Some(name.to_string()),
                    message: format!(
                        "forwards in <metadata> ignored: the domain is configured at {}",
                        c.origin
                    ),
                });
                continue;
            }
            if cfg.invalid_domains.contains(name) {
                continue;
            }
            if md.fail_closed {
                cfg.fail_closed.insert(name.to_string());
            }
            match &md.forwards {
                Ok(forwards) => {
                    added = true;
                    cfg.domains.insert(
                        name.to_string(),
                        ConfiguredDomain {
                            domain: DomainConfig {
                                name: name.to_string(),
                                uuid: uuid.map(str::to_string),
                                forwards: forwards.clone(),
                                fail_closed: md.fail_closed,
                                // metadata is read from running domains only
                                when_stopped: Default::default(),
                            },
                            origins: vec![origin.clone(); forwards.len()],
                            origin,
                        },
                    );
                }
                Err(e) => {
                    cfg.invalid_domains.insert(name.to_string());
                    cfg.diagnostics.push(Diagnostic {
                        origin,
                        severity: Severity::Error,
                        domain: Some(name.to_string()),
                        message: e.clone(),
                    });
                }
            }
        }
        if added {
            cfg.diagnostics
                .retain(|d| !d.message.contains(" conflicts with forward "));
            add_conflicts(&mut cfg);
        }
        std::borrow::Cow::Owned(cfg)
    }

    /// The domains as the planner wants them.
    pub fn domain_configs(&self) -> Vec<DomainConfig> {
        self.domains.values().map(|d| d.domain.clone()).collect()
    }
}

fn read_checked(path: &Path) -> Result<String, ConfigError> {
    let read_err = |source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    };
    // the checks are of the file opened, which is the one read
    let (f, meta) =
        crate::files::open_regular(path, crate::files::Follow::Yes).map_err(read_err)?;
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(ConfigError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.mode() & 0o022 != 0 || (meta.uid() != 0 && meta.uid() != euid) {
        return Err(ConfigError::Insecure {
            path: path.to_path_buf(),
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
        });
    }
    let bytes = crate::files::read_open(f, MAX_CONFIG_BYTES).map_err(read_err)?;
    String::from_utf8(bytes).map_err(|_| {
        read_err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not UTF-8",
        ))
    })
}

/// Parses one file by its kind (`.json` = hooks.json, anything else = TOML).
pub fn parse_file(path: &Path, text: &str) -> Result<ParsedFile, Diagnostic> {
    if path.extension().is_some_and(|e| e == "json") {
        hooks_json::parse(path, text)
    } else {
        toml_file::parse(path, text)
    }
}

/// Loads the main file and `conf.d/*.toml` next to it (sorted by name). A missing main
/// file is an empty config. A file that cannot be read or parsed at all fails the load.
pub fn load(main: &Path) -> Result<Config, ConfigError> {
    let mut cfg = load_unchecked(main)?;
    add_conflicts(&mut cfg);
    Ok(cfg)
}

/// [`load`] without the conflict diagnostics: for the hook, which checks its own domain
/// against what is installed and ignores config-wide conflicts anyway.
pub fn load_unchecked(main: &Path) -> Result<Config, ConfigError> {
    load_only(main, None)
}

/// [`load_unchecked`], reading only the entries one libvirt domain answers to in full.
pub fn load_only(main: &Path, only: Option<toml_file::Only>) -> Result<Config, ConfigError> {
    load_files(main, only, None)
}

/// [`load`] as it would be with `main_text` in the main file (what `add` and `remove`
/// check before they write it).
pub fn load_edited(main: &Path, main_text: &str) -> Result<Config, ConfigError> {
    let mut cfg = load_files(main, None, Some(main_text))?;
    add_conflicts(&mut cfg);
    Ok(cfg)
}

fn load_files(
    main: &Path,
    only: Option<toml_file::Only>,
    main_text: Option<&str>,
) -> Result<Config, ConfigError> {
    let mut files = Vec::new();
    if main.exists() || main_text.is_some() {
        files.push(main.to_path_buf());
    }
    if let Some(dir) = main.parent().map(|p| p.join("conf.d"))
        && let Ok(rd) = fs::read_dir(&dir)
    {
        let mut extra: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        extra.sort();
        files.extend(extra);
    }
    let mut parsed = Vec::new();
    let mut digest = sha2::Sha256::new();
    for f in &files {
        let text = match main_text {
            Some(t) if f == main => t.to_string(),
            _ => read_checked(f)?,
        };
        // what a whole reconcile compares (a load of some entries only is never compared)
        if only.is_none() {
            let name = f.as_os_str().as_encoded_bytes();
            for part in [name, text.as_bytes()] {
                digest.update((part.len() as u64).to_le_bytes());
                digest.update(part);
            }
        }
        let p = match only {
            Some(o) if f.extension().is_some_and(|e| e == "toml") => {
                toml_file::parse_for(f, &text, o)
            }
            _ => parse_file(f, &text),
        };
        parsed.push(p.map_err(ConfigError::Syntax)?);
    }
    let mut cfg = merge_unchecked(parsed);
    cfg.files = files;
    if only.is_none() {
        cfg.fingerprint = digest.finalize().to_vec();
    }
    Ok(cfg)
}

/// Merges parsed files: the first definition of a domain wins, later ones are errors;
/// conflicting forwards are errors too.
pub fn merge(parsed: Vec<ParsedFile>) -> Config {
    let mut cfg = merge_unchecked(parsed);
    add_conflicts(&mut cfg);
    cfg
}

fn merge_unchecked(parsed: Vec<ParsedFile>) -> Config {
    let mut cfg = Config::default();
    for p in parsed {
        cfg.diagnostics.extend(p.diagnostics);
        cfg.invalid_domains.extend(p.invalid_domains);
        cfg.fail_closed.extend(p.fail_closed);
        if p.backend.is_some() {
            cfg.backend = p.backend;
        }
        for ((mut dc, forwards), origin) in p.domains {
            if let Some(prev) = cfg.domains.get(&dc.name) {
                cfg.diagnostics.push(Diagnostic {
                    origin,
                    severity: Severity::Error,
                    domain: Some(dc.name.clone()),
                    message: format!("domain defined again (first at {}); ignored", prev.origin),
                });
                continue;
            }
            dc.forwards = forwards.iter().map(|f| f.spec.clone()).collect();
            let origins = forwards.into_iter().map(|f| f.origin).collect();
            cfg.domains.insert(
                dc.name.clone(),
                ConfiguredDomain {
                    domain: dc,
                    origins,
                    origin,
                },
            );
        }
    }
    // a domain that failed in one file must not be half-applied from another
    for d in &cfg.invalid_domains {
        cfg.domains.remove(d);
    }
    cfg
}

/// Conflicting forwards (same listen, protocol and overlapping ports) are errors.
fn add_conflicts(cfg: &mut Config) {
    let domains: Vec<DomainConfig> = cfg.domain_configs();
    for c in crate::model::conflicts::find_conflicts(&domains) {
        let d = &cfg.domains[&domains[c.second.0].name];
        let first = &cfg.domains[&domains[c.first.0].name];
        let f1 = &first.domain.forwards[c.first.1];
        let f2 = &d.domain.forwards[c.second.1];
        cfg.diagnostics.push(Diagnostic {
            origin: d.origins[c.second.1].clone(),
            severity: Severity::Error,
            domain: Some(d.domain.name.clone()),
            message: format!(
                "forward {}{CONFLICT_MARK}{} of domain {:?} at {}; the one whose domain runs first gets the port",
                f2.short(),
                f1.short(),
                first.domain.name,
                first.origins[c.first.1]
            ),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_toml(text: &str) -> Config {
        merge(vec![toml_file::parse(Path::new("v.toml"), text).unwrap()])
    }

    #[test]
    fn issue_example() {
        let c = parse_toml(
            r#"
[domain.web]
forwards = ["8080:80", "5353:53535/udp", "9000-9002:9100-9102/tcp"]
[[domain.api.forward]]
host_port = 8081
guest_port = 80
proto = "tcp"
source = ["203.0.113.0/24", "2001:db8::/32"]
description = "internal API"
"#,
        );
        assert_eq!(c.errors().count(), 0, "{:?}", c.diagnostics);
        assert_eq!(c.domains["web"].domain.forwards.len(), 3);
        let api = &c.domains["api"].domain.forwards[0];
        assert_eq!(api.sources.len(), 2);
        assert_eq!(api.description.as_deref(), Some("internal API"));
    }

    #[test]
    fn errors_name_line_and_column_and_skip_only_that_domain() {
        let c = parse_toml(
            "[domain.good]\nforwards = [\"8080:80\"]\n[domain.bad]\nforwards = [\"8081:80\", \"0:80\"]\n",
        );
        assert!(c.domains.contains_key("good"));
        assert!(c.invalid_domains.contains("bad"));
        let e = c.errors().next().unwrap();
        assert_eq!((e.origin.line, e.origin.col), (4, 24), "{e}");
        assert!(
            e.to_string()
                .starts_with("v.toml:4:24: error: domain \"bad\": \"0:80\": port 0")
        );
    }

    #[test]
    fn long_form_errors() {
        for (body, want) in [
            ("host_port = 65536", "out of range"),
            ("host_port = \"90-80\"", "reversed"),
            ("host_port = \"90-92\"\nguest_port = 80", "differ in length"),
            (
                "host_port = 80\nsource = \"10.0.0.0/33\"",
                "not an address or CIDR",
            ),
            ("host_port = 80\nbogus = 1", "unknown key 'bogus'"),
            ("guest_port = 80", "missing 'host_port'"),
            ("host_port = 80\nnic = \"\"", "neither a MAC"),
        ] {
            let c = parse_toml(&format!("[[domain.x.forward]]\n{body}\n"));
            let e = c
                .errors()
                .next()
                .unwrap_or_else(|| panic!("no error for {body}"));
            assert!(e.message.contains(want), "{body}: {e}");
            assert!(e.origin.line >= 1);
        }
    }

    #[test]
    fn conflicts_are_reported() {
        let c = parse_toml(
            "[domain.a]\nforwards = [\"8080:80\"]\n[domain.b]\nforwards = [\"8079-8081:80-82\", \"8080:80/udp\"]\n",
        );
        let e: Vec<_> = c.errors().collect();
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].message
                .contains("conflicts with forward 8080:80/tcp of domain \"a\"")
        );
        assert_eq!(e[0].origin.line, 4);
    }

    #[test]
    fn syntax_error_is_fatal() {
        let e = toml_file::parse(Path::new("v.toml"), "[domain.x\n").unwrap_err();
        assert_eq!(e.origin.line, 1);
    }
}
