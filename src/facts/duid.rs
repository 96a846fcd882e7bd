//! DHCPv6 client identifiers (DUIDs, RFC 8415 section 11) that carry a MAC: DUID-LLT
//! (type 1) and DUID-LL (type 3) with hardware type 1 (Ethernet). libvirt's IPv6
//! `<host id='...'>` reservations and dnsmasq's IPv6 leases name a guest by its DUID, not
//! its MAC; through these, a reservation or lease is matched to the NIC like an IPv4 one.
//! Other DUID types (EN, UUID) say nothing about the NIC: such a reservation is matched by
//! its `name` only.

/// The bytes of a DUID as libvirt and dnsmasq print it: hex bytes separated by `:` (one
/// or two digits each, `0:3:0:1:52:54:0:0:0:1` as well as `00:03:...`).
fn bytes(duid: &str) -> Option<Vec<u8>> {
    duid.split(':')
        .map(|b| {
            if b.is_empty() || b.len() > 2 {
                return None;
            }
            u8::from_str_radix(b, 16).ok()
        })
        .collect()
}

/// The MAC (lower case, `aa:bb:..`) inside a DUID-LL or DUID-LLT for Ethernet.
pub fn mac(duid: &str) -> Option<String> {
    let b = bytes(duid.trim())?;
    let (kind, hw) = (
        u16::from_be_bytes([*b.first()?, *b.get(1)?]),
        u16::from_be_bytes([*b.get(2)?, *b.get(3)?]),
    );
    let mac = match (kind, hw, b.len()) {
        // type, hardware type, time (4 bytes), address
        (1, 1, 14) => &b[8..14],
        // type, hardware type, address
        (3, 1, 10) => &b[4..10],
        _ => return None,
    };
    Some(
        mac.iter()
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(":"),
    )
}

#[cfg(test)]
mod tests {
    use super::mac;

    #[test]
    fn ll_and_llt_give_the_mac() {
        assert_eq!(
            mac("00:03:00:01:52:54:00:AA:bb:01").as_deref(),
            Some("52:54:00:aa:bb:01")
        );
        assert_eq!(
            mac("0:3:0:1:52:54:0:0:0:1").as_deref(),
            Some("52:54:00:00:00:01")
        );
        assert_eq!(
            mac("00:01:00:01:2c:5b:1a:9e:52:54:00:12:34:56").as_deref(),
            Some("52:54:00:12:34:56")
        );
    }

    #[test]
    fn others_give_nothing() {
        // DUID-EN, DUID-UUID, a non-Ethernet LL, truncated, garbage
        for d in [
            "00:02:00:00:ab:11:01:02:03:04",
            "00:04:6f:2e:00:00:00:00:00:00:00:00:00:00:00:00:00:01",
            "00:03:00:06:52:54:00:00:00:01",
            "00:03:00:01:52:54:00",
            "zz:03",
            "",
            "000:3:0:1:52:54:0:0:0:1",
        ] {
            assert_eq!(mac(d), None, "{d}");
        }
    }
}
