//! Resume: a dropped stream picks up where it stopped, by GET, by re-POST
//! and by session, with no duplicate, no gap and no second generation.

use std::time::Duration;

use serde_json::json;
use sluicegate::session::{CallerId, GenerationId};

use crate::common::{
    Events, Raw, TestServer, cancel, chat, client, completion_id, eventually, open_stream, post,
    read_all, transcript,
};

fn words(n: usize) -> String {
    (0..n)
        .map(|i| format!("w{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `GET …/events` for generation `id` after the event `last`.
async fn resume(server: &TestServer, id: &str, last: &str) -> reqwest::Response {
    client()
        .get(server.url(&format!("/v1/chat/completions/{id}/events")))
        .header("last-event-id", last)
        .send()
        .await
        .expect("sent")
}

/// Reads the role chunk and `tokens` tokens, then drops the connection.
/// Returns the generation id, the text so far and the last event id.
async fn cut_after(resp: reqwest::Response, tokens: usize) -> (String, String, String) {
    let id = completion_id(&resp);
    let mut events = Events::of(resp);
    let mut text = String::new();
    let mut last = String::new();
    for _ in 0..=tokens {
        let event = events.next().await.expect("event");
        let chunk: serde_json::Value = serde_json::from_str(&event.data).expect("json");
        text.push_str(
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or(""),
        );
        last = event.id;
    }
    (id, text, last)
}

#[tokio::test]
async fn a_get_with_last_event_id_continues_exactly_where_the_cut_was() {
    let server = TestServer::options()
        .delay(Duration::from_millis(15))
        .start()
        .await;
    let full = words(40);
    let (id, before, last) = cut_after(open_stream(&server, &full, None).await, 5).await;
    let resumed = resume(&server, &id, &last).await;
    assert_eq!(resumed.status(), 200);
    assert_eq!(resumed.headers()["content-type"], "text/event-stream");
    let after = read_all(resumed).await;
    assert_eq!(format!("{before}{}", after.text), full);
    assert_eq!(after.finish_reason.as_deref(), Some("stop"));
    assert!(after.done);
    assert_eq!(server.state.registry.len(), 1, "one generation only");
}

#[tokio::test]
async fn a_re_sent_post_with_last_event_id_resumes_instead_of_starting_again() {
    let server = TestServer::options()
        .delay(Duration::from_millis(15))
        .start()
        .await;
    let full = words(30);
    let body = chat(&full, true);
    let first = post(&server, "/v1/chat/completions", &body)
        .header("x-session-id", "s")
        .send()
        .await
        .expect("sent");
    let (id, before, last) = cut_after(first, 4).await;

    let retry = post(&server, "/v1/chat/completions", &body)
        .header("x-session-id", "s")
        .header("last-event-id", &last)
        .send()
        .await
        .expect("sent");
    assert_eq!(
        retry.headers()["x-completion-id"],
        id.as_str(),
        "the same generation"
    );
    let after = read_all(retry).await;
    assert_eq!(format!("{before}{}", after.text), full);
    assert_eq!(after.finish_reason.as_deref(), Some("stop"));
    assert_eq!(server.state.registry.len(), 1, "no second generation");
}

#[tokio::test]
async fn replay_from_the_start_repeats_the_very_bytes() {
    let server = TestServer::echo().await;
    let resp = open_stream(&server, "exact bytes \"quoted\" ünïcode 🎉", None).await;
    let id = completion_id(&resp);
    let mut original = Raw::of(resp);
    original.read_to_end().await;
    let path = format!("/v1/chat/completions/{id}/events");
    let mut replay = Raw::of(client().get(server.url(&path)).send().await.expect("sent"));
    replay.read_to_end().await;
    assert_eq!(replay.seen, original.seen);
    let after_first = original
        .seen
        .split("\n\n")
        .nth(1)
        .expect("second event")
        .to_owned();
    let mut tail = Raw::of(
        client()
            .get(server.url(&format!(
                "/v1/chat/completions/{id}/events?last_event_id={id}.0"
            )))
            .send()
            .await
            .expect("sent"),
    );
    tail.read_to_end().await;
    assert!(
        tail.seen.starts_with(&after_first),
        "query parameter works too"
    );
}

#[tokio::test]
async fn a_resume_while_running_continues_live() {
    let server = TestServer::options()
        .delay(Duration::from_millis(20))
        .start()
        .await;
    let full = words(25);
    let (id, before, last) = cut_after(open_stream(&server, &full, None).await, 2).await;
    let generation = server
        .state
        .registry
        .get(CallerId::ANONYMOUS, &GenerationId::from(id.as_str()))
        .expect("kept");
    let resumed = resume(&server, &id, &last).await;
    assert!(!generation.is_done(), "resumed while still generating");
    let after = read_all(resumed).await;
    assert_eq!(format!("{before}{}", after.text), full);
}

#[tokio::test]
async fn legacy_completion_ids_resume_and_cancel_too() {
    let server = TestServer::options()
        .delay(Duration::from_millis(15))
        .start()
        .await;
    let full = words(20);
    let resp = post(
        &server,
        "/v1/completions",
        &json!({"model": "echo", "prompt": full, "stream": true}),
    )
    .send()
    .await
    .expect("sent");
    let id = completion_id(&resp);
    assert!(id.starts_with("cmpl-"));
    let mut events = Events::of(resp);
    let mut before = String::new();
    let mut last = String::new();
    for _ in 0..4 {
        let e = events.next().await.expect("event");
        let chunk: serde_json::Value = serde_json::from_str(&e.data).expect("json");
        before.push_str(chunk["choices"][0]["text"].as_str().unwrap_or(""));
        last = e.id;
    }
    drop(events);
    let resumed = client()
        .get(server.url(&format!("/v1/completions/{id}/events")))
        .header("last-event-id", &last)
        .send()
        .await
        .expect("sent");
    let mut events = Events::of(resumed);
    let next: serde_json::Value =
        serde_json::from_str(&events.next().await.expect("event").data).expect("json");
    before.push_str(next["choices"][0]["text"].as_str().unwrap_or(""));
    let cancelled = cancel(&server, &id).await;
    assert_eq!(cancelled.status(), 200);
    let rest = transcript(&events.rest().await);
    assert_eq!(rest.finish_reason.as_deref(), Some("cancelled"));
    assert!(full.starts_with(&format!("{before}{}", rest.text)));
}

#[tokio::test]
async fn the_session_route_attaches_to_the_latest_generation_or_answers_204() {
    let server = TestServer::options()
        .delay(Duration::from_millis(15))
        .keys(&["me", "you"])
        .start()
        .await;
    let session_url = server.url("/v1/sessions/conv-1/stream");
    let empty = client()
        .get(&session_url)
        .bearer_auth("me")
        .send()
        .await
        .expect("sent");
    assert_eq!(empty.status(), 204);

    let full = words(20);
    let resp = client()
        .post(server.url("/v1/chat/completions"))
        .bearer_auth("me")
        .header("x-session-id", "conv-1")
        .json(&chat(&full, true))
        .send()
        .await
        .expect("sent");
    let (id, before, last) = cut_after(resp, 3).await;

    let other = client()
        .get(&session_url)
        .bearer_auth("you")
        .send()
        .await
        .expect("sent");
    assert_eq!(other.status(), 204, "sessions are per caller");
    let resumed = client()
        .get(&session_url)
        .bearer_auth("me")
        .header("last-event-id", &last)
        .send()
        .await
        .expect("sent");
    assert_eq!(resumed.headers()["x-completion-id"], id.as_str());
    let after = read_all(resumed).await;
    assert_eq!(format!("{before}{}", after.text), full);

    let from_start = client()
        .get(&session_url)
        .bearer_auth("me")
        .send()
        .await
        .expect("sent");
    assert_eq!(read_all(from_start).await.text, full);
}

#[tokio::test]
async fn two_readers_each_get_everything_and_the_grace_waits_for_the_last() {
    // A grace far longer than the test: a return "within the grace" is
    // then no race against the clock.
    let server = TestServer::options()
        .delay(Duration::from_millis(15))
        .grace(Duration::from_secs(60))
        .start()
        .await;
    let full = words(40);
    let first = open_stream(&server, &full, None).await;
    let id = completion_id(&first);
    let events_url = server.url(&format!("/v1/chat/completions/{id}/events"));
    let second = client().get(&events_url).send().await.expect("sent");
    let generation = server
        .state
        .registry
        .get(CallerId::ANONYMOUS, &GenerationId::from(id.as_str()))
        .expect("kept");
    assert_eq!(generation.attached_count(), 2);

    // The second tab leaves; the first keeps reading everything.
    let (_, _, _) = cut_after(second, 2).await;
    let t = read_all(first).await;
    assert_eq!(t.text, full);
    assert_eq!(t.finish_reason.as_deref(), Some("stop"));

    // Now one reader, gone; a return within the grace keeps it alive.
    let long = words(200);
    let resp = open_stream(&server, &long, None).await;
    let (id, before, last) = cut_after(resp, 1).await;
    let generation = server
        .state
        .registry
        .get(CallerId::ANONYMOUS, &GenerationId::from(id.as_str()))
        .expect("kept");
    eventually(Duration::from_secs(5), || generation.attached_count() == 0).await;
    let back = resume(&server, &id, &last).await;
    assert_eq!(generation.attached_count(), 1);
    let after = read_all(back).await;
    assert_eq!(format!("{before}{}", after.text), long);
    assert_eq!(after.finish_reason.as_deref(), Some("stop"));
}

#[tokio::test]
async fn finished_generations_expire_after_the_ttl() {
    let mut options = TestServer::options();
    options.registry.resume_ttl = Duration::from_millis(300);
    let server = options.start().await;
    let resp = open_stream(&server, "short lived", Some("s")).await;
    let id = completion_id(&resp);
    read_all(resp).await;
    // That it is kept until the TTL is the registry's unit test, on paused
    // time; here, that it goes once the TTL has passed, whenever that is.
    let url = server.url(&format!("/v1/chat/completions/{id}/events"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while client().get(&url).send().await.expect("sent").status() != 404 {
        assert!(tokio::time::Instant::now() < deadline, "never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let session = client()
        .get(server.url("/v1/sessions/s/stream"))
        .send()
        .await
        .expect("sent");
    assert_eq!(session.status(), 204);
}

#[tokio::test(start_paused = true)]
async fn the_budget_drops_the_oldest_finished_logs_but_never_a_running_one() {
    let mut options = TestServer::options().delay(Duration::from_secs(1));
    options.registry.resume_budget = 6_000;
    let server = options.start().await;
    // 100 s of tokens: it runs through everything below.
    let running = open_stream(&server, &words(100), None).await;
    let running_id = completion_id(&running);
    let running_events = Events::of(running);

    let mut finished = Vec::new();
    for _ in 0..12 {
        let resp = open_stream(&server, "one", None).await;
        finished.push(completion_id(&resp));
        read_all(resp).await;
    }
    let status = |id: &str| {
        let url = server.url(&format!("/v1/chat/completions/{id}/events"));
        async move {
            client()
                .get(&url)
                .send()
                .await
                .expect("sent")
                .status()
                .as_u16()
        }
    };
    assert_eq!(status(&finished[0]).await, 404, "the oldest was evicted");
    assert_eq!(
        status(finished.last().expect("some")).await,
        200,
        "the newest is kept"
    );
    assert_eq!(status(&running_id).await, 200, "the running one is kept");
    let t = transcript(&running_events.rest().await);
    assert_eq!(
        t.text,
        words(100),
        "the stream that was running lost nothing"
    );
}

#[tokio::test]
async fn malformed_or_forged_event_ids_are_treated_as_unknown() {
    let server = TestServer::echo().await;
    let resp = open_stream(&server, "a b c", None).await;
    let id = completion_id(&resp);
    read_all(resp).await;
    for forged in [
        "garbage",
        "",
        "chatcmpl-none.3",
        &format!("{id}.999"),
        &format!("{id}.-1"),
        "..",
        "x.1",
    ] {
        let replay = resume(&server, &id, forged).await;
        assert_eq!(replay.status(), 200, "{forged:?}");
        assert_eq!(
            read_all(replay).await.text,
            "a b c",
            "replays from the start: {forged:?}"
        );
        let fresh = post(&server, "/v1/chat/completions", &chat("new one", true))
            .header("last-event-id", forged)
            .send()
            .await
            .expect("sent");
        assert_eq!(fresh.status(), 200);
        assert_eq!(read_all(fresh).await.text, "new one", "{forged:?}");
    }
}

#[tokio::test]
async fn a_resume_after_the_end_sends_done_again_with_its_id() {
    let server = TestServer::echo().await;
    let resp = open_stream(&server, "a b c", None).await;
    let id = completion_id(&resp);
    let first = read_all(resp).await;
    let done_id = first.ids.last().expect("[DONE] has an id").clone();
    for last in [done_id.clone(), first.ids[first.ids.len() - 2].clone()] {
        let again = read_all(resume(&server, &id, &last).await).await;
        assert!(again.done, "resuming after {last} ends with [DONE]");
        assert_eq!(again.ids.last(), Some(&done_id), "the same [DONE], same id");
        assert_eq!(again.text, "");
    }
    // So does fetch-event-source's re-POST after the end.
    let repost = post(&server, "/v1/chat/completions", &chat("ignored", true))
        .header("last-event-id", &done_id)
        .send()
        .await
        .expect("sent");
    let repost = read_all(repost).await;
    assert_eq!(repost.ids, [done_id]);
    assert_eq!(server.state.registry.len(), 1, "no second generation");
}

#[tokio::test]
async fn a_reader_that_stops_reading_holds_nothing_once_the_log_is_dropped() {
    // A budget of one byte: each finished generation is kept only until the
    // next one finishes (no clock involved).
    let mut options = TestServer::options();
    options.registry.resume_budget = 1;
    let server = options.start().await;
    let full = words(20_000);
    let resp = open_stream(&server, &full, None).await;
    let id = completion_id(&resp);
    let generation = server
        .state
        .registry
        .get(CallerId::ANONYMOUS, &GenerationId::from(id.as_str()))
        .expect("kept");
    assert_eq!(read_all(resp).await.text, full);
    // A resume that never reads its body: it holds a position, not a copy,
    // and once the budget drops the log, not even that keeps it alive.
    let stalled = client()
        .get(server.url(&format!("/v1/chat/completions/{id}/events")))
        .send()
        .await
        .expect("sent");
    assert_eq!(stalled.status(), 200);
    assert!(generation.log.held_bytes() > 1_000_000);
    read_all(open_stream(&server, "the next one", None).await).await;
    eventually(Duration::from_secs(10), || generation.log.held_bytes() == 0).await;
    let rest = Events::of(stalled).rest().await;
    assert_eq!(rest.last().map(|e| e.data.as_str()), Some("[DONE]"));
}
