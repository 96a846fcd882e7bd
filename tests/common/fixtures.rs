//! libvirt's files as the lab writes them: domain and network XML, status files, the
//! config, libvirt's firewall rules.

use super::*;

impl Lab {
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
