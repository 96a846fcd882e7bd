//! BENCHMARKS.md (tables, targets met or missed, ratios) and benchmarks.svg (time vs N).

use std::fmt::Write as _;
use std::time::Duration;

use plotters::prelude::*;

use crate::{Config, Figure};

fn find<'a>(figs: &'a [Figure], what: &str, n: usize) -> Option<&'a Figure> {
    figs.iter().find(|f| f.what == what && f.n == n)
}

fn median(figs: &[Figure], what: &str, n: usize) -> Option<f64> {
    find(figs, what, n).map(|f| f.stats.median)
}

fn cmd(argv: &[&str]) -> String {
    std::process::Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default()
}

fn median_of(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

/// (id, what, N, limit ms, goal ms)
const TARGETS: &[(&str, &str, usize, f64, f64)] = &[
    ("P1", "hook qemu web started (nftables)", 1000, 10.0, 5.0),
    ("P1", "hook qemu web stopped (nftables)", 1000, 10.0, 5.0),
    ("P1'", "hook qemu web started (nftables)", 10000, 25.0, 10.0),
    ("P1'", "hook qemu web stopped (nftables)", 10000, 25.0, 10.0),
    ("P2", "apply from empty (nftables)", 10000, 300.0, 150.0),
    (
        "P2'",
        "apply, nothing to change (nftables)",
        10000,
        60.0,
        30.0,
    ),
    (
        "P3",
        "add one forward + apply (nftables)",
        10000,
        80.0,
        40.0,
    ),
    ("P6", "status --json (nftables)", 10000, 100.0, 50.0),
    ("P7", "check", 10000, 50.0, 25.0),
    (
        "P1 ipt",
        "hook qemu web started (iptables)",
        1000,
        30.0,
        30.0,
    ),
    (
        "P1 ipt",
        "hook qemu web stopped (iptables)",
        1000,
        30.0,
        30.0,
    ),
    (
        "P2 ipt",
        "apply from empty (iptables)",
        10000,
        1500.0,
        1500.0,
    ),
];

fn verdict(v: f64, limit: f64, goal: f64) -> &'static str {
    if v <= goal {
        "goal met"
    } else if v <= limit {
        "met"
    } else {
        "**missed**"
    }
}

fn targets(out: &mut String, figs: &[Figure], dp: &[(String, Vec<f64>, Vec<f64>)]) {
    out.push_str("## Targets (issue 10)\n\n| id | operation | N | median | must | goal | verdict |\n|---|---|---|---|---|---|---|\n");
    for (id, what, n, limit, goal) in TARGETS {
        if let Some(v) = median(figs, what, *n) {
            let _ = writeln!(
                out,
                "| {id} | {what} | {n} | {v:.1} ms | <= {limit} ms | <= {goal} ms | {} |",
                verdict(v, *limit, *goal)
            );
        }
    }
    for (op, base) in [
        ("started", "per-rule: start web (40 iptables)"),
        ("stopped", "per-rule: stop web (40 iptables)"),
    ] {
        let what = format!("hook qemu web {op} (nftables)");
        if let (Some(v), Some(b)) = (median(figs, &what, 1000), median(figs, base, 1000)) {
            let r = b / v;
            let _ = writeln!(
                out,
                "| P1 ratio | {what} vs {base} | 1000 | {r:.1}x faster | >= 15x | | {} |",
                if r >= 15.0 { "met" } else { "**missed**" }
            );
        }
    }
    let rss = find(figs, "apply from empty (nftables)", 10000).and_then(|f| f.rss_mib);
    if let Some(m) = rss {
        let _ = writeln!(
            out,
            "| M | peak RSS of apply, 10000 forwards | 10000 | {m:.1} MiB | <= 40 MB | <= 20 MB | {} |",
            verdict(m, 40.0 / 1.048_576, 20.0 / 1.048_576)
        );
    }
    for (b, one, many) in dp {
        let (o, m) = (median_of(one), median_of(many));
        let pct = if o > 0.0 { 100.0 * m / o } else { 0.0 };
        let (limit, goal) = if b == "iptables" {
            (50.0, 95.0)
        } else {
            (90.0, 95.0)
        };
        let v = if pct >= goal {
            "goal met"
        } else if pct >= limit {
            "met"
        } else {
            "**missed**"
        };
        let _ = writeln!(
            out,
            "| P4 | new TCP connections/s, {b}, many vs 1 installed | | {pct:.0}% | >= {limit}% | >= {goal}% | {v} |"
        );
    }
    if let (Some(a), Some(d)) = (
        median(figs, "kernel: nft add one element, trivial table", 0),
        median(figs, "kernel: nft delete one element, trivial table", 0),
    ) {
        let _ = writeln!(
            out,
            "\nKernel floor in this run: one `nft` adding one element to a trivial table takes {a:.1} ms, deleting it {d:.1} ms: every transaction that deletes something pays about {:.1} ms more, whatever the table holds.",
            d - a
        );
    }
    out.push('\n');
}

fn all_figures(out: &mut String, figs: &[Figure]) {
    out.push_str("## Every figure\n\nMilliseconds; `runs` 0 marks a figure extrapolated (linearly, a lower bound) from the largest N measured.\n\n| id | operation | N | median | min | max | runs | peak RSS |\n|---|---|---|---|---|---|---|---|\n");
    let mut sorted: Vec<&Figure> = figs.iter().collect();
    sorted.sort_by(|a, b| (a.id, &a.what, a.n).cmp(&(b.id, &b.what, b.n)));
    for f in sorted {
        let s = f.stats;
        let rss = f.rss_mib.map(|m| format!("{m:.1} MiB")).unwrap_or_default();
        let ex = if f.extrapolated {
            " (extrapolated)"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "| {} | {}{ex} | {} | {:.1} | {:.1} | {:.1} | {} | {rss} |",
            f.id, f.what, f.n, s.median, s.min, s.max, s.runs
        );
    }
    out.push('\n');
}

fn ratios(out: &mut String, figs: &[Figure], sizes: &[usize]) {
    out.push_str("## Ratios in this run\n\n| N | hook start: per-rule / virtgate nft | hook start: whole table / virtgate nft | hook start: iptables / nftables backend | apply from empty: per-rule / nft | apply from empty: iptables / nftables |\n|---|---|---|---|---|---|\n");
    for &n in sizes {
        let v = median(figs, "hook qemu web started (nftables)", n);
        let r = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.1}x", a / b),
            _ => "-".into(),
        };
        let p2 = median(figs, "apply from empty (nftables)", n);
        let _ = writeln!(
            out,
            "| {n} | {} | {} | {} | {} | {} |",
            r(median(figs, "per-rule: start web (40 iptables)", n), v),
            r(median(figs, "whole table in one nft -f per change", n), v),
            r(median(figs, "hook qemu web started (iptables)", n), v),
            r(median(figs, "per-rule: apply from empty", n), p2),
            r(median(figs, "apply from empty (iptables)", n), p2),
        );
    }
    out.push('\n');
}

/// The daemon's section (issue 11, item 7).
fn daemon(out: &mut String, d: &crate::daemon::DaemonFigures) {
    let _ = writeln!(
        out,
        "## Daemon\n\n`virtgate daemon` (nftables backend) with {} forwards for {} running domains, plus one guest without a reservation. Heal: `nft delete table inet virtgate`, until the daemon's report says its repair is done. Lease-to-live: that guest's lease renamed into place as libvirt's helper does, until its forward is installed (each run after the lease was taken away and the forward removed). Both include the 50 ms debounce.\n",
        d.forwards, d.domains
    );
    let _ = writeln!(
        out,
        "| figure | median | min | max | runs | must |
|---|---|---|---|---|---|"
    );
    for (what, s, must) in [
        ("heal (ms)", d.heal, 100.0),
        ("lease-to-live (ms)", d.lease, 100.0),
    ] {
        let _ = writeln!(
            out,
            "| {what} | {:.1} | {:.1} | {:.1} | {} | <= {must:.0}: {} |",
            s.median,
            s.min,
            s.max,
            s.runs,
            if s.median <= must { "met" } else { "missed" }
        );
    }
    let _ = writeln!(
        out,
        "| peak RSS (MiB) | {:.1} | | | 1 | <= 15: {} |",
        d.rss_mib,
        if d.rss_mib <= 15.0 { "met" } else { "missed" }
    );
    let _ = writeln!(
        out,
        "| of it its own (anonymous) memory (MiB) | {:.1} | | | 1 | |",
        d.anon_mib
    );
    let _ = writeln!(
        out,
        "| peak RSS with `--libvirt-uri none` (MiB) | {:.1} | | | 1 | <= 15: {} |",
        d.rss_no_libvirt_mib,
        if d.rss_no_libvirt_mib <= 15.0 {
            "met"
        } else {
            "missed"
        }
    );
    let _ = writeln!(
        out,
        "| CPU while idle ({:.0} s, ms) | {:.0} | | | 1 | ~0 |\n",
        d.idle.as_secs_f64(),
        d.idle_cpu_ms
    );
}

pub fn markdown(
    figs: &[Figure],
    dp: &[(String, Vec<f64>, Vec<f64>)],
    dm: &crate::daemon::DaemonFigures,
    cfg: &Config,
    took: Duration,
) -> String {
    let mut out = String::from("# Benchmarks\n\n");
    let _ = writeln!(
        out,
        "Written by `scripts/bench` ({}), in namespaces it creates; every figure beside its baselines from the same run. Machine: {} cores, kernel {}, {}, {}. Took {:.0?}.\n",
        if cfg.full { "full run" } else { "smoke run" },
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        cmd(&["uname", "-r"]),
        cmd(&["nft", "--version"]),
        cmd(&["iptables", "-V"]),
        took
    );
    out.push_str("Setup: one host namespace with libvirt's iptables-form rules for virbr0 (192.168.0.0/16); N forwards installed for N/10 running domains (10 each, `\"20000:80\"` style, addresses from `<dhcp><host>` reservations, libvirt's file layout); `web` (10 forwards) is started and stopped by the hook. Release build; medians of the runs shown.\n\n");
    targets(&mut out, figs, dp);
    ratios(&mut out, figs, &cfg.sizes);
    all_figures(&mut out, figs);
    out.push_str("## Data path (P4)\n\nNew TCP connections per second from a client namespace through one forward to a guest namespace (connect, read, reset), that forward alone vs installed last after the others; rounds interleaved, each counted 0.5 s after its install (the kernel finishes growing and freeing hash tables in deferred work first).\n\n| backend | installed | rounds (conn/s) | median |\n|---|---|---|---|\n");
    for (b, one, many) in dp {
        for (label, v) in [("1", one), (&*format!("{}", cfg.datapath_n + 1), many)] {
            let rounds: Vec<String> = v.iter().map(|x| format!("{x:.0}")).collect();
            let _ = writeln!(
                out,
                "| {b} | {label} | {} | {:.0} |",
                rounds.join(", "),
                median_of(v)
            );
        }
    }
    out.push('\n');
    daemon(&mut out, dm);
    out.push_str(&format!("\n{}\n", include_str!("notes.md")));
    out
}

pub fn svg(figs: &[Figure], path: &str) {
    let series: &[(&str, RGBColor)] = &[
        ("hook qemu web started (nftables)", RGBColor(0, 90, 200)),
        ("hook qemu web started (iptables)", RGBColor(120, 170, 240)),
        ("apply from empty (nftables)", RGBColor(200, 40, 40)),
        ("apply from empty (iptables)", RGBColor(240, 140, 140)),
        ("add one forward + apply (nftables)", RGBColor(0, 150, 70)),
        (
            "add one forward + apply (iptables)",
            RGBColor(120, 210, 150),
        ),
        ("status --json (nftables)", RGBColor(150, 60, 170)),
        ("status --json (iptables)", RGBColor(200, 150, 220)),
        ("check", RGBColor(90, 90, 90)),
        ("per-rule: start web (40 iptables)", RGBColor(230, 150, 0)),
        ("per-rule: apply from empty", RGBColor(160, 100, 0)),
        (
            "whole table in one nft -f per change",
            RGBColor(0, 170, 170),
        ),
    ];
    let root = SVGBackend::new(path, (1000, 640)).into_drawing_area();
    let _ = root.fill(&WHITE);
    let ymax = figs.iter().map(|f| f.stats.median).fold(1.0, f64::max) * 2.0;
    let Ok(mut chart) = ChartBuilder::on(&root)
        .caption(
            "virtgate: time vs forwards installed (log-log)",
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((8f64..12000f64).log_scale(), (0.3f64..ymax).log_scale())
    else {
        return;
    };
    let _ = chart
        .configure_mesh()
        .x_desc("forwards installed (N)")
        .y_desc("ms (median)")
        .draw();
    for (what, color) in series {
        let mut pts: Vec<(f64, f64)> = figs
            .iter()
            .filter(|f| f.what == *what)
            .map(|f| (f.n as f64, f.stats.median.max(0.3)))
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        if pts.is_empty() {
            continue;
        }
        let c = *color;
        if let Ok(s) = chart.draw_series(LineSeries::new(pts.clone(), c.stroke_width(2))) {
            s.label(*what).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
            });
        }
        let _ = chart.draw_series(pts.iter().map(|p| Circle::new(*p, 3, c.filled())));
    }
    let _ = chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw();
    let _ = root.present();
}
