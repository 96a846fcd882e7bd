//! `apply` after a config edit that changed one domain plans and applies that domain
//! alone (as a hook does), on the real kernel: the forward added answers, the kernel then
//! holds exactly what planning everything gives, `status` shows what planning shows, and
//! an edit that can touch another domain plans everything.

mod common;

use common::{Lab, LibvirtForm, PUBLIC, sa};

const CONFIG: &str = "[domain.g1]\nforwards = [\"8080:80\"]\n[domain.g2]\nforwards = [\"8081:80\"]\n[domain.g3]\nforwards = [\"8083:80\"]\n";

fn answers(lab: &Lab, port: u16, guest: &str) -> bool {
    lab.client
        .tcp(sa(&format!("{PUBLIC}:{port}")))
        .is_ok_and(|r| r.starts_with(guest))
}

/// `apply -vv`: what it printed, and its log.
fn apply(lab: &Lab, want: &str) -> String {
    let (ok, out, err) = lab.virtgate("nftables", &["-vv", "apply"]);
    assert!(ok && out.starts_with(want), "want {want}: {out} {err}");
    err
}

fn table(lab: &Lab) -> String {
    lab.host.exec(&["nft", "list", "table", "inet", "virtgate"])
}

fn status(lab: &Lab) -> serde_json::Value {
    let (ok, out, err) = lab.virtgate("nftables", &["status", "--json"]);
    assert!(ok, "{err}");
    let mut v: serde_json::Value = serde_json::from_str(&out).unwrap();
    // counters move with the traffic of the checks
    for r in v["forwards"].as_array_mut().unwrap() {
        for k in ["packets", "bytes", "connections"] {
            r.as_object_mut().unwrap().remove(k);
        }
    }
    v
}

#[test]
fn a_config_edit_of_one_domain_applies_that_domain_alone() {
    if !common::can_run_netns("a_config_edit_of_one_domain_applies_that_domain_alone") {
        return;
    }
    let lab = Lab::new(LibvirtForm::Iptables);
    lab.remove_domain_status("g3");
    lab.write_config(CONFIG);
    apply(&lab, "applied");
    assert!(answers(&lab, 8080, "g1") && answers(&lab, 8081, "g2"));
    // the first apply that finds the kernel in sync records what it planned from (the
    // facts with the guests in the host's neighbour table now)
    apply(&lab, "unchanged");

    // a forward added to g1
    lab.write_config(&CONFIG.replace("[\"8080:80\"]", "[\"8080:80\", \"8090:80\"]"));
    let log = apply(&lab, "applied");
    assert!(log.contains("only g1's config changed"), "{log}");
    assert!(answers(&lab, 8090, "g1"), "the forward added");
    assert!(answers(&lab, 8080, "g1") && answers(&lab, 8081, "g2"));
    let alone = table(&lab);
    let shown = status(&lab);
    assert!(apply(&lab, "unchanged").contains("nothing to plan"));

    // planning everything gives the same: no record to narrow from, other bytes
    let edited = CONFIG.replace("[\"8080:80\"]", "[\"8080:80\", \"8090:80\"]");
    std::fs::remove_file(lab.state_dir().join("statuses")).unwrap();
    lab.write_config(&format!("# planned whole\n{edited}"));
    assert_eq!(
        status(&lab),
        shown,
        "status planned, against the narrowed apply's"
    );
    let log = apply(&lab, "unchanged");
    assert!(!log.contains("alone"), "{log}");
    assert_eq!(table(&lab), alone);

    // bytes that say the same: nothing planned
    lab.write_config(&format!("# reworded\n{edited}"));
    let log = apply(&lab, "unchanged");
    assert!(log.contains("not what they say"), "{log}");

    // a stopped domain removed (nothing of it installed), then one added: each alone
    let without_g3 = edited.replace("[domain.g3]\nforwards = [\"8083:80\"]\n", "");
    lab.write_config(&without_g3);
    assert!(apply(&lab, "unchanged").contains("only g3's config changed"));
    let with_g4 = format!("{without_g3}[domain.g4]\nforwards = [\"8094:80\"]\n");
    lab.write_config(&with_g4);
    let log = apply(&lab, "unchanged");
    assert!(log.contains("only g4's config changed"), "{log}");

    // g2 asks for g1's port: that touches g1, so everything is planned, and g1 (which
    // holds the port) keeps it
    lab.write_config(&with_g4.replace("[\"8081:80\"]", "[\"8081:80\", \"8090:80\"]"));
    // (the config check reports the conflict, so `apply` exits non-zero)
    let (_, out, log) = lab.virtgate("nftables", &["-vv", "apply"]);
    assert!(log.contains("may touch other domains"), "{out}{log}");
    assert!(log.contains("conflicts with forward 8090:80/tcp"), "{log}");
    assert!(answers(&lab, 8090, "g1") && answers(&lab, 8081, "g2"));
    let v = status(&lab);
    let g2 = v["forwards"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["domain"] == "g2" && r["host_ports"] == "8090")
        .cloned()
        .unwrap_or_else(|| panic!("{v}"));
    assert_eq!(g2["state"], "conflict", "{g2}");
}
