//! Hugging Face: TGI servers and Inference Endpoints (an `api_base`) and the Inference Providers
//! router all speak OpenAI's chat API; only the model naming differs. On the router,
//! `huggingface/<provider>/<org>/<model>` becomes `<org>/<model>:<provider>`.

use sluice_config::Deployment;

use super::{Operation, UpstreamRequest};
use crate::body::RequestBody;
use crate::error::ApiError;

/// Serving providers the router accepts as a name prefix.
const ROUTER_PROVIDERS: &[&str] = &[
    "cerebras",
    "cohere",
    "fal-ai",
    "featherless-ai",
    "fireworks-ai",
    "groq",
    "hf-inference",
    "hyperbolic",
    "nebius",
    "novita",
    "nscale",
    "replicate",
    "sambanova",
    "together",
];

const ROUTER_HOST: &str = "router.huggingface.co";

/// The model name to send: on the router, a leading provider moves behind a `:`.
fn model_name(d: &Deployment, upstream_model: &str) -> String {
    let on_router = d
        .api_base
        .as_deref()
        .is_none_or(|b| b.contains(ROUTER_HOST));
    match upstream_model.split_once('/') {
        Some((provider, rest))
            if on_router && ROUTER_PROVIDERS.contains(&provider) && rest.contains('/') =>
        {
            format!("{rest}:{provider}")
        }
        _ => upstream_model.to_string(),
    }
}

pub(super) fn build_request(
    op: Operation,
    body: &mut RequestBody<'_>,
    d: &Deployment,
    upstream_model: &str,
    stream: bool,
) -> Result<UpstreamRequest, ApiError> {
    let model = model_name(d, upstream_model);
    let mut req = super::openai::build_request(op, body, d, &model, stream)?;
    // TGI and Inference Endpoints serve the OpenAI routes under /v1 of their root URL.
    let base_has_v1 = d
        .api_base
        .as_deref()
        .is_none_or(|b| b.trim_end_matches('/').ends_with("/v1"));
    if !base_has_v1 {
        req.path = format!("/v1{}", req.path);
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn deployment(params: &str) -> Deployment {
        sluice_config::parse_config(
            &format!("model_list: [{{model_name: g, litellm_params: {{{params}}}}}]"),
            Path::new("t.yaml"),
        )
        .unwrap()
        .deployments[0]
            .clone()
    }

    #[test]
    fn router_names_and_tgi_paths() {
        let d = deployment(
            "model: huggingface/together/meta-llama/Llama-3.1-8B-Instruct, api_key: hf_x",
        );
        let mut body = RequestBody::parse(br#"{"model":"g","messages":[]}"#).unwrap();
        let req = build_request(
            Operation::ChatCompletions,
            &mut body,
            &d,
            "together/meta-llama/Llama-3.1-8B-Instruct",
            false,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
        assert_eq!(v["model"], "meta-llama/Llama-3.1-8B-Instruct:together");
        assert_eq!(req.path, "/chat/completions");
        assert!(req
            .headers
            .contains(&("authorization".into(), "Bearer hf_x".into())));

        let d = deployment(
            "model: huggingface/tgi, api_base: 'https://ep.endpoints.huggingface.cloud'",
        );
        let mut body = RequestBody::parse(br#"{"model":"g","messages":[]}"#).unwrap();
        let req = build_request(Operation::ChatCompletions, &mut body, &d, "tgi", false).unwrap();
        assert_eq!(req.path, "/v1/chat/completions");
    }
}
