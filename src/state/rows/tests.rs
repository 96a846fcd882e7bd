use super::codec::*;
use super::index::*;
use super::*;
use crate::model::{Family, PortRange, Proto, RateLimit, RatePer, RateUnit};
use crate::rules::{Held, ListenOn, Rule, Ruleset};

fn rule(domain: &str, n: u8, guest: &str, tap: Option<&str>) -> Rule {
    Rule {
        id: format!("{n:02x}{:016x}", domain.len()),
        domain: domain.into(),
        family: Family::Ipv4,
        proto: Proto::Tcp,
        listen: if n.is_multiple_of(2) {
            ListenOn::Any
        } else {
            ListenOn::Interface("eth0".into())
        },
        host_ports: PortRange::new(8000 + u16::from(n), 8000 + u16::from(n)).unwrap(),
        guest_ip: guest.parse().unwrap(),
        guest_ports: PortRange::new(80, 80).unwrap(),
        sources: vec![],
        localhost: n.is_multiple_of(3),
        bridge: "virbr0".into(),
        tap: tap.map(str::to_string),
        description: Some(format!("{domain} {n}")),
        // some rows with a rate: stored after the rows, read back in place
        rate: (n % 4 == 1)
            .then(|| RateLimit::new(10, RateUnit::Minute, 3, RatePer::Forward).unwrap()),
    }
}

fn world() -> Ruleset {
    let mut rs = Ruleset::from_rules(
        vec![
            rule("a", 1, "192.168.122.10", Some("vnet0")),
            rule("a", 2, "192.168.122.10", Some("vnet0")),
            rule("b \"q\"", 3, "192.168.122.11", None),
            rule("c", 4, "192.168.122.12", Some("vnet2")),
            // c shares a's guest address (a stale rule, say)
            rule("c", 5, "192.168.122.10", Some("vnet2")),
        ],
        &[],
        &[],
    );
    rs.hairpin_ports = vec!["vnet0".into(), "vnet2".into()];
    rs
}

fn json(rs: &Ruleset) -> String {
    let mut buf = Vec::new();
    serialize(rs, &mut serde_json::Serializer::new(&mut buf)).unwrap();
    String::from_utf8(buf).unwrap()
}

fn whole(text: &str) -> Ruleset {
    deserialize(&mut serde_json::Deserializer::from_str(text)).unwrap()
}

fn part(text: &str, domain: &str) -> (Ruleset, Installed) {
    parse_for(text.as_bytes().to_vec(), 0..text.len(), domain).unwrap()
}

#[test]
fn grouped_round_trip() {
    let rs = world();
    assert_eq!(whole(&json(&rs)), rs);
    assert_eq!(whole(&json(&Ruleset::default())), Ruleset::default());
}

#[test]
fn the_previous_format_loads() {
    // it had no rate limits
    let mut rs = world();
    for r in &mut rs.rules {
        r.rate = None;
    }
    let (mut domains, mut bridges) = (Names::default(), Names::default());
    let rows = rs
        .rules
        .iter()
        .map(|r| row(r, domains.index(&r.domain), bridges.index(&r.bridge)))
        .collect();
    let (accepts, hairpins, hairpin_ports) = shared_parts(&rs);
    let st = Stored {
        domains: domains.names,
        bridges: bridges.names,
        rules: rows,
        accepts,
        hairpins,
        hairpin_ports,
    };
    let v2 = format!("\"{}\"", b64(&postcard::to_allocvec(&st).unwrap()));
    assert_eq!(whole(&v2), rs);
    // a hook reads it through the whole state (converted, see super::read_state_for)
    assert!(parse_for(v2.as_bytes().to_vec(), 0..v2.len(), "a").is_err());
}

#[test]
fn one_domain_sees_its_rules_and_the_index_of_the_others() {
    let rs = world();
    let text = json(&rs);
    let (mine, mut inst) = part(&text, "a");
    assert!(mine.rules.iter().all(|r| r.domain == "a") && mine.rules.len() == 2);
    assert_eq!(
        (&mine.accepts, &mine.hairpins, &mine.hairpin_ports),
        (&rs.accepts, &rs.hairpins, &rs.hairpin_ports),
        "the shared part is whole"
    );
    // the others' index says what planning needs, exactly as their rules would
    let mut others = inst.others();
    let mut expected: Vec<Held> = rs
        .rules
        .iter()
        .filter(|r| r.domain != "a")
        .map(Held::of)
        .collect();
    let key = |h: &Held| (h.domain.to_string(), h.host_ports);
    others.sort_by_key(key);
    expected.sort_by_key(key);
    assert_eq!(others, expected);
    assert_eq!(inst.other_rules(), 3);
    // a guest address of a: c's rules come along, b's stay encoded
    let sharing = inst
        .take_sharing(&["192.168.122.10".parse().unwrap()].into())
        .unwrap();
    assert!(sharing.iter().all(|r| r.domain == "c") && sharing.len() == 2);
    assert_eq!(inst.other_rules(), 1);
    let mut decoded = mine.clone();
    decoded.rules.extend(sharing);
    decoded.rules.sort();
    assert_eq!(inst.merged(&decoded).unwrap(), rs);
}

#[test]
fn a_partial_write_keeps_every_other_domain() {
    let rs = world();
    let text = json(&rs);
    let (mut mine, inst) = part(&text, "a");
    // a's rules change; a new domain's too; the shared part changes
    mine.rules
        .retain(|r| r.id != rule("a", 1, "192.168.122.10", None).id);
    mine.rules
        .push(rule("a", 7, "192.168.122.20", Some("vnet9")));
    mine.rules.push(rule("new", 8, "192.168.122.30", None));
    mine.rules.sort();
    mine.hairpin_ports.push("vnet9".into());
    let mut written = String::new();
    inst.write(&mine, &mut written).unwrap();
    let mut expected = rs.clone();
    expected.rules.retain(|r| r.domain != "a");
    expected.rules.extend(mine.rules.iter().cloned());
    expected.rules.sort();
    expected.hairpin_ports = mine.hairpin_ports.clone();
    assert_eq!(whole(&written), expected);
    // the index of the written state agrees with its rules
    let (_, inst2) = part(&written, "nobody");
    let mut idx = inst2.others();
    let mut exp: Vec<Held> = expected.rules.iter().map(Held::of).collect();
    let key = |h: &Held| (h.domain.to_string(), h.host_ports);
    idx.sort_by_key(key);
    exp.sort_by_key(key);
    assert_eq!(idx, exp);
    // a domain whose rules all went: none left, in rows or index
    let (mut a, inst3) = part(&written, "a");
    a.rules.clear();
    let mut gone = String::new();
    inst3.write(&a, &mut gone).unwrap();
    assert!(whole(&gone).rules.iter().all(|r| r.domain != "a"));
    assert!(part(&gone, "x").1.others().iter().all(|h| h.domain != "a"));
}

#[test]
fn a_rule_stored_under_another_domain_is_refused() {
    let rs = world();
    let text = json(&rs).replacen("\"a\":", "\"zz\":", 1);
    assert!(deserialize(&mut serde_json::Deserializer::from_str(&text)).is_err());
    assert!(parse_for(text.as_bytes().to_vec(), 0..text.len(), "zz").is_err());
}
