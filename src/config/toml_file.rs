//! The TOML config: `[domain.NAME]` tables with short-form `forwards = [...]` and long-form
//! `[[domain.NAME.forward]]` entries. Parsed with `toml_edit` because it keeps the byte span
//! of every key and value, so each error names file, line and column; each domain is
//! validated on its own, so one broken domain never hides another.

use std::net::IpAddr;
use std::path::Path;

use toml_edit::{Document, Item, Table, Value};

use super::diag::{Diagnostic, Origin, Severity};
use super::short::{check_lengths, listen_from_ip, parse_short};
use super::{BackendChoice, ConfiguredForward, ParsedFile};
use crate::model::{
    DomainConfig, ForwardSpec, Listen, NicSelector, PortRange, Proto, RateLimit, RatePer, RateUnit,
    WhenStopped,
};
pub use crate::model::{parse_cidr, validate_ifname};

const DOMAIN_KEYS: &[&str] = &[
    "forwards",
    "forward",
    "uuid",
    "fail_closed",
    "when_stopped",
    "guest_address",
];
/// The keys of a long-form forward (also the attributes of `<forward>` in metadata).
pub const FORWARD_KEYS: &[&str] = &[
    "host_port",
    "guest_port",
    "proto",
    "listen",
    "interface",
    "source",
    "nic",
    "guest_address",
    "localhost",
    "description",
    "rate",
    "burst",
    "rate_per",
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
        !u.is_empty() && s.windows(u.len()).any(|w| w.eq_ignore_ascii_case(u))
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

/// `rate_per`'s value.
pub fn parse_rate_per(s: &str) -> Result<RatePer, String> {
    match s {
        "source" => Ok(RatePer::Source),
        "forward" => Ok(RatePer::Forward),
        o => Err(format!(
            "rate_per must be \"source\" or \"forward\", not {o:?}"
        )),
    }
}

/// A forward's rate limit from its `rate`, `burst` and `rate_per` (the last two only
/// with a rate).
fn rate_limit(
    rate: Option<(u32, RateUnit)>,
    burst: Option<(u32, Origin)>,
    per: Option<(RatePer, Origin)>,
    origin: &Origin,
) -> DomainResult<Option<RateLimit>> {
    let Some((count, unit)) = rate else {
        if let Some(o) = burst.map(|b| b.1).or(per.map(|p| p.1)) {
            return Err((o, "'burst' and 'rate_per' need a 'rate'".into()));
        }
        return Ok(None);
    };
    let (b, bo) = burst.unwrap_or((RateLimit::DEFAULT_BURST, origin.clone()));
    let per = per.map(|p| p.0).unwrap_or(RatePer::Source);
    RateLimit::new(count, unit, b, per)
        .map(Some)
        .map_err(|e| (bo, e))
}

fn parse_long(ctx: &Ctx, t: &Table) -> DomainResult<Vec<ConfiguredForward>> {
    let origin = ctx.origin(t.span());
    let mut f = ForwardSpec::default();
    let mut host: Option<PortRange> = None;
    let mut guest: Option<(PortRange, Origin)> = None;
    let mut listens: Vec<Listen> = Vec::new();
    let mut interface: Option<String> = None;
    let (mut rate, mut burst, mut rate_per) = (None, None, None);
    for (k, item) in t.iter() {
        let o = ctx.origin(item.span());
        let v = item
            .as_value()
            .ok_or_else(|| (o.clone(), format!("'{k}' must be a value, not a table")))?;
        match k {
            "host_port" => host = Some(parse_port_value(v, &o, k)?),
            "guest_port" => guest = Some((parse_port_value(v, &o, k)?, o.clone())),
            "proto" => {
                let s = v
                    .as_str()
                    .ok_or_else(|| (o.clone(), "'proto' must be a string".to_string()))?;
                f.proto = Proto::parse(s).ok_or_else(|| {
                    (
                        o.clone(),
                        format!("unknown protocol '{s}' (expected tcp, udp or sctp)"),
                    )
                })?;
            }
            "listen" => {
                for s in str_or_array(v, &o, k)? {
                    if s == "default-route" {
                        listens.push(Listen::DefaultRoute);
                        continue;
                    }
                    let ip: IpAddr = s
                        .trim_matches(|c| c == '[' || c == ']')
                        .parse()
                        .map_err(|_| (o.clone(), format!("listen: '{s}' is not an IP address")))?;
                    listens.push(listen_from_ip(ip).map_err(|e| (o.clone(), e))?);
                }
            }
            "interface" => {
                let s = v
                    .as_str()
                    .ok_or_else(|| (o.clone(), "'interface' must be a string".to_string()))?;
                validate_ifname(s).map_err(|e| (o.clone(), e))?;
                interface = Some(s.to_string());
            }
            "source" => {
                for s in str_or_array(v, &o, k)? {
                    f.sources.push(parse_cidr(&s).map_err(|e| (o.clone(), e))?);
                }
            }
            "nic" => {
                let s = v
                    .as_str()
                    .ok_or_else(|| (o.clone(), "'nic' must be a string".to_string()))?;
                f.nic = Some(parse_nic(s).map_err(|e| (o.clone(), e))?);
            }
            "guest_address" => f.guest_addresses = parse_addresses(item, &o)?,
            "localhost" => f.localhost = want_bool(item, &o, k)?,
            "description" => {
                let s = v
                    .as_str()
                    .ok_or_else(|| (o.clone(), "'description' must be a string".to_string()))?;
                f.description = Some(s.to_string());
            }
            "rate" => {
                let s = v
                    .as_str()
                    .ok_or_else(|| (o.clone(), "'rate' must be a string".to_string()))?;
                rate = Some(RateLimit::parse_rate(s).map_err(|e| (o.clone(), e))?);
            }
            "burst" => {
                let n = v
                    .as_integer()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| (o.clone(), "'burst' must be a positive number".to_string()))?;
                burst = Some((n, o.clone()));
            }
            "rate_per" => {
                rate_per = Some((
                    parse_rate_per(v.as_str().unwrap_or("")).map_err(|e| (o.clone(), e))?,
                    o.clone(),
                ));
            }
            other => {
                return Err((
                    ctx.origin(t.key(other).and_then(|k| k.span()).or(item.span())),
                    format!(
                        "unknown key '{other}' (expected one of: {})",
                        FORWARD_KEYS.join(", ")
                    ),
                ));
            }
        }
    }
    let host = host.ok_or_else(|| (origin.clone(), "missing 'host_port'".to_string()))?;
    f.rate = rate_limit(rate, burst, rate_per, &origin)?;
    let (guest, go) = guest.unwrap_or((host, origin.clone()));
    check_lengths(host, guest).map_err(|e| (go, e))?;
    f.host_ports = host;
    f.guest_ports = guest;
    if interface.is_some() && !listens.is_empty() {
        return Err((
            origin,
            "give either 'listen' or 'interface', not both".into(),
        ));
    }
    if let Some(i) = interface {
        listens.push(Listen::Interface(i));
    }
    if listens.is_empty() {
        listens.push(Listen::Any);
    }
    Ok(listens
        .into_iter()
        .map(|l| ConfiguredForward {
            spec: ForwardSpec {
                listen: l,
                ..f.clone()
            },
            origin: origin.clone(),
        })
        .collect())
}

/// Interface names as the kernel accepts them: 1-15 bytes, no '/', whitespace or quotes.
/// Interface names as they may appear in a rule: 1-15 bytes of letters, digits and
/// `-_.@:` (no quotes, spaces or the `+`/`*` wildcards iptables and nft read differently).
pub fn parse_nic(s: &str) -> Result<NicSelector, String> {
    let is_mac = s.len() == 17
        && s.split(':').count() == 6
        && s.split(':')
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()));
    if is_mac {
        return Ok(NicSelector::Mac(s.to_ascii_lowercase()));
    }
    if s.is_empty() || s.chars().any(|c| c.is_control()) {
        return Err(format!(
            "nic '{s}' is neither a MAC address nor a network name"
        ));
    }
    Ok(NicSelector::Network(s.to_string()))
}

fn want_str<'a>(item: &'a Item, o: &Origin, k: &str) -> DomainResult<&'a str> {
    item.as_str()
        .ok_or_else(|| (o.clone(), format!("'{k}' must be a string")))
}

fn want_bool(item: &Item, o: &Origin, k: &str) -> DomainResult<bool> {
    item.as_bool()
        .ok_or_else(|| (o.clone(), format!("'{k}' must be true or false")))
}

fn str_or_array(v: &Value, o: &Origin, k: &str) -> DomainResult<Vec<String>> {
    if let Some(s) = v.as_str() {
        return Ok(vec![s.to_string()]);
    }
    let arr = v.as_array().ok_or_else(|| {
        (
            o.clone(),
            format!("'{k}' must be a string or an array of strings"),
        )
    })?;
    arr.iter()
        .map(|x| {
            x.as_str()
                .map(str::to_string)
                .ok_or_else(|| (o.clone(), format!("'{k}' entries must be strings")))
        })
        .collect()
}

fn parse_addresses(item: &Item, o: &Origin) -> DomainResult<Vec<IpAddr>> {
    let v = item.as_value().ok_or_else(|| {
        (
            o.clone(),
            "'guest_address' must be a string or array".to_string(),
        )
    })?;
    let list = str_or_array(v, o, "guest_address")?;
    let mut out: Vec<IpAddr> = Vec::new();
    for s in list {
        let ip: IpAddr = s.parse().map_err(|_| {
            (
                o.clone(),
                format!("guest_address: '{s}' is not an IP address"),
            )
        })?;
        if out.iter().any(|x| x.is_ipv4() == ip.is_ipv4()) {
            return Err((
                o.clone(),
                "guest_address: at most one address per family".into(),
            ));
        }
        out.push(ip);
    }
    Ok(out)
}

fn parse_port_value(v: &Value, o: &Origin, k: &str) -> DomainResult<PortRange> {
    if let Some(n) = v.as_integer() {
        if !(1..=65535).contains(&n) {
            return Err((o.clone(), format!("{k}: port {n} is out of range 1-65535")));
        }
        return PortRange::single(n as u16).map_err(|e| (o.clone(), e));
    }
    if let Some(s) = v.as_str() {
        return PortRange::parse(s).map_err(|e| (o.clone(), format!("{k}: {e}")));
    }
    Err((
        o.clone(),
        format!("'{k}' must be a port number or a \"START-END\" string"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn when_stopped_is_read_and_a_bad_value_is_named_where_it_is() {
        let p = Path::new("v.toml");
        let ok = parse(
            p,
            "[domain.a]\nwhen_stopped = \"reject\"\nforwards = [\"80\"]\n",
        )
        .unwrap();
        assert_eq!(ok.domains[0].0.0.when_stopped, WhenStopped::Reject);
        let dflt = parse(p, "[domain.a]\nforwards = [\"80\"]\n").unwrap();
        assert_eq!(dflt.domains[0].0.0.when_stopped, WhenStopped::Pass);
        let bad = parse(
            p,
            "[domain.a]\nforwards = [\"80\"]\nwhen_stopped = \"drop\"\n",
        )
        .unwrap();
        assert!(bad.domains.is_empty() && bad.invalid_domains == ["a"]);
        let msg = bad.diagnostics[0].to_string();
        assert!(
            msg.contains("v.toml:3") && msg.contains("\"pass\" or \"reject\""),
            "{msg}"
        );
    }
}
