//! The command line as a user meets it: help for every command, usage errors exit 2,
//! `check` errors with file:line:col exit 1, `render` changes nothing, man page and
//! completions. No root needed.

use std::process::Command;

fn vg(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_virtgate"))
        .args(args)
        .env_remove("VIRTGATE_CONFIG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_for_every_command() {
    let (code, out, _) = vg(&["--help"]);
    assert_eq!(code, 0);
    for cmd in [
        "check",
        "render",
        "apply",
        "status",
        "add",
        "remove",
        "import-hooks-json",
        "diagnose",
        "daemon",
        "hook",
        "install",
        "uninstall",
        "completions",
        "man",
    ] {
        assert!(out.contains(cmd), "{cmd} missing from --help");
        let (code, out, err) = vg(&[cmd, "--help"]);
        assert_eq!(code, 0, "{cmd}: {err}");
        assert!(
            out.contains("Example"),
            "{cmd} --help has no example:\n{out}"
        );
    }
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(vg(&["--bogus"]).0, 2);
    assert_eq!(vg(&["nosuchcommand"]).0, 2);
    assert_eq!(vg(&["--backend", "pf", "check"]).0, 2);
}

#[test]
fn check_reports_positions_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("virtgate.toml");
    std::fs::write(
        &cfg,
        "[domain.web]\nforwards = [\"8080:80\", \"80-90:80\"]\n",
    )
    .unwrap();
    let (code, out, _) = vg(&["--config", cfg.to_str().unwrap(), "check"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("{}:2:24: error: domain \"web\"", cfg.display())),
        "{out}"
    );
    std::fs::write(&cfg, "[domain.web]\nforwards = [\"8080:80\"]\n").unwrap();
    std::fs::create_dir(dir.path().join("conf.d")).unwrap();
    std::fs::write(
        dir.path().join("conf.d/10-api.toml"),
        "[domain.api]\nforwards = [\"8081:80/udp\"]\n",
    )
    .unwrap();
    let (code, out, _) = vg(&["--config", cfg.to_str().unwrap(), "check"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("2 domain(s), 2 forward(s), 0 error(s) in 2 file(s)"),
        "{out}"
    );
}

#[test]
fn render_prints_without_changing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("virtgate.toml");
    std::fs::write(
        &cfg,
        "[domain.web]\nguest_address = \"192.168.122.10\"\nforwards = [\"8080:80\"]\n",
    )
    .unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("run/libvirt/qemu")).unwrap();
    std::fs::write(
        root.join("run/libvirt/qemu/web.xml"),
        "<domstatus><domain><name>web</name><devices><interface type='bridge'><mac address='52:54:00:00:00:01'/><source bridge='virbr0'/><target dev='vnet0'/></interface></devices></domain></domstatus>",
    )
    .unwrap();
    // the guest's bridge is libvirt's network: a guest address must lie on it
    std::fs::create_dir_all(root.join("run/libvirt/network")).unwrap();
    std::fs::write(
        root.join("run/libvirt/network/default.xml"),
        "<networkstatus><network><name>default</name><forward mode='nat'/><bridge name='virbr0'/><ip address='192.168.122.1' prefix='24'/></network></networkstatus>",
    )
    .unwrap();
    let state = dir.path().join("state");
    let common = [
        "--config",
        cfg.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
        "--libvirt-root",
        root.to_str().unwrap(),
    ];
    let (code, out, err) = vg(&[&common[..], &["--backend", "nftables", "render"]].concat());
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("tcp . 8080 : 192.168.122.10 . 80") && out.contains("map @dnat_any4"),
        "{out}"
    );
    let (code, out, _) = vg(&[&common[..], &["--backend", "iptables", "render"]].concat());
    assert_eq!(code, 0);
    assert!(
        out.contains("--dport 8080") && out.contains("--to-destination 192.168.122.10:80"),
        "{out}"
    );
    assert!(!state.exists(), "render must not write state");
}

#[test]
fn man_page_and_completions() {
    let (code, out, _) = vg(&["man"]);
    assert_eq!(code, 0);
    assert!(out.contains(".TH virtgate 8"), "{out}");
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, _) = vg(&["completions", shell]);
        assert_eq!(code, 0);
        // the script asks the binary at each TAB
        assert!(
            out.contains("COMPLETE") && out.contains("virtgate"),
            "{shell}: {out}"
        );
    }
}

/// What the binary answers a shell's completion request with (fish's form: one
/// candidate per line, a tab before its help).
fn complete(words: &[&str]) -> Vec<String> {
    let mut argv = vec!["--", "virtgate"];
    argv.extend_from_slice(words);
    let out = Command::new(env!("CARGO_BIN_EXE_virtgate"))
        .args(&argv)
        .env("COMPLETE", "fish")
        .env_remove("VIRTGATE_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split('\t').next().unwrap_or("").to_string())
        .collect()
}

#[test]
fn completions_know_commands_and_the_config_domains() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("virtgate.toml");
    std::fs::write(
        &cfg,
        "[domain.web]\nforwards = [\"8080:80\"]\n[domain.db]\nforwards = [\"5432\"]\n[domain.broken]\nforwards = [\"0:1\"]\n",
    )
    .unwrap();
    let c = cfg.to_str().unwrap();
    assert!(complete(&["un"]).contains(&"uninstall".to_string()));
    for cmd in ["diagnose", "add", "remove"] {
        let got = complete(&["--config", c, cmd, ""]);
        for d in ["web", "db", "broken"] {
            assert!(got.contains(&d.to_string()), "{cmd}: {got:?}");
        }
        let got = complete(&["--config", c, cmd, "w"]);
        assert_eq!(got, ["web"], "{cmd}");
    }
    // through bash itself, with the script `completions bash` prints
    let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_virtgate"))
        .parent()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let script = format!(
        "source <(virtgate completions bash); COMP_WORDS=(virtgate --config {c} diagnose d); COMP_CWORD=4; _clap_complete_virtgate virtgate d diagnose; printf '%s\\n' \"${{COMPREPLY[@]}}\""
    );
    let out = Command::new("bash")
        .args(["-c", &script])
        .env(
            "PATH",
            format!("{bin_dir}:{}", std::env::var("PATH").unwrap_or_default()),
        )
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "db", "{out:?}");
}

#[test]
fn a_closed_pipe_ends_output_quietly() {
    // `virtgate man | head -1`: the reader goes away before the output is written
    for args in [&["man"][..], &["completions", "bash"], &["--help"]] {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_virtgate"))
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(c.stdout.take());
        let out = c.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.is_empty(), "{args:?}: {err}");
        use std::os::unix::process::ExitStatusExt;
        assert!(
            out.status.success()
                || out.status.code() == Some(141)
                || out.status.signal() == Some(libc::SIGPIPE),
            "{args:?}: {:?} {err}",
            out.status
        );
    }
}

#[test]
fn install_refresh_replaces_only_the_copies_install_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap().to_string();
    let cfg = dir.path().join("virtgate.toml");
    let state = dir.path().join("state");
    let opts = [
        "--libvirt-root",
        root.as_str(),
        "--config",
        cfg.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ];
    let run = |extra: &[&str]| {
        let args: Vec<&str> = opts.iter().chain(extra).copied().collect();
        vg(&args)
    };
    let hooks = dir.path().join("etc/libvirt/hooks");
    // never installed: nothing is added
    let (code, out, err) = run(&["install", "--refresh"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("nothing to refresh"), "{out}");
    assert!(!hooks.exists(), "refresh created {}", hooks.display());
    let (code, out, err) = run(&["install"]);
    assert_eq!(code, 0, "{out}{err}");
    // an older binary in one copy, another copy removed by the admin, a foreign hook
    std::fs::write(
        hooks.join("qemu.d/virtgate"),
        b"#!/bin/sh\n# an older virtgate\n",
    )
    .unwrap();
    std::fs::remove_file(hooks.join("network.d/virtgate")).unwrap();
    std::fs::write(hooks.join("qemu.d/other"), b"#!/bin/sh\n").unwrap();
    let (code, out, err) = run(&["install", "--refresh"]);
    assert_eq!(code, 0, "{out}{err}");
    let me = std::fs::read(env!("CARGO_BIN_EXE_virtgate")).unwrap();
    for d in ["qemu", "daemon"] {
        let p = hooks.join(format!("{d}.d/virtgate"));
        assert!(
            std::fs::read(&p).unwrap() == me,
            "{} not refreshed",
            p.display()
        );
        assert!(out.contains(&format!("refreshed {}", p.display())), "{out}");
    }
    assert!(
        !hooks.join("network.d/virtgate").exists(),
        "refresh re-added a removed copy"
    );
    assert_eq!(
        std::fs::read(hooks.join("qemu.d/other")).unwrap(),
        b"#!/bin/sh\n"
    );
    // --refresh is not an install with a unit
    assert_eq!(run(&["install", "--refresh", "--daemon"]).0, 2);
}
