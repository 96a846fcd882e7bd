//! `virtgate add` / `remove` on the real kernel: the config file keeps its comments, the
//! forward answers at once (or stops), and a bad or conflicting edit writes nothing.

mod common;

use common::{Lab, LibvirtForm, PUBLIC, sa};

const CONFIG: &str = "# my forwards\n[domain.g1]\nforwards = [\"8080:80\"] # the web\n";

fn answers(lab: &Lab, port: u16, who: &str) -> bool {
    lab.client
        .tcp(sa(&format!("{PUBLIC}:{port}")))
        .is_ok_and(|r| r.starts_with(who))
}

#[test]
fn add_and_remove_edit_the_config_and_apply() {
    if !common::can_run_netns("add_and_remove_edit_the_config_and_apply") {
        return;
    }
    let lab = Lab::new(LibvirtForm::Iptables);
    lab.write_config(CONFIG);
    lab.apply("nftables");
    let text = || std::fs::read_to_string(lab.config_path()).unwrap();
    // a short-form forward, and a domain that had no entry, with a description
    let (ok, out, err) = lab.virtgate("nftables", &["add", "g1", "8081:80"]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = lab.virtgate(
        "nftables",
        &["add", "g2", "8082:80", "--description", "g2's web"],
    );
    assert!(ok, "{out}{err}");
    assert!(answers(&lab, 8081, "g1") && answers(&lab, 8082, "g2"));
    let t = text();
    assert!(
        t.starts_with("# my forwards\n") && t.contains("# the web"),
        "comments kept:\n{t}"
    );
    assert!(t.contains("description = \"g2's web\""), "{t}");
    let (ok, out, _) = lab.virtgate("nftables", &["check"]);
    assert!(ok, "{out}");
    // refused, nothing written: a conflict, an invalid spec, removing what is not there
    let before = text();
    let (ok, _, err) = lab.virtgate("nftables", &["add", "g2", "8081:80"]);
    assert!(!ok && err.contains("nothing written"), "{err}");
    let (ok, _, err) = lab.virtgate("nftables", &["add", "g1", "70000:80"]);
    assert!(!ok && err.contains("70000"), "{err}");
    let (ok, _, err) = lab.virtgate("nftables", &["remove", "g1", "9999:80"]);
    assert!(
        !ok && err.contains("has no forward") && err.contains("8081:80"),
        "{err}"
    );
    assert_eq!(text(), before, "nothing written");
    // remove: gone from the file and from the kernel, the rest stays
    let (ok, out, err) = lab.virtgate("nftables", &["remove", "g1", "8081:80"]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = lab.virtgate("nftables", &["remove", "g2", "8082:80"]);
    assert!(ok, "{out}{err}");
    assert!(!answers(&lab, 8081, "g1") && !answers(&lab, 8082, "g2"));
    assert!(answers(&lab, 8080, "g1"));
    assert!(
        !text().contains("8081") && !text().contains("g2's web"),
        "{}",
        text()
    );
}
