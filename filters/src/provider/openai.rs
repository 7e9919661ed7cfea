//! OpenAI and the OpenAI-compatible family (`hosted_vllm/`, `groq/`, `together_ai/`, ...): the
//! body goes upstream as sent, with the deployment's model name, its default params and, for
//! streams, a request for the usage chunk.

use sluice_config::Deployment;

use super::{Operation, UpstreamRequest};
use crate::body::RequestBody;
use crate::error::ApiError;

pub(super) fn build_request(
    op: Operation,
    body: &mut RequestBody<'_>,
    d: &Deployment,
    upstream_model: &str,
    stream: bool,
) -> Result<UpstreamRequest, ApiError> {
    body.set_str("model", upstream_model);
    for (k, v) in &d.default_params {
        body.set_default(k, v.to_string());
    }
    let mut injected_stream_usage = false;
    if stream && op != Operation::Embeddings && !body.wants_stream_usage() {
        // Usage is only reported in streams on request; ask for it and hide it from the client.
        let mut options = body
            .raw("stream_options")
            .and_then(|raw| serde_json::from_str::<serde_json::Value>(raw).ok())
            .filter(|v| v.is_object())
            .unwrap_or_else(|| serde_json::json!({}));
        options["include_usage"] = serde_json::Value::Bool(true);
        body.set_json("stream_options", options.to_string());
        injected_stream_usage = true;
    }

    let mut headers = Vec::with_capacity(2 + d.extra_headers.len());
    if let Some(key) = &d.api_key {
        headers.push(("authorization".to_string(), format!("Bearer {key}")));
    }
    if let Some(org) = &d.organization {
        headers.push(("openai-organization".to_string(), org.clone()));
    }
    headers.extend(d.extra_headers.iter().cloned());
    Ok(UpstreamRequest {
        path: op.openai_path().to_string(),
        headers,
        body: body.to_bytes(),
        injected_stream_usage,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn deployment() -> Deployment {
        let c = sluice_config::parse_config(
            r#"
model_list:
  - model_name: g
    litellm_params:
      model: hosted_vllm/served
      api_base: http://127.0.0.1:1/v1
      api_key: sk-up
      organization: org-9
      extra_headers: {x-extra: "1"}
      temperature: 0.1
"#,
            Path::new("t.yaml"),
        )
        .unwrap();
        c.deployments[0].clone()
    }

    #[test]
    fn rewrites_model_defaults_and_stream_usage() {
        let d = deployment();
        let raw = br#"{"model":"g","messages":[],"stream":true,"temperature":0.9}"#;
        let mut body = RequestBody::parse(raw).unwrap();
        let req = build_request(Operation::ChatCompletions, &mut body, &d, "served", true).unwrap();
        assert_eq!(req.path, "/chat/completions");
        assert!(req.injected_stream_usage);
        let v: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
        assert_eq!(v["model"], "served");
        assert_eq!(v["temperature"], 0.9, "the client's own value wins");
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert!(req
            .headers
            .contains(&("authorization".into(), "Bearer sk-up".into())));
        assert!(req
            .headers
            .contains(&("openai-organization".into(), "org-9".into())));
        assert!(req.headers.contains(&("x-extra".into(), "1".into())));
    }

    #[test]
    fn keeps_client_stream_options() {
        let d = deployment();
        let raw =
            br#"{"model":"g","messages":[],"stream":true,"stream_options":{"include_usage":true}}"#;
        let mut body = RequestBody::parse(raw).unwrap();
        let req = build_request(Operation::ChatCompletions, &mut body, &d, "served", true).unwrap();
        assert!(!req.injected_stream_usage);
    }
}
