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
    let mut cout = child.stdout.take();
    let reader_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(r) = cout.as_mut() {
            let _ = r.read_to_end(&mut s);
        }
        s
    });
    let mut cerr = child.stderr.take();
    let reader_err = std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(r) = cerr.as_mut() {
            let _ = r.read_to_end(&mut s);
        }
        s
    });
    // wait in a thread of its own (no polling delay); kill at the deadline
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = match rx.recv_timeout(timeout) {
        Ok(Ok(st)) => st,
        Ok(Err(source)) => return Err(ExecError::Spawn { program, source }),
        Err(_) => {
            // SAFETY: signals our own child, which is not reaped yet (the waiter holds it)
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
            let _ = waiter.join();
            return Err(ExecError::Timeout {
                program,
                secs: timeout.as_secs(),
            });
        }
    };
    let _ = waiter.join();
    let _ = writer.join();
    let stdout = String::from_utf8_lossy(&reader_out.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&reader_err.join().unwrap_or_default()).into_owned();
    Ok(Output {
        success: status.success(),
        status: status.to_string(),
        stdout,
        stderr,
    })
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
