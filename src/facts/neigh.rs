//! Kernel neighbour table and default route, read over rtnetlink (netlink-packet-route on a
//! plain synchronous netlink socket: no async runtime is needed for two dumps).

use std::io;
use std::net::{IpAddr, Ipv4Addr};

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{RouteAttribute, RouteMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use super::Neighbour;

use crate::rtnl::dump;

fn ifname(index: u32) -> String {
    nix::net::if_::if_indextoname(index)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn format_mac(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A usable entry (not incomplete, failed or a NOARP device's), with its address and MAC.
fn usable(n: &NeighbourMessage) -> Option<Neighbour> {
    if matches!(
        n.header.state,
        NeighbourState::Incomplete | NeighbourState::Failed | NeighbourState::Noarp
    ) {
        return None;
    }
    let mut ip = None;
    let mut mac = None;
    for a in &n.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                ip = Some(IpAddr::V4(*v4))
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                ip = Some(IpAddr::V6(*v6))
            }
            NeighbourAttribute::LinkLayerAddress(b) if b.len() == 6 => mac = Some(format_mac(b)),
            _ => {}
        }
    }
    Some(Neighbour {
        ifname: ifname(n.header.ifindex),
        mac: mac?,
        ip: ip?,
    })
}

/// The neighbour table (IPv4 and IPv6), usable entries only.
pub fn read_neighbours() -> io::Result<Vec<Neighbour>> {
    let msgs = dump(RouteNetlinkMessage::GetNeighbour(
        NeighbourMessage::default(),
    ))?;
    Ok(msgs
        .iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewNeighbour(n) => usable(n),
            _ => None,
        })
        .collect())
}

/// rtnetlink's multicast group of neighbour changes (RTNLGRP_NEIGH).
pub const GROUP_NEIGH: u32 = 3;

/// The usable entries a buffer of neighbour notifications announces (new or changed;
/// deletions are not facts the daemon waits for).
pub fn announced(data: &[u8]) -> Vec<Neighbour> {
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < data.len() {
        let Ok(m) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..]) else {
            break;
        };
        let len = m.header.length as usize;
        if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(n)) = &m.payload
            && let Some(x) = usable(n)
        {
            out.push(x);
        }
        if len == 0 {
            break;
        }
        offset += len;
    }
    out
}

/// Every address of every interface, with its prefix.
pub fn interface_addresses() -> io::Result<Vec<(String, ipnet::IpNet)>> {
    let addrs = dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))?;
    Ok(addrs
        .iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewAddress(a) => a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Address(ip) => ipnet::IpNet::new(*ip, a.header.prefix_len)
                    .ok()
                    .map(|n| (ifname(a.header.index), n)),
                _ => None,
            }),
            _ => None,
        })
        .collect())
}

/// The first IPv4 address of the interface carrying the IPv4 default route.
pub fn default_route_v4() -> io::Result<Option<Ipv4Addr>> {
    let mut rm = RouteMessage::default();
    rm.header.address_family = AddressFamily::Inet;
    let routes = dump(RouteNetlinkMessage::GetRoute(rm))?;
    let oif = routes.iter().find_map(|m| match m {
        RouteNetlinkMessage::NewRoute(r)
            if r.header.destination_prefix_length == 0
                && r.header.address_family == AddressFamily::Inet
                && r.header.table == 254 =>
        {
            r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            })
        }
        _ => None,
    });
    let Some(oif) = oif else { return Ok(None) };
    let mut am = AddressMessage::default();
    am.header.family = AddressFamily::Inet;
    let addrs = dump(RouteNetlinkMessage::GetAddress(am))?;
    Ok(addrs.iter().find_map(|m| match m {
        RouteNetlinkMessage::NewAddress(a) if a.header.index == oif => {
            a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Address(IpAddr::V4(v4)) => Some(*v4),
                _ => None,
            })
        }
        _ => None,
    }))
}
