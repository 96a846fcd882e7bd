//! The record of the last whole reconcile: written, read back, compared.
use super::*;
use crate::config::ConfiguredDomain;
use crate::model::{ForwardSpec, NicSelector, PortRange};
use crate::plan::AddrSource;

fn config() -> Config {
    let spec = ForwardSpec {
        host_ports: PortRange::single(8080).unwrap(),
        guest_ports: PortRange::single(80).unwrap(),
        nic: Some(NicSelector::Network("default".into())),
        sources: vec!["203.0.113.0/24".parse().unwrap()],
        guest_addresses: vec!["192.168.122.10".parse().unwrap()],
        description: Some("web".into()),
        ..Default::default()
    };
    let domain = DomainConfig {
        name: "web".into(),
        uuid: Some("4dea22b3-1d52-d8f3-2516-782e98ab3fa0".into()),
        forwards: vec![spec.clone(), ForwardSpec { nic: None, ..spec }],
        ..Default::default()
    };
    let mut c = Config::default();
    c.domains.insert(
        "web".into(),
        ConfiguredDomain {
            domain,
            origins: Vec::new(),
            origin: Default::default(),
        },
    );
    c.domains.insert(
        "idle".into(),
        ConfiguredDomain {
            domain: DomainConfig {
                name: "idle".into(),
                ..Default::default()
            },
            origins: Vec::new(),
            origin: Default::default(),
        },
    );
    c
}

fn statuses(c: &Config) -> Vec<ForwardStatus> {
    c.domains["web"]
        .domain
        .forwards
        .iter()
        .enumerate()
        .map(|(i, spec)| ForwardStatus {
            domain: "web".into(),
            spec: spec.clone(),
            state: ForwardState::Active,
            guest: vec![GuestAddr {
                ip: "192.168.122.10".parse().unwrap(),
                source: AddrSource::Config,
            }],
            bridge: Some("virbr0".into()),
            reason: (i == 1).then(|| "a note".into()),
            rule_ids: vec![format!("{i:016x}")],
        })
        .collect()
}

#[test]
fn a_record_reads_back_as_written_and_only_under_its_digest() {
    let dir = tempfile::tempdir().unwrap();
    let c = config();
    let inputs = Inputs {
        digest: "d1".into(),
        rest: "r1".into(),
    };
    let forwards = statuses(&c);
    record(dir.path(), &inputs, &c, &forwards);
    assert!(read(dir.path(), "d2").is_none());
    let rec = read(dir.path(), "d1").expect("read back");
    assert_eq!(rec.rest, "r1");
    assert!(rec.changed(&c).is_empty());
    assert_eq!(rec.statuses_of("web"), forwards);
    assert_eq!(rec.statuses(), forwards);
}

#[test]
fn changed_domains_are_those_added_removed_or_edited() {
    let dir = tempfile::tempdir().unwrap();
    let c = config();
    let inputs = Inputs {
        digest: "d".into(),
        rest: "r".into(),
    };
    record(dir.path(), &inputs, &c, &statuses(&c));
    let mut rec = read(dir.path(), "d").unwrap();
    let mut edited = c.clone();
    edited.domains.remove("idle");
    let web = edited.domains.get_mut("web").unwrap();
    web.domain.forwards.pop();
    let mut added = web.clone();
    added.domain.name = "zz".into();
    edited.domains.insert("zz".into(), added.clone());
    let mut names = rec.changed(&edited);
    names.sort();
    assert_eq!(names, ["idle", "web", "zz"]);
    // the record with one domain planned again
    rec.replace("zz", Some(&added.domain), &[]);
    rec.replace("idle", None, &[]);
    assert_eq!(rec.changed(&edited), ["web"]);
}

#[test]
fn statuses_out_of_the_configs_order_are_not_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let c = config();
    let inputs = Inputs {
        digest: "d".into(),
        rest: "r".into(),
    };
    let mut forwards = statuses(&c);
    forwards.reverse();
    record(dir.path(), &inputs, &c, &forwards);
    assert!(read(dir.path(), "d").is_none());
}
