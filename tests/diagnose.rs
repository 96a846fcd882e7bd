//! `virtgate diagnose` on the real kernel: each failure induced on its own, and diagnose
//! names it, and only it (and exits 1); a clear path exits 0.

mod common;

use common::{Lab, LibvirtForm};

const CONFIG: &str = "[domain.g1]\nforwards = [\"8080:80\", \"8090:81\"]\n[domain.ghost]\nforwards = [\"8099:80\"]\n";

/// Exit status and the names of the steps that block.
fn blocked(lab: &Lab, args: &[&str]) -> (bool, Vec<String>, String) {
    let mut a = vec!["diagnose"];
    a.extend_from_slice(args);
    a.push("--json");
    let (ok, out, err) = lab.virtgate("nftables", &a);
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    let steps: Vec<String> = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["ok"] == false)
        .map(|s| s["step"].as_str().unwrap().to_string())
        .collect();
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
