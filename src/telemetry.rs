//! Tracing setup (human-readable lines on stderr, filtered by `--log`;
//! spans over OTLP with `--otlp-endpoint`, continuing W3C trace context
//! across instances and to upstreams) and the Prometheus metrics: every
//! metric name lives here.

use std::io::IsTerminal as _;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::session::EndCause;

/// What telemetry holds until the process ends: the trace exporter, which
/// flushes what it has on [`Telemetry::shutdown`].
pub struct Telemetry {
    traces: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends the spans still buffered (a short wait at most).
    pub fn shutdown(self) {
        if let Some(traces) = self.traces
            && let Err(err) = traces.shutdown_with_timeout(Duration::from_secs(5))
        {
            eprintln!("sluicegate: traces not all exported: {err}");
        }
    }
}

/// Log lines on stderr, filtered by `filter`; with an OTLP endpoint
/// (`http://host:4318`), spans exported there too over OTLP/HTTP, and a
/// W3C `traceparent` understood on the way in and sent on the way out.
/// Call it outside the async runtime: the exporter has its own thread.
pub fn init(
    filter: &str,
    otlp_endpoint: Option<&str>,
    service_name: &str,
) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let traces = match otlp_endpoint {
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpJson)
                .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
                .build()?;
            let resource = Resource::builder()
                .with_service_name(service_name.to_owned())
                .build();
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource)
                    .build(),
            )
        }
        None => None,
    };
    let spans = traces.as_ref().map(|provider| {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        tracing_opentelemetry::layer().with_tracer(provider.tracer("sluicegate"))
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(spans)
        .init();
    Ok(Telemetry { traces })
}

/// The trace context a request's headers carry (`traceparent`), made the
/// parent of `span`; nothing without an exporter.
pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) {
    let parent = opentelemetry::global::get_text_map_propagator(|p| {
        p.extract(&opentelemetry_http::HeaderExtractor(headers))
    });
    // No OpenTelemetry layer (no exporter): nothing to continue.
    let _ = span.set_parent(parent);
}

/// The current span's trace context as headers for a request it makes.
pub fn trace_headers(headers: &mut http::HeaderMap) {
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&context, &mut opentelemetry_http::HeaderInjector(headers));
    });
}

/// The current span's `traceparent`, to carry where no header goes (a
/// message to another instance); `None` outside a trace.
pub fn traceparent() -> Option<String> {
    let mut headers = http::HeaderMap::new();
    trace_headers(&mut headers);
    headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// A span for work done here on behalf of a request another instance
/// took, in that request's trace.
pub fn remote_span(name: &'static str, traceparent: Option<&str>) -> tracing::Span {
    let span = tracing::info_span!("remote", otel.name = name);
    if let Some(value) = traceparent.and_then(|t| http::HeaderValue::from_str(t).ok()) {
        let mut headers = http::HeaderMap::new();
        headers.insert("traceparent", value);
        continue_trace(&span, &headers);
    }
    span
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

/// KV-cache blocks of the running generations, and those the budget has
/// left (`--kv-cache-memory` in blocks of 64 positions).
pub fn kv_blocks(model: &str, used: usize, free: usize) {
    gauge!("sluicegate_kv_cache_blocks_used", "model" => model.to_owned()).set(used as f64);
    gauge!("sluicegate_kv_cache_blocks_free", "model" => model.to_owned()).set(free as f64);
}

/// Tokens drafted by prompt lookup in one step, and those kept.
pub fn draft_tokens(model: &str, drafted: usize, kept: usize) {
    counter!("sluicegate_draft_tokens_total", "model" => model.to_owned(), "outcome" => "kept")
        .increment(kept as u64);
    counter!("sluicegate_draft_tokens_total", "model" => model.to_owned(), "outcome" => "rejected")
        .increment((drafted - kept) as u64);
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
