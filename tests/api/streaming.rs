//! Streaming and JSON answers on the echo backend, and SSE framing down to
//! the bytes.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{Events, Raw, TestServer, chat, completion_id, open_stream, post, read_all};

#[tokio::test]
async fn streams_the_echo_word_by_word_as_openai_chunks() {
    let server = TestServer::echo().await;
    let resp = open_stream(&server, "hello  big\tworld", None).await;
    let header_id = completion_id(&resp);
    assert_eq!(resp.headers()["cache-control"], "no-cache");
    assert_eq!(resp.headers()["x-accel-buffering"], "no");
    let t = read_all(resp).await;

    assert_eq!(t.text, "hello big world");
    assert_eq!(t.finish_reason.as_deref(), Some("stop"));
    assert!(t.done, "ends with [DONE]");
    let pieces: Vec<_> = t
        .chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(pieces, ["", "hello", " big", " world"]);
    assert_eq!(t.chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let first = &t.chunks[0];
    for chunk in &t.chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["id"], header_id.as_str());
        assert_eq!(chunk["created"], first["created"]);
        assert_eq!(chunk["model"], "echo");
    }
    let mut ids = t.ids.clone();
    assert!(
        ids.iter().all(|id| !id.is_empty()),
        "every event has an id: {ids:?}"
    );
    ids.dedup();
    assert_eq!(ids.len(), t.ids.len(), "ids are distinct");
}

#[tokio::test]
async fn the_bytes_follow_the_framing_rules() {
    let server = TestServer::echo().await;
    let mut raw = Raw::of(open_stream(&server, "one two", None).await);
    raw.read_to_end().await;
    let body = raw.seen;
    assert!(body.ends_with("\n\n"));
    let events: Vec<&str> = body.trim_end_matches('\n').split("\n\n").collect();
    assert_eq!(events.len(), 5, "role, two tokens, finish, [DONE]: {body}");
    for (n, event) in events.iter().enumerate() {
        // The first event also tells EventSource to reconnect after 1 s.
        let event = match n {
            0 => event.strip_prefix("retry: 1000\n").expect("retry first"),
            _ => event,
        };
        let lines: Vec<&str> = event.split('\n').collect();
        assert_eq!(lines.len(), 2, "a data line then an id line: {event:?}");
        assert!(lines[0].starts_with("data: "), "{event:?}");
        assert!(lines[1].starts_with("id: "), "{event:?}");
    }
    assert!(events[4].starts_with("data: [DONE]\nid: "));
    assert!(!body.contains("event:"));
    assert_eq!(body.matches("retry:").count(), 1);
}

#[tokio::test]
async fn include_usage_adds_a_usage_chunk_after_the_finish() {
    let server = TestServer::echo().await;
    let mut body = chat("a b c", true);
    body["stream_options"] = json!({"include_usage": true});
    let resp = post(&server, "/v1/chat/completions", &body)
        .send()
        .await
        .expect("sent");
    let t = read_all(resp).await;
    let n = t.chunks.len();
    assert_eq!(t.chunks[n - 2]["choices"][0]["finish_reason"], "stop");
    let usage = &t.chunks[n - 1];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(
        usage["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6})
    );
    assert!(t.done);
}

#[tokio::test]
async fn max_tokens_ends_with_length() {
    let server = TestServer::echo().await;
    for field in ["max_tokens", "max_completion_tokens"] {
        let mut body = chat("a b c d", true);
        body[field] = json!(2);
        let resp = post(&server, "/v1/chat/completions", &body)
            .send()
            .await
            .expect("sent");
        let t = read_all(resp).await;
        assert_eq!(t.text, "a b");
        assert_eq!(t.finish_reason.as_deref(), Some("length"));
        assert!(t.done);
    }
}

#[tokio::test]
async fn json_answers_for_chat_and_legacy() {
    let server = TestServer::echo().await;
    let resp = post(&server, "/v1/chat/completions", &chat("hi there", false))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 200);
    let id = completion_id(&resp);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["id"], id.as_str());
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(
        body["choices"][0]["message"],
        json!({"role": "assistant", "content": "hi there"})
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["completion_tokens"], 2);

    let legacy = json!({"model": "echo", "prompt": "once upon a time", "max_tokens": 3});
    let resp = post(&server, "/v1/completions", &legacy)
        .send()
        .await
        .expect("sent");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["object"], "text_completion");
    assert!(body["id"].as_str().expect("id").starts_with("cmpl-"));
    assert_eq!(body["choices"][0]["text"], "once upon a");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn legacy_completions_stream_text_chunks() {
    let server = TestServer::echo().await;
    let body = json!({"model": "echo", "prompt": ["to be or not"], "stream": true});
    let resp = post(&server, "/v1/completions", &body)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let t = read_all(resp).await;
    assert_eq!(t.text, "to be or not");
    assert!(t.chunks.iter().all(|c| c["object"] == "text_completion"));
    assert_eq!(t.finish_reason.as_deref(), Some("stop"));
    assert!(t.done);
}

#[tokio::test]
async fn a_request_without_model_gets_the_served_one_and_content_parts_work() {
    let server = TestServer::echo().await;
    let body = json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "parts "}, {"type": "text", "text": "joined"}]}]});
    let resp = post(&server, "/v1/chat/completions", &body)
        .send()
        .await
        .expect("sent");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["model"], "echo");
    assert_eq!(body["choices"][0]["message"]["content"], "parts joined");
}

#[tokio::test(start_paused = true)]
async fn the_role_chunk_goes_out_before_the_first_token() {
    let server = TestServer::options()
        .delay(Duration::from_secs(60))
        .start()
        .await;
    let started = tokio::time::Instant::now();
    let mut events = Events::of(open_stream(&server, "slow answer", None).await);
    let first = events.next_json().await;
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "not held back by the model"
    );
    let second = events.next_json().await;
    assert_eq!(second["choices"][0]["delta"]["content"], "slow");
    assert!(started.elapsed() >= Duration::from_secs(60));
}

#[tokio::test(start_paused = true)]
async fn keep_alive_comments_fill_idle_gaps_without_blank_lines() {
    let server = TestServer::options()
        .delay(Duration::from_secs(70))
        .keep_alive(Duration::from_secs(20))
        .start()
        .await;
    let mut raw = Raw::of(open_stream(&server, "tick tock", None).await);
    raw.until("\"content\":\"tick\"").await;
    // Role chunk at 0 s, comments at 20, 40 and 60 s, the token at 70 s.
    let (_, after_role) = raw.seen.split_once("\n\n").expect("role event");
    assert!(
        after_role.starts_with(": keep-alive\n: keep-alive\n: keep-alive\ndata: {"),
        "{after_role:?}"
    );
    assert!(!raw.seen.contains(": keep-alive\n\n"));
}

#[tokio::test(start_paused = true)]
async fn keep_alive_comments_are_invisible_to_sse_clients() {
    let server = TestServer::options()
        .delay(Duration::from_secs(50))
        .keep_alive(Duration::from_secs(10))
        .start()
        .await;
    let events = Events::of(open_stream(&server, "a b", None).await)
        .rest()
        .await;
    assert!(
        events.iter().all(|e| !e.data.is_empty()),
        "no empty events: {events:?}"
    );
    assert_eq!(crate::common::transcript(&events).text, "a b");
}

#[tokio::test]
async fn models_and_health() {
    let server = TestServer::echo().await;
    let models: Value = crate::common::client()
        .get(server.url("/v1/models"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "echo");
    assert_eq!(models["data"][0]["object"], "model");
    let health = crate::common::client()
        .get(server.url("/health"))
        .send()
        .await
        .expect("sent");
    assert_eq!(health.status(), 200);
    assert_eq!(
        health.json::<Value>().await.expect("json"),
        json!({"status": "ok"})
    );
}

#[tokio::test]
async fn a_request_id_is_echoed_or_made() {
    let server = TestServer::echo().await;
    let client = crate::common::client();
    let given = client
        .get(server.url("/health"))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .expect("sent");
    assert_eq!(given.headers()["x-request-id"], "abc-123");
    let made = client
        .get(server.url("/health"))
        .send()
        .await
        .expect("sent");
    assert!(!made.headers()["x-request-id"].is_empty());
}

#[tokio::test]
async fn an_answer_that_fills_its_log_ends_with_length() {
    // A log of at most 64 KiB: 5,000 echoed words (about 150 bytes an
    // event) would need ten times that.
    let mut options = TestServer::options();
    options.registry.max_log_bytes = 64 * 1024;
    let server = options.start().await;
    let words: Vec<String> = (0..5_000).map(|i| format!("w{i}")).collect();
    let resp = open_stream(&server, &words.join(" "), None).await;
    let id = completion_id(&resp);
    let t = read_all(resp).await;
    assert_eq!(t.finish_reason.as_deref(), Some("length"));
    assert!(t.done);
    let got = t.text.split(' ').count();
    assert!(got < words.len(), "cut: {got} words");
    assert_eq!(t.text, words[..got].join(" "), "a clean prefix");
    let generation = server
        .state
        .registry
        .get(
            sluicegate::session::CallerId::ANONYMOUS,
            &sluicegate::session::GenerationId::from(id.as_str()),
        )
        .expect("kept");
    // The cap, plus the event that crossed it, the finish and [DONE].
    assert!(
        generation.log.bytes() < 64 * 1024 + 1024,
        "{}",
        generation.log.bytes()
    );
}
