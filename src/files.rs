//! The trust boundary on the file system. virtgate runs as root from libvirt, so every
//! file it reads is opened without blocking, must be a regular file and is read with a
//! hard byte limit (a status file that is a symlink to `/dev/zero` or a FIFO costs
//! nothing); files in directories that are virtgate's own (the state dir) are never
//! followed through a symlink, for reading or writing; what virtgate writes appears
//! atomically with its final mode; and the files that steer it (config, hook settings)
//! and the state dir must be root's (or the invoking user's) and not writable by others.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Whether a symlink in the last component is followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Follow {
    /// Files others manage and may link (libvirt's, a config kept elsewhere).
    Yes,
    /// Files in virtgate's own directories.
    No,
}

fn open_flags(follow: Follow) -> i32 {
    let mut f = libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY;
    if follow == Follow::No {
        f |= libc::O_NOFOLLOW;
    }
    f
}

/// Reads a regular file of at most `limit` bytes.
pub fn read_bounded(path: &Path, limit: u64, follow: Follow) -> io::Result<Vec<u8>> {
    let (f, _) = open_regular(path, follow)?;
    read_open(f, limit)
}

/// Opens a regular file (never blocking), with the metadata of what was opened: checks
/// made on it hold for what is then read (a path checked, then opened, may have been
/// replaced in between).
pub fn open_regular(path: &Path, follow: Follow) -> io::Result<(File, fs::Metadata)> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(open_flags(follow))
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok((f, meta))
}

/// Reads an opened file, at most `limit` bytes (more is an error).
pub fn read_open(f: File, limit: u64) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    f.take(limit + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {limit} bytes"),
        ));
    }
    Ok(buf)
}

/// [`read_bounded`] as UTF-8 text.
pub fn read_text(path: &Path, limit: u64, follow: Follow) -> io::Result<String> {
    String::from_utf8(read_bounded(path, limit, follow)?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8"))
}

/// Why a file or directory that steers virtgate is not trusted, if it is not: it must
/// be owned by root or the effective user and not writable by group or others.
pub fn untrusted(meta: &fs::Metadata) -> Option<String> {
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != euid {
        return Some(format!("owned by uid {}", meta.uid()));
    }
    if meta.mode() & 0o022 != 0 {
        return Some(format!(
            "writable by group or others (mode {:o})",
            meta.mode() & 0o7777
        ));
    }
    None
}

/// Why `dir` (virtgate's own directory) and the directories above it cannot be trusted,
/// if they cannot: each one trusted as by [`untrusted`], where a directory above may be
/// world-writable only with the sticky bit (as /tmp), since then nobody else can rename
/// what is in it.
pub fn untrusted_dir(dir: &Path) -> Option<String> {
    let meta = match fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) => return Some(format!("{}: {e}", dir.display())),
    };
    if !meta.is_dir() {
        return Some(format!("{} is not a directory", dir.display()));
    }
    if let Some(why) = untrusted(&meta) {
        return Some(format!("{}: {why}", dir.display()));
    }
    let abs = dir.canonicalize().ok()?;
    let euid = nix::unistd::geteuid().as_raw();
    for p in abs.ancestors().skip(1) {
        let Ok(m) = fs::metadata(p) else { continue };
        let sticky = m.mode() & 0o1000 != 0;
        let owner_ok = m.uid() == 0 || m.uid() == euid;
        if let Some(why) = untrusted(&m)
            && !(owner_ok && sticky)
        {
            return Some(format!("{}: {why}", p.display()));
        }
    }
    None
}

/// Creates `dir` (and missing parents, 0755) with `mode`, whatever the umask.
pub fn create_dir(dir: &Path, mode: u32) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent()
        && !parent.as_os_str().is_empty()
    {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)?;
    }
    match fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => fs::set_permissions(dir, fs::Permissions::from_mode(mode)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// What a file written whole must survive. A crash of the process leaves the old file
/// or the new one whole either way (the new one appears by a rename).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// A crash of the system too: the file and its directory are synced (config files,
    /// installed hooks and units).
    Synced,
    /// Nothing past this boot: what describes the kernel of this boot (the state, caches),
    /// which the next boot does not trust whatever it holds. Not synced: a sync costs a
    /// hook ~2 ms (1 MiB at 10,000 forwards), and a file torn by a crash of the system
    /// is older than the boot that reads it ([`written_before_boot`]).
    ThisBoot,
}

/// Writes a file atomically with its final mode: a new temporary file beside it (never
/// through a symlink, never an existing file), fsync, rename, fsync of the directory.
/// Missing parent directories are created 0755.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    write_replacing(path, data, mode, Durability::Synced)
}

/// Whether `path` was last written before this boot began (the kernel's boot time, as
/// `/proc/stat` says; `false` where either cannot be read).
pub fn written_before_boot(path: &Path) -> bool {
    let btime = fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<i64>().ok())
    });
    match (btime, fs::symlink_metadata(path)) {
        (Some(boot), Ok(m)) => m.mtime() < boot,
        _ => false,
    }
}

/// [`write_atomic`], synced as `durability` says.
pub fn write_replacing(
    path: &Path,
    data: &[u8],
    mode: u32,
    durability: Durability,
) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    if !dir.as_os_str().is_empty() && !dir.is_dir() {
        create_dir(dir, 0o755)?;
    }
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    // one left by a process that died: removed (a symlink itself, not what it points to)
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        // the umask may have narrowed it
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        if durability == Durability::Synced {
            f.sync_all()?;
        }
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    if durability == Durability::Synced
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Opens (creating, 0600) a file in virtgate's own directory, never through a symlink.
pub fn open_own(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// This boot's identity (the kernel's random boot id), if the kernel says.
pub fn boot_id() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_bounded_and_regular_only() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        fs::write(&p, "12345").unwrap();
        assert_eq!(read_bounded(&p, 5, Follow::No).unwrap(), b"12345");
        assert!(read_bounded(&p, 4, Follow::No).is_err());
        // a symlink to /dev/zero: refused at once, followed or not
        let z = d.path().join("zero");
        std::os::unix::fs::symlink("/dev/zero", &z).unwrap();
        assert!(read_bounded(&z, 1 << 20, Follow::Yes).is_err());
        assert!(read_bounded(&z, 1 << 20, Follow::No).is_err());
        // a symlink to a regular file: only where following is allowed
        let l = d.path().join("link");
        std::os::unix::fs::symlink(&p, &l).unwrap();
        assert!(read_bounded(&l, 10, Follow::Yes).is_ok());
        assert!(read_bounded(&l, 10, Follow::No).is_err());
        // a FIFO nobody writes to does not block
        let fifo = d.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(read_bounded(&fifo, 10, Follow::Yes).is_err());
    }

    #[test]
    fn writes_never_follow_a_planted_symlink() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        fs::write(&victim, "keep").unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o644)).unwrap();
        let p = d.path().join("state.json");
        let tmp = d
            .path()
            .join(format!(".state.json.tmp{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        write_atomic(&p, b"new", 0o600).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "keep");
        assert_eq!(
            fs::metadata(&victim).unwrap().permissions().mode() & 0o777,
            0o644
        );
        assert_eq!(fs::read_to_string(&p).unwrap(), "new");
        // a symlink where an own file is opened: refused, its target not created
        let lock = d.path().join("lock");
        let target = d.path().join("created");
        std::os::unix::fs::symlink(&target, &lock).unwrap();
        assert!(open_own(&lock).is_err());
        assert!(!target.exists());
    }

    #[test]
    fn directories_get_their_mode() {
        // (under umask 000: tests/trust.rs, in a process of its own)
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a/b/state");
        create_dir(&p, 0o700).unwrap();
        let q = d.path().join("c/file");
        write_atomic(&q, b"x", 0o644).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&p), 0o700);
        assert_eq!(mode(&d.path().join("a")), 0o755);
        assert_eq!(mode(&d.path().join("c")), 0o755);
        assert_eq!(mode(&q), 0o644);
    }

    #[test]
    fn an_open_directory_is_not_trusted() {
        let d = tempfile::tempdir().unwrap();
        let s = d.path().join("state");
        create_dir(&s, 0o700).unwrap();
        assert_eq!(untrusted_dir(&s), None, "under /tmp (sticky): fine");
        fs::set_permissions(&s, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(untrusted_dir(&s).is_some_and(|w| w.contains("writable")));
        fs::set_permissions(&s, fs::Permissions::from_mode(0o700)).unwrap();
        // a parent others can write to (no sticky bit)
        fs::set_permissions(d.path(), fs::Permissions::from_mode(0o777)).unwrap();
        assert!(untrusted_dir(&s).is_some());
    }
}
