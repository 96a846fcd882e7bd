//! Snooping on each running guest's tap: one `AF_PACKET` socket per tap, with a classic
//! BPF filter so that the kernel wakes the daemon only for frames that can teach something
//! new (an ARP or packet whose source address is not yet known for that tap, a DHCP ACK
//! from the host). What a frame teaches and whether it may replace what the tap has are
//! decided in [`crate::facts::snoop`]; what is learned is recorded in the state directory
//! for every virtgate process (and the next reconcile) to plan with.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

use crate::facts::snoop::{self, Learned, Snooped};
use crate::model::Family;

/// Addresses a tap's filter leaves out (known, or refused once), per family.
const MAX_EXCLUDED: usize = 16;
const ETH_P_ALL: u16 = 0x0003;
const PACKET_OUTGOING: u8 = 4;

/// A guest's tap being watched.
struct Tap {
    fd: OwnedFd,
    mac: [u8; 6],
    mac_text: String,
    /// Addresses claimed and refused (each logged once, then filtered out).
    refused: Vec<IpAddr>,
}

pub struct Snooper {
    state_dir: PathBuf,
    taps: BTreeMap<String, Tap>,
    /// What is recorded: per tap, at most one address per family.
    learned: Vec<Snooped>,
    /// Taps whose socket could not be opened (said once).
    failed: std::collections::BTreeSet<String>,
}

impl Snooper {
    pub fn new(state_dir: PathBuf) -> Snooper {
        let learned = snoop::read(&state_dir);
        Snooper {
            state_dir,
            taps: BTreeMap::new(),
            learned,
            failed: Default::default(),
        }
    }

    /// Watches exactly these (tap, MAC) pairs: the running guests' NICs. What was learned
    /// on a tap that went away is forgotten.
    pub fn sync(&mut self, nics: &[(String, String)]) {
        self.taps.retain(|tap, t| {
            nics.iter()
                .any(|(n, m)| n == tap && m.eq_ignore_ascii_case(&t.mac_text))
        });
        for (tap, mac) in nics {
            if self.taps.contains_key(tap) {
                continue;
            }
            let Some(m) = mac_bytes(mac) else {
                continue;
            };
            let t = Tap {
                fd: match open(tap) {
                    Ok(fd) => fd,
                    Err(e) => {
                        if self.failed.insert(tap.clone()) {
                            tracing::warn!("cannot snoop on {tap}: {e}");
                        }
                        continue;
                    }
                },
                mac: m,
                mac_text: mac.to_ascii_lowercase(),
                refused: Vec::new(),
            };
            self.failed.remove(tap);
            self.taps.insert(tap.clone(), t);
            self.refilter(tap);
        }
        let before = self.learned.len();
        let taps = &self.taps;
        self.learned
            .retain(|s| taps.get(&s.tap).is_some_and(|t| t.mac_text == s.mac));
        if self.learned.len() != before {
            self.record();
        }
    }

    /// The sockets to poll, in the order [`Snooper::read`] counts them.
    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        self.taps.values().map(|t| t.fd.as_fd()).collect()
    }

    /// Reads what waits on the `i`th socket; whether the record changed.
    pub fn read(&mut self, i: usize, now: u64) -> bool {
        let Some(tap) = self.taps.keys().nth(i).cloned() else {
            return false;
        };
        let mut changed = false;
        let mut buf = [0u8; 2048];
        while let Some((n, outgoing)) = self.taps.get(&tap).and_then(|t| recv(&t.fd, &mut buf)) {
            let Some(t) = self.taps.get(&tap) else { break };
            if let Some(c) = snoop::parse(&buf[..n], outgoing, t.mac) {
                changed |= self.claim(&tap, c, now);
            }
        }
        changed
    }

    /// Applies one claim; whether the record changed.
    fn claim(&mut self, tap: &str, c: snoop::Claim, now: u64) -> bool {
        let Some(t) = self.taps.get(tap) else {
            return false;
        };
        let mac = t.mac_text.clone();
        let fam = Family::of(&c.ip);
        let at = self
            .learned
            .iter()
            .position(|s| s.tap == tap && Family::of(&s.ip) == fam);
        match snoop::learn(at.map(|i| &self.learned[i]), tap, &mac, c, now) {
            Learned::New(s) => {
                tracing::info!("learned {} for {mac} on {tap} ({:?})", s.ip, s.how);
                match at {
                    Some(i) => self.learned[i] = s,
                    None => self.learned.push(s),
                }
                self.record();
                self.refilter(tap);
                true
            }
            Learned::Again => {
                if let Some(i) = at {
                    self.learned[i].seen = now;
                }
                false
            }
            Learned::Refused { held } => {
                if let Some(t) = self.taps.get_mut(tap)
                    && !t.refused.contains(&c.ip)
                {
                    tracing::warn!(
                        "the guest on {tap} ({mac}) claims {} while it holds {held}: refused",
                        c.ip
                    );
                    t.refused.push(c.ip);
                    self.refilter(tap);
                }
                false
            }
        }
    }

    fn record(&self) {
        if let Err(e) = snoop::write(&self.state_dir, &self.learned) {
            tracing::warn!("cannot record snooped addresses: {e}");
        }
    }

    /// The tap's filter, leaving out what it knows and what it refused.
    fn refilter(&self, tap: &str) {
        let Some(t) = self.taps.get(tap) else { return };
        let known = self
            .learned
            .iter()
            .filter(|s| s.tap == tap)
            .map(|s| s.ip)
            .chain(t.refused.iter().copied());
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for ip in known {
            match ip {
                IpAddr::V4(a) if v4.len() < MAX_EXCLUDED => v4.push(u32::from(a)),
                IpAddr::V6(a) if v6.len() < MAX_EXCLUDED => v6.push(a.octets()),
                _ => {}
            }
        }
        if let Err(e) = attach(&t.fd, &filter(&v4, &v6)) {
            tracing::warn!("cannot filter snooping on {tap}: {e}");
        }
    }
}

fn mac_bytes(mac: &str) -> Option<[u8; 6]> {
    let text = crate::model::parse_mac(mac)?;
    let mut out = [0u8; 6];
    for (o, p) in out.iter_mut().zip(text.split(':')) {
        *o = u8::from_str_radix(p, 16).ok()?;
    }
    Some(out)
}

/// A non-blocking packet socket bound to the interface, with a filter that passes nothing
/// until [`Snooper::refilter`] sets the real one (no unfiltered frames queue up).
fn open(ifname: &str) -> std::io::Result<OwnedFd> {
    let name = CString::new(ifname).map_err(std::io::Error::other)?;
    // SAFETY: a NUL-terminated name
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: plain socket(2); the descriptor is owned at once
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_ALL.to_be()),
        )
    };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: raw is a new descriptor nothing else owns
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    attach(&fd, &[Ins::ret(0)])?;
    // SAFETY: sockaddr_ll is plain data; zeroed is a valid value
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETH_P_ALL.to_be();
    sll.sll_ifindex = index as i32;
    // SAFETY: sll lives across the call, its size is passed
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const sll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // frames that came between socket() and the empty filter
    let mut buf = [0u8; 64];
    while recv(&fd, &mut buf).is_some() {}
    Ok(fd)
}

/// One frame, if one waits: (its length, whether the host sent it).
fn recv(fd: &OwnedFd, buf: &mut [u8]) -> Option<(usize, bool)> {
    // SAFETY: sockaddr_ll is plain data
    let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
    // SAFETY: buf and from live across the call, their sizes are passed
    let n = unsafe {
        libc::recvfrom(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_TRUNC,
            (&raw mut from).cast(),
            &mut len,
        )
    };
    (n >= 0).then(|| {
        (
            (n as usize).min(buf.len()),
            from.sll_pkttype == PACKET_OUTGOING,
        )
    })
}

/// A classic BPF instruction.
#[derive(Clone, Copy)]
struct Ins(libc::sock_filter);

impl Ins {
    fn new(code: u16, jt: u8, jf: u8, k: u32) -> Ins {
        Ins(libc::sock_filter { code, jt, jf, k })
    }
    fn ret(k: u32) -> Ins {
        Ins::new(0x06, 0, 0, k)
    }
}

fn attach(fd: &OwnedFd, prog: &[Ins]) -> std::io::Result<()> {
    let code: Vec<libc::sock_filter> = prog.iter().map(|i| i.0).collect();
    let fprog = libc::sock_fprog {
        len: code.len() as u16,
        filter: code.as_ptr().cast_mut(),
    };
    // SAFETY: fprog and the code it points to live across the call
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&raw const fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as u32,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A step of the filter before its jumps are resolved.
enum Step {
    /// Load (code, k).
    Ld(u16, u32),
    /// If A == k go to the first label, else to the second.
    Jeq(u32, &'static str, &'static str),
    /// If A == k go to the label, else on.
    JeqOn(u32, &'static str),
    /// If A != k go to the label, else on.
    JneOn(u32, &'static str),
    And(u32),
    Ret(u32),
    Label(&'static str),
}

const LDH: u16 = 0x28;
const LDW: u16 = 0x20;
const LDB: u16 = 0x30;
/// X = 4 * (byte at k & 0xf): the IPv4 header's length.
const LDX_MSH: u16 = 0xb1;
const LDH_IND: u16 = 0x48;
/// The packet type (ancillary data: SKF_AD_OFF + SKF_AD_PKTTYPE).
const PKTTYPE: u32 = 0xffff_f000 + 4;
const SNAP: u32 = 1536;

/// The filter: from the host, only DHCP replies; from the guest, ARP, IPv4 and IPv6 whose
/// source address is none of `v4` / `v6` (and not IPv6 link-local).
fn filter(v4: &[u32], v6: &[[u8; 16]]) -> Vec<Ins> {
    use Step::*;
    let mut s = vec![
        Ld(LDW, PKTTYPE),
        Jeq(u32::from(PACKET_OUTGOING), "out", "in"),
        Label("out"),
        Ld(LDH, 12),
        JneOn(0x0800, "drop"),
        Ld(LDB, 23),
        JneOn(17, "drop"),
        Ld(LDX_MSH, 14),
        Ld(LDH_IND, 14),
        JneOn(67, "drop"),
        Ld(LDH_IND, 16),
        Jeq(68, "accept", "drop"),
        Label("in"),
        Ld(LDH, 12),
        JeqOn(0x0806, "arp"),
        JeqOn(0x0800, "ip4"),
        Jeq(0x86dd, "ip6", "drop"),
        Label("arp"),
        Ld(LDW, 28),
    ];
    s.extend(v4.iter().map(|a| JeqOn(*a, "drop")));
    s.extend([Ret(SNAP), Label("ip4"), Ld(LDW, 26)]);
    s.extend(v4.iter().map(|a| JeqOn(*a, "drop")));
    s.extend([
        Ret(SNAP),
        Label("ip6"),
        Ld(LDW, 22),
        And(0xffc0_0000),
        JeqOn(0xfe80_0000, "drop"),
    ]);
    for (i, a) in v6.iter().enumerate() {
        let next = NEXT6[i];
        for w in 0..4 {
            let word = u32::from_be_bytes([a[4 * w], a[4 * w + 1], a[4 * w + 2], a[4 * w + 3]]);
            s.push(Ld(LDW, 22 + 4 * w as u32));
            s.push(JneOn(word, next));
        }
        s.push(Ret(0));
        s.push(Label(next));
    }
    s.extend([Label("accept"), Ret(SNAP), Label("drop"), Ret(0)]);
    assemble(&s)
}

/// Labels between the IPv6 exclusions.
const NEXT6: [&str; MAX_EXCLUDED] = [
    "n0", "n1", "n2", "n3", "n4", "n5", "n6", "n7", "n8", "n9", "n10", "n11", "n12", "n13", "n14",
    "n15",
];

/// Resolves labels into jump offsets (each below 256: the program is small).
fn assemble(steps: &[Step]) -> Vec<Ins> {
    let mut at = std::collections::HashMap::new();
    let mut n = 0usize;
    for s in steps {
        match s {
            Step::Label(l) => {
                at.insert(*l, n);
            }
            _ => n += 1,
        }
    }
    let mut out = Vec::with_capacity(n);
    let off = |here: usize, l: &str| -> u8 {
        let d = at[l] - here - 1;
        debug_assert!(d < 256, "a jump over 255 instructions");
        d.min(255) as u8
    };
    for s in steps {
        let here = out.len();
        out.push(match s {
            Step::Label(_) => continue,
            Step::Ld(code, k) => Ins::new(*code, 0, 0, *k),
            Step::Jeq(k, t, f) => Ins::new(0x15, off(here, t), off(here, f), *k),
            Step::JeqOn(k, t) => Ins::new(0x15, off(here, t), 0, *k),
            Step::JneOn(k, f) => Ins::new(0x15, 0, off(here, f), *k),
            Step::And(k) => Ins::new(0x54, 0, 0, *k),
            Step::Ret(k) => Ins::ret(*k),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_jumps_stay_inside_it_with_every_exclusion() {
        let v4: Vec<u32> = (0..MAX_EXCLUDED as u32).collect();
        let v6: Vec<[u8; 16]> = (0..MAX_EXCLUDED as u8).map(|i| [i; 16]).collect();
        for (a, b) in [
            (&v4[..0], &v6[..0]),
            (&v4[..], &v6[..0]),
            (&v4[..], &v6[..]),
        ] {
            let prog = filter(a, b);
            assert!(prog.len() < 256, "{} instructions", prog.len());
            for (i, ins) in prog.iter().enumerate() {
                let ins = ins.0;
                if ins.code == 0x15 {
                    for j in [ins.jt, ins.jf] {
                        assert!(i + 1 + usize::from(j) < prog.len(), "jump out at {i}");
                    }
                }
            }
            assert_eq!(
                prog.last().map(|i| (i.0.code, i.0.k)),
                Some((0x06, 0)),
                "ends dropping"
            );
        }
    }

    #[test]
    fn macs_as_bytes() {
        assert_eq!(
            mac_bytes("52:54:00:AB:cd:0e"),
            Some([0x52, 0x54, 0, 0xab, 0xcd, 0x0e])
        );
        assert_eq!(mac_bytes("52:54:00"), None);
    }
}
