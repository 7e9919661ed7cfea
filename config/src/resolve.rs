//! `os.environ/NAME` resolution over the whole document, recording the key path of any reference
//! to an unset variable so the error can name it.

use serde_json::Value;

const ENV_PREFIX: &str = "os.environ/";

/// Replaces every `os.environ/NAME` reference in place. A whole-string reference is replaced by the
/// variable's value; inside a string (`"Bearer os.environ/KEY"`, as pass-through headers use) the
/// reference is substituted where it stands. Unset variables are reported as `(path, name)`.
pub fn resolve_env_refs(value: &mut Value, path: &str, missing: &mut Vec<(String, String)>) {
    match value {
        Value::String(s) if s.contains(ENV_PREFIX) => match substitute(s) {
            Ok(resolved) => *s = resolved,
            Err(name) => missing.push((path.to_string(), name)),
        },
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                resolve_env_refs(item, &format!("{path}[{i}]"), missing);
            }
        }
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                let child = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                resolve_env_refs(v, &child, missing);
            }
        }
        _ => {}
    }
}

fn substitute(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find(ENV_PREFIX) {
        out.push_str(&rest[..at]);
        let after = &rest[at + ENV_PREFIX.len()..];
        let end = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        let name = &after[..end];
        match std::env::var(name) {
            Ok(v) => out.push_str(&v),
            Err(_) => return Err(name.to_string()),
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn resolves_whole_and_embedded_refs_and_reports_missing() {
        std::env::set_var("SLUICE_TEST_RESOLVE_A", "secret");
        let mut doc = json!({
            "a": "os.environ/SLUICE_TEST_RESOLVE_A",
            "h": {"Authorization": "Bearer os.environ/SLUICE_TEST_RESOLVE_A"},
            "l": ["x", "os.environ/SLUICE_TEST_RESOLVE_UNSET"]
        });
        let mut missing = vec![];
        resolve_env_refs(&mut doc, "", &mut missing);
        assert_eq!(doc["a"], "secret");
        assert_eq!(doc["h"]["Authorization"], "Bearer secret");
        assert_eq!(
            missing,
            vec![("l[1]".to_string(), "SLUICE_TEST_RESOLVE_UNSET".to_string())]
        );
    }
}
