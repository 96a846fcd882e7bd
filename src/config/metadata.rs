//! Forwards stored in the domain definition itself, as libvirt `<metadata>` in virtgate's
//! own namespace, so they travel with the domain (migration, backups):
//!
//! ```xml
//! <metadata>
//!   <vg:forwards xmlns:vg="https://virtgate.dev/xmlns/1" fail_closed="false">
//!     <vg:forward spec="8080:80"/>
//!     <vg:forward host_port="8081" guest_port="80" proto="tcp"
//!                 source="203.0.113.0/24 2001:db8::/32" description="API"/>
//!   </vg:forwards>
//! </metadata>
//! ```
//!
//! Set it with `virsh metadata DOMAIN https://virtgate.dev/xmlns/1 --key vg --set XML
//! --config --live`. A forward in the config file for the same domain wins.

use roxmltree::Node;
use serde::{Deserialize, Serialize};

use super::short::{add_guest_address, check_lengths, parse_listen, parse_rate_per, parse_short};
use super::toml_file::{FORWARD_KEYS, parse_cidr, parse_nic, validate_ifname};
use crate::model::{ForwardSpec, Listen, PortRange, Proto, RateLimit, RatePer};

pub use crate::model::METADATA_NAMESPACE as NAMESPACE;

/// What a domain's metadata says, or why it cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetadataForwards {
    pub forwards: Result<Vec<ForwardSpec>, String>,
    pub fail_closed: bool,
}

/// Finds virtgate's element under `<metadata>` of a `<domain>` node.
pub fn from_domain(domain: Node) -> Option<MetadataForwards> {
    let md = domain.children().find(|c| c.has_tag_name("metadata"))?;
    from_parent(md)
}

/// Reads virtgate's element from the text the facts keep of it
/// (see `facts::DomainFacts::metadata`).
pub fn from_xml(xml: &str) -> Option<MetadataForwards> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    from_parent(doc.root_element())
}

fn from_parent(parent: Node) -> Option<MetadataForwards> {
    let el = parent
        .children()
        .find(|c| c.is_element() && c.tag_name().namespace() == Some(NAMESPACE))?;
    let fail_closed = el.attribute("fail_closed") == Some("true");
    Some(MetadataForwards {
        forwards: parse(el),
        fail_closed,
    })
}

fn parse(el: Node) -> Result<Vec<ForwardSpec>, String> {
    if el.tag_name().name() != "forwards" {
        return Err(format!(
            "expected <forwards>, found <{}>",
            el.tag_name().name()
        ));
    }
    let mut out = Vec::new();
    for (i, f) in el.children().filter(Node::is_element).enumerate() {
        let n = i + 1;
        if f.tag_name().name() != "forward" {
            return Err(format!(
                "element {n}: expected <forward>, found <{}>",
                f.tag_name().name()
            ));
        }
        out.extend(parse_forward(f).map_err(|e| format!("<forward> {n}: {e}"))?);
    }
    Ok(out)
}

fn list(v: &str) -> impl Iterator<Item = &str> {
    v.split([' ', ',']).filter(|s| !s.is_empty())
}

fn parse_forward(f: Node) -> Result<Vec<ForwardSpec>, String> {
    // the long form's keys, plus `spec` for the short form
    if let Some(a) = f
        .attributes()
        .find(|a| a.name() != "spec" && !FORWARD_KEYS.contains(&a.name()))
    {
        return Err(format!(
            "unknown attribute '{}' (expected spec or one of: {})",
            a.name(),
            FORWARD_KEYS.join(", ")
        ));
    }
    let attr = |k: &str| f.attribute(k);
    let mut spec = ForwardSpec::default();
    let mut listens = ports(&mut spec, &attr)?;
    if let Some(l) = attr("listen") {
        for a in list(l) {
            listens.push(parse_listen(a)?);
        }
    }
    if let Some(i) = attr("interface") {
        validate_ifname(i)?;
        if !listens.is_empty() {
            return Err("give either 'listen' or 'interface', not both".into());
        }
        listens.push(Listen::Interface(i.to_string()));
    }
    if let Some(s) = attr("source") {
        spec.sources = list(s).map(parse_cidr).collect::<Result<_, _>>()?;
    }
    if let Some(n) = attr("nic") {
        spec.nic = Some(parse_nic(n)?);
    }
    for a in attr("guest_address").into_iter().flat_map(list) {
        add_guest_address(&mut spec.guest_addresses, a)?;
    }
    spec.localhost = match attr("localhost") {
        None | Some("false") => false,
        Some("true") => true,
        Some(o) => return Err(format!("localhost must be true or false, not {o:?}")),
    };
    spec.description = attr("description").map(str::to_string);
    spec.rate = rate(&attr)?;
    if listens.is_empty() {
        listens.push(Listen::Any);
    }
    Ok(listens
        .into_iter()
        .map(|l| ForwardSpec {
            listen: l,
            ..spec.clone()
        })
        .collect())
}

/// Protocol and ports, from `spec` (short form, which may name a listen address: returned)
/// or `host_port`, `guest_port`, `proto`.
fn ports<'a>(
    spec: &mut ForwardSpec,
    attr: &dyn Fn(&str) -> Option<&'a str>,
) -> Result<Vec<Listen>, String> {
    if let Some(s) = attr("spec") {
        let sf = parse_short(s).map_err(|e| format!("spec {s:?}: {e}"))?;
        spec.proto = sf.proto;
        spec.host_ports = sf.host_ports;
        spec.guest_ports = sf.guest_ports;
        return Ok((sf.listen != Listen::Any)
            .then_some(sf.listen)
            .into_iter()
            .collect());
    }
    let host = PortRange::parse(attr("host_port").ok_or("needs 'spec' or 'host_port'")?)
        .map_err(|e| format!("host_port: {e}"))?;
    let guest = match attr("guest_port") {
        Some(g) => PortRange::parse(g).map_err(|e| format!("guest_port: {e}"))?,
        None => host,
    };
    check_lengths(host, guest)?;
    spec.host_ports = host;
    spec.guest_ports = guest;
    if let Some(p) = attr("proto") {
        spec.proto = Proto::parse(p).ok_or_else(|| format!("unknown protocol '{p}'"))?;
    }
    Ok(Vec::new())
}

/// `rate`, `burst`, `rate_per` (the last two only with a rate).
fn rate<'a>(attr: &dyn Fn(&str) -> Option<&'a str>) -> Result<Option<RateLimit>, String> {
    let Some(r) = attr("rate") else {
        if attr("burst").is_some() || attr("rate_per").is_some() {
            return Err("'burst' and 'rate_per' need a 'rate'".into());
        }
        return Ok(None);
    };
    let (count, unit) = RateLimit::parse_rate(r)?;
    let burst = match attr("burst") {
        None => RateLimit::DEFAULT_BURST,
        Some(b) => b
            .parse()
            .map_err(|_| format!("burst {b:?} is not a positive number"))?,
    };
    let per = match attr("rate_per") {
        None => RatePer::Source,
        Some(p) => parse_rate_per(p)?,
    };
    RateLimit::new(count, unit, burst, per).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(inner: &str) -> Option<MetadataForwards> {
        let xml = format!(
            "<domain><name>x</name><metadata><other xmlns='urn:x'/><vg:forwards xmlns:vg='{NAMESPACE}' fail_closed='true'>{inner}</vg:forwards></metadata></domain>"
        );
        let doc = roxmltree::Document::parse(&xml).unwrap();
        from_domain(doc.root_element())
    }

    #[test]
    fn parses_both_forms() {
        let m = md("<vg:forward spec='8080:80'/><vg:forward host_port='9000-9001' guest_port='100-101' proto='udp' source='203.0.113.0/24, 2001:db8::/32' listen='203.0.113.1' description='d'/>").unwrap();
        assert!(m.fail_closed);
        let f = m.forwards.unwrap();
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].short(), "8080:80/tcp");
        assert_eq!(f[1].short(), "203.0.113.1:9000-9001:100-101/udp");
        assert_eq!(f[1].sources.len(), 2);
    }

    #[test]
    fn errors_are_reported() {
        for (inner, want) in [
            ("<vg:forward spec='0:80'/>", "port 0"),
            (
                "<vg:forward host_port='80' bogus='1'/>",
                "unknown attribute 'bogus'",
            ),
            ("<vg:forward guest_port='80'/>", "needs 'spec'"),
            ("<vg:other/>", "expected <forward>"),
        ] {
            let e = md(inner).unwrap().forwards.unwrap_err();
            assert!(e.contains(want), "{inner}: {e}");
        }
        let doc =
            roxmltree::Document::parse("<domain><metadata><a xmlns='urn:y'/></metadata></domain>")
                .unwrap();
        assert!(from_domain(doc.root_element()).is_none());
    }
}
