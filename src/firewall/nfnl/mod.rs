//! Reading nf_tables in-process over netlink (NETLINK_NETFILTER), without spawning `nft`.
//!
//! Why not `nft list`: every `nft` listing fills nft's cache with the whole ruleset
//! (PERF-FACTS.md: 200 ms at 10,000 forwards), while the kernel answers a dump filtered by
//! table, chain or set directly. Only the few reads virtgate needs are here: whether a
//! table exists, the rules of one chain (handle and comment), the chains and sets of a
//! table, and the elements of one set (raw key/data bytes and element counters). Element
//! changes are written here too, as one netlink batch ([`Batch`]); chains and rules go
//! through `nft -f`.

mod batch;
mod commits;
mod read;

use std::cell::RefCell;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

pub use batch::{Batch, ElemBytes, ElemData};
pub use commits::{Commits, drain, subscribe};
pub use read::{
    RawElem, RuleInfo, chains, elements, generation, rules, sets, table_exists, verdict_bytes,
};

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

/// Closes every descriptor but those in `keep` (ascending). Async-signal-safe.
unsafe fn close_all_but(keep: &[i32]) {
    let mut first = 0;
    for &k in keep.iter().chain(std::iter::once(&i32::MAX)) {
        let last = k.saturating_sub(1);
        if first <= last {
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
        first = k.saturating_add(1);
    }
}

/// Whether this process is short-lived (a hook or a command, not the daemon): set by
/// [`exits_soon`].
static ONE_SHOT: AtomicBool = AtomicBool::new(false);

/// nf_tables sockets this process keeps open until [`release`] (see [`close_at_exit`]).
static KEPT: std::sync::Mutex<Vec<Socket>> = std::sync::Mutex::new(Vec::new());

/// The generation another process's commits (iptables-nft's) were seen to make, not yet
/// taken (u64::MAX: none).
static SEEN_GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(u64::MAX);

/// Says that this process is short-lived and calls [`release`] before it exits.
pub fn exits_soon() {
    ONE_SHOT.store(true, Ordering::Relaxed);
}

/// Whether this process is short-lived ([`exits_soon`]).
pub fn is_one_shot() -> bool {
    ONE_SHOT.load(Ordering::Relaxed)
}

/// Another process committed deletions that the kernel frees after an RCU grace period,
/// and made generation `generation`: closing any nf_tables socket of this process waits
/// for that freeing, so `socket` is kept open until [`release`] hands it over, and the
/// generation is known without asking the kernel (which would wait the same way).
pub fn close_at_exit(socket: Socket, generation: Option<u32>) {
    DELETED.store(true, Ordering::Relaxed);
    if let Some(g) = generation {
        SEEN_GENERATION.store(u64::from(g), Ordering::Relaxed);
    }
    if let Ok(mut kept) = KEPT.lock() {
        kept.push(socket);
    }
}

/// The generation recorded by [`close_at_exit`], once.
pub fn take_seen_generation() -> Option<u32> {
    u32::try_from(SEEN_GENERATION.swap(u64::MAX, Ordering::Relaxed)).ok()
}

/// Closes this thread's socket and those kept by [`close_at_exit`] without making the
/// caller wait for the kernel.
///
/// Since Linux 6.x ("flush pending destroy work before netlink notifier"), releasing
/// any nf_tables netlink socket waits until the kernel has freed what earlier
/// transactions deleted, an RCU grace period (10-15 ms here, PERF-FACTS.md's delete
/// floor), whoever deleted it (this process, or an `iptables-restore` it ran). The
/// deletion itself is committed and in force long before. A run after which something
/// deleted may still await freeing therefore hands its sockets to a short-lived child,
/// which closes them once this process has exited; the child holds no other descriptor
/// (not libvirt's pipes, not the state lock), so nothing waits for it. Call this last,
/// just before the process exits.
pub fn release() {
    let mut sockets: Vec<Socket> = KEPT
        .lock()
        .map(|mut k| std::mem::take(&mut *k))
        .unwrap_or_default();
    if let Some((socket, _)) = SOCKET.with(|c| c.borrow_mut().take()) {
        sockets.push(socket);
    }
    if sockets.is_empty() || !DELETED.load(Ordering::Relaxed) {
        return;
    }
    let mut pipe = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return;
    }
    // what the child keeps, sorted before the fork (the child allocates nothing)
    let mut keep: Vec<i32> = sockets.iter().map(|s| s.as_raw_fd()).collect();
    keep.push(pipe[0]);
    keep.sort_unstable();
    // SAFETY: the child calls only async-signal-safe functions (close, read, _exit).
    match unsafe { libc::fork() } {
        0 => unsafe {
            close_all_but(&keep);
            // until the parent has exited (its end of the pipe closes with it), then the
            // last close of the sockets, which waits for the kernel here
            let mut b = 0u8;
            while libc::read(pipe[0], (&raw mut b).cast(), 1) > 0 {}
            libc::_exit(0);
        },
        pid if pid > 0 => {
            // not the last references now: closing them here does not wait
            drop(sockets);
            // SAFETY: our own descriptor, read end only; the write end stays open until
            // this process exits
            unsafe { libc::close(pipe[0]) };
        }
        _ => {
            // no child: close them here, and wait
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
