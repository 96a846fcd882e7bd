//! `virtgate check`: validate the config, print every problem with file:line:col.

use super::{Context, load_config};
use crate::facts::{self};
use crate::model::Listen;

/// Returns Ok(false) when the config has errors (exit 1).
pub fn run(ctx: &Context) -> Result<bool, String> {
    // forwards in the <metadata> of running domains are checked too
    let running = facts::libvirt::read_running_domains(&ctx.libvirt);
    let base = load_config(ctx)?;
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
    Ok(errors == 0)
}
