//! Which gateway route a request path names. OpenAI routes exist with and without `/v1`.

use crate::provider::Operation;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// An inference call; `path_model` is the model named in an Azure-style path.
    Inference {
        op: Operation,
        path_model: Option<String>,
    },
    Models,
    ModelInfo,
    ModelGroupInfo,
    Liveliness,
    Readiness,
    Health,
    Metrics,
    /// Anthropic-format ingress: `POST /v1/messages`.
    AnthropicMessages,
    /// `POST /v1/messages/count_tokens`.
    AnthropicCountTokens,
    /// `/vllm/{rest}`: `rest` keeps its leading `/` and the query string.
    VllmPassthrough {
        rest: String,
    },
    /// `/{provider}/{rest}` (any method) to a hosted provider with the configured credentials.
    ProviderPassthrough {
        provider: &'static str,
        rest: String,
    },
    /// Management API (`/key/*`, `/user/*`, `/team/*`, `/customer/*`, `/budget/*`, spend):
    /// `path` without the query string.
    Management {
        path: String,
    },
    NotFound,
}

/// First path segments of the management API.
const MANAGEMENT_PREFIXES: &[&str] = &[
    "/key/",
    "/user/",
    "/team/",
    "/customer/",
    "/end_user/",
    "/budget/",
    "/spend/",
    "/global/",
];

/// Providers with a pass-through route `/{provider}/*`.
pub const PASSTHROUGH_PROVIDERS: &[&str] = &[
    "openai",
    "anthropic",
    "gemini",
    "vertex_ai",
    "bedrock",
    "azure",
    "cohere",
    "mistral",
];

fn op_for(path: &str) -> Option<Operation> {
    match path {
        "/chat/completions" => Some(Operation::ChatCompletions),
        "/completions" => Some(Operation::Completions),
        "/embeddings" => Some(Operation::Embeddings),
        _ => None,
    }
}

/// Classifies a request. `path_and_query` is the raw request target.
pub fn classify(method: &str, path_and_query: &str) -> Route {
    let (path, _) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    if let Some(rest) = path.strip_prefix("/vllm") {
        if rest.is_empty() || rest.starts_with('/') {
            let rest = &path_and_query["/vllm".len()..];
            return Route::VllmPassthrough {
                rest: if rest.is_empty() || rest.starts_with('?') {
                    format!("/{rest}")
                } else {
                    rest.to_string()
                },
            };
        }
    }
    let path = path.trim_end_matches('/');
    let bare = path.strip_prefix("/v1").unwrap_or(path);
    let post = method.eq_ignore_ascii_case("POST");
    let get = method.eq_ignore_ascii_case("GET") || method.eq_ignore_ascii_case("HEAD");
    if post {
        match bare {
            "/messages" => return Route::AnthropicMessages,
            "/messages/count_tokens" => return Route::AnthropicCountTokens,
            _ => {}
        }
        if let Some(op) = op_for(bare) {
            return Route::Inference {
                op,
                path_model: None,
            };
        }
        // Azure shape: /openai/deployments/{model}/chat/completions
        if let Some(rest) = bare.strip_prefix("/openai/deployments/") {
            if let Some((model, tail)) = rest.split_once('/') {
                if let Some(op) = op_for(&format!("/{tail}")) {
                    if !model.is_empty() {
                        return Route::Inference {
                            op,
                            path_model: Some(model.to_string()),
                        };
                    }
                }
            }
        }
    }
    if get {
        match bare {
            "/models" => return Route::Models,
            "/model/info" => return Route::ModelInfo,
            "/model_group/info" => return Route::ModelGroupInfo,
            "/health/liveliness" | "/health/liveness" => return Route::Liveliness,
            "/health/readiness" => return Route::Readiness,
            "/health" => return Route::Health,
            "/metrics" => return Route::Metrics,
            _ => {}
        }
    }
    if MANAGEMENT_PREFIXES.iter().any(|p| path.starts_with(p)) {
        return Route::Management {
            path: path.to_string(),
        };
    }
    for provider in PASSTHROUGH_PROVIDERS {
        if let Some(rest) = path_and_query
            .strip_prefix('/')
            .and_then(|p| p.strip_prefix(provider))
            .filter(|rest| rest.starts_with('/'))
        {
            return Route::ProviderPassthrough {
                provider,
                rest: rest.to_string(),
            };
        }
    }
    Route::NotFound
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_routes() {
        assert_eq!(
            classify("POST", "/v1/chat/completions"),
            Route::Inference {
                op: Operation::ChatCompletions,
                path_model: None
            }
        );
        assert_eq!(
            classify("POST", "/embeddings"),
            Route::Inference {
                op: Operation::Embeddings,
                path_model: None
            }
        );
        assert_eq!(
            classify(
                "POST",
                "/openai/deployments/gpt-4o/chat/completions?api-version=2024-02-01"
            ),
            Route::Inference {
                op: Operation::ChatCompletions,
                path_model: Some("gpt-4o".into())
            }
        );
        assert_eq!(classify("GET", "/v1/models"), Route::Models);
        assert_eq!(classify("GET", "/health/liveness"), Route::Liveliness);
        assert_eq!(
            classify("POST", "/vllm/v1/chat/completions?x=1"),
            Route::VllmPassthrough {
                rest: "/v1/chat/completions?x=1".into()
            }
        );
        assert_eq!(classify("GET", "/vllmx"), Route::NotFound);
        assert_eq!(
            classify("POST", "/anthropic/v1/messages?beta=true"),
            Route::ProviderPassthrough {
                provider: "anthropic",
                rest: "/v1/messages?beta=true".into()
            }
        );
        assert_eq!(
            classify("GET", "/openai/deployments/x/chat/completions"),
            Route::ProviderPassthrough {
                provider: "openai",
                rest: "/deployments/x/chat/completions".into()
            }
        );
        assert_eq!(classify("GET", "/chat/completions"), Route::NotFound);
    }
}
