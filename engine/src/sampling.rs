//! Sampling: logits processors (penalties, logit bias, min_tokens, allowed ids) and the draw
//! itself (greedy, temperature, top-k, top-p, min-p), reproducible per request with `seed`.
//!
//! The order follows vLLM: allowed_token_ids mask, min_tokens mask, logit_bias, repetition
//! penalty, presence/frequency penalties, then temperature, top-k, top-p, min-p and the draw.
//! Logprobs describe the model's raw distribution (vLLM's default `raw_logprobs`), not the
//! processed one.

use std::cmp::Ordering;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

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

/// One sequence's sampler: its random generator plus scratch buffers reused across calls, so a
/// decode step allocates nothing once the buffers have grown to the vocabulary size.
pub struct Sampler {
    rng: StdRng,
    /// Raw logits copied before processing, only when logprobs are requested.
    raw_logits: Vec<f32>,
    /// Tokens still in the running after top-k / top-p / min-p, with their weight.
    candidates: Vec<Candidate>,
    /// Sorted copy of the output tokens, to count occurrences for the penalties.
    sorted_output: Vec<u32>,
    /// One bit per vocabulary id, cleared after every use.
    marks: TokenBits,
}

/// A token id with a logit (before softmax) or an unnormalised probability (after).
#[derive(Debug, Clone, Copy)]
struct Candidate {
    id: u32,
    value: f32,
}

/// Below this temperature the draw is a greedy argmax (vLLM's `_SAMPLING_EPS`).
pub const GREEDY_TEMPERATURE_EPS: f32 = 1e-5;

impl SamplingParams {
    /// Whether the draw is an argmax (temperature 0, or so close that softmax would overflow).
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_TEMPERATURE_EPS
    }
}

impl Sampler {
    /// `choice` distinguishes the n choices of one request so a seeded request with n > 1 gets
    /// different but reproducible draws.
    pub fn new(params: &SamplingParams, choice: usize) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(mix_seed(seed, choice as u64)),
            None => StdRng::from_entropy(),
        };
        Sampler {
            rng,
            raw_logits: Vec::new(),
            candidates: Vec::new(),
            sorted_output: Vec::new(),
            marks: TokenBits::default(),
        }
    }

    /// Pick the next token. `logits` may be modified in place.
    pub fn sample(
        &mut self,
        params: &SamplingParams,
        logits: &mut [f32],
        ctx: &SampleContext<'_>,
    ) -> Sampled {
        let want_logprobs = params.logprobs.is_some() && !logits.is_empty();
        if want_logprobs {
            self.raw_logits.clear();
            self.raw_logits.extend_from_slice(logits);
        }

        self.apply_processors(params, logits, ctx);
        let token = if params.is_greedy() {
            argmax(logits)
        } else {
            self.draw(params, logits)
        }
        .unwrap_or_else(|| fallback_token(params, logits.len()));

        let logprob = match params.logprobs {
            Some(top_n) if want_logprobs => Some(raw_logprobs(
                &self.raw_logits,
                token,
                top_n,
                &mut self.candidates,
            )),
            _ => None,
        };
        Sampled { token, logprob }
    }

    /// The logits processors, in vLLM's order. Each is skipped when its parameter is neutral,
    /// so the plain greedy path touches the logits only in the argmax.
    fn apply_processors(
        &mut self,
        params: &SamplingParams,
        logits: &mut [f32],
        ctx: &SampleContext<'_>,
    ) {
        let vocab = logits.len();
        self.marks.ensure_len(vocab);

        if let Some(allowed) = &params.allowed_token_ids {
            let in_vocab = || allowed.iter().copied().filter(|&t| (t as usize) < vocab);
            in_vocab().for_each(|t| self.marks.set(t));
            for (id, logit) in logits.iter_mut().enumerate() {
                if !self.marks.get(id as u32) {
                    *logit = f32::NEG_INFINITY;
                }
            }
            in_vocab().for_each(|t| self.marks.clear(t));
        }

        if ctx.output_tokens.len() < params.min_tokens {
            // As vLLM: with ignore_eos the EOS ids are no stop tokens, so they stay unmasked.
            let eos: &[u32] = if params.ignore_eos {
                &[]
            } else {
                ctx.eos_token_ids
            };
            for &t in eos.iter().chain(&params.stop_token_ids) {
                if let Some(logit) = logits.get_mut(t as usize) {
                    *logit = f32::NEG_INFINITY;
                }
            }
        }

        for &(t, bias) in &params.logit_bias {
            if let Some(logit) = logits.get_mut(t as usize) {
                *logit += bias;
            }
        }

        let repetition = params.repetition_penalty;
        if repetition != 1.0 && repetition > 0.0 {
            // Each distinct token is penalised once, however often it occurs.
            let seen = ctx.prompt_tokens.iter().chain(ctx.output_tokens);
            for &t in seen.clone() {
                if (t as usize) < vocab && !self.marks.get(t) {
                    self.marks.set(t);
                    let logit = &mut logits[t as usize];
                    *logit = if *logit > 0.0 {
                        *logit / repetition
                    } else {
                        *logit * repetition
                    };
                }
            }
            seen.for_each(|&t| self.marks.clear(t));
        }

        if params.presence_penalty != 0.0 || params.frequency_penalty != 0.0 {
            self.sorted_output.clear();
            self.sorted_output.extend_from_slice(ctx.output_tokens);
            self.sorted_output.sort_unstable();
            for run in self.sorted_output.chunk_by(|a, b| a == b) {
                if let Some(logit) = logits.get_mut(run[0] as usize) {
                    *logit -= params.frequency_penalty * run.len() as f32 + params.presence_penalty;
                }
            }
        }
    }

    /// Temperature, top-k, top-p, min-p, then a draw from what is left. None when every logit
    /// is masked.
    fn draw(&mut self, params: &SamplingParams, logits: &[f32]) -> Option<u32> {
        let candidates = &mut self.candidates;
        candidates.clear();
        candidates.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, &l)| l > f32::NEG_INFINITY) // also drops NaN
                .map(|(id, &value)| Candidate {
                    id: id as u32,
                    value,
                }),
        );
        if candidates.is_empty() {
            return None;
        }

        // Top-k before temperature: dividing by a positive temperature keeps the order.
        if params.top_k > 0 && (params.top_k as usize) < candidates.len() {
            keep_largest(candidates, params.top_k as usize);
        }

        // Unnormalised softmax weights: the largest becomes exactly 1.
        let inv_temperature = 1.0 / params.temperature;
        let max_logit = candidates
            .iter()
            .map(|c| c.value)
            .fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0.0f64;
        for c in candidates.iter_mut() {
            c.value = ((c.value - max_logit) * inv_temperature).exp();
            total += c.value as f64;
        }

        if params.top_p < 1.0 {
            total = keep_nucleus(candidates, params.top_p as f64 * total);
        }

        if params.min_p > 0.0 {
            // The most likely token has weight 1, so min_p itself is the cut-off.
            let cutoff = params.min_p;
            candidates.retain(|c| c.value >= cutoff);
            total = candidates.iter().map(|c| c.value as f64).sum();
        }

        let mut remaining = self.rng.gen::<f64>() * total;
        for c in candidates.iter() {
            remaining -= c.value as f64;
            if remaining < 0.0 {
                return Some(c.id);
            }
        }
        // Rounding left a sliver of mass past the last candidate.
        candidates.last().map(|c| c.id)
    }
}

/// Descending by value, ties to the lower id: the order the top lists and the nucleus use.
fn by_value_desc(a: &Candidate, b: &Candidate) -> Ordering {
    b.value.total_cmp(&a.value).then(a.id.cmp(&b.id))
}

/// Keep the `k` largest candidates, in no particular order, in O(n).
fn keep_largest(candidates: &mut Vec<Candidate>, k: usize) {
    if k < candidates.len() {
        if k > 0 {
            candidates.select_nth_unstable_by(k - 1, by_value_desc);
        }
        candidates.truncate(k);
    }
}

/// Keep the smallest most-likely-first set whose weight reaches `target`, sorted descending,
/// and return its weight. The nucleus is usually far smaller than the vocabulary, so it looks
/// at a growing head of the distribution instead of sorting all of it.
fn keep_nucleus(candidates: &mut Vec<Candidate>, target: f64) -> f64 {
    let len = candidates.len();
    let mut head = len.min(64);
    loop {
        if head < len {
            candidates.select_nth_unstable_by(head - 1, by_value_desc);
        }
        candidates[..head].sort_unstable_by(by_value_desc);
        let mut mass = 0.0f64;
        for (i, c) in candidates[..head].iter().enumerate() {
            mass += c.value as f64;
            if mass >= target {
                candidates.truncate(i + 1);
                return mass;
            }
        }
        if head == len {
            // Rounding kept the sum just under the target: everything stays.
            return mass;
        }
        head = (head * 4).min(len);
    }
}

/// Index of the largest logit, the lowest index on ties; None when all are -inf or NaN.
fn argmax(logits: &[f32]) -> Option<u32> {
    let mut best: Option<(u32, f32)> = None;
    for (id, &l) in logits.iter().enumerate() {
        if l > best.map_or(f32::NEG_INFINITY, |(_, b)| b) {
            best = Some((id as u32, l));
        }
    }
    best.map(|(id, _)| id)
}

/// The token returned when the processors masked the whole vocabulary (for instance
/// `allowed_token_ids` holding only EOS while `min_tokens` masks it): the first allowed id,
/// which is what the request insisted on.
fn fallback_token(params: &SamplingParams, vocab: usize) -> u32 {
    params
        .allowed_token_ids
        .iter()
        .flatten()
        .copied()
        .find(|&t| (t as usize) < vocab)
        .unwrap_or(0)
}

/// Log-softmax of the raw logits: the chosen token's value and the `top_n` best, descending.
/// `scratch` is the sampler's candidate buffer, free again once the draw is over.
fn raw_logprobs(
    raw: &[f32],
    token: u32,
    top_n: usize,
    scratch: &mut Vec<Candidate>,
) -> TokenLogprob {
    let max = raw.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_total = if max.is_finite() {
        let sum: f64 = raw.iter().map(|&l| ((l - max) as f64).exp()).sum();
        max as f64 + sum.ln()
    } else {
        max as f64
    };
    let logprob_of = |l: f32| (l as f64 - log_total) as f32;

    scratch.clear();
    scratch.extend(raw.iter().enumerate().map(|(id, &l)| Candidate {
        id: id as u32,
        // NaN sorts last rather than first.
        value: if l.is_nan() { f32::NEG_INFINITY } else { l },
    }));
    keep_largest(scratch, top_n);
    scratch.sort_unstable_by(by_value_desc);
    TokenLogprob {
        token,
        logprob: logprob_of(raw[token as usize]),
        top: scratch
            .iter()
            .map(|c| (c.id, logprob_of(c.value)))
            .collect(),
    }
}

/// SplitMix64's finaliser: spreads (seed, choice) over the generator's seed space, so
/// neighbouring seeds or choices give unrelated streams.
fn mix_seed(seed: u64, choice: u64) -> u64 {
    fn splitmix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    splitmix(seed ^ splitmix(choice))
}

/// A bitset over token ids, grown to the vocabulary once and kept all-zero between uses.
#[derive(Default)]
struct TokenBits {
    words: Vec<u64>,
}

impl TokenBits {
    fn ensure_len(&mut self, bits: usize) {
        let words = bits.div_ceil(64);
        if self.words.len() < words {
            self.words.resize(words, 0);
        }
    }
    fn get(&self, t: u32) -> bool {
        self.words[t as usize / 64] & (1 << (t % 64)) != 0
    }
    fn set(&mut self, t: u32) {
        self.words[t as usize / 64] |= 1 << (t % 64);
    }
    fn clear(&mut self, t: u32) {
        if let Some(w) = self.words.get_mut(t as usize / 64) {
            *w &= !(1 << (t % 64));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx<'a>(prompt: &'a [u32], output: &'a [u32], eos: &'a [u32]) -> SampleContext<'a> {
        SampleContext {
            prompt_tokens: prompt,
            output_tokens: output,
            eos_token_ids: eos,
        }
    }

    fn seeded(seed: u64) -> SamplingParams {
        SamplingParams {
            seed: Some(seed),
            ..SamplingParams::default()
        }
    }

    fn greedy() -> SamplingParams {
        SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        }
    }

    fn random_logits(rng: &mut StdRng, vocab: usize) -> Vec<f32> {
        (0..vocab).map(|_| rng.gen_range(-8.0..8.0)).collect()
    }

    /// Draw `draws` tokens from the same logits; returns how often each id came up.
    fn histogram(params: &SamplingParams, logits: &[f32], draws: usize) -> Vec<usize> {
        let mut sampler = Sampler::new(params, 0);
        let mut counts = vec![0; logits.len()];
        for _ in 0..draws {
            let mut row = logits.to_vec();
            counts[sampler.sample(params, &mut row, &ctx(&[], &[], &[])).token as usize] += 1;
        }
        counts
    }

    /// log(p) for a distribution given as probabilities: logits whose softmax is `probs`.
    fn logits_of(probs: &[f64]) -> Vec<f32> {
        probs.iter().map(|p| p.ln() as f32).collect()
    }

    fn support(counts: &[usize]) -> Vec<usize> {
        (0..counts.len()).filter(|&i| counts[i] > 0).collect()
    }

    #[test]
    fn greedy_is_argmax_with_lowest_id_on_ties() {
        let mut sampler = Sampler::new(&greedy(), 0);
        let mut tied = vec![1.0, 3.0, -2.0, 3.0, 2.5];
        assert_eq!(
            sampler
                .sample(&greedy(), &mut tied, &ctx(&[], &[], &[]))
                .token,
            1
        );

        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..50 {
            let logits = random_logits(&mut rng, 300);
            let expected =
                (0..logits.len())
                    .fold(0, |best, i| if logits[i] > logits[best] { i } else { best });
            let mut row = logits.clone();
            let got = sampler.sample(&greedy(), &mut row, &ctx(&[], &[], &[]));
            assert_eq!(got.token as usize, expected);
            assert_eq!(got.logprob, None);
        }
    }

    #[test]
    fn tiny_temperature_is_greedy() {
        let params = SamplingParams {
            temperature: 1e-6,
            ..seeded(3)
        };
        let counts = histogram(&params, &[0.0, 0.1, 0.05], 200);
        assert_eq!(counts, vec![0, 200, 0]);
    }

    #[test]
    fn temperature_draw_frequencies_match_softmax() {
        let logits = [0.0f32, 1.0, 2.0, -1.0, 0.5];
        let temperature = 0.7;
        let params = SamplingParams {
            temperature,
            ..seeded(7)
        };
        let draws = 200_000;
        let counts = histogram(&params, &logits, draws);

        let weights: Vec<f64> = logits
            .iter()
            .map(|&l| (l as f64 / temperature as f64).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let chi_square: f64 = counts
            .iter()
            .zip(&weights)
            .map(|(&observed, w)| {
                let expected = w / total * draws as f64;
                (observed as f64 - expected).powi(2) / expected
            })
            .sum();
        // 4 degrees of freedom: P(chi² > 40) is about 4e-8.
        assert!(chi_square < 40.0, "chi² = {chi_square}, counts {counts:?}");
    }

    #[test]
    fn seeded_requests_repeat_and_choices_differ() {
        let params = seeded(42);
        let logits = vec![0.0f32; 1000];
        let run = |choice: usize, interleave: bool| -> Vec<u32> {
            let mut sampler = Sampler::new(&params, choice);
            let mut other = Sampler::new(&SamplingParams::default(), 0);
            (0..64)
                .map(|_| {
                    if interleave {
                        // Another sequence in the batch drawing in between changes nothing.
                        other.sample(&params, &mut logits.clone(), &ctx(&[], &[], &[]));
                    }
                    sampler
                        .sample(&params, &mut logits.clone(), &ctx(&[], &[], &[]))
                        .token
                })
                .collect()
        };
        let first = run(0, false);
        assert_eq!(first, run(0, true));
        assert_ne!(first, run(1, false));
        assert_ne!(first, {
            let mut unseeded = Sampler::new(&SamplingParams::default(), 0);
            (0..64)
                .map(|_| {
                    unseeded
                        .sample(&params, &mut logits.clone(), &ctx(&[], &[], &[]))
                        .token
                })
                .collect::<Vec<_>>()
        });
    }

    #[test]
    fn top_k_one_equals_greedy() {
        let params = SamplingParams {
            top_k: 1,
            temperature: 1.5,
            ..seeded(5)
        };
        let mut sampler = Sampler::new(&params, 0);
        let mut rng = StdRng::seed_from_u64(2);
        for _ in 0..50 {
            let logits = random_logits(&mut rng, 500);
            let expected = argmax(&logits);
            let got = sampler.sample(&params, &mut logits.clone(), &ctx(&[], &[], &[]));
            assert_eq!(Some(got.token), expected);
        }
    }

    #[test]
    fn top_k_keeps_exactly_the_k_most_likely() {
        let params = SamplingParams {
            top_k: 3,
            ..seeded(9)
        };
        let counts = histogram(&params, &logits_of(&[0.1, 0.3, 0.05, 0.25, 0.3]), 5000);
        assert_eq!(support(&counts), vec![1, 3, 4]);
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        let logits = logits_of(&[0.15, 0.5, 0.05, 0.3]);
        let with_top_p = |top_p: f32| SamplingParams {
            top_p,
            ..seeded(11)
        };
        // 0.5 < 0.75 so the 0.3 token is needed; 0.8 reaches 0.75.
        let counts = histogram(&with_top_p(0.75), &logits, 20_000);
        assert_eq!(support(&counts), vec![1, 3]);
        // Renormalised over the nucleus: 0.5 / 0.8.
        let share = counts[1] as f64 / 20_000.0;
        assert!((share - 0.625).abs() < 0.02, "share {share}");

        assert_eq!(
            support(&histogram(&with_top_p(0.85), &logits, 20_000)),
            vec![0, 1, 3]
        );
        assert_eq!(
            support(&histogram(&with_top_p(0.4), &logits, 2000)),
            vec![1]
        );
    }

    #[test]
    fn nucleus_over_a_large_vocabulary_matches_a_full_sort() {
        // More candidates than the first head of 64, so the head has to grow.
        let mut rng = StdRng::seed_from_u64(4);
        for target_share in [0.3, 0.9, 0.999] {
            let weights: Vec<f32> = (0..5000).map(|_| rng.gen_range(0.0..1.0)).collect();
            let total: f64 = weights.iter().map(|&w| w as f64).sum();

            let mut order: Vec<u32> = (0..weights.len() as u32).collect();
            order.sort_by(|&a, &b| weights[b as usize].total_cmp(&weights[a as usize]));
            let mut mass = 0.0;
            let needed = order
                .iter()
                .position(|&id| {
                    mass += weights[id as usize] as f64;
                    mass >= target_share * total
                })
                .unwrap()
                + 1;
            let mut expected = order[..needed].to_vec();
            expected.sort_unstable();

            let mut candidates: Vec<Candidate> = weights
                .iter()
                .enumerate()
                .map(|(id, &value)| Candidate {
                    id: id as u32,
                    value,
                })
                .collect();
            keep_nucleus(&mut candidates, target_share * total);
            let mut kept: Vec<u32> = candidates.iter().map(|c| c.id).collect();
            kept.sort_unstable();
            assert_eq!(kept, expected, "top_p share {target_share}");
        }
    }

    #[test]
    fn min_p_drops_tokens_below_a_share_of_the_best() {
        let logits = logits_of(&[0.05, 0.5, 0.15, 0.3]);
        let with_min_p = |min_p: f32| SamplingParams {
            min_p,
            ..seeded(13)
        };
        // Cut-offs 0.1 and 0.25 of probability.
        assert_eq!(
            support(&histogram(&with_min_p(0.2), &logits, 20_000)),
            vec![1, 2, 3]
        );
        assert_eq!(
            support(&histogram(&with_min_p(0.5), &logits, 20_000)),
            vec![1, 3]
        );
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
        let params = SamplingParams {
            repetition_penalty: 2.0,
            ..greedy()
        };
        let mut logits = vec![2.0, -1.0, 0.5, 3.0, -4.0];
        // Token 1 occurs twice but is penalised once; token 3 never occurs.
        Sampler::new(&params, 0).apply_processors(
            &params,
            &mut logits,
            &ctx(&[0, 4, 4], &[1, 1], &[]),
        );
        assert_eq!(logits, vec![1.0, -2.0, 0.5, 3.0, -8.0]);
    }

    #[test]
    fn presence_and_frequency_penalties_count_output_tokens_only() {
        let params = SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..greedy()
        };
        let mut logits = vec![1.0, 1.0, 1.0, 1.0];
        Sampler::new(&params, 0).apply_processors(
            &params,
            &mut logits,
            &ctx(&[0, 0, 1], &[2, 3, 2, 2], &[]),
        );
        // Token 2: 1 - 0.5 - 3 × 0.25; token 3: 1 - 0.5 - 0.25; prompt tokens untouched.
        assert_eq!(logits, vec![1.0, 1.0, -0.25, 0.25]);
    }

    #[test]
    fn penalties_steer_the_greedy_choice() {
        let params = SamplingParams {
            frequency_penalty: 1.0,
            ..greedy()
        };
        let mut sampler = Sampler::new(&params, 0);
        let mut logits = vec![5.0, 4.5, 0.0];
        let token = sampler
            .sample(&params, &mut logits, &ctx(&[], &[0], &[]))
            .token;
        assert_eq!(token, 1);
    }

    #[test]
    fn logit_bias_forces_a_token() {
        let mut rng = StdRng::seed_from_u64(6);
        let logits = random_logits(&mut rng, 200);
        for base in [greedy(), seeded(17)] {
            let params = SamplingParams {
                logit_bias: vec![(7, 100.0), (9999, 100.0)],
                ..base
            };
            let counts = histogram(&params, &logits, 200);
            assert_eq!(counts[7], 200);
        }
    }

    #[test]
    fn allowed_token_ids_mask_everything_else() {
        let logits = vec![9.0, 0.0, 8.0, 1.0, 7.0, 0.5];
        let params = SamplingParams {
            allowed_token_ids: Some(vec![3, 5, 60_000]),
            ..seeded(19)
        };
        assert_eq!(support(&histogram(&params, &logits, 5000)), vec![3, 5]);

        let params = SamplingParams {
            allowed_token_ids: Some(vec![5, 3]),
            ..greedy()
        };
        assert_eq!(histogram(&params, &logits, 1), vec![0, 0, 0, 1, 0, 0]);
    }

    #[test]
    fn min_tokens_masks_eos_and_stop_ids_until_reached() {
        let eos = [0u32];
        let params = SamplingParams {
            min_tokens: 2,
            stop_token_ids: vec![1],
            ..greedy()
        };
        let mut sampler = Sampler::new(&params, 0);
        let logits = [9.0f32, 8.0, 1.0, 2.0];
        let mut pick = |params: &SamplingParams, output: &[u32]| {
            sampler
                .sample(params, &mut logits.to_vec(), &ctx(&[5], output, &eos))
                .token
        };
        assert_eq!(pick(&params, &[]), 3);
        assert_eq!(pick(&params, &[3]), 3);
        assert_eq!(pick(&params, &[3, 3]), 0);

        // With ignore_eos the EOS id is no stop token, so only the stop ids are masked.
        let ignoring = SamplingParams {
            ignore_eos: true,
            ..params.clone()
        };
        assert_eq!(pick(&ignoring, &[]), 0);
        let no_eos_logits = SamplingParams {
            logit_bias: vec![(0, -100.0)],
            ..ignoring
        };
        assert_eq!(pick(&no_eos_logits, &[]), 3);
    }

    #[test]
    fn fully_masked_vocabulary_falls_back_to_the_allowed_token() {
        let params = SamplingParams {
            allowed_token_ids: Some(vec![2]),
            min_tokens: 1,
            ..seeded(23)
        };
        let mut sampler = Sampler::new(&params, 0);
        let got = sampler.sample(&params, &mut [0.0; 4], &ctx(&[], &[], &[2]));
        assert_eq!(got.token, 2);
    }

    #[test]
    fn logprobs_are_the_raw_log_softmax_with_a_sorted_top_list() {
        let mut rng = StdRng::seed_from_u64(8);
        let logits = random_logits(&mut rng, 1000);
        // The bias picks token 3 but logprobs still describe the unbiased model.
        let params = SamplingParams {
            logprobs: Some(5),
            logit_bias: vec![(3, 1000.0)],
            repetition_penalty: 1.3,
            ..seeded(29)
        };
        let mut sampler = Sampler::new(&params, 0);
        let got = sampler.sample(&params, &mut logits.clone(), &ctx(&[1, 2], &[4], &[]));
        assert_eq!(got.token, 3);
        let logprob = got.logprob.expect("logprobs requested");

        let max = logits.iter().fold(f64::MIN, |m, &l| m.max(l as f64));
        let log_total = max
            + logits
                .iter()
                .map(|&l| (l as f64 - max).exp())
                .sum::<f64>()
                .ln();
        assert_eq!(logprob.token, 3);
        assert!((logprob.logprob as f64 - (logits[3] as f64 - log_total)).abs() < 1e-4);

        let mut ranked: Vec<usize> = (0..logits.len()).collect();
        ranked.sort_by(|&a, &b| logits[b].partial_cmp(&logits[a]).unwrap());
        assert_eq!(logprob.top.len(), 5);
        for (&(id, lp), &expected_id) in logprob.top.iter().zip(&ranked) {
            assert_eq!(id as usize, expected_id);
            assert!((lp as f64 - (logits[expected_id] as f64 - log_total)).abs() < 1e-4);
        }
        assert!(logprob.top.windows(2).all(|w| w[0].1 >= w[1].1));
    }

    #[test]
    fn logprobs_with_zero_alternatives_and_ties() {
        let params = SamplingParams {
            logprobs: Some(0),
            ..greedy()
        };
        let mut sampler = Sampler::new(&params, 0);
        let got = sampler.sample(&params, &mut [0.0; 4], &ctx(&[], &[], &[]));
        let logprob = got.logprob.unwrap();
        assert_eq!(got.token, 0);
        assert!((logprob.logprob - 0.25f32.ln()).abs() < 1e-6);
        assert!(logprob.top.is_empty());

        let params = SamplingParams {
            logprobs: Some(3),
            ..greedy()
        };
        let got = sampler.sample(&params, &mut [1.0, 2.0, 2.0, 2.0], &ctx(&[], &[], &[]));
        let ids: Vec<u32> = got.logprob.unwrap().top.iter().map(|&(id, _)| id).collect();
        assert_eq!(ids, vec![1, 2, 3]);
    }

    #[test]
    fn full_vocabulary_with_top_k_and_top_p_stays_in_the_top_k() {
        let mut rng = StdRng::seed_from_u64(10);
        let logits = random_logits(&mut rng, 49_152);
        let params = SamplingParams {
            top_k: 50,
            top_p: 0.9,
            temperature: 0.8,
            ..seeded(31)
        };
        let mut ranked: Vec<usize> = (0..logits.len()).collect();
        ranked.sort_by(|&a, &b| logits[b].partial_cmp(&logits[a]).unwrap());
        let top50 = &ranked[..50];
        let mut sampler = Sampler::new(&params, 0);
        for _ in 0..100 {
            let token = sampler
                .sample(&params, &mut logits.clone(), &ctx(&[], &[], &[]))
                .token;
            assert!(top50.contains(&(token as usize)));
        }
    }
}
