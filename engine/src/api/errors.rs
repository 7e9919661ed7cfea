//! Errors as vLLM sends them: `{"error": {"message", "type", "param", "code"}}` with `code` the
//! integer HTTP status and `type` the Python exception class vLLM names.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::error::EngineError;

/// An error answered to the client; the handlers' `Err` type.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The request field at fault, when one is.
    pub param: Option<String>,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: None,
        }
    }

    /// A 400 naming the field at fault in `param`.
    pub fn bad_param(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: Some(param.into()),
        }
    }

    /// A feature vLLM has but this engine does not: refused instead of silently ignored.
    pub fn unsupported(param: &str, what: &str) -> Self {
        Self::bad_param(
            param,
            format!("{what} is not supported by this engine (`{param}`)."),
        )
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            param: None,
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            param: None,
        }
    }

    /// vLLM's `type`: the exception class it maps the status from.
    pub fn error_type(&self) -> &'static str {
        match self.status {
            StatusCode::BAD_REQUEST => "BadRequestError",
            StatusCode::NOT_FOUND => "NotFoundError",
            StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailableError",
            StatusCode::NOT_IMPLEMENTED => "NotImplementedError",
            _ => "InternalServerError",
        }
    }

    /// The JSON body, also used as the payload of a mid-stream SSE error event.
    pub fn body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.error_type(),
                "param": self.param,
                "code": self.status.as_u16(),
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = self.status.as_u16(), message = %self.message, "request failed");
        }
        (self.status, axum::Json(self.body())).into_response()
    }
}

impl From<EngineError> for ApiError {
    fn from(err: EngineError) -> Self {
        match err {
            // The client's input (or the template it sent) is at fault.
            EngineError::InvalidRequest(_)
            | EngineError::Tokenizer(_)
            | EngineError::Template(_)
            | EngineError::Unsupported(_) => ApiError::bad_request(err.to_string()),
            EngineError::Shutdown => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: err.to_string(),
                param: None,
            },
            _ => ApiError::internal(err.to_string()),
        }
    }
}

/// `serde_path_to_error` names the field: "temperature: invalid type: string \"hot\", expected
/// f32".
impl From<serde_path_to_error::Error<serde_json::Error>> for ApiError {
    fn from(err: serde_path_to_error::Error<serde_json::Error>) -> Self {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if path == "." {
            // A missing required field is reported at the root; its name is in the message.
            ApiError::bad_request(inner.to_string())
        } else {
            ApiError::bad_param(path.clone(), format!("{path}: {inner}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_request_has_vllm_shape_with_integer_code() {
        let body = ApiError::bad_param("temperature", "temperature must be non-negative").body();
        assert_eq!(
            body,
            json!({"error": {
                "message": "temperature must be non-negative",
                "type": "BadRequestError",
                "param": "temperature",
                "code": 400
            }})
        );
        assert!(body["error"]["code"].is_u64());
    }

    #[test]
    fn not_found_and_internal_types() {
        assert_eq!(
            ApiError::not_found("x").body()["error"]["type"],
            "NotFoundError"
        );
        assert_eq!(ApiError::not_found("x").body()["error"]["code"], 404);
        assert_eq!(
            ApiError::internal("x").body()["error"]["type"],
            "InternalServerError"
        );
        assert_eq!(
            ApiError::internal("x").body()["error"]["param"],
            Value::Null
        );
    }

    #[test]
    fn engine_errors_map_to_statuses() {
        let invalid: ApiError = EngineError::InvalidRequest("bad".into()).into();
        assert_eq!(invalid.status, StatusCode::BAD_REQUEST);
        assert_eq!(invalid.message, "bad");
        let template: ApiError = EngineError::Template("undefined var".into()).into();
        assert_eq!(template.status, StatusCode::BAD_REQUEST);
        let shutdown: ApiError = EngineError::Shutdown.into();
        assert_eq!(shutdown.status, StatusCode::SERVICE_UNAVAILABLE);
        let exec: ApiError = EngineError::Executor("oom".into()).into();
        assert_eq!(exec.status, StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn deserialisation_error_names_the_field() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Body {
            temperature: Option<f32>,
        }
        let value = json!({"temperature": "hot"});
        let err = serde_path_to_error::deserialize::<_, Body>(&value).unwrap_err();
        let api: ApiError = err.into();
        assert_eq!(api.status, StatusCode::BAD_REQUEST);
        assert_eq!(api.param.as_deref(), Some("temperature"));
        assert!(
            api.message.starts_with("temperature: invalid type"),
            "{}",
            api.message
        );
    }

    #[tokio::test]
    async fn into_response_carries_status_and_json() {
        let response = ApiError::bad_request("nope").into_response();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        let body: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(body["error"]["message"], "nope");
    }
}
