//! What wakes the daemon, in one `poll`: nf_tables ruleset changes (the kernel multicasts
//! every committed transaction to group NFNLGRP_NFTABLES; no polling, no `nft monitor`
//! process), libvirt's and virtgate's files changing (inotify on their directories), and
//! signals (signalfd, so that they arrive in the loop, not in a handler).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::time::Duration;

use netlink_sys::{Socket, protocols::NETLINK_NETFILTER};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// nf_tables' multicast group: one message per object changed, then NEWGEN per commit.
const NFNLGRP_NFTABLES: u32 = 7;

/// What fired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fired {
    /// Some nf_tables transaction was committed (or messages were lost: the same).
    Ruleset,
    /// A file changed in this watched directory.
    Dir(PathBuf),
    Signal(Signal),
}

pub struct Watch {
    ruleset: Option<Socket>,
    inotify: Inotify,
    signals: SignalFd,
    watches: Vec<(WatchDescriptor, PathBuf)>,
    /// Directories that did not exist yet (libvirt not started): tried again later.
    missing: Vec<PathBuf>,
}

/// The signals the daemon handles in its loop; blocked for every thread.
pub fn handled_signals() -> SigSet {
    let mut s = SigSet::empty();
    for sig in [Signal::SIGHUP, Signal::SIGTERM, Signal::SIGINT] {
        s.add(sig);
    }
    s
}

impl Watch {
    /// Subscribes to everything. Call before the first reconcile, so that nothing that
    /// happens after it is missed.
    pub fn new(dirs: &[PathBuf]) -> Result<Watch, String> {
        let mask = handled_signals();
        mask.thread_block()
            .map_err(|e| format!("blocking signals: {e}"))?;
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(|e| format!("signalfd: {e}"))?;
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| format!("inotify: {e}"))?;
        let ruleset = match subscribe_ruleset() {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("cannot follow nf_tables changes ({e}); checking periodically");
                None
            }
        };
        let mut w = Watch {
            ruleset,
            inotify,
            signals,
            watches: Vec::new(),
            missing: dirs.to_vec(),
        };
        w.watch_missing();
        Ok(w)
    }

    /// Adds the watches of directories that exist now.
    pub fn watch_missing(&mut self) {
        let flags = AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_ONLYDIR;
        let mut still = Vec::new();
        for d in std::mem::take(&mut self.missing) {
            match self.inotify.add_watch(&d, flags) {
                Ok(wd) => {
                    tracing::debug!("watching {}", d.display());
                    self.watches.push((wd, d));
                }
                Err(_) => still.push(d),
            }
        }
        self.missing = still;
    }

    /// Waits up to `timeout` for something to fire; returns all that did.
    pub fn wait(&mut self, timeout: Duration) -> Result<Vec<Fired>, String> {
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        let (sig_ready, ino_ready, nft_ready) = {
            let nft_fd = self
                .ruleset
                .as_ref()
                // SAFETY: the socket outlives this borrow (it is not closed while polling)
                .map(|s| unsafe { BorrowedFd::borrow_raw(s.as_raw_fd()) });
            let mut fds = vec![
                PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.inotify.as_fd(), PollFlags::POLLIN),
            ];
            if let Some(fd) = nft_fd {
                fds.push(PollFd::new(fd, PollFlags::POLLIN));
            }
            match poll(
                &mut fds,
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
            ) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => return Ok(Vec::new()),
                Err(e) => return Err(format!("poll: {e}")),
            }
            let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            (
                ready(&fds[0]),
                ready(&fds[1]),
                fds.get(2).is_some_and(ready),
            )
        };
        let mut out = Vec::new();
        if sig_ready {
            while let Ok(Some(info)) = self.signals.read_signal() {
                if let Ok(sig) = Signal::try_from(info.ssi_signo as i32) {
                    out.push(Fired::Signal(sig));
                }
            }
        }
        if ino_ready {
            while let Ok(events) = self.inotify.read_events() {
                if events.is_empty() {
                    break;
                }
                for e in events {
                    if let Some((_, d)) = self.watches.iter().find(|(wd, _)| *wd == e.wd) {
                        let f = Fired::Dir(d.clone());
                        if !out.contains(&f) {
                            out.push(f);
                        }
                    }
                    if e.mask.contains(AddWatchFlags::IN_IGNORED) {
                        // the directory went away (libvirt's /run): watch it again later
                        if let Some(i) = self.watches.iter().position(|(wd, _)| *wd == e.wd) {
                            let (_, d) = self.watches.remove(i);
                            self.missing.push(d);
                        }
                    }
                }
            }
        }
        if nft_ready && self.drain_ruleset() {
            out.push(Fired::Ruleset);
        }
        Ok(out)
    }

    /// Reads every pending ruleset message; whether any came (or some were lost).
    fn drain_ruleset(&mut self) -> bool {
        let Some(s) = &self.ruleset else {
            return false;
        };
        let mut any = false;
        loop {
            match s.recv_from_full() {
                Ok((data, _)) if data.is_empty() => return any,
                Ok(_) => any = true,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return any,
                // ENOBUFS: the kernel dropped messages; what matters is that it changed
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => any = true,
                Err(e) => {
                    tracing::warn!("nf_tables notifications: {e}");
                    return true;
                }
            }
        }
    }
}

fn subscribe_ruleset() -> std::io::Result<Socket> {
    let mut s = Socket::new(NETLINK_NETFILTER)?;
    s.bind_auto()?;
    s.add_membership(NFNLGRP_NFTABLES)?;
    s.set_non_blocking(true)?;
    Ok(s)
}
