//! The libvirt hook entry point: argv, stdin and exit semantics for every operation,
//! hostile domain names, concurrent hooks, and install/uninstall. Real kernel, in
//! namespaces.

mod common;

use common::{Lab, LibvirtForm, PUBLIC, diff, domain_xml, libvirt_rules, sa};

fn pubv(p: u16) -> std::net::SocketAddr {
    sa(&format!("{PUBLIC}:{p}"))
}

fn answers(r: Result<String, String>, who: &str) -> bool {
    r.is_ok_and(|s| s.starts_with(who))
}

/// A lab where libvirt's status files do not list the guests: only hooks say they run.
fn lab(form: LibvirtForm) -> Lab {
    let lab = Lab::new(form);
    for g in ["g1", "g2", "g3"] {
        lab.remove_domain_status(g);
    }
    lab
}

#[test]
fn qemu_lifecycle_and_exit_semantics() {
    if !common::can_run_netns("qemu_lifecycle_and_exit_semantics") {
        return;
    }
    for backend in ["nftables", "iptables"] {
        lifecycle(backend);
    }
}

fn lifecycle(backend: &str) {
    let lab = lab(LibvirtForm::Iptables);
    let c = &lab.client;
    lab.write_config(
        "[domain.g1]\nforwards = [\"8080:80\", \"5353:53535/udp\"]\n[domain.g2]\nfail_closed = true\nforwards = [\"8081:80\"]\n[domain.g3]\nfail_closed = true\nforwards = [\"8083:80\"]\n",
    );
    let before = lab.ruleset();
    let x1 = lab.domain_xml("g1");

    // migrate/restore: XML filters; nothing on stdout, nothing changed
    for op in ["migrate", "restore"] {
        let (code, out, _) = lab.hook(backend, &["qemu", "g1", op, "begin", "-"], &x1);
        assert_eq!((code, out.as_str()), (0, ""), "{op}");
    }
    assert_eq!(before, lab.ruleset(), "migrate/restore changed the ruleset");
    // an oversized stdin is refused without hanging or failing the domain
    let huge = format!("<domain>{}</domain>", " ".repeat(9 * 1024 * 1024));
    let (code, out, err) = lab.hook(backend, &["qemu", "g1", "started", "begin", "-"], &huge);
    assert_eq!((code, out.as_str()), (0, ""), "{err}");
    assert!(err.contains("larger than"), "{err}");
    // prepare: validates only
    let (code, out, _) = lab.hook(backend, &["qemu", "g1", "prepare", "begin", "-"], &x1);
    assert_eq!((code, out.as_str()), (0, ""));
    assert!(!answers(c.tcp(pubv(8080)), "g1"));

    // start / started: forwards answer; stdout stays empty
    for op in ["start", "started"] {
        let (code, out, err) = lab.hook(backend, &["qemu", "g1", op, "begin", "-"], &x1);
        assert_eq!((code, out.as_str()), (0, ""), "{op}: {err}");
    }
    assert!(answers(c.tcp(pubv(8080)), "g1 port 80"));
    assert!(answers(c.udp(pubv(5353)), "g1: ping"));

    // g2 (lease) is fine; g3 has no address anywhere: fail_closed refuses start/started,
    // never reconnect
    let (code, _, err) = lab.hook(
        backend,
        &["qemu", "g2", "started", "begin", "-"],
        &lab.domain_xml("g2"),
    );
    assert_eq!(code, 0, "{err}");
    assert!(answers(c.tcp(pubv(8081)), "g2 port 80"));
    let x3 = lab.domain_xml("g3");
    let (code, out, err) = lab.hook(backend, &["qemu", "g3", "start", "begin", "-"], &x3);
    assert_eq!(
        (code, out.as_str()),
        (1, ""),
        "fail_closed + pending must refuse start: {err}"
    );
    assert!(
        err.contains("fail_closed") && err.contains("pending"),
        "{err}"
    );
    let (code, _, _) = lab.hook(backend, &["qemu", "g3", "reconnect", "begin", "-"], &x3);
    assert_eq!(code, 0, "reconnect never fails");
    // a broken config line of g3 never fails g1
    lab.write_config(
        "[domain.g1]\nforwards = [\"8080:80\", \"5353:53535/udp\"]\n[domain.g2]\nfail_closed = true\nforwards = [\"8081:80\"]\n[domain.g3]\nfail_closed = true\nforwards = [\"0:80\"]\n",
    );
    let (code, _, _) = lab.hook(backend, &["qemu", "g1", "started", "begin", "-"], &x1);
    assert_eq!(code, 0);
    let (code, _, err) = lab.hook(backend, &["qemu", "g3", "prepare", "begin", "-"], &x3);
    assert_eq!(code, 1, "prepare validates the domain's own config: {err}");
    assert!(err.contains("port 0"), "{err}");

    // a domain whose forward collides with a running domain's is refused at prepare
    // (fail_closed), and the running one keeps its port
    lab.write_config(
        "[domain.g1]\nforwards = [\"8080:80\", \"5353:53535/udp\"]\n[domain.g2]\nforwards = [\"8081:80\"]\n[domain.g3]\nfail_closed = true\nguest_address = \"192.168.100.10\"\nforwards = [\"8080:80\"]\n",
    );
    let (code, _, err) = lab.hook(backend, &["qemu", "g3", "prepare", "begin", "-"], &x3);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("running domain \"g1\""), "{err}");
    let (code, _, _) = lab.hook(backend, &["qemu", "g3", "started", "begin", "-"], &x3);
    assert_eq!(
        code, 1,
        "g3's forward is a conflict: fail_closed refuses it"
    );
    assert!(
        answers(c.tcp(pubv(8080)), "g1 port 80"),
        "g1 keeps its port"
    );
    let (code, _, _) = lab.hook(backend, &["qemu", "g3", "stopped", "end", "-"], &x3);
    assert_eq!(code, 0);

    // g1's config turns invalid while it runs: its rules stay; when it stops they go
    lab.write_config(
        "[domain.g1]\nforwards = [\"8080:80\", \"oops\"]\n[domain.g2]\nforwards = [\"8081:80\"]\n",
    );
    let (code, _, _) = lab.hook(
        backend,
        &["qemu", "g2", "started", "begin", "-"],
        &lab.domain_xml("g2"),
    );
    assert_eq!(code, 0);
    assert!(
        answers(c.tcp(pubv(8080)), "g1 port 80"),
        "invalid config: g1 keeps what it had"
    );
    let (code, _, _) = lab.hook(backend, &["qemu", "g1", "stopped", "end", "-"], &x1);
    assert_eq!(code, 0);
    assert!(
        !answers(c.tcp(pubv(8080)), "g1"),
        "stopped: g1's rules are gone despite the invalid config"
    );
    let (code, _, _) = lab.hook(backend, &["qemu", "g1", "started", "begin", "-"], &x1);
    assert_eq!(code, 0);

    // the config changes while g1 runs; stopped still removes exactly what was installed
    lab.write_config(
        "[domain.g1]\nforwards = [\"9999:80\"]\n[domain.g2]\nforwards = [\"8081:80\"]\n",
    );
    let (code, out, _) = lab.hook(backend, &["qemu", "g1", "stopped", "end", "-"], &x1);
    assert_eq!((code, out.as_str()), (0, ""));
    assert!(!answers(c.tcp(pubv(8080)), "g1"));
    assert!(!answers(c.tcp(pubv(9999)), "g1"));
    assert!(
        answers(c.tcp(pubv(8081)), "g2 port 80"),
        "the other domain keeps its forward"
    );
    let (code, _, _) = lab.hook(backend, &["qemu", "g1", "release", "end", "-"], "");
    assert_eq!(code, 0, "release with an empty stdin");

    // g2 runs with a status file, as under libvirt; it stops while the config is broken:
    // its forwards still go, and stay gone while libvirt's status file lingers (port-deleted
    // and other domains' hooks come before libvirt deletes it)
    lab.write_domain_status("g2");
    let (code, _, _) = lab.hook(
        backend,
        &["qemu", "g2", "started", "begin", "-"],
        &lab.domain_xml("g2"),
    );
    assert_eq!(code, 0);
    assert!(answers(c.tcp(pubv(8081)), "g2 port 80"));
    lab.write_config("[domain.g2\n");
    let (code, _, err) = lab.hook(
        backend,
        &["qemu", "g2", "stopped", "end", "-"],
        &lab.domain_xml("g2"),
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        !answers(c.tcp(pubv(8081)), "g2"),
        "stopped removes g2's forwards even with a broken config"
    );
    lab.write_config(
        "[domain.g2]\nforwards = [\"8081:80\"]\n[domain.g1]\nforwards = [\"8080:80\"]\n",
    );
    let (code, _, _) = lab.hook(
        backend,
        &["network", "default", "port-deleted", "begin", "-"],
        "<hookData/>",
    );
    assert_eq!(code, 0);
    let (code, _, _) = lab.hook(backend, &["qemu", "g1", "started", "begin", "-"], &x1);
    assert_eq!(code, 0);
    assert!(
        !answers(c.tcp(pubv(8081)), "g2"),
        "a stopped guest's lingering status file does not bring it back"
    );
    lab.remove_domain_status("g2");
    let (code, _, _) = lab.hook(
        backend,
        &["qemu", "g2", "release", "end", "-"],
        &lab.domain_xml("g2"),
    );
    assert_eq!(code, 0);
    let (code, _, _) = lab.hook(backend, &["qemu", "g1", "stopped", "end", "-"], &x1);
    assert_eq!(code, 0);
    let after = lab.ruleset();
    assert!(before == after, "{}", diff(&before, &after));
}

#[test]
fn state_from_an_earlier_boot_is_not_trusted() {
    if !common::can_run_netns("state_from_an_earlier_boot_is_not_trusted") {
        return;
    }
    let lab = lab(LibvirtForm::Iptables);
    lab.write_config("[domain.g1]\nforwards = [\"8080:80\"]\n");
    let (code, _, _) = lab.hook(
        "nftables",
        &["qemu", "g1", "started", "begin", "-"],
        &lab.domain_xml("g1"),
    );
    assert_eq!(code, 0);
    assert!(answers(lab.client.tcp(pubv(8080)), "g1"));
    // the same state as if written before a reboot (the guest is not running now)
    let path = lab.state_dir().join("state.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["boot_id"] = serde_json::Value::String("an-earlier-boot".into());
    std::fs::write(&path, v.to_string()).unwrap();
    let (ok, out, err) = lab.virtgate("nftables", &["apply"]);
    assert!(ok, "{out}{err}");
    assert!(
        !answers(lab.client.tcp(pubv(8080)), "g1"),
        "a guest started before the reboot is not running now"
    );
}

#[test]
fn network_hook_reasserts_buried_accept() {
    if !common::can_run_netns("network_hook_reasserts_buried_accept") {
        return;
    }
    let lab = lab(LibvirtForm::Nftables);
    lab.write_config("[domain.g1]\nforwards = [\"8080:80\"]\n");
    let (code, _, err) = lab.hook(
        "nftables",
        &["qemu", "g1", "started", "begin", "-"],
        &lab.domain_xml("g1"),
    );
    assert_eq!(code, 0, "{err}");
    assert!(answers(lab.client.tcp(pubv(8080)), "g1"));
    libvirt_rules::reload_nft(&lab.host);
    assert!(
        !answers(lab.client.tcp(pubv(8080)), "g1"),
        "libvirt's reload buries the accept"
    );
    let (code, out, _) = lab.hook(
        "nftables",
        &["network", "default", "started", "begin", "-"],
        "<hookData/>",
    );
    assert_eq!((code, out.as_str()), (0, ""));
    assert!(
        answers(lab.client.tcp(pubv(8080)), "g1"),
        "network started re-asserts it"
    );
    // every other network and daemon call: exit 0, nothing on stdout, each re-asserts
    // (or leaves alone) and the forward keeps answering
    let port_xml = "<hookData><network><name>default</name><bridge name='virbr0'/></network><networkport><owner><name>g1</name></owner><mac address='52:54:00:00:00:0a'/><plug type='network' bridge='virbr0'/></networkport></hookData>";
    for (args, stdin) in [
        (
            ["network", "default", "updated", "begin", "-"],
            "<hookData/>",
        ),
        (
            ["network", "default", "port-created", "begin", "-"],
            port_xml,
        ),
        (
            ["network", "default", "port-deleted", "begin", "-"],
            port_xml,
        ),
        (["network", "default", "start", "begin", "-"], "<hookData/>"),
        (["daemon", "-", "start", "-", "start"], ""),
        (["daemon", "-", "shutdown", "-", "shutdown"], ""),
        (["lxc", "c1", "started", "begin", "-"], ""),
    ] {
        libvirt_rules::reload_nft(&lab.host);
        let (code, out, err) = lab.hook("nftables", &args, stdin);
        assert_eq!((code, out.as_str()), (0, ""), "{args:?}: {err}");
        let reasserts =
            matches!(args[2], "updated" | "port-created") || args[..3] == ["daemon", "-", "start"];
        assert_eq!(
            answers(lab.client.tcp(pubv(8080)), "g1"),
            reasserts,
            "{args:?}"
        );
    }
    // libvirtd restart: libvirt reloads its firewall (burying the accept), then calls
    // reconnect for each running guest, which re-asserts it
    libvirt_rules::reload_nft(&lab.host);
    assert!(!answers(lab.client.tcp(pubv(8080)), "g1"));
    let (code, _, _) = lab.hook(
        "nftables",
        &["qemu", "g1", "reconnect", "begin", "-"],
        &lab.domain_xml("g1"),
    );
    assert_eq!(code, 0);
    assert!(
        answers(lab.client.tcp(pubv(8080)), "g1"),
        "reconnect re-asserts the accept"
    );
}

/// libvirtd SIGHUP, as libvirt does it: the daemon hook `reload` first, then libvirt's
/// firewall reload, which buries what the hook re-asserted. The hook's follower
/// re-asserts after it, and is gone once its time is up.
#[test]
fn daemon_reload_hook_follows_libvirts_firewall_reload() {
    if !common::can_run_netns("daemon_reload_hook_follows_libvirts_firewall_reload") {
        return;
    }
    let lab = lab(LibvirtForm::Nftables);
    lab.write_config("[domain.g1]\nforwards = [\"8080:80\"]\n");
    let xml = lab.domain_xml("g1");
    let (code, _, err) = lab.hook("nftables", &["qemu", "g1", "started", "begin", "-"], &xml);
    assert_eq!(code, 0, "{err}");
    assert!(answers(lab.client.tcp(pubv(8080)), "g1"));
    let out = lab
        .command(
            &lab.config_path(),
            "nftables",
            &["hook", "daemon", "-", "reload", "begin", "SIGHUP"],
        )
        .env("VIRTGATE_FOLLOW_SECS", "3")
        .output()
        .unwrap();
    assert!(out.status.success() && out.stdout.is_empty(), "{out:?}");
    // libvirt's reload, then (within its time: libvirt reloads network after network)
    // another one
    for what in ["libvirt's reload", "a second reload"] {
        libvirt_rules::reload_nft(&lab.host);
        let t = std::time::Instant::now();
        while !answers(lab.client.tcp(pubv(8080)), "g1") {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(2),
                "the follower re-asserts the accept after {what}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        eprintln!("answering again {:?} after {what}", t.elapsed());
    }
    // its time is up: it has exited, and a later reload stays buried (until the next hook)
    std::thread::sleep(std::time::Duration::from_secs(4));
    libvirt_rules::reload_nft(&lab.host);
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(
        !answers(lab.client.tcp(pubv(8080)), "g1"),
        "the follower is bounded in time"
    );
}

const HOSTILE: [&str; 6] = [
    "a b \"c\"",
    "x;y$(reboot)`id`",
    "new\nline",
    "ünï 😀",
    "'single'",
    "<&>",
];

#[test]
fn hostile_names_and_a_concurrent_storm() {
    if !common::can_run_netns("hostile_names_and_a_concurrent_storm") {
        return;
    }
    let lab = lab(LibvirtForm::Iptables);
    let long_a = "L".repeat(200);
    let long_b = format!("{}M", "L".repeat(199));
    let mut names: Vec<String> = HOSTILE.iter().map(|s| s.to_string()).collect();
    names.push(long_a);
    names.push(long_b);
    while names.len() < 20 {
        names.push(format!("storm-{}", names.len()));
    }
    let mut cfg = String::new();
    for (i, n) in names.iter().enumerate() {
        let key = toml_quote(n);
        cfg.push_str(&format!(
            "[domain.{key}]\nguest_address = \"192.168.122.{}\"\nforwards = [\"{}:80\"]\n",
            100 + i,
            10000 + i
        ));
    }
    lab.write_config(&cfg);
    let (ok, out, err) = lab.virtgate("nftables", &["check"]);
    assert!(ok, "{out}{err}");
    storm(&lab, &names, &["started", "begin"]);
    let table = lab
        .host
        .exec(&["nft", "list", "map", "inet", "virtgate", "dnat_any4"]);
    let (_, status, _) = lab.virtgate("nftables", &["status"]);

    for (i, name) in names.iter().enumerate() {
        let key = format!("tcp . {} : 192.168.122.{} . 80", 10000 + i, 100 + i);
        assert_eq!(
            table.matches(&key).count(),
            1,
            "forward {i} ({name:?}) must be present exactly once:\n{table}\n{status}"
        );
    }
    assert_eq!(
        table.matches(" : 192.168.122.").count(),
        names.len(),
        "one DNAT element per forward, no collisions:\n{table}"
    );
    let (ok, out, _) = lab.virtgate("nftables", &["status", "--json"]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    for n in &names {
        assert!(
            v["forwards"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["domain"] == n.as_str() && f["state"] == "active"),
            "{n:?} not active:\n{out}"
        );
    }
    // and all stop again, concurrently
    storm(&lab, &names, &["stopped", "end"]);
    let (ok, out, _) = lab
        .host
        .try_exec(&["nft", "list", "table", "inet", "virtgate"]);
    assert!(!ok, "table must be gone after all stopped:\n{out}");
}

/// Runs the qemu hook `OP SUBOP` for every name at once, each on its own thread.
fn storm(lab: &Lab, names: &[String], op: &[&str; 2]) {
    std::thread::scope(|s| {
        for (i, n) in names.iter().enumerate() {
            s.spawn(move || {
                let mac = format!("52:54:00:10:00:{i:02x}");
                let xml = domain_xml(n, &mac, "default", "virbr0", &format!("vx{i}"));
                let (code, out, err) = lab.hook("nftables", &["qemu", n, op[0], op[1], "-"], &xml);
                assert_eq!((code, out.as_str()), (0, ""), "{n:?} {op:?}: {err}");
            });
        }
    });
}

fn toml_quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[test]
fn install_and_uninstall_keep_foreign_files() {
    if !common::can_run_netns("install_and_uninstall_keep_foreign_files") {
        return;
    }
    let lab = lab(LibvirtForm::Iptables);
    let hooks = lab.root().join("etc/libvirt/hooks");
    std::fs::create_dir_all(hooks.join("daemon.d")).unwrap(); // someone's empty directory
    std::fs::create_dir_all(hooks.join("qemu.d")).unwrap();
    std::fs::write(hooks.join("qemu"), "#!/bin/sh\n# foreign\n").unwrap();
    std::fs::write(hooks.join("qemu.d/other"), "#!/bin/sh\n# foreign too\n").unwrap();
    let _ = std::fs::remove_file(lab.config_path());
    let before = lab.ruleset();
    for round in 0..2 {
        let (ok, out, err) = lab.virtgate("nftables", &["install"]);
        assert!(ok, "install round {round}: {out}{err}");
        if round == 0 {
            assert!(
                out.contains("SIGHUP"),
                "a new hooks directory needs libvirtd to look again: {out}"
            );
            assert!(out.contains("example config"), "{out}");
        }
    }
    for d in ["qemu", "network", "daemon"] {
        let p = hooks.join(format!("{d}.d/virtgate"));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o755,
            "{}",
            p.display()
        );
    }
    assert_eq!(
        std::fs::read_to_string(hooks.join("qemu")).unwrap(),
        "#!/bin/sh\n# foreign\n"
    );
    // the installed copy, run as libvirt runs it, finds its settings
    lab.write_config("[domain.g1]\nforwards = [\"8080:80\"]\n");
    let hook = hooks.join("qemu.d/virtgate");
    let out = lab.host.exec_stdin(
        &[hook.to_str().unwrap(), "g1", "started", "begin", "-"],
        &lab.domain_xml("g1"),
    );
    assert_eq!(out, "");
    assert!(
        answers(lab.client.tcp(pubv(8080)), "g1 port 80"),
        "the installed hook applied the forward"
    );
    let cfg_before = std::fs::read_to_string(lab.config_path()).unwrap();
    // uninstall with other options: it uses the installed hook's state and backend
    let other = lab.dir.path().join("other-state");
    let root = lab.root();
    let (ok, out, err) = lab.host.try_exec(&[
        env!("CARGO_BIN_EXE_virtgate"),
        "--libvirt-root",
        root.to_str().unwrap(),
        "--config",
        lab.config_path().to_str().unwrap(),
        "--state-dir",
        other.to_str().unwrap(),
        "--backend",
        "iptables",
        "uninstall",
    ]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = lab.virtgate("nftables", &["uninstall"]);
    assert!(ok, "{out}{err}");
    assert!(
        !lab.state_dir().join("state.json").exists(),
        "state removed"
    );
    assert!(
        hooks.join("daemon.d").is_dir(),
        "a directory install did not create stays"
    );
    assert!(!hooks.join("qemu.d/virtgate").exists() && !hooks.join("network.d").exists());
    assert!(hooks.join("qemu.d/other").exists() && hooks.join("qemu").exists());
    assert_eq!(
        std::fs::read_to_string(lab.config_path()).unwrap(),
        cfg_before,
        "config kept"
    );
    let after = lab.ruleset();
    assert!(before == after, "{}", diff(&before, &after));
}
