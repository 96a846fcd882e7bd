//! Living with other firewall users: Docker-style chains inserted above virtgate's jump,
//! and `nft flush ruleset` (which libvirt does not notice). `status` reports the drift and
//! `apply` repairs it.

mod common;

use common::{Lab, LibvirtForm, PUBLIC, sa};

fn answers(lab: &Lab) -> bool {
    lab.client
        .tcp(sa(&format!("{PUBLIC}:8080")))
        .is_ok_and(|s| s.starts_with("g1 port 80"))
}

fn drifted(lab: &Lab, backend: &str) -> bool {
    let (ok, out, err) = lab.virtgate(backend, &["status"]);
    assert!(ok, "{err}");
    out.contains("drifted")
}

#[test]
fn docker_chains_and_nft_flush_ruleset() {
    if !common::can_run_netns("docker_chains_and_nft_flush_ruleset") {
        return;
    }
    for backend in ["nftables", "iptables"] {
        let lab = Lab::new(LibvirtForm::Iptables);
        lab.write_config("[domain.g1]\nforwards = [\"8080:80\"]\n");
        lab.apply(backend);
        assert!(answers(&lab), "{backend}");
        assert!(!drifted(&lab, backend));

        // Docker arrives: its chains at the top of FORWARD, policy DROP
        for cmd in [
            "iptables -N DOCKER-USER",
            "iptables -A DOCKER-USER -j RETURN",
            "iptables -N DOCKER-FORWARD",
            "iptables -I FORWARD 1 -j DOCKER-USER",
            "iptables -I FORWARD 2 -j DOCKER-FORWARD",
            "iptables -P FORWARD DROP",
        ] {
            lab.host.exec(&cmd.split(' ').collect::<Vec<_>>());
        }
        assert!(drifted(&lab, backend), "{backend}: a buried jump is drift");
        lab.apply(backend);
        let forward = lab.host.exec(&["iptables", "-S", "FORWARD"]);
        let first = forward
            .lines()
            .find(|l| l.starts_with("-A FORWARD"))
            .unwrap();
        assert_eq!(
            first, "-A FORWARD -j VIRTGATE_FORWARD",
            "{backend}:\n{forward}"
        );
        assert!(
            answers(&lab),
            "{backend}: with Docker's chains and policy DROP"
        );

        // someone flushes the whole ruleset
        lab.host.exec(&["nft", "flush", "ruleset"]);
        assert!(!answers(&lab));
        assert!(
            drifted(&lab, backend),
            "{backend}: a flushed ruleset is drift"
        );
        lab.apply(backend);
        assert!(answers(&lab), "{backend}: apply after nft flush ruleset");
        assert!(!drifted(&lab, backend));
    }
}
