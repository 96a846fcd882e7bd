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
//! * on libvirt's nftables form, when iptables' filter `FORWARD` chain exists too (Docker,
//!   ufw, anything using iptables-nft; Docker sets its policy to DROP): the same jump as on
//!   the iptables form besides the nft accept, since that chain also sees the packet.
//!
//! Only DNAT'ed flows are accepted; routed traffic straight to a guest stays refused.

use std::collections::BTreeSet;

use super::FirewallError;
use super::nfnl::{self, RuleInfo};
use crate::model::Family;
use crate::model::LibvirtFirewall;
use crate::rules::BridgeAccept;

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

fn nfproto(family: Family) -> u8 {
    match family {
        Family::Ipv4 => super::nfnl::NFPROTO_IPV4,
        Family::Ipv6 => super::nfnl::NFPROTO_IPV6,
    }
}

/// The rules of `FAMILY libvirt_network guest_input`, read over netlink (one chain, cheap
/// whatever else the ruleset holds): None if the chain does not exist.
fn read<T>(family: Family, r: std::io::Result<T>) -> Result<T, FirewallError> {
    r.map_err(|e| {
        FirewallError::Parse(format!(
            "reading {} libvirt_network guest_input: {e}",
            nft_family(family)
        ))
    })
}

fn list_guest_input(family: Family) -> Result<Option<Vec<RuleInfo>>, FirewallError> {
    let rules = read(
        family,
        nfnl::rules(nfproto(family), "libvirt_network", Some("guest_input")),
    )?;
    match rules {
        Some(r) if !r.is_empty() => Ok(Some(r)),
        // an empty dump: the chain may be missing, or empty
        _ => {
            let chains = read(family, nfnl::chains(nfproto(family), "libvirt_network"))?;
            Ok(chains
                .filter(|c| c.iter().any(|n| n == "guest_input"))
                .map(|_| Vec::new()))
        }
    }
}

fn is_ours(r: &RuleInfo) -> bool {
    r.comment.as_deref() == Some(NFT_MARK)
}

/// Bridges that libvirt's nftables form guards (they appear in `guest_input`).
pub fn libvirt_nft_bridges() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for fam in [Family::Ipv4, Family::Ipv6] {
        if let Ok(Some(rules)) = list_guest_input(fam) {
            for r in rules.iter().filter(|r| !is_ours(r)) {
                out.extend(r.oifs.iter().cloned());
            }
        }
    }
    out
}

/// Families whose iptables-nft filter table has a `FORWARD` chain (one netlink dump of
/// chain names each). iptables-legacy's tables are not seen: see README.
pub fn xt_forward_families() -> Vec<Family> {
    [Family::Ipv4, Family::Ipv6]
        .into_iter()
        .filter(|f| {
            nfnl::chains(nfproto(*f), "filter")
                .ok()
                .flatten()
                .is_some_and(|c| c.iter().any(|n| n == "FORWARD"))
        })
        .collect()
}

pub fn nft_accept_rule(bridge: &str) -> String {
    format!("oifname \"{bridge}\" ct status dnat accept comment \"{NFT_MARK}\"")
}

/// Bridges of `family` whose accept goes in libvirt's nftables chain, sorted.
fn wanted_bridges(accepts: &[BridgeAccept], family: Family) -> Vec<String> {
    accepts
        .iter()
        .filter(|a| a.family == family && a.firewall == LibvirtFirewall::Nftables)
        .map(|a| a.bridge.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Statements for an `nft -f` batch that make virtgate's accepts in libvirt's
/// `guest_input` chains exactly `accepts` (those on libvirt's nftables form), at the top.
/// Empty if already so. Reads the two chains over netlink (libvirt's rules only).
pub fn nft_batch(accepts: &[BridgeAccept]) -> Result<String, FirewallError> {
    let mut batch = String::new();
    for fam in [Family::Ipv4, Family::Ipv6] {
        let wanted: Vec<String> = wanted_bridges(accepts, fam)
            .iter()
            .map(|b| nft_accept_rule(b))
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
        let ours: Vec<&RuleInfo> = listing.iter().filter(|r| is_ours(r)).collect();
        let bridges: Vec<String> = wanted_bridges(accepts, fam);
        let on_top = listing.len() >= bridges.len()
            && listing
                .iter()
                .zip(&bridges)
                .all(|(r, b)| is_ours(r) && r.oifs == [b.clone()]);
        if ours.len() == bridges.len() && on_top {
            continue;
        }
        let f = nft_family(fam);
        for r in ours {
            batch.push_str(&format!(
                "delete rule {f} libvirt_network guest_input handle {}\n",
                r.handle
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

/// Per-bridge accept lines for `VIRTGATE_FORWARD`: DNAT'ed flows to the bridge, and
/// their replies from it (libvirt's own iptables chains accept those too, but iptables'
/// `FORWARD` beside libvirt's nftables form, as Docker leaves it with policy DROP, has
/// nobody else to).
pub fn xt_bridge_rules(accepts: &[BridgeAccept], family: Family) -> Vec<String> {
    accepts
        .iter()
        .filter(|a| a.family == family && a.firewall == LibvirtFirewall::Iptables)
        .flat_map(|a| {
            ["-o", "-i"].map(|dir| {
                format!(
                    "{dir} {} -m conntrack --ctstate DNAT -m comment --comment {NFT_MARK} -j ACCEPT",
                    a.bridge
                )
            })
        })
        .collect()
}

/// Whether any accept needs the xtables placement for `family`.
pub fn needs_xt(accepts: &[BridgeAccept], family: Family) -> bool {
    accepts
        .iter()
        .any(|a| a.family == family && a.firewall == LibvirtFirewall::Iptables)
}
