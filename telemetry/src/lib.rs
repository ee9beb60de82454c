//! What the agents tell operators, on a local HTTP port: `/metrics` in the Prometheus text format and
//! `/status` as JSON (migrations running and recently finished). Counters and histograms are atomics
//! owned by the agents; this crate renders and serves them. It knows nothing about migrations.
//!
//! It also sets up the agents' logging and their shutdown signal.
//!
//! The server speaks just enough HTTP/1.0 for Prometheus and curl: GET only, one request per
//! connection, request line and headers bounded.

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Logs to stderr at the level of `RUST_LOG` (default info), without colours when stderr is not a
/// terminal (agents usually log to a file or the journal).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// SIGTERM and SIGINT as they arrive, counted: an agent with work under way stops gracefully on the
/// first and at once on the second. Call from within a runtime.
pub fn stop_requests() -> tokio::sync::watch::Receiver<u32> {
    use tokio::signal::unix::{SignalKind, signal};
    let (tx, rx) = tokio::sync::watch::channel(0);
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::spawn(async move {
        loop {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            tx.send_modify(|n| *n += 1);
        }
    });
    rx
}

/// Resolves on the first SIGTERM or SIGINT ([`stop_requests`]): how an agent with nothing to finish is
/// told to stop.
pub async fn shutdown_signal() {
    let _ = stop_requests().wait_for(|n| *n >= 1).await;
}

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A histogram with fixed upper bounds (seconds), Prometheus style (cumulative buckets, sum, count).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, seconds: f64) {
        for (b, c) in self.bounds.iter().zip(&self.buckets) {
            if seconds <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_micros.fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// Downtime buckets, seconds.
pub const DOWNTIME_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// A migration in progress, as an agent lists it in `/status`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Running {
    pub id: String,
    pub pid: u32,
    /// The other agent: the target for a source agent, the source for a target agent.
    pub target: String,
    pub phase: String,
    pub started_unix: u64,
}

/// A finished migration, as an agent lists it in `/status`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Finished {
    pub id: String,
    pub pid: u32,
    /// The other agent, as for [`Running`].
    pub target: String,
    /// moved, refused (nothing touched), rolled_back (original resumed / copy dropped), in_doubt.
    pub outcome: String,
    pub downtime_ms: Option<f64>,
    pub wire_bytes: u64,
    pub error: Option<String>,
    pub finished_unix: u64,
}

/// The migrations an agent is running and has recently finished, for `/status` and a
/// `migrations_running` gauge.
pub struct Registry {
    running: Mutex<std::collections::HashMap<String, Running>>,
    recent: Recent<Finished>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry { running: Mutex::new(std::collections::HashMap::new()), recent: Recent::new(100) }
    }
}

impl Registry {
    /// Records a migration that starts.
    pub fn start(&self, r: Running) {
        self.running.lock().expect("not poisoned").insert(r.id.clone(), r);
    }

    /// Records that migration `id` (if it is running) is at `phase`.
    pub fn set_phase(&self, id: &str, phase: &str) {
        if let Some(r) = self.running.lock().expect("not poisoned").get_mut(id) {
            r.phase = phase.to_string();
        }
    }

    /// Moves migration `id` from running to recent.
    pub fn finish(&self, id: &str, done: Finished) {
        self.running.lock().expect("not poisoned").remove(id);
        self.recent.push(done);
    }

    pub fn running_count(&self) -> u64 {
        self.running.lock().expect("not poisoned").len() as u64
    }

    /// `{role, running, recent}`.
    pub fn status(&self, role: &str) -> serde_json::Value {
        let running: Vec<Running> = self.running.lock().expect("not poisoned").values().cloned().collect();
        serde_json::json!({ "role": role, "running": running, "recent": self.recent.list() })
    }
}

/// Seconds since the epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Renders metrics in the Prometheus text format.
#[derive(Default)]
pub struct Text(String);

impl Text {
    pub fn counter(&mut self, name: &str, help: &str, c: &Counter) -> &mut Self {
        let _ = write!(self.0, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n", c.get());
        self
    }

    pub fn gauge(&mut self, name: &str, help: &str, v: u64) -> &mut Self {
        let _ = write!(self.0, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n");
        self
    }

    pub fn histogram(&mut self, name: &str, help: &str, h: &Histogram) -> &mut Self {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in h.bounds.iter().zip(&h.buckets) {
            let _ = writeln!(self.0, "{name}_bucket{{le=\"{b}\"}} {}", c.load(Ordering::Relaxed));
        }
        let _ = writeln!(self.0, "{name}_bucket{{le=\"+Inf\"}} {}", h.count());
        let _ = writeln!(self.0, "{name}_sum {}", h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(self.0, "{name}_count {}", h.count());
        self
    }

    pub fn finish(self) -> String {
        self.0
    }
}

/// Something that can render its metrics and its status.
pub trait Source: Send + Sync + 'static {
    fn metrics(&self) -> String;
    fn status(&self) -> serde_json::Value;
}

/// A bounded list of recent items (finished migrations), newest last.
pub struct Recent<T> {
    max: usize,
    items: Mutex<Vec<T>>,
}

impl<T: Clone> Recent<T> {
    pub fn new(max: usize) -> Self {
        Recent { max, items: Mutex::new(Vec::new()) }
    }
    pub fn push(&self, item: T) {
        let mut items = self.items.lock().expect("not poisoned");
        items.push(item);
        let excess = items.len().saturating_sub(self.max);
        items.drain(..excess);
    }
    pub fn list(&self) -> Vec<T> {
        self.items.lock().expect("not poisoned").clone()
    }
}

/// Serves `/metrics` and `/status` of `source` on `addr` until the task is dropped.
pub async fn serve(addr: SocketAddr, source: Arc<dyn Source>) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics and status on http://{addr}/metrics and /status");
    Ok(tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { continue };
            let source = source.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut n = 0;
                // Read until the end of the headers, at most 4 KiB, at most 5 s.
                let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                    while n < buf.len() {
                        match stream.read(&mut buf[n..]).await {
                            Ok(0) | Err(_) => break,
                            Ok(k) => n += k,
                        }
                        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") || buf[..n].windows(2).any(|w| w == b"\n\n") {
                            break;
                        }
                    }
                })
                .await;
                if read.is_err() {
                    return;
                }
                let req = String::from_utf8_lossy(&buf[..n]);
                let path = req.split_whitespace().nth(1).unwrap_or("");
                let (code, ctype, body) = match (req.split_whitespace().next(), path) {
                    (Some("GET"), "/metrics") => ("200 OK", "text/plain; version=0.0.4", source.metrics()),
                    (Some("GET"), "/status") => ("200 OK", "application/json", source.status().to_string()),
                    _ => ("404 Not Found", "text/plain", "try /metrics or /status\n".to_string()),
                };
                let head = format!(
                    "HTTP/1.0 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(body.as_bytes()).await;
            });
        }
    }))
}

/// Fetches `path` from an agent's local HTTP port (for `migrate status`).
pub async fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = tokio::time::timeout(std::time::Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{addr} did not answer")))??;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes()).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    match out.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.0 200") => Ok(body.to_string()),
        _ => Err(std::io::Error::other(format!("{addr}{path}: {}", out.lines().next().unwrap_or("no answer")))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct S(Counter, Histogram);
    impl Source for S {
        fn metrics(&self) -> String {
            let mut t = Text::default();
            t.counter("x_total", "x", &self.0).histogram("d_seconds", "d", &self.1);
            t.finish()
        }
        fn status(&self) -> serde_json::Value {
            serde_json::json!({"ok": true})
        }
    }

    #[tokio::test]
    async fn serves_metrics_and_status() {
        let s = Arc::new(S(Counter::default(), Histogram::new(DOWNTIME_BUCKETS)));
        s.0.add(3);
        s.1.observe(0.2);
        s.1.observe(3.0);
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let _h = serve(addr, s.clone()).await.unwrap();
        let m = get(addr, "/metrics").await.unwrap();
        assert!(m.contains("x_total 3\n"), "{m}");
        assert!(m.contains("d_seconds_bucket{le=\"0.25\"} 1\n") && m.contains("d_seconds_bucket{le=\"5\"} 2\n"), "{m}");
        assert!(m.contains("d_seconds_count 2\n"), "{m}");
        assert_eq!(get(addr, "/status").await.unwrap(), "{\"ok\":true}");
        assert!(get(addr, "/nope").await.is_err());
    }

    #[test]
    fn recent_is_bounded() {
        let r = Recent::new(2);
        for i in 0..5 {
            r.push(i);
        }
        assert_eq!(r.list(), vec![3, 4]);
    }
}
