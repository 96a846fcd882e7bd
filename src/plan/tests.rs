use super::*;
use crate::facts::{DomainFacts, Facts, FactsBuilder, LibvirtFirewall, NetworkFacts};
use crate::model::{DomainConfig, Family, ForwardSpec};

use crate::facts::Nic;
use crate::model::PortRange;

fn facts() -> Facts {
    FactsBuilder::network("default", "virbr0", &["192.168.122.1/24"])
        .reservation("52:54:00:00:00:99", "192.168.122.99")
        .domain("web", "52:54:00:00:00:01", "vnet0")
        .now(1000)
        .build()
}

fn web(spec: ForwardSpec) -> Vec<DomainConfig> {
    vec![DomainConfig {
        name: "web".into(),
        forwards: vec![spec],
        ..Default::default()
    }]
}

fn lease(mac: &str, ip: &str, expiry: u64) -> crate::facts::Lease {
    crate::facts::Lease {
        bridge: "virbr0".into(),
        mac: mac.into(),
        ip: ip.parse().unwrap(),
        expiry,
    }
}

fn neigh(mac: &str, ip: &str) -> crate::facts::Neighbour {
    crate::facts::Neighbour {
        ifname: "virbr0".into(),
        mac: mac.into(),
        ip: ip.parse().unwrap(),
    }
}

fn spec() -> ForwardSpec {
    ForwardSpec {
        host_ports: PortRange::single(8080).unwrap(),
        guest_ports: PortRange::single(80).unwrap(),
        ..Default::default()
    }
}

#[test]
fn iptables_forward_beside_libvirts_nftables_form_gets_an_accept_too() {
    let mut f = facts();
    f.networks[0].firewall = LibvirtFirewall::Nftables;
    f.leases = vec![lease("52:54:00:00:00:01", "192.168.122.10", u64::MAX)];
    let kinds = |f: &Facts| -> Vec<LibvirtFirewall> {
        plan(&web(spec()), f, &[])
            .ruleset
            .accepts
            .iter()
            .map(|a| a.firewall)
            .collect()
    };
    assert_eq!(kinds(&f), [LibvirtFirewall::Nftables]);
    // Docker (iptables-nft) created iptables' FORWARD for IPv4
    f.xt_forward = vec![Family::Ipv4];
    let mut k = kinds(&f);
    k.sort_by_key(|x| format!("{x:?}"));
    assert_eq!(k, [LibvirtFirewall::Iptables, LibvirtFirewall::Nftables]);
    // on libvirt's iptables form the one xtables accept is already there
    f.networks[0].firewall = LibvirtFirewall::Iptables;
    assert_eq!(kinds(&f), [LibvirtFirewall::Iptables]);
}

#[test]
fn no_forward_relays_elsewhere_or_to_the_host() {
    let state_of = |f: &Facts, addr: &str| {
        let p = plan(
            &web(ForwardSpec {
                guest_addresses: vec![addr.parse().unwrap()],
                ..spec()
            }),
            f,
            &[],
        );
        (p.forwards[0].state, p.forwards[0].reason.clone())
    };
    let f = facts();
    for bad in [
        "192.168.122.1",
        "192.168.122.0",
        "192.168.122.255",
        "127.0.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "8.8.8.8",
    ] {
        let (st, why) = state_of(&f, bad);
        assert_eq!(st, ForwardState::Pending, "{bad}: {why:?}");
    }
    assert_eq!(state_of(&f, "192.168.122.20").0, ForwardState::Active);
    // a NIC on a bridge that is no libvirt network: only the host's subnets there
    let mut f = facts();
    f.domains[0].nics[0].network = None;
    f.domains[0].nics[0].bridge = Some("br9".into());
    f.host_addresses = vec![
        ("br9".into(), "10.9.0.1/24".parse().unwrap()),
        ("eth0".into(), "203.0.113.1/24".parse().unwrap()),
    ];
    assert_eq!(state_of(&f, "10.9.0.5").0, ForwardState::Active);
    for bad in ["8.8.8.8", "203.0.113.7", "10.9.0.1", "10.9.0.255"] {
        let (st, why) = state_of(&f, bad);
        assert_eq!(st, ForwardState::Pending, "{bad}: {why:?}");
    }
    // learned addresses are held to the same: a lease for the network address
    let mut f = facts();
    f.leases = vec![lease("52:54:00:00:00:01", "192.168.122.0", u64::MAX)];
    let p = plan(&web(spec()), &f, &[]);
    assert_eq!(p.forwards[0].state, ForwardState::Pending);
}

#[test]
fn address_outside_the_subnet_is_refused() {
    let p = plan(
        &web(ForwardSpec {
            guest_addresses: vec!["10.9.9.9".parse().unwrap()],
            ..spec()
        }),
        &facts(),
        &[],
    );
    assert!(p.ruleset.is_empty());
    assert_eq!(p.forwards[0].state, ForwardState::Pending);
    assert!(
        p.forwards[0]
            .reason
            .as_deref()
            .unwrap()
            .contains("outside the subnet")
    );
}

#[test]
fn learned_addresses_are_checked() {
    let mut f = facts();
    // a lease outside the subnet, an expired one, and a neighbour entry that is
    // another domain's reservation: none of them is used
    f.leases.push(lease("52:54:00:00:00:01", "10.0.0.5", 5000));
    f.leases
        .push(lease("52:54:00:00:00:01", "192.168.122.7", 10));
    f.neighbours
        .push(neigh("52:54:00:00:00:01", "192.168.122.99"));
    let p = plan(&web(spec()), &f, &[]);
    assert_eq!(
        p.forwards[0].state,
        ForwardState::Pending,
        "{:?}",
        p.forwards[0]
    );
    assert!(
        p.forwards[0]
            .reason
            .as_deref()
            .unwrap()
            .contains("reservation")
    );
    // a fresh lease in the subnet is used, and shown as such
    f.leases
        .push(lease("52:54:00:00:00:01", "192.168.122.8", 5000));
    let p = plan(&web(spec()), &f, &[]);
    assert_eq!(
        p.forwards[0].guest[0],
        GuestAddr {
            ip: "192.168.122.8".parse().unwrap(),
            source: AddrSource::Lease
        }
    );
}

#[test]
fn inactive_network_means_pending() {
    let mut f = facts();
    f.networks[0].active = false;
    f.networks[0].reservations[0].mac = "52:54:00:00:00:01".into();
    let p = plan(&web(spec()), &f, &[]);
    assert_eq!(p.forwards[0].state, ForwardState::Pending);
    assert!(
        p.forwards[0]
            .reason
            .as_deref()
            .unwrap()
            .contains("not running")
    );
}

#[test]
fn hairpin_ports_only_with_br_netfilter() {
    let mut f = facts();
    f.networks[0].reservations[0].mac = "52:54:00:00:00:01".into();
    assert!(plan(&web(spec()), &f, &[]).ruleset.hairpin_ports.is_empty());
    f.sysctls.bridge_nf_call_iptables = Some(true);
    assert_eq!(
        plan(&web(spec()), &f, &[]).ruleset.hairpin_ports,
        vec!["vnet0".to_string()]
    );
}

#[test]
fn uuid_pins_the_domain() {
    let mut f = facts();
    f.networks[0].reservations[0].mac = "52:54:00:00:00:01".into();
    f.domains[0].uuid = Some("u-other".into());
    let pinned = vec![DomainConfig {
        name: "web".into(),
        uuid: Some("u-mine".into()),
        forwards: vec![spec()],
        ..Default::default()
    }];
    let p = plan(&pinned, &f, &[]);
    assert_eq!(
        p.forwards[0].state,
        ForwardState::Stopped,
        "same name, other UUID"
    );
    f.domains[0].uuid = Some("u-mine".into());
    f.domains[0].name = "renamed".into();
    assert_eq!(
        plan(&pinned, &f, &[]).forwards[0].state,
        ForwardState::Active,
        "renamed, same UUID"
    );
}

#[test]
fn explicit_address_picks_its_nic() {
    let mut f = facts();
    f.networks.push(NetworkFacts {
        name: "second".into(),
        bridge: "virbr1".into(),
        addresses: vec!["192.168.100.1/24".parse().unwrap()],
        active: true,
        ..Default::default()
    });
    f.domains[0].nics.push(Nic {
        mac: "52:54:00:00:00:02".into(),
        network: Some("second".into()),
        bridge: Some("virbr1".into()),
        tap: Some("vnet1".into()),
    });
    let p = plan(
        &web(ForwardSpec {
            guest_addresses: vec!["192.168.100.5".parse().unwrap()],
            ..spec()
        }),
        &f,
        &[],
    );
    assert_eq!(
        p.forwards[0].state,
        ForwardState::Active,
        "{:?}",
        p.forwards[0]
    );
    assert_eq!(p.ruleset.rules[0].bridge, "virbr1");
    assert_eq!(p.ruleset.rules[0].tap.as_deref(), Some("vnet1"));
}

#[test]
fn neighbour_address_claimed_by_another_domains_config_is_refused() {
    let mut f = facts();
    f.neighbours
        .push(neigh("52:54:00:00:00:01", "192.168.122.44"));
    let mut doms = web(spec());
    doms.push(DomainConfig {
        name: "other".into(),
        forwards: vec![ForwardSpec {
            guest_addresses: vec!["192.168.122.44".parse().unwrap()],
            host_ports: PortRange::single(9).unwrap(),
            ..spec()
        }],
        ..Default::default()
    });
    let p = plan(&doms, &f, &[]);
    assert_eq!(
        p.forwards[0].state,
        ForwardState::Pending,
        "{:?}",
        p.forwards[0]
    );
}

#[test]
fn neighbour_address_claimed_by_two_domains_is_not_trusted() {
    let mut f = facts();
    f.domains.push(DomainFacts {
        name: "twin".into(),
        uuid: None,
        nics: vec![Nic {
            mac: "52:54:00:00:00:03".into(),
            network: Some("default".into()),
            bridge: Some("virbr0".into()),
            tap: None,
        }],
        metadata: None,
    });
    for mac in ["52:54:00:00:00:01", "52:54:00:00:00:03"] {
        f.neighbours.push(neigh(mac, "192.168.122.60"));
    }
    let mut doms = web(spec());
    doms.push(DomainConfig {
        name: "twin".into(),
        forwards: vec![ForwardSpec {
            host_ports: PortRange::single(9).unwrap(),
            ..spec()
        }],
        ..Default::default()
    });
    let p = plan(&doms, &f, &[]);
    assert!(p.ruleset.rules.is_empty(), "{:?}", p.ruleset.rules);
    assert!(p.forwards.iter().all(|s| s.state == ForwardState::Pending));
}

fn snooped(tap: &str, mac: &str, ip: &str) -> crate::facts::snoop::Snooped {
    crate::facts::snoop::Snooped {
        tap: tap.into(),
        mac: mac.into(),
        ip: ip.parse().unwrap(),
        how: crate::facts::snoop::SnoopedBy::Arp,
        seen: 1000,
        lease_until: None,
    }
}

#[test]
fn an_address_snooped_on_the_guests_own_tap_comes_last_and_is_checked() {
    let plan_with = |s: Vec<crate::facts::snoop::Snooped>| {
        let mut f = facts();
        f.snooped = s;
        plan(&web(spec()), &f, &[]).forwards[0].clone()
    };
    let st = plan_with(vec![snooped(
        "vnet0",
        "52:54:00:00:00:01",
        "192.168.122.40",
    )]);
    assert_eq!(st.state, ForwardState::Active, "{st:?}");
    assert_eq!(st.guest[0].source, AddrSource::Snooped);
    // another tap, another MAC: not this NIC's
    for s in [
        snooped("vnet9", "52:54:00:00:00:01", "192.168.122.40"),
        snooped("vnet0", "52:54:00:00:00:02", "192.168.122.40"),
    ] {
        assert_eq!(plan_with(vec![s]).state, ForwardState::Pending);
    }
    // refused, and said why: outside the subnet, the network's address, the host's own,
    // another NIC's reservation
    for (ip, why) in [
        ("10.9.9.9", "outside the subnet"),
        ("192.168.122.0", "network or broadcast"),
        ("192.168.122.1", "host's own"),
        ("192.168.122.99", "another domain's"),
    ] {
        let st = plan_with(vec![snooped("vnet0", "52:54:00:00:00:01", ip)]);
        assert_eq!(st.state, ForwardState::Pending, "{ip}");
        let reason = st.reason.unwrap_or_default();
        assert!(
            reason.contains(ip) && reason.contains(why),
            "{ip}: {reason}"
        );
    }
    // a lease (or reservation, or neighbour entry) comes first
    let mut f = facts();
    f.snooped = vec![snooped("vnet0", "52:54:00:00:00:01", "192.168.122.40")];
    f.leases = vec![lease("52:54:00:00:00:01", "192.168.122.10", u64::MAX)];
    let st = plan(&web(spec()), &f, &[]).forwards[0].clone();
    assert_eq!(
        (st.guest[0].ip.to_string(), st.guest[0].source),
        ("192.168.122.10".into(), AddrSource::Lease)
    );
}
