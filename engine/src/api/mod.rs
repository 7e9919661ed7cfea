//! The HTTP API: OpenAI routes under `/v1` and vLLM's native routes, on TCP or a unix socket.
//!
//! Every handler needs only an [`EngineHandle`]: [`router`] builds the routes around one, and
//! [`serve`] runs them on a [`Listener`] until the shutdown future resolves, letting requests in
//! flight finish.

pub mod chat;
pub mod completions;
pub mod embeddings;
pub mod errors;
pub mod generation;
pub mod logprobs;
pub mod openai;
pub mod score;
pub mod sse;
pub mod tokenize;

use std::future::Future;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::engine::EngineHandle;
use crate::error::{EngineError, Result};
use crate::sampling::SamplingParams;

pub use errors::ApiError;

/// Long prompts and big embedding batches exceed axum's 2 MiB default.
const MAX_BODY_BYTES: usize = 64 << 20;

/// Where the API listens.
pub enum Listener {
    /// An already bound socket (`Listener::bind_tcp`, or port 0 in tests).
    Tcp(tokio::net::TcpListener),
    /// A unix socket path; a stale socket file there is replaced.
    Unix(PathBuf),
}

impl Listener {
    /// `--host` / `--port`.
    pub async fn bind_tcp(host: &str, port: u16) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind((host, port))
            .await
            .map_err(|e| EngineError::io(format!("{host}:{port}"), e))?;
        Ok(Listener::Tcp(listener))
    }
}

/// The model's sampling defaults: vLLM's, overridden by the model's
/// `generation_config.json`.
pub fn sampling_defaults(handle: &EngineHandle) -> SamplingParams {
    handle.sampling_defaults().clone()
}

/// All routes, on both listeners alike.
pub fn router(handle: EngineHandle) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/score", post(score::score))
        .route("/v1/score", post(score::score))
        .route("/rerank", post(score::rerank))
        .route("/v1/rerank", post(score::rerank))
        .route("/v2/rerank", post(score::rerank))
        .route("/health", get(health))
        .route("/ping", get(health).post(health))
        .route("/version", get(version))
        .route("/load", get(load))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(handle)
}

/// Serve the API until `shutdown` resolves, then finish the requests in flight.
pub async fn serve(
    handle: EngineHandle,
    listener: Listener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    serve_router(router(handle), listener, shutdown).await
}

async fn serve_router(
    app: Router,
    listener: Listener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    match listener {
        Listener::Tcp(listener) => {
            let address = listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            tracing::info!(%address, "API listening");
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
                .map_err(|e| EngineError::io(address, e))
        }
        Listener::Unix(path) => {
            remove_stale_socket(&path)?;
            let listener =
                tokio::net::UnixListener::bind(&path).map_err(|e| EngineError::io(&path, e))?;
            tracing::info!(path = %path.display(), "API listening");
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
                .map_err(|e| EngineError::io(&path, e));
            // Leave no stale file behind for the next start (or for a supervisor probing it).
            let _ = std::fs::remove_file(&path);
            served
        }
    }
}

/// A socket left by a process that died is removed; any other kind of file is an error rather
/// than something to delete.
fn remove_stale_socket(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|e| EngineError::io(path, e))
        }
        Ok(_) => Err(EngineError::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            ),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(EngineError::io(path, e)),
    }
}

async fn health(State(handle): State<EngineHandle>) -> StatusCode {
    if handle.is_alive() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn version() -> Json<serde_json::Value> {
    Json(json!({ "version": env!("CARGO_PKG_VERSION") }))
}

async fn load(State(handle): State<EngineHandle>) -> Json<serde_json::Value> {
    Json(json!({ "server_load": handle.load() }))
}

async fn metrics(State(handle): State<EngineHandle>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.metrics().render(),
    )
        .into_response()
}

async fn models(State(handle): State<EngineHandle>) -> Json<serde_json::Value> {
    Json(models_body(handle.info()))
}

fn models_body(info: &crate::engine::ModelInfo) -> serde_json::Value {
    json!({
        "object": "list",
        "data": [{
            "id": info.served_model_name,
            "object": "model",
            "created": info.created,
            "owned_by": "vllm",
            "root": info.root,
            "parent": null,
            "max_model_len": info.max_model_len,
            "permission": [{
                "id": generation::response_id("modelperm-", None),
                "object": "model_permission",
                "created": info.created,
                "allow_create_engine": false,
                "allow_sampling": true,
                "allow_logprobs": true,
                "allow_search_indices": false,
                "allow_view": true,
                "allow_fine_tuning": false,
                "organization": "*",
                "group": null,
                "is_blocking": false,
            }],
        }],
    })
}

async fn not_found() -> ApiError {
    ApiError::not_found("Not Found")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{ModelInfo, Task};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn test_app() -> Router {
        Router::new()
            .route("/ping", get(|| async { "pong" }))
            .fallback(not_found)
    }

    async fn get_over_unix(path: &Path, route: &str) -> String {
        let mut stream = tokio::net::UnixStream::connect(path).await.unwrap();
        let request = format!("GET {route} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    #[tokio::test]
    async fn unix_socket_replaces_a_stale_socket_and_shuts_down_gracefully() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("engine.sock");
        // A socket file left behind by a dead process.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());

        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_router(
            test_app(),
            Listener::Unix(path.clone()),
            async move {
                let _ = stop_rx.await;
            },
        ));
        // Wait until the new socket accepts.
        let mut response = String::new();
        for _ in 0..200 {
            if tokio::net::UnixStream::connect(&path).await.is_ok() {
                response = get_over_unix(&path, "/ping").await;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.ends_with("pong"), "{response}");
        let missing = get_over_unix(&path, "/nope").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        assert!(missing.contains("\"NotFoundError\""), "{missing}");

        stop_tx.send(()).unwrap();
        server.await.unwrap().unwrap();
        assert!(!path.exists(), "the socket file is removed on shutdown");
    }

    #[tokio::test]
    async fn tcp_listener_serves_the_same_router() {
        let listener = Listener::bind_tcp("127.0.0.1", 0).await.unwrap();
        let Listener::Tcp(tcp) = &listener else {
            unreachable!()
        };
        let address = tcp.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_router(test_app(), listener, async move {
            let _ = stop_rx.await;
        }));
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream
            .write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        assert!(response.ends_with("pong"), "{response}");
        stop_tx.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    #[test]
    fn a_regular_file_is_not_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("not-a-socket");
        std::fs::write(&path, b"data").unwrap();
        assert!(remove_stale_socket(&path).is_err());
        assert!(path.exists());
        assert!(remove_stale_socket(&dir.path().join("absent")).is_ok());
    }

    #[test]
    fn models_listing_shape() {
        let info = ModelInfo {
            served_model_name: "smol".into(),
            root: "/models/smol.gguf".into(),
            max_model_len: 8192,
            task: Task::Generate,
            created: 1_700_000_000,
        };
        let body = models_body(&info);
        assert_eq!(body["object"], "list");
        let model = &body["data"][0];
        assert_eq!(model["id"], "smol");
        assert_eq!(model["object"], "model");
        assert_eq!(model["owned_by"], "vllm");
        assert_eq!(model["root"], "/models/smol.gguf");
        assert_eq!(model["parent"], serde_json::Value::Null);
        assert_eq!(model["max_model_len"], 8192);
        assert_eq!(model["created"], 1_700_000_000);
        assert_eq!(model["permission"][0]["object"], "model_permission");
    }
}
