//! Admission (429 and the queue), HTTP/2 without TLS, and CORS.

use std::time::Duration;

use serde_json::Value;

use crate::common::{
    Events, Raw, TestServer, cancel, chat, client, completion_id, open_stream, post, read_all,
    transcript,
};

fn limited(running: usize, queue: usize) -> crate::common::Options {
    let mut options = TestServer::options();
    options.settings.max_concurrent = Some(running);
    options.settings.max_queue = queue;
    options
}

#[tokio::test(start_paused = true)]
async fn beyond_the_queue_requests_get_429_before_any_sse_byte() {
    let server = limited(1, 1).delay(Duration::from_secs(1)).start().await;
    let running = open_stream(&server, "a b c", None).await;
    let queued = open_stream(&server, "d e", None).await;

    let refused = post(&server, "/v1/chat/completions", &chat("f", true))
        .send()
        .await
        .expect("sent");
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "1");
    assert_eq!(refused.headers()["content-type"], "application/json");
    let body: Value = refused.json().await.expect("json");
    assert_eq!(body["error"]["type"], "rate_limit_error");

    let running = read_all(running).await;
    assert_eq!(
        (running.text.as_str(), running.finish_reason.as_deref()),
        ("a b c", Some("stop"))
    );
    let queued = read_all(queued).await;
    assert_eq!(
        (queued.text.as_str(), queued.finish_reason.as_deref()),
        ("d e", Some("stop"))
    );
    let later = open_stream(&server, "g", None).await;
    assert_eq!(read_all(later).await.text, "g", "places free up");
}

#[tokio::test(start_paused = true)]
async fn a_queued_stream_gets_its_role_chunk_and_keep_alives_then_tokens() {
    let server = limited(1, 4)
        .delay(Duration::from_secs(10))
        .keep_alive(Duration::from_secs(3))
        .start()
        .await;
    let first = open_stream(&server, "a b", None).await;
    let started = tokio::time::Instant::now();
    let mut queued = Raw::of(open_stream(&server, "later", None).await);
    queued.until("\"role\":\"assistant\"").await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "role chunk at once while queued"
    );
    queued.until("\"content\":\"later\"").await;
    // Queued for the 20 s of the first answer, then 10 s for its own token.
    assert!(started.elapsed() >= Duration::from_secs(30));
    let comments = queued.seen.matches(": keep-alive\n").count();
    assert!(comments >= 9, "keep-alives while waiting: {comments}");
    drop(first);
}

#[tokio::test(start_paused = true)]
async fn cancelling_a_queued_request_frees_its_place() {
    let server = limited(1, 1).delay(Duration::from_secs(5)).start().await;
    let _running = open_stream(&server, "a b c", None).await;
    let queued = open_stream(&server, "d", None).await;
    let id = completion_id(&queued);
    let refused = post(&server, "/v1/chat/completions", &chat("e", true))
        .send()
        .await
        .expect("sent");
    assert_eq!(refused.status(), 429);

    let cancelled = cancel(&server, &id).await;
    assert_eq!(
        cancelled.json::<Value>().await.expect("json")["cancelled"],
        true
    );
    let t = read_all(queued).await;
    assert_eq!(
        (t.text.as_str(), t.finish_reason.as_deref()),
        ("", Some("cancelled"))
    );
    let admitted = post(&server, "/v1/chat/completions", &chat("e", true))
        .send()
        .await
        .expect("sent");
    assert_eq!(admitted.status(), 200);
}

#[tokio::test]
async fn twenty_streams_share_one_http2_connection_and_progress_together() {
    let server = TestServer::options()
        .delay(Duration::from_millis(100))
        .start()
        .await;
    let h2 = crate::common::client_builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let started = tokio::time::Instant::now();
    let streams: Vec<_> = (0..20)
        .map(|i| {
            let req = h2
                .post(server.url("/v1/chat/completions"))
                .json(&chat(&format!("stream {i} of five"), true));
            tokio::spawn(async move {
                let resp = req.send().await.expect("sent");
                assert_eq!(resp.version(), reqwest::Version::HTTP_2);
                (i, read_all(resp).await)
            })
        })
        .collect();
    for stream in streams {
        let (i, t) = stream.await.expect("joined");
        assert_eq!(t.text, format!("stream {i} of five"));
        assert!(t.done);
    }
    // Four tokens 100 ms apart: together about 0.4 s, one after another 8 s.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn cors_allows_configured_origins_only() {
    let mut options = TestServer::options();
    options.settings.cors_origins = vec!["https://chat.example".into()];
    let server = options.start().await;
    let preflight = client()
        .request(reqwest::Method::OPTIONS, server.url("/v1/chat/completions"))
        .header("origin", "https://chat.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type, x-session-id, last-event-id",
        )
        .send()
        .await
        .expect("sent");
    assert!(preflight.status().is_success());
    let headers = preflight.headers();
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://chat.example"
    );
    let allowed = headers["access-control-allow-headers"]
        .to_str()
        .expect("ascii")
        .to_lowercase();
    for name in [
        "authorization",
        "content-type",
        "x-session-id",
        "last-event-id",
    ] {
        assert!(allowed.contains(name), "{allowed}");
    }

    let actual = post(&server, "/v1/chat/completions", &chat("x", true))
        .header("origin", "https://chat.example")
        .send()
        .await
        .expect("sent");
    let exposed = actual.headers()["access-control-expose-headers"]
        .to_str()
        .expect("ascii")
        .to_lowercase();
    assert!(
        exposed.contains("x-completion-id") && exposed.contains("retry-after"),
        "{exposed}"
    );
    read_all(actual).await;

    let foreign = client()
        .request(reqwest::Method::OPTIONS, server.url("/v1/chat/completions"))
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .expect("sent");
    assert!(
        foreign
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
}

#[tokio::test]
async fn a_disconnected_queued_request_with_no_grace_frees_its_place() {
    let server = limited(1, 1)
        .delay(Duration::from_millis(200))
        .grace(Duration::ZERO)
        .start()
        .await;
    let running = open_stream(&server, "a b c d e", None).await;
    let mut queued = Events::of(open_stream(&server, "q", None).await);
    queued.next_json().await;
    drop(queued);
    crate::common::eventually(Duration::from_secs(5), || {
        server.state.admission.waiting() == 0
    })
    .await;
    let admitted = post(&server, "/v1/chat/completions", &chat("next", true))
        .send()
        .await
        .expect("sent");
    assert_eq!(admitted.status(), 200);
    assert_eq!(
        transcript(&Events::of(running).rest().await).text,
        "a b c d e"
    );
}

#[tokio::test]
async fn one_key_cannot_lock_the_others_out_of_the_queue() {
    // 1 running + 16 waiting = 17 places; with two keys, one key may hold
    // half of them (rounded up): 9.
    let server = limited(1, 16)
        .keys(&["key-a", "key-b"])
        .delay(Duration::from_secs(1))
        .start()
        .await;
    let send = |key: &'static str| {
        client()
            .post(server.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&chat("x y", true))
            .send()
    };
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..20 {
        let resp = send("key-a").await.expect("sent");
        match resp.status().as_u16() {
            200 => held.push(resp),
            429 => refused += 1,
            other => panic!("status {other}"),
        }
    }
    assert_eq!((held.len(), refused), (9, 11));
    let other = send("key-b").await.expect("sent");
    assert_eq!(other.status(), 200, "another key still gets a place");
}

#[tokio::test]
async fn a_stream_abandoned_before_its_first_token_frees_its_place_soon() {
    // The grace is a minute, but nothing was produced yet: the place comes
    // back after the short early grace, not the whole minute.
    let server = limited(1, 1)
        .delay(Duration::from_secs(1))
        .grace(Duration::from_secs(60))
        .start()
        .await;
    let running = open_stream(&server, "a b c d e f g h", None).await;
    let mut queued = Events::of(open_stream(&server, "q", None).await);
    queued.next_json().await;
    drop(queued);
    crate::common::eventually(Duration::from_secs(6), || {
        server.state.admission.waiting() == 0
    })
    .await;
    drop(running);
}
