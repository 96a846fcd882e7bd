//! Real packets through real namespaces: every path of SPEC part 4, for virtgate's two
//! backends against libvirt's two firewall forms.

mod common;

use common::{Lab, LibvirtForm, PUBLIC, Xt, diff, libvirt_rules, sa};

const CONFIG: &str = r#"
[domain.g1]
# IPv4 from the DHCP reservation, IPv6 given here
guest_address = "fd00:122::10"
forwards = ["8080:80", "5353:53535/udp", "9000-9002:9100-9102", "7000:7000/sctp"]

[domain.g2]
[[domain.g2.forward]]
host_port = 8081
guest_port = 80
source = ["203.0.113.0/24", "203.0.113.0/25", "2001:db8::/32"]
description = "only from 203.0.113.0/24"
[[domain.g2.forward]]
host_port = 8082
guest_port = 80
localhost = true

[[domain.g2.forward]]
# only on one host address
host_port = 8084
guest_port = 80
listen = "198.51.100.1"
[[domain.g2.forward]]
# only for traffic arriving on one host interface
host_port = 8085
guest_port = 80
interface = "eth1"

[domain.g3]
forwards = ["8083:80"]
"#;

fn expect_ok(what: &str, r: Result<String, String>, want_prefix: &str) -> String {
    match r {
        Ok(s) if s.starts_with(want_prefix) => s,
        other => panic!("{what}: expected an answer starting {want_prefix:?}, got {other:?}"),
    }
}

fn expect_refused(what: &str, r: Result<String, String>) {
    if let Ok(s) = r
        && s.starts_with('g')
    {
        panic!("{what}: must not reach a guest, but got {s:?}");
    }
}

fn scenario(form: LibvirtForm, backend: &str) {
    scenario_xt(form, backend, Xt::Nft);
}

fn scenario_xt(form: LibvirtForm, backend: &str, xt: Xt) {
    scenario_in(Lab::with_xt(form, xt), backend, xt);
}

fn scenario_in(lab: Lab, backend: &str, xt: Xt) {
    let form = lab.form;
    lab.ping_from_host("192.168.100.10"); // g3's address is learned from the neighbour table
    let before = lab.ruleset();
    let (c, d) = (&lab.client, &lab.client2);
    let pubv = |p: u16| sa(&format!("{PUBLIC}:{p}"));

    // nothing is forwarded before apply
    expect_refused("before apply", c.tcp(pubv(8080)));

    lab.write_config(CONFIG);
    let (ok, out, err) = lab.virtgate(backend, &["check"]);
    assert!(ok, "check: {out}{err}");
    lab.apply(backend);
    if let Ok(secs) = std::env::var("VG_DEBUG_PAUSE") {
        eprintln!(
            "host netns: {} client: {} g1: {}",
            lab.host.name,
            lab.client.name,
            lab.guest("g1").ns.name
        );
        std::thread::sleep(std::time::Duration::from_secs(secs.parse().unwrap_or(300)));
    }

    // outside -> forward, TCP and UDP, the guest sees the client's own address
    expect_ok(
        "outside tcp",
        c.tcp(pubv(8080)),
        "g1 port 80 from 203.0.113.2",
    );
    expect_ok("outside udp", c.udp(pubv(5353)), "g1: ping");
    // range with offset remap
    expect_ok("range remap", c.tcp(pubv(9001)), "g1 port 9101");
    expect_ok("range end", c.tcp(pubv(9002)), "g1 port 9102");
    // IPv6 (routed subnet, DNAT alone)
    expect_ok(
        "outside tcp6",
        c.tcp(sa("[2001:db8:1::1]:8080")),
        "g1 port 80 from 2001:db8:1::2",
    );
    // address from a lease (g2) and from the neighbour table (g3, other network)
    expect_ok("source allowed", c.tcp(pubv(8081)), "g2 port 80");
    expect_refused("source refused", d.tcp(sa("198.51.100.1:8081")));
    expect_ok(
        "unrestricted from client2",
        d.tcp(sa("198.51.100.1:8080")),
        "g1 port 80",
    );
    expect_ok("other network guest", c.tcp(pubv(8083)), "g3 port 80");
    // the host itself, through its public address
    expect_ok("host -> public", lab.host.tcp(pubv(8080)), "g1 port 80");
    // localhost only where opted in (route_localnet is the admin's switch; set it in the lab)
    lab.host.sysctl("net.ipv4.conf.virbr0.route_localnet", "1");
    expect_ok(
        "localhost opted in",
        lab.host.tcp(sa("127.0.0.1:8082")),
        "g2 port 80",
    );
    expect_refused("localhost not opted in", lab.host.tcp(sa("127.0.0.1:8080")));
    expect_refused(
        "localhost ::1 not forwarded",
        lab.host.tcp(sa("[::1]:8080")),
    );
    // listen on one address / one interface only
    expect_ok(
        "listen address",
        d.tcp(sa("198.51.100.1:8084")),
        "g2 port 80",
    );
    expect_refused("other address", c.tcp(pubv(8084)));
    expect_ok(
        "listen interface",
        d.tcp(sa("198.51.100.1:8085")),
        "g2 port 80",
    );
    expect_refused("other interface", c.tcp(pubv(8085)));
    // hairpin: the same guest, another guest of the network, a guest of another network
    let g1 = &lab.guest("g1").ns;
    let g2 = &lab.guest("g2").ns;
    let g3 = &lab.guest("g3").ns;
    expect_ok("same guest via public", g1.tcp(pubv(8080)), "g1 port 80");
    let hairpin = |tap: &str| {
        lab.host
            .exec(&["cat", &format!("/sys/class/net/{tap}/brport/hairpin_mode")])
            .trim()
            .to_string()
    };
    // a stock kernel without br_netfilter loaded has no /proc/sys/net/bridge at all
    let br_nf = lab
        .host
        .try_exec(&["cat", "/proc/sys/net/bridge/bridge-nf-call-iptables"])
        .1
        .trim()
        == "1";
    if br_nf {
        assert_eq!(
            hairpin("vnet0"),
            "1",
            "br_netfilter is on: g1's port needs hairpin mode"
        );
    } else {
        assert_eq!(
            hairpin("vnet0"),
            "0",
            "no br_netfilter: the port is left alone"
        );
    }
    expect_ok("other guest via public", g2.tcp(pubv(8080)), "g1 port 80");
    expect_ok("other network via public", g3.tcp(pubv(8080)), "g1 port 80");
    expect_ok("other guest udp via public", g2.udp(pubv(5353)), "g1: ping");
    // routed traffic straight to the private address stays refused
    expect_refused("routed bypass", c.tcp(sa("192.168.122.10:80")));
    // an unconfigured port is not opened
    expect_refused("unconfigured port", c.tcp(pubv(8099)));

    // SCTP: this kernel has no SCTP sockets, but the rules load and are there
    let rules = match backend {
        "nftables" => lab.host.exec(&["nft", "list", "table", "inet", "virtgate"]),
        _ if xt == Xt::Legacy => lab.host.exec(&["iptables-legacy-save", "-t", "nat"]),
        _ => lab.host.exec(&["iptables-save", "-t", "nat"]),
    };
    assert!(rules.contains("sctp"), "no sctp rule:\n{rules}");

    // status shows addresses, their sources, and counters that moved
    let (ok, out, err) = lab.virtgate(backend, &["status", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows = v["forwards"].as_array().unwrap();
    let find = |dom: &str, port: &str| {
        rows.iter()
            .find(|r| r["domain"] == dom && r["host_ports"] == port)
            .unwrap()
    };
    assert_eq!(find("g1", "8080")["state"], "active", "{out}{err}");
    assert_eq!(
        find("g1", "8080")["guest"][0]["source"],
        "reservation",
        "{out}"
    );
    assert_eq!(find("g1", "8080")["guest"][1]["source"], "config", "{out}");
    assert_eq!(find("g2", "8081")["guest"][0]["source"], "lease", "{out}");
    assert_eq!(
        find("g3", "8083")["guest"][0]["source"],
        "neighbour",
        "{out}"
    );
    assert!(find("g1", "8080")["packets"].as_u64().unwrap() > 0, "{out}");
    // new connections: at least the ones made above from outside, the host and guests
    let conns = |port: &str| find("g1", port)["connections"].as_u64().unwrap();
    assert!(conns("8080") >= 5 && conns("5353") >= 2, "{out}");
    // (the iptables backend's packets are those of the DNAT rules: one per connection)
    if backend == "nftables" {
        assert!(
            conns("8080") < find("g1", "8080")["packets"].as_u64().unwrap(),
            "{out}"
        );
    }
    assert!(
        find("g1", "5353")["packets"].as_u64().unwrap() > 0,
        "UDP counters: {out}"
    );

    // libvirt reloads its rules
    match form {
        LibvirtForm::Iptables => {
            libvirt_rules::reload_iptables(&lab.host, xt == Xt::Legacy);
            expect_ok(
                "after libvirt reload (iptables form), at once",
                c.tcp(pubv(8080)),
                "g1 port 80",
            );
        }
        LibvirtForm::Nftables => {
            libvirt_rules::reload_nft(&lab.host);
            expect_refused("after libvirt reload (nft form), buried", c.tcp(pubv(8080)));
            let (ok, out, _) = lab.virtgate(backend, &["status"]);
            assert!(
                ok && out.contains("drifted"),
                "status must show drift:\n{out}"
            );
            lab.apply(backend);
            expect_ok(
                "after libvirt reload (nft form) + apply",
                c.tcp(pubv(8080)),
                "g1 port 80",
            );
        }
    }
    // counters survive a change of the ruleset (the nft table is replaced whole)
    if backend == "nftables" {
        let count = |out: &str| -> u64 {
            let v: serde_json::Value = serde_json::from_str(out).unwrap();
            v["forwards"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["domain"] == "g1" && r["host_ports"] == "5353")
                .map(|r| r["packets"].as_u64().unwrap())
                .sum()
        };
        let (_, out, _) = lab.virtgate(backend, &["status", "--json"]);
        let before_change = count(&out);
        lab.write_config(&CONFIG.replace(
            r#"forwards = ["8083:80"]"#,
            r#"forwards = ["8083:80", "8098:80"]"#,
        ));
        let (ok, out, err) = lab.virtgate(backend, &["apply"]);
        assert!(ok && out.starts_with("applied"), "{out}{err}");
        let (_, out, _) = lab.virtgate(backend, &["status", "--json"]);
        assert!(
            count(&out) >= before_change && before_change > 0,
            "counters reset: {before_change} -> {}",
            count(&out)
        );
        lab.write_config(CONFIG);
        lab.apply(backend);
    }
    // apply again is a no-op
    let (ok, out, _) = lab.virtgate(backend, &["apply"]);
    assert!(ok && out.starts_with("unchanged"), "{out}");

    // a stopped domain loses its forwards, the others keep theirs
    lab.remove_domain_status("g3");
    lab.apply(backend);
    expect_refused("g3 stopped", c.tcp(pubv(8083)));
    expect_ok("g1 still", c.tcp(pubv(8080)), "g1 port 80");

    // removal: an empty config leaves the ruleset as it was before virtgate
    lab.write_config("");
    lab.apply(backend);
    expect_refused("after removal", c.tcp(pubv(8080)));
    let after = lab.ruleset();
    assert!(
        before == after,
        "ruleset differs after removal:\n{}",
        diff(&before, &after)
    );
}

#[test]
fn nftables_backend_with_libvirt_iptables() {
    if common::can_run_netns("nftables_backend_with_libvirt_iptables") {
        scenario(LibvirtForm::Iptables, "nftables");
    }
}

#[test]
fn nftables_backend_with_libvirt_nftables() {
    if common::can_run_netns("nftables_backend_with_libvirt_nftables") {
        scenario(LibvirtForm::Nftables, "nftables");
    }
}

#[test]
fn iptables_backend_with_libvirt_iptables() {
    if common::can_run_netns("iptables_backend_with_libvirt_iptables") {
        scenario(LibvirtForm::Iptables, "iptables");
    }
}

#[test]
fn iptables_backend_with_libvirt_nftables() {
    if common::can_run_netns("iptables_backend_with_libvirt_nftables") {
        scenario(LibvirtForm::Nftables, "iptables");
    }
}

/// Bridge netfilter off in the host namespace (as on a stock kernel where the
/// br_netfilter module is not loaded): nothing needs hairpin mode, and all still answers.
#[test]
fn nftables_backend_without_bridge_netfilter() {
    if common::can_run_netns("nftables_backend_without_bridge_netfilter") {
        let lab = Lab::new(LibvirtForm::Nftables);
        for k in ["iptables", "ip6tables", "arptables"] {
            let _ =
                lab.host
                    .try_exec(&["sysctl", "-qw", &format!("net.bridge.bridge-nf-call-{k}=0")]);
        }
        let (_, v, _) = lab
            .host
            .try_exec(&["cat", "/proc/sys/net/bridge/bridge-nf-call-iptables"]);
        assert_ne!(
            v.trim(),
            "1",
            "bridge netfilter is off in the host namespace"
        );
        scenario_in(lab, "nftables", Xt::Nft);
    }
}

/// The host's `iptables` is iptables-legacy: libvirt's rules and virtgate's iptables
/// backend both use it.
#[test]
fn iptables_legacy_backend_with_libvirt_iptables_legacy() {
    if common::can_run_netns("iptables_legacy_backend_with_libvirt_iptables_legacy") {
        scenario_xt(LibvirtForm::Iptables, "iptables", Xt::Legacy);
    }
}

/// More hairpin rules than one chain holds flat (two guests, 40 forwards each to their
/// own guest ports): the iptables backend spreads them over chains by guest address, and
/// every hairpinned flow still finds its masquerade, on both xtables variants.
fn hairpin_spread_over_chains(xt: Xt) {
    let lab = Lab::with_xt(LibvirtForm::Iptables, xt);
    let ports: Vec<u16> = (2000..2040).collect();
    let mut config = String::new();
    for (g, base) in [("g1", 11000), ("g2", 12000)] {
        common::serve(&lab.guest(g).ns, g, &ports, &[]);
        let fw: Vec<String> = ports
            .iter()
            .map(|p| format!("\"{}:{p}\"", base + p - 2000))
            .collect();
        config.push_str(&format!("[domain.{g}]\nforwards = [{}]\n", fw.join(", ")));
    }
    lab.write_config(&config);
    lab.apply("iptables");
    let save = if xt == Xt::Legacy {
        "iptables-legacy-save"
    } else {
        "iptables-save"
    };
    let nat = lab.host.exec(&[save, "-t", "nat"]);
    assert!(
        nat.contains(":VIRTGATE_HAIRPIN0_") && !nat.contains("-A VIRTGATE_HAIRPIN0 -s "),
        "80 hairpin rules are spread over chains by address:\n{nat}"
    );
    let (g1, g2) = (&lab.guest("g1").ns, &lab.guest("g2").ns);
    let pubv = |p: u16| sa(&format!("{PUBLIC}:{p}"));
    expect_ok(
        "other guest via public",
        g2.tcp(pubv(11005)),
        "g1 port 2005 from 192.168.122.1",
    );
    expect_ok("same guest via public", g2.tcp(pubv(12039)), "g2 port 2039");
    expect_ok("g1 to g2 via public", g1.tcp(pubv(12000)), "g2 port 2000");
    expect_ok(
        "outside",
        lab.client.tcp(pubv(11039)),
        "g1 port 2039 from 203.0.113.2",
    );
    // g2 stops: its rules go, g1's hairpin stays
    let xml = lab.domain_xml("g2");
    let (code, _, err) = lab.hook("iptables", &["qemu", "g2", "stopped", "end", "-"], &xml);
    assert_eq!(code, 0, "{err}");
    expect_ok("after g2 stopped", g1.tcp(pubv(11001)), "g1 port 2001");
    expect_refused("g2 stopped", lab.client.tcp(pubv(12000)));
}

#[test]
fn iptables_hairpin_spread_over_chains() {
    if common::can_run_netns("iptables_hairpin_spread_over_chains") {
        hairpin_spread_over_chains(Xt::Nft);
    }
}

#[test]
fn iptables_legacy_hairpin_spread_over_chains() {
    if common::can_run_netns("iptables_legacy_hairpin_spread_over_chains") {
        hairpin_spread_over_chains(Xt::Legacy);
    }
}
