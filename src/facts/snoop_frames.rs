//! Ethernet frames as a guest or the host's dnsmasq sends them: what the snooping tests
//! (unit and kernel) put on a guest's tap.

use std::net::{Ipv4Addr, Ipv6Addr};

fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ARP announcement (gratuitous request: sender and target address `ip`).
pub fn arp_announce(mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    let mut f = eth([0xff; 6], mac, 0x0806);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&ip.octets());
    f
}

/// A UDP datagram in IPv4 from `src` to `dst` (Ethernet broadcast, so that no ARP is
/// needed and the host's neighbour table learns nothing from it).
pub fn udp4(
    mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = eth(dst_mac, mac, 0x0800);
    let len = 20 + 8 + payload.len();
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]); // no UDP checksum (allowed in IPv4)
    f.extend_from_slice(payload);
    f
}

/// A UDP datagram in IPv6 from `src` to all nodes.
pub fn udp6(mac: [u8; 6], src: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
    let mut f = eth([0x33, 0x33, 0, 0, 0, 1], mac, 0x86dd);
    let len = (8 + payload.len()) as u16;
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&len.to_be_bytes());
    f.extend_from_slice(&[17, 64]);
    f.extend_from_slice(&src.octets());
    let dst: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    f.extend_from_slice(&dst.octets());
    let mut udp = Vec::new();
    udp.extend_from_slice(&9u16.to_be_bytes());
    udp.extend_from_slice(&9u16.to_be_bytes());
    udp.extend_from_slice(&len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    // the checksum over the pseudo-header is mandatory in IPv6
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&u32::from(len).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 17]);
    pseudo.extend_from_slice(&udp);
    let c = checksum(&pseudo);
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&udp);
    f
}

/// A DHCP ACK from the server (`server_mac`, `server`) giving `yiaddr` to `client` for
/// `lease` seconds.
pub fn dhcp_ack(
    server_mac: [u8; 6],
    server: Ipv4Addr,
    client: [u8; 6],
    yiaddr: Ipv4Addr,
    lease: u32,
) -> Vec<u8> {
    let mut b = vec![0u8; 240];
    b[..4].copy_from_slice(&[2, 1, 6, 0]);
    b[16..20].copy_from_slice(&yiaddr.octets());
    b[20..24].copy_from_slice(&server.octets());
    b[28..34].copy_from_slice(&client);
    b[236..240].copy_from_slice(&[99, 130, 83, 99]);
    b.extend_from_slice(&[53, 1, 5]);
    b.extend_from_slice(&[51, 4]);
    b.extend_from_slice(&lease.to_be_bytes());
    b.extend_from_slice(&[54, 4]);
    b.extend_from_slice(&server.octets());
    b.push(255);
    udp4(server_mac, client, server, yiaddr, 67, 68, &b)
}
