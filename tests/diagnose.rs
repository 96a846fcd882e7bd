//! `virtgate diagnose` on the real kernel: each failure induced on its own, and diagnose
//! names it, and only it (and exits 1); a clear path exits 0.

mod common;

use common::{Lab, LibvirtForm};

const CONFIG: &str = "[domain.g1]\nforwards = [\"8080:80\", \"8090:81\"]\n[domain.ghost]\nforwards = [\"8099:80\"]\n";

/// Exit status and the names of the steps that block (a step named once).
fn blocked(lab: &Lab, args: &[&str]) -> (bool, Vec<String>, String) {
    let mut a = vec!["diagnose"];
    a.extend_from_slice(args);
    a.push("--json");
    let (ok, out, err) = lab.virtgate("nftables", &a);
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    let mut steps: Vec<String> = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["ok"] == false)
        .map(|s| s["step"].as_str().unwrap().to_string())
        .collect();
    steps.dedup();
    assert_eq!(v["clear"] == true, ok, "exit status says the same: {out}");
    (ok, steps, out)
}

#[test]
fn diagnose_names_what_blocks_and_only_that() {
    if !common::can_run_netns("diagnose_names_what_blocks_and_only_that") {
        return;
    }
    let lab = Lab::new(LibvirtForm::Nftables);
    lab.write_config(CONFIG);
    // not applied yet
    let (ok, b, out) = blocked(&lab, &["g1", "8080"]);
    assert!(!ok && b == ["kernel"], "{out}");
    lab.apply("nftables");
    let (ok, b, out) = blocked(&lab, &["g1", "8080"]);
    assert!(ok && b.is_empty(), "{out}");
    // nothing listens on the guest's port 81
    let (ok, b, out) = blocked(&lab, &["g1", "8090"]);
    assert!(!ok && b == ["guest"], "{out}");
    assert!(out.contains("nothing listens"), "{out}");
    // not running, not configured, no such port
    let (_, b, out) = blocked(&lab, &["ghost"]);
    assert_eq!(b, ["running"], "{out}");
    let (_, b, out) = blocked(&lab, &["nobody"]);
    assert_eq!(b, ["config"], "{out}");
    let (_, b, out) = blocked(&lab, &["g1", "7777"]);
    assert_eq!(b, ["config"], "{out}");
    // libvirt's reload buried the accept: drift
    common::libvirt_rules::reload_nft(&lab.host);
    let (_, b, out) = blocked(&lab, &["g1", "8080"]);
    assert_eq!(b, ["kernel"], "{out}");
    lab.apply("nftables");
    // forwarding off in the host namespace
    lab.host.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=0"]);
    let (_, b, out) = blocked(&lab, &["g1", "8080"]);
    assert_eq!(b, ["ip_forward"], "{out}");
    lab.host.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    let (ok, _, out) = blocked(&lab, &["g1", "8080"]);
    assert!(ok, "{out}");
    // hairpin mode taken off the guest's port (br_netfilter on, as in this namespace)
    let (_, nf, _) = lab
        .host
        .try_exec(&["cat", "/proc/sys/net/bridge/bridge-nf-call-iptables"]);
    if nf.trim() == "1" {
        let tap = lab.guest("g1").tap.clone();
        lab.host.exec(&[
            "sh",
            "-c",
            &format!("echo 0 > /sys/class/net/{tap}/brport/hairpin_mode"),
        ]);
        let (_, b, out) = blocked(&lab, &["g1", "8080"]);
        assert_eq!(b, ["hairpin"], "{out}");
        lab.apply("nftables");
        assert!(blocked(&lab, &["g1", "8080"]).0);
    }
    // the text form says the fix
    let (ok, out, _) = lab.virtgate("nftables", &["diagnose", "ghost"]);
    assert!(!ok && out.contains("fix: virsh start ghost"), "{out}");
}

/// Other tables that drop the flow, each induced on its own: a Docker-like `FORWARD`
/// policy drop, a firewalld-like zone's final reject, and another table's drop at a lower
/// priority. The kernel agrees: the port does not answer while diagnose says it is
/// blocked, and answers once it says the path is clear. Rules that drop other flows
/// (`ct state invalid`, another interface, a client address) block nothing.
#[test]
fn diagnose_names_a_foreign_drop_and_the_kernel_agrees() {
    if !common::can_run_netns("diagnose_names_a_foreign_drop_and_the_kernel_agrees") {
        return;
    }
    let lab = Lab::new(LibvirtForm::Nftables);
    lab.write_config("[domain.g1]\nforwards = [\"8080:80\"]\n");
    lab.apply("nftables");
    let answers = || lab.client.tcp(common::sa("203.0.113.1:8080")).is_ok();
    let clear = |why: &str| {
        let (ok, b, out) = blocked(&lab, &["g1"]);
        assert!(ok && b.is_empty(), "{why}: {out}");
        assert!(answers(), "{why}: the port answers");
    };
    clear("before");
    // rules of other flows: no block
    lab.host.exec_stdin(
        &["nft", "-f", "-"],
        "table inet other {\n chain fwchain {\n  type filter hook forward priority -200; policy accept;\n  ct state invalid drop\n  oifname \"docker0\" drop\n  udp dport 80 drop\n  ip saddr 192.0.2.66 drop\n }\n}\n",
    );
    let (_, _, out) = blocked(&lab, &["g1"]);
    assert!(
        out.contains("may drop some"),
        "the client-address drop is named: {out}"
    );
    clear("harmless rules");
    // another table's drop at a lower priority
    lab.host.exec(&[
        "nft", "add", "rule", "inet", "other", "fwchain", "tcp", "dport", "80", "drop",
    ]);
    let (ok, b, out) = blocked(&lab, &["g1"]);
    assert!(!ok && b == ["foreign"], "{out}");
    assert!(
        out.contains("inet other fwchain") && out.contains("connections to"),
        "{out}"
    );
    assert!(!answers(), "the kernel drops it too");
    lab.host.exec(&["nft", "delete", "table", "inet", "other"]);
    clear("table gone");
    // a firewalld-like zone: the replies' way is open, the final reject is not
    lab.host.exec_stdin(
        &["nft", "-f", "-"],
        "table inet firewalld {\n chain filter_FORWARD {\n  type filter hook forward priority filter + 10; policy accept;\n  ct state established,related accept\n  ct state invalid drop\n  iifname \"lo\" accept\n  reject with icmpx admin-prohibited\n }\n}\n",
    );
    let (ok, b, out) = blocked(&lab, &["g1"]);
    assert!(!ok && b == ["foreign"], "{out}");
    assert!(out.contains("inet firewalld filter_FORWARD"), "{out}");
    assert!(!answers(), "the kernel rejects it too");
    lab.host
        .exec(&["nft", "delete", "table", "inet", "firewalld"]);
    clear("firewalld gone");
    // Docker's FORWARD policy drop, set up after virtgate applied: blocked until apply
    // puts virtgate's accept in that chain
    lab.host.exec(&["iptables", "-P", "FORWARD", "DROP"]);
    let (ok, b, out) = blocked(&lab, &["g1"]);
    assert!(!ok && b == ["foreign"], "{out}");
    assert!(
        out.contains("policy drop") && out.contains("ip filter FORWARD"),
        "{out}"
    );
    assert!(!answers(), "the kernel drops it too");
    lab.apply("nftables");
    clear("after apply");
    // libvirt's iptables form: its FORWARD rejects come after virtgate's accept at the
    // top, which a policy drop does not reach either
    drop(lab);
    let lab = Lab::new(LibvirtForm::Iptables);
    lab.write_config("[domain.g1]\nforwards = [\"8080:80\"]\n");
    lab.apply("nftables");
    lab.host.exec(&["iptables", "-P", "FORWARD", "DROP"]);
    let (ok, b, out) = blocked(&lab, &["g1"]);
    assert!(ok && b.is_empty(), "{out}");
    assert!(lab.client.tcp(common::sa("203.0.113.1:8080")).is_ok());
}

/// A `localhost` forward needs `route_localnet` on the guest's bridge, which virtgate
/// reports and never sets: diagnose names it, and only it, until it is on. A running
/// domain whose guest has no known address: diagnose names the address step.
#[test]
fn diagnose_names_route_localnet_and_a_pending_address() {
    if !common::can_run_netns("diagnose_names_route_localnet_and_a_pending_address") {
        return;
    }
    let lab = Lab::new(LibvirtForm::Nftables);
    lab.write_config(
        "[[domain.g1.forward]]\nhost_port = 8085\nguest_port = 80\nlocalhost = true\n",
    );
    lab.apply("nftables");
    lab.host
        .exec(&["sysctl", "-qw", "net.ipv4.conf.virbr0.route_localnet=0"]);
    let (ok, b, out) = blocked(&lab, &["g1"]);
    assert!(!ok && b == ["route_localnet"], "{out}");
    assert!(
        out.contains("sysctl -w net.ipv4.conf.virbr0.route_localnet=1"),
        "{out}"
    );
    assert!(
        lab.host.tcp(common::sa("127.0.0.1:8085")).is_err(),
        "the kernel agrees: no answer on 127.0.0.1"
    );
    lab.host
        .exec(&["sysctl", "-qw", "net.ipv4.conf.virbr0.route_localnet=1"]);
    let (ok, b, out) = blocked(&lab, &["g1"]);
    assert!(ok && b.is_empty(), "{out}");
    assert!(lab.host.tcp(common::sa("127.0.0.1:8085")).is_ok());
    // a running domain whose NIC has no reservation, lease or neighbour entry: pending
    let xml = common::domain_xml("noaddr", "52:54:00:00:00:99", "default", "virbr0", "vnet9");
    std::fs::write(
        lab.root().join("run/libvirt/qemu/noaddr.xml"),
        format!("<domstatus state='running' reason='booted' pid='1'>\n{xml}</domstatus>\n"),
    )
    .unwrap();
    lab.write_config(
        "[[domain.g1.forward]]\nhost_port = 8085\nguest_port = 80\nlocalhost = true\n[domain.noaddr]\nforwards = [\"8086:80\"]\n",
    );
    let (ok, b, out) = blocked(&lab, &["noaddr"]);
    assert!(!ok && b == ["address"], "{out}");
    assert!(
        out.contains("pending") && out.contains("reservation"),
        "{out}"
    );
    // an entry with an error: named, with where it is
    lab.write_config("[domain.noaddr]\nforwards = [\"8086:80\", \"0:80\"]\n");
    let (ok, b, out) = blocked(&lab, &["noaddr"]);
    assert!(!ok && b == ["config"], "{out}");
    assert!(
        out.contains("has errors") && out.contains("virtgate.toml:2"),
        "{out}"
    );
}
