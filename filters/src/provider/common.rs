//! Pieces every translator shares: reading typed fields from the client's body, the OpenAI
//! message shape they all convert from, and the OpenAI usage object they all produce.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Value};

pub(super) use crate::body::utf8;
use crate::body::{RequestBody, Scanner};
use crate::error::ApiError;
use crate::usage::Usage;

pub(super) fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::bad_request(msg)
}

/// A string to write out as JSON: the client's own token where it can be copied through (see
/// [`text`]), else the string, escaped as usual.
pub(super) enum Text<'a> {
    Raw(Token<'a>),
    Str(Cow<'a, str>),
}

/// A JSON string token, quotes included, that serde_json would write the same way: copying it
/// through saves escaping its string again.
#[derive(Clone, Copy)]
pub(super) struct Token<'a>(&'a str);

impl<'a> Token<'a> {
    /// The token's JSON text.
    pub fn get(&self) -> &'a str {
        self.0
    }
}

impl Serialize for Text<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            // A token is valid JSON by construction, so this parse (which serde needs to copy
            // JSON text through) cannot fail.
            Text::Raw(token) => serde_json::from_str::<&RawValue>(token.get())
                .map_err(serde::ser::Error::custom)?
                .serialize(s),
            Text::Str(text) => s.serialize_str(text),
        }
    }
}

impl Text<'_> {
    /// Whether the string is empty.
    pub fn is_empty(&self) -> bool {
        match self {
            Text::Raw(token) => token.get().len() == 2,
            Text::Str(text) => text.is_empty(),
        }
    }

    /// Appends the string as JSON to `out` (for translators that write their JSON by hand).
    pub fn write(&self, out: &mut Vec<u8>) {
        match self {
            Text::Raw(token) => out.extend_from_slice(token.get().as_bytes()),
            Text::Str(text) => serde_json::to_writer(out, text).expect("strings serialize"),
        }
    }
}

/// `s` as a JSON string. When `s` is a string token of `src` (the client's JSON) that had no
/// escapes, so that serde borrowed it, the quoted token is copied through as it is: serde_json
/// escapes only `"`, `\` and control characters, and when `s` holds none of them (checked) the
/// bytes are the same either way.
pub(super) fn text<'a>(src: &'a str, s: &'a str) -> Text<'a> {
    let start = (s.as_ptr() as usize).wrapping_sub(src.as_ptr() as usize);
    if start == 0 || start > src.len() || src.len() - start <= s.len() {
        return Text::Str(Cow::Borrowed(s));
    }
    let end = start + s.len();
    let quoted = src.as_bytes()[start - 1] == b'"' && src.as_bytes()[end] == b'"';
    if !quoted || needs_escape(s.as_bytes()) {
        return Text::Str(Cow::Borrowed(s));
    }
    Text::Raw(Token(&src[start - 1..=end]))
}

/// Whether every escape of a valid JSON string token is the one serde_json writes for the
/// character it stands for (`\"`, `\\`, `\b`, `\f`, `\n`, `\r`, `\t`, else `\u00xx`, lowercase,
/// for the other control characters; nothing else is escaped): then serializing the string
/// gives back the token.
pub(super) fn canonical_escapes(token: &[u8]) -> bool {
    let mut i = 0;
    while let Some(at) = memchr::memchr(b'\\', &token[i..]) {
        let j = i + at + 1;
        match token.get(j) {
            Some(b'"' | b'\\' | b'b' | b'f' | b'n' | b'r' | b't') => i = j + 1,
            Some(b'u') => match token.get(j + 1..j + 5) {
                Some([b'0', b'0', b'0', b'0'..=b'7' | b'b' | b'e' | b'f'])
                | Some([b'0', b'0', b'1', b'0'..=b'9' | b'a'..=b'f']) => i = j + 5,
                _ => return false,
            },
            _ => return false,
        }
    }
    true
}

/// Whether serde_json would escape any of `bytes` (`"`, `\` or a control character).
fn needs_escape(bytes: &[u8]) -> bool {
    // The smallest byte, without an early exit: the compiler compares many bytes at once.
    memchr::memchr2(b'"', b'\\', bytes).is_some()
        || bytes.iter().fold(u8::MAX, |m, &b| m.min(b)) < 0x20
}

/// A body field as `T`; absent or `null` is `None`, a wrong type is a 400 naming the field.
pub(super) fn parse_field<T: serde::de::DeserializeOwned>(
    body: &RequestBody<'_>,
    key: &str,
) -> Result<Option<T>, ApiError> {
    match body.raw(key) {
        None | Some("null") => Ok(None),
        Some(raw) => serde_json::from_str(raw)
            .map(Some)
            .map_err(|e| bad(format!("Invalid request body: `{key}`: {e}")).with_param(key)),
    }
}

/// A body field as a JSON value.
pub(super) fn raw_value(body: &RequestBody<'_>, key: &str) -> Result<Option<Value>, ApiError> {
    parse_field::<Value>(body, key)
}

/// OpenAI chat messages borrowed from the client's body: translating a request then copies
/// each prompt string once, into the output (translators that build `serde_json::Value` trees
/// instead pay for every string and map twice).
#[derive(Deserialize)]
pub(super) struct InMessage<'a> {
    #[serde(borrow)]
    pub role: Cow<'a, str>,
    #[serde(default, borrow)]
    pub content: Option<InContent<'a>>,
    #[serde(default, borrow)]
    pub tool_calls: Option<Vec<InToolCall<'a>>>,
    #[serde(default, borrow)]
    pub tool_call_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub reasoning_content: Option<Cow<'a, str>>,
}

/// Message content: a string or a list of parts (`P`: the part type a translator reads).
pub(super) enum InContent<'a, P = InPart<'a>> {
    Text(Cow<'a, str>),
    /// A string with escapes that serde_json would write back unchanged (see
    /// [`canonical_escapes`]), kept as its token: written out as it came, without unescaping
    /// and escaping it again. Only the scanners make it ([`string_content`]).
    Token(Token<'a>),
    Parts(Vec<P>),
}

impl<'a, P> InContent<'a, P> {
    /// String content as text to write out (`None` for parts); `src` as for [`text`].
    pub fn as_text(&'a self, src: &'a str) -> Option<Text<'a>> {
        match self {
            InContent::Text(s) => Some(text(src, s)),
            InContent::Token(t) => Some(Text::Raw(*t)),
            InContent::Parts(_) => None,
        }
    }

    /// String content as a string (`None` for parts).
    pub fn as_str(&self) -> Option<Cow<'_, str>> {
        match self {
            InContent::Text(s) => Some(Cow::Borrowed(s)),
            // A token is a valid JSON string by construction.
            InContent::Token(t) => unescape(t.get()).map(Cow::Owned),
            InContent::Parts(_) => None,
        }
    }
}

/// A string value token (`escaped`: it has escapes) as message content, as serde would read
/// it, except that escapes serde_json would write back the same stay a [`InContent::Token`].
pub(super) fn string_content<P>(token: &str, escaped: bool) -> Option<InContent<'_, P>> {
    if escaped && canonical_escapes(token.as_bytes()) {
        return Some(InContent::Token(Token(token)));
    }
    token_str(token, escaped).map(InContent::Text)
}

/// A string or a list of parts, read directly (an untagged enum would buffer every message).
impl<'de: 'a, 'a, P: Deserialize<'de>> Deserialize<'de> for InContent<'a, P> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a, P>(std::marker::PhantomData<(&'a (), P)>);
        impl<'de: 'a, 'a, P: Deserialize<'de>> serde::de::Visitor<'de> for V<'a, P> {
            type Value = InContent<'a, P>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or a list of content parts")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(InContent::Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(InContent::Text(Cow::Owned(v.to_string())))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut parts = Vec::with_capacity(seq.size_hint().unwrap_or(2));
                while let Some(p) = seq.next_element()? {
                    parts.push(p);
                }
                Ok(InContent::Parts(parts))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// The client's `messages` (`src`, the field's JSON text) as [`InMessage`]s: read with the
/// body's scanner where it can ([`scan_messages`]), else by serde, which gives any error.
pub(super) fn read_messages(src: &str) -> Result<Vec<InMessage<'_>>, ApiError> {
    if let Some(messages) = scan_messages(src) {
        return Ok(messages);
    }
    serde_json::from_str(src)
        .map_err(|e| bad(format!("Invalid request body: `messages`: {e}")).with_param("messages"))
}

/// The messages read directly, without serde's visitors, for the common shapes: the same
/// values serde would give (strings borrowed unless they have escapes). `None` (serde decides)
/// for anything else: malformed JSON, keys with escapes, repeated fields, wrong types, a
/// missing role.
fn scan_messages(src: &str) -> Option<Vec<InMessage<'_>>> {
    scan_array(src, scan_message)
}

/// `src` as one JSON array whose items `item` reads at the scanner, nothing after it; `None`
/// when the array or any item does not scan.
pub(super) fn scan_array<'a, T>(
    src: &'a str,
    item: impl Fn(&mut Scanner, &'a str) -> Option<T>,
) -> Option<Vec<T>> {
    let mut s = Scanner::new(src.as_bytes());
    s.ws();
    let out = scan_array_at(&mut s, src, item)?;
    s.ws();
    (s.pos() == src.len()).then_some(out)
}

/// A JSON array at the scanner, its items read by `item`; `None` when any does not scan.
fn scan_array_at<'a, T>(
    s: &mut Scanner,
    src: &'a str,
    item: impl Fn(&mut Scanner, &'a str) -> Option<T>,
) -> Option<Vec<T>> {
    s.eat(b'[').then_some(())?;
    s.ws();
    let mut out = Vec::with_capacity(8);
    if !s.eat(b']') {
        loop {
            out.push(item(s, src)?);
            s.ws();
            if s.eat(b']') {
                break;
            }
            s.eat(b',').then_some(())?;
            s.ws();
        }
    }
    Some(out)
}

/// One value at the scanner: its JSON text and whether it is a string with escapes.
pub(super) fn scan_value<'a>(s: &mut Scanner, src: &'a str) -> Option<(&'a str, bool)> {
    let start = s.pos();
    let escaped = if s.eat(b'"') {
        s.string()?
    } else {
        s.value()?;
        false
    };
    Some((&src[start..s.pos()], escaped))
}

/// A string token's string, as serde gives it: borrowed without escapes, else unescaped.
pub(super) fn token_str(token: &str, escaped: bool) -> Option<Cow<'_, str>> {
    if !token.starts_with('"') {
        return None;
    }
    if escaped {
        unescape(token).map(Cow::Owned)
    } else {
        Some(Cow::Borrowed(&token[1..token.len() - 1]))
    }
}

/// A `tool_calls` list (`src`, its JSON text) read in one pass with the body's scanner, as
/// serde reads [`InToolCall`]s; `None` (serde decides) for anything unusual.
#[cfg(test)]
pub(super) fn scan_tool_calls(src: &str) -> Option<Vec<InToolCall<'_>>> {
    scan_array(src, scan_tool_call)
}

/// An object at the scanner, each field handed to `field` (key without quotes, value token,
/// whether the value is a string with escapes), which gives the field's bit (0: ignored) or
/// `None`. `None` for a key with escapes or a repeated field (serde's error).
fn scan_fields<'a>(
    s: &mut Scanner,
    src: &'a str,
    mut field: impl FnMut(&'a str, &'a str, bool) -> Option<u8>,
) -> Option<()> {
    scan_fields_at(s, src, |key, s| {
        let (value, escaped) = scan_value(s, src)?;
        field(key, value, escaped)
    })
}

/// [`scan_fields`], `field` given the scanner at the value, which it reads itself: a nested
/// value it reads field by field is then scanned once, not once whole and again by parts.
pub(super) fn scan_fields_at<'a>(
    s: &mut Scanner,
    src: &'a str,
    mut field: impl FnMut(&'a str, &mut Scanner) -> Option<u8>,
) -> Option<()> {
    s.eat(b'{').then_some(())?;
    s.ws();
    let mut seen = 0u8;
    if !s.eat(b'}') {
        loop {
            let (key, escaped) = scan_value(s, src)?;
            if escaped || !key.starts_with('"') {
                return None;
            }
            s.ws();
            s.eat(b':').then_some(())?;
            s.ws();
            let bit = field(&key[1..key.len() - 1], s)?;
            if seen & bit != 0 {
                return None;
            }
            seen |= bit;
            s.ws();
            if s.eat(b'}') {
                break;
            }
            s.eat(b',').then_some(())?;
            s.ws();
        }
    }
    Some(())
}

/// A message's `tool_calls` value at the scanner (`null` or a list), read in the same pass.
pub(super) fn tool_calls_at<'a>(
    s: &mut Scanner,
    src: &'a str,
) -> Option<Option<Vec<InToolCall<'a>>>> {
    if s.peek()? == b'[' {
        return scan_array_at(s, src, scan_tool_call).map(Some);
    }
    s.literal(b"null")?;
    Some(None)
}

fn scan_tool_call<'a>(s: &mut Scanner, src: &'a str) -> Option<InToolCall<'a>> {
    let mut id = None;
    let mut function = None;
    scan_fields_at(s, src, |key, s| match key {
        "id" => {
            let (value, escaped) = scan_value(s, src)?;
            id = Some(token_str(value, escaped)?);
            Some(1)
        }
        "function" => {
            function = Some(scan_function(s, src)?);
            Some(2)
        }
        _ => scan_value(s, src).map(|_| 0),
    })?;
    Some(InToolCall {
        id: id?,
        function: function?,
    })
}

/// A tool call's `function` object at the scanner.
fn scan_function<'a>(s: &mut Scanner, src: &'a str) -> Option<InFunction<'a>> {
    let mut name = None;
    let mut arguments = Cow::Borrowed("");
    scan_fields(s, src, |key, value, escaped| match key {
        "name" => {
            name = Some(token_str(value, escaped)?);
            Some(1)
        }
        "arguments" => {
            arguments = token_str(value, escaped)?;
            Some(2)
        }
        _ => Some(0),
    })?;
    Some(InFunction {
        name: name?,
        arguments,
    })
}

/// The string of a string token (quotes included; checked by the scanner), as serde_json
/// unescapes it. `\u` escapes (rarer; surrogate pairs) are left to serde_json.
fn unescape(token: &str) -> Option<String> {
    let bytes = &token.as_bytes()[1..token.len() - 1];
    let mut out = Vec::with_capacity(bytes.len());
    // Escapes come close together in the strings that have them (JSON in a string): a byte
    // loop costs less than a search call per escape.
    let (mut i, mut run) = (0, 0);
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            i += 1;
            continue;
        }
        out.extend_from_slice(&bytes[run..i]);
        let c = match bytes.get(i + 1)? {
            b'"' => b'"',
            b'\\' => b'\\',
            b'/' => b'/',
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            _ => return serde_json::from_str(token).ok(),
        };
        out.push(c);
        i += 2;
        run = i;
    }
    out.extend_from_slice(&bytes[run..]);
    // Valid UTF-8: escapes were replaced by ASCII between whole characters.
    String::from_utf8(out).ok()
}

/// The fields of one JSON object (`src`, nothing but whitespace around it), read with the body's
/// scanner as [`scan_fields`] reads them. For stream events: `None` where the scanner does not
/// decide (malformed JSON, a key with escapes, a repeated field, deep nesting), and the caller
/// then leaves the event to serde_json, which decides exactly as before.
pub(super) fn object_fields<'a>(
    src: &'a str,
    field: impl FnMut(&'a str, &'a str, bool) -> Option<u8>,
) -> Option<()> {
    let mut s = Scanner::new(src.as_bytes());
    s.ws();
    scan_fields(&mut s, src, field)?;
    s.ws();
    (s.pos() == src.len()).then_some(())
}

/// The token at `path` (keys of nested objects) in the JSON object `src`, with whether it is a
/// string with escapes. `None` when a key is missing, a value on the way is not an object, or
/// [`object_fields`] does not decide.
pub(super) fn scan_path<'a>(src: &'a str, path: &[&str]) -> Option<(&'a str, bool)> {
    let mut found = (src, false);
    for key in path {
        let mut hit = None;
        object_fields(found.0, |k, value, escaped| {
            if k != *key {
                return Some(0);
            }
            hit = Some((value, escaped));
            Some(1)
        })?;
        found = hit?;
    }
    Some(found)
}

/// A number token that is a plain non-negative integer, as `Value::as_u64` reads it; `None`
/// for anything else (fractions, exponents, signs, overflow).
pub(super) fn plain_u64(token: &str) -> Option<u64> {
    if token.bytes().all(|b| b.is_ascii_digit()) {
        token.parse().ok()
    } else {
        None
    }
}

/// A string token (`escaped`: it has escapes) to write out as serde_json writes its string:
/// copied through unless an escape is one serde_json writes differently. `None` for a token
/// that is not a string.
pub(super) fn string_text(token: &str, escaped: bool) -> Option<Text<'_>> {
    if !token.starts_with('"') {
        return None;
    }
    if !escaped || canonical_escapes(token.as_bytes()) {
        return Some(Text::Raw(Token(token)));
    }
    token_str(token, escaped).map(Text::Str)
}

/// The texts of content blocks (`src`, a JSON array) that each hold a `text` string (and
/// `"type":"text"` where `typed`); `None` for any other block or anything unusual.
pub(super) fn scan_text_blocks(src: &str, typed: bool) -> Option<Vec<Text<'_>>> {
    scan_array(src, |s, src| {
        let (block, _) = scan_value(s, src)?;
        let (mut text, mut is_text) = (None, !typed);
        object_fields(block, |key, value, escaped| match key {
            "text" => {
                text = Some(string_text(value, escaped)?);
                Some(1)
            }
            "type" if typed => {
                is_text = value == "\"text\"";
                Some(2)
            }
            _ => Some(0),
        })?;
        text.filter(|_| is_text)
    })
}

/// The one text of [`scan_text_blocks`] (`""` for none); `None` for several, which the
/// translators join after unescaping.
pub(super) fn single_text(blocks: Vec<Text<'_>>) -> Option<Text<'_>> {
    let mut blocks = blocks.into_iter();
    let text = blocks.next().unwrap_or(Text::Str(Cow::Borrowed("")));
    blocks.next().is_none().then_some(text)
}

/// A string or `null` (`Option<Cow<str>>`).
pub(super) fn opt_str(token: &str, escaped: bool) -> Option<Option<Cow<'_, str>>> {
    match token {
        "null" => Some(None),
        _ => token_str(token, escaped).map(Some),
    }
}

fn scan_message<'a>(s: &mut Scanner, src: &'a str) -> Option<InMessage<'a>> {
    let mut m = InMessage {
        role: Cow::Borrowed(""),
        content: None,
        tool_calls: None,
        tool_call_id: None,
        reasoning_content: None,
    };
    let mut has_role = false;
    scan_fields_at(s, src, |key, s| {
        if key == "tool_calls" {
            m.tool_calls = tool_calls_at(s, src)?;
            return Some(4);
        }
        let (value, escaped) = scan_value(s, src)?;
        Some(match key {
            "role" => {
                m.role = token_str(value, escaped)?;
                has_role = true;
                1
            }
            "content" => {
                m.content = match value.as_bytes()[0] {
                    b'n' => None,
                    b'"' => Some(string_content(value, escaped)?),
                    b'[' => Some(InContent::Parts(serde_json::from_str(value).ok()?)),
                    _ => return None,
                };
                2
            }
            "tool_call_id" => {
                m.tool_call_id = opt_str(value, escaped)?;
                8
            }
            "reasoning_content" => {
                m.reasoning_content = opt_str(value, escaped)?;
                16
            }
            _ => 0,
        })
    })?;
    has_role.then_some(m)
}

#[derive(Deserialize)]
pub(super) struct InPart<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    #[serde(default, borrow)]
    pub text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub image_url: Option<InImageUrl<'a>>,
    #[serde(default, borrow)]
    pub cache_control: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum InImageUrl<'a> {
    Object {
        #[serde(borrow)]
        url: Cow<'a, str>,
    },
    Url(#[serde(borrow)] Cow<'a, str>),
}

#[derive(Deserialize)]
pub(super) struct InToolCall<'a> {
    #[serde(borrow)]
    pub id: Cow<'a, str>,
    #[serde(borrow)]
    pub function: InFunction<'a>,
}

#[derive(Deserialize)]
pub(super) struct InFunction<'a> {
    #[serde(borrow)]
    pub name: Cow<'a, str>,
    #[serde(default, borrow)]
    pub arguments: Cow<'a, str>,
}

/// A JSON value of the client's body (its text, valid JSON: read by the scanner or by serde)
/// to copy through as it is. Unlike `&RawValue`, the scanner can make one without serde_json
/// checking the text a second time.
#[derive(Clone, Copy)]
pub(super) struct RawJson<'a>(&'a str);

impl RawJson<'static> {
    /// A JSON literal written in the code (which must be valid JSON).
    pub const fn literal(json: &'static str) -> Self {
        RawJson(json)
    }
}

impl RawJson<'_> {
    /// Appends the JSON text to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.0.as_bytes());
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for RawJson<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <&'de RawValue>::deserialize(d).map(|raw| RawJson(raw.get()))
    }
}

impl Serialize for RawJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Valid JSON by construction, so this parse (which serde needs to copy JSON text
        // through) cannot fail; translators write their bodies by hand and never pay for it.
        serde_json::from_str::<&RawValue>(self.0)
            .map_err(serde::ser::Error::custom)?
            .serialize(s)
    }
}

/// One OpenAI tool definition, borrowed; schemas and descriptions stay raw JSON.
#[derive(Deserialize)]
pub(super) struct InTool<'a> {
    #[serde(default, borrow)]
    pub function: Option<InToolFunction<'a>>,
    #[serde(default, borrow)]
    pub cache_control: Option<RawJson<'a>>,
}

#[derive(Deserialize)]
pub(super) struct InToolFunction<'a> {
    #[serde(default, borrow)]
    pub name: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub description: Option<RawJson<'a>>,
    #[serde(default, borrow)]
    pub parameters: Option<RawJson<'a>>,
}

/// The client's `tools` (`raw`, the field's JSON; absent or `null`: none) as [`InTool`]s:
/// read with the body's scanner where it can ([`scan_tool`]), else by serde, which gives any
/// error.
pub(super) fn read_tools(raw: Option<&str>) -> Result<Vec<InTool<'_>>, ApiError> {
    match raw {
        None | Some("null") => Ok(vec![]),
        Some(src) => match scan_array(src, scan_tool) {
            Some(tools) => Ok(tools),
            None => serde_json::from_str(src).map_err(|e| {
                bad(format!("Invalid request body: `tools`: {e}")).with_param("tools")
            }),
        },
    }
}

/// One tool at the scanner, as serde reads an [`InTool`]; `None` (serde decides) for anything
/// unusual: malformed JSON, repeated fields, wrong types.
fn scan_tool<'a>(s: &mut Scanner, src: &'a str) -> Option<InTool<'a>> {
    let mut tool = InTool {
        function: None,
        cache_control: None,
    };
    scan_fields_at(s, src, |key, s| {
        if key == "function" {
            tool.function = match s.peek()? {
                b'n' => s.literal(b"null").map(|_| None)?,
                _ => Some(scan_tool_function(s, src)?),
            };
            return Some(1);
        }
        let (value, _) = scan_value(s, src)?;
        if key != "cache_control" {
            return Some(0);
        }
        tool.cache_control = raw_json(value);
        Some(2)
    })?;
    Some(tool)
}

fn scan_tool_function<'a>(s: &mut Scanner, src: &'a str) -> Option<InToolFunction<'a>> {
    let mut f = InToolFunction {
        name: None,
        description: None,
        parameters: None,
    };
    scan_fields_at(s, src, |key, s| {
        let (value, escaped) = scan_value(s, src)?;
        Some(match key {
            "name" => {
                f.name = opt_str(value, escaped)?;
                1
            }
            "description" => {
                f.description = raw_json(value);
                2
            }
            "parameters" => {
                f.parameters = raw_json(value);
                4
            }
            _ => 0,
        })
    })?;
    Some(f)
}

/// A value token as serde reads an `Option<RawJson>`: `null` is `None`.
fn raw_json(token: &str) -> Option<RawJson<'_>> {
    (token != "null").then_some(RawJson(token))
}

/// A request authenticated with `Authorization: Bearer <api_key>` (when the deployment has a
/// key) plus the deployment's extra headers.
pub(super) fn bearer_request(
    d: &sluice_config::Deployment,
    path: &str,
    body: Vec<u8>,
) -> super::UpstreamRequest {
    let mut headers = Vec::with_capacity(1 + d.extra_headers.len());
    if let Some(k) = &d.api_key {
        headers.push(("authorization".to_string(), format!("Bearer {k}")));
    }
    headers.extend(d.extra_headers.iter().cloned());
    super::UpstreamRequest {
        path: path.into(),
        headers,
        body,
        injected_stream_usage: false,
    }
}

/// Seconds since the epoch, for `created`.
pub(super) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// OpenAI's `usage` object.
pub(super) fn usage_json(u: &Usage) -> Value {
    json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens})
}

/// Token counts of providers that report prompt caching apart from fresh input (Anthropic,
/// Bedrock): OpenAI counts all of it as prompt tokens and names the cached part.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct CachedUsage {
    pub input: u64,
    pub output: u64,
    pub cache_read: u64,
    pub cache_write: u64,
}

impl CachedUsage {
    pub fn prompt(&self) -> u64 {
        self.input + self.cache_read + self.cache_write
    }

    /// OpenAI's `usage` object with the cache details LiteLLM adds.
    pub fn openai(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt(),
            "completion_tokens": self.output,
            "total_tokens": self.prompt() + self.output,
            "prompt_tokens_details": {"cached_tokens": self.cache_read},
            "cache_creation_input_tokens": self.cache_write,
            "cache_read_input_tokens": self.cache_read,
        })
    }

    pub fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt(),
            completion_tokens: self.output,
            total_tokens: self.prompt() + self.output,
        }
    }
}

/// One choice of a whole chat completion whose message is plain assistant text.
pub(super) struct TextChoice<'a> {
    pub index: u64,
    pub content: Text<'a>,
    pub finish_reason: &'static str,
}

/// Writes an OpenAI `chat.completion` of [`TextChoice`]s, byte for byte as serde_json writes
/// the `json!` object the translators build for it (serde_json's maps sort their keys).
pub(super) fn write_text_completion(
    out: &mut Vec<u8>,
    id: &Text,
    model: &str,
    choices: &[TextChoice],
    usage: &Value,
) {
    out.extend_from_slice(b"{\"choices\":[");
    for (i, c) in choices.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"finish_reason\":");
        serde_json::to_writer(&mut *out, c.finish_reason).expect("strings serialize");
        out.extend_from_slice(b",\"index\":");
        serde_json::to_writer(&mut *out, &c.index).expect("numbers serialize");
        out.extend_from_slice(b",\"message\":{\"content\":");
        c.content.write(out);
        out.extend_from_slice(b",\"role\":\"assistant\"}}");
    }
    out.extend_from_slice(b"],\"created\":");
    serde_json::to_writer(&mut *out, &now()).expect("numbers serialize");
    out.extend_from_slice(b",\"id\":");
    id.write(out);
    out.extend_from_slice(b",\"model\":");
    serde_json::to_writer(&mut *out, model).expect("strings serialize");
    out.extend_from_slice(b",\"object\":\"chat.completion\",\"usage\":");
    serde_json::to_writer(&mut *out, usage).expect("json serializes");
    out.push(b'}');
}

/// Writes OpenAI `chat.completion.chunk` SSE events. The part that stays the same for a whole
/// stream (id, created, model) is serialized once, not per chunk.
#[derive(Debug, Default, Clone)]
pub(super) struct ChunkWriter {
    /// `data: {"id":…,"object":"chat.completion.chunk","created":…,"model":…,"choices":[`
    head: Vec<u8>,
}

impl ChunkWriter {
    pub fn new(id: &str, created: u64, model: &str) -> Self {
        Self::with_object(id, created, model, "chat.completion.chunk")
    }

    /// For another `object` (`text_completion` streams).
    pub fn with_object(id: &str, created: u64, model: &str, object: &str) -> Self {
        let mut head = Vec::with_capacity(96 + id.len() + model.len());
        head.extend_from_slice(b"data: {\"id\":");
        serde_json::to_writer(&mut head, id).expect("strings serialize");
        head.extend_from_slice(b",\"object\":");
        serde_json::to_writer(&mut head, object).expect("strings serialize");
        head.extend_from_slice(b",\"created\":");
        head.extend_from_slice(created.to_string().as_bytes());
        head.extend_from_slice(b",\"model\":");
        serde_json::to_writer(&mut head, model).expect("strings serialize");
        head.extend_from_slice(b",\"choices\":[");
        ChunkWriter { head }
    }

    /// One event with a single choice delta.
    pub fn delta(&self, out: &mut Vec<u8>, index: u64, delta: &Value, finish: Option<&str>) {
        self.open(out, index);
        serde_json::to_writer(&mut *out, delta).expect("json serializes");
        Self::close(out, finish);
    }

    /// Starts an event of choice `index`, up to its delta (written next by the caller, then
    /// [`ChunkWriter::close`]).
    pub fn open(&self, out: &mut Vec<u8>, index: u64) {
        out.extend_from_slice(&self.head);
        out.extend_from_slice(b"{\"index\":");
        if index < 10 {
            out.push(b'0' + index as u8);
        } else {
            serde_json::to_writer(&mut *out, &index).expect("numbers serialize");
        }
        out.extend_from_slice(b",\"delta\":");
    }

    /// Ends an event after its delta.
    pub fn close(out: &mut Vec<u8>, finish: Option<&str>) {
        out.extend_from_slice(b",\"finish_reason\":");
        match finish {
            Some(f) => serde_json::to_writer(&mut *out, f).expect("strings serialize"),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b"}]}\n\n");
    }

    /// One event of choice 0 whose delta is `{"<key>": text}` (`key` needs no escaping), as
    /// `delta` writes `json!({key: text})`.
    pub fn text_delta(&self, out: &mut Vec<u8>, key: &str, text: &Text) {
        self.open(out, 0);
        out.extend_from_slice(b"{\"");
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(b"\":");
        text.write(out);
        out.push(b'}');
        Self::close(out, None);
    }

    /// One event of choice 0 with a streamed tool call's arguments, as `delta` writes
    /// `json!({"tool_calls": [{"index": call, "function": {"arguments": arguments}}]})`
    /// (serde_json's maps sort their keys).
    pub fn arguments_delta(&self, out: &mut Vec<u8>, call: usize, arguments: &Text) {
        self.open(out, 0);
        out.extend_from_slice(b"{\"tool_calls\":[{\"function\":{\"arguments\":");
        arguments.write(out);
        out.extend_from_slice(b"},\"index\":");
        serde_json::to_writer(&mut *out, &call).expect("numbers serialize");
        out.extend_from_slice(b"}]}");
        Self::close(out, None);
    }

    /// One event with a whole choice object (text completions carry `text`, not `delta`).
    pub fn choice(&self, out: &mut Vec<u8>, choice: &Value) {
        self.open_choice(out);
        serde_json::to_writer(&mut *out, choice).expect("json serializes");
        Self::close_choice(out);
    }

    /// Starts an event, up to its choice object (written next by the caller, then
    /// [`ChunkWriter::close_choice`]).
    pub fn open_choice(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.head);
    }

    /// Ends an event after its choice object.
    pub fn close_choice(out: &mut Vec<u8>) {
        out.extend_from_slice(b"]}\n\n");
    }

    /// The closing event that carries usage and no choices.
    pub fn usage(&self, out: &mut Vec<u8>, usage: &Value) {
        out.extend_from_slice(&self.head);
        out.extend_from_slice(b"],\"usage\":");
        serde_json::to_writer(&mut *out, usage).expect("json serializes");
        out.extend_from_slice(b"}\n\n");
    }
}

/// For tests: a translated response with `created` removed, and `id` too when `generated`
/// (ids made up per call), re-serialized to compare two translations.
#[cfg(test)]
pub(super) fn comparable(body: &[u8], generated: bool) -> String {
    let mut v: Value = serde_json::from_slice(body).expect("a translation is JSON");
    let object = v.as_object_mut().expect("an object");
    object.remove("created");
    if generated {
        object.remove("id");
    }
    serde_json::to_string(&v).expect("json serializes")
}

/// Appends `value` as JSON.
pub(crate) fn write_json<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    serde_json::to_writer(&mut *out, value).expect("json serializes");
}

/// Appends `[item, …]`, each item written by `write`.
pub(crate) fn write_list<I: IntoIterator>(
    out: &mut Vec<u8>,
    items: I,
    mut write: impl FnMut(&mut Vec<u8>, I::Item),
) {
    out.push(b'[');
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write(out, item);
    }
    out.push(b']');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_tool_calls_as_serde_does() {
        let src = r#"[{"id":"c1","type":"function","function":{"name":"f","arguments":"{\"a\":1}"}},
            {"function":{"arguments":"","name":"g\u00e9"},"id":"c\"2"}, {"id":"c3","function":{"name":"h"}}]"#;
        let scanned = scan_tool_calls(src).expect("scans");
        let serde: Vec<InToolCall> = serde_json::from_str(src).unwrap();
        assert_eq!(scanned.len(), serde.len());
        for (a, b) in scanned.iter().zip(&serde) {
            assert_eq!(a.id, b.id);
            assert_eq!(a.function.name, b.function.name);
            assert_eq!(a.function.arguments, b.function.arguments);
        }
        // Left to serde: repeated fields, wrong types, missing fields.
        for odd in [
            r#"[{"id":"a","id":"b","function":{"name":"f"}}]"#,
            r#"[{"id":1,"function":{"name":"f"}}]"#,
            r#"[{"id":"a","function":{"arguments":"{}"}}]"#,
            r#"[{"function":{"name":"f"}}]"#,
            r#"[{"id":"a","function":{"name":"f","arguments":null}}]"#,
        ] {
            assert!(scan_tool_calls(odd).is_none(), "{odd}");
        }
    }

    #[test]
    fn unescapes_as_serde_json_does() {
        for token in [
            r#""plain""#,
            r#""a\"b\\c\/d\be\ff\ng\rh\ti""#,
            r#""\\""#,
            r#""h\u00e9 \ud83d\ude00 \n""#,
            r#""x\u0041""#,
            r#""\ud800""#,
        ] {
            let serde = serde_json::from_str::<String>(token).ok();
            assert_eq!(unescape(token), serde, "{token}");
        }
        assert_eq!(token_str(r#""a\nb""#, true).unwrap(), "a\nb");
    }

    #[test]
    fn string_content_reads_and_writes_as_serde_json_does() {
        for (token, kept) in [
            (r#""plain""#, false),
            (r#""{\"flight\":\"NW218\"}\n\ttab \\ done""#, true),
            (r#""caf\u00e9""#, false),
            (r#""slash \/""#, false),
            (r#""bell \u0007""#, true),
        ] {
            let escaped = token.contains('\\');
            let content: InContent = string_content(token, escaped).unwrap();
            assert_eq!(matches!(content, InContent::Token(_)), kept, "{token}");
            let string: String = serde_json::from_str(token).unwrap();
            assert_eq!(content.as_str().unwrap(), string, "{token}");
            let mut written = vec![];
            content.as_text(token).unwrap().write(&mut written);
            assert_eq!(written, serde_json::to_vec(&string).unwrap(), "{token}");
        }
    }

    #[test]
    fn tools_scan_as_serde_reads_them() {
        type Seen<'a> = Vec<(
            Option<String>,
            Option<&'a str>,
            Option<&'a str>,
            Option<&'a str>,
        )>;
        fn seen<'a>(tools: &[InTool<'a>]) -> Seen<'a> {
            tools
                .iter()
                .map(|t| {
                    let f = t.function.as_ref();
                    (
                        f.and_then(|f| f.name.as_deref().map(str::to_string)),
                        f.and_then(|f| f.description.map(|d| d.0)),
                        f.and_then(|f| f.parameters.map(|p| p.0)),
                        t.cache_control.map(|c| c.0),
                    )
                })
                .collect()
        }
        for src in [
            r#"[]"#,
            r#"[{"type": "function", "function": {"name": "get_w\u0065ather", "description": "Look \"up\" weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]"#,
            r#"[{"type":"function","function":{"name":"f","parameters":null,"strict":true},"cache_control":{"type":"ephemeral"}},{"function":null},{}]"#,
            r#"[{"function":{"name":null,"description":null}, "cache_control": null}]"#,
        ] {
            let scanned = scan_array(src, scan_tool).unwrap_or_else(|| panic!("{src}"));
            let serde: Vec<InTool> = serde_json::from_str(src).unwrap();
            assert_eq!(seen(&scanned), seen(&serde), "{src}");
        }
        for odd in [
            r#"[{"function":{"name":"f"},"function":{"name":"g"}}]"#,
            r#"[{"function":"f"}]"#,
            r#"[{"function":{"name":1}}]"#,
            r#"[{"function":{"name":"f","parameters":{"a":}}}]"#,
            r#"{"function":{"name":"f"}}"#,
        ] {
            assert!(scan_array(odd, scan_tool).is_none(), "{odd}");
            assert!(read_tools(Some(odd)).is_err(), "{odd}");
        }
    }

    #[test]
    fn chunk_writer_emits_valid_chunks() {
        let w = ChunkWriter::new("id-\"1", 7, "m");
        let mut out = vec![];
        w.delta(&mut out, 0, &json!({"content": "hé"}), None);
        w.delta(&mut out, 0, &json!({}), Some("stop"));
        w.usage(&mut out, &json!({"total_tokens": 3}));
        let text = String::from_utf8(out).unwrap();
        let events: Vec<Value> = text
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        assert_eq!(events.len(), 3);
        assert_eq!(events[0]["id"], "id-\"1");
        assert_eq!(events[0]["choices"][0]["delta"]["content"], "hé");
        assert_eq!(events[0]["choices"][0]["finish_reason"], Value::Null);
        assert_eq!(events[1]["choices"][0]["finish_reason"], "stop");
        assert_eq!(events[2]["choices"], json!([]));
        assert_eq!(events[2]["usage"]["total_tokens"], 3);
        assert_eq!(events[2]["object"], "chat.completion.chunk");
    }
}
