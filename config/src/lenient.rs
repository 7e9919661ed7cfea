//! Lenient scalar deserializers: LiteLLM configs often quote numbers and booleans
//! (`redis_port: "6379"`, `rpm: "100"`), and Python's YAML loader accepts them, so we must too.

use serde::{de::Error, Deserialize, Deserializer};
use serde_json::Value;

fn number_from(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
}

pub fn opt_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let v = Option::<Value>::deserialize(d)?;
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match number_from(&v) {
            Some(f) if f >= 0.0 && f.fract() == 0.0 && f <= u64::MAX as f64 => Ok(Some(f as u64)),
            _ => Err(D::Error::custom(format!(
                "expected a non-negative integer, got {v}"
            ))),
        },
    }
}

pub fn opt_f64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    let v = Option::<Value>::deserialize(d)?;
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match number_from(&v) {
            Some(f) if f.is_finite() && f >= 0.0 => Ok(Some(f)),
            _ => Err(D::Error::custom(format!(
                "expected a non-negative number, got {v}"
            ))),
        },
    }
}

pub fn opt_i64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    let v = Option::<Value>::deserialize(d)?;
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match number_from(&v) {
            Some(f) if f.fract() == 0.0 => Ok(Some(f as i64)),
            _ => Err(D::Error::custom(format!("expected an integer, got {v}"))),
        },
    }
}

pub fn opt_bool<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    let v = Option::<Value>::deserialize(d)?;
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(b)),
        Some(Value::String(s)) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "yes" | "1" => Ok(Some(true)),
            "false" | "no" | "0" => Ok(Some(false)),
            _ => Err(D::Error::custom(format!("expected a boolean, got \"{s}\""))),
        },
        Some(v) => Err(D::Error::custom(format!("expected a boolean, got {v}"))),
    }
}

/// A string or a list of strings (`organization`, `fallbacks` values, `tags`).
pub fn opt_string_list<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    let v = Option::<Value>::deserialize(d)?;
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(vec![s])),
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|i| match i {
                Value::String(s) => Ok(s),
                Value::Number(n) => Ok(n.to_string()),
                other => Err(D::Error::custom(format!(
                    "expected a list of strings, got item {other}"
                ))),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(v) => Err(D::Error::custom(format!(
            "expected a string or a list of strings, got {v}"
        ))),
    }
}

/// Any scalar as a string (`api_key: 12345` is still a key).
pub fn opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let v = Option::<Value>::deserialize(d)?;
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(Value::Bool(b)) => Ok(Some(b.to_string())),
        Some(v) => Err(D::Error::custom(format!("expected a string, got {v}"))),
    }
}
