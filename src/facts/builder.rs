//! [`FactsBuilder`]: facts put together by hand, for tests, benchmarks and fuzzing, the
//! way libvirt would describe them (a NAT network on a bridge, domains with one NIC on it).

use std::net::IpAddr;

use super::{DomainFacts, Facts, Lease, LibvirtFirewall, NetworkFacts, Nic, Reservation};

/// Builds [`Facts`]; every address is parsed when given (a bad one panics: fixtures only).
#[derive(Debug, Clone, Default)]
pub struct FactsBuilder {
    facts: Facts,
}

fn ip(s: &str) -> IpAddr {
    s.parse()
        .unwrap_or_else(|_| panic!("fixture address {s:?} is not an IP address"))
}

impl FactsBuilder {
    /// Facts with one running NAT network `name` on `bridge` with the host's `addresses`
    /// (`ADDR/PREFIX`).
    pub fn network(name: &str, bridge: &str, addresses: &[&str]) -> FactsBuilder {
        FactsBuilder::default().and_network(name, bridge, addresses)
    }

    /// Another running NAT network.
    pub fn and_network(mut self, name: &str, bridge: &str, addresses: &[&str]) -> FactsBuilder {
        self.facts.networks.push(NetworkFacts {
            name: name.into(),
            bridge: bridge.into(),
            forward_mode: "nat".into(),
            addresses: addresses
                .iter()
                .map(|a| {
                    a.parse()
                        .unwrap_or_else(|_| panic!("fixture subnet {a:?} is not ADDR/PREFIX"))
                })
                .collect(),
            active: true,
            ..Default::default()
        });
        self
    }

    /// libvirt's firewall form of the last network.
    pub fn firewall(mut self, fw: LibvirtFirewall) -> FactsBuilder {
        if let Some(n) = self.facts.networks.last_mut() {
            n.firewall = fw;
        }
        self
    }

    /// A running domain with one NIC (`mac`, bridge port `tap`) on the last network.
    pub fn domain(mut self, name: &str, mac: &str, tap: &str) -> FactsBuilder {
        let net = self.facts.networks.last();
        let nic = Nic {
            mac: mac.into(),
            network: net.map(|n| n.name.clone()),
            bridge: net.map(|n| n.bridge.clone()),
            tap: Some(tap.into()),
        };
        self.facts.domains.push(DomainFacts {
            name: name.into(),
            uuid: None,
            nics: vec![nic],
            metadata: None,
        });
        self
    }

    /// A `<dhcp><host mac ip>` reservation of the last network.
    pub fn reservation(mut self, mac: &str, addr: &str) -> FactsBuilder {
        if let Some(n) = self.facts.networks.last_mut() {
            n.reservations.push(Reservation {
                mac: mac.into(),
                ip: ip(addr),
                name: None,
            });
        }
        self
    }

    /// A dnsmasq lease on the last network's bridge.
    pub fn lease(mut self, mac: &str, addr: &str, expiry: u64) -> FactsBuilder {
        let bridge = self
            .facts
            .networks
            .last()
            .map(|n| n.bridge.clone())
            .unwrap_or_default();
        self.facts.leases.push(Lease {
            bridge,
            mac: mac.into(),
            ip: ip(addr),
            expiry,
        });
        self
    }

    /// The time leases are judged at (seconds since the epoch).
    pub fn now(mut self, now: u64) -> FactsBuilder {
        self.facts.now = now;
        self
    }

    pub fn build(self) -> Facts {
        self.facts
    }
}
