//! Other tables' verdicts on a forward's flow: what `diagnose` reads from the JSON of
//! `nft -j list ruleset` to name a foreign rule that drops the flow before (or after)
//! virtgate's accept, such as Docker's `FORWARD` policy drop, a firewalld zone's final
//! reject, or another table's drop in a forward hook.
//!
//! The flow is walked through every `forward` base chain of its family, as the kernel
//! does (a drop in any of them is final, an accept ends only its own chain). A match is
//! judged true, false or unknown (a client address or port, a named set, an xtables
//! match): a drop behind an unknown match is reported as one that may drop, not as one
//! that does. virtgate's own table and libvirt's are left out (`diagnose` checks them
//! against the plan), and a jump to a `VIRTGATE` chain is virtgate's accept.

use std::collections::HashMap;
use std::net::IpAddr;

use serde_json::Value;

use crate::model::{Family, Proto};

/// One direction of a forward's flow, as the forward hook sees it (after DNAT).
#[derive(Debug, Clone)]
pub struct Flow<'a> {
    pub proto: Proto,
    pub guest: IpAddr,
    pub guest_port: u16,
    pub bridge: &'a str,
    /// The guest's replies (from the bridge), not the client's packets.
    pub reply: bool,
}

/// A rule (or a policy) that drops the flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drop {
    /// `family table chain`, for `nft list chain`.
    pub chain: String,
    /// The rule (`handle N`, with its comment) or `policy drop`.
    pub what: String,
    /// Every match of the way there held (else it depends on what was unknown).
    pub certain: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tri {
    True,
    False,
    Unknown,
}

impl Tri {
    fn and(self, o: Tri) -> Tri {
        match (self, o) {
            (Tri::False, _) | (_, Tri::False) => Tri::False,
            (Tri::True, Tri::True) => Tri::True,
            _ => Tri::Unknown,
        }
    }
    fn not(self) -> Tri {
        match self {
            Tri::True => Tri::False,
            Tri::False => Tri::True,
            Tri::Unknown => Tri::Unknown,
        }
    }
}

/// What the flow's packet is, for a left-hand expression.
enum Known {
    Name(String),
    Port(u16),
    Addr(IpAddr),
    Proto(Proto),
    Flags(&'static [&'static str]),
    /// A field the packet does not have (`tcp dport` of a UDP packet): never matches.
    Never,
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Accept,
    Dropped,
    Return,
    Fall,
}

struct Ruleset<'v> {
    rules: HashMap<(&'v str, &'v str, &'v str), Vec<&'v Value>>,
    base: Vec<(&'v str, &'v str, &'v str, bool)>,
}

fn family_applies(family: &str, f: Family) -> bool {
    matches!(
        (family, f),
        ("inet", _) | ("ip", Family::Ipv4) | ("ip6", Family::Ipv6)
    )
}

fn skipped_table(family: &str, table: &str) -> bool {
    (family == "inet" && table == "virtgate") || table.starts_with("libvirt")
}

impl<'v> Ruleset<'v> {
    fn of(json: &'v Value, fam: Family) -> Ruleset<'v> {
        let mut rs = Ruleset {
            rules: HashMap::new(),
            base: Vec::new(),
        };
        let items = json["nftables"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        for item in items {
            let s = |o: &'v Value, k: &str| o[k].as_str().unwrap_or("");
            if let Some(c) = item.get("chain") {
                let (f, t) = (s(c, "family"), s(c, "table"));
                if c["hook"] == "forward"
                    && c["type"] == "filter"
                    && family_applies(f, fam)
                    && !skipped_table(f, t)
                {
                    rs.base.push((f, t, s(c, "name"), c["policy"] == "drop"));
                }
            } else if let Some(r) = item.get("rule") {
                let key = (s(r, "family"), s(r, "table"), s(r, "chain"));
                rs.rules.entry(key).or_default().push(r);
            }
        }
        rs
    }
}

fn left(expr: &Value, flow: &Flow, fam: Family) -> Option<Known> {
    if let Some(m) = expr.get("meta") {
        return match m["key"].as_str()? {
            "oifname" | "oif" if !flow.reply => Some(Known::Name(flow.bridge.to_string())),
            "iifname" | "iif" if flow.reply => Some(Known::Name(flow.bridge.to_string())),
            "l4proto" => Some(Known::Proto(flow.proto)),
            "nfproto" => Some(Known::Name(
                match fam {
                    Family::Ipv4 => "ipv4",
                    Family::Ipv6 => "ipv6",
                }
                .into(),
            )),
            _ => None,
        };
    }
    if let Some(c) = expr.get("ct") {
        if c.get("dir").is_some() {
            return None;
        }
        return match c["key"].as_str()? {
            "state" if flow.reply => Some(Known::Flags(&["established"])),
            "state" => Some(Known::Flags(&["new"])),
            "status" => Some(Known::Flags(&["dnat"])),
            "direction" if flow.reply => Some(Known::Name("reply".into())),
            "direction" => Some(Known::Name("original".into())),
            _ => None,
        };
    }
    let p = expr.get("payload")?;
    let (proto, field) = (p["protocol"].as_str()?, p["field"].as_str()?);
    let guest_side = if flow.reply { "saddr" } else { "daddr" };
    let guest_port = if flow.reply { "sport" } else { "dport" };
    match (proto, field) {
        ("ip", "protocol") | ("ip6", "nexthdr") => Some(Known::Proto(flow.proto)),
        ("ip" | "ip6", f) if f == guest_side => Some(Known::Addr(flow.guest)),
        // `tcp dport` of a UDP packet never matches
        ("tcp" | "udp" | "sctp", _) if proto != flow.proto.as_str() => Some(Known::Never),
        ("tcp" | "udp" | "sctp" | "th", f) if f == guest_port => Some(Known::Port(flow.guest_port)),
        _ => None,
    }
}

fn proto_number(p: Proto) -> u64 {
    match p {
        Proto::Tcp => 6,
        Proto::Udp => 17,
        Proto::Sctp => 132,
    }
}

/// Whether one right-hand value (not a set) holds for what the packet is.
fn holds(known: &Known, right: &Value) -> Tri {
    let yes = |b: bool| if b { Tri::True } else { Tri::False };
    match (known, right) {
        (Known::Name(n), Value::String(r)) => match r.strip_suffix('*') {
            Some(prefix) => yes(n.starts_with(prefix)),
            None => yes(n == r),
        },
        (Known::Flags(f), Value::String(r)) => yes(f.contains(&r.as_str())),
        (Known::Proto(p), Value::String(r)) => yes(p.as_str() == r),
        (Known::Proto(p), Value::Number(n)) => yes(n.as_u64() == Some(proto_number(*p))),
        (Known::Never, _) => Tri::False,
        (Known::Port(p), Value::Number(n)) => yes(n.as_u64() == Some(u64::from(*p))),
        (Known::Port(p), Value::Object(o)) if o.contains_key("range") => {
            let r = &o["range"];
            match (r[0].as_u64(), r[1].as_u64()) {
                (Some(a), Some(b)) => yes(a <= u64::from(*p) && u64::from(*p) <= b),
                _ => Tri::Unknown,
            }
        }
        (Known::Addr(a), Value::String(r)) => match r.parse::<IpAddr>() {
            Ok(r) => yes(*a == r),
            Err(_) => Tri::Unknown,
        },
        (Known::Addr(a), Value::Object(o)) if o.contains_key("prefix") => {
            let p = &o["prefix"];
            match (p["addr"].as_str(), p["len"].as_u64()) {
                (Some(addr), Some(len)) => match format!("{addr}/{len}").parse::<ipnet::IpNet>() {
                    Ok(net) => yes(net.contains(a)),
                    Err(_) => Tri::Unknown,
                },
                _ => Tri::Unknown,
            }
        }
        _ => Tri::Unknown,
    }
}

fn judge_match(m: &Value, flow: &Flow, fam: Family) -> Tri {
    let Some(known) = left(&m["left"], flow, fam) else {
        return Tri::Unknown;
    };
    let right = &m["right"];
    let any = |vals: &[Value]| {
        vals.iter()
            .fold(Tri::False, |acc, v| match (acc, holds(&known, v)) {
                (Tri::True, _) | (_, Tri::True) => Tri::True,
                (Tri::Unknown, _) | (_, Tri::Unknown) => Tri::Unknown,
                _ => Tri::False,
            })
    };
    let t = match right {
        Value::Object(o) if o.contains_key("set") => {
            any(o["set"].as_array().map(Vec::as_slice).unwrap_or(&[]))
        }
        // a flag list (`ct state established,related`)
        Value::Array(a) => any(a),
        Value::String(s) if s.starts_with('@') => Tri::Unknown,
        v => holds(&known, v),
    };
    match m["op"].as_str() {
        Some("==" | "in") => t,
        Some("!=") => t.not(),
        _ => Tri::Unknown,
    }
}

enum Verdict<'v> {
    Accept,
    Drop,
    Return,
    Jump(&'v str),
    Goto(&'v str),
}

fn verdict(e: &Value) -> Option<Verdict<'_>> {
    let obj = e.as_object()?;
    if obj.contains_key("accept") {
        return Some(Verdict::Accept);
    }
    if obj.contains_key("drop") || obj.contains_key("reject") {
        return Some(Verdict::Drop);
    }
    if obj.contains_key("return") {
        return Some(Verdict::Return);
    }
    if let Some(t) = e["jump"]["target"].as_str() {
        return Some(Verdict::Jump(t));
    }
    if let Some(t) = e["goto"]["target"].as_str() {
        return Some(Verdict::Goto(t));
    }
    // iptables-nft's REJECT is an xtables target
    if e["xt"]["type"] == "target" && matches!(e["xt"]["name"].as_str(), Some("REJECT" | "DROP")) {
        return Some(Verdict::Drop);
    }
    None
}

fn describe(rule: &Value) -> String {
    let mut s = match rule["handle"].as_u64() {
        Some(h) => format!("rule handle {h}"),
        None => "a rule".to_string(),
    };
    if let Some(c) = rule["comment"].as_str() {
        s.push_str(&format!(" ({c:?})"));
    }
    s
}

struct Walk<'a, 'v> {
    rs: &'a Ruleset<'v>,
    flow: &'a Flow<'a>,
    fam: Family,
    found: Vec<Drop>,
}

impl Walk<'_, '_> {
    fn chain(&mut self, fam: &str, table: &str, chain: &str, certain: bool, depth: u32) -> Outcome {
        if depth > 16 {
            return Outcome::Fall;
        }
        let rules = self
            .rs
            .rules
            .get(&(fam, table, chain))
            .cloned()
            .unwrap_or_default();
        for rule in rules {
            let exprs = rule["expr"].as_array().map(Vec::as_slice).unwrap_or(&[]);
            let mut m = Tri::True;
            let mut v = None;
            for e in exprs {
                if let Some(mm) = e.get("match") {
                    m = m.and(judge_match(mm, self.flow, self.fam));
                } else if e["xt"]["type"] == "match" {
                    m = m.and(Tri::Unknown);
                } else if let Some(x) = verdict(e) {
                    v = Some(x);
                }
            }
            if m == Tri::False {
                continue;
            }
            let sure = certain && m == Tri::True;
            let out = match v {
                None => continue,
                Some(Verdict::Accept) => Outcome::Accept,
                Some(Verdict::Return) => Outcome::Return,
                Some(Verdict::Drop) => {
                    self.found.push(Drop {
                        chain: format!("{fam} {table} {chain}"),
                        what: describe(rule),
                        certain: sure,
                    });
                    Outcome::Dropped
                }
                Some(Verdict::Jump(t) | Verdict::Goto(t)) if t.starts_with("VIRTGATE") => {
                    Outcome::Accept
                }
                Some(Verdict::Jump(t)) => match self.chain(fam, table, t, sure, depth + 1) {
                    Outcome::Return | Outcome::Fall => continue,
                    o => o,
                },
                Some(Verdict::Goto(t)) => match self.chain(fam, table, t, sure, depth + 1) {
                    Outcome::Fall => Outcome::Return,
                    o => o,
                },
            };
            if sure {
                return out;
            }
        }
        Outcome::Fall
    }
}

/// The rules and policies of other tables that drop (or may drop) the flow, in the order
/// the kernel meets them.
pub fn drops(ruleset: &Value, flow: &Flow) -> Vec<Drop> {
    let fam = Family::of(&flow.guest);
    let rs = Ruleset::of(ruleset, fam);
    let mut w = Walk {
        rs: &rs,
        flow,
        fam,
        found: Vec::new(),
    };
    for &(f, t, c, policy_drop) in &rs.base {
        let out = w.chain(f, t, c, true, 0);
        if out == Outcome::Fall && policy_drop {
            w.found.push(Drop {
                chain: format!("{f} {t} {c}"),
                what: "policy drop".into(),
                certain: true,
            });
        }
    }
    w.found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(reply: bool) -> Flow<'static> {
        Flow {
            proto: Proto::Tcp,
            guest: "192.168.122.10".parse().unwrap(),
            guest_port: 80,
            bridge: "virbr0",
            reply,
        }
    }

    fn ruleset(chain: Value, rules: &[Value]) -> Value {
        let mut items = vec![serde_json::json!({ "chain": chain })];
        for (i, r) in rules.iter().enumerate() {
            items.push(serde_json::json!({ "rule": {
                "family": "inet", "table": "t", "chain": "f", "handle": i + 2, "expr": r
            }}));
        }
        serde_json::json!({ "nftables": items })
    }

    fn base(policy: &str) -> Value {
        serde_json::json!({ "family": "inet", "table": "t", "name": "f", "type": "filter",
            "hook": "forward", "prio": -10, "policy": policy })
    }

    fn m(op: &str, left: Value, right: Value) -> Value {
        serde_json::json!({ "match": { "op": op, "left": left, "right": right } })
    }

    #[test]
    fn harmless_rules_drop_nothing() {
        let ct_state = serde_json::json!({ "ct": { "key": "state" } });
        let rs = ruleset(
            base("accept"),
            &[
                serde_json::json!([m("in", ct_state.clone(), "invalid".into()), { "drop": null }]),
                serde_json::json!([
                    m("==", serde_json::json!({ "meta": { "key": "oifname" } }), "docker0".into()),
                    { "drop": null }
                ]),
                serde_json::json!([
                    m("==", serde_json::json!({ "payload": { "protocol": "udp", "field": "dport" } }), 80.into()),
                    { "drop": null }
                ]),
            ],
        );
        assert_eq!(drops(&rs, &flow(false)), vec![]);
        // a reply leaves by an interface that is not known: docker0 may be it
        let d = drops(&rs, &flow(true));
        assert!(
            d.len() == 1 && !d[0].certain && d[0].what == "rule handle 3",
            "{d:?}"
        );
    }

    #[test]
    fn a_policy_drop_and_a_port_drop_are_named() {
        let rs = ruleset(base("drop"), &[]);
        let d = drops(&rs, &flow(false));
        assert_eq!(d.len(), 1);
        assert!(d[0].certain && d[0].what == "policy drop" && d[0].chain == "inet t f");
        // accepted first: nothing drops
        let status = serde_json::json!({ "ct": { "key": "status" } });
        let rs = ruleset(
            base("drop"),
            &[serde_json::json!([m("in", status, "dnat".into()), { "accept": null }])],
        );
        assert!(drops(&rs, &flow(false)).is_empty());
        let dport = serde_json::json!({ "payload": { "protocol": "th", "field": "dport" } });
        let rs = ruleset(
            base("accept"),
            &[serde_json::json!([
                m("==", dport, serde_json::json!({ "range": [1, 100] })),
                { "reject": null }
            ])],
        );
        let d = drops(&rs, &flow(false));
        assert!(
            d.len() == 1 && d[0].certain && d[0].what == "rule handle 2",
            "{d:?}"
        );
        // replies (source port 80, destination unknown) are another flow
        assert!(drops(&rs, &flow(true)).iter().all(|d| !d.certain));
    }

    #[test]
    fn a_drop_behind_an_unknown_match_may_drop() {
        let saddr = serde_json::json!({ "payload": { "protocol": "ip", "field": "saddr" } });
        let rs = ruleset(
            base("accept"),
            &[serde_json::json!([m("==", saddr, "192.0.2.66".into()), { "drop": null }])],
        );
        let d = drops(&rs, &flow(false));
        assert!(d.len() == 1 && !d[0].certain, "{d:?}");
    }
}
