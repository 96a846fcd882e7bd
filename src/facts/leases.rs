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
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Vec::new();
    };
    parse_leases(&text, bridge).unwrap_or_else(|e| {
        tracing::warn!("{}: cannot parse leases: {e}", path.display());
        Vec::new()
    })
}

pub fn parse_leases(text: &str, bridge: &str) -> Result<Vec<Lease>, serde_json::Error> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let raw: Vec<RawLease> = serde_json::from_str(text)?;
    Ok(raw
        .into_iter()
        .filter_map(|r| {
            Some(Lease {
                bridge: bridge.to_string(),
                mac: r
                    .mac
                    .map(|m| m.to_ascii_lowercase())
                    .or_else(|| r.client_id.as_deref().and_then(super::duid::mac))?,
                ip: r.ip.parse::<IpAddr>().ok()?,
                expiry: r.expiry.unwrap_or(0),
            })
        })
        .collect())
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
        assert_eq!(l.len(), 2, "the one without a MAC or a DUID-LL is skipped");
        assert_eq!(l[1].mac, "52:54:00:00:00:06");
        assert_eq!(l[0].mac, "52:54:00:ab:cd:01");
        assert_eq!(l[0].expiry, 1700003600);
    }
}
