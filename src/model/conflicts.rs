//! Conflicts between forwards: two forwards conflict when they use the same protocol, a
//! common address family, listen selectors that can receive the same packet (or are both
//! reachable from localhost) and overlapping host ports. The first (in the given order)
//! wins; a loser never blocks anyone.
//!
//! [`find_conflicts`] runs in O(n log n) (plus the overlaps it reports): forwards that
//! won are kept in per-(protocol, family, listen class) interval maps, and each forward
//! asks only the classes its listen selector can overlap. [`find_conflicts_naive`] is the
//! pairwise definition, kept for the property test that checks the two agree.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use super::{DomainConfig, Family, ForwardSpec, Listen, PortRange, Proto};

/// A conflict: forward `second` (domain index, forward index) collides with `first`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Conflict {
    pub first: (usize, usize),
    pub second: (usize, usize),
}

pub(crate) fn families(spec: &ForwardSpec) -> Vec<Family> {
    [Family::Ipv4, Family::Ipv6]
        .into_iter()
        .filter(|f| spec.allows_family(*f))
        .collect()
}

/// Whether two forwards could receive the same packet.
pub fn specs_overlap(a: &ForwardSpec, b: &ForwardSpec) -> bool {
    // the cheap tests first, nothing allocated: `apply` of one edited domain compares it
    // with every other forward
    if a.proto != b.proto || !a.host_ports.overlaps(&b.host_ports) {
        return false;
    }
    let fam_overlap = [Family::Ipv4, Family::Ipv6]
        .into_iter()
        .any(|f| a.allows_family(f) && b.allows_family(f));
    // localhost forwards share one key space (127.0.0.1), whatever they listen on
    let listen_overlap = a.listen.overlaps(&b.listen) || (a.localhost && b.localhost);
    fam_overlap && listen_overlap
}

/// Every forward, in the order they claim ports: those `first` says first, then the rest,
/// each part in (domain, forward) order.
fn all_forwards<'a>(
    domains: &'a [DomainConfig],
    first: &dyn Fn((usize, usize)) -> bool,
) -> Vec<((usize, usize), &'a ForwardSpec)> {
    let mut all: Vec<_> = domains
        .iter()
        .enumerate()
        .flat_map(|(di, d)| {
            d.forwards
                .iter()
                .enumerate()
                .map(move |(fi, f)| ((di, fi), f))
        })
        .collect();
    // stable: the config's order within each part
    all.sort_by_key(|(idx, _)| !first(*idx));
    all
}

/// Up to this many forwards, [`find_conflicts`] compares them pairwise.
const SMALL: usize = 32;

/// The pairwise definition: O(n^2). Use [`find_conflicts`].
pub fn find_conflicts_naive(domains: &[DomainConfig]) -> Vec<Conflict> {
    find_conflicts_naive_by(domains, &|_| false)
}

/// [`find_conflicts_naive`] where the forwards `first` says claim their ports first.
pub fn find_conflicts_naive_by(
    domains: &[DomainConfig],
    first: &dyn Fn((usize, usize)) -> bool,
) -> Vec<Conflict> {
    let all = all_forwards(domains, first);
    let mut out = Vec::new();
    let mut winners: Vec<((usize, usize), &ForwardSpec)> = Vec::new();
    for (b_idx, b) in &all {
        // a loser names the winner it overlaps that comes first in the config, whichever
        // claimed its ports first: planning again (installed forwards first) names the same
        let named = winners
            .iter()
            .filter(|(_, a)| specs_overlap(a, b))
            .map(|(a_idx, _)| *a_idx)
            .min();
        match named {
            Some(a_idx) => out.push(Conflict {
                first: a_idx,
                second: *b_idx,
            }),
            None => winners.push((*b_idx, b)),
        }
    }
    out.sort();
    out
}

/// Ports painted by the first forward that claimed them: disjoint ranges, start -> (end,
/// the forward's rank in the config). The winners painted in one of these never overlap
/// each other (one address, one interface), so the first painter is the only one.
#[derive(Debug, Default)]
struct Painted(BTreeMap<u16, (u16, usize)>);

impl Painted {
    /// The earliest forward holding a port of `r`.
    fn earliest(&self, r: PortRange) -> Option<usize> {
        self.0
            .range(..=r.end)
            .rev()
            .take_while(|(_, (end, _))| *end >= r.start)
            .map(|(_, (_, pos))| *pos)
            .min()
    }

    /// Paints the ports of `r` nobody holds yet with `pos`.
    fn paint(&mut self, r: PortRange, pos: usize) {
        if self.earliest(r).is_none() {
            self.0.insert(r.start, (r.end, pos));
            return;
        }
        let taken: Vec<(u16, u16)> = self
            .0
            .range(..=r.end)
            .rev()
            .take_while(|(_, (end, _))| *end >= r.start)
            .map(|(s, (e, _))| (*s, *e))
            .collect();
        let mut next = u32::from(r.start);
        for (s, e) in taken.into_iter().rev() {
            if u32::from(s) > next {
                self.0.insert(next as u16, (s - 1, pos));
            }
            next = next.max(u32::from(e) + 1);
        }
        if next <= u32::from(r.end) {
            self.0.insert(next as u16, (r.end, pos));
        }
    }
}

/// [`Painted`] for the classes most forwards fall in: one slot per port (allocated on
/// first use), so a single port costs O(1) to look up and to paint.
#[derive(Debug, Default)]
struct Dense(Vec<u32>);

impl Dense {
    const FREE: u32 = u32::MAX;

    fn earliest(&self, r: PortRange) -> Option<usize> {
        let m = *self
            .0
            .get(r.start as usize..=r.end as usize)?
            .iter()
            .min()?;
        (m != Self::FREE).then_some(m as usize)
    }

    /// Keeps the lowest rank on each port: winners painted here may share ports (two
    /// addresses in `any_addr`), and a loser names the one first in the config.
    fn paint(&mut self, r: PortRange, rank: usize) {
        if self.0.is_empty() {
            self.0 = vec![Self::FREE; 65536];
        }
        for slot in &mut self.0[r.start as usize..=r.end as usize] {
            *slot = (*slot).min(rank as u32);
        }
    }
}

/// Winners of one (protocol, family), by listen class.
#[derive(Debug, Default)]
struct Classes {
    addr: HashMap<IpAddr, Painted>,
    iface: HashMap<String, Painted>,
    /// Any address (and hooks.json's default-route address): overlaps everything.
    wild: Dense,
    any_addr: Dense,
    any_if: Dense,
    all: Dense,
    localhost: Dense,
}

impl Classes {
    /// The earliest winner a forward overlaps.
    fn earliest(&self, f: &ForwardSpec) -> Option<usize> {
        let r = f.host_ports;
        let lo = if f.localhost {
            self.localhost.earliest(r)
        } else {
            None
        };
        let listen = match &f.listen {
            Listen::Address(a) => [
                self.addr.get(a).and_then(|p| p.earliest(r)),
                self.any_if.earliest(r),
                self.wild.earliest(r),
            ]
            .into_iter()
            .flatten()
            .min(),
            Listen::Interface(i) => [
                self.iface.get(i).and_then(|p| p.earliest(r)),
                self.any_addr.earliest(r),
                self.wild.earliest(r),
            ]
            .into_iter()
            .flatten()
            .min(),
            Listen::Any | Listen::DefaultRoute => self.all.earliest(r),
        };
        lo.into_iter().chain(listen).min()
    }

    fn record(&mut self, f: &ForwardSpec, pos: usize) {
        let r = f.host_ports;
        self.all.paint(r, pos);
        match &f.listen {
            Listen::Address(a) => {
                self.addr.entry(*a).or_default().paint(r, pos);
                self.any_addr.paint(r, pos);
            }
            Listen::Interface(i) => {
                self.iface.entry(i.clone()).or_default().paint(r, pos);
                self.any_if.paint(r, pos);
            }
            Listen::Any | Listen::DefaultRoute => self.wild.paint(r, pos),
        }
        if f.localhost {
            self.localhost.paint(r, pos);
        }
    }
}

/// Finds forwards that claim the same listen address, protocol and port. The first in
/// (domain, forward) order wins. Same result as [`find_conflicts_naive`].
pub fn find_conflicts(domains: &[DomainConfig]) -> Vec<Conflict> {
    find_conflicts_by(domains, &|_| false)
}

/// [`find_conflicts`] where the forwards `first` says (domain index, forward index) claim
/// their ports before the others: the planner's installed forwards, which keep them.
pub fn find_conflicts_by(
    domains: &[DomainConfig],
    first: &dyn Fn((usize, usize)) -> bool,
) -> Vec<Conflict> {
    // a hook's one domain: pairwise beats allocating the per-port index
    if domains.iter().map(|d| d.forwards.len()).sum::<usize>() <= SMALL {
        return find_conflicts_naive_by(domains, first);
    }
    find_conflicts_indexed_by(domains, first)
}

/// [`find_conflicts`] through the per-port index, whatever the number of forwards (the
/// property test checks it against [`find_conflicts_naive`]).
pub fn find_conflicts_indexed(domains: &[DomainConfig]) -> Vec<Conflict> {
    find_conflicts_indexed_by(domains, &|_| false)
}

/// [`find_conflicts_indexed`] with [`find_conflicts_by`]'s order.
pub fn find_conflicts_indexed_by(
    domains: &[DomainConfig],
    first: &dyn Fn((usize, usize)) -> bool,
) -> Vec<Conflict> {
    let all = all_forwards(domains, first);
    // what is painted is each winner's rank in the config, so that a loser names the
    // winner first in the config (as the pairwise definition does)
    let by_rank: Vec<(usize, usize)> = domains
        .iter()
        .enumerate()
        .flat_map(|(di, d)| (0..d.forwards.len()).map(move |fi| (di, fi)))
        .collect();
    // one slot per (protocol, family)
    let slot = |p: Proto, f: Family| {
        (match p {
            Proto::Tcp => 0,
            Proto::Udp => 2,
            Proto::Sctp => 4,
        }) + usize::from(f == Family::Ipv6)
    };
    let mut index: Vec<Classes> = (0..6).map(|_| Classes::default()).collect();
    let mut out = Vec::new();
    for (idx, f) in &all {
        // (by_rank is in (domain, forward) order: sorted)
        let rank = by_rank.binary_search(idx).unwrap_or_default();
        let fams = [Family::Ipv4, Family::Ipv6].map(|fam| f.allows_family(fam).then_some(fam));
        let winner = fams
            .iter()
            .flatten()
            .filter_map(|fam| index[slot(f.proto, *fam)].earliest(f))
            .min();
        if let Some(w) = winner {
            out.push(Conflict {
                first: by_rank[w],
                second: *idx,
            });
            continue;
        }
        for fam in fams.iter().flatten() {
            index[slot(f.proto, *fam)].record(f, rank);
        }
    }
    out.sort();
    out
}
