//! Following the ruleset: the kernel multicasts every committed nf_tables transaction to
//! group NFNLGRP_NFTABLES (one message per object changed, then NEWGEN), iptables-nft's
//! included. No polling and no `nft monitor` process. The netlink multicast helpers here
//! serve the daemon's other subscriptions (the neighbour table) too.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use netlink_sys::{Socket, protocols::NETLINK_NETFILTER};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// nf_tables' multicast group.
const NFNLGRP_NFTABLES: u32 = 7;

/// A non-blocking netlink socket of `protocol` that receives multicast `group`.
pub fn subscribe(protocol: isize, group: u32) -> io::Result<Socket> {
    let mut s = Socket::new(protocol)?;
    s.bind_auto()?;
    s.add_membership(group)?;
    s.set_non_blocking(true)?;
    Ok(s)
}

/// Reads a non-blocking multicast socket empty; whether `news` said so of a message, or
/// messages were lost (ENOBUFS: the kernel dropped some; the change is what matters).
pub fn drain(s: &Socket, what: &str, mut news: impl FnMut(&[u8]) -> bool) -> bool {
    let mut any = false;
    loop {
        match s.recv_from_full() {
            Ok((data, _)) if data.is_empty() => return any,
            Ok((data, _)) => any |= news(&data),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return any,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => any = true,
            Err(e) => {
                tracing::warn!("{what} notifications: {e}");
                return true;
            }
        }
    }
}

/// Every nf_tables commit from now on, in this network namespace.
pub struct Commits(Socket);

impl Commits {
    pub fn subscribe() -> io::Result<Commits> {
        subscribe(NETLINK_NETFILTER, NFNLGRP_NFTABLES).map(Commits)
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the socket lives as long as the borrow of self
        unsafe { BorrowedFd::borrow_raw(self.0.as_raw_fd()) }
    }

    /// Reads what came; whether anything was committed since the last read.
    pub fn drain(&self) -> bool {
        drain(&self.0, "nf_tables", |_| true)
    }

    /// The socket, to close later ([`super::close_at_exit`]).
    pub fn into_socket(self) -> Socket {
        self.0
    }

    /// Reads what came: how many transactions process `pid` committed (each ends with a
    /// NEWGEN naming its process) and the generation the last of them made, or None when
    /// messages were lost or the read failed.
    pub fn count_by(&self, pid: u32) -> Option<(usize, Option<u32>)> {
        const NEWGEN: u16 = (super::NFNL_SUBSYS_NFTABLES << 8) | 15;
        const NFTA_GEN_ID: u16 = 1;
        const NFTA_GEN_PROC_PID: u16 = 2;
        let be32 = |a: &[u8], kind| {
            super::attr(a, kind)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(u32::from_be_bytes)
        };
        let (mut n, mut generation, mut lost) = (0, None, false);
        loop {
            match self.0.recv_from_full() {
                Ok((data, _)) if data.is_empty() => break,
                Ok((data, _)) => {
                    for (kind, payload) in super::messages(&data).flatten() {
                        let attrs = payload.get(4..).unwrap_or_default();
                        if kind == NEWGEN && be32(attrs, NFTA_GEN_PROC_PID) == Some(pid) {
                            n += 1;
                            generation = be32(attrs, NFTA_GEN_ID);
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => lost = true,
            }
            if lost {
                return None;
            }
        }
        Some((n, generation))
    }

    /// Waits up to `timeout` for a commit; whether one came.
    pub fn wait(&self, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        loop {
            if self.drain() {
                return true;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            let mut fds = [PollFd::new(self.as_fd(), PollFlags::POLLIN)];
            let _ = poll(
                &mut fds,
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
            );
        }
    }

    /// Waits until no commit came for `quiet`, at most `cap` in all.
    pub fn settle(&self, quiet: Duration, cap: Duration) {
        let until = Instant::now() + cap;
        while Instant::now() < until && self.wait(quiet) {}
    }
}
