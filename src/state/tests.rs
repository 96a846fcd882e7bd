use std::fs;

use super::*;
use crate::rules::{ListenOn, Rule, Ruleset};

fn rule() -> Rule {
    Rule {
        id: "0123456789abcdef".into(),
        domain: "web \"x\"".into(),
        family: crate::model::Family::Ipv4,
        proto: crate::model::Proto::Tcp,
        listen: ListenOn::Interface("eth0".into()),
        host_ports: crate::model::PortRange::new(9000, 9002).unwrap(),
        guest_ip: "192.168.122.10".parse().unwrap(),
        guest_ports: crate::model::PortRange::new(9100, 9102).unwrap(),
        sources: vec!["203.0.113.0/24".parse().unwrap()],
        localhost: false,
        bridge: "virbr0".into(),
        tap: Some("vnet0".into()),
        description: Some("d".into()),
        rate: None,
    }
}

#[test]
fn rules_round_trip() {
    let st = State {
        ruleset: Ruleset::from_rules(vec![rule()], &[], &[]),
        ..Default::default()
    };
    let text = serde_json::to_string(&st).unwrap();
    assert!(text.len() < 400, "{} bytes: {text}", text.len());
    assert_eq!(parse(text.as_bytes()).unwrap(), st);
}

#[test]
fn the_iptables_memory_of_an_earlier_release_moves_into_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let sd = StateDir::lock(dir.path()).unwrap();
    let legacy = dir.path().join("iptables-created.json");
    fs::write(&legacy, r#"["ip filter","ip filter FORWARD"]"#).unwrap();
    let st = sd.load().unwrap();
    let want: std::collections::BTreeSet<String> =
        ["ip filter", "ip filter FORWARD"].map(String::from).into();
    assert_eq!(st.xt_preexisting.as_ref(), Some(&want));
    sd.save(&st).unwrap();
    assert!(
        !legacy.exists(),
        "written into state.json, the old file goes"
    );
    assert_eq!(sd.load().unwrap().xt_preexisting, Some(want));
    sd.remove_all();
    assert!(!dir.path().join("state.json").exists());
}

#[test]
fn state_of_an_earlier_release_loads() {
    let st = State {
        ruleset: Ruleset::from_rules(vec![rule()], &[], &[]),
        ..Default::default()
    };
    // the earlier format: the ruleset as nested objects
    let mut v = serde_json::to_value(&st).unwrap();
    v["ruleset"] = serde_json::to_value(&st.ruleset).unwrap();
    let legacy = serde_json::to_vec_pretty(&v).unwrap();
    assert!(String::from_utf8_lossy(&legacy).contains("\"guest_ports\""));
    assert_eq!(parse(&legacy).unwrap(), st);
}

#[test]
fn edited_values_never_reach_a_rule() {
    let hostile = [
        |r: &mut Rule| {
            r.bridge = "br\"; chain x { type filter hook input priority -500; policy drop; }".into()
        },
        |r: &mut Rule| r.listen = ListenOn::Interface("eth0 accept".into()),
        |r: &mut Rule| r.tap = Some("vnet0\n".into()),
        |r: &mut Rule| r.id = "../x".into(),
        |r: &mut Rule| {
            r.host_ports = crate::model::PortRange {
                start: 9002,
                end: 9000,
            }
        },
        |r: &mut Rule| r.guest_ip = "fd00::1".parse().unwrap(),
    ];
    for (i, edit) in hostile.iter().enumerate() {
        let mut r = rule();
        edit(&mut r);
        let st = State {
            ruleset: Ruleset::from_rules(vec![r], &[], &[]),
            ..Default::default()
        };
        let text = serde_json::to_string(&st).unwrap();
        let e = parse(text.as_bytes()).unwrap_err();
        assert!(e.contains("installed ruleset"), "{i}: {e}");
    }
    let st = State {
        ruleset: Ruleset::from_rules(vec![rule()], &[], &[]),
        ..Default::default()
    };
    let text = serde_json::to_string(&st).unwrap();
    let start = text.find("\"ruleset\":").unwrap() + "\"ruleset\":".len();
    let ruleset = text[start..text.find(",\"generation\"").unwrap()].to_string();
    for (what, garbage) in [
        ("\"shared\":\"", "\"shared\":\"!!"),
        ("\"shared\":\"", "\"shared\":\"AAAAAAAA"),
        ("\"web \\\"x\\\"\":\"", "\"web \\\"x\\\"\":\"AAAA"),
        ("\"web \\\"x\\\"\":\"", "\"other\":\""),
        (ruleset.as_str(), "\"!!\""),
        (ruleset.as_str(), "\"AAAAAAAAAA\""),
    ] {
        assert!(text.contains(what), "{what} in {text}");
        let bad = text.replacen(what, garbage, 1);
        assert!(parse(bad.as_bytes()).is_err(), "{bad}");
    }
}

#[test]
fn a_torn_state_from_before_this_boot_is_the_empty_state_and_one_of_this_boot_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("state.json");
    fs::write(&p, b"{\"backend\":\"nftables\",\"rules").unwrap();
    // written during this boot: nobody knows what the kernel holds, so it is an error
    assert!(matches!(read_state(&p), Err(StateError::Corrupt { .. })));
    assert!(read_state_for(&p, "web").is_err());
    // written before it (the epoch): what a crash of the system leaves of an unsynced write
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    let epoch = [libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    }; 2];
    // SAFETY: a valid path and two timespecs
    assert_eq!(
        unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), epoch.as_ptr(), 0) },
        0
    );
    assert!(crate::files::written_before_boot(&p));
    assert_eq!(read_state(&p).unwrap(), State::default());
    assert!(read_state_for(&p, "web").unwrap().0 == State::default());
}
