//! The client's handshake, events, keepalive and failures against a scripted server on a
//! socket pair (the real libvirtd is in tests/libvirt_events.rs).

use super::*;
use std::sync::atomic::AtomicBool;

fn shared() -> (Arc<Shared>, UnixStream) {
    let (read, wake) = UnixStream::pair().unwrap();
    read.set_nonblocking(true).unwrap();
    wake.set_nonblocking(true).unwrap();
    let s = Shared {
        wake,
        closed: AtomicBool::new(false),
        events: Default::default(),
        connects: Default::default(),
    };
    (Arc::new(s), read)
}

const FAST: Keepalive = Keepalive {
    interval: Duration::from_millis(50),
    count: 3,
};

/// The server's side: reads messages, answers calls the way `answer` says.
struct Server {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Server {
    fn read(&mut self) -> (Header, Vec<u8>) {
        let mut chunk = [0u8; 512];
        loop {
            if let Some(m) = rpc::take_message(&mut self.buf).unwrap() {
                return m;
            }
            let n = self.stream.read(&mut chunk).unwrap();
            assert!(n > 0, "the client hung up");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn reply(&mut self, to: Header, status: u32, payload: &[u8]) {
        let mut m = rpc::call(to.procedure, to.serial, payload);
        m[16..20].copy_from_slice(&rpc::REPLY.to_be_bytes());
        m[24..28].copy_from_slice(&status.to_be_bytes());
        self.stream.write_all(&m).unwrap();
    }

    /// Answers the handshake: auth list `auth`, then OK to everything; the procedures
    /// called, in order.
    fn handshake(&mut self, auth: &[i32]) -> Vec<(i32, Vec<u8>)> {
        let mut called = Vec::new();
        loop {
            let (h, p) = self.read();
            assert_eq!((h.program, h.kind), (rpc::REMOTE_PROGRAM, rpc::CALL));
            called.push((h.procedure, p));
            let ret = match h.procedure {
                rpc::PROC_AUTH_LIST => {
                    let mut x = Xdr::default().u32(auth.len() as u32);
                    for a in auth {
                        x = x.i32(*a);
                    }
                    x.bytes()
                }
                rpc::PROC_CONNECT_SUPPORTS_FEATURE => Xdr::default().i32(1).bytes(),
                rpc::PROC_CONNECT_OPEN => vec![],
                _ => Xdr::default().i32(called.len() as i32).bytes(),
            };
            self.reply(h, rpc::STATUS_OK, &ret);
            if auth.iter().any(|a| *a != rpc::AUTH_NONE) || called.len() == 6 {
                return called;
            }
        }
    }
}

fn pair() -> (UnixStream, Server) {
    let (c, s) = UnixStream::pair().unwrap();
    (
        c,
        Server {
            stream: s,
            buf: vec![],
        },
    )
}

#[test]
fn the_handshake_opens_read_only_and_registers_three_events() {
    let (c, mut server) = pair();
    let (s, _wake) = shared();
    let t = std::thread::spawn(move || server.handshake(&[rpc::AUTH_NONE]));
    Session::over(c, "qemu:///system", FAST, &s).unwrap();
    let called = t.join().unwrap();
    let procs: Vec<i32> = called.iter().map(|(p, _)| *p).collect();
    assert_eq!(procs, vec![66, 60, 1, 316, 316, 313]);
    let mut open = rpc::Reader(&called[2].1);
    assert_eq!(
        open.optional_string().unwrap().as_deref(),
        Some("qemu:///system")
    );
    assert_eq!(open.u32().unwrap(), rpc::CONNECT_RO);
    let ids: Vec<i32> = called[3..]
        .iter()
        .map(|(_, p)| rpc::Reader(p).i32().unwrap())
        .collect();
    assert_eq!(
        ids,
        vec![0, 23, 0],
        "lifecycle, metadata-change, network lifecycle"
    );
}

#[test]
fn events_wake_pings_are_answered_and_silence_ends_the_session() {
    let (c, mut server) = pair();
    let (s, wake) = shared();
    let t = std::thread::spawn(move || {
        server.handshake(&[]);
        // an event, a PING (answered with a PONG), another event
        let event = |p: i32| {
            let mut m = rpc::call(p, 0, &[0; 8]);
            m[16..20].copy_from_slice(&rpc::MESSAGE.to_be_bytes());
            m
        };
        server.stream.write_all(&event(318)).unwrap();
        server
            .stream
            .write_all(&rpc::keepalive(rpc::PROC_PING))
            .unwrap();
        let (h, _) = server.read();
        assert_eq!(
            (h.program, h.procedure),
            (rpc::KEEPALIVE_PROGRAM, rpc::PROC_PONG)
        );
        server.stream.write_all(&event(315)).unwrap();
        // then silence: the client PINGs after each quiet interval, and gives up after
        // the third
        for _ in 0..2 {
            let (h, _) = server.read();
            assert_eq!(
                (h.program, h.procedure),
                (rpc::KEEPALIVE_PROGRAM, rpc::PROC_PING)
            );
        }
        server
    });
    let mut session = Session::over(c, "qemu:///system", FAST, &s).unwrap();
    let why = session.run(&s);
    assert!(matches!(why, SessionError::Silent(_)), "{why}");
    let server = t.join().unwrap();
    drop(server);
    assert_eq!(s.events.load(Ordering::Relaxed), 2);
    let mut woken = [0u8; 8];
    assert_eq!(
        (&wake).read(&mut woken).unwrap(),
        2,
        "one wake-up per event"
    );
}

#[test]
fn a_closed_socket_ends_the_session() {
    let (c, mut server) = pair();
    let (s, _wake) = shared();
    let t = std::thread::spawn(move || {
        server.handshake(&[]);
        drop(server);
    });
    let mut session = Session::over(c, "qemu:///system", FAST, &s).unwrap();
    t.join().unwrap();
    assert!(matches!(session.run(&s), SessionError::Closed));
}

#[test]
fn refusals_say_what_and_why_and_sasl_is_named() {
    let (c, mut server) = pair();
    let (s, _wake) = shared();
    let t = std::thread::spawn(move || server.handshake(&[1]));
    let e = Session::over(c, "qemu:///system", FAST, &s).err().unwrap();
    t.join().unwrap();
    assert!(matches!(e, SessionError::Auth(_)), "{e}");

    let (c, mut server) = pair();
    let t = std::thread::spawn(move || {
        let (h, _) = server.read();
        let err = Xdr::default()
            .i32(38)
            .i32(7)
            .some_string("authentication failed")
            .bytes();
        server.reply(h, 1, &err);
    });
    let e = Session::over(c, "qemu:///system", FAST, &s).err().unwrap();
    t.join().unwrap();
    assert_eq!(
        e.to_string(),
        "libvirt refused its auth list: authentication failed"
    );

    let (c, _server) = pair();
    let e = Session::over(c, "qemu:///system", FAST, &s).err().unwrap();
    assert!(matches!(e, SessionError::Silent(_)), "{e}");
}

#[test]
fn local_system_uris_are_spoken_natively_and_the_rest_through_the_library() {
    let t = target("qemu:///system").unwrap();
    assert_eq!(
        (t.name.as_str(), t.driver.as_str(), t.socket),
        ("qemu:///system", "qemu", None)
    );
    let t = target("qemu+unix:///system?socket=/tmp/x.sock").unwrap();
    assert_eq!(t.name, "qemu:///system");
    assert_eq!(t.socket.as_deref(), Some(Path::new("/tmp/x.sock")));
    for other in [
        "test:///default",
        "qemu:///session",
        "qemu+ssh://host/system",
        "qemu://host/system",
        "qemu+tls://host/system",
        "qemu:///system?mode=legacy",
        "qemu:///system?socket=/a&mode=direct",
        "Qemu:///system",
        "qemu",
        "",
    ] {
        assert_eq!(target(other), None, "{other}");
    }
}

#[test]
fn the_socket_is_the_modular_daemons_where_it_exists() {
    let dir = tempfile::tempdir().unwrap();
    let t = target("qemu:///system").unwrap();
    assert_eq!(t.socket_in(dir.path()), dir.path().join("libvirt-sock-ro"));
    std::fs::write(dir.path().join("virtqemud-sock-ro"), "").unwrap();
    assert_eq!(
        t.socket_in(dir.path()),
        dir.path().join("virtqemud-sock-ro")
    );
    let t = target("qemu+unix:///system?socket=/s").unwrap();
    assert_eq!(t.socket_in(dir.path()), Path::new("/s"));
}
