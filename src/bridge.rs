//! Hairpin mode of bridge ports (sysfs `brport/hairpin_mode`), set for guests with
//! forwards while br_netfilter is active, and restored to its previous value afterwards.
//! A whole run reads every port's mode in one rtnetlink dump; a hook reads its own ports'
//! files.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;

use netlink_packet_core::Nla;
use netlink_packet_route::link::{LinkAttribute, LinkMessage, LinkProtoInfoBridge};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

fn path(port: &str) -> Option<String> {
    // the name comes from XML: refuse anything that is no interface name
    crate::model::validate_ifname(port).ok()?;
    Some(format!("/sys/class/net/{port}/brport/hairpin_mode"))
}

pub fn get(port: &str) -> Option<bool> {
    fs::read_to_string(path(port)?)
        .ok()
        .map(|s| s.trim() == "1")
}

pub fn set(port: &str, on: bool) -> std::io::Result<()> {
    let p = path(port).ok_or_else(|| std::io::Error::other(format!("bad port name {port:?}")))?;
    fs::write(p, if on { "1" } else { "0" })
}

/// The hairpin mode of every bridge port, from one AF_BRIDGE link dump (which lists
/// bridge ports only): what reading `brport/hairpin_mode` of each port tells, for every
/// port in one exchange instead of an open and a read per port (1,000 guests: ~9 ms).
fn all_modes() -> io::Result<HashMap<String, bool>> {
    /// IFLA_BRPORT_MODE: the port's hairpin mode, one byte.
    const IFLA_BRPORT_MODE: u16 = 4;
    let mut req = LinkMessage::default();
    req.header.interface_family = AddressFamily::Bridge;
    let mut out = HashMap::new();
    for m in crate::rtnl::dump(RouteNetlinkMessage::GetLink(req))? {
        let RouteNetlinkMessage::NewLink(l) = m else {
            continue;
        };
        let mut name = None;
        let mut mode = None;
        for a in &l.attributes {
            match a {
                LinkAttribute::IfName(n) => name = Some(n.clone()),
                LinkAttribute::ProtoInfoBridge(info) => {
                    for i in info {
                        if let LinkProtoInfoBridge::Other(nla) = i
                            && nla.kind() == IFLA_BRPORT_MODE
                        {
                            let mut v = vec![0u8; nla.value_len()];
                            nla.emit_value(&mut v);
                            mode = v.first().map(|b| *b != 0);
                        }
                    }
                }
                _ => {}
            }
        }
        if let (Some(n), Some(m)) = (name, mode) {
            out.insert(n, m);
        }
    }
    Ok(out)
}

/// Makes hairpin mode on exactly for `wanted`; `saved` holds the value each port had
/// before virtgate turned it on, and is updated.
///
/// `only`: look at these ports alone (a hook changes one domain's), else at every port.
pub fn sync(
    wanted: &[String],
    saved: &mut BTreeMap<String, bool>,
    only: Option<&std::collections::BTreeSet<String>>,
) {
    let concerned = |p: &String| only.is_none_or(|o| o.contains(p));
    // every port: one dump; a hook's few ports: one read each
    let modes = if only.is_none() {
        all_modes()
            .inspect_err(|e| tracing::debug!("bridge ports over netlink: {e}; reading sysfs"))
            .ok()
    } else {
        None
    };
    let get = |port: &str| match &modes {
        Some(m) => m.get(port).copied(),
        None => get(port),
    };
    for port in wanted.iter().filter(|p| concerned(p)) {
        if saved.contains_key(port) {
            if get(port) == Some(false) {
                let _ = set(port, true);
            }
            continue;
        }
        match get(port) {
            Some(before) => {
                if !before && let Err(e) = set(port, true) {
                    tracing::warn!("cannot turn on hairpin mode on {port}: {e}");
                    continue;
                }
                saved.insert(port.clone(), before);
            }
            None => tracing::debug!("{port} is not a bridge port here; hairpin mode not set"),
        }
    }
    let wanted: std::collections::BTreeSet<&String> = wanted.iter().collect();
    let gone: Vec<String> = saved
        .keys()
        .filter(|p| concerned(p) && !wanted.contains(p))
        .cloned()
        .collect();
    for port in gone {
        if let Some(before) = saved.remove(&port)
            && get(&port).is_some()
        {
            let _ = set(&port, before);
        }
    }
}
