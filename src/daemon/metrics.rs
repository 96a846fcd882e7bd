//! Prometheus metrics, opt-in (`virtgate daemon --metrics ADDR:PORT`): `GET /metrics`
//! answers in the OpenMetrics text format, written by the `prometheus-client` crate (the
//! Prometheus project's own Rust client: names, types, `_total` suffixes and `# EOF` as
//! scrapers parse them). Its text encoder writes `&str` label values as they are, so they
//! are escaped here (`\`, `"`, newline), as the format requires: domain names may hold
//! any of them.
//!
//! Per forward (labels `domain`, `proto`, `listen`, `host_ports`, `guest_ports`: the
//! forward as configured, stable while its config entry stays):
//! `virtgate_forward_packets_total`, `virtgate_forward_bytes_total` (both directions,
//! counted in the kernel), `virtgate_forward_connections_total` (new connections
//! forwarded), `virtgate_forward_rate_limited_total` (new connections its rate
//! limit dropped), `virtgate_forward_active` (1 while it forwards, else 0). Per daemon:
//! `virtgate_daemon_events_total`, `_reconciles_total`, `_applies_total`,
//! `_heals_total`, `_errors_total`, `virtgate_daemon_backoff_seconds`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use super::Report;

/// One forward's figures at a scrape.
#[derive(Debug, Clone, Default)]
pub struct ForwardFigures {
    pub domain: String,
    pub proto: String,
    pub listen: String,
    pub host_ports: String,
    pub guest_ports: String,
    pub packets: u64,
    pub bytes: u64,
    pub connections: u64,
    pub rate_limited: u64,
    pub active: bool,
}

/// Everything one scrape shows.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub forwards: Vec<ForwardFigures>,
    pub daemon: Report,
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.encode_forwards(&mut enc)?;
        self.encode_daemon(&mut enc)
    }
}

impl Snapshot {
    fn encode_forwards(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        type Per = fn(&ForwardFigures) -> u64;
        let per_forward: [(&str, &str, Per, bool); 5] = [
            (
                "virtgate_forward_packets",
                "Packets of the forward's connections, both directions",
                |f| f.packets,
                true,
            ),
            (
                "virtgate_forward_bytes",
                "Bytes of the forward's connections, both directions",
                |f| f.bytes,
                true,
            ),
            (
                "virtgate_forward_connections",
                "New connections forwarded (their first packets)",
                |f| f.connections,
                true,
            ),
            (
                "virtgate_forward_rate_limited",
                "New connections the forward's rate limit dropped",
                |f| f.rate_limited,
                true,
            ),
            (
                "virtgate_forward_active",
                "1 while the forward forwards, else 0 (pending, stopped, conflict)",
                |f| u64::from(f.active),
                false,
            ),
        ];
        for (name, help, value, counter) in per_forward {
            let kind = if counter {
                prometheus_client::metrics::MetricType::Counter
            } else {
                prometheus_client::metrics::MetricType::Gauge
            };
            let mut family = enc.encode_descriptor(name, help, None, kind)?;
            for f in &self.forwards {
                let labels = [
                    ("domain", escape(&f.domain)),
                    ("proto", escape(&f.proto)),
                    ("listen", escape(&f.listen)),
                    ("host_ports", escape(&f.host_ports)),
                    ("guest_ports", escape(&f.guest_ports)),
                ];
                let m = family.encode_family(&labels)?;
                if counter {
                    ConstCounter::new(value(f)).encode(m)?;
                } else {
                    ConstGauge::new(value(f) as i64).encode(m)?;
                }
            }
        }
        Ok(())
    }

    fn encode_daemon(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let d = &self.daemon;
        for (name, help, v) in [
            ("virtgate_daemon_events", "Events taken in", d.events),
            ("virtgate_daemon_reconciles", "Reconciles run", d.reconciles),
            (
                "virtgate_daemon_applies",
                "Reconciles that changed the kernel",
                d.applies,
            ),
            (
                "virtgate_daemon_heals",
                "Changes made after someone else changed the ruleset",
                d.heals,
            ),
            ("virtgate_daemon_errors", "Reconciles that failed", d.errors),
        ] {
            let m = enc.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            ConstCounter::new(v).encode(m)?;
        }
        let m = enc.encode_descriptor(
            "virtgate_daemon_backoff_seconds",
            "How long the next repair waits (something keeps removing virtgate's rules)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        ConstGauge::new(d.backoff_secs as i64).encode(m)?;
        Ok(())
    }
}

/// A label value as the text format writes it.
fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// The snapshot as OpenMetrics text.
pub fn render(snapshot: Snapshot) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snapshot));
    let mut out = String::new();
    // writing into a String cannot fail
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

/// The metrics endpoint.
pub struct Endpoint {
    inner: TcpListener,
}

impl Endpoint {
    pub fn bind(addr: SocketAddr) -> Result<Endpoint, String> {
        let at = |e: std::io::Error| format!("metrics on {addr}: {e}");
        let inner = TcpListener::bind(addr).map_err(at)?;
        inner.set_nonblocking(true).map_err(at)?;
        tracing::info!("metrics on http://{addr}/metrics");
        Ok(Endpoint { inner })
    }

    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.inner)
    }

    /// Answers the scrapes waiting; `snapshot` is taken once, when one asks for metrics.
    pub fn serve(&self, snapshot: impl FnOnce() -> Snapshot) {
        let mut body = None;
        let mut snapshot = Some(snapshot);
        while let Ok((s, _)) = self.inner.accept() {
            let wants = match request_path(&s) {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!("metrics: {e}");
                    continue;
                }
            };
            if wants != "/metrics" {
                respond(
                    s,
                    "404 Not Found",
                    "text/plain",
                    "not found: try /metrics\n",
                );
                continue;
            }
            let text = body
                .get_or_insert_with(|| snapshot.take().map(|f| render(f())).unwrap_or_default());
            respond(
                s,
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            );
        }
    }
}

/// The path of a `GET` request (read within a second, headers bounded).
fn request_path(s: &TcpStream) -> Result<String, String> {
    s.set_nonblocking(false).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s.take(16 << 10));
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| e.to_string())?;
    let mut parts = line.split_whitespace();
    let (Some("GET"), Some(path)) = (parts.next(), parts.next()) else {
        return Err(format!("not a GET: {:?}", line.trim_end()));
    };
    let path = path.split('?').next().unwrap_or(path).to_string();
    // the headers, up to the blank line
    let mut h = String::new();
    while r.read_line(&mut h).map_err(|e| e.to_string())? > 0 && h.trim() != "" {
        h.clear();
    }
    Ok(path)
}

fn respond(mut s: TcpStream, status: &str, kind: &str, body: &str) {
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    let _ = write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_has_every_family_with_escaped_labels() {
        let text = render(Snapshot {
            forwards: vec![ForwardFigures {
                domain: "web \"1\"\\\n".into(),
                proto: "tcp".into(),
                listen: "*".into(),
                host_ports: "8080".into(),
                guest_ports: "80".into(),
                packets: 7,
                bytes: 900,
                connections: 3,
                rate_limited: 2,
                active: true,
            }],
            daemon: Report {
                heals: 3,
                ..Default::default()
            },
        });
        for want in [
            "# TYPE virtgate_forward_packets counter",
            r#"virtgate_forward_packets_total{domain="web \"1\"\\\n",proto="tcp",listen="*",host_ports="8080",guest_ports="80"} 7"#,
            r#"virtgate_forward_bytes_total{domain="web \"1\"\\\n",proto="tcp",listen="*",host_ports="8080",guest_ports="80"} 900"#,
            r#"virtgate_forward_connections_total{domain="web \"1\"\\\n",proto="tcp",listen="*",host_ports="8080",guest_ports="80"} 3"#,
            "virtgate_forward_rate_limited_total{",
            r#"virtgate_forward_active{domain="web \"1\"\\\n",proto="tcp",listen="*",host_ports="8080",guest_ports="80"} 1"#,
            "virtgate_daemon_heals_total 3",
            "virtgate_daemon_backoff_seconds 0",
            "# EOF",
        ] {
            assert!(text.contains(want), "{want} not in:\n{text}");
        }
    }
}
