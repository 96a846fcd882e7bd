//! Facts about the host and libvirt, gathered without calling libvirt: running domains and
//! their NICs, networks, DHCP leases, the neighbour table and sysctls. The types here are
//! plain data so the planner stays pure; the readers live in submodules.

pub mod builder;
pub mod cache;
pub mod duid;
pub mod leases;
pub mod libvirt;
pub mod neigh;
pub mod snoop;
pub mod snoop_frames;
pub mod sysctl;

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use crate::model::LibvirtFirewall;

pub use crate::model::domain::{DomainFacts, Nic};
pub use crate::model::parse_mac;
pub use builder::FactsBuilder;

/// A DHCP host reservation of a network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// The NIC's MAC: `mac=` (IPv4), or the MAC inside a DUID-LL/LLT `id=` (IPv6); empty
    /// when the reservation names no MAC (then only `name` matches it).
    pub mac: String,
    pub ip: IpAddr,
    /// The host name (`name=`): an IPv6 reservation whose DUID carries no MAC is the
    /// domain's of this name.
    #[serde(default)]
    pub name: Option<String>,
}

/// A libvirt network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NetworkFacts {
    pub name: String,
    pub bridge: String,
    /// `nat`, `route`, `open`, ... or empty for isolated.
    pub forward_mode: String,
    /// Host address with prefix, e.g. 192.168.122.1/24.
    pub addresses: Vec<IpNet>,
    pub reservations: Vec<Reservation>,
    pub ipv6_nat: bool,
    pub firewall: LibvirtFirewall,
    /// Whether the network is running (its status file exists).
    pub active: bool,
}

impl NetworkFacts {
    /// The subnets (host address truncated to the prefix).
    pub fn subnets(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.addresses.iter().map(|a| a.trunc())
    }

    pub fn contains(&self, ip: &IpAddr) -> bool {
        self.subnets().any(|s| s.contains(ip))
    }
}

/// A DHCP lease from dnsmasq's status file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub bridge: String,
    pub mac: String,
    pub ip: IpAddr,
    pub expiry: u64,
}

/// A kernel neighbour table entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Neighbour {
    pub ifname: String,
    pub mac: String,
    pub ip: IpAddr,
}

/// Host settings virtgate depends on and only reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Sysctls {
    pub ip_forward: Option<bool>,
    pub ipv6_forwarding: Option<bool>,
    /// route_localnet of `all` or per bridge.
    pub route_localnet: Vec<(String, bool)>,
    /// Whether br_netfilter is loaded with bridge-nf-call-iptables = 1.
    pub bridge_nf_call_iptables: Option<bool>,
}

/// Everything the planner needs to know about the world.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Facts {
    pub domains: Vec<DomainFacts>,
    pub networks: Vec<NetworkFacts>,
    pub leases: Vec<Lease>,
    pub neighbours: Vec<Neighbour>,
    /// Addresses the daemon learned on the guests' taps ([`snoop`]).
    #[serde(default)]
    pub snooped: Vec<snoop::Snooped>,
    pub default_route_v4: Option<Ipv4Addr>,
    pub sysctls: Sysctls,
    /// Families whose iptables filter table (iptables-nft) has a `FORWARD` chain: someone
    /// else's iptables rules (Docker's, ufw's: often policy DROP) see forwarded packets,
    /// so a DNAT'ed packet needs an accept there too, even on libvirt's nftables form.
    #[serde(default)]
    pub xt_forward: Vec<crate::model::Family>,
    /// The host's own addresses, by interface: a guest on a bridge that is no libvirt
    /// network must have an address on one of the host's subnets of that bridge.
    #[serde(default)]
    pub host_addresses: Vec<(String, ipnet::IpNet)>,
    /// Seconds since the epoch, for lease expiry.
    pub now: u64,
}

impl Facts {
    /// The running domain a config entry means: by UUID when the entry pins one (then a
    /// different domain with the same name does not match), else by name.
    pub fn domain(&self, name: &str, uuid: Option<&str>) -> Option<&DomainFacts> {
        match uuid {
            Some(u) => self
                .domains
                .iter()
                .find(|d| d.uuid.as_deref() == Some(u))
                .or_else(|| {
                    self.domains
                        .iter()
                        .find(|d| d.name == name && d.uuid.is_none())
                }),
            None => self.domains.iter().find(|d| d.name == name),
        }
    }

    pub fn network_by_name(&self, name: &str) -> Option<&NetworkFacts> {
        self.networks.iter().find(|n| n.name == name)
    }

    pub fn network_by_bridge(&self, bridge: &str) -> Option<&NetworkFacts> {
        self.networks.iter().find(|n| n.bridge == bridge)
    }
}

/// Paths of libvirt's files, under an optional root prefix (for tests).
#[derive(Debug, Clone)]
pub struct LibvirtPaths {
    pub root: PathBuf,
}

impl LibvirtPaths {
    pub fn new(root: &Path) -> LibvirtPaths {
        LibvirtPaths {
            root: root.to_path_buf(),
        }
    }

    fn join(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    pub fn qemu_status_dir(&self) -> PathBuf {
        self.join("run/libvirt/qemu")
    }

    pub fn network_status_dir(&self) -> PathBuf {
        self.join("run/libvirt/network")
    }

    pub fn network_config_dir(&self) -> PathBuf {
        self.join("etc/libvirt/qemu/networks")
    }

    pub fn dnsmasq_dir(&self) -> PathBuf {
        self.join("var/lib/libvirt/dnsmasq")
    }

    pub fn hooks_dir(&self) -> PathBuf {
        self.join("etc/libvirt/hooks")
    }
}

/// What gathering facts needs from the kernel's firewall, asked only where it matters:
/// the bridges libvirt's nftables form guards (for networks whose status does not record
/// the form) and the families whose iptables `FORWARD` chain exists (beside libvirt's
/// nftables form). The firewall side answers (`reconcile` passes it in):
/// facts never run the firewall's tools themselves.
pub trait FirewallProbe {
    fn libvirt_nft_bridges(&self) -> std::collections::BTreeSet<String>;
    fn xt_forward_families(&self) -> Vec<crate::model::Family>;
}

/// Gathers all facts from libvirt's files, the kernel and /proc. `state_dir`, where there
/// is one, keeps libvirt's files parsed ([`cache`]).
pub fn gather(
    paths: &LibvirtPaths,
    extra_domains: &[DomainFacts],
    probe: &dyn FirewallProbe,
    state_dir: Option<&Path>,
) -> Facts {
    let cache = state_dir.map(cache::domains_file);
    let mut domains = libvirt::read_running_domains(paths, cache.as_deref());
    let known: std::collections::HashSet<String> = domains.iter().map(|d| d.name.clone()).collect();
    for d in extra_domains {
        if !known.contains(&d.name) {
            domains.push(d.clone());
        }
    }
    gather_only(paths, domains, probe, state_dir)
}

/// [`gather`] with the given domains instead of libvirt's running ones.
pub fn gather_only(
    paths: &LibvirtPaths,
    domains: Vec<DomainFacts>,
    probe: &dyn FirewallProbe,
    state_dir: Option<&Path>,
) -> Facts {
    let cache = state_dir.map(cache::networks_file);
    let networks = libvirt::read_networks(paths, probe, cache.as_deref());
    let leases = networks
        .iter()
        .flat_map(|n| leases::read_leases(&paths.dnsmasq_dir(), &n.bridge))
        .collect();
    // read only where they matter (the hook gathers for one domain on every VM start):
    // iptables' FORWARD beside libvirt's nftables form, the host's addresses for a NIC
    // on a bridge that is no libvirt network
    let xt_forward = if networks
        .iter()
        .any(|n| n.firewall == LibvirtFirewall::Nftables)
    {
        probe.xt_forward_families()
    } else {
        Vec::new()
    };
    let known = |n: &Nic| {
        networks.iter().any(|x| {
            n.network.as_deref() == Some(x.name.as_str())
                || n.bridge.as_deref() == Some(x.bridge.as_str())
        })
    };
    let plain_bridge = domains
        .iter()
        .flat_map(|d| &d.nics)
        .any(|n| n.bridge.is_some() && !known(n));
    let host_addresses = if plain_bridge {
        neigh::interface_addresses().unwrap_or_else(|e| {
            tracing::warn!("cannot read the host's addresses: {e}");
            Vec::new()
        })
    } else {
        Vec::new()
    };
    Facts {
        domains,
        networks,
        leases,
        neighbours: neigh::read_neighbours().unwrap_or_else(|e| {
            tracing::warn!("cannot read the neighbour table: {e}");
            Vec::new()
        }),
        // the daemon's record: read by the caller, who knows the state directory
        snooped: Vec::new(),
        default_route_v4: neigh::default_route_v4().unwrap_or(None),
        sysctls: sysctl::read(),
        xt_forward,
        host_addresses,
        now: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_started_domain_stored_by_an_earlier_release_loads() {
        // the earlier state kept the metadata parsed: dropped, the rest kept
        let old = r#"{"name":"web","uuid":null,"nics":[],"metadata":{"forwards":{"Ok":[]},"fail_closed":true}}"#;
        let d: DomainFacts = serde_json::from_str(old).unwrap();
        assert_eq!((d.name.as_str(), d.metadata), ("web", None));
        let now = r#"{"name":"web","uuid":null,"nics":[],"metadata":"<metadata/>"}"#;
        let d: DomainFacts = serde_json::from_str(now).unwrap();
        assert_eq!(d.metadata.as_deref(), Some("<metadata/>"));
        let none = r#"{"name":"web","uuid":null,"nics":[]}"#;
        assert_eq!(
            serde_json::from_str::<DomainFacts>(none).unwrap().metadata,
            None
        );
    }
}
