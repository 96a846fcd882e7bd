//! The record's copy of a domain's config, in a form postcard reads back: the model's
//! `Listen` and `NicSelector` are adjacently tagged (for JSON), which postcard writes but
//! cannot read. Converted field by field, every field named, so that a field added to the
//! model does not compile until it is kept here too.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::model::{
    DomainConfig, ForwardSpec, Listen, NicSelector, PortRange, Proto, RateLimit, WhenStopped,
};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct KeptConfig {
    name: String,
    uuid: Option<String>,
    forwards: Vec<KeptSpec>,
    fail_closed: bool,
    when_stopped: WhenStopped,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct KeptSpec {
    proto: Proto,
    listen: KeptListen,
    host_ports: PortRange,
    guest_ports: PortRange,
    sources: Vec<IpNet>,
    nic: Option<KeptNic>,
    guest_addresses: Vec<IpAddr>,
    localhost: bool,
    description: Option<String>,
    rate: Option<RateLimit>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum KeptListen {
    Any,
    Address(IpAddr),
    Interface(String),
    DefaultRoute,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum KeptNic {
    Mac(String),
    Network(String),
    Bridge(String),
}

impl From<&DomainConfig> for KeptConfig {
    fn from(d: &DomainConfig) -> KeptConfig {
        let DomainConfig {
            name,
            uuid,
            forwards,
            fail_closed,
            when_stopped,
        } = d;
        KeptConfig {
            name: name.clone(),
            uuid: uuid.clone(),
            forwards: forwards.iter().map(KeptSpec::from).collect(),
            fail_closed: *fail_closed,
            when_stopped: *when_stopped,
        }
    }
}

impl From<KeptConfig> for DomainConfig {
    fn from(d: KeptConfig) -> DomainConfig {
        let KeptConfig {
            name,
            uuid,
            forwards,
            fail_closed,
            when_stopped,
        } = d;
        DomainConfig {
            name,
            uuid,
            forwards: forwards.into_iter().map(ForwardSpec::from).collect(),
            fail_closed,
            when_stopped,
        }
    }
}

impl From<&ForwardSpec> for KeptSpec {
    fn from(f: &ForwardSpec) -> KeptSpec {
        let ForwardSpec {
            proto,
            listen,
            host_ports,
            guest_ports,
            sources,
            nic,
            guest_addresses,
            localhost,
            description,
            rate,
        } = f;
        KeptSpec {
            proto: *proto,
            listen: match listen {
                Listen::Any => KeptListen::Any,
                Listen::Address(a) => KeptListen::Address(*a),
                Listen::Interface(i) => KeptListen::Interface(i.clone()),
                Listen::DefaultRoute => KeptListen::DefaultRoute,
            },
            host_ports: *host_ports,
            guest_ports: *guest_ports,
            sources: sources.clone(),
            nic: nic.as_ref().map(|n| match n {
                NicSelector::Mac(m) => KeptNic::Mac(m.clone()),
                NicSelector::Network(n) => KeptNic::Network(n.clone()),
                NicSelector::Bridge(b) => KeptNic::Bridge(b.clone()),
            }),
            guest_addresses: guest_addresses.clone(),
            localhost: *localhost,
            description: description.clone(),
            rate: *rate,
        }
    }
}

impl From<KeptSpec> for ForwardSpec {
    fn from(f: KeptSpec) -> ForwardSpec {
        let KeptSpec {
            proto,
            listen,
            host_ports,
            guest_ports,
            sources,
            nic,
            guest_addresses,
            localhost,
            description,
            rate,
        } = f;
        ForwardSpec {
            proto,
            listen: match listen {
                KeptListen::Any => Listen::Any,
                KeptListen::Address(a) => Listen::Address(a),
                KeptListen::Interface(i) => Listen::Interface(i),
                KeptListen::DefaultRoute => Listen::DefaultRoute,
            },
            host_ports,
            guest_ports,
            sources,
            nic: nic.map(|n| match n {
                KeptNic::Mac(m) => NicSelector::Mac(m),
                KeptNic::Network(n) => NicSelector::Network(n),
                KeptNic::Bridge(b) => NicSelector::Bridge(b),
            }),
            guest_addresses,
            localhost,
            description,
            rate,
        }
    }
}
