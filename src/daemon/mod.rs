//! `virtgate daemon`: the same level-triggered reconcile as `apply`, run whenever
//! something it depends on changes, so that forwards heal without a hook.
//!
//! What wakes it ([`watch`]): a guest address new in the neighbour table (ARP, NDP), every
//! committed nf_tables transaction (a firewall reload,
//! `nft flush ruleset`, libvirt re-creating its rules after its own hook ran), libvirt's
//! status and lease files (a domain or network started or stopped, a guest got its DHCP
//! lease), the config files, SIGHUP (reload) and SIGTERM/SIGINT (exit, leaving the
//! forwards in place). Events are debounced; a reconcile with nothing to change costs
//! one generation read (the kernel's count of commits), so the daemon's own commits
//! coming back as events cost nothing. Something that keeps removing virtgate's rules
//! makes it back off rather than fight.
//!
//! Hooks keep working with or without it: both take the one state lock.

pub mod control;
pub mod libvirt_events;
pub mod metrics;
pub mod notify;
mod schedule;
mod snoop;
pub mod watch;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde::Serialize;

use crate::config::{self, Config};
use crate::reconcile::{self, Context};
use schedule::Schedule;
use watch::{Fired, Watch};

/// Quiet time after an event before reconciling (a reload is a burst of commits).
const DEBOUNCE: Duration = Duration::from_millis(50);
/// A change of the ruleset after a quiet time (our table deleted, `nft flush ruleset`) is
/// reconciled this soon, without waiting for the burst to end: a repair is what matters
/// most, and the rest of a burst is reconciled after it as usual.
const LEADING: Duration = Duration::from_millis(5);
/// A burst that never goes quiet is reconciled after this long anyway.
const DEBOUNCE_MAX: Duration = Duration::from_millis(500);
/// A reconcile at least this often: iptables-legacy changes and sysctls send no event.
const PERIODIC: Duration = Duration::from_secs(30);
/// More repairs than this within [`HEAL_WINDOW`] is a fight: back off.
const HEALS_BEFORE_BACKOFF: usize = 5;
const HEAL_WINDOW: Duration = Duration::from_secs(60);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// What the daemon reports in `STATE/daemon.json` (read by `virtgate status`).
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Report {
    pub pid: u32,
    /// Reconciles run, and those that changed the kernel.
    pub reconciles: u64,
    pub applies: u64,
    /// Changes made after the ruleset was changed by someone else.
    pub heals: u64,
    /// Seconds the next repair waits, when something keeps removing virtgate's rules.
    pub backoff_secs: u64,
    pub last_error: Option<String>,
    /// Events taken in (each burst is reconciled once).
    #[serde(default)]
    pub events: u64,
    /// Reconciles that failed.
    #[serde(default)]
    pub errors: u64,
    /// Events from libvirt's event API, and how many times its connection was opened
    /// (0: not connected yet, or not followed).
    #[serde(default)]
    pub libvirt_events: u64,
    #[serde(default)]
    pub libvirt_connects: u64,
}

pub fn report_file(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("daemon.json")
}

/// The daemon's report, if one is running (its pid is alive).
pub fn running_report(state_dir: &std::path::Path) -> Option<Report> {
    let text =
        crate::files::read_text(&report_file(state_dir), 1 << 20, crate::files::Follow::No).ok()?;
    let r: Report = serde_json::from_str(&text).ok()?;
    // alive, and still a virtgate daemon (not a later process given the same pid)
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", r.pid)).ok()?;
    let daemon = cmdline.split(|b| *b == 0).any(|a| a == b"daemon");
    daemon.then_some(r)
}

/// The directories whose changes matter.
fn watched_dirs(ctx: &Context) -> Vec<PathBuf> {
    let mut dirs = vec![
        ctx.libvirt.qemu_status_dir(),
        ctx.libvirt.network_status_dir(),
        ctx.libvirt.network_config_dir(),
        ctx.libvirt.dnsmasq_dir(),
    ];
    if let Some(d) = ctx.config_path.parent() {
        dirs.push(d.to_path_buf());
        dirs.push(d.join("conf.d"));
    }
    dirs
}

struct Daemon<'a> {
    ctx: &'a Context,
    config: Config,
    report: Report,
    heals: VecDeque<Instant>,
    backoff: Duration,
    not_before: Option<Instant>,
    /// The running guests' (tap, MAC) pairs, as the last reconcile saw them.
    nics: Vec<(String, String)>,
}

impl Daemon<'_> {
    /// Reloads the config; a config that cannot be used keeps the old one (and says why).
    fn reload(&mut self, why: &str) -> Result<(), String> {
        match config::load(&self.ctx.config_path) {
            Ok(c) => {
                for d in c.errors() {
                    tracing::warn!("{d}");
                }
                self.config = c;
                tracing::info!("config reloaded ({why})");
                Ok(())
            }
            Err(e) => {
                tracing::error!("config unusable ({e}); keeping the one loaded before");
                self.report.last_error = Some(e.to_string());
                Err(format!(
                    "config unusable, the daemon keeps the one it had: {e}"
                ))
            }
        }
    }

    /// One reconcile. `foreign`: the ruleset changed under us since the last one.
    fn reconcile(&mut self, foreign: bool) -> control::Applied {
        let ctx = self.ctx;
        self.report.reconciles += 1;
        let mut applied = control::Applied {
            config_errors: self.config.errors().count(),
            ..Default::default()
        };
        let nics = &mut self.nics;
        let gather = |st: &_| {
            let f = reconcile::facts_for(ctx, st);
            *nics = f
                .domains
                .iter()
                .flat_map(|d| &d.nics)
                .filter_map(|n| Some((n.tap.clone()?, n.mac.clone())))
                .collect();
            f
        };
        match reconcile::reconcile(ctx, &self.config, gather, |_| {}) {
            Ok(out) => {
                self.report.last_error = None;
                if out.changed {
                    self.report.applies += 1;
                    if foreign {
                        self.healed();
                    } else {
                        tracing::info!("applied: {} rule(s)", out.rules);
                    }
                }
                applied.changed = out.changed;
                applied.rules = out.rules;
                applied.active = out.active;
                applied.backend = out.backend.to_string();
            }
            Err(e) => {
                tracing::error!("reconcile failed, the kernel keeps its previous ruleset: {e}");
                self.report.last_error = Some(e.to_string());
                self.report.errors += 1;
                applied.error = Some(format!(
                    "apply failed, the kernel keeps its previous ruleset: {e}"
                ));
            }
        }
        self.write_report();
        applied
    }

    /// The figures a metrics scrape shows: every configured forward as planned now (or as
    /// the last reconcile planned it, if nothing changed since), with its kernel counters
    /// (read-only: no lock, nothing changed).
    fn scrape(&self) -> metrics::Snapshot {
        let ctx = self.ctx;
        let st =
            crate::state::read_state(&crate::state::state_file(&ctx.state_dir)).unwrap_or_default();
        let facts = reconcile::facts_for(ctx, &st);
        let backend = ctx.backend_for(&self.config);
        // what the last reconcile planned, while nothing changed since (no planning then)
        let statuses =
            reconcile::statuses::shown(ctx, &self.config, &facts, &st, backend.as_ref()).forwards;
        let counters = backend.counters(&st.ruleset).unwrap_or_default();
        let forwards = statuses
            .iter()
            .map(|f| {
                let mut fig = metrics::ForwardFigures {
                    domain: f.domain.clone(),
                    proto: f.spec.proto.to_string(),
                    listen: f.spec.listen.to_string(),
                    host_ports: f.spec.host_ports.to_string(),
                    guest_ports: f.spec.guest_ports.to_string(),
                    active: f.state == crate::plan::ForwardState::Active,
                    ..Default::default()
                };
                for c in f.rule_ids.iter().filter_map(|id| counters.get(id)) {
                    fig.packets += c.packets;
                    fig.bytes += c.bytes;
                    fig.connections += c.connections;
                    fig.rate_limited += c.rate_limited;
                }
                fig
            })
            .collect();
        metrics::Snapshot {
            forwards,
            daemon: self.report.clone(),
        }
    }

    /// Answers what waits on the control socket.
    fn serve(&mut self, listener: &control::Listener) {
        for (stream, req) in listener.accept() {
            let applied = match req.command {
                control::Command::Apply
                    if req.config == self.ctx.config_path && req.backend == self.ctx.backend =>
                {
                    Some(match self.reload("virtgate apply") {
                        Ok(()) => self.reconcile(false),
                        Err(error) => control::Applied {
                            error: Some(error),
                            ..Default::default()
                        },
                    })
                }
                _ => None,
            };
            let answer = control::Answer {
                report: self.report.clone(),
                config: self.ctx.config_path.clone(),
                backend: self.ctx.backend,
                config_fingerprint: crate::model::hex(&self.config.fingerprint),
                applied,
            };
            control::answer(stream, &answer);
        }
    }

    fn healed(&mut self) {
        let now = Instant::now();
        self.report.heals += 1;
        self.heals.push_back(now);
        while self
            .heals
            .front()
            .is_some_and(|t| now.duration_since(*t) > HEAL_WINDOW)
        {
            self.heals.pop_front();
        }
        if self.heals.len() > HEALS_BEFORE_BACKOFF {
            self.backoff = (self.backoff * 2).clamp(Duration::from_secs(1), BACKOFF_MAX);
            self.not_before = Some(now + self.backoff);
            tracing::warn!(
                "something keeps removing virtgate's rules ({} repairs in {} s): next repair in {} s",
                self.heals.len(),
                HEAL_WINDOW.as_secs(),
                self.backoff.as_secs()
            );
        } else {
            tracing::info!("repaired virtgate's rules after a change by someone else");
            if self.heals.len() <= 1 {
                self.backoff = Duration::ZERO;
            }
        }
        self.report.backoff_secs = self.backoff.as_secs();
    }

    fn status_line(&self) -> String {
        format!(
            "{} reconcile(s), {} repair(s){}",
            self.report.reconciles,
            self.report.heals,
            self.report
                .last_error
                .as_deref()
                .map(|e| format!(", last error: {e}"))
                .unwrap_or_default()
        )
    }

    fn write_report(&self) {
        if let Ok(text) = serde_json::to_vec(&self.report) {
            let _ = crate::state::write_atomic(&report_file(&self.ctx.state_dir), &text);
        }
    }
}

/// Runs until SIGTERM or SIGINT.
/// What `virtgate daemon` was asked for besides the context.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Serve metrics here.
    pub metrics: Option<std::net::SocketAddr>,
    /// libvirt's URI whose events are followed (None: none).
    pub libvirt_uri: Option<String>,
}

pub fn run(ctx: &Context, opts: &Options) -> Result<(), String> {
    let notifier = notify::Notifier::from_env();
    // subscribed before the first reconcile: nothing that happens after it is missed
    let mut watch = Watch::new(&watched_dirs(ctx))?;
    let config = config::load(&ctx.config_path)
        .map_err(|e| format!("config unusable, not starting: {e}"))?;
    for d in config.errors() {
        tracing::warn!("{d}");
    }
    let sockets = Sockets::open(ctx, opts)?;
    let mut d = Daemon {
        ctx,
        config,
        report: Report {
            pid: std::process::id(),
            ..Default::default()
        },
        heals: VecDeque::new(),
        backoff: Duration::ZERO,
        not_before: None,
        nics: Vec::new(),
    };
    d.reconcile(false);
    let mut snooper = snoop::Snooper::new(ctx.state_dir.clone());
    snooper.sync(&d.nics);
    notifier.ready(&format!("{} reconcile(s)", d.report.reconciles));
    tracing::info!("daemon ready (pid {})", d.report.pid);
    let watchdog = notify::watchdog_interval();
    let mut sched = Schedule::new();
    loop {
        let due = sched.due(d.not_before, watchdog);
        let (mut listening, metrics_at) = sockets.fds();
        let snoop_at = listening.len();
        listening.extend(snooper.fds());
        for f in watch.wait(due.saturating_duration_since(Instant::now()), &listening)? {
            if let Fired::Listener(i) = f {
                if i >= snoop_at {
                    if snooper.read(i - snoop_at, now_secs()) {
                        // a guest's address became known: plan with it
                        d.report.events += 1;
                        sched.event();
                    }
                } else {
                    sockets.serve(i, metrics_at, &mut d, &mut sched);
                }
                continue;
            }
            d.report.events += 1;
            if let Fired::Signal(sig) = f
                && sig != Signal::SIGHUP
            {
                tracing::info!("{sig}: exiting, forwards stay in place");
                notifier.stopping();
                return Ok(());
            }
            sched.fired(f, &mut d, &mut watch);
        }
        let now = Instant::now();
        if let Some(w) = watchdog
            && now >= sched.last_ping + w
        {
            notifier.watchdog();
            sched.last_ping = now;
        }
        let periodic = now >= sched.last_run + PERIODIC;
        let held = d.not_before.is_some_and(|nb| now < nb);
        if (sched.settled(now) || periodic) && !held {
            if periodic {
                watch.watch_missing();
            }
            d.not_before = None;
            if std::mem::take(&mut sched.config_changed) {
                let _ = d.reload("config file changed");
            }
            d.reconcile(sched.foreign);
            snooper.sync(&d.nics);
            // our own commits come back as events: a reconcile then finds nothing to do
            sched.ran();
            notifier.status(&d.status_line());
        }
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What the daemon listens on besides its watches: the control socket, libvirt's
/// events (if followed), the metrics endpoint (if asked for).
struct Sockets {
    control: control::Listener,
    events: Option<libvirt_events::Events>,
    metrics: Option<metrics::Endpoint>,
}

impl Sockets {
    fn open(ctx: &Context, opts: &Options) -> Result<Sockets, String> {
        let control = control::Listener::bind(&ctx.state_dir)?;
        let metrics = opts.metrics.map(metrics::Endpoint::bind).transpose()?;
        let events = opts.libvirt_uri.as_deref().and_then(|uri| {
            libvirt_events::Events::start(uri)
                .inspect_err(|e| {
                    tracing::warn!(
                        "libvirt's event API unavailable ({e}): following its files only"
                    )
                })
                .ok()
        });
        Ok(Sockets {
            control,
            events,
            metrics,
        })
    }

    /// The descriptors to poll (0: the control socket, then libvirt's events, then
    /// metrics) and where the metrics endpoint's is.
    fn fds(&self) -> (Vec<std::os::fd::BorrowedFd<'_>>, usize) {
        let mut fds = vec![self.control.as_fd()];
        fds.extend(self.events.as_ref().map(|e| e.fd()));
        let metrics_at = fds.len();
        fds.extend(self.metrics.as_ref().map(|m| m.as_fd()));
        (fds, metrics_at)
    }

    /// Answers what is waiting on socket `i`.
    fn serve(&self, i: usize, metrics_at: usize, d: &mut Daemon, sched: &mut Schedule) {
        if i == 0 {
            d.serve(&self.control);
        } else if i == metrics_at
            && let Some(m) = &self.metrics
        {
            m.serve(|| d.scrape());
        } else if let Some(e) = &self.events {
            e.drain();
            (d.report.libvirt_events, d.report.libvirt_connects) = e.counts();
            d.report.events += 1;
            sched.event();
        }
    }
}
