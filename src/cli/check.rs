//! `virtgate check`: validate the config, print every problem with file:line:col.

use super::{Context, load_config};
use crate::facts::{self};
use crate::model::Listen;

/// Returns Ok(false) when the config has errors (exit 1).
pub fn run(ctx: &Context) -> Result<bool, String> {
    // forwards in the <metadata> of running domains are checked too
    let running = facts::libvirt::read_running_domains(
        &ctx.libvirt,
        ctx.cache_dir().map(facts::cache::domains_file).as_deref(),
    );
    let base = load_config(ctx).inspect_err(|_| {
        if let Some(a) = running_daemon(ctx) {
            println!(
                "daemon (pid {}): keeps running the last config it could use",
                a.report.pid
            );
        }
    })?;
    let cfg = crate::reconcile::desired(&base, &running);
    for d in &cfg.diagnostics {
        println!("{d}");
    }
    let forwards: usize = cfg.domains.values().map(|d| d.domain.forwards.len()).sum();
    for d in cfg.domains.values() {
        for (f, o) in d.domain.forwards.iter().zip(&d.origins) {
            if f.localhost
                && let Listen::Address(a) = &f.listen
                && a.is_ipv6()
            {
                println!(
                    "{o}: warning: domain {:?}: localhost forwarding exists for 127.0.0.1 only; the kernel never routes ::1 to another host",
                    d.domain.name
                );
            }
        }
    }
    let sys = facts::sysctl::read();
    if sys.ip_forward == Some(false) {
        println!(
            "warning: net.ipv4.ip_forward is 0: forwards cannot reach guests (libvirt turns it on when it starts a NAT network)"
        );
    }
    let errors = cfg.errors().count();
    println!(
        "{}: {} domain(s), {forwards} forward(s), {errors} error(s) in {} file(s)",
        if errors == 0 { "ok" } else { "invalid" },
        cfg.domains.len(),
        cfg.files.len()
    );
    if let Some(line) = daemon_line(ctx, &cfg.fingerprint) {
        println!("{line}");
    }
    Ok(errors == 0)
}

/// Whether a running daemon runs the config just checked.
fn daemon_line(ctx: &Context, fingerprint: &[u8]) -> Option<String> {
    let a = running_daemon(ctx)?;
    let pid = a.report.pid;
    Some(if a.config != ctx.config_path {
        format!(
            "daemon (pid {pid}): runs another config, {}",
            a.config.display()
        )
    } else if a.config_fingerprint == crate::model::hex(fingerprint) {
        format!("daemon (pid {pid}): runs this config")
    } else {
        format!(
            "daemon (pid {pid}): runs an earlier version of this config (it keeps the last one it could use): `virtgate apply` or `systemctl reload virtgate` loads this one"
        )
    })
}

fn running_daemon(ctx: &Context) -> Option<crate::daemon::control::Answer> {
    super::ask_daemon(
        ctx,
        crate::daemon::control::Command::Check,
        std::time::Duration::from_secs(1),
    )
}
