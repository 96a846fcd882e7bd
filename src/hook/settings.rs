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

fn backend_name(b: BackendChoice) -> &'static str {
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

/// The hook directories install created.
pub fn created_dirs(hooks_dir: &Path) -> Vec<PathBuf> {
    let Ok(doc) = std::fs::read_to_string(path(hooks_dir))
        .unwrap_or_default()
        .parse::<DocumentMut>()
    else {
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
    let doc = std::fs::read_to_string(path(hooks_dir))
        .ok()?
        .parse::<DocumentMut>()
        .ok()?;
    doc.get("unit")?.as_str().map(PathBuf::from)
}

/// Reads the settings beside the hooks directory, falling back to `default`.
pub fn load(hooks_dir: &Path, default: Context) -> Context {
    let Ok(text) = std::fs::read_to_string(path(hooks_dir)) else {
        return default;
    };
    let Ok(doc) = text.parse::<DocumentMut>() else {
        tracing::warn!("{}: unreadable, using defaults", path(hooks_dir).display());
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
