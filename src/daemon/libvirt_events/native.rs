//! The daemon's own client of libvirt's RPC protocol, for a local libvirt
//! (`qemu:///system`, `qemu+unix:///system?socket=...`): a unix socket, read-only, no
//! libvirt library in the process (which would be ~15 MiB of resident pages for three
//! event callbacks). It does what libvirt's remote driver does for `virsh -r event`:
//! the authentication list (libvirtd waives polkit for root), keepalive, the connection
//! opened read-only, then domain lifecycle, domain metadata-change and network lifecycle
//! events registered. Every event message wakes the daemon; what it says does not matter
//! (the daemon reads libvirt's files, level-triggered). libvirtd's keepalive PINGs are
//! answered; when it says nothing for an interval, it is PINGed, and after `count`
//! silent intervals the connection counts as dead and is opened again. Any other URI
//! goes through libvirt's own library ([`super::library`]).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::Shared;
use super::rpc::{self, Header, WireError, Xdr};

const VIR_DOMAIN_EVENT_ID_LIFECYCLE: i32 = 0;
const VIR_DOMAIN_EVENT_ID_METADATA_CHANGE: i32 = 23;
const VIR_NETWORK_EVENT_ID_LIFECYCLE: i32 = 0;
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Where libvirt's daemons put their sockets.
const SOCKET_DIR: &str = "/run/libvirt";

/// A local libvirt this client can follow.
#[derive(Debug, PartialEq, Eq)]
pub struct Target {
    /// The URI as given.
    uri: String,
    /// The URI sent to the daemon (`qemu:///system`).
    name: String,
    /// The driver (`qemu`), whose modular daemon is `virtqemud`.
    driver: String,
    /// The socket the URI names (`?socket=`), if it does.
    socket: Option<PathBuf>,
}

/// `DRIVER:///system` or `DRIVER+unix:///system`, optionally with `?socket=PATH`; None
/// for anything else (another host, another transport, a session, other parameters, the
/// test driver), which libvirt's own library handles.
pub fn target(uri: &str) -> Option<Target> {
    let (scheme, rest) = uri.split_once("://")?;
    let driver = scheme.strip_suffix("+unix").unwrap_or(scheme);
    let plain = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase());
    if !plain(driver) || driver == "test" {
        return None;
    }
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    if path != "/system" {
        return None;
    }
    let socket = match query {
        None => None,
        Some(q) => {
            let p = q.strip_prefix("socket=")?;
            if p.is_empty() || p.contains(['&', '%']) {
                return None;
            }
            Some(PathBuf::from(p))
        }
    };
    Some(Target {
        uri: uri.to_string(),
        name: format!("{driver}:///system"),
        driver: driver.to_string(),
        socket,
    })
}

impl Target {
    /// The socket to connect to now: the URI's, else the driver's own daemon's (modular
    /// libvirt, `virtqemud-sock-ro`) where it exists, else libvirtd's.
    fn socket_in(&self, dir: &Path) -> PathBuf {
        if let Some(s) = &self.socket {
            return s.clone();
        }
        let modular = dir.join(format!("virt{}d-sock-ro", self.driver));
        if modular.exists() {
            return modular;
        }
        dir.join("libvirt-sock-ro")
    }
}

/// Keepalive: how long a silence lasts before a PING, and how many silences in a row
/// mean the connection is dead.
#[derive(Clone, Copy)]
pub struct Keepalive {
    pub interval: Duration,
    pub count: u32,
}

pub const KEEPALIVE: Keepalive = Keepalive {
    interval: Duration::from_secs(5),
    count: 3,
};

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("libvirt closed the connection")]
    Closed,
    #[error("libvirt did not answer for {0:?}")]
    Silent(Duration),
    #[error("libvirt refused {what}: {why}")]
    Refused { what: &'static str, why: String },
    #[error(
        "libvirt asks for authentication virtgate's own client does not speak (types {0:?}; 1 is SASL)"
    )]
    Auth(Vec<i32>),
}

/// One open connection.
pub struct Session {
    stream: UnixStream,
    buf: Vec<u8>,
    serial: u32,
    keepalive: Keepalive,
}

impl Session {
    /// Connects to `socket` and opens `name` read-only with the three event callbacks.
    fn connect(socket: &Path, name: &str, k: Keepalive, s: &Shared) -> Result<Self, SessionError> {
        let stream = UnixStream::connect(socket)?;
        Session::over(stream, name, k, s)
    }

    /// The handshake over a connected stream.
    pub fn over(
        stream: UnixStream,
        name: &str,
        keepalive: Keepalive,
        s: &Shared,
    ) -> Result<Self, SessionError> {
        stream.set_read_timeout(Some(keepalive.interval))?;
        let mut c = Session {
            stream,
            buf: Vec::new(),
            serial: 0,
            keepalive,
        };
        let auth = rpc::auth_types(&c.call(rpc::PROC_AUTH_LIST, &[], "its auth list", s)?)?;
        if !auth.is_empty() && !auth.contains(&rpc::AUTH_NONE) {
            return Err(SessionError::Auth(auth));
        }
        let keep = Xdr::default().i32(rpc::FEATURE_PROGRAM_KEEPALIVE).bytes();
        c.call(rpc::PROC_CONNECT_SUPPORTS_FEATURE, &keep, "keepalive", s)?;
        let open = Xdr::default()
            .some_string(name)
            .u32(rpc::CONNECT_RO)
            .bytes();
        c.call(rpc::PROC_CONNECT_OPEN, &open, "the connection", s)?;
        for (proc, id, what) in [
            (
                rpc::PROC_DOMAIN_EVENT_CALLBACK_REGISTER_ANY,
                VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                "domain lifecycle events",
            ),
            (
                rpc::PROC_DOMAIN_EVENT_CALLBACK_REGISTER_ANY,
                VIR_DOMAIN_EVENT_ID_METADATA_CHANGE,
                "domain metadata events",
            ),
            (
                rpc::PROC_NETWORK_EVENT_REGISTER_ANY,
                VIR_NETWORK_EVENT_ID_LIFECYCLE,
                "network lifecycle events",
            ),
        ] {
            c.call(proc, &Xdr::default().i32(id).none().bytes(), what, s)?;
        }
        Ok(c)
    }

    fn send(&mut self, message: &[u8]) -> Result<(), SessionError> {
        Ok(self.stream.write_all(message)?)
    }

    /// The next message, or None after an interval of silence.
    fn next(&mut self) -> Result<Option<(Header, Vec<u8>)>, SessionError> {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(m) = rpc::take_message(&mut self.buf)? {
                return Ok(Some(m));
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(SessionError::Closed),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// A message that is not the reply being waited for: a PING answered, an event
    /// counted (and the daemon woken), anything else ignored.
    fn handle(&mut self, h: Header, s: &Shared) -> Result<(), SessionError> {
        match (h.program, h.kind, h.procedure) {
            (rpc::KEEPALIVE_PROGRAM, rpc::MESSAGE, rpc::PROC_PING) => {
                self.send(&rpc::keepalive(rpc::PROC_PONG))
            }
            (rpc::REMOTE_PROGRAM, rpc::MESSAGE, _) => {
                s.events.fetch_add(1, Ordering::Relaxed);
                s.wake();
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Calls `procedure` and waits for its reply's payload.
    fn call(
        &mut self,
        procedure: i32,
        payload: &[u8],
        what: &'static str,
        s: &Shared,
    ) -> Result<Vec<u8>, SessionError> {
        let serial = self.serial;
        self.serial += 1;
        self.send(&rpc::call(procedure, serial, payload))?;
        let mut silent = 0;
        loop {
            let Some((h, p)) = self.next()? else {
                silent += 1;
                if silent >= self.keepalive.count {
                    return Err(SessionError::Silent(self.keepalive.interval * silent));
                }
                continue;
            };
            if (h.program, h.kind, h.serial) == (rpc::REMOTE_PROGRAM, rpc::REPLY, serial) {
                if h.status != rpc::STATUS_OK {
                    let why = rpc::error_text(&p);
                    return Err(SessionError::Refused { what, why });
                }
                return Ok(p);
            }
            self.handle(h, s)?;
        }
    }

    /// Follows the events until the connection closes or goes silent; why it ended.
    pub fn run(&mut self, s: &Shared) -> SessionError {
        let mut silent = 0;
        loop {
            let step = match self.next() {
                Ok(Some((h, _))) => {
                    silent = 0;
                    self.handle(h, s)
                }
                Ok(None) if silent + 1 >= self.keepalive.count => {
                    return SessionError::Silent(self.keepalive.interval * (silent + 1));
                }
                Ok(None) => {
                    silent += 1;
                    self.send(&rpc::keepalive(rpc::PROC_PING))
                }
                Err(e) => Err(e),
            };
            if let Err(e) = step {
                return e;
            }
        }
    }
}

/// Follows `t` in a thread of its own, for as long as the daemon runs: connect, follow,
/// and again with backoff (1 s doubling to 30 s) after a failure.
pub fn start(t: Target, shared: Arc<Shared>) -> Result<(), String> {
    std::thread::Builder::new()
        .name("libvirt-events".into())
        .spawn(move || follow(&t, &shared))
        .map(drop)
        .map_err(|e| e.to_string())
}

fn follow(t: &Target, s: &Arc<Shared>) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let socket = t.socket_in(Path::new(SOCKET_DIR));
        match Session::connect(&socket, &t.name, KEEPALIVE, s) {
            Err(e @ SessionError::Auth(_)) => {
                // libvirt's library speaks SASL: follow through it from now on
                tracing::info!(
                    "libvirt {}: {e}: following it through libvirt's library",
                    t.name
                );
                if let Err(e) = super::library::start(&t.uri, s.clone()) {
                    tracing::warn!(
                        "libvirt's event API unavailable ({e}): following its files only"
                    );
                }
                return;
            }
            Err(e) => {
                tracing::debug!(
                    "libvirt {} at {}: {e}; again in {} s",
                    t.name,
                    socket.display(),
                    backoff.as_secs()
                );
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            Ok(mut session) => {
                backoff = Duration::from_secs(1);
                s.connects.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    "libvirt {} at {}: following its events",
                    t.name,
                    socket.display()
                );
                // a full re-read after every (re)connect
                s.wake();
                let why = session.run(s);
                tracing::warn!("libvirt {}: {why}; reconnecting", t.name);
                s.wake();
                std::thread::sleep(backoff);
            }
        }
    }
}

#[cfg(test)]
#[path = "native_tests.rs"]
mod tests;
