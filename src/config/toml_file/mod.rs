//! The TOML config: `[domain.NAME]` tables with short-form `forwards = [...]` and long-form
//! `[[domain.NAME.forward]]` entries. Parsed with `toml_edit` because it keeps the byte span
//! of every key and value, so each error names file, line and column; each domain is
//! validated on its own, so one broken domain never hides another.

mod long_form;
#[cfg(test)]
mod tests;
mod values;

use std::path::Path;

use toml_edit::{Document, Item, Table};

use super::diag::{Diagnostic, Origin, Severity};
use super::short::parse_short;
use super::{BackendChoice, ConfiguredForward, ParsedFile};
use crate::model::{DomainConfig, ForwardSpec, WhenStopped};
pub use crate::model::{parse_cidr, validate_ifname};
pub use long_form::FORWARD_KEYS;
use long_form::parse_long;
pub use values::parse_nic;
use values::{parse_addresses, want_bool, want_str};

const DOMAIN_KEYS: &[&str] = &[
    "forwards",
    "forward",
    "uuid",
    "fail_closed",
    "when_stopped",
    "guest_address",
];

struct Ctx<'a> {
    file: &'a Path,
    text: &'a str,
    lines: super::diag::LineIndex,
}

impl Ctx<'_> {
    fn origin(&self, span: Option<std::ops::Range<usize>>) -> Origin {
        self.lines
            .origin(self.file, self.text, span.map(|s| s.start).unwrap_or(0))
    }
}

type DomainResult<T> = Result<T, (Origin, String)>;

/// Parses one TOML file. A syntax error makes the whole file an error (`Err`).
pub fn parse(file: &Path, text: &str) -> Result<ParsedFile, Diagnostic> {
    parse_only(file, text, None)
}

/// One libvirt domain, for a hook: only the config entries it answers to (its name, or
/// a pinned `uuid` equal to its UUID) are read in full; the others are skipped, their
/// errors too (`apply` and `check` report them).
#[derive(Debug, Clone, Copy)]
pub struct Only<'a> {
    pub name: &'a str,
    pub uuid: Option<&'a str>,
}

impl Only<'_> {
    fn wants(&self, name: &str, item: &Item) -> bool {
        name == self.name
            || self.uuid.is_some_and(|u| {
                item.as_table_like()
                    .and_then(|t| t.get("uuid"))
                    .and_then(|v| v.as_str())
                    .is_some_and(|v| v.eq_ignore_ascii_case(u))
            })
    }
}

/// [`parse_only`] for a hook: the other domains' sections are not even parsed (see
/// [`super::sections`]; line numbers stay), so a TOML syntax error in one of them goes
/// unnoticed here (`apply` and `check` report it).
pub fn parse_for(file: &Path, text: &str, only: Only) -> Result<ParsedFile, Diagnostic> {
    // a pinned uuid is compared as Only::wants does (any case); one spelled with escapes
    // cannot be seen in the text: such a section is kept
    let has_uuid = |section: &str, u: &str| {
        let (s, u) = (section.as_bytes(), u.as_bytes());
        let Some(&first) = u.first() else {
            return false;
        };
        // (the first byte first: a hook skips thousands of other domains' sections)
        let (lo, up) = (first.to_ascii_lowercase(), first.to_ascii_uppercase());
        s.windows(u.len())
            .any(|w| (w[0] == lo || w[0] == up) && w.eq_ignore_ascii_case(u))
    };
    let sliced = super::sections::only_domains(text, |d, section| {
        d == only.name
            || only.uuid.is_some_and(|u| {
                has_uuid(section, u) || section.contains("\\u") || section.contains("\\U")
            })
    });
    parse_only(file, sliced.as_deref().unwrap_or(text), Some(only))
}

/// [`parse`], limited to the domains `only` wants.
pub fn parse_only(file: &Path, text: &str, only: Option<Only>) -> Result<ParsedFile, Diagnostic> {
    let doc = Document::parse(text).map_err(|e| Diagnostic {
        origin: Origin::at(file, text, e.span().map(|s| s.start).unwrap_or(0)),
        severity: Severity::Error,
        domain: None,
        message: format!("TOML syntax: {}", e.message()),
    })?;
    let ctx = Ctx {
        file,
        text,
        lines: super::diag::LineIndex::new(text),
    };
    let mut out = ParsedFile::default();
    for (key, item) in doc.as_table().iter() {
        let key_span = doc.as_table().key(key).and_then(|k| k.span());
        match key {
            "domain" => match item.as_table() {
                Some(domains) => parse_domains(&ctx, domains, only, &mut out),
                None => out.diagnostics.push(Diagnostic {
                    origin: ctx.origin(item.span().or(key_span)),
                    severity: Severity::Error,
                    domain: None,
                    message: "'domain' must be a table of domains ([domain.NAME])".into(),
                }),
            },
            "settings" => parse_settings(&ctx, item, &mut out),
            other => out.diagnostics.push(Diagnostic {
                origin: ctx.origin(key_span),
                severity: Severity::Error,
                domain: None,
                message: format!("unknown key '{other}' (expected 'domain' or 'settings')"),
            }),
        }
    }
    // in file order, whichever table a key first appeared in
    out.diagnostics
        .sort_by_key(|d| (d.origin.line, d.origin.col));
    Ok(out)
}

fn parse_settings(ctx: &Ctx, item: &Item, out: &mut ParsedFile) {
    let Some(t) = item.as_table_like() else {
        out.diagnostics.push(err(
            ctx.origin(item.span()),
            None,
            "'settings' must be a table",
        ));
        return;
    };
    for (k, v) in t.iter() {
        let origin = ctx.origin(v.span());
        match k {
            "backend" => match v.as_str().and_then(BackendChoice::parse) {
                Some(b) => out.backend = Some(b),
                None => out.diagnostics.push(err(
                    origin,
                    None,
                    "settings.backend must be \"auto\", \"nftables\" or \"iptables\"",
                )),
            },
            other => out.diagnostics.push(err(
                origin,
                None,
                &format!("unknown key 'settings.{other}' (expected 'backend')"),
            )),
        }
    }
}

fn err(origin: Origin, domain: Option<&str>, msg: &str) -> Diagnostic {
    Diagnostic {
        origin,
        severity: Severity::Error,
        domain: domain.map(str::to_string),
        message: msg.to_string(),
    }
}

fn parse_domains(ctx: &Ctx, domains: &Table, only: Option<Only>, out: &mut ParsedFile) {
    out.domains.reserve(domains.len());
    for (name, item) in domains.iter() {
        if only.is_some_and(|o| !o.wants(name, item)) {
            continue;
        }
        let origin = ctx.origin(domains.key(name).and_then(|k| k.span()));
        if item
            .as_table_like()
            .and_then(|t| t.get("fail_closed"))
            .and_then(|v| v.as_bool())
            == Some(true)
        {
            out.fail_closed.push(name.to_string());
        }
        match parse_domain(ctx, name, item) {
            Ok(dc) => out.domains.push((dc, origin)),
            Err((o, msg)) => {
                out.diagnostics.push(err(o, Some(name), &msg));
                out.invalid_domains.push(name.to_string());
            }
        }
    }
}

fn parse_domain(
    ctx: &Ctx,
    name: &str,
    item: &Item,
) -> DomainResult<(DomainConfig, Vec<ConfiguredForward>)> {
    let here = ctx.origin(item.span());
    let t = item
        .as_table_like()
        .ok_or_else(|| (here.clone(), "a domain must be a table".to_string()))?;
    let mut dc = DomainConfig {
        name: name.to_string(),
        ..Default::default()
    };
    let mut forwards = Vec::new();
    let mut default_addresses = Vec::new();
    for (k, v) in t.iter() {
        let o = ctx.origin(v.span());
        match k {
            "uuid" => dc.uuid = Some(want_str(v, &o, "uuid")?.to_ascii_lowercase()),
            "fail_closed" => dc.fail_closed = want_bool(v, &o, "fail_closed")?,
            "when_stopped" => {
                dc.when_stopped = WhenStopped::parse(want_str(v, &o, "when_stopped")?)
                    .map_err(|e| (o.clone(), e))?
            }
            "guest_address" => default_addresses = parse_addresses(v, &o)?,
            "forwards" => {
                let arr = v
                    .as_array()
                    .ok_or_else(|| (o.clone(), "'forwards' must be an array of strings".into()))?;
                for s in arr.iter() {
                    let so = ctx.origin(s.span());
                    let text = s.as_str().ok_or_else(|| {
                        (so.clone(), "'forwards' entries must be strings".to_string())
                    })?;
                    let sf =
                        parse_short(text).map_err(|e| (so.clone(), format!("{text:?}: {e}")))?;
                    forwards.push(ConfiguredForward {
                        spec: ForwardSpec {
                            proto: sf.proto,
                            listen: sf.listen,
                            host_ports: sf.host_ports,
                            guest_ports: sf.guest_ports,
                            ..Default::default()
                        },
                        origin: so,
                    });
                }
            }
            "forward" => {
                let aot = v.as_array_of_tables().ok_or_else(|| {
                    (
                        o.clone(),
                        "'forward' must be written as [[domain.NAME.forward]]".into(),
                    )
                })?;
                for ft in aot.iter() {
                    forwards.extend(parse_long(ctx, ft)?);
                }
            }
            other => {
                return Err((
                    ctx.origin(t.key(other).and_then(|k| k.span()).or(v.span())),
                    format!(
                        "unknown key '{other}' (expected one of: {})",
                        DOMAIN_KEYS.join(", ")
                    ),
                ));
            }
        }
    }
    for f in &mut forwards {
        if f.spec.guest_addresses.is_empty() {
            f.spec.guest_addresses = default_addresses.clone();
        }
    }
    Ok((dc, forwards))
}
