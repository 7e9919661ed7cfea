//! Chat templates rendered with minijinja the way Hugging Face renders them.

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

pub struct ChatTemplate {}
