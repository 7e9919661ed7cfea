//! The client's JSON body, parsed only at the top level: each field stays as raw JSON text so that
//! a 1 MiB `messages` array is validated once and copied, never rebuilt into a value tree. Routing
//! needs only `model`, `stream` and `stream_options`; everything else goes upstream as sent.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::error::ApiError;

#[derive(Debug, Clone)]
enum Field<'a> {
    Raw(&'a RawValue),
    Owned(String),
}

impl Field<'_> {
    fn json(&self) -> &str {
        match self {
            Field::Raw(r) => r.get(),
            Field::Owned(s) => s,
        }
    }
}

/// A JSON object body with its fields in the client's order.
#[derive(Debug, Clone)]
pub struct RequestBody<'a> {
    fields: Vec<(Cow<'a, str>, Field<'a>)>,
}

struct Key<'a>(Cow<'a, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

struct Fields<'a>(Vec<(Cow<'a, str>, Field<'a>)>);

impl<'de> serde::Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<'de>, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
                    let v: &'de RawValue = map.next_value()?;
                    // A repeated key: the last one wins, as in most JSON parsers.
                    out.retain(|(existing, _): &(Cow<str>, Field)| existing != &k);
                    out.push((k, Field::Raw(v)));
                }
                Ok(Fields(out))
            }
        }
        d.deserialize_map(V)
    }
}

impl<'a> RequestBody<'a> {
    /// Parses a body; anything but a JSON object is a 400.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, ApiError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::bad_request(
                "Invalid request body: expected a JSON object, got an empty body",
            ));
        }
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let fields = <Fields as serde::Deserialize>::deserialize(&mut de)
            .and_then(|f| de.end().map(|_| f))
            .map_err(|e| {
                ApiError::bad_request(format!("Invalid request body: malformed JSON: {e}"))
            })?;
        Ok(RequestBody { fields: fields.0 })
    }

    fn find(&self, key: &str) -> Option<&Field<'a>> {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.find(key).is_some_and(|v| v.json() != "null")
    }

    /// Raw JSON text of a field.
    pub fn raw(&self, key: &str) -> Option<&str> {
        self.find(key).map(Field::json)
    }

    /// A string field; a field of another type is a 400 naming it.
    pub fn str_field(&self, key: &str) -> Result<Option<Cow<'_, str>>, ApiError> {
        match self.find(key) {
            None => Ok(None),
            Some(f) if f.json() == "null" => Ok(None),
            Some(f) => serde_json::from_str::<Cow<str>>(f.json())
                .map(Some)
                .map_err(|_| {
                    ApiError::bad_request(format!("Invalid request body: `{key}` must be a string"))
                        .with_param(key)
                }),
        }
    }

    pub fn bool_field(&self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.find(key).map(Field::json) {
            None | Some("null") => Ok(None),
            Some("true") => Ok(Some(true)),
            Some("false") => Ok(Some(false)),
            Some(_) => Err(ApiError::bad_request(format!(
                "Invalid request body: `{key}` must be a boolean"
            ))
            .with_param(key)),
        }
    }

    /// Whether `stream_options.include_usage` is true.
    pub fn wants_stream_usage(&self) -> bool {
        self.raw("stream_options")
            .and_then(|raw| serde_json::from_str::<serde_json::Value>(raw).ok())
            .and_then(|v| v.get("include_usage").and_then(|u| u.as_bool()))
            .unwrap_or(false)
    }

    /// Sets a field to a JSON value, replacing it in place or appending it.
    pub fn set_json(&mut self, key: &str, json: String) {
        match self.fields.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = Field::Owned(json),
            None => self
                .fields
                .push((Cow::Owned(key.to_string()), Field::Owned(json))),
        }
    }

    pub fn set_str(&mut self, key: &str, value: &str) {
        self.set_json(
            key,
            serde_json::to_string(value).expect("strings serialize"),
        );
    }

    /// Adds a field only when the client did not send it (deployment default params).
    pub fn set_default(&mut self, key: &str, json: String) {
        if self.find(key).is_none() {
            self.fields
                .push((Cow::Owned(key.to_string()), Field::Owned(json)));
        }
    }

    /// The body as JSON bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let len: usize = self
            .fields
            .iter()
            .map(|(k, v)| k.len() + v.json().len() + 4)
            .sum();
        let mut out = Vec::with_capacity(len + 2);
        out.push(b'{');
        for (i, (k, v)) in self.fields.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            serde_json::to_writer(&mut out, k.as_ref()).expect("keys serialize");
            out.push(b':');
            out.extend_from_slice(v.json().as_bytes());
        }
        out.push(b'}');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_fields_raw_and_rewrites_model() {
        let src =
            br#"{"messages":[{"role":"user","content":"h\u00e9"}],"model":"a","stream":true}"#;
        let mut b = RequestBody::parse(src).unwrap();
        assert_eq!(b.str_field("model").unwrap().unwrap(), "a");
        assert_eq!(b.bool_field("stream").unwrap(), Some(true));
        b.set_str("model", "upstream/\"x\"");
        b.set_default("temperature", "0.5".into());
        b.set_default("stream", "false".into());
        let out: serde_json::Value = serde_json::from_slice(&b.to_bytes()).unwrap();
        assert_eq!(out["model"], "upstream/\"x\"");
        assert_eq!(out["temperature"], 0.5);
        assert_eq!(out["stream"], true);
        assert_eq!(out["messages"][0]["content"], "hé");
    }

    #[test]
    fn rejects_non_objects_and_wrong_types() {
        assert_eq!(RequestBody::parse(b"[1,2]").unwrap_err().status, 400);
        assert_eq!(RequestBody::parse(b"{\"model\": ").unwrap_err().status, 400);
        assert_eq!(RequestBody::parse(b"{} trailing").unwrap_err().status, 400);
        assert_eq!(RequestBody::parse(b"").unwrap_err().status, 400);
        let b = RequestBody::parse(br#"{"model": 3, "stream": "yes"}"#).unwrap();
        assert!(b.str_field("model").is_err());
        assert!(b.bool_field("stream").is_err());
    }

    #[test]
    fn reads_stream_usage_flag() {
        let b = RequestBody::parse(br#"{"stream_options":{"include_usage":true}}"#).unwrap();
        assert!(b.wants_stream_usage());
        let b = RequestBody::parse(br#"{"stream_options":{}}"#).unwrap();
        assert!(!b.wants_stream_usage());
    }
}
