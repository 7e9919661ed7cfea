//! `sluice-load`: a small closed-loop HTTP/1.1 load generator for Sluice's load harness
//! (`benches/run.sh`).
//!
//! Each of `--concurrency` workers owns one keep-alive connection (hyper 1 client) and sends
//! `POST --url` with the `--body` JSON again as soon as the previous response body has been read
//! in full. Requests that complete during the `--warmup` seconds are not measured; after that,
//! every request completing in the next `--duration` seconds is. A non-2xx status, a transport
//! error or (with `--stream`) a body without the `[DONE]` marker counts as an error; a broken
//! connection is re-dialled.
//!
//! With `--stream` the body's `"stream"` field is set to `true`, the SSE body is read to the end
//! and the time to the first body byte is recorded as well. `--model` overrides the body's
//! `"model"` field, so one body file serves every target.
//!
//! Prints one JSON object on stdout:
//!
//! ```json
//! {"url": "...", "concurrency": 16, "stream": false, "warmup_s": 2.0, "duration_s": 10.0,
//!  "requests": 123456, "errors": 0, "total_requests": 150000, "rps": 12345.6,
//!  "latency_us": {"p50": 1200, "p90": 1500, "p99": 2100, "max": 9000, "mean": 1250.3},
//!  "ttfb_us": null, "body_bytes": 98765432, "first_error": null}
//! ```
//!
//! `requests`/`errors` cover the measured window only; `total_requests` counts every request
//! sent (warmup and the ones in flight at the end included), which is what a caller needs to
//! turn a process's CPU time over the whole run into CPU per request. `ttfb_us` (same shape as
//! `latency_us`) is only set with `--stream`; `first_error` describes the first failure seen
//! (warmup included), if any. Latency is measured from just before the request
//! is written to the end of the response body.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1;
use hyper::header::{HeaderValue, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpStream;

#[derive(Parser, Debug)]
#[command(
    name = "sluice-load",
    about = "Closed-loop HTTP/1.1 load generator (one keep-alive connection per worker)"
)]
struct Args {
    /// Target, e.g. `http://127.0.0.1:4000/v1/chat/completions` (plain http only).
    #[arg(long)]
    url: String,
    /// Concurrent workers, each with its own connection and one request in flight.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Measured seconds (after the warmup).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of load before measuring starts.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Request body: a file path, or inline JSON when it starts with `{` or `[`.
    #[arg(long)]
    body: Option<String>,
    /// Override the body's `"model"` field.
    #[arg(long)]
    model: Option<String>,
    /// Streaming: set `"stream": true`, read the SSE body fully, also record time to first byte.
    #[arg(long)]
    stream: bool,
    /// Extra request header `NAME: VALUE` (repeatable), e.g. `authorization: Bearer sk-x`.
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    /// Per-request timeout in seconds (an expired request counts as an error).
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    /// Runtime threads: 1 runs everything on a current-thread runtime.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

/// What every worker needs to build its requests.
struct Target {
    host: String,
    port: u16,
    authority: HeaderValue,
    path: Uri,
    body: Bytes,
    headers: Vec<(hyper::header::HeaderName, HeaderValue)>,
    stream: bool,
    timeout: Duration,
    measure_from: Instant,
    end: Instant,
}

/// One worker's measurements.
#[derive(Default)]
struct WorkerStats {
    latency_us: Vec<u64>,
    ttfb_us: Vec<u64>,
    errors: u64,
    body_bytes: u64,
    /// The first error seen, to say why a run failed.
    first_error: Option<String>,
}

impl WorkerStats {
    fn error(&mut self, counted: bool, why: impl FnOnce() -> String) {
        if counted {
            self.errors += 1;
        }
        if self.first_error.is_none() {
            self.first_error = Some(why());
        }
    }
}

/// Why a request did not count as a success.
enum Failure {
    /// The connection is unusable; dial a new one.
    Connection(String),
    /// The exchange completed but the answer is wrong (status, missing `[DONE]`).
    Answer(String),
}

/// A successful exchange: body size and, when streaming, time to the first body byte.
struct Answer {
    bytes: u64,
    ttfb: Option<Duration>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let rt = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?
    };
    let report = rt.block_on(run(args))?;
    println!("{report}");
    Ok(())
}

fn load_body(args: &Args) -> Result<Bytes> {
    let raw = match args.body.as_deref() {
        None => r#"{"model":"bench","messages":[{"role":"user","content":"hello"}]}"#.to_owned(),
        Some(s) if s.trim_start().starts_with(['{', '[']) => s.to_owned(),
        Some(path) => std::fs::read_to_string(Path::new(path))
            .with_context(|| format!("reading body file {path}"))?,
    };
    if args.model.is_none() && !args.stream {
        return Ok(Bytes::from(raw));
    }
    let mut v: Value = serde_json::from_str(&raw).context("--body is not valid JSON")?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| anyhow!("--model/--stream need a JSON object body"))?;
    if let Some(m) = &args.model {
        obj.insert("model".into(), Value::String(m.clone()));
    }
    if args.stream {
        obj.insert("stream".into(), Value::Bool(true));
    }
    Ok(Bytes::from(serde_json::to_vec(&v)?))
}

fn parse_target(args: &Args) -> Result<Target> {
    let uri: Uri = args.url.parse().context("--url")?;
    if uri.scheme_str() != Some("http") {
        bail!("--url must be plain http://");
    }
    let host = uri.host().ok_or_else(|| anyhow!("--url has no host"))?;
    let port = uri.port_u16().unwrap_or(80);
    let authority = uri
        .authority()
        .ok_or_else(|| anyhow!("--url has no authority"))?;
    let path: Uri = uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .parse()
        .context("--url path")?;
    let mut headers = Vec::new();
    for h in &args.headers {
        let (name, value) = h
            .split_once(':')
            .ok_or_else(|| anyhow!("--header {h:?} is not `NAME: VALUE`"))?;
        headers.push((name.trim().parse()?, value.trim().parse()?));
    }
    let now = Instant::now();
    let measure_from = now + Duration::from_secs_f64(args.warmup.max(0.0));
    Ok(Target {
        host: host.trim_matches(['[', ']']).to_owned(),
        port,
        authority: HeaderValue::from_str(authority.as_str())?,
        path,
        body: load_body(args)?,
        headers,
        stream: args.stream,
        timeout: Duration::from_secs_f64(args.timeout),
        measure_from,
        end: measure_from + Duration::from_secs_f64(args.duration),
    })
}

async fn run(args: Args) -> Result<Value> {
    let target = Arc::new(parse_target(&args)?);
    let sent = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(args.concurrency);
    for _ in 0..args.concurrency {
        tasks.push(tokio::spawn(worker(target.clone(), sent.clone())));
    }
    let mut total = WorkerStats::default();
    for t in tasks {
        let s = t.await?;
        total.latency_us.extend(s.latency_us);
        total.ttfb_us.extend(s.ttfb_us);
        total.errors += s.errors;
        total.body_bytes += s.body_bytes;
        if total.first_error.is_none() {
            total.first_error = s.first_error;
        }
    }
    let requests = total.latency_us.len() as u64;
    Ok(json!({
        "url": args.url,
        "concurrency": args.concurrency,
        "stream": args.stream,
        "warmup_s": args.warmup,
        "duration_s": args.duration,
        "requests": requests,
        "errors": total.errors,
        "total_requests": sent.load(Ordering::Relaxed),
        "rps": requests as f64 / args.duration,
        "latency_us": summary(&mut total.latency_us),
        "ttfb_us": if args.stream { summary(&mut total.ttfb_us) } else { Value::Null },
        "body_bytes": total.body_bytes,
        "first_error": total.first_error,
    }))
}

/// p50/p90/p99/max/mean of a sample (nearest-rank percentiles); `null` when empty.
fn summary(v: &mut [u64]) -> Value {
    if v.is_empty() {
        return Value::Null;
    }
    v.sort_unstable();
    let pct = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    let mean = v.iter().sum::<u64>() as f64 / v.len() as f64;
    json!({
        "p50": pct(0.50),
        "p90": pct(0.90),
        "p99": pct(0.99),
        "max": v[v.len() - 1],
        "mean": (mean * 10.0).round() / 10.0,
    })
}

type Sender = http1::SendRequest<Full<Bytes>>;

async fn connect(t: &Target) -> Result<Sender> {
    let tcp = TcpStream::connect((t.host.as_str(), t.port)).await?;
    tcp.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        // Ends when the sender is dropped or the peer closes; either way the worker notices.
        let _ = conn.await;
    });
    Ok(sender)
}

async fn worker(t: Arc<Target>, sent: Arc<AtomicU64>) -> WorkerStats {
    let mut stats = WorkerStats::default();
    let mut conn: Option<Sender> = None;
    while Instant::now() < t.end {
        let sender = match conn.as_mut() {
            Some(s) => s,
            None => match connect(&t).await {
                Ok(s) => conn.insert(s),
                Err(e) => {
                    stats.error(Instant::now() >= t.measure_from, || {
                        format!("connect: {e:#}")
                    });
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        if sender.ready().await.is_err() {
            conn = None;
            continue;
        }
        sent.fetch_add(1, Ordering::Relaxed);
        let start = Instant::now();
        let outcome = match tokio::time::timeout(t.timeout, exchange(&t, sender, start)).await {
            Ok(r) => r,
            Err(_) => Err(Failure::Connection("request timed out".into())),
        };
        let done = Instant::now();
        let measured = done >= t.measure_from && done <= t.end;
        match outcome {
            Ok(answer) => {
                if measured {
                    stats.latency_us.push(micros(done - start));
                    if let Some(d) = answer.ttfb {
                        stats.ttfb_us.push(micros(d));
                    }
                    stats.body_bytes += answer.bytes;
                }
            }
            Err(Failure::Answer(why)) => stats.error(measured, || why),
            Err(Failure::Connection(why)) => {
                stats.error(measured, || why);
                conn = None;
            }
        }
    }
    stats
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Sends one request and reads the whole response body.
async fn exchange(t: &Target, sender: &mut Sender, start: Instant) -> Result<Answer, Failure> {
    let conn_err = |e: &dyn std::fmt::Display| Failure::Connection(e.to_string());
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(t.path.clone())
        .header(HOST, t.authority.clone())
        .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
        .body(Full::new(t.body.clone()))
        .map_err(|e| conn_err(&e))?;
    for (name, value) in &t.headers {
        req.headers_mut().insert(name.clone(), value.clone());
    }
    let resp = sender.send_request(req).await.map_err(|e| conn_err(&e))?;
    let status = resp.status();
    let mut body = resp.into_body();
    let mut bytes = 0u64;
    let mut ttfb = None;
    // Last few bytes seen, to find the SSE `[DONE]` marker even when it straddles frames.
    let mut tail: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| conn_err(&e))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        if bytes == 0 && t.stream {
            ttfb = Some(start.elapsed());
        }
        bytes += data.len() as u64;
        if t.stream {
            tail.extend_from_slice(&data[data.len().saturating_sub(32)..]);
            let excess = tail.len().saturating_sub(32);
            tail.drain(..excess);
        }
    }
    if !status.is_success() {
        return Err(Failure::Answer(format!("HTTP status {status}")));
    }
    if t.stream && !tail.windows(6).any(|w| w == b"[DONE]") {
        return Err(Failure::Answer("stream ended without [DONE]".into()));
    }
    Ok(Answer { bytes, ttfb })
}
