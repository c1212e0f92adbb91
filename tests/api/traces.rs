//! Traces across instances: a client's W3C `traceparent` continued by the
//! instance it reaches, sent on to the upstream it relays to, and carried
//! to the instance that owns a generation when another one cancels it.
//! The spans are read from a real OTLP/HTTP receiver (the JSON encoding),
//! started here on a free port.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::routing::post;
use serde_json::Value;

use crate::common::{Events, chat, client, completion_id};
use crate::process::Process;
use crate::services::{Redis, until};

/// An OTLP/HTTP receiver that keeps every export it gets.
struct Receiver {
    url: String,
    exports: Arc<Mutex<Vec<Value>>>,
}

impl Receiver {
    async fn start() -> Self {
        let exports = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&exports);
        let app = Router::new().route(
            "/v1/traces",
            post(move |body: axum::body::Bytes| {
                let kept = Arc::clone(&kept);
                async move {
                    let export: Value = serde_json::from_slice(&body).expect("OTLP JSON");
                    kept.lock().expect("lock").push(export);
                    "{}"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, exports }
    }

    /// (service, span name, parent span id) of every span of `trace`.
    fn spans_of(&self, trace: &str) -> Vec<(String, String, String)> {
        let exports = self.exports.lock().expect("lock");
        let mut found = Vec::new();
        for export in exports.iter() {
            for resource in export["resourceSpans"].as_array().into_iter().flatten() {
                let service = resource["resource"]["attributes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|a| a["key"] == "service.name")
                    .and_then(|a| a["value"]["stringValue"].as_str())
                    .unwrap_or_default()
                    .to_owned();
                for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                    for span in scope["spans"].as_array().into_iter().flatten() {
                        if span["traceId"]
                            .as_str()
                            .is_some_and(|t| t.eq_ignore_ascii_case(trace))
                        {
                            found.push((
                                service.clone(),
                                span["name"].as_str().unwrap_or_default().to_owned(),
                                span["parentSpanId"].as_str().unwrap_or_default().to_owned(),
                            ));
                        }
                    }
                }
            }
        }
        found
    }
}

async fn traced(receiver: &Receiver, service: &str, args: &[&str]) -> Process {
    let mut all = vec![
        "--otlp-endpoint",
        receiver.url.as_str(),
        "--otlp-service-name",
        service,
    ];
    all.extend_from_slice(args);
    // The SDK's own setting: export each batch at once rather than every 5 s.
    Process::start(&all, &[("OTEL_BSP_SCHEDULE_DELAY", "50")]).await
}

#[tokio::test]
async fn one_trace_spans_two_instances_and_the_upstream() {
    let receiver = Receiver::start().await;
    let redis = Redis::start().await;
    // No grace upstream: its spans end once the relay drops the stream.
    let upstream = traced(
        &receiver,
        "upstream",
        &[
            "--backend",
            "echo",
            "--token-delay",
            "20ms",
            "--reattach-grace",
            "0s",
        ],
    )
    .await;
    let relay_to = format!("{}/v1", upstream.base);
    let url = redis.url();
    let replica = [
        "--backend",
        "openai",
        "--upstream",
        &relay_to,
        "--redis",
        &url,
        "--redis-lease",
        "1s",
    ];
    let a = traced(&receiver, "instance-a", &replica).await;
    let b = traced(&receiver, "instance-b", &replica).await;
    for p in [&a, &b] {
        until(Duration::from_secs(10), || crate::replicas::redis_ok(p)).await;
    }

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let started = client()
        .post(a.url("/v1/chat/completions"))
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .json(&chat(&crate::replicas::words(500), true))
        .send()
        .await
        .expect("sent");
    assert_eq!(started.status(), 200);
    let id = completion_id(&started);
    let mut events = Events::of(started);
    events.next_json().await;
    events.next_json().await;
    // The client cancels through the other instance, in the same trace.
    let cancelled: Value = client()
        .post(b.url(&format!("/v1/chat/completions/{id}/cancel")))
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b8-01"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(cancelled["cancelled"], true, "{cancelled}");
    drop(events);

    until(Duration::from_secs(20), || {
        let spans = receiver.spans_of(trace);
        async move {
            ["instance-a", "instance-b", "upstream"]
                .iter()
                .all(|s| spans.iter().any(|(service, _, _)| service == s))
                && spans
                    .iter()
                    .any(|(s, name, _)| s == "instance-a" && name == "cancel")
        }
    })
    .await;
    let spans = receiver.spans_of(trace);
    // The client's own span is the parent of what each instance did first.
    for service in ["instance-a", "instance-b"] {
        assert!(
            spans.iter().any(|(s, name, parent)| s == service
                && name == "request"
                && parent.starts_with("00f067aa0ba902b")),
            "{spans:?}"
        );
    }
}
