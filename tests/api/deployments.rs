//! Replicas on the Redis deployments people run besides one server: a
//! Cluster of three masters, and a primary watched by Sentinel that fails
//! over mid-stream. Both are real redis-server processes on free loopback
//! ports; each test asserts what clients see and what Redis holds.

use std::time::Duration;

use crate::common::{Events, client, completion_id, read_all};
use crate::process::{Process, sample};
use crate::replicas::{
    assert_no_repeat, cancel_on, instance_at, metrics, next_question_replaces, open,
    owned_here_followed_there, raw_body, redis_ok, rest, rest_within, words,
};
use crate::services::{RedisCluster, SentinelSet, cli_at, every_key_expires_at, until};

async fn pair_on(url: &str, extra: &[&str]) -> (Process, Process) {
    let (a, b) = tokio::join!(instance_at(url, extra), instance_at(url, extra));
    for p in [&a, &b] {
        until(Duration::from_secs(20), || redis_ok(p)).await;
    }
    (a, b)
}

/// Polls until `p` replays generation `id` and its raw body passes `fits`.
async fn until_replayed(p: &Process, id: &str, fits: impl Fn(&str) -> bool) {
    until(Duration::from_secs(10), || async {
        let replay = client()
            .get(p.url(&format!("/v1/chat/completions/{id}/events")))
            .send()
            .await
            .expect("sent");
        replay.status() == 200 && fits(&raw_body(replay).await)
    })
    .await;
}

/// The event ids of a raw SSE body, in order.
fn event_ids(raw: &str) -> Vec<String> {
    raw.lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn a_redis_cluster_shares_generations_sessions_and_cancels_through_sharded_channels() {
    let redis = RedisCluster::start().await;
    let (a, b) = pair_on(&redis.url(), &[]).await;

    // Several generations, so that their keys land on different masters;
    // each is followed on the other instance to its end.
    for n in 0..6 {
        let text = words(20 + n);
        let (id, owned, follow) = owned_here_followed_there(&a, &b, &text, None, 1).await;
        let (owned, follow) = tokio::join!(rest(owned), rest(follow));
        assert_eq!(owned.text, text);
        assert!(owned.done && follow.done);
        assert_no_repeat(&follow.ids);
        assert!(owned.ids.ends_with(&follow.ids), "{id}: the same events");
        let replay = client()
            .get(b.url(&format!("/v1/chat/completions/{id}/events")))
            .send()
            .await
            .expect("sent");
        assert_eq!(read_all(replay).await.text, text, "{id} replayed elsewhere");
    }

    // Short answers written whole at once (no token delay), on masters
    // of their own slots, replayed elsewhere byte for byte.
    let fast = instance_at(&redis.url(), &["--token-delay", "0ms"]).await;
    until(Duration::from_secs(20), || redis_ok(&fast)).await;
    for n in 0..6 {
        let text = format!("short answer {n}");
        let resp = open(&fast.url("/v1/chat/completions"), &text, None, None).await;
        let id = completion_id(&resp);
        let owned = raw_body(resp).await;
        until_replayed(&b, &id, |raw| raw == owned).await;
    }
    let errors = sample(&metrics(&fast).await, "sluicegate_redis_errors_total", &[]);
    assert_eq!(errors, 0.0, "each one written whole on its first try");

    // A reader elsewhere listens on the generation's sharded channel, in
    // its slot.
    let (id, owned, follow) = owned_here_followed_there(&a, &b, &words(400), Some("conv"), 1).await;
    let channel = format!("sg:{{{id}}}:ev");
    until(Duration::from_secs(10), || async {
        for port in &redis.ports {
            if cli_at(*port, &["PUBSUB", "SHARDCHANNELS"])
                .await
                .contains(&channel)
            {
                return true;
            }
        }
        false
    })
    .await;

    // The session route and the cancel endpoint from the other instance.
    let session = client()
        .get(b.url("/v1/sessions/conv/stream"))
        .send()
        .await
        .expect("sent");
    assert_eq!(session.status(), 200);
    assert_eq!(completion_id(&session), id);
    drop(session);
    let cancelled = cancel_on(&b, &id).await;
    assert_eq!(cancelled["cancelled"], true, "{cancelled}");
    let (owned, follow) = tokio::join!(rest(owned), rest(follow));
    for t in [&owned, &follow] {
        assert_eq!(t.finish_reason.as_deref(), Some("cancelled"));
        assert!(t.done);
    }
    let again = cancel_on(&b, &id).await;
    assert_eq!(again["cancelled"], false, "{again}");

    // The next request of a session on one instance ends the one running
    // on the other (its session key and its record sit in other slots).
    let old = open(
        &a.url("/v1/chat/completions"),
        &words(400),
        Some("conv2"),
        None,
    )
    .await;
    let mut old = Events::of(old);
    old.next_json().await;
    next_question_replaces(&b, "conv2", old).await;

    // The keys are spread over the masters, and every one expires.
    let mut holding = 0;
    for port in &redis.ports {
        if every_key_expires_at(*port).await > 0 {
            holding += 1;
        }
    }
    assert!(holding >= 2, "keys on {holding} of 3 masters");
}

/// How the primary is lost mid-stream.
enum Failover {
    /// `SENTINEL FAILOVER`: the primary hands over and becomes a replica.
    Asked,
    /// SIGKILL: the sentinel finds it down and promotes the replica; what
    /// the replica had not copied yet is gone, and the instances write it
    /// back.
    PrimaryKilled,
}

#[tokio::test]
async fn a_sentinel_failover_mid_stream_loses_and_repeats_nothing() {
    failover_mid_stream(Failover::Asked).await;
}

#[tokio::test]
async fn a_killed_primary_under_sentinel_mid_stream_loses_and_repeats_nothing() {
    failover_mid_stream(Failover::PrimaryKilled).await;
}

async fn failover_mid_stream(how: Failover) {
    let mut redis = SentinelSet::start().await;
    // Readers wait two leases for Redis. A killed primary is first found
    // down (after 1 s here) and then replaced, in a few seconds: leases of
    // 15 s leave the readers far more patience than that takes.
    let lease = match how {
        Failover::Asked => "1s",
        Failover::PrimaryKilled => "15s",
    };
    let (a, b) = pair_on(&redis.url(), &["--redis-lease", lease]).await;
    // 30 s of answer (30 ms a token): room for the sentinel's wait for a
    // fresh look at its replica (up to 10 s) and the failover itself,
    // however busy the machine, so that it comes mid-stream.
    let text = words(1000);
    let (id, owned, mut follow) = owned_here_followed_there(&a, &b, &text, None, 0).await;
    follow.next_json().await;

    match how {
        // A sentinel takes a replica for fit only while its last look at
        // it (every 10 s) is fresh: asked in between, it says NOGOODSLAVE.
        Failover::Asked => {
            until(Duration::from_secs(20), || async {
                cli_at(redis.sentinel, &["SENTINEL", "FAILOVER", "mymaster"]).await == "OK"
            })
            .await;
        }
        Failover::PrimaryKilled => redis.kill_primary().await,
    }
    until(Duration::from_secs(25), || async {
        redis.named_primary().await == redis.replica
    })
    .await;
    // Still mid-stream: the reader elsewhere gets a content event next.
    let next = follow.next_json().await;
    assert!(
        next["choices"][0]["delta"]["content"].is_string(),
        "the failover came mid-stream: {next}"
    );

    let limit = Duration::from_secs(60);
    let (owned, follow) = tokio::join!(rest_within(owned, limit), rest_within(follow, limit));
    assert_eq!(owned.text, text, "the owner's client got the whole answer");
    assert_eq!(owned.finish_reason.as_deref(), Some("stop"));
    assert!(owned.done && follow.done);
    assert_eq!(follow.finish_reason.as_deref(), Some("stop"));
    assert_no_repeat(&follow.ids);
    assert!(
        owned.ids.ends_with(&follow.ids),
        "the reader elsewhere got the same events"
    );

    // The new primary holds the whole log: replayed on the other
    // instance, once, in order.
    until_replayed(&b, &id, |raw| event_ids(raw) == owned.ids).await;

    // Work goes on after the failover, across instances.
    let after = words(15);
    let (id, owned, follow) = owned_here_followed_there(&a, &b, &after, None, 0).await;
    let (owned, follow) = tokio::join!(rest(owned), rest(follow));
    assert_eq!(owned.text, after);
    assert!(owned.ids.ends_with(&follow.ids), "{id}");
    let role = cli_at(redis.replica, &["ROLE"]).await;
    assert!(role.starts_with("master"), "{role}");
    if let Failover::Asked = how {
        until(Duration::from_secs(10), || async {
            cli_at(redis.primary, &["ROLE"]).await.starts_with("slave")
        })
        .await;
    }
    assert!(every_key_expires_at(redis.replica).await > 0);
}

/// The master (an index into `redis.ports`) that serves `key`: the others
/// answer `MOVED`.
async fn master_of(redis: &RedisCluster, key: &str) -> usize {
    for (at, port) in redis.ports.iter().enumerate() {
        if matches!(cli_at(*port, &["EXISTS", key]).await.as_str(), "0" | "1") {
            return at;
        }
    }
    panic!("no master serves {key}");
}

#[tokio::test]
async fn a_cluster_master_restarted_empty_gets_back_what_the_owner_retains() {
    let mut redis = RedisCluster::start().await;
    let (a, b) = pair_on(&redis.url(), &["--token-delay", "0ms"]).await;
    // Finished answers, each replayed elsewhere, and the master of each.
    let mut answers = Vec::new();
    for n in 0..12 {
        let text = format!("kept answer {n}");
        let resp = open(&a.url("/v1/chat/completions"), &text, None, None).await;
        let id = completion_id(&resp);
        let owned = raw_body(resp).await;
        until_replayed(&b, &id, |raw| raw == owned).await;
        let master = master_of(&redis, &format!("sg:{{{id}}}:m")).await;
        answers.push((id, owned, master));
    }
    // A master other than the one that would hold a single marker of the
    // owner's: the restart of that one alone is what one marker misses.
    let (first, _, first_master) = &answers[0];
    let owner = cli_at(
        redis.ports[*first_master],
        &["HGET", &format!("sg:{{{first}}}:m"), "inst"],
    )
    .await;
    assert!(owner.starts_with("i-"), "{owner}");
    let single = master_of(&redis, &format!("sg:inst:{{{owner}}}")).await;
    let restarted = (0..3)
        .find(|m| *m != single && answers.iter().any(|(_, _, at)| at == m))
        .expect("an answer on another master");
    redis.restart_empty(restarted).await;

    // The owner finds its marker there gone and writes back what it holds:
    // the other instance replays each answer byte for byte again.
    for (id, owned, _) in answers.iter().filter(|(_, _, at)| *at == restarted) {
        until_replayed(&b, id, |raw| raw == owned).await;
    }
    for port in &redis.ports {
        every_key_expires_at(*port).await;
    }
}
