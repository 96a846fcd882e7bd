//! A Debian 13 (trixie) root the real-VM test runs in, for libvirt 11 on its own nftables
//! firewall backend (Debian 12's libvirt 9 has none). TESTBED.md: mmdebstrap builds it
//! (cached in `target/`), it gets the mounts any chroot that runs `ip netns` needs, and
//! the repository at its own path, so that the test binary, virtgate and the guest are
//! where they were built. All mounts go when the guard drops.

use std::path::{Path, PathBuf};
use std::process::Command;

/// What the root holds beside the base system.
const PACKAGES: &[&str] = &[
    "libvirt-daemon",
    "libvirt-daemon-driver-qemu",
    "libvirt-daemon-config-network",
    "libvirt-clients",
    "qemu-system-x86",
    "dnsmasq-base",
    "iptables",
    "nftables",
    "iproute2",
    "procps",
    "kmod",
];

/// libvirt's nftables backend asks `tc` for a checksum action (its DHCP fix) and refuses
/// to start the network if that fails; kernels without `act_csum` (this machine's) cannot.
/// The wrapper runs the real `tc` and lets only that one request fail quietly; every
/// firewall rule is still libvirt's own.
const TC_WRAPPER: &str = r#"#!/bin/sh
/usr/sbin/tc.real "$@" && exit 0
rc=$?
case " $* " in *" csum "*) exit 0;; esac
exit $rc
"#;

fn run(argv: &[&str]) -> Result<(), String> {
    let st = Command::new(argv[0])
        .args(&argv[1..])
        .status()
        .map_err(|e| format!("{argv:?}: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("{argv:?}: {st}"))
    }
}

/// Why the root cannot be built here, if it cannot.
pub fn blocker() -> Option<String> {
    if !Path::new("/usr/bin/mmdebstrap").exists() {
        return Some("mmdebstrap is not installed (run scripts/deps --vm)".into());
    }
    None
}

/// The root under `target/`, built once per package list.
pub fn build(repo: &Path) -> Result<PathBuf, String> {
    let root = repo.join("target/debian13-root");
    let stamp = root.join(".virtgate-packages");
    let want = PACKAGES.join(",");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == want) {
        return Ok(root);
    }
    let _ = std::fs::remove_dir_all(&root);
    run(&[
        "mmdebstrap",
        "--quiet",
        "--variant=minbase",
        &format!("--include={want}"),
        "--aptopt=APT::Install-Recommends \"false\"",
        "trixie",
        root.to_str().unwrap(),
        "http://deb.debian.org/debian",
    ])?;
    let tc = root.join("usr/sbin/tc");
    std::fs::rename(&tc, root.join("usr/sbin/tc.real")).map_err(|e| e.to_string())?;
    std::fs::write(&tc, TC_WRAPPER).map_err(|e| e.to_string())?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&tc, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| e.to_string())?;
    std::fs::write(
        root.join("etc/libvirt/network.conf"),
        "firewall_backend = \"nftables\"\n",
    )
    .map_err(|e| e.to_string())?;
    std::fs::write(&stamp, want).map_err(|e| e.to_string())?;
    Ok(root)
}

/// The root's mounts, undone on drop.
pub struct Mounted(PathBuf);

impl Mounted {
    pub fn new(root: &Path, repo: &Path) -> Result<Mounted, String> {
        // leftovers of a run that was killed (none, usually: quiet)
        let _ = Command::new("umount")
            .args(["-R", "-l"])
            .arg(root)
            .stderr(std::process::Stdio::null())
            .status();
        let r = root.to_str().unwrap();
        let m = Mounted(root.to_path_buf());
        let inside = |p: &str| format!("{r}{p}");
        // `ip netns exec` needs / to be a mount point
        run(&["mount", "--bind", r, r])?;
        run(&["mount", "--make-private", r])?;
        run(&["mount", "-t", "proc", "proc", &inside("/proc")])?;
        for d in ["/sys", "/dev"] {
            run(&["mount", "--rbind", d, &inside(d)])?;
            run(&["mount", "--make-rslave", &inside(d)])?;
        }
        run(&["mount", "-t", "tmpfs", "tmpfs", &inside("/run")])?;
        let repo_inside = inside(repo.to_str().unwrap());
        std::fs::create_dir_all(&repo_inside).map_err(|e| e.to_string())?;
        std::fs::create_dir_all(inside("/run/netns")).map_err(|e| e.to_string())?;
        run(&["mount", "--bind", repo.to_str().unwrap(), &repo_inside])?;
        Ok(m)
    }

    pub fn root(&self) -> &Path {
        &self.0
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .args(["-R", "-l"])
            .arg(&self.0)
            .status();
    }
}
