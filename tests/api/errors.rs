//! Every refusal is a real status with OpenAI's error shape, and no amount
//! of bad input disturbs a stream running beside it.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{TestServer, chat, client, open_stream, post, read_all};

/// Asserts an OpenAI-shaped error and returns its `error` object.
async fn error_of(resp: reqwest::Response, status: u16) -> Value {
    assert_eq!(resp.status(), status);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body: Value = resp.json().await.expect("JSON error body");
    let error = body["error"].clone();
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(error["type"].is_string(), "{body}");
    assert!(
        error.get("param").is_some() && error.get("code").is_some(),
        "{body}"
    );
    error
}

async fn send_raw_json(server: &TestServer, body: &'static str) -> reqwest::Response {
    client()
        .post(server.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("sent")
}

#[tokio::test]
async fn bad_bodies_are_400_naming_the_param() {
    let server = TestServer::echo().await;
    for (body, param) in [
        (
            r#"{"messages": [{"role": "user", "content": "x"}"#,
            Value::Null,
        ),
        (r#"{"messages": "hello"}"#, json!("messages")),
        (r#"{"model": "echo"}"#, json!("messages")),
        (
            r#"{"messages": [{"role": "user", "content": "x"}], "temperature": 9}"#,
            json!("temperature"),
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}], "top_p": "high"}"#,
            json!("top_p"),
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}], "n": 3}"#,
            json!("n"),
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}], "stream": "yes"}"#,
            json!("stream"),
        ),
    ] {
        let error = error_of(send_raw_json(&server, body).await, 400).await;
        assert_eq!(error["type"], "invalid_request_error", "{body}");
        assert_eq!(error["param"], param, "{body}");
    }
}

#[tokio::test]
async fn unknown_models_routes_and_generations_are_404() {
    let server = TestServer::echo().await;
    let mut body = chat("x", true);
    body["model"] = json!("gpt-9");
    let error = error_of(
        post(&server, "/v1/chat/completions", &body)
            .send()
            .await
            .expect("sent"),
        404,
    )
    .await;
    assert_eq!(error["code"], "model_not_found");
    assert_eq!(error["param"], "model");
    let error = error_of(
        client()
            .get(server.url("/v1/nothing"))
            .send()
            .await
            .expect("sent"),
        404,
    )
    .await;
    assert_eq!(error["type"], "not_found_error");
    error_of(
        client()
            .get(server.url("/v1/chat/completions/chatcmpl-x/events"))
            .send()
            .await
            .expect("sent"),
        404,
    )
    .await;
    error_of(
        client()
            .get(server.url("/v1/models/gpt-9"))
            .send()
            .await
            .expect("sent"),
        404,
    )
    .await;
    error_of(
        client()
            .delete(server.url("/v1/chat/completions"))
            .send()
            .await
            .expect("sent"),
        405,
    )
    .await;
}

#[tokio::test]
async fn bodies_over_the_limit_are_413_with_or_without_a_length() {
    let mut options = TestServer::options();
    options.settings.max_body = 1_000;
    let server = options.start().await;
    let big = json!({"messages": [{"role": "user", "content": "x".repeat(2_000)}]});
    let error = error_of(
        post(&server, "/v1/chat/completions", &big)
            .send()
            .await
            .expect("sent"),
        413,
    )
    .await;
    assert_eq!(error["type"], "invalid_request_error");

    let chunks = futures_util::stream::iter(
        (0..20).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b' '; 100]))),
    );
    let streamed = client()
        .post(server.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .expect("sent");
    error_of(streamed, 413).await;
}

#[tokio::test]
async fn a_body_that_is_not_json_is_415() {
    let server = TestServer::echo().await;
    let plain = client()
        .post(server.url("/v1/chat/completions"))
        .header("content-type", "text/plain")
        .body(chat("x", false).to_string())
        .send()
        .await
        .expect("sent");
    error_of(plain, 415).await;
    let none = client()
        .post(server.url("/v1/chat/completions"))
        .body(chat("x", false).to_string())
        .send()
        .await
        .expect("sent");
    error_of(none, 415).await;
}

/// Writes `request` on a fresh connection and reads the status line.
async fn raw_exchange(addr: &str, request: Vec<u8>) -> String {
    let Ok(mut socket) = tokio::net::TcpStream::connect(addr).await else {
        return String::new();
    };
    let _ = socket.write_all(&request).await;
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut answer))
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or(0);
    String::from_utf8_lossy(&answer[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn http_post(body: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

#[tokio::test]
async fn a_flood_of_malformed_requests_leaves_a_running_stream_intact() {
    let server = TestServer::options()
        .delay(Duration::from_millis(10))
        .start()
        .await;
    let words: Vec<String> = (0..60).map(|i| format!("w{i}")).collect();
    let text = words.join(" ");
    let stream = open_stream(&server, &text, Some("calm")).await;
    let reading = tokio::spawn(read_all(stream));

    let addr = server.base.trim_start_matches("http://").to_owned();
    let deep = format!(
        "{{\"messages\":{}{}}}",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let mut seed = 0x2545_f491_u32;
    let mut noise = move || {
        (0..300)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                seed.to_le_bytes()[0]
            })
            .collect::<Vec<u8>>()
    };
    let mut statuses = Vec::new();
    for round in 0..25 {
        let bodies: Vec<Vec<u8>> = vec![
            noise(),
            br#"{"messages": [{"role": "user", "content": "trunc"#.to_vec(),
            deep.clone().into_bytes(),
            b"{\"messages\": [{\"role\": \"user\", \"content\": \"\xff\xfe\xc3\"}]}".to_vec(),
            br#"{"messages": [{"role": "user", "content": 5}], "n": -1}"#.to_vec(),
        ];
        for body in bodies {
            statuses.push(raw_exchange(&addr, http_post(&body)).await);
        }
        // Not even HTTP.
        raw_exchange(&addr, noise()).await;
        if round % 5 == 0 {
            // A request in the stream's own session but malformed: must not
            // cancel it.
            let resp = client()
                .post(server.url("/v1/chat/completions"))
                .header("content-type", "application/json")
                .header("x-session-id", "calm")
                .body("{\"messages\": 1}")
                .send()
                .await
                .expect("sent");
            assert_eq!(resp.status(), 400);
        }
    }
    assert!(
        statuses.iter().all(|s| s.starts_with("HTTP/1.1 400")),
        "{statuses:?}"
    );

    let t = reading.await.expect("joined");
    assert_eq!(t.text, text);
    assert_eq!(t.finish_reason.as_deref(), Some("stop"));
    assert!(t.done);
    let health = client()
        .get(server.url("/health"))
        .send()
        .await
        .expect("sent");
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn shutdown_refuses_new_generations_with_503() {
    let server = TestServer::echo().await;
    server.state.shutdown.cancel();
    let error = error_of(
        post(&server, "/v1/chat/completions", &chat("x", true))
            .send()
            .await
            .expect("sent"),
        503,
    )
    .await;
    assert_eq!(error["type"], "server_error");
}

#[tokio::test]
async fn unknown_fields_and_nulls_are_ignored() {
    let server = TestServer::echo().await;
    let body = json!({
        "model": "echo", "messages": [{"role": "user", "content": "fine", "name": "bob"}],
        "stream": null, "stop": null, "temperature": null, "user": "u", "tools": [], "logit_bias": {},
        "parallel_tool_calls": true, "response_format": {"type": "text"}
    });
    let resp = post(&server, "/v1/chat/completions", &body)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 200);
    let t: Value = resp.json().await.expect("json");
    assert_eq!(t["choices"][0]["message"]["content"], "fine");
    let stream = open_stream(&server, "still fine", None).await;
    assert_eq!(read_all(stream).await.text, "still fine");
}
