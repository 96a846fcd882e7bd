//! Real-kernel test harness: network namespaces the test creates and deletes, libvirt's
//! exact firewall rules loaded in the "host" namespace, guest servers and clients running
//! in threads that entered a namespace with setns(2). Nothing touches the root namespace.

#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

pub mod libvirt_rules;

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

/// Serves "NAME port P from PEER" on TCP and echoes "NAME: DATA" on UDP, in a namespace.
pub fn serve(ns: &Netns, name: &str, tcp_ports: &[u16], udp_ports: &[u16]) {
    for &p in tcp_ports {
        let n = name.to_string();
        let (tx, rx) = std::sync::mpsc::channel();
        ns.spawn(move || {
            let l = TcpListener::bind(("::", p)).expect("bind tcp");
            tx.send(()).unwrap();
            for c in l.incoming() {
                let Ok(mut c) = c else { continue };
                let peer = c.peer_addr().map(|a| a.ip().to_canonical()).ok();
                let _ = write!(
                    c,
                    "{n} port {p} from {}",
                    peer.map(|x| x.to_string()).unwrap_or_default()
                );
            }
        });
        rx.recv().unwrap();
    }
    for &p in udp_ports {
        let n = name.to_string();
        let (tx, rx) = std::sync::mpsc::channel();
        ns.spawn(move || {
            let s = UdpSocket::bind(("::", p)).expect("bind udp");
            tx.send(()).unwrap();
            let mut buf = [0u8; 512];
            loop {
                if let Ok((k, peer)) = s.recv_from(&mut buf) {
                    let msg = format!("{n}: {}", String::from_utf8_lossy(&buf[..k]));
                    let _ = s.send_to(msg.as_bytes(), peer);
                }
            }
        });
        rx.recv().unwrap();
    }
}

pub fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

pub fn ipaddr(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// libvirt's firewall form loaded in the host namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LibvirtForm {
    Iptables,
    Nftables,
}

/// One guest of the lab.
pub struct Guest {
    pub name: &'static str,
    pub ns: Netns,
    pub mac: String,
    pub ip4: IpAddr,
    pub ip6: Option<IpAddr>,
    pub bridge: &'static str,
    pub network: &'static str,
    pub tap: String,
}

/// client (203.0.113.2) and client2 (198.51.100.2) -- host -- virbr0 (192.168.122.0/24,
/// fd00:122::/64: g1, g2) and virbr1 (192.168.100.0/24: g3), libvirt's rules loaded.
pub struct Lab {
    pub host: Netns,
    pub client: Netns,
    pub client2: Netns,
    pub guests: Vec<Guest>,
    pub dir: tempfile::TempDir,
    pub form: LibvirtForm,
    pub xt: Xt,
}

/// Which iptables the host's `iptables` command is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Xt {
    /// iptables-nft (Debian's default)
    Nft,
    /// iptables-legacy: made the `iptables` of the lab by a PATH of symlinks
    Legacy,
}

const XT_TOOLS: [&str; 6] = [
    "iptables",
    "iptables-save",
    "iptables-restore",
    "ip6tables",
    "ip6tables-save",
    "ip6tables-restore",
];

pub const PUBLIC: &str = "203.0.113.1";
pub const PUBLIC6: &str = "2001:db8:1::1";

impl Lab {
    pub fn new(form: LibvirtForm) -> Lab {
        Lab::with_xt(form, Xt::Nft)
    }

    pub fn with_xt(form: LibvirtForm, xt: Xt) -> Lab {
        let host = Netns::new("h");
        let client = Netns::new("c");
        let client2 = Netns::new("d");
        host.sysctl("net.ipv4.ip_forward", "1");
        host.sysctl("net.ipv6.conf.all.forwarding", "1");
        host.uplink(
            "eth0",
            &client,
            "203.0.113.1/24",
            "203.0.113.2/24",
            "203.0.113.1",
        );
        host.uplink(
            "eth1",
            &client2,
            "198.51.100.1/24",
            "198.51.100.2/24",
            "198.51.100.1",
        );
        host.ip(&["addr", "add", "2001:db8:1::1/64", "dev", "eth0", "nodad"]);
        // the host's uplink: hooks.json's default public_ip is taken from it
        host.ip(&[
            "route",
            "add",
            "default",
            "via",
            "203.0.113.254",
            "dev",
            "eth0",
        ]);
        client.ip(&["addr", "add", "2001:db8:1::2/64", "dev", "eth0", "nodad"]);
        client.ip(&["-6", "route", "add", "default", "via", "2001:db8:1::1"]);
        // the client may try to reach the guests' private addresses directly (routed bypass)
        client.ip(&["route", "add", "192.168.122.0/24", "via", "203.0.113.1"]);
        for (br, a4, a6) in [
            ("virbr0", "192.168.122.1/24", Some("fd00:122::1/64")),
            ("virbr1", "192.168.100.1/24", None),
        ] {
            host.ip(&["link", "add", br, "type", "bridge"]);
            host.ip(&["addr", "add", a4, "dev", br]);
            if let Some(a6) = a6 {
                host.ip(&["addr", "add", a6, "dev", br, "nodad"]);
            }
            host.ip(&["link", "set", br, "up"]);
        }
        let mut guests = Vec::new();
        for (i, (name, br, net, ip4, ip6)) in [
            (
                "g1",
                "virbr0",
                "default",
                "192.168.122.10",
                Some("fd00:122::10"),
            ),
            ("g2", "virbr0", "default", "192.168.122.11", None),
            ("g3", "virbr1", "net1", "192.168.100.10", None),
        ]
        .into_iter()
        .enumerate()
        {
            let ns = Netns::new(name);
            let tap = format!("vnet{i}");
            let mac = format!("52:54:00:00:00:{:02x}", i + 10);
            host.veth(&tap, &ns, "eth0");
            host.ip(&["link", "set", &tap, "master", br, "up"]);
            ns.ip(&["link", "set", "eth0", "address", &mac]);
            ns.ip(&["addr", "add", &format!("{ip4}/24"), "dev", "eth0"]);
            ns.ip(&["link", "set", "eth0", "up"]);
            let gw = if br == "virbr0" {
                "192.168.122.1"
            } else {
                "192.168.100.1"
            };
            ns.ip(&["route", "add", "default", "via", gw]);
            if let Some(ip6) = ip6 {
                ns.ip(&["addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"]);
                ns.ip(&["-6", "route", "add", "default", "via", "fd00:122::1"]);
            }
            serve(&ns, name, &[80, 8099, 9100, 9101, 9102], &[53535]);
            guests.push(Guest {
                name,
                ns,
                mac,
                ip4: ipaddr(ip4),
                ip6: ip6.map(ipaddr),
                bridge: br,
                network: net,
                tap,
            });
        }
        let lab = Lab {
            host,
            client,
            client2,
            guests,
            dir: tempfile::tempdir().unwrap(),
            form,
            xt,
        };
        if xt == Xt::Legacy {
            let bin = lab.dir.path().join("legacy-bin");
            std::fs::create_dir_all(&bin).unwrap();
            for t in XT_TOOLS {
                let target = t.replacen("tables", "tables-legacy", 1);
                std::os::unix::fs::symlink(format!("/usr/sbin/{target}"), bin.join(t)).unwrap();
            }
        }
        lab.load_libvirt_firewall();
        lab.write_libvirt_files();
        lab.wait_ipv6();
        lab
    }

    /// IPv6 on fresh links needs a moment (link-local addresses, neighbour discovery);
    /// wait until the host reaches the IPv6 guest and the client.
    fn wait_ipv6(&self) {
        for target in ["fd00:122::10", "2001:db8:1::2"] {
            let ok = (0..40).any(|_| {
                let (ok, _, _) = self
                    .host
                    .try_exec(&["ping", "-6", "-c", "1", "-W", "1", target]);
                if !ok {
                    std::thread::sleep(std::time::Duration::from_millis(250));
                }
                ok
            });
            assert!(ok, "IPv6 in the lab never came up ({target})");
        }
    }

    pub fn guest(&self, name: &str) -> &Guest {
        self.guests.iter().find(|g| g.name == name).unwrap()
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("etc/virtgate.toml")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// libvirt's files as libvirt writes them: domain and network status XML, the network
    /// definitions, and dnsmasq's lease status (g1 has a reservation, g2 a lease, g3 is
    /// found in the neighbour table).
    pub fn write_libvirt_files(&self) {
        let root = self.root();
        for d in [
            "run/libvirt/qemu",
            "run/libvirt/network",
            "etc/libvirt/qemu/networks",
            "var/lib/libvirt/dnsmasq",
        ] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        for g in &self.guests {
            self.write_domain_status(g.name);
        }
        let g1 = self.guest("g1");
        let default = format!(
            "<network>\n  <name>default</name>\n  <uuid>0e4d1c1a-1111-4222-8333-000000000001</uuid>\n  <forward mode='nat'>\n    <nat><port start='1024' end='65535'/></nat>\n  </forward>\n  <bridge name='virbr0' stp='on' delay='0'/>\n  <mac address='52:54:00:01:02:03'/>\n  <ip address='192.168.122.1' netmask='255.255.255.0'>\n    <dhcp>\n      <range start='192.168.122.2' end='192.168.122.254'/>\n      <host mac='{}' name='g1' ip='{}'/>\n    </dhcp>\n  </ip>\n  <ip family='ipv6' address='fd00:122::1' prefix='64'/>\n</network>\n",
            g1.mac, g1.ip4
        );
        let net1 = "<network>\n  <name>net1</name>\n  <forward mode='nat'/>\n  <bridge name='virbr1'/>\n  <ip address='192.168.100.1' prefix='24'>\n    <dhcp><range start='192.168.100.2' end='192.168.100.254'/></dhcp>\n  </ip>\n</network>\n";
        for (name, xml) in [("default", default.as_str()), ("net1", net1)] {
            std::fs::write(
                root.join(format!("etc/libvirt/qemu/networks/{name}.xml")),
                xml,
            )
            .unwrap();
            let status = format!(
                "<networkstatus>\n  <class_id bitmap='0-2'/>\n  <floor sum='0'/>\n{xml}</networkstatus>\n"
            );
            std::fs::write(root.join(format!("run/libvirt/network/{name}.xml")), status).unwrap();
        }
        let g2 = self.guest("g2");
        let expiry = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3600;
        std::fs::write(
            root.join("var/lib/libvirt/dnsmasq/virbr0.status"),
            format!(
                "[\n  {{\n    \"ip-address\": \"192.168.122.77\",\n    \"mac-address\": \"{}\",\n    \"expiry-time\": 1000\n  }},\n  {{\n    \"ip-address\": \"{}\",\n    \"mac-address\": \"{}\",\n    \"hostname\": \"g2\",\n    \"client-id\": \"01:{}\",\n    \"expiry-time\": {expiry}\n  }}\n]\n",
                g2.mac, g2.ip4, g2.mac, g2.mac
            ),
        )
        .unwrap();
    }

    /// The live domain XML libvirt would pass to the qemu hook.
    pub fn domain_xml(&self, name: &str) -> String {
        let g = self.guest(name);
        domain_xml(g.name, &g.mac, g.network, g.bridge, &g.tap)
    }

    pub fn write_domain_status(&self, name: &str) {
        let xml = format!(
            "<domstatus state='running' reason='booted' pid='1'>\n{}</domstatus>\n",
            self.domain_xml(name)
        );
        std::fs::write(
            self.root().join(format!("run/libvirt/qemu/{name}.xml")),
            xml,
        )
        .unwrap();
    }

    pub fn remove_domain_status(&self, name: &str) {
        let _ = std::fs::remove_file(self.root().join(format!("run/libvirt/qemu/{name}.xml")));
    }

    pub fn write_config(&self, text: &str) {
        let p = self.config_path();
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
    }

    /// Runs `virtgate hook ARGS` in the host namespace with `stdin`: (exit code, stdout, stderr).
    pub fn hook(&self, backend: &str, args: &[&str], stdin: &str) -> (i32, String, String) {
        let bin = env!("CARGO_BIN_EXE_virtgate");
        let (config, state, root) = (self.config_path(), self.state_dir(), self.root());
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.host.name, bin])
            .args([
                "--config",
                path_str(&config),
                "--state-dir",
                path_str(&state),
                "--libvirt-root",
                path_str(&root),
                "--backend",
                backend,
                "hook",
            ])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
        let out = child.wait_with_output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs virtgate in the host namespace: (success, stdout, stderr).
    pub fn virtgate(&self, backend: &str, args: &[&str]) -> (bool, String, String) {
        self.virtgate_with(&self.config_path(), backend, args)
    }

    /// Runs virtgate with another main config file.
    pub fn virtgate_with(
        &self,
        config: &Path,
        backend: &str,
        args: &[&str],
    ) -> (bool, String, String) {
        self.virtgate_env(config, backend, args, &[])
    }

    /// Runs virtgate with extra environment variables.
    pub fn virtgate_env(
        &self,
        config: &Path,
        backend: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> (bool, String, String) {
        let out = self
            .command(config, backend, args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `virtgate ARGS` in the host namespace, with the lab's paths, not started.
    pub fn command(&self, config: &Path, backend: &str, args: &[&str]) -> Command {
        let bin = env!("CARGO_BIN_EXE_virtgate");
        let state = self.state_dir();
        let root = self.root();
        let mut argv: Vec<&str> = vec![
            bin,
            "--config",
            config.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--libvirt-root",
            root.to_str().unwrap(),
            "--backend",
            backend,
        ];
        argv.extend_from_slice(args);
        let path = match self.xt {
            Xt::Legacy => format!(
                "{}:{}",
                self.dir.path().join("legacy-bin").display(),
                std::env::var("PATH").unwrap_or_default()
            ),
            Xt::Nft => std::env::var("PATH").unwrap_or_default(),
        };
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.host.name])
            .args(&argv)
            .env("PATH", path);
        c
    }

    /// Loads libvirt's own firewall rules for the lab's networks (again, after a flush).
    pub fn load_libvirt_firewall(&self) {
        let (restore4, restore6) = match self.xt {
            Xt::Nft => ("iptables-restore", "ip6tables-restore"),
            Xt::Legacy => ("iptables-legacy-restore", "ip6tables-legacy-restore"),
        };
        match self.form {
            LibvirtForm::Iptables => {
                self.host
                    .exec_stdin(&[restore4, "--noflush"], &libvirt_rules::iptables_v4());
                self.host
                    .exec_stdin(&[restore6, "--noflush"], &libvirt_rules::iptables_v6());
            }
            LibvirtForm::Nftables => {
                self.host
                    .exec_stdin(&["nft", "-f", "-"], &libvirt_rules::nft_ruleset());
            }
        }
    }

    pub fn apply(&self, backend: &str) {
        let (ok, out, err) = self.virtgate(backend, &["apply"]);
        assert!(ok, "virtgate apply failed:\n{out}\n{err}");
    }

    /// The host's whole ruleset (nftables view, which includes iptables-nft), counters
    /// removed.
    pub fn ruleset(&self) -> String {
        let mut text = self.host.exec(&["nft", "list", "ruleset"]);
        if self.xt == Xt::Legacy {
            // an iptables-legacy table, once used, cannot be unloaded: an empty one (no
            // rules, default policies) counts as absent
            for save in ["iptables-legacy-save", "ip6tables-legacy-save"] {
                let out = self.host.exec(&[save]);
                for table in out.split("COMMIT\n") {
                    let lines: Vec<&str> = table.lines().filter(|l| !l.starts_with('#')).collect();
                    let empty = lines.iter().all(|l| {
                        l.starts_with('*') || (l.starts_with(':') && l.contains(" ACCEPT "))
                    });
                    if !empty {
                        text.extend(lines.iter().map(|l| format!("{l}\n")));
                        text.push_str("COMMIT\n");
                    }
                }
            }
        }
        virtgate::firewall::strip_counters(&text)
    }

    /// Ping from the host so its neighbour table learns a guest.
    pub fn ping_from_host(&self, ip: &str) {
        self.host.exec(&["ping", "-c", "1", "-W", "2", ip]);
    }
}

/// A domain XML as libvirt writes it (name escaped for XML).
pub fn domain_xml(name: &str, mac: &str, network: &str, bridge: &str, tap: &str) -> String {
    let esc = name
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;");
    let mut h: u32 = 0;
    for b in name.bytes() {
        h = h.wrapping_mul(31).wrapping_add(u32::from(b));
    }
    format!(
        "  <domain type='qemu' id='1'>\n    <name>{esc}</name>\n    <uuid>6f1d3b2a-0000-4000-8000-0000{h:08x}</uuid>\n    <metadata/>\n    <devices>\n      <interface type='network'>\n        <mac address='{mac}'/>\n        <source network='{network}' portid='00000000-0000-0000-0000-000000000000' bridge='{bridge}'/>\n        <target dev='{tap}'/>\n        <model type='virtio'/>\n      </interface>\n    </devices>\n  </domain>\n"
    )
}

/// A line diff for assertion messages.
pub fn diff(a: &str, b: &str) -> String {
    let al: Vec<&str> = a.lines().collect();
    let bl: Vec<&str> = b.lines().collect();
    let mut out = String::new();
    for l in &al {
        if !bl.contains(l) {
            out.push_str(&format!("- {l}\n"));
        }
    }
    for l in &bl {
        if !al.contains(l) {
            out.push_str(&format!("+ {l}\n"));
        }
    }
    if out.is_empty() {
        // the same lines in another order: show where they part
        if let Some(i) = (0..al.len().max(bl.len())).find(|&i| al.get(i) != bl.get(i)) {
            let ctx = |v: &[&str]| {
                v.iter()
                    .skip(i.saturating_sub(2))
                    .take(5)
                    .map(|l| format!("    {l}\n"))
                    .collect::<String>()
            };
            out = format!(
                "order differs at line {}:\nbefore:\n{}after:\n{}",
                i + 1,
                ctx(&al),
                ctx(&bl)
            );
        }
    }
    out
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}
