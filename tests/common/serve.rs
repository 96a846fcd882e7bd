//! Servers in a namespace that say who they are and who asked, and address helpers.

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};

use super::*;

pub fn serve(ns: &Netns, name: &str, tcp_ports: &[u16], udp_ports: &[u16]) {
    for &p in tcp_ports {
        let n = name.to_string();
        let (tx, rx) = std::sync::mpsc::channel();
        ns.spawn(move || {
            let l = TcpListener::bind(("::", p)).expect("bind tcp");
            tx.send(()).unwrap();
            for c in l.incoming() {
                let Ok(mut c) = c else { continue };
                let peer = c.peer_addr().map(|a| a.ip().to_canonical()).ok();
                let _ = write!(
                    c,
                    "{n} port {p} from {}",
                    peer.map(|x| x.to_string()).unwrap_or_default()
                );
            }
        });
        rx.recv().unwrap();
    }
    for &p in udp_ports {
        let n = name.to_string();
        let (tx, rx) = std::sync::mpsc::channel();
        ns.spawn(move || {
            let s = UdpSocket::bind(("::", p)).expect("bind udp");
            tx.send(()).unwrap();
            let mut buf = [0u8; 512];
            loop {
                if let Ok((k, peer)) = s.recv_from(&mut buf) {
                    let msg = format!("{n}: {}", String::from_utf8_lossy(&buf[..k]));
                    let _ = s.send_to(msg.as_bytes(), peer);
                }
            }
        });
        rx.recv().unwrap();
    }
}

pub fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

pub fn ipaddr(s: &str) -> IpAddr {
    s.parse().unwrap()
}
