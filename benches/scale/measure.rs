//! Running one command inside a network namespace and measuring it: wall time and the
//! child's peak resident set (wait4's rusage), nothing else on the clock.

use std::fs::File;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One measured run.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    pub time: Duration,
    /// Peak RSS of the child, KiB.
    pub maxrss_kib: i64,
    pub ok: bool,
}

/// Runs `argv` (with `stdin`) in the namespace `ns` and measures it.
pub fn run_in(ns: &str, argv: &[String], stdin: Option<&str>, env: &[(&str, String)]) -> Run {
    let fd = File::open(format!("/run/netns/{ns}")).expect("netns");
    let argv = argv.to_vec();
    let input = stdin.map(str::to_string);
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    std::thread::spawn(move || {
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let start = Instant::now();
        // reaped below by wait4, which also gives the child's rusage
        #[allow(clippy::zombie_processes)]
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .envs(env)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {argv:?}: {e}"));
        if let (Some(mut w), Some(i)) = (child.stdin.take(), input) {
            let _ = w.write_all(i.as_bytes());
        }
        let mut err = child.stderr.take();
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(e) = err.as_mut() {
                let _ = std::io::Read::read_to_string(e, &mut s);
            }
            s
        });
        let mut status = 0;
        // SAFETY: an all-zero rusage is a valid value for wait4 to fill in
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: waits for our own child; status and ru are valid pointers
        let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
        let time = start.elapsed();
        let stderr = reader.join().unwrap_or_default();
        let ok = pid > 0 && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
        if !ok {
            eprintln!("bench: {argv:?} failed: {stderr}");
        }
        Run {
            time,
            maxrss_kib: ru.ru_maxrss,
            ok,
        }
    })
    .join()
    .expect("measuring thread")
}

/// Median, min and max of some runs, in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: usize,
}

pub fn stats(runs: &[Duration]) -> Stats {
    let mut ms: Vec<f64> = runs.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(|a, b| a.total_cmp(b));
    if ms.is_empty() {
        return Stats::default();
    }
    let n = ms.len();
    let median = if n % 2 == 1 {
        ms[n / 2]
    } else {
        (ms[n / 2 - 1] + ms[n / 2]) / 2.0
    };
    Stats {
        median,
        min: ms[0],
        max: ms[n - 1],
        runs: n,
    }
}
