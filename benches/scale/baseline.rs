//! The baselines every figure is compared with, measured in the same run:
//! * per-rule processes: what hook scripts do, one `iptables` process per rule, four rules
//!   per forward (nat PREROUTING and OUTPUT DNAT, FORWARD accept, POSTROUTING masquerade);
//! * the whole-table design: one `nft -f` of virtgate's full table for every change (what
//!   virtgate did up to 6e46190).

use std::time::Duration;

use crate::common::Netns;
use crate::measure::{Run, run_in};
use crate::world::{WEB_PORT, World, ip, libvirt_iptables};

/// The four rules of one forward, as a hook script adds them (`-A`/`-I` arguments).
fn forward_rules(port: u16, guest: &str) -> [Vec<String>; 4] {
    let p = port.to_string();
    let to = format!("{guest}:80");
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    [
        s(&[
            "-t",
            "nat",
            "PREROUTING",
            "-p",
            "tcp",
            "--dport",
            &p,
            "-j",
            "DNAT",
            "--to-destination",
            &to,
        ]),
        s(&[
            "-t",
            "nat",
            "OUTPUT",
            "-p",
            "tcp",
            "--dport",
            &p,
            "-j",
            "DNAT",
            "--to-destination",
            &to,
        ]),
        s(&[
            "-t", "filter", "FORWARD", "-d", guest, "-p", "tcp", "--dport", "80", "-j", "ACCEPT",
        ]),
        s(&[
            "-t",
            "nat",
            "POSTROUTING",
            "-s",
            "192.168.0.0/16",
            "-d",
            guest,
            "-p",
            "tcp",
            "--dport",
            "80",
            "-j",
            "MASQUERADE",
        ]),
    ]
}

/// The argument vector of one `iptables` process for a rule of [`forward_rules`].
fn iptables_argv(rule: &[String], verb_for: impl Fn(&str) -> &'static str) -> Vec<String> {
    let (table, chain, rest) = (&rule[..2], &rule[2], &rule[3..]);
    let mut argv: Vec<String> = vec!["iptables".into(), "-w".into()];
    argv.extend(table.iter().cloned());
    argv.push(verb_for(chain).into());
    argv.push(chain.clone());
    argv.extend(rest.iter().cloned());
    argv
}

/// `iptables-restore --noflush` input holding the rules of `n` forwards.
fn preload(n: usize) -> String {
    let mut nat = String::from("*nat\n");
    let mut filter = String::from("*filter\n");
    for i in 0..n {
        let d = i / 10;
        let port = 20000 + i;
        let g = ip(d);
        nat.push_str(&format!(
            "-A PREROUTING -p tcp --dport {port} -j DNAT --to-destination {g}:80\n-A OUTPUT -p tcp --dport {port} -j DNAT --to-destination {g}:80\n-A POSTROUTING -s 192.168.0.0/16 -d {g} -p tcp --dport 80 -j MASQUERADE\n"
        ));
        filter.push_str(&format!("-I FORWARD -d {g} -p tcp --dport 80 -j ACCEPT\n"));
    }
    format!("{nat}COMMIT\n{filter}COMMIT\n")
}

/// A host for the per-rule baseline with `others` forwards' rules installed.
pub struct PerRule {
    pub host: Netns,
}

impl PerRule {
    pub fn new(others: usize) -> PerRule {
        let host = Netns::new("p");
        host.exec_stdin(
            &["iptables-restore", "--noflush"],
            &libvirt_iptables("virbr0", "192.168.0.0/16"),
        );
        host.exec_stdin(&["iptables-restore", "--noflush"], &preload(others));
        PerRule { host }
    }

    /// Adds (`add`) or deletes the rules of web's 10 forwards, one process per rule.
    pub fn web(&self, add: bool) -> Duration {
        let mut total = Duration::ZERO;
        for k in 0..10 {
            for rule in forward_rules(WEB_PORT + k, "192.168.250.1") {
                let argv = iptables_argv(&rule, |chain| match (add, chain) {
                    (true, "FORWARD") => "-I",
                    (true, _) => "-A",
                    (false, _) => "-D",
                });
                total += run_in(&self.host.name, &argv, None, &[]).time;
            }
        }
        total
    }

    /// Applies `n` forwards from empty, one process per rule.
    pub fn apply_from_empty(n: usize) -> Duration {
        let host = Netns::new("q");
        host.exec_stdin(
            &["iptables-restore", "--noflush"],
            &libvirt_iptables("virbr0", "192.168.0.0/16"),
        );
        let mut total = Duration::ZERO;
        for i in 0..n {
            let g = ip(i / 10);
            for rule in forward_rules(20000 + i as u16, &g) {
                let argv =
                    iptables_argv(&rule, |chain| if chain == "FORWARD" { "-I" } else { "-A" });
                total += run_in(&host.name, &argv, None, &[]).time;
            }
        }
        total
    }
}

/// The whole-table design: every change loads virtgate's full table (as `render` prints
/// it for the world with web running) in one `nft -f`.
pub fn whole_table_text(w: &World) -> String {
    let status = w.root().join("run/libvirt/qemu/web.xml");
    let xml = format!(
        "<domstatus state='running' reason='booted' pid='1'>\n{}</domstatus>\n",
        crate::world::domain_xml("web", w.web())
    );
    std::fs::write(&status, xml).expect("write");
    let argv = w.virtgate("nftables", &["render"]);
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &w.host.name])
        .args(&argv)
        .output()
        .expect("render");
    let _ = std::fs::remove_file(&status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn whole_table(ns: &Netns, text: &str) -> Run {
    run_in(
        &ns.name,
        &["nft".into(), "-f".into(), "-".into()],
        Some(text),
        &[],
    )
}

/// The kernel's floor for deletions: one `nft` process adding one element to a trivial
/// table, and one deleting it (no other rules anywhere in the namespace).
pub fn kernel_floor(runs: usize) -> (Vec<Run>, Vec<Run>) {
    let ns = Netns::new("f");
    ns.exec_stdin(
        &["nft", "-f", "-"],
        "table inet floor {\n\tset s {\n\t\ttype ipv4_addr\n\t}\n}\n",
    );
    let nft = |stmt: &str| {
        run_in(
            &ns.name,
            &["nft".into(), "-f".into(), "-".into()],
            Some(stmt),
            &[],
        )
    };
    let (mut add, mut del) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        add.push(nft("add element inet floor s { 192.0.2.1 }\n"));
        del.push(nft("delete element inet floor s { 192.0.2.1 }\n"));
    }
    (add, del)
}
