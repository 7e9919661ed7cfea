//! Azure OpenAI: OpenAI bodies, but the deployment sits in the path
//! (`/openai/deployments/{deployment}/chat/completions?api-version=...`) and the key goes in
//! `api-key` (or an Entra ID token as `Authorization: Bearer`).

use sluice_config::Deployment;

use super::{Operation, UpstreamRequest};
use crate::body::RequestBody;
use crate::error::ApiError;

/// Characters escaped in a URL path segment.
const PATH_SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}');

/// Used when neither `api_version` nor `AZURE_API_VERSION` is set (the current GA version).
pub const DEFAULT_API_VERSION: &str = "2024-10-21";

pub(super) fn build_request(
    op: Operation,
    body: &mut RequestBody<'_>,
    d: &Deployment,
    upstream_model: &str,
    stream: bool,
) -> Result<UpstreamRequest, ApiError> {
    let mut req = super::openai::build_request(op, body, d, upstream_model, stream)?;
    let version = d
        .api_version
        .clone()
        .or_else(|| {
            std::env::var("AZURE_API_VERSION")
                .ok()
                .filter(|v| !v.is_empty())
        })
        .unwrap_or_else(|| DEFAULT_API_VERSION.to_string());
    let deployment: String =
        percent_encoding::utf8_percent_encode(upstream_model, PATH_SEGMENT).to_string();
    req.path = format!(
        "/openai/deployments/{deployment}{}?api-version={version}",
        op.openai_path()
    );
    req.headers.retain(|(k, _)| k != "authorization");
    match d
        .provider_params
        .get("azure_ad_token")
        .and_then(|v| v.as_str())
    {
        Some(token) => req
            .headers
            .insert(0, ("authorization".into(), format!("Bearer {token}"))),
        None => {
            if let Some(key) = &d.api_key {
                req.headers.insert(0, ("api-key".into(), key.clone()));
            }
        }
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn deployment(extra: &str) -> Deployment {
        sluice_config::parse_config(
            &format!("model_list: [{{model_name: g, litellm_params: {{model: azure/gpt-4o-prod, api_base: 'https://x.openai.azure.com', api_key: az-key{extra}}}}}]"),
            Path::new("t.yaml"),
        )
        .unwrap()
        .deployments[0]
        .clone()
    }

    #[test]
    fn deployment_in_path_and_api_key_header() {
        let d = deployment(", api_version: '2024-06-01'");
        let mut body = RequestBody::parse(br#"{"model":"g","messages":[]}"#).unwrap();
        let req = build_request(
            Operation::ChatCompletions,
            &mut body,
            &d,
            "gpt-4o-prod",
            false,
        )
        .unwrap();
        assert_eq!(
            req.path,
            "/openai/deployments/gpt-4o-prod/chat/completions?api-version=2024-06-01"
        );
        assert!(req.headers.contains(&("api-key".into(), "az-key".into())));
        assert!(!req.headers.iter().any(|(k, _)| k == "authorization"));
        let mut body = RequestBody::parse(br#"{"model":"g","input":"x"}"#).unwrap();
        let req = build_request(Operation::Embeddings, &mut body, &d, "emb", false).unwrap();
        assert!(req.path.starts_with("/openai/deployments/emb/embeddings?"));
    }

    #[test]
    fn entra_token_replaces_the_key() {
        let d = deployment(", azure_ad_token: eyJtoken");
        let mut body = RequestBody::parse(br#"{"model":"g","messages":[]}"#).unwrap();
        let req = build_request(
            Operation::ChatCompletions,
            &mut body,
            &d,
            "gpt-4o-prod",
            false,
        )
        .unwrap();
        assert!(req
            .headers
            .contains(&("authorization".into(), "Bearer eyJtoken".into())));
        assert!(!req.headers.iter().any(|(k, _)| k == "api-key"));
        assert!(req
            .path
            .ends_with(&format!("api-version={DEFAULT_API_VERSION}")));
    }
}
