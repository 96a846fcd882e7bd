//! Network namespaces a test creates and deletes, and commands run in them.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Whether this process may create namespaces. Under CI=true a missing privilege fails
/// the test instead of skipping it.
pub fn can_run_netns(test: &str) -> bool {
    let ok = nix::unistd::geteuid().is_root()
        && Command::new("ip").arg("-V").output().is_ok()
        && Command::new("nft").arg("--version").output().is_ok()
        && Command::new("iptables").arg("-V").output().is_ok();
    if !ok {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{test}: needs root, ip, nft and iptables; CI must run it");
        }
        eprintln!("SKIPPED {test}: needs root, ip, nft and iptables");
    }
    ok
}

pub fn run(argv: &[&str]) -> String {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|e| panic!("spawn {argv:?}: {e}"));
    assert!(
        out.status.success(),
        "{argv:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn run_stdin(argv: &[&str], input: &str) -> String {
    let mut child = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {argv:?}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{argv:?} failed: {}\ninput:\n{input}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!(
            "vgt{}{}{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst),
            tag
        );
        run(&["ip", "netns", "add", &name]);
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Netns { name }
    }

    pub fn exec(&self, argv: &[&str]) -> String {
        let mut a = vec!["ip", "netns", "exec", &self.name];
        a.extend_from_slice(argv);
        run(&a)
    }

    pub fn exec_stdin(&self, argv: &[&str], input: &str) -> String {
        let mut a = vec!["ip", "netns", "exec", &self.name];
        a.extend_from_slice(argv);
        run_stdin(&a, input)
    }

    /// Runs a command, returning (success, stdout, stderr).
    pub fn try_exec(&self, argv: &[&str]) -> (bool, String, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn ip(&self, args: &[&str]) {
        let mut a = vec!["ip", "-n", &self.name];
        a.extend_from_slice(args);
        run(&a);
    }

    /// A veth pair: `name` here, `peer_name` in `peer`.
    pub fn veth(&self, name: &str, peer: &Netns, peer_name: &str) {
        self.ip(&[
            "link", "add", name, "type", "veth", "peer", "name", peer_name, "netns", &peer.name,
        ]);
    }

    /// Links `client` to this namespace like an uplink: `my_addr` here on `ifname`,
    /// `client_addr` on the client's eth0 with its default route via `gateway`.
    pub fn uplink(
        &self,
        ifname: &str,
        client: &Netns,
        my_addr: &str,
        client_addr: &str,
        gateway: &str,
    ) {
        self.veth(ifname, client, "eth0");
        self.ip(&["addr", "add", my_addr, "dev", ifname]);
        self.ip(&["link", "set", ifname, "up"]);
        client.ip(&["addr", "add", client_addr, "dev", "eth0"]);
        client.ip(&["link", "set", "eth0", "up"]);
        client.ip(&["route", "add", "default", "via", gateway]);
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec(&["sysctl", "-qw", &format!("{key}={value}")]);
    }

    /// Runs `f` on a thread inside this namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let fd = File::open(format!("/run/netns/{}", self.name)).unwrap();
        std::thread::spawn(move || {
            nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
    }

    pub fn in_ns<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f).join().expect("thread in netns panicked")
    }

    /// TCP request to `addr`: Ok(answer) or Err(reason).
    pub fn tcp(&self, addr: SocketAddr) -> Result<String, String> {
        self.in_ns(move || {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(1500))
                .map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_millis(1500))).ok();
            let mut out = String::new();
            s.read_to_string(&mut out).map_err(|e| e.to_string())?;
            if out.is_empty() {
                return Err("empty answer".into());
            }
            Ok(out)
        })
    }

    /// UDP echo request: Ok(answer) or Err(reason).
    pub fn udp(&self, addr: SocketAddr) -> Result<String, String> {
        self.in_ns(move || {
            let bind: SocketAddr = if addr.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            }
            .parse()
            .unwrap();
            let s = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_millis(700))).ok();
            for _ in 0..2 {
                s.send_to(b"ping", addr).map_err(|e| e.to_string())?;
                let mut buf = [0u8; 512];
                if let Ok((n, _)) = s.recv_from(&mut buf) {
                    return Ok(String::from_utf8_lossy(&buf[..n]).into_owned());
                }
            }
            Err("no UDP answer".into())
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
