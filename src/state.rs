//! virtgate's state directory: what was last applied (so removal is exact even after the
//! config changed), the kernel fingerprint after it (drift detection), the domains hooks
//! reported as started, and the lock that serializes concurrent runs.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::facts::DomainFacts;
use crate::plan::Ruleset;

pub const DEFAULT_STATE_DIR: &str = "/var/lib/virtgate";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: corrupt state: {msg}")]
    Corrupt { path: PathBuf, msg: String },
    #[error("cannot lock {path}: {msg}")]
    Lock { path: PathBuf, msg: String },
}

/// What virtgate has installed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct State {
    /// Backend the ruleset was applied with.
    pub backend: Option<String>,
    pub ruleset: Ruleset,
    /// Fingerprint of virtgate's rules in the kernel right after the last apply.
    pub fingerprint: Option<String>,
    /// Domains a hook reported as started (name -> facts from its XML).
    pub started: BTreeMap<String, DomainFacts>,
    /// Bridge ports virtgate put in hairpin mode, with their previous value.
    #[serde(default)]
    pub hairpin_saved: BTreeMap<String, bool>,
    /// Domains a hook reported as stopped whose libvirt status file may still exist
    /// (libvirt deletes it only after `stopped`): they count as not running.
    #[serde(default)]
    pub stopped: std::collections::BTreeSet<String>,
    /// The boot this state belongs to: after a reboot, nothing of `started` runs.
    #[serde(default)]
    pub boot_id: Option<String>,
}

/// This boot's identifier.
pub fn boot_id() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
}

/// Writes a file atomically: temporary file, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    write_atomic_mode(path, data, 0o600)
}

/// [`write_atomic`] with the file's final mode set before it appears.
pub fn write_atomic_mode(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state"),
        std::process::id()
    ));
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // the umask may have narrowed it
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The state directory, locked for the lifetime of this value.
pub struct StateDir {
    dir: PathBuf,
    _lock: Flock<File>,
}

impl StateDir {
    /// Opens and locks the directory, waiting for other virtgate processes.
    pub fn lock(dir: &Path) -> Result<StateDir, StateError> {
        fs::create_dir_all(dir).map_err(|source| StateError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let lp = dir.join("lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lp)
            .map_err(|source| StateError::Io {
                path: lp.clone(),
                source,
            })?;
        let lock = Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| StateError::Lock {
            path: lp,
            msg: e.to_string(),
        })?;
        Ok(StateDir {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn file(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    pub fn load(&self) -> Result<State, StateError> {
        read_state(&self.file())
    }

    pub fn save(&self, st: &State) -> Result<(), StateError> {
        let p = self.file();
        let text = serde_json::to_vec_pretty(st).map_err(|e| StateError::Corrupt {
            path: p.clone(),
            msg: e.to_string(),
        })?;
        write_atomic(&p, &text).map_err(|source| StateError::Io { path: p, source })
    }
}

/// Reads the state without locking (for `status`); a missing file is the empty state.
pub fn read_state(p: &Path) -> Result<State, StateError> {
    match fs::read(p) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| StateError::Corrupt {
            path: p.to_path_buf(),
            msg: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
        Err(source) => Err(StateError::Io {
            path: p.to_path_buf(),
            source,
        }),
    }
}

pub fn state_file(dir: &Path) -> PathBuf {
    dir.join("state.json")
}
