//! Hostile and careless traffic: silent and trickling connections, bodies
//! that stop, a descriptor limit under siege, SIGTERM with stragglers,
//! malformed ids and heads, spoofed identity headers, and an upstream
//! whose error must reach the client in its own words.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use serde_json::{Value, json};
use sluicegate::backend::upstream::{UpstreamBackend, UpstreamConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::common::{Events, TestServer, chat, client, eventually, open_stream, post as post_to};
use crate::process::Process;

fn timeouts(header: Duration, body: Duration, idle: Duration) -> crate::common::Options {
    let mut options = TestServer::options();
    options.settings.header_read_timeout = header;
    options.settings.body_read_timeout = body;
    options.settings.idle_timeout = idle;
    options
}

fn addr(base: &str) -> String {
    base.trim_start_matches("http://").to_owned()
}

/// Reads until the server closes the connection (or resets it); returns
/// what it sent. Fails if it is still open after `limit`.
async fn read_until_closed(socket: &mut TcpStream, limit: Duration) -> Vec<u8> {
    let mut seen = Vec::new();
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, socket.read(&mut buf)).await {
            Err(_) => panic!("connection still open after {limit:?}; read {seen:?}"),
            Ok(Ok(0) | Err(_)) => return seen,
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

/// Reads one response with `Content-Length` from a kept-alive connection.
async fn read_response(socket: &mut TcpStream) -> (String, String) {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), socket.read(&mut buf))
            .await
            .expect("an answer in time")
            .expect("read");
        assert!(n > 0, "closed before a whole answer: {seen:?}");
        seen.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&seen).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if body.len() >= length {
                return (head.to_owned(), body.to_owned());
            }
        }
    }
}

fn json_error(body: &str) -> Value {
    let value: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("JSON: {body:?}"));
    for field in ["message", "type", "param", "code"] {
        assert!(value["error"].get(field).is_some(), "{field} in {value}");
    }
    value
}

// Item 1: timeouts and the connection cap.

#[tokio::test]
async fn a_silent_connection_is_closed_after_the_header_read_timeout() {
    let server = timeouts(
        Duration::from_millis(300),
        Duration::from_secs(30),
        Duration::from_secs(60),
    )
    .start()
    .await;
    let mut silent = TcpStream::connect(addr(&server.base))
        .await
        .expect("connect");
    let said = read_until_closed(&mut silent, Duration::from_secs(10)).await;
    assert!(said.is_empty(), "{said:?}");
}

#[tokio::test]
async fn a_request_head_sent_a_line_at_a_time_is_cut_off() {
    let server = timeouts(
        Duration::from_millis(500),
        Duration::from_secs(30),
        Duration::from_secs(60),
    )
    .start()
    .await;
    let socket = TcpStream::connect(addr(&server.base))
        .await
        .expect("connect");
    let (mut reader, mut writer) = socket.into_split();
    let trickle = tokio::spawn(async move {
        let _ = writer
            .write_all(b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n")
            .await;
        // Each line well inside any per-read timeout; together far beyond
        // the head's.
        for i in 0..200 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if writer
                .write_all(format!("x-{i}: y\r\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(8), reader.read(&mut buf))
        .await
        .expect("closed while the head was still trickling in");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    trickle.abort();
}

#[tokio::test]
async fn a_body_that_stops_partway_gets_a_json_408() {
    let server = timeouts(
        Duration::from_secs(10),
        Duration::from_millis(300),
        Duration::from_secs(60),
    )
    .start()
    .await;
    let mut socket = TcpStream::connect(addr(&server.base))
        .await
        .expect("connect");
    socket
        .write_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"messages\":",
        )
        .await
        .expect("written");
    let (head, body) = read_response(&mut socket).await;
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert_eq!(json_error(&body)["error"]["code"], "body_timeout");
    // The rest of the body never comes: the connection is not kept.
    let said = read_until_closed(&mut socket, Duration::from_secs(10)).await;
    assert!(said.is_empty(), "{said:?}");
}

#[tokio::test]
async fn an_idle_connection_outlives_the_header_timeout_and_closes_after_the_idle_timeout() {
    let server = timeouts(
        Duration::from_millis(100),
        Duration::from_secs(30),
        Duration::from_secs(2),
    )
    .start()
    .await;
    let mut socket = TcpStream::connect(addr(&server.base))
        .await
        .expect("connect");
    let health = b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n";
    socket.write_all(health).await.expect("written");
    let (head, _) = read_response(&mut socket).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Five header timeouts of silence between requests are no head timeout.
    tokio::time::sleep(Duration::from_millis(500)).await;
    socket.write_all(health).await.expect("written");
    let (head, _) = read_response(&mut socket).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let said = read_until_closed(&mut socket, Duration::from_secs(15)).await;
    assert!(said.is_empty(), "{said:?}");
}

#[tokio::test]
async fn at_the_connection_cap_silent_connections_make_room() {
    let mut options = timeouts(
        Duration::from_secs(60),
        Duration::from_secs(30),
        Duration::from_secs(60),
    );
    options.settings.max_connections = Some(8);
    let server = options.delay(Duration::from_millis(300)).start().await;
    // A stream that is running must survive the siege.
    let running = open_stream(&server, "one two three four", None).await;
    let mut silent = Vec::new();
    for _ in 0..30 {
        silent.push(
            TcpStream::connect(addr(&server.base))
                .await
                .expect("connect"),
        );
    }
    let health = client()
        .get(server.url("/health"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("served despite the silent crowd");
    assert_eq!(health.status(), 200);
    let t = crate::common::read_all(running).await;
    assert_eq!(t.text, "one two three four");
}

#[tokio::test]
async fn silent_sockets_beyond_the_descriptor_limit_lock_nobody_out() {
    let server = Process::start_under(
        &["prlimit", "--nofile=256:256", "--"],
        &["--backend", "echo"],
        &[],
    )
    .await;
    let target = addr(&server.base);
    let mut silent = Vec::new();
    for _ in 0..300 {
        silent.push(TcpStream::connect(&target).await.expect("connect"));
    }
    let health = client()
        .get(server.url("/health"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("served within curl -m10");
    assert_eq!(health.status(), 200);
    let log = server.log();
    assert!(
        log.matches("accept failed").count() <= 1,
        "accept errors back off quietly: {log}"
    );
}

// Item 6: SIGTERM.

/// The binary on a slow echo with `grace` to drain, and a long stream
/// already flowing (its first event read).
async fn streaming_then_sigterm_ready(grace: &str) -> (Process, Events) {
    let server = Process::start(
        &[
            "--backend",
            "echo",
            "--token-delay",
            "200ms",
            "--shutdown-grace",
            grace,
        ],
        &[],
    )
    .await;
    let long = client()
        .post(server.url("/v1/chat/completions"))
        .json(&chat(&vec!["w"; 100].join(" "), true))
        .send()
        .await
        .expect("sent");
    let mut long = Events::of(long);
    long.next_json().await;
    (server, long)
}

#[tokio::test]
async fn sigterm_with_a_half_sent_request_exits_soon_after_the_grace() {
    let (mut server, long) = streaming_then_sigterm_ready("1s").await;
    let mut half = TcpStream::connect(addr(&server.base))
        .await
        .expect("connect");
    half.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-le")
        .await
        .expect("written");

    let signalled = Instant::now();
    server.signal("TERM");
    let status = tokio::time::timeout(Duration::from_secs(20), server.child.wait())
        .await
        .expect("exits")
        .expect("status");
    let took = signalled.elapsed();
    assert!(status.success(), "{status:?}");
    // The grace (1 s), then at most a second for connections to close; the
    // old drain waited the grace and 5 s more.
    assert!(took < Duration::from_millis(4_500), "exited after {took:?}");
    let t = crate::common::transcript(&long.rest().await);
    assert_eq!(t.finish_reason.as_deref(), Some("cancelled"));
}

#[tokio::test]
async fn a_request_on_an_idle_connection_during_the_drain_gets_a_503() {
    let (mut server, long) = streaming_then_sigterm_ready("30s").await;
    let mut idle = TcpStream::connect(addr(&server.base))
        .await
        .expect("connect");
    idle.write_all(b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        .await
        .expect("written");
    let (head, _) = read_response(&mut idle).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    server.signal("TERM");
    let started = Instant::now();
    while !server.log().contains("shutting down") {
        assert!(started.elapsed() < Duration::from_secs(10), "no drain");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let body = chat("late", false).to_string();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    idle.write_all(request.as_bytes()).await.expect("written");
    let (head, body) = read_response(&mut idle).await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    assert_eq!(json_error(&body)["error"]["code"], "shutting_down");
    drop(long);
    let _ = server.child.kill().await;
}

// Item 5: errors in OpenAI's shape.

#[tokio::test]
async fn a_non_utf8_id_and_a_repeated_query_parameter_get_json_400s() {
    let server = TestServer::echo().await;
    for (method, path) in [
        (reqwest::Method::POST, "/v1/chat/completions/%ff/cancel"),
        (reqwest::Method::GET, "/v1/chat/completions/%ff/events"),
        (
            reqwest::Method::GET,
            "/v1/chat/completions/abc/events?last_event_id=a&last_event_id=b",
        ),
        (
            reqwest::Method::GET,
            "/v1/sessions/s/stream?last_event_id=a&last_event_id=b",
        ),
    ] {
        let resp = client()
            .request(method, server.url(path))
            .send()
            .await
            .expect("sent");
        assert_eq!(resp.status(), 400, "{path}");
        assert_eq!(resp.headers()["content-type"], "application/json", "{path}");
        let body = json_error(&resp.text().await.expect("body"));
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
}

#[tokio::test]
async fn a_long_uri_and_large_headers_get_json_not_an_empty_refusal() {
    let server = TestServer::echo().await;
    let long = format!("/v1/models/{}", "m".repeat(10 * 1024));
    let resp = client().get(server.url(&long)).send().await.expect("sent");
    assert_eq!(resp.status(), 414);
    assert_eq!(
        json_error(&resp.text().await.expect("body"))["error"]["code"],
        "uri_too_long"
    );

    let resp = client()
        .get(server.url("/health"))
        .header("x-filler", "f".repeat(20 * 1024))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 431);
    assert_eq!(
        json_error(&resp.text().await.expect("body"))["error"]["code"],
        "headers_too_large"
    );
}

#[tokio::test]
async fn an_empty_legacy_prompt_says_it_is_empty() {
    let server = crate::model::server().await;
    let resp = post_to(&server, "/v1/completions", &json!({"prompt": ""}))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 400);
    let body = json_error(&resp.text().await.expect("body"));
    let message = body["error"]["message"].as_str().expect("message");
    assert!(message.contains("empty"), "{message}");
    assert_ne!(body["error"]["code"], "context_length_exceeded");
}

// Item 8: identity headers.

#[tokio::test]
async fn an_unfit_request_id_is_replaced_and_a_fit_one_kept() {
    let server = TestServer::echo().await;
    let huge = "r".repeat(10 * 1024);
    let raw = reqwest::header::HeaderValue::from_bytes(b"caf\xe9-id").expect("obs-text");
    for sent in [
        reqwest::header::HeaderValue::from_str(&huge).expect("ascii"),
        raw,
    ] {
        let resp = client()
            .get(server.url("/health"))
            .header("x-request-id", sent.clone())
            .send()
            .await
            .expect("sent");
        assert_eq!(resp.status(), 200);
        let echoed = &resp.headers()["x-request-id"];
        assert_ne!(echoed, &sent);
        assert!(echoed.len() <= 64 && echoed.to_str().is_ok(), "{echoed:?}");
    }
    let resp = client()
        .get(server.url("/health"))
        .header("x-request-id", "trace-42.a:b_c")
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.headers()["x-request-id"], "trace-42.a:b_c");
}

/// `GET /health` on a fresh connection with `Host: host`; the status line
/// and body.
async fn health_for_host(base: &str, host: &str) -> (String, String) {
    let mut socket = TcpStream::connect(addr(base)).await.expect("connect");
    socket
        .write_all(format!("GET /v1/models HTTP/1.1\r\nhost: {host}\r\n\r\n").as_bytes())
        .await
        .expect("written");
    let (head, body) = read_response(&mut socket).await;
    (head.lines().next().unwrap_or_default().to_owned(), body)
}

#[tokio::test]
async fn without_a_key_only_its_own_host_names_are_served() {
    let mut options = TestServer::options();
    options.settings.allowed_hosts = vec!["chat.internal".into()];
    let open = options.start().await;
    let port = addr(&open.base)
        .rsplit_once(':')
        .expect("port")
        .1
        .to_owned();
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
        "chat.internal".to_owned(),
    ] {
        let (status, _) = health_for_host(&open.base, &host).await;
        assert!(status.starts_with("HTTP/1.1 200"), "{host}: {status}");
    }
    // A page on another site whose name now resolves to this machine.
    let (status, body) = health_for_host(&open.base, &format!("attacker.example:{port}")).await;
    assert!(status.starts_with("HTTP/1.1 403"), "{status}");
    assert_eq!(json_error(&body)["error"]["code"], "host_not_allowed");

    // With a key, the key is the guard: any name is served to its holder.
    let keyed = TestServer::options().keys(&["k"]).start().await;
    let mut socket = TcpStream::connect(addr(&keyed.base))
        .await
        .expect("connect");
    socket
        .write_all(
            b"GET /v1/models HTTP/1.1\r\nhost: proxy.example\r\nauthorization: Bearer k\r\n\r\n",
        )
        .await
        .expect("written");
    let (head, _) = read_response(&mut socket).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

// Item 9: an upstream's own error message.

/// An OpenAI-style upstream that streams one token, then an error object
/// that names a credential.
async fn failing_upstream() -> String {
    let app = axum::Router::new()
        .route(
            "/v1/models",
            get(|| async {
                Json(json!({"object": "list", "data": [{"id": "echo", "object": "model"}]}))
            }),
        )
        .route(
            "/v1/chat/completions",
            post(|| async {
                let token = json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": "partial"}}]});
                let error = json!({"error": {
                    "message": "CUDA out of memory on worker 3 (auth sk-live-0123456789abcdef, Bearer upstream-secret)",
                    "type": "server_error",
                }});
                (
                    [(axum::http::header::CONTENT_TYPE, "text/event-stream")],
                    format!("data: {token}\n\ndata: {error}\n\n"),
                )
                    .into_response()
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}

#[tokio::test]
async fn an_upstream_error_mid_stream_reaches_the_client_without_credentials() {
    let upstream = failing_upstream().await;
    let backend = UpstreamBackend::new(UpstreamConfig {
        urls: vec![upstream],
        api_key: Some("upstream-secret".into()),
        connect_timeout: Duration::from_secs(2),
        first_byte_timeout: Duration::from_secs(5),
        http2: false,
    })
    .expect("backend");
    let server = TestServer::options()
        .backend(Arc::new(backend))
        .start()
        .await;
    let events = Events::of(open_stream(&server, "hi", None).await)
        .rest()
        .await;
    assert_eq!(events.last().expect("events").data, "[DONE]");
    let error: Value = serde_json::from_str(&events[events.len() - 2].data).expect("JSON");
    let message = error["error"]["message"].as_str().expect("message");
    assert!(
        message.contains("CUDA out of memory on worker 3"),
        "{message}"
    );
    assert!(!message.contains("0123456789abcdef"), "{message}");
    assert!(!message.contains("upstream-secret"), "{message}");

    let resp = post_to(&server, "/v1/chat/completions", &chat("hi", false))
        .send()
        .await
        .expect("sent");
    let status = resp.status();
    let body = json_error(&resp.text().await.expect("body"));
    assert_eq!(status, 502);
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("CUDA out of memory")),
        "{body}"
    );
    eventually(Duration::from_secs(5), || {
        server.state.registry.running() == 0
    })
    .await;
}
