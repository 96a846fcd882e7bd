//! `virtgate daemon` on the real kernel: it tells systemd it is ready, repairs within a
//! second what `nft flush ruleset` and libvirt's reload removed (both libvirt firewall
//! forms, both backends), turns a forward live when its guest's lease appears, stays
//! bounded under a burst of reloads, backs off from something that keeps removing its
//! rules, keeps a good config over a bad one on SIGHUP, and leaves forwards on SIGTERM.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{Lab, LibvirtForm, PUBLIC, sa};

const CONFIG: &str =
    "[domain.g1]\nforwards = [\"8080:80\"]\n[domain.g2]\nforwards = [\"8082:80\"]\n";

/// A running daemon, stopped on drop.
struct Daemon {
    child: Option<Child>,
    log: std::path::PathBuf,
    /// Its notification socket, as systemd's
    sock: UnixDatagram,
}

impl Daemon {
    /// The files its process maps (`ip netns exec` execs it: the child's pid is its own).
    fn maps(&self) -> String {
        let pid = self.child.as_ref().map(|c| c.id()).unwrap_or(0);
        std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default()
    }

    /// Starts it in the lab's host namespace and waits for READY=1 on a notify socket.
    fn start(lab: &Lab, backend: &str) -> Daemon {
        Daemon::spawn(lab, lab.command(&lab.config_path(), backend, &["daemon"]))
    }

    /// Runs `cmd` (a daemon) and waits for READY=1 on a notify socket.
    fn spawn(lab: &Lab, mut cmd: std::process::Command) -> Daemon {
        let sock_path = lab.dir.path().join("notify.sock");
        let _ = std::fs::remove_file(&sock_path);
        let sock = UnixDatagram::bind(&sock_path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let log = lab.dir.path().join("daemon.log");
        let child = cmd
            .env("NOTIFY_SOCKET", &sock_path)
            // as with WatchdogSec=400ms: it pings every 200 ms
            .env("WATCHDOG_USEC", "400000")
            .env("VIRTGATE_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let d = Daemon {
            child: Some(child),
            log,
            sock,
        };
        let mut buf = [0u8; 512];
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n = d
                .sock
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("no READY from the daemon ({e}):\n{}", d.log()));
            if String::from_utf8_lossy(&buf[..n]).contains("READY=1") {
                break;
            }
            assert!(Instant::now() < deadline, "no READY:\n{}", d.log());
        }
        d
    }

    /// The notifications it sent within `limit`, until one contains `want`.
    fn notified(&self, want: &str, limit: Duration) -> String {
        let mut all = String::new();
        let mut buf = [0u8; 512];
        let t = Instant::now();
        self.sock
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        while t.elapsed() < limit && !all.contains(want) {
            if let Ok(n) = self.sock.recv(&mut buf) {
                all.push_str(&String::from_utf8_lossy(&buf[..n]));
                all.push('\n');
            }
        }
        all
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        // `ip netns exec` execs the daemon: the child's pid is the daemon's
        common::run(&["kill", &format!("-{sig}"), &pid]);
    }

    /// Waits for it to exit; its exit status.
    fn wait(&mut self) -> std::process::ExitStatus {
        self.child.take().unwrap().wait().unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The daemon's report.
fn report(lab: &Lab) -> serde_json::Value {
    let text = std::fs::read_to_string(lab.state_dir().join("daemon.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Whether `cond` holds within `limit`.
fn within(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if t.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How long until `port` answers with `guest`'s name (None: not within `limit`).
fn answers_within(lab: &Lab, port: u16, guest: &str, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if lab
            .client
            .tcp(sa(&format!("{PUBLIC}:{port}")))
            .is_ok_and(|r| r.starts_with(guest))
        {
            return Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn heals_flush(form: LibvirtForm, backend: &str) {
    let lab = Lab::new(form);
    lab.write_config(CONFIG);
    let d = Daemon::start(&lab, backend);
    assert!(
        answers_within(&lab, 8080, "g1", Duration::from_secs(2)).is_some(),
        "the first reconcile applied:\n{}",
        d.log()
    );
    // everything gone, then libvirt loads its own rules again (as after a firewalld
    // reload): nothing runs virtgate's hook
    lab.host.exec(&["nft", "flush", "ruleset"]);
    if backend == "iptables" || form == LibvirtForm::Iptables {
        lab.host.exec(&["iptables", "-t", "nat", "-F"]);
    }
    lab.load_libvirt_firewall();
    let took = answers_within(&lab, 8080, "g1", Duration::from_secs(1));
    assert!(
        took.is_some(),
        "{form:?}/{backend}: not healed within 1 s:\n{}\n{}",
        d.log(),
        lab.ruleset()
    );
    // the report is written once the repair's transaction is done: the port may answer first
    assert!(
        within(Duration::from_secs(1), || report(&lab)["heals"].as_u64()
            >= Some(1)),
        "{}",
        d.log()
    );
    // and the status says all is well
    let (ok, out, err) = lab.virtgate(backend, &["status", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        v["forwards"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["domain"] == "g1")
            .all(|f| f["state"] == "active"),
        "{v}"
    );
}

#[test]
fn daemon_heals_a_flushed_ruleset_nftables_backend() {
    if !common::can_run_netns("daemon_heals_a_flushed_ruleset_nftables_backend") {
        return;
    }
    heals_flush(LibvirtForm::Iptables, "nftables");
    heals_flush(LibvirtForm::Nftables, "nftables");
}

#[test]
fn daemon_heals_a_flushed_ruleset_iptables_backend() {
    if !common::can_run_netns("daemon_heals_a_flushed_ruleset_iptables_backend") {
        return;
    }
    heals_flush(LibvirtForm::Iptables, "iptables");
    heals_flush(LibvirtForm::Nftables, "iptables");
}

/// What Docker's start does to the host's iptables: its chains first in FORWARD and nat
/// PREROUTING, and FORWARD's policy DROP.
const DOCKER_START: &[&[&str]] = &[
    &["iptables", "-N", "DOCKER-USER"],
    &["iptables", "-A", "DOCKER-USER", "-j", "RETURN"],
    &["iptables", "-N", "DOCKER-FORWARD"],
    &["iptables", "-I", "FORWARD", "1", "-j", "DOCKER-USER"],
    &["iptables", "-I", "FORWARD", "2", "-j", "DOCKER-FORWARD"],
    &["iptables", "-P", "FORWARD", "DROP"],
    &["iptables", "-t", "nat", "-N", "DOCKER"],
    &[
        "iptables",
        "-t",
        "nat",
        "-I",
        "PREROUTING",
        "1",
        "-m",
        "addrtype",
        "--dst-type",
        "LOCAL",
        "-j",
        "DOCKER",
    ],
];

fn survives_docker(form: LibvirtForm, backend: &str) {
    let lab = Lab::new(form);
    lab.write_config(CONFIG);
    let d = Daemon::start(&lab, backend);
    assert!(answers_within(&lab, 8080, "g1", Duration::from_secs(2)).is_some());
    std::thread::sleep(Duration::from_millis(300));
    for argv in DOCKER_START {
        lab.host.exec(argv);
    }
    assert!(
        answers_within(&lab, 8080, "g1", Duration::from_secs(1)).is_some(),
        "{form:?}/{backend}: not answering within 1 s of Docker's chains:\n{}\n{}",
        d.log(),
        lab.ruleset()
    );
}

#[test]
fn daemon_keeps_forwards_through_docker_starting() {
    if !common::can_run_netns("daemon_keeps_forwards_through_docker_starting") {
        return;
    }
    for form in [LibvirtForm::Iptables, LibvirtForm::Nftables] {
        for backend in ["nftables", "iptables"] {
            survives_docker(form, backend);
        }
    }
}

/// The daemon running with g2 pending: no reservation, no lease, no neighbour entry;
/// returns once the reconcile its own first commit wakes is over, so that only what the
/// test does next can wake it.
fn with_g2_pending(lab: &Lab) -> Daemon {
    lab.write_config(CONFIG);
    let leases = lab.root().join("var/lib/libvirt/dnsmasq/virbr0.status");
    std::fs::write(&leases, "[]\n").unwrap();
    lab.host.exec(&["ip", "neigh", "flush", "all"]);
    let d = Daemon::start(lab, "nftables");
    assert!(answers_within(lab, 8080, "g1", Duration::from_secs(2)).is_some());
    assert!(
        lab.client.tcp(sa(&format!("{PUBLIC}:8082"))).is_err(),
        "g2 is pending"
    );
    std::thread::sleep(Duration::from_millis(500));
    d
}

#[test]
fn daemon_turns_a_forward_live_when_the_lease_appears() {
    if !common::can_run_netns("daemon_turns_a_forward_live_when_the_lease_appears") {
        return;
    }
    let lab = Lab::new(LibvirtForm::Iptables);
    let leases = lab.root().join("var/lib/libvirt/dnsmasq/virbr0.status");
    let lease_text = std::fs::read_to_string(&leases).unwrap();
    let d = with_g2_pending(&lab);
    // libvirt's leases helper writes the new file and renames it into place
    let new = leases.with_extension("status.new");
    std::fs::write(&new, lease_text).unwrap();
    std::fs::rename(&new, &leases).unwrap();
    assert!(
        answers_within(&lab, 8082, "g2", Duration::from_secs(1)).is_some(),
        "g2 went live without a hook or apply:\n{}",
        d.log()
    );
}

#[test]
fn daemon_turns_a_forward_live_when_the_guest_shows_up_in_the_neighbour_table() {
    if !common::can_run_netns(
        "daemon_turns_a_forward_live_when_the_guest_shows_up_in_the_neighbour_table",
    ) {
        return;
    }
    let lab = Lab::new(LibvirtForm::Nftables);
    let d = with_g2_pending(&lab);
    // the guest speaks (ARP for its gateway): the host's neighbour table learns its MAC
    let g2 = lab.guests.iter().find(|g| g.name == "g2").unwrap();
    g2.ns.exec(&["ping", "-c", "1", "-W", "1", "192.168.122.1"]);
    assert!(
        answers_within(&lab, 8082, "g2", Duration::from_secs(1)).is_some(),
        "g2 went live from the neighbour table, without a hook or apply:\n{}\n{}",
        d.log(),
        lab.host.exec(&["ip", "neigh"])
    );
}

#[test]
fn daemon_stays_bounded_under_a_burst_and_backs_off_from_a_fight() {
    if !common::can_run_netns("daemon_stays_bounded_under_a_burst_and_backs_off_from_a_fight") {
        return;
    }
    let lab = Lab::new(LibvirtForm::Nftables);
    lab.write_config(CONFIG);
    let d = Daemon::start(&lab, "nftables");
    assert!(answers_within(&lab, 8080, "g1", Duration::from_secs(2)).is_some());
    let before = report(&lab)["reconciles"].as_u64().unwrap();
    // 100 reloads of libvirt's firewall in a row, each one transaction
    let reload = format!(
        "add table inet libvirt_network\ndelete table inet libvirt_network\n{}",
        common::libvirt_rules::nft_ruleset()
    );
    let file = lab.dir.path().join("reload.nft");
    std::fs::write(&file, reload).unwrap();
    for _ in 0..100 {
        lab.host.exec(&["nft", "-f", file.to_str().unwrap()]);
    }
    assert!(
        answers_within(&lab, 8080, "g1", Duration::from_secs(2)).is_some(),
        "healed after the burst:\n{}",
        d.log()
    );
    std::thread::sleep(Duration::from_millis(300));
    let runs = report(&lab)["reconciles"].as_u64().unwrap() - before;
    assert!(
        runs <= 20,
        "{runs} reconciles for 100 reloads:\n{}",
        d.log()
    );
    // something that keeps deleting virtgate's table: repairs slow down, and it says so
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(4) {
        let _ = lab
            .host
            .try_exec(&["nft", "delete", "table", "inet", "virtgate"]);
        std::thread::sleep(Duration::from_millis(150));
    }
    let r = report(&lab);
    assert!(r["backoff_secs"].as_u64().unwrap() >= 1, "{r}\n{}", d.log());
    assert!(r["heals"].as_u64().unwrap() <= 15, "{r}");
    assert!(d.log().contains("keeps removing"), "{}", d.log());
}

#[test]
fn daemon_keeps_a_good_config_on_sighup_and_leaves_forwards_on_sigterm() {
    if !common::can_run_netns("daemon_keeps_a_good_config_on_sighup_and_leaves_forwards_on_sigterm")
    {
        return;
    }
    let lab = Lab::new(LibvirtForm::Iptables);
    lab.write_config(CONFIG);
    let mut d = Daemon::start(&lab, "nftables");
    assert!(answers_within(&lab, 8080, "g1", Duration::from_secs(2)).is_some());
    // a broken config file: the daemon keeps the one it has
    lab.write_config("[domain.g1\nforwards = [");
    d.signal("HUP");
    std::thread::sleep(Duration::from_millis(500));
    assert!(answers_within(&lab, 8080, "g1", Duration::from_secs(1)).is_some());
    assert!(
        d.log().contains("keeping the one loaded before"),
        "{}",
        d.log()
    );
    // a good one with another port: live without apply
    lab.write_config(&CONFIG.replace("8080:80", "8090:80"));
    d.signal("HUP");
    assert!(
        answers_within(&lab, 8090, "g1", Duration::from_secs(1)).is_some(),
        "{}",
        d.log()
    );
    let msgs = d.notified("WATCHDOG=1", Duration::from_secs(1));
    assert!(msgs.contains("WATCHDOG=1"), "watchdog pings: {msgs}");
    // what is queued goes first: a full queue (10 datagrams) drops new messages
    d.notified("nothing", Duration::from_millis(300));
    d.signal("TERM");
    let msgs = d.notified("STOPPING=1", Duration::from_secs(2));
    assert!(msgs.contains("STOPPING=1"), "{msgs}");
    assert!(d.wait().success(), "{}", d.log());
    assert!(
        answers_within(&lab, 8090, "g1", Duration::from_secs(1)).is_some(),
        "forwards stay after the daemon exits"
    );
}

/// systemd's own tools read the unit: `systemd-analyze verify` finds nothing wrong in it
/// (but the man page, not installed here), and `systemctl --root` enables it (its
/// `[Install]` section), as `install --daemon` runs `systemctl enable --now` where systemd
/// runs (not here: no systemd is PID 1 in these namespaces).
fn systemd_accepts(unit: &std::path::Path) {
    if !std::path::Path::new("/usr/bin/systemctl").exists() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "systemd's tools are missing (scripts/deps installs them)"
        );
        eprintln!("SKIPPED the systemd checks: no systemctl");
        return;
    }
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(unit)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    let problems: Vec<&str> = said
        .lines()
        .filter(|l| !l.contains("man virtgate") && !l.contains("non-existent unit"))
        .collect();
    assert!(problems.is_empty(), "systemd-analyze verify:\n{said}");
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("etc/systemd/system");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(unit, dir.join("virtgate.service")).unwrap();
    let st = std::process::Command::new("systemctl")
        .arg(format!("--root={}", root.path().display()))
        .args(["enable", "virtgate.service"])
        .output()
        .unwrap();
    assert!(st.status.success(), "{st:?}");
    // the link is absolute inside the root
    assert_eq!(
        std::fs::read_link(dir.join("multi-user.target.wants/virtgate.service")).ok(),
        Some("/etc/systemd/system/virtgate.service".into()),
        "enabled: {st:?}"
    );
}

#[test]
fn install_daemon_writes_a_unit_whose_command_runs_the_daemon() {
    if !common::can_run_netns("install_daemon_writes_a_unit_whose_command_runs_the_daemon") {
        return;
    }
    let lab = Lab::new(LibvirtForm::Iptables);
    lab.write_config(CONFIG);
    let units = lab.dir.path().join("units");
    let units_arg = units.to_str().unwrap();
    let (ok, out, err) = lab.virtgate(
        "nftables",
        &["install", "--daemon", "--unit-dir", units_arg],
    );
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("systemctl enable --now virtgate.service"),
        "{out}"
    );
    let unit = std::fs::read_to_string(units.join("virtgate.service")).unwrap();
    assert!(
        unit.contains("Type=notify") && unit.contains("ExecReload=/bin/kill -HUP $MAINPID"),
        "{unit}"
    );
    systemd_accepts(&units.join("virtgate.service"));
    // what systemd would run: the binary with install's options (no spaces in these paths)
    let exec: Vec<&str> = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap()
        .split(' ')
        .collect();
    assert_eq!(exec.last(), Some(&"daemon"), "{exec:?}");
    assert!(
        exec.contains(&"--state-dir") && exec.contains(&"--backend"),
        "{exec:?}"
    );
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", &lab.host.name]).args(&exec);
    let d = Daemon::spawn(&lab, cmd);
    assert!(
        answers_within(&lab, 8080, "g1", Duration::from_secs(2)).is_some(),
        "{}",
        d.log()
    );
    let (ok, out, err) = lab.virtgate("nftables", &["status"]);
    assert!(ok && out.contains("daemon: running"), "{out}{err}");
    let (_, out, _) = lab.virtgate("nftables", &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let pid = u64::from(d.child.as_ref().unwrap().id());
    assert_eq!(v["daemon"]["pid"].as_u64(), Some(pid), "{v}");
    drop(d);
    let (_, out, _) = lab.virtgate("nftables", &["status"]);
    assert!(out.contains("daemon: not running"), "{out}");
    // a plain `install` later keeps (and rewrites) the unit; uninstall removes it
    let (ok, out, err) = lab.virtgate("nftables", &["install"]);
    assert!(ok && out.contains("virtgate.service"), "{out}{err}");
    let (ok, out, err) = lab.virtgate("nftables", &["uninstall"]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("systemctl disable --now virtgate.service"),
        "{out}"
    );
    assert!(!units.join("virtgate.service").exists());
    // a unit virtgate did not write is never replaced
    let foreign = "[Service]\nExecStart=/bin/true\n";
    std::fs::write(units.join("virtgate.service"), foreign).unwrap();
    let (ok, _, err) = lab.virtgate(
        "nftables",
        &["install", "--daemon", "--unit-dir", units_arg],
    );
    assert!(!ok && err.contains("not written by virtgate"), "{err}");
    assert!(
        !lab.root()
            .join("etc/libvirt/hooks/qemu.d/virtgate")
            .exists(),
        "nothing installed"
    );
    assert_eq!(
        std::fs::read_to_string(units.join("virtgate.service")).unwrap(),
        foreign
    );
}

#[test]
fn daemon_applies_a_config_edit_without_a_signal() {
    if !common::can_run_netns("daemon_applies_a_config_edit_without_a_signal") {
        return;
    }
    let lab = Lab::new(LibvirtForm::Iptables);
    lab.write_config(CONFIG);
    let d = Daemon::start(&lab, "nftables");
    assert!(answers_within(&lab, 8080, "g1", Duration::from_secs(2)).is_some());
    std::thread::sleep(Duration::from_millis(500));
    // an editor saving the file (inotify on the config directory), and a conf.d file
    lab.write_config(&CONFIG.replace("8080:80", "8091:80"));
    assert!(
        answers_within(&lab, 8091, "g1", Duration::from_secs(1)).is_some(),
        "{}",
        d.log()
    );
    // g3 is known from the neighbour table; that event passes first
    lab.ping_from_host("192.168.100.10");
    let confd = lab.config_path().parent().unwrap().join("conf.d");
    std::fs::create_dir_all(&confd).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // a conf.d that did not exist when the daemon started
    std::fs::write(
        confd.join("more.toml"),
        "[domain.g3]\nforwards = [\"8093:80\"]\n",
    )
    .unwrap();
    assert!(
        answers_within(&lab, 8093, "g3", Duration::from_secs(1)).is_some(),
        "{}",
        d.log()
    );
}

#[test]
fn status_apply_and_check_ask_the_daemon_on_its_root_only_socket() {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    if !common::can_run_netns("status_apply_and_check_ask_the_daemon_on_its_root_only_socket") {
        return;
    }
    let lab = Lab::new(LibvirtForm::Iptables);
    lab.write_config(CONFIG);
    let mut d = Daemon::start(&lab, "nftables");
    let pid = d.child.as_ref().unwrap().id();
    let sock = lab.state_dir().join("daemon.sock");
    let meta = std::fs::symlink_metadata(&sock).expect("the control socket");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.uid(), 0);
    // status: the live report comes from the socket (the report file is not needed)
    std::fs::remove_file(lab.state_dir().join("daemon.json")).unwrap();
    let (ok, out, err) = lab.virtgate("nftables", &["status", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["daemon"]["pid"], pid, "{v}");
    assert!(v["daemon"]["reconciles"].as_u64() >= Some(1), "{v}");
    let (_, out, _) = lab.virtgate("nftables", &["status"]);
    assert!(
        out.contains(&format!("daemon: running (pid {pid})")),
        "{out}"
    );
    // check: the daemon runs this config
    let (ok, out, _) = lab.virtgate("nftables", &["check"]);
    assert!(
        ok && out.contains(&format!("daemon (pid {pid}): runs this config")),
        "{out}"
    );
    // apply: the daemon reloads and applies at once, and says so
    lab.write_config(&CONFIG.replace("8080:80", "8095:80"));
    let (ok, out, err) = lab.virtgate("nftables", &["apply"]);
    assert!(ok, "{out} {err}\n{}", d.log());
    assert!(out.contains(&format!("by the daemon, pid {pid}")), "{out}");
    assert!(
        answers_within(&lab, 8095, "g1", Duration::from_millis(100)).is_some(),
        "answers once apply returns"
    );
    // a config the daemon cannot use: check says it keeps the last one
    lab.write_config("[domain.g1\n");
    let (ok, out, _) = lab.virtgate("nftables", &["check"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!(
            "daemon (pid {pid}): keeps running the last config it could use"
        )),
        "{out}"
    );
    assert!(answers_within(&lab, 8095, "g1", Duration::from_secs(1)).is_some());
    // another backend on the command line is applied here, with a warning
    lab.write_config(CONFIG);
    let (ok, out, err) = lab.virtgate("iptables", &["apply"]);
    assert!(ok && !out.contains("by the daemon"), "{out}");
    assert!(err.contains("applying here"), "{err}");
    // SIGTERM: the socket goes; without a daemon the commands work alone
    d.signal("TERM");
    assert!(d.wait().success());
    assert!(!sock.exists(), "the socket is removed on exit");
    let (ok, out, err) = lab.virtgate("nftables", &["apply"]);
    assert!(ok && !out.contains("by the daemon"), "{out} {err}");
    let (_, out, _) = lab.virtgate("nftables", &["status"]);
    assert!(out.contains("daemon: not running"), "{out}");
}

#[test]
fn a_second_daemon_is_refused_and_a_dead_ones_socket_is_taken_over() {
    if !common::can_run_netns("a_second_daemon_is_refused_and_a_dead_ones_socket_is_taken_over") {
        return;
    }
    let lab = Lab::new(LibvirtForm::Iptables);
    lab.write_config(CONFIG);
    let mut first = Daemon::start(&lab, "nftables");
    let out = lab
        .command(&lab.config_path(), "nftables", &["daemon"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another daemon answers"), "{err}");
    // killed: its socket is left behind, and the next daemon takes it over
    first.signal("KILL");
    first.wait();
    assert!(lab.state_dir().join("daemon.sock").exists());
    let second = Daemon::start(&lab, "nftables");
    let pid = second.child.as_ref().unwrap().id();
    let (_, out, _) = lab.virtgate("nftables", &["status"]);
    assert!(
        out.contains(&format!("daemon: running (pid {pid})")),
        "{out}"
    );
}

/// One HTTP GET from the lab's host namespace: status line and body.
fn http_get(lab: &Lab, addr: &str, path: &str) -> Result<(String, String), String> {
    let (addr, path) = (addr.to_string(), path.to_string());
    lab.host.in_ns(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&addr).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").map_err(|e| e.to_string())?;
        let mut text = String::new();
        s.read_to_string(&mut text).map_err(|e| e.to_string())?;
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        Ok((
            head.lines().next().unwrap_or("").to_string(),
            body.to_string(),
        ))
    })
}

/// A sample's value in OpenMetrics text.
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The metrics page (empty when it cannot be had).
fn scrape(lab: &Lab) -> String {
    http_get(lab, "127.0.0.1:19465", "/metrics")
        .map(|(_, t)| t)
        .unwrap_or_default()
}

#[test]
fn metrics_count_each_forwards_traffic_and_the_daemons_work() {
    if !common::can_run_netns("metrics_count_each_forwards_traffic_and_the_daemons_work") {
        return;
    }
    let lab = Lab::new(LibvirtForm::Iptables);
    lab.write_config(CONFIG);
    // off unless asked for
    let plain = Daemon::start(&lab, "nftables");
    assert!(http_get(&lab, "127.0.0.1:19465", "/metrics").is_err());
    drop(plain);
    let cmd = lab.command(
        &lab.config_path(),
        "nftables",
        &["daemon", "--metrics", "127.0.0.1:19465"],
    );
    let d = Daemon::spawn(&lab, cmd);
    assert!(answers_within(&lab, 8080, "g1", Duration::from_secs(2)).is_some());
    for _ in 0..3 {
        assert!(lab.client.tcp(sa(&format!("{PUBLIC}:8080"))).is_ok());
    }
    let (status, text) = http_get(&lab, "127.0.0.1:19465", "/metrics").unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK", "{text}\n{}", d.log());
    let g1 = r#"{domain="g1",proto="tcp",listen="*",host_ports="8080",guest_ports="80"}"#;
    let packets = sample(&text, &format!("virtgate_forward_packets_total{g1}")).expect(&text);
    assert!(
        packets >= 12.0,
        "3 connections, both ways: {packets}\n{text}"
    );
    assert!(sample(&text, &format!("virtgate_forward_bytes_total{g1}")) > Some(0.0));
    assert_eq!(
        sample(&text, &format!("virtgate_forward_active{g1}")),
        Some(1.0)
    );
    assert!(
        sample(&text, "virtgate_daemon_reconciles_total") >= Some(1.0),
        "{text}"
    );
    assert!(text.contains("virtgate_daemon_heals_total 0"), "{text}");
    assert!(text.trim_end().ends_with("# EOF"));
    // the counters follow the traffic: exactly 3 more connections
    let conns = sample(&text, &format!("virtgate_forward_connections_total{g1}")).expect(&text);
    assert!(conns >= 3.0, "{text}");
    for _ in 0..3 {
        assert!(lab.client.tcp(sa(&format!("{PUBLIC}:8080"))).is_ok());
    }
    let mut last = String::new();
    assert!(
        within(Duration::from_secs(2), || {
            last = scrape(&lab);
            sample(&last, &format!("virtgate_forward_packets_total{g1}")) > Some(packets)
                && sample(&last, &format!("virtgate_forward_connections_total{g1}"))
                    == Some(conns + 3.0)
        }),
        "{packets} before:\n{last}\n{}",
        d.log()
    );
    // the heals the daemon counts are the metric's: the ruleset flushed, the forward
    // answers again, and the scrape says what the daemon's report says (whether the repair
    // is counted as one is `heals_flush`'s to check: here the first apply may count as one
    // too, when its own commit's event is still pending)
    lab.host.exec(&["nft", "flush", "ruleset"]);
    lab.load_libvirt_firewall();
    assert!(answers_within(&lab, 8080, "g1", Duration::from_secs(2)).is_some());
    let mut last = String::new();
    assert!(
        within(Duration::from_secs(2), || {
            last = scrape(&lab);
            let heals = report(&lab)["heals"].as_u64().map(|h| h as f64);
            heals.is_some() && sample(&last, "virtgate_daemon_heals_total") == heals
        }),
        "the metric is not the report's count:\n{last}\n{}",
        d.log()
    );
    let (status, _) = http_get(&lab, "127.0.0.1:19465", "/other").unwrap();
    assert_eq!(status, "HTTP/1.1 404 Not Found");
}

#[test]
fn the_daemon_follows_libvirts_events_where_it_can_and_its_files_anyway() {
    if !common::can_run_netns(
        "the_daemon_follows_libvirts_events_where_it_can_and_its_files_anyway",
    ) {
        return;
    }
    let lab = Lab::new(LibvirtForm::Iptables);
    lab.write_config(CONFIG);
    // libvirt's in-process test driver: always there to connect to
    let cmd = lab.command(
        &lab.config_path(),
        "nftables",
        &["daemon", "--libvirt-uri", "test:///default"],
    );
    let d = Daemon::spawn(&lab, cmd);
    assert!(
        within(Duration::from_secs(3), || {
            let (_, out, _) = lab.virtgate("nftables", &["status", "--json"]);
            serde_json::from_str::<serde_json::Value>(&out)
                .is_ok_and(|v| v["daemon"]["libvirt_connects"] == 1)
        }),
        "{}",
        d.log()
    );
    let (_, out, _) = lab.virtgate("nftables", &["status"]);
    assert!(out.contains("from libvirt's event API"), "{out}");
    assert!(
        d.maps().contains("libvirt.so"),
        "the test driver is libvirt's library's"
    );
    drop(d);
    // a libvirt that is not there: retried, and the forwards are kept all the same
    let nowhere = format!(
        "qemu+unix:///system?socket={}",
        lab.dir.path().join("none.sock").display()
    );
    let cmd = lab.command(
        &lab.config_path(),
        "nftables",
        &["daemon", "--libvirt-uri", &nowhere],
    );
    let d = Daemon::spawn(&lab, cmd);
    // a local libvirt is followed by virtgate's own client: libvirt's library stays out
    assert!(!d.maps().is_empty() && !d.maps().contains("libvirt.so"));
    assert!(answers_within(&lab, 8080, "g1", Duration::from_secs(2)).is_some());
    lab.host
        .exec(&["nft", "delete", "table", "inet", "virtgate"]);
    assert!(
        answers_within(&lab, 8080, "g1", Duration::from_secs(1)).is_some(),
        "{}",
        d.log()
    );
    let (_, out, _) = lab.virtgate("nftables", &["status"]);
    assert!(
        out.contains("not connected to libvirt's event API"),
        "{out}"
    );
}

/// A guest of virbr0 that no reservation, lease or neighbour entry names: its namespace
/// (no IPv4 address yet, so that it sends nothing of its own), its tap, its status file.
fn bare_guest(lab: &Lab, name: &str, tap: &str, last: u8) -> (common::Netns, [u8; 6]) {
    let ns = common::Netns::new(name);
    let mac = [0x52, 0x54, 0, 0, 0, last];
    let text = format!("52:54:00:00:00:{last:02x}");
    lab.host.veth(tap, &ns, "eth0");
    lab.host.ip(&["link", "set", tap, "master", "virbr0", "up"]);
    ns.ip(&["link", "set", "eth0", "address", &text]);
    ns.ip(&["link", "set", "eth0", "up"]);
    common::serve(&ns, name, &[80], &[]);
    let xml = format!(
        "<domstatus state='running' reason='booted' pid='1'>\n{}</domstatus>\n",
        common::domain_xml(name, &text, "default", "virbr0", tap)
    );
    std::fs::write(lab.root().join(format!("run/libvirt/qemu/{name}.xml")), xml).unwrap();
    (ns, mac)
}

/// Sends one raw frame out of `ifname` in `ns`.
fn send_frame(ns: &common::Netns, ifname: &str, frame: Vec<u8>) {
    let ifname = std::ffi::CString::new(ifname).unwrap();
    ns.in_ns(move || {
        // SAFETY: plain socket calls with buffers that outlive them
        unsafe {
            let s = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(s >= 0, "packet socket");
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = libc::if_nametoindex(ifname.as_ptr()) as i32;
            sll.sll_halen = 6;
            sll.sll_addr[..6].copy_from_slice(&frame[..6]);
            let n = libc::sendto(
                s,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            libc::close(s);
            assert_eq!(n, frame.len() as isize, "frame sent");
        }
    });
}

/// The status row of `domain`'s forward.
fn status_row(lab: &Lab, domain: &str) -> serde_json::Value {
    let (ok, out, err) = lab.virtgate("nftables", &["status", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["forwards"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["domain"] == domain)
        .cloned()
        .unwrap_or_default()
}

fn snooped_as(lab: &Lab, domain: &str, ip: &str) -> bool {
    let r = status_row(lab, domain);
    r["state"] == "active"
        && r["guest"]
            .as_array()
            .is_some_and(|g| g.iter().any(|g| g["ip"] == ip && g["source"] == "snooped"))
}

/// SPEC part 3's last source: the daemon learns a guest's address on its own tap from a
/// DHCP ACK to its MAC, an ARP from it, its first IPv4 or IPv6 packet, and the forward
/// answers (from outside, over IPv6 too); claims outside the subnet or of another guest's
/// reservation are refused and `status` says why; a guest whose lease holds cannot move
/// its forward by claiming another address.
#[test]
fn daemon_learns_guest_addresses_by_snooping_on_their_taps() {
    if !common::can_run_netns("daemon_learns_guest_addresses_by_snooping_on_their_taps") {
        return;
    }
    let lab = Lab::new(LibvirtForm::Nftables);
    let names = ["s5", "s6", "s7", "s8", "s9"];
    let mut config = String::new();
    for (i, n) in names.iter().enumerate() {
        config.push_str(&format!("[domain.{n}]\nforwards = [\"{}:80\"]\n", 8090 + i));
    }
    lab.write_config(&config);
    let guests: Vec<(common::Netns, [u8; 6])> = names
        .iter()
        .enumerate()
        .map(|(i, n)| bare_guest(&lab, n, &format!("vnet{}", 5 + i), 0x20 + i as u8))
        .collect();
    let d = Daemon::start(&lab, "nftables");
    for n in names {
        assert_eq!(
            status_row(&lab, n)["state"],
            "pending",
            "{n} has no address yet"
        );
    }
    let v4 = |s: &str| s.parse::<std::net::Ipv4Addr>().unwrap();
    let snoop = virtgate::facts::snoop_frames::udp4;
    let bcast = [0xff; 6];
    let limit = Duration::from_secs(1);
    // s5: its first packet (a broadcast: no ARP, nothing for the neighbour table), IPv4
    // and IPv6
    let (s5, m5) = &guests[0];
    send_frame(
        s5,
        "eth0",
        snoop(
            *m5,
            bcast,
            v4("192.168.122.40"),
            v4("255.255.255.255"),
            9,
            9,
            b"hi",
        ),
    );
    let six: std::net::Ipv6Addr = "fd00:122::40".parse().unwrap();
    send_frame(
        s5,
        "eth0",
        virtgate::facts::snoop_frames::udp6(*m5, six, b"hi"),
    );
    assert!(
        within(limit, || snooped_as(&lab, "s5", "192.168.122.40")
            && snooped_as(&lab, "s5", "fd00:122::40")),
        "s5 learned from its first packets: {}\n{}",
        status_row(&lab, "s5"),
        d.log()
    );
    // s6: an ARP announcement
    let (s6, m6) = &guests[1];
    send_frame(
        s6,
        "eth0",
        virtgate::facts::snoop_frames::arp_announce(*m6, v4("192.168.122.41")),
    );
    assert!(
        within(limit, || snooped_as(&lab, "s6", "192.168.122.41")),
        "s6: {}",
        d.log()
    );
    // s7: dnsmasq's ACK (sent here from the host onto its tap), then a claim of another
    // address while the lease holds
    let (s7, m7) = &guests[2];
    let bridge_mac = [0xfe, 0x54, 0, 0, 0, 1];
    let ack = virtgate::facts::snoop_frames::dhcp_ack(
        bridge_mac,
        v4("192.168.122.1"),
        *m7,
        v4("192.168.122.42"),
        600,
    );
    send_frame(&lab.host, "vnet7", ack);
    assert!(
        within(limit, || snooped_as(&lab, "s7", "192.168.122.42")),
        "s7: {}",
        d.log()
    );
    send_frame(
        s7,
        "eth0",
        snoop(
            *m7,
            bcast,
            v4("192.168.122.43"),
            v4("255.255.255.255"),
            9,
            9,
            b"mine now",
        ),
    );
    assert!(
        within(limit, || d.log().contains(
            "claims 192.168.122.43 while it holds 192.168.122.42: refused"
        )),
        "{}",
        d.log()
    );
    assert!(
        snooped_as(&lab, "s7", "192.168.122.42"),
        "s7 keeps its leased address"
    );
    // s8 claims an address outside the subnet, s9 g1's reservation: refused, and said why
    let (s8, m8) = &guests[3];
    send_frame(
        s8,
        "eth0",
        snoop(*m8, bcast, v4("10.9.9.9"), v4("255.255.255.255"), 9, 9, b""),
    );
    let (s9, m9) = &guests[4];
    send_frame(
        s9,
        "eth0",
        virtgate::facts::snoop_frames::arp_announce(*m9, v4("192.168.122.10")),
    );
    for (n, ip, why) in [
        ("s8", "10.9.9.9", "outside the subnet"),
        ("s9", "192.168.122.10", "another domain's"),
    ] {
        assert!(
            within(limit, || {
                let r = status_row(&lab, n);
                r["state"] == "pending"
                    && r["note"]
                        .as_str()
                        .is_some_and(|s| s.contains(ip) && s.contains(why))
            }),
            "{n}: {}",
            status_row(&lab, n)
        );
    }
    // the learned forwards answer, once the guests use their addresses
    for (ns, ip) in [
        (s5, "192.168.122.40"),
        (s6, "192.168.122.41"),
        (s7, "192.168.122.42"),
    ] {
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        ns.ip(&["route", "add", "default", "via", "192.168.122.1"]);
    }
    s5.ip(&["addr", "add", "fd00:122::40/64", "dev", "eth0", "nodad"]);
    s5.ip(&["-6", "route", "add", "default", "via", "fd00:122::1"]);
    for (port, who) in [(8090, "s5"), (8091, "s6"), (8092, "s7")] {
        assert!(
            answers_within(&lab, port, who, Duration::from_secs(2)).is_some(),
            "{who} answers"
        );
    }
    assert!(
        within(Duration::from_secs(3), || lab
            .client
            .tcp(sa("[2001:db8:1::1]:8090"))
            .is_ok_and(|r| r.starts_with("s5 port 80 from 2001:db8:1::2"))),
        "s5 answers over IPv6"
    );
    // s5 stops: what was learned on its tap is forgotten
    lab.remove_domain_status("s5");
    assert!(
        within(Duration::from_secs(2), || !std::fs::read_to_string(
            lab.state_dir().join("snooped.json")
        )
        .unwrap_or_default()
        .contains("192.168.122.40")),
        "{}",
        d.log()
    );
}
