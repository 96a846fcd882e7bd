//! The benchmark's world, in namespaces it creates: one host with libvirt's iptables-form
//! rules for virbr0 (192.168.0.0/16), D running domains with 10 forwards each
//! (`"20000:80"` style, addresses from `<dhcp><host>` reservations), libvirt's file layout,
//! and the domain `web` (10 forwards) that the hook benchmarks start and stop.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::common::Netns;

pub const WEB_PORT: u16 = 30000;

pub struct World {
    pub host: Netns,
    pub dir: tempfile::TempDir,
    /// Forwards of the other domains (10 per domain).
    pub others: usize,
}

pub fn mac(i: usize) -> String {
    format!(
        "52:54:00:{:02x}:{:02x}:{:02x}",
        (i >> 16) & 0xff,
        (i >> 8) & 0xff,
        i & 0xff
    )
}

pub fn ip(i: usize) -> String {
    let n = i + 10;
    format!("192.168.{}.{}", n / 256, n % 256)
}

/// libvirt's iptables rules for one NAT network (as libvirt 9.x writes them).
pub fn libvirt_iptables(br: &str, net: &str) -> String {
    format!(
        "*nat\n:LIBVIRT_PRT - [0:0]\n-A POSTROUTING -j LIBVIRT_PRT\n-A LIBVIRT_PRT -s {net} -d 224.0.0.0/24 -j RETURN\n-A LIBVIRT_PRT -s {net} -d 255.255.255.255/32 -j RETURN\n-A LIBVIRT_PRT -s {net} ! -d {net} -p tcp -j MASQUERADE --to-ports 1024-65535\n-A LIBVIRT_PRT -s {net} ! -d {net} -p udp -j MASQUERADE --to-ports 1024-65535\n-A LIBVIRT_PRT -s {net} ! -d {net} -j MASQUERADE\nCOMMIT\n*filter\n:LIBVIRT_FWI - [0:0]\n:LIBVIRT_FWO - [0:0]\n:LIBVIRT_FWX - [0:0]\n:LIBVIRT_INP - [0:0]\n:LIBVIRT_OUT - [0:0]\n-A INPUT -j LIBVIRT_INP\n-A FORWARD -j LIBVIRT_FWX\n-A FORWARD -j LIBVIRT_FWI\n-A FORWARD -j LIBVIRT_FWO\n-A OUTPUT -j LIBVIRT_OUT\n-A LIBVIRT_INP -i {br} -p udp -m udp --dport 53 -j ACCEPT\n-A LIBVIRT_INP -i {br} -p udp -m udp --dport 67 -j ACCEPT\n-A LIBVIRT_OUT -o {br} -p udp -m udp --dport 68 -j ACCEPT\n-A LIBVIRT_FWI -d {net} -o {br} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n-A LIBVIRT_FWI -o {br} -j REJECT --reject-with icmp-port-unreachable\n-A LIBVIRT_FWO -s {net} -i {br} -j ACCEPT\n-A LIBVIRT_FWO -i {br} -j REJECT --reject-with icmp-port-unreachable\n-A LIBVIRT_FWX -i {br} -o {br} -j ACCEPT\nCOMMIT\n"
    )
}

/// The domain XML libvirt passes to the qemu hook.
pub fn domain_xml(name: &str, i: usize) -> String {
    crate::common::domain_xml(name, &mac(i), "default", "virbr0", &format!("vnet{i}"))
}

impl World {
    /// A host with `others` forwards configured for running domains, plus `web`.
    pub fn new(others: usize) -> World {
        let host = Netns::new("b");
        host.sysctl("net.ipv4.ip_forward", "1");
        host.ip(&["link", "add", "virbr0", "type", "bridge"]);
        host.ip(&["addr", "add", "192.168.0.1/16", "dev", "virbr0"]);
        host.ip(&["link", "set", "virbr0", "up"]);
        host.exec_stdin(
            &["iptables-restore", "--noflush"],
            &libvirt_iptables("virbr0", "192.168.0.0/16"),
        );
        let w = World {
            host,
            dir: tempfile::tempdir().expect("tempdir"),
            others,
        };
        w.write_files();
        w.write_config(&[]);
        w
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("etc/virtgate.toml")
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn domains(&self) -> usize {
        self.others / 10
    }

    /// The web domain's index (its MAC and reservation).
    pub fn web(&self) -> usize {
        0xff_0001
    }

    fn write_files(&self) {
        let root = self.root();
        for d in [
            "run/libvirt/qemu",
            "run/libvirt/network",
            "etc/libvirt/qemu/networks",
            "var/lib/libvirt/dnsmasq",
        ] {
            std::fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        let mut hosts = String::new();
        for i in 0..self.domains() {
            let _ = writeln!(
                hosts,
                "      <host mac='{}' name='d{i:05}' ip='{}'/>",
                mac(i),
                ip(i)
            );
            let xml = format!(
                "<domstatus state='running' reason='booted' pid='1'>\n{}</domstatus>\n",
                domain_xml(&format!("d{i:05}"), i)
            );
            write(&root.join(format!("run/libvirt/qemu/d{i:05}.xml")), &xml);
        }
        let _ = writeln!(
            hosts,
            "      <host mac='{}' name='web' ip='192.168.250.1'/>",
            mac(self.web())
        );
        let net = format!(
            "<network>\n  <name>default</name>\n  <forward mode='nat'/>\n  <bridge name='virbr0' stp='on' delay='0'/>\n  <ip address='192.168.0.1' netmask='255.255.0.0'>\n    <dhcp>\n      <range start='192.168.0.2' end='192.168.255.254'/>\n{hosts}    </dhcp>\n  </ip>\n</network>\n"
        );
        write(&root.join("etc/libvirt/qemu/networks/default.xml"), &net);
        write(
            &root.join("run/libvirt/network/default.xml"),
            &format!("<networkstatus>\n{net}</networkstatus>\n"),
        );
    }

    /// The config: every domain's forwards, web's, and `extra` forwards for domain d00000.
    pub fn write_config(&self, extra: &[String]) {
        let mut cfg = String::new();
        for i in 0..self.domains() {
            let base = 20000 + i * 10;
            let mut f: Vec<String> = (0..10).map(|k| format!("\"{}:80\"", base + k)).collect();
            if i == 0 {
                f.extend(extra.iter().map(|e| format!("\"{e}\"")));
            }
            let _ = writeln!(cfg, "[domain.d{i:05}]\nforwards = [{}]", f.join(", "));
        }
        let web: Vec<String> = (0..10)
            .map(|k| format!("\"{}:80\"", WEB_PORT + k))
            .collect();
        let _ = writeln!(cfg, "[domain.web]\nforwards = [{}]", web.join(", "));
        write(&self.config(), &cfg);
    }

    /// The virtgate command line for this world.
    pub fn virtgate(&self, backend: &str, args: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = vec![
            env!("CARGO_BIN_EXE_virtgate").into(),
            "--config".into(),
            self.config().display().to_string(),
            "--state-dir".into(),
            self.state().display().to_string(),
            "--libvirt-root".into(),
            self.root().display().to_string(),
            "--backend".into(),
            backend.into(),
        ];
        v.extend(args.iter().map(|s| s.to_string()));
        v
    }
}

fn write(p: &Path, text: &str) {
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    std::fs::write(p, text).expect("write");
}
