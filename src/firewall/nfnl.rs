//! Reading nf_tables in-process over netlink (NETLINK_NETFILTER), without spawning `nft`.
//!
//! Why not `nft list`: every `nft` listing fills nft's cache with the whole ruleset
//! (PERF-FACTS.md: 200 ms at 10,000 forwards), while the kernel answers a dump filtered by
//! table, chain or set directly. Only the few reads virtgate needs are here: whether a
//! table exists, the rules of one chain (handle and comment), the chains and sets of a
//! table, and the elements of one set (raw key/data bytes and element counters). Writes
//! still go through one `nft -f` transaction.

use std::io;

use std::cell::RefCell;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

thread_local! {
    /// This thread's socket, with the network namespace it was opened in.
    static SOCKET: RefCell<Option<(Socket, u64)>> = const { RefCell::new(None) };
}

/// Whether this process committed a deletion: closing its socket then waits for the
/// kernel to free what was deleted ([`release`]).
static DELETED: AtomicBool = AtomicBool::new(false);

/// The inode of this thread's network namespace.
fn netns_id() -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata("/proc/thread-self/ns/net")?.ino())
}

/// Runs one exchange on this thread's socket, opened on first use (and again after a
/// failed exchange, or in another network namespace).
fn with_socket<T>(f: impl FnOnce(&mut Socket) -> io::Result<T>) -> io::Result<T> {
    let ns = netns_id()?;
    SOCKET.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(_, n)| *n != ns) {
            let mut socket = Socket::new(NETLINK_NETFILTER)?;
            socket.bind_auto()?;
            socket.connect(&SocketAddr::new(0, 0))?;
            *slot = Some((socket, ns));
        }
        let Some((socket, _)) = slot.as_mut() else {
            return Err(io::Error::other("no netlink socket"));
        };
        let r = f(socket);
        if r.is_err() {
            // whatever the kernel still has to say belongs to the failed exchange
            *slot = None;
        }
        r
    })
}

/// Closes every descriptor but `a` and `b` (`a < b`). Async-signal-safe.
unsafe fn close_all_but(a: i32, b: i32) {
    let ranges = [(0, a - 1), (a + 1, b - 1), (b + 1, i32::MAX)];
    for (first, last) in ranges {
        if first > last {
            continue;
        }
        // SAFETY: close_range takes two descriptor numbers and flags
        let r = unsafe { libc::syscall(libc::SYS_close_range, first as u32, last as u32, 0) };
        if r != 0 {
            // before Linux 5.9: one by one, as far as descriptors usually go
            for fd in first..=last.min(65_535) {
                // SAFETY: closing a number that may not be open is harmless
                unsafe { libc::close(fd) };
            }
        }
    }
}

/// Closes this thread's socket without making the caller wait for the kernel.
///
/// Since Linux 6.x ("flush pending destroy work before netlink notifier"), releasing
/// any nf_tables netlink socket waits until the kernel has freed what earlier
/// transactions deleted, an RCU grace period (10-15 ms here, PERF-FACTS.md's delete
/// floor). The deletion itself is committed and in force long before. A hook that
/// deleted something therefore hands its socket to a short-lived child, which closes it
/// once this process has exited; the child holds no other descriptor (not libvirt's
/// pipes, not the state lock), so nothing waits for it. Call this last, just before the
/// process exits.
pub fn release() {
    let Some((socket, _)) = SOCKET.with(|c| c.borrow_mut().take()) else {
        return;
    };
    if !DELETED.load(Ordering::Relaxed) {
        return;
    }
    let fd = socket.as_raw_fd();
    let mut pipe = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return;
    }
    // SAFETY: the child calls only async-signal-safe functions (close, read, _exit).
    match unsafe { libc::fork() } {
        0 => unsafe {
            close_all_but(fd.min(pipe[0]), fd.max(pipe[0]));
            // until the parent has exited (its end of the pipe closes with it), then the
            // last close of the socket, which waits for the kernel here
            let mut b = 0u8;
            while libc::read(pipe[0], (&raw mut b).cast(), 1) > 0 {}
            libc::close(fd);
            libc::_exit(0);
        },
        pid if pid > 0 => {
            // not the last reference now: closing it here does not wait
            drop(socket);
            // SAFETY: our own descriptor, read end only; the write end stays open until
            // this process exits
            unsafe { libc::close(pipe[0]) };
        }
        _ => {
            // no child: close it here, and wait
            // SAFETY: our own descriptors
            unsafe {
                libc::close(pipe[0]);
                libc::close(pipe[1]);
            }
        }
    }
}

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_GETSET: u16 = 10;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFT_MSG_GETGEN: u16 = 16;

const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

/// nfgenmsg families.
pub const NFPROTO_INET: u8 = 1;
pub const NFPROTO_IPV4: u8 = 2;
pub const NFPROTO_IPV6: u8 = 10;

/// One netlink attribute: type (flags masked off) and payload.
#[derive(Debug, Clone, Copy)]
pub struct Attr<'a> {
    pub kind: u16,
    pub data: &'a [u8],
}

/// Iterates the attributes in `buf`.
pub fn attrs(mut buf: &[u8]) -> impl Iterator<Item = Attr<'_>> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        if len < 4 || len > buf.len() {
            return None;
        }
        let a = Attr {
            kind,
            data: &buf[4..len],
        };
        buf = &buf[((len + 3) & !3).min(buf.len())..];
        Some(a)
    })
}

/// The first attribute of a kind.
pub fn attr(buf: &[u8], kind: u16) -> Option<&[u8]> {
    attrs(buf).find(|a| a.kind == kind).map(|a| a.data)
}

fn be64(b: &[u8]) -> u64 {
    b.get(..8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn put_attr(buf: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = 4 + data.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(data);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

fn put_str(buf: &mut Vec<u8>, kind: u16, s: &str) {
    let mut d = s.as_bytes().to_vec();
    d.push(0);
    put_attr(buf, kind, &d);
}

/// The netlink messages in one received buffer: (type, payload after the header).
fn messages(data: &[u8]) -> impl Iterator<Item = io::Result<(u16, &[u8])>> {
    let mut off = 0;
    std::iter::from_fn(move || {
        if off + 16 > data.len() {
            return None;
        }
        let len = u32::from_ne_bytes(data[off..off + 4].try_into().unwrap_or([0; 4])) as usize;
        let kind = u16::from_ne_bytes([data[off + 4], data[off + 5]]);
        if len < 16 || off + len > data.len() {
            off = data.len();
            return Some(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "truncated netlink message",
            )));
        }
        let payload = &data[off + 16..off + len];
        off += (len + 3) & !3;
        Some(Ok((kind, payload)))
    })
}

/// The error code of an NLMSG_ERROR payload (0: an acknowledgement).
fn error_code(payload: &[u8]) -> i32 {
    payload
        .get(..4)
        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(0)
}

/// Sends one request and returns the payloads (after the nfgenmsg header) of the
/// answers. `Ok(None)` when the kernel says the object does not exist.
fn request(
    msg: u16,
    family: u8,
    dump: bool,
    attrs: &[(u16, &str)],
) -> io::Result<Option<Vec<Vec<u8>>>> {
    let mut body = vec![family, 0, 0, 0];
    for (k, v) in attrs {
        put_str(&mut body, *k, v);
    }
    let flags = NLM_F_REQUEST | if dump { NLM_F_DUMP } else { NLM_F_ACK };
    let mut buf = Vec::with_capacity(16 + body.len());
    buf.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    buf.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | msg).to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&1u32.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&body);
    with_socket(|socket| {
        socket.send(&buf, 0)?;
        let mut out = Vec::new();
        loop {
            let (data, _) = socket.recv_from_full()?;
            if data.is_empty() {
                return Ok(Some(out));
            }
            for m in messages(&data) {
                let (kind, payload) = m?;
                match kind {
                    NLMSG_DONE => return Ok(Some(out)),
                    NLMSG_ERROR => {
                        return match -error_code(payload) {
                            0 => Ok(Some(out)),
                            libc::ENOENT => Ok(None),
                            e => Err(io::Error::from_raw_os_error(e)),
                        };
                    }
                    _ => out.push(payload.get(4..).unwrap_or_default().to_vec()),
                }
            }
        }
    })
}

/// The ruleset generation of this network namespace: the kernel adds one for every
/// nf_tables transaction it commits (any table, `nft` and iptables-nft alike), so an
/// unchanged generation means an unchanged ruleset.
pub fn generation() -> io::Result<u32> {
    // AF_UNSPEC; the answer holds NFTA_GEN_ID = 1, big-endian
    let answers = request(NFT_MSG_GETGEN, 0, false, &[])?.unwrap_or_default();
    answers
        .iter()
        .find_map(|m| attr(m, 1))
        .and_then(|b| b.get(..4))
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| io::Error::other("nf_tables answered without a generation"))
}

/// Whether a table exists.
pub fn table_exists(family: u8, table: &str) -> io::Result<bool> {
    // NFTA_TABLE_NAME = 1
    Ok(request(NFT_MSG_GETTABLE, family, false, &[(1, table)])?.is_some_and(|m| !m.is_empty()))
}

/// A rule as listed: its handle and its comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleInfo {
    pub chain: String,
    pub handle: u64,
    pub comment: Option<String>,
    /// Output interfaces the rule matches (`oif` resolved to its name, or `oifname`).
    pub oifs: Vec<String>,
}

/// Interfaces compared after a `meta oif` / `meta oifname` load in a rule's expressions.
fn rule_oifs(exprs: &[u8]) -> Vec<String> {
    // NFTA_LIST_ELEM 1 { NFTA_EXPR_NAME 1, NFTA_EXPR_DATA 2 }; meta: NFTA_META_KEY 2
    // (NFT_META_OIF 5, NFT_META_OIFNAME 7); cmp: NFTA_CMP_DATA 3 { NFTA_DATA_VALUE 1 }
    let mut out = Vec::new();
    let mut pending: Option<u32> = None;
    for e in attrs(exprs).filter(|a| a.kind == 1) {
        let name = attr(e.data, 1).map(cstr).unwrap_or_default();
        let data = attr(e.data, 2).unwrap_or_default();
        match name.as_str() {
            "meta" => {
                pending = attr(data, 2)
                    .and_then(|k| k.get(..4))
                    .map(|k| u32::from_be_bytes([k[0], k[1], k[2], k[3]]))
                    .filter(|k| *k == 5 || *k == 7);
            }
            "cmp" => {
                if let Some(key) = pending.take() {
                    let v = attr(data, 3).and_then(|d| attr(d, 1)).unwrap_or_default();
                    if key == 7 {
                        out.push(cstr(v));
                    } else if let Some(b) = v.get(..4) {
                        let idx = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
                        if let Ok(n) = nix::net::if_::if_indextoname(idx) {
                            out.push(n.to_string_lossy().into_owned());
                        }
                    }
                }
            }
            _ => pending = None,
        }
    }
    out
}

fn rule_info(m: &[u8]) -> RuleInfo {
    // NFTA_RULE_CHAIN 2, NFTA_RULE_HANDLE 3, NFTA_RULE_USERDATA 7
    let comment = attr(m, 7).and_then(|ud| {
        // TLVs: type u8 (0 = comment), len u8, value
        let mut i = 0;
        while i + 2 <= ud.len() {
            let (t, l) = (ud[i], ud[i + 1] as usize);
            let v = ud.get(i + 2..i + 2 + l)?;
            if t == 0 {
                return Some(cstr(v));
            }
            i += 2 + l;
        }
        None
    });
    RuleInfo {
        chain: attr(m, 2).map(cstr).unwrap_or_default(),
        handle: attr(m, 3).map(be64).unwrap_or(0),
        comment,
        oifs: attr(m, 4).map(rule_oifs).unwrap_or_default(),
    }
}

/// The rules of one chain (or of the whole table when `chain` is None), in order; None if
/// the table or chain does not exist.
pub fn rules(family: u8, table: &str, chain: Option<&str>) -> io::Result<Option<Vec<RuleInfo>>> {
    let mut a = vec![(1, table)];
    if let Some(c) = chain {
        a.push((2, c));
    }
    Ok(request(NFT_MSG_GETRULE, family, true, &a)?
        .map(|msgs| msgs.iter().map(|m| rule_info(m)).collect()))
}

/// Names of the chains (or sets) of a table; None if the table does not exist.
fn names(msg: u16, family: u8, table: &str) -> io::Result<Option<Vec<String>>> {
    let Some(msgs) = request(msg, family, true, &[(1, table)])? else {
        return Ok(None);
    };
    // NFTA_CHAIN_TABLE / NFTA_SET_TABLE = 1, NFTA_CHAIN_NAME / NFTA_SET_NAME = 3 / 2
    let name_attr = if msg == NFT_MSG_GETCHAIN { 3 } else { 2 };
    Ok(Some(
        msgs.iter()
            .filter(|m| attr(m, 1).map(cstr).as_deref() == Some(table))
            .filter_map(|m| attr(m, name_attr).map(cstr))
            .collect(),
    ))
}

pub fn chains(family: u8, table: &str) -> io::Result<Option<Vec<String>>> {
    names(NFT_MSG_GETCHAIN, family, table)
}

pub fn sets(family: u8, table: &str) -> io::Result<Option<Vec<String>>> {
    names(NFT_MSG_GETSET, family, table)
}

/// One set element as the kernel holds it: canonical bytes of key, key end (= key for
/// non-interval sets) and data, plus its counter if the set counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawElem {
    pub key: Vec<u8>,
    pub data: Vec<u8>,
    pub counter: Option<(u64, u64)>,
}

/// Canonical bytes of a verdict (`goto CHAIN`), as [`RawElem::data`] holds it.
pub fn verdict_bytes(code: i32, chain: &str) -> Vec<u8> {
    let mut v = code.to_be_bytes().to_vec();
    v.extend_from_slice(chain.as_bytes());
    v
}

fn data_value(d: &[u8]) -> Vec<u8> {
    // NFTA_DATA_VALUE 1, NFTA_DATA_VERDICT 2 { NFTA_VERDICT_CODE 1, NFTA_VERDICT_CHAIN 2 }
    if let Some(v) = attr(d, 1) {
        return v.to_vec();
    }
    if let Some(v) = attr(d, 2) {
        let code = attr(v, 1)
            .and_then(|c| c.get(..4))
            .map(|c| i32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .unwrap_or(0);
        return verdict_bytes(code, &attr(v, 2).map(cstr).unwrap_or_default());
    }
    Vec::new()
}

fn counter_of(expr: &[u8]) -> Option<(u64, u64)> {
    // NFTA_EXPR_NAME 1, NFTA_EXPR_DATA 2 { NFTA_COUNTER_BYTES 1, NFTA_COUNTER_PACKETS 2 }
    if attr(expr, 1).map(cstr).as_deref() != Some("counter") {
        return None;
    }
    let d = attr(expr, 2)?;
    Some((attr(d, 2).map(be64)?, attr(d, 1).map(be64)?))
}

/// The elements of one set; None if the set does not exist.
pub fn elements(family: u8, table: &str, set: &str) -> io::Result<Option<Vec<RawElem>>> {
    let Some(msgs) = request(NFT_MSG_GETSETELEM, family, true, &[(1, table), (2, set)])? else {
        return Ok(None);
    };
    let mut out = Vec::new();
    for m in &msgs {
        // NFTA_SET_ELEM_LIST_ELEMENTS 3 -> NFTA_LIST_ELEM 1 -> element attributes
        let Some(list) = attr(m, 3) else { continue };
        for e in attrs(list).filter(|a| a.kind == 1) {
            let mut key = Vec::new();
            let mut key_end = None;
            let mut data = Vec::new();
            let mut counter = None;
            for a in attrs(e.data) {
                match a.kind {
                    1 => key = data_value(a.data),
                    2 => data = data_value(a.data),
                    // NFTA_SET_ELEM_KEY_END 10, _EXPR 7, _EXPRESSIONS 11
                    10 => key_end = Some(data_value(a.data)),
                    7 => counter = counter.or(counter_of(a.data)),
                    11 => {
                        for x in attrs(a.data).filter(|x| x.kind == 1) {
                            counter = counter.or(counter_of(x.data));
                        }
                    }
                    _ => {}
                }
            }
            let end = key_end.unwrap_or_else(|| key.clone());
            key.extend_from_slice(&end);
            out.push(RawElem { key, data, counter });
        }
    }
    Ok(Some(out))
}

const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NLM_F_CREATE: u16 = 0x400;
const NLA_F_NESTED: u16 = 0x8000;

/// One element to add or delete, as bytes: key, key end (interval sets only), data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElemBytes {
    pub key: Vec<u8>,
    pub key_end: Option<Vec<u8>>,
    pub data: Option<ElemData>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ElemData {
    Value(Vec<u8>),
    Verdict(i32, String),
}

fn nest(buf: &mut Vec<u8>, kind: u16, f: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend_from_slice(&[0, 0]);
    buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    f(buf);
    let len = (buf.len() - start) as u16;
    buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
}

fn put_msg(out: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, body: &[u8]) {
    out.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(body);
}

/// An nf_tables transaction of element changes: sent as one netlink batch, which the
/// kernel commits whole or not at all (like one `nft -f`), without running `nft`.
#[derive(Debug, Default)]
pub struct Batch {
    msgs: Vec<(u16, Vec<u8>)>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.msgs.is_empty()
    }

    fn elements(&mut self, msg: u16, table: &str, set: &str, elems: &[ElemBytes]) {
        if elems.is_empty() {
            return;
        }
        let mut body = vec![NFPROTO_INET, 0, 0, 0];
        put_str(&mut body, 1, table);
        put_str(&mut body, 2, set);
        nest(&mut body, 3, |b| {
            for e in elems {
                nest(b, 1, |b| {
                    nest(b, 1, |b| put_attr(b, 1, &e.key));
                    if let Some(end) = &e.key_end {
                        nest(b, 10, |b| put_attr(b, 1, end));
                    }
                    match &e.data {
                        None => {}
                        Some(ElemData::Value(v)) => nest(b, 2, |b| put_attr(b, 1, v)),
                        Some(ElemData::Verdict(code, chain)) => nest(b, 2, |b| {
                            nest(b, 2, |b| {
                                put_attr(b, 1, &code.to_be_bytes());
                                put_str(b, 2, chain);
                            })
                        }),
                    }
                });
            }
        });
        self.msgs.push((msg, body));
    }

    /// Adds elements to a set of an `inet` table.
    pub fn add(&mut self, table: &str, set: &str, elems: &[ElemBytes]) {
        self.elements(NFT_MSG_NEWSETELEM, table, set, elems);
    }

    /// Deletes elements from a set of an `inet` table.
    pub fn delete(&mut self, table: &str, set: &str, elems: &[ElemBytes]) {
        self.elements(NFT_MSG_DELSETELEM, table, set, elems);
    }

    /// Commits the batch; an error means the kernel changed nothing.
    pub fn commit(&self) -> io::Result<()> {
        if self.msgs.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        let subsys = NFNL_SUBSYS_NFTABLES.to_be_bytes();
        let batch_hdr = [0u8, 0, subsys[0], subsys[1]];
        put_msg(&mut buf, NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 1, &batch_hdr);
        for (i, (msg, body)) in self.msgs.iter().enumerate() {
            let flags = NLM_F_REQUEST
                | NLM_F_ACK
                | if *msg == NFT_MSG_NEWSETELEM {
                    NLM_F_CREATE
                } else {
                    0
                };
            put_msg(
                &mut buf,
                (NFNL_SUBSYS_NFTABLES << 8) | msg,
                flags,
                2 + i as u32,
                body,
            );
        }
        let last = 2 + self.msgs.len() as u32;
        put_msg(
            &mut buf,
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            last,
            &batch_hdr,
        );
        let deletes = self.msgs.iter().any(|(m, _)| *m == NFT_MSG_DELSETELEM);
        with_socket(|socket| {
            socket.send(&buf, 0)?;
            // one acknowledgement per message; the first error aborts the whole transaction
            let mut acked = 0;
            while acked < self.msgs.len() {
                let (data, _) = socket.recv_from_full()?;
                if data.is_empty() {
                    break;
                }
                for m in messages(&data) {
                    let (kind, payload) = m?;
                    if kind == NLMSG_ERROR {
                        let code = error_code(payload);
                        if code != 0 {
                            return Err(io::Error::from_raw_os_error(-code));
                        }
                        acked += 1;
                    }
                }
            }
            Ok(())
        })?;
        if deletes {
            DELETED.store(true, Ordering::Relaxed);
        }
        Ok(())
    }
}
