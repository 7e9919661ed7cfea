//! The `Provider` seam: pure, synchronous translation between the canonical OpenAI-shaped request
//! and one provider's wire format. A closed enum dispatches to one module per provider; the proxy
//! only ever calls these methods, so new formats slot in here without touching it.

pub mod anthropic;
mod azure;
pub mod bedrock;
pub mod cohere;
mod common;
pub mod gemini;
mod huggingface;
pub mod ollama;
mod openai;
pub mod vertex_auth;

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

/// Per-call choices that are not part of the body.
#[derive(Debug, Clone, Copy, Default)]
pub struct CallOptions {
    /// `drop_params`: silently drop OpenAI parameters the provider cannot take.
    pub drop_params: bool,
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

/// LiteLLM's `UnsupportedParamsError`, naming the parameters and the provider.
pub fn unsupported_params(provider: &str, model: &str, params: &[&str]) -> ApiError {
    let list = params
        .iter()
        .map(|p| format!("'{p}'"))
        .collect::<Vec<_>>()
        .join(", ");
    ApiError::bad_request(format!(
        "litellm.UnsupportedParamsError: {provider} does not support parameters: [{list}], for model={model}. To drop these, set `litellm.drop_params=True` or for proxy:\n\n`litellm_settings:\n drop_params: true`\n"
    ))
    .with_param(params[0])
}

/// Supported wire formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    OpenAiCompatible,
    Azure,
    HuggingFace,
    Anthropic,
    Ollama,
    Cohere,
    Gemini,
    VertexAi,
    Bedrock,
}

/// An incremental decoder from the provider's stream to OpenAI SSE.
pub enum StreamDecoder {
    OpenAi(SseUsageScanner),
    Anthropic(Box<anthropic::AnthropicStream>),
    Ollama(Box<ollama::OllamaStream>),
    Cohere(Box<cohere::CohereStream>),
    Gemini(Box<gemini::GeminiStream>),
    Bedrock(Box<bedrock::BedrockStream>),
}

impl StreamDecoder {
    /// Feeds upstream bytes; appends what the client should receive to `out`.
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        match self {
            StreamDecoder::OpenAi(s) => s.feed(chunk, out),
            StreamDecoder::Anthropic(s) => s.feed(chunk, out),
            StreamDecoder::Ollama(s) => s.feed(chunk, out),
            StreamDecoder::Cohere(s) => s.feed(chunk, out),
            StreamDecoder::Gemini(s) => s.feed(chunk, out),
            StreamDecoder::Bedrock(s) => s.feed(chunk, out),
        }
    }

    /// Flushes the end of the stream.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        match self {
            StreamDecoder::OpenAi(s) => s.finish(out),
            StreamDecoder::Anthropic(s) => s.finish(out),
            StreamDecoder::Ollama(s) => s.finish(out),
            StreamDecoder::Cohere(s) => s.finish(out),
            StreamDecoder::Gemini(s) => s.finish(out),
            StreamDecoder::Bedrock(s) => s.finish(out),
        }
    }

    pub fn usage(&self) -> Option<Usage> {
        match self {
            StreamDecoder::OpenAi(s) => s.usage(),
            StreamDecoder::Anthropic(s) => s.usage(),
            StreamDecoder::Ollama(s) => s.usage(),
            StreamDecoder::Cohere(s) => s.usage(),
            StreamDecoder::Gemini(s) => s.usage(),
            StreamDecoder::Bedrock(s) => s.usage(),
        }
    }
}

impl Provider {
    /// The translator for a deployment, or an error naming what is not supported yet.
    pub fn for_deployment(d: &Deployment) -> Result<Provider, ApiError> {
        match d.provider.wire_format() {
            WireFormat::OpenAi => Ok(Provider::OpenAiCompatible),
            WireFormat::Azure => Ok(Provider::Azure),
            WireFormat::HuggingFace => Ok(Provider::HuggingFace),
            WireFormat::Anthropic => Ok(Provider::Anthropic),
            WireFormat::Ollama => Ok(Provider::Ollama),
            WireFormat::Cohere => Ok(Provider::Cohere),
            WireFormat::Gemini => Ok(Provider::Gemini),
            WireFormat::VertexAi => Ok(Provider::VertexAi),
            WireFormat::Bedrock => Ok(Provider::Bedrock),
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
        opts: &CallOptions,
    ) -> Result<UpstreamRequest, ApiError> {
        match self {
            Provider::OpenAiCompatible => {
                openai::build_request(op, body, d, upstream_model, stream)
            }
            Provider::Azure => azure::build_request(op, body, d, upstream_model, stream),
            Provider::HuggingFace => {
                huggingface::build_request(op, body, d, upstream_model, stream)
            }
            Provider::Ollama => ollama::build_request(op, body, d, upstream_model, stream, opts),
            Provider::Cohere => cohere::build_request(op, body, d, upstream_model, stream, opts),
            Provider::Gemini | Provider::VertexAi => gemini::build_request(
                op,
                body,
                d,
                upstream_model,
                stream,
                opts,
                *self == Provider::VertexAi,
            ),
            Provider::Bedrock => bedrock::build_request(op, body, d, upstream_model, stream, opts),
            Provider::Anthropic => {
                anthropic::build_request(op, body, d, upstream_model, stream, opts)
            }
        }
    }

    /// A complete response in OpenAI's shape (`None`: the body already is), with its usage.
    /// `model` is the name the client asked for.
    pub fn translate_response(
        &self,
        op: Operation,
        body: &[u8],
        model: &str,
    ) -> Result<(Option<Vec<u8>>, Option<Usage>), ApiError> {
        let translated = match self {
            Provider::OpenAiCompatible | Provider::Azure | Provider::HuggingFace => {
                return Ok((None, crate::usage::usage_from_body(body)))
            }
            Provider::Anthropic => anthropic::translate_response(body, model),
            Provider::Ollama => ollama::translate_response(op, body, model),
            Provider::Cohere => cohere::translate_response(op, body, model),
            Provider::Gemini | Provider::VertexAi => gemini::translate_response(op, body, model),
            Provider::Bedrock => bedrock::translate_response(op, body, model),
        };
        translated.map(|(b, u)| (Some(b), u))
    }

    /// The base URL when the deployment names none: Vertex's regional host, Bedrock's runtime
    /// endpoint for the region, else the provider's public default.
    pub fn default_api_base(&self, d: &Deployment) -> Option<String> {
        match self {
            Provider::VertexAi => Some(gemini::vertex_api_base(d)),
            Provider::Bedrock => {
                let region = bedrock::credentials_from(d)
                    .map(|(_, r)| r)
                    .unwrap_or_else(|| bedrock::DEFAULT_REGION.to_string());
                Some(bedrock::api_base(d, &region))
            }
            _ => d.provider.default_api_base(),
        }
    }

    /// True when responses are the upstream's own OpenAI-shaped bytes.
    pub fn is_openai_native(&self) -> bool {
        matches!(
            self,
            Provider::OpenAiCompatible | Provider::Azure | Provider::HuggingFace
        )
    }

    /// An incremental decoder for a streamed response. `injected_stream_usage`: Sluice asked
    /// for usage itself; `client_wants_usage`: the client asked for it.
    pub fn stream_decoder(
        &self,
        op: Operation,
        injected_stream_usage: bool,
        client_wants_usage: bool,
        model: &str,
    ) -> StreamDecoder {
        match self {
            Provider::OpenAiCompatible | Provider::Azure | Provider::HuggingFace => {
                StreamDecoder::OpenAi(SseUsageScanner::new(injected_stream_usage))
            }
            Provider::Ollama => StreamDecoder::Ollama(Box::new(ollama::OllamaStream::new(
                model,
                client_wants_usage,
                op == Operation::ChatCompletions,
            ))),
            Provider::Cohere => StreamDecoder::Cohere(Box::new(cohere::CohereStream::new(
                model,
                client_wants_usage,
            ))),
            Provider::Gemini | Provider::VertexAi => StreamDecoder::Gemini(Box::new(
                gemini::GeminiStream::new(model, client_wants_usage),
            )),
            Provider::Bedrock => StreamDecoder::Bedrock(Box::new(bedrock::BedrockStream::new(
                model,
                client_wants_usage,
            ))),
            Provider::Anthropic => StreamDecoder::Anthropic(Box::new(
                anthropic::AnthropicStream::new(model, client_wants_usage),
            )),
        }
    }

    /// What an error response means for routing.
    pub fn classify_error(&self, status: u16, body: &[u8]) -> FailureKind {
        match self {
            // 529 is Anthropic's "overloaded": a server error like 503.
            Provider::Anthropic if status == 529 => FailureKind::Server,
            Provider::Gemini | Provider::VertexAi => gemini::classify_error(status, body),
            Provider::Bedrock => bedrock::classify_error(status, body),
            _ => crate::classify::classify_status(status, body),
        }
    }
}
