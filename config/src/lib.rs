//! `sluice-config`: reads a LiteLLM-style `config.yaml` unchanged and turns it into the validated
//! routing model the gateway runs on.
//!
//! Loading is strict about what it understands and tolerant of the rest: wrong types or values are
//! errors that name the file, the key path and what was expected (all of them, not just the
//! first); keys Sluice does not act on are collected in [`Config::ignored_keys`] so the gateway can
//! warn about them once at startup. No network I/O happens here.

mod lenient;
mod load;
pub mod local;
mod model;
pub mod provider;
mod resolve;

use std::fmt;
use std::path::{Path, PathBuf};

pub use load::{parse_config, parse_config_with_local_models};
pub use local::LocalModel;
pub use model::*;
pub use provider::{split_model, ProviderKind, WireFormat};

/// The config used when no file is given: every requested model goes to the provider its name
/// implies, with that provider's usual environment credential (LiteLLM's `*` wildcard).
pub const EMBEDDED_DEFAULT: &str = r#"# Sluice embedded default: route any model name to the provider it names.
model_list:
  - model_name: "*"
    litellm_params:
      model: "*"
"#;

/// One thing wrong with a config file.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// Key path such as `model_list[2].litellm_params.rpm`.
    pub path: String,
    /// What was expected there.
    pub expected: String,
}

/// A config that cannot be used, with every problem found.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid config {} ({} problem{}):",
            self.file.display(),
            self.problems.len(),
            if self.problems.len() == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(
                f,
                "\n  {}: {}: expected {}",
                self.file.display(),
                p.path,
                p.expected
            )?;
        }
        Ok(())
    }
}

/// Reads and validates a config file.
pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        problems: vec![Problem {
            path: "(file)".into(),
            expected: format!("a readable file: {e}"),
        }],
    })?;
    parse_config(&text, path)
}

/// The embedded default config.
pub fn embedded_default() -> Config {
    parse_config(EMBEDDED_DEFAULT, Path::new("<built-in>"))
        .expect("the embedded default config is valid")
}

/// Shows a secret as its last four characters only.
pub fn redact(secret: &str) -> String {
    let tail: String = secret
        .chars()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    if secret.chars().count() <= 8 {
        "****".to_string()
    } else {
        format!("****{tail}")
    }
}

/// The routing table as `sluice --check-config` prints it, secrets redacted.
pub fn routing_table(config: &Config) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "config: {}", config.source.display());
    let r = &config.router;
    let _ = writeln!(
        out,
        "routing: strategy={} num_retries={} allowed_fails={} cooldown_time={}s timeout={}s max_fallbacks={}",
        r.routing_strategy.as_str(),
        r.num_retries,
        r.allowed_fails,
        r.cooldown_time.as_secs_f64(),
        r.timeout.as_secs_f64(),
        r.max_fallbacks
    );
    let _ = writeln!(
        out,
        "auth: {}",
        match &config.general.master_key {
            Some(k) => format!("master key {}", redact(k)),
            None => "open (no master_key)".into(),
        }
    );
    let mut groups: Vec<&str> = config
        .deployments
        .iter()
        .map(|d| d.model_name.as_str())
        .collect();
    groups.dedup();
    let mut seen = std::collections::BTreeSet::new();
    for g in groups {
        if !seen.insert(g) {
            continue;
        }
        let _ = writeln!(out, "group {g}");
        for d in config.deployments.iter().filter(|d| d.model_name == g) {
            let _ = writeln!(
                out,
                "  - id={} provider={} model={} api_base={} api_key={}{}{}{}{}{}",
                d.id,
                d.provider,
                d.upstream_model,
                d.api_base.as_deref().unwrap_or("(none)"),
                d.api_key
                    .as_deref()
                    .map(redact)
                    .unwrap_or_else(|| "(none)".into()),
                d.rpm.map(|v| format!(" rpm={v}")).unwrap_or_default(),
                d.tpm.map(|v| format!(" tpm={v}")).unwrap_or_default(),
                d.weight.map(|v| format!(" weight={v}")).unwrap_or_default(),
                d.order.map(|v| format!(" order={v}")).unwrap_or_default(),
                d.organization
                    .as_deref()
                    .map(|v| format!(" organization={v}"))
                    .unwrap_or_default(),
            );
        }
    }
    for (alias, t) in &config.model_group_alias {
        let _ = writeln!(
            out,
            "alias {alias} -> {}{}",
            t.target,
            if t.hidden { " (hidden)" } else { "" }
        );
    }
    for (name, list) in [
        ("fallbacks", &r.fallbacks),
        ("context_window_fallbacks", &r.context_window_fallbacks),
        ("content_policy_fallbacks", &r.content_policy_fallbacks),
    ] {
        for (g, t) in list {
            let _ = writeln!(out, "{name}: {g} -> {}", t.join(", "));
        }
    }
    if !r.default_fallbacks.is_empty() {
        let _ = writeln!(out, "default_fallbacks: {}", r.default_fallbacks.join(", "));
    }
    for p in &config.general.pass_through_endpoints {
        let _ = writeln!(out, "pass-through {} -> {}", p.path, p.target);
    }
    if !config.ignored_keys.is_empty() {
        let _ = writeln!(
            out,
            "not implemented (ignored): {}",
            config.ignored_keys.join(", ")
        );
    }
    out
}

#[cfg(test)]
mod tests;
