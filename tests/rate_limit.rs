//! Per-forward new-connection rate limits on the real kernel, both backends: a bounded
//! connect loop from two clients. Per source, each client gets its own burst; per
//! forward, the clients share one. Connections over the limit are dropped (the connect
//! times out) and counted in `status`; established connections are never limited; a
//! forward without a limit is never limited.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{Lab, LibvirtForm, PUBLIC, sa};

fn pubv(p: u16) -> SocketAddr {
    sa(&format!("{PUBLIC}:{p}"))
}

/// How many of `n` connects (each given 400 ms) are accepted.
fn accepted(ns: &common::Netns, addr: SocketAddr, n: usize) -> usize {
    ns.in_ns(move || {
        (0..n)
            .filter(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(400)).is_ok())
            .count()
    })
}

const CONFIG: &str = r#"
[[domain.g1.forward]]
host_port = 8080
guest_port = 80
rate = "5/minute"
burst = 3
[[domain.g1.forward]]
host_port = 8081
guest_port = 80
rate = "5/minute"
burst = 3
rate_per = "forward"
source = ["203.0.113.0/24", "198.51.100.0/24"]
[[domain.g1.forward]]
host_port = 8082
guest_port = 80
"#;

#[test]
fn new_connections_over_the_rate_are_dropped_and_counted() {
    if !common::can_run_netns("new_connections_over_the_rate_are_dropped_and_counted") {
        return;
    }
    for form in [LibvirtForm::Iptables, LibvirtForm::Nftables] {
        for backend in ["nftables", "iptables"] {
            scenario(form, backend);
        }
    }
}

fn scenario(form: LibvirtForm, backend: &str) {
    let lab = Lab::new(form);
    let (c, d) = (&lab.client, &lab.client2);
    lab.write_config(CONFIG);
    lab.apply(backend);
    let what = format!("{form:?}/{backend}");
    // per source: each client its own burst of 3 (5/minute refills one in 12 s)
    assert_eq!(accepted(c, pubv(8080), 6), 3, "{what}: client, per source");
    assert_eq!(
        accepted(d, sa("198.51.100.1:8080"), 6),
        3,
        "{what}: client2 has its own bucket"
    );
    // per forward: one burst for both
    assert_eq!(accepted(c, pubv(8081), 5), 3, "{what}: per forward");
    assert_eq!(
        accepted(d, sa("198.51.100.1:8081"), 3),
        0,
        "{what}: per forward, shared"
    );
    // the host's own connections to the listen key are limited too (their own bucket)
    assert_eq!(
        accepted(&lab.host, pubv(8080), 6),
        3,
        "{what}: from the host"
    );
    // no limit
    assert_eq!(accepted(c, pubv(8082), 10), 10, "{what}: no limit");
    // counted: one dropped SYN per refused connect (within 400 ms nothing is resent)
    let (ok, out, err) = lab.virtgate(backend, &["status", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let dropped = |port: &str| -> u64 {
        v["forwards"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["host_ports"] == port)
            .and_then(|f| f["rate_limited"].as_u64())
            .unwrap_or(u64::MAX)
    };
    assert_eq!(dropped("8080"), 9, "{what}: {out}");
    assert_eq!(dropped("8081"), 5, "{what}: {out}");
    assert_eq!(dropped("8082"), 0, "{what}: {out}");
    let (_, text, _) = lab.virtgate(backend, &["status"]);
    assert!(
        text.contains("rate limit 5/minute burst 3 per source: 9 new connection(s) dropped"),
        "{text}"
    );
    // the limit goes with its config: the next connects are accepted at once
    let unlimited = CONFIG
        .replace("rate = \"5/minute\"\nburst = 3\n", "")
        .replace("rate_per = \"forward\"\n", "");
    lab.write_config(&unlimited);
    lab.apply(backend);
    assert_eq!(accepted(c, pubv(8080), 5), 5, "{what}: limit removed");
    assert_eq!(accepted(c, pubv(8081), 5), 5, "{what}: limit removed");
}
