//! IPv6 guest addresses found without `guest_address`: from a DHCPv6 reservation whose
//! DUID-LL carries the NIC's MAC, from one that only names the domain, from dnsmasq's
//! IPv6 lease (DUID as client id), and from the neighbour table (NDP). Each forward then
//! answers over IPv6 from outside; a reservation naming another MAC is not taken.

mod common;

use std::time::Duration;

use common::{Lab, LibvirtForm, sa};

const CONFIG: &str = "[domain.g1]\nforwards = [\"[2001:db8:1::1]:8080:80/tcp\"]\n";
const V6_NET: &str = "<ip family='ipv6' address='fd00:122::1' prefix='64'/>";

/// Rewrites libvirt's `default` network (config and status) with IPv6 `<host>` entries.
fn ipv6_hosts(lab: &Lab, hosts: &str) {
    let with = format!(
        "<ip family='ipv6' address='fd00:122::1' prefix='64'>\n    <dhcp>\n      <range start='fd00:122::100' end='fd00:122::1ff'/>\n{hosts}    </dhcp>\n  </ip>"
    );
    for f in [
        "etc/libvirt/qemu/networks/default.xml",
        "run/libvirt/network/default.xml",
    ] {
        let p = lab.root().join(f);
        // from the lab's original text each time
        let orig = p.with_extension("xml.orig");
        if !orig.exists() {
            std::fs::copy(&p, &orig).unwrap();
        }
        let text = std::fs::read_to_string(&orig).unwrap();
        assert!(text.contains(V6_NET), "{text}");
        std::fs::write(&p, text.replace(V6_NET, &with)).unwrap();
    }
}

/// After `ip neigh flush`, the lab's host does not get its IPv6 neighbour solicitations
/// for a guest answered (a bridge and veth artifact): the guest speaks first, as a booted
/// guest does. The address still comes from where the test says (reservation or lease:
/// both come before the neighbour table).
fn guest_speaks(lab: &Lab) {
    lab.guest("g1")
        .ns
        .exec(&["ping", "-6", "-c", "1", "-W", "1", "fd00:122::1"]);
}

/// `0:3:0:1:` + the MAC: a DUID-LL as libvirt prints it.
fn duid_ll(mac: &str) -> String {
    format!("0:3:0:1:{mac}")
}

fn answers_v6(lab: &Lab) -> Result<String, String> {
    lab.client.tcp(sa("[2001:db8:1::1]:8080"))
}

/// Applies, and returns `status --json`'s first forward.
fn apply_and_status(lab: &Lab) -> serde_json::Value {
    lab.apply("nftables");
    let (ok, out, err) = lab.virtgate("nftables", &["status", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["forwards"][0].clone()
}

#[test]
fn ipv6_from_a_dhcpv6_reservation_with_a_duid_ll() {
    if !common::can_run_netns("ipv6_from_a_dhcpv6_reservation_with_a_duid_ll") {
        return;
    }
    let lab = Lab::new(LibvirtForm::Iptables);
    lab.write_config(CONFIG);
    lab.host.exec(&["ip", "neigh", "flush", "all"]);
    let g1 = lab.guest("g1");
    let ip6 = g1.ip6.unwrap();
    // first a reservation for another NIC's DUID: not g1's address
    ipv6_hosts(
        &lab,
        &format!(
            "      <host id='{}' ip='{ip6}'/>\n",
            duid_ll("52:54:00:99:99:99")
        ),
    );
    let f = apply_and_status(&lab);
    assert_eq!(f["state"], "pending", "{f}");
    assert!(answers_v6(&lab).is_err());
    // g1's own DUID-LL
    ipv6_hosts(
        &lab,
        &format!("      <host id='{}' ip='{ip6}'/>\n", duid_ll(&g1.mac)),
    );
    let f = apply_and_status(&lab);
    assert_eq!(f["state"], "active", "{f}");
    assert_eq!(f["guest"][0]["source"], "reservation", "{f}");
    guest_speaks(&lab);
    let r = answers_v6(&lab).expect("answers over IPv6");
    assert!(r.starts_with("g1"), "{r}");
}

#[test]
fn ipv6_from_a_reservation_by_name_and_from_a_dhcpv6_lease() {
    if !common::can_run_netns("ipv6_from_a_reservation_by_name_and_from_a_dhcpv6_lease") {
        return;
    }
    let lab = Lab::new(LibvirtForm::Nftables);
    lab.write_config(CONFIG);
    lab.host.exec(&["ip", "neigh", "flush", "all"]);
    let g1 = lab.guest("g1");
    let ip6 = g1.ip6.unwrap();
    // a DUID-EN says nothing about the NIC: the name does
    ipv6_hosts(
        &lab,
        &format!("      <host id='0:2:0:0:ab:11:1:2:3:4' name='g1' ip='{ip6}'/>\n"),
    );
    let f = apply_and_status(&lab);
    assert_eq!(f["guest"][0]["source"], "reservation", "{f}");
    guest_speaks(&lab);
    assert!(answers_v6(&lab).is_ok_and(|r| r.starts_with("g1")));
    // no reservation; dnsmasq's IPv6 lease names the client by its DUID only
    ipv6_hosts(&lab, "");
    let leases = lab.root().join("var/lib/libvirt/dnsmasq/virbr0.status");
    std::fs::write(
        &leases,
        format!(
            "[{{\"ip-address\": \"{ip6}\", \"iaid\": \"1\", \"server-duid\": \"00:01:00:01:2c:5b:1a:9e:52:54:00:01:02:03\", \"client-id\": \"{}\", \"expiry-time\": 4000000000}}]\n",
            duid_ll(&g1.mac)
        ),
    )
    .unwrap();
    let f = apply_and_status(&lab);
    assert_eq!(f["guest"][0]["source"], "lease", "{f}");
    assert!(answers_v6(&lab).is_ok_and(|r| r.starts_with("g1")));
}

#[test]
fn ipv6_from_the_neighbour_table() {
    if !common::can_run_netns("ipv6_from_the_neighbour_table") {
        return;
    }
    let lab = Lab::new(LibvirtForm::Iptables);
    lab.write_config(CONFIG);
    lab.host.exec(&["ip", "neigh", "flush", "all"]);
    let f = apply_and_status(&lab);
    assert_eq!(f["state"], "pending", "{f}");
    // the guest speaks IPv6 (NDP for its router): the host learns it
    let g1 = lab.guest("g1");
    g1.ns
        .exec(&["ping", "-6", "-c", "1", "-W", "1", "fd00:122::1"]);
    std::thread::sleep(Duration::from_millis(100));
    let f = apply_and_status(&lab);
    assert_eq!(f["state"], "active", "{f}");
    assert_eq!(f["guest"][0]["source"], "neighbour", "{f}");
    assert!(answers_v6(&lab).is_ok_and(|r| r.starts_with("g1")));
}
