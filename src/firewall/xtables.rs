//! Shared iptables/ip6tables plumbing: reading `iptables-save`, and building one
//! `iptables-restore --noflush` script per family that rewrites virtgate's own chains and
//! keeps exactly one jump to each at the top of its built-in chain.

use std::collections::BTreeMap;

use super::{FirewallError, nfnl};
use crate::exec;
use crate::model::Family;

/// Prefix of every chain virtgate owns.
pub const CHAIN_PREFIX: &str = "VIRTGATE_";

/// A jump from a built-in chain into one of virtgate's chains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jump {
    pub builtin: &'static str,
    /// Matches before `-j`, written as iptables-save prints them (may be empty).
    pub matches: &'static str,
    pub target: String,
}

impl Jump {
    pub fn rule(&self) -> String {
        if self.matches.is_empty() {
            format!("-A {} -j {}", self.builtin, self.target)
        } else {
            format!("-A {} {} -j {}", self.builtin, self.matches, self.target)
        }
    }
}

/// What virtgate wants in one table: its chains with their rules, and the jumps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableSpec {
    pub table: &'static str,
    pub chains: Vec<(String, Vec<String>)>,
    pub jumps: Vec<Jump>,
}

pub fn save_cmd(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "iptables-save",
        Family::Ipv6 => "ip6tables-save",
    }
}

pub fn restore_cmd(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "iptables-restore",
        Family::Ipv6 => "ip6tables-restore",
    }
}

/// Whether `family`'s iptables tools are installed.
pub fn installed(family: Family) -> bool {
    tool(family).0
}

/// Whether `family`'s iptables tools are the nf_tables flavour (iptables-nft): their
/// rules are nf_tables rules then, and the ruleset generation counts their changes.
pub fn on_nf_tables(family: Family) -> bool {
    tool(family).1
}

/// Whether `family`'s restore tool is installed, and whether it is iptables-nft. Looked
/// up once in a short-lived run (a hook asks several times: a PATH search and a
/// `canonicalize` each); every time in the daemon, which outlives package changes.
fn tool(family: Family) -> (bool, bool) {
    static SEEN: [std::sync::OnceLock<(bool, bool)>; 2] =
        [std::sync::OnceLock::new(), std::sync::OnceLock::new()];
    let look = || {
        let path = crate::exec::find(restore_cmd(family));
        let nft = path
            .as_ref()
            .and_then(|p| std::fs::canonicalize(p).ok())
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().contains("nft")))
            .unwrap_or(false);
        (path.is_some(), nft)
    };
    if !nfnl::is_one_shot() {
        return look();
    }
    *SEEN[usize::from(family == Family::Ipv6)].get_or_init(look)
}

/// `iptables-save -t TABLE` (empty if the tool is not installed: then nothing of
/// virtgate's can be there). A failing tool is an error, not an empty table: acting on a
/// wrong picture would add a second jump or leave a chain behind.
pub fn try_save(family: Family, table: &str, counters: bool) -> Result<String, FirewallError> {
    let mut argv = vec![save_cmd(family), "-t", table];
    if counters {
        argv.push("-c");
    }
    match exec::run_if_installed(&argv)? {
        None => Ok(String::new()),
        Some(o) if o.success => Ok(o.stdout),
        Some(o) => Err(FirewallError::Rejected(format!(
            "{}: {}",
            argv.join(" "),
            o.stderr.trim()
        ))),
    }
}

/// [`try_save`] where a failure may be read as "nothing" (counters for `status`).
pub fn save(family: Family, table: &str, counters: bool) -> String {
    try_save(family, table, counters).unwrap_or_default()
}

/// Rules of each chain in an iptables-save dump, in order, without counters.
pub fn parse_save(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut chains: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines() {
        let line = match line.strip_prefix('[') {
            Some(rest) => rest.split_once("] ").map(|x| x.1).unwrap_or(line),
            None => line,
        };
        if let Some(decl) = line.strip_prefix(':') {
            if let Some(name) = decl.split_whitespace().next() {
                chains.entry(name.to_string()).or_default();
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
            chains.entry(chain).or_default().push(format!("-A {rule}"));
        }
    }
    chains
}

/// The restore lines for one table, or nothing if virtgate has nothing there and wants
/// nothing there.
pub fn table_script(spec: &TableSpec, current: &str) -> Option<String> {
    let cur = parse_save(current);
    let owned: Vec<&String> = cur.keys().filter(|c| c.starts_with(CHAIN_PREFIX)).collect();
    if spec.chains.is_empty() && owned.is_empty() {
        return None;
    }
    let mut s = format!("*{}\n", spec.table);
    // declaring a chain in --noflush mode creates it or flushes it
    for (name, _) in &spec.chains {
        s.push_str(&format!(":{name} - [0:0]\n"));
    }
    for (name, rules) in &spec.chains {
        for r in rules {
            s.push_str(&format!("-A {name} {r}\n"));
        }
    }
    // jumps: exactly one per wanted jump, at the top of its built-in chain
    let mut builtins: Vec<&str> = cur
        .keys()
        .filter(|c| !c.starts_with(CHAIN_PREFIX))
        .map(String::as_str)
        .collect();
    for j in &spec.jumps {
        if !builtins.contains(&j.builtin) {
            builtins.push(j.builtin);
        }
    }
    for b in builtins {
        let existing: Vec<&String> = cur
            .get(b)
            .map(|rules| {
                rules
                    .iter()
                    .filter(|r| r.contains(&format!("-j {CHAIN_PREFIX}")))
                    .collect()
            })
            .unwrap_or_default();
        let wanted: Vec<String> = spec
            .jumps
            .iter()
            .filter(|j| j.builtin == b)
            .map(Jump::rule)
            .collect();
        let on_top: Vec<String> = cur
            .get(b)
            .map(|rules| rules.iter().take(wanted.len()).cloned().collect())
            .unwrap_or_default();
        if existing.len() == wanted.len() && on_top == wanted {
            continue;
        }
        for r in existing {
            s.push_str(&format!("-D{}\n", &r[2..]));
        }
        for r in wanted.iter().rev() {
            s.push_str(&format!("-I {} 1{}\n", b, &r[3 + b.len()..]));
        }
    }
    // chains virtgate no longer wants: flush and delete (their jumps are gone above)
    // (all flushed first: they may jump to each other)
    let unwanted: Vec<&String> = owned
        .into_iter()
        .filter(|name| !spec.chains.iter().any(|(n, _)| n == *name))
        .collect();
    for name in &unwanted {
        s.push_str(&format!(":{name} - [0:0]\n"));
    }
    for name in &unwanted {
        s.push_str(&format!("-X {name}\n"));
    }
    s.push_str("COMMIT\n");
    Some(s)
}

/// Whether a table holds exactly what `spec` wants of virtgate's (chains with their
/// rules, one jump each at the top of its built-in chain, no other chain of virtgate's).
pub fn in_sync(spec: &TableSpec, current: &str) -> bool {
    let cur = parse_save(current);
    let owned = cur.keys().filter(|c| c.starts_with(CHAIN_PREFIX)).count();
    if owned != spec.chains.len() {
        return false;
    }
    for (name, rules) in &spec.chains {
        let want: Vec<String> = rules.iter().map(|r| format!("-A {name} {r}")).collect();
        if cur.get(name) != Some(&want) {
            return false;
        }
    }
    for (b, rules) in cur.iter().filter(|(c, _)| !c.starts_with(CHAIN_PREFIX)) {
        let wanted: Vec<String> = spec
            .jumps
            .iter()
            .filter(|j| j.builtin == b)
            .map(Jump::rule)
            .collect();
        let jumps = rules
            .iter()
            .filter(|r| r.contains(&format!("-j {CHAIN_PREFIX}")))
            .count();
        if jumps != wanted.len() || rules.iter().take(wanted.len()).ne(wanted.iter()) {
            return false;
        }
    }
    spec.jumps.iter().all(|j| cur.contains_key(j.builtin))
}

/// Runs one restore transaction per family.
pub fn restore(family: Family, script: &str) -> Result<(), FirewallError> {
    let argv = [restore_cmd(family), "--noflush", "--wait"];
    // subscribed before the process starts, so none of its commits is missed
    let commits = script.lines().filter(|l| l.trim() == "COMMIT").count();
    let watch = (commits > 0 && nfnl::is_one_shot() && on_nf_tables(family))
        .then(|| nfnl::Commits::subscribe().ok())
        .flatten();
    // one time limit for the whole run, however it is waited for
    let until = std::time::Instant::now() + exec::DEFAULT_TIMEOUT;
    let running = exec::spawn(&argv, Some(script.as_bytes()))?;
    if let Some(w) = watch
        && let Some(generation) = all_committed(&w, &running, commits, until)
    {
        // closing the subscription now would wait as the process's exit does
        nfnl::close_at_exit(w.into_socket(), generation);
        return Ok(());
    }
    let left = until.saturating_duration_since(std::time::Instant::now());
    let out = running.finish(left.max(std::time::Duration::from_millis(1)))?;
    if !out.success {
        return Err(FirewallError::Rejected(format!(
            "{}: {}",
            restore_cmd(family),
            out.stderr.trim()
        )));
    }
    Ok(())
}

/// Whether iptables-nft's `restore` committed every one of the script's `commits`
/// transactions, seen as the kernel's NEWGEN announcements naming its process (with the
/// generation the last one made); None as soon as it exits first (then its exit status
/// says how it went), or when that cannot be told.
///
/// Why not wait for it to exit: a transaction that deleted rules (rewriting a chain
/// does) leaves the kernel work to free them after an RCU grace period, and the
/// process's exit, closing its netlink socket, waits for that work: ~10 ms here, a third
/// of a hook on the iptables backend. The rules are in force at the commit; the process
/// is reaped by a thread of this one, or by init once this one has exited. Only for a
/// short-lived virtgate ([`nfnl::is_one_shot`]), which hands its nf_tables sockets over
/// at exit ([`nfnl::release`]): closing them would wait the same way.
fn all_committed(
    w: &nfnl::Commits,
    running: &exec::Running,
    commits: usize,
    until: std::time::Instant,
) -> Option<Option<u32>> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let exited = running.exit_fd()?;
    let (mut seen, mut generation) = (0, None);
    loop {
        let (n, g) = w.count_by(running.pid())?;
        seen += n;
        generation = g.or(generation);
        if seen >= commits {
            return Some(generation);
        }
        let left = until.saturating_duration_since(std::time::Instant::now());
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
        let mut fds = [
            PollFd::new(w.as_fd(), PollFlags::POLLIN),
            PollFd::new(exited, PollFlags::POLLIN),
        ];
        if ms == 0
            || poll(
                &mut fds,
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
            )
            .is_err()
        {
            return None;
        }
        if fds[1].any().unwrap_or(true) {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVE: &str = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [5:300]\n:LIBVIRT_FWI - [0:0]\n:VIRTGATE_FORWARD - [0:0]\n[1:2] -A FORWARD -j LIBVIRT_FWX\n-A FORWARD -j VIRTGATE_FORWARD\n-A VIRTGATE_FORWARD -o virbr0 -j ACCEPT\nCOMMIT\n";

    #[test]
    fn buried_jump_is_moved_to_top() {
        let spec = TableSpec {
            table: "filter",
            chains: vec![(
                "VIRTGATE_FORWARD".into(),
                vec!["-o virbr1 -j ACCEPT".into()],
            )],
            jumps: vec![Jump {
                builtin: "FORWARD",
                matches: "",
                target: "VIRTGATE_FORWARD".into(),
            }],
        };
        let s = table_script(&spec, SAVE).unwrap();
        assert_eq!(
            s,
            "*filter\n:VIRTGATE_FORWARD - [0:0]\n-A VIRTGATE_FORWARD -o virbr1 -j ACCEPT\n-D FORWARD -j VIRTGATE_FORWARD\n-I FORWARD 1 -j VIRTGATE_FORWARD\nCOMMIT\n"
        );
    }

    #[test]
    fn removal_deletes_jump_and_chain() {
        let spec = TableSpec {
            table: "filter",
            ..Default::default()
        };
        let s = table_script(&spec, SAVE).unwrap();
        assert_eq!(
            s,
            "*filter\n-D FORWARD -j VIRTGATE_FORWARD\n:VIRTGATE_FORWARD - [0:0]\n-X VIRTGATE_FORWARD\nCOMMIT\n"
        );
        assert_eq!(
            table_script(&spec, "*filter\n:FORWARD ACCEPT [0:0]\nCOMMIT\n"),
            None
        );
    }
}
