//! Values of the TOML config read with their origin: strings, booleans, ports, addresses,
//! NIC selectors.

use std::net::IpAddr;

use toml_edit::{Item, Value};

use super::DomainResult;
use crate::config::diag::Origin;
use crate::config::short::add_guest_address;
use crate::model::{NicSelector, PortRange};

/// A `nic` value: a MAC address (any case) or a network name.
pub fn parse_nic(s: &str) -> Result<NicSelector, String> {
    let is_mac = s.len() == 17
        && s.split(':').count() == 6
        && s.split(':')
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()));
    if is_mac {
        return Ok(NicSelector::Mac(s.to_ascii_lowercase()));
    }
    if s.is_empty() || s.chars().any(|c| c.is_control()) {
        return Err(format!(
            "nic '{s}' is neither a MAC address nor a network name"
        ));
    }
    Ok(NicSelector::Network(s.to_string()))
}

pub(super) fn want_str<'a>(item: &'a Item, o: &Origin, k: &str) -> DomainResult<&'a str> {
    item.as_str()
        .ok_or_else(|| (o.clone(), format!("'{k}' must be a string")))
}

pub(super) fn want_bool(item: &Item, o: &Origin, k: &str) -> DomainResult<bool> {
    item.as_bool()
        .ok_or_else(|| (o.clone(), format!("'{k}' must be true or false")))
}

pub(super) fn str_or_array(v: &Value, o: &Origin, k: &str) -> DomainResult<Vec<String>> {
    if let Some(s) = v.as_str() {
        return Ok(vec![s.to_string()]);
    }
    let arr = v.as_array().ok_or_else(|| {
        (
            o.clone(),
            format!("'{k}' must be a string or an array of strings"),
        )
    })?;
    arr.iter()
        .map(|x| {
            x.as_str()
                .map(str::to_string)
                .ok_or_else(|| (o.clone(), format!("'{k}' entries must be strings")))
        })
        .collect()
}

pub(super) fn parse_addresses(item: &Item, o: &Origin) -> DomainResult<Vec<IpAddr>> {
    let v = item.as_value().ok_or_else(|| {
        (
            o.clone(),
            "'guest_address' must be a string or array".to_string(),
        )
    })?;
    let list = str_or_array(v, o, "guest_address")?;
    let mut out: Vec<IpAddr> = Vec::new();
    for s in list {
        add_guest_address(&mut out, &s).map_err(|e| (o.clone(), e))?;
    }
    Ok(out)
}

pub(super) fn parse_port_value(v: &Value, o: &Origin, k: &str) -> DomainResult<PortRange> {
    if let Some(n) = v.as_integer() {
        if !(1..=65535).contains(&n) {
            return Err((o.clone(), format!("{k}: port {n} is out of range 1-65535")));
        }
        return PortRange::single(n as u16).map_err(|e| (o.clone(), e));
    }
    if let Some(s) = v.as_str() {
        return PortRange::parse(s).map_err(|e| (o.clone(), format!("{k}: {e}")));
    }
    Err((
        o.clone(),
        format!("'{k}' must be a port number or a \"START-END\" string"),
    ))
}
