//! `virtgate hook qemu|network|daemon ARGS...`: libvirt's hook entry point (SPEC part 6).
//!
//! libvirt calls it with `OBJECT OP SUBOP EXTRA` and the domain or network XML on stdin,
//! waits for it to exit and for its stdout/stderr to close, and for several operations
//! aborts (or kills the guest) on a non-zero exit. So the hook:
//! * never calls back into libvirt, and prints nothing on stdout;
//! * exits non-zero only when the domain being started has forwards that cannot be
//!   applied AND that domain says `fail_closed = true` (never for `reconnect`);
//! * bounds its own run time (`alarm`), the size of stdin, and every child process;
//! * serializes with other hooks through the state lock (libvirt starts guests in
//!   parallel at boot).
//!
//! | call | effect |
//! |---|---|
//! | qemu `prepare` | validate the domain's forwards (config errors, conflicts) |
//! | qemu `start`, `started`, `reconnect` | record the domain as running, reconcile |
//! | qemu `stopped`, `release` | forget the domain, reconcile: its rules go, from state |
//! | qemu `migrate`, `restore` | nothing (stdout untouched: the XML stays as it is) |
//! | network `started`, `updated`, `port-created` | reconcile (re-assert the accept placement) |
//! | network `stopped` | reconcile with that network down: its forwards become pending |
//! | daemon `start` | reconcile |
//! | daemon `reload` | reconcile, and again after libvirt's firewall reload that follows ([`follow`]) |
//! | daemon `shutdown` | nothing: forwards stay while guests may keep running |

mod follow;
pub mod settings;

use std::io::Read;

use crate::config::{self, Config};
use crate::facts::{DomainFacts, libvirt};
use crate::plan::ForwardState;
use crate::reconcile::{self, Context};

/// Largest stdin accepted.
pub const MAX_STDIN: u64 = libvirt::MAX_XML_BYTES;
/// The hook's whole run is bounded by this.
pub const DEADLINE_SECS: u32 = 90;

/// Reads stdin up to the bound (the rest is drained so libvirt's writer never blocks).
fn read_stdin(mut input: impl Read) -> Result<String, String> {
    let mut buf = Vec::new();
    (&mut input)
        .take(MAX_STDIN + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("reading stdin: {e}"))?;
    if buf.len() as u64 > MAX_STDIN {
        let _ = std::io::copy(&mut input, &mut std::io::sink());
        return Err(format!("stdin larger than {MAX_STDIN} bytes, ignored"));
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// At the deadline: give up with exit 0, so that libvirt neither hangs nor kills a guest
/// because of virtgate (only async-signal-safe calls here).
extern "C" fn on_deadline(_: libc::c_int) {
    let msg = b"virtgate hook: time limit reached, giving up (exit 0: the guest is not affected)\n";
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is static
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(0);
    }
}

/// Runs a hook call; returns the exit status for libvirt.
pub fn run(ctx: &Context, driver: &str, args: &[String], stdin: impl Read) -> u8 {
    // a hook that hangs hangs libvirt: at the deadline this process ends, whatever it was
    // waiting for (the state lock, a child)
    // SAFETY: the handler only calls async-signal-safe functions
    let _ = unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGALRM,
            nix::sys::signal::SigHandler::Handler(on_deadline),
        )
    };
    nix::unistd::alarm::set(DEADLINE_SECS);
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or("-");
    let (object, op) = (arg(0), arg(1));
    let input = match read_stdin(stdin) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{driver} {object:?} {op}: {e}");
            String::new()
        }
    };
    match driver {
        "qemu" => qemu(ctx, object, op, &input),
        "network" => {
            match op {
                // (not port-deleted: it comes after qemu `stopped`, while the stopping
                // guest's status file still exists)
                "started" | "updated" | "port-created" => {
                    reassert(ctx, &format!("network {object:?} {op}"), None)
                }
                // its guests' forwards become pending until it runs again
                "stopped" => reassert(ctx, &format!("network {object:?} {op}"), Some(object)),
                _ => {}
            }
            0
        }
        "daemon" => {
            match op {
                "start" => reassert(ctx, "daemon start", None),
                "reload" => {
                    reassert(ctx, "daemon reload", None);
                    follow::spawn(ctx);
                }
                follow::OP => follow::run(ctx),
                _ => {}
            }
            0
        }
        other => {
            tracing::warn!("unknown hook driver {other:?}; ignored");
            0
        }
    }
}

fn load_config(ctx: &Context, what: &str) -> Option<Config> {
    match config::load_unchecked(&ctx.config_path) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::error!("{what}: {e}; nothing changed");
            None
        }
    }
}

/// A plain reconcile with the current facts (`stopped_network` counts as not running).
fn reassert(ctx: &Context, what: &str, stopped_network: Option<&str>) {
    let Some(cfg) = load_config(ctx, what) else {
        return;
    };
    let gather = |st: &crate::state::State| {
        let mut f = reconcile::facts_for(ctx, st);
        for n in f
            .networks
            .iter_mut()
            .filter(|n| Some(n.name.as_str()) == stopped_network)
        {
            n.active = false;
        }
        f
    };
    match reconcile::reconcile(ctx, &cfg, gather, |_| {}) {
        Ok(o) if o.changed => tracing::info!("{what}: ruleset re-applied ({} rules)", o.rules),
        Ok(_) => tracing::debug!("{what}: ruleset unchanged"),
        Err(e) => tracing::error!("{what}: {e}"),
    }
}

/// Whether a domain has forwards configured (by name or UUID) or installed.
fn concerns_virtgate(
    ctx: &Context,
    cfg: &Config,
    name: &str,
    domain: Option<&DomainFacts>,
) -> bool {
    if cfg.domains.contains_key(name) || cfg.invalid_domains.contains(name) {
        return true;
    }
    let uuid = domain.and_then(|d| d.uuid.clone());
    if uuid.is_some() && cfg.domains.values().any(|d| d.domain.uuid == uuid) {
        return true;
    }
    match crate::state::read_state_for(&crate::state::state_file(&ctx.state_dir), name) {
        Ok((st, _)) => st.started.contains_key(name) || !st.ruleset.rules.is_empty(),
        // unreadable state: take the slow, careful path
        Err(_) => true,
    }
}

/// The config entry a libvirt domain answers to: by name, else by a pinned UUID.
fn config_name(cfg: &Config, name: &str, domain: Option<&DomainFacts>) -> String {
    if cfg.domains.contains_key(name) || cfg.invalid_domains.contains(name) {
        return name.to_string();
    }
    let uuid = domain.and_then(|d| d.uuid.as_deref());
    cfg.domains
        .values()
        .find(|d| uuid.is_some() && d.domain.uuid.as_deref() == uuid)
        .map(|d| d.domain.name.clone())
        .unwrap_or_else(|| name.to_string())
}

fn mark_stopped(st: &mut crate::state::State, name: &str) {
    st.started.remove(name);
    st.stopped.insert(name.to_string());
}

/// Removes only this domain's rules, every other domain keeping what it has.
fn remove_domain(ctx: &Context, cfg: &Config, name: &str, cfg_name: &str, what: &str) {
    let r = reconcile::reconcile_scoped(
        ctx,
        cfg,
        |_| reconcile::facts_for_domain(ctx, None),
        |st| mark_stopped(st, name),
        reconcile::Scope::Domain(cfg_name),
    );
    match r {
        Ok(o) => {
            if o.changed {
                tracing::info!("{what}: forwards removed");
            }
            exiting(o);
        }
        Err(e) => tracing::error!("{what}: cannot remove its forwards: {e}"),
    }
}

/// The hook process ends right after it is done: what it loaded (the config, the state
/// of every installed forward) is left to the exit instead of being freed piece by piece
/// (measurable with 10,000 forwards).
fn exiting<T>(big: T) {
    std::mem::forget(big);
}

fn qemu(ctx: &Context, name: &str, op: &str, xml: &str) -> u8 {
    let what = format!("domain {name:?} {op}");
    match op {
        "migrate" | "restore" => return 0,
        "prepare" | "start" | "started" | "reconnect" | "stopped" | "release" => {}
        _ => return 0,
    }
    let stopping = matches!(op, "stopped" | "release");
    let parsed = libvirt::parse_domain_xml(xml);
    // only the config entries this domain answers to are read in full
    let only = config::toml_file::Only {
        name,
        uuid: parsed.as_ref().ok().and_then(|d| d.uuid.as_deref()),
    };
    let cfg = match config::load_only(&ctx.config_path, Some(only)) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{what}: {e}; nothing changed");
            // an unusable config changes nothing, except that a stopping guest's forwards go
            if stopping {
                remove_domain(ctx, &Config::default(), name, name, &what);
            }
            return 0;
        }
    };
    let code = qemu_with(ctx, &cfg, name, op, parsed, &what);
    exiting(cfg);
    code
}

/// The config errors of one domain's entry (conflicts with others aside: the hook checks
/// those against what is installed).
fn own_errors(cfg: &Config, cfg_name: &str) -> Vec<String> {
    cfg.errors()
        .filter(|d| {
            d.domain.as_deref() == Some(cfg_name) && !d.message.contains(config::CONFLICT_MARK)
        })
        .map(|d| d.to_string())
        .collect()
}

fn qemu_with(
    ctx: &Context,
    cfg: &Config,
    name: &str,
    op: &str,
    parsed: Result<DomainFacts, String>,
    what: &str,
) -> u8 {
    let stopping = matches!(op, "stopped" | "release");
    // the domain's own <metadata> forwards count for its checks here
    let own = match &parsed {
        Ok(d) => reconcile::desired(cfg, std::slice::from_ref(d)),
        Err(_) => reconcile::desired(cfg, &[]),
    };
    let cfg_name = config_name(&own, name, parsed.as_ref().ok());
    if !concerns_virtgate(ctx, &own, name, parsed.as_ref().ok()) {
        // the hot path for the many guests without forwards: no lock, no firewall calls
        tracing::debug!("{what}: no forwards configured or installed; nothing to do");
        return 0;
    }
    if stopping {
        remove_domain(ctx, cfg, name, &cfg_name, what);
        return 0;
    }
    let fail_closed = own.fail_closed.contains(&cfg_name);
    let starting = matches!(op, "prepare" | "start" | "started");
    let refuse = |msg: String| -> u8 {
        if fail_closed && starting {
            tracing::error!("{what}: {msg}; refusing to start (fail_closed = true)");
            if op != "prepare" {
                // libvirt aborts the start: take back what was applied for it
                remove_domain(ctx, cfg, name, &cfg_name, what);
            }
            1
        } else {
            tracing::warn!("{what}: {msg}");
            0
        }
    };
    let own_errors = own_errors(&own, &cfg_name);
    if op == "prepare" {
        let mut problems = own_errors;
        problems.extend(reconcile::conflicts_with_running(
            ctx, &own, &cfg_name, name,
        ));
        return if problems.is_empty() {
            0
        } else {
            refuse(problems.join("; "))
        };
    }
    let domain = match parsed {
        Ok(d) => d,
        Err(e) => return refuse(format!("cannot read the domain XML on stdin: {e}")),
    };
    // only this domain's forwards change; the kernel gets the delta
    let result = reconcile::reconcile_scoped(
        ctx,
        cfg,
        |_| reconcile::facts_for_domain(ctx, Some(&domain)),
        |st| {
            st.stopped.remove(name);
            st.started.insert(name.to_string(), domain.clone());
        },
        reconcile::Scope::Domain(&cfg_name),
    );
    match result {
        Err(e) => refuse(format!("cannot apply forwards: {e}")),
        Ok(out) => {
            let code = outcome_code(&out, &cfg_name, &own_errors, what, refuse);
            exiting(out);
            code
        }
    }
}

/// The exit status for a started domain's reconcile outcome.
fn outcome_code(
    out: &reconcile::Outcome,
    cfg_name: &str,
    own_errors: &[String],
    what: &str,
    refuse: impl Fn(String) -> u8,
) -> u8 {
    {
        {
            let mine: Vec<_> = out
                .forwards
                .iter()
                .filter(|f| f.domain == cfg_name)
                .collect();
            let bad: Vec<String> = mine
                .iter()
                .filter(|f| !matches!(f.state, ForwardState::Active | ForwardState::Stopped))
                .map(|f| {
                    format!(
                        "{} is {:?}: {}",
                        f.spec.short(),
                        f.state,
                        f.reason.clone().unwrap_or_default()
                    )
                    .to_lowercase()
                })
                .collect();
            let active = mine
                .iter()
                .filter(|f| f.state == ForwardState::Active)
                .count();
            if !mine.is_empty() {
                tracing::info!("{what}: {active} of {} forward(s) active", mine.len());
            }
            if !own_errors.is_empty() {
                return refuse(own_errors.join("; "));
            }
            if bad.is_empty() {
                0
            } else {
                refuse(format!(
                    "{} (add a <dhcp><host> reservation or guest_address, or run the virtgate daemon to learn addresses)",
                    bad.join("; ")
                ))
            }
        }
    }
}
