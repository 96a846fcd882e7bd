//! `[[domain.NAME.forward]]` tables: one forward per listen address.

use toml_edit::{Item, Table, Value};

use super::values::{
    parse_addresses, parse_nic, parse_port_value, str_or_array, want_bool, want_str,
};
use super::{Ctx, DomainResult};
use crate::config::ConfiguredForward;
use crate::config::diag::Origin;
use crate::config::short::{check_lengths, parse_listen, parse_rate_per};
use crate::model::{ForwardSpec, Listen, PortRange, Proto, RateLimit, RatePer, RateUnit};
pub use crate::model::{parse_cidr, validate_ifname};

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

/// A forward's rate limit from its `rate`, `burst` and `rate_per` (the last two only
/// with a rate).
pub(super) fn rate_limit(
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

pub(super) fn parse_long(ctx: &Ctx, t: &Table) -> DomainResult<Vec<ConfiguredForward>> {
    let mut long = LongForm::default();
    for (k, item) in t.iter() {
        let o = ctx.origin(item.span());
        let v = item
            .as_value()
            .ok_or_else(|| (o.clone(), format!("'{k}' must be a value, not a table")))?;
        if !long.key(k, item, v, &o)? {
            return Err((
                ctx.origin(t.key(k).and_then(|k| k.span()).or(item.span())),
                format!(
                    "unknown key '{k}' (expected one of: {})",
                    FORWARD_KEYS.join(", ")
                ),
            ));
        }
    }
    long.finish(ctx.origin(t.span()))
}

/// A long-form forward's keys as they are read.
#[derive(Default)]
pub(super) struct LongForm {
    pub(super) f: ForwardSpec,
    pub(super) host: Option<PortRange>,
    pub(super) guest: Option<(PortRange, Origin)>,
    pub(super) listens: Vec<Listen>,
    pub(super) interface: Option<String>,
    pub(super) rate: Option<(u32, RateUnit)>,
    pub(super) burst: Option<(u32, Origin)>,
    pub(super) rate_per: Option<(RatePer, Origin)>,
}

impl LongForm {
    /// Reads key `k` (false: no such key).
    pub(super) fn key(
        &mut self,
        k: &str,
        item: &Item,
        v: &Value,
        o: &Origin,
    ) -> DomainResult<bool> {
        let at = |e: String| (o.clone(), e);
        let f = &mut self.f;
        match k {
            "host_port" => self.host = Some(parse_port_value(v, o, k)?),
            "guest_port" => self.guest = Some((parse_port_value(v, o, k)?, o.clone())),
            "proto" => {
                let s = want_str(item, o, k)?;
                f.proto = Proto::parse(s).ok_or_else(|| {
                    at(format!(
                        "unknown protocol '{s}' (expected tcp, udp or sctp)"
                    ))
                })?;
            }
            "listen" => {
                for s in str_or_array(v, o, k)? {
                    self.listens.push(parse_listen(&s).map_err(at)?);
                }
            }
            "interface" => {
                let s = want_str(item, o, k)?;
                validate_ifname(s).map_err(at)?;
                self.interface = Some(s.to_string());
            }
            "source" => {
                for s in str_or_array(v, o, k)? {
                    f.sources.push(parse_cidr(&s).map_err(at)?);
                }
            }
            "nic" => f.nic = Some(parse_nic(want_str(item, o, k)?).map_err(at)?),
            "guest_address" => f.guest_addresses = parse_addresses(item, o)?,
            "localhost" => f.localhost = want_bool(item, o, k)?,
            "description" => f.description = Some(want_str(item, o, k)?.to_string()),
            "rate" => self.rate = Some(RateLimit::parse_rate(want_str(item, o, k)?).map_err(at)?),
            "burst" => {
                let n = v
                    .as_integer()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| at("'burst' must be a positive number".into()))?;
                self.burst = Some((n, o.clone()));
            }
            "rate_per" => {
                let per = parse_rate_per(v.as_str().unwrap_or("")).map_err(at)?;
                self.rate_per = Some((per, o.clone()));
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The forwards (one per listen address) of the table at `origin`.
    pub(super) fn finish(self, origin: Origin) -> DomainResult<Vec<ConfiguredForward>> {
        let LongForm {
            mut f,
            host,
            guest,
            mut listens,
            interface,
            rate,
            burst,
            rate_per,
        } = self;
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
        listens.extend(interface.map(Listen::Interface));
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
}
