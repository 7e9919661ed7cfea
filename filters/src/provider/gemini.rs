//! Google Gemini (`generativelanguage.googleapis.com/v1beta`) and Vertex AI (the same bodies
//! under `/v1/projects/{p}/locations/{l}/publishers/google/models/{m}`): OpenAI chat requests
//! become `generateContent` bodies (system prompt lifted to `systemInstruction`, tools to
//! `functionDeclarations`, tool results to `functionResponse` parts), embeddings become
//! `batchEmbedContents` (Gemini) or `predict` (Vertex) calls, and responses and SSE streams come
//! back in OpenAI's shape.
//!
//! Gemini attaches a `thoughtSignature` to function calls of thinking models and rejects a later
//! turn that sends the call back without it. The signature travels inside the OpenAI tool call
//! id (`call_0__thought__<signature>`), as LiteLLM does, and is restored on the next request.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use sluice_config::Deployment;

use super::common::{
    bad, canonical_escapes, now, object_fields, opt_str, parse_field, plain_u64, scan_array,
    scan_fields_at, scan_value, string_content, string_text, text, token_str, tool_calls_at, utf8,
    write_json, write_list, write_text_completion, ChunkWriter, InContent, InToolCall, Text,
    TextChoice,
};
use super::{unsupported_params, CallOptions, Operation, UpstreamRequest};
use crate::body::{RequestBody, Scanner};
use crate::classify::{classify_status, FailureKind};
use crate::error::ApiError;
use crate::sse::{event_data, SseSplitter};
use crate::usage::Usage;

/// LiteLLM's Vertex region when a deployment names none.
pub const DEFAULT_VERTEX_LOCATION: &str = "us-central1";
/// Separates a tool call id from the thought signature Gemini gave the call.
const THOUGHT_SEP: &str = "__thought__";

/// OpenAI parameters Gemini has no equivalent for (besides `parallel_tool_calls: false`,
/// `logprobs: true` and non-text `modalities`, checked by value).
const UNSUPPORTED: &[&str] = &[
    "logit_bias",
    "top_logprobs",
    "service_tier",
    "prediction",
    "audio",
];

/// One OpenAI chat message, borrowed from the client's body (`name` names a legacy function
/// result, which the shared `InMessage` does not carry).
#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow)]
    role: Cow<'a, str>,
    #[serde(default, borrow)]
    content: Option<Content<'a>>,
    #[serde(default, borrow)]
    name: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    tool_calls: Option<Vec<InToolCall<'a>>>,
    #[serde(default, borrow)]
    tool_call_id: Option<Cow<'a, str>>,
}

/// Message content: a string or a list of OpenAI parts.
type Content<'a> = InContent<'a, ContentPart<'a>>;

/// One OpenAI content part (text, image, audio or file).
#[derive(Deserialize)]
struct ContentPart<'a> {
    #[serde(rename = "type", default, borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    image_url: Option<ImageUrl<'a>>,
    #[serde(default, borrow)]
    input_audio: Option<InputAudio<'a>>,
    #[serde(default, borrow)]
    file: Option<InputFile<'a>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ImageUrl<'a> {
    Object {
        #[serde(default, borrow)]
        url: Option<Cow<'a, str>>,
        #[serde(default, borrow)]
        format: Option<Cow<'a, str>>,
    },
    Url(#[serde(borrow)] Cow<'a, str>),
}

#[derive(Deserialize)]
struct InputAudio<'a> {
    #[serde(default, borrow)]
    data: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    format: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct InputFile<'a> {
    #[serde(default, borrow)]
    format: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    file_data: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    file_id: Option<Cow<'a, str>>,
}

/// One Gemini `Part`. Parts and turns are written out by hand ([`Part::write`]): they are most
/// of a request, and serde_json would escape every key and write every piece apart.
enum Part<'a> {
    /// `{"text": …}`
    Text { text: Text<'a> },
    /// `{"inlineData": {"mimeType": …, "data": …}}`
    InlineData {
        mime_type: Cow<'a, str>,
        data: &'a str,
    },
    /// `{"fileData": {"mimeType": …, "fileUri": …}}`
    FileData {
        mime_type: &'a str,
        file_uri: &'a str,
    },
    /// `{"functionCall": {"name": …, "args": …}, "thoughtSignature": …}`
    FunctionCall {
        name: &'a str,
        args: &'a RawValue,
        thought_signature: Option<&'a str>,
    },
    /// `{"functionResponse": {"name": …, "response": {"content": …}}}`
    FunctionResponse { name: &'a str, content: Text<'a> },
}

/// One Gemini `Content` (a turn): `{"role": …, "parts": […]}`.
struct Turn<'a> {
    role: &'static str,
    parts: Vec<Part<'a>>,
}

/// `s` as a JSON string.
fn write_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("strings serialize");
}

/// Writes a JSON object: `{`, each field as `"key":` and its value with commas between, `}`.
struct ObjectWriter<'o> {
    out: &'o mut Vec<u8>,
    empty: bool,
}

impl<'o> ObjectWriter<'o> {
    fn new(out: &'o mut Vec<u8>) -> Self {
        out.push(b'{');
        ObjectWriter { out, empty: true }
    }

    /// Starts a field; `key` is a plain name (written as it is, nothing to escape). The value
    /// goes into the output returned.
    fn field(&mut self, key: &str) -> &mut Vec<u8> {
        if !self.empty {
            self.out.push(b',');
        }
        self.empty = false;
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
        self.out
    }

    fn end(self) {
        self.out.push(b'}');
    }
}

impl Part<'_> {
    fn is_function_response(&self) -> bool {
        matches!(self, Part::FunctionResponse { .. })
    }

    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Part::Text { text } => {
                out.extend_from_slice(b"{\"text\":");
                text.write(out);
                out.push(b'}');
            }
            Part::InlineData { mime_type, data } => {
                out.extend_from_slice(b"{\"inlineData\":{\"mimeType\":");
                write_str(out, mime_type);
                out.extend_from_slice(b",\"data\":");
                write_str(out, data);
                out.extend_from_slice(b"}}");
            }
            Part::FileData {
                mime_type,
                file_uri,
            } => {
                out.extend_from_slice(b"{\"fileData\":{\"mimeType\":");
                write_str(out, mime_type);
                out.extend_from_slice(b",\"fileUri\":");
                write_str(out, file_uri);
                out.extend_from_slice(b"}}");
            }
            Part::FunctionCall {
                name,
                args,
                thought_signature,
            } => {
                out.extend_from_slice(b"{\"functionCall\":{\"name\":");
                write_str(out, name);
                out.extend_from_slice(b",\"args\":");
                out.extend_from_slice(args.get().as_bytes());
                out.push(b'}');
                if let Some(signature) = thought_signature {
                    out.extend_from_slice(b",\"thoughtSignature\":");
                    write_str(out, signature);
                }
                out.push(b'}');
            }
            Part::FunctionResponse { name, content } => {
                out.extend_from_slice(b"{\"functionResponse\":{\"name\":");
                write_str(out, name);
                out.extend_from_slice(b",\"response\":{\"content\":");
                content.write(out);
                out.extend_from_slice(b"}}}");
            }
        }
    }
}

/// `[part, …]`
fn write_parts(out: &mut Vec<u8>, parts: &[Part]) {
    write_list(out, parts, |out, part| part.write(out));
}

impl Turn<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        // Roles are plain words: nothing to escape.
        out.extend_from_slice(b"{\"role\":\"");
        out.extend_from_slice(self.role.as_bytes());
        out.extend_from_slice(b"\",\"parts\":");
        write_parts(out, &self.parts);
        out.push(b'}');
    }
}

/// A text part; `src` is the client's JSON that `s` was read from (see [`text`]).
fn text_part<'a>(src: &'a str, s: &'a str) -> Part<'a> {
    Part::Text { text: text(src, s) }
}

/// OpenAI message content (a string or a list of parts) as Gemini parts.
fn content_parts<'a>(src: &'a str, m: &'a Message<'a>) -> Result<Vec<Part<'a>>, ApiError> {
    match &m.content {
        None => Ok(vec![]),
        Some(Content::Parts(parts)) => {
            let mut out = Vec::with_capacity(parts.len());
            for p in parts {
                out.extend(part(src, p)?);
            }
            Ok(out)
        }
        Some(string) => Ok(string
            .as_text(src)
            .filter(|t| !t.is_empty())
            .map(|text| Part::Text { text })
            .into_iter()
            .collect()),
    }
}

fn part<'a>(src: &'a str, p: &'a ContentPart<'a>) -> Result<Option<Part<'a>>, ApiError> {
    match p.kind.as_deref() {
        Some("text") => {
            let text = p.text.as_deref().unwrap_or("");
            Ok((!text.is_empty()).then(|| text_part(src, text)))
        }
        Some("image_url") => {
            let (url, format) = match &p.image_url {
                Some(ImageUrl::Object {
                    url: Some(url),
                    format,
                }) => (url, format.as_deref()),
                Some(ImageUrl::Url(url)) => (url, None),
                _ => return Err(bad("image_url part without a url")),
            };
            Ok(Some(media_part(url, format)?))
        }
        Some("input_audio") => {
            let audio = p.input_audio.as_ref();
            let data = audio
                .and_then(|a| a.data.as_deref())
                .ok_or_else(|| bad("input_audio part without data"))?;
            let format = audio.and_then(|a| a.format.as_deref()).unwrap_or("wav");
            Ok(Some(Part::InlineData {
                mime_type: Cow::Owned(format!("audio/{format}")),
                data,
            }))
        }
        Some("file") => {
            let file = p.file.as_ref();
            let format = file.and_then(|f| f.format.as_deref());
            let url = file
                .and_then(|f| f.file_data.as_deref().or(f.file_id.as_deref()))
                .ok_or_else(|| bad("file part without file_data or file_id"))?;
            Ok(Some(media_part(url, format)?))
        }
        Some(other) => Err(bad(format!(
            "Unsupported content part type for Gemini: {other}"
        ))),
        None => Err(bad("A content part has no `type`")),
    }
}

/// A data URL becomes `inlineData`; any other URL (`https://`, `gs://`, a Files API URI)
/// becomes `fileData`, which needs a MIME type: the one given, else one guessed from the path.
fn media_part<'a>(url: &'a str, mime: Option<&'a str>) -> Result<Part<'a>, ApiError> {
    if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest
            .split_once(',')
            .ok_or_else(|| bad("Malformed data URL in image_url"))?;
        let media_type = meta
            .strip_suffix(";base64")
            .ok_or_else(|| bad("image data URLs must be base64"))?;
        Ok(Part::InlineData {
            mime_type: Cow::Borrowed(mime.unwrap_or(media_type)),
            data,
        })
    } else {
        Ok(Part::FileData {
            mime_type: mime.unwrap_or_else(|| guess_mime(url)),
            file_uri: url,
        })
    }
}

fn guess_mime(url: &str) -> &'static str {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let ext = path
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "png" => "image/png",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "heic" => "image/heic",
        "heif" => "image/heif",
        "pdf" => "application/pdf",
        "txt" => "text/plain",
        "mp3" => "audio/mp3",
        "wav" => "audio/wav",
        "flac" => "audio/flac",
        "mp4" => "video/mp4",
        "mov" => "video/mov",
        "webm" => "video/webm",
        _ => "image/jpeg",
    }
}

/// A message's text to write out: its string content, or its text parts joined by newlines
/// (`src`: see [`text`]).
fn content_text<'a>(src: &'a str, content: &'a Option<Content<'a>>) -> Text<'a> {
    match content {
        Some(Content::Parts(parts)) => {
            let mut texts = parts.iter().filter_map(|p| p.text.as_deref());
            match (texts.next(), texts.next()) {
                (None, _) => Text::Str(Cow::Borrowed("")),
                (Some(one), None) => text(src, one),
                (Some(first), Some(second)) => {
                    let mut joined = format!("{first}\n{second}");
                    for t in texts {
                        joined.push('\n');
                        joined.push_str(t);
                    }
                    Text::Str(Cow::Owned(joined))
                }
            }
        }
        Some(string) => string.as_text(src).unwrap_or(Text::Str(Cow::Borrowed(""))),
        None => Text::Str(Cow::Borrowed("")),
    }
}

fn is_function_responses(parts: &[Part]) -> bool {
    parts.iter().all(Part::is_function_response)
}

/// Appends parts as a turn of `role`, merging with the previous turn of the same role, but
/// keeping a turn of function responses apart from ordinary user text (Gemini matches function
/// responses to the calls of the turn before).
fn push_turn<'a>(contents: &mut Vec<Turn<'a>>, role: &'static str, parts: Vec<Part<'a>>) {
    if parts.is_empty() {
        return;
    }
    if let Some(last) = contents.last_mut() {
        if last.role == role && is_function_responses(&last.parts) == is_function_responses(&parts)
        {
            last.parts.extend(parts);
            return;
        }
    }
    contents.push(Turn { role, parts });
}

/// Splits a tool call id into the id and the thought signature carried inside it.
fn split_call_id(id: &str) -> (&str, Option<&str>) {
    // A searcher built once: `str::split_once` sets one up for every id.
    static SEP: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(THOUGHT_SEP));
    match SEP.find(id.as_bytes()) {
        Some(at) if at + THOUGHT_SEP.len() < id.len() => {
            (&id[..at], Some(&id[at + THOUGHT_SEP.len()..]))
        }
        _ => (id, None),
    }
}

/// `{}`, the arguments of a call that has none.
fn empty_args() -> &'static RawValue {
    static EMPTY: std::sync::OnceLock<Box<RawValue>> = std::sync::OnceLock::new();
    EMPTY.get_or_init(|| RawValue::from_string("{}".to_string()).expect("valid JSON"))
}

/// The messages (`src`, the JSON of the `messages` field) read directly, without serde, for the
/// common shapes: the same values serde would give (strings borrowed unless they have escapes),
/// except that string content with escapes is kept as its token when serde_json would write it
/// back the same ([`InContent::Token`]), saving an unescape and an escape. `None` (serde
/// decides, and gives any error) for anything else: malformed JSON, keys with escapes,
/// repeated fields, wrong types, a missing role.
fn read_messages(src: &str) -> Option<Vec<Message<'_>>> {
    scan_array(src, read_message)
}

fn read_message<'a>(s: &mut Scanner, src: &'a str) -> Option<Message<'a>> {
    let mut m = Message {
        role: Cow::Borrowed(""),
        content: None,
        name: None,
        tool_calls: None,
        tool_call_id: None,
    };
    let mut has_role = false;
    scan_fields_at(s, src, |key, s| {
        if key == "tool_calls" {
            m.tool_calls = tool_calls_at(s, src)?;
            return Some(8);
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
                    b'[' => Some(Content::Parts(serde_json::from_str(value).ok()?)),
                    _ => return None,
                };
                2
            }
            "name" => {
                m.name = opt_str(value, escaped)?;
                4
            }
            "tool_call_id" => {
                m.tool_call_id = opt_str(value, escaped)?;
                16
            }
            _ => 0,
        })
    })?;
    has_role.then_some(m)
}

type Converted<'a> = (Vec<Part<'a>>, Vec<Turn<'a>>);

/// `raw` are the messages parsed from `src`.
fn convert_messages<'a>(src: &'a str, raw: &'a [Message<'a>]) -> Result<Converted<'a>, ApiError> {
    let mut system = vec![];
    let mut contents: Vec<Turn> = Vec::with_capacity(raw.len());
    // (tool call id, function name), for the `functionResponse` parts of tool messages. A tool
    // message answers one of the latest calls, so a list searched from its end (where a
    // repeated id names its latest call, as a map would) beats hashing every id.
    let mut names: Vec<(&str, &str)> = Vec::new();
    for m in raw {
        match m.role.as_ref() {
            "system" | "developer" => {
                let text = content_text(src, &m.content);
                if !text.is_empty() {
                    system.push(Part::Text { text });
                }
            }
            "user" => push_turn(&mut contents, "user", content_parts(src, m)?),
            "assistant" => {
                let mut parts = content_parts(src, m)?;
                for call in m.tool_calls.iter().flatten() {
                    let args = call.function.arguments.trim();
                    let args: &RawValue = if args.is_empty() {
                        empty_args()
                    } else {
                        serde_json::from_str(args).map_err(|e| {
                            bad(format!(
                                "tool_calls arguments of {} are not JSON: {e}",
                                call.id
                            ))
                        })?
                    };
                    let (_, signature) = split_call_id(&call.id);
                    parts.push(Part::FunctionCall {
                        name: &call.function.name,
                        args,
                        thought_signature: signature,
                    });
                    names.push((&call.id, &call.function.name));
                }
                push_turn(&mut contents, "model", parts);
            }
            "tool" | "function" => {
                let name = m
                    .tool_call_id
                    .as_deref()
                    .and_then(|id| names.iter().rev().find(|(call, _)| *call == id))
                    .map(|&(_, name)| name)
                    .or(m.name.as_deref())
                    .ok_or_else(|| {
                        bad(format!(
                            "A tool message's tool_call_id ({}) matches no earlier assistant tool call",
                            m.tool_call_id.as_deref().unwrap_or("missing")
                        ))
                        .with_param("messages")
                    })?;
                push_turn(
                    &mut contents,
                    "user",
                    vec![Part::FunctionResponse {
                        name,
                        content: content_text(src, &m.content),
                    }],
                );
            }
            other => {
                return Err(bad(format!("Invalid message role: {other}")).with_param("messages"))
            }
        }
    }
    if contents.is_empty() && !system.is_empty() {
        // Gemini needs at least one content; a system-only conversation is sent as the user's.
        contents.push(Turn {
            role: "user",
            parts: std::mem::take(&mut system),
        });
    }
    Ok((system, contents))
}

/// JSON borrowed from the client's body, for the schemas that are cleaned on the way through
/// (a `Value` would copy every key and string). Objects keep their order; of repeated keys the
/// last wins.
enum Json<'a> {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    Str(Cow<'a, str>),
    Array(Vec<Json<'a>>),
    Object(Vec<(Cow<'a, str>, Json<'a>)>),
}

/// The value of `key` in an object's entries.
fn find<'v, 'a>(entries: &'v [(Cow<'a, str>, Json<'a>)], key: &str) -> Option<&'v Json<'a>> {
    entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

impl<'a> Json<'a> {
    fn get(&self, key: &str) -> Option<&Json<'a>> {
        match self {
            Json::Object(entries) => find(entries, key),
            _ => None,
        }
    }

    fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }

    fn as_object(&self) -> Option<&[(Cow<'a, str>, Json<'a>)]> {
        match self {
            Json::Object(entries) => Some(entries),
            _ => None,
        }
    }
}

/// A string that borrows from the input when it has no escapes.
struct Str<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = Str<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(V(std::marker::PhantomData))
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Json<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = Json<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("JSON")
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Json::Null)
            }
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok(Json::Null)
            }
            fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
                Ok(Json::Bool(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Json::Number(v.into()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
                Ok(Json::Number(v.into()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
                Ok(serde_json::Number::from_f64(v).map_or(Json::Null, Json::Number))
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Json::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Json::Str(Cow::Owned(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Json::Str(Cow::Owned(v)))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Json::Array(items))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut entries: Vec<(Cow<'a, str>, Json<'a>)> =
                    Vec::with_capacity(map.size_hint().unwrap_or(4));
                while let Some(Str(key)) = map.next_key::<Str<'a>>()? {
                    let value = map.next_value()?;
                    match entries.iter_mut().find(|(k, _)| *k == key) {
                        Some(slot) => slot.1 = value,
                        None => entries.push((key, value)),
                    }
                }
                Ok(Json::Object(entries))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// One JSON value at the scanner as [`Json`]: the value serde gives (strings borrowed unless
/// escaped, the last of repeated keys in the first one's place). `None` (serde decides) for
/// malformed JSON, numbers serde_json cannot hold, deep nesting.
fn scan_json_value<'a>(s: &mut Scanner, src: &'a str, depth: u32) -> Option<Json<'a>> {
    if depth == 64 {
        return None;
    }
    let start = s.pos();
    match s.peek()? {
        b'"' => {
            s.eat(b'"');
            let escaped = s.string()?;
            Some(Json::Str(token_str(&src[start..s.pos()], escaped)?))
        }
        b'{' => {
            s.eat(b'{');
            s.ws();
            let mut entries: Vec<(Cow<'a, str>, Json<'a>)> = Vec::with_capacity(4);
            if !s.eat(b'}') {
                loop {
                    let at = s.pos();
                    s.eat(b'"').then_some(())?;
                    let escaped = s.string()?;
                    let key = token_str(&src[at..s.pos()], escaped)?;
                    s.ws();
                    s.eat(b':').then_some(())?;
                    s.ws();
                    let value = scan_json_value(s, src, depth + 1)?;
                    match entries.iter_mut().find(|(k, _)| *k == key) {
                        Some(slot) => slot.1 = value,
                        None => entries.push((key, value)),
                    }
                    s.ws();
                    if s.eat(b'}') {
                        break;
                    }
                    s.eat(b',').then_some(())?;
                    s.ws();
                }
            }
            Some(Json::Object(entries))
        }
        b'[' => {
            s.eat(b'[');
            s.ws();
            let mut items = Vec::new();
            if !s.eat(b']') {
                loop {
                    items.push(scan_json_value(s, src, depth + 1)?);
                    s.ws();
                    if s.eat(b']') {
                        break;
                    }
                    s.eat(b',').then_some(())?;
                    s.ws();
                }
            }
            Some(Json::Array(items))
        }
        _ => {
            s.value()?;
            match &src[start..s.pos()] {
                "true" => Some(Json::Bool(true)),
                "false" => Some(Json::Bool(false)),
                "null" => Some(Json::Null),
                number => number.parse().ok().map(Json::Number),
            }
        }
    }
}

/// The client's `tools` (`src`, their JSON) read in one pass with the body's scanner, when
/// every entry is a function tool: what serde reads as `ToolIn<Json>`. `None` (serde decides)
/// for anything else: Gemini's own tools, malformed JSON, repeated fields, wrong types.
fn scan_function_tools(src: &str) -> Option<Vec<ToolIn<'_, Params<'_>>>> {
    let mut s = Scanner::new(src.as_bytes());
    s.ws();
    s.eat(b'[').then_some(())?;
    s.ws();
    let mut out = Vec::with_capacity(2);
    if !s.eat(b']') {
        loop {
            let function = scan_object(&mut s, src, |s, key| match key {
                "function" => Some(1),
                "googleSearch" | "googleSearchRetrieval" | "codeExecution" | "urlContext" => None,
                _ => {
                    scan_value(s, src)?;
                    Some(0)
                }
            })?;
            out.push(ToolIn {
                function: Some(function?),
                google_search: None,
                google_search_retrieval: None,
                code_execution: None,
                url_context: None,
            });
            s.ws();
            if s.eat(b']') {
                break;
            }
            s.eat(b',').then_some(())?;
            s.ws();
        }
    }
    s.ws();
    (s.pos() == src.len()).then_some(out)
}

/// A tool object at the scanner: `field(scanner, key)` reads or skips each value and gives
/// its bit; the `function` field (bit 1) is read here. Repeated fields are serde's error.
fn scan_object<'a>(
    s: &mut Scanner,
    src: &'a str,
    mut field: impl FnMut(&mut Scanner, &str) -> Option<u8>,
) -> Option<Option<FunctionIn<'a, Params<'a>>>> {
    let mut function = None;
    scan_fields_at(s, src, |key, s| {
        let bit = field(s, key)?;
        if bit == 1 {
            function = Some(scan_function_in(s, src)?);
        }
        Some(bit)
    })?;
    Some(function)
}

/// A tool's `function` object at the scanner, its parameters written out already when they
/// need no cleaning ([`write_clean_schema`]), else parsed.
fn scan_function_in<'a>(s: &mut Scanner, src: &'a str) -> Option<FunctionIn<'a, Params<'a>>> {
    let mut f = FunctionIn {
        name: None,
        description: None,
        parameters: None,
    };
    scan_fields_at(s, src, |key, s| {
        Some(match key {
            "name" => {
                let (value, escaped) = scan_value(s, src)?;
                f.name = opt_str(value, escaped)?;
                1
            }
            "description" => {
                let (value, _) = scan_value(s, src)?;
                f.description = match value {
                    "null" => None,
                    raw => Some(serde_json::from_str(raw).ok()?),
                };
                2
            }
            "parameters" => {
                let mut fast = s.clone();
                let mut json = Vec::with_capacity(256);
                f.parameters = match write_clean_schema(&mut fast, src, &mut json, 0) {
                    Some(empty_object) => {
                        *s = fast;
                        Some(Params::Written { json, empty_object })
                    }
                    None => match scan_json_value(s, src, 0)? {
                        Json::Null => None,
                        schema => Some(Params::Tree(schema)),
                    },
                };
                4
            }
            _ => {
                scan_value(s, src)?;
                0
            }
        })
    })?;
    Some(f)
}

/// A function's parameters as the scanner reads them.
enum Params<'a> {
    /// A schema that needed no cleaning, already written as [`Cleaned::write`] would write it,
    /// and whether it is an object schema without properties (which Gemini refuses).
    Written { json: Vec<u8>, empty_object: bool },
    /// Any other schema, parsed to be cleaned.
    Tree(Json<'a>),
}

/// Writes the object schema at the scanner (`depth` levels below the parameters) to `out`
/// when cleaning would leave it as it is: only keywords [`keyword_kind`] keeps as they are
/// (`type`, `properties`, `items` and the copied ones), `type` a single string,
/// `properties` an object, no key repeated, strings whose escapes serde_json writes the same
/// and integers serde_json writes back unchanged. The cleaned schema is then the client's
/// JSON without its whitespace, written in one pass without a [`Json`] tree. Gives whether
/// it is an object schema without properties; `None` (the tree decides, from the scanner's
/// old position) for anything else, `out` then holding part of a write.
fn write_clean_schema(s: &mut Scanner, src: &str, out: &mut Vec<u8>, depth: usize) -> Option<bool> {
    // Deeper schemas are cut short by the tree path (see `Schema::too_deep`).
    if depth > 16 || s.peek()? != b'{' {
        return None;
    }
    // The keywords seen so far (a repeated one is the tree's to resolve); there are fewer
    // kept keywords than slots.
    let mut seen = [""; 24];
    let mut count = 0;
    let (mut object_type, mut has_properties) = (false, false);
    out.push(b'{');
    scan_fields_at(s, src, |key, s| {
        let kind = keyword_kind(key);
        if matches!(
            kind,
            KeywordKind::AnyOf | KeywordKind::Const | KeywordKind::Drop
        ) || seen[..count].contains(&key)
            || count == seen.len()
        {
            return None;
        }
        if count > 0 {
            out.push(b',');
        }
        seen[count] = key;
        count += 1;
        write_key(out, key);
        match kind {
            KeywordKind::Type => {
                let (token, escaped) = scan_value(s, src)?;
                if !token.starts_with('"') || escaped {
                    return None;
                }
                object_type = token == "\"object\"";
                out.extend_from_slice(token.as_bytes());
            }
            KeywordKind::Properties => {
                if s.peek()? != b'{' {
                    return None;
                }
                let mut names: Vec<&str> = Vec::new();
                out.push(b'{');
                scan_fields_at(s, src, |name, s| {
                    if names.contains(&name) {
                        return None;
                    }
                    if !names.is_empty() {
                        out.push(b',');
                    }
                    names.push(name);
                    write_key(out, name);
                    write_subschema(s, src, out, depth + 1)?;
                    Some(0)
                })?;
                out.push(b'}');
                has_properties = !names.is_empty();
            }
            KeywordKind::Items => write_subschema(s, src, out, depth + 1)?,
            _ => copy_canonical(s, src, out, 0)?,
        }
        Some(0)
    })?;
    out.push(b'}');
    Some(object_type && !has_properties)
}

/// A subschema (a property's, or `items`): an object schema as [`write_clean_schema`] writes
/// it, anything else copied as it is (as [`Cleaned::write`] does).
fn write_subschema(s: &mut Scanner, src: &str, out: &mut Vec<u8>, depth: usize) -> Option<()> {
    if s.peek()? == b'{' {
        write_clean_schema(s, src, out, depth).map(|_| ())
    } else {
        copy_canonical(s, src, out, 0)
    }
}

/// `"key":`, for a key the scanner read without escapes (nothing serde_json would escape).
fn write_key(out: &mut Vec<u8>, key: &str) {
    out.push(b'"');
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":");
}

/// Copies the value at the scanner to `out` without whitespace when serde_json, reading it
/// into a [`Json`] and writing it back, would give the same bytes; `None` otherwise (keys
/// repeated, escapes it writes differently, numbers other than plain integers, nesting past
/// `Json`'s depth).
fn copy_canonical(s: &mut Scanner, src: &str, out: &mut Vec<u8>, depth: u32) -> Option<()> {
    if depth == 64 {
        return None;
    }
    match s.peek()? {
        b'{' => {
            let mut keys: Vec<&str> = Vec::new();
            out.push(b'{');
            scan_fields_at(s, src, |key, s| {
                if keys.contains(&key) {
                    return None;
                }
                if !keys.is_empty() {
                    out.push(b',');
                }
                keys.push(key);
                write_key(out, key);
                copy_canonical(s, src, out, depth + 1)?;
                Some(0)
            })?;
            out.push(b'}');
        }
        b'[' => {
            s.eat(b'[');
            s.ws();
            out.push(b'[');
            if !s.eat(b']') {
                loop {
                    copy_canonical(s, src, out, depth + 1)?;
                    s.ws();
                    if s.eat(b']') {
                        break;
                    }
                    s.eat(b',').then_some(())?;
                    s.ws();
                    out.push(b',');
                }
            }
            out.push(b']');
        }
        _ => {
            let (token, escaped) = scan_value(s, src)?;
            let canonical = match token.as_bytes()[0] {
                b'"' => !escaped || canonical_escapes(token.as_bytes()),
                b't' | b'f' | b'n' => true,
                // Integers as serde_json keeps them (u64 or i64) are written back the same;
                // other numbers become f64 and may be written differently ("1.0e2" as 100.0).
                _ => {
                    let digits = token.strip_prefix('-').unwrap_or(token);
                    digits.len() <= 18
                        && digits.bytes().all(|b| b.is_ascii_digit())
                        && token != "-0"
                }
            };
            if !canonical {
                return None;
            }
            out.extend_from_slice(token.as_bytes());
        }
    }
    Some(())
}

impl Json<'_> {
    /// Writes the value as serde_json would serialize it.
    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Json::Null => out.extend_from_slice(b"null"),
            Json::Bool(true) => out.extend_from_slice(b"true"),
            Json::Bool(false) => out.extend_from_slice(b"false"),
            Json::Number(n) => write_json(out, n),
            Json::Str(v) => write_str(out, v),
            Json::Array(items) => write_list(out, items, |out, item| item.write(out)),
            Json::Object(entries) => {
                out.push(b'{');
                for (i, (k, v)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write_str(out, k);
                    out.push(b':');
                    v.write(out);
                }
                out.push(b'}');
            }
        }
    }
}

/// A JSON Schema as Gemini's `Schema`, cleaned as it is written out (nothing is copied):
/// `$ref`s into `$defs` inlined, `type: [T, "null"]` as `nullable`, `const` as a one-value
/// `enum`, `oneOf` as `anyOf`, unknown keywords dropped.
#[derive(Clone, Copy)]
struct Schema<'v> {
    schema: &'v Json<'v>,
    defs: Option<&'v [(Cow<'v, str>, Json<'v>)]>,
    depth: usize,
}

/// What a JSON Schema keyword becomes in Gemini's `Schema`, decided by one `match` on the
/// keyword (not a search of a list per key).
#[derive(Clone, Copy)]
enum KeywordKind {
    /// `properties`.
    Properties,
    /// `items`.
    Items,
    /// `anyOf` or `oneOf`.
    AnyOf,
    /// `type`.
    Type,
    /// `const`.
    Const,
    /// Another key of Gemini's `Schema` (an OpenAPI subset): copied as it is.
    Copy,
    /// Anything else, which Gemini would refuse as an "Unknown name" (400): dropped.
    Drop,
}

fn keyword_kind(key: &str) -> KeywordKind {
    match key {
        "properties" => KeywordKind::Properties,
        "items" => KeywordKind::Items,
        "anyOf" | "oneOf" => KeywordKind::AnyOf,
        "type" => KeywordKind::Type,
        "const" => KeywordKind::Const,
        "format" | "title" | "description" | "nullable" | "enum" | "maxItems" | "minItems"
        | "required" | "minProperties" | "maxProperties" | "minLength" | "maxLength"
        | "pattern" | "example" | "propertyOrdering" | "default" | "minimum" | "maximum" => {
            KeywordKind::Copy
        }
        _ => KeywordKind::Drop,
    }
}

/// One keyword of a cleaned schema.
enum Keyword<'v> {
    /// Copied as it is.
    Copy(&'v Json<'v>),
    /// A subschema (`items`).
    Schema(Schema<'v>),
    /// `properties`: name → subschema.
    Properties(&'v [(Cow<'v, str>, Json<'v>)]),
    /// `anyOf`/`oneOf`: a list of subschemas.
    AnyOf(&'v [Json<'v>]),
    /// `nullable: true`.
    True,
    /// `const` as `enum: [value]`.
    Const(&'v Json<'v>),
    /// A list of types as `anyOf: [{"type": T}, …]`.
    Types(Vec<&'v Json<'v>>),
}

impl<'v> Schema<'v> {
    fn new(schema: &'v Json<'v>) -> Self {
        let defs = schema
            .get("$defs")
            .or_else(|| schema.get("definitions"))
            .and_then(Json::as_object);
        Schema {
            schema,
            defs,
            depth: 0,
        }
        .resolved()
    }

    /// Follows `$ref`s into the definitions.
    fn resolved(mut self) -> Self {
        while self.depth <= 16 {
            let Some(target) = self
                .schema
                .get("$ref")
                .and_then(Json::as_str)
                .and_then(|r| r.rsplit('/').next())
                .and_then(|name| find(self.defs?, name))
            else {
                break;
            };
            self.schema = target;
            self.depth += 1;
        }
        self
    }

    fn child(&self, schema: &'v Json<'v>) -> Self {
        Schema {
            schema,
            defs: self.defs,
            depth: self.depth + 1,
        }
        .resolved()
    }

    /// Too deep (a recursive `$ref`): Gemini cannot express it; stop with an open object.
    fn too_deep(&self) -> bool {
        matches!(self.schema, Json::Object(_)) && self.depth > 16
    }

    fn write(&self, out: &mut Vec<u8>) {
        self.cleaned().write(out);
    }

    /// The schema cleaned: its keywords are worked out here, once, for both checking and
    /// writing it out.
    fn cleaned(self) -> Cleaned<'v> {
        let keywords = match self.schema {
            Json::Object(obj) if !self.too_deep() => self.keywords(obj),
            _ => Vec::new(),
        };
        Cleaned {
            schema: self,
            keywords,
        }
    }

    /// The cleaned keywords of an object schema (`obj`), later ones replacing earlier ones of
    /// the same name (`oneOf` over `anyOf`, `enum` over `const`), each with the source keyword
    /// it came from.
    fn keywords(&self, obj: &'v [(Cow<'v, str>, Json<'v>)]) -> Vec<CleanKeyword<'v>> {
        let mut out: Vec<CleanKeyword<'v>> = Vec::with_capacity(obj.len());
        for (k, v) in obj {
            let source: &'v str = k;
            // Of two sources of one keyword, the later in sorted order wins (`oneOf` over
            // `anyOf`, `enum` over `const`), as when the schema was a sorted map.
            let mut put =
                |key: &'v str, kw: Keyword<'v>| match out.iter_mut().find(|(k, _, _)| *k == key) {
                    Some(slot) if source >= slot.1 => *slot = (key, source, kw),
                    Some(_) => {}
                    None => out.push((key, source, kw)),
                };
            match keyword_kind(source) {
                KeywordKind::Properties => {
                    if let Json::Object(props) = v {
                        put("properties", Keyword::Properties(props));
                    }
                }
                KeywordKind::Items => put("items", Keyword::Schema(self.child(v))),
                KeywordKind::AnyOf => {
                    if let Json::Array(list) = v {
                        put("anyOf", Keyword::AnyOf(list));
                    }
                }
                KeywordKind::Type => match v {
                    Json::Array(types) => {
                        let kept: Vec<&Json<'v>> = types
                            .iter()
                            .filter(|t| t.as_str() != Some("null"))
                            .collect();
                        if kept.len() < types.len() {
                            put("nullable", Keyword::True);
                        }
                        match kept.as_slice() {
                            [one] => put("type", Keyword::Copy(one)),
                            [] => {}
                            _ => put("anyOf", Keyword::Types(kept)),
                        }
                    }
                    other => put("type", Keyword::Copy(other)),
                },
                KeywordKind::Const => put("enum", Keyword::Const(v)),
                KeywordKind::Copy => put(source, Keyword::Copy(v)),
                KeywordKind::Drop => {}
            }
        }
        out
    }
}

/// A keyword of a cleaned schema: (keyword, the source keyword it came from, value).
type CleanKeyword<'v> = (&'v str, &'v str, Keyword<'v>);

/// A schema with its cleaned keywords (empty unless it is an object schema within depth).
struct Cleaned<'v> {
    schema: Schema<'v>,
    keywords: Vec<CleanKeyword<'v>>,
}

impl Cleaned<'_> {
    /// Whether the cleaned schema is an OBJECT without properties, which Gemini rejects as
    /// function parameters.
    fn is_empty_object(&self) -> bool {
        if self.schema.too_deep() {
            return true;
        }
        let is_object = self.keywords.iter().any(|(k, _, kw)| {
            *k == "type" && matches!(kw, Keyword::Copy(t) if t.as_str() == Some("object"))
        });
        is_object
            && self.keywords.iter().all(|(k, _, kw)| {
                *k != "properties" || matches!(kw, Keyword::Properties(p) if p.is_empty())
            })
    }

    fn write(&self, out: &mut Vec<u8>) {
        let schema = &self.schema;
        if !matches!(schema.schema, Json::Object(_)) {
            return schema.schema.write(out);
        }
        if schema.too_deep() {
            out.extend_from_slice(br#"{"type":"object"}"#);
            return;
        }
        let mut object = ObjectWriter::new(out);
        for (k, _, kw) in &self.keywords {
            // Keywords are Gemini's own plain names: nothing to escape.
            let out = object.field(k);
            match kw {
                Keyword::Copy(v) => v.write(out),
                Keyword::Schema(sub) => sub.write(out),
                Keyword::Properties(props) => {
                    out.push(b'{');
                    for (i, (name, sub)) in props.iter().enumerate() {
                        if i > 0 {
                            out.push(b',');
                        }
                        write_str(out, name);
                        out.push(b':');
                        schema.child(sub).write(out);
                    }
                    out.push(b'}');
                }
                Keyword::AnyOf(list) => {
                    write_list(out, *list, |out, sub| schema.child(sub).write(out));
                }
                Keyword::True => out.extend_from_slice(b"true"),
                Keyword::Const(v) => write_list(out, [v], |out, v| v.write(out)),
                Keyword::Types(types) => write_list(out, types, |out, kind| {
                    out.extend_from_slice(b"{\"type\":");
                    kind.write(out);
                    out.push(b'}');
                }),
            }
        }
        object.end();
    }
}

/// An OpenAI tool: a function, or one of Gemini's own tools (`{"googleSearch": {}}`), which is
/// passed through as sent. `P`: how the function's parameters are read (see [`FunctionIn`]).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", bound(deserialize = "P: Deserialize<'de>"))]
struct ToolIn<'a, P = &'a RawValue> {
    #[serde(default, borrow)]
    function: Option<FunctionIn<'a, P>>,
    #[serde(default)]
    google_search: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    google_search_retrieval: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    code_execution: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    url_context: Option<serde::de::IgnoredAny>,
}

impl<P> ToolIn<'_, P> {
    fn is_native(&self) -> bool {
        self.google_search.is_some()
            || self.google_search_retrieval.is_some()
            || self.code_execution.is_some()
            || self.url_context.is_some()
    }
}

/// An OpenAI function (the `function` of a tool, or a legacy `functions` entry). `P` is how its
/// parameters are read: as raw JSON, or parsed ([`Json`]) to be cleaned.
#[derive(Deserialize)]
#[serde(bound(deserialize = "P: Deserialize<'de>"))]
struct FunctionIn<'a, P = &'a RawValue> {
    #[serde(default, borrow)]
    name: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    description: Option<&'a RawValue>,
    #[serde(default)]
    parameters: Option<P>,
}

/// A Gemini `Tool`: function declarations (`{"functionDeclarations": […]}`), or one of
/// Gemini's own tools passed through.
enum Tool<'a> {
    Functions(Vec<Declaration<'a>>),
    Native(&'a RawValue),
}

impl Tool<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Tool::Functions(declarations) => {
                out.extend_from_slice(b"{\"functionDeclarations\":");
                write_list(out, declarations, |out, d| d.write(out));
                out.push(b'}');
            }
            Tool::Native(raw) => out.extend_from_slice(raw.get().as_bytes()),
        }
    }
}

/// A function declaration (`{"name": …, "description": …, "parameters": …}`, the last two
/// left out when absent); the description is copied through as raw JSON.
struct Declaration<'a> {
    name: &'a str,
    description: Option<&'a RawValue>,
    parameters: Option<Parameters<'a>>,
}

/// A declaration's parameters: written already by the scanner, or cleaned from the tree.
enum Parameters<'a> {
    Written(&'a [u8]),
    Cleaned(Cleaned<'a>),
}

impl Declaration<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"name\":");
        write_str(out, self.name);
        if let Some(description) = self.description {
            out.extend_from_slice(b",\"description\":");
            out.extend_from_slice(description.get().as_bytes());
        }
        match &self.parameters {
            None => {}
            Some(Parameters::Written(json)) => {
                out.extend_from_slice(b",\"parameters\":");
                out.extend_from_slice(json);
            }
            Some(Parameters::Cleaned(cleaned)) => {
                out.extend_from_slice(b",\"parameters\":");
                cleaned.write(out);
            }
        }
        out.push(b'}');
    }
}

/// A list field of the body (`tools`, `functions`; `raw` its JSON) as `T`s; absent or `null`
/// is empty.
fn list_field<'a, T: Deserialize<'a>>(raw: Option<&'a str>, key: &str) -> Result<Vec<T>, ApiError> {
    match raw {
        None | Some("null") => Ok(vec![]),
        Some(raw) => serde_json::from_str(raw)
            .map_err(|e| bad(format!("Invalid request body: `{key}`: {e}")).with_param(key)),
    }
}

/// The client's functions (`tools`, then the legacy `functions`), their parameters parsed, and
/// Gemini's own tools (passed through as sent).
fn parse_tools<'a>(
    tools: Option<&'a str>,
    functions: Option<&'a str>,
) -> Result<Functions<'a>, ApiError> {
    let body = tools;
    // The common case (function tools, no legacy `functions`): the body's scanner.
    if matches!(functions, None | Some("null")) {
        if let Some(tools) = tools.filter(|t| *t != "null").and_then(scan_function_tools) {
            return split_tools(body, tools, vec![]);
        }
    }
    // One pass, parameters included.
    if let (Ok(tools), Ok(functions)) = (
        list_field::<ToolIn<Json>>(tools, "tools"),
        list_field::<FunctionIn<Json>>(functions, "functions"),
    ) {
        let (functions, native) = split_tools(body, tools, functions)?;
        return Ok((
            functions.into_iter().map(FunctionIn::parsed).collect(),
            native,
        ));
    }
    // Something does not parse: the tools as raw JSON first, then each function's parameters,
    // so that the error is the one these steps have always reported.
    let (functions, native): Functions<&RawValue> = split_tools(
        body,
        list_field(tools, "tools")?,
        list_field(functions, "functions")?,
    )?;
    let functions = functions
        .into_iter()
        .map(|f| {
            Ok(FunctionIn {
                name: f.name,
                description: f.description,
                parameters: f
                    .parameters
                    .map(|p| serde_json::from_str::<Json>(p.get()).map(Params::Tree))
                    .transpose()?,
            })
        })
        .collect::<Result<_, serde_json::Error>>()
        .map_err(|e| bad(format!("Invalid request body: `tools`: {e}")).with_param("tools"))?;
    Ok((functions, native))
}

/// The client's functions and Gemini's own tools.
type Functions<'a, P = Params<'a>> = (Vec<FunctionIn<'a, P>>, Vec<&'a RawValue>);

/// Splits the client's tools (`body`: their JSON) into functions and Gemini's own tools (passed
/// through as sent).
fn split_tools<'a, P>(
    body: Option<&'a str>,
    tools: Vec<ToolIn<'a, P>>,
    functions: Vec<FunctionIn<'a, P>>,
) -> Result<Functions<'a, P>, ApiError> {
    let mut declared = Vec::with_capacity(tools.len() + functions.len());
    let mut native = vec![];
    let mut raw: Option<Vec<&RawValue>> = None;
    for (i, tool) in tools.into_iter().enumerate() {
        if let Some(f) = tool.function {
            declared.push(f);
        } else if tool.is_native() {
            // Rare: the tools again, as raw JSON, to send this one as it is.
            if raw.is_none() {
                raw = Some(list_field(body, "tools")?);
            }
            native.extend(raw.as_ref().and_then(|r| r.get(i)).copied());
        } else {
            return Err(bad("Only function tools are supported").with_param("tools"));
        }
    }
    declared.extend(functions);
    Ok((declared, native))
}

impl<'a> FunctionIn<'a, Json<'a>> {
    /// The function with its parameters parsed for cleaning.
    fn parsed(self) -> FunctionIn<'a, Params<'a>> {
        FunctionIn {
            name: self.name,
            description: self.description,
            parameters: self.parameters.map(Params::Tree),
        }
    }
}

/// Function declarations.
fn declarations<'a>(
    functions: &'a [FunctionIn<'a, Params<'a>>],
) -> Result<Vec<Declaration<'a>>, ApiError> {
    functions
        .iter()
        .map(|f| {
            let name = f
                .name
                .as_deref()
                .ok_or_else(|| bad("A tool has no name").with_param("tools"))?;
            Ok(Declaration {
                name,
                description: f.description,
                // Gemini rejects an OBJECT schema without properties: a function without
                // arguments simply has no `parameters`.
                parameters: match &f.parameters {
                    None => None,
                    Some(Params::Written { json, empty_object }) => {
                        (!empty_object).then_some(Parameters::Written(json))
                    }
                    Some(Params::Tree(schema)) => Some(Schema::new(schema).cleaned())
                        .filter(|s| !s.is_empty_object())
                        .map(Parameters::Cleaned),
                },
            })
        })
        .collect()
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ToolConfig {
    function_calling_config: CallingConfig,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CallingConfig {
    mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    allowed_function_names: Option<[String; 1]>,
}

fn convert_tool_choice(choice: &Value) -> Result<Option<ToolConfig>, ApiError> {
    let (mode, name) = match choice {
        Value::String(s) if s == "auto" => ("AUTO", None),
        Value::String(s) if s == "none" => ("NONE", None),
        Value::String(s) if s == "required" || s == "any" => ("ANY", None),
        Value::Object(_) => match choice
            .pointer("/function/name")
            .or_else(|| choice.get("name"))
            .and_then(Value::as_str)
        {
            Some(name) => ("ANY", Some([name.to_string()])),
            None => return Err(bad("tool_choice names no function").with_param("tool_choice")),
        },
        Value::Null => return Ok(None),
        other => return Err(bad(format!("Invalid tool_choice: {other}")).with_param("tool_choice")),
    };
    Ok(Some(ToolConfig {
        function_calling_config: CallingConfig {
            mode,
            allowed_function_names: name,
        },
    }))
}

/// `reasoning_effort` (LiteLLM's budgets) or an Anthropic-style `thinking` as `thinkingConfig`.
fn thinking_config(fields: &ChatFields<'_>) -> Result<Option<Value>, ApiError> {
    if let Some(effort) = parse_raw::<String>(fields.reasoning_effort, "reasoning_effort")? {
        let budget = match effort.as_str() {
            "none" | "disable" => return Ok(Some(json!({"thinkingBudget": 0}))),
            "minimal" => 128,
            "low" => 1024,
            "medium" => 2048,
            "high" => 4096,
            other => {
                return Err(bad(format!("Invalid reasoning_effort: {other}"))
                    .with_param("reasoning_effort"))
            }
        };
        return Ok(Some(
            json!({"thinkingBudget": budget, "includeThoughts": true}),
        ));
    }
    if let Some(thinking) = parse_raw::<Value>(fields.thinking, "thinking")? {
        if thinking.get("type").and_then(Value::as_str) == Some("disabled") {
            return Ok(Some(json!({"thinkingBudget": 0})));
        }
        let mut config = json!({"includeThoughts": true});
        if let Some(budget) = thinking.get("budget_tokens").and_then(Value::as_u64) {
            config["thinkingBudget"] = json!(budget);
        }
        return Ok(Some(config));
    }
    Ok(None)
}

/// The `generateContent` request body: `{"contents": …, "systemInstruction": {"parts": …},
/// "generationConfig": …, "tools": …, "toolConfig": …, "safetySettings": …}`, the optional
/// fields left out when empty.
struct GenerateContent<'a> {
    contents: Vec<Turn<'a>>,
    /// The parts of `systemInstruction`.
    system: Vec<Part<'a>>,
    generation_config: GenerationConfig<'a>,
    tools: Vec<Tool<'a>>,
    tool_config: Option<ToolConfig>,
    safety_settings: Option<&'a str>,
}

impl GenerateContent<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"contents\":");
        write_list(out, &self.contents, |out, turn| turn.write(out));
        if !self.system.is_empty() {
            out.extend_from_slice(b",\"systemInstruction\":{\"parts\":");
            write_parts(out, &self.system);
            out.push(b'}');
        }
        if !self.generation_config.is_empty() {
            out.extend_from_slice(b",\"generationConfig\":");
            self.generation_config.write(out);
        }
        if !self.tools.is_empty() {
            out.extend_from_slice(b",\"tools\":");
            write_list(out, &self.tools, |out, tool| tool.write(out));
        }
        if let Some(config) = &self.tool_config {
            out.extend_from_slice(b",\"toolConfig\":");
            write_json(out, config);
        }
        if let Some(settings) = self.safety_settings {
            out.extend_from_slice(b",\"safetySettings\":");
            out.extend_from_slice(settings.as_bytes());
        }
        out.push(b'}');
    }
}

/// `generationConfig`; sampling parameters are copied through as raw JSON.
#[derive(Default)]
struct GenerationConfig<'a> {
    temperature: Option<&'a str>,
    top_p: Option<&'a str>,
    top_k: Option<&'a str>,
    candidate_count: Option<&'a str>,
    presence_penalty: Option<&'a str>,
    frequency_penalty: Option<&'a str>,
    seed: Option<&'a str>,
    max_output_tokens: Option<u64>,
    stop_sequences: Option<Vec<String>>,
    response_mime_type: Option<&'static str>,
    response_schema: Option<Schema<'a>>,
    thinking_config: Option<Value>,
}

impl GenerationConfig<'_> {
    fn is_empty(&self) -> bool {
        self.temperature.is_none()
            && self.top_p.is_none()
            && self.top_k.is_none()
            && self.candidate_count.is_none()
            && self.presence_penalty.is_none()
            && self.frequency_penalty.is_none()
            && self.seed.is_none()
            && self.max_output_tokens.is_none()
            && self.stop_sequences.is_none()
            && self.response_mime_type.is_none()
            && self.response_schema.is_none()
            && self.thinking_config.is_none()
    }

    /// The config as JSON, its fields in camelCase and those not set left out.
    fn write(&self, out: &mut Vec<u8>) {
        let mut object = ObjectWriter::new(out);
        let raw = [
            ("temperature", self.temperature),
            ("topP", self.top_p),
            ("topK", self.top_k),
            ("candidateCount", self.candidate_count),
            ("presencePenalty", self.presence_penalty),
            ("frequencyPenalty", self.frequency_penalty),
            ("seed", self.seed),
        ];
        for (key, value) in raw {
            if let Some(value) = value {
                object.field(key).extend_from_slice(value.as_bytes());
            }
        }
        if let Some(max) = self.max_output_tokens {
            write_json(object.field("maxOutputTokens"), &max);
        }
        if let Some(stop) = &self.stop_sequences {
            write_json(object.field("stopSequences"), stop);
        }
        if let Some(mime) = self.response_mime_type {
            write_str(object.field("responseMimeType"), mime);
        }
        if let Some(schema) = &self.response_schema {
            schema.write(object.field("responseSchema"));
        }
        if let Some(thinking) = &self.thinking_config {
            write_json(object.field("thinkingConfig"), thinking);
        }
        object.end();
    }
}

/// A body field's JSON (`raw`) as `T`; absent or `null` is `None`, a wrong type is a 400 naming
/// the field (as [`parse_field`] reports it).
fn parse_raw<T: serde::de::DeserializeOwned>(
    raw: Option<&str>,
    key: &str,
) -> Result<Option<T>, ApiError> {
    match raw {
        None | Some("null") => Ok(None),
        Some(raw) => serde_json::from_str(raw)
            .map(Some)
            .map_err(|e| bad(format!("Invalid request body: `{key}`: {e}")).with_param(key)),
    }
}

/// A field's JSON, to copy through (`null` is `None`). The body's fields are valid JSON (the
/// body was parsed; defaults are serialized values), so this is the text itself.
fn raw_json(raw: Option<&str>) -> Option<&str> {
    raw.filter(|r| *r != "null")
}

/// The body fields a chat request reads, found in one pass over the body (not a search each).
#[derive(Default)]
struct ChatFields<'b> {
    /// Which of [`UNSUPPORTED`] are set (not `null`).
    unsupported: [bool; UNSUPPORTED.len()],
    logprobs: Option<&'b str>,
    parallel_tool_calls: Option<&'b str>,
    modalities: Option<&'b str>,
    messages: Option<&'b str>,
    temperature: Option<&'b str>,
    top_p: Option<&'b str>,
    top_k: Option<&'b str>,
    n: Option<&'b str>,
    presence_penalty: Option<&'b str>,
    frequency_penalty: Option<&'b str>,
    seed: Option<&'b str>,
    max_completion_tokens: Option<&'b str>,
    max_tokens: Option<&'b str>,
    stop: Option<&'b str>,
    response_format: Option<&'b str>,
    reasoning_effort: Option<&'b str>,
    thinking: Option<&'b str>,
    tools: Option<&'b str>,
    functions: Option<&'b str>,
    tool_choice: Option<&'b str>,
    safety_settings: Option<&'b str>,
}

impl<'b> ChatFields<'b> {
    fn read(body: &'b RequestBody<'_>) -> Self {
        let mut f = ChatFields::default();
        for (key, raw) in body.fields() {
            let slot = match key {
                "logprobs" => &mut f.logprobs,
                "parallel_tool_calls" => &mut f.parallel_tool_calls,
                "modalities" => &mut f.modalities,
                "messages" => &mut f.messages,
                "temperature" => &mut f.temperature,
                "top_p" => &mut f.top_p,
                "top_k" => &mut f.top_k,
                "n" => &mut f.n,
                "presence_penalty" => &mut f.presence_penalty,
                "frequency_penalty" => &mut f.frequency_penalty,
                "seed" => &mut f.seed,
                "max_completion_tokens" => &mut f.max_completion_tokens,
                "max_tokens" => &mut f.max_tokens,
                "stop" => &mut f.stop,
                "response_format" => &mut f.response_format,
                "reasoning_effort" => &mut f.reasoning_effort,
                "thinking" => &mut f.thinking,
                "tools" => &mut f.tools,
                "functions" => &mut f.functions,
                "tool_choice" => &mut f.tool_choice,
                "safety_settings" => &mut f.safety_settings,
                other => {
                    if let Some(i) = UNSUPPORTED.iter().position(|p| *p == other) {
                        f.unsupported[i] = raw != "null";
                    }
                    continue;
                }
            };
            *slot = Some(raw);
        }
        f
    }
}

/// Characters a model, project or location may hold: anything else could change the path.
fn path_safe(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b))
}

fn provider_param<'a>(d: &'a Deployment, key: &str) -> Option<&'a str> {
    d.provider_params
        .get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// The Vertex project: `vertex_project`, else the `project_id` of inline service-account
/// credentials.
fn vertex_project(d: &Deployment) -> Option<Cow<'_, str>> {
    if let Some(p) = provider_param(d, "vertex_project") {
        return Some(Cow::Borrowed(p));
    }
    let creds = match d.provider_params.get("vertex_credentials")? {
        Value::String(s) => serde_json::from_str::<Value>(s).ok()?,
        other => other.clone(),
    };
    creds
        .get("project_id")
        .and_then(Value::as_str)
        .map(|p| Cow::Owned(p.to_string()))
}

fn vertex_location(d: &Deployment) -> &str {
    provider_param(d, "vertex_location").unwrap_or(DEFAULT_VERTEX_LOCATION)
}

/// The host a Vertex deployment talks to: its `api_base`, else the regional endpoint of its
/// `vertex_location` (`aiplatform.googleapis.com` for `global`).
pub fn vertex_api_base(d: &Deployment) -> String {
    if let Some(base) = &d.api_base {
        return base.clone();
    }
    match vertex_location(d) {
        "global" => "https://aiplatform.googleapis.com".to_string(),
        loc => format!("https://{loc}-aiplatform.googleapis.com"),
    }
}

/// The path of `method` for a model, below the deployment's base.
fn model_path(d: &Deployment, model: &str, vertex: bool, method: &str) -> Result<String, ApiError> {
    let model = model.strip_prefix("models/").unwrap_or(model);
    if !path_safe(model) {
        return Err(bad(format!("Invalid Gemini model name: {model}")).with_param("model"));
    }
    // Joined, not formatted: this runs for every request.
    if !vertex {
        return Ok(["/v1beta/models/", model, ":", method].concat());
    }
    let config_error = |msg: String| ApiError::new(500, "internal_server_error", msg);
    let project = vertex_project(d).ok_or_else(|| {
        config_error(format!(
            "vertex_ai deployment {} has no vertex_project",
            d.model_name
        ))
    })?;
    let location = vertex_location(d);
    if !path_safe(&project) || !path_safe(location) {
        return Err(config_error(format!(
            "vertex_ai deployment {} has an invalid vertex_project or vertex_location",
            d.model_name
        )));
    }
    Ok([
        "/v1/projects/",
        &project,
        "/locations/",
        location,
        "/publishers/google/models/",
        model,
        ":",
        method,
    ]
    .concat())
}

fn headers(d: &Deployment, vertex: bool) -> Vec<(String, String)> {
    let mut headers = Vec::with_capacity(1 + d.extra_headers.len());
    if !vertex {
        if let Some(key) = &d.api_key {
            headers.push(("x-goog-api-key".to_string(), key.clone()));
        }
    }
    headers.extend(d.extra_headers.iter().cloned());
    headers
}

fn check_unsupported(found: Vec<&str>, model: &str, opts: &CallOptions) -> Result<(), ApiError> {
    if !found.is_empty() && !opts.drop_params {
        return Err(unsupported_params("gemini", model, &found));
    }
    Ok(())
}

pub(super) fn build_request(
    op: Operation,
    body: &mut RequestBody<'_>,
    d: &Deployment,
    upstream_model: &str,
    stream: bool,
    opts: &CallOptions,
    vertex: bool,
) -> Result<UpstreamRequest, ApiError> {
    for (k, v) in &d.default_params {
        body.set_default(k, v.to_string());
    }
    match op {
        Operation::ChatCompletions => chat_request(body, d, upstream_model, stream, opts, vertex),
        Operation::Embeddings => embeddings_request(body, d, upstream_model, opts, vertex),
        Operation::Completions => Err(ApiError::new(
            400,
            "bad_request_error",
            format!(
                "gemini does not support {} (only chat completions and embeddings)",
                op.openai_path()
            ),
        )),
    }
}

fn chat_request(
    body: &mut RequestBody<'_>,
    d: &Deployment,
    upstream_model: &str,
    stream: bool,
    opts: &CallOptions,
    vertex: bool,
) -> Result<UpstreamRequest, ApiError> {
    let body: &RequestBody = body;
    let fields = ChatFields::read(body);
    let mut unsupported: Vec<&str> = UNSUPPORTED
        .iter()
        .zip(fields.unsupported)
        .filter_map(|(p, set)| set.then_some(*p))
        .collect();
    if fields.logprobs.is_some_and(|r| r != "null" && r != "false") {
        unsupported.push("logprobs");
    }
    if parse_raw::<bool>(fields.parallel_tool_calls, "parallel_tool_calls")? == Some(false) {
        unsupported.push("parallel_tool_calls");
    }
    if let Some(modalities) = parse_raw::<Vec<String>>(fields.modalities, "modalities")? {
        if modalities.iter().any(|m| m != "text") {
            unsupported.push("modalities");
        }
    }
    check_unsupported(unsupported, upstream_model, opts)?;

    let raw_messages = fields.messages.unwrap_or_default();
    let messages: Vec<Message> = match fields.messages.and_then(read_messages) {
        Some(messages) => messages,
        None => list_field(fields.messages, "messages")?,
    };
    let (system, contents) = convert_messages(raw_messages, &messages)?;

    let mut config = GenerationConfig {
        temperature: raw_json(fields.temperature),
        top_p: raw_json(fields.top_p),
        top_k: raw_json(fields.top_k),
        candidate_count: raw_json(fields.n),
        presence_penalty: raw_json(fields.presence_penalty),
        frequency_penalty: raw_json(fields.frequency_penalty),
        seed: raw_json(fields.seed),
        ..Default::default()
    };
    let max_tokens: Option<u64> = parse_raw(fields.max_completion_tokens, "max_completion_tokens")?;
    config.max_output_tokens = match max_tokens {
        Some(max) => Some(max),
        None => parse_raw(fields.max_tokens, "max_tokens")?,
    };
    if let Some(stop) = parse_raw::<Value>(fields.stop, "stop")? {
        config.stop_sequences = Some(match stop {
            Value::String(s) => vec![s],
            Value::Array(a) => a
                .into_iter()
                .filter_map(|v| match v {
                    Value::String(s) => Some(s),
                    _ => None,
                })
                .collect(),
            other => return Err(bad(format!("Invalid stop: {other}")).with_param("stop")),
        });
    }
    let format: Option<Json> = match fields.response_format {
        None | Some("null") => None,
        Some(raw) => Some(serde_json::from_str(raw).map_err(|e| {
            bad(format!("Invalid request body: `response_format`: {e}"))
                .with_param("response_format")
        })?),
    };
    if let Some(format) = &format {
        match format.get("type").and_then(Json::as_str) {
            Some("json_object") => config.response_mime_type = Some("application/json"),
            Some("json_schema") => {
                config.response_mime_type = Some("application/json");
                config.response_schema = format
                    .get("json_schema")
                    .and_then(|j| j.get("schema"))
                    .map(Schema::new);
            }
            Some("text") | None => {}
            Some(other) => {
                return Err(bad(format!("Unsupported response_format type: {other}"))
                    .with_param("response_format"))
            }
        }
    }
    config.thinking_config = thinking_config(&fields)?;

    let tools_len = fields.tools.map_or(0, str::len);
    let (functions, native) = parse_tools(fields.tools, fields.functions)?;
    let declarations = declarations(&functions)?;
    let mut tools = Vec::with_capacity(1 + native.len());
    if !declarations.is_empty() {
        tools.push(Tool::Functions(declarations));
    }
    tools.extend(native.into_iter().map(Tool::Native));
    let tool_config = match parse_raw::<Value>(fields.tool_choice, "tool_choice")? {
        Some(choice) => convert_tool_choice(&choice)?,
        None => None,
    };

    let out = GenerateContent {
        contents,
        system,
        generation_config: config,
        tools,
        tool_config,
        safety_settings: raw_json(fields.safety_settings),
    };
    let method = if stream {
        "streamGenerateContent?alt=sse"
    } else {
        "generateContent"
    };
    Ok(UpstreamRequest {
        path: model_path(d, upstream_model, vertex, method)?,
        headers: headers(d, vertex),
        body: {
            // Sized once: the output is about as long as the client's messages and tools.
            let mut bytes = Vec::with_capacity(raw_messages.len() + tools_len + 256);
            out.write(&mut bytes);
            bytes
        },
        injected_stream_usage: false,
    })
}

fn embeddings_request(
    body: &mut RequestBody<'_>,
    d: &Deployment,
    upstream_model: &str,
    opts: &CallOptions,
    vertex: bool,
) -> Result<UpstreamRequest, ApiError> {
    let encoding: Option<String> = parse_field(body, "encoding_format")?;
    let unsupported = if encoding.as_deref().is_some_and(|e| e != "float") {
        vec!["encoding_format"]
    } else {
        vec![]
    };
    check_unsupported(unsupported, upstream_model, opts)?;
    let input_error = || {
        bad("gemini embeddings take `input` as a string or a list of strings").with_param("input")
    };
    let texts: Vec<String> = match parse_field::<Value>(body, "input")? {
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                _ => Err(input_error()),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(input_error()),
    };
    let dimensions: Option<u64> = parse_field(body, "dimensions")?;
    let model = upstream_model
        .strip_prefix("models/")
        .unwrap_or(upstream_model);
    let (method, out) = if vertex {
        let instances: Vec<Value> = texts.iter().map(|t| json!({"content": t})).collect();
        let mut out = json!({"instances": instances});
        if let Some(dims) = dimensions {
            out["parameters"] = json!({"outputDimensionality": dims});
        }
        ("predict", out)
    } else {
        let requests: Vec<Value> = texts
            .iter()
            .map(|t| {
                let mut r =
                    json!({"model": format!("models/{model}"), "content": {"parts": [{"text": t}]}});
                if let Some(dims) = dimensions {
                    r["outputDimensionality"] = json!(dims);
                }
                r
            })
            .collect();
        ("batchEmbedContents", json!({"requests": requests}))
    };
    Ok(UpstreamRequest {
        path: model_path(d, model, vertex, method)?,
        headers: headers(d, vertex),
        body: serde_json::to_vec(&out).expect("json serializes"),
        injected_stream_usage: false,
    })
}

/// Gemini's finish reason as OpenAI's; a stop after function calls is `tool_calls`.
fn finish_reason(reason: Option<&str>, has_tool_calls: bool) -> &'static str {
    match reason {
        Some("MAX_TOKENS") => "length",
        Some(
            "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY",
        ) => "content_filter",
        _ if has_tool_calls => "tool_calls",
        _ => "stop",
    }
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "camelCase")]
struct GeminiUsage {
    #[serde(default)]
    prompt_token_count: u64,
    #[serde(default)]
    candidates_token_count: u64,
    #[serde(default)]
    total_token_count: Option<u64>,
    #[serde(default)]
    thoughts_token_count: u64,
    #[serde(default)]
    cached_content_token_count: u64,
}

impl GeminiUsage {
    fn from_response(v: &Value) -> Option<Self> {
        // Deserialized from the borrowed value: no copy of the tree per event.
        let u = GeminiUsage::deserialize(v.get("usageMetadata")?).ok()?;
        (u.total() > 0).then_some(u)
    }

    fn completion(&self) -> u64 {
        self.candidates_token_count + self.thoughts_token_count
    }

    fn total(&self) -> u64 {
        self.total_token_count
            .unwrap_or(self.prompt_token_count + self.completion())
    }

    fn openai(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_token_count,
            "completion_tokens": self.completion(),
            "total_tokens": self.total(),
            "prompt_tokens_details": {"cached_tokens": self.cached_content_token_count},
            "completion_tokens_details": {"reasoning_tokens": self.thoughts_token_count},
        })
    }

    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_token_count,
            completion_tokens: self.completion(),
            total_tokens: self.total(),
        }
    }
}

/// An id for a response that carries no `responseId` (Vertex before 2025, some proxies).
fn fallback_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("chatcmpl-{nanos:x}")
}

fn response_id(v: &Value) -> Option<String> {
    v.get("responseId")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// OpenAI tool call `n` of a choice for a Gemini `functionCall` part.
fn tool_call_id(n: usize, part: &Value) -> String {
    match part.get("thoughtSignature").and_then(Value::as_str) {
        Some(sig) if !sig.is_empty() => format!("call_{n}{THOUGHT_SEP}{sig}"),
        _ => format!("call_{n}"),
    }
}

fn function_call(part: &Value) -> Option<(&str, String)> {
    let call = part.get("functionCall")?;
    let name = call.get("name").and_then(Value::as_str).unwrap_or("");
    let args = call
        .get("args")
        .filter(|a| !a.is_null())
        .map(Value::to_string)
        .unwrap_or_else(|| "{}".to_string());
    Some((name, args))
}

fn is_thought(part: &Value) -> bool {
    part.get("thought").and_then(Value::as_bool) == Some(true)
}

fn malformed(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        502,
        "internal_server_error",
        format!("litellm.APIError: GeminiException - malformed response: {e}"),
    )
}

/// A whole `generateContent` (or embeddings) response in OpenAI's shape.
pub(super) fn translate_response(
    op: Operation,
    body: &[u8],
    model: &str,
) -> Result<(Vec<u8>, Option<Usage>), ApiError> {
    if op == Operation::ChatCompletions {
        if let Some(translated) = text_response(body, model) {
            return Ok(translated);
        }
    }
    value_response(op, body, model)
}

/// [`translate_response`] for any response, read into a `serde_json::Value`.
fn value_response(
    op: Operation,
    body: &[u8],
    model: &str,
) -> Result<(Vec<u8>, Option<Usage>), ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(malformed)?;
    if op == Operation::Embeddings {
        return translate_embeddings(&v, model);
    }
    let usage = GeminiUsage::from_response(&v);
    let candidates = v
        .get("candidates")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut choices = Vec::with_capacity(candidates.len().max(1));
    for (pos, c) in candidates.iter().enumerate() {
        let mut text = String::new();
        let mut reasoning = String::new();
        let mut tool_calls = vec![];
        let parts = c
            .pointer("/content/parts")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for p in parts {
            if let Some((name, args)) = function_call(p) {
                tool_calls.push(json!({
                    "id": tool_call_id(tool_calls.len(), p),
                    "type": "function",
                    "function": {"name": name, "arguments": args},
                }));
            } else if let Some(t) = p.get("text").and_then(Value::as_str) {
                if is_thought(p) {
                    reasoning.push_str(t);
                } else {
                    text.push_str(t);
                }
            }
        }
        let finish = finish_reason(
            c.get("finishReason").and_then(Value::as_str),
            !tool_calls.is_empty(),
        );
        let mut message = json!({
            "role": "assistant",
            "content": if text.is_empty() && !tool_calls.is_empty() { Value::Null } else { json!(text) },
        });
        if !tool_calls.is_empty() {
            message["tool_calls"] = json!(tool_calls);
        }
        if !reasoning.is_empty() {
            message["reasoning_content"] = json!(reasoning);
        }
        choices.push(json!({
            "index": c.get("index").and_then(Value::as_u64).unwrap_or(pos as u64),
            "message": message,
            "finish_reason": finish,
        }));
    }
    if choices.is_empty() {
        // No candidates: the prompt itself was blocked (`promptFeedback.blockReason`).
        let blocked = v.pointer("/promptFeedback/blockReason").is_some();
        choices.push(json!({
            "index": 0,
            "message": {"role": "assistant", "content": ""},
            "finish_reason": if blocked { "content_filter" } else { "stop" },
        }));
    }
    let out = json!({
        "id": response_id(&v).unwrap_or_else(fallback_id),
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": choices,
        "usage": usage.unwrap_or_default().openai(),
    });
    Ok((
        serde_json::to_vec(&out).expect("json serializes"),
        usage.map(|u| u.usage()),
    ))
}

/// A response of the usual shape (candidates of one text part each, plain token counts) read
/// with the body's scanner and written directly, the answer's string token copied through.
/// `None` leaves the response to [`translate_response`]'s `Value` path: function calls,
/// thoughts, several text parts, no candidates, and anything unusual (see [`object_fields`]).
fn text_response(body: &[u8], model: &str) -> Option<(Vec<u8>, Option<Usage>)> {
    let src = utf8(body)?;
    let (mut candidates, mut usage, mut id) = (None, None, None);
    object_fields(src, |key, value, escaped| match key {
        "candidates" => {
            candidates = Some(value);
            Some(1)
        }
        "usageMetadata" => {
            usage = Some(value);
            Some(2)
        }
        "responseId" => {
            id = Some((value, escaped));
            Some(4)
        }
        _ => Some(0),
    })?;
    let usage = match usage {
        Some(u) => Some(scan_usage(u)?).filter(|u| u.total() > 0),
        None => None,
    };
    let choices = scan_array(candidates?, |s, src| {
        let (candidate, _) = scan_value(s, src)?;
        Some(text_candidate(candidate))
    })?;
    if choices.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() + 256);
    let mut texts = Vec::with_capacity(choices.len());
    for (pos, choice) in choices.into_iter().enumerate() {
        let (index, content, finish) = choice?;
        texts.push(TextChoice {
            index: index.unwrap_or(pos as u64),
            content: content.unwrap_or(Text::Str(Cow::Borrowed(""))),
            finish_reason: finish_reason(finish, false),
        });
    }
    let id = match id {
        Some((token, escaped)) if token.starts_with('"') && token != "\"\"" => {
            string_text(token, escaped)?
        }
        _ => Text::Str(Cow::Owned(fallback_id())),
    };
    let openai = usage.unwrap_or_default().openai();
    write_text_completion(&mut out, &id, model, &texts, &openai);
    Some((out, usage.map(|u| u.usage())))
}

/// A candidate of [`text_response`]: its index, its one text part, its finish reason.
type TextCandidate<'a> = (Option<u64>, Option<Text<'a>>, Option<&'a str>);

fn text_candidate(src: &str) -> Option<TextCandidate<'_>> {
    let (mut content, mut finish, mut index) = (None, None, None);
    object_fields(src, |key, value, escaped| match key {
        "content" => {
            content = Some(value);
            Some(1)
        }
        "finishReason" if !escaped && value.starts_with('"') => {
            finish = Some(&value[1..value.len() - 1]);
            Some(2)
        }
        "finishReason" => None,
        "index" => {
            index = Some(plain_u64(value)?);
            Some(4)
        }
        _ => Some(0),
    })?;
    let mut parts = None;
    if let Some(content) = content {
        object_fields(content, |key, value, _| match key {
            "parts" => {
                parts = Some(value);
                Some(1)
            }
            _ => Some(0),
        })?;
    }
    let mut text = None;
    if let Some(parts) = parts {
        let texts = scan_array(parts, |s, src| {
            let (part, _) = scan_value(s, src)?;
            let mut text = None;
            object_fields(part, |key, value, escaped| match key {
                "text" => {
                    text = Some(string_text(value, escaped)?);
                    Some(1)
                }
                "thought" | "functionCall" => None,
                _ => Some(0),
            })?;
            Some(text)
        })?;
        let mut texts = texts.into_iter().flatten();
        text = texts.next();
        if texts.next().is_some() {
            return None;
        }
    }
    Some((index, text, finish))
}

/// `usageMetadata` read as [`GeminiUsage`] is, when every count is a plain integer.
fn scan_usage(src: &str) -> Option<GeminiUsage> {
    let mut u = GeminiUsage::default();
    object_fields(src, |key, value, _| {
        let (slot, bit) = match key {
            "promptTokenCount" => (&mut u.prompt_token_count, 1),
            "candidatesTokenCount" => (&mut u.candidates_token_count, 2),
            "thoughtsTokenCount" => (&mut u.thoughts_token_count, 4),
            "cachedContentTokenCount" => (&mut u.cached_content_token_count, 8),
            "totalTokenCount" => {
                u.total_token_count = Some(plain_u64(value)?);
                return Some(16);
            }
            _ => return Some(0),
        };
        *slot = plain_u64(value)?;
        Some(bit)
    })?;
    Some(u)
}

/// `batchEmbedContents` (`embeddings[].values`) or Vertex `predict`
/// (`predictions[].embeddings.values` with token statistics) as an OpenAI embedding list.
fn translate_embeddings(v: &Value, model: &str) -> Result<(Vec<u8>, Option<Usage>), ApiError> {
    let mut data = vec![];
    let mut tokens: Option<u64> = None;
    if let Some(list) = v.get("embeddings").and_then(Value::as_array) {
        for (i, e) in list.iter().enumerate() {
            let values = e
                .get("values")
                .ok_or_else(|| malformed("embedding without values"))?;
            data.push(json!({"object": "embedding", "index": i, "embedding": values}));
        }
        tokens = v
            .pointer("/usageMetadata/promptTokenCount")
            .and_then(Value::as_u64);
    } else if let Some(list) = v.get("predictions").and_then(Value::as_array) {
        for (i, p) in list.iter().enumerate() {
            let values = p
                .pointer("/embeddings/values")
                .ok_or_else(|| malformed("prediction without embeddings.values"))?;
            data.push(json!({"object": "embedding", "index": i, "embedding": values}));
            if let Some(n) = p
                .pointer("/embeddings/statistics/token_count")
                .and_then(Value::as_f64)
            {
                *tokens.get_or_insert(0) += n as u64;
            }
        }
    } else {
        return Err(malformed("no embeddings or predictions"));
    }
    let prompt = tokens.unwrap_or(0);
    let out = json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
    });
    Ok((
        serde_json::to_vec(&out).expect("json serializes"),
        tokens.map(|t| Usage {
            prompt_tokens: t,
            completion_tokens: 0,
            total_tokens: t,
        }),
    ))
}

/// One event of a `streamGenerateContent` stream, borrowed from the event's bytes.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StreamEvent<'a> {
    #[serde(default, borrow)]
    candidates: Option<Vec<StreamCandidate<'a>>>,
    #[serde(default)]
    usage_metadata: Option<GeminiUsage>,
    #[serde(default, borrow)]
    response_id: Option<Cow<'a, str>>,
    #[serde(default)]
    error: Option<Value>,
    #[serde(default, borrow)]
    prompt_feedback: Option<PromptFeedback<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PromptFeedback<'a> {
    #[serde(default, borrow)]
    block_reason: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StreamCandidate<'a> {
    #[serde(default, borrow)]
    content: Option<StreamContent<'a>>,
    #[serde(default, borrow)]
    finish_reason: Option<Cow<'a, str>>,
    #[serde(default)]
    index: Option<u64>,
}

#[derive(Deserialize)]
struct StreamContent<'a> {
    #[serde(default, borrow)]
    parts: Option<Vec<StreamPart<'a>>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StreamPart<'a> {
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(default)]
    thought: Option<bool>,
    #[serde(default, borrow)]
    thought_signature: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    function_call: Option<StreamCall<'a>>,
}

#[derive(Deserialize)]
struct StreamCall<'a> {
    #[serde(default, borrow)]
    name: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    args: Option<&'a RawValue>,
}

/// A streamed tool call delta.
#[derive(Serialize)]
struct ToolCallDelta<'a> {
    tool_calls: [ToolCallChunk<'a>; 1],
}

#[derive(Serialize)]
struct ToolCallChunk<'a> {
    index: usize,
    id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    function: ToolCallFunction<'a>,
}

#[derive(Serialize)]
struct ToolCallFunction<'a> {
    name: &'a str,
    arguments: &'a str,
}

/// Turns Gemini's SSE stream (`data: {GenerateContentResponse}` per event, no terminator) into
/// OpenAI `chat.completion.chunk` events, for any chunking of the input.
#[derive(Default)]
pub struct GeminiStream {
    splitter: SseSplitter,
    id: String,
    model: String,
    created: u64,
    /// The fixed chunk envelope, rebuilt once the response id is known.
    writer: ChunkWriter,
    /// What `writer` puts before the choice of every chunk.
    head: Vec<u8>,
    usage: Option<GeminiUsage>,
    /// Candidates seen so far: (choice index, tool calls sent for it).
    choices: Vec<(u64, usize)>,
    include_usage: bool,
    started: bool,
    finished: bool,
}

impl GeminiStream {
    pub fn new(model: &str, include_usage: bool) -> Self {
        let (id, created) = (fallback_id(), now());
        let mut stream = GeminiStream {
            id,
            model: model.to_string(),
            created,
            include_usage,
            ..Default::default()
        };
        stream.set_writer();
        stream
    }

    fn set_writer(&mut self) {
        self.writer = ChunkWriter::new(&self.id, self.created, &self.model);
        // The envelope before the choice, as the writer writes it, for deltas written here.
        self.head.clear();
        self.writer.choice(&mut self.head, &Value::Null);
        let len = self
            .head
            .strip_suffix(b"null]}\n\n")
            .expect("a chunk ends with its choices")
            .len();
        self.head.truncate(len);
    }

    pub fn usage(&self) -> Option<Usage> {
        self.usage.map(|u| u.usage())
    }

    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        let mut splitter = std::mem::take(&mut self.splitter);
        splitter.feed(chunk, |event| self.event(event, out));
        self.splitter = splitter;
    }

    /// Flushes the end of the stream: Gemini sends no terminator, so this is where the usage
    /// chunk and `[DONE]` go out.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        let mut splitter = std::mem::take(&mut self.splitter);
        splitter.finish(|event| self.event(event, out));
        self.splitter = splitter;
        self.end(out);
    }

    /// Starts a chunk of choice `index`, up to its delta.
    fn open(&self, index: u64, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.head);
        out.extend_from_slice(b"{\"index\":");
        if index < 10 {
            out.push(b'0' + index as u8);
        } else {
            out.extend_from_slice(index.to_string().as_bytes());
        }
        out.extend_from_slice(b",\"delta\":");
    }

    /// Ends a chunk after its delta.
    fn close(finish: Option<&'static str>, out: &mut Vec<u8>) {
        out.extend_from_slice(b",\"finish_reason\":");
        match finish {
            // OpenAI finish reasons are plain words: nothing to escape.
            Some(f) => {
                out.push(b'"');
                out.extend_from_slice(f.as_bytes());
                out.push(b'"');
            }
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b"}]}\n\n");
    }

    /// A chunk whose delta is fixed JSON.
    fn raw_chunk(&self, index: u64, delta: &[u8], finish: Option<&'static str>, out: &mut Vec<u8>) {
        self.open(index, out);
        out.extend_from_slice(delta);
        Self::close(finish, out);
    }

    /// A text (or reasoning) delta.
    fn text_chunk(&self, index: u64, key: &[u8], text: Text, out: &mut Vec<u8>) {
        self.open(index, out);
        out.extend_from_slice(key);
        text.write(out);
        out.push(b'}');
        Self::close(None, out);
    }

    /// The slot of a candidate, sending its role chunk the first time it is seen.
    fn choice(&mut self, index: u64, out: &mut Vec<u8>) -> usize {
        if let Some(slot) = self.choices.iter().position(|(i, _)| *i == index) {
            return slot;
        }
        self.raw_chunk(index, br#"{"role":"assistant","content":""}"#, None, out);
        self.choices.push((index, 0));
        self.choices.len() - 1
    }

    fn event(&mut self, event: &[u8], out: &mut Vec<u8>) {
        if self.finished {
            return;
        }
        let Some(data) = event_data(event) else {
            return;
        };
        // UTF-8 checked once for the event (ASCII, many bytes at a time), so that serde reads
        // a `str` and does not check every borrowed string again.
        let Some(src) = utf8(data) else {
            return;
        };
        let Ok(v) = serde_json::from_str::<StreamEvent>(src) else {
            return;
        };
        if let Some(e) = &v.error {
            let err = json!({"error": {
                "message": format!("litellm.APIError: GeminiException - {}", e["message"].as_str().unwrap_or("stream error")),
                "type": e["status"].as_str().unwrap_or("api_error"),
                "param": null,
                "code": e["code"].as_u64().map_or_else(|| "500".to_string(), |c| c.to_string()),
            }});
            out.extend_from_slice(format!("data: {err}\n\n").as_bytes());
            self.end(out);
            return;
        }
        if !self.started {
            self.started = true;
            if let Some(id) = v.response_id.as_deref().filter(|id| !id.is_empty()) {
                self.id = id.to_string();
                self.set_writer();
            }
        }
        if let Some(u) = v.usage_metadata.filter(|u| u.total() > 0) {
            self.usage = Some(u);
        }
        let candidates = v.candidates.as_deref().unwrap_or_default();
        for (pos, c) in candidates.iter().enumerate() {
            let index = c.index.unwrap_or(pos as u64);
            let slot = self.choice(index, out);
            let parts = c
                .content
                .as_ref()
                .and_then(|c| c.parts.as_deref())
                .unwrap_or_default();
            for p in parts {
                if let Some(call) = &p.function_call {
                    let n = self.choices[slot].1;
                    self.choices[slot].1 += 1;
                    let id = match p.thought_signature.as_deref() {
                        Some(sig) if !sig.is_empty() => format!("call_{n}{THOUGHT_SEP}{sig}"),
                        _ => format!("call_{n}"),
                    };
                    let delta = ToolCallDelta {
                        tool_calls: [ToolCallChunk {
                            index: n,
                            id,
                            kind: "function",
                            function: ToolCallFunction {
                                name: call.name.as_deref().unwrap_or(""),
                                arguments: call.args.map_or("{}", RawValue::get),
                            },
                        }],
                    };
                    self.open(index, out);
                    serde_json::to_writer(&mut *out, &delta).expect("json serializes");
                    Self::close(None, out);
                } else if let Some(t) = p.text.as_deref() {
                    if t.is_empty() {
                        continue;
                    }
                    let key: &[u8] = if p.thought == Some(true) {
                        b"{\"reasoning_content\":"
                    } else {
                        b"{\"content\":"
                    };
                    self.text_chunk(index, key, text(src, t), out);
                }
            }
            if let Some(reason) = c.finish_reason.as_deref() {
                let finish = finish_reason(Some(reason), self.choices[slot].1 > 0);
                self.raw_chunk(index, b"{}", Some(finish), out);
            }
        }
        if candidates.is_empty()
            && v.prompt_feedback
                .as_ref()
                .is_some_and(|f| f.block_reason.is_some())
        {
            self.choice(0, out);
            self.raw_chunk(0, b"{}", Some("content_filter"), out);
        }
    }

    fn end(&mut self, out: &mut Vec<u8>) {
        if self.finished {
            return;
        }
        self.finished = true;
        if self.include_usage {
            self.writer
                .usage(out, &self.usage.unwrap_or_default().openai());
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
    }
}

fn contains_ci(hay: &[u8], needle: &str) -> bool {
    let needle = needle.as_bytes();
    hay.windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

fn contains(hay: &[u8], needle: &str) -> bool {
    memchr::memmem::find(hay, needle.as_bytes()).is_some()
}

/// What a Gemini or Vertex error response means for routing. Google answers a bad API key
/// with a 400 (`API_KEY_INVALID`), quota errors carry `RESOURCE_EXHAUSTED`, and an oversized
/// prompt says "exceeds the maximum number of tokens" (Gemini) or "input token count"
/// (Vertex).
pub(super) fn classify_error(status: u16, body: &[u8]) -> FailureKind {
    let scan = &body[..body.len().min(16 * 1024)];
    if contains(scan, "RESOURCE_EXHAUSTED") {
        return FailureKind::RateLimit;
    }
    if (400..500).contains(&status) && status != 429 {
        if contains(scan, "API_KEY_INVALID") || contains_ci(scan, "API key not valid") {
            return FailureKind::Auth;
        }
        if contains_ci(scan, "exceeds the maximum number of tokens")
            || contains_ci(scan, "input token count")
        {
            return FailureKind::ContextWindowExceeded;
        }
        if contains(scan, "\"SAFETY\"")
            || contains(scan, "PROHIBITED_CONTENT")
            || contains(scan, "blockReason")
            || contains_ci(scan, "blocked due to safety")
        {
            return FailureKind::ContentPolicy;
        }
    }
    classify_status(status, body)
}

#[cfg(test)]
mod tests;
