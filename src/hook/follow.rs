//! After a libvirtd SIGHUP, without the daemon: libvirt runs the daemon hook `reload`
//! BEFORE its network driver reloads its firewall, and on libvirt's nftables form that
//! reload re-inserts libvirt's rules at the top of its chains, above virtgate's accept
//! (LIBVIRT-FACTS.md). What the `reload` hook re-asserts is buried right after it returns.
//! So the hook also starts a follower, detached from libvirt (its stdin, stdout and stderr
//! are /dev/null: libvirt waits for the hook's output to close), which re-asserts after
//! each burst of nf_tables commits for [`FOLLOW`], then exits. With the daemon running it
//! is redundant but harmless: both take the state lock, and the second finds nothing to do.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::reconcile::{Commits, Context};

/// How long the follower waits for libvirt's reload (libvirt starts it as soon as the
/// hook returns; seen taking 0.3 s with one network). `VIRTGATE_FOLLOW_SECS` in the
/// environment sets another (tests; libvirt scrubs the hook's environment).
pub const FOLLOW: Duration = Duration::from_secs(15);

fn follow_for() -> Duration {
    std::env::var("VIRTGATE_FOLLOW_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(FOLLOW, Duration::from_secs)
}
/// The hook operation of the follower (virtgate's own; libvirt never sends it).
pub const OP: &str = "follow-reload";
/// Quiet time that ends a burst of commits (libvirt reloads network after network).
const QUIET: Duration = Duration::from_millis(50);

/// Starts the follower and returns at once.
pub fn spawn(ctx: &Context) {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!("cannot follow libvirt's firewall reload: {e}");
            return;
        }
    };
    let mut c = Command::new(exe);
    // argv[0] "virtgate": read as a command line, even when this is the installed hook
    c.arg0("virtgate")
        .arg("--config")
        .arg(&ctx.config_path)
        .arg("--state-dir")
        .arg(&ctx.state_dir)
        .arg("--libvirt-root")
        .arg(&ctx.libvirt.root)
        .args(["--backend", super::settings::backend_name(ctx.backend)])
        .args(["hook", "daemon", "-", OP, "begin", "-"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .envs(std::env::var_os("VIRTGATE_FOLLOW_SECS").map(|v| ("VIRTGATE_FOLLOW_SECS", v)))
        // not in libvirt's process group
        .process_group(0);
    match c.spawn() {
        // not waited for: it outlives this hook
        Ok(child) => tracing::debug!("following libvirt's firewall reload (pid {})", child.id()),
        Err(e) => tracing::warn!("cannot follow libvirt's firewall reload: {e}"),
    }
}

/// The follower: re-asserts now (for a reload that was over before it subscribed), then
/// after each burst of commits until [`FOLLOW`] has passed.
pub fn run(ctx: &Context) {
    let follow = follow_for();
    nix::unistd::alarm::set(follow.as_secs().min(3600) as u32 + super::DEADLINE_SECS);
    let commits = match Commits::subscribe() {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!("cannot follow nf_tables commits ({e}); re-asserting once");
            None
        }
    };
    let what = "after libvirt's firewall reload";
    super::reassert(ctx, what, None);
    let Some(commits) = commits else {
        return;
    };
    let until = Instant::now() + follow;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || !commits.wait(left) {
            return;
        }
        commits.settle(QUIET, Duration::from_secs(2));
        super::reassert(ctx, what, None);
    }
}
