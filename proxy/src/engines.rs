//! Colocated engines: for each `local_models` entry the gateway runs one `sluice-engine` process
//! on a unix socket, waits for its `/health`, restarts it with backoff when it dies, and stops it
//! on shutdown. Routing reaches it through the `hosted_vllm/` deployment the config made for it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use sluice_config::LocalModel;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// Restart delays double from this up to `MAX_BACKOFF`; a run longer than `STABLE_RUN` resets.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const STABLE_RUN: Duration = Duration::from_secs(60);
const HEALTH_POLL: Duration = Duration::from_millis(100);

/// The running supervisors.
pub struct EngineSupervisor {
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// `engine_binary` when given; else `sluice-engine` next to the running `sluice`; else on PATH.
pub fn engine_binary(explicit: Option<&Path>) -> PathBuf {
    if let Some(path) = explicit {
        return path.to_path_buf();
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("sluice-engine")))
        .filter(|candidate| candidate.is_file())
        .unwrap_or_else(|| PathBuf::from("sluice-engine"))
}

impl EngineSupervisor {
    /// Start every engine and wait (each up to its `startup_timeout`) until it answers
    /// `/health`. An engine that is not ready in time keeps being supervised; requests to it fail
    /// over like any unreachable deployment until it is.
    pub async fn start(models: &[LocalModel]) -> EngineSupervisor {
        let (shutdown, _) = watch::channel(false);
        let mut tasks = Vec::new();
        let mut waits = Vec::new();
        for model in models {
            let (ready_tx, ready_rx) = oneshot::channel();
            tasks.push(tokio::spawn(supervise(
                model.clone(),
                shutdown.subscribe(),
                ready_tx,
            )));
            waits.push((model.model_name.clone(), model.startup_timeout, ready_rx));
        }
        for (name, timeout, ready) in waits {
            match tokio::time::timeout(timeout, ready).await {
                Ok(Ok(())) => {}
                _ => tracing::error!(
                    model = %name,
                    timeout_s = timeout.as_secs_f64(),
                    "engine not ready in time; serving without it until it is"
                ),
            }
        }
        EngineSupervisor { shutdown, tasks }
    }

    /// Stop every engine: SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(self, grace: Duration) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            if tokio::time::timeout(grace + Duration::from_secs(1), task)
                .await
                .is_err()
            {
                tracing::error!("an engine supervisor did not stop in time");
            }
        }
    }
}

fn spawn_engine(model: &LocalModel) -> std::io::Result<Child> {
    let binary = engine_binary(model.engine_binary.as_deref());
    let mut command = Command::new(&binary);
    command
        .arg("serve")
        .arg(&model.model)
        .arg("--socket")
        .arg(&model.socket)
        .arg("--served-model-name")
        .arg(&model.model_name)
        .args(&model.args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    // SAFETY: prctl is async-signal-safe; it only asks the kernel to SIGTERM the engine if the
    // gateway dies without stopping it, so no orphan keeps the socket and the memory.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    command
        .spawn()
        .map_err(|e| std::io::Error::new(e.kind(), format!("starting {}: {e}", binary.display())))
}

/// One `GET /health` over the unix socket; true on a 200.
pub async fn engine_healthy(socket: &Path) -> bool {
    let attempt = async {
        let mut stream = tokio::net::UnixStream::connect(socket).await?;
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await?;
        let mut head = [0u8; 16];
        let n = stream.read(&mut head).await?;
        Ok::<bool, std::io::Error>(head[..n].starts_with(b"HTTP/1.1 200"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Ok(true))
    )
}

async fn terminate(child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id() {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

async fn supervise(
    model: LocalModel,
    mut shutdown: watch::Receiver<bool>,
    ready: oneshot::Sender<()>,
) {
    let name = model.model_name.as_str();
    let mut ready = Some(ready);
    let mut backoff = FIRST_BACKOFF;
    let mut restarts = 0u32;
    loop {
        // A socket file left by a killed engine would make its bind fail.
        let _ = std::fs::remove_file(&model.socket);
        let started = Instant::now();
        match spawn_engine(&model) {
            Err(e) => tracing::error!(model = %name, error = %e, "cannot start engine"),
            Ok(mut child) => {
                tracing::info!(model = %name, pid = child.id(), socket = %model.socket.display(), restarts, "engine started");
                let mut healthy = false;
                let mut poll = tokio::time::interval(HEALTH_POLL);
                let status = loop {
                    tokio::select! {
                        status = child.wait() => break Some(status),
                        _ = shutdown.changed() => {
                            terminate(&mut child, Duration::from_secs(10)).await;
                            let _ = std::fs::remove_file(&model.socket);
                            tracing::info!(model = %name, "engine stopped");
                            return;
                        }
                        _ = poll.tick(), if !healthy => {
                            if engine_healthy(&model.socket).await {
                                healthy = true;
                                tracing::info!(model = %name, startup_ms = started.elapsed().as_millis() as u64, "engine ready");
                                if let Some(tx) = ready.take() {
                                    let _ = tx.send(());
                                }
                            }
                        }
                    }
                };
                let status = status.map(|s| s.map(|s| s.to_string()));
                tracing::error!(model = %name, status = ?status, "engine exited; restarting in {backoff:?}");
            }
        }
        if started.elapsed() > STABLE_RUN {
            backoff = FIRST_BACKOFF;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
        restarts += 1;
    }
}
