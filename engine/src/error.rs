//! The engine's one error type.

use std::path::PathBuf;

/// Everything that can go wrong in the engine library. Loading errors name the file and the
/// tensor or metadata key at fault.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A model file is malformed or lacks something: `what` names the tensor or key.
    #[error("{path}: {what}")]
    Format { path: PathBuf, what: String },
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    /// The request is invalid (maps to HTTP 400).
    #[error("{0}")]
    InvalidRequest(String),
    #[error("engine is shutting down")]
    Shutdown,
    #[error("executor: {0}")]
    Executor(String),
}

impl EngineError {
    pub fn format(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        EngineError::Format {
            path: path.into(),
            what: what.into(),
        }
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EngineError::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
