//! libvirt's events: domain lifecycle and metadata changes, network lifecycle.
//!
//! A local libvirt (`qemu:///system`, the default) is followed by virtgate's own client
//! of libvirt's RPC protocol over its read-only unix socket ([`native`], wire format in
//! [`rpc`]): no libvirt library in the daemon, which keeps its memory small. Any other
//! URI (the test driver, remote hosts, TLS, SSH, SASL) goes through libvirt's own client
//! library, loaded at run time ([`library`]). Either way the connection is read-only, with
//! keepalive, and opened again with backoff when it closes; every event, and every
//! (re)connect (a full re-read: what happened while disconnected is not replayed), writes
//! one byte to a socket the daemon's `poll` watches ([`Events::fd`]); the daemon then
//! reconciles, debounced.

mod library;
mod native;
mod rpc;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// What the followers share with the daemon.
pub struct Shared {
    wake: UnixStream,
    /// The library's close callback was called.
    closed: AtomicBool,
    events: AtomicU64,
    connects: AtomicU64,
}

impl Shared {
    fn wake(&self) {
        // nonblocking: a full socket already holds a wake-up
        let _ = (&self.wake).write(&[1]);
    }
}

/// Which client follows a URI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// virtgate's own, over libvirt's unix socket.
    Own,
    /// libvirt's client library.
    Library,
}

/// The events of one libvirt URI, followed in a thread of their own.
pub struct Events {
    read: UnixStream,
    shared: Arc<Shared>,
    client: Client,
}

impl Events {
    /// Starts following `uri` (read-only); Err if it needs libvirt's client library and
    /// that is not there. A libvirtd that cannot be reached is retried in the thread.
    pub fn start(uri: &str) -> Result<Events, String> {
        let (read, wake) = UnixStream::pair().map_err(|e| e.to_string())?;
        read.set_nonblocking(true).map_err(|e| e.to_string())?;
        wake.set_nonblocking(true).map_err(|e| e.to_string())?;
        let shared = Arc::new(Shared {
            wake,
            closed: AtomicBool::new(false),
            events: AtomicU64::new(0),
            connects: AtomicU64::new(0),
        });
        let client = match native::target(uri) {
            Some(t) => {
                native::start(t, shared.clone())?;
                Client::Own
            }
            None => {
                library::start(uri, shared.clone())?;
                Client::Library
            }
        };
        Ok(Events {
            read,
            shared,
            client,
        })
    }

    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.read)
    }

    /// Takes in what woke the daemon.
    pub fn drain(&self) {
        let mut buf = [0u8; 256];
        while matches!((&self.read).read(&mut buf), Ok(n) if n > 0) {}
    }

    /// Events received so far, and how many times the connection was opened.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.shared.events.load(Ordering::Relaxed),
            self.shared.connects.load(Ordering::Relaxed),
        )
    }

    pub fn client(&self) -> Client {
        self.client
    }
}
