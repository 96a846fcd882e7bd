//! The file-system trust boundary, with the real binary: what `install` creates under
//! `umask 000`, a state directory others can write to, symlinks planted in it, an
//! untrusted hook settings file, a config file swapped between its check and its read,
//! and a libvirt status file that is a symlink to `/dev/zero`. Each of these was a way, for someone who is not root, to steer what
//! virtgate does as root, or to stall it.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Lab, LibvirtForm};

const CONFIG: &str = "[domain.g1]\nforwards = [\"8080:80\"]\n";

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn output(mut c: std::process::Command) -> (bool, String, String) {
    let o = c.output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn install_under_umask_000_creates_nothing_others_can_write() {
    if !common::can_run_netns("install_under_umask_000_creates_nothing_others_can_write") {
        return;
    }
    let lab = Lab::new(LibvirtForm::Iptables);
    let config = lab.dir.path().join("new-etc/virtgate/virtgate.toml");
    let mut c = lab.command(&config, "nftables", &["install"]);
    // SAFETY: umask is async-signal-safe; nothing else runs in the child before exec
    unsafe {
        c.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let (ok, out, err) = output(c);
    assert!(ok, "{out}{err}");
    let hooks = lab.root().join("etc/libvirt/hooks");
    for d in ["qemu", "network", "daemon"] {
        assert_eq!(mode(&hooks.join(format!("{d}.d"))), 0o755, "{d}.d");
        assert_eq!(mode(&hooks.join(format!("{d}.d/virtgate"))), 0o755);
    }
    assert_eq!(mode(&hooks.join("virtgate-hook.toml")), 0o644);
    assert_eq!(mode(config.parent().unwrap()), 0o755, "/etc/virtgate");
    assert_eq!(mode(&config), 0o644);
}

#[test]
fn a_state_dir_others_can_write_to_is_refused_and_nothing_changes() {
    if !common::can_run_netns("a_state_dir_others_can_write_to_is_refused_and_nothing_changes") {
        return;
    }
    let lab = Lab::new(LibvirtForm::Iptables);
    lab.write_config(CONFIG);
    std::fs::create_dir_all(lab.state_dir()).unwrap();
    std::fs::set_permissions(lab.state_dir(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let before = lab.ruleset();
    let (ok, _, err) = lab.virtgate("nftables", &["apply"]);
    assert!(!ok && err.contains("not safe to use"), "{err}");
    assert!(err.contains(lab.state_dir().to_str().unwrap()), "{err}");
    assert_eq!(lab.ruleset(), before, "nothing applied");
    // made virtgate's own again: it works
    std::fs::set_permissions(lab.state_dir(), std::fs::Permissions::from_mode(0o700)).unwrap();
    lab.apply("nftables");
    // and a state dir virtgate creates is 0700, under umask 000 too
    let fresh = lab.dir.path().join("fresh-state");
    let mut c = std::process::Command::new("ip");
    c.args([
        "netns",
        "exec",
        &lab.host.name,
        env!("CARGO_BIN_EXE_virtgate"),
    ])
    .arg("--config")
    .arg(lab.config_path())
    .arg("--libvirt-root")
    .arg(lab.root())
    .arg("--state-dir")
    .arg(&fresh)
    .arg("apply");
    // SAFETY: umask is async-signal-safe; nothing else runs in the child before exec
    unsafe {
        c.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let _ = output(c);
    assert_eq!(mode(&fresh), 0o700);
}

#[test]
fn symlinks_planted_in_the_state_dir_are_not_followed() {
    if !common::can_run_netns("symlinks_planted_in_the_state_dir_are_not_followed") {
        return;
    }
    let lab = Lab::new(LibvirtForm::Iptables);
    lab.write_config(CONFIG);
    lab.apply("nftables");
    let state = lab.state_dir();
    // the lock: a symlink to a file that does not exist yet
    let target = lab.dir.path().join("created-by-root");
    std::fs::remove_file(state.join("lock")).unwrap();
    std::os::unix::fs::symlink(&target, state.join("lock")).unwrap();
    let (ok, _, err) = lab.virtgate("nftables", &["apply"]);
    assert!(!ok, "a symlinked lock is refused");
    assert!(err.contains("lock"), "{err}");
    assert!(!target.exists(), "its target was not created");
    std::fs::remove_file(state.join("lock")).unwrap();
    // the state file: a symlink to a file of someone else's is not read as the state
    let other = lab.dir.path().join("someone-elses.json");
    std::fs::copy(state.join("state.json"), &other).unwrap();
    std::fs::remove_file(state.join("state.json")).unwrap();
    std::os::unix::fs::symlink(&other, state.join("state.json")).unwrap();
    let (ok, _, err) = lab.virtgate("nftables", &["apply"]);
    assert!(!ok, "a symlinked state file is refused: {err}");
    assert!(err.contains("state.json"), "{err}");
}

#[test]
fn an_untrusted_hook_settings_file_is_ignored() {
    if !common::can_run_netns("an_untrusted_hook_settings_file_is_ignored") {
        return;
    }
    let lab = Lab::new(LibvirtForm::Iptables);
    lab.write_config(CONFIG);
    let (ok, out, err) = lab.virtgate("nftables", &["install"]);
    assert!(ok, "{out}{err}");
    let hooks = lab.root().join("etc/libvirt/hooks");
    let settings = hooks.join("virtgate-hook.toml");
    // someone who may write the file points root's hooks at a state dir of theirs
    let theirs = lab.dir.path().join("their-state");
    let text = std::fs::read_to_string(&settings)
        .unwrap()
        .replace(lab.state_dir().to_str().unwrap(), theirs.to_str().unwrap());
    std::fs::write(&settings, text).unwrap();
    std::fs::set_permissions(&settings, std::fs::Permissions::from_mode(0o666)).unwrap();
    // `migrate` does nothing: the settings are read (and refused) before that
    let hook = hooks.join("qemu.d/virtgate");
    let (_, _, err) = lab
        .host
        .try_exec(&[hook.to_str().unwrap(), "g1", "migrate", "begin", "-"]);
    assert!(
        err.contains("virtgate-hook.toml") && err.contains("ignored"),
        "{err}"
    );
    assert!(!theirs.exists());
    // trusted again: its settings are used
    std::fs::set_permissions(&settings, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (_, _, err) = lab
        .host
        .try_exec(&[hook.to_str().unwrap(), "g1", "migrate", "begin", "-"]);
    assert!(!err.contains("ignored"), "{err}");
}

#[test]
fn a_status_file_linked_to_dev_zero_costs_nothing() {
    if !common::can_run_netns("a_status_file_linked_to_dev_zero_costs_nothing") {
        return;
    }
    let lab = Lab::new(LibvirtForm::Iptables);
    lab.write_config(CONFIG);
    let qemu = lab.root().join("run/libvirt/qemu");
    std::os::unix::fs::symlink("/dev/zero", qemu.join("evil.xml")).unwrap();
    let leases = lab.root().join("var/lib/libvirt/dnsmasq/virbr1.status");
    std::os::unix::fs::symlink("/dev/zero", &leases).unwrap();
    let t = Instant::now();
    let (ok, out, err) = lab.virtgate("nftables", &["apply"]);
    assert!(ok, "{out}{err}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(
        err.contains("evil.xml") && err.contains("not a regular file"),
        "{err}"
    );
    assert!(
        lab.client
            .tcp(common::sa(&format!("{}:8080", common::PUBLIC)))
            .is_ok_and(|r| r.starts_with("g1")),
        "the rest is applied"
    );
}

/// The owner and mode checks of a config file hold for what is then read: a file swapped
/// between the check and the read (here a symlink flipped, as fast as it can be, between
/// a trusted file and one anyone may write) is never read as trusted. Checking the path,
/// then reading the path, let the writable file through within a few hundred loads.
#[test]
fn a_config_file_swapped_between_check_and_read_is_never_trusted() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let trusted = dir.path().join("trusted.toml");
    let writable = dir.path().join("writable.toml");
    std::fs::write(&trusted, "[domain.good]\nforwards = [\"8080:80\"]\n").unwrap();
    std::fs::write(&writable, "[domain.evil]\nforwards = [\"8080:80\"]\n").unwrap();
    std::fs::set_permissions(&trusted, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(&writable, std::fs::Permissions::from_mode(0o666)).unwrap();
    let main = dir.path().join("virtgate.toml");
    std::os::unix::fs::symlink(&trusted, &main).unwrap();
    let stop = AtomicBool::new(false);
    let (mut good, mut refused, mut evil) = (0u32, 0u32, 0u32);
    std::thread::scope(|s| {
        s.spawn(|| {
            let tmp = dir.path().join("flip");
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let target = if n.is_multiple_of(2) {
                    &writable
                } else {
                    &trusted
                };
                let _ = std::fs::remove_file(&tmp);
                std::os::unix::fs::symlink(target, &tmp).unwrap();
                std::fs::rename(&tmp, &main).unwrap();
                n += 1;
            }
        });
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            match virtgate::config::load(&main) {
                Ok(c) if c.domains.contains_key("evil") => evil += 1,
                Ok(c) if c.domains.contains_key("good") => good += 1,
                Ok(_) => {}
                Err(_) => refused += 1,
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert_eq!(
        evil, 0,
        "read a writable file as trusted {evil} times ({good} trusted, {refused} refused)"
    );
    // both sides of the flip were seen: the race was run, not missed
    assert!(good > 0 && refused > 0, "{good} trusted, {refused} refused");
}
