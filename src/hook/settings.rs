//! Where the installed hook finds its config and state. libvirt runs hooks with a fixed
//! argv and a scrubbed environment, so `virtgate install` writes the global options it was
//! given to `<hooks dir>/virtgate-hook.toml` (not executable, so libvirt ignores it), and
//! the hook reads them back.

use std::path::{Path, PathBuf};

use toml_edit::{DocumentMut, value};

use crate::config::BackendChoice;
use crate::facts::LibvirtPaths;
use crate::reconcile::Context;

pub const FILE: &str = "virtgate-hook.toml";

pub fn path(hooks_dir: &Path) -> PathBuf {
    hooks_dir.join(FILE)
}

pub(crate) fn backend_name(b: BackendChoice) -> &'static str {
    match b {
        BackendChoice::Auto => "auto",
        BackendChoice::Nftables => "nftables",
        BackendChoice::Iptables => "iptables",
    }
}

/// The settings file's text for a context; `created_dirs` are the hook directories
/// install created (uninstall removes only those, and only when empty).
pub fn render(ctx: &Context, created_dirs: &[PathBuf], unit: Option<&Path>) -> String {
    let mut doc = DocumentMut::new();
    let mut dirs = toml_edit::Array::new();
    for d in created_dirs {
        dirs.push(d.display().to_string());
    }
    doc["created_dirs"] = value(dirs);
    doc["config"] = value(ctx.config_path.display().to_string());
    doc["state_dir"] = value(ctx.state_dir.display().to_string());
    doc["backend"] = value(backend_name(ctx.backend));
    doc["libvirt_root"] = value(ctx.libvirt.root.display().to_string());
    if let Some(u) = unit {
        doc["unit"] = value(u.display().to_string());
    }
    format!("# Written by `virtgate install`: the options the libvirt hook runs with.\n{doc}")
}

/// The settings document, if there is one that can be trusted: like the config, it
/// steers what root's hooks do, so it must be root's and writable by nobody else (an
/// untrusted one is ignored, and the log says so).
fn read(hooks_dir: &Path) -> Option<DocumentMut> {
    let p = path(hooks_dir);
    // the checks are of the file opened, which is the one read
    let (f, meta) = match crate::files::open_regular(&p, crate::files::Follow::Yes) {
        Ok(v) => v,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!("{}: {e}, using the defaults", p.display());
            return None;
        }
    };
    if let Some(why) = crate::files::untrusted(&meta) {
        tracing::error!("{}: {why}: ignored, using the defaults", p.display());
        return None;
    }
    let text = match crate::files::read_open(f, 1 << 20).map(String::from_utf8) {
        Ok(Ok(t)) => t,
        Ok(Err(_)) => {
            tracing::warn!("{}: not UTF-8, using the defaults", p.display());
            return None;
        }
        Err(e) => {
            tracing::warn!("{}: {e}, using the defaults", p.display());
            return None;
        }
    };
    match text.parse::<DocumentMut>() {
        Ok(d) => Some(d),
        Err(_) => {
            tracing::warn!("{}: unreadable, using the defaults", p.display());
            None
        }
    }
}

/// The hook directories install created.
pub fn created_dirs(hooks_dir: &Path) -> Vec<PathBuf> {
    let Some(doc) = read(hooks_dir) else {
        return Vec::new();
    };
    doc.get("created_dirs")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str())
                .map(PathBuf::from)
                .collect()
        })
        .unwrap_or_default()
}

/// The daemon's unit file install wrote, if it did.
pub fn unit(hooks_dir: &Path) -> Option<PathBuf> {
    let doc = read(hooks_dir)?;
    doc.get("unit")?.as_str().map(PathBuf::from)
}

/// Reads the settings beside the hooks directory, falling back to `default`.
pub fn load(hooks_dir: &Path, default: Context) -> Context {
    let Some(doc) = read(hooks_dir) else {
        return default;
    };
    let get = |k: &str| doc.get(k).and_then(|v| v.as_str()).map(str::to_string);
    Context {
        config_path: get("config")
            .map(PathBuf::from)
            .unwrap_or(default.config_path),
        state_dir: get("state_dir")
            .map(PathBuf::from)
            .unwrap_or(default.state_dir),
        backend: get("backend")
            .and_then(|b| BackendChoice::parse(&b))
            .unwrap_or(default.backend),
        libvirt: get("libvirt_root")
            .map(|r| LibvirtPaths::new(Path::new(&r)))
            .unwrap_or(default.libvirt),
    }
}
