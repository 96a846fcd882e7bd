//! When the daemon's loop wakes and reconciles: events debounced (a ruleset change after
//! a quiet time at once), a periodic check, the watchdog.

use std::time::{Duration, Instant};

use super::watch::{Fired, Watch};
use super::{DEBOUNCE, DEBOUNCE_MAX, Daemon, LEADING, PERIODIC};

/// When the loop wakes: debounced events, the periodic check, the watchdog.
pub(super) struct Schedule {
    pub(super) last_ping: Instant,
    pub(super) last_run: Instant,
    /// Pending work: since when, and the last event.
    pub(super) pending: Option<(Instant, Instant)>,
    /// Whether someone else changed the ruleset.
    pub(super) foreign: bool,
    pub(super) config_changed: bool,
    /// When a ruleset change that came after a quiet time is reconciled ([`LEADING`]).
    pub(super) leading: Option<Instant>,
}

impl Schedule {
    pub(super) fn new() -> Schedule {
        Schedule {
            last_ping: Instant::now(),
            last_run: Instant::now(),
            pending: None,
            foreign: false,
            config_changed: false,
            leading: None,
        }
    }

    /// A reconcile ran: nothing is pending.
    pub(super) fn ran(&mut self) {
        self.foreign = false;
        self.pending = None;
        self.leading = None;
        self.last_run = Instant::now();
    }

    pub(super) fn event(&mut self) {
        let t = Instant::now();
        self.pending = Some((self.pending.map_or(t, |p| p.0), t));
    }

    pub(super) fn due(&self, not_before: Option<Instant>, watchdog: Option<Duration>) -> Instant {
        let mut due = self.last_run + PERIODIC;
        if let Some((first, last)) = self.pending {
            due = due.min((last + DEBOUNCE).min(first + DEBOUNCE_MAX));
        }
        if let Some(l) = self.leading {
            due = due.min(l);
        }
        if let Some(nb) = not_before {
            due = due.max(nb);
        }
        if let Some(w) = watchdog {
            due = due.min(self.last_ping + w);
        }
        due
    }

    pub(super) fn settled(&self, now: Instant) -> bool {
        self.leading.is_some_and(|l| now >= l)
            || self
                .pending
                .is_some_and(|(first, last)| now >= last + DEBOUNCE || now >= first + DEBOUNCE_MAX)
    }

    /// Takes in one event (not a signal to exit).
    pub(super) fn fired(&mut self, f: Fired, d: &mut Daemon, watch: &mut Watch) {
        match f {
            Fired::Listener(_) => {}
            Fired::Signal(_) => {
                let _ = d.reload("SIGHUP");
                self.pending.get_or_insert((Instant::now(), Instant::now()));
            }
            Fired::Dir(dir) => {
                // read once the editor is done (debounced), not at its first write
                if d.ctx
                    .config_path
                    .parent()
                    .is_some_and(|p| dir.starts_with(p))
                {
                    self.config_changed = true;
                }
                // a directory that appeared (conf.d, libvirt's /run) is watched at once
                watch.watch_missing();
                self.event();
            }
            Fired::Neighbour => self.event(),
            Fired::Ruleset => {
                let now = Instant::now();
                if self.pending.is_none() && now >= self.last_run + DEBOUNCE {
                    self.leading = Some(now + LEADING);
                }
                self.foreign = true;
                self.event();
            }
        }
    }
}
