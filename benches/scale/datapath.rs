//! P4: new TCP connections per second from a client namespace through one forward to a
//! guest namespace, with that forward alone and with thousands of others installed (the
//! tested forward last), in interleaved rounds.

use std::fmt::Write as _;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::common::Netns;
use crate::measure::run_in;
use crate::world::World;

const GUEST_MAC: &str = "52:54:00:fe:00:01";
const GUEST_IP: &str = "192.168.250.250";
const PORT: u16 = 40000;

pub struct Datapath {
    world: World,
    client: Netns,
    _guest: Netns,
}

impl Datapath {
    pub fn new(others: usize) -> Datapath {
        let world = World::new(others);
        let (host, client, guest) = (&world.host, Netns::new("k"), Netns::new("g"));
        host.uplink(
            "eth0",
            &client,
            "203.0.113.1/24",
            "203.0.113.2/24",
            "203.0.113.1",
        );
        host.veth("vnetz", &guest, "eth0");
        host.ip(&["link", "set", "vnetz", "master", "virbr0", "up"]);
        guest.ip(&["link", "set", "eth0", "address", GUEST_MAC]);
        guest.ip(&["addr", "add", &format!("{GUEST_IP}/16"), "dev", "eth0"]);
        guest.ip(&["link", "set", "eth0", "up"]);
        guest.ip(&["route", "add", "default", "via", "192.168.0.1"]);
        // closed connections leave conntrack quickly (this namespace only)
        for (k, v) in [
            ("net.netfilter.nf_conntrack_tcp_timeout_time_wait", "1"),
            ("net.netfilter.nf_conntrack_tcp_timeout_close", "1"),
        ] {
            let _ = host.try_exec(&["sysctl", "-qw", &format!("{k}={v}")]);
        }
        guest.spawn(|| {
            let l = TcpListener::bind(("0.0.0.0", 80)).expect("bind");
            for mut s in l.incoming().flatten() {
                let _ = std::io::Write::write_all(&mut s, b"x");
            }
        });
        let root = world.root();
        let xml = format!(
            "<domstatus state='running' reason='booted' pid='1'>\n{}</domstatus>\n",
            crate::common::domain_xml("zz", GUEST_MAC, "default", "virbr0", "vnetz")
        );
        std::fs::write(root.join("run/libvirt/qemu/zz.xml"), xml).expect("write");
        let net = root.join("run/libvirt/network/default.xml");
        let text = std::fs::read_to_string(&net).expect("read");
        let text = text.replace(
            "    </dhcp>",
            &format!("      <host mac='{GUEST_MAC}' name='zz' ip='{GUEST_IP}'/>\n    </dhcp>"),
        );
        std::fs::write(&net, text).expect("write");
        Datapath {
            world,
            client,
            _guest: guest,
        }
    }

    /// Installs the tested forward alone (`with_others` false) or after all the others.
    pub fn install(&self, backend: &str, with_others: bool) {
        let w = &self.world;
        let mut cfg = String::new();
        if with_others {
            cfg = std::fs::read_to_string(w.config()).unwrap_or_default();
            cfg = cfg
                .split("[domain.web]")
                .next()
                .unwrap_or_default()
                .to_string();
        }
        let _ = writeln!(cfg, "[domain.zz]\nforwards = [\"{PORT}:80\"]");
        let p = w.dir.path().join("etc/datapath.toml");
        std::fs::write(&p, cfg).expect("write");
        let mut argv = w.virtgate(backend, &["apply"]);
        argv[2] = p.display().to_string();
        let r = run_in(&w.host.name, &argv, None, &[]);
        assert!(r.ok, "datapath: apply failed");
    }

    /// Completed connections per second during `dur`.
    pub fn rate(&self, dur: Duration) -> f64 {
        let addr: SocketAddr = format!("203.0.113.1:{PORT}").parse().expect("addr");
        self.client.in_ns(move || {
            let start = Instant::now();
            let mut n = 0u64;
            while start.elapsed() < dur {
                if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                    let mut b = [0u8; 8];
                    if s.read(&mut b).is_ok_and(|k| k > 0) {
                        n += 1;
                    }
                    reset_on_close(&s);
                }
            }
            n as f64 / start.elapsed().as_secs_f64()
        })
    }
}

/// SO_LINGER 0: closing sends a reset, so no TIME_WAIT piles up in the client.
fn reset_on_close(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a correctly sized linger value
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}
