//! The few messages of libvirt's RPC protocol the daemon's own client speaks, as bytes:
//! pure, no I/O. The protocol (libvirt's `src/rpc/virnetprotocol.x`,
//! `src/remote/remote_protocol.x`, `src/rpc/virkeepaliveprotocol.x`) is XDR: every
//! message is a big-endian length word counting itself, a 24-byte header (program,
//! version, procedure, type, serial, status) and a payload. The procedure numbers are
//! append-only in libvirt (they never change); the unit tests hold the bytes libvirt's own
//! client (virsh 9.0) sends for the same calls, captured with strace.

/// libvirt's remote program and its one version.
pub const REMOTE_PROGRAM: u32 = 0x2000_8086;
/// The keepalive program ("keep").
pub const KEEPALIVE_PROGRAM: u32 = 0x6b65_6570;
const VERSION: u32 = 1;

/// Remote procedures used here.
pub const PROC_CONNECT_OPEN: i32 = 1;
pub const PROC_CONNECT_SUPPORTS_FEATURE: i32 = 60;
pub const PROC_AUTH_LIST: i32 = 66;
pub const PROC_NETWORK_EVENT_REGISTER_ANY: i32 = 313;
pub const PROC_DOMAIN_EVENT_CALLBACK_REGISTER_ANY: i32 = 316;
/// Keepalive procedures.
pub const PROC_PING: i32 = 1;
pub const PROC_PONG: i32 = 2;

/// Message types and statuses.
pub const CALL: u32 = 0;
pub const REPLY: u32 = 1;
pub const MESSAGE: u32 = 2;
pub const STATUS_OK: u32 = 0;

/// `VIR_DRV_FEATURE_PROGRAM_KEEPALIVE`: asking for it starts the server's keepalive.
pub const FEATURE_PROGRAM_KEEPALIVE: i32 = 10;
/// `VIR_CONNECT_RO`.
pub const CONNECT_RO: u32 = 1;
/// `REMOTE_AUTH_NONE`: what libvirtd answers root on its unix sockets (it waives polkit
/// for root; SASL is 1, polkit 2).
pub const AUTH_NONE: i32 = 0;

/// Header size on the wire, and the largest message libvirt sends (16 MiB plus the
/// length word).
const HEADER: usize = 24;
const MESSAGE_MAX: usize = 16 * 1024 * 1024 + 4;

/// What is wrong with bytes that came from the socket.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("libvirt sent a message of {0} bytes (at least 28 and at most 16 MiB expected)")]
    Length(usize),
    #[error("libvirt's reply is cut short")]
    Short,
}

/// The header of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub program: u32,
    pub version: u32,
    pub procedure: i32,
    pub kind: u32,
    pub serial: u32,
    pub status: u32,
}

/// An XDR encoder.
#[derive(Default)]
pub struct Xdr(Vec<u8>);

impl Xdr {
    pub fn u32(mut self, v: u32) -> Xdr {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn i32(self, v: i32) -> Xdr {
        self.u32(v as u32)
    }

    /// A string: its length, its bytes, zeros to a multiple of four.
    pub fn string(self, s: &str) -> Xdr {
        let mut x = self.u32(s.len() as u32);
        x.0.extend_from_slice(s.as_bytes());
        x.0.resize(x.0.len().next_multiple_of(4), 0);
        x
    }

    /// An optional value (XDR's pointer): 0, or 1 and the value.
    pub fn some_string(self, s: &str) -> Xdr {
        self.u32(1).string(s)
    }

    pub fn none(self) -> Xdr {
        self.u32(0)
    }

    pub fn bytes(self) -> Vec<u8> {
        self.0
    }
}

/// One whole message: length, header, payload.
fn message(program: u32, procedure: i32, kind: u32, serial: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Xdr::default()
        .u32((4 + HEADER + payload.len()) as u32)
        .u32(program)
        .u32(VERSION)
        .i32(procedure)
        .u32(kind)
        .u32(serial)
        .u32(STATUS_OK)
        .bytes();
    out.extend_from_slice(payload);
    out
}

/// A call of a remote procedure.
pub fn call(procedure: i32, serial: u32, payload: &[u8]) -> Vec<u8> {
    message(REMOTE_PROGRAM, procedure, CALL, serial, payload)
}

/// A keepalive message (PING or PONG: no payload, serial 0).
pub fn keepalive(procedure: i32) -> Vec<u8> {
    message(KEEPALIVE_PROGRAM, procedure, MESSAGE, 0, &[])
}

/// Takes the first whole message off the front of `buf`: its header and payload, or
/// None while it is incomplete.
pub fn take_message(buf: &mut Vec<u8>) -> Result<Option<(Header, Vec<u8>)>, WireError> {
    let Some(len) = buf
        .first_chunk::<4>()
        .map(|b| u32::from_be_bytes(*b) as usize)
    else {
        return Ok(None);
    };
    if !(4 + HEADER..=MESSAGE_MAX).contains(&len) {
        return Err(WireError::Length(len));
    }
    if buf.len() < len {
        return Ok(None);
    }
    let mut r = Reader(&buf[4..len]);
    let header = Header {
        program: r.u32()?,
        version: r.u32()?,
        procedure: r.i32()?,
        kind: r.u32()?,
        serial: r.u32()?,
        status: r.u32()?,
    };
    let payload = r.0.to_vec();
    buf.drain(..len);
    Ok(Some((header, payload)))
}

/// An XDR decoder over a payload.
pub struct Reader<'a>(pub &'a [u8]);

impl Reader<'_> {
    pub fn u32(&mut self) -> Result<u32, WireError> {
        let (v, rest) = self.0.split_first_chunk::<4>().ok_or(WireError::Short)?;
        self.0 = rest;
        Ok(u32::from_be_bytes(*v))
    }

    pub fn i32(&mut self) -> Result<i32, WireError> {
        self.u32().map(|v| v as i32)
    }

    pub fn string(&mut self) -> Result<String, WireError> {
        let len = self.u32()? as usize;
        let padded = len.next_multiple_of(4);
        if self.0.len() < padded {
            return Err(WireError::Short);
        }
        let s = String::from_utf8_lossy(&self.0[..len]).into_owned();
        self.0 = &self.0[padded..];
        Ok(s)
    }

    pub fn optional_string(&mut self) -> Result<Option<String>, WireError> {
        match self.u32()? {
            0 => Ok(None),
            _ => self.string().map(Some),
        }
    }
}

/// The text of an error reply (`remote_error`: code, domain, message, ...).
pub fn error_text(payload: &[u8]) -> String {
    let mut r = Reader(payload);
    let parsed = (|| {
        let code = r.i32()?;
        let _domain = r.i32()?;
        let message = r.optional_string()?;
        Ok::<_, WireError>((code, message))
    })();
    match parsed {
        Ok((_, Some(m))) => m,
        Ok((code, None)) => format!("error {code}"),
        Err(_) => "an error libvirt did not describe".into(),
    }
}

/// `remote_auth_list_ret`: the authentication types the server asks for.
pub fn auth_types(payload: &[u8]) -> Result<Vec<i32>, WireError> {
    let mut r = Reader(payload);
    let n = r.u32()? as usize;
    if n > 20 {
        return Err(WireError::Short);
    }
    (0..n).map(|_| r.i32()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// The calls virsh 9.0 made (`strace -e write -xx virsh -r event ...`): the same
    /// bytes here.
    #[test]
    fn calls_are_the_bytes_libvirts_own_client_sends() {
        assert_eq!(
            hex(&call(PROC_AUTH_LIST, 0, &[])),
            "0000001c200080860000000100000042000000000000000000000000"
        );
        let feature = Xdr::default().i32(FEATURE_PROGRAM_KEEPALIVE).bytes();
        assert_eq!(
            hex(&call(PROC_CONNECT_SUPPORTS_FEATURE, 1, &feature)),
            "0000002020008086000000010000003c0000000000000001000000000000000a"
        );
        let open = Xdr::default().some_string("").u32(CONNECT_RO).bytes();
        assert_eq!(
            hex(&call(PROC_CONNECT_OPEN, 2, &open)),
            "00000028200080860000000100000001000000000000000200000000000000010000000000000001"
        );
        let metadata = Xdr::default().i32(23).none().bytes();
        assert_eq!(
            hex(&call(PROC_DOMAIN_EVENT_CALLBACK_REGISTER_ANY, 7, &metadata)),
            "0000002420008086000000010000013c0000000000000007000000000000001700000000"
        );
        let network = Xdr::default().i32(0).none().bytes();
        assert_eq!(
            hex(&call(PROC_NETWORK_EVENT_REGISTER_ANY, 7, &network)),
            "000000242000808600000001000001390000000000000007000000000000000000000000"
        );
        assert_eq!(
            hex(&call(2, 10, &[])), // REMOTE_PROC_CONNECT_CLOSE,
            "0000001c200080860000000100000002000000000000000a00000000"
        );
    }

    #[test]
    fn strings_are_padded_to_four_bytes() {
        let b = Xdr::default().some_string("qemu:///system").bytes();
        assert_eq!(b.len(), 4 + 4 + 16);
        assert_eq!(&b[4..8], &14u32.to_be_bytes());
        assert_eq!(&b[22..], &[0, 0]);
        let mut r = Reader(&b);
        assert_eq!(
            r.optional_string().unwrap().as_deref(),
            Some("qemu:///system")
        );
        assert!(r.0.is_empty());
    }

    #[test]
    fn messages_come_off_the_buffer_whole_and_in_order() {
        let mut buf = keepalive(PROC_PING);
        buf.extend(call(PROC_AUTH_LIST, 5, &[1, 2, 3, 4]));
        let second_len = buf.len();
        // a third one, cut short
        buf.extend(&keepalive(PROC_PONG)[..10]);
        let (h, p) = take_message(&mut buf).unwrap().unwrap();
        assert_eq!(
            h,
            Header {
                program: KEEPALIVE_PROGRAM,
                version: 1,
                procedure: PROC_PING,
                kind: MESSAGE,
                serial: 0,
                status: 0
            }
        );
        assert!(p.is_empty());
        let (h, p) = take_message(&mut buf).unwrap().unwrap();
        assert_eq!(
            (h.procedure, h.serial, p),
            (PROC_AUTH_LIST, 5, vec![1, 2, 3, 4])
        );
        assert!(second_len > buf.len());
        assert_eq!(take_message(&mut buf), Ok(None), "incomplete: wait");
        assert_eq!(buf.len(), 10);
        assert_eq!(take_message(&mut Vec::new()), Ok(None));
    }

    #[test]
    fn impossible_lengths_are_refused() {
        for len in [0u32, 27, 16 * 1024 * 1024 + 5, u32::MAX] {
            let mut buf = len.to_be_bytes().to_vec();
            buf.extend([0; 40]);
            assert_eq!(take_message(&mut buf), Err(WireError::Length(len as usize)));
        }
    }

    #[test]
    fn error_replies_say_what_libvirt_said() {
        let p = Xdr::default()
            .i32(38)
            .i32(7)
            .some_string("Failed to connect socket")
            .bytes();
        assert_eq!(error_text(&p), "Failed to connect socket");
        assert_eq!(
            error_text(&Xdr::default().i32(1).i32(0).none().bytes()),
            "error 1"
        );
        assert_eq!(error_text(&[0, 0]), "an error libvirt did not describe");
    }

    #[test]
    fn auth_lists_decode_and_bad_ones_fail() {
        let p = Xdr::default().u32(2).i32(AUTH_NONE).i32(2).bytes();
        assert_eq!(auth_types(&p).unwrap(), vec![AUTH_NONE, 2]);
        assert!(
            auth_types(&Xdr::default().u32(0).bytes())
                .unwrap()
                .is_empty()
        );
        assert!(auth_types(&Xdr::default().u32(3).i32(0).bytes()).is_err());
        assert!(auth_types(&Xdr::default().u32(1000).bytes()).is_err());
    }
}
