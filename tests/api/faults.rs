//! Replicas under faults injected for real: a Redis paused, restarted or
//! emptied, an instance killed or frozen. Each test asserts what clients
//! see (the exact text, one `[DONE]`, the right finish) and what Redis
//! holds afterwards (every key with an expiry).

use std::time::Duration;

use crate::common::{Events, Raw, client, completion_id, read_all, transcript};
use crate::process::sample;
use crate::replicas::{
    Cluster, assert_no_repeat, cancel_on, first_events, next_question_replaces, open,
    owned_and_followed, raw_body, rest, until_replayed, words,
};
use crate::services::{Redis, every_key_expires_at, until};

async fn every_key_expires(redis: &Redis) {
    every_key_expires_at(redis.port).await;
}

async fn pause_writes(redis: &Redis, ms: u64) {
    let reply = redis
        .cli(&["CLIENT", "PAUSE", &ms.to_string(), "WRITE"])
        .await;
    assert_eq!(reply, "OK");
}

#[tokio::test]
async fn a_redis_stall_mid_stream_loses_and_repeats_nothing() {
    let cluster = Cluster::start(&[]).await;
    let text = words(80);
    let (id, owned, mut follow) = owned_and_followed(&cluster, &text, None, 0).await;
    follow.next_json().await;
    // Longer than a command's timeout (1 s): the owner's appends time out
    // and are retried while the first tries still wait inside Redis.
    pause_writes(&cluster.redis, 1500).await;
    let (owned, follow) = tokio::join!(rest(owned), rest(follow));
    assert_eq!(owned.text, text, "the owner's client got the whole answer");
    assert_eq!(owned.finish_reason.as_deref(), Some("stop"));
    assert!(owned.done && follow.done);
    assert_eq!(follow.finish_reason.as_deref(), Some("stop"));
    assert_no_repeat(&follow.ids);
    assert!(
        owned.ids.ends_with(&follow.ids),
        "the reader elsewhere got the same events"
    );

    // Replayed from the start on the other instance: the whole log, once.
    let replay = client()
        .get(cluster.b.url(&format!("/v1/chat/completions/{id}/events")))
        .send()
        .await
        .expect("sent");
    let replay = read_all(replay).await;
    assert_eq!(replay.text, text);
    assert_eq!(replay.ids, owned.ids);
    every_key_expires(&cluster.redis).await;
}

#[tokio::test]
async fn a_stall_while_short_answers_are_written_whole_loses_and_repeats_nothing() {
    // No token delay: answers end before the mirror's first look, so each
    // goes out whole in one transaction, and that transaction waits in a
    // paused Redis past the command timeout (1 s). The retry (the append
    // script) must find what the late first try wrote, not write it again.
    let cluster = Cluster::start(&["--token-delay", "0ms"]).await;
    pause_writes(&cluster.redis, 1500).await;
    let url = cluster.a.url("/v1/chat/completions");
    let answers: Vec<_> = (0..5)
        .map(|n| {
            let url = url.clone();
            tokio::spawn(async move {
                let text = format!("short answer {n} in a stall");
                let resp = open(&url, &text, None, None).await;
                let id = completion_id(&resp);
                let owned = raw_body(resp).await;
                assert!(owned.contains("data: [DONE]"), "{owned}");
                (id, owned)
            })
        })
        .collect();
    for answer in answers {
        let (id, owned) = answer.await.expect("an answer");
        // Once Redis answers, the other instance replays it byte for byte:
        // nothing lost, nothing twice.
        until_replayed(&cluster.b, &id, &owned, Duration::from_secs(20)).await;
    }
    let timed_out = sample(
        &crate::replicas::metrics(&cluster.a).await,
        "sluicegate_redis_errors_total",
        &[],
    );
    assert!(timed_out >= 1.0, "the first tries timed out in the stall");
    every_key_expires(&cluster.redis).await;
}

#[tokio::test]
async fn a_resume_on_a_lagging_instance_waits_for_its_position_and_repeats_nothing() {
    let cluster = Cluster::start(&[]).await;
    let text = words(60);
    let resp = open(&cluster.a.url("/v1/chat/completions"), &text, None, None).await;
    let id = completion_id(&resp);
    let mut raw = Raw::of(resp);
    raw.until(".1\n\n").await;
    // The owner's client reads on while nothing reaches Redis.
    pause_writes(&cluster.redis, 800).await;
    raw.until(".8\n\n").await;
    let (before, last) = first_events(&raw.seen, 9);
    drop(raw);

    let resp = client()
        .get(cluster.b.url(&format!("/v1/chat/completions/{id}/events")))
        .header("last-event-id", &last)
        .send()
        .await
        .expect("sent");
    let after = raw_body(resp).await;
    assert!(
        after.starts_with("data: ") && after.contains(&format!("id: {id}.9\n\n")),
        "the next event first: {after:?}"
    );
    let full = raw_body(
        client()
            .get(cluster.a.url(&format!("/v1/chat/completions/{id}/events")))
            .send()
            .await
            .expect("sent"),
    )
    .await;
    assert_eq!(format!("{before}{after}"), full, "no gap, no repeat");
    let whole = transcript(
        &Events::of(
            client()
                .get(cluster.b.url(&format!("/v1/chat/completions/{id}/events")))
                .send()
                .await
                .expect("sent"),
        )
        .rest()
        .await,
    );
    assert_eq!(whole.text, text);
}

#[tokio::test]
async fn a_session_that_outlives_the_resume_ttl_stays_visible_and_cancellable_elsewhere() {
    let cluster = Cluster::start(&["--resume-ttl", "3s"]).await;
    let owned = open(
        &cluster.a.url("/v1/chat/completions"),
        &words(2000),
        Some("long"),
        None,
    )
    .await;
    let id = completion_id(&owned);
    let mut owned = Events::of(owned);
    // 200 tokens at no less than 30 ms each: the generation has run past
    // the resume TTL plus a lease, when an unrenewed record is gone.
    for _ in 0..200 {
        owned.next_json().await;
    }
    let session = client()
        .get(cluster.b.url("/v1/sessions/long/stream"))
        .send()
        .await
        .expect("sent");
    assert_eq!(session.status(), 200, "the session is still known");
    assert_eq!(completion_id(&session), id);
    drop(session);

    next_question_replaces(&cluster.b, "long", owned).await;
    every_key_expires(&cluster.redis).await;
}

#[tokio::test]
async fn a_frozen_owner_is_ended_elsewhere_and_stops_when_it_thaws() {
    let cluster = Cluster::start(&[]).await;
    let (id, owned, follow) = owned_and_followed(&cluster, &words(1000), Some("f"), 3).await;
    cluster.a.signal("STOP");
    let after = rest(follow).await;
    assert!(after.done, "[DONE] while the owner is frozen");
    let error = after.chunks.last().expect("an error event");
    assert_eq!(error["error"]["code"], "instance_gone", "{error}");

    // A cancel now ends nothing: it has ended.
    let cancel = cancel_on(&cluster.b, &id).await;
    assert_eq!(cancel["cancelled"], false, "{cancel}");

    cluster.a.signal("CONT");
    // The owner learns it was ended elsewhere and stops its own client's
    // stream rather than run on alone.
    let owned = rest(owned).await;
    assert!(owned.done);
    let ended = owned.chunks.last().expect("a last chunk");
    assert_eq!(ended["error"], error["error"], "the ending the readers got");
    // What Redis holds did not change after the orphan ending: one end.
    let replay = client()
        .get(cluster.b.url(&format!("/v1/chat/completions/{id}/events")))
        .send()
        .await
        .expect("sent");
    let replay = read_all(replay).await;
    assert!(
        replay.ids.ends_with(&after.ids),
        "{:?} {:?}",
        replay.ids,
        after.ids
    );
    assert_eq!(replay.chunks.last(), after.chunks.last());
    every_key_expires(&cluster.redis).await;
}

#[tokio::test]
async fn a_cancel_of_a_dead_owners_generation_says_true_once_it_has_ended() {
    let mut cluster = Cluster::start(&[]).await;
    let (id, owned, _follow) = owned_and_followed(&cluster, &words(1000), None, 2).await;
    cluster.a.child.start_kill().expect("kill -9");
    drop(owned);
    let cancel = cancel_on(&cluster.b, &id).await;
    assert_eq!(cancel["cancelled"], true, "{cancel}");
    let meta = cluster
        .redis
        .cli(&["HGET", &format!("sg:{{{id}}}:m"), "state"])
        .await;
    assert_eq!(meta, "done", "ended when the answer came");
    every_key_expires(&cluster.redis).await;
}

#[tokio::test]
async fn after_redis_restarts_empty_the_owner_writes_back_what_it_holds() {
    let mut cluster = Cluster::start(&[]).await;
    let finished = open(
        &cluster.a.url("/v1/chat/completions"),
        "kept before",
        None,
        None,
    )
    .await;
    let finished_id = completion_id(&finished);
    assert_eq!(read_all(finished).await.text, "kept before");
    let text = words(100);
    let (running_id, owned, mut follow) = owned_and_followed(&cluster, &text, Some("w"), 1).await;
    follow.next_json().await;

    cluster.redis.restart().await;
    let (owned, follow) = tokio::join!(rest(owned), rest(follow));
    assert_eq!(owned.text, text);
    assert_eq!(follow.finish_reason.as_deref(), Some("stop"));
    assert_no_repeat(&follow.ids);

    // Both are back in Redis: the other instance replays them whole.
    for (id, expected) in [(&finished_id, "kept before"), (&running_id, text.as_str())] {
        let url = cluster.b.url(&format!("/v1/chat/completions/{id}/events"));
        until(Duration::from_secs(10), || async {
            client().get(&url).send().await.expect("sent").status() == 200
        })
        .await;
        let replay = read_all(client().get(&url).send().await.expect("sent")).await;
        assert_eq!(replay.text, expected);
        assert!(replay.done);
    }
    every_key_expires(&cluster.redis).await;
}

/// One client of the soak: a stream opened through the balancer, cut
/// after `cut` events, resumed (on whichever instance the balancer picks)
/// as fetch-event-source does, retrying any refusal; what it got in all.
async fn cut_and_resume(base: String, text: String, cut: usize) -> crate::common::Transcript {
    let url = format!("{base}/v1/chat/completions");
    let resp = open(&url, &text, None, None).await;
    let mut raw = Raw::of(resp);
    raw.until(&format!(".{cut}\n\n")).await;
    let (mut seen, last) = first_events(&raw.seen, cut + 1);
    drop(raw);
    let id = last.rsplit_once('.').expect("an event id").0.to_owned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let resp = client()
            .get(format!("{base}/v1/chat/completions/{id}/events"))
            .header("last-event-id", &last)
            .send()
            .await;
        if let Ok(resp) = resp
            && resp.status() == 200
        {
            seen.push_str(&raw_body(resp).await);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{id} never resumed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let events: Vec<eventsource_stream::Event> = {
        use eventsource_stream::Eventsource;
        use futures_util::StreamExt;
        futures_util::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(seen))])
            .eventsource()
            .map(|e| e.expect("well-formed SSE"))
            .collect()
            .await
    };
    transcript(&events)
}

#[tokio::test]
async fn a_soak_of_two_hundred_resumed_streams_while_redis_is_paused_restarted_and_killed() {
    let mut cluster = Cluster::start(&["--redis-timeout", "500ms"]).await;
    let nginx = crate::services::Nginx::start(&[&cluster.a.base, &cluster.b.base]).await;
    let streams: Vec<_> = (0..200)
        .map(|i| {
            let text = format!("s{i} {}", words(40));
            let base = nginx.base.clone();
            let expected = text.clone();
            let cut = 2 + i % 30;
            tokio::spawn(async move {
                // Waves, so that streams start and resume all along.
                tokio::time::sleep(Duration::from_millis(30 * i as u64)).await;
                (expected, cut_and_resume(base, text, cut).await)
            })
        })
        .collect();
    let faults = async {
        let mut round = 0;
        while !streams.iter().all(tokio::task::JoinHandle::is_finished) && round < 12 {
            tokio::time::sleep(Duration::from_millis(700)).await;
            match round % 3 {
                0 => pause_writes(&cluster.redis, 1200).await,
                1 => cluster.redis.restart().await,
                _ => {
                    cluster.redis.stop().await;
                    tokio::time::sleep(Duration::from_millis(800)).await;
                    cluster.redis.restart().await;
                }
            }
            round += 1;
        }
        round
    };
    let rounds = faults.await;
    assert!(
        rounds >= 3,
        "every kind of fault happened while streams ran"
    );
    for stream in streams {
        let (expected, got) = stream.await.expect("a client");
        assert!(got.done, "[DONE]: {expected}");
        assert_no_repeat(&got.ids);
        assert_eq!(got.text, expected, "nothing cut short or repeated");
        assert_eq!(got.finish_reason.as_deref(), Some("stop"));
    }
    for p in [&cluster.a, &cluster.b] {
        until(Duration::from_secs(10), || crate::replicas::redis_ok(p)).await;
    }
    every_key_expires(&cluster.redis).await;
}

#[tokio::test]
async fn a_least_privileged_acl_user_works_and_a_missing_permission_stops_start_up() {
    let redis = Redis::start().await;
    let grant = |user: &'static str, scripting: bool| {
        let mut args = vec!["ACL", "SETUSER", user, "on", ">pw", "~sg:*", "&sg:*"];
        args.extend([
            "+@read",
            "+@write",
            "+@keyspace",
            "+@pubsub",
            "+@connection",
        ]);
        if scripting {
            args.push("+@scripting");
        }
        let redis = &redis;
        async move { assert_eq!(redis.cli(&args).await, "OK") }
    };
    grant("sluicegate", true).await;
    grant("noscripts", false).await;

    // Only its own keys and channels, and scripting: everything works.
    let url = format!("redis://sluicegate:pw@127.0.0.1:{}", redis.port);
    let a = crate::replicas::instance_at(&url, &[]).await;
    let b = crate::replicas::instance_at(&url, &[]).await;
    for p in [&a, &b] {
        until(Duration::from_secs(10), || crate::replicas::redis_ok(p)).await;
    }
    let text = words(20);
    let resp = open(&a.url("/v1/chat/completions"), &text, None, None).await;
    let id = completion_id(&resp);
    assert_eq!(read_all(resp).await.text, text);
    let replay = client()
        .get(b.url(&format!("/v1/chat/completions/{id}/events")))
        .send()
        .await
        .expect("sent");
    assert_eq!(read_all(replay).await.text, text);

    // Without scripting: a clear error at start-up, not a server that
    // silently shares nothing.
    let bad = format!("redis://noscripts:pw@127.0.0.1:{}", redis.port);
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_sluicegate"))
            .args(["--backend", "echo", "--port", "0", "--redis", &bad])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("it stops")
    .expect("it runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("may not") && stderr.contains("+@scripting"),
        "{stderr}"
    );
}

#[tokio::test]
async fn replicas_reach_a_redis_over_tls_with_a_ca_of_their_own() {
    // A CA of the test's own, and a server certificate it signs.
    let ca_key = rcgen::KeyPair::generate().expect("a key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("a CA");
    let server_key = rcgen::KeyPair::generate().expect("a key");
    let server =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("params")
            .signed_by(&server_key, &ca)
            .expect("a certificate");
    let dir = std::env::temp_dir().join(format!("sluicegate-redis-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a dir");
    let file = |name: &str, pem: String| {
        let path = dir.join(name);
        std::fs::write(&path, pem).expect("written");
        path.display().to_string()
    };
    let (ca_file, cert_file, key_file) = (
        file("ca.pem", ca.pem()),
        file("server.pem", server.pem()),
        file("server.key", server_key.serialize_pem()),
    );
    let port = crate::services::free_port();
    let _redis = tokio::process::Command::new("redis-server")
        .args([
            "--bind",
            "127.0.0.1",
            "--port",
            "0",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--tls-port", &port.to_string(), "--tls-auth-clients", "no"])
        .args(["--tls-cert-file", &cert_file, "--tls-key-file", &key_file])
        .args(["--tls-ca-cert-file", &ca_file])
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server runs (run scripts/setup-services)");
    let url = format!("rediss://127.0.0.1:{port}");
    until(Duration::from_secs(10), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    let a = crate::replicas::instance_at(&url, &["--redis-ca", &ca_file]).await;
    let b = crate::replicas::instance_at(&url, &["--redis-ca", &ca_file]).await;
    for p in [&a, &b] {
        until(Duration::from_secs(10), || crate::replicas::redis_ok(p)).await;
    }
    let text = words(20);
    let resp = open(&a.url("/v1/chat/completions"), &text, None, None).await;
    let id = completion_id(&resp);
    assert_eq!(read_all(resp).await.text, text);
    let replay = client()
        .get(b.url(&format!("/v1/chat/completions/{id}/events")))
        .send()
        .await
        .expect("sent");
    assert_eq!(read_all(replay).await.text, text, "shared over TLS");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn when_redis_evicts_under_maxmemory_streams_still_end_properly_and_keys_expire() {
    let cluster = Cluster::start(&[]).await;
    let redis = &cluster.redis;
    for setting in [["maxmemory", "2mb"], ["maxmemory-policy", "allkeys-lru"]] {
        assert_eq!(
            redis.cli(&["CONFIG", "SET", setting[0], setting[1]]).await,
            "OK"
        );
    }
    // Forty answers of 200 words, their logs more than Redis may hold,
    // each read on its owner and followed on the other instance.
    let clients: Vec<_> = (0..40)
        .map(|i| {
            let (a, b) = (cluster.a.base.clone(), cluster.b.base.clone());
            tokio::spawn(async move {
                let text = format!("e{i} {}", words(200));
                let owned = open(&format!("{a}/v1/chat/completions"), &text, None, None).await;
                let id = completion_id(&owned);
                let follow = client()
                    .get(format!("{b}/v1/chat/completions/{id}/events"))
                    .send()
                    .await
                    .expect("sent");
                let owned = rest(Events::of(owned)).await;
                let followed = match follow.status().as_u16() {
                    200 => Some(rest(Events::of(follow)).await),
                    // Evicted before the reader came: unknown, as after its TTL.
                    404 => None,
                    other => panic!("{other}"),
                };
                (text, owned, followed)
            })
        })
        .collect();
    let mut evicted_readers = 0;
    for client in clients {
        let (text, owned, followed) = client.await.expect("a client");
        assert_eq!(owned.text, text, "the owner's client is untouched");
        assert!(owned.done);
        let Some(followed) = followed else {
            evicted_readers += 1;
            continue;
        };
        assert!(followed.done, "every stream ends with [DONE]");
        assert_no_repeat(&followed.ids);
        if followed.finish_reason.as_deref() == Some("stop") {
            assert_eq!(followed.text, text);
        } else {
            // What was evicted under a reader ends its stream with an error.
            let last = followed.chunks.last().expect("an error event");
            assert!(last.get("error").is_some(), "{last}");
            evicted_readers += 1;
        }
    }
    let evicted: u64 = redis
        .cli(&["INFO", "stats"])
        .await
        .lines()
        .find_map(|l| l.strip_prefix("evicted_keys:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("evicted_keys");
    assert!(evicted > 0, "Redis evicted keys under this load");
    eprintln!("{evicted} keys evicted; {evicted_readers} readers met an eviction");
    every_key_expires(redis).await;
}
