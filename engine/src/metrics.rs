//! Engine metrics under vLLM's names (see COMPAT §6), in a registry of their own so `/metrics`
//! shows exactly these. Every series carries `model_name` and vLLM V1's `engine` label.
//!
//! Counters are registered with their `_total` suffix, since the `prometheus` crate writes names
//! as given while dashboards query the suffixed names Python's client writes.

use parking_lot::Mutex;
use prometheus::{
    GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::engine::FinishReason;

/// vLLM V1 numbers engines; this process is one engine.
const ENGINE_INDEX: &str = "0";

const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
const INTER_TOKEN_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
const REQUEST_LATENCY_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];
const ITERATION_TOKEN_BUCKETS: &[f64] = &[
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
];
const PARAMS_N_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0];

/// 1, 2, 5, 10, 20, 50, … up to `max` (vLLM's token-count buckets).
fn one_two_five_buckets(max: f64) -> Vec<f64> {
    let mut buckets = Vec::new();
    let mut exponent = 1.0;
    loop {
        for mantissa in [1.0, 2.0, 5.0] {
            let value = mantissa * exponent;
            if value > max {
                return buckets;
            }
            buckets.push(value);
        }
        exponent *= 10.0;
    }
}

/// Token-count histograms do not know max_model_len; this covers any context in use.
const TOKEN_COUNT_BUCKET_MAX: f64 = 1_000_000.0;

/// Totals the scheduler keeps; counters advance by the difference.
#[derive(Default)]
struct SchedulerTotals {
    preemptions: u64,
    prefix_queries: u64,
    prefix_hits: u64,
}

/// The engine loop reports here; `/metrics` renders it.
pub struct Metrics {
    registry: Registry,
    model_name: String,
    num_requests_running: IntGaugeVec,
    num_requests_waiting: IntGaugeVec,
    num_requests_swapped: IntGaugeVec,
    kv_cache_usage: GaugeVec,
    gpu_cache_usage: GaugeVec,
    cpu_cache_usage: GaugeVec,
    prompt_tokens: IntCounterVec,
    generation_tokens: IntCounterVec,
    num_preemptions: IntCounterVec,
    prefix_cache_queries: IntCounterVec,
    prefix_cache_hits: IntCounterVec,
    gpu_prefix_cache_queries: IntCounterVec,
    gpu_prefix_cache_hits: IntCounterVec,
    request_success: IntCounterVec,
    time_to_first_token: HistogramVec,
    inter_token_latency: HistogramVec,
    time_per_output_token: HistogramVec,
    request_time_per_output_token: HistogramVec,
    e2e_request_latency: HistogramVec,
    request_queue_time: HistogramVec,
    request_prefill_time: HistogramVec,
    request_decode_time: HistogramVec,
    request_inference_time: HistogramVec,
    request_prompt_tokens: HistogramVec,
    request_generation_tokens: HistogramVec,
    request_params_n: HistogramVec,
    request_params_max_tokens: HistogramVec,
    iteration_tokens: HistogramVec,
    totals: Mutex<SchedulerTotals>,
}

/// Registration cannot fail for these fixed, distinct, valid names; a failure is a bug here.
fn registered<C: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    collector: C,
) -> C {
    registry
        .register(Box::new(collector.clone()))
        .expect("metric names are fixed and distinct");
    collector
}

const LABELS: &[&str] = &["model_name", "engine"];

impl Metrics {
    pub fn new(model_name: &str, block_size: usize, num_blocks: usize) -> Self {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| {
            registered(
                &registry,
                IntGaugeVec::new(Opts::new(name, help), LABELS).expect("valid gauge"),
            )
        };
        let float_gauge = |name: &str, help: &str| {
            registered(
                &registry,
                GaugeVec::new(Opts::new(name, help), LABELS).expect("valid gauge"),
            )
        };
        let counter = |name: &str, help: &str| {
            registered(
                &registry,
                IntCounterVec::new(Opts::new(name, help), LABELS).expect("valid counter"),
            )
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            registered(
                &registry,
                HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), LABELS)
                    .expect("valid histogram"),
            )
        };
        let token_buckets = one_two_five_buckets(TOKEN_COUNT_BUCKET_MAX);
        let request_success = registered(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "vllm:request_success_total",
                    "Count of successfully processed requests.",
                ),
                &["model_name", "engine", "finished_reason"],
            )
            .expect("valid counter"),
        );
        let cache_config = registered(
            &registry,
            GaugeVec::new(
                Opts::new(
                    "vllm:cache_config_info",
                    "Information of the KV cache config.",
                ),
                &["model_name", "engine", "block_size", "num_gpu_blocks"],
            )
            .expect("valid gauge"),
        );
        cache_config
            .with_label_values(&[
                model_name,
                ENGINE_INDEX,
                &block_size.to_string(),
                &num_blocks.to_string(),
            ])
            .set(1.0);

        let metrics = Metrics {
            num_requests_running: gauge(
                "vllm:num_requests_running",
                "Number of requests in model execution batches.",
            ),
            num_requests_waiting: gauge(
                "vllm:num_requests_waiting",
                "Number of requests waiting to be processed.",
            ),
            num_requests_swapped: gauge(
                "vllm:num_requests_swapped",
                "Number of requests swapped to CPU (V0; always 0 here).",
            ),
            kv_cache_usage: float_gauge(
                "vllm:kv_cache_usage_perc",
                "KV-cache usage. 1 means 100 percent usage.",
            ),
            gpu_cache_usage: float_gauge(
                "vllm:gpu_cache_usage_perc",
                "KV-cache usage (V0 name). 1 means 100 percent usage.",
            ),
            cpu_cache_usage: float_gauge(
                "vllm:cpu_cache_usage_perc",
                "CPU KV-cache usage (V0; always 0 here).",
            ),
            prompt_tokens: counter(
                "vllm:prompt_tokens_total",
                "Number of prefill tokens processed.",
            ),
            generation_tokens: counter(
                "vllm:generation_tokens_total",
                "Number of generation tokens processed.",
            ),
            num_preemptions: counter(
                "vllm:num_preemptions_total",
                "Cumulative number of preemptions from the engine.",
            ),
            prefix_cache_queries: counter(
                "vllm:prefix_cache_queries_total",
                "Prefix cache queries, in terms of number of queried tokens.",
            ),
            prefix_cache_hits: counter(
                "vllm:prefix_cache_hits_total",
                "Prefix cache hits, in terms of number of cached tokens.",
            ),
            gpu_prefix_cache_queries: counter(
                "vllm:gpu_prefix_cache_queries_total",
                "Prefix cache queries (older name).",
            ),
            gpu_prefix_cache_hits: counter(
                "vllm:gpu_prefix_cache_hits_total",
                "Prefix cache hits (older name).",
            ),
            request_success,
            time_to_first_token: histogram(
                "vllm:time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
                TTFT_BUCKETS.to_vec(),
            ),
            inter_token_latency: histogram(
                "vllm:inter_token_latency_seconds",
                "Histogram of inter-token latency in seconds.",
                INTER_TOKEN_BUCKETS.to_vec(),
            ),
            time_per_output_token: histogram(
                "vllm:time_per_output_token_seconds",
                "Histogram of time per output token in seconds (V0 name of inter-token latency).",
                INTER_TOKEN_BUCKETS.to_vec(),
            ),
            request_time_per_output_token: histogram(
                "vllm:request_time_per_output_token_seconds",
                "Histogram of time_per_output_token_seconds per request.",
                INTER_TOKEN_BUCKETS.to_vec(),
            ),
            e2e_request_latency: histogram(
                "vllm:e2e_request_latency_seconds",
                "Histogram of e2e request latency in seconds.",
                REQUEST_LATENCY_BUCKETS.to_vec(),
            ),
            request_queue_time: histogram(
                "vllm:request_queue_time_seconds",
                "Histogram of time spent in WAITING phase for request.",
                REQUEST_LATENCY_BUCKETS.to_vec(),
            ),
            request_prefill_time: histogram(
                "vllm:request_prefill_time_seconds",
                "Histogram of time spent in PREFILL phase for request.",
                REQUEST_LATENCY_BUCKETS.to_vec(),
            ),
            request_decode_time: histogram(
                "vllm:request_decode_time_seconds",
                "Histogram of time spent in DECODE phase for request.",
                REQUEST_LATENCY_BUCKETS.to_vec(),
            ),
            request_inference_time: histogram(
                "vllm:request_inference_time_seconds",
                "Histogram of time spent in RUNNING phase for request.",
                REQUEST_LATENCY_BUCKETS.to_vec(),
            ),
            request_prompt_tokens: histogram(
                "vllm:request_prompt_tokens",
                "Number of prefill tokens processed.",
                token_buckets.clone(),
            ),
            request_generation_tokens: histogram(
                "vllm:request_generation_tokens",
                "Number of generation tokens processed.",
                token_buckets.clone(),
            ),
            request_params_n: histogram(
                "vllm:request_params_n",
                "Histogram of the n request parameter.",
                PARAMS_N_BUCKETS.to_vec(),
            ),
            request_params_max_tokens: histogram(
                "vllm:request_params_max_tokens",
                "Histogram of the max_tokens request parameter.",
                token_buckets,
            ),
            iteration_tokens: histogram(
                "vllm:iteration_tokens_total",
                "Histogram of number of tokens per engine_step.",
                ITERATION_TOKEN_BUCKETS.to_vec(),
            ),
            totals: Mutex::new(SchedulerTotals::default()),
            model_name: model_name.to_owned(),
            registry,
        };
        // Series exist from the start (at zero) so dashboards and alerts see them before traffic.
        metrics.set_queue(0, 0, 0.0);
        metrics.observe_step(0, 0);
        metrics.set_scheduler_totals(0, 0, 0);
        metrics
            .cpu_cache_usage
            .with_label_values(&metrics.labels())
            .set(0.0);
        metrics
            .num_requests_swapped
            .with_label_values(&metrics.labels())
            .set(0);
        for reason in [
            FinishReason::Stop,
            FinishReason::Length,
            FinishReason::Abort,
        ] {
            metrics.request_success.with_label_values(&[
                &metrics.model_name,
                ENGINE_INDEX,
                reason.as_str(),
            ]);
        }
        metrics
    }

    fn labels(&self) -> [&str; 2] {
        [&self.model_name, ENGINE_INDEX]
    }

    /// Gauges, set once per step.
    pub fn set_queue(&self, running: usize, waiting: usize, kv_usage: f32) {
        let labels = self.labels();
        self.num_requests_running
            .with_label_values(&labels)
            .set(running as i64);
        self.num_requests_waiting
            .with_label_values(&labels)
            .set(waiting as i64);
        self.kv_cache_usage
            .with_label_values(&labels)
            .set(kv_usage as f64);
        self.gpu_cache_usage
            .with_label_values(&labels)
            .set(kv_usage as f64);
    }

    /// Counters: totals since start, as the scheduler keeps them.
    pub fn set_scheduler_totals(&self, preemptions: u64, prefix_queries: u64, prefix_hits: u64) {
        let labels = self.labels();
        let mut totals = self.totals.lock();
        // A total below the last one (a scheduler restart) only resets the baseline: counters
        // never go down.
        let advance = |counter: &IntCounterVec, last: &mut u64, now: u64| {
            counter
                .with_label_values(&labels)
                .inc_by(now.saturating_sub(*last));
            *last = now;
        };
        let before_queries = totals.prefix_queries;
        let before_hits = totals.prefix_hits;
        advance(&self.num_preemptions, &mut totals.preemptions, preemptions);
        advance(
            &self.prefix_cache_queries,
            &mut totals.prefix_queries,
            prefix_queries,
        );
        advance(
            &self.prefix_cache_hits,
            &mut totals.prefix_hits,
            prefix_hits,
        );
        self.gpu_prefix_cache_queries
            .with_label_values(&labels)
            .inc_by(prefix_queries.saturating_sub(before_queries));
        self.gpu_prefix_cache_hits
            .with_label_values(&labels)
            .inc_by(prefix_hits.saturating_sub(before_hits));
    }

    pub fn observe_step(&self, prompt_tokens: usize, generation_tokens: usize) {
        let labels = self.labels();
        self.prompt_tokens
            .with_label_values(&labels)
            .inc_by(prompt_tokens as u64);
        self.generation_tokens
            .with_label_values(&labels)
            .inc_by(generation_tokens as u64);
        if prompt_tokens + generation_tokens > 0 {
            self.iteration_tokens
                .with_label_values(&labels)
                .observe((prompt_tokens + generation_tokens) as f64);
        }
    }

    pub fn observe_first_token(&self, seconds_since_arrival: f64, queue_seconds: f64) {
        let labels = self.labels();
        self.time_to_first_token
            .with_label_values(&labels)
            .observe(seconds_since_arrival);
        self.request_queue_time
            .with_label_values(&labels)
            .observe(queue_seconds);
    }

    pub fn observe_inter_token(&self, seconds: f64) {
        let labels = self.labels();
        self.inter_token_latency
            .with_label_values(&labels)
            .observe(seconds);
        self.time_per_output_token
            .with_label_values(&labels)
            .observe(seconds);
    }

    /// A request's phases, once it ended: prefill (scheduled to first token) and decode (first
    /// token to last). Inference time is their sum; time per output token is decode time over
    /// the tokens after the first.
    pub fn observe_phases(
        &self,
        prefill_seconds: f64,
        decode_seconds: f64,
        generation_tokens: usize,
    ) {
        let labels = self.labels();
        self.request_prefill_time
            .with_label_values(&labels)
            .observe(prefill_seconds);
        self.request_decode_time
            .with_label_values(&labels)
            .observe(decode_seconds);
        self.request_inference_time
            .with_label_values(&labels)
            .observe(prefill_seconds + decode_seconds);
        if generation_tokens > 1 {
            self.request_time_per_output_token
                .with_label_values(&labels)
                .observe(decode_seconds / (generation_tokens - 1) as f64);
        }
    }

    /// A request ended (all its choices).
    pub fn observe_finished(
        &self,
        reason: FinishReason,
        e2e_seconds: f64,
        prompt_tokens: usize,
        generation_tokens: usize,
        n: usize,
        max_tokens: usize,
    ) {
        let labels = self.labels();
        self.request_success
            .with_label_values(&[&self.model_name, ENGINE_INDEX, reason.as_str()])
            .inc();
        self.e2e_request_latency
            .with_label_values(&labels)
            .observe(e2e_seconds);
        self.request_prompt_tokens
            .with_label_values(&labels)
            .observe(prompt_tokens as f64);
        self.request_generation_tokens
            .with_label_values(&labels)
            .observe(generation_tokens as f64);
        self.request_params_n
            .with_label_values(&labels)
            .observe(n as f64);
        self.request_params_max_tokens
            .with_label_values(&labels)
            .observe(max_tokens as f64);
    }

    /// Prometheus text.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|err| format!("# metrics encoding failed: {err}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the one sample line that starts with `series` (name plus labels prefix).
    fn sample(text: &str, name: &str, must_contain: &[&str]) -> f64 {
        let line = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .find(|l| {
                l.split(['{', ' ']).next() == Some(name)
                    && must_contain.iter().all(|s| l.contains(s))
            })
            .unwrap_or_else(|| panic!("no sample {name} {must_contain:?} in\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    #[test]
    fn one_two_five() {
        assert_eq!(
            one_two_five_buckets(100.0),
            vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]
        );
        assert_eq!(one_two_five_buckets(7.0), vec![1.0, 2.0, 5.0]);
    }

    #[test]
    fn renders_every_vllm_name_before_any_traffic() {
        let metrics = Metrics::new("smol", 16, 1024);
        let text = metrics.render();
        for name in [
            "vllm:num_requests_running",
            "vllm:num_requests_waiting",
            "vllm:kv_cache_usage_perc",
            "vllm:gpu_cache_usage_perc",
            "vllm:prompt_tokens_total",
            "vllm:generation_tokens_total",
            "vllm:num_preemptions_total",
            "vllm:prefix_cache_queries_total",
            "vllm:prefix_cache_hits_total",
            "vllm:request_success_total",
            "vllm:cache_config_info",
            "vllm:cpu_cache_usage_perc",
            "vllm:num_requests_swapped",
            "vllm:gpu_prefix_cache_queries_total",
            "vllm:gpu_prefix_cache_hits_total",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(&format!("{name}{{"))),
                "{name} missing"
            );
        }
        // Histograms appear once observed.
        metrics.observe_first_token(0.2, 0.01);
        metrics.observe_inter_token(0.03);
        metrics.observe_phases(0.1, 0.5, 6);
        metrics.observe_finished(FinishReason::Stop, 0.7, 12, 6, 1, 16);
        metrics.observe_step(12, 1);
        let text = metrics.render();
        for name in [
            "vllm:time_to_first_token_seconds",
            "vllm:inter_token_latency_seconds",
            "vllm:time_per_output_token_seconds",
            "vllm:request_time_per_output_token_seconds",
            "vllm:e2e_request_latency_seconds",
            "vllm:request_queue_time_seconds",
            "vllm:request_prefill_time_seconds",
            "vllm:request_decode_time_seconds",
            "vllm:request_inference_time_seconds",
            "vllm:request_prompt_tokens",
            "vllm:request_generation_tokens",
            "vllm:request_params_n",
            "vllm:request_params_max_tokens",
            "vllm:iteration_tokens_total",
        ] {
            for suffix in ["_bucket{", "_sum{", "_count{"] {
                assert!(
                    text.contains(&format!("{name}{suffix}")),
                    "{name}{suffix} missing"
                );
            }
            assert!(text.contains(&format!("# TYPE {name} histogram")), "{name}");
        }
        assert!(text.contains("# TYPE vllm:prompt_tokens_total counter"));
        assert!(text.contains("# TYPE vllm:num_requests_running gauge"));
    }

    #[test]
    fn values_and_labels() {
        let metrics = Metrics::new("smol", 16, 1024);
        metrics.set_queue(3, 2, 0.25);
        metrics.observe_step(100, 3);
        metrics.observe_step(0, 4);
        metrics.set_scheduler_totals(1, 50, 20);
        metrics.set_scheduler_totals(2, 80, 30);
        metrics.observe_finished(FinishReason::Length, 1.0, 100, 7, 2, 7);
        metrics.observe_phases(0.2, 0.6, 4);
        let text = metrics.render();
        let m = ["model_name=\"smol\"", "engine=\"0\""];
        assert_eq!(sample(&text, "vllm:num_requests_running", &m), 3.0);
        assert_eq!(sample(&text, "vllm:num_requests_waiting", &m), 2.0);
        assert_eq!(sample(&text, "vllm:kv_cache_usage_perc", &m), 0.25);
        assert_eq!(sample(&text, "vllm:gpu_cache_usage_perc", &m), 0.25);
        assert_eq!(sample(&text, "vllm:prompt_tokens_total", &m), 100.0);
        assert_eq!(sample(&text, "vllm:generation_tokens_total", &m), 7.0);
        assert_eq!(sample(&text, "vllm:num_preemptions_total", &m), 2.0);
        assert_eq!(sample(&text, "vllm:prefix_cache_queries_total", &m), 80.0);
        assert_eq!(sample(&text, "vllm:prefix_cache_hits_total", &m), 30.0);
        assert_eq!(
            sample(&text, "vllm:gpu_prefix_cache_queries_total", &m),
            80.0
        );
        assert_eq!(sample(&text, "vllm:gpu_prefix_cache_hits_total", &m), 30.0);
        assert_eq!(
            sample(
                &text,
                "vllm:request_success_total",
                &["finished_reason=\"length\""]
            ),
            1.0
        );
        assert_eq!(
            sample(
                &text,
                "vllm:request_success_total",
                &["finished_reason=\"stop\""]
            ),
            0.0
        );
        assert_eq!(
            sample(
                &text,
                "vllm:cache_config_info",
                &["block_size=\"16\"", "num_gpu_blocks=\"1024\""]
            ),
            1.0
        );
        // Steps of 103 and 4 tokens: 4 ≤ 8 < 103 ≤ 128.
        assert_eq!(
            sample(&text, "vllm:iteration_tokens_total_bucket", &["le=\"8\""]),
            1.0
        );
        assert_eq!(
            sample(&text, "vllm:iteration_tokens_total_bucket", &["le=\"128\""]),
            2.0
        );
        assert_eq!(sample(&text, "vllm:iteration_tokens_total_sum", &m), 107.0);
        // 0.6 s over the 3 tokens after the first.
        let per_token = sample(&text, "vllm:request_time_per_output_token_seconds_sum", &m);
        assert!((per_token - 0.2).abs() < 1e-9, "{per_token}");
        assert_eq!(
            sample(&text, "vllm:request_inference_time_seconds_sum", &m),
            0.8
        );
        assert_eq!(sample(&text, "vllm:request_params_n_sum", &m), 2.0);
    }

    #[test]
    fn counters_never_go_down() {
        let metrics = Metrics::new("m", 16, 8);
        metrics.set_scheduler_totals(5, 0, 0);
        metrics.set_scheduler_totals(2, 0, 0);
        metrics.set_scheduler_totals(4, 0, 0);
        let text = metrics.render();
        assert_eq!(sample(&text, "vllm:num_preemptions_total", &[]), 7.0);
    }
}
