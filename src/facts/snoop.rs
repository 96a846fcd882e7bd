//! Guest addresses learned by watching each guest's own tap (snooping, the last source of
//! SPEC part 3's order, as libvirt's nwfilter learns them): the DHCP ACK the host's
//! dnsmasq sends to the guest's MAC, an ARP from the guest, its first IPv4 or IPv6 packet.
//! The daemon holds the sockets ([`crate::daemon`]); what it learned is recorded in the
//! state directory (`snooped.json`, this boot's only) for every virtgate process to plan
//! with. Here: the frames' parsing and the rule that decides whether a new claim replaces
//! what a tap has, both pure.
//!
//! What the planner still checks, as for the neighbour table: the address lies in the
//! network's subnet, is not its network, broadcast or the host's own address, and is not
//! another domain's configured address, reservation or lease.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::model::Family;

/// The file in the state directory.
pub const FILE: &str = "snooped.json";
/// Largest file read.
const MAX_BYTES: u64 = 4 << 20;
/// A claim from a packet replaces the tap's address of its family only once that address
/// has not been seen for this long (a guest renumbered by its admin); never while a DHCP
/// lease for it is valid.
pub const STALE_SECS: u64 = 120;
/// Lease time of an ACK without option 51.
const DEFAULT_LEASE_SECS: u64 = 3600;

/// How an address was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnoopedBy {
    /// A DHCP ACK to the guest's MAC (its `yiaddr`).
    DhcpAck,
    /// An ARP from the guest (its sender address).
    Arp,
    /// An IPv4 or IPv6 packet from the guest (its source address).
    Packet,
}

/// One learned address of a guest's NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snooped {
    /// The guest's tap (its port on the bridge).
    pub tap: String,
    /// The NIC's MAC, lower case.
    pub mac: String,
    pub ip: IpAddr,
    pub how: SnoopedBy,
    /// When it was last seen (seconds since the epoch).
    pub seen: u64,
    /// When the lease of a DHCP ACK ends.
    #[serde(default)]
    pub lease_until: Option<u64>,
}

/// What one frame on a guest's tap teaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub ip: IpAddr,
    pub how: SnoopedBy,
    /// Lease seconds (DHCP ACK only).
    pub lease_secs: Option<u64>,
}

/// Reads a frame seen on the tap of the NIC with `mac`: `outgoing` frames are the host's
/// to the guest (only a DHCP ACK for that MAC teaches), the others the guest's own (its
/// source MAC must be the NIC's).
pub fn parse(frame: &[u8], outgoing: bool, mac: [u8; 6]) -> Option<Claim> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let payload = frame.get(14..)?;
    if outgoing {
        return (ethertype == 0x0800)
            .then(|| dhcp_ack(payload, mac))
            .flatten();
    }
    if frame.get(6..12)? != mac {
        return None;
    }
    let claim = |ip: IpAddr, how| Claim {
        ip,
        how,
        lease_secs: None,
    };
    let ip = match ethertype {
        // ARP for IPv4 over Ethernet: the sender's protocol address
        0x0806 if payload.get(..6)? == [0, 1, 8, 0, 6, 4] => {
            claim(IpAddr::V4(v4(payload.get(14..18)?)), SnoopedBy::Arp)
        }
        0x0800 if payload.first()? >> 4 == 4 => {
            claim(IpAddr::V4(v4(payload.get(12..16)?)), SnoopedBy::Packet)
        }
        0x86dd if payload.first()? >> 4 == 6 => {
            let b: [u8; 16] = payload.get(8..24)?.try_into().ok()?;
            claim(IpAddr::V6(Ipv6Addr::from(b)), SnoopedBy::Packet)
        }
        _ => return None,
    };
    usable(&ip.ip).then_some(ip)
}

fn v4(b: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(b[0], b[1], b[2], b[3])
}

/// Not an address a guest can be reached at: unspecified (DHCP DISCOVER, DAD), link-local,
/// loopback, multicast, broadcast.
fn usable(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            !(a.is_unspecified()
                || a.is_link_local()
                || a.is_loopback()
                || a.is_multicast()
                || a.is_broadcast())
        }
        IpAddr::V6(a) => {
            !(a.is_unspecified()
                || a.is_loopback()
                || a.is_multicast()
                || (a.segments()[0] & 0xffc0) == 0xfe80)
        }
    }
}

/// A DHCP ACK (UDP 67 -> 68, BOOTREPLY, option 53 = 5) whose client hardware address is
/// `mac`: its `yiaddr` and lease time (option 51).
fn dhcp_ack(ip: &[u8], mac: [u8; 6]) -> Option<Claim> {
    let ihl = usize::from(ip.first()? & 0x0f) * 4;
    if ip.first()? >> 4 != 4 || *ip.get(9)? != 17 || ihl < 20 {
        return None;
    }
    let udp = ip.get(ihl..)?;
    let port = |i: usize| Some(u16::from_be_bytes([*udp.get(i)?, *udp.get(i + 1)?]));
    if port(0)? != 67 || port(2)? != 68 {
        return None;
    }
    let bootp = udp.get(8..)?;
    // op 2 (reply), htype 1 (Ethernet), hlen 6, chaddr = mac, the magic cookie
    if bootp.get(..3)? != [2, 1, 6]
        || bootp.get(28..34)? != mac
        || bootp.get(236..240)? != [99, 130, 83, 99]
    {
        return None;
    }
    let yiaddr = IpAddr::V4(v4(bootp.get(16..20)?));
    let (mut is_ack, mut lease) = (false, None);
    let mut opts = bootp.get(240..)?;
    while let [code, rest @ ..] = opts {
        match code {
            0 => opts = rest,
            255 => break,
            _ => {
                let len = usize::from(*rest.first()?);
                let val = rest.get(1..1 + len)?;
                match (code, val) {
                    (53, [t]) => is_ack = *t == 5,
                    (51, [a, b, c, d]) => {
                        lease = Some(u64::from(u32::from_be_bytes([*a, *b, *c, *d])))
                    }
                    _ => {}
                }
                opts = rest.get(1 + len..)?;
            }
        }
    }
    (is_ack && usable(&yiaddr)).then_some(Claim {
        ip: yiaddr,
        how: SnoopedBy::DhcpAck,
        lease_secs: Some(lease.unwrap_or(DEFAULT_LEASE_SECS)),
    })
}

/// What a claim does to the tap's address of its family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Learned {
    /// A new address (first, or one that replaces a stale one, or a new ACK).
    New(Snooped),
    /// The same address seen again (its `seen` is refreshed).
    Again,
    /// Another address while the current one holds (a valid lease, or seen recently):
    /// the guest cannot move its forward by claiming it.
    Refused { held: IpAddr },
}

/// Decides a claim against the tap's current address of the same family.
pub fn learn(current: Option<&Snooped>, tap: &str, mac: &str, c: Claim, now: u64) -> Learned {
    let new = || Snooped {
        tap: tap.to_string(),
        mac: mac.to_string(),
        ip: c.ip,
        how: c.how,
        seen: now,
        lease_until: c.lease_secs.map(|s| now.saturating_add(s)),
    };
    let Some(cur) = current else {
        return Learned::New(new());
    };
    debug_assert_eq!(Family::of(&cur.ip), Family::of(&c.ip));
    if cur.ip == c.ip {
        // an ACK renews (or starts) the lease
        return if c.how == SnoopedBy::DhcpAck && cur.lease_until != new().lease_until {
            Learned::New(new())
        } else {
            Learned::Again
        };
    }
    // the DHCP server's word replaces what packets said; nothing else moves a valid lease
    let leased = cur.lease_until.is_some_and(|t| t > now);
    if c.how == SnoopedBy::DhcpAck || (!leased && now.saturating_sub(cur.seen) >= STALE_SECS) {
        Learned::New(new())
    } else {
        Learned::Refused { held: cur.ip }
    }
}

#[derive(Serialize, Deserialize, Default)]
struct SnoopedFile {
    boot_id: Option<String>,
    addresses: Vec<Snooped>,
}

/// What the daemon recorded in `state_dir` during this boot (nothing if there is no file,
/// or it is from an earlier boot, or unreadable: snooped addresses are only a fallback).
pub fn read(state_dir: &Path) -> Vec<Snooped> {
    let p = state_dir.join(FILE);
    let Ok(bytes) = crate::files::read_bounded(&p, MAX_BYTES, crate::files::Follow::No) else {
        return Vec::new();
    };
    match serde_json::from_slice::<SnoopedFile>(&bytes) {
        Ok(f) if f.boot_id == crate::files::boot_id() => f.addresses,
        Ok(_) => Vec::new(),
        Err(e) => {
            tracing::warn!("{}: {e}; snooped addresses ignored", p.display());
            Vec::new()
        }
    }
}

/// Records the addresses (atomically, mode 0600).
pub fn write(state_dir: &Path, addresses: &[Snooped]) -> std::io::Result<()> {
    let f = SnoopedFile {
        boot_id: crate::files::boot_id(),
        addresses: addresses.to_vec(),
    };
    let text = serde_json::to_vec_pretty(&f).map_err(std::io::Error::other)?;
    crate::files::write_atomic(&state_dir.join(FILE), &text, 0o600)
}

#[cfg(test)]
#[path = "snoop_tests.rs"]
mod tests;
