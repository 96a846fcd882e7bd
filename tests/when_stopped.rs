//! `when_stopped = "reject"` on the real kernel, both backends: while the domain is not
//! running, its ports are refused (a TCP reset, an ICMP port unreachable for UDP)
//! instead of reaching what listens on the host on the same port; the refusal goes
//! exactly when the domain starts (the forward answers) or its config goes (the host's
//! listener answers again). Without the option, a stopped domain's port reaches the host.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::{Lab, LibvirtForm, PUBLIC, sa};

fn pubv(p: u16) -> SocketAddr {
    sa(&format!("{PUBLIC}:{p}"))
}

/// What a UDP datagram to `addr` meets: the answer, "refused" (an ICMP port
/// unreachable, seen on a connected socket) or "silence".
fn udp(ns: &common::Netns, addr: SocketAddr) -> String {
    ns.in_ns(move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(700))).ok();
        let _ = s.send(b"ping");
        let mut buf = [0u8; 512];
        match s.recv(&mut buf) {
            Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => "refused".into(),
            Err(_) => "silence".into(),
        }
    })
}

/// What a TCP connect to `addr` meets: the answer's first word, or "refused" (a reset).
fn tcp(ns: &common::Netns, addr: SocketAddr) -> String {
    match ns.tcp(addr) {
        Ok(s) => s.split_whitespace().next().unwrap_or("").to_string(),
        Err(e) if e.contains("refused") => "refused".into(),
        Err(e) => e,
    }
}

const CONFIG: &str = "[domain.g1]\nwhen_stopped = \"reject\"\nforwards = [\"8080:80\", \"5353:53535/udp\", \"203.0.113.1:8081:80\"]\n[domain.g2]\nforwards = [\"8082:80\"]\n";

#[test]
fn a_stopped_domain_refuses_its_ports_until_it_starts() {
    if !common::can_run_netns("a_stopped_domain_refuses_its_ports_until_it_starts") {
        return;
    }
    for backend in ["nftables", "iptables"] {
        scenario(backend);
    }
}

fn scenario(backend: &str) {
    let lab = Lab::new(LibvirtForm::Iptables);
    let c = &lab.client;
    // the host's own listeners on the forwarded ports
    common::serve(&lab.host, "host", &[8080, 8081, 8082], &[5353]);
    for g in ["g1", "g2"] {
        lab.remove_domain_status(g);
    }
    lab.write_config(CONFIG);
    lab.apply(backend);
    assert_eq!(tcp(c, pubv(8080)), "refused", "{backend}: stopped, refused");
    assert_eq!(
        tcp(c, pubv(8081)),
        "refused",
        "{backend}: on its listen address"
    );
    assert_eq!(udp(c, pubv(5353)), "refused", "{backend}: UDP too");
    assert_eq!(tcp(c, pubv(8082)), "host", "{backend}: g2 does not opt in");
    // loopback is never refused: the host reaches its own listener on 127.0.0.1
    assert_eq!(
        tcp(&lab.host, sa("127.0.0.1:8080")),
        "host",
        "{backend}: loopback"
    );
    let (ok, out, _) = lab.virtgate(backend, &["status"]);
    assert!(ok && out.contains("refused while stopped"), "{out}");

    // the domain starts (hook): its forwards answer, the refusal is gone
    lab.write_domain_status("g1");
    let xml = lab.domain_xml("g1");
    let (code, _, err) = lab.hook(backend, &["qemu", "g1", "started", "begin", "-"], &xml);
    assert_eq!(code, 0, "{err}");
    assert_eq!(tcp(c, pubv(8080)), "g1", "{backend}: started");
    assert_eq!(tcp(c, pubv(8081)), "g1", "{backend}: started");
    assert!(
        udp(c, pubv(5353)).starts_with("g1"),
        "{backend}: started, UDP"
    );

    // it stops (hook): refused again
    lab.remove_domain_status("g1");
    let (code, _, err) = lab.hook(backend, &["qemu", "g1", "stopped", "end", "-"], &xml);
    assert_eq!(code, 0, "{err}");
    assert_eq!(tcp(c, pubv(8080)), "refused", "{backend}: stopped again");
    assert_eq!(
        udp(c, pubv(5353)),
        "refused",
        "{backend}: stopped again, UDP"
    );

    // the option goes: the host's listeners answer
    lab.write_config("[domain.g1]\nforwards = [\"8080:80\", \"5353:53535/udp\"]\n");
    lab.apply(backend);
    assert_eq!(tcp(c, pubv(8080)), "host", "{backend}: option gone");
    assert_eq!(tcp(c, pubv(8081)), "host", "{backend}: option gone");
    assert!(
        udp(c, pubv(5353)).starts_with("host"),
        "{backend}: option gone, UDP"
    );

    // back, then the whole entry goes: nothing of virtgate is left
    lab.write_config(CONFIG);
    lab.apply(backend);
    assert_eq!(tcp(c, pubv(8080)), "refused", "{backend}: option back");
    lab.write_config("");
    lab.apply(backend);
    assert_eq!(tcp(c, pubv(8080)), "host", "{backend}: config gone");
    let (ok, out, _) = lab.virtgate(backend, &["status"]);
    assert!(ok && !out.contains("refused"), "{out}");
}
