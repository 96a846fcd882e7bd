//! Logging with `tracing`: to stderr always, and for the libvirt hook also to syslog
//! (/dev/log, which journald serves too), so messages survive libvirt swallowing stderr.

use std::io::{self, Write};
use std::os::unix::net::UnixDatagram;

/// Writes each formatted line to stderr and, if connected, to syslog.
#[derive(Clone, Copy)]
struct Tee {
    syslog: bool,
}

struct TeeWriter {
    syslog: bool,
    buf: Vec<u8>,
}

impl Write for TeeWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for TeeWriter {
    fn drop(&mut self) {
        let _ = io::stderr().write_all(&self.buf);
        if self.syslog {
            let text = String::from_utf8_lossy(&self.buf);
            let line = text.trim_end();
            let pri = if line.contains("ERROR") {
                3
            } else if line.contains("WARN") {
                4
            } else {
                6
            };
            // facility daemon (3): PRI = 3 * 8 + severity
            let msg = format!("<{}>virtgate[{}]: {line}", 24 + pri, std::process::id());
            if let Ok(s) = UnixDatagram::unbound() {
                let _ = s.send_to(msg.as_bytes(), "/dev/log");
            }
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Tee {
    type Writer = TeeWriter;

    fn make_writer(&'a self) -> Self::Writer {
        TeeWriter {
            syslog: self.syslog,
            buf: Vec::new(),
        }
    }
}

/// Sets up logging. `VIRTGATE_LOG` overrides the level (e.g. `debug`).
pub fn init(verbose: u8, syslog: bool) {
    let default = match verbose {
        0 if syslog => "info",
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("VIRTGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Tee { syslog })
        .with_target(false)
        .with_ansi(false)
        .without_time()
        .try_init();
}
