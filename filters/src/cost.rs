//! A bundled model price table, so the gateway can put a USD figure on a call without fetching
//! anything: list prices (USD per token) for the common OpenAI, Anthropic, Gemini, Mistral, Groq,
//! Bedrock and Cohere models, taken from LiteLLM's `model_prices_and_context_window.json`. The
//! data lives in `filters/data/model_prices.json`; its `date` and `source` say where it came from.

use serde::Deserialize;
use std::collections::HashMap;
use std::sync::OnceLock;

/// The data file compiled into the binary.
const BUNDLED_JSON: &str = include_str!("../data/model_prices.json");

/// Per-token list prices and limits for one model, in LiteLLM's field names.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct Price {
    pub input_cost_per_token: f64,
    pub output_cost_per_token: f64,
    #[serde(default)]
    pub max_input_tokens: Option<u64>,
    #[serde(default)]
    pub max_output_tokens: Option<u64>,
    #[serde(default)]
    pub cache_read_input_token_cost: Option<f64>,
    #[serde(default)]
    pub cache_creation_input_token_cost: Option<f64>,
}

/// Prices by model name, as of [`PriceTable::date`].
#[derive(Debug, Clone, Deserialize)]
pub struct PriceTable {
    date: String,
    source: String,
    models: HashMap<String, Price>,
}

/// Provider prefixes whose models are priced as the provider's own list price, so
/// `"openai/gpt-4o"` costs what `"gpt-4o"` does. Other prefixes (resellers such as `openrouter/`,
/// self-hosted `ollama/`) have their own prices and are not mapped onto these.
const STRIPPED_PREFIXES: &[&str] = &[
    "openai",
    "text-completion-openai",
    "anthropic",
    "bedrock",
    "gemini",
    "vertex_ai",
    "vertex_ai_beta",
    "mistral",
    "cohere",
    "cohere_chat",
];

/// Azure deployments are named by their owner, so the name says nothing about the model behind
/// it; these are only priceable through a `base_model`.
const DEPLOYMENT_PREFIXES: &[&str] = &["azure", "azure_ai"];

impl PriceTable {
    /// Parses a table in the bundled file's shape: `{"date", "source", "models": {name: Price}}`.
    /// Unknown fields (such as `litellm_provider`) are ignored.
    pub fn from_json(json: &str) -> Result<PriceTable, String> {
        serde_json::from_str(json).map_err(|e| format!("invalid price table: {e}"))
    }

    /// The table compiled into the binary, parsed on first use. The data file is checked by a
    /// unit test, so the parse cannot fail in a tested build.
    pub fn bundled() -> &'static PriceTable {
        static TABLE: OnceLock<PriceTable> = OnceLock::new();
        TABLE.get_or_init(|| {
            PriceTable::from_json(BUNDLED_JSON)
                .unwrap_or_else(|e| panic!("filters/data/model_prices.json: {e}"))
        })
    }

    /// The date of the price data, `YYYY-MM-DD`.
    pub fn date(&self) -> &str {
        &self.date
    }

    /// Where the price data came from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Price for a model as the gateway knows it (the `model` of a `litellm_params` entry). Tries,
    /// in order: the exact name (which is how `groq/...` names are stored); the name with a known
    /// provider prefix removed (`openai/`, `anthropic/`, `bedrock/` with an optional `converse/`
    /// or `invoke/`, `gemini/`, `vertex_ai/`, `mistral/`, `cohere/`); then, for a name ending in a
    /// date (`-2024-08-06` or `-20241022`) that is not itself in the table, the undated name.
    /// `azure/<deployment>` is never priced from its name; see
    /// [`PriceTable::lookup_with_base_model`].
    pub fn lookup(&self, model: &str) -> Option<&Price> {
        self.lookup_inner(model, false)
    }

    /// Like [`PriceTable::lookup`], but when `base_model` (LiteLLM's `model_info.base_model`, for
    /// example `"azure/gpt-4o-2024-08-06"`) is given it is priced instead of `model`, and an
    /// `azure/` prefix on it is removed like any other provider prefix.
    pub fn lookup_with_base_model(&self, model: &str, base_model: Option<&str>) -> Option<&Price> {
        match base_model.map(str::trim).filter(|b| !b.is_empty()) {
            Some(base) => self.lookup_inner(base, true),
            None => self.lookup_inner(model, false),
        }
    }

    fn lookup_inner(&self, model: &str, strip_deployment: bool) -> Option<&Price> {
        let model = model.trim();
        if model.is_empty() {
            return None;
        }
        let stripped = strip_provider(model, strip_deployment);
        let candidates = [Some(model), stripped];
        candidates
            .iter()
            .flatten()
            .find_map(|name| self.models.get(*name))
            .or_else(|| {
                candidates
                    .iter()
                    .flatten()
                    .filter_map(|name| without_date_suffix(name))
                    .find_map(|name| self.models.get(name))
            })
    }
}

/// `model` without its provider prefix, or `None` when the prefix is not one priced at the
/// provider's list price.
fn strip_provider(model: &str, strip_deployment: bool) -> Option<&str> {
    let (prefix, rest) = model.split_once('/')?;
    let known = STRIPPED_PREFIXES.contains(&prefix)
        || (strip_deployment && DEPLOYMENT_PREFIXES.contains(&prefix));
    if !known {
        return None;
    }
    let rest = if prefix == "bedrock" {
        rest.strip_prefix("converse/")
            .or_else(|| rest.strip_prefix("invoke/"))
            .unwrap_or(rest)
    } else {
        rest
    };
    (!rest.is_empty()).then_some(rest)
}

/// `name` without a trailing release date, `-YYYY-MM-DD` or `-YYYYMMDD`.
fn without_date_suffix(name: &str) -> Option<&str> {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let plausible = |year: &str, month: &str, day: &str| {
        year.starts_with("20")
            && matches!(month.parse::<u8>(), Ok(1..=12))
            && matches!(day.parse::<u8>(), Ok(1..=31))
    };
    let (base, date) = name.rsplit_once('-')?;
    if date.len() == 8 && digits(date) && plausible(&date[..4], &date[4..6], &date[6..]) {
        return (!base.is_empty()).then_some(base);
    }
    // -YYYY-MM-DD: the last three dash-separated parts.
    let (rest, day) = (base, date);
    let (rest, month) = rest.rsplit_once('-')?;
    let (base, year) = rest.rsplit_once('-')?;
    let shaped = year.len() == 4 && month.len() == 2 && day.len() == 2;
    if shaped && digits(year) && digits(month) && digits(day) && plausible(year, month, day) {
        return (!base.is_empty()).then_some(base);
    }
    None
}

/// USD cost of a call: `prompt_tokens * input_cost_per_token + completion_tokens *
/// output_cost_per_token`.
pub fn cost(price: &Price, prompt_tokens: u64, completion_tokens: u64) -> f64 {
    prompt_tokens as f64 * price.input_cost_per_token
        + completion_tokens as f64 * price.output_cost_per_token
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> &'static PriceTable {
        PriceTable::bundled()
    }

    fn price(model: &str) -> &'static Price {
        table()
            .lookup(model)
            .unwrap_or_else(|| panic!("{model} not in the bundled table"))
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * a.abs().max(b.abs()).max(1.0)
    }

    #[test]
    fn bundled_table_parses_and_has_a_date_and_source() {
        let t = PriceTable::from_json(BUNDLED_JSON).expect("bundled table parses");
        let date = t.date();
        assert_eq!(date.len(), 10, "{date}");
        assert!(
            chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d").is_ok(),
            "{date}"
        );
        assert!(!t.source().is_empty());
        assert_eq!(PriceTable::bundled().date(), date);
    }

    #[test]
    fn bundled_prices_are_sane() {
        for (name, p) in &table().models {
            assert!(
                p.input_cost_per_token.is_finite() && p.input_cost_per_token > 0.0,
                "{name}"
            );
            assert!(
                p.output_cost_per_token.is_finite() && p.output_cost_per_token >= 0.0,
                "{name}"
            );
            // Nothing in the table costs $1,000 or more per million tokens.
            assert!(
                p.input_cost_per_token < 1e-3 && p.output_cost_per_token < 1e-3,
                "{name}"
            );
            for extra in [
                p.cache_read_input_token_cost,
                p.cache_creation_input_token_cost,
            ] {
                assert!(extra.is_none_or(|c| c.is_finite() && c >= 0.0), "{name}");
            }
        }
    }

    #[test]
    fn bundled_table_covers_the_common_models() {
        for model in [
            "gpt-4o",
            "gpt-4o-mini",
            "gpt-4.1",
            "gpt-4.1-mini",
            "gpt-4.1-nano",
            "gpt-4-turbo",
            "gpt-3.5-turbo",
            "o1",
            "o3-mini",
            "o4-mini",
            "text-embedding-3-small",
            "text-embedding-3-large",
            "text-embedding-ada-002",
            "claude-3-haiku-20240307",
            "claude-3-5-haiku-20241022",
            "claude-3-5-sonnet-20240620",
            "claude-3-5-sonnet-20241022",
            "claude-3-7-sonnet-20250219",
            "claude-sonnet-4-20250514",
            "claude-opus-4-20250514",
            "gemini-1.5-flash",
            "gemini-1.5-pro",
            "gemini-2.0-flash",
            "gemini-2.5-flash",
            "gemini-2.5-pro",
            "text-embedding-004",
            "mistral-large-latest",
            "mistral-small-latest",
            "open-mistral-nemo",
            "codestral-latest",
            "groq/llama-3.1-8b-instant",
            "groq/llama-3.3-70b-versatile",
            "anthropic.claude-3-5-sonnet-20240620-v1:0",
            "anthropic.claude-3-haiku-20240307-v1:0",
            "amazon.titan-embed-text-v2:0",
            "meta.llama3-1-70b-instruct-v1:0",
            "amazon.nova-pro-v1:0",
            "amazon.nova-lite-v1:0",
            "command-r",
            "command-r-plus",
            "embed-english-v3.0",
        ] {
            assert!(table().models.contains_key(model), "{model} missing");
        }
    }

    #[test]
    fn known_list_prices() {
        let mini = price("gpt-4o-mini");
        assert_eq!(mini.input_cost_per_token, 0.000_000_15);
        assert_eq!(mini.output_cost_per_token, 0.000_000_6);
        assert_eq!(mini.max_input_tokens, Some(128_000));
        let sonnet = price("claude-3-5-sonnet-20241022");
        assert_eq!(sonnet.input_cost_per_token, 0.000_003);
        assert_eq!(sonnet.output_cost_per_token, 0.000_015);
        assert_eq!(sonnet.cache_read_input_token_cost, Some(0.000_000_3));
        assert_eq!(sonnet.cache_creation_input_token_cost, Some(0.000_003_75));
        let embed = price("text-embedding-3-small");
        assert_eq!(embed.output_cost_per_token, 0.0);
        assert_eq!(embed.max_output_tokens, None);
    }

    #[test]
    fn lookup_strips_provider_prefixes() {
        assert_eq!(table().lookup("openai/gpt-4o"), table().lookup("gpt-4o"));
        assert_eq!(
            table().lookup("anthropic/claude-3-5-sonnet-20241022"),
            table().lookup("claude-3-5-sonnet-20241022")
        );
        assert_eq!(
            table().lookup("bedrock/anthropic.claude-3-5-sonnet-20240620-v1:0"),
            table().lookup("anthropic.claude-3-5-sonnet-20240620-v1:0")
        );
        assert_eq!(
            table().lookup("bedrock/converse/amazon.nova-pro-v1:0"),
            table().lookup("amazon.nova-pro-v1:0")
        );
        assert_eq!(
            table().lookup("gemini/gemini-2.0-flash"),
            table().lookup("gemini-2.0-flash")
        );
        assert_eq!(
            table().lookup("vertex_ai/gemini-1.5-pro"),
            table().lookup("gemini-1.5-pro")
        );
        assert_eq!(
            table().lookup("mistral/mistral-large-latest"),
            table().lookup("mistral-large-latest")
        );
        assert_eq!(
            table().lookup("cohere/command-r"),
            table().lookup("command-r")
        );
        assert!(table().lookup("  openai/gpt-4o-mini ").is_some());
        for model in [
            "openai/gpt-4o",
            "anthropic/claude-sonnet-4-20250514",
            "gemini/gemini-2.5-pro",
            "bedrock/amazon.titan-embed-text-v2:0",
        ] {
            assert!(table().lookup(model).is_some(), "{model}");
        }
    }

    #[test]
    fn groq_names_keep_their_prefix() {
        let p = price("groq/llama-3.1-8b-instant");
        assert_eq!(p.input_cost_per_token, 0.000_000_05);
        assert!(table().lookup("groq/llama-3.3-70b-versatile").is_some());
        // The groq price is Groq's, not a generic price for the bare model name.
        assert!(table().lookup("llama-3.1-8b-instant").is_none());
    }

    #[test]
    fn dated_names_fall_back_to_the_undated_entry() {
        assert_eq!(
            table().lookup("o3-mini-2025-01-31"),
            table().lookup("o3-mini")
        );
        assert_eq!(
            table().lookup("openai/gpt-4.1-mini-2025-04-14"),
            table().lookup("gpt-4.1-mini")
        );
        // A dated entry in the table wins over its undated name: gpt-4o-2024-05-13 is dearer.
        assert_eq!(price("gpt-4o-2024-05-13").input_cost_per_token, 0.000_005);
        assert_eq!(price("gpt-4o").input_cost_per_token, 0.000_002_5);
        // Compact dates, with a table that only has the undated name.
        let t = PriceTable::from_json(
            r#"{"date": "2025-01-01", "source": "test", "models": {
                "claude-x": {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}}}"#,
        )
        .unwrap();
        assert!(t.lookup("claude-x-20250101").is_some());
        assert!(t.lookup("anthropic/claude-x-20250101").is_some());
        assert!(t.lookup("claude-x-2025-01-01").is_some());
        assert!(t.lookup("claude-x-1234").is_none());
        assert!(t.lookup("claude-x-20251399").is_none());
        assert!(t.lookup("claude-y-20250101").is_none());
    }

    #[test]
    fn date_suffixes() {
        assert_eq!(without_date_suffix("gpt-4o-2024-08-06"), Some("gpt-4o"));
        assert_eq!(
            without_date_suffix("claude-3-5-sonnet-20241022"),
            Some("claude-3-5-sonnet")
        );
        assert_eq!(without_date_suffix("gpt-3.5-turbo-0125"), None);
        assert_eq!(without_date_suffix("gpt-4o"), None);
        assert_eq!(without_date_suffix("-20241022"), None);
        assert_eq!(without_date_suffix("2024-08-06"), None);
    }

    #[test]
    fn azure_deployments_need_a_base_model() {
        assert!(table().lookup("azure/gpt-4o").is_none());
        assert!(table().lookup("azure/my-prod-deployment").is_none());
        assert!(table().lookup("azure_ai/gpt-4o").is_none());
        let t = table();
        assert_eq!(
            t.lookup_with_base_model("azure/my-prod-deployment", Some("azure/gpt-4o-2024-08-06")),
            t.lookup("gpt-4o-2024-08-06")
        );
        assert_eq!(
            t.lookup_with_base_model("azure/my-prod-deployment", Some("gpt-4o-mini")),
            t.lookup("gpt-4o-mini")
        );
        assert!(t
            .lookup_with_base_model("azure/my-prod-deployment", None)
            .is_none());
        assert!(t
            .lookup_with_base_model("azure/my-prod-deployment", Some(" "))
            .is_none());
        assert_eq!(
            t.lookup_with_base_model("openai/gpt-4o", None),
            t.lookup("gpt-4o")
        );
    }

    #[test]
    fn unknown_models_are_none() {
        for model in [
            "",
            "  ",
            "gpt-9",
            "openai/",
            "openai/gpt-9",
            "openrouter/openai/gpt-4o",
            "ollama/llama3",
            "my-custom-model",
        ] {
            assert!(table().lookup(model).is_none(), "{model:?}");
        }
    }

    #[test]
    fn cost_arithmetic() {
        let mini = price("gpt-4o-mini");
        let expected = 1000.0 * 0.000_000_15 + 500.0 * 0.000_000_6;
        assert!(close(cost(mini, 1000, 500), expected));
        assert!(close(cost(mini, 1000, 500), 0.000_45));
        assert_eq!(cost(mini, 0, 0), 0.0);
        let opus = price("claude-opus-4-20250514");
        assert!(close(cost(opus, 1_000_000, 1_000_000), 15.0 + 75.0));
        let embed = price("openai/text-embedding-3-small");
        assert!(close(cost(embed, 1_000_000, 0), 0.02));
    }
}
