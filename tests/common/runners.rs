//! Running virtgate in the lab: the CLI, the hook, apply; the ruleset as the test sees
//! it, and a diff of two listings.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use super::*;

impl Lab {
    /// Runs `virtgate hook ARGS` in the host namespace with `stdin`: (exit code, stdout, stderr).
    pub fn hook(&self, backend: &str, args: &[&str], stdin: &str) -> (i32, String, String) {
        let mut argv = vec!["hook"];
        argv.extend_from_slice(args);
        let mut child = self
            .command(&self.config_path(), backend, &argv)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
        let out = child.wait_with_output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs virtgate in the host namespace: (success, stdout, stderr).
    pub fn virtgate(&self, backend: &str, args: &[&str]) -> (bool, String, String) {
        self.virtgate_with(&self.config_path(), backend, args)
    }

    /// Runs virtgate with another main config file.
    pub fn virtgate_with(
        &self,
        config: &Path,
        backend: &str,
        args: &[&str],
    ) -> (bool, String, String) {
        self.virtgate_env(config, backend, args, &[])
    }

    /// Runs virtgate with extra environment variables.
    pub fn virtgate_env(
        &self,
        config: &Path,
        backend: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> (bool, String, String) {
        let out = self
            .command(config, backend, args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `virtgate ARGS` in the host namespace, with the lab's paths, not started.
    pub fn command(&self, config: &Path, backend: &str, args: &[&str]) -> Command {
        let bin = env!("CARGO_BIN_EXE_virtgate");
        let state = self.state_dir();
        let root = self.root();
        let mut argv: Vec<&str> = vec![
            bin,
            "--config",
            config.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--libvirt-root",
            root.to_str().unwrap(),
            "--backend",
            backend,
        ];
        argv.extend_from_slice(args);
        let path = match self.xt {
            Xt::Legacy => format!(
                "{}:{}",
                self.dir.path().join("legacy-bin").display(),
                std::env::var("PATH").unwrap_or_default()
            ),
            Xt::Nft => std::env::var("PATH").unwrap_or_default(),
        };
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.host.name])
            .args(&argv)
            .env("PATH", path);
        c
    }

    pub fn apply(&self, backend: &str) {
        let (ok, out, err) = self.virtgate(backend, &["apply"]);
        assert!(ok, "virtgate apply failed:\n{out}\n{err}");
    }

    /// The host's whole ruleset (nftables view, which includes iptables-nft), counters
    /// removed.
    pub fn ruleset(&self) -> String {
        let mut text = self.host.exec(&["nft", "list", "ruleset"]);
        if self.xt == Xt::Legacy {
            // an iptables-legacy table, once used, cannot be unloaded: an empty one (no
            // rules, default policies) counts as absent
            for save in ["iptables-legacy-save", "ip6tables-legacy-save"] {
                let out = self.host.exec(&[save]);
                for table in out.split("COMMIT\n") {
                    let lines: Vec<&str> = table.lines().filter(|l| !l.starts_with('#')).collect();
                    let empty = lines.iter().all(|l| {
                        l.starts_with('*') || (l.starts_with(':') && l.contains(" ACCEPT "))
                    });
                    if !empty {
                        text.extend(lines.iter().map(|l| format!("{l}\n")));
                        text.push_str("COMMIT\n");
                    }
                }
            }
        }
        virtgate::firewall::strip_counters(&text)
    }

    /// Ping from the host so its neighbour table learns a guest.
    pub fn ping_from_host(&self, ip: &str) {
        self.host.exec(&["ping", "-c", "1", "-W", "2", ip]);
    }
}

/// A line diff for assertion messages.
pub fn diff(a: &str, b: &str) -> String {
    let al: Vec<&str> = a.lines().collect();
    let bl: Vec<&str> = b.lines().collect();
    let mut out = String::new();
    for l in &al {
        if !bl.contains(l) {
            out.push_str(&format!("- {l}\n"));
        }
    }
    for l in &bl {
        if !al.contains(l) {
            out.push_str(&format!("+ {l}\n"));
        }
    }
    if out.is_empty() {
        // the same lines in another order: show where they part
        if let Some(i) = (0..al.len().max(bl.len())).find(|&i| al.get(i) != bl.get(i)) {
            let ctx = |v: &[&str]| {
                v.iter()
                    .skip(i.saturating_sub(2))
                    .take(5)
                    .map(|l| format!("    {l}\n"))
                    .collect::<String>()
            };
            out = format!(
                "order differs at line {}:\nbefore:\n{}after:\n{}",
                i + 1,
                ctx(&al),
                ctx(&bl)
            );
        }
    }
    out
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}
