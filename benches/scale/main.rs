//! `scripts/bench`: what each operation costs as the number of installed forwards grows,
//! beside the baselines measured in the same run (per-rule processes, the whole-table
//! design) and the other backend. Writes BENCHMARKS.md and benchmarks.svg.
//!
//! `cargo bench --bench scale` runs it in full; run any other way (`cargo test
//! --all-targets` does) it is a smoke run: small N, one run each, no file written and no
//! timing asserted, so that the benchmark cannot rot.

mod baseline;
#[path = "../../tests/common/mod.rs"]
mod common;
mod daemon;
mod datapath;
mod measure;
mod report;
mod world;

use std::time::{Duration, Instant};

use measure::{Run, Stats, run_in, stats};
use world::World;

/// One figure: an operation at one N with one backend (or a baseline).
#[derive(Debug, Clone)]
pub struct Figure {
    pub id: &'static str,
    pub what: String,
    pub n: usize,
    pub stats: Stats,
    /// Peak RSS, MiB (virtgate's own runs only).
    pub rss_mib: Option<f64>,
    /// Measured, or extrapolated from smaller N (said in the report).
    pub extrapolated: bool,
}

pub struct Config {
    pub full: bool,
    pub sizes: Vec<usize>,
    pub runs: usize,
    pub per_rule_max: usize,
    pub datapath_n: usize,
    pub datapath_rounds: usize,
    pub datapath_secs: f64,
}

impl Config {
    /// The full run (`scripts/bench`) or the smoke run CI does.
    fn new(full: bool) -> Config {
        if full {
            Config {
                full,
                sizes: vec![10, 100, 1000, 10000],
                runs: 5,
                per_rule_max: 1000,
                datapath_n: 10000,
                datapath_rounds: 7,
                datapath_secs: 1.0,
            }
        } else {
            Config {
                full,
                sizes: vec![10, 100],
                runs: 1,
                per_rule_max: 100,
                datapath_n: 100,
                datapath_rounds: 1,
                datapath_secs: 0.2,
            }
        }
    }
}

fn ms(runs: &[Run]) -> Vec<Duration> {
    runs.iter().map(|r| r.time).collect()
}

fn rss(runs: &[Run]) -> Option<f64> {
    runs.iter()
        .map(|r| r.maxrss_kib)
        .max()
        .map(|k| k as f64 / 1024.0)
}

fn figure(id: &'static str, what: &str, n: usize, runs: &[Run]) -> Figure {
    assert!(
        runs.iter().all(|r| r.ok),
        "{id} {what} at N={n}: a run failed"
    );
    Figure {
        id,
        what: what.into(),
        n,
        stats: stats(&ms(runs)),
        rss_mib: rss(runs),
        extrapolated: false,
    }
}

/// P1: the hook starts and stops web (10 forwards) with N installed.
/// Between two hooks measured (and two per-rule baseline runs). A process that changes
/// nf_tables right after one that deleted something waits in the kernel until that is
/// freed: releasing the deleter's netlink socket flushes the pending destroy work (an RCU
/// grace period) holding nf_tables' commit mutex. libvirt never runs two hooks that close
/// together (a QEMU start or stop lies between), so the figures leave this gap; the "b2b"
/// figure measures starts with none, beside them.
const HOOK_GAP: std::time::Duration = std::time::Duration::from_millis(20);

fn hook_figures(w: &World, backend: &'static str, n: usize, cfg: &Config, out: &mut Vec<Figure>) {
    let xml = world::domain_xml("web", w.web());
    let hook = |op: &str, sub: &str| {
        run_in(
            &w.host.name,
            &w.virtgate(backend, &["hook", "qemu", "web", op, sub, "-"]),
            Some(&xml),
            &[],
        )
    };
    let (mut start, mut stop) = (Vec::new(), Vec::new());
    // hooks are short: more runs against the noise of a shared machine
    for _ in 0..cfg.runs * 2 + 1 {
        std::thread::sleep(HOOK_GAP);
        start.push(hook("started", "begin"));
        std::thread::sleep(HOOK_GAP);
        stop.push(hook("stopped", "end"));
    }
    // and with no gap: the start waits for what the stop before it deleted
    let mut b2b = Vec::new();
    for _ in 0..cfg.runs * 2 + 1 {
        b2b.push(hook("started", "begin"));
        hook("stopped", "end");
    }
    out.push(figure(
        "P1 b2b",
        &format!("hook qemu web started right after a stop ({backend})"),
        n,
        &b2b,
    ));
    out.push(figure(
        "P1",
        &format!("hook qemu web started ({backend})"),
        n,
        &start,
    ));
    out.push(figure(
        "P1",
        &format!("hook qemu web stopped ({backend})"),
        n,
        &stop,
    ));
}

/// virtgate's own figures for one backend at one N.
fn virtgate_figures(backend: &'static str, n: usize, cfg: &Config, out: &mut Vec<Figure>) {
    let w = World::new(n);
    let ns = w.host.name.clone();
    let vg = |args: &[&str]| w.virtgate(backend, args);
    let run = |argv: &[String]| run_in(&ns, argv, None, &[]);
    let reset = || {
        let r = run(&vg(&["uninstall"]));
        assert!(r.ok, "uninstall");
    };
    // P2: apply from empty
    let mut p2 = Vec::new();
    for _ in 0..cfg.runs {
        reset();
        p2.push(run(&vg(&["apply"])));
    }
    out.push(figure(
        "P2",
        &format!("apply from empty ({backend})"),
        n,
        &p2,
    ));
    // P2': nothing to change
    let p2u: Vec<Run> = (0..cfg.runs).map(|_| run(&vg(&["apply"]))).collect();
    out.push(figure(
        "P2'",
        &format!("apply, nothing to change ({backend})"),
        n,
        &p2u,
    ));
    hook_figures(&w, backend, n, cfg, out);
    // P3: one forward more in the config, then apply
    let mut p3 = Vec::new();
    for r in 0..cfg.runs {
        w.write_config(&[format!("{}:80", 45000 + r)]);
        p3.push(run(&vg(&["apply"])));
        w.write_config(&[]);
        assert!(run(&vg(&["apply"])).ok);
    }
    out.push(figure(
        "P3",
        &format!("add one forward + apply ({backend})"),
        n,
        &p3,
    ));
    // P6: status --json
    let p6: Vec<Run> = (0..cfg.runs)
        .map(|_| run(&vg(&["status", "--json"])))
        .collect();
    out.push(figure("P6", &format!("status --json ({backend})"), n, &p6));
    if backend == "nftables" {
        // P7: check touches no kernel: one backend is enough
        let p7: Vec<Run> = (0..cfg.runs).map(|_| run(&vg(&["check"]))).collect();
        out.push(figure("P7", "check", n, &p7));
        // the whole-table design, for the same change
        let text = baseline::whole_table_text(&w);
        let wt = common::Netns::new("w");
        let runs: Vec<Run> = (0..cfg.runs)
            .map(|_| baseline::whole_table(&wt, &text))
            .collect();
        out.push(figure(
            "B-table",
            "whole table in one nft -f per change",
            n,
            &runs,
        ));
    }
    reset();
}

/// The per-rule baseline at one N.
fn per_rule_figures(n: usize, cfg: &Config, out: &mut Vec<Figure>) {
    let p = baseline::PerRule::new(n);
    let (mut start, mut stop) = (Vec::new(), Vec::new());
    for _ in 0..cfg.runs {
        std::thread::sleep(HOOK_GAP);
        start.push(p.web(true));
        std::thread::sleep(HOOK_GAP);
        stop.push(p.web(false));
    }
    for (what, d) in [
        ("per-rule: start web (40 iptables)", start),
        ("per-rule: stop web (40 iptables)", stop),
    ] {
        out.push(Figure {
            id: "B-rule",
            what: what.into(),
            n,
            stats: stats(&d),
            rss_mib: None,
            extrapolated: false,
        });
    }
    if n <= cfg.per_rule_max {
        let t = baseline::PerRule::apply_from_empty(n);
        out.push(Figure {
            id: "B-rule",
            what: "per-rule: apply from empty".into(),
            n,
            stats: stats(&[t]),
            rss_mib: None,
            extrapolated: false,
        });
    }
}

/// Per-rule apply beyond what is practical: extrapolated linearly from the largest
/// measured N (a lower bound: the cost per process grows with the rules installed).
fn extrapolate(out: &mut Vec<Figure>, sizes: &[usize]) {
    let measured: Vec<Figure> = out
        .iter()
        .filter(|f| f.what == "per-rule: apply from empty")
        .cloned()
        .collect();
    let Some(last) = measured.iter().max_by_key(|f| f.n) else {
        return;
    };
    for &n in sizes.iter().filter(|&&n| n > last.n) {
        let k = n as f64 / last.n as f64;
        let s = last.stats;
        out.push(Figure {
            id: "B-rule",
            what: last.what.clone(),
            n,
            stats: Stats {
                median: s.median * k,
                min: s.min * k,
                max: s.max * k,
                runs: 0,
            },
            rss_mib: None,
            extrapolated: true,
        });
    }
}

/// P4, both backends: rates with the forward alone and with `n` others, interleaved.
fn datapath_figures(cfg: &Config) -> Vec<(String, Vec<f64>, Vec<f64>)> {
    let mut out = Vec::new();
    let d = datapath::Datapath::new(cfg.datapath_n);
    let dur = Duration::from_secs_f64(cfg.datapath_secs);
    for backend in ["nftables", "iptables"] {
        let (mut one, mut many) = (Vec::new(), Vec::new());
        // the kernel settles after each install before the count starts: an install of
        // 10,000 elements leaves it growing hash tables and freeing the ones it replaced
        // (deferred work), which the steady state the figure is about does not have
        let settle = Duration::from_millis(if cfg.full { 500 } else { 0 });
        for _ in 0..cfg.datapath_rounds {
            d.install(backend, false);
            std::thread::sleep(settle);
            one.push(d.rate(dur));
            d.install(backend, true);
            std::thread::sleep(settle);
            many.push(d.rate(dur));
        }
        out.push((backend.to_string(), one, many));
    }
    out
}

/// `--world N [BACKEND]`: sets up N forwards, applies, prints how to reach it, and waits
/// (for profiling by hand).
fn world_by_hand(n: usize, backend: &str) {
    let w = World::new(n);
    let r = run_in(&w.host.name, &w.virtgate(backend, &["apply"]), None, &[]);
    // web's XML for `hook` by hand, in the world's own (private) temporary directory
    let xml = w.dir.path().join("web.xml");
    std::fs::write(&xml, world::domain_xml("web", w.web())).expect("write");
    println!(
        "netns {} ok={} {:?}\n{}\n{}",
        w.host.name,
        r.ok,
        r.time,
        w.virtgate(backend, &[]).join(" "),
        xml.display()
    );
    std::thread::sleep(Duration::from_secs(3600));
}

/// The kernel alone: one `nft` adding, then deleting, one element of a trivial table.
fn kernel_floor_figures(cfg: &Config, figs: &mut Vec<Figure>) {
    let (add, del) = baseline::kernel_floor(cfg.runs.max(5));
    figs.push(figure(
        "K",
        "kernel: nft add one element, trivial table",
        0,
        &add,
    ));
    figs.push(figure(
        "K",
        "kernel: nft delete one element, trivial table",
        0,
        &del,
    ));
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `--world N [BACKEND]`: set up N forwards, apply, print how to reach it, and wait
    // (for profiling by hand)
    if let Some(i) = args.iter().position(|a| a == "--world") {
        let n: usize = args.get(i + 1).and_then(|s| s.parse().ok()).unwrap_or(1000);
        let backend = args.get(i + 2).map(String::as_str).unwrap_or("nftables");
        world_by_hand(n, backend);
        return;
    }
    let full = args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--quick");
    if !common::can_run_netns("benchmark") {
        return;
    }
    // `--datapath`: P4 alone, full size (for looking at its spread by hand)
    if args.iter().any(|a| a == "--datapath") {
        for (b, one, many) in datapath_figures(&Config::new(true)) {
            println!("{b}: 1 installed {one:.0?}; many installed {many:.0?}");
        }
        return;
    }
    let cfg = Config::new(full);
    let started = Instant::now();
    let mut figs = Vec::new();
    for &n in &cfg.sizes {
        for backend in ["nftables", "iptables"] {
            eprintln!(
                "bench: {backend}, {n} forwards installed ({:.0?})",
                started.elapsed()
            );
            virtgate_figures(backend, n, &cfg, &mut figs);
        }
        eprintln!("bench: per-rule baseline, {n} ({:.0?})", started.elapsed());
        per_rule_figures(n, &cfg, &mut figs);
    }
    extrapolate(&mut figs, &cfg.sizes);
    kernel_floor_figures(&cfg, &mut figs);
    eprintln!("bench: data path ({:.0?})", started.elapsed());
    let dp = datapath_figures(&cfg);
    for (b, one, many) in &dp {
        assert!(
            one.iter().chain(many).all(|r| *r > 0.0),
            "{b}: no connection got through the forward"
        );
    }
    eprintln!("bench: daemon ({:.0?})", started.elapsed());
    let dm = if cfg.full {
        daemon::measure(1000, 5, Duration::from_secs(10))
    } else {
        daemon::measure(100, 2, Duration::from_secs(1))
    };
    let md = report::markdown(&figs, &dp, &dm, &cfg, started.elapsed());
    if cfg.full {
        std::fs::write("BENCHMARKS.md", &md).expect("write BENCHMARKS.md");
        report::svg(&figs, "benchmarks.svg");
        eprintln!(
            "bench: wrote BENCHMARKS.md and benchmarks.svg in {:.0?}",
            started.elapsed()
        );
    } else {
        println!("{md}");
        eprintln!(
            "bench: smoke run passed in {:.0?} (no timing asserted)",
            started.elapsed()
        );
    }
}
