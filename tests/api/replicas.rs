//! Replicas: two real instances of the binary sharing a real Redis, and
//! nginx round-robin in front. Every guarantee must hold whichever
//! instance a request reaches.

use std::time::Duration;

use serde_json::Value;

use crate::common::{
    Events, Raw, chat, client, completion_id, json_reply, metrics_text, read_all, transcript,
};
use crate::process::{Process, sample};
use crate::services::{Nginx, Redis, until};

/// Long enough that nothing here ends on its own before the test acts.
pub(crate) fn words(n: usize) -> String {
    (0..n)
        .map(|i| format!("w{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

pub(crate) struct Cluster {
    pub(crate) redis: Redis,
    pub(crate) a: Process,
    pub(crate) b: Process,
}

impl Cluster {
    pub(crate) async fn start(extra: &[&str]) -> Self {
        let redis = Redis::start().await;
        let a = instance(&redis, extra).await;
        let b = instance(&redis, extra).await;
        let cluster = Self { redis, a, b };
        // Both instances have reached Redis before the test begins.
        for p in [&cluster.a, &cluster.b] {
            until(Duration::from_secs(10), || redis_ok(p)).await;
        }
        cluster
    }
}

pub(crate) async fn instance(redis: &Redis, extra: &[&str]) -> Process {
    instance_at(&redis.url(), extra).await
}

/// An echo instance on the Redis at `url`: 30 ms a token and a lease of
/// 1 s, unless `extra` names its own.
pub(crate) async fn instance_at(url: &str, extra: &[&str]) -> Process {
    let mut args = vec!["--backend", "echo", "--redis", url];
    for (flag, default) in [("--token-delay", "30ms"), ("--redis-lease", "1s")] {
        if !extra.contains(&flag) {
            args.extend([flag, default]);
        }
    }
    args.extend_from_slice(extra);
    Process::start(&args, &[]).await
}

pub(crate) async fn redis_ok(p: &Process) -> bool {
    // A first command makes the lazy connection; /health then reports it.
    let _ = client()
        .get(p.url("/v1/sessions/warm-up/stream"))
        .send()
        .await;
    health(p).await["redis"] == "ok"
}

async fn health(p: &Process) -> Value {
    json_reply(client().get(p.url("/health"))).await
}

pub(crate) async fn metrics(p: &Process) -> String {
    metrics_text(p.url("/metrics")).await
}

pub(crate) async fn open(
    url: &str,
    text: &str,
    session: Option<&str>,
    key: Option<&str>,
) -> reqwest::Response {
    let mut req = client().post(url).json(&chat(text, true));
    if let Some(session) = session {
        req = req.header("x-session-id", session);
    }
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    let resp = req.send().await.expect("sent");
    assert_eq!(resp.status(), 200);
    resp
}

/// A stream on instance A, read to its `owned_read`-th event, and a
/// reader of the same generation on instance B, read to its first.
pub(crate) async fn owned_and_followed(
    cluster: &Cluster,
    text: &str,
    session: Option<&str>,
    owned_read: usize,
) -> (String, Events, Events) {
    owned_here_followed_there(&cluster.a, &cluster.b, text, session, owned_read).await
}

/// [`owned_and_followed`] on any two instances.
pub(crate) async fn owned_here_followed_there(
    a: &Process,
    b: &Process,
    text: &str,
    session: Option<&str>,
    owned_read: usize,
) -> (String, Events, Events) {
    let owned = open(&a.url("/v1/chat/completions"), text, session, None).await;
    let id = completion_id(&owned);
    let mut owned = Events::of(owned);
    for _ in 0..owned_read {
        owned.next_json().await;
    }
    let follow = client()
        .get(b.url(&format!("/v1/chat/completions/{id}/events")))
        .send()
        .await
        .expect("sent");
    assert_eq!(follow.status(), 200);
    let mut follow = Events::of(follow);
    follow.next_json().await;
    (id, owned, follow)
}

/// Event ids with no repeat.
pub(crate) fn assert_no_repeat(ids: &[String]) {
    let unique: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "an event came twice: {ids:?}");
}

/// What the cancel endpoint on `p` answers for `id`.
pub(crate) async fn cancel_on(p: &Process, id: &str) -> Value {
    json_reply(client().post(p.url(&format!("/v1/chat/completions/{id}/cancel")))).await
}

/// The session's next question, asked on `p`: the stream it replaces ends
/// cancelled with `[DONE]`, and the new answer comes whole.
pub(crate) async fn next_question_replaces(p: &Process, session: &str, old: Events) {
    let new = open(
        &p.url("/v1/chat/completions"),
        "the next question",
        Some(session),
        None,
    )
    .await;
    let old = rest(old).await;
    assert_eq!(old.finish_reason.as_deref(), Some("cancelled"));
    assert!(old.done);
    assert_eq!(read_all(new).await.text, "the next question");
}

/// Everything to the end of a stream, or a failure instead of a hang.
pub(crate) async fn rest(events: Events) -> crate::common::Transcript {
    rest_within(events, Duration::from_secs(20)).await
}

/// [`rest`] for a stream that may take up to `limit`.
pub(crate) async fn rest_within(events: Events, limit: Duration) -> crate::common::Transcript {
    let all = tokio::time::timeout(limit, events.rest())
        .await
        .expect("the stream ends");
    transcript(&all)
}

/// The first `n` whole events of a raw body, and the id of the last one.
pub(crate) fn first_events(raw: &str, n: usize) -> (String, String) {
    let events: Vec<&str> = raw.split_inclusive("\n\n").take(n).collect();
    assert_eq!(events.len(), n, "{raw:?}");
    let last = events[n - 1]
        .lines()
        .find_map(|l| l.strip_prefix("id: "))
        .expect("an id line")
        .to_owned();
    (events.concat(), last)
}

/// Waits (within `limit`) until `instance` replays generation `id` from
/// its start as exactly the bytes `owned`: nothing lost, nothing twice.
pub(crate) async fn until_replayed(instance: &Process, id: &str, owned: &str, limit: Duration) {
    until(limit, || async {
        let replay = client()
            .get(instance.url(&format!("/v1/chat/completions/{id}/events")))
            .send()
            .await
            .expect("sent");
        replay.status() == 200 && raw_body(replay).await == owned
    })
    .await;
}

pub(crate) async fn raw_body(resp: reqwest::Response) -> String {
    assert_eq!(resp.status(), 200);
    let mut raw = Raw::of(resp);
    tokio::time::timeout(Duration::from_secs(20), raw.read_to_end())
        .await
        .expect("the stream ends");
    raw.seen
}

#[tokio::test]
async fn a_cut_stream_resumes_byte_identically_whichever_instance_the_retry_reaches() {
    let cluster = Cluster::start(&[]).await;
    let nginx = Nginx::start(&[&cluster.a.base, &cluster.b.base]).await;
    let url = nginx.url("/v1/chat/completions");
    let full_text = words(40);
    let resp = open(&url, &full_text, None, None).await;
    let id = completion_id(&resp);
    let mut raw = Raw::of(resp);
    raw.until(".5\n\n").await;
    let (before, last) = first_events(&raw.seen, 5);
    drop(raw);

    let events_url = |base: &str| format!("{base}/v1/chat/completions/{id}/events");
    let mut continuations = Vec::new();
    // By GET, on each instance directly and twice through nginx.
    for base in [&cluster.a.base, &cluster.b.base, &nginx.base, &nginx.base] {
        let resp = client()
            .get(events_url(base))
            .header("last-event-id", &last)
            .send()
            .await
            .expect("sent");
        continuations.push(raw_body(resp).await);
    }
    // By fetch-event-source's re-POST of the same request, twice through
    // nginx so that both instances get one.
    for _ in 0..2 {
        let resp = client()
            .post(&url)
            .header("last-event-id", &last)
            .json(&chat(&full_text, true))
            .send()
            .await
            .expect("sent");
        continuations.push(raw_body(resp).await);
    }
    // The whole log, as each instance replays it from the start.
    for base in [&cluster.a.base, &cluster.b.base] {
        let full = raw_body(client().get(events_url(base)).send().await.expect("sent")).await;
        assert!(full.contains("data: [DONE]\nid: "), "{full}");
        for after in &continuations {
            assert_eq!(&format!("{before}{after}"), &full, "no gap, no repeat");
        }
    }
    let text = transcript(
        &Events::of(
            client()
                .get(events_url(&nginx.base))
                .send()
                .await
                .expect("sent"),
        )
        .rest()
        .await,
    )
    .text;
    assert_eq!(text, full_text);

    // In Redis: the finished log and record expire within the resume TTL
    // (5 minutes by default), and the owner's lease is gone.
    let redis = &cluster.redis;
    for key in [format!("sg:{{{id}}}:l"), format!("sg:{{{id}}}:m")] {
        let ttl: i64 = redis.cli(&["PTTL", &key]).await.parse().expect("a number");
        assert!((1..=300_000).contains(&ttl), "{key}: {ttl}");
    }
    let lease = format!("sg:{{{id}}}:lease");
    until(Duration::from_secs(5), || async {
        redis.cli(&["EXISTS", &lease]).await == "0"
    })
    .await;
}

#[tokio::test]
async fn the_next_request_of_a_session_on_one_instance_cancels_the_other_instances_generation() {
    let cluster = Cluster::start(&[]).await;
    let a_url = cluster.a.url("/v1/chat/completions");
    let old = open(&a_url, &words(500), Some("conv"), None).await;
    let mut old = Events::of(old);
    old.next_json().await;
    old.next_json().await;

    next_question_replaces(&cluster.b, "conv", old).await;
    // The owner stopped it: its generation ended as replaced.
    until(Duration::from_secs(5), || async {
        let m = metrics(&cluster.a).await;
        sample(
            &m,
            "sluicegate_generations_ended_total",
            &["session_replaced"],
        ) == 1.0
    })
    .await;
    let generated = sample(
        &metrics(&cluster.a).await,
        "sluicegate_tokens_generated_total",
        &[],
    );
    assert!(generated < 100.0, "{generated} tokens: compute stopped");
}

#[tokio::test]
async fn the_cancel_endpoint_and_the_session_route_work_from_the_other_instance() {
    let cluster = Cluster::start(&[]).await;
    let owned = open(
        &cluster.a.url("/v1/chat/completions"),
        &words(500),
        Some("s1"),
        None,
    )
    .await;
    let id = completion_id(&owned);
    let mut owned = Events::of(owned);
    owned.next_json().await;

    let follow = client()
        .get(cluster.b.url("/v1/sessions/s1/stream"))
        .send()
        .await
        .expect("sent");
    assert_eq!(follow.status(), 200);
    assert_eq!(completion_id(&follow), id);
    let mut follow = Events::of(follow);
    let opening = follow.next_json().await;
    assert_eq!(opening["choices"][0]["delta"]["role"], "assistant");
    follow.next_json().await;

    let cancel_url = cluster.b.url(&format!("/v1/chat/completions/{id}/cancel"));
    let first: Value = client()
        .post(&cancel_url)
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(first["cancelled"], true, "{first}");
    let owned = rest(owned).await;
    let follow = rest(follow).await;
    for t in [&owned, &follow] {
        assert_eq!(t.finish_reason.as_deref(), Some("cancelled"));
        assert!(t.done);
    }
    assert!(
        owned.ids.ends_with(&follow.ids),
        "both readers saw the same events: {:?} {:?}",
        owned.ids,
        follow.ids
    );
    let again: Value = client()
        .post(&cancel_url)
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(again["cancelled"], false, "{again}");

    let idle = client()
        .get(cluster.b.url("/v1/sessions/nothing-here/stream"))
        .send()
        .await
        .expect("sent");
    assert_eq!(idle.status(), 204);
}

#[tokio::test]
async fn two_requests_of_one_session_at_once_on_two_instances_leave_exactly_one() {
    let cluster = Cluster::start(&[]).await;
    let (a_url, b_url) = (
        cluster.a.url("/v1/chat/completions"),
        cluster.b.url("/v1/chat/completions"),
    );
    for round in 0..4 {
        let session = format!("race-{round}");
        let text = words(30);
        let (a, b) = tokio::join!(
            open(&a_url, &text, Some(&session), None),
            open(&b_url, &text, Some(&session), None),
        );
        let (a, b) = tokio::join!(rest(Events::of(a)), rest(Events::of(b)));
        let mut reasons = [a.finish_reason, b.finish_reason];
        reasons.sort();
        assert_eq!(
            reasons,
            [Some("cancelled".to_owned()), Some("stop".to_owned())],
            "round {round}"
        );
        assert!(a.done && b.done);
    }
}

#[tokio::test]
async fn a_killed_owner_leaves_its_readers_elsewhere_what_it_wrote_then_an_error_and_done() {
    let mut cluster = Cluster::start(&[]).await;
    let (_, owned, follow) = owned_and_followed(&cluster, &words(1000), Some("k"), 3).await;

    cluster.a.child.start_kill().expect("kill -9");
    let after = rest(follow).await;
    assert!(after.done, "[DONE] after the owner died");
    let error = after.chunks.last().expect("an error event");
    assert_eq!(error["error"]["code"], "instance_gone", "{error}");
    // The owner had sent w0 and w1 to its own client: the reader here got
    // at least those, in order.
    assert!(
        after.text.starts_with("w0 w1"),
        "what the owner wrote: {}",
        after.text
    );

    // The session can go on at once, on the survivor.
    let next = open(
        &cluster.b.url("/v1/chat/completions"),
        "go on",
        Some("k"),
        None,
    )
    .await;
    assert_eq!(read_all(next).await.text, "go on");
    drop(owned);
    drop(cluster.redis);
}

#[tokio::test]
async fn a_redis_restart_mid_stream_ends_every_stream_and_new_requests_work_once_it_is_back() {
    let mut cluster = Cluster::start(&[]).await;
    let text = words(100);
    let (_, owned, mut follow) = owned_and_followed(&cluster, &text, None, 1).await;
    follow.next_json().await;

    cluster.redis.restart().await;
    let (owned, follow) = tokio::join!(rest(owned), rest(follow));
    assert_eq!(owned.text, text, "the owner's own stream is untouched");
    assert!(owned.done && follow.done);
    assert_eq!(
        follow.finish_reason.as_deref(),
        Some("stop"),
        "the reader elsewhere caught up"
    );

    for p in [&cluster.a, &cluster.b] {
        until(Duration::from_secs(10), || redis_ok(p)).await;
    }
    let next = open(
        &cluster.b.url("/v1/chat/completions"),
        "after the restart",
        Some("r"),
        None,
    )
    .await;
    let id = completion_id(&next);
    assert_eq!(read_all(next).await.text, "after the restart");
    let replay = client()
        .get(cluster.a.url(&format!("/v1/chat/completions/{id}/events")))
        .send()
        .await
        .expect("sent");
    assert_eq!(read_all(replay).await.text, "after the restart");
}

#[tokio::test]
async fn with_redis_away_lookups_fail_fast_with_503_and_generations_still_run() {
    let mut cluster = Cluster::start(&[]).await;
    cluster.redis.stop().await;
    let started = tokio::time::Instant::now();
    let resp = client()
        .get(
            cluster
                .b
                .url("/v1/chat/completions/chatcmpl-elsewhere/events"),
        )
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "redis_unavailable", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("Redis")
    );
    assert!(started.elapsed() < Duration::from_secs(10), "no hang");
    until(Duration::from_secs(10), || async {
        health(&cluster.b).await["redis"] == "unreachable"
    })
    .await;
    assert!(
        sample(
            &metrics(&cluster.b).await,
            "sluicegate_redis_errors_total",
            &[]
        ) >= 1.0
    );

    // A new generation runs on its instance, cancel-previous works there.
    let first = open(
        &cluster.b.url("/v1/chat/completions"),
        &words(200),
        Some("alone"),
        None,
    )
    .await;
    let second = open(
        &cluster.b.url("/v1/chat/completions"),
        "local",
        Some("alone"),
        None,
    )
    .await;
    assert_eq!(
        rest(Events::of(first)).await.finish_reason.as_deref(),
        Some("cancelled")
    );
    assert_eq!(read_all(second).await.text, "local");

    cluster.redis.restart().await;
    until(Duration::from_secs(15), || redis_ok(&cluster.b)).await;
}

#[tokio::test]
async fn another_callers_key_gets_404_on_another_instance_too() {
    let cluster = Cluster::start(&["--api-key", "key-one,key-two"]).await;
    let owned = open(
        &cluster.a.url("/v1/chat/completions"),
        &words(300),
        Some("mine"),
        Some("key-one"),
    )
    .await;
    let id = completion_id(&owned);
    let mut owned = Events::of(owned);
    owned.next_json().await;

    let as_two = |path: String| {
        client()
            .get(cluster.b.url(&path))
            .bearer_auth("key-two")
            .send()
    };
    let events = as_two(format!("/v1/chat/completions/{id}/events"))
        .await
        .expect("sent");
    assert_eq!(events.status(), 404);
    let session = as_two("/v1/sessions/mine/stream".to_owned())
        .await
        .expect("sent");
    assert_eq!(session.status(), 204);
    let cancel = client()
        .post(cluster.b.url(&format!("/v1/chat/completions/{id}/cancel")))
        .bearer_auth("key-two")
        .send()
        .await
        .expect("sent");
    assert_eq!(cancel.status(), 404);

    let mine = client()
        .get(cluster.b.url(&format!("/v1/chat/completions/{id}/events")))
        .bearer_auth("key-one")
        .send()
        .await
        .expect("sent");
    assert_eq!(mine.status(), 200);
    drop(mine);
    drop(owned);
}

#[tokio::test]
async fn a_short_answer_kept_whole_in_its_record_replays_and_resumes_on_the_other_instance() {
    // No token delay: the whole answer is one batch, written at once.
    let redis = Redis::start().await;
    let fast = ["--backend", "echo", "--redis", &redis.url()];
    let (a, b) = (
        Process::start(&fast, &[]).await,
        Process::start(&fast, &[]).await,
    );
    for p in [&a, &b] {
        until(Duration::from_secs(10), || redis_ok(p)).await;
    }
    // Whether an answer is whole by the mirror's first look (5 ms after
    // its start) depends on how busy the machine is: ask until one is,
    // rather than race that window.
    let mut whole = None;
    for n in 0..20 {
        let text = format!("short answer number {n} of seven words");
        let resp = open(&a.url("/v1/chat/completions"), &text, None, None).await;
        let id = completion_id(&resp);
        let owned = raw_body(resp).await;
        let meta = format!("sg:{{{id}}}:m");
        until(Duration::from_secs(10), || async {
            redis.cli(&["HGET", &meta, "state"]).await == "done"
        })
        .await;
        if redis.cli(&["HEXISTS", &meta, "z"]).await == "1" {
            whole = Some((id, owned, meta));
            break;
        }
    }
    let (id, owned, meta) = whole.expect("an answer kept whole within 20 tries");
    // Kept in the record's field `z`, with no log key, and expiring.
    assert_eq!(redis.cli(&["EXISTS", &format!("sg:{{{id}}}:l")]).await, "0");
    let ttl: i64 = redis.cli(&["PTTL", &meta]).await.parse().expect("a number");
    assert!(ttl > 0, "{ttl}");

    let events = |last: Option<String>| {
        let mut req = client().get(b.url(&format!("/v1/chat/completions/{id}/events")));
        if let Some(last) = last {
            req = req.header("last-event-id", last);
        }
        req.send()
    };
    let replay = raw_body(events(None).await.expect("sent")).await;
    assert_eq!(replay, owned, "the other instance replays it byte for byte");
    let (before, last) = first_events(&owned, 3);
    let after = raw_body(events(Some(last)).await.expect("sent")).await;
    assert_eq!(format!("{before}{after}"), owned, "no gap, no repeat");
}

#[tokio::test]
async fn what_the_resume_budget_evicts_on_its_owner_leaves_redis_and_every_instance() {
    // Room for about one finished 40-word answer.
    let cluster = Cluster::start(&["--resume-budget", "6000"]).await;
    let url = cluster.a.url("/v1/chat/completions");
    let mut ids = Vec::new();
    for i in 0..6 {
        let text = format!("r{i} {}", words(40));
        let resp = open(&url, &text, None, None).await;
        ids.push(completion_id(&resp));
        assert_eq!(rest(Events::of(resp)).await.text, text);
    }
    let meta = |id: &str| format!("sg:{{{id}}}:m");
    let log = |id: &str| format!("sg:{{{id}}}:l");
    // The oldest were evicted on their owner, and deleted from Redis.
    for id in &ids[..4] {
        until(Duration::from_secs(10), || async {
            cluster.redis.cli(&["EXISTS", &meta(id), &log(id)]).await == "0"
        })
        .await;
        let elsewhere = client()
            .get(cluster.b.url(&format!("/v1/chat/completions/{id}/events")))
            .send()
            .await
            .expect("sent");
        assert_eq!(elsewhere.status(), 404, "{id} is gone everywhere");
    }
    // The latest is still there, on both instances.
    let last = ids.last().expect("six ids");
    assert_eq!(
        cluster
            .redis
            .cli(&["EXISTS", &meta(last), &log(last)])
            .await,
        "2"
    );
    let elsewhere = client()
        .get(
            cluster
                .b
                .url(&format!("/v1/chat/completions/{last}/events")),
        )
        .send()
        .await
        .expect("sent");
    assert_eq!(elsewhere.status(), 200);
    assert!(rest(Events::of(elsewhere)).await.done);
}

#[tokio::test]
async fn sigterm_on_the_owner_ends_its_generations_for_readers_on_every_instance() {
    let cluster = Cluster::start(&["--shutdown-grace", "300ms"]).await;
    let (_, owned, follow) = owned_and_followed(&cluster, &words(1000), None, 1).await;

    cluster.a.signal("TERM");
    let (owned, follow) = tokio::join!(rest(owned), rest(follow));
    for t in [&owned, &follow] {
        assert_eq!(t.finish_reason.as_deref(), Some("cancelled"));
        assert!(t.done);
    }
    assert_eq!(owned.ids, follow.ids, "the same events everywhere");
}

#[tokio::test]
async fn sigterm_right_after_short_answers_leaves_each_one_whole_in_redis() {
    // Answers end before the mirror's first look: they wait among the
    // fresh ones for their window, and the owner is stopped at once. Its
    // exit writes whatever is still waiting; none may be lost.
    let cluster = Cluster::start(&["--token-delay", "0ms"]).await;
    let url = cluster.a.url("/v1/chat/completions");
    let answers = futures_util::future::join_all((0..6).map(|n| {
        let url = url.clone();
        async move {
            let resp = open(&url, &format!("short answer {n} before a stop"), None, None).await;
            let id = completion_id(&resp);
            (id, raw_body(resp).await)
        }
    }))
    .await;
    cluster.a.signal("TERM");
    for (id, owned) in answers {
        assert!(owned.contains("data: [DONE]"), "{owned}");
        until_replayed(&cluster.b, &id, &owned, Duration::from_secs(10)).await;
    }
}

#[tokio::test]
async fn a_reader_on_another_instance_keeps_a_generation_alive_past_the_owners_grace() {
    // The owner's only local reader leaves; a reader on the other instance
    // goes on. The generation (60 tokens at 30 ms, far past the 300 ms
    // grace) must run to its end rather than be cancelled as abandoned.
    let cluster = Cluster::start(&["--reattach-grace", "300ms"]).await;
    let text = words(60);
    let (_, owned, follow) = owned_and_followed(&cluster, &text, None, 1).await;
    drop(owned);

    let after = rest(follow).await;
    assert_eq!(after.finish_reason.as_deref(), Some("stop"));
    assert_eq!(after.text, text);
}

#[test]
fn the_readme_shows_the_nginx_config_the_tests_run() {
    let readme = include_str!("../../README.md");
    let site = include_str!("../../deploy/nginx.conf");
    assert!(
        readme.contains(site),
        "README's nginx block is deploy/nginx.conf"
    );
}

#[tokio::test]
async fn ui_chat_resumes_on_the_other_instance_in_either_encoding() {
    use crate::ui_chat::{Parts, assemble, ui_body};
    let cluster = Cluster::start(&[]).await;
    let get = |p: &Process, path: String| client().get(p.url(&path)).send();

    // Started as a UI chat on a; resumed as UI parts and as OpenAI chunks on b.
    let text = words(40);
    let started = client()
        .post(cluster.a.url("/v1/ui/chat"))
        .json(&ui_body("ui-r1", &text))
        .send()
        .await
        .expect("sent");
    assert_eq!(started.status(), 200);
    let id = completion_id(&started);
    let resumed = get(&cluster.b, "/v1/ui/chat/ui-r1/stream".into())
        .await
        .expect("sent");
    assert_eq!(resumed.status(), 200);
    assert_eq!(resumed.headers()["x-vercel-ai-ui-message-stream"], "v1");
    let message = assemble(&Parts::of(resumed).rest().await);
    assert_eq!(
        (message.text.as_str(), message.id.as_str()),
        (text.as_str(), id.as_str())
    );
    let by_session = get(&cluster.b, "/v1/sessions/ui-r1/stream".into())
        .await
        .expect("sent");
    assert_eq!(rest(Events::of(by_session)).await.text, text);
    assert_eq!(assemble(&Parts::of(started).rest().await).text, text);

    // Started on the OpenAI route on b; resumed as UI parts on a.
    let openai = open(
        &cluster.b.url("/v1/chat/completions"),
        &text,
        Some("ui-r2"),
        None,
    )
    .await;
    let id = completion_id(&openai);
    let resumed = get(&cluster.a, "/v1/ui/chat/ui-r2/stream".into())
        .await
        .expect("sent");
    let message = assemble(&Parts::of(resumed).rest().await);
    assert_eq!(
        (message.text.as_str(), message.id.as_str()),
        (text.as_str(), id.as_str())
    );
    assert_eq!(rest(Events::of(openai)).await.text, text);

    let idle = get(&cluster.b, "/v1/ui/chat/ui-never/stream".into())
        .await
        .expect("sent");
    assert_eq!(idle.status(), 204);
}
