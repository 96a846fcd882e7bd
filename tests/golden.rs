//! Golden tests of rendering: a fixed config and facts, rendered by both backends, must
//! match the files in tests/golden/ (regenerate with UPDATE_GOLDEN=1 and review the diff).

use std::path::Path;

use virtgate::config;
use virtgate::facts::{Facts, FactsBuilder, LibvirtFirewall};
use virtgate::firewall::{Backend, iptables::Iptables, nftables::Nftables};
use virtgate::plan;

const CONFIG: &str = r#"
[domain.web]
forwards = ["8080:80", "5353:53535/udp", "9000-9002:9100-9102/tcp", "203.0.113.1:8443:443"]
[[domain.api.forward]]
host_port = 8081
guest_port = 80
source = ["203.0.113.0/24", "2001:db8::/32"]
localhost = true
description = "internal \"API\"; $(x)"
[[domain.api.forward]]
host_port = 2222
guest_port = 22
interface = "eth1"
rate = "10/minute"
burst = 4
[[domain.api.forward]]
host_port = 2223
guest_port = 23
rate = "100/second"
rate_per = "forward"
[domain.stopped]
when_stopped = "reject"
forwards = ["7000:70", "7001:71/udp", "203.0.113.1:7002:72"]
[[domain.stopped.forward]]
host_port = 7003
guest_port = 73
source = ["198.51.100.0/24"]
"#;

fn facts(fw: LibvirtFirewall) -> Facts {
    FactsBuilder::network("default", "virbr0", &["192.168.122.1/24", "fd00::1/64"])
        .firewall(fw)
        .reservation("52:54:00:00:00:01", "192.168.122.10")
        .domain("web", "52:54:00:00:00:01", "vnet0")
        .domain("api", "52:54:00:00:00:02", "vnet1")
        .lease("52:54:00:00:00:02", "192.168.122.11", u64::MAX)
        .build()
}

fn check(name: &str, actual: &str) {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&p, actual).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", p.display()));
    assert!(
        want == actual,
        "{name} differs from the golden file; rendered:\n{actual}"
    );
}

fn ruleset(fw: LibvirtFirewall) -> plan::Ruleset {
    let parsed = config::toml_file::parse(Path::new("v.toml"), CONFIG).unwrap();
    let cfg = config::merge(vec![parsed]);
    assert_eq!(cfg.errors().count(), 0, "{:?}", cfg.diagnostics);
    plan::plan(&cfg.domain_configs(), &facts(fw), &[]).ruleset
}

#[test]
fn nftables_render() {
    check(
        "nftables-libvirt-iptables.nft",
        &Nftables.render(&ruleset(LibvirtFirewall::Iptables)),
    );
    check(
        "nftables-libvirt-nftables.nft",
        &Nftables.render(&ruleset(LibvirtFirewall::Nftables)),
    );
}

#[test]
fn iptables_render() {
    let b = Iptables::default();
    check(
        "iptables-libvirt-iptables.rules",
        &b.render(&ruleset(LibvirtFirewall::Iptables)),
    );
    check(
        "iptables-libvirt-nftables.rules",
        &b.render(&ruleset(LibvirtFirewall::Nftables)),
    );
}

#[test]
fn empty_ruleset_renders_removal_only() {
    let empty = plan::Ruleset::default();
    assert_eq!(
        Nftables.render(&empty),
        "#!/usr/sbin/nft -f\ntable inet virtgate\ndelete table inet virtgate\n"
    );
    assert_eq!(Iptables::default().render(&empty), "");
}
