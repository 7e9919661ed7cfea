//! `/score` and `/rerank` for embedding models: the score of a pair is the cosine of the two
//! embeddings. Pairing follows vLLM: 1 vs 1, 1 vs N (the single item against each), N vs N (zip).

use axum::body::Bytes;
use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::embeddings::encode_for_pooling;
use super::errors::ApiError;
use super::generation::{response_id, unix_now};
use super::openai::{check_model, check_task, fields, parse_body, PromptInput};
use crate::engine::{EngineHandle, Task};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ScoreFields {
    pub model: Option<String>,
    pub queries: Option<Value>,
    pub documents: Option<Value>,
    pub items: Option<Value>,
    pub text_1: Option<Value>,
    pub text_2: Option<Value>,
    pub data_1: Option<Value>,
    pub data_2: Option<Value>,
    pub truncate_prompt_tokens: Option<i64>,
    pub request_id: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct RerankFields {
    pub model: Option<String>,
    pub query: Option<Value>,
    pub documents: Option<Value>,
    pub top_n: Option<u64>,
    pub truncate_prompt_tokens: Option<i64>,
    pub request_id: Option<String>,
}

/// Texts of one side: a string, a list of strings, or (rerank) `{"text": …}` objects.
fn texts(value: &Value, field: &str) -> Result<Vec<String>, ApiError> {
    let one = |v: &Value| -> Option<String> {
        match v {
            Value::String(text) => Some(text.clone()),
            Value::Object(map) => map.get("text")?.as_str().map(str::to_owned),
            _ => None,
        }
    };
    let texts = match value {
        Value::Array(items) => items.iter().map(one).collect::<Option<Vec<_>>>(),
        other => one(other).map(|t| vec![t]),
    };
    let texts = texts.ok_or_else(|| {
        ApiError::bad_param(
            field,
            format!("{field} must be a string or a list of strings."),
        )
    })?;
    if texts.is_empty() {
        return Err(ApiError::bad_param(
            field,
            format!("{field} cannot be empty."),
        ));
    }
    Ok(texts)
}

impl ScoreFields {
    /// The two sides under whichever names the client used.
    fn sides(&self) -> Result<(Vec<String>, Vec<String>), ApiError> {
        let spellings = [
            ("queries", &self.queries, "documents", &self.documents),
            ("queries", &self.queries, "items", &self.items),
            ("text_1", &self.text_1, "text_2", &self.text_2),
            ("data_1", &self.data_1, "data_2", &self.data_2),
        ];
        for (left_name, left, right_name, right) in spellings {
            if let (Some(left), Some(right)) = (left, right) {
                return Ok((texts(left, left_name)?, texts(right, right_name)?));
            }
        }
        Err(ApiError::bad_request(
            "Score needs `queries` and `documents` (or `text_1`/`text_2`, `data_1`/`data_2`, \
             `queries`/`items`).",
        ))
    }
}

/// Index pairs (left, right): 1:1, 1:N or N:N.
pub fn pair_up(left: usize, right: usize) -> Result<Vec<(usize, usize)>, ApiError> {
    if left == 1 {
        Ok((0..right).map(|j| (0, j)).collect())
    } else if left == right {
        Ok((0..left).map(|i| (i, i)).collect())
    } else {
        Err(ApiError::bad_request(format!(
            "Input lengths must be either 1:1, 1:N or N:N, got {left}:{right}."
        )))
    }
}

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let denominator = norm(a) * norm(b);
    if denominator == 0.0 {
        0.0
    } else {
        dot / denominator
    }
}

/// Embed both sides in one engine call; scores per pair and the tokens used.
async fn score_pairs(
    handle: &EngineHandle,
    left: Vec<String>,
    right: Vec<String>,
    truncate: Option<i64>,
) -> Result<(Vec<f32>, usize), ApiError> {
    let pairs = pair_up(left.len(), right.len())?;
    let left_count = left.len();
    let prompts: Vec<PromptInput> = left
        .into_iter()
        .chain(right)
        .map(PromptInput::Text)
        .collect();
    let inputs = encode_for_pooling(handle, &prompts, true, truncate)?;
    let tokens = inputs.iter().map(Vec::len).sum();
    let vectors = handle.embed(inputs).await?;
    if vectors.len() != prompts.len() {
        return Err(ApiError::internal(format!(
            "the engine returned {} embeddings for {} inputs",
            vectors.len(),
            prompts.len()
        )));
    }
    let scores = pairs
        .iter()
        .map(|&(i, j)| cosine(&vectors[i], &vectors[left_count + j]))
        .collect();
    Ok((scores, tokens))
}

pub async fn score(
    State(handle): State<EngineHandle>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let body = parse_body(&body)?;
    let request: ScoreFields = fields(&body)?;
    check_model(&handle, request.model.as_deref())?;
    check_task(&handle, Task::Embed, "Score")?;
    let (left, right) = request.sides()?;
    let (scores, tokens) =
        score_pairs(&handle, left, right, request.truncate_prompt_tokens).await?;
    let data: Vec<Value> = scores
        .iter()
        .enumerate()
        .map(|(index, score)| json!({"index": index, "object": "score", "score": score}))
        .collect();
    Ok(Json(json!({
        "id": response_id("score-", request.request_id.as_deref()),
        "object": "list",
        "created": unix_now(),
        "model": handle.info().served_model_name,
        "data": data,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
    })))
}

/// Results sorted by score, best first, cut to `top_n` (absent or 0: all).
pub fn rerank_results(documents: &[String], scores: &[f32], top_n: Option<u64>) -> Vec<Value> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    // Stable: equal scores keep document order.
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let keep = match top_n {
        Some(n) if n > 0 => n as usize,
        _ => order.len(),
    };
    order
        .into_iter()
        .take(keep)
        .map(|index| {
            json!({
                "index": index,
                "document": {"text": documents[index]},
                "relevance_score": scores[index],
            })
        })
        .collect()
}

pub async fn rerank(
    State(handle): State<EngineHandle>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let body = parse_body(&body)?;
    let request: RerankFields = fields(&body)?;
    check_model(&handle, request.model.as_deref())?;
    check_task(&handle, Task::Embed, "Rerank")?;
    let query = match &request.query {
        Some(Value::String(query)) => query.clone(),
        _ => return Err(ApiError::bad_param("query", "query must be a string.")),
    };
    let documents = match &request.documents {
        Some(documents) if documents.is_array() => texts(documents, "documents")?,
        _ => {
            return Err(ApiError::bad_param(
                "documents",
                "documents must be a list of strings.",
            ))
        }
    };
    let (scores, tokens) = score_pairs(
        &handle,
        vec![query],
        documents.clone(),
        request.truncate_prompt_tokens,
    )
    .await?;
    Ok(Json(json!({
        "id": response_id("rerank-", request.request_id.as_deref()),
        "model": handle.info().served_model_name,
        "usage": {"total_tokens": tokens},
        "results": rerank_results(&documents, &scores, request.top_n),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairing_rules() {
        assert_eq!(pair_up(1, 1).unwrap(), vec![(0, 0)]);
        assert_eq!(pair_up(1, 3).unwrap(), vec![(0, 0), (0, 1), (0, 2)]);
        assert_eq!(pair_up(2, 2).unwrap(), vec![(0, 0), (1, 1)]);
        let err = pair_up(2, 3).unwrap_err();
        assert_eq!(err.status, 400);
        assert!(err.message.contains("2:3"));
        // N:1 is not a vLLM pairing.
        assert!(pair_up(3, 1).is_err());
    }

    #[test]
    fn every_spelling_of_the_sides() {
        for body in [
            json!({"queries": "q", "documents": ["a", "b"]}),
            json!({"queries": "q", "items": ["a", "b"]}),
            json!({"text_1": "q", "text_2": ["a", "b"]}),
            json!({"data_1": ["q"], "data_2": ["a", "b"]}),
        ] {
            let request: ScoreFields = fields(&body).unwrap();
            let (left, right) = request.sides().unwrap();
            assert_eq!(left, vec!["q".to_string()], "{body}");
            assert_eq!(right, vec!["a".to_string(), "b".to_string()], "{body}");
        }
        let missing: ScoreFields = fields(&json!({"text_1": "q"})).unwrap();
        assert!(missing.sides().is_err());
        let empty: ScoreFields = fields(&json!({"text_1": [], "text_2": "a"})).unwrap();
        assert_eq!(empty.sides().unwrap_err().param.as_deref(), Some("text_1"));
        let wrong: ScoreFields = fields(&json!({"text_1": 5, "text_2": "a"})).unwrap();
        assert_eq!(wrong.sides().unwrap_err().param.as_deref(), Some("text_1"));
    }

    #[test]
    fn cosine_against_hand_values() {
        assert!((cosine(&[1.0, 0.0], &[0.0, 1.0])).abs() < 1e-7);
        assert!((cosine(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-6);
        // (3·4 + 4·3) / (5·5) = 24/25.
        assert!((cosine(&[3.0, 4.0], &[4.0, 3.0]) - 0.96).abs() < 1e-6);
        assert!((cosine(&[1.0, 1.0], &[-1.0, -1.0]) + 1.0).abs() < 1e-6);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
    }

    #[test]
    fn rerank_sorts_and_cuts() {
        let documents: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let results = rerank_results(&documents, &[0.1, 0.9, 0.5], Some(2));
        assert_eq!(
            results,
            vec![
                json!({"index": 1, "document": {"text": "b"}, "relevance_score": 0.9f32}),
                json!({"index": 2, "document": {"text": "c"}, "relevance_score": 0.5f32}),
            ]
        );
        assert_eq!(rerank_results(&documents, &[0.1, 0.9, 0.5], None).len(), 3);
        assert_eq!(
            rerank_results(&documents, &[0.1, 0.9, 0.5], Some(0)).len(),
            3
        );
        let tied = rerank_results(&documents, &[0.5, 0.5, 0.5], None);
        let order: Vec<_> = tied.iter().map(|r| r["index"].as_u64().unwrap()).collect();
        assert_eq!(order, vec![0, 1, 2]);
    }

    #[test]
    fn rerank_documents_may_be_objects() {
        let parsed = texts(&json!([{"text": "x"}, "y"]), "documents").unwrap();
        assert_eq!(parsed, vec!["x".to_string(), "y".to_string()]);
    }
}
