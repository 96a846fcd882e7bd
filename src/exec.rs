//! Running external programs: always an argument vector (no shell), stdin fed from memory,
//! stdout/stderr captured, and a hard timeout so no caller (a libvirt hook above all) can
//! hang. The child is killed and reaped on timeout, so it never keeps our pipes open.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Default time limit of one external command.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} timed out after {secs} s and was killed")]
    Timeout { program: String, secs: u64 },
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        program: String,
        status: String,
        stderr: String,
    },
}

/// Output of a finished command.
#[derive(Debug)]
pub struct Output {
    pub success: bool,
    pub status: String,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `argv` with `stdin`, returning its output whatever the exit status.
pub fn run_raw(
    argv: &[&str],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<Output, ExecError> {
    spawn(argv, stdin)?.finish(timeout)
}

/// A started command: its stdin is being fed and its output drained on threads of their
/// own, so it never blocks on a full pipe, whether or not anyone waits for it.
pub struct Running {
    program: String,
    pid: u32,
    exited: std::sync::mpsc::Receiver<std::io::Result<std::process::ExitStatus>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    stdout: std::thread::JoinHandle<Vec<u8>>,
    stderr: std::thread::JoinHandle<Vec<u8>>,
    /// Readable once the command has exited (a pidfd; none before Linux 5.3).
    exit_fd: Option<std::os::fd::OwnedFd>,
}

/// Starts `argv` with `stdin`.
pub fn spawn(argv: &[&str], stdin: Option<&[u8]>) -> Result<Running, ExecError> {
    let program = argv.first().copied().unwrap_or_default().to_string();
    let mut child = Command::new(&program)
        .args(&argv[1..])
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ExecError::Spawn {
            program: program.clone(),
            source,
        })?;
    // feed stdin and drain stdout/stderr on threads so no pipe can fill up and block
    let input = stdin.map(|s| s.to_vec());
    let mut cin = child.stdin.take();
    let writer = std::thread::spawn(move || {
        if let (Some(w), Some(data)) = (cin.as_mut(), input) {
            let _ = w.write_all(&data);
        }
        drop(cin);
    });
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            if let Some(mut r) = pipe {
                let _ = r.read_to_end(&mut s);
            }
            s
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let pid = child.id();
    // opened before anyone can reap the child, so it cannot name another process
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: a descriptor pidfd_open just returned, owned by nobody else
    let exit_fd = (fd >= 0).then(|| unsafe {
        <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32)
    });
    // wait in a thread of its own (no polling delay), which also reaps the child should
    // nobody wait for it
    let (tx, exited) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    Ok(Running {
        program,
        pid,
        exited,
        threads: vec![writer, waiter],
        stdout,
        stderr,
        exit_fd,
    })
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// A descriptor that polls readable once the command has exited, where the kernel
    /// offers one.
    pub fn exit_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.exit_fd.as_ref().map(|f| f.as_fd())
    }

    /// Waits for the command to exit (killed at `timeout`) and returns its output.
    pub fn finish(self, timeout: Duration) -> Result<Output, ExecError> {
        let Running {
            program,
            pid,
            exited,
            threads,
            stdout,
            stderr,
            ..
        } = self;
        let status = match exited.recv_timeout(timeout) {
            Ok(Ok(st)) => st,
            Ok(Err(source)) => return Err(ExecError::Spawn { program, source }),
            Err(_) => {
                // SAFETY: signals our own child, which is not reaped yet (the waiter
                // holds it)
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGKILL);
                }
                for t in threads {
                    let _ = t.join();
                }
                return Err(ExecError::Timeout {
                    program,
                    secs: timeout.as_secs(),
                });
            }
        };
        for t in threads {
            let _ = t.join();
        }
        let stdout = String::from_utf8_lossy(&stdout.join().unwrap_or_default()).into_owned();
        let stderr = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned();
        Ok(Output {
            success: status.success(),
            status: status.to_string(),
            stdout,
            stderr,
        })
    }
}

/// Runs `argv`; `Ok(None)` if the program is not installed (then nothing it manages can
/// exist either).
pub fn run_if_installed(argv: &[&str]) -> Result<Option<Output>, ExecError> {
    match run_raw(argv, None, DEFAULT_TIMEOUT) {
        Ok(o) => Ok(Some(o)),
        Err(ExecError::Spawn { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Runs `argv` and fails unless it exits 0.
pub fn run(argv: &[&str], stdin: Option<&[u8]>) -> Result<String, ExecError> {
    let out = run_raw(argv, stdin, DEFAULT_TIMEOUT)?;
    if !out.success {
        return Err(ExecError::Failed {
            program: argv.join(" "),
            status: out.status,
            stderr: out.stderr.trim().to_string(),
        });
    }
    Ok(out.stdout)
}

/// Whether a program is on `PATH` (without running it: that costs a process).
pub fn installed(program: &str) -> bool {
    find(program).is_some()
}

/// Where `program` is on PATH (an executable regular file), symlinks not resolved.
pub fn find(program: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

    fn readable(fd: std::os::fd::BorrowedFd<'_>, ms: u16) -> bool {
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::from(ms)).expect("poll") == 1
    }

    #[test]
    fn stdin_goes_in_and_output_comes_back() {
        let out = run_raw(&["cat"], Some(b"hello"), DEFAULT_TIMEOUT).expect("cat");
        assert!(out.success);
        assert_eq!(out.stdout, "hello");
    }

    #[test]
    fn the_exit_descriptor_polls_readable_once_the_command_has_exited() {
        let r = spawn(&["sleep", "1"], None).expect("sleep");
        let Some(fd) = r.exit_fd() else {
            // a kernel before 5.3: no pidfd, callers wait for the exit instead
            return;
        };
        assert!(!readable(fd, 0), "sleep 1 has not exited yet");
        assert!(readable(fd, 5000), "sleep 1 exits within 5 s");
        let out = r.finish(DEFAULT_TIMEOUT).expect("finish");
        assert!(out.success);
    }

    #[test]
    fn a_command_past_its_time_is_killed() {
        let e = run_raw(&["sleep", "5"], None, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, ExecError::Timeout { .. }), "{e}");
    }

    #[test]
    fn a_missing_program_is_a_spawn_error() {
        let e = run_raw(&["virtgate-no-such-program"], None, DEFAULT_TIMEOUT).unwrap_err();
        assert!(matches!(e, ExecError::Spawn { .. }), "{e}");
    }
}
