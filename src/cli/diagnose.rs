//! `virtgate diagnose DOMAIN [PORT] [--json]`: the path a packet takes to the domain's
//! forwards, step by step, what holds and what blocks, with the fix for what blocks. Exit
//! 0 when the path is clear, 1 when something blocks. Changes nothing.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde::Serialize;

use super::{Context, load_config};
use crate::model::Proto;
use crate::plan::ForwardState;
use crate::{reconcile, state};

#[derive(Serialize)]
struct Step {
    step: &'static str,
    ok: bool,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    fix: Option<String>,
}

fn pass(step: &'static str, detail: impl Into<String>) -> Step {
    Step {
        step,
        ok: true,
        detail: detail.into(),
        fix: None,
    }
}

fn block(step: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Step {
    Step {
        step,
        ok: false,
        detail: detail.into(),
        fix: Some(fix.into()),
    }
}

/// The steps, in the order a packet (and the config before it) meets them; stops early
/// where nothing after a block can be judged.
fn steps(ctx: &Context, domain: &str, port: Option<u16>) -> Result<Vec<Step>, String> {
    let mut out = Vec::new();
    let cfg = load_config(ctx)?;
    if cfg.invalid_domains.contains(domain) {
        let errs: Vec<String> = cfg
            .errors()
            .filter(|e| e.domain.as_deref() == Some(domain))
            .map(|e| e.to_string())
            .collect();
        out.push(block(
            "config",
            format!("the entry has errors: {}", errs.join("; ")),
            "fix them (`virtgate check` shows where)",
        ));
        return Ok(out);
    }
    let Some(entry) = cfg.domains.get(domain) else {
        out.push(block(
            "config",
            format!("no entry for domain {domain:?}"),
            format!("virtgate add {domain} HOST_PORT:GUEST_PORT"),
        ));
        return Ok(out);
    };
    let wanted = |h: &crate::model::PortRange| port.is_none_or(|p| h.start <= p && p <= h.end);
    let n = entry
        .domain
        .forwards
        .iter()
        .filter(|f| wanted(&f.host_ports))
        .count();
    if n == 0 {
        out.push(block(
            "config",
            format!(
                "domain {domain:?} has no forward of port {}",
                port.unwrap_or(0)
            ),
            format!("virtgate add {domain} {}:GUEST_PORT", port.unwrap_or(0)),
        ));
        return Ok(out);
    }
    out.push(pass("config", format!("{n} forward(s) configured")));
    let st = state::read_state(&state::state_file(&ctx.state_dir)).map_err(|e| e.to_string())?;
    let facts = reconcile::facts_for(ctx, &st);
    let merged = cfg.with_metadata(&facts.domains);
    let running = facts.domain(domain, entry.domain.uuid.as_deref()).is_some()
        || merged.domains.get(domain).is_some_and(|d| {
            facts
                .domain(&d.domain.name, d.domain.uuid.as_deref())
                .is_some()
        });
    if !running {
        out.push(block(
            "running",
            "the domain is not running",
            format!("virsh start {domain}"),
        ));
        return Ok(out);
    }
    out.push(pass("running", "the domain is running"));
    let plan = reconcile::plan_only(&cfg, &facts, &st);
    let mine: Vec<_> = plan
        .forwards
        .iter()
        .filter(|f| f.domain == domain && wanted(&f.spec.host_ports))
        .collect();
    let mut active = Vec::new();
    for f in &mine {
        let what = f.spec.short();
        match f.state {
            ForwardState::Active => {
                let g: Vec<String> = f
                    .guest
                    .iter()
                    .map(|g| format!("{} ({:?})", g.ip, g.source).to_lowercase())
                    .collect();
                out.push(pass("address", format!("{what}: guest {}", g.join(", "))));
                active.push(*f);
            }
            s => out.push(block(
                "address",
                format!(
                    "{what}: {}{}",
                    format!("{s:?}").to_lowercase(),
                    f.reason
                        .as_deref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                ),
                "give the guest a <dhcp><host> reservation or guest_address, or wait for its lease (the daemon applies it then)",
            )),
        }
    }
    if active.is_empty() {
        return Ok(out);
    }
    // the kernel: virtgate's rules as planned, and the accept above libvirt's reject
    let backend = ctx.backend_for(&cfg);
    let installed: std::collections::BTreeSet<&str> =
        st.ruleset.rules.iter().map(|r| r.id.as_str()).collect();
    let applied = active
        .iter()
        .all(|f| f.rule_ids.iter().all(|id| installed.contains(id.as_str())));
    let holds = crate::firewall::holds(backend.as_ref(), &st.ruleset, st.generation)
        .map_err(|e| e.to_string())?
        .0;
    if !applied {
        out.push(block(
            "kernel",
            "the forward is planned but not applied",
            "virtgate apply (the daemon does it by itself)",
        ));
    } else if !holds {
        out.push(block(
            "kernel",
            format!(
                "the kernel no longer holds what virtgate applied ({} backend): its rules or the accept in libvirt's chain were changed or removed",
                backend.name()
            ),
            "virtgate apply (the daemon repairs it by itself)",
        ));
    } else {
        out.push(pass(
            "kernel",
            format!(
                "virtgate's rules and the accept placement are in the kernel ({} backend)",
                backend.name()
            ),
        ));
    }
    match facts.sysctls.ip_forward {
        Some(false) => out.push(block(
            "ip_forward",
            "net.ipv4.ip_forward is 0: the kernel routes nothing to a guest",
            "sysctl -w net.ipv4.ip_forward=1 (and in /etc/sysctl.d to keep it)",
        )),
        _ => out.push(pass("ip_forward", "net.ipv4.ip_forward is on")),
    }
    out.extend(foreign_steps(&active));
    for f in &active {
        let bridge = f.bridge.as_deref().unwrap_or("?");
        if f.spec.localhost && !facts.sysctls.route_localnet_on(bridge) {
            out.push(block(
                "route_localnet",
                format!(
                    "{}: localhost forwarding needs route_localnet on {bridge}",
                    f.spec.short()
                ),
                format!("sysctl -w net.ipv4.conf.{bridge}.route_localnet=1"),
            ));
        }
    }
    // with br_netfilter, the guest reaching its own forward needs hairpin mode on its port
    // (set by apply: not a step of its own before the forward is applied)
    if applied && facts.sysctls.bridge_nf_call_iptables == Some(true) {
        let taps: std::collections::BTreeSet<&str> = plan
            .ruleset
            .rules
            .iter()
            .filter(|r| r.domain == domain)
            .filter_map(|r| r.tap.as_deref())
            .collect();
        for tap in taps {
            match crate::bridge::get(tap) {
                Some(true) => out.push(pass("hairpin", format!("hairpin mode is on for {tap}"))),
                Some(false) => out.push(block(
                    "hairpin",
                    format!("hairpin mode is off for {tap}: with br_netfilter the guest cannot reach its own forward through the public address"),
                    "virtgate apply (it sets it, and restores it when the forwards go)",
                )),
                None => {}
            }
        }
    }
    // the guest itself: a bounded TCP connect from the host to the guest's port
    for f in &active {
        let Some(g) = f.guest.first() else { continue };
        let what = format!("{}:{}", g.ip, f.spec.guest_ports.start);
        if f.spec.proto != Proto::Tcp {
            out.push(pass(
                "guest",
                format!(
                    "{what}/{}: not testable without a reply (only TCP is tried)",
                    f.spec.proto
                ),
            ));
            continue;
        }
        let addr = SocketAddr::new(g.ip, f.spec.guest_ports.start);
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(_) => out.push(pass("guest", format!("{what} accepts connections"))),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => out.push(block(
                "guest",
                format!("nothing listens on {what} in the guest (connection refused)"),
                "start the service in the guest, on that port and on that address",
            )),
            Err(e) => out.push(block(
                "guest",
                format!("no answer from {what} ({e}): the guest is down, or its firewall drops it"),
                "check the guest's firewall and that it is up",
            )),
        }
    }
    // counters: how many packets so far, and whether they move (over one second)
    let packets = || {
        let counters = backend.counters(&st.ruleset).unwrap_or_default();
        active
            .iter()
            .flat_map(|f| f.rule_ids.iter())
            .filter_map(|id| counters.get(id))
            .map(|c| c.packets)
            .sum::<u64>()
    };
    let before = packets();
    std::thread::sleep(Duration::from_secs(1));
    let counters = backend.counters(&st.ruleset).unwrap_or_default();
    let ids = || active.iter().flat_map(|f| f.rule_ids.iter());
    let now: u64 = ids()
        .filter_map(|id| counters.get(id))
        .map(|c| c.packets)
        .sum();
    let limited: u64 = ids()
        .filter_map(|id| counters.get(id))
        .map(|c| c.rate_limited)
        .sum();
    let moved = now.saturating_sub(before);
    let mut detail = if moved > 0 {
        format!(
            "{before} packet(s) counted through these forwards, {moved} in the last second: traffic flows"
        )
    } else {
        format!(
            "{before} packet(s) counted through these forwards, none in the last second (no traffic now)"
        )
    };
    if limited > 0 {
        detail.push_str(&format!(
            "; {limited} new connection(s) dropped by the rate limit"
        ));
    }
    out.push(pass("counters", detail));
    Ok(out)
}

/// Other tables' rules that drop a forward's flow (either way), from `nft -j list
/// ruleset`: a drop every match of which holds blocks; one behind a match that depends
/// on the client (its address, a named set) is named, and does not block.
fn foreign_steps(active: &[&crate::plan::ForwardStatus]) -> Vec<Step> {
    use crate::firewall::foreign::{Flow, drops};
    let ruleset = match crate::exec::run_if_installed(&["nft", "-j", "list", "ruleset"]) {
        Ok(Some(o)) if o.success => serde_json::from_str::<serde_json::Value>(&o.stdout).ok(),
        _ => None,
    };
    let Some(ruleset) = ruleset else {
        return vec![pass(
            "foreign",
            "no nftables ruleset to read (nft absent or refused): other tables not checked",
        )];
    };
    let mut out = Vec::new();
    for f in active {
        let (Some(g), Some(bridge)) = (f.guest.first(), f.bridge.as_deref()) else {
            continue;
        };
        for reply in [false, true] {
            let flow = Flow {
                proto: f.spec.proto,
                guest: g.ip,
                guest_port: f.spec.guest_ports.start,
                bridge,
                reply,
            };
            let way = if reply {
                "replies from"
            } else {
                "connections to"
            };
            for d in drops(&ruleset, &flow) {
                let what = format!(
                    "{}: {way} {}:{} ({}) meet {} in chain {}",
                    f.spec.short(),
                    g.ip,
                    flow.guest_port,
                    f.spec.proto,
                    d.what,
                    d.chain
                );
                if !d.certain {
                    out.push(pass(
                        "foreign",
                        format!("{what}, which may drop some of them (it depends on the client)"),
                    ));
                } else if d.chain.ends_with(" filter FORWARD") {
                    out.push(block(
                        "foreign",
                        format!("{what}, which drops them (iptables' FORWARD, as Docker sets it up)"),
                        "virtgate apply: it puts its accept at the top of that chain once the chain exists (the daemon does it by itself)",
                    ));
                } else {
                    out.push(block(
                        "foreign",
                        format!("{what}, which drops them"),
                        format!(
                            "let DNAT'ed flows through there, e.g. nft insert rule {} ct status dnat accept (for firewalld: a policy or zone that allows forwarding to {bridge})",
                            d.chain
                        ),
                    ));
                }
            }
        }
    }
    if out.is_empty() {
        out.push(pass(
            "foreign",
            "no other table drops these flows in a forward hook",
        ));
    }
    out
}

pub fn run(ctx: &Context, domain: &str, port: Option<u16>, json: bool) -> Result<bool, String> {
    let steps = steps(ctx, domain, port)?;
    let clear = steps.iter().all(|s| s.ok);
    if json {
        let v = serde_json::json!({ "domain": domain, "clear": clear, "steps": steps });
        println!(
            "{}",
            serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?
        );
    } else {
        for s in &steps {
            println!(
                "{} {:<14} {}",
                if s.ok { "ok     " } else { "BLOCKED" },
                s.step,
                s.detail
            );
            if let Some(f) = &s.fix {
                println!("        {:<14} fix: {f}", "");
            }
        }
        println!(
            "{}",
            if clear {
                "the path is clear"
            } else {
                "something blocks the path (above)"
            }
        );
    }
    Ok(clear)
}
