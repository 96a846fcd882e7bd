//! The sets, maps and per-rule chains a layout declares, with their key types.

use std::net::IpAddr;

use ipnet::IpNet;

use super::{Field, ListenKind, SetDecl, dnat_map, range_map};
use crate::model::{Family, PortRange, RateLimit, RatePer};
use crate::rules::Rule;

/// How long a per-source meter keeps a client's bucket: long enough to refill its burst,
/// at least a minute.
pub fn meter_timeout(l: &RateLimit) -> u64 {
    let period = l.unit.seconds();
    (u64::from(l.burst) * period / u64::from(l.count) + period).max(60)
}

/// The rule that drops new connections over a rate (`fam`: `ip` or `ip6`).
pub(super) fn limit_rule(r: &Rule, l: &RateLimit, fam: &str) -> String {
    let rate = format!(
        "limit rate over {}/{} burst {} packets",
        l.count,
        l.unit.as_str(),
        l.burst
    );
    match l.per {
        RatePer::Forward => format!("{rate} counter drop"),
        RatePer::Source => format!("update @l_{} {{ {fam} saddr {rate} }} counter drop", r.id),
    }
}

pub(super) fn fam_suffix(f: Family) -> &'static str {
    match f {
        Family::Ipv4 => "4",
        Family::Ipv6 => "6",
    }
}

pub(super) fn addr_type(f: Family) -> &'static str {
    match f {
        Family::Ipv4 => "ipv4_addr",
        Family::Ipv6 => "ipv6_addr",
    }
}

pub(super) fn ip_field(ip: IpAddr) -> Field {
    match ip {
        IpAddr::V4(a) => Field::V4(a, a),
        IpAddr::V6(a) => Field::V6(a, a),
    }
}

pub(super) fn net_field(n: &IpNet) -> Field {
    match n {
        IpNet::V4(n) => Field::V4(n.network(), n.broadcast()),
        IpNet::V6(n) => Field::V6(n.network(), n.broadcast()),
    }
}

pub(super) fn port_field(p: &PortRange) -> Field {
    Field::Port(p.start, p.end)
}

/// Every set and map of the table, in declaration order.
pub fn declarations() -> Vec<SetDecl> {
    let mut v = Vec::new();
    for kind in ListenKind::ALL {
        for &f in kind.families() {
            v.push(SetDecl {
                name: dnat_map(kind, f),
                key_type: kind.key_type(f),
                data_type: Some(match f {
                    Family::Ipv4 => "ipv4_addr . inet_service",
                    Family::Ipv6 => "ipv6_addr . inet_service",
                }),
                interval: false,
                counter: false,
            });
            v.push(SetDecl {
                name: range_map(kind, f),
                key_type: kind.key_type(f),
                data_type: Some(addr_type(f)),
                interval: true,
                counter: false,
            });
        }
    }
    // verdict maps for forwards with a source allow-list, and for stopped domains'
    // refused ports
    for prefix in ["listen", "stopped"] {
        for (name, ty) in [
            ("addr4", "ipv4_addr . inet_proto . inet_service"),
            ("addr6", "ipv6_addr . inet_proto . inet_service"),
            ("if", "ifname . nf_proto . inet_proto . inet_service"),
            ("any", "nf_proto . inet_proto . inet_service"),
        ] {
            v.push(SetDecl {
                name: format!("{prefix}_{name}"),
                key_type: ty.into(),
                data_type: Some("verdict"),
                interval: true,
                counter: false,
            });
        }
    }
    for f in [Family::Ipv4, Family::Ipv6] {
        let s = fam_suffix(f);
        let target = format!("{} . inet_proto . inet_service", addr_type(f));
        v.push(SetDecl {
            name: format!("hairpin{s}"),
            key_type: format!("ifname . {}", addr_type(f)),
            data_type: None,
            interval: true,
            counter: false,
        });
        for (prefix, count) in [("targets", false), ("traffic", true), ("conns", true)] {
            v.push(SetDecl {
                name: format!("{prefix}{s}"),
                key_type: target.clone(),
                data_type: None,
                interval: false,
                counter: count,
            });
            v.push(SetDecl {
                name: format!("{prefix}_range{s}"),
                key_type: target.clone(),
                data_type: None,
                interval: true,
                counter: count,
            });
        }
    }
    for name in ["lo_targets4", "lo_targets_range4"] {
        v.push(SetDecl {
            name: name.into(),
            key_type: "ipv4_addr . inet_proto . inet_service".into(),
            data_type: None,
            interval: name.contains("range"),
            counter: false,
        });
    }
    v
}

/// Whether a rule needs its own chain (a source allow-list, a rate limit).
pub fn has_chain(r: &Rule) -> bool {
    !r.sources.is_empty() || r.rate.is_some()
}
