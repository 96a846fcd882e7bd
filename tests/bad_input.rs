//! Bad input on the real kernel: a broken domain changes nothing for itself and does not
//! stop the others; a wholly unparsable config changes nothing at all.

mod common;

use common::{Lab, LibvirtForm, PUBLIC, diff, sa};

const GOOD: &str = "[domain.g1]\nforwards = [\"8080:80\"]\n[domain.g2]\nforwards = [\"8081:80\"]\n";

#[test]
fn broken_domain_is_isolated_and_unparsable_config_changes_nothing() {
    if !common::can_run_netns("broken_domain_is_isolated_and_unparsable_config_changes_nothing") {
        return;
    }
    let lab = Lab::new(LibvirtForm::Nftables);
    let c = &lab.client;
    let pubv = |p: u16| sa(&format!("{PUBLIC}:{p}"));
    lab.write_config(GOOD);
    lab.apply("nftables");
    assert!(c.tcp(pubv(8081)).unwrap().starts_with("g2 port 80"));

    // g2 broken, g1 changed
    lab.write_config("[domain.g1]\nforwards = [\"8080:80\", \"8084:80\"]\n[domain.g2]\nforwards = [\"8081:80\", \"0:80\"]\n");
    let (ok, out, _) = lab.virtgate("nftables", &["check"]);
    assert!(!ok, "check must fail");
    let cfg = lab.config_path();
    let want = format!(
        "{}:4:24: error: domain \"g2\": \"0:80\": port 0",
        cfg.display()
    );
    assert!(out.contains(&want), "check output lacks {want:?}:\n{out}");
    let (ok, _, err) = lab.virtgate("nftables", &["apply"]);
    assert!(!ok, "apply with a config error exits 1");
    assert!(err.contains("port 0"), "{err}");
    assert!(
        c.tcp(pubv(8084)).unwrap().starts_with("g1 port 80"),
        "the valid domain's change is applied"
    );
    assert!(
        c.tcp(pubv(8081)).unwrap().starts_with("g2 port 80"),
        "the broken domain keeps what it had"
    );
    let (_, out, _) = lab.virtgate("nftables", &["status"]);
    assert!(
        out.contains("invalid config: 1 rule(s) kept") && out.contains("port 0"),
        "{out}"
    );

    // wholly unparsable: nothing changes
    let before = lab.ruleset();
    lab.write_config("[domain.g1\nforwards = [\"8080:80\"]\n");
    let (ok, _, err) = lab.virtgate("nftables", &["apply"]);
    assert!(!ok);
    assert!(
        err.contains("nothing changed") && err.contains(":1:"),
        "{err}"
    );
    let after = lab.ruleset();
    assert!(before == after, "{}", diff(&before, &after));
    assert!(c.tcp(pubv(8081)).unwrap().starts_with("g2 port 80"));

    // a config writable by others is refused, nothing changes
    lab.write_config(GOOD);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(lab.config_path(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let (ok, _, err) = lab.virtgate("nftables", &["apply"]);
    assert!(!ok && err.contains("writable"), "{err}");
    let after = lab.ruleset();
    assert!(before == after, "{}", diff(&before, &after));

    // conflicting forwards: the second is not applied and is shown as a conflict
    std::fs::set_permissions(lab.config_path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    lab.write_config("[domain.g1]\nforwards = [\"8080:80\"]\n[domain.g2]\nforwards = [\"8080:80\", \"8081:80\"]\n");
    let (ok, _, _) = lab.virtgate("nftables", &["apply"]);
    assert!(!ok);
    assert!(c.tcp(pubv(8080)).unwrap().starts_with("g1 port 80"));
    assert!(c.tcp(pubv(8081)).unwrap().starts_with("g2 port 80"));
    let (_, out, _) = lab.virtgate("nftables", &["status"]);
    assert!(out.contains("conflict"), "{out}");
}

/// A change needs several transactions on the iptables backend (iptables-restore, then
/// ip6tables-restore). When a later one fails, the earlier ones are rolled back: the
/// kernel keeps the old ruleset and the error says why.
#[test]
fn failed_change_keeps_the_old_ruleset() {
    if !common::can_run_netns("failed_change_keeps_the_old_ruleset") {
        return;
    }
    let lab = Lab::new(LibvirtForm::Iptables);
    lab.write_config("[domain.g2]\nforwards = [\"8081:80\"]\n");
    lab.apply("iptables");
    let before = lab.ruleset();
    // an ip6tables-restore that refuses everything
    let fake = lab.dir.path().join("fakebin");
    std::fs::create_dir_all(&fake).unwrap();
    let tool = fake.join("ip6tables-restore");
    std::fs::write(
        &tool,
        "#!/bin/sh\necho 'ip6tables-restore: simulated failure' >&2\nexit 1\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        fake.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // g1 has an IPv6 address: the change needs ip6tables too
    lab.write_config("[domain.g2]\nforwards = [\"8081:80\"]\n[domain.g1]\nguest_address = \"fd00:122::10\"\nforwards = [\"8080:80\"]\n");
    let (ok, _, err) = lab.virtgate_env(
        &lab.config_path(),
        "iptables",
        &["apply"],
        &[("PATH", &path)],
    );
    assert!(!ok, "apply must fail");
    assert!(
        err.contains("simulated failure") && err.contains("previous ruleset"),
        "{err}"
    );
    let after = lab.ruleset();
    assert!(
        before == after,
        "a failed change left a half:\n{}",
        diff(&before, &after)
    );
    assert!(
        lab.client
            .tcp(sa(&format!("{PUBLIC}:8081")))
            .unwrap()
            .starts_with("g2 port 80")
    );
    assert!(
        !lab.client
            .tcp(sa(&format!("{PUBLIC}:8080")))
            .is_ok_and(|s| s.starts_with('g'))
    );
}
