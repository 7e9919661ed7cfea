//! Prometheus metrics under LiteLLM's names and labels, so existing dashboards keep working.
//! Counters carry the `_total` suffix LiteLLM's Python client adds on the wire.

use prometheus::{
    exponential_buckets, Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use sluice_config::Deployment;

use crate::router::Router;

pub struct Metrics {
    registry: Registry,
    pub proxy_total_requests: IntCounterVec,
    pub proxy_failed_requests: IntCounterVec,
    pub requests_legacy: IntCounterVec,
    pub llm_api_failed_legacy: IntCounterVec,
    pub deployment_success: IntCounterVec,
    pub deployment_failure: IntCounterVec,
    pub deployment_total: IntCounterVec,
    pub deployment_cooled_down: IntCounterVec,
    pub deployment_state: IntGaugeVec,
    pub remaining_requests: IntGaugeVec,
    pub remaining_tokens: IntGaugeVec,
    pub successful_fallbacks: IntCounterVec,
    pub failed_fallbacks: IntCounterVec,
    pub total_tokens: IntCounterVec,
    pub input_tokens: IntCounterVec,
    pub output_tokens: IntCounterVec,
    pub request_total_latency: HistogramVec,
    pub overhead_latency: HistogramVec,
    pub llm_api_latency: HistogramVec,
    pub time_to_first_token: HistogramVec,
    pub latency_per_output_token: HistogramVec,
    pub spend: prometheus::CounterVec,
    pub redis_fails: prometheus::IntCounter,
    pub spend_rows_dropped: prometheus::IntCounter,
    pub spend_queue_size: prometheus::IntGauge,
}

const DEPLOYMENT_LABELS: &[&str] = &["litellm_model_name", "model_id", "api_base", "api_provider"];

/// Values for [`DEPLOYMENT_LABELS`], in that order.
pub fn deployment_labels(c: &Deployment) -> [&str; 4] {
    [
        &c.upstream_model,
        &c.id,
        c.api_base.as_deref().unwrap_or(""),
        c.provider.name(),
    ]
}

/// [`deployment_labels`] plus `exception_status`.
pub fn deployment_labels_with_status<'a>(c: &'a Deployment, status: &'a str) -> [&'a str; 5] {
    let [a, b, c, d] = deployment_labels(c);
    [a, b, c, d, status]
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(format!("{name}_total"), help), labels)
                .expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help)
                    .buckets(exponential_buckets(0.000_05, 2.0, 22).expect("valid buckets")),
                labels,
            )
            .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let dep_fail: Vec<&str> = DEPLOYMENT_LABELS
            .iter()
            .copied()
            .chain(["exception_status"])
            .collect();
        Metrics {
            proxy_total_requests: counter(
                "litellm_proxy_total_requests_metric",
                "Requests made to the proxy",
                &["requested_model", "route", "status_code"],
            ),
            proxy_failed_requests: counter(
                "litellm_proxy_failed_requests_metric",
                "Failed responses from the proxy",
                &[
                    "requested_model",
                    "route",
                    "status_code",
                    "exception_status",
                    "exception_class",
                ],
            ),
            requests_legacy: counter("litellm_requests_metric", "Requests by model", &["model"]),
            llm_api_failed_legacy: counter(
                "litellm_llm_api_failed_requests_metric",
                "Failed LLM API calls by model",
                &["model"],
            ),
            deployment_success: counter(
                "litellm_deployment_success_responses",
                "Successful LLM API calls per deployment",
                DEPLOYMENT_LABELS,
            ),
            deployment_failure: counter(
                "litellm_deployment_failure_responses",
                "Failed LLM API calls per deployment",
                &dep_fail,
            ),
            deployment_total: counter(
                "litellm_deployment_total_requests",
                "LLM API calls per deployment",
                DEPLOYMENT_LABELS,
            ),
            deployment_cooled_down: counter(
                "litellm_deployment_cooled_down",
                "Times a deployment was put into cooldown",
                &dep_fail,
            ),
            deployment_state: gauge(
                "litellm_deployment_state",
                "0 healthy, 1 partial outage, 2 complete outage (cooling down)",
                DEPLOYMENT_LABELS,
            ),
            remaining_requests: gauge(
                "litellm_remaining_requests_metric",
                "Requests left this minute under the deployment's rpm",
                &[
                    "model_group",
                    "api_provider",
                    "api_base",
                    "litellm_model_name",
                ],
            ),
            remaining_tokens: gauge(
                "litellm_remaining_tokens",
                "Tokens left this minute under the deployment's tpm",
                &[
                    "model_group",
                    "api_provider",
                    "api_base",
                    "litellm_model_name",
                ],
            ),
            successful_fallbacks: counter(
                "litellm_deployment_successful_fallbacks",
                "Fallbacks that succeeded",
                &["requested_model", "fallback_model"],
            ),
            failed_fallbacks: counter(
                "litellm_deployment_failed_fallbacks",
                "Fallbacks that failed",
                &["requested_model", "fallback_model"],
            ),
            total_tokens: counter("litellm_total_tokens_metric", "Tokens", &["model"]),
            input_tokens: counter("litellm_input_tokens_metric", "Prompt tokens", &["model"]),
            output_tokens: counter(
                "litellm_output_tokens_metric",
                "Completion tokens",
                &["model"],
            ),
            request_total_latency: histogram(
                "litellm_request_total_latency_metric",
                "Seconds from request arrival to the end of the response",
                &["model"],
            ),
            overhead_latency: histogram(
                "litellm_overhead_latency_metric",
                "Seconds the gateway itself added",
                &["model"],
            ),
            llm_api_latency: histogram(
                "litellm_llm_api_latency_metric",
                "Seconds spent waiting on the LLM API",
                &["model"],
            ),
            time_to_first_token: histogram(
                "litellm_llm_api_time_to_first_token_metric",
                "Seconds to the first streamed chunk",
                &["model"],
            ),
            latency_per_output_token: histogram(
                "litellm_deployment_latency_per_output_token",
                "Seconds per output token",
                DEPLOYMENT_LABELS,
            ),
            spend: {
                let c = prometheus::CounterVec::new(
                    Opts::new("litellm_spend_metric_total", "Spend in USD"),
                    &[
                        "end_user",
                        "hashed_api_key",
                        "api_key_alias",
                        "model",
                        "team",
                        "user",
                    ],
                )
                .expect("valid metric");
                registry
                    .register(Box::new(c.clone()))
                    .expect("unique metric");
                c
            },
            redis_fails: {
                let c =
                    prometheus::IntCounter::new("litellm_redis_fails_total", "Failed Redis calls")
                        .expect("valid metric");
                registry
                    .register(Box::new(c.clone()))
                    .expect("unique metric");
                c
            },
            spend_rows_dropped: {
                let c = prometheus::IntCounter::new(
                    "sluice_spend_rows_dropped_total",
                    "Spend rows dropped because the buffer was full while the database was away",
                )
                .expect("valid metric");
                registry
                    .register(Box::new(c.clone()))
                    .expect("unique metric");
                c
            },
            spend_queue_size: {
                let g = prometheus::IntGauge::new(
                    "litellm_in_memory_spend_update_queue_size",
                    "Spend rows waiting for the batch writer",
                )
                .expect("valid metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("unique metric");
                g
            },
            registry,
        }
    }

    /// The exposition text, with deployment gauges refreshed from live router state.
    pub fn render(&self, router: &Router) -> Vec<u8> {
        for d in router.all_deployments() {
            let c = &d.config;
            let base = c.api_base.as_deref().unwrap_or("");
            self.deployment_state
                .with_label_values(&deployment_labels(c))
                .set(i64::from(d.state_code()));
            let (rr, rt) = d.remaining();
            let labels = [
                c.model_name.as_str(),
                c.provider.name(),
                base,
                &c.upstream_model,
            ];
            if let Some(v) = rr {
                self.remaining_requests
                    .with_label_values(&labels)
                    .set(v as i64);
            }
            if let Some(v) = rt {
                self.remaining_tokens
                    .with_label_values(&labels)
                    .set(v as i64);
            }
        }
        let mut out = vec![];
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
