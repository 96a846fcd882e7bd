//! `virtgate install` / `uninstall`: the hook files in libvirt's `.d` directories, never a
//! foreign file; uninstall also removes every rule virtgate installed and keeps the config.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::{Context, unit};
use crate::firewall;
use crate::hook::settings;
use crate::state::{StateDir, write_atomic_mode};

pub const DRIVERS: [&str; 3] = ["qemu", "network", "daemon"];
pub const HOOK_NAME: &str = "virtgate";

/// The config install creates where there is none (the .deb ships it as a conffile).
const EXAMPLE: &str = include_str!("../../contrib/virtgate.toml");

fn hook_path(hooks: &Path, driver: &str) -> PathBuf {
    hooks.join(format!("{driver}.d")).join(HOOK_NAME)
}

/// Writes the hook into each driver's `.d` directory (created if missing, and then
/// recorded in `created`); returns the directories libvirtd does not watch yet.
fn install_hooks(
    hooks: &Path,
    bin: &[u8],
    created: &mut Vec<PathBuf>,
) -> Result<Vec<String>, String> {
    let mut new_dirs = Vec::new();
    for d in DRIVERS {
        let dir = hooks.join(format!("{d}.d"));
        // libvirt uses a new file in a .d directory at once only if it already watched
        // it: if it held someone else's executable hook when libvirtd last (re)loaded
        let watched = fs::read_dir(&dir).is_ok_and(|rd| {
            rd.flatten().any(|e| {
                e.file_name() != HOOK_NAME
                    && e.metadata()
                        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
        });
        if !watched {
            new_dirs.push(dir.display().to_string());
        }
        if !dir.exists() {
            // 0755 whatever the umask: libvirt runs as root what is in it
            crate::files::create_dir(&dir, 0o755).map_err(|e| format!("{}: {e}", dir.display()))?;
            created.push(dir.clone());
        }
        let p = hook_path(hooks, d);
        // executable from the moment it appears (rename)
        write_atomic_mode(&p, bin, 0o755).map_err(|e| format!("{}: {e}", p.display()))?;
        println!("installed {}", p.display());
    }
    Ok(new_dirs)
}

/// `unit_dir`: also install the daemon's systemd unit there (`--daemon`).
pub fn install(ctx: &Context, unit_dir: Option<&Path>) -> Result<bool, String> {
    let hooks = ctx.libvirt.hooks_dir();
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own binary: {e}"))?;
    let bin = fs::read(&exe).map_err(|e| format!("{}: {e}", exe.display()))?;
    // a unit an earlier `install --daemon` wrote stays recorded (and is rewritten)
    let unit_file = unit_dir
        .map(unit::path)
        .or_else(|| settings::unit(&hooks).filter(|p| p.exists()));
    // refused before anything is written
    if let Some(u) = &unit_file
        && let Ok(old) = fs::read_to_string(u)
        && !unit::is_ours(&old)
    {
        return Err(format!(
            "{} exists and was not written by virtgate: nothing installed",
            u.display()
        ));
    }
    // directories an earlier install created stay ours
    let mut created = settings::created_dirs(&hooks);
    let new_dirs = install_hooks(&hooks, &bin, &mut created)?;
    created.sort();
    created.dedup();
    if let Some(u) = &unit_file {
        install_unit(ctx, &exe, u)?;
    }
    let sp = settings::path(&hooks);
    write_atomic_mode(
        &sp,
        settings::render(ctx, &created, unit_file.as_deref()).as_bytes(),
        0o644,
    )
    .map_err(|e| format!("{}: {e}", sp.display()))?;
    for d in DRIVERS {
        let foreign = hooks.join(d);
        if foreign.exists() {
            println!(
                "kept your own {} (virtgate runs after it)",
                foreign.display()
            );
        }
    }
    if !ctx.config_path.exists() {
        write_atomic_mode(&ctx.config_path, EXAMPLE.as_bytes(), 0o644)
            .map_err(|e| format!("{}: {e}", ctx.config_path.display()))?;
        println!("created an example config: {}", ctx.config_path.display());
    }
    if let Some(u) = unit_dir {
        unit::systemctl(u, &["daemon-reload"])?;
        unit::systemctl(u, &["enable", "--now", unit::NAME])?;
    }
    if new_dirs.is_empty() {
        println!("libvirtd already watches these hook directories: nothing else to do");
    } else {
        println!(
            "libvirtd looks for new hook directories only when it starts or gets SIGHUP: run `systemctl reload libvirtd` (or `kill -HUP $(pidof libvirtd)`) once; new: {}",
            new_dirs.join(", ")
        );
    }
    Ok(true)
}

/// After an upgrade: the hook copies an earlier install wrote (and its unit) become this
/// binary; nothing is added where install never ran. Atomic per file (rename), so a hook
/// libvirt runs at that moment is the old binary or the new one, whole.
pub fn refresh(ctx: &Context) -> Result<bool, String> {
    let hooks = ctx.libvirt.hooks_dir();
    if !settings::path(&hooks).exists() {
        println!(
            "virtgate's hooks are not installed in {}: nothing to refresh",
            hooks.display()
        );
        return Ok(true);
    }
    let ctx = &settings::load(&hooks, ctx.clone());
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own binary: {e}"))?;
    let bin = fs::read(&exe).map_err(|e| format!("{}: {e}", exe.display()))?;
    for d in DRIVERS {
        let p = hook_path(&hooks, d);
        if p.exists() {
            write_atomic_mode(&p, &bin, 0o755).map_err(|e| format!("{}: {e}", p.display()))?;
            println!("refreshed {}", p.display());
        }
    }
    if let Some(u) = settings::unit(&hooks)
        && let Ok(text) = fs::read_to_string(&u)
        && unit::is_ours(&text)
    {
        install_unit(ctx, &exe, &u)?;
        unit::systemctl(
            u.parent().unwrap_or(Path::new(unit::DEFAULT_DIR)),
            &["daemon-reload"],
        )?;
    }
    Ok(true)
}

/// Writes the daemon's unit (install checked first that it writes over no foreign file).
fn install_unit(ctx: &Context, exe: &Path, file: &Path) -> Result<(), String> {
    let exe = exe.canonicalize().unwrap_or_else(|_| exe.to_path_buf());
    if let Some(d) = file.parent() {
        crate::files::create_dir(d, 0o755).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    write_atomic_mode(file, unit::render(&exe, ctx).as_bytes(), 0o644)
        .map_err(|e| format!("{}: {e}", file.display()))?;
    println!("installed {}", file.display());
    Ok(())
}

/// Stops the daemon and removes its unit, if install wrote one.
fn uninstall_unit(file: &Path) -> Result<(), String> {
    match fs::read_to_string(file) {
        Ok(text) if unit::is_ours(&text) => {}
        Ok(_) => {
            println!("kept {} (not written by virtgate)", file.display());
            return Ok(());
        }
        Err(_) => return Ok(()),
    }
    let dir = file.parent().unwrap_or(Path::new(unit::DEFAULT_DIR));
    unit::systemctl(dir, &["disable", "--now", unit::NAME])?;
    fs::remove_file(file).map_err(|e| format!("{}: {e}", file.display()))?;
    println!("removed {}", file.display());
    unit::systemctl(dir, &["daemon-reload"])
}

pub fn uninstall(ctx: &Context) -> Result<bool, String> {
    let hooks = ctx.libvirt.hooks_dir();
    // the daemon first: it would put back the rules removed below
    if let Some(u) = settings::unit(&hooks) {
        uninstall_unit(&u)?;
    }
    // the state and backend the installed hook used
    let ctx = &settings::load(&hooks, ctx.clone());
    let created = settings::created_dirs(&hooks);
    for d in DRIVERS {
        let p = hook_path(&hooks, d);
        match fs::remove_file(&p) {
            Ok(()) => println!("removed {}", p.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", p.display())),
        }
        // the directory only if install created it and nothing else is in it
        let dir = hooks.join(format!("{d}.d"));
        if created.contains(&dir) {
            let _ = fs::remove_dir(&dir);
        }
    }
    let _ = fs::remove_file(settings::path(&hooks));
    // every rule virtgate installed, with the backend that installed it
    let dir = StateDir::lock(&ctx.state_dir).map_err(|e| e.to_string())?;
    let mut st = dir.load().map_err(|e| e.to_string())?;
    let backend = st
        .backend
        .as_deref()
        .and_then(crate::config::BackendChoice::parse)
        .unwrap_or(ctx.backend);
    let b = firewall::backend(backend);
    b.set_memory(st.xt_preexisting.take());
    b.apply(&Default::default())
        .map_err(|e| format!("removing rules: {e}"))?;
    crate::bridge::sync(&[], &mut st.hairpin_saved, None);
    // nothing of virtgate's is left: its state goes too (the lock file stays while held)
    dir.remove_all();
    crate::facts::cache::remove(dir.path());
    println!(
        "removed all of virtgate's rules; kept the config {}",
        ctx.config_path.display()
    );
    Ok(true)
}
