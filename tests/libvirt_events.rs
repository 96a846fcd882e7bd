//! libvirt's events, through both of the daemon's clients.
//! - libvirt's library, against its in-process test driver (`test:///default`, shared by
//!   every connection of one process): a domain suspended and resumed, its metadata set,
//!   a network stopped and started, each wakes the daemon's loop.
//! - virtgate's own RPC client, against a real libvirtd in a namespace of its own: a
//!   domain defined, its metadata set, a network defined, started and stopped, each wakes
//!   it; after a libvirtd restart it connects again and still hears events.
//! - Either, when libvirt cannot be reached, retries quietly.
//!
//! Needs libvirt's client library (`libvirt.so.0`) and libvirtd (scripts/deps --vm);
//! under CI=true their absence fails the tests.

use std::ffi::{CString, c_char, c_int, c_uint, c_void};
use std::time::{Duration, Instant};

use virtgate::daemon::libvirt_events::{Client, Events};

/// The test driver, driven from this process through libvirt's C API.
struct TestDriver {
    conn: *mut c_void,
    lib: libloading::Library,
}

impl TestDriver {
    fn open() -> Option<TestDriver> {
        let lib = unsafe { libloading::Library::new("libvirt.so.0") }.ok()?;
        let uri = CString::new("test:///default").unwrap();
        let conn = unsafe {
            let open: libloading::Symbol<unsafe extern "C" fn(*const c_char) -> *mut c_void> =
                lib.get(b"virConnectOpen\0").ok()?;
            open(uri.as_ptr())
        };
        (!conn.is_null()).then_some(TestDriver { conn, lib })
    }

    /// Calls `f(lookup(name))` for a domain or network function pair.
    fn act(&self, lookup: &[u8], action: &[u8], name: &str) {
        let name = CString::new(name).unwrap();
        unsafe {
            let find: libloading::Symbol<
                unsafe extern "C" fn(*mut c_void, *const c_char) -> *mut c_void,
            > = self.lib.get(lookup).unwrap();
            let obj = find(self.conn, name.as_ptr());
            assert!(!obj.is_null(), "{}", String::from_utf8_lossy(lookup));
            let act: libloading::Symbol<unsafe extern "C" fn(*mut c_void) -> c_int> =
                self.lib.get(action).unwrap();
            assert_eq!(act(obj), 0, "{}", String::from_utf8_lossy(action));
        }
    }

    fn set_metadata(&self, name: &str) {
        let name = CString::new(name).unwrap();
        let xml = CString::new("<forward spec='8080:80'/>").unwrap();
        let key = CString::new("vg").unwrap();
        let ns = CString::new("https://virtgate.dev/xmlns/1").unwrap();
        unsafe {
            let find: libloading::Symbol<
                unsafe extern "C" fn(*mut c_void, *const c_char) -> *mut c_void,
            > = self.lib.get(b"virDomainLookupByName\0").unwrap();
            let dom = find(self.conn, name.as_ptr());
            let set: libloading::Symbol<
                unsafe extern "C" fn(
                    *mut c_void,
                    c_int,
                    *const c_char,
                    *const c_char,
                    *const c_char,
                    c_uint,
                ) -> c_int,
            > = self.lib.get(b"virDomainSetMetadata\0").unwrap();
            // VIR_DOMAIN_METADATA_ELEMENT = 2, VIR_DOMAIN_AFFECT_LIVE = 1
            assert_eq!(set(dom, 2, xml.as_ptr(), key.as_ptr(), ns.as_ptr(), 1), 0);
        }
    }
}

fn can_run() -> bool {
    if TestDriver::open().is_some() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "libvirt's client library is missing under CI"
    );
    eprintln!("SKIPPED: no libvirt.so.0 with its test driver");
    false
}

/// Waits until `events` has seen more than `before` events (and its fd had a wake-up).
fn woken(events: &Events, before: u64) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        let mut fds = [nix::poll::PollFd::new(
            events.fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let ready = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16)).unwrap_or(0);
        if ready > 0 {
            events.drain();
        }
        if events.counts().0 > before {
            return true;
        }
    }
    false
}

#[test]
fn lifecycle_metadata_and_network_events_wake_the_daemon() {
    if !can_run() {
        return;
    }
    let events = Events::start("test:///default").expect("libvirt loads");
    // the first connect wakes the loop too (a full re-read)
    let t = Instant::now();
    while events.counts().1 == 0 {
        assert!(t.elapsed() < Duration::from_secs(5), "never connected");
        std::thread::sleep(Duration::from_millis(10));
    }
    let driver = TestDriver::open().unwrap();
    let mut seen = events.counts().0;
    for (what, lookup, action, name) in [
        (
            "suspend",
            &b"virDomainLookupByName\0"[..],
            &b"virDomainSuspend\0"[..],
            "test",
        ),
        (
            "resume",
            b"virDomainLookupByName\0",
            b"virDomainResume\0",
            "test",
        ),
        (
            "network stop",
            b"virNetworkLookupByName\0",
            b"virNetworkDestroy\0",
            "default",
        ),
        (
            "network start",
            b"virNetworkLookupByName\0",
            b"virNetworkCreate\0",
            "default",
        ),
    ] {
        driver.act(lookup, action, name);
        assert!(woken(&events, seen), "no event for {what}");
        seen = events.counts().0;
    }
    driver.set_metadata("test");
    assert!(woken(&events, seen), "no event for a metadata change");
    assert_eq!(events.counts().1, 1, "one connection, never dropped");
}

#[test]
fn a_libvirt_that_cannot_be_reached_is_retried_quietly() {
    if !can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nobody-here.sock");
    // virtgate's own client, and libvirt's library (which any other parameter selects)
    for (uri, client) in [
        (
            format!("qemu+unix:///system?socket={}", socket.display()),
            Client::Own,
        ),
        (
            format!(
                "qemu+unix:///system?socket={}&mode=direct",
                socket.display()
            ),
            Client::Library,
        ),
    ] {
        let events = Events::start(&uri).expect("starts");
        assert_eq!(events.client(), client, "{uri}");
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(events.counts(), (0, 0), "never connected, no events: {uri}");
    }
}

/// A real libvirtd of this machine's (TESTBED.md), in a network namespace of its own,
/// stopped (with what it made) on drop.
struct RealLibvirtd {
    ns: String,
    dir: tempfile::TempDir,
}

const LIBVIRTD_PID: &str = "/run/libvirtd.pid";

fn pid_alive(pidfile: &str) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()?;
    (nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()).then_some(pid)
}

fn virsh(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("virsh")
        .args(["-q", "-c", "qemu:///system"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("virsh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn must_virsh(args: &[&str]) {
    let (ok, out) = virsh(args);
    assert!(ok, "virsh {args:?}: {out}");
}

/// Why this machine cannot run a libvirtd, if it cannot.
fn libvirtd_blocker() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root".into());
    }
    for b in [
        "/usr/sbin/libvirtd",
        "/usr/bin/virsh",
        "/usr/bin/qemu-system-x86_64",
    ] {
        if !std::path::Path::new(b).exists() {
            return Some(format!("{b} is not installed (run scripts/deps --vm)"));
        }
    }
    pid_alive(LIBVIRTD_PID).map(|pid| format!("a libvirtd (pid {pid}) already runs here"))
}

impl RealLibvirtd {
    fn start() -> RealLibvirtd {
        // what a libvirtd without systemd needs (users, qemu.conf, directories), as the
        // real-VM test sets it up: a fresh machine has none of it
        let setup = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vm/setup-host.sh");
        let st = std::process::Command::new(setup).status().expect(setup);
        assert!(st.success(), "{setup} failed");
        let ns = format!("vgev{}", std::process::id());
        let st = std::process::Command::new("ip")
            .args(["netns", "add", &ns])
            .status()
            .unwrap();
        assert!(st.success());
        let d = RealLibvirtd {
            ns,
            dir: tempfile::tempdir().unwrap(),
        };
        d.up();
        d
    }

    fn up(&self) {
        let log = format!("3:file:{}/libvirtd.log", self.dir.path().display());
        let st = std::process::Command::new("ip")
            .args(["netns", "exec", &self.ns, "env"])
            .arg(format!("LIBVIRT_LOG_OUTPUTS={log}"))
            .args(["/usr/sbin/libvirtd", "-d"])
            .status()
            .unwrap();
        assert!(st.success(), "libvirtd -d");
        let t = Instant::now();
        while !(pid_alive(LIBVIRTD_PID).is_some() && virsh(&["version"]).0) {
            if t.elapsed() > Duration::from_secs(30) {
                let log = std::fs::read_to_string(self.dir.path().join("libvirtd.log"))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                panic!(
                    "libvirtd never answered; the end of its log:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn down(&self) {
        let Some(pid) = pid_alive(LIBVIRTD_PID) else {
            return;
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        let t = Instant::now();
        while pid_alive(LIBVIRTD_PID) == Some(pid) && t.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RealLibvirtd {
    fn drop(&mut self) {
        let _ = virsh(&["undefine", "vgev-dom"]);
        for net in ["vgev-net", "default"] {
            let _ = virsh(&["net-destroy", net]);
        }
        let _ = virsh(&["net-undefine", "vgev-net"]);
        self.down();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.ns])
            .status();
    }
}

/// Waits until `events` has connected `n` times.
fn connected(events: &Events, n: u64, within: Duration) -> bool {
    let t = Instant::now();
    while events.counts().1 < n {
        if t.elapsed() > within {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// virtgate's own client (no libvirt library) against a real libvirtd, over the
/// read-only socket `qemu:///system` names: a domain defined, its metadata set, a network
/// defined, started and stopped, each wakes the daemon's loop; libvirtd restarted, the
/// client connects again and still hears events.
#[test]
fn the_own_client_follows_a_real_libvirtd_and_reconnects_after_a_restart() {
    if let Some(why) = libvirtd_blocker() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "cannot run a libvirtd under CI: {why}"
        );
        eprintln!("SKIPPED: {why}");
        return;
    }
    let libvirtd = RealLibvirtd::start();
    let events = Events::start("qemu:///system").expect("no library needed");
    assert_eq!(events.client(), Client::Own);
    assert!(
        connected(&events, 1, Duration::from_secs(5)),
        "never connected"
    );
    let dom = libvirtd.dir.path().join("dom.xml");
    std::fs::write(
        &dom,
        "<domain type='qemu'><name>vgev-dom</name><memory unit='MiB'>32</memory>\
         <os><type arch='x86_64'>hvm</type></os></domain>",
    )
    .unwrap();
    let net = libvirtd.dir.path().join("net.xml");
    std::fs::write(
        &net,
        "<network><name>vgev-net</name><bridge name='vgev0'/></network>",
    )
    .unwrap();
    let (dom, net) = (dom.to_str().unwrap(), net.to_str().unwrap());
    let mut seen = events.counts().0;
    for (what, args) in [
        ("a domain defined", vec!["define", dom]),
        (
            "its metadata set",
            vec![
                "metadata",
                "vgev-dom",
                "--uri",
                "https://virtgate.dev/xmlns/1",
                "--key",
                "vg",
                "--set",
                "<forward spec='8080:80'/>",
                "--config",
            ],
        ),
        ("a network defined", vec!["net-define", net]),
        ("a network started", vec!["net-start", "vgev-net"]),
        ("a network stopped", vec!["net-destroy", "vgev-net"]),
    ] {
        must_virsh(&args);
        assert!(woken(&events, seen), "no event for {what}");
        seen = events.counts().0;
    }
    assert_eq!(events.counts().1, 1, "one connection, never dropped");
    // libvirtd goes away and comes back: connected again, events again
    libvirtd.down();
    libvirtd.up();
    assert!(
        connected(&events, 2, Duration::from_secs(15)),
        "no reconnect after a libvirtd restart"
    );
    let seen = events.counts().0;
    must_virsh(&["undefine", "vgev-dom"]);
    assert!(woken(&events, seen), "no event after the reconnect");
}
