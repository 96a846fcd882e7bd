//! libvirt's own files: live domain status XML (`run/libvirt/qemu/*.xml`), network status
//! (`run/libvirt/network/*.xml`) and definitions (`etc/libvirt/qemu/networks/*.xml`).

use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;
use roxmltree::{Document, Node};

use super::cache::XmlCache;
use super::{DomainFacts, LibvirtFirewall, LibvirtPaths, NetworkFacts, Nic, Reservation};

/// Largest XML file or stdin document read.
pub const MAX_XML_BYTES: u64 = 8 * 1024 * 1024;

fn child<'a, 'i>(n: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    n.children().find(|c| c.has_tag_name(name))
}

fn find_desc<'a, 'i>(doc: &'a Document<'i>, name: &str) -> Option<Node<'a, 'i>> {
    doc.descendants().find(|n| n.has_tag_name(name))
}

/// Parses a domain XML (plain `<domain>` or libvirt's `<domstatus>` wrapper).
pub fn parse_domain_xml(text: &str) -> Result<DomainFacts, String> {
    let doc = Document::parse(text).map_err(|e| format!("domain XML: {e}"))?;
    let dom = find_desc(&doc, "domain").ok_or("no <domain> element")?;
    let name = child(dom, "name")
        .and_then(|n| n.text())
        .ok_or("domain XML has no <name>")?
        .to_string();
    let uuid = child(dom, "uuid")
        .and_then(|n| n.text())
        .map(|s| s.trim().to_ascii_lowercase());
    let mut nics = Vec::new();
    if let Some(devs) = child(dom, "devices") {
        for i in devs.children().filter(|c| c.has_tag_name("interface")) {
            let Some(raw) = child(i, "mac").and_then(|m| m.attribute("address")) else {
                continue;
            };
            let Some(mac) = super::parse_mac(raw) else {
                tracing::warn!("domain {name:?}: NIC with an invalid MAC {raw:?} ignored");
                continue;
            };
            let src = child(i, "source");
            // names end up in firewall rules: anything a kernel interface name cannot be
            // is dropped here
            let ifname = |v: Option<&str>| {
                v.filter(|n| crate::model::validate_ifname(n).is_ok())
                    .map(str::to_string)
            };
            nics.push(Nic {
                mac,
                network: src.and_then(|s| s.attribute("network")).map(str::to_string),
                bridge: ifname(src.and_then(|s| s.attribute("bridge"))),
                tap: ifname(child(i, "target").and_then(|t| t.attribute("dev"))),
            });
        }
    }
    let metadata = metadata_element(dom, text);
    Ok(DomainFacts {
        name,
        uuid,
        nics,
        metadata,
    })
}

/// virtgate's element under the domain's `<metadata>`, as its text in a wrapper that
/// declares its namespace (the element's prefix may be declared above it).
fn metadata_element(dom: roxmltree::Node, text: &str) -> Option<String> {
    use crate::model::METADATA_NAMESPACE as NS;
    let md = dom.children().find(|c| c.has_tag_name("metadata"))?;
    let el = md
        .children()
        .find(|c| c.is_element() && c.tag_name().namespace() == Some(NS))?;
    let frag = text.get(el.range())?;
    let decl = match el.lookup_prefix(NS) {
        Some(p) if !p.is_empty() => format!("xmlns:{p}=\"{NS}\""),
        _ => format!("xmlns=\"{NS}\""),
    };
    Some(format!("<metadata {decl}>{frag}</metadata>"))
}

/// An `<ip>`'s subnet: `address` with `prefix` or `netmask` (default /24 or /64).
fn ip_subnet(ip: roxmltree::Node) -> Option<IpNet> {
    let addr = ip
        .attribute("address")
        .and_then(|a| a.parse::<IpAddr>().ok())?;
    let prefix = ip
        .attribute("prefix")
        .and_then(|p| p.parse::<u8>().ok())
        .or_else(|| {
            ip.attribute("netmask")
                .and_then(|m| m.parse::<IpAddr>().ok())
                .and_then(|m| ipnet::ip_mask_to_prefix(m).ok())
        })
        .unwrap_or(if addr.is_ipv4() { 24 } else { 64 });
    IpNet::new(addr, prefix).ok()
}

/// A `<dhcp><host>`: its address, by MAC (IPv6 hosts: a DUID `id` holding one) or name.
fn reservation(h: roxmltree::Node) -> Option<Reservation> {
    let ip = h.attribute("ip").and_then(|i| i.parse::<IpAddr>().ok())?;
    let mac = match h.attribute("mac") {
        // a reservation for a MAC that is none reserves nothing
        Some(m) => Some(super::parse_mac(m)?),
        None => h.attribute("id").and_then(super::duid::mac),
    };
    let name = h.attribute("name").map(str::to_string);
    (mac.is_some() || name.is_some()).then(|| Reservation {
        mac: mac.unwrap_or_default(),
        ip,
        name,
    })
}

/// Parses a network XML (plain `<network>` or a `<networkstatus>` wrapper).
pub fn parse_network_xml(text: &str) -> Result<NetworkFacts, String> {
    let doc = Document::parse(text).map_err(|e| format!("network XML: {e}"))?;
    let net = find_desc(&doc, "network").ok_or("no <network> element")?;
    let name = child(net, "name")
        .and_then(|n| n.text())
        .ok_or("network XML has no <name>")?
        .to_string();
    let bridge = child(net, "bridge")
        .and_then(|b| b.attribute("name"))
        .unwrap_or_default()
        .to_string();
    if crate::model::validate_ifname(&bridge).is_err() {
        return Err(format!(
            "network {name:?}: bridge name {bridge:?} is not a valid interface name"
        ));
    }
    let fwd = child(net, "forward");
    let forward_mode = fwd
        .map(|f| f.attribute("mode").unwrap_or("nat").to_string())
        .unwrap_or_default();
    let ipv6_nat = fwd
        .and_then(|f| child(f, "nat"))
        .and_then(|n| n.attribute("ipv6"))
        == Some("yes");
    let mut addresses = Vec::new();
    let mut reservations = Vec::new();
    // an <ip> without an address is not read at all
    let with_address = |c: &roxmltree::Node| {
        c.has_tag_name("ip")
            && c.attribute("address")
                .is_some_and(|a| a.parse::<IpAddr>().is_ok())
    };
    for ip in net.children().filter(with_address) {
        addresses.extend(ip_subnet(ip));
        if let Some(dhcp) = child(ip, "dhcp") {
            reservations.extend(
                dhcp.children()
                    .filter(|c| c.has_tag_name("host"))
                    .filter_map(reservation),
            );
        }
    }
    let firewall = doc
        .descendants()
        .find(|n| n.has_tag_name("firewall") && n.attribute("backend").is_some())
        .and_then(|n| n.attribute("backend"))
        .map(|b| {
            if b == "nftables" {
                LibvirtFirewall::Nftables
            } else {
                LibvirtFirewall::Iptables
            }
        });
    Ok(NetworkFacts {
        name,
        bridge,
        forward_mode,
        addresses,
        reservations,
        ipv6_nat,
        firewall: firewall.unwrap_or_default(),
        active: false,
    })
}

/// Whether the status file recorded libvirt's firewall backend.
pub fn recorded_firewall(text: &str) -> bool {
    text.contains("backend=")
}

/// Reads an XML file with the size bound.
pub fn read_xml(path: &Path) -> Option<String> {
    match crate::files::read_text(path, MAX_XML_BYTES, crate::files::Follow::Yes) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            tracing::warn!("{}: {e}, ignored", path.display());
            None
        }
    }
}

/// Running domains: one status file each in `run/libvirt/qemu`, parsed or taken from
/// the cache kept in `cache` (see [`super::cache`]).
pub fn read_running_domains(paths: &LibvirtPaths, cache: Option<&Path>) -> Vec<DomainFacts> {
    let mut cache = XmlCache::open(cache, "domains");
    let out = cache
        .get_dir(&paths.qemu_status_dir(), |p, text| {
            parse_domain_xml(text)
                .map_err(|e| tracing::warn!("{}: {e}", p.display()))
                .ok()
        })
        .into_iter()
        .map(|(_, d)| d)
        .collect();
    cache.store();
    out
}

/// Networks: live status first, then definitions of inactive networks. Networks whose
/// status does not record libvirt's firewall backend get it from the kernel.
pub fn read_networks(
    paths: &LibvirtPaths,
    probe: &dyn super::FirewallProbe,
    cache: Option<&Path>,
) -> Vec<NetworkFacts> {
    let mut out: Vec<NetworkFacts> = Vec::new();
    let mut unrecorded = Vec::new();
    // each with whether its file records libvirt's firewall backend
    let mut cache = XmlCache::<(NetworkFacts, bool)>::open(cache, "networks");
    let live = cache.get_dir(&paths.network_status_dir(), |p, text| {
        parse_network_xml(text)
            .map_err(|e| tracing::warn!("{}: {e}", p.display()))
            .ok()
            .map(|n| (n, recorded_firewall(text)))
    });
    for (_, (mut n, recorded)) in live {
        n.active = true;
        if !recorded {
            unrecorded.push(out.len());
        }
        out.push(n);
    }
    let defined = cache.get_dir(&paths.network_config_dir(), |_, text| {
        parse_network_xml(text)
            .ok()
            .map(|n| (n, recorded_firewall(text)))
    });
    for (_, (n, _)) in defined {
        if !out.iter().any(|x| x.name == n.name) {
            out.push(n);
        }
    }
    cache.store();
    if !unrecorded.is_empty() {
        let nft_bridges = probe.libvirt_nft_bridges();
        for i in unrecorded {
            if nft_bridges.contains(&out[i].bridge) {
                out[i].firewall = LibvirtFirewall::Nftables;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_status_xml() {
        let x = r#"<domstatus state='running' reason='booted' pid='42'>
  <domain type='qemu' id='1'>
    <name>web "1"; $(x)</name>
    <uuid>6F1D3B2A-0000-4000-8000-000000000001</uuid>
    <devices>
      <interface type='network'>
        <mac address='52:54:00:AA:00:01'/>
        <source network='default' portid='x' bridge='virbr0'/>
        <target dev='vnet0'/>
      </interface>
      <interface type='bridge'><mac address='52:54:00:aa:00:02'/><source bridge='br9'/></interface>
    </devices>
  </domain>
</domstatus>"#;
        let d = parse_domain_xml(x).unwrap();
        assert_eq!(d.name, "web \"1\"; $(x)");
        assert_eq!(
            d.uuid.as_deref(),
            Some("6f1d3b2a-0000-4000-8000-000000000001")
        );
        assert_eq!(d.nics[0].mac, "52:54:00:aa:00:01");
        assert_eq!(d.nics[0].tap.as_deref(), Some("vnet0"));
        assert_eq!(d.nics[1].bridge.as_deref(), Some("br9"));
    }

    #[test]
    fn ipv6_reservations_by_duid_and_by_name() {
        let x = r#"<network><name>default</name><bridge name='virbr0'/>
  <ip family='ipv6' address='fd00:122::1' prefix='64'><dhcp>
    <host id='0:3:0:1:52:54:0:AA:0:1' name='web' ip='fd00:122::10'/>
    <host id='0:2:0:0:ab:11:1:2:3:4' name='db' ip='fd00:122::11'/>
    <host id='0:2:0:0:ab:11:1:2:3:5' ip='fd00:122::12'/>
  </dhcp></ip></network>"#;
        let n = parse_network_xml(x).unwrap();
        let r: Vec<(&str, String, Option<&str>)> = n
            .reservations
            .iter()
            .map(|r| (r.mac.as_str(), r.ip.to_string(), r.name.as_deref()))
            .collect();
        assert_eq!(
            r,
            [
                ("52:54:00:aa:00:01", "fd00:122::10".into(), Some("web")),
                ("", "fd00:122::11".into(), Some("db")),
            ]
        );
    }

    #[test]
    fn invalid_macs_are_no_nics() {
        let x = "<domain><name>x</name><devices><interface type='network'><mac address='52:54:00:00:00:01&#10;evil row'/><source network='default'/></interface><interface type='network'><mac address='52-54-00-AB-00-02'/><source network='default'/></interface></devices></domain>";
        let d = parse_domain_xml(x).unwrap();
        assert_eq!(d.nics.len(), 1);
        assert_eq!(d.nics[0].mac, "52:54:00:ab:00:02");
        assert_eq!(crate::facts::parse_mac("52:54:00:00:00"), None);
        assert_eq!(crate::facts::parse_mac("52:54:00:00:00:0g"), None);
    }

    #[test]
    fn network_xml() {
        let x = r#"<networkstatus><class_id bitmap='0-2'/><floor sum='0'/>
<network>
  <name>default</name>
  <forward mode='nat'><nat ipv6='yes'><port start='1024' end='65535'/></nat></forward>
  <bridge name='virbr0' stp='on' delay='0'/>
  <ip address='192.168.122.1' netmask='255.255.255.0'>
    <dhcp><range start='192.168.122.2' end='192.168.122.254'/>
      <host mac='52:54:00:AA:00:01' name='a' ip='192.168.122.10'/></dhcp>
  </ip>
  <ip family='ipv6' address='fd00:122::1' prefix='64'/>
</network>
<fwRemoval><firewall backend='nftables'/></fwRemoval>
</networkstatus>"#;
        let n = parse_network_xml(x).unwrap();
        assert_eq!(n.bridge, "virbr0");
        assert_eq!(n.forward_mode, "nat");
        assert!(n.ipv6_nat);
        assert_eq!(n.firewall, LibvirtFirewall::Nftables);
        assert_eq!(
            n.subnets().map(|s| s.to_string()).collect::<Vec<_>>(),
            ["192.168.122.0/24", "fd00:122::/64"]
        );
        assert_eq!(n.reservations[0].ip.to_string(), "192.168.122.10");
    }

    #[test]
    fn hostile_interface_names_never_reach_rules() {
        let x = "<domain><name>x</name><devices><interface type='bridge'><mac address='52:54:00:00:00:01'/><source bridge='br0\" accept; #'/><target dev='vnet 1'/></interface></devices></domain>";
        let d = parse_domain_xml(x).unwrap();
        assert_eq!(
            (d.nics[0].bridge.as_deref(), d.nics[0].tap.as_deref()),
            (None, None)
        );
        let n = "<network><name>n</name><bridge name='br0\" x'/></network>";
        assert!(
            parse_network_xml(n)
                .unwrap_err()
                .contains("not a valid interface name")
        );
    }

    #[test]
    fn what_the_cache_keeps_reads_back_as_parsed() {
        let dir = tempfile::tempdir().unwrap();
        let dom = r#"<domstatus><domain><name>web</name><uuid>6F1D3B2A-0000-4000-8000-000000000001</uuid>
  <metadata><vg:forwards xmlns:vg="https://virtgate.dev/xmlns/1"><vg:forward host="8080" guest="80"/></vg:forwards></metadata>
  <devices><interface type='network'><mac address='52:54:00:AA:00:01'/>
  <source network='default' bridge='virbr0'/><target dev='vnet0'/></interface></devices></domain></domstatus>"#;
        let net = r#"<network><name>default</name><forward mode='nat'/><bridge name='virbr0'/>
  <ip address='192.168.122.1' prefix='24'><dhcp><host mac='52:54:00:AA:00:01' name='a' ip='192.168.122.10'/></dhcp></ip>
  <ip family='ipv6' address='fd00:122::1' prefix='64'><dhcp><host id='0:3:0:1:52:54:0:AA:0:1' name='web' ip='fd00:122::10'/></dhcp></ip>
</network>"#;
        let (dom_file, net_file) = (dir.path().join("web.xml"), dir.path().join("net.xml"));
        std::fs::write(&dom_file, dom).unwrap();
        std::fs::write(&net_file, net).unwrap();
        let cache = dir.path().join("cache");
        let net_cache = dir.path().join("net-cache");
        let zero = std::time::Duration::ZERO;
        for round in 0..2 {
            let mut parsed = false;
            let mut c = XmlCache::open(Some(&cache), "domains").with_racy(zero);
            let d = c.get(&dom_file, |t| {
                parsed = true;
                parse_domain_xml(t).ok()
            });
            c.store();
            assert_eq!(d, parse_domain_xml(dom).ok());
            assert!(d.unwrap().metadata.is_some());
            assert_eq!(parsed, round == 0, "round {round}");
            let mut parsed = false;
            let mut c = XmlCache::open(Some(&net_cache), "networks").with_racy(zero);
            let n = c.get(&net_file, |t| {
                parsed = true;
                parse_network_xml(t).ok().map(|n| (n, recorded_firewall(t)))
            });
            c.store();
            assert_eq!(n, parse_network_xml(net).ok().map(|n| (n, false)));
            assert_eq!(n.unwrap().0.reservations.len(), 2);
            assert_eq!(parsed, round == 0, "round {round}");
        }
    }
}
