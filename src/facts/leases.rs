//! dnsmasq's lease status file as libvirt writes it: `<bridge>.status`, a JSON array.

use std::net::IpAddr;
use std::path::Path;

use serde::Deserialize;

use super::Lease;

#[derive(Deserialize)]
struct RawLease {
    #[serde(rename = "ip-address")]
    ip: String,
    #[serde(rename = "mac-address")]
    mac: Option<String>,
    #[serde(rename = "expiry-time")]
    expiry: Option<u64>,
    /// DHCPv6: the client's DUID (its MAC, for a DUID-LL/LLT), when dnsmasq gave no MAC
    #[serde(rename = "client-id")]
    client_id: Option<String>,
}

/// Leases of one bridge; a missing or unreadable file is no leases.
pub fn read_leases(dir: &Path, bridge: &str) -> Vec<Lease> {
    let path = dir.join(format!("{bridge}.status"));
    let text = match crate::files::read_text(&path, MAX_LEASES_BYTES, crate::files::Follow::Yes) {
        Ok(t) => t,
        Err(e) => {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("{}: {e}, no leases read", path.display());
            }
            return Vec::new();
        }
    };
    let (leases, bad) = parse_leases_lenient(&text, bridge);
    if let Some(e) = bad {
        tracing::warn!("{}: {e}", path.display());
    }
    leases
}

/// The largest lease file read (dnsmasq's for a /16 of guests is a few MiB).
pub const MAX_LEASES_BYTES: u64 = 16 * 1024 * 1024;

/// The leases of a status file, skipping records that cannot be read (one bad record
/// costs that record, not the bridge's other leases); what was skipped, said once.
pub fn parse_leases_lenient(text: &str, bridge: &str) -> (Vec<Lease>, Option<String>) {
    if text.trim().is_empty() {
        return (Vec::new(), None);
    }
    let records: Vec<serde_json::Value> = match serde_json::from_str(text) {
        Ok(r) => r,
        Err(e) => return (Vec::new(), Some(format!("cannot parse leases: {e}"))),
    };
    let mut bad = Vec::new();
    let mut out = Vec::new();
    for (i, r) in records.into_iter().enumerate() {
        match serde_json::from_value::<RawLease>(r) {
            Ok(r) => out.extend(lease(r, bridge)),
            Err(e) => bad.push(format!("record {} ({e})", i + 1)),
        }
    }
    let why = (!bad.is_empty()).then(|| format!("skipped unreadable lease {}", bad.join(", ")));
    (out, why)
}

fn lease(r: RawLease, bridge: &str) -> Option<Lease> {
    Some(Lease {
        bridge: bridge.to_string(),
        mac: match r.mac {
            Some(m) => super::parse_mac(&m)?,
            None => r.client_id.as_deref().and_then(super::duid::mac)?,
        },
        ip: r.ip.parse::<IpAddr>().ok()?,
        expiry: r.expiry.unwrap_or(0),
    })
}

/// The leases of a status file; an error if any record cannot be read.
pub fn parse_leases(text: &str, bridge: &str) -> Result<Vec<Lease>, String> {
    match parse_leases_lenient(text, bridge) {
        (l, None) => Ok(l),
        (_, Some(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_libvirt_status_file() {
        let text = r#"[
  { "ip-address": "192.168.122.45", "mac-address": "52:54:00:AB:cd:01", "hostname": "g", "client-id": "01:52", "expiry-time": 1700003600 },
  { "ip-address": "fd00::5", "iaid": "1", "server-duid": "00:01", "expiry-time": 1700003600 },
  { "ip-address": "fd00::6", "iaid": "1", "client-id": "00:03:00:01:52:54:00:00:00:06", "expiry-time": 1700003600 }
]"#;
        let l = parse_leases(text, "virbr0").unwrap();
        // one record that cannot be read costs only that record
        let bad = text.replacen(
            "\"expiry-time\": 1700003600 },",
            "\"expiry-time\": \"soon\" },",
            1,
        );
        let (kept, why) = parse_leases_lenient(&bad, "virbr0");
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert!(why.is_some_and(|w| w.contains("record 1")));
        assert_eq!(l.len(), 2, "the one without a MAC or a DUID-LL is skipped");
        assert_eq!(l[1].mac, "52:54:00:00:00:06");
        assert_eq!(l[0].mac, "52:54:00:ab:cd:01");
        assert_eq!(l[0].expiry, 1700003600);
    }
}
