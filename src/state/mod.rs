//! virtgate's state directory: what was last applied (so removal is exact even after the
//! config changed), the kernel generation at which it was seen (drift detection), the domains hooks
//! reported as started, and the lock that serializes concurrent runs.

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
pub use rows::Installed;
use serde::{Deserialize, Serialize};

use crate::model::domain::DomainFacts;
use crate::rules::Ruleset;

mod rows;

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
    #[error("state directory {path} is not safe to use ({why}): make it root's, mode 0700")]
    Insecure { path: PathBuf, why: String },
    #[error("cannot lock {path}: {msg}")]
    Lock { path: PathBuf, msg: String },
}

/// What virtgate has installed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct State {
    /// Backend the ruleset was applied with.
    pub backend: Option<String>,
    #[serde(default, with = "rows")]
    pub ruleset: Ruleset,
    /// The nf_tables generation at which the kernel was last seen (or made) to hold
    /// `ruleset` ([`crate::firewall::holds`]): while it stays, nothing is read back.
    #[serde(default)]
    pub generation: Option<u32>,
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
    /// What the backend remembers between runs ([`crate::firewall::Backend::memory`]):
    /// the iptables backend, the tables and chains that existed before it first added
    /// any (earlier releases kept it in `iptables-created.json`, read once if this is
    /// empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xt_preexisting: Option<std::collections::BTreeSet<String>>,
    /// The digest of what the last whole reconcile planned from (config, facts, backend:
    /// [`crate::reconcile`]), with the number of forwards it made active. While it and
    /// the kernel's generation stay, a whole reconcile has nothing to plan. Anything that
    /// changes the state otherwise (a hook) clears it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs: Option<PlannedInputs>,
}

/// See [`State::inputs`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedInputs {
    /// SHA-256, hexadecimal.
    pub digest: String,
    pub active: usize,
}

impl State {
    /// Everything but the installed ruleset (small), to tell whether a run changed it.
    pub fn without_ruleset(&self) -> State {
        State {
            backend: self.backend.clone(),
            ruleset: Ruleset::default(),
            generation: self.generation,
            started: self.started.clone(),
            hairpin_saved: self.hairpin_saved.clone(),
            stopped: self.stopped.clone(),
            boot_id: self.boot_id.clone(),
            xt_preexisting: self.xt_preexisting.clone(),
            inputs: self.inputs.clone(),
        }
    }

    /// Whether this state was written during this boot (an unreadable boot id counts as
    /// this boot): before a reboot, none of what hooks reported as running runs now.
    pub fn from_this_boot(&self) -> bool {
        let boot = boot_id();
        boot.is_none() || self.boot_id == boot
    }

    /// After a reboot, forgets what hooks reported as started or stopped, the bridge ports'
    /// saved modes and the generation (the kernel's ruleset is new), and records this boot.
    pub fn forget_previous_boot(&mut self) {
        if self.from_this_boot() {
            return;
        }
        self.started.clear();
        self.stopped.clear();
        self.hairpin_saved.clear();
        self.generation = None;
        self.boot_id = boot_id();
    }
}

/// This boot's identifier.
pub use crate::files::boot_id;

/// Writes a file atomically (see [`crate::files::write_atomic`]), mode 0600.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    crate::files::write_atomic(path, data, 0o600)
}

/// Writes a file of this boot's (the state, the statuses: see
/// [`crate::files::Durability::ThisBoot`]) atomically, mode 0600, not synced.
pub fn write_this_boot(path: &Path, data: &[u8]) -> std::io::Result<()> {
    crate::files::write_replacing(path, data, 0o600, crate::files::Durability::ThisBoot)
}

/// A state file that does not parse: an error, unless it was written before this boot
/// (a crash of the system tore it: it is not synced), when it is the empty state.
fn unparsed<T: Default>(p: &Path, msg: String) -> Result<T, StateError> {
    if crate::files::written_before_boot(p) {
        tracing::warn!(
            "{}: written before this boot and unreadable ({msg}): starting from an empty state",
            p.display()
        );
        return Ok(T::default());
    }
    Err(StateError::Corrupt {
        path: p.to_path_buf(),
        msg,
    })
}

/// [`write_atomic`] with the file's final mode set before it appears.
pub fn write_atomic_mode(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    crate::files::write_atomic(path, data, mode)
}

/// The largest state file read back (10,000 forwards take under 1 MiB).
pub const MAX_STATE_BYTES: u64 = 64 * 1024 * 1024;

/// The state directory, locked for the lifetime of this value.
pub struct StateDir {
    dir: PathBuf,
    _lock: Flock<File>,
}

impl StateDir {
    /// Opens and locks the directory, waiting for other virtgate processes.
    pub fn lock(dir: &Path) -> Result<StateDir, StateError> {
        crate::files::create_dir(dir, 0o700).map_err(|source| StateError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        // what it holds decides what root's hooks remove: nobody else may write there
        if let Some(why) = crate::files::untrusted_dir(dir) {
            return Err(StateError::Insecure {
                path: dir.to_path_buf(),
                why,
            });
        }
        let lp = dir.join("lock");
        let f = crate::files::open_own(&lp).map_err(|source| StateError::Io {
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
        let mut st = read_state(&self.file())?;
        self.adopt_legacy(&mut st);
        Ok(st)
    }

    pub fn save(&self, st: &State) -> Result<(), StateError> {
        let p = self.file();
        let text = serde_json::to_vec(st).map_err(|e| StateError::Corrupt {
            path: p.clone(),
            msg: e.to_string(),
        })?;
        write_this_boot(&p, &text).map_err(|source| StateError::Io { path: p, source })?;
        self.drop_legacy();
        Ok(())
    }

    /// Everything virtgate keeps here but the lock (uninstall: nothing is left to keep).
    pub fn remove_all(&self) {
        let _ = fs::remove_file(self.file());
        self.drop_legacy();
    }

    /// Where earlier releases' iptables backend kept what existed before it.
    fn legacy_file(&self) -> PathBuf {
        self.dir.join("iptables-created.json")
    }

    /// The legacy file's content, into a state that has none yet.
    fn adopt_legacy(&self, st: &mut State) {
        if st.xt_preexisting.is_some() {
            return;
        }
        let p = self.legacy_file();
        if let Ok(text) = crate::files::read_text(&p, 1 << 20, crate::files::Follow::No) {
            st.xt_preexisting = serde_json::from_str(&text).ok();
        }
    }

    /// Once the state is written, it holds what the legacy file said.
    fn drop_legacy(&self) {
        let _ = fs::remove_file(self.legacy_file());
    }
}

/// The fields of `state.json` with the ruleset left as it is, for a partial read.
#[derive(Deserialize)]
struct RawState<'a> {
    backend: Option<String>,
    #[serde(borrow, default)]
    ruleset: Option<&'a serde_json::value::RawValue>,
    #[serde(default)]
    generation: Option<u32>,
    started: BTreeMap<String, DomainFacts>,
    #[serde(default)]
    hairpin_saved: BTreeMap<String, bool>,
    #[serde(default)]
    stopped: std::collections::BTreeSet<String>,
    #[serde(default)]
    boot_id: Option<String>,
    #[serde(default)]
    xt_preexisting: Option<std::collections::BTreeSet<String>>,
    #[serde(default)]
    inputs: Option<PlannedInputs>,
}

impl StateDir {
    /// The state as one domain's hook needs it: `ruleset` holds that domain's rules (and
    /// the whole shared part: accepts, hairpins, hairpin ports); every other domain's
    /// rules stay encoded in the [`Installed`], which has the index of all of them.
    pub fn load_for(&self, domain: &str) -> Result<(State, Installed), StateError> {
        let (mut st, inst) = read_state_for(&self.file(), domain)?;
        self.adopt_legacy(&mut st);
        Ok((st, inst))
    }

    /// Writes a state loaded with [`StateDir::load_for`]: `st.ruleset`'s rules replace
    /// those of the domains decoded; the others are written back as they were read.
    pub fn save_partial(&self, st: &State, inst: &Installed) -> Result<(), StateError> {
        let p = self.file();
        let corrupt = |msg: String| StateError::Corrupt {
            path: p.clone(),
            msg,
        };
        // by hand around the ruleset, which the Installed writes without a scan of the
        // other domains' rows; the same fields as State's
        let json = |v: &dyn erased::Json| v.json().map_err(|e| corrupt(e.to_string()));
        let mut out = String::new();
        out.push_str("{\"backend\":");
        out.push_str(&json(&st.backend)?);
        out.push_str(",\"ruleset\":");
        inst.write(&st.ruleset, &mut out).map_err(corrupt)?;
        for (key, v) in [
            ("generation", &st.generation as &dyn erased::Json),
            ("started", &st.started),
            ("hairpin_saved", &st.hairpin_saved),
            ("stopped", &st.stopped),
            ("boot_id", &st.boot_id),
            ("xt_preexisting", &st.xt_preexisting),
            ("inputs", &st.inputs),
        ] {
            out.push_str(",\"");
            out.push_str(key);
            out.push_str("\":");
            out.push_str(&json(v)?);
        }
        out.push('}');
        write_this_boot(&p, out.as_bytes()).map_err(|source| StateError::Io { path: p, source })?;
        self.drop_legacy();
        Ok(())
    }
}

/// A value serde_json writes, behind a trait object.
mod erased {
    pub trait Json {
        fn json(&self) -> serde_json::Result<String>;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> serde_json::Result<String> {
            serde_json::to_string(self)
        }
    }
}

/// [`StateDir::load_for`] without the lock (a hook's quick look).
pub fn read_state_for(p: &Path, domain: &str) -> Result<(State, Installed), StateError> {
    let b = match crate::files::read_bounded(p, MAX_STATE_BYTES, crate::files::Follow::No) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok((State::default(), Installed::default()));
        }
        Err(source) => {
            return Err(StateError::Io {
                path: p.to_path_buf(),
                source,
            });
        }
    };
    // the bytes move into the parse (10,000 forwards: a copy of ~1 MB less); the rare
    // other format is read again
    match parse_for(b, domain) {
        Ok(v) => Ok(v),
        Err(_) => {
            let b = crate::files::read_bounded(p, MAX_STATE_BYTES, crate::files::Follow::No)
                .map_err(|source| StateError::Io {
                    path: p.to_path_buf(),
                    source,
                })?;
            parse_bytes_for(&b, domain).or_else(|msg| unparsed(p, msg))
        }
    }
}

fn parse_for(b: Vec<u8>, domain: &str) -> Result<(State, Installed), String> {
    let raw: RawState = serde_json::from_slice(&b).map_err(|e| e.to_string())?;
    let range = raw.ruleset.map(|r| {
        let start = r.get().as_ptr() as usize - b.as_ptr() as usize;
        start..start + r.get().len()
    });
    let st = State {
        backend: raw.backend,
        ruleset: Ruleset::default(),
        generation: raw.generation,
        started: raw.started,
        hairpin_saved: raw.hairpin_saved,
        stopped: raw.stopped,
        boot_id: raw.boot_id,
        xt_preexisting: raw.xt_preexisting,
        inputs: raw.inputs,
    };
    let (ruleset, inst) = match range {
        Some(r) => rows::parse_for(b, r, domain)?,
        None => Default::default(),
    };
    Ok((State { ruleset, ..st }, inst))
}

/// A state file's contents, parsed whole (as [`read_state`] does).
pub fn parse_bytes(b: &[u8]) -> Result<State, String> {
    parse(b)
}

/// A state file's contents, parsed for one domain (as [`read_state_for`] does).
pub fn parse_bytes_for(b: &[u8], domain: &str) -> Result<(State, Installed), String> {
    match parse_for(b.to_vec(), domain) {
        Ok(v) => Ok(v),
        Err(_) => {
            let st = parse(b)?;
            let text = serde_json::to_vec(&st).map_err(|e| e.to_string())?;
            parse_for(text, domain)
        }
    }
}

/// Reads the state without locking (for `status`); a missing file is the empty state.
pub fn read_state(p: &Path) -> Result<State, StateError> {
    match crate::files::read_bounded(p, MAX_STATE_BYTES, crate::files::Follow::No) {
        Ok(b) => parse(&b).or_else(|msg| unparsed(p, msg)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
        Err(source) => Err(StateError::Io {
            path: p.to_path_buf(),
            source,
        }),
    }
}

/// Parses a state file; one written by an earlier release (rules as objects) is converted.
fn parse(b: &[u8]) -> Result<State, String> {
    let err = match serde_json::from_slice::<State>(b) {
        Ok(s) => return Ok(s),
        Err(e) => e.to_string(),
    };
    let mut v: serde_json::Value = serde_json::from_slice(b).map_err(|e| e.to_string())?;
    let legacy = v
        .get_mut("ruleset")
        .map(serde_json::Value::take)
        .filter(|r| r.is_object())
        .ok_or_else(|| err.clone())?;
    if let Some(o) = v.as_object_mut() {
        o.remove("ruleset");
    }
    let mut st: State = serde_json::from_value(v).map_err(|_| err.clone())?;
    let legacy: Ruleset = serde_json::from_value(legacy).map_err(|_| err)?;
    // the same checks as for the current format
    let text = serde_json::to_vec(&State {
        ruleset: legacy,
        ..Default::default()
    })
    .map_err(|e| e.to_string())?;
    st.ruleset = serde_json::from_slice::<State>(&text)
        .map_err(|e| e.to_string())?
        .ruleset;
    tracing::info!("state written by an earlier release: converted");
    Ok(st)
}

pub fn state_file(dir: &Path) -> PathBuf {
    dir.join("state.json")
}
