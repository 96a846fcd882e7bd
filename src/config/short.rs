//! The docker-style short form: `[LISTEN_IP:]HOST[-END]:GUEST[-END][/tcp|udp|sctp]`.

use std::net::IpAddr;

use crate::model::{Listen, PortRange, Proto, RatePer};

/// A listen address as given: `0.0.0.0` and `::` mean every address (as in docker's
/// `-p`); a loopback address is refused (that is what `localhost = true` is for).
pub fn listen_from_ip(ip: IpAddr) -> Result<Listen, String> {
    if ip.is_unspecified() {
        return Ok(Listen::Any);
    }
    if ip.is_loopback() {
        return Err(format!(
            "listen address {ip} is loopback: use localhost = true to forward 127.0.0.1"
        ));
    }
    if ip.is_multicast() {
        return Err(format!("listen address {ip} is multicast"));
    }
    if matches!(ip, IpAddr::V4(a) if a.is_broadcast()) {
        return Err(format!("listen address {ip} is the broadcast address"));
    }
    Ok(Listen::Address(ip))
}

/// One `listen` value of either form: an IP address (IPv6 with or without brackets) or
/// `default-route`.
pub fn parse_listen(s: &str) -> Result<Listen, String> {
    if s == "default-route" {
        return Ok(Listen::DefaultRoute);
    }
    let ip: IpAddr = s
        .trim_matches(|c| c == '[' || c == ']')
        .parse()
        .map_err(|_| format!("listen: '{s}' is not an IP address"))?;
    listen_from_ip(ip)
}

/// Adds one `guest_address` value to `list`: an IP address, at most one per family.
pub fn add_guest_address(list: &mut Vec<IpAddr>, s: &str) -> Result<(), String> {
    let ip: IpAddr = s
        .parse()
        .map_err(|_| format!("guest_address: '{s}' is not an IP address"))?;
    if list.iter().any(|x| x.is_ipv4() == ip.is_ipv4()) {
        return Err("guest_address: at most one address per family".into());
    }
    list.push(ip);
    Ok(())
}

/// `rate_per`'s value.
pub fn parse_rate_per(s: &str) -> Result<RatePer, String> {
    match s {
        "source" => Ok(RatePer::Source),
        "forward" => Ok(RatePer::Forward),
        o => Err(format!(
            "rate_per must be \"source\" or \"forward\", not {o:?}"
        )),
    }
}

/// The parts of a short-form forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShortForward {
    pub listen: Listen,
    pub host_ports: PortRange,
    pub guest_ports: PortRange,
    pub proto: Proto,
}

/// Parses a short-form forward. IPv6 listen addresses go in brackets:
/// `[2001:db8::1]:8080:80/tcp`. A lone `PORT[-END]` means the same ports on both sides.
pub fn parse_short(spec: &str) -> Result<ShortForward, String> {
    let spec = spec.trim();
    if let Some(f) = plain(spec) {
        return Ok(f);
    }
    let (body, proto) = match spec.rsplit_once('/') {
        Some((b, p)) => (
            b,
            Proto::parse(p)
                .ok_or_else(|| format!("unknown protocol '{p}' (expected tcp, udp or sctp)"))?,
        ),
        None => (spec, Proto::Tcp),
    };
    let (listen, ports) = if let Some(rest) = body.strip_prefix('[') {
        let (addr, rest) = rest
            .split_once(']')
            .ok_or_else(|| "missing ']' after IPv6 listen address".to_string())?;
        let ip: std::net::Ipv6Addr = addr
            .parse()
            .map_err(|_| format!("'{addr}' is not an IPv6 address"))?;
        let rest = rest
            .strip_prefix(':')
            .ok_or_else(|| "expected ':' after ']'".to_string())?;
        (listen_from_ip(IpAddr::V6(ip))?, rest)
    } else {
        let parts: Vec<&str> = body.split(':').collect();
        match parts.len() {
            1 | 2 => (Listen::Any, body),
            // what hooks.json means without public_ip: the default route's first address
            3 if parts[0] == "default-route" => (Listen::DefaultRoute, &body[parts[0].len() + 1..]),
            3 => {
                let ip: IpAddr = parts[0]
                    .parse()
                    .map_err(|_| format!("'{}' is not an IP address", parts[0]))?;
                if ip.is_ipv6() {
                    return Err("IPv6 listen addresses must be written in brackets".into());
                }
                (listen_from_ip(ip)?, &body[parts[0].len() + 1..])
            }
            _ => {
                return Err(
                    "too many ':' (IPv6 listen addresses must be written in brackets)".into(),
                );
            }
        }
    };
    if ports.is_empty() {
        return Err("missing ports".into());
    }
    let (host, guest) = match ports.split_once(':') {
        Some((h, g)) => (PortRange::parse(h)?, PortRange::parse(g)?),
        None => {
            let r = PortRange::parse(ports)?;
            (r, r)
        }
    };
    check_lengths(host, guest)?;
    Ok(ShortForward {
        listen,
        host_ports: host,
        guest_ports: guest,
        proto,
    })
}

/// `HOST:GUEST[/PROTO]` with one port each side, what most forwards are, read without
/// splitting or allocating (10,000 of them took a tenth of `check`); `None` for anything
/// else, which [`parse_short`] reads in full (and so says what is wrong with it).
fn plain(spec: &str) -> Option<ShortForward> {
    let (body, proto) = match spec.rsplit_once('/') {
        Some((b, p)) => (b, Proto::parse(p)?),
        None => (spec, Proto::Tcp),
    };
    let (host, guest) = body.split_once(':')?;
    let port = |s: &str| -> Option<PortRange> {
        if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let n: u32 = s.parse().ok()?;
        PortRange::single(u16::try_from(n).ok().filter(|&n| n > 0)?).ok()
    };
    Some(ShortForward {
        listen: Listen::Any,
        host_ports: port(host)?,
        guest_ports: port(guest)?,
        proto,
    })
}

/// Host and guest ranges must have the same length (offset remap).
pub fn check_lengths(host: PortRange, guest: PortRange) -> Result<(), String> {
    if host.len() != guest.len() {
        return Err(format!(
            "host ports {host} ({} ports) and guest ports {guest} ({} ports) differ in length",
            host.len(),
            guest.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> ShortForward {
        parse_short(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn forms() {
        let f = ok("8080:80");
        assert_eq!(f.listen, Listen::Any);
        assert_eq!(
            (f.host_ports.start, f.guest_ports.start, f.proto),
            (8080, 80, Proto::Tcp)
        );
        let f = ok("203.0.113.1:5353:53535/udp");
        assert_eq!(f.listen, Listen::Address("203.0.113.1".parse().unwrap()));
        assert_eq!(f.proto, Proto::Udp);
        let f = ok("[2001:db8::1]:9000-9002:9100-9102/sctp");
        assert_eq!(f.host_ports.len(), 3);
        assert_eq!(f.proto, Proto::Sctp);
        assert_eq!(ok("443").guest_ports.start, 443);
        assert_eq!(ok("0.0.0.0:8080:80").listen, Listen::Any);
        assert_eq!(ok("[::]:8080:80").listen, Listen::Any);
    }

    proptest::proptest! {
        #[test]
        fn the_plain_form_reads_as_the_full_parser_reads_it(
            s in "[0-9+ ]{0,6}(:[0-9+ ]{0,6})?(/(tcp|udp|sctp|icmp))?"
        ) {
            if let Some(f) = plain(s.trim()) {
                proptest::prop_assert_eq!(Ok(f), full(&s));
            }
        }
    }

    /// [`parse_short`] without its fast path.
    fn full(s: &str) -> Result<ShortForward, String> {
        parse_short(&format!("0.0.0.0:{}", s.trim()))
    }

    #[test]
    fn the_plain_form_is_taken_for_plain_forwards_only() {
        assert!(plain("8080:80").is_some());
        assert!(plain("65535:1/udp").is_some());
        for s in [
            "0:80",
            "65536:80",
            "80",
            "80-81:80-81",
            "+80:80",
            "1.2.3.4:80:80",
            "80:80/x",
        ] {
            assert!(plain(s).is_none(), "{s}");
        }
    }

    #[test]
    fn errors() {
        for (s, want) in [
            ("0:80", "port 0"),
            ("65536:80", "out of range"),
            ("90-80:80", "reversed"),
            ("9000-9002:80", "differ in length"),
            ("8080:80/icmp", "unknown protocol"),
            ("2001:db8::1:80:80", "brackets"),
            ("[2001:db8::1:80:80", "missing ']'"),
            ("300.1.1.1:80:80", "not an IP"),
            ("127.0.0.1:80:80", "localhost = true"),
        ] {
            let e = parse_short(s).unwrap_err();
            assert!(e.contains(want), "{s}: {e}");
        }
    }
}
