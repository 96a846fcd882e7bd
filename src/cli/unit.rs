//! The systemd unit `virtgate install --daemon` writes: `contrib/virtgate.service` with
//! the binary and the global options install was given, so the daemon uses the same
//! config, state and backend as the hooks.

use std::path::{Path, PathBuf};

use super::Context;
use crate::config::{BackendChoice, DEFAULT_CONFIG};
use crate::state::DEFAULT_STATE_DIR;

pub const NAME: &str = "virtgate.service";
pub const DEFAULT_DIR: &str = "/etc/systemd/system";
/// The template, as in the repository.
pub const TEMPLATE: &str = include_str!("../../contrib/virtgate.service");
/// The first line of a unit install wrote (uninstall removes only such a file).
const MARK: &str = "# Written by `virtgate install --daemon`; `virtgate uninstall` removes it.";

/// One argument of `ExecStart=`, quoted as systemd.syntax(7) reads it.
fn quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@".contains(c));
    if plain {
        return arg.to_string();
    }
    let mut out = String::from("\"");
    for c in arg.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            // specifiers and variables are expanded in ExecStart: doubled, they are literal
            '%' => out.push_str("%%"),
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The command line the daemon runs with: `exe`, every option that differs from its
/// default, `daemon`.
pub fn exec_start(exe: &Path, ctx: &Context) -> Vec<String> {
    let mut argv = vec![exe.display().to_string()];
    let mut opt = |name: &str, value: String, default: &str| {
        if value != default {
            argv.push(format!("--{name}"));
            argv.push(value);
        }
    };
    opt(
        "config",
        ctx.config_path.display().to_string(),
        DEFAULT_CONFIG,
    );
    opt(
        "state-dir",
        ctx.state_dir.display().to_string(),
        DEFAULT_STATE_DIR,
    );
    let backend = match ctx.backend {
        BackendChoice::Auto => "auto",
        BackendChoice::Nftables => "nftables",
        BackendChoice::Iptables => "iptables",
    };
    opt("backend", backend.to_string(), "auto");
    opt("libvirt-root", ctx.libvirt.root.display().to_string(), "/");
    argv.push("daemon".to_string());
    argv
}

/// The unit's text for this binary and context.
pub fn render(exe: &Path, ctx: &Context) -> String {
    let exec = exec_start(exe, ctx)
        .iter()
        .map(|a| quote(a))
        .collect::<Vec<_>>()
        .join(" ");
    let mut out = format!("{MARK}\n");
    for line in TEMPLATE.lines() {
        if line.starts_with("ExecStart=") {
            out.push_str(&format!("ExecStart={exec}\n"));
        } else if line.starts_with("StateDirectory")
            && ctx.state_dir != Path::new(DEFAULT_STATE_DIR)
        {
            // systemd creates /var/lib/virtgate only; another state dir is made by virtgate
            continue;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

pub fn path(dir: &Path) -> PathBuf {
    dir.join(NAME)
}

/// Whether `text` is a unit install wrote.
pub fn is_ours(text: &str) -> bool {
    text.starts_with(MARK)
}

/// Whether systemd manages this machine (sd_booted(3)).
pub fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// `systemctl ARGS`, when systemd runs and the unit is in its directory; else what to run.
pub fn systemctl(unit_dir: &Path, args: &[&str]) -> Result<(), String> {
    let cmd = format!("systemctl {}", args.join(" "));
    if !systemd_running() || unit_dir != Path::new(DEFAULT_DIR) {
        println!("run: {cmd}");
        return Ok(());
    }
    let argv: Vec<&str> = std::iter::once("systemctl")
        .chain(args.iter().copied())
        .collect();
    crate::exec::run(&argv, None).map_err(|e| format!("{cmd}: {e}"))?;
    println!("ran: {cmd}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::facts::LibvirtPaths;

    fn ctx(config: &str, state: &str, root: &str) -> Context {
        Context {
            config_path: config.into(),
            state_dir: state.into(),
            backend: BackendChoice::Auto,
            libvirt: LibvirtPaths::new(Path::new(root)),
        }
    }

    #[test]
    fn defaults_give_the_repository_unit() {
        let text = render(
            Path::new("/usr/sbin/virtgate"),
            &ctx(DEFAULT_CONFIG, DEFAULT_STATE_DIR, "/"),
        );
        assert_eq!(text, format!("{MARK}\n{TEMPLATE}"));
        assert!(is_ours(&text) && !is_ours(TEMPLATE));
    }

    #[test]
    fn options_and_odd_paths_are_quoted() {
        let c = ctx("/srv/my vms/vg%1.toml", "/var/lib/vg$x", "/");
        let text = render(Path::new("/opt/virtgate/bin/virtgate"), &c);
        let exec = text.lines().find(|l| l.starts_with("ExecStart=")).unwrap();
        assert_eq!(
            exec,
            r#"ExecStart=/opt/virtgate/bin/virtgate --config "/srv/my vms/vg%%1.toml" --state-dir "/var/lib/vg$$x" daemon"#
        );
        assert!(!text.contains("StateDirectory"));
    }
}
