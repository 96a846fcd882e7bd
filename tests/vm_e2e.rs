//! End to end with a REAL libvirtd and REAL VMs (TESTBED.md): libvirtd runs inside a
//! network namespace the test creates, boots two tiny guests (Debian's cloud kernel and a
//! busybox initramfs, built by tests/vm/build-guest.sh) that get their addresses from
//! libvirt's dnsmasq, and virtgate, installed as libvirt's hook, publishes their ports.
//! Traffic comes from a client namespace. Nothing in the root namespace changes.
//!
//! Skips (with the reason) where libvirtd cannot run; under CI=true it fails instead.

mod common;
#[path = "vm/debian13.rs"]
mod debian13;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Netns, diff, sa};

const PUBLIC: &str = "203.0.113.1";
const MAC_A: &str = "52:54:00:7b:00:0a";
const MAC_B: &str = "52:54:00:7b:00:0b";
const MAC_C: &str = "52:54:00:7b:00:0c";
const IP_A: &str = "192.168.122.50";

fn virsh(args: &[&str]) -> (bool, String) {
    let out = Command::new("virsh")
        .args(["-q", "-c", "qemu:///system"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("virsh");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn must_virsh(args: &[&str]) -> String {
    let (ok, out) = virsh(args);
    assert!(ok, "virsh {args:?}: {out}");
    out
}

fn pid_alive(pidfile: &str) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()?;
    (nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()).then_some(pid)
}

/// Why this machine cannot run the test, if it cannot.
fn blocker() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root".into());
    }
    for b in [
        "/usr/sbin/libvirtd",
        "/usr/sbin/virtlogd",
        "/usr/bin/virsh",
        "/usr/bin/qemu-system-x86_64",
        "/usr/sbin/dnsmasq",
    ] {
        if !Path::new(b).exists() {
            return Some(format!("{b} is not installed (run scripts/deps --vm)"));
        }
    }
    if let Some(pid) = pid_alive("/run/libvirtd.pid") {
        return Some(format!(
            "a libvirtd (pid {pid}) already runs on this machine; only one can"
        ));
    }
    None
}

fn accel() -> &'static str {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpu.split_whitespace().any(|w| w == "vmx" || w == "svm");
    if hw && Path::new("/dev/kvm").exists() && !Path::new("/sys/module/kvm_pvm").exists() {
        "kvm"
    } else {
        "qemu"
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn http_get(ns: &Netns, addr: SocketAddr) -> Result<String, String> {
    ns.in_ns(move || {
        let mut s =
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(3))).ok();
        s.write_all(b"GET / HTTP/1.0\r\n\r\n")
            .map_err(|e| e.to_string())?;
        let mut out = String::new();
        s.read_to_string(&mut out).map_err(|e| e.to_string())?;
        out.split("\r\n\r\n")
            .nth(1)
            .map(|b| b.trim().to_string())
            .ok_or(format!("bad answer {out:?}"))
    })
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}

/// SIGHUP to libvirtd, and a wait until it has done all a SIGHUP does: its network
/// driver reloads its firewall last (LIBVIRT-FACTS.md), deleting and re-inserting its
/// rules, which gives them new handles in the nf_tables listing.
fn sighup_libvirtd(host_exec: &dyn Fn(&[&str]) -> String) {
    let handles = || libvirt_rules(&host_exec(&["nft", "-a", "list", "ruleset"]));
    let before = handles();
    assert!(
        !before.is_empty(),
        "libvirt has no rules to reload: is its network up?"
    );
    let lvpid = pid_alive("/run/libvirtd.pid").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(lvpid),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    wait_for("libvirtd reloaded its firewall after SIGHUP", 30, || {
        handles() != before && virsh(&["version"]).0
    });
}

/// The rules (with their handles) of libvirt's own chains, in either firewall form:
/// `LIBVIRT_*` chains (iptables form) and the `libvirt_network` tables (nftables form).
fn libvirt_rules(listing: &str) -> Vec<String> {
    let (mut table, mut chain) = (String::new(), String::new());
    let mut out = Vec::new();
    for line in listing.lines().map(str::trim) {
        if let Some(t) = line.strip_prefix("table ") {
            table = t.to_string();
        } else if let Some(c) = line.strip_prefix("chain ") {
            chain = c.to_string();
        } else if line.contains("# handle")
            && (chain.starts_with("LIBVIRT") || table.contains("libvirt_network"))
        {
            out.push(format!(
                "{table} {chain} {}",
                virtgate::firewall::strip_counters(line)
            ));
        }
    }
    out
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(secs) {
        if f() {
            eprintln!("[{:>5.1}s] {what}", t.elapsed().as_secs_f32());
            return;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    panic!("timed out after {secs} s waiting for: {what}");
}

struct Env {
    host: Netns,
    client: Netns,
    dir: tempfile::TempDir,
    logdir: PathBuf,
}

impl Env {
    fn virtgate(&self, args: &[&str]) -> String {
        let cfg = self.dir.path().join("virtgate.toml");
        let state = self.dir.path().join("state");
        let mut a = vec![
            env!("CARGO_BIN_EXE_virtgate"),
            "--config",
            cfg.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--backend",
            "nftables",
        ];
        a.extend_from_slice(args);
        self.host.exec(&a)
    }

    fn start_libvirtd(&self) {
        let log = format!("3:file:{}/libvirtd.log", self.logdir.display());
        let st = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.host.name,
                "env",
                &format!("LIBVIRT_LOG_OUTPUTS={log}"),
                "/usr/sbin/libvirtd",
                "-d",
            ])
            .status()
            .unwrap();
        assert!(st.success(), "libvirtd -d failed");
        wait_for("libvirtd answers", 30, || {
            pid_alive("/run/libvirtd.pid").is_some() && virsh(&["version"]).0
        });
    }

    fn stop_libvirtd(&self) {
        if let Some(pid) = pid_alive("/run/libvirtd.pid") {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
            let t = Instant::now();
            while pid_alive("/run/libvirtd.pid") == Some(pid)
                && t.elapsed() < Duration::from_secs(30)
            {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    fn domain_xml(&self, name: &str, mac: &str, probe: &str) -> String {
        let g = repo().join("target/vm-guest");
        format!(
            "<domain type='{}'>\n  <name>{name}</name>\n  <memory unit='MiB'>128</memory>\n  <vcpu>1</vcpu>\n  <os>\n    <type arch='x86_64' machine='pc'>hvm</type>\n    <kernel>{}/vmlinuz</kernel>\n    <initrd>{}/initrd.gz</initrd>\n    <cmdline>console=ttyS0 vgname={name} vgprobe={probe}</cmdline>\n  </os>\n  <features><acpi/></features>\n  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>\n  <devices>\n    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n    <interface type='network'><mac address='{mac}'/><source network='default'/><model type='virtio'/></interface>\n    <serial type='file'><source path='{}/{name}.serial'/><target port='0'/></serial>\n    <console type='file'><source path='{}/{name}.serial'/><target type='serial' port='0'/></console>\n    <memballoon model='none'/>\n  </devices>\n</domain>\n",
            accel(),
            g.display(),
            g.display(),
            self.logdir.display(),
            self.logdir.display()
        )
    }

    fn serial(&self, name: &str) -> String {
        std::fs::read_to_string(self.logdir.join(format!("{name}.serial"))).unwrap_or_default()
    }
}

fn cleanup(env: Option<&Env>) {
    for d in ["vgA", "vgB", "vgC"] {
        let _ = virsh(&["destroy", d]);
        let _ = virsh(&["undefine", d]);
    }
    if let Some(env) = env {
        let _ = virsh(&["net-destroy", "default"]);
        env.stop_libvirtd();
        if let Some(pid) = pid_alive("/run/virtlogd.pid") {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        // our hook files, if the test died before uninstall
        for d in ["qemu", "network", "daemon"] {
            let _ = std::fs::remove_file(format!("/etc/libvirt/hooks/{d}.d/virtgate"));
            let _ = std::fs::remove_dir(format!("/etc/libvirt/hooks/{d}.d"));
        }
        let _ = std::fs::remove_file("/etc/libvirt/hooks/virtgate-hook.toml");
    }
}

struct Guard<'a>(&'a Env);
impl Drop for Guard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- logs in {} (kept)", self.0.logdir.display());
            for n in ["vgA", "vgB", "vgC"] {
                eprintln!(
                    "--- {n} serial (tail):\n{}",
                    self.0
                        .serial(n)
                        .lines()
                        .rev()
                        .take(8)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
        }
        cleanup(Some(self.0));
    }
}

/// One libvirtd at a time: the tests here run theirs on the host and in a chroot.
static ONE_LIBVIRTD: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The firewall form libvirt is expected to use (`VG_LIBVIRT_FORM`, set where the test
/// runs against libvirt 11 on its nftables backend): checked once its network is up.
fn check_libvirt_form(ruleset: &str) {
    if std::env::var("VG_LIBVIRT_FORM").as_deref() == Ok("nftables") {
        assert!(
            ruleset.contains("table ip libvirt_network") && !ruleset.contains("LIBVIRT_FWI"),
            "libvirt must use its nftables backend here:\n{ruleset}"
        );
    }
}

/// The same test against libvirt 11.3 on its own nftables firewall backend, in a Debian
/// 13 root this test builds: the hook, SIGHUP (libvirt buries the accept right after the
/// reload hook), restart, metadata, uninstall, and the daemon alone (a lease going live,
/// flush + SIGHUP, restart), with libvirt's real rules instead of replayed ones.
#[test]
fn real_libvirt11_nftables_real_vms() {
    let why = blocker().or_else(debian13::blocker);
    if let Some(why) = why {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("the libvirt 11 real-VM test cannot run here: {why}");
        }
        eprintln!("SKIPPED real_libvirt11_nftables_real_vms: {why}");
        return;
    }
    let _one = ONE_LIBVIRTD.lock().unwrap_or_else(|e| e.into_inner());
    // the guest is built on the host (the root has no busybox or compiler)
    common::run(&[
        repo().join("tests/vm/build-guest.sh").to_str().unwrap(),
        repo().join("target/vm-guest").to_str().unwrap(),
    ]);
    let t0 = Instant::now();
    let root = debian13::build(&repo()).unwrap();
    eprintln!(
        "[{:>5.1}s] Debian 13 root ready",
        t0.elapsed().as_secs_f32()
    );
    let mounted = debian13::Mounted::new(&root, &repo()).unwrap();
    let me = std::env::current_exe().unwrap();
    let out = Command::new("chroot")
        .arg(mounted.root())
        .arg(&me)
        .args(["--exact", "real_libvirtd_real_vms", "--nocapture"])
        .env("VG_LIBVIRT_FORM", "nftables")
        .env("CI", std::env::var("CI").unwrap_or_default())
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("--- inside the Debian 13 root:\n{log}");
    assert!(
        out.status.success(),
        "the real-VM test on libvirt 11 failed"
    );
    assert!(
        log.contains("libvirt 11.") && log.contains("1 passed") && !log.contains("SKIPPED"),
        "it ran, against libvirt 11"
    );
}

#[test]
fn real_libvirtd_real_vms() {
    if let Some(why) = blocker() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("the real-VM test cannot run here: {why}");
        }
        eprintln!("SKIPPED real_libvirtd_real_vms: {why}");
        return;
    }
    let _one = ONE_LIBVIRTD.lock().unwrap_or_else(|e| e.into_inner());
    let t0 = Instant::now();
    common::run(&[repo().join("tests/vm/setup-host.sh").to_str().unwrap()]);
    common::run(&[
        repo().join("tests/vm/build-guest.sh").to_str().unwrap(),
        repo().join("target/vm-guest").to_str().unwrap(),
    ]);
    eprintln!(
        "[{:>5.1}s] host set up, guest built (accel {})",
        t0.elapsed().as_secs_f32(),
        accel()
    );

    let host = Netns::new("vh");
    let client = Netns::new("vc");
    host.uplink(
        "eth0",
        &client,
        "203.0.113.1/24",
        "203.0.113.2/24",
        "203.0.113.1",
    );
    let dir = tempfile::tempdir().unwrap();
    let logdir = repo().join("target/vm-e2e-logs");
    let _ = std::fs::remove_dir_all(&logdir);
    std::fs::create_dir_all(&logdir).unwrap();
    let env = Env {
        host,
        client,
        dir,
        logdir,
    };
    cleanup(None);
    let _guard = Guard(&env);
    let host_exec = |args: &[&str]| env.host.exec(args);

    // libvirtd (and virtlogd, which a privileged libvirtd does not spawn) in the host netns
    host_exec(&["/usr/sbin/virtlogd", "-d"]);
    env.start_libvirtd();
    // dnsmasq's lease file outlives the network: start from a clean one
    let _ = std::fs::remove_file("/var/lib/libvirt/dnsmasq/virbr0.status");
    let (ok, out) = virsh(&["net-start", "default"]);
    assert!(ok || out.contains("already active"), "{out}");
    must_virsh(&[
        "net-update",
        "default",
        "add-last",
        "ip-dhcp-host",
        &format!("<host mac='{MAC_A}' ip='{IP_A}'/>"),
        "--live",
    ]);
    let before = virtgate::firewall::strip_counters(&host_exec(&["nft", "list", "ruleset"]));
    check_libvirt_form(&before);
    eprintln!(
        "{}",
        must_virsh(&["version"])
            .lines()
            .find(|l| l.contains("libvirt"))
            .unwrap_or("")
    );

    // install the hook; libvirtd sees the new hook directories after SIGHUP
    std::fs::write(
        env.dir.path().join("virtgate.toml"),
        "[domain.vgA]\nforwards = [\"8080:80\", \"5353:53535/udp\"]\n\n[domain.vgB]\nforwards = [\"8081:80\"]\n",
    )
    .unwrap();
    let out = env.virtgate(&["install"]);
    assert!(out.contains("SIGHUP"), "{out}");
    eprintln!(
        "host# virtgate install\n{}host# cat virtgate.toml\n{}",
        indent(&out),
        indent(&std::fs::read_to_string(env.dir.path().join("virtgate.toml")).unwrap())
    );
    sighup_libvirtd(&host_exec);

    // two VMs: A has a <dhcp><host> reservation, B only gets a lease. A probes B's forward
    // through the public address from inside the guest.
    for (name, mac, probe) in [
        ("vgA", MAC_A, format!("{PUBLIC}:8081")),
        ("vgB", MAC_B, format!("{PUBLIC}:8080")),
    ] {
        let xml = env.dir.path().join(format!("{name}.xml"));
        std::fs::write(&xml, env.domain_xml(name, mac, &probe)).unwrap();
        must_virsh(&["define", xml.to_str().unwrap()]);
        must_virsh(&["start", name]);
    }
    // B had no address when it started: its forward is pending until it has a lease
    let status = env.virtgate(&["status"]);
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("vgB") && l.contains("pending")),
        "{status}"
    );
    let pubv = |p: u16| sa(&format!("{PUBLIC}:{p}"));
    wait_for("A answers through its forward (TCP)", 180, || {
        http_get(&env.client, pubv(8080)).is_ok_and(|b| b == format!("vm-guest-ok vgA {IP_A}"))
    });
    let udp = env.client.udp(pubv(5353));
    assert_eq!(udp.as_deref(), Ok("ping"), "UDP through A's forward");
    eprintln!(
        "client$ GET http://{PUBLIC}:8080/  ->  {:?}\nclient$ UDP {PUBLIC}:5353 \"ping\"  ->  {udp:?}",
        http_get(&env.client, pubv(8080))
    );
    wait_for("B got its lease", 180, || {
        std::fs::read_to_string("/var/lib/libvirt/dnsmasq/virbr0.status")
            .is_ok_and(|s| s.contains(MAC_B))
    });
    // destroy B: its rules go exactly, A keeps answering
    let with_b_pending = virtgate::firewall::strip_counters(&host_exec(&[
        "nft", "list", "table", "inet", "virtgate",
    ]));
    must_virsh(&["destroy", "vgB"]);
    let after_destroy = virtgate::firewall::strip_counters(&host_exec(&[
        "nft", "list", "table", "inet", "virtgate",
    ]));
    assert!(
        with_b_pending == after_destroy,
        "B had no rules yet:\n{}",
        diff(&with_b_pending, &after_destroy)
    );
    // start B again: dnsmasq hands the same address back to its MAC, so the hook applies it
    must_virsh(&["start", "vgB"]);
    let status = env.virtgate(&["status"]);
    assert!(
        status.contains("(lease)"),
        "B's forward must be active from its lease at start:\n{status}"
    );
    wait_for("B answers through its forward", 180, || {
        http_get(&env.client, pubv(8081)).is_ok_and(|b| b.starts_with("vm-guest-ok vgB"))
    });
    wait_for(
        "guest A reaches B's forward through the public address",
        60,
        || env.serial("vgA").contains("PROBE vm-guest-ok vgB"),
    );
    wait_for(
        "guest B reaches A's forward through the public address",
        60,
        || env.serial("vgB").contains("PROBE vm-guest-ok vgA"),
    );
    eprintln!(
        "client$ GET http://{PUBLIC}:8081/  ->  {:?}\nhost# virtgate status\n{}",
        http_get(&env.client, pubv(8081)),
        indent(&env.virtgate(&["status"]))
    );

    // destroy B while A runs: B's rules are gone, A still answers
    let b_rule = "tcp . 8081 : ";
    let table = host_exec(&["nft", "list", "table", "inet", "virtgate"]);
    assert!(
        table.contains(b_rule),
        "B's DNAT element is there:\n{table}"
    );
    must_virsh(&["destroy", "vgB"]);
    assert!(
        http_get(&env.client, pubv(8081)).is_err(),
        "B's forward must be gone"
    );
    let table = host_exec(&["nft", "list", "table", "inet", "virtgate"]);
    assert!(
        !table.contains(b_rule),
        "B's DNAT element is gone:\n{table}"
    );
    assert!(
        http_get(&env.client, pubv(8080)).is_ok(),
        "A keeps answering"
    );
    must_virsh(&["start", "vgB"]);
    wait_for("B answers again after restart", 180, || {
        http_get(&env.client, pubv(8081)).is_ok_and(|b| b.starts_with("vm-guest-ok vgB"))
    });

    // libvirtd SIGHUP: libvirt reloads its firewall; the forwards keep answering
    sighup_libvirtd(&host_exec);
    for (p, who) in [(8080, "vgA"), (8081, "vgB")] {
        wait_for(&format!("{who} answers after SIGHUP"), 10, || {
            http_get(&env.client, pubv(p)).is_ok_and(|b| b.contains(who))
        });
    }
    // libvirtd restart: reconnect hooks; still answering
    env.stop_libvirtd();
    env.start_libvirtd();
    for (p, who) in [(8080, "vgA"), (8081, "vgB")] {
        wait_for(
            &format!("{who} answers after a libvirtd restart"),
            20,
            || http_get(&env.client, pubv(p)).is_ok_and(|b| b.contains(who)),
        );
    }

    // vgB's forward moves from the config file into its own <metadata> (virsh metadata,
    // live and persistent), and out again
    let out = env.virtgate(&["remove", "vgB", "8081:80"]);
    assert!(out.contains("wrote"), "{out}");
    wait_for("B's forward is gone with its config entry", 10, || {
        http_get(&env.client, pubv(8081)).is_err()
    });
    let out = env.virtgate(&[
        "add",
        "--metadata",
        "vgB",
        "8081:80",
        "--description",
        "from <metadata>",
    ]);
    assert!(out.contains("--live --config"), "{out}");
    wait_for("B answers through the forward in its metadata", 10, || {
        http_get(&env.client, pubv(8081)).is_ok_and(|b| b.starts_with("vm-guest-ok vgB"))
    });
    let inactive = must_virsh(&["dumpxml", "--inactive", "vgB"]);
    assert!(
        inactive.contains("https://virtgate.dev/xmlns/1") && inactive.contains("8081:80"),
        "persistent too:\n{inactive}"
    );
    let (ok, _, err) = env.host.try_exec(&[
        env!("CARGO_BIN_EXE_virtgate"),
        "--config",
        env.dir.path().join("virtgate.toml").to_str().unwrap(),
        "--state-dir",
        env.dir.path().join("state").to_str().unwrap(),
        "--backend",
        "nftables",
        "add",
        "--metadata",
        "vgB",
        "8081:80",
    ]);
    assert!(
        !ok && err.contains("already has"),
        "the same forward twice: {err}"
    );
    env.virtgate(&["remove", "--metadata", "vgB", "8081:80"]);
    wait_for("B's metadata forward is gone", 10, || {
        http_get(&env.client, pubv(8081)).is_err()
    });
    let (_, out) = virsh(&["metadata", "vgB", "https://virtgate.dev/xmlns/1"]);
    assert!(!out.contains("8081"), "{out}");

    // uninstall: hook files and rules gone, ruleset as before install
    let out = env.virtgate(&["uninstall"]);
    assert!(out.contains("removed all"), "{out}");
    assert!(!Path::new("/etc/libvirt/hooks/qemu.d/virtgate").exists());
    let after = virtgate::firewall::strip_counters(&host_exec(&["nft", "list", "ruleset"]));
    assert!(
        before == after,
        "ruleset after uninstall differs from before install:\n{}",
        diff(&before, &after)
    );
    assert!(http_get(&env.client, pubv(8080)).is_err());

    // the daemon alone, with no hook installed
    daemon_phase(&env);
    eprintln!("[{:>5.1}s] done", t0.elapsed().as_secs_f32());
}

/// How many times the running daemon has connected to libvirt's event API.
fn libvirt_connects(env: &Env) -> u64 {
    serde_json::from_str::<serde_json::Value>(&env.virtgate(&["status", "--json"]))
        .ok()
        .and_then(|v| v["daemon"]["libvirt_connects"].as_u64())
        .unwrap_or(0)
}

/// The daemon, killed on drop.
struct RunningDaemon(std::process::Child);
impl Drop for RunningDaemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The daemon with no hook installed: it puts the config's forwards in place, a VM with
/// no reservation and no earlier lease goes live when dnsmasq hands it an address (nobody
/// runs apply), and after `nft flush ruleset` and a libvirtd SIGHUP every forward answers
/// again within 3 s.
fn daemon_phase(env: &Env) {
    let cfg = env.dir.path().join("virtgate.toml");
    let state = env.dir.path().join("state");
    let log = std::fs::File::create(env.logdir.join("daemon.log")).unwrap();
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &env.host.name,
            env!("CARGO_BIN_EXE_virtgate"),
        ])
        .args(["--config", cfg.to_str().unwrap()])
        .args(["--state-dir", state.to_str().unwrap()])
        .args(["--backend", "nftables", "-v", "daemon"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut daemon = RunningDaemon(child);
    wait_for("the daemon answers on its socket", 20, || {
        env.virtgate(&["status"]).contains("daemon: running")
    });
    // libvirt's events through virtgate's own client: connected, no libvirt library
    wait_for("the daemon follows libvirt's events", 10, || {
        libvirt_connects(env) == 1
    });
    let pid = daemon.0.id();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(!maps.is_empty() && !maps.contains("libvirt.so"), "{maps}");
    let pubv = |p: u16| sa(&format!("{PUBLIC}:{p}"));
    wait_for("A answers: the daemon installed its forward", 10, || {
        http_get(&env.client, pubv(8080)).is_ok_and(|b| b.contains("vgA"))
    });
    let out = env.virtgate(&["add", "vgC", "8082:80"]);
    assert!(out.contains("wrote"), "{out}");
    let xml = env.dir.path().join("vgC.xml");
    std::fs::write(
        &xml,
        env.domain_xml("vgC", MAC_C, &format!("{PUBLIC}:8080")),
    )
    .unwrap();
    must_virsh(&["define", xml.to_str().unwrap()]);
    must_virsh(&["start", "vgC"]);
    // running, before the guest has an address
    let status = env.virtgate(&["status"]);
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("vgC") && l.contains("pending")),
        "{status}"
    );
    let pubv = |p: u16| sa(&format!("{PUBLIC}:{p}"));
    wait_for(
        "C answers once dnsmasq gave it a lease (the daemon)",
        180,
        || http_get(&env.client, pubv(8082)).is_ok_and(|b| b.starts_with("vm-guest-ok vgC")),
    );
    let status = env.virtgate(&["status"]);
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("vgC") && l.contains("(lease)") && l.contains("active")),
        "{status}"
    );
    eprintln!(
        "client$ GET http://{PUBLIC}:8082/  ->  {:?}  (live from its lease, by the daemon)",
        http_get(&env.client, pubv(8082))
    );
    // someone flushes the whole ruleset, then libvirtd gets SIGHUP (libvirt 9 does not
    // re-create its own chains then: it makes them once per libvirtd, so its reload
    // fails and only a restart brings them back; virtgate's forwards need none of them)
    env.host.exec(&["nft", "flush", "ruleset"]);
    let lvpid = pid_alive("/run/libvirtd.pid").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(lvpid),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let t = Instant::now();
    for (p, who) in [(8080, "vgA"), (8082, "vgC")] {
        wait_for(
            &format!("{who} answers after a flush and a SIGHUP (the daemon)"),
            3,
            || http_get(&env.client, pubv(p)).is_ok_and(|b| b.contains(who)),
        );
    }
    eprintln!(
        "host# nft flush ruleset; kill -HUP libvirtd  ->  answering again after {:.1} s\nhost# virtgate status\n{}",
        t.elapsed().as_secs_f32(),
        indent(&env.virtgate(&["status"]))
    );
    // a libvirtd restart brings libvirt's own rules back; the forwards keep answering
    env.stop_libvirtd();
    env.start_libvirtd();
    wait_for("libvirt's rules are back after a restart", 30, || {
        !libvirt_rules(&env.host.exec(&["nft", "-a", "list", "ruleset"])).is_empty()
    });
    for (p, who) in [(8080, "vgA"), (8082, "vgC")] {
        wait_for(&format!("{who} answers after the restart"), 20, || {
            http_get(&env.client, pubv(p)).is_ok_and(|b| b.contains(who))
        });
    }
    wait_for("the daemon follows libvirt's events again", 20, || {
        libvirt_connects(env) == 2
    });
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    eprintln!(
        "daemon memory, following a real libvirtd: {}",
        status
            .lines()
            .filter(|l| l.starts_with("VmHWM") || l.starts_with("RssAnon"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(
        daemon.0.wait().unwrap().success(),
        "the daemon exits on SIGTERM"
    );
    must_virsh(&["destroy", "vgC"]);
    let out = env.virtgate(&["remove", "vgC", "8082:80"]);
    assert!(out.contains("wrote"), "{out}");
}
