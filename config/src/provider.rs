//! Provider prefixes (`openai/`, `hosted_vllm/`, `groq/` ...) and what each implies by default:
//! the wire format, the base URL and the environment variable holding its key.

use std::fmt;

/// The wire format a provider speaks. Only the OpenAI-compatible family is served by the
/// gateway core; the others are parsed so configs load, and are routed once their translator
/// exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireFormat {
    OpenAi,
    Azure,
    Anthropic,
    Gemini,
    VertexAi,
    Bedrock,
    Ollama,
    Cohere,
    HuggingFace,
}

/// A provider prefix as written in `litellm_params.model`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProviderKind(String);

struct ProviderFacts {
    prefix: &'static str,
    format: WireFormat,
    default_base: Option<&'static str>,
    base_env: Option<&'static str>,
    key_env: &'static [&'static str],
}

const PROVIDERS: &[ProviderFacts] = &[
    ProviderFacts {
        prefix: "openai",
        format: WireFormat::OpenAi,
        default_base: Some("https://api.openai.com/v1"),
        base_env: Some("OPENAI_API_BASE"),
        key_env: &["OPENAI_API_KEY"],
    },
    ProviderFacts {
        prefix: "text-completion-openai",
        format: WireFormat::OpenAi,
        default_base: Some("https://api.openai.com/v1"),
        base_env: Some("OPENAI_API_BASE"),
        key_env: &["OPENAI_API_KEY"],
    },
    ProviderFacts {
        prefix: "hosted_vllm",
        format: WireFormat::OpenAi,
        default_base: None,
        base_env: Some("HOSTED_VLLM_API_BASE"),
        key_env: &["HOSTED_VLLM_API_KEY"],
    },
    ProviderFacts {
        prefix: "vllm",
        format: WireFormat::OpenAi,
        default_base: None,
        base_env: Some("HOSTED_VLLM_API_BASE"),
        key_env: &["HOSTED_VLLM_API_KEY"],
    },
    ProviderFacts {
        prefix: "groq",
        format: WireFormat::OpenAi,
        default_base: Some("https://api.groq.com/openai/v1"),
        base_env: None,
        key_env: &["GROQ_API_KEY"],
    },
    ProviderFacts {
        prefix: "together_ai",
        format: WireFormat::OpenAi,
        default_base: Some("https://api.together.xyz/v1"),
        base_env: None,
        key_env: &["TOGETHERAI_API_KEY", "TOGETHER_API_KEY"],
    },
    ProviderFacts {
        prefix: "deepseek",
        format: WireFormat::OpenAi,
        default_base: Some("https://api.deepseek.com/v1"),
        base_env: Some("DEEPSEEK_API_BASE"),
        key_env: &["DEEPSEEK_API_KEY"],
    },
    ProviderFacts {
        prefix: "mistral",
        format: WireFormat::OpenAi,
        default_base: Some("https://api.mistral.ai/v1"),
        base_env: Some("MISTRAL_API_BASE"),
        key_env: &["MISTRAL_API_KEY"],
    },
    ProviderFacts {
        prefix: "fireworks_ai",
        format: WireFormat::OpenAi,
        default_base: Some("https://api.fireworks.ai/inference/v1"),
        base_env: None,
        key_env: &["FIREWORKS_AI_API_KEY", "FIREWORKS_API_KEY"],
    },
    ProviderFacts {
        prefix: "openrouter",
        format: WireFormat::OpenAi,
        default_base: Some("https://openrouter.ai/api/v1"),
        base_env: Some("OPENROUTER_API_BASE"),
        key_env: &["OPENROUTER_API_KEY"],
    },
    ProviderFacts {
        prefix: "xinference",
        format: WireFormat::OpenAi,
        default_base: Some("http://127.0.0.1:9997/v1"),
        base_env: Some("XINFERENCE_API_BASE"),
        key_env: &["XINFERENCE_API_KEY"],
    },
    ProviderFacts {
        prefix: "perplexity",
        format: WireFormat::OpenAi,
        default_base: Some("https://api.perplexity.ai"),
        base_env: None,
        key_env: &["PERPLEXITYAI_API_KEY", "PERPLEXITY_API_KEY"],
    },
    ProviderFacts {
        prefix: "deepinfra",
        format: WireFormat::OpenAi,
        default_base: Some("https://api.deepinfra.com/v1/openai"),
        base_env: None,
        key_env: &["DEEPINFRA_API_KEY"],
    },
    ProviderFacts {
        prefix: "cerebras",
        format: WireFormat::OpenAi,
        default_base: Some("https://api.cerebras.ai/v1"),
        base_env: None,
        key_env: &["CEREBRAS_API_KEY"],
    },
    ProviderFacts {
        prefix: "xai",
        format: WireFormat::OpenAi,
        default_base: Some("https://api.x.ai/v1"),
        base_env: None,
        key_env: &["XAI_API_KEY"],
    },
    ProviderFacts {
        prefix: "nvidia_nim",
        format: WireFormat::OpenAi,
        default_base: Some("https://integrate.api.nvidia.com/v1"),
        base_env: Some("NVIDIA_NIM_API_BASE"),
        key_env: &["NVIDIA_NIM_API_KEY"],
    },
    ProviderFacts {
        prefix: "sambanova",
        format: WireFormat::OpenAi,
        default_base: Some("https://api.sambanova.ai/v1"),
        base_env: None,
        key_env: &["SAMBANOVA_API_KEY"],
    },
    ProviderFacts {
        prefix: "anyscale",
        format: WireFormat::OpenAi,
        default_base: Some("https://api.endpoints.anyscale.com/v1"),
        base_env: None,
        key_env: &["ANYSCALE_API_KEY"],
    },
    ProviderFacts {
        prefix: "lm_studio",
        format: WireFormat::OpenAi,
        default_base: Some("http://localhost:1234/v1"),
        base_env: Some("LM_STUDIO_API_BASE"),
        key_env: &["LM_STUDIO_API_KEY"],
    },
    ProviderFacts {
        prefix: "github",
        format: WireFormat::OpenAi,
        default_base: Some("https://models.inference.ai.azure.com"),
        base_env: None,
        key_env: &["GITHUB_API_KEY"],
    },
    ProviderFacts {
        prefix: "azure",
        format: WireFormat::Azure,
        default_base: None,
        base_env: Some("AZURE_API_BASE"),
        key_env: &["AZURE_API_KEY"],
    },
    ProviderFacts {
        prefix: "azure_ai",
        format: WireFormat::OpenAi,
        default_base: None,
        base_env: Some("AZURE_AI_API_BASE"),
        key_env: &["AZURE_AI_API_KEY"],
    },
    ProviderFacts {
        prefix: "anthropic",
        format: WireFormat::Anthropic,
        default_base: Some("https://api.anthropic.com"),
        base_env: Some("ANTHROPIC_API_BASE"),
        key_env: &["ANTHROPIC_API_KEY"],
    },
    ProviderFacts {
        prefix: "gemini",
        format: WireFormat::Gemini,
        default_base: Some("https://generativelanguage.googleapis.com"),
        base_env: None,
        key_env: &["GEMINI_API_KEY"],
    },
    ProviderFacts {
        prefix: "vertex_ai",
        format: WireFormat::VertexAi,
        default_base: None,
        base_env: None,
        key_env: &[],
    },
    ProviderFacts {
        prefix: "bedrock",
        format: WireFormat::Bedrock,
        default_base: None,
        base_env: None,
        key_env: &[],
    },
    ProviderFacts {
        prefix: "ollama",
        format: WireFormat::Ollama,
        default_base: Some("http://localhost:11434"),
        base_env: Some("OLLAMA_API_BASE"),
        key_env: &[],
    },
    ProviderFacts {
        prefix: "ollama_chat",
        format: WireFormat::Ollama,
        default_base: Some("http://localhost:11434"),
        base_env: Some("OLLAMA_API_BASE"),
        key_env: &[],
    },
    ProviderFacts {
        prefix: "cohere",
        format: WireFormat::Cohere,
        default_base: Some("https://api.cohere.com"),
        base_env: None,
        key_env: &["COHERE_API_KEY", "CO_API_KEY"],
    },
    ProviderFacts {
        prefix: "cohere_chat",
        format: WireFormat::Cohere,
        default_base: Some("https://api.cohere.com"),
        base_env: None,
        key_env: &["COHERE_API_KEY", "CO_API_KEY"],
    },
    ProviderFacts {
        prefix: "huggingface",
        format: WireFormat::HuggingFace,
        default_base: Some("https://router.huggingface.co/v1"),
        base_env: None,
        key_env: &["HUGGINGFACE_API_KEY", "HF_TOKEN"],
    },
];

impl ProviderKind {
    /// Looks up a known prefix; `None` for a prefix Sluice does not know.
    pub fn from_prefix(prefix: &str) -> Option<Self> {
        PROVIDERS
            .iter()
            .any(|p| p.prefix == prefix)
            .then(|| ProviderKind(prefix.to_string()))
    }

    fn facts(&self) -> &'static ProviderFacts {
        PROVIDERS
            .iter()
            .find(|p| p.prefix == self.0)
            .expect("ProviderKind is only built from a known prefix")
    }

    pub fn name(&self) -> &str {
        &self.0
    }

    pub fn wire_format(&self) -> WireFormat {
        self.facts().format
    }

    pub fn is_hosted_vllm(&self) -> bool {
        self.0 == "hosted_vllm" || self.0 == "vllm"
    }

    /// The base URL used when the deployment gives no `api_base`: the provider's environment
    /// variable first (as LiteLLM does), then its public endpoint.
    pub fn default_api_base(&self) -> Option<String> {
        let f = self.facts();
        f.base_env
            .and_then(|v| std::env::var(v).ok())
            .filter(|v| !v.is_empty())
            .or_else(|| f.default_base.map(str::to_string))
    }

    /// The key from the provider's usual environment variable, if set.
    pub fn default_api_key(&self) -> Option<String> {
        self.facts()
            .key_env
            .iter()
            .find_map(|v| std::env::var(v).ok().filter(|v| !v.is_empty()))
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Splits `provider/model` into its provider and upstream model. Names without a known prefix
/// get the provider LiteLLM would infer from well-known model names, else `None`.
pub fn split_model(model: &str) -> Option<(ProviderKind, String)> {
    if let Some((prefix, rest)) = model.split_once('/') {
        if let Some(kind) = ProviderKind::from_prefix(prefix) {
            return Some((kind, rest.to_string()));
        }
    }
    infer_provider(model).map(|kind| (kind, model.to_string()))
}

fn infer_provider(model: &str) -> Option<ProviderKind> {
    const OPENAI: &[&str] = &[
        "gpt-",
        "chatgpt-",
        "o1",
        "o3",
        "o4",
        "text-embedding-",
        "davinci",
        "babbage",
        "ft:gpt",
        "text-moderation",
        "omni-moderation",
        "dall-e",
        "whisper",
        "tts-",
        "gpt4",
    ];
    let prefix = if OPENAI.iter().any(|p| model.starts_with(p)) {
        "openai"
    } else if model.starts_with("claude") {
        "anthropic"
    } else if model.starts_with("gemini") {
        "gemini"
    } else if model.starts_with("command") || model.starts_with("embed-") {
        "cohere"
    } else if model.starts_with("mistral-") || model.starts_with("open-mistral") {
        "mistral"
    } else {
        return None;
    };
    ProviderKind::from_prefix(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_prefixed_and_bare_names() {
        let (p, m) = split_model("hosted_vllm/meta-llama/Llama-3-8B").unwrap();
        assert_eq!(p.name(), "hosted_vllm");
        assert_eq!(m, "meta-llama/Llama-3-8B");
        let (p, m) = split_model("gpt-4o-mini").unwrap();
        assert_eq!(p.name(), "openai");
        assert_eq!(m, "gpt-4o-mini");
        let (p, _) = split_model("groq/llama3-8b-8192").unwrap();
        assert_eq!(
            p.default_api_base().unwrap(),
            "https://api.groq.com/openai/v1"
        );
        assert!(split_model("some-unknown-model").is_none());
        // An unknown prefix is part of the model name, not a provider.
        assert!(split_model("meta-llama/Llama-3-8B").is_none());
    }
}
