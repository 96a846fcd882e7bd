//! Typed elements to `nft` text and to the canonical bytes a netlink dump returns.

use std::net::IpAddr;

use ipnet::IpNet;

use super::layout::{Data, Elem, Field};
use crate::firewall::nfnl;
use crate::model::{Family, Proto};

/// NFT_GOTO verdict code.
const NFT_GOTO: i32 = -4;

fn proto_num(p: Proto) -> u8 {
    match p {
        Proto::Tcp => 6,
        Proto::Udp => 17,
        Proto::Sctp => 132,
    }
}

fn range_text<T: std::fmt::Display + PartialEq + Copy>(lo: T, hi: T) -> String {
    if lo == hi {
        lo.to_string()
    } else {
        format!("{lo}-{hi}")
    }
}

fn field_text(f: &Field) -> String {
    match f {
        Field::V4(lo, hi) => {
            let prefix = 32 - (u32::from(*lo) ^ u32::from(*hi)).count_ones() as u8;
            match IpNet::new(IpAddr::V4(*lo), prefix) {
                Ok(n) if lo != hi && n.broadcast() == IpAddr::V4(*hi) => n.to_string(),
                _ => range_text(*lo, *hi),
            }
        }
        Field::V6(lo, hi) => {
            let prefix = 128 - (u128::from(*lo) ^ u128::from(*hi)).count_ones() as u8;
            match IpNet::new(IpAddr::V6(*lo), prefix) {
                Ok(n) if lo != hi && n.broadcast() == IpAddr::V6(*hi) => n.to_string(),
                _ => range_text(*lo, *hi),
            }
        }
        Field::Proto(p) => p.as_str().to_string(),
        Field::Port(lo, hi) => range_text(*lo, *hi),
        Field::Ifname(i) => format!("\"{i}\""),
        Field::NfProto(Family::Ipv4) => "ipv4".into(),
        Field::NfProto(Family::Ipv6) => "ipv6".into(),
    }
}

fn fields_text(fs: &[Field]) -> String {
    fs.iter().map(field_text).collect::<Vec<_>>().join(" . ")
}

/// `KEY [: DATA]` as nft writes an element.
pub fn elem_text(e: &Elem) -> String {
    let k = fields_text(&e.key);
    match &e.data {
        None => k,
        Some(Data::Fields(d)) => format!("{k} : {}", fields_text(d)),
        Some(Data::Goto(c)) => format!("{k} : goto {c}"),
    }
}

/// Bytes of one field: (lo, hi), each padded to 4-byte registers.
fn field_bytes(f: &Field, lo: &mut Vec<u8>, hi: &mut Vec<u8>) {
    let pad = |v: &mut Vec<u8>| {
        while !v.len().is_multiple_of(4) {
            v.push(0);
        }
    };
    match f {
        Field::V4(a, b) => {
            lo.extend_from_slice(&a.octets());
            hi.extend_from_slice(&b.octets());
        }
        Field::V6(a, b) => {
            lo.extend_from_slice(&a.octets());
            hi.extend_from_slice(&b.octets());
        }
        Field::Proto(p) => {
            lo.push(proto_num(*p));
            hi.push(proto_num(*p));
        }
        Field::Port(a, b) => {
            lo.extend_from_slice(&a.to_be_bytes());
            hi.extend_from_slice(&b.to_be_bytes());
        }
        Field::Ifname(n) => {
            let mut b = n.as_bytes().to_vec();
            b.resize(16, 0);
            lo.extend_from_slice(&b);
            hi.extend_from_slice(&b);
        }
        Field::NfProto(f) => {
            let v = match f {
                Family::Ipv4 => nfnl::NFPROTO_IPV4,
                Family::Ipv6 => nfnl::NFPROTO_IPV6,
            };
            lo.push(v);
            hi.push(v);
        }
    }
    pad(lo);
    pad(hi);
}

/// The canonical (key ++ key end, data) bytes of an element, as [`nfnl::elements`] reads
/// them back.
pub fn elem_bytes(e: &Elem) -> (Vec<u8>, Vec<u8>) {
    let (mut lo, mut hi) = (Vec::new(), Vec::new());
    for f in &e.key {
        field_bytes(f, &mut lo, &mut hi);
    }
    lo.extend_from_slice(&hi);
    let data = match &e.data {
        None => Vec::new(),
        Some(Data::Fields(d)) => {
            let (mut l, mut h) = (Vec::new(), Vec::new());
            for f in d {
                field_bytes(f, &mut l, &mut h);
            }
            l
        }
        Some(Data::Goto(c)) => nfnl::verdict_bytes(NFT_GOTO, c),
    };
    (lo, data)
}

/// An element as a netlink message carries it (`interval`: the set has `flags interval`,
/// so the key end is sent too).
pub fn elem_netlink(e: &Elem, interval: bool) -> nfnl::ElemBytes {
    let (mut lo, mut hi) = (Vec::new(), Vec::new());
    for f in &e.key {
        field_bytes(f, &mut lo, &mut hi);
    }
    let data = match &e.data {
        None => None,
        Some(Data::Fields(d)) => {
            let (mut l, mut h) = (Vec::new(), Vec::new());
            for f in d {
                field_bytes(f, &mut l, &mut h);
            }
            Some(nfnl::ElemData::Value(l))
        }
        Some(Data::Goto(c)) => Some(nfnl::ElemData::Verdict(NFT_GOTO, c.clone())),
    };
    nfnl::ElemBytes {
        key: lo,
        key_end: interval.then_some(hi),
        data,
    }
}

/// The guest target (address . protocol . ports) of a counting element's canonical key
/// bytes, as [`elem_bytes`] writes them.
pub fn target_of(key: &[u8]) -> Option<Elem> {
    let half = key.len() / 2;
    let (lo, hi) = key.split_at(half);
    let ip_len = match half {
        12 => 4,
        24 => 16,
        _ => return None,
    };
    let ip = |b: &[u8]| -> Option<IpAddr> {
        Some(match ip_len {
            4 => IpAddr::from(<[u8; 4]>::try_from(&b[..4]).ok()?),
            _ => IpAddr::from(<[u8; 16]>::try_from(&b[..16]).ok()?),
        })
    };
    let proto = match lo[ip_len] {
        6 => Proto::Tcp,
        17 => Proto::Udp,
        132 => Proto::Sctp,
        _ => return None,
    };
    let port = |b: &[u8]| u16::from_be_bytes([b[ip_len + 4], b[ip_len + 5]]);
    let ip_field = match (ip(lo)?, ip(hi)?) {
        (IpAddr::V4(a), IpAddr::V4(b)) => Field::V4(a, b),
        (IpAddr::V6(a), IpAddr::V6(b)) => Field::V6(a, b),
        _ => return None,
    };
    Some(Elem {
        key: vec![
            ip_field,
            Field::Proto(proto),
            Field::Port(port(lo), port(hi)),
        ],
        data: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts() {
        let e = Elem {
            key: vec![
                Field::Ifname("virbr0".into()),
                Field::V4(
                    "192.168.122.0".parse().unwrap(),
                    "192.168.122.255".parse().unwrap(),
                ),
            ],
            data: None,
        };
        assert_eq!(elem_text(&e), "\"virbr0\" . 192.168.122.0/24");
        let e = Elem {
            key: vec![Field::Proto(Proto::Tcp), Field::Port(9000, 9002)],
            data: Some(Data::Fields(vec![Field::V6(
                "fd00::1".parse().unwrap(),
                "fd00::1".parse().unwrap(),
            )])),
        };
        assert_eq!(elem_text(&e), "tcp . 9000-9002 : fd00::1");
        let (k, d) = elem_bytes(&e);
        assert_eq!(
            k,
            [6, 0, 0, 0, 0x23, 0x28, 0, 0, 6, 0, 0, 0, 0x23, 0x2a, 0, 0]
        );
        assert_eq!(d.len(), 16);
    }
}
