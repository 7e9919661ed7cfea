//! The `Provider` seam: pure, synchronous translation between the canonical OpenAI-shaped request
//! and one provider's wire format. A closed enum dispatches to one module per provider; the proxy
//! only ever calls these methods, so new formats slot in here without touching it.

mod openai;

use sluice_config::{Deployment, WireFormat};

use crate::body::RequestBody;
use crate::classify::FailureKind;
use crate::error::ApiError;
use crate::usage::{SseUsageScanner, Usage};

/// The OpenAI operation a client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    ChatCompletions,
    Completions,
    Embeddings,
}

impl Operation {
    /// The path below an OpenAI-style `api_base`.
    pub fn openai_path(&self) -> &'static str {
        match self {
            Self::ChatCompletions => "/chat/completions",
            Self::Completions => "/completions",
            Self::Embeddings => "/embeddings",
        }
    }

    /// Fields a request must carry besides `model`.
    pub fn required_field(&self) -> &'static str {
        match self {
            Self::ChatCompletions => "messages",
            Self::Completions => "prompt",
            Self::Embeddings => "input",
        }
    }

    pub fn mode(&self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat",
            Self::Completions => "completion",
            Self::Embeddings => "embedding",
        }
    }
}

/// A request ready to send: the path (with query) below the deployment's base, extra headers and
/// the body.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamRequest {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// True when Sluice added `stream_options.include_usage` itself, so the usage chunk must be
    /// kept from the client.
    pub injected_stream_usage: bool,
}

/// Supported wire formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    OpenAiCompatible,
}

impl Provider {
    /// The translator for a deployment, or an error naming what is not supported yet.
    pub fn for_deployment(d: &Deployment) -> Result<Provider, ApiError> {
        match d.provider.wire_format() {
            WireFormat::OpenAi => Ok(Provider::OpenAiCompatible),
            other => Err(ApiError::new(
                501,
                "not_implemented_error",
                format!(
                    "Provider {} ({other:?} format) is not supported by this Sluice build yet",
                    d.provider
                ),
            )),
        }
    }

    /// Builds the upstream request from the client's body. `upstream_model` is the deployment's
    /// model name for this request (wildcards resolved).
    pub fn build_request(
        &self,
        op: Operation,
        body: &mut RequestBody<'_>,
        d: &Deployment,
        upstream_model: &str,
        stream: bool,
    ) -> Result<UpstreamRequest, ApiError> {
        match self {
            Provider::OpenAiCompatible => {
                openai::build_request(op, body, d, upstream_model, stream)
            }
        }
    }

    /// Usage from a complete response body.
    pub fn response_usage(&self, body: &[u8]) -> Option<Usage> {
        match self {
            Provider::OpenAiCompatible => crate::usage::usage_from_body(body),
        }
    }

    /// An incremental decoder for a streamed response.
    pub fn stream_decoder(&self, injected_stream_usage: bool) -> SseUsageScanner {
        match self {
            Provider::OpenAiCompatible => SseUsageScanner::new(injected_stream_usage),
        }
    }

    /// What an error response means for routing.
    pub fn classify_error(&self, status: u16, body: &[u8]) -> FailureKind {
        match self {
            Provider::OpenAiCompatible => crate::classify::classify_status(status, body),
        }
    }
}
