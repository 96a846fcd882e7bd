//! Writing set elements in one netlink batch (one transaction): add and delete.

use std::io;
use std::sync::atomic::Ordering;

use super::{
    DELETED, NFNL_SUBSYS_NFTABLES, NFPROTO_INET, NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR, error_code,
    messages, put_attr, put_str, with_socket,
};

pub(super) const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
pub(super) const NFNL_MSG_BATCH_END: u16 = 0x11;
pub(super) const NFT_MSG_NEWSETELEM: u16 = 12;
pub(super) const NFT_MSG_DELSETELEM: u16 = 14;
pub(super) const NLM_F_CREATE: u16 = 0x400;
pub(super) const NLA_F_NESTED: u16 = 0x8000;

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

pub(super) fn nest(buf: &mut Vec<u8>, kind: u16, f: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend_from_slice(&[0, 0]);
    buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    f(buf);
    let len = (buf.len() - start) as u16;
    buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
}

pub(super) fn put_msg(out: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, body: &[u8]) {
    out.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(body);
}

/// The most bytes of elements in one message's list attribute (whose length field is a
/// `u16`).
const MAX_LIST: usize = 60_000;

/// One element as a `NFTA_LIST_ELEM` attribute.
fn elem_attr(b: &mut Vec<u8>, e: &ElemBytes) {
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

/// A `NEWSETELEM`/`DELSETELEM` body: table and set (`head`), then the element list.
fn elements_body(head: &[u8], list: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(head.len() + 4 + list.len());
    body.extend_from_slice(head);
    nest(&mut body, 3, |b| b.extend_from_slice(list));
    body
}

/// An nf_tables transaction of element changes: sent as one netlink batch, which the
/// kernel commits whole or not at all (like one `nft -f`), without running `nft`.
#[derive(Debug, Default)]
pub struct Batch {
    pub(super) msgs: Vec<(u16, Vec<u8>)>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.msgs.is_empty()
    }

    /// One message per run of elements that fits a netlink attribute (its length is 16
    /// bits): a set of 10,000 elements takes several messages of the one transaction.
    pub(super) fn elements(&mut self, msg: u16, table: &str, set: &str, elems: &[ElemBytes]) {
        let mut head = vec![NFPROTO_INET, 0, 0, 0];
        put_str(&mut head, 1, table);
        put_str(&mut head, 2, set);
        let mut list: Vec<u8> = Vec::new();
        let mut one = Vec::new();
        for e in elems {
            one.clear();
            elem_attr(&mut one, e);
            if !list.is_empty() && list.len() + one.len() > MAX_LIST {
                self.msgs.push((msg, elements_body(&head, &list)));
                list.clear();
            }
            list.extend_from_slice(&one);
        }
        if !list.is_empty() {
            self.msgs.push((msg, elements_body(&head, &list)));
        }
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
            // the kernel takes the batch as one message: the send buffer must hold it
            fit_send_buffer(socket, buf.len())?;
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

/// Grows the socket's send buffer to hold `len` bytes, as `nft` does for a large batch
/// (`SO_SNDBUFFORCE`, which needs `CAP_NET_ADMIN`, as any change of nf_tables does).
fn fit_send_buffer(socket: &netlink_sys::Socket, len: usize) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = socket.as_raw_fd();
    let int = std::mem::size_of::<i32>() as libc::socklen_t;
    let mut have: i32 = 0;
    let mut have_len = int;
    // SAFETY: getsockopt writes at most `have_len` bytes to an int of that size
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&raw mut have).cast(),
            &raw mut have_len,
        )
    };
    // the kernel refuses a message longer than the buffer less its overhead
    let want = len.saturating_add(4096);
    if r == 0 && usize::try_from(have).is_ok_and(|h| h >= want) {
        return Ok(());
    }
    let size = i32::try_from(want).map_err(|_| io::Error::other("batch too large"))?;
    // SAFETY: setsockopt reads an int of the size it is told
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            (&raw const size).cast(),
            int,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
