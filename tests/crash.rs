//! `kill -9` in the middle of `apply` and of the qemu hook, at varying points, many
//! times: afterwards the kernel holds the old or the new forwards, never a mix; the state
//! always loads; and the next run converges.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Lab, LibvirtForm, PUBLIC, sa};

/// 100 forwards of g1 starting at `base`.
fn config(base: u16) -> String {
    let f: Vec<String> = (0..100).map(|i| format!("\"{}:80\"", base + i)).collect();
    format!("[domain.g1]\nforwards = [{}]\n", f.join(", "))
}

/// How many of g1's DNAT entries the kernel holds from each set.
fn held(lab: &Lab, backend: &str) -> (usize, usize) {
    let text = match backend {
        "nftables" => {
            lab.host
                .try_exec(&["nft", "list", "table", "inet", "virtgate"])
                .1
        }
        _ => lab.host.exec(&["iptables-save", "-t", "nat"]),
    };
    let count = |base: u16| {
        (0..100u16)
            .filter(|i| {
                let p = base + i;
                text.contains(&format!("tcp . {p} : ")) || text.contains(&format!("--dport {p} "))
            })
            .count()
    };
    (count(10000), count(20000))
}

/// xorshift64: the same varying kill points on every run.
struct Points(u64);

impl Points {
    fn next(&mut self, below: u64) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Duration::from_micros(self.0 % below)
    }
}

/// Kills `child` (virtgate itself: `ip netns exec` execs it) after `after`; whether it
/// was still running then (killed midway).
fn kill_after(mut child: std::process::Child, after: Duration) -> bool {
    std::thread::sleep(after);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    !child.wait().unwrap().success()
}

fn crash_and_converge(backend: &str) {
    let lab = Lab::new(LibvirtForm::Iptables);
    let mut points = Points(0x9e37_79b9_7f4a_7c15);
    let mut killed_midway = 0;
    for round in 0..24 {
        let base = if round % 2 == 0 { 10000 } else { 20000 };
        lab.write_config(&config(base));
        let child = lab
            .command(&lab.config_path(), backend, &["apply"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // somewhere within the time an apply of 100 forwards takes
        let window = if backend == "nftables" {
            10_000
        } else {
            40_000
        };
        killed_midway += usize::from(kill_after(child, points.next(window)));
        // never a mix of the two sets
        let (a, b) = held(&lab, backend);
        assert!(
            matches!((a, b), (0, 0) | (100, 0) | (0, 100)),
            "{backend} round {round}: a mix after kill -9: {a} of the old set, {b} of the new\n{}",
            lab.ruleset()
        );
        // the state loads, and the next apply converges to the new set
        let (ok, out, err) = lab.virtgate(backend, &["status", "--json"]);
        assert!(
            ok,
            "round {round}: state unusable after kill -9: {out}{err}"
        );
        lab.apply(backend);
        let want = if base == 10000 { (100, 0) } else { (0, 100) };
        assert_eq!(held(&lab, backend), want, "round {round}: converged");
        let (ok, out, _) = lab.virtgate(backend, &["apply"]);
        assert!(ok && out.starts_with("unchanged"), "round {round}: {out}");
    }
    assert!(
        killed_midway >= 4,
        "only {killed_midway} runs were killed midway"
    );
    // and it answers
    let t = Instant::now();
    assert!(
        lab.client
            .tcp(sa(&format!("{PUBLIC}:20099")))
            .is_ok_and(|r| r.starts_with("g1")),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn kill_9_mid_apply_nftables_backend() {
    if common::can_run_netns("kill_9_mid_apply_nftables_backend") {
        crash_and_converge("nftables");
    }
}

#[test]
fn kill_9_mid_apply_iptables_backend() {
    if common::can_run_netns("kill_9_mid_apply_iptables_backend") {
        crash_and_converge("iptables");
    }
}

fn crash_hook_and_converge(backend: &str) {
    let lab = Lab::new(LibvirtForm::Iptables);
    lab.write_config(&config(10000));
    let xml = lab.domain_xml("g1");
    let mut points = Points(0x2545_f491_4f6c_dd1d);
    let hook = |op: &str| {
        let mut c = lab.command(
            &lab.config_path(),
            backend,
            &["hook", "qemu", "g1", op, "begin", "-"],
        );
        c.stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    };
    let mut killed_midway = 0;
    for round in 0..24 {
        let op = if round % 2 == 0 { "started" } else { "stopped" };
        let mut child = hook(op).spawn().unwrap();
        {
            use std::io::Write;
            let _ = child.stdin.take().unwrap().write_all(xml.as_bytes());
        }
        let window = if backend == "nftables" { 8_000 } else { 40_000 };
        killed_midway += usize::from(kill_after(child, points.next(window)));
        let (a, b) = held(&lab, backend);
        assert!(
            b == 0 && (a == 0 || a == 100),
            "{backend} hook {op}, round {round}: a mix after kill -9: {a} of 100\n{}",
            lab.ruleset()
        );
        let (ok, out, err) = lab.virtgate(backend, &["status", "--json"]);
        assert!(
            ok,
            "round {round}: state unusable after kill -9: {out}{err}"
        );
        // libvirt would not run the hook again; the next one (or apply) converges
        let (code, out, err) = lab.hook(backend, &["qemu", "g1", op, "begin", "-"], &xml);
        assert_eq!(code, 0, "round {round}: {out}{err}");
        let want = if op == "started" { (100, 0) } else { (0, 0) };
        assert_eq!(held(&lab, backend), want, "round {round}: {op} converged");
    }
    assert!(
        killed_midway >= 4,
        "only {killed_midway} hooks were killed midway"
    );
}

#[test]
fn kill_9_mid_hook_nftables_backend() {
    if common::can_run_netns("kill_9_mid_hook_nftables_backend") {
        crash_hook_and_converge("nftables");
    }
}

#[test]
fn kill_9_mid_hook_iptables_backend() {
    if common::can_run_netns("kill_9_mid_hook_iptables_backend") {
        crash_hook_and_converge("iptables");
    }
}
