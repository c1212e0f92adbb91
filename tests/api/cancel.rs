//! Cancellation: the session's next request, the cancel endpoint, and
//! clients that go away. Timing checks run on paused time, so "promptly"
//! means "without waiting for the model's next token", deterministically.

use std::time::Duration;

use serde_json::{Value, json};
use sluicegate::session::{CallerId, EndCause, GenerationId};

use crate::common::{
    Events, TestServer, cancel, chat, client, completion_id, eventually, open_stream, post,
    read_all, transcript,
};

#[tokio::test(start_paused = true)]
async fn a_sessions_next_request_ends_the_unfinished_one_at_once() {
    let server = TestServer::options()
        .delay(Duration::from_secs(2))
        .start()
        .await;
    let mut first = Events::of(open_stream(&server, "one two three four", Some("conv")).await);
    first.next_json().await; // role
    first.next_json().await; // "one"

    let replaced_at = tokio::time::Instant::now();
    let second = open_stream(&server, "next question", Some("conv")).await;
    let rest = transcript(&first.rest().await);
    assert!(
        replaced_at.elapsed() < Duration::from_secs(2),
        "ended before the model's next token"
    );
    assert_eq!(rest.finish_reason.as_deref(), Some("cancelled"));
    assert!(rest.done);
    assert_eq!(rest.text, "", "nothing after the cancellation");

    let t = read_all(second).await;
    assert_eq!(t.text, "next question");
    assert_eq!(t.finish_reason.as_deref(), Some("stop"));
}

#[tokio::test(start_paused = true)]
async fn other_sessions_callers_and_sessionless_requests_are_untouched() {
    let server = TestServer::options()
        .delay(Duration::from_secs(1))
        .keys(&["key-a", "key-b"])
        .start()
        .await;
    let open = |key: &'static str, session: Option<&'static str>| {
        let mut req = client()
            .post(server.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&chat("x y", true));
        if let Some(s) = session {
            req = req.header("x-session-id", s);
        }
        req.send()
    };
    let same_session_other_key = open("key-b", Some("s")).await.expect("sent");
    let other_session = open("key-a", Some("t")).await.expect("sent");
    let no_session = open("key-a", None).await.expect("sent");
    let original = open("key-a", Some("s")).await.expect("sent");
    let replacement = open("key-a", Some("s")).await.expect("sent");

    assert_eq!(
        read_all(original).await.finish_reason.as_deref(),
        Some("cancelled")
    );
    for resp in [
        same_session_other_key,
        other_session,
        no_session,
        replacement,
    ] {
        let t = read_all(resp).await;
        assert_eq!(
            (t.text.as_str(), t.finish_reason.as_deref()),
            ("x y", Some("stop"))
        );
    }
}

#[tokio::test(start_paused = true)]
async fn the_cancel_endpoint_stops_a_generation_promptly() {
    let server = TestServer::options()
        .delay(Duration::from_secs(2))
        .start()
        .await;
    let resp = open_stream(&server, "a b c d e", None).await;
    let id = completion_id(&resp);
    let mut events = Events::of(resp);
    events.next_json().await;
    events.next_json().await;

    let cancelled_at = tokio::time::Instant::now();
    let answer = cancel(&server, &id).await;
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.json::<Value>().await.expect("json"),
        json!({"id": id, "object": "chat.completion", "cancelled": true})
    );
    let rest = transcript(&events.rest().await);
    assert!(cancelled_at.elapsed() < Duration::from_secs(2));
    assert_eq!(rest.finish_reason.as_deref(), Some("cancelled"));
    assert!(rest.done);

    let again = cancel(&server, &id).await;
    assert_eq!(
        again.json::<Value>().await.expect("json")["cancelled"],
        false
    );
    let unknown = client()
        .post(server.url("/v1/chat/completions/chatcmpl-nope/cancel"))
        .send()
        .await
        .expect("sent");
    assert_eq!(unknown.status(), 404);
    assert_eq!(
        unknown.json::<Value>().await.expect("json")["error"]["type"],
        "not_found_error"
    );

    let generation = server
        .state
        .registry
        .get(CallerId::ANONYMOUS, &GenerationId::from(id.as_str()))
        .expect("kept");
    assert_eq!(generation.cancel_cause(), Some(EndCause::CancelEndpoint));
}

#[tokio::test]
async fn a_cancelled_json_request_answers_with_what_it_has() {
    let server = TestServer::options()
        .delay(Duration::from_millis(50))
        .start()
        .await;
    let words: Vec<String> = (0..200).map(|i| format!("w{i}")).collect();
    let pending = tokio::spawn(
        post(
            &server,
            "/v1/chat/completions",
            &chat(&words.join(" "), false),
        )
        .header("x-session-id", "s")
        .send(),
    );
    // Once it runs, the session's next request replaces it.
    eventually(Duration::from_secs(5), || {
        server
            .state
            .registry
            .latest_in_session(CallerId::ANONYMOUS, "s")
            .is_some()
    })
    .await;
    let next = open_stream(&server, "new", Some("s")).await;
    let answer: Value = pending
        .await
        .expect("joined")
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(answer["choices"][0]["finish_reason"], "cancelled");
    // What it had: the first k words, and k tokens counted.
    let content = answer["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    let k = answer["usage"]["completion_tokens"]
        .as_u64()
        .expect("count") as usize;
    assert_eq!(content, words[..k].join(" "));
    assert!(k < words.len());
    assert_eq!(read_all(next).await.text, "new");
}

/// Opens a long stream, reads two events, leaves; returns the generation
/// once this side has detached.
async fn leave_after_two_events(
    server: &TestServer,
) -> std::sync::Arc<sluicegate::session::Generation> {
    let resp = open_stream(server, &vec!["w"; 500].join(" "), None).await;
    let id = GenerationId::from(completion_id(&resp).as_str());
    let mut events = Events::of(resp);
    events.next_json().await;
    events.next_json().await;
    drop(events);
    let generation = server
        .state
        .registry
        .get(CallerId::ANONYMOUS, &id)
        .expect("registered");
    eventually(Duration::from_secs(5), || generation.attached_count() == 0).await;
    generation
}

#[tokio::test]
async fn a_client_that_leaves_is_waited_for() {
    // A grace longer than the test: tokens keep coming after the client left.
    let server = TestServer::options()
        .delay(Duration::from_millis(20))
        .grace(Duration::from_secs(60))
        .start()
        .await;
    let generation = leave_after_two_events(&server).await;
    let written = generation.log.len();
    eventually(Duration::from_secs(5), || {
        generation.log.len() > written + 5
    })
    .await;
    assert!(!generation.cancel_token().is_cancelled());
}

#[tokio::test]
async fn a_client_that_never_returns_is_cancelled_after_the_grace() {
    let server = TestServer::options()
        .delay(Duration::from_millis(20))
        .grace(Duration::from_millis(400))
        .start()
        .await;
    let generation = leave_after_two_events(&server).await;
    eventually(Duration::from_secs(5), || generation.is_done()).await;
    assert_eq!(generation.cancel_cause(), Some(EndCause::ClientGone));
    // 500 tokens would take 10 s; it stopped long before.
    assert!(generation.log.len() < 500, "stopped well before the end");
}

#[tokio::test]
async fn with_no_grace_a_departure_cancels_at_once() {
    let server = TestServer::options()
        .delay(Duration::from_millis(20))
        .grace(Duration::ZERO)
        .start()
        .await;
    let resp = open_stream(&server, &vec!["w"; 500].join(" "), None).await;
    let id = GenerationId::from(completion_id(&resp).as_str());
    let mut events = Events::of(resp);
    events.next_json().await;
    drop(events);
    let generation = server
        .state
        .registry
        .get(CallerId::ANONYMOUS, &id)
        .expect("registered");
    eventually(Duration::from_secs(5), || generation.is_done()).await;
    assert_eq!(generation.cancel_cause(), Some(EndCause::ClientGone));
}

#[tokio::test]
async fn nothing_outlives_its_generation_and_the_resume_ttl() {
    let mut options = TestServer::options()
        .delay(Duration::from_millis(5))
        .grace(Duration::ZERO);
    options.registry.resume_ttl = Duration::from_millis(300);
    let server = options.start().await;
    // A first request lets the server spawn what it keeps for its lifetime
    // (axum's shutdown watcher), so the baseline counts that.
    client()
        .get(server.url("/health"))
        .send()
        .await
        .expect("sent");
    let metrics = tokio::runtime::Handle::current().metrics();
    let baseline = metrics.num_alive_tasks();
    {
        let finished = open_stream(&server, "a b c", Some("s1")).await;
        let replaced = open_stream(&server, "d e f g h", Some("s2")).await;
        let replacement = open_stream(&server, "i", Some("s2")).await;
        let abandoned = open_stream(&server, &vec!["w"; 200].join(" "), None).await;
        let json = post(&server, "/v1/chat/completions", &chat("j k", false))
            .send()
            .await
            .expect("sent");
        json.bytes().await.expect("body");
        read_all(finished).await;
        read_all(replaced).await;
        read_all(replacement).await;
        drop(abandoned);
    }
    eventually(Duration::from_secs(10), || server.state.registry.is_empty()).await;
    let settled = tokio::time::timeout(Duration::from_secs(10), async {
        while metrics.num_alive_tasks() > baseline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        settled.is_ok(),
        "tasks alive: {} > {baseline}",
        metrics.num_alive_tasks()
    );
}
