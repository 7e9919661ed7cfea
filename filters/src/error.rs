//! The OpenAI error shape LiteLLM clients parse: `{"error": {"message", "type", "param", "code"}}`
//! with `code` the HTTP status as a string.

use serde_json::json;

/// An error answered to the client. `message` must never hold upstream secrets.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<String>,
    /// `retry-after` seconds to send with the answer (429s).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "bad_request_error", message)
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(401, "auth_error", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, "not_found_error", message)
    }

    pub fn unknown_model(model: &str) -> Self {
        Self::bad_request(format!(
            "Invalid model name passed in model={model}. Call `/v1/models` to view available models for your key."
        ))
        .with_param("model")
    }

    pub fn body_too_large(limit: usize) -> Self {
        Self::new(
            413,
            "bad_request_error",
            format!("Request body is too large: the limit is {limit} bytes"),
        )
    }

    /// The JSON body.
    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.status.to_string(),
            }
        }))
        .expect("error bodies serialize")
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.kind, self.message)
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_litellm_shape() {
        let e = ApiError::unknown_model("nope");
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["code"], "400");
        assert_eq!(v["error"]["type"], "bad_request_error");
        assert_eq!(v["error"]["param"], "model");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("model=nope"));
    }
}
