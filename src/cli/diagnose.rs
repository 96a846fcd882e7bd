//! `virtgate diagnose DOMAIN [PORT] [--json]`: the path a packet takes to the domain's
//! forwards, step by step, what holds and what blocks, with the fix for what blocks. Exit
//! 0 when the path is clear, 1 when something blocks. Changes nothing.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde::Serialize;

use std::collections::BTreeSet;

use super::{Context, load_config};
use crate::firewall::Backend;
use crate::model::{PortRange, Proto};
use crate::plan::{ForwardState, ForwardStatus};
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
    let wanted = |h: &PortRange| port.is_none_or(|p| h.start <= p && p <= h.end);
    let entry = match config_step(&cfg, domain, port, &wanted) {
        Ok((entry, step)) => {
            out.push(step);
            entry
        }
        Err(step) => return Ok(vec![step]),
    };
    let st = state::read_state(&state::state_file(&ctx.state_dir)).map_err(|e| e.to_string())?;
    let facts = reconcile::facts_for(ctx, &st);
    let reconcile::Planned {
        config: merged,
        plan,
    } = reconcile::plan_only(&cfg, &facts, &st);
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
    let active = address_steps(&plan, domain, &wanted, &mut out);
    if active.is_empty() {
        return Ok(out);
    }
    let backend = ctx.backend_for(&cfg);
    let applied = kernel_step(backend.as_ref(), &st, &active, &mut out)?;
    out.push(ip_forward_step(&facts));
    out.extend(foreign_steps(&active));
    out.extend(route_localnet_steps(&facts, &active));
    // with br_netfilter, the guest reaching its own forward needs hairpin mode on its port
    // (set by apply: not a step of its own before the forward is applied)
    if applied && facts.sysctls.bridge_nf_call_iptables == Some(true) {
        out.extend(hairpin_steps(&plan, domain));
    }
    out.extend(active.iter().filter_map(|f| guest_step(f)));
    out.push(counters_step(backend.as_ref(), &st, &active));
    Ok(out)
}

/// The domain's entry: there, valid, with a forward of `port`.
fn config_step<'c>(
    cfg: &'c crate::config::Config,
    domain: &str,
    port: Option<u16>,
    wanted: &dyn Fn(&PortRange) -> bool,
) -> Result<(&'c crate::config::ConfiguredDomain, Step), Step> {
    if cfg.invalid_domains.contains(domain) {
        let errs: Vec<String> = cfg
            .errors()
            .filter(|e| e.domain.as_deref() == Some(domain))
            .map(|e| e.to_string())
            .collect();
        return Err(block(
            "config",
            format!("the entry has errors: {}", errs.join("; ")),
            "fix them (`virtgate check` shows where)",
        ));
    }
    let Some(entry) = cfg.domains.get(domain) else {
        return Err(block(
            "config",
            format!("no entry for domain {domain:?}"),
            format!("virtgate add {domain} HOST_PORT:GUEST_PORT"),
        ));
    };
    let n = entry
        .domain
        .forwards
        .iter()
        .filter(|f| wanted(&f.host_ports))
        .count();
    if n == 0 {
        let p = port.unwrap_or(0);
        return Err(block(
            "config",
            format!("domain {domain:?} has no forward of port {p}"),
            format!("virtgate add {domain} {p}:GUEST_PORT"),
        ));
    }
    Ok((entry, pass("config", format!("{n} forward(s) configured"))))
}

/// Each forward's guest address (and where it comes from), or why it is pending; the
/// forwards that are active.
fn address_steps<'p>(
    plan: &'p crate::plan::Plan,
    domain: &str,
    wanted: &dyn Fn(&PortRange) -> bool,
    out: &mut Vec<Step>,
) -> Vec<&'p ForwardStatus> {
    let mut active = Vec::new();
    for f in plan
        .forwards
        .iter()
        .filter(|f| f.domain == domain && wanted(&f.spec.host_ports))
    {
        let what = f.spec.short();
        if f.state == ForwardState::Active {
            let g: Vec<String> = f
                .guest
                .iter()
                .map(|g| format!("{} ({:?})", g.ip, g.source).to_lowercase())
                .collect();
            out.push(pass("address", format!("{what}: guest {}", g.join(", "))));
            active.push(f);
            continue;
        }
        let reason = f
            .reason
            .as_deref()
            .map(|r| format!(": {r}"))
            .unwrap_or_default();
        out.push(block(
            "address",
            format!("{what}: {}{reason}", format!("{:?}", f.state).to_lowercase()),
            "give the guest a <dhcp><host> reservation or guest_address, or wait for its lease (the daemon applies it then)",
        ));
    }
    active
}

/// virtgate's rules as planned in the kernel, and the accept above libvirt's reject;
/// whether the forwards are applied at all.
fn kernel_step(
    backend: &dyn Backend,
    st: &state::State,
    active: &[&ForwardStatus],
    out: &mut Vec<Step>,
) -> Result<bool, String> {
    let installed: BTreeSet<&str> = st.ruleset.rules.iter().map(|r| r.id.as_str()).collect();
    let applied = active
        .iter()
        .all(|f| f.rule_ids.iter().all(|id| installed.contains(id.as_str())));
    let holds = crate::firewall::holds(backend, &st.ruleset, st.generation)
        .map_err(|e| e.to_string())?
        .0;
    let name = backend.name();
    out.push(if !applied {
        block(
            "kernel",
            "the forward is planned but not applied",
            "virtgate apply (the daemon does it by itself)",
        )
    } else if !holds {
        block(
            "kernel",
            format!("the kernel no longer holds what virtgate applied ({name} backend): its rules or the accept in libvirt's chain were changed or removed"),
            "virtgate apply (the daemon repairs it by itself)",
        )
    } else {
        pass(
            "kernel",
            format!("virtgate's rules and the accept placement are in the kernel ({name} backend)"),
        )
    });
    Ok(applied)
}

fn ip_forward_step(facts: &crate::facts::Facts) -> Step {
    match facts.sysctls.ip_forward {
        Some(false) => block(
            "ip_forward",
            "net.ipv4.ip_forward is 0: the kernel routes nothing to a guest",
            "sysctl -w net.ipv4.ip_forward=1 (and in /etc/sysctl.d to keep it)",
        ),
        _ => pass("ip_forward", "net.ipv4.ip_forward is on"),
    }
}

/// `localhost` forwards need `route_localnet` on the guest's bridge (reported, never set).
fn route_localnet_steps(facts: &crate::facts::Facts, active: &[&ForwardStatus]) -> Vec<Step> {
    active
        .iter()
        .filter_map(|f| {
            let bridge = f.bridge.as_deref().unwrap_or("?");
            (f.spec.localhost && !facts.sysctls.route_localnet_on(bridge)).then(|| {
                block(
                    "route_localnet",
                    format!(
                        "{}: localhost forwarding needs route_localnet on {bridge}",
                        f.spec.short()
                    ),
                    format!("sysctl -w net.ipv4.conf.{bridge}.route_localnet=1"),
                )
            })
        })
        .collect()
}

/// Hairpin mode on the domain's bridge ports.
fn hairpin_steps(plan: &crate::plan::Plan, domain: &str) -> Vec<Step> {
    let taps: BTreeSet<&str> = plan
        .ruleset
        .rules
        .iter()
        .filter(|r| r.domain == domain)
        .filter_map(|r| r.tap.as_deref())
        .collect();
    taps.into_iter()
        .filter_map(|tap| match crate::bridge::get(tap) {
            Some(true) => Some(pass("hairpin", format!("hairpin mode is on for {tap}"))),
            Some(false) => Some(block(
                "hairpin",
                format!("hairpin mode is off for {tap}: with br_netfilter the guest cannot reach its own forward through the public address"),
                "virtgate apply (it sets it, and restores it when the forwards go)",
            )),
            None => None,
        })
        .collect()
}

/// The guest itself: a bounded TCP connect from the host to the guest's port.
fn guest_step(f: &ForwardStatus) -> Option<Step> {
    let g = f.guest.first()?;
    let what = format!("{}:{}", g.ip, f.spec.guest_ports.start);
    if f.spec.proto != Proto::Tcp {
        return Some(pass(
            "guest",
            format!(
                "{what}/{}: not testable without a reply (only TCP is tried)",
                f.spec.proto
            ),
        ));
    }
    let addr = SocketAddr::new(g.ip, f.spec.guest_ports.start);
    Some(
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(_) => pass("guest", format!("{what} accepts connections")),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => block(
                "guest",
                format!("nothing listens on {what} in the guest (connection refused)"),
                "start the service in the guest, on that port and on that address",
            ),
            Err(e) => block(
                "guest",
                format!("no answer from {what} ({e}): the guest is down, or its firewall drops it"),
                "check the guest's firewall and that it is up",
            ),
        },
    )
}

/// The counters: how many packets so far, whether they move (over one second), and what
/// a rate limit dropped.
fn counters_step(backend: &dyn Backend, st: &state::State, active: &[&ForwardStatus]) -> Step {
    // the forwards' counters summed: (packets, new connections a rate limit dropped)
    let read = || {
        let counters = backend.counters(&st.ruleset).unwrap_or_default();
        active
            .iter()
            .flat_map(|f| f.rule_ids.iter())
            .filter_map(|id| counters.get(id))
            .fold((0u64, 0u64), |(p, l), c| {
                (p + c.packets, l + c.rate_limited)
            })
    };
    let (before, _) = read();
    std::thread::sleep(Duration::from_secs(1));
    let (after, limited) = read();
    let moved = after.saturating_sub(before);
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
    pass("counters", detail)
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
