use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::*;
use crate::facts::snoop_frames as frames;

const MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x20];
const OTHER: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x21];
const BRIDGE: [u8; 6] = [0xfe, 0x54, 0, 0, 0, 1];

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn v4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

#[test]
fn what_a_guest_sends_teaches_its_source_address() {
    let arp = frames::arp_announce(MAC, v4("192.168.122.40"));
    let c = parse(&arp, false, MAC).unwrap();
    assert_eq!((c.ip, c.how), (ip("192.168.122.40"), SnoopedBy::Arp));
    let udp = frames::udp4(
        MAC,
        [0xff; 6],
        v4("192.168.122.41"),
        v4("255.255.255.255"),
        9,
        9,
        b"x",
    );
    let c = parse(&udp, false, MAC).unwrap();
    assert_eq!((c.ip, c.how), (ip("192.168.122.41"), SnoopedBy::Packet));
    let six = frames::udp6(MAC, "fd00:122::40".parse().unwrap(), b"x");
    assert_eq!(parse(&six, false, MAC).unwrap().ip, ip("fd00:122::40"));
}

#[test]
fn nothing_is_learned_from_others_or_from_placeholder_addresses() {
    // another MAC on the guest's tap (spoofed or bridged through)
    let arp = frames::arp_announce(OTHER, v4("192.168.122.40"));
    assert_eq!(parse(&arp, false, MAC), None);
    // DHCP DISCOVER's 0.0.0.0, link-local, DAD's ::, a multicast source
    for src in ["0.0.0.0", "169.254.1.1", "224.0.0.1"] {
        let f = frames::udp4(MAC, [0xff; 6], v4(src), v4("255.255.255.255"), 68, 67, b"");
        assert_eq!(parse(&f, false, MAC), None, "{src}");
    }
    for src in ["::", "fe80::1"] {
        let f = frames::udp6(MAC, src.parse::<Ipv6Addr>().unwrap(), b"");
        assert_eq!(parse(&f, false, MAC), None, "{src}");
    }
    // the host's own packets to the guest teach nothing but an ACK
    let f = frames::udp4(
        BRIDGE,
        MAC,
        v4("192.168.122.1"),
        v4("192.168.122.40"),
        53,
        5353,
        b"",
    );
    assert_eq!(parse(&f, true, MAC), None);
    // truncated frames
    for n in 0..arp.len() {
        assert_eq!(parse(&arp[..n], false, MAC), None, "{n} bytes");
    }
}

#[test]
fn a_dhcp_ack_to_the_guests_mac_teaches_its_yiaddr_and_lease() {
    let ack = frames::dhcp_ack(BRIDGE, v4("192.168.122.1"), MAC, v4("192.168.122.42"), 600);
    let c = parse(&ack, true, MAC).unwrap();
    assert_eq!(
        c,
        Claim {
            ip: ip("192.168.122.42"),
            how: SnoopedBy::DhcpAck,
            lease_secs: Some(600)
        }
    );
    // for another client, or an OFFER (type 2), it does not
    assert_eq!(parse(&ack, true, OTHER), None);
    let mut offer = ack.clone();
    let at = offer.windows(3).position(|w| w == [53, 1, 5]).unwrap();
    offer[at + 2] = 2;
    assert_eq!(parse(&offer, true, MAC), None);
    for n in 0..ack.len() {
        let _ = parse(&ack[..n], true, MAC);
    }
}

fn claim(s: &str, how: SnoopedBy, lease: Option<u64>) -> Claim {
    Claim {
        ip: ip(s),
        how,
        lease_secs: lease,
    }
}

/// What a claim of `addr` (by `how`, with an ACK's `lease`) on vnet5 does at `now`.
fn on_vnet5(
    cur: Option<&Snooped>,
    addr: &str,
    how: SnoopedBy,
    lease: Option<u64>,
    now: u64,
) -> Learned {
    learn(
        cur,
        "vnet5",
        "52:54:00:00:00:20",
        claim(addr, how, lease),
        now,
    )
}

fn new(l: Learned) -> Snooped {
    match l {
        Learned::New(s) => s,
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_guest_cannot_move_its_address_while_it_holds() {
    use SnoopedBy::{Arp, DhcpAck, Packet};
    let first = new(on_vnet5(None, "192.168.122.40", Packet, None, 1000));
    let first = Some(&first);
    assert_eq!(
        on_vnet5(first, "192.168.122.40", Arp, None, 1001),
        Learned::Again
    );
    // another address, seen recently: refused
    assert_eq!(
        on_vnet5(first, "192.168.122.99", Arp, None, 1050),
        Learned::Refused {
            held: ip("192.168.122.40")
        }
    );
    // stale: the guest was renumbered
    let later = new(on_vnet5(
        first,
        "192.168.122.99",
        Arp,
        None,
        1000 + STALE_SECS,
    ));
    assert_eq!(later.ip, ip("192.168.122.99"));
    // an ACK's lease holds however stale, until it ends; another ACK replaces it
    let leased = new(on_vnet5(None, "192.168.122.42", DhcpAck, Some(600), 1000));
    assert_eq!(leased.lease_until, Some(1600));
    let leased = Some(&leased);
    assert!(matches!(
        on_vnet5(leased, "192.168.122.99", Packet, None, 1500),
        Learned::Refused { .. }
    ));
    assert!(matches!(
        on_vnet5(leased, "192.168.122.99", Packet, None, 1601),
        Learned::New(_)
    ));
    let renewed = new(on_vnet5(leased, "192.168.122.43", DhcpAck, Some(600), 1500));
    assert_eq!(renewed.ip, ip("192.168.122.43"));
}

#[test]
fn the_record_is_this_boots_only() {
    let dir = tempfile::tempdir().unwrap();
    let s = Snooped {
        tap: "vnet5".into(),
        mac: "52:54:00:00:00:20".into(),
        ip: ip("192.168.122.40"),
        how: SnoopedBy::Arp,
        seen: 1,
        lease_until: None,
    };
    write(dir.path(), std::slice::from_ref(&s)).unwrap();
    assert_eq!(read(dir.path()), vec![s]);
    let text = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
    let earlier = text.replace(&crate::files::boot_id().unwrap_or_default(), "another-boot");
    std::fs::write(dir.path().join(FILE), earlier).unwrap();
    if crate::files::boot_id().is_some() {
        assert!(read(dir.path()).is_empty());
    }
}
