//! Claims the README makes that had no test of their own, each on the real kernel:
//! hairpin mode restored on removal, route_localnet reported and never set, `apply`
//! turning a pending forward live once its lease appears, network `stopped` making the
//! network's forwards pending through the hook (and `started` bringing them back),
//! libvirtd's shutdown leaving the forwards, and one domain's broken entry never failing
//! another domain's `fail_closed` start.

mod common;

use common::{Lab, LibvirtForm, PUBLIC, sa};

fn answers(lab: &Lab, port: u16, who: &str) -> bool {
    lab.client
        .tcp(sa(&format!("{PUBLIC}:{port}")))
        .is_ok_and(|r| r.starts_with(who))
}

fn hairpin(lab: &Lab, tap: &str) -> String {
    lab.host
        .exec(&["cat", &format!("/sys/class/net/{tap}/brport/hairpin_mode")])
        .trim()
        .to_string()
}

fn set_hairpin(lab: &Lab, tap: &str, v: &str) {
    lab.host.exec(&[
        "sh",
        "-c",
        &format!("echo {v} > /sys/class/net/{tap}/brport/hairpin_mode"),
    ]);
}

#[test]
fn hairpin_mode_is_restored_on_removal() {
    if !common::can_run_netns("hairpin_mode_is_restored_on_removal") {
        return;
    }
    let lab = Lab::new(LibvirtForm::Iptables);
    let (_, nf, _) = lab
        .host
        .try_exec(&["cat", "/proc/sys/net/bridge/bridge-nf-call-iptables"]);
    if nf.trim() != "1" {
        eprintln!("bridge netfilter is off here: nothing sets hairpin mode");
        return;
    }
    let (g1, g2) = (lab.guest("g1").tap.clone(), lab.guest("g2").tap.clone());
    // g2's port had hairpin mode on before virtgate: it keeps it
    set_hairpin(&lab, &g2, "1");
    let before = (hairpin(&lab, &g1), hairpin(&lab, &g2));
    assert_eq!(before, ("0".to_string(), "1".to_string()));
    lab.write_config(
        "[domain.g1]\nforwards = [\"8080:80\"]\n[domain.g2]\nforwards = [\"8082:80\"]\n",
    );
    lab.apply("nftables");
    assert_eq!(
        (hairpin(&lab, &g1), hairpin(&lab, &g2)),
        ("1".into(), "1".into())
    );
    lab.write_config("");
    lab.apply("nftables");
    assert_eq!(
        (hairpin(&lab, &g1), hairpin(&lab, &g2)),
        before,
        "as before"
    );
}

#[test]
fn route_localnet_is_reported_and_never_set() {
    if !common::can_run_netns("route_localnet_is_reported_and_never_set") {
        return;
    }
    let lab = Lab::new(LibvirtForm::Iptables);
    let sysctl = |k: &str| lab.host.exec(&["sysctl", "-n", k]).trim().to_string();
    let keys = [
        "net.ipv4.conf.virbr0.route_localnet",
        "net.ipv4.conf.all.route_localnet",
    ];
    let before: Vec<String> = keys.iter().map(|k| sysctl(k)).collect();
    assert!(before.iter().all(|v| v == "0"), "{before:?}");
    lab.write_config(
        "[[domain.g2.forward]]\nhost_port = 8082\nguest_port = 80\nlocalhost = true\n",
    );
    lab.apply("nftables");
    let (ok, out, err) = lab.virtgate("nftables", &["status"]);
    assert!(
        ok && out.contains("route_localnet=1"),
        "reported: {out}{err}"
    );
    let after: Vec<String> = keys.iter().map(|k| sysctl(k)).collect();
    assert_eq!(after, before, "never set by virtgate");
}

#[test]
fn apply_turns_a_pending_forward_live_once_its_lease_appears() {
    if !common::can_run_netns("apply_turns_a_pending_forward_live_once_its_lease_appears") {
        return;
    }
    let lab = Lab::new(LibvirtForm::Nftables);
    let leases = lab.root().join("var/lib/libvirt/dnsmasq/virbr0.status");
    let lease_text = std::fs::read_to_string(&leases).unwrap();
    std::fs::write(&leases, "[]\n").unwrap();
    lab.host.exec(&["ip", "neigh", "flush", "all"]);
    lab.write_config("[domain.g2]\nforwards = [\"8082:80\"]\n");
    lab.apply("nftables");
    let (_, out, _) = lab.virtgate("nftables", &["status"]);
    assert!(out.contains("pending"), "{out}");
    assert!(!answers(&lab, 8082, "g2"));
    std::fs::write(&leases, lease_text).unwrap();
    lab.apply("nftables");
    assert!(answers(&lab, 8082, "g2"), "live after apply");
    let (_, out, _) = lab.virtgate("nftables", &["status", "--json"]);
    assert!(out.contains("\"lease\""), "{out}");
}

#[test]
fn network_stopped_makes_its_forwards_pending_and_started_brings_them_back() {
    if !common::can_run_netns(
        "network_stopped_makes_its_forwards_pending_and_started_brings_them_back",
    ) {
        return;
    }
    let lab = Lab::new(LibvirtForm::Iptables);
    lab.write_config(
        "[domain.g1]\nforwards = [\"8080:80\"]\n[domain.g3]\nforwards = [\"8083:80\"]\n",
    );
    lab.ping_from_host("192.168.100.10"); // g3 (net1) is known from the neighbour table
    lab.apply("nftables");
    assert!(answers(&lab, 8080, "g1") && answers(&lab, 8083, "g3"));
    // libvirt runs the hook as it stops `default`, before its status file goes
    let status = lab.root().join("run/libvirt/network/default.xml");
    let text = std::fs::read_to_string(&status).unwrap();
    let (code, out, err) = lab.hook(
        "nftables",
        &["network", "default", "stopped", "end", "-"],
        &text,
    );
    assert_eq!(code, 0, "{out}{err}");
    std::fs::remove_file(&status).unwrap();
    assert!(!answers(&lab, 8080, "g1"), "default's forwards are gone");
    assert!(answers(&lab, 8083, "g3"), "net1's stay");
    let (_, out, _) = lab.virtgate("nftables", &["status"]);
    assert!(
        out.lines()
            .any(|l| l.starts_with("g1") && l.contains("pending")),
        "{out}"
    );
    // and back when it starts again
    std::fs::write(&status, &text).unwrap();
    let (code, out, err) = lab.hook(
        "nftables",
        &["network", "default", "started", "begin", "-"],
        &text,
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(answers(&lab, 8080, "g1"), "back after network started");
}

#[test]
fn libvirtd_shutdown_leaves_the_forwards_in_place() {
    if !common::can_run_netns("libvirtd_shutdown_leaves_the_forwards_in_place") {
        return;
    }
    let lab = Lab::new(LibvirtForm::Iptables);
    lab.write_config("[domain.g1]\nforwards = [\"8080:80\"]\n");
    lab.apply("nftables");
    let before = lab.ruleset();
    // libvirtd stopping: guests may keep running, and so do their forwards
    let (code, out, err) = lab.hook(
        "nftables",
        &["daemon", "-", "shutdown", "-", "shutdown"],
        "",
    );
    assert_eq!((code, out.as_str()), (0, ""), "{err}");
    assert_eq!(lab.ruleset(), before, "nothing removed");
    assert!(answers(&lab, 8080, "g1"));
}

#[test]
fn a_broken_entry_never_fails_another_domains_fail_closed_start() {
    if !common::can_run_netns("a_broken_entry_never_fails_another_domains_fail_closed_start") {
        return;
    }
    let lab = Lab::new(LibvirtForm::Iptables);
    // g1 asks to be refused if its forwards cannot be applied; g2's entry is broken
    lab.write_config(
        "[domain.g1]\nfail_closed = true\nforwards = [\"8080:80\"]\n[domain.g2]\nforwards = [\"70000:80\"]\n",
    );
    let xml = lab.domain_xml("g1");
    for op in ["prepare", "start", "started"] {
        let (code, out, err) = lab.hook("nftables", &["qemu", "g1", op, "begin", "-"], &xml);
        assert_eq!((code, out.as_str()), (0, ""), "{op}: {err}");
    }
    assert!(answers(&lab, 8080, "g1"));
    // while g2's own fail_closed start is refused for its broken entry
    lab.write_config(
        "[domain.g1]\nfail_closed = true\nforwards = [\"8080:80\"]\n[domain.g2]\nfail_closed = true\nforwards = [\"70000:80\"]\n",
    );
    let (code, _, err) = lab.hook(
        "nftables",
        &["qemu", "g2", "prepare", "begin", "-"],
        &lab.domain_xml("g2"),
    );
    assert_ne!(code, 0, "g2's own start is refused: {err}");
    assert!(answers(&lab, 8080, "g1"), "g1 is untouched");
}
