//! Core value types shared by config, planner and backends: protocols, port ranges,
//! listen selectors and the validated forward specification.

pub mod conflicts;
pub mod domain;

/// Bytes as lower-case hexadecimal (digests).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The XML namespace of virtgate's element in a domain's `<metadata>`.
pub const METADATA_NAMESPACE: &str = "https://virtgate.dev/xmlns/1";

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Transport protocol of a forward.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    #[default]
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Sctp => "sctp",
        }
    }

    pub fn parse(s: &str) -> Option<Proto> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Some(Proto::Tcp),
            "udp" => Some(Proto::Udp),
            "sctp" => Some(Proto::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// IP address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn of(ip: &IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::Ipv4,
            IpAddr::V6(_) => Family::Ipv6,
        }
    }

    pub fn of_net(net: &IpNet) -> Family {
        match net {
            IpNet::V4(_) => Family::Ipv4,
            IpNet::V6(_) => Family::Ipv6,
        }
    }
}

/// An inclusive range of ports, `start..=end`, never containing port 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

impl Default for PortRange {
    fn default() -> Self {
        PortRange { start: 1, end: 1 }
    }
}

impl PortRange {
    /// Builds a range, refusing port 0 and reversed bounds.
    pub fn new(start: u16, end: u16) -> Result<PortRange, String> {
        if start == 0 || end == 0 {
            return Err("port 0 is not a valid port".into());
        }
        if end < start {
            return Err(format!("reversed port range {start}-{end}"));
        }
        Ok(PortRange { start, end })
    }

    pub fn single(port: u16) -> Result<PortRange, String> {
        PortRange::new(port, port)
    }

    /// Number of ports in the range.
    pub fn len(&self) -> u32 {
        u32::from(self.end) - u32::from(self.start) + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.start <= other.end && other.start <= self.end
    }

    /// Parses `N` or `N-M`; numbers must be 1..=65535.
    pub fn parse(s: &str) -> Result<PortRange, String> {
        let parse_port = |p: &str| -> Result<u16, String> {
            let n: u32 = p
                .trim()
                .parse()
                .map_err(|_| format!("'{p}' is not a port number"))?;
            if n == 0 || n > 65535 {
                return Err(format!("port {n} is out of range 1-65535"));
            }
            Ok(n as u16)
        };
        match s.split_once('-') {
            Some((a, b)) => PortRange::new(parse_port(a)?, parse_port(b)?),
            None => PortRange::single(parse_port(s)?),
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

/// Where a forward listens on the host.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase", tag = "kind", content = "value")]
pub enum Listen {
    #[default]
    /// Every local address of the host (like `docker run -p`).
    Any,
    /// One host address.
    Address(IpAddr),
    /// Traffic arriving on one host interface.
    Interface(String),
    /// The first IPv4 address of the interface carrying the default route (hooks.json's
    /// default for `public_ip`); resolved from facts by the planner.
    DefaultRoute,
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Any => f.write_str("*"),
            Listen::Address(IpAddr::V6(a)) => write!(f, "[{a}]"),
            Listen::Address(a) => write!(f, "{a}"),
            Listen::Interface(i) => write!(f, "%{i}"),
            Listen::DefaultRoute => f.write_str("default-route"),
        }
    }
}

impl Listen {
    /// Whether two listen selectors could receive the same packet. Two different
    /// addresses or two different interfaces are disjoint; everything else may overlap.
    pub fn overlaps(&self, other: &Listen) -> bool {
        match (self, other) {
            (Listen::Address(a), Listen::Address(b)) => a == b,
            (Listen::Interface(a), Listen::Interface(b)) => a == b,
            // an address and an interface: the address may live on that interface
            _ => true,
        }
    }

    pub fn family(&self) -> Option<Family> {
        match self {
            Listen::Address(a) => Some(Family::of(a)),
            Listen::DefaultRoute => Some(Family::Ipv4),
            _ => None,
        }
    }
}

/// Which guest NIC a forward targets.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "value")]
pub enum NicSelector {
    Mac(String),
    Network(String),
    /// The libvirt bridge the NIC is plugged into (hooks.json's `interface`).
    Bridge(String),
}

/// A validated forward of one domain, before the guest address is known.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct ForwardSpec {
    pub proto: Proto,
    pub listen: Listen,
    pub host_ports: PortRange,
    pub guest_ports: PortRange,
    /// Allowed client networks; empty = everyone.
    pub sources: Vec<IpNet>,
    pub nic: Option<NicSelector>,
    /// Explicit guest addresses (at most one per family).
    pub guest_addresses: Vec<IpAddr>,
    pub localhost: bool,
    pub description: Option<String>,
    /// New connections over this rate are dropped (opt-in).
    #[serde(default)]
    pub rate: Option<RateLimit>,
}

/// The unit of a rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RateUnit {
    Second,
    Minute,
    Hour,
    Day,
}

impl RateUnit {
    pub fn as_str(self) -> &'static str {
        match self {
            RateUnit::Second => "second",
            RateUnit::Minute => "minute",
            RateUnit::Hour => "hour",
            RateUnit::Day => "day",
        }
    }

    pub fn seconds(self) -> u64 {
        match self {
            RateUnit::Second => 1,
            RateUnit::Minute => 60,
            RateUnit::Hour => 3600,
            RateUnit::Day => 86400,
        }
    }
}

/// Whom a rate limit counts: each client address on its own, or the forward as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RatePer {
    Source,
    Forward,
}

/// A new-connection rate limit: `count` per `unit`, with bursts of up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RateLimit {
    pub count: u32,
    pub unit: RateUnit,
    pub burst: u32,
    pub per: RatePer,
}

impl RateLimit {
    pub const MAX_COUNT: u32 = 1_000_000;
    pub const MAX_BURST: u32 = 10_000;
    pub const DEFAULT_BURST: u32 = 5;

    /// Parses `N/UNIT` (`50/second`, `10/minute`; `s`, `sec`, `min`, `h`, `d` too).
    pub fn parse_rate(s: &str) -> Result<(u32, RateUnit), String> {
        let bad = || format!("rate {s:?} must be N/second, N/minute, N/hour or N/day");
        let (n, u) = s.split_once('/').ok_or_else(bad)?;
        let n: u32 = n.trim().parse().map_err(|_| bad())?;
        let unit = match u.trim() {
            "second" | "sec" | "s" => RateUnit::Second,
            "minute" | "min" | "m" => RateUnit::Minute,
            "hour" | "h" => RateUnit::Hour,
            "day" | "d" => RateUnit::Day,
            _ => return Err(bad()),
        };
        if n == 0 || n > Self::MAX_COUNT {
            return Err(format!("rate {s:?}: N must be 1 to {}", Self::MAX_COUNT));
        }
        Ok((n, unit))
    }

    /// Checks the burst and the whole (also for values read back from state).
    pub fn new(count: u32, unit: RateUnit, burst: u32, per: RatePer) -> Result<RateLimit, String> {
        if count == 0 || count > Self::MAX_COUNT {
            return Err(format!("rate: N must be 1 to {}", Self::MAX_COUNT));
        }
        if burst == 0 || burst > Self::MAX_BURST {
            return Err(format!("burst must be 1 to {}", Self::MAX_BURST));
        }
        Ok(RateLimit {
            count,
            unit,
            burst,
            per,
        })
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let per = match self.per {
            RatePer::Source => "per source",
            RatePer::Forward => "per forward",
        };
        write!(
            f,
            "{}/{} burst {} {per}",
            self.count,
            self.unit.as_str(),
            self.burst
        )
    }
}

impl ForwardSpec {
    /// The user-facing short form, `[LISTEN:]HOST[-END]:GUEST[-END]/proto`.
    pub fn short(&self) -> String {
        let listen = match &self.listen {
            Listen::Any => String::new(),
            other => format!("{other}:"),
        };
        format!(
            "{listen}{}:{}/{}",
            self.host_ports, self.guest_ports, self.proto
        )
    }

    /// Whether the forward may apply to a family, given its listen address and sources.
    pub fn allows_family(&self, family: Family) -> bool {
        if let Some(f) = self.listen.family()
            && f != family
        {
            return false;
        }
        self.sources.is_empty() || self.sources.iter().any(|s| Family::of_net(s) == family)
    }
}

/// Everything the config says about one domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DomainConfig {
    pub name: String,
    pub uuid: Option<String>,
    pub forwards: Vec<ForwardSpec>,
    /// Refuse to start the domain if its forwards cannot be applied (hook).
    pub fail_closed: bool,
    /// What the forwards' ports do while the domain is not running.
    #[serde(default)]
    pub when_stopped: WhenStopped,
}

/// What a domain's forwarded ports do while the domain is not running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WhenStopped {
    /// Nothing: packets reach whatever listens on the host (the default).
    #[default]
    Pass,
    /// Refused: a TCP reset, an ICMP port unreachable for UDP.
    Reject,
}

impl WhenStopped {
    pub fn parse(s: &str) -> Result<WhenStopped, String> {
        match s {
            "pass" => Ok(WhenStopped::Pass),
            "reject" => Ok(WhenStopped::Reject),
            other => Err(format!(
                "when_stopped must be \"pass\" or \"reject\", not {other:?}"
            )),
        }
    }
}

/// Which firewall form libvirt uses for a network.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum LibvirtFirewall {
    #[default]
    Iptables,
    Nftables,
}

/// Which firewall backend virtgate writes its own rules with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    #[default]
    Auto,
    Nftables,
    Iptables,
}

impl BackendChoice {
    pub fn parse(s: &str) -> Option<BackendChoice> {
        match s {
            "auto" => Some(BackendChoice::Auto),
            "nftables" => Some(BackendChoice::Nftables),
            "iptables" => Some(BackendChoice::Iptables),
            _ => None,
        }
    }
}

/// Checks a network interface name as Linux takes it (at most 15 bytes, no `/`, not `.`
/// or `..`), narrowed to the characters interface names have in practice: one rule for
/// the config, libvirt's files and the state.
pub fn validate_ifname(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 15
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@' | ':'));
    if !ok {
        return Err(format!("'{s}' is not a valid interface name"));
    }
    Ok(())
}

/// An address or a network (host bits cleared), as the config writes sources.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if let Ok(n) = s.parse::<IpNet>() {
        return Ok(n.trunc());
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("'{s}' is not an address or CIDR"))
}

/// A MAC address as `aa:bb:cc:dd:ee:ff` (lower case), if `s` is one (six hex pairs
/// separated by `:` or `-`). MACs come from files others write and reach `status` and
/// rules: anything else is not a MAC.
pub fn parse_mac(s: &str) -> Option<String> {
    // byte by byte, one allocation: a hook reads every reservation of a network
    let b = s.trim().as_bytes();
    if b.len() != 17 {
        return None;
    }
    let mut out = String::with_capacity(17);
    for (i, &c) in b.iter().enumerate() {
        if i % 3 == 2 {
            if c != b':' && c != b'-' {
                return None;
            }
            out.push(':');
        } else if c.is_ascii_hexdigit() {
            out.push(char::from(c.to_ascii_lowercase()));
        } else {
            return None;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        for (s, want) in [
            ("52:54:00:AB:cd:0E", Some("52:54:00:ab:cd:0e")),
            (" 52-54-00-ab-cd-0e\n", Some("52:54:00:ab:cd:0e")),
            ("52:54:00:ab:cd", None),
            ("52:54:00:ab:cd:0e:ff", None),
            ("52:54:00:ab:cd:0g", None),
            ("525:4:00:ab:cd:0e", None),
            ("52.54.00.ab.cd.0e", None),
            ("", None),
        ] {
            assert_eq!(parse_mac(s).as_deref(), want, "{s:?}");
        }
    }

    #[test]
    fn port_range_parsing() {
        assert_eq!(
            PortRange::parse("80").unwrap(),
            PortRange { start: 80, end: 80 }
        );
        assert_eq!(PortRange::parse("9000-9002").unwrap().len(), 3);
        assert!(PortRange::parse("0").is_err());
        assert!(PortRange::parse("65536").is_err());
        assert!(PortRange::parse("90-80").unwrap_err().contains("reversed"));
        assert!(PortRange::parse("x").is_err());
    }

    #[test]
    fn listen_overlap() {
        let a = Listen::Address("203.0.113.1".parse().unwrap());
        let b = Listen::Address("203.0.113.2".parse().unwrap());
        assert!(!a.overlaps(&b));
        assert!(a.overlaps(&Listen::Any));
        assert!(Listen::Any.overlaps(&Listen::Interface("eth0".into())));
    }
}
