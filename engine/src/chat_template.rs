//! Chat templates rendered with minijinja the way Hugging Face renders them.
//!
//! Hugging Face compiles `tokenizer.chat_template` with a sandboxed Jinja2 environment
//! (`trim_blocks`, `lstrip_blocks`, loop controls), a `raise_exception` function, its own `tojson`
//! filter (`ensure_ascii=False` and Python's separators) and `strftime_now`. This module mirrors
//! that environment, plus the message preprocessing vLLM applies before rendering: OpenAI content
//! parts flattened to a string for templates that expect a string, tool-call arguments parsed from
//! JSON strings, and `continue_final_message`.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{from_args, Kwargs, Rest, ValueKind};
use minijinja::{Environment, ErrorKind, Value};
use serde_json::Value as Json;

use crate::error::{EngineError, Result};

#[derive(Debug, Clone, Default)]
pub struct ChatTemplateOptions {
    pub add_generation_prompt: bool,
    pub continue_final_message: bool,
    /// A template given by the request instead of the model's.
    pub chat_template: Option<String>,
    /// `chat_template_kwargs`: extra variables for the template.
    pub kwargs: serde_json::Map<String, serde_json::Value>,
    pub tools: Option<serde_json::Value>,
    pub documents: Option<serde_json::Value>,
}

/// The special-token strings a template may reference (`{{ bos_token }}` and friends); a token the
/// model does not define stays undefined in the template.
#[derive(Debug, Clone, Default)]
pub struct SpecialTokenStrings {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub pad_token: Option<String>,
}

/// How a template reads `message.content`: vLLM's "string" versus "openai" content formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ContentFormat {
    /// The template concatenates `content` as text: content parts are joined before rendering.
    String,
    /// The template loops over `content` itself: parts are passed through.
    OpenAi,
}

const TEMPLATE_NAME: &str = "chat_template";

/// A chat template compiled once; render it per request.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    content_format: ContentFormat,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("content_format", &self.content_format)
            .finish()
    }
}

impl ChatTemplate {
    /// Compile `source`; syntax errors come back as [`EngineError::Template`].
    pub fn new(source: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson_filter);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(template_error)?;
        Ok(ChatTemplate {
            env,
            source: source.to_owned(),
            content_format: detect_content_format(source),
        })
    }

    /// The Jinja source this template was compiled from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Render `messages` (a JSON array of OpenAI chat messages). `options.chat_template` is not
    /// consulted here: the caller picks which template to render.
    pub fn render(
        &self,
        messages: &Json,
        options: &ChatTemplateOptions,
        special_tokens: &SpecialTokenStrings,
    ) -> Result<String> {
        if options.add_generation_prompt && options.continue_final_message {
            return Err(EngineError::InvalidRequest(
                "add_generation_prompt and continue_final_message cannot both be set".into(),
            ));
        }
        let messages = self.prepare_messages(messages)?;
        let final_text = if options.continue_final_message {
            Some(final_message_text(&messages)?)
        } else {
            None
        };

        // Request kwargs come first so that the variables HF passes explicitly win over them.
        let mut context = serde_json::Map::new();
        for (name, value) in [
            ("bos_token", &special_tokens.bos_token),
            ("eos_token", &special_tokens.eos_token),
            ("unk_token", &special_tokens.unk_token),
            ("pad_token", &special_tokens.pad_token),
        ] {
            if let Some(value) = value {
                context.insert(name.to_owned(), Json::String(value.clone()));
            }
        }
        context.extend(options.kwargs.clone());
        context.insert("messages".into(), Json::Array(messages));
        context.insert(
            "add_generation_prompt".into(),
            Json::Bool(options.add_generation_prompt),
        );
        context.insert("tools".into(), options.tools.clone().unwrap_or(Json::Null));
        context.insert(
            "documents".into(),
            options.documents.clone().unwrap_or(Json::Null),
        );

        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(template_error)?;
        let rendered = template
            .render(Value::from_serialize(&context))
            .map_err(template_error)?;
        match final_text {
            Some(text) => cut_after_final_message(rendered, &text),
            None => Ok(rendered),
        }
    }

    /// vLLM's preprocessing: content parts joined for string templates, tool-call arguments
    /// turned from JSON strings into objects (what tool-use templates expect).
    fn prepare_messages(&self, messages: &Json) -> Result<Vec<Json>> {
        let Json::Array(messages) = messages else {
            return Err(EngineError::InvalidRequest(
                "messages must be an array".into(),
            ));
        };
        let mut prepared = Vec::with_capacity(messages.len());
        for message in messages {
            let Json::Object(fields) = message else {
                return Err(EngineError::InvalidRequest(
                    "each message must be an object".into(),
                ));
            };
            let mut fields = fields.clone();
            if let Some(Json::Array(parts)) = fields.get("content") {
                let content = match self.content_format {
                    ContentFormat::String => Json::String(join_text_parts(parts)?),
                    ContentFormat::OpenAi => Json::Array(normalise_parts(parts)?),
                };
                fields.insert("content".into(), content);
            }
            if let Some(Json::Array(calls)) = fields.get_mut("tool_calls") {
                for call in calls {
                    parse_tool_call_arguments(call)?;
                }
            }
            prepared.push(Json::Object(fields));
        }
        Ok(prepared)
    }
}

fn template_error(error: minijinja::Error) -> EngineError {
    EngineError::Template(error.to_string())
}

/// Content part types that carry plain text.
fn part_text(part: &Json) -> Result<Option<&str>> {
    let kind = part.get("type").and_then(Json::as_str).unwrap_or("text");
    match kind {
        "text" | "input_text" | "output_text" => match part.get("text") {
            Some(Json::String(text)) => Ok(Some(text)),
            _ => Err(EngineError::InvalidRequest(format!(
                "content part of type {kind:?} has no text"
            ))),
        },
        other => Err(EngineError::InvalidRequest(format!(
            "content parts of type {other:?} are not supported by this model"
        ))),
    }
}

/// Text parts joined with newlines, as vLLM does for templates that print `content` directly.
fn join_text_parts(parts: &[Json]) -> Result<String> {
    let mut texts = Vec::with_capacity(parts.len());
    for part in parts {
        match part {
            Json::String(text) => texts.push(text.as_str()),
            _ => texts.extend(part_text(part)?),
        }
    }
    Ok(texts.join("\n"))
}

/// Parts as `{type: "text", text}` objects for templates that iterate `content`.
fn normalise_parts(parts: &[Json]) -> Result<Vec<Json>> {
    parts
        .iter()
        .map(|part| {
            let text = match part {
                Json::String(text) => text.as_str(),
                _ => part_text(part)?.unwrap_or_default(),
            };
            Ok(serde_json::json!({"type": "text", "text": text}))
        })
        .collect()
}

/// OpenAI sends `function.arguments` as a JSON string; templates want the object (vLLM parses
/// it the same way, and turns a missing or empty one into `{}`).
fn parse_tool_call_arguments(call: &mut Json) -> Result<()> {
    let Some(function) = call.get_mut("function").and_then(Json::as_object_mut) else {
        return Ok(());
    };
    let parsed = match function.get("arguments") {
        Some(Json::String(text)) if !text.is_empty() => {
            serde_json::from_str(text).map_err(|e| {
                EngineError::InvalidRequest(format!("tool call arguments are not JSON: {e}"))
            })?
        }
        Some(Json::Object(_)) | Some(Json::Array(_)) => return Ok(()),
        _ => Json::Object(serde_json::Map::new()),
    };
    function.insert("arguments".into(), parsed);
    Ok(())
}

/// The final message's text, which `continue_final_message` leaves open.
fn final_message_text(messages: &[Json]) -> Result<String> {
    let content = messages.last().and_then(|m| m.get("content"));
    match content {
        Some(Json::String(text)) => Ok(text.clone()),
        // HF takes the last part that has text.
        Some(Json::Array(parts)) => parts
            .iter()
            .rev()
            .find_map(|p| p.get("text").and_then(Json::as_str))
            .map(str::to_owned)
            .ok_or_else(|| {
                EngineError::InvalidRequest(
                    "continue_final_message: the final message has no text to continue".into(),
                )
            }),
        _ => Err(EngineError::InvalidRequest(
            "continue_final_message: the final message has no text to continue".into(),
        )),
    }
}

/// Cut the rendered chat right after the final message's content, keeping its trailing
/// whitespace only when the template kept it (Hugging Face's rule).
fn cut_after_final_message(rendered: String, final_text: &str) -> Result<String> {
    let stripped = final_text.trim();
    let Some(location) = rendered.rfind(stripped) else {
        return Err(EngineError::Template(
            "continue_final_message: the final message does not appear in the rendered chat".into(),
        ));
    };
    let left_stripped = final_text.trim_start();
    let keeps_spacing = rendered
        .get(location..location + left_stripped.len())
        .is_some_and(|s| s == final_text);
    let end = if keeps_spacing {
        location + left_stripped.len()
    } else {
        location + stripped.len()
    };
    let mut rendered = rendered;
    rendered.truncate(end);
    Ok(rendered)
}

/// vLLM's content-format detection, reduced to its core: a template that loops over a message's
/// `content` (`{% for part in message['content'] %}`) wants the OpenAI parts, any other wants a
/// string.
fn detect_content_format(source: &str) -> ContentFormat {
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("%}") else { break };
        let statement =
            after[..end].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        if let Some(loop_header) = statement.strip_prefix("for ") {
            if let Some((_, iterable)) = loop_header.split_once(" in ") {
                let iterable = iterable
                    .split(" if ")
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .trim_end_matches("recursive")
                    .trim();
                let compact: String = iterable.chars().filter(|c| !c.is_whitespace()).collect();
                if compact.ends_with("['content']")
                    || compact.ends_with("[\"content\"]")
                    || compact.ends_with(".content")
                {
                    return ContentFormat::OpenAi;
                }
            }
        }
        rest = &after[end + 2..];
    }
    ContentFormat::String
}

fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// HF's `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`: Python's
/// `json.dumps`, not minijinja's HTML-safe variant (which would escape `<` and `'`).
fn tojson_filter(value: Value, args: Rest<Value>) -> std::result::Result<Value, minijinja::Error> {
    let (positional, kwargs): (&[Value], Kwargs) = from_args(&args)?;
    if positional.len() > 4 {
        return Err(minijinja::Error::new(
            ErrorKind::TooManyArguments,
            "tojson takes at most 4 positional arguments",
        ));
    }
    // Python's parameter order: (ensure_ascii, indent, separators, sort_keys).
    let pick = |index: usize, name: &str| -> std::result::Result<Value, minijinja::Error> {
        let keyword: Option<Value> = kwargs.get(name)?;
        Ok(keyword
            .or_else(|| positional.get(index).cloned())
            .unwrap_or(Value::UNDEFINED))
    };
    let ensure_ascii = pick(0, "ensure_ascii")?.is_true();
    let indent = pick(1, "indent")?;
    let separators = pick(2, "separators")?;
    let sort_keys = pick(3, "sort_keys")?.is_true();
    kwargs.assert_all_used()?;

    let indent = match indent.kind() {
        ValueKind::Undefined | ValueKind::None => None,
        ValueKind::Number => Some(" ".repeat(indent.as_usize().unwrap_or(0))),
        ValueKind::String => Some(indent.as_str().unwrap_or_default().to_owned()),
        _ => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: indent must be an integer or a string",
            ))
        }
    };
    // Python's defaults: ", " between items unless indenting, where the newline separates.
    let (item_separator, key_separator) = match separators.kind() {
        ValueKind::Seq if separators.len() == Some(2) => (
            separators.get_item_by_index(0)?.to_string(),
            separators.get_item_by_index(1)?.to_string(),
        ),
        _ if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        _ => (", ".to_owned(), ": ".to_owned()),
    };
    let dumper = PyJsonDumper {
        ensure_ascii,
        indent,
        item_separator,
        key_separator,
        sort_keys,
    };
    let mut out = String::new();
    dumper.dump(&value, 0, &mut out)?;
    Ok(Value::from(out))
}

/// `json.dumps` with Python's formatting rules over minijinja values.
struct PyJsonDumper {
    ensure_ascii: bool,
    indent: Option<String>,
    item_separator: String,
    key_separator: String,
    sort_keys: bool,
}

impl PyJsonDumper {
    fn dump(
        &self,
        value: &Value,
        depth: usize,
        out: &mut String,
    ) -> std::result::Result<(), minijinja::Error> {
        match value.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number if value.is_integer() => {
                let _ = write!(out, "{value}");
            }
            ValueKind::Number => {
                let float = f64::try_from(value.clone())?;
                out.push_str(&python_float_repr(float));
            }
            ValueKind::String => self.dump_string(value.as_str().unwrap_or_default(), out),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                self.dump_container('[', ']', items.len(), depth, out, |i, out| {
                    self.dump(&items[i], depth + 1, out)
                })?;
            }
            ValueKind::Map => {
                let mut entries: Vec<(String, Value)> = Vec::new();
                for key in value.try_iter()? {
                    let item = value.get_item(&key)?;
                    let key = match key.as_str() {
                        Some(s) => s.to_owned(),
                        None => {
                            let mut k = String::new();
                            self.dump(&key, depth, &mut k)?;
                            k
                        }
                    };
                    entries.push((key, item));
                }
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                self.dump_container('{', '}', entries.len(), depth, out, |i, out| {
                    self.dump_string(&entries[i].0, out);
                    out.push_str(&self.key_separator);
                    self.dump(&entries[i].1, depth + 1, out)
                })?;
            }
            _ => self.dump_string(&value.to_string(), out),
        }
        Ok(())
    }

    fn dump_container(
        &self,
        open: char,
        close: char,
        len: usize,
        depth: usize,
        out: &mut String,
        mut item: impl FnMut(usize, &mut String) -> std::result::Result<(), minijinja::Error>,
    ) -> std::result::Result<(), minijinja::Error> {
        out.push(open);
        if len == 0 {
            out.push(close);
            return Ok(());
        }
        for i in 0..len {
            if i > 0 {
                out.push_str(&self.item_separator);
            }
            if let Some(indent) = &self.indent {
                out.push('\n');
                out.push_str(&indent.repeat(depth + 1));
            }
            item(i, out)?;
        }
        if let Some(indent) = &self.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth));
        }
        out.push(close);
        Ok(())
    }

    fn dump_string(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{08}' => out.push_str("\\b"),
                '\u{0c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && !c.is_ascii()) => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// Python's `repr(float)`: shortest round-trip digits, `1.0` rather than `1`, exponent form
/// (`1e+20`, `1e-05`) outside `1e-4 <= |x| < 1e16`.
fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let magnitude = x.abs();
    if x == 0.0 || (1e-4..1e16).contains(&magnitude) {
        let plain = format!("{x}");
        return if plain.contains('.') {
            plain
        } else {
            plain + ".0"
        };
    }
    // `{:e}` is shortest round-trip too: "1.5e20" -> "1.5e+20", "1e-5" -> "1e-05".
    let scientific = format!("{x:e}");
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let (sign, digits) = match exponent.strip_prefix('-') {
        Some(digits) => ('-', digits),
        None => ('+', exponent),
    };
    format!("{mantissa}e{sign}{digits:0>2}")
}

/// HF's `strftime_now(format)`. The server clock is read as UTC (engines run in UTC containers;
/// there is no timezone database here).
fn strftime_now(format: String) -> String {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime_utc(&format, seconds)
}

const MONTH_NAMES: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAY_NAMES: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// A calendar date from days since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The subset of C `strftime` chat templates use (dates for system prompts), for a UTC time.
fn strftime_utc(format: &str, unix_seconds: i64) -> String {
    let days = unix_seconds.div_euclid(86_400);
    let second_of_day = unix_seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (
        second_of_day / 3600,
        second_of_day % 3600 / 60,
        second_of_day % 60,
    );
    // 1970-01-01 was a Thursday (index 3 with Monday = 0).
    let weekday = (days + 3).rem_euclid(7) as usize;
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };
    let month_name = MONTH_NAMES[month as usize - 1];
    let weekday_name = WEEKDAY_NAMES[weekday];

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        // glibc's `%-d` style flag drops the zero padding.
        let mut spec = chars.next();
        let unpadded = spec == Some('-');
        if unpadded {
            spec = chars.next();
        }
        let number = |value: i64, width: usize| {
            if unpadded {
                value.to_string()
            } else {
                format!("{value:0width$}")
            }
        };
        match spec {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&number(year.rem_euclid(100), 2)),
            Some('m') => out.push_str(&number(i64::from(month), 2)),
            Some('d') => out.push_str(&number(i64::from(day), 2)),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('j') => out.push_str(&number(day_of_year, 3)),
            Some('H') => out.push_str(&number(hour, 2)),
            Some('I') => out.push_str(&number(hour12, 2)),
            Some('M') => out.push_str(&number(minute, 2)),
            Some('S') => out.push_str(&number(second, 2)),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('B') => out.push_str(month_name),
            Some('b') | Some('h') => out.push_str(&month_name[..3]),
            Some('A') => out.push_str(weekday_name),
            Some('a') => out.push_str(&weekday_name[..3]),
            Some('F') => out.push_str(&format!("{year}-{month:02}-{day:02}")),
            Some('T') => out.push_str(&format!("{hour:02}:{minute:02}:{second:02}")),
            Some('Z') => out.push_str("UTC"),
            Some('z') => out.push_str("+0000"),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 of a calendar date (inverse of [`civil_from_days`]).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let month = i64::from(month);
    let day_of_year =
        (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    fn tokens() -> SpecialTokenStrings {
        SpecialTokenStrings {
            bos_token: Some("<s>".into()),
            eos_token: Some("</s>".into()),
            ..Default::default()
        }
    }

    fn render(source: &str, messages: Json, options: &ChatTemplateOptions) -> Result<String> {
        ChatTemplate::new(source)?.render(&messages, options, &tokens())
    }

    #[test]
    fn chatml_with_system_message_and_generation_prompt() {
        let messages = json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
        ]);
        let options = ChatTemplateOptions {
            add_generation_prompt: true,
            ..Default::default()
        };
        let rendered = render(CHATML, messages.clone(), &options).unwrap();
        assert_eq!(
            rendered,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let without = render(CHATML, messages, &ChatTemplateOptions::default()).unwrap();
        assert_eq!(
            without,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn trim_and_lstrip_blocks_like_hugging_face() {
        // Block tags on their own indented lines leave no blank lines or indentation behind, and
        // the single trailing newline of the source is dropped (Jinja2's keep_trailing_newline).
        let source = "{% for m in messages %}\n    {% if m.role == 'user' %}\nU:{{ m.content }}\n    {% endif %}\n{% endfor %}\n";
        let rendered = render(
            source,
            json!([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),
            &ChatTemplateOptions::default(),
        )
        .unwrap();
        assert_eq!(rendered, "U:a\nU:b\n");
    }

    #[test]
    fn raise_exception_becomes_a_template_error() {
        let source = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok";
        let err = render(
            source,
            json!([{"role": "assistant", "content": "x"}]),
            &ChatTemplateOptions::default(),
        )
        .unwrap_err();
        match err {
            EngineError::Template(message) => {
                assert!(
                    message.contains("Conversation must start with user"),
                    "{message}"
                )
            }
            other => panic!("expected a template error, got {other:?}"),
        }
        assert!(matches!(
            ChatTemplate::new("{% for %}"),
            Err(EngineError::Template(_))
        ));
    }

    #[test]
    fn tojson_follows_python_json_dumps() {
        let source = "{{ tools | tojson }}|{{ tools[0] | tojson(indent=2) }}|{{ 'é<\"' | tojson }}|{{ 'é' | tojson(ensure_ascii=True) }}|{{ {'b': 1, 'a': 2.0} | tojson(sort_keys=True) }}";
        let options = ChatTemplateOptions {
            tools: Some(json!([{"name": "f", "params": [1, true, null]}])),
            ..Default::default()
        };
        let rendered = render(source, json!([]), &options).unwrap();
        let expected = [
            r#"[{"name": "f", "params": [1, true, null]}]"#,
            "{\n  \"name\": \"f\",\n  \"params\": [\n    1,\n    true,\n    null\n  ]\n}",
            r#""é<\"""#,
            r#""\u00e9""#,
            r#"{"a": 2.0, "b": 1}"#,
        ]
        .join("|");
        assert_eq!(rendered, expected);
    }

    #[test]
    fn python_float_repr_matches_python() {
        // Values printed by CPython 3.11 `repr`.
        for (x, python) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (1e16, "1e+16"),
            (1.5e20, "1.5e+20"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (123456789.0, "123456789.0"),
        ] {
            assert_eq!(python_float_repr(x), python);
        }
    }

    #[test]
    fn content_parts_join_for_string_templates_and_pass_through_for_loops() {
        let messages = json!([{"role": "user", "content": [
            {"type": "text", "text": "first"},
            {"type": "text", "text": "second"},
        ]}]);
        let joined = render(CHATML, messages.clone(), &ChatTemplateOptions::default()).unwrap();
        assert_eq!(joined, "<|im_start|>user\nfirst\nsecond<|im_end|>\n");

        let looping = "{% for m in messages %}{% for part in m['content'] %}[{{ part.text }}]{% endfor %}{% endfor %}";
        let rendered = render(looping, messages, &ChatTemplateOptions::default()).unwrap();
        assert_eq!(rendered, "[first][second]");

        let image = json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]);
        assert!(matches!(
            render(CHATML, image, &ChatTemplateOptions::default()),
            Err(EngineError::InvalidRequest(_))
        ));
    }

    #[test]
    fn continue_final_message_cuts_after_the_final_content() {
        let messages = json!([
            {"role": "user", "content": "Name a colour"},
            {"role": "assistant", "content": "The colour is"},
        ]);
        let options = ChatTemplateOptions {
            continue_final_message: true,
            ..Default::default()
        };
        let rendered = render(CHATML, messages.clone(), &options).unwrap();
        assert_eq!(
            rendered,
            "<|im_start|>user\nName a colour<|im_end|>\n<|im_start|>assistant\nThe colour is"
        );
        // A template that trims the content: the trailing space cannot be kept.
        let trimming = "{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}</{{ m.role }}>{% endfor %}";
        let spaced = json!([{"role": "assistant", "content": "Sure thing "}]);
        assert_eq!(
            render(trimming, spaced, &options).unwrap(),
            "<assistant>Sure thing"
        );
        let both = ChatTemplateOptions {
            continue_final_message: true,
            add_generation_prompt: true,
            ..Default::default()
        };
        assert!(render(CHATML, messages, &both).is_err());
    }

    #[test]
    fn variables_kwargs_and_python_methods() {
        let source = "{{ bos_token }}{% if enable_thinking %}T{% endif %}{{ messages[0].content.strip().upper() }}{{ messages[0].get('name', 'anon') }}{% if tools is none %}-{% endif %}{{ eos_token }}";
        let mut kwargs = serde_json::Map::new();
        kwargs.insert("enable_thinking".into(), json!(true));
        let options = ChatTemplateOptions {
            kwargs,
            ..Default::default()
        };
        let rendered = render(
            source,
            json!([{"role": "user", "content": "  hi "}]),
            &options,
        )
        .unwrap();
        assert_eq!(rendered, "<s>THIanon-</s>");
    }

    #[test]
    fn tool_call_arguments_become_objects() {
        let source = "{% for m in messages %}{% for c in m.tool_calls %}{{ c.function.arguments.city }}{% endfor %}{% endfor %}";
        let messages = json!([{"role": "assistant", "content": null, "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "w", "arguments": "{\"city\": \"Oslo\"}"}}
        ]}]);
        assert_eq!(
            render(source, messages, &ChatTemplateOptions::default()).unwrap(),
            "Oslo"
        );
    }

    #[test]
    fn strftime_formats_known_instants() {
        // 2024-02-29T13:05:09Z, a Thursday (leap day), is 1709211909 seconds after the epoch.
        assert_eq!(
            strftime_utc(
                "%Y-%m-%d %H:%M:%S %A %a %B %b %j %I%p %-d %y %%",
                1_709_211_909
            ),
            "2024-02-29 13:05:09 Thursday Thu February Feb 060 01PM 29 24 %"
        );
        assert_eq!(strftime_utc("%d %b %Y", 0), "01 Jan 1970");
        for days in [-1000, 0, 59, 365, 11_016, 20_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }
}
