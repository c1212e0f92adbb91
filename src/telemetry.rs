//! Tracing setup (human-readable lines on stderr, filtered by `--log`) and
//! the Prometheus metrics: every metric name lives here.

use std::io::IsTerminal as _;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::session::EndCause;

pub fn init(filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Installs the process-wide metrics recorder (the `metrics` crate has one
/// per process) and returns the handle `/metrics` renders from.
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    const LATENCY: &[f64] = &[
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY)?
        .install_recorder()?;
    Ok(handle)
}

pub fn request(route: &str, status: u16) {
    counter!("sluicegate_requests_total", "route" => route.to_owned(), "status" => status.to_string())
        .increment(1);
}

/// What the resume budget counts now: finished generations kept.
pub fn retained(generations: usize, bytes: usize) {
    gauge!("sluicegate_retained_generations").set(generations as f64);
    gauge!("sluicegate_retained_bytes").set(bytes as f64);
}

pub fn generation_load(running: usize, queued: usize) {
    gauge!("sluicegate_generations_running").set(running as f64);
    gauge!("sluicegate_generations_queued").set(queued as f64);
}

/// Prompt positions the local model computed and reused from kept caches,
/// and the bytes those caches hold.
pub fn prompt_tokens(model: &str, computed: u64, reused: u64, kept_bytes: usize) {
    if computed > 0 {
        counter!("sluicegate_prompt_tokens_computed_total", "model" => model.to_owned())
            .increment(computed);
    }
    if reused > 0 {
        counter!("sluicegate_prompt_tokens_reused_total", "model" => model.to_owned())
            .increment(reused);
    }
    gauge!("sluicegate_prompt_cache_bytes", "model" => model.to_owned()).set(kept_bytes as f64);
}

pub fn time_to_first_token(elapsed: Duration) {
    histogram!("sluicegate_time_to_first_token_seconds").record(elapsed.as_secs_f64());
}

/// The inter-token histogram, fetched once per generation so the per-token
/// cost is one record.
pub fn inter_token() -> metrics::Histogram {
    histogram!("sluicegate_inter_token_seconds")
}

pub fn generation_ended(cause: EndCause, completion_tokens: u32) {
    counter!("sluicegate_generations_ended_total", "cause" => cause.as_str()).increment(1);
    counter!("sluicegate_tokens_generated_total").increment(u64::from(completion_tokens));
}

pub fn resumed() {
    counter!("sluicegate_resumes_total").increment(1);
}

pub fn disconnected() {
    counter!("sluicegate_disconnects_total").increment(1);
}

pub fn queue_full() {
    counter!("sluicegate_rejected_total", "reason" => "queue_full").increment(1);
}

pub fn redis_error() {
    counter!("sluicegate_redis_errors_total").increment(1);
}

/// A Redis script that failed or whose answer never came: a change that
/// did not happen, or is not known to have happened.
pub fn redis_script_failed(script: &'static str) {
    counter!("sluicegate_redis_script_failures_total", "script" => script).increment(1);
}

pub fn redis_up(up: bool) {
    gauge!("sluicegate_redis_up").set(if up { 1.0 } else { 0.0 });
}
