//! The accept virtgate must place in someone else's forward path, because every base chain
//! on the forward hook must accept a DNAT'ed packet (LIBVIRT-FACTS.md):
//!
//! * libvirt's iptables form: a jump at the top of the built-in filter `FORWARD` chain to
//!   virtgate's `VIRTGATE_FORWARD` chain (libvirt inserts its own jumps only when missing,
//!   so this survives libvirt reloads);
//! * libvirt's nftables form: one rule per bridge at the top of
//!   `ip[6] libvirt_network guest_input`, above libvirt's reject:
//!   `oifname "virbr0" ct status dnat accept comment "virtgate"`. libvirt's reload buries
//!   it, so every reconcile checks and re-asserts it.
//!
//! Only DNAT'ed flows are accepted; routed traffic straight to a guest stays refused.

use std::collections::BTreeSet;

use super::FirewallError;
use crate::exec;
use crate::facts::LibvirtFirewall;
use crate::model::Family;
use crate::plan::BridgeAccept;

/// Comment marking virtgate's rules in libvirt's nftables chains.
pub const NFT_MARK: &str = "virtgate";
/// virtgate's chain in the iptables filter table.
pub const XT_FORWARD: &str = "VIRTGATE_FORWARD";

pub fn nft_family(f: Family) -> &'static str {
    match f {
        Family::Ipv4 => "ip",
        Family::Ipv6 => "ip6",
    }
}

/// `nft -a list chain FAMILY libvirt_network guest_input`: None if the chain (or nft)
/// does not exist, an error if nft fails otherwise.
fn list_guest_input(family: Family) -> Result<Option<String>, FirewallError> {
    let argv = [
        "nft",
        "-a",
        "list",
        "chain",
        nft_family(family),
        "libvirt_network",
        "guest_input",
    ];
    match exec::run_if_installed(&argv)? {
        None => Ok(None),
        Some(o) if o.success => Ok(Some(o.stdout)),
        Some(o) if o.stderr.contains("No such file or directory") => Ok(None),
        Some(o) => Err(FirewallError::Rejected(format!(
            "{}: {}",
            argv.join(" "),
            o.stderr.trim()
        ))),
    }
}

/// Rules of a listed chain: (text without handle, handle).
fn parse_rules(listing: &str) -> Vec<(String, u64)> {
    listing
        .lines()
        .filter_map(|l| {
            let (rule, handle) = l.trim().rsplit_once(" # handle ")?;
            if rule.starts_with("type ") || rule.starts_with("chain ") {
                return None;
            }
            Some((rule.trim().to_string(), handle.trim().parse().ok()?))
        })
        .collect()
}

/// Bridges that libvirt's nftables form guards (they appear in `guest_input`).
pub fn libvirt_nft_bridges() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for fam in [Family::Ipv4, Family::Ipv6] {
        if let Ok(Some(l)) = list_guest_input(fam) {
            for (rule, _) in parse_rules(&l) {
                for key in ["oif \"", "oifname \""] {
                    if let Some(p) = rule.find(key) {
                        let rest = &rule[p + key.len()..];
                        if let Some(e) = rest.find('"') {
                            out.insert(rest[..e].to_string());
                        }
                    }
                }
            }
        }
    }
    out
}

/// Appends virtgate's rules in libvirt's `guest_input` chains, with their positions, to
/// a fingerprint text (a buried accept changes it).
pub fn describe(text: &mut String) -> Result<(), FirewallError> {
    for fam in [Family::Ipv4, Family::Ipv6] {
        if let Some(listing) = list_guest_input(fam)? {
            for (i, (rule, _)) in parse_rules(&listing).iter().enumerate() {
                if rule.contains(NFT_MARK) {
                    text.push_str(&format!("guest_input {fam:?} {i}: {rule}\n"));
                }
            }
        }
    }
    Ok(())
}

pub fn nft_accept_rule(bridge: &str) -> String {
    format!("oifname \"{bridge}\" ct status dnat accept comment \"{NFT_MARK}\"")
}

/// Statements for an `nft -f` batch that make virtgate's accepts in libvirt's
/// `guest_input` chains exactly `accepts` (those on libvirt's nftables form), at the top.
/// Empty if already so. Reads the chains (small: libvirt's own rules only).
pub fn nft_batch(accepts: &[BridgeAccept]) -> Result<String, FirewallError> {
    let mut batch = String::new();
    for fam in [Family::Ipv4, Family::Ipv6] {
        let wanted: Vec<String> = accepts
            .iter()
            .filter(|a| a.family == fam && a.firewall == LibvirtFirewall::Nftables)
            .map(|a| nft_accept_rule(&a.bridge))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let Some(listing) = list_guest_input(fam)? else {
            if !wanted.is_empty() {
                tracing::warn!(
                    "libvirt's nftables chain {} libvirt_network guest_input is missing; cannot place the accept",
                    nft_family(fam)
                );
            }
            continue;
        };
        let rules = parse_rules(&listing);
        let ours: Vec<&(String, u64)> = rules
            .iter()
            .filter(|(r, _)| r.ends_with(&format!("comment \"{NFT_MARK}\"")))
            .collect();
        let top: Vec<&String> = rules.iter().take(wanted.len()).map(|(r, _)| r).collect();
        if ours.len() == wanted.len() && top.iter().zip(&wanted).all(|(a, b)| *a == b) {
            continue;
        }
        let f = nft_family(fam);
        for (_, h) in ours {
            batch.push_str(&format!(
                "delete rule {f} libvirt_network guest_input handle {h}\n"
            ));
        }
        for r in wanted.iter().rev() {
            batch.push_str(&format!(
                "insert rule {f} libvirt_network guest_input {r}\n"
            ));
        }
    }
    Ok(batch)
}

/// The rendered form of the nft placement, for `render` (no kernel access).
pub fn nft_render(accepts: &[BridgeAccept]) -> String {
    let mut s = String::new();
    for a in accepts
        .iter()
        .filter(|a| a.firewall == LibvirtFirewall::Nftables)
    {
        s.push_str(&format!(
            "insert rule {} libvirt_network guest_input {}\n",
            nft_family(a.family),
            nft_accept_rule(&a.bridge)
        ));
    }
    s
}

/// Per-bridge accept lines for `VIRTGATE_FORWARD` (used by the nftables backend, which
/// counts traffic in its own table).
pub fn xt_bridge_rules(accepts: &[BridgeAccept], family: Family) -> Vec<String> {
    accepts
        .iter()
        .filter(|a| a.family == family && a.firewall == LibvirtFirewall::Iptables)
        .map(|a| {
            format!(
                "-o {} -m conntrack --ctstate DNAT -m comment --comment {NFT_MARK} -j ACCEPT",
                a.bridge
            )
        })
        .collect()
}

/// Whether any accept needs the xtables placement for `family`.
pub fn needs_xt(accepts: &[BridgeAccept], family: Family) -> bool {
    accepts
        .iter()
        .any(|a| a.family == family && a.firewall == LibvirtFirewall::Iptables)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listing() {
        let l = "table ip libvirt_network {\n\tchain guest_input { # handle 3\n\t\toifname \"virbr0\" ct status dnat accept comment \"virtgate\" # handle 9\n\t\toif \"virbr1\" reject # handle 5\n\t}\n}\n";
        let r = parse_rules(l);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].1, 9);
        assert_eq!(r[1].0, "oif \"virbr1\" reject");
    }
}
