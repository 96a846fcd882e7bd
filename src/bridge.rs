//! Hairpin mode of bridge ports (sysfs `brport/hairpin_mode`), set for guests with
//! forwards while br_netfilter is active, and restored to its previous value afterwards.

use std::collections::BTreeMap;
use std::fs;

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
