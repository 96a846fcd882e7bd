//! The daemon's figures (issue 11): how long from someone deleting virtgate's table to the
//! daemon having put it back (heal), from a guest's DHCP lease appearing to its forward
//! being installed (lease-to-live), its resident memory, and the CPU it uses while nothing
//! happens. Times are from the change to the daemon's report saying its reconcile is done
//! (it writes `daemon.json` after each one), read every millisecond.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::measure::{Stats, stats};
use crate::world::{self, World};

pub struct DaemonFigures {
    pub forwards: usize,
    pub domains: usize,
    pub heal: Stats,
    pub lease: Stats,
    pub rss_mib: f64,
    /// Its anonymous resident memory (what is not the binary's or libraries' pages).
    pub anon_mib: f64,
    /// Peak RSS of the same daemon with libvirt's event API off (libvirt.so.0 not loaded).
    pub rss_no_libvirt_mib: f64,
    pub idle_cpu_ms: f64,
    pub idle: Duration,
}

/// A field of the daemon's report (0 while there is none).
fn report(w: &World, field: &str) -> u64 {
    std::fs::read_to_string(w.state().join("daemon.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v[field].as_u64())
        .unwrap_or(0)
}

/// Waits until `field` of the report exceeds `above`; the time it took.
fn until_above(w: &World, field: &str, above: u64) -> Duration {
    let t = Instant::now();
    while report(w, field) <= above {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the daemon did not {field} within 10 s"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    t.elapsed()
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // the fields after the command name (which is in parentheses and may hold spaces)
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    // state is field 3 of stat, the first here: utime is 14, stime 15
    num(11) + num(12)
}

fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:")
}

/// A `kB` field of /proc/PID/status.
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `virtgate ARGS` (a daemon) in the world's host namespace.
fn spawn(w: &World, args: &[&str]) -> Running {
    let child = Command::new("ip")
        .args(["netns", "exec", &w.host.name])
        .args(w.virtgate("nftables", args))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the daemon");
    Running(child)
}

/// `runs` times: virtgate's table deleted, until the daemon's report says it repaired it.
fn heals(w: &World, runs: usize) -> Vec<Duration> {
    let mut heal = Vec::new();
    for _ in 0..runs {
        let h = report(w, "heals");
        w.host.exec(&["nft", "delete", "table", "inet", "virtgate"]);
        heal.push(until_above(w, "heals", h));
        std::thread::sleep(Duration::from_millis(300));
    }
    heal
}

/// `runs` times: the late guest's lease taken away (its forward removed), then renamed
/// into place as libvirt's helper writes it, until the daemon has applied it.
fn leases_to_live(w: &World, runs: usize, leases: &std::path::Path, late: usize) -> Vec<Duration> {
    let mut lease = Vec::new();
    let lease_text = format!(
        "[{{\"ip-address\": \"192.168.254.1\", \"mac-address\": \"{}\", \"expiry-time\": 4000000000}}]\n",
        world::mac(late)
    );
    let new = leases.with_extension("status.new");
    for _ in 0..runs {
        // the lease goes (the forward is removed), then comes as libvirt's helper writes it
        let a = report(w, "applies");
        std::fs::write(&new, "[]\n").expect("leases");
        std::fs::rename(&new, leases).expect("rename");
        let gone = Instant::now();
        while report(w, "applies") <= a && gone.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(200));
        let a = report(w, "applies");
        std::fs::write(&new, &lease_text).expect("leases");
        std::fs::rename(&new, leases).expect("rename");
        lease.push(until_above(w, "applies", a));
        std::thread::sleep(Duration::from_millis(200));
    }
    lease
}

/// The daemon in a world of `n` forwards (n/10 domains), `runs` heals and lease-to-live
/// each (at most 5: more repairs than that within a minute make it back off, by design).
pub fn measure(n: usize, runs: usize, idle: Duration) -> DaemonFigures {
    let runs = runs.min(5);
    let w = World::new(n);
    // a guest without a reservation, whose lease comes later
    let late = 0xfe_0001;
    let xml = format!(
        "<domstatus state='running' reason='booted' pid='1'>\n{}</domstatus>\n",
        world::domain_xml("late", late)
    );
    std::fs::write(w.root().join("run/libvirt/qemu/late.xml"), xml).expect("write");
    let mut cfg = std::fs::read_to_string(w.config()).expect("config");
    cfg.push_str("[domain.late]\nforwards = [\"40000:80\"]\n");
    std::fs::write(w.config(), cfg).expect("config");
    let leases = w.root().join("var/lib/libvirt/dnsmasq/virbr0.status");
    std::fs::write(&leases, "[]\n").expect("leases");
    let d = spawn(&w, &["daemon"]);
    let pid = d.0.id();
    until_above(&w, "reconciles", 0);
    // its own first commit comes back as an event: let that reconcile pass
    std::thread::sleep(Duration::from_millis(500));
    let t0 = cpu_ticks(pid);
    std::thread::sleep(idle);
    let ticks = cpu_ticks(pid) - t0;
    // SAFETY: sysconf has no preconditions
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let idle_cpu_ms = ticks as f64 * 1000.0 / hz;
    let heal = heals(&w, runs);
    let lease = leases_to_live(&w, runs, &leases, late);
    let live = w.host.exec(&["nft", "list", "table", "inet", "virtgate"]);
    assert!(
        live.contains("192.168.254.1"),
        "the late guest's forward is installed"
    );
    let rss_mib = rss_kib(pid) as f64 / 1024.0;
    let anon_mib = status_kib(pid, "RssAnon:") as f64 / 1024.0;
    drop(d);
    let _ = std::fs::remove_file(w.state().join("daemon.json"));
    // the same world, libvirt's event API off: one reconcile and an idle moment
    let plain = spawn(&w, &["daemon", "--libvirt-uri", "none"]);
    until_above(&w, "reconciles", 0);
    std::thread::sleep(Duration::from_millis(500));
    let rss_no_libvirt_mib = rss_kib(plain.0.id()) as f64 / 1024.0;
    DaemonFigures {
        forwards: n,
        domains: n / 10,
        heal: stats(&heal),
        lease: stats(&lease),
        rss_mib,
        anon_mib,
        rss_no_libvirt_mib,
        idle_cpu_ms,
        idle,
    }
}
