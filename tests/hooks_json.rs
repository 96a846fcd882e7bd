//! A libvirt-hook-qemu `hooks.json`, read as it is, gives working forwards on the kernel.

mod common;

use common::{Lab, LibvirtForm, PUBLIC, sa};

/// The upstream example's shape (comments, list form, trailing comma), with lab addresses.
const HOOKS_JSON: &str = r#"{
    // Domain name
    "g1": {
        "private_ip": "192.168.122.10",
        /* public_ip left out: the address of the default route's interface */
        "port_map": {
            "tcp": [[8080, 80]],
            "udp": [[5353, 53535]]
        },
        "port_range": [
            // opens 9100-9101 (ports_num 2), same ports on the guest
            { "init_port": 9100, "ports_num": 2, "protocol": "tcp" }
        ]
    },
    "g2": [
        {
            "interface": "virbr0",
            "private_ip": "192.168.122.11",
            "public_ip": "203.0.113.1",
            "source_ip": "203.0.113.0/24",
            "port_map": { "tcp": [[8081, 80]] },
            "port_range": [ { "init_port": 9102, "ports_num": 1, "protocol": "tcp" } ]
        },
    ],
}
"#;

#[test]
fn hooks_json_forwards_work() {
    if !common::can_run_netns("hooks_json_forwards_work") {
        return;
    }
    let lab = Lab::new(LibvirtForm::Iptables);
    let path = lab.dir.path().join("etc/hooks.json");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, HOOKS_JSON).unwrap();
    let run = |args: &[&str]| lab.virtgate_with(&path, "nftables", args);
    let (ok, out, err) = run(&["check"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("warning: trailing comma"), "{out}");
    assert!(
        out.contains("source_ip now also restricts port_range"),
        "{out}"
    );
    let (ok, out, err) = run(&["apply"]);
    assert!(ok, "{out}{err}");
    let (c, d) = (&lab.client, &lab.client2);
    let pubv = |p: u16| sa(&format!("{PUBLIC}:{p}"));
    assert!(c.tcp(pubv(8080)).unwrap().starts_with("g1 port 80"));
    assert!(c.udp(pubv(5353)).unwrap().starts_with("g1: ping"));
    assert!(c.tcp(pubv(9101)).unwrap().starts_with("g1 port 9101"));
    assert!(c.tcp(pubv(8081)).unwrap().starts_with("g2 port 80"));
    assert!(c.tcp(pubv(9102)).unwrap().starts_with("g2 port 9102"));
    // the default public_ip is the uplink's address only, not every address
    assert!(
        !d.tcp(sa("198.51.100.1:8080"))
            .is_ok_and(|s| s.starts_with('g'))
    );
    // source_ip restricts port_map and port_range alike
    for p in [8081, 9102] {
        let r = d.tcp(sa(&format!("{PUBLIC}:{p}")));
        assert!(!r.as_ref().is_ok_and(|s| s.starts_with('g')), "{p}: {r:?}");
    }
    // the same guest through the public address (the original hook needed a host-wide
    // bridge-nf-call-iptables=0 for this; virtgate sets hairpin mode on the port)
    assert!(
        lab.guest("g1")
            .ns
            .tcp(pubv(8080))
            .unwrap()
            .starts_with("g1 port 80")
    );
}
