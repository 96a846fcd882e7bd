//! libvirt's XML files, parsed once and kept between runs (in the state directory) by each
//! file's identity: device, inode, size, modification and change times, as `stat` gives
//! them. A whole reconcile reads every running domain's status file: 1,000 of them cost
//! ~50 M instructions and ~8,000 system calls to parse where one `stat` each says they
//! are the files parsed last time (real status files are 10-40 KiB each, not the bench's
//! 0.5 KiB); a hook reads its network's file, with one `<host>` per reservation.
//!
//! Why the identity is enough: libvirt writes these files whole, to a new file renamed
//! over the old one (a new inode); whoever writes one in place changes its change time,
//! which nobody can set back. The one case it misses is a file written twice within one
//! tick of the kernel's clock with the same size: a file changed less than
//! [`RACY`] before it is read is therefore never kept (git's "racily clean" entries).
//! The identity is taken before the file is read, so what is kept under it is never
//! older than the file it names. A cache that cannot be read (absent, another release's,
//! torn by a crash: its SHA-256 is checked) is no cache; one that cannot be written is
//! left as it was. Nothing here is ever more than a shortcut: a miss parses the file.

use std::collections::HashMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

/// The largest cache file read (10,000 domains take ~2 MiB).
const MAX_CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// A file changed this recently is parsed and not kept.
pub const RACY: Duration = Duration::from_secs(2);

/// What `stat` says of a file, as far as it changes when the file does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(st: &nix::sys::stat::FileStat) -> Stamp {
        Stamp {
            dev: st.st_dev,
            ino: st.st_ino,
            size: u64::try_from(st.st_size).unwrap_or(0),
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
        }
    }

    /// Changed within `racy` of `now` (or in the future).
    fn racy(&self, now: SystemTime, racy: Duration) -> bool {
        let changed = UNIX_EPOCH
            + Duration::new(
                u64::try_from(self.ctime.0).unwrap_or(0),
                u32::try_from(self.ctime.1).unwrap_or(0),
            );
        now.duration_since(changed).map_or(true, |age| age < racy)
    }
}

/// The cache file's format: a release that changes a kept type never reads another's.
fn format_tag(kind: &str) -> String {
    format!("virtgate {} {kind} 1", env!("CARGO_PKG_VERSION"))
}

#[derive(Serialize, serde::Deserialize)]
struct Stored<T> {
    tag: String,
    entries: Vec<(Vec<u8>, Stamp, T)>,
}

/// Parsed files by path, read from and written back to one cache file.
pub struct XmlCache<T> {
    file: Option<PathBuf>,
    kind: &'static str,
    old: HashMap<Vec<u8>, (Stamp, T)>,
    new: Vec<(Vec<u8>, Stamp, T)>,
    /// Something parsed, or something kept before no longer seen.
    changed: bool,
    now: SystemTime,
    racy: Duration,
}

impl<T: Serialize + DeserializeOwned + Clone> XmlCache<T> {
    /// The cache kept in `file` (none: every file is parsed, nothing written).
    pub fn open(file: Option<&Path>, kind: &'static str) -> XmlCache<T> {
        let old = file.and_then(|f| read(f, kind)).unwrap_or_default();
        XmlCache {
            file: file.map(Path::to_path_buf),
            kind,
            old: old
                .into_iter()
                .map(|(path, stamp, v)| (path, (stamp, v)))
                .collect(),
            new: Vec::new(),
            changed: false,
            now: SystemTime::now(),
            racy: RACY,
        }
    }

    /// Sets how recent a change must be for a file not to be kept (tests).
    pub fn with_racy(mut self, racy: Duration) -> Self {
        self.racy = racy;
        self
    }

    /// What `parse` makes of `path`'s text, from the cache while the file is the one
    /// parsed then (tests; [`Self::get_dir`] is the readers'). `None` where the file cannot
    /// be read or `parse` refuses it.
    #[cfg(test)]
    pub fn get(&mut self, path: &Path, parse: impl FnOnce(&str) -> Option<T>) -> Option<T> {
        let stamp = nix::sys::stat::stat(path).ok().map(|st| Stamp::of(&st));
        self.get_stamped(path, stamp, parse)
    }

    /// What `parse` makes of every `*.xml` file in `dir`, in the order of their names (as
    /// bytes), each from the cache while the file is the one parsed then: its identity
    /// taken by name in the directory (`fstatat`), not by a walk of its whole path.
    pub fn get_dir(
        &mut self,
        dir: &Path,
        mut parse: impl FnMut(&Path, &str) -> Option<T>,
    ) -> Vec<(PathBuf, T)> {
        let Ok(handle) = fs::File::open(dir) else {
            return Vec::new();
        };
        let mut names: Vec<std::ffi::OsString> = match fs::read_dir(dir) {
            Ok(rd) => rd
                .flatten()
                .map(|e| e.file_name())
                .filter(|n| n.as_bytes().ends_with(b".xml"))
                .collect(),
            Err(_) => return Vec::new(),
        };
        names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        names
            .into_iter()
            .filter_map(|name| {
                let stamp = nix::sys::stat::fstatat(
                    &handle,
                    name.as_os_str(),
                    nix::fcntl::AtFlags::empty(),
                )
                .ok()
                .map(|st| Stamp::of(&st));
                let path = dir.join(&name);
                let v = self.get_stamped(&path, stamp, |t| parse(&path, t))?;
                Some((path, v))
            })
            .collect()
    }

    fn get_stamped(
        &mut self,
        path: &Path,
        stamp: Option<Stamp>,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Option<T> {
        let key = path.as_os_str().as_bytes().to_vec();
        if let Some(stamp) = stamp
            && let Some((kept, v)) = self.old.remove(&key)
        {
            if kept == stamp {
                self.new.push((key, stamp, v.clone()));
                return Some(v);
            }
            self.changed = true;
        }
        let v = parse(&super::libvirt::read_xml(path)?)?;
        if let Some(stamp) = stamp
            && !stamp.racy(self.now, self.racy)
        {
            self.new.push((key, stamp, v.clone()));
            self.changed = true;
        }
        Some(v)
    }

    /// Writes what was read back, where it differs from what the cache held (files
    /// parsed, files gone). Best effort: the cache is a shortcut, never the truth.
    pub fn store(self) {
        let Some(file) = &self.file else { return };
        if !self.changed && self.old.is_empty() {
            return;
        }
        let stored = Stored {
            tag: format_tag(self.kind),
            entries: self.new,
        };
        let Ok(payload) = postcard::to_allocvec(&stored) else {
            return;
        };
        let mut bytes = Sha256::digest(&payload).to_vec();
        bytes.extend_from_slice(&payload);
        // no fsync: a cache torn by a crash fails its checksum and is parsed again
        let this_boot = crate::files::Durability::ThisBoot;
        if let Err(e) = crate::files::write_replacing(file, &bytes, 0o600, this_boot) {
            tracing::debug!("{}: not written: {e}", file.display());
        }
    }
}

fn read<T: DeserializeOwned>(file: &Path, kind: &str) -> Option<Vec<(Vec<u8>, Stamp, T)>> {
    let bytes = crate::files::read_bounded(file, MAX_CACHE_BYTES, crate::files::Follow::No).ok()?;
    let (sum, payload) = bytes.split_at_checked(32)?;
    if Sha256::digest(payload).as_slice() != sum {
        tracing::debug!("{}: checksum mismatch, not used", file.display());
        return None;
    }
    let stored: Stored<T> = postcard::from_bytes(payload).ok()?;
    (stored.tag == format_tag(kind)).then_some(stored.entries)
}

/// The cache files in a state directory: one for the domains' status files, one for
/// the networks' files.
pub fn domains_file(state_dir: &Path) -> PathBuf {
    state_dir.join("cache-domains")
}

pub fn networks_file(state_dir: &Path) -> PathBuf {
    state_dir.join("cache-networks")
}

/// Removes the cache files of a state directory (uninstall).
pub fn remove(state_dir: &Path) {
    for f in [domains_file(state_dir), networks_file(state_dir)] {
        let _ = fs::remove_file(f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_count(calls: &std::cell::Cell<u32>) -> impl FnOnce(&str) -> Option<String> + '_ {
        move |t: &str| {
            calls.set(calls.get() + 1);
            Some(t.to_uppercase())
        }
    }

    #[test]
    fn a_file_unchanged_is_not_parsed_again_and_a_changed_one_is() {
        let dir = tempfile::tempdir().unwrap();
        let (cache, xml) = (dir.path().join("cache"), dir.path().join("a.xml"));
        fs::write(&xml, "one").unwrap();
        let calls = std::cell::Cell::new(0);
        let run = |calls: &std::cell::Cell<u32>| {
            let mut c = XmlCache::<String>::open(Some(&cache), "test").with_racy(Duration::ZERO);
            let v = c.get(&xml, parse_count(calls));
            c.store();
            v
        };
        assert_eq!(run(&calls).as_deref(), Some("ONE"));
        assert_eq!(run(&calls).as_deref(), Some("ONE"));
        assert_eq!(calls.get(), 1, "the second run parsed again");
        // rewritten in place, same size, a clock tick later: parsed again
        std::thread::sleep(Duration::from_millis(30));
        fs::write(&xml, "two").unwrap();
        assert_eq!(run(&calls).as_deref(), Some("TWO"));
        assert_eq!(calls.get(), 2);
        // gone: nothing, and the cache forgets it
        fs::remove_file(&xml).unwrap();
        assert_eq!(run(&calls), None);
        assert!(read::<String>(&cache, "test").unwrap().is_empty());
    }

    #[test]
    fn a_file_changed_just_now_is_never_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (cache, xml) = (dir.path().join("cache"), dir.path().join("a.xml"));
        fs::write(&xml, "one").unwrap();
        let calls = std::cell::Cell::new(0);
        for _ in 0..2 {
            let mut c = XmlCache::<String>::open(Some(&cache), "test");
            assert_eq!(c.get(&xml, parse_count(&calls)).as_deref(), Some("ONE"));
            c.store();
        }
        assert_eq!(calls.get(), 2, "a racy file was taken from the cache");
    }

    #[test]
    fn a_torn_or_foreign_cache_is_no_cache() {
        let dir = tempfile::tempdir().unwrap();
        let (cache, xml) = (dir.path().join("cache"), dir.path().join("a.xml"));
        fs::write(&xml, "one").unwrap();
        let mut c = XmlCache::<String>::open(Some(&cache), "test").with_racy(Duration::ZERO);
        c.get(&xml, |t| Some(t.to_string()));
        c.store();
        assert!(read::<String>(&cache, "test").is_some());
        assert!(
            read::<String>(&cache, "other").is_none(),
            "another kind read"
        );
        let mut bytes = fs::read(&cache).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&cache, &bytes).unwrap();
        assert!(
            read::<String>(&cache, "test").is_none(),
            "a torn cache read"
        );
        fs::write(&cache, &bytes[..10]).unwrap();
        assert!(read::<String>(&cache, "test").is_none());
    }
}
