//! `virtgate status [--json]`: every forward with its guest address and where it came from,
//! its state and its counters.

use serde::Serialize;

use super::{Context, load_config};
use crate::config::Config;
use crate::facts::Facts;
use crate::firewall::Counters;
use crate::plan::{ForwardState, ForwardStatus, GuestAddr};
use crate::reconcile;
use crate::rules::Ruleset;
use crate::state;

#[derive(Serialize)]
struct Row<'a> {
    domain: &'a str,
    listen: String,
    proto: String,
    host_ports: String,
    guest_ports: String,
    guest: &'a [GuestAddr],
    bridge: Option<&'a str>,
    state: ForwardState,
    packets: u64,
    bytes: u64,
    /// New connections forwarded.
    connections: u64,
    /// The rate limit, and the new connections it dropped.
    #[serde(skip_serializing_if = "Option::is_none")]
    rate: Option<String>,
    rate_limited: u64,
    description: Option<&'a str>,
    note: Option<String>,
}

/// A domain whose config entry has an error: what virtgate installed for it stays.
#[derive(Serialize)]
struct Invalid {
    domain: String,
    errors: Vec<String>,
    kept_rules: usize,
}

#[derive(Serialize)]
struct Report<'a> {
    backend: &'a str,
    forwards: Vec<Row<'a>>,
    invalid_domains: Vec<Invalid>,
    warnings: Vec<String>,
    /// The running daemon's report (None: no daemon runs).
    daemon: Option<crate::daemon::Report>,
}

/// `s` with control characters escaped (`\n`, `\u{1b}`): names come from config and
/// libvirt files, and must not print rows or terminal sequences of their own.
fn printable(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// One line about the daemon.
fn daemon_line(d: Option<&crate::daemon::Report>) -> String {
    let Some(d) = d else {
        return "daemon: not running (forwards are kept by the hooks and `virtgate apply`)"
            .to_string();
    };
    let mut line = format!(
        "daemon: running (pid {}): {} event(s), {} reconcile(s), {} change(s), {} repair(s) after changes by others",
        d.pid, d.events, d.reconciles, d.applies, d.heals
    );
    if d.libvirt_connects > 0 {
        line.push_str(&format!(
            "; {} event(s) from libvirt's event API",
            d.libvirt_events
        ));
    } else {
        line.push_str("; not connected to libvirt's event API (following its files)");
    }
    if d.backoff_secs > 0 {
        line.push_str(&format!(
            "; something keeps removing virtgate's rules: repairs wait {} s",
            d.backoff_secs
        ));
    }
    if let Some(e) = &d.last_error {
        line.push_str(&format!("; last error: {e}"));
    }
    line
}

/// Counters by rule id, and the ids installed: hashed, as `row` asks each 10,000 times.
type ById<'c> = std::collections::HashMap<&'c str, &'c Counters>;
type Installed<'s> = std::collections::HashSet<&'s str>;

fn row<'a>(f: &'a ForwardStatus, counters: &ById, drifted: bool, installed: &Installed) -> Row<'a> {
    let c = f
        .rule_ids
        .iter()
        .filter_map(|id| counters.get(id.as_str()).copied())
        .fold(Counters::default(), |a, b| Counters {
            packets: a.packets + b.packets,
            bytes: a.bytes + b.bytes,
            rate_limited: a.rate_limited + b.rate_limited,
            connections: a.connections + b.connections,
        });
    // planned but not installed yet (e.g. its address appeared after the last apply)
    let not_applied = f.state == ForwardState::Active
        && f.rule_ids.iter().any(|id| !installed.contains(id.as_str()));
    let state = if not_applied {
        ForwardState::Pending
    } else if drifted && f.state == ForwardState::Active {
        ForwardState::Drifted
    } else {
        f.state
    };
    Row {
        domain: &f.domain,
        listen: f.spec.listen.to_string(),
        proto: f.spec.proto.to_string(),
        host_ports: f.spec.host_ports.to_string(),
        guest_ports: f.spec.guest_ports.to_string(),
        guest: &f.guest,
        bridge: f.bridge.as_deref(),
        state,
        packets: c.packets,
        bytes: c.bytes,
        connections: c.connections,
        rate: f.spec.rate.map(|l| l.to_string()),
        rate_limited: c.rate_limited,
        description: f.spec.description.as_deref(),
        note: if state == ForwardState::Drifted {
            Some("the kernel no longer holds what virtgate applied; run `virtgate apply`".into())
        } else if not_applied {
            Some("the guest address is known now but not applied yet; run `virtgate apply` (the daemon does it by itself)".into())
        } else {
            f.reason.clone()
        },
    }
}

pub fn run(ctx: &Context, json: bool) -> Result<(), String> {
    let cfg = load_config(ctx)?;
    let st = state::read_state(&state::state_file(&ctx.state_dir)).map_err(|e| e.to_string())?;
    let facts = reconcile::facts_for(ctx, &st);
    let backend = ctx.backend_for(&cfg);
    // as the last apply left them (its statuses; the kernel holds its rules), or planned
    let shown = reconcile::statuses::shown(ctx, &cfg, &facts, &st, backend.as_ref());
    let planned = shown.ruleset.as_ref().unwrap_or(&st.ruleset);
    let counters = backend.counters(&st.ruleset).unwrap_or_default();
    let drifted = !crate::firewall::holds(backend.as_ref(), &st.ruleset, st.generation)
        .map_err(|e| e.to_string())?
        .0;
    let installed: Installed = st.ruleset.rules.iter().map(|r| r.id.as_str()).collect();
    let counters: ById = counters.iter().map(|(id, c)| (id.as_str(), c)).collect();
    let rep = Report {
        backend: backend.name(),
        forwards: shown
            .forwards
            .iter()
            .map(|f| row(f, &counters, drifted, &installed))
            .collect(),
        invalid_domains: invalid(&shown.config, planned),
        warnings: warnings(planned, &facts),
        daemon: super::ask_daemon(
            ctx,
            crate::daemon::control::Command::Status,
            std::time::Duration::from_secs(1),
        )
        .map(|a| a.report)
        .or_else(|| crate::daemon::running_report(&ctx.state_dir)),
    };
    if json {
        // compact, written as it is serialized (10,000 forwards: pretty-printing cost
        // more than everything else status does)
        use std::io::Write as _;
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        serde_json::to_writer(&mut out, &rep).map_err(|e| e.to_string())?;
        writeln!(out)
            .and_then(|_| out.flush())
            .map_err(super::output_error)?;
    } else {
        print_table(&rep);
    }
    Ok(())
}

/// What keeps forwards from working that is not virtgate's to change.
fn warnings(planned: &Ruleset, facts: &Facts) -> Vec<String> {
    let mut warnings = Vec::new();
    if facts.sysctls.ip_forward == Some(false) {
        warnings.push("net.ipv4.ip_forward is 0: no forward can reach a guest".to_string());
    }
    for r in planned.rules.iter().filter(|r| r.localhost) {
        if !facts.sysctls.route_localnet_on(&r.bridge) {
            warnings.push(format!(
                "domain {:?} {}: localhost forwarding needs net.ipv4.conf.{}.route_localnet=1 (not changed by virtgate)",
                r.domain, r.host_ports, r.bridge
            ));
        }
    }
    if facts.sysctls.bridge_nf_call_iptables == Some(true) {
        for r in planned.rules.iter().filter(|r| r.tap.is_none()) {
            warnings.push(format!(
                "domain {:?}: br_netfilter is active and the guest's bridge port is unknown, so hairpin mode cannot be set: the guest cannot reach its own forward through the public address",
                r.domain
            ));
        }
    }
    warnings
}

/// Domains whose config is invalid, with their errors and the rules kept for them.
fn invalid(merged: &Config, planned: &Ruleset) -> Vec<Invalid> {
    merged
        .invalid_domains
        .iter()
        .map(|d| Invalid {
            domain: d.clone(),
            errors: merged
                .errors()
                .filter(|e| e.domain.as_deref() == Some(d.as_str()))
                .map(|e| e.to_string())
                .collect(),
            kept_rules: planned.rules.iter().filter(|r| &r.domain == d).count(),
        })
        .collect()
}

fn print_table(rep: &Report) {
    println!(
        "{:<20} {:<18} {:<5} {:<12} {:<32} {:<9} {:>7} {:>9} {:>11}",
        "DOMAIN", "LISTEN", "PROTO", "HOST", "GUEST", "STATE", "CONNS", "PACKETS", "BYTES"
    );
    for r in &rep.forwards {
        let guest = if r.guest.is_empty() {
            format!("-:{}", r.guest_ports)
        } else {
            r.guest
                .iter()
                .map(|g| format!("{}:{} ({:?})", g.ip, r.guest_ports, g.source).to_lowercase())
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "{:<20} {:<18} {:<5} {:<12} {:<32} {:<9} {:>7} {:>9} {:>11}",
            printable(r.domain),
            printable(&r.listen),
            r.proto,
            r.host_ports,
            printable(&guest),
            format!("{:?}", r.state).to_lowercase(),
            r.connections,
            r.packets,
            r.bytes
        );
        if let Some(rate) = &r.rate {
            println!(
                "    rate limit {rate}: {} new connection(s) dropped",
                r.rate_limited
            );
        }
        if let Some(n) = &r.note {
            println!("    {}", printable(n));
        }
    }
    for i in &rep.invalid_domains {
        println!(
            "{:<20} invalid config: {} rule(s) kept as installed; {}",
            printable(&i.domain),
            i.kept_rules,
            printable(&i.errors.join("; "))
        );
    }
    for w in &rep.warnings {
        println!("warning: {}", printable(w));
    }
    println!("{}", printable(&daemon_line(rep.daemon.as_ref())));
}

#[cfg(test)]
mod tests {
    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(super::printable("web"), "web");
        assert_eq!(
            super::printable("a\nweb  0.0.0.0 \u{1b}[2J"),
            "a\\nweb  0.0.0.0 \\u{1b}[2J"
        );
    }
}
