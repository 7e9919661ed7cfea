//! `local_models`: Sluice's own config section for models the gateway runs itself, each in a
//! supervised `sluice-engine` process reached over a unix socket. Every entry also becomes a
//! `model_list` deployment (`hosted_vllm/<model_name>` at `unix:<socket>`), so routing, keys,
//! budgets and fallbacks treat it like any other deployment.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::lenient;

/// One model served by a colocated engine.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalModel {
    /// The model group clients call, also the engine's `--served-model-name`.
    pub model_name: String,
    /// A GGUF file or a Hugging Face model folder.
    pub model: PathBuf,
    /// The engine's unix socket (ends in `.sock`).
    pub socket: PathBuf,
    /// The `sluice-engine` binary; none = next to `sluice`, else on PATH.
    pub engine_binary: Option<PathBuf>,
    /// Extra engine arguments (`--max-num-seqs 32`, `--threads 2`, ...).
    pub args: Vec<String>,
    /// How long startup waits for the engine's `/health` before serving without it.
    pub startup_timeout: Duration,
}

#[derive(Deserialize)]
pub(crate) struct RawLocalModel {
    model_name: String,
    model: String,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    socket: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    engine_binary: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string_list")]
    args: Option<Vec<String>>,
    #[serde(default, deserialize_with = "lenient::opt_f64")]
    startup_timeout: Option<f64>,
    #[serde(default)]
    model_info: Option<Map<String, Value>>,
    #[serde(flatten)]
    pub(crate) rest: Map<String, Value>,
}

/// Socket names derive from the model name; anything but [A-Za-z0-9._-] becomes `_`.
fn default_socket(model_name: &str) -> PathBuf {
    let dir = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|d| d.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let safe: String = model_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    dir.join(format!("sluice-engine-{safe}.sock"))
}

/// Checks an entry; returns the model and the `model_list` entry that routes to it, or the
/// problems found as (key path, expectation).
pub(crate) fn build_local_model(
    raw: RawLocalModel,
    path: &str,
) -> Result<(LocalModel, Value), Vec<(String, String)>> {
    let mut problems = Vec::new();
    if raw.model_name.trim().is_empty() || raw.model_name.contains('*') {
        problems.push((
            format!("{path}.model_name"),
            "a non-empty model name without `*`".to_string(),
        ));
    }
    let model = PathBuf::from(&raw.model);
    if !model.exists() {
        problems.push((
            format!("{path}.model"),
            format!(
                "a GGUF file or a Hugging Face model folder; \"{}\" does not exist",
                raw.model
            ),
        ));
    }
    let socket = raw
        .socket
        .map(PathBuf::from)
        .unwrap_or_else(|| default_socket(&raw.model_name));
    let socket_str = socket.to_string_lossy().to_string();
    if !socket_str.ends_with(".sock") || !socket.is_absolute() {
        problems.push((
            format!("{path}.socket"),
            format!("an absolute path ending in .sock; got \"{socket_str}\""),
        ));
    }
    let startup_timeout = raw.startup_timeout.unwrap_or(300.0);
    if !(startup_timeout.is_finite() && startup_timeout > 0.0) {
        problems.push((
            format!("{path}.startup_timeout"),
            "a positive number of seconds".to_string(),
        ));
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let mut entry = json!({
        "model_name": raw.model_name,
        "litellm_params": {
            "model": format!("hosted_vllm/{}", raw.model_name),
            "api_base": format!("unix:{socket_str}"),
        },
    });
    let mut info = raw.model_info.unwrap_or_default();
    info.entry("id")
        .or_insert_with(|| Value::String(format!("local-{}", raw.model_name)));
    entry["model_info"] = Value::Object(info);
    Ok((
        LocalModel {
            model_name: raw.model_name,
            model,
            socket,
            engine_binary: raw.engine_binary.map(PathBuf::from),
            args: raw.args.unwrap_or_default(),
            startup_timeout: Duration::from_secs_f64(startup_timeout),
        },
        entry,
    ))
}
