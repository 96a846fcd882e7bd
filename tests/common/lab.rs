//! The lab topology: client, client2 and guests around a host namespace with libvirt's
//! bridges and firewall rules.

use std::net::IpAddr;
use std::path::PathBuf;

use super::*;

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
}
