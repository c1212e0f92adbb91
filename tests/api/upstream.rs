//! The `openai` backend in front of real upstreams: another sluicegate on
//! echo, and a misbehaving OpenAI-style server written here that can omit
//! `[DONE]`, fail mid-stream, stall, refuse, and that records when a
//! client's connection goes away.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use sluicegate::backend::upstream::{UpstreamBackend, UpstreamConfig};

use crate::common::{
    Events, TestServer, cancel, chat, client, completion_id, eventually, open_stream,
    post as post_to, read_all, transcript,
};

fn relay_to(urls: Vec<String>, first_byte_timeout: Duration) -> crate::common::Options {
    let backend = UpstreamBackend::new(UpstreamConfig {
        urls,
        api_key: Some("upstream-secret".into()),
        connect_timeout: Duration::from_secs(2),
        first_byte_timeout,
        http2: false,
    })
    .expect("backend");
    TestServer::options().backend(Arc::new(backend))
}

/// A badly behaved OpenAI-compatible server. The last user message picks
/// the misbehaviour.
struct Rogue {
    base: String,
    /// Streams whose client went away before the end.
    closed: Arc<AtomicUsize>,
    /// Requests seen, and the last Authorization header and body.
    requests: Arc<AtomicUsize>,
    last_auth: Arc<std::sync::Mutex<Option<String>>>,
    last_body: Arc<std::sync::Mutex<Value>>,
}

/// Counts a dropped stream that did not reach its end.
struct OnClose(Arc<AtomicUsize>, bool);

impl Drop for OnClose {
    fn drop(&mut self) {
        if !self.1 {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn sse(chunks: Vec<String>, closed: Arc<AtomicUsize>, gap: Duration) -> Response {
    let body = async_stream::stream! {
        let mut guard = OnClose(closed, false);
        for chunk in chunks {
            tokio::time::sleep(gap).await;
            yield Ok::<_, Infallible>(chunk);
        }
        guard.1 = true;
    };
    (
        [(header::CONTENT_TYPE, "text/event-stream")],
        Body::from_stream(body),
    )
        .into_response()
}

fn delta(text: &str, role: bool, finish: Option<&str>) -> String {
    let mut delta = json!({"content": text});
    if role {
        delta["role"] = json!("assistant");
    }
    let chunk = json!({"id": "", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
    format!("data: {chunk}\n\n")
}

/// A chunk as vLLM streams it, with `choices` as given.
fn vllm(choices: Value) -> String {
    let chunk = json!({"id": "chatcmpl-up", "object": "chat.completion.chunk",
        "created": 1, "model": "echo", "choices": choices});
    format!("data: {chunk}\n\n")
}

fn vllm_delta(delta: Value, finish: Option<&str>) -> String {
    vllm(json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]))
}

/// vLLM's stream of a reasoning model calling two tools at once: reasoning
/// deltas, then each call's id, type and name, then its arguments split
/// mid-value, then `tool_calls` and usage.
fn vllm_tool_calls() -> Vec<String> {
    let call = |index: u32, fragment: Value| json!({"tool_calls": [{"index": index, "function": fragment}]});
    let mut first = call(0, json!({"name": "get_weather"}));
    first["tool_calls"][0]["id"] = json!("chatcmpl-tool-a1");
    first["tool_calls"][0]["type"] = json!("function");
    let mut second = call(1, json!({"name": "get_time"}));
    second["tool_calls"][0]["id"] = json!("chatcmpl-tool-b2");
    second["tool_calls"][0]["type"] = json!("function");
    vec![
        vllm_delta(json!({"role": "assistant", "content": ""}), None),
        vllm_delta(json!({"reasoning_content": "The user wants"}), None),
        vllm_delta(json!({"reasoning_content": " weather and time."}), None),
        vllm_delta(first, None),
        vllm_delta(call(0, json!({"arguments": "{\"city\": \"Pa"})), None),
        vllm_delta(call(0, json!({"arguments": "ris\"}"})), None),
        vllm_delta(second, None),
        vllm_delta(call(1, json!({"arguments": "{\"zone\": "})), None),
        vllm_delta(call(1, json!({"arguments": "\"CET\"}"})), None),
        vllm_delta(json!({"content": ""}), Some("tool_calls")),
        format!(
            "data: {}\n\n",
            json!({"id": "chatcmpl-up", "object": "chat.completion.chunk", "choices": [],
            "usage": {"prompt_tokens": 20, "completion_tokens": 30, "total_tokens": 50}})
        ),
        "data: [DONE]\n\n".into(),
    ]
}

async fn rogue() -> Rogue {
    let closed = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let last_auth = Arc::new(std::sync::Mutex::new(None));
    let last_body = Arc::new(std::sync::Mutex::new(Value::Null));
    let (c, r, a, b) = (
        Arc::clone(&closed),
        Arc::clone(&requests),
        Arc::clone(&last_auth),
        Arc::clone(&last_body),
    );
    let app = axum::Router::new()
        .route(
            "/v1/models",
            get(|| async { Json(json!({"object": "list", "data": [{"id": "echo", "object": "model", "owned_by": "rogue"}]})) }),
        )
        .route(
            "/v1/chat/completions",
            post(move |headers: axum::http::HeaderMap, Json(body): Json<Value>| {
                let (closed, requests, last_auth, last_body) = (Arc::clone(&c), Arc::clone(&r), Arc::clone(&a), Arc::clone(&b));
                async move {
                    requests.fetch_add(1, Ordering::SeqCst);
                    *last_body.lock().expect("lock") = body.clone();
                    *last_auth.lock().expect("lock") =
                        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_owned);
                    let mode = body["messages"].as_array().and_then(|m| m.last()).and_then(|m| m["content"].as_str()).unwrap_or("").to_owned();
                    let ms = Duration::from_millis;
                    match mode.as_str() {
                        "no-done" => sse(
                            vec![delta("one", true, None), delta(" two", true, None), delta("", true, Some("eos_token"))],
                            closed,
                            ms(1),
                        ),
                        "error-mid" => sse(
                            vec![delta("partial", true, None), "data: {\"error\": {\"message\": \"engine exploded\"}}\n\n".into()],
                            closed,
                            ms(1),
                        ),
                        "tools-vllm" => sse(vllm_tool_calls(), closed, ms(1)),
                        "tools-slow" => sse(vllm_tool_calls(), closed, ms(150)),
                        "two-choices" => sse(
                            vec![
                                vllm(json!([{"index": 0, "delta": {"content": "a"}, "finish_reason": null},
                                    {"index": 1, "delta": {"content": "b"}, "finish_reason": null}])),
                                vllm(json!([{"index": 1, "delta": {"refusal": "no"}, "finish_reason": "content_filter"}])),
                                vllm(json!([{"index": 0, "delta": {"content": "!"},
                                    "logprobs": {"content": [{"token": "!", "logprob": -0.5, "bytes": [33], "top_logprobs": []}]},
                                    "finish_reason": "stop"}])),
                                "data: [DONE]\n\n".into(),
                            ],
                            closed,
                            ms(1),
                        ),
                        "close-early" => sse(vec![delta("cut", false, None)], closed, ms(1)),
                        "slow" => sse((0..400).map(|i| delta(&format!(" t{i}"), false, None)).collect(), closed, ms(30)),
                        "stall" => {
                            tokio::time::sleep(Duration::from_secs(30)).await;
                            StatusCode::OK.into_response()
                        }
                        "503" => (StatusCode::SERVICE_UNAVAILABLE, "overloaded").into_response(),
                        "400" => (StatusCode::BAD_REQUEST, Json(json!({"error": {"message": "upstream says the prompt is bad"}}))).into_response(),
                        "429" => (StatusCode::TOO_MANY_REQUESTS, [(header::RETRY_AFTER, "7")], Json(json!({"error": {"message": "slow down"}}))).into_response(),
                        _ => sse(vec![delta("fine", false, Some("stop")), "data: [DONE]\n\n".into()], closed, ms(1)),
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    Rogue {
        base,
        closed,
        requests,
        last_auth,
        last_body,
    }
}

/// A URL where nothing listens.
async fn dead_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    format!("http://{addr}")
}

#[tokio::test]
async fn a_sluicegate_upstream_is_relayed_with_our_own_framing() {
    let upstream = TestServer::echo().await;
    let server = relay_to(vec![upstream.base.clone()], Duration::from_secs(5))
        .start()
        .await;
    let resp = open_stream(&server, "hello big world", None).await;
    let id = completion_id(&resp);
    let t = read_all(resp).await;
    assert_eq!(t.text, "hello big world");
    assert_eq!(t.finish_reason.as_deref(), Some("stop"));
    assert!(t.done);
    assert!(
        t.chunks.iter().all(|c| c["id"] == id.as_str()),
        "our ids, not the upstream's"
    );
    assert!(t.ids.iter().all(|e| e.starts_with(&id)));

    let mut body = chat("a b c d", false);
    body["max_tokens"] = json!(2);
    let answer: Value = post_to(&server, "/v1/chat/completions", &body)
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(answer["choices"][0]["message"]["content"], "a b");
    assert_eq!(answer["choices"][0]["finish_reason"], "length");
    assert_eq!(
        answer["usage"]["prompt_tokens"], 4,
        "usage from the upstream"
    );

    let legacy = json!({"model": "echo", "prompt": "once upon", "stream": true});
    let t = read_all(
        post_to(&server, "/v1/completions", &legacy)
            .send()
            .await
            .expect("sent"),
    )
    .await;
    assert_eq!(t.text, "once upon");

    let models: Value = client()
        .get(server.url("/v1/models"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(models["data"][0]["id"], "echo");
    let mut unknown = chat("x", true);
    unknown["model"] = json!("gpt-9");
    let resp = post_to(&server, "/v1/chat/completions", &unknown)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 404);
    assert_eq!(
        resp.json::<Value>().await.expect("json")["error"]["code"],
        "model_not_found"
    );
}

#[tokio::test]
async fn odd_upstream_streams_still_end_cleanly() {
    let rogue = rogue().await;
    let server = relay_to(vec![rogue.base.clone()], Duration::from_secs(5))
        .start()
        .await;

    let t = read_all(open_stream(&server, "no-done", None).await).await;
    assert_eq!(
        (t.text.as_str(), t.finish_reason.as_deref(), t.done),
        ("one two", Some("stop"), true)
    );
    assert_eq!(
        t.chunks
            .iter()
            .filter(|c| c["choices"][0]["delta"]["role"].is_string())
            .count(),
        1,
        "one role chunk"
    );

    for mode in ["error-mid", "close-early"] {
        let events = Events::of(open_stream(&server, mode, None).await)
            .rest()
            .await;
        let last_data = &events[events.len() - 2].data;
        assert!(
            last_data.contains("\"error\""),
            "{mode}: an error event before [DONE]: {events:?}"
        );
        assert_eq!(events.last().expect("events").data, "[DONE]");
    }
}

#[tokio::test]
async fn refusals_pass_through_with_their_status() {
    let rogue = rogue().await;
    let server = relay_to(vec![rogue.base.clone()], Duration::from_secs(5))
        .start()
        .await;
    let resp = post_to(&server, "/v1/chat/completions", &chat("400", true))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["message"], "upstream says the prompt is bad");
    let resp = post_to(&server, "/v1/chat/completions", &chat("429", true))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "7");
    assert_eq!(
        resp.json::<Value>().await.expect("json")["error"]["type"],
        "rate_limit_error"
    );
    assert_eq!(
        rogue.last_auth.lock().expect("lock").as_deref(),
        Some("Bearer upstream-secret"),
        "the upstream key is sent, never the client's"
    );
}

#[tokio::test]
async fn a_failing_or_stalled_upstream_is_retried_on_another_unseen() {
    let rogue = rogue().await;
    let echo = TestServer::echo().await;
    for (n, mode) in ["503", "stall"].into_iter().enumerate() {
        // A fresh relay each time, the rogue first in line: with equal
        // load, order decides.
        let server = relay_to(
            vec![rogue.base.clone(), echo.base.clone()],
            Duration::from_millis(300),
        )
        .start()
        .await;
        let t = read_all(open_stream(&server, mode, None).await).await;
        assert_eq!(
            (t.text.as_str(), t.finish_reason.as_deref()),
            (mode, Some("stop")),
            "echo answered"
        );
        assert_eq!(
            rogue.requests.load(Ordering::SeqCst),
            n + 1,
            "the rogue was tried first"
        );
    }
}

#[tokio::test]
async fn a_down_upstream_is_skipped() {
    let echo = TestServer::echo().await;
    let server = relay_to(
        vec![dead_url().await, echo.base.clone()],
        Duration::from_secs(2),
    )
    .start()
    .await;
    for _ in 0..3 {
        let t = read_all(open_stream(&server, "still served", None).await).await;
        assert_eq!(t.text, "still served");
    }
    let models = client()
        .get(server.url("/v1/models"))
        .send()
        .await
        .expect("sent");
    assert_eq!(models.status(), 200);
}

#[tokio::test]
async fn cancel_and_session_replacement_close_the_upstream_connection() {
    let rogue = rogue().await;
    let server = relay_to(vec![rogue.base.clone()], Duration::from_secs(5))
        .start()
        .await;

    let resp = open_stream(&server, "slow", None).await;
    let id = completion_id(&resp);
    let mut events = Events::of(resp);
    events.next_json().await;
    events.next_json().await;
    assert_eq!(rogue.closed.load(Ordering::SeqCst), 0);
    cancel(&server, &id).await;
    assert_eq!(
        transcript(&events.rest().await).finish_reason.as_deref(),
        Some("cancelled")
    );
    eventually(Duration::from_secs(3), || {
        rogue.closed.load(Ordering::SeqCst) == 1
    })
    .await;

    let mut first = Events::of(open_stream(&server, "slow", Some("s")).await);
    first.next_json().await;
    first.next_json().await;
    let second = open_stream(&server, "fine", Some("s")).await;
    assert_eq!(
        transcript(&first.rest().await).finish_reason.as_deref(),
        Some("cancelled")
    );
    eventually(Duration::from_secs(3), || {
        rogue.closed.load(Ordering::SeqCst) == 2
    })
    .await;
    assert_eq!(read_all(second).await.text, "fine");
}

#[tokio::test]
async fn an_upstream_down_at_start_serves_the_default_model_once_it_is_up() {
    // Nothing listens on the upstream's port yet.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let relay = relay_to(
        vec![format!("http://127.0.0.1:{port}")],
        Duration::from_secs(5),
    )
    .start()
    .await;
    let no_model =
        json!({"stream": false, "messages": [{"role": "user", "content": "hello there"}]});
    let ask = || post_to(&relay, "/v1/chat/completions", &no_model).send();
    assert_ne!(ask().await.expect("sent").status(), 200, "no upstream yet");

    // The upstream comes up: an echo sluicegate on that port.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind");
    let upstream = sluicegate::server::AppState::new(
        Arc::new(sluicegate::backend::echo::EchoBackend::new(
            "echo-up",
            Duration::ZERO,
        )),
        sluicegate::session::RegistryConfig::default(),
        Vec::new(),
        sluicegate::server::Settings::default(),
    )
    .await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(sluicegate::server::run(listener, None, upstream, async {
        let _ = stopped.await;
    }));

    // Without a `model`, the request gets the upstream's, picked now and
    // not at startup; the background refresh finds it within its backoff.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let answer: Value = loop {
        let resp = ask().await.expect("sent");
        if resp.status() == 200 {
            break resp.json().await.expect("json");
        }
        assert!(tokio::time::Instant::now() < deadline, "never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(answer["model"], "echo-up");
    assert_eq!(answer["choices"][0]["message"]["content"], "hello there");

    // The upstream goes away again: the list it gave is kept.
    drop(stop);
    let models: Value = client()
        .get(relay.url("/v1/models"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(models["data"][0]["id"], "echo-up", "{models}");
}

#[tokio::test]
async fn fields_sluicegate_does_not_own_reach_the_upstream_unchanged() {
    let upstream = rogue().await;
    let server = relay_to(vec![upstream.base.clone()], Duration::from_secs(5))
        .start()
        .await;
    let mut body = chat("fine", true);
    let extra = json!({
        "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
        "tool_choice": "auto",
        "parallel_tool_calls": false,
        "response_format": {"type": "json_object"},
        "logprobs": true,
        "top_logprobs": 2,
        "logit_bias": {"42": -5},
        "user": "u-7",
        "metadata": {"trace": "t-1"},
        "reasoning_effort": "low",
        "a_field_never_heard_of": {"nested": [1, 2]},
    });
    for (key, value) in extra.as_object().expect("object") {
        body[key] = value.clone();
    }
    let resp = post_to(&server, "/v1/chat/completions", &body)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 200);
    read_all(resp).await;
    let sent = upstream.last_body.lock().expect("lock").clone();
    for (key, value) in extra.as_object().expect("object") {
        assert_eq!(&sent[key], value, "{key} relayed unchanged");
    }
    assert_eq!(sent["stream"], true, "sluicegate's own fields win");

    // The echo backend has no vocabulary to bias: a 400 that names the field.
    let echo = TestServer::echo().await;
    let mut biased = chat("x", true);
    biased["logit_bias"] = extra["logit_bias"].clone();
    let refused = post_to(&echo, "/v1/chat/completions", &biased)
        .send()
        .await
        .expect("sent");
    assert_eq!(refused.status(), 400);
    let err: Value = refused.json().await.expect("json");
    assert_eq!(err["error"]["param"], "logit_bias");
}

/// The `choices` of every chunk of a stream, from the upstream's SSE.
fn upstream_choices(chunks: &[String]) -> Vec<Value> {
    chunks
        .iter()
        .filter_map(|c| serde_json::from_str::<Value>(c.trim().strip_prefix("data: ")?).ok())
        .flat_map(|c| c["choices"].as_array().cloned().unwrap_or_default())
        .collect()
}

#[tokio::test]
async fn tool_calls_reasoning_and_choices_are_relayed_as_the_upstream_sent_them() {
    let upstream = rogue().await;
    let server = relay_to(vec![upstream.base.clone()], Duration::from_secs(5))
        .start()
        .await;
    let resp = post_to(&server, "/v1/chat/completions", &chat("tools-vllm", true))
        .send()
        .await
        .expect("sent");
    let t = read_all(resp).await;
    assert!(t.done);
    assert_eq!(t.finish_reason.as_deref(), Some("tool_calls"));
    // Every delta field the upstream sent arrives as it was, in order.
    let sent: Vec<Value> = upstream_choices(&vllm_tool_calls())
        .into_iter()
        .map(|c| c["delta"].clone())
        .filter(|d| d.get("tool_calls").is_some() || d.get("reasoning_content").is_some())
        .collect();
    let got: Vec<Value> = t
        .chunks
        .iter()
        .map(|c| c["choices"][0]["delta"].clone())
        .filter(|d| d.get("tool_calls").is_some() || d.get("reasoning_content").is_some())
        .collect();
    assert_eq!(got, sent);
    assert!(
        t.chunks.iter().all(|c| c["id"] == t.chunks[0]["id"]),
        "our own ids"
    );

    // Not streaming: the calls assembled as OpenAI does.
    let answer: Value = post_to(&server, "/v1/chat/completions", &chat("tools-vllm", false))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    let choice = &answer["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], Value::Null);
    assert_eq!(
        choice["message"]["reasoning_content"],
        "The user wants weather and time."
    );
    assert_eq!(
        choice["message"]["tool_calls"],
        json!([
            {"id": "chatcmpl-tool-a1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
            {"id": "chatcmpl-tool-b2", "type": "function",
             "function": {"name": "get_time", "arguments": "{\"zone\": \"CET\"}"}},
        ])
    );
    assert_eq!(answer["usage"]["completion_tokens"], 30);

    // Several choices: each with its index, its own fields and finish.
    let mut two = chat("two-choices", false);
    two["n"] = json!(2);
    let answer: Value = post_to(&server, "/v1/chat/completions", &two)
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(upstream.last_body.lock().expect("lock")["n"], 2);
    let choices = &answer["choices"];
    assert_eq!(choices[0]["message"]["content"], "a!");
    assert_eq!(choices[0]["finish_reason"], "stop");
    assert_eq!(choices[0]["logprobs"]["content"][0]["logprob"], -0.5);
    assert_eq!(choices[1]["message"]["content"], "b");
    assert_eq!(choices[1]["message"]["refusal"], "no");
    assert_eq!(choices[1]["finish_reason"], "content_filter");
    two["stream"] = json!(true);
    let t = read_all(
        post_to(&server, "/v1/chat/completions", &two)
            .send()
            .await
            .expect("sent"),
    )
    .await;
    let finishes: Vec<(Value, Value)> = t
        .chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().cloned().unwrap_or_default())
        .filter(|c| !c["finish_reason"].is_null())
        .map(|c| (c["index"].clone(), c["finish_reason"].clone()))
        .collect();
    assert_eq!(
        finishes,
        vec![
            (json!(1), json!("content_filter")),
            (json!(0), json!("stop"))
        ]
    );
}

#[tokio::test]
async fn a_resume_in_the_middle_of_a_tool_call_replays_its_fragments_byte_for_byte() {
    let upstream = rogue().await;
    let server = relay_to(vec![upstream.base.clone()], Duration::from_secs(5))
        .start()
        .await;
    let resp = post_to(&server, "/v1/chat/completions", &chat("tools-slow", true))
        .send()
        .await
        .expect("sent");
    let id = completion_id(&resp);
    let mut first = crate::common::Raw::of(resp);
    // Cut after the first argument fragment of the first call.
    first.until("{\\\"city\\\": \\\"Pa").await;
    let cut = first.seen.rfind("\n\n").expect("a whole event") + 2;
    let before = first.seen[..cut].to_owned();
    let last_id = before
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("id: "))
        .expect("an id")
        .to_owned();
    drop(first);
    let resumed = client()
        .get(server.url(&format!("/v1/chat/completions/{id}/events")))
        .header("last-event-id", &last_id)
        .send()
        .await
        .expect("sent");
    let mut rest = crate::common::Raw::of(resumed);
    rest.read_to_end().await;

    // The whole stream read afresh: the cut one plus the resumed rest.
    let mut whole = crate::common::Raw::of(
        client()
            .get(server.url(&format!("/v1/chat/completions/{id}/events")))
            .send()
            .await
            .expect("sent"),
    );
    whole.read_to_end().await;
    assert_eq!(format!("{before}{}", rest.seen), whole.seen);
    assert!(rest.seen.contains("ris\\\"}"), "the rest of the arguments");
    assert!(rest.seen.contains("chatcmpl-tool-b2"), "the second call");
    assert!(rest.seen.contains("data: [DONE]"));
}

#[tokio::test]
async fn the_ai_sdk_calls_tools_through_the_relay() {
    let upstream = rogue().await;
    let server = relay_to(vec![upstream.base.clone()], Duration::from_secs(5))
        .start()
        .await;
    let env = [
        ("PROMPT", "tools-vllm"),
        ("TOOL_CHOICE", "auto"),
        ("EXPECT_CALLS", "2"),
        ("EXPECT_REASONING", "1"),
    ]
    .map(|(k, v)| (k, std::path::PathBuf::from(v)));
    let out = crate::clients::run_at(&server.base, "node", "node/ai_sdk_tools.mjs", &env).await;
    assert!(out.contains("ai-sdk tools: ok"), "{out}");
    // The second step carried the calls and their results back verbatim.
    let second = upstream.last_body.lock().expect("lock").clone();
    let messages = second["messages"].as_array().expect("messages");
    let assistant = messages
        .iter()
        .find(|m| m["role"] == "assistant")
        .expect("assistant turn");
    assert_eq!(
        assistant["tool_calls"][1]["id"], "chatcmpl-tool-b2",
        "{second}"
    );
    let results: Vec<&Value> = messages.iter().filter(|m| m["role"] == "tool").collect();
    assert_eq!(results.len(), 2, "{second}");
    assert_eq!(results[0]["tool_call_id"], "chatcmpl-tool-a1");
}
