//! Sampling: logits processors (penalties, logit bias, min_tokens, allowed ids) and the draw
//! itself (greedy, temperature, top-k, top-p, min-p), reproducible per request with `seed`.

/// Per-request sampling and stopping parameters, with vLLM's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 or -1 disables.
    pub top_k: i32,
    pub min_p: f32,
    pub seed: Option<u64>,
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub logit_bias: Vec<(u32, f32)>,
    pub allowed_token_ids: Option<Vec<u32>>,
    pub max_tokens: usize,
    pub min_tokens: usize,
    pub ignore_eos: bool,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub include_stop_str_in_output: bool,
    /// Some(k): return the chosen token's logprob and the k most likely alternatives.
    pub logprobs: Option<usize>,
    pub n: usize,
    pub skip_special_tokens: bool,
    pub spaces_between_special_tokens: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            allowed_token_ids: None,
            max_tokens: 16,
            min_tokens: 0,
            ignore_eos: false,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            include_stop_str_in_output: false,
            logprobs: None,
            n: 1,
            skip_special_tokens: true,
            spaces_between_special_tokens: true,
        }
    }
}

/// The chosen token's log-probability (from the model's raw distribution) and the top
/// alternatives, most likely first.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// What the sampler needs to know about the sequence.
pub struct SampleContext<'a> {
    pub prompt_tokens: &'a [u32],
    pub output_tokens: &'a [u32],
    /// EOS ids of the model, masked (with `stop_token_ids`) while output < min_tokens.
    pub eos_token_ids: &'a [u32],
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: Option<TokenLogprob>,
}

/// One sequence's sampler (holds its random generator).
pub struct Sampler {}

impl Sampler {
    /// `choice` distinguishes the n choices of one request so a seeded request with n > 1 gets
    /// different but reproducible draws.
    pub fn new(params: &SamplingParams, choice: usize) -> Self {
        let _ = (params, choice);
        todo!("sampling helper")
    }

    /// Pick the next token. `logits` may be modified in place.
    pub fn sample(
        &mut self,
        params: &SamplingParams,
        logits: &mut [f32],
        ctx: &SampleContext<'_>,
    ) -> Sampled {
        let _ = (params, logits, ctx);
        todo!("sampling helper")
    }
}
