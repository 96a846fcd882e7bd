//! What wakes the daemon, in one `poll`: nf_tables ruleset changes (the kernel multicasts
//! every committed transaction to group NFNLGRP_NFTABLES; no polling, no `nft monitor`
//! process), a guest address appearing in the neighbour table (ARP or NDP, rtnetlink's
//! RTNLGRP_NEIGH), libvirt's and virtgate's files changing (inotify on their
//! directories), and signals (signalfd, so that they arrive in the loop, not in a
//! handler).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::time::Duration;

use netlink_sys::{Socket, protocols::NETLINK_ROUTE};

use crate::firewall::nfnl::{Commits, drain, subscribe};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// What fired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fired {
    /// Some nf_tables transaction was committed (or messages were lost: the same).
    Ruleset,
    /// A file changed in this watched directory.
    Dir(PathBuf),
    /// An address was seen for a MAC it was not seen for before (ARP, NDP).
    Neighbour,
    Signal(Signal),
    /// One of the listening sockets given to [`Watch::wait`] (by its index) has a
    /// connection waiting.
    Listener(usize),
}

/// What one `poll` found ready.
struct Ready {
    signals: bool,
    inotify: bool,
    ruleset: bool,
    neighbours: bool,
    /// Indexes of the listeners given to [`Watch::wait`].
    listeners: Vec<usize>,
}

pub struct Watch {
    ruleset: Option<Commits>,
    neighbours: Option<Socket>,
    /// (MAC, address) pairs announced so far: the entries' state changes (reachable,
    /// stale, ...) every few seconds per guest and are no news.
    seen: std::collections::HashSet<(String, std::net::IpAddr)>,
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
        let ruleset = match Commits::subscribe() {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("cannot follow nf_tables changes ({e}); checking periodically");
                None
            }
        };
        let neighbours = match subscribe(NETLINK_ROUTE, crate::facts::neigh::GROUP_NEIGH) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("cannot follow the neighbour table ({e}); checking periodically");
                None
            }
        };
        let mut w = Watch {
            ruleset,
            neighbours,
            seen: Default::default(),
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
    pub fn wait(
        &mut self,
        timeout: Duration,
        listeners: &[BorrowedFd],
    ) -> Result<Vec<Fired>, String> {
        let Some(Ready {
            signals: sig_ready,
            inotify: ino_ready,
            ruleset: nft_ready,
            neighbours: neigh_ready,
            listeners: listening,
        }) = self.poll(timeout, listeners)?
        else {
            return Ok(Vec::new());
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
            self.drain_inotify(&mut out);
        }
        if nft_ready && self.drain_ruleset() {
            out.push(Fired::Ruleset);
        }
        if neigh_ready && self.drain_neighbours() {
            out.push(Fired::Neighbour);
        }
        out.extend(listening.into_iter().map(Fired::Listener));
        Ok(out)
    }

    /// One `poll` of everything (None: interrupted by a signal, which the next one reads).
    fn poll(&self, timeout: Duration, listeners: &[BorrowedFd]) -> Result<Option<Ready>, String> {
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: the sockets outlive this borrow (they are not closed while polling)
        let fd = |s: &Option<Socket>| {
            s.as_ref()
                .map(|s| unsafe { BorrowedFd::borrow_raw(s.as_raw_fd()) })
        };
        let mut fds = vec![
            PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.inotify.as_fd(), PollFlags::POLLIN),
        ];
        // where each socket's entry is, if it has one
        let mut at = [None, None];
        let sockets = [
            self.ruleset.as_ref().map(Commits::as_fd),
            fd(&self.neighbours),
        ];
        for (i, s) in sockets.into_iter().enumerate() {
            if let Some(f) = s {
                at[i] = Some(fds.len());
                fds.push(PollFd::new(f, PollFlags::POLLIN));
            }
        }
        let first_listener = fds.len();
        for l in listeners {
            fds.push(PollFd::new(*l, PollFlags::POLLIN));
        }
        match poll(
            &mut fds,
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return Ok(None),
            Err(e) => return Err(format!("poll: {e}")),
        }
        let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
        Ok(Some(Ready {
            signals: ready(&fds[0]),
            inotify: ready(&fds[1]),
            ruleset: at[0].is_some_and(|i| ready(&fds[i])),
            neighbours: at[1].is_some_and(|i| ready(&fds[i])),
            listeners: (0..listeners.len())
                .filter(|i| ready(&fds[first_listener + i]))
                .collect(),
        }))
    }

    /// The watched directories that changed (and those that went away, watched again
    /// later).
    fn drain_inotify(&mut self, out: &mut Vec<Fired>) {
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

    /// Reads every pending neighbour notification; whether one announced a new pair (or
    /// some were lost).
    fn drain_neighbours(&mut self) -> bool {
        let Some(s) = &self.neighbours else {
            return false;
        };
        let seen = &mut self.seen;
        drain(s, "neighbour", |data| {
            let mut news = false;
            for n in crate::facts::neigh::announced(data) {
                // bounded: a flood of made-up addresses cannot grow it forever
                if seen.len() > 65_536 {
                    seen.clear();
                }
                news |= seen.insert((n.mac, n.ip));
            }
            news
        })
    }

    /// Reads every pending ruleset message; whether any came (or some were lost).
    fn drain_ruleset(&mut self) -> bool {
        self.ruleset.as_ref().is_some_and(Commits::drain)
    }
}
