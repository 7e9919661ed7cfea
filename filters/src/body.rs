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
    /// The client's JSON text of the value (valid JSON: the whole body was checked once).
    Raw(&'a str),
    Owned(String),
}

impl Field<'_> {
    fn json(&self) -> &str {
        match self {
            Field::Raw(r) => r,
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
                    out.push((k, Field::Raw(v.get())));
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
        // The common case: valid UTF-8 (checked once, for the whole body) and JSON that the
        // scanner below accepts. Anything else (a malformed body, a key with escapes, deep
        // nesting) goes through serde_json, which gives the error or the same fields.
        if let Some(fields) = utf8(bytes).and_then(scan_object) {
            return Ok(RequestBody { fields });
        }
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let fields = <Fields as serde::Deserialize>::deserialize(&mut de)
            .and_then(|f| de.end().map(|_| f))
            .map_err(|e| {
                ApiError::bad_request(format!("Invalid request body: malformed JSON: {e}"))
            })?;
        Ok(RequestBody { fields: fields.0 })
    }

    /// Every field as (name, raw JSON text), in the client's order: one pass for translators
    /// that read many fields (instead of a search per field).
    pub fn fields(&self) -> impl Iterator<Item = (&str, &str)> {
        self.fields.iter().map(|(k, v)| (k.as_ref(), v.json()))
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

/// `bytes` as text when they are valid UTF-8. Bodies and stream events are nearly always
/// ASCII, which is checked many bytes at a time, faster than the full validation.
pub(crate) fn utf8(bytes: &[u8]) -> Option<&str> {
    if bytes.is_ascii() {
        // SAFETY: ASCII is valid UTF-8.
        return Some(unsafe { std::str::from_utf8_unchecked(bytes) });
    }
    std::str::from_utf8(bytes).ok()
}

type FieldList<'a> = Vec<(Cow<'a, str>, Field<'a>)>;

/// The top-level fields of a JSON object body, or `None` where serde_json must decide (any
/// malformed JSON, a key with escapes, nesting deeper than 64). Accepts exactly the JSON that
/// serde_json accepts (`src` is already valid UTF-8), and keeps what it would keep: each key
/// and the text of its value, the last of repeated keys.
fn scan_object(src: &str) -> Option<FieldList<'_>> {
    let mut s = Scanner {
        b: src.as_bytes(),
        i: 0,
    };
    s.ws();
    s.eat(b'{').then_some(())?;
    s.ws();
    let mut out: FieldList = Vec::with_capacity(16);
    if !s.eat(b'}') {
        loop {
            s.eat(b'"').then_some(())?;
            let start = s.i;
            if s.string()? {
                return None;
            }
            let key = &src[start..s.i - 1];
            s.ws();
            s.eat(b':').then_some(())?;
            s.ws();
            let start = s.i;
            s.value_inline()?;
            // A repeated key: the last one wins, as in most JSON parsers.
            if out.iter().any(|(k, _)| k == key) {
                out.retain(|(k, _)| k != key);
            }
            out.push((Cow::Borrowed(key), Field::Raw(&src[start..s.i])));
            s.ws();
            if s.eat(b'}') {
                break;
            }
            s.eat(b',').then_some(())?;
            s.ws();
        }
    }
    s.ws();
    (s.i == s.b.len()).then_some(out)
}

/// The index of the first `"`, `\` or control character of `b`.
#[inline(always)]
fn find_special(b: &[u8]) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    {
        let mut at = 0;
        while at + 16 <= b.len() {
            // SAFETY: the loop condition keeps the 16 bytes within `b`.
            let mask = unsafe { special_mask16(b, at) };
            if mask != 0 {
                return Some(at + mask.trailing_zeros() as usize);
            }
            at += 16;
        }
        find_special_swar(&b[at..]).map(|p| at + p)
    }
    #[cfg(not(target_arch = "x86_64"))]
    find_special_swar(b)
}

/// Bit i set where byte `at + i` of `b` is `"`, `\\` or a control character, for i in 0..16.
///
/// # Safety
/// `at + 16 <= b.len()`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn special_mask16(b: &[u8], at: usize) -> i32 {
    use std::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_min_epu8, _mm_movemask_epi8, _mm_or_si128,
        _mm_set1_epi8,
    };
    debug_assert!(at + 16 <= b.len());
    // SAFETY: SSE2 is part of x86_64; the caller keeps the 16 bytes loaded within `b`.
    unsafe {
        let x = _mm_loadu_si128(b.as_ptr().add(at).cast::<__m128i>());
        let quote = _mm_cmpeq_epi8(x, _mm_set1_epi8(b'"' as i8));
        let backslash = _mm_cmpeq_epi8(x, _mm_set1_epi8(b'\\' as i8));
        // x < 0x20 exactly when min(x, 0x1f) == x (unsigned).
        let ctrl = _mm_cmpeq_epi8(_mm_min_epu8(x, _mm_set1_epi8(0x1f)), x);
        _mm_movemask_epi8(_mm_or_si128(_mm_or_si128(quote, backslash), ctrl))
    }
}

/// [`find_special`] eight bytes at a time, each test a borrow into a byte's high bit (the
/// lowest flagged byte is always a real hit).
#[inline(always)]
fn find_special_swar(b: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::MAX / 255;
    const HIGH: u64 = ONES << 7;
    let hits = |chunk: &[u8]| {
        let x = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        let quote = x ^ (ONES * u64::from(b'"'));
        let backslash = x ^ (ONES * u64::from(b'\\'));
        (x.wrapping_sub(ONES * 0x20) & !x
            | quote.wrapping_sub(ONES) & !quote
            | backslash.wrapping_sub(ONES) & !backslash)
            & HIGH
    };
    let mut at = 0;
    while let Some(chunk) = b.get(at..at + 8) {
        let m = hits(chunk);
        if m != 0 {
            return Some(at + m.trailing_zeros() as usize / 8);
        }
        at += 8;
    }
    b[at..]
        .iter()
        .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
        .map(|p| at + p)
}

/// A strict JSON scanner over bytes (JSON's grammar; strings are checked for control
/// characters and escapes, UTF-8 was checked before).
#[derive(Clone)]
pub(crate) struct Scanner<'b> {
    b: &'b [u8],
    i: usize,
}

impl<'b> Scanner<'b> {
    /// A scanner at the start of `b` (valid UTF-8).
    pub(crate) fn new(b: &'b [u8]) -> Self {
        Scanner { b, i: 0 }
    }

    /// The index of the next byte.
    pub(crate) fn pos(&self) -> usize {
        self.i
    }

    pub(crate) fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    pub(crate) fn eat(&mut self, c: u8) -> bool {
        let hit = self.peek() == Some(c);
        self.i += usize::from(hit);
        hit
    }

    /// JSON whitespace (what serde_json skips).
    pub(crate) fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.i += 1;
        }
    }

    /// The rest of a string whose opening quote is eaten; whether it had escapes.
    ///
    /// Most strings (keys, short values) end within a block or two and have no escapes: that
    /// case is a loop small enough to inline into the callers, without the set-up of the full
    /// scan ([`Scanner::string_slow`]), which takes over from the first escape or control
    /// character, and near the end of the input.
    #[inline(always)]
    pub(crate) fn string(&mut self) -> Option<bool> {
        #[cfg(target_arch = "x86_64")]
        {
            let b = self.b;
            let mut at = self.i;
            while at + 16 <= b.len() {
                // SAFETY: the loop condition keeps the 16 bytes within `b`.
                let mask = unsafe { special_mask16(b, at) };
                if mask != 0 {
                    let end = at + mask.trailing_zeros() as usize;
                    if b[end] == b'"' {
                        self.i = end + 1;
                        return Some(false);
                    }
                    break;
                }
                at += 16;
            }
            // Nothing special before `at`.
            self.i = at;
        }
        self.string_slow()
    }

    /// [`Scanner::string`] in full: escapes, errors and the last bytes of the input.
    #[inline(never)]
    fn string_slow(&mut self) -> Option<bool> {
        let mut escaped = false;
        loop {
            let rest = &self.b[self.i..];
            let at = find_special(rest)?;
            self.i += at + 1;
            match rest[at] {
                b'"' => return Some(escaped),
                b'\\' => {}
                _ => return None,
            }
            escaped = true;
            match rest.get(at + 1)? {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.i += 1,
                b'u' => {
                    let hex = rest.get(at + 2..at + 6)?;
                    if !hex.iter().all(u8::is_ascii_hexdigit) {
                        return None;
                    }
                    self.i += 5;
                }
                _ => return None,
            }
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
        self.i - start
    }

    /// A number (its first byte not yet eaten).
    fn number(&mut self) -> Option<()> {
        self.eat(b'-');
        match self.peek()? {
            b'0' => {
                self.i += 1;
                if let Some(b'0'..=b'9') = self.peek() {
                    return None;
                }
            }
            b'1'..=b'9' => {
                self.digits();
            }
            _ => return None,
        }
        if self.eat(b'.') && self.digits() == 0 {
            return None;
        }
        if self.eat(b'e') || self.eat(b'E') {
            if !self.eat(b'+') {
                self.eat(b'-');
            }
            if self.digits() == 0 {
                return None;
            }
        }
        Some(())
    }

    pub(crate) fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.i + word.len();
        (self.b.get(self.i..end)? == word).then(|| self.i = end)
    }

    /// One value, the scanner at its first byte (no whitespace before it). Nesting is kept
    /// as bits (1: an object), without recursion.
    pub(crate) fn value(&mut self) -> Option<()> {
        self.value_inline()
    }

    /// [`Scanner::value`], inlined (into the body's scan, where it is most of the work).
    #[inline(always)]
    fn value_inline(&mut self) -> Option<()> {
        let mut stack: u64 = 0;
        let mut depth = 0u32;
        loop {
            // A value, or the opening of a container.
            match self.peek()? {
                b'"' => {
                    self.i += 1;
                    self.string()?;
                }
                open @ (b'{' | b'[') => {
                    self.i += 1;
                    self.ws();
                    let object = open == b'{';
                    if !self.eat(if object { b'}' } else { b']' }) {
                        if depth == 64 {
                            return None;
                        }
                        stack = stack << 1 | u64::from(object);
                        depth += 1;
                        if object {
                            self.key()?;
                        }
                        continue;
                    }
                }
                b't' => self.literal(b"true")?,
                b'f' => self.literal(b"false")?,
                b'n' => self.literal(b"null")?,
                b'-' | b'0'..=b'9' => self.number()?,
                _ => return None,
            }
            // After a value: a comma (then the next value) or the ends of containers.
            loop {
                if depth == 0 {
                    return Some(());
                }
                self.ws();
                let object = stack & 1 == 1;
                match self.peek()? {
                    b',' => {
                        self.i += 1;
                        self.ws();
                        if object {
                            self.key()?;
                        }
                        break;
                    }
                    b'}' if object => {}
                    b']' if !object => {}
                    _ => return None,
                }
                self.i += 1;
                stack >>= 1;
                depth -= 1;
            }
        }
    }

    /// `"key" :` and the whitespace after it (the scanner at the key's quote).
    fn key(&mut self) -> Option<()> {
        if !self.eat(b'"') {
            return None;
        }
        self.string()?;
        self.ws();
        if !self.eat(b':') {
            return None;
        }
        self.ws();
        Some(())
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
