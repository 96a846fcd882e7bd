//! The daemon's control socket: `status`, `apply` and `check` ask the running daemon
//! instead of working alone. One JSON request line per connection, one JSON answer.
//!
//! Root only: the socket is mode 0600 in a directory only root can enter
//! (`/run/virtgate`, or the state directory given with `--state-dir`), and the daemon
//! also checks the peer's credentials (`SO_PEERCRED`) before it answers. Without a
//! daemon (no socket, or nobody answering within a second) the commands work alone.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Report;
use crate::model::BackendChoice;

/// The socket of a daemon using the default state directory.
pub const DEFAULT_SOCKET: &str = "/run/virtgate/virtgate.sock";

/// The largest request or answer read.
const MAX_MESSAGE: u64 = 1 << 20;

/// Where the daemon of this state directory listens: a daemon and the commands share the
/// state directory (and its lock), so the one names the other.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    if state_dir == Path::new(crate::state::DEFAULT_STATE_DIR) {
        PathBuf::from(DEFAULT_SOCKET)
    } else {
        state_dir.join("daemon.sock")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Command {
    /// The daemon's live report.
    Status,
    /// Reload the config and reconcile now.
    Apply,
    /// Which config the daemon runs.
    Check,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub command: Command,
    /// The client's main config file and backend: a daemon running another config (or
    /// backend) does not apply for it.
    pub config: PathBuf,
    pub backend: BackendChoice,
}

/// What a reconcile asked for over the socket did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub changed: bool,
    pub rules: usize,
    pub active: usize,
    pub backend: String,
    /// Errors in the config the daemon loaded (those domains were left as they were).
    pub config_errors: usize,
    /// Why nothing was applied: the config could not be used, or the kernel refused.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Answer {
    pub report: Report,
    /// The daemon's main config file and backend choice.
    pub config: PathBuf,
    pub backend: BackendChoice,
    /// SHA-256 of the config files the daemon loaded (hexadecimal).
    pub config_fingerprint: String,
    /// For `apply`: what it did; None when the daemon runs another config or backend.
    pub applied: Option<Applied>,
}

/// Asks the daemon of `state_dir`, if one answers: `timeout` bounds the whole exchange
/// (an `apply` waits for the reconcile).
pub fn ask(state_dir: &Path, request: &Request, timeout: Duration) -> Option<Answer> {
    let path = socket_path(state_dir);
    if !std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket()) {
        return None;
    }
    // a socket someone else could have put there answers nothing we believe
    if let Some(why) = path.parent().and_then(crate::files::untrusted_dir) {
        tracing::warn!("not asking the daemon on {}: {why}", path.display());
        return None;
    }
    let mut s = UnixStream::connect(&path).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(1))).ok()?;
    let mut line = serde_json::to_vec(request).ok()?;
    line.push(b'\n');
    s.write_all(&line).ok()?;
    let mut text = Vec::new();
    s.take(MAX_MESSAGE).read_to_end(&mut text).ok()?;
    serde_json::from_slice(&text).ok()
}

/// The daemon's listening socket.
pub struct Listener {
    inner: UnixListener,
    path: PathBuf,
}

impl Listener {
    /// Listens at [`socket_path`]; refuses when another daemon answers there.
    pub fn bind(state_dir: &Path) -> Result<Listener, String> {
        let path = socket_path(state_dir);
        let at = |e: std::io::Error| format!("control socket {}: {e}", path.display());
        if let Some(dir) = path.parent() {
            if !dir.exists() {
                crate::files::create_dir(dir, 0o700).map_err(at)?;
            }
            // where clients find the daemon: nobody else may put a socket there
            if let Some(why) = crate::files::untrusted_dir(dir) {
                return Err(format!("control socket {}: {why}", path.display()));
            }
        }
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_socket() => {
                if UnixStream::connect(&path).is_ok() {
                    return Err(format!(
                        "another daemon answers on {}: not starting a second one",
                        path.display()
                    ));
                }
                // left by a daemon that died
                std::fs::remove_file(&path).map_err(at)?;
            }
            Ok(_) => {
                return Err(format!(
                    "{} exists and is not a socket: not touched",
                    path.display()
                ));
            }
            Err(_) => {}
        }
        let inner = UnixListener::bind(&path).map_err(at)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(at)?;
        inner.set_nonblocking(true).map_err(at)?;
        Ok(Listener { inner, path })
    }

    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.inner)
    }

    /// The connections waiting, each with its request (read within a second); a
    /// connection from anyone but root (or the daemon's own user) is closed unanswered.
    pub fn accept(&self) -> Vec<(UnixStream, Request)> {
        let mut out = Vec::new();
        while let Ok((s, _)) = self.inner.accept() {
            match read_request(&s) {
                Ok(r) => out.push((s, r)),
                Err(e) => tracing::warn!("control socket: {e}"),
            }
        }
        out
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn read_request(s: &UnixStream) -> Result<Request, String> {
    let cred = nix::sys::socket::getsockopt(s, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| format!("peer credentials: {e}"))?;
    let me = nix::unistd::geteuid().as_raw();
    if cred.uid() != 0 && cred.uid() != me {
        return Err(format!("refused a request from uid {}", cred.uid()));
    }
    s.set_nonblocking(false).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(s.take(MAX_MESSAGE))
        .read_line(&mut line)
        .map_err(|e| format!("reading a request: {e}"))?;
    serde_json::from_str(&line).map_err(|e| format!("a request that is none: {e}"))
}

/// Writes the answer and closes the connection.
pub fn answer(mut s: UnixStream, a: &Answer) {
    let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
    if let Ok(text) = serde_json::to_vec(a) {
        let _ = s.write_all(&text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> Request {
        Request {
            command: Command::Status,
            config: PathBuf::from("/etc/virtgate/virtgate.toml"),
            backend: BackendChoice::Auto,
        }
    }

    #[test]
    fn a_socket_in_a_directory_others_can_write_is_neither_served_nor_asked() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = Listener::bind(&open).err().expect("refused");
        assert!(err.contains("writable by group or others"), "{err}");
        // someone else's socket there, answering like a daemon: not believed
        let planted = UnixListener::bind(open.join("daemon.sock")).unwrap();
        let answering = std::thread::spawn(move || {
            if let Ok((mut s, _)) = planted.accept() {
                let _ = s.write_all(b"{}");
            }
        });
        assert!(ask(&open, &request(), Duration::from_millis(200)).is_none());
        drop(UnixStream::connect(open.join("daemon.sock")));
        let _ = answering.join();
        // the same in a directory only we can write is served and asked
        let own = dir.path().join("own");
        std::fs::create_dir(&own).unwrap();
        std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o700)).unwrap();
        let l = Listener::bind(&own).expect("served");
        let mode = std::fs::metadata(own.join("daemon.sock"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(l);
        assert!(
            !own.join("daemon.sock").exists(),
            "removed with the listener"
        );
    }
}
