//! The sysctls virtgate depends on. Read only: virtgate reports them, never flips them.

use std::fs;

use super::Sysctls;

fn read_bool(path: &str) -> Option<bool> {
    fs::read_to_string(path).ok().map(|s| s.trim() != "0")
}

pub fn read() -> Sysctls {
    let mut route_localnet = Vec::new();
    if let Ok(rd) = fs::read_dir("/proc/sys/net/ipv4/conf") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(v) = read_bool(&format!("/proc/sys/net/ipv4/conf/{name}/route_localnet")) {
                route_localnet.push((name, v));
            }
        }
    }
    route_localnet.sort();
    Sysctls {
        ip_forward: read_bool("/proc/sys/net/ipv4/ip_forward"),
        ipv6_forwarding: read_bool("/proc/sys/net/ipv6/conf/all/forwarding"),
        route_localnet,
        bridge_nf_call_iptables: read_bool("/proc/sys/net/bridge/bridge-nf-call-iptables"),
    }
}

impl Sysctls {
    /// Whether 127.0.0.1 traffic may be routed out of `bridge`.
    pub fn route_localnet_on(&self, bridge: &str) -> bool {
        self.route_localnet
            .iter()
            .any(|(n, v)| *v && (n == "all" || n == bridge))
    }
}
