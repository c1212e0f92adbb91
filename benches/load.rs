//! Load harness: starts the real binary on the echo backend and prints
//! figures (nothing asserted). `cargo bench --bench load`.
//!
//! - server CPU per streamed token, and tokens/s across concurrent streams;
//! - RSS per open slow stream, 1,000 at once;
//! - a session's new request to the old stream's `[DONE]`, p50/p99;
//! - memory per retained 500-token generation, and a 1,000-event replay;
//! - the openai backend's added first-token latency and CPU per relayed
//!   token, against the upstream alone and beside nginx as a byte proxy;
//! - token gaps with 200 to 4,000 streams over HTTP/2;
//! - server CPU per streamed token on `/v1/responses` and `/v1/messages`
//!   against `/v1/chat/completions`.

#![allow(clippy::expect_used)] // a harness that cannot measure should stop loudly

mod support;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use support::{Server, chat, client, stream_count, words};

async fn throughput() {
    let server = Server::start(&["--max-queue", "1024"]).await;
    let url = format!("{}/v1/chat/completions", server.base);
    let body = chat(&words(5_000));
    let concurrency = 32;
    let clients: Vec<_> = (0..concurrency).map(|_| client()).collect();
    let cpu_before = server.cpu_seconds();
    let (tokens, wall) =
        support::stream_load(&clients, &url, &body, concurrency, Duration::from_secs(6)).await;
    let cpu = server.cpu_seconds() - cpu_before;
    println!(
        "throughput: {concurrency} concurrent streams, {tokens} tokens in {wall:.2} s = {:.0} tokens/s (client on the same 2 cores); server CPU {:.2} us/token",
        tokens as f64 / wall,
        cpu * 1e6 / tokens as f64
    );
}

/// Server CPU per streamed token on each dialect's route, the same echo
/// answer through the same log (events other than tokens are a dozen of
/// 5,000).
async fn dialects() {
    let server = Server::start(&["--max-queue", "1024"]).await;
    let text = words(5_000);
    let routes = [
        ("/v1/chat/completions", chat(&text)),
        (
            "/v1/responses",
            serde_json::json!({"model": "echo", "stream": true, "store": false, "input": text}),
        ),
        (
            "/v1/messages",
            serde_json::json!({"model": "echo", "stream": true, "max_tokens": 10_000,
                "messages": [{"role": "user", "content": text}]}),
        ),
    ];
    let concurrency = 32;
    let clients: Vec<_> = (0..concurrency).map(|_| client()).collect();
    let mut chat_cpu = None;
    for (route, body) in routes {
        let url = format!("{}{route}", server.base);
        let cpu_before = server.cpu_seconds();
        let (tokens, wall) =
            support::stream_load(&clients, &url, &body, concurrency, Duration::from_secs(5)).await;
        let cpu = (server.cpu_seconds() - cpu_before) * 1e6 / tokens as f64;
        let base = *chat_cpu.get_or_insert(cpu);
        println!(
            "dialects: {route}: {:.0} tokens/s, server CPU {cpu:.2} us/token ({:.2}x chat completions)",
            tokens as f64 / wall,
            cpu / base
        );
    }
}

/// Server RSS in KiB before and after holding `n` of what `open` opens,
/// after a warm-up of 20 so that one-time allocations do not count.
async fn rss_around<T, Fut>(server: &Server, n: usize, open: impl Fn(usize) -> Fut) -> (u64, u64)
where
    Fut: std::future::Future<Output = Vec<T>>,
{
    let warm = open(20).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = server.rss_kib();
    let held = open(n).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = server.rss_kib();
    drop((warm, held));
    (before, after)
}

fn kb_each(before: u64, after: u64, n: usize) -> f64 {
    after.saturating_sub(before) as f64 * 1024.0 / 1000.0 / n as f64
}

async fn slow_streams_memory() {
    let server = Server::start(&["--token-delay", "60s", "--max-queue", "4096"]).await;
    let url = format!("{}/v1/chat/completions", server.base);
    let open = |n: usize| {
        let url = url.clone();
        async move {
            let mut held = Vec::with_capacity(n);
            for _ in 0..n {
                let client = client();
                let resp = client
                    .post(&url)
                    .json(&chat("a b c"))
                    .send()
                    .await
                    .expect("sent");
                let mut body = resp.bytes_stream();
                body.next().await.expect("role chunk").expect("chunk");
                held.push((client, body));
            }
            held
        }
    };
    let n = 1_000;
    let (before, after) = rss_around(&server, n, open).await;
    println!(
        "slow streams: {n} open at once, server RSS {before} KiB -> {after} KiB = {:.1} KB per stream",
        kb_each(before, after, n)
    );
}

/// 1,000 slow streams over 6 HTTP/2 connections (under hyper's cap of 200
/// concurrent streams per connection), which separates what a stream costs
/// from what a connection costs.
async fn slow_streams_memory_h2() {
    let server = Server::start(&["--token-delay", "60s", "--max-queue", "4096"]).await;
    let url = format!("{}/v1/chat/completions", server.base);
    let connections = h2_connections(6);
    let n = 1_000;
    let (before, after) = rss_around(&server, n, |n| hold_streams(&connections, &url, n)).await;
    println!(
        "slow streams over HTTP/2, 6 connections: {n} open, server RSS {before} KiB -> {after} KiB = {:.1} KB per stream",
        kb_each(before, after, n)
    );
}

/// `n` HTTP/2 client connections (prior knowledge).
fn h2_connections(n: usize) -> Vec<reqwest::Client> {
    (0..n)
        .map(|_| {
            reqwest::Client::builder()
                .http2_prior_knowledge()
                .build()
                .expect("client")
        })
        .collect()
}

/// Opens `n` streams at `url` spread over `connections`, all at once, and
/// holds each once its first chunk came.
async fn hold_streams(
    connections: &[reqwest::Client],
    url: &str,
    n: usize,
) -> Vec<impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + use<>> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (h2, url) = (connections[i % connections.len()].clone(), url.to_owned());
            tokio::spawn(async move {
                let resp = h2
                    .post(&url)
                    .json(&chat("a b c"))
                    .send()
                    .await
                    .expect("sent");
                let mut body = resp.bytes_stream();
                body.next().await.expect("role chunk").expect("chunk");
                body
            })
        })
        .collect();
    let mut held = Vec::with_capacity(n);
    for t in tasks {
        held.push(t.await.expect("joined"));
    }
    held
}

/// Idle keep-alive HTTP/1.1 connections after one request each: the floor
/// under the per-stream figure.
async fn idle_connections_memory() {
    let server = Server::start(&[]).await;
    let url = format!("{}/health", server.base);
    let open = |n: usize| {
        let url = url.clone();
        async move {
            let mut held = Vec::with_capacity(n);
            for _ in 0..n {
                let client = client();
                client
                    .get(&url)
                    .send()
                    .await
                    .expect("sent")
                    .bytes()
                    .await
                    .expect("body");
                held.push(client);
            }
            held
        }
    };
    let n = 1_000;
    let (before, after) = rss_around(&server, n, open).await;
    println!(
        "idle HTTP/1.1 connections: {n} open, server RSS {before} KiB -> {after} KiB = {:.1} KB per connection",
        kb_each(before, after, n)
    );
}

async fn cancel_previous_latency() {
    let server = Server::start(&["--token-delay", "10s"]).await;
    let url = format!("{}/v1/chat/completions", server.base);
    let samples = support::cancel_previous(&url, &url, 300, 0).await;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "cancel-previous: new request -> old stream's [DONE] over {} runs: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        samples.len(),
        ms(support::quantile(&samples, 0.5)),
        ms(support::quantile(&samples, 0.99)),
        ms(*samples.last().expect("samples"))
    );
}

async fn retained_generations() {
    let server = Server::start(&["--resume-ttl", "10m", "--resume-budget", "1000000000"]).await;
    let url = format!("{}/v1/chat/completions", server.base);
    let client = client();
    let body = chat(&words(500));
    for _ in 0..10 {
        stream_count(&client, &url, &body).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = server.rss_kib();
    let n = 400;
    let mut last_id = String::new();
    for _ in 0..n {
        let resp = client.post(&url).json(&body).send().await.expect("sent");
        last_id = resp.headers()["x-completion-id"]
            .to_str()
            .expect("id")
            .to_owned();
        resp.bytes().await.expect("body");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = server.rss_kib();
    let counted = support::metric(&server, "sluicegate_retained_bytes").await;
    let kept = support::metric(&server, "sluicegate_retained_generations").await;
    println!(
        "retention: {n} finished 500-token generations kept, server RSS +{} KiB = {:.1} KB per generation; the budget counts {:.1} KB each",
        after.saturating_sub(before),
        (after.saturating_sub(before)) as f64 * 1024.0 / 1000.0 / n as f64,
        counted / kept / 1000.0
    );
    tiny_generations(&server).await;

    // A full replay of a 1,000-event generation over HTTP.
    let resp = client
        .post(&url)
        .json(&chat(&words(997)))
        .send()
        .await
        .expect("sent");
    let id = resp.headers()["x-completion-id"]
        .to_str()
        .expect("id")
        .to_owned();
    let bytes = resp.bytes().await.expect("body").len();
    let events_url = format!("{}/v1/chat/completions/{id}/events", server.base);
    let runs = 200;
    let started = Instant::now();
    for _ in 0..runs {
        let replay = client
            .get(&events_url)
            .send()
            .await
            .expect("sent")
            .bytes()
            .await
            .expect("body");
        assert_eq!(replay.len(), bytes);
    }
    println!(
        "replay: 1,000 events ({:.0} KB) replayed over HTTP/1.1 loopback in {:.3} ms each (mean of {runs}); last id {last_id}",
        bytes as f64 / 1000.0,
        started.elapsed().as_secs_f64() * 1e3 / runs as f64
    );
}

/// Many one-token generations, the case where the records, not the
/// events, are most of what is held: RSS against what the budget counts.
async fn tiny_generations(server: &Server) {
    let url = format!("{}/v1/chat/completions", server.base);
    let client = client();
    let body = chat("one");
    let counted_before = support::metric(server, "sluicegate_retained_bytes").await;
    let before = server.rss_kib();
    let n = 20_000;
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (client, url, body) = (client.clone(), url.clone(), body.clone());
            tokio::spawn(async move {
                for _ in 0..n / 8 {
                    stream_count(&client, &url, &body).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("joined");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = server.rss_kib();
    let counted = support::metric(server, "sluicegate_retained_bytes").await - counted_before;
    println!(
        "retention: {n} one-token generations, server RSS +{} KiB = {:.2} KB each; the budget counts {:.2} KB each",
        after.saturating_sub(before),
        after.saturating_sub(before) as f64 * 1024.0 / 1000.0 / n as f64,
        counted / 1000.0 / n as f64
    );
}

/// Time from sending a request to its first content token, per request.
async fn first_token_times(url: &str, runs: usize) -> Vec<Duration> {
    let client = client();
    let body = chat("first second third");
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        let resp = client.post(url).json(&body).send().await.expect("sent");
        let mut stream = resp.bytes_stream();
        let mut seen = Vec::new();
        while let Some(chunk) = stream.next().await {
            seen.extend_from_slice(&chunk.expect("chunk"));
            let needle = b"\"content\":\"first";
            if seen.windows(needle.len()).any(|w| w == needle) {
                times.push(started.elapsed());
                break;
            }
        }
        while stream.next().await.is_some() {}
    }
    times.sort();
    times
}

/// sluicegate on the openai backend in front of another on echo, against
/// the upstream alone.
async fn relay() {
    let upstream = Server::start(&[]).await;
    let relay = Server::spawn(&["--backend", "openai", "--upstream", &upstream.base]).await;
    let direct_url = format!("{}/v1/chat/completions", upstream.base);
    let relay_url = format!("{}/v1/chat/completions", relay.base);
    first_token_times(&relay_url, 20).await;
    let runs = 300;
    let direct = first_token_times(&direct_url, runs).await;
    let relayed = first_token_times(&relay_url, runs).await;
    let p50 = |t: &[Duration]| t[t.len() / 2].as_secs_f64() * 1e3;
    let p99 = |t: &[Duration]| t[t.len() * 99 / 100].as_secs_f64() * 1e3;
    println!(
        "relay first token over {runs} requests: direct p50 {:.2} ms p99 {:.2} ms; relayed p50 {:.2} ms p99 {:.2} ms; added p50 {:.2} ms",
        p50(&direct),
        p99(&direct),
        p50(&relayed),
        p99(&relayed),
        p50(&relayed) - p50(&direct)
    );

    let body = chat(&words(5_000));
    let client = client();
    let cpu_before = relay.cpu_seconds();
    let started = Instant::now();
    let mut tokens = 0;
    while started.elapsed() < Duration::from_secs(4) {
        tokens += stream_count(&client, &relay_url, &body).await - 3;
    }
    let cpu = relay.cpu_seconds() - cpu_before;
    println!(
        "relay cost: {tokens} tokens relayed, relay process CPU {:.2} us/token",
        cpu * 1e6 / tokens as f64
    );
}

/// Relay memory per open stream: `n` slow streams held open through a
/// relay (clients over 50 HTTP/2 connections, the relay to its upstream
/// over HTTP/1.1 keep-alive, one connection per open stream).
async fn relay_memory() {
    let upstream = Server::start(&["--token-delay", "60s", "--max-queue", "20000"]).await;
    let relay = Server::spawn(&[
        "--backend",
        "openai",
        "--upstream",
        &upstream.base,
        "--max-queue",
        "20000",
    ])
    .await;
    let url = format!("{}/v1/chat/completions", relay.base);
    let connections = h2_connections(50);
    let open = |n: usize| hold_streams(&connections, &url, n);
    let n = 10_000;
    let (before, after) = rss_around(&relay, n, open).await;
    println!(
        "relay memory: {n} slow streams open through the relay, relay RSS {before} KiB -> {after} KiB = {:.1} KB per stream",
        kb_each(before, after, n)
    );
}

/// The load: 50 streams of 100-token answers at once, straight to
/// an echo upstream and then through a relay in front of it (over HTTP/1.1
/// and over HTTP/2), side by side: throughput, and CPU per token of the
/// relay, the upstream and this client. The anchor is nginx in front of
/// the same upstream, as the tests run it (`deploy/nginx.conf`, one
/// process): a proxy that moves the bytes as they are and parses none.
///
/// The three processes share the cores, so tokens/s is about the cores
/// over the CPU all of them spend on a token: relayed over direct is
/// (E + C) / (E + C + R), for the upstream's E, the client's C and the
/// relay's R. The direct run prints the R that a ratio of 0.6 allows.
async fn relay_load() {
    let upstream = Server::start(&["--max-queue", "1024"]).await;
    let direct = relay_run(&upstream, None).await;
    println!(
        "relay load, 50 streams of 100-token answers: direct {:.0} tokens/s, upstream CPU {:.2} us/token, client CPU {:.2} us/token (0.6x leaves a relay {:.2} us/token)",
        direct.rate,
        direct.upstream,
        direct.client,
        (direct.upstream + direct.client) * 2.0 / 3.0
    );
    for (how, extra) in [
        ("over HTTP/1.1", None),
        ("with --upstream-http2", Some("--upstream-http2")),
    ] {
        let mut args = vec![
            "--backend",
            "openai",
            "--upstream",
            &upstream.base,
            "--max-queue",
            "1024",
        ];
        args.extend(extra);
        let relay = Server::spawn(&args).await;
        let cpu = || relay.cpu_seconds();
        let run = relay_run(&upstream, Some((&relay.base, &cpu))).await;
        println!(
            "relay load {how}: relayed {:.0} tokens/s ({:.2}x), relay CPU {:.2} us/token, upstream CPU {:.2} us/token, client CPU {:.2} us/token",
            run.rate,
            run.rate / direct.rate,
            run.relay,
            run.upstream,
            run.client
        );
    }
    let nginx = support::services::Nginx::start(&[&upstream.base]).await;
    let cpu = || support::cpu_seconds_of(nginx.child.id().expect("nginx runs"));
    let run = relay_run(&upstream, Some((&nginx.base, &cpu))).await;
    println!(
        "relay load through nginx (anchor: moves bytes, parses none): {:.0} tokens/s ({:.2}x), nginx CPU {:.2} us/token, upstream CPU {:.2} us/token, client CPU {:.2} us/token",
        run.rate,
        run.rate / direct.rate,
        run.relay,
        run.upstream,
        run.client
    );
}

/// One run of [`relay_run`]: tokens/s, and CPU per token.
struct RelayRun {
    rate: f64,
    upstream: f64,
    relay: f64,
    client: f64,
}

/// 50 streams of 100-token answers for 6 s, through `relay` (its base URL
/// and its CPU seconds so far) if given, else straight to `upstream`.
async fn relay_run(upstream: &Server, relay: Option<(&str, &dyn Fn() -> f64)>) -> RelayRun {
    let base = relay.map_or(upstream.base.as_str(), |(base, _)| base);
    let clients: Vec<_> = (0..50).map(|_| client()).collect();
    let relay_cpu = || relay.map_or(0.0, |(_, cpu)| cpu());
    let client_cpu = || support::cpu_seconds_of(std::process::id());
    let before = (upstream.cpu_seconds(), relay_cpu(), client_cpu());
    let (tokens, wall) = support::stream_load(
        &clients,
        &format!("{base}/v1/chat/completions"),
        &chat(&words(100)),
        50,
        Duration::from_secs(6),
    )
    .await;
    let per_token = |cpu: f64| cpu * 1e6 / tokens as f64;
    RelayRun {
        rate: tokens as f64 / wall,
        upstream: per_token(upstream.cpu_seconds() - before.0),
        relay: per_token(relay_cpu() - before.1),
        client: per_token(client_cpu() - before.2),
    }
}

/// Many streams at 10 tokens/s each over HTTP/2 (200 per connection, the
/// cap hyper sets): how far token gaps stray from the 100 ms the model
/// keeps, as the count grows.
async fn scale() {
    let server = Server::start(&["--token-delay", "100ms", "--max-queue", "100000"]).await;
    let url = format!("{}/v1/chat/completions", server.base);
    let body = chat("a b c d e f g h i j");
    for n in [200usize, 1_000, 4_000] {
        let connections: Vec<reqwest::Client> = (0..n.div_ceil(200))
            .map(|_| {
                reqwest::Client::builder()
                    .http2_prior_knowledge()
                    .build()
                    .expect("client")
            })
            .collect();
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let client = connections[i / 200].clone();
                let (url, body) = (url.clone(), body.clone());
                tokio::spawn(async move {
                    let resp = client.post(&url).json(&body).send().await.expect("sent");
                    support::token_gaps(resp).await.0
                })
            })
            .collect();
        let mut gaps = Vec::new();
        for task in tasks {
            gaps.extend(task.await.expect("joined"));
        }
        gaps.sort();
        let at = |p: f64| {
            gaps[((gaps.len() as f64 * p) as usize).min(gaps.len() - 1)].as_secs_f64() * 1e3
        };
        println!(
            "scale: {n} streams over {} HTTP/2 connections, 10 tokens/s each: token gap p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (ideal 100)",
            connections.len(),
            at(0.5),
            at(0.99),
            gaps.last().expect("gaps").as_secs_f64() * 1e3
        );
    }
}

/// Tokens/s and server CPU per token with `streams` in flight, each
/// answer `words` long, for `run_for`, over 8 HTTP/2 connections.
async fn short_answers(
    server: &Server,
    streams: usize,
    words_each: usize,
    run_for: Duration,
) -> (f64, f64) {
    let url = format!("{}/v1/chat/completions", server.base);
    let body = chat(&words(words_each));
    let connections: Vec<reqwest::Client> = (0..8)
        .map(|_| {
            reqwest::Client::builder()
                .http2_prior_knowledge()
                .build()
                .expect("client")
        })
        .collect();
    let cpu_before = server.cpu_seconds();
    let (tokens, wall) = support::stream_load(&connections, &url, &body, streams, run_for).await;
    let cpu = server.cpu_seconds() - cpu_before;
    (tokens as f64 / wall, cpu * 1e6 / tokens as f64)
}

/// The core at 1 and 2 runtime worker threads: 100-token answers with 256
/// in flight (many generations start and finish, so retention and the
/// registry are on the path), against long streams.
async fn workers() {
    for threads in ["1", "2"] {
        let server = Server::start(&["--worker-threads", threads, "--max-queue", "4096"]).await;
        let run_for = Duration::from_secs(6);
        let (short_rate, short_cpu) = short_answers(&server, 256, 100, run_for).await;
        let (long_rate, long_cpu) = short_answers(&server, 32, 5_000, run_for).await;
        println!(
            "workers {threads}: 100-token answers, 256 in flight: {short_rate:.0} tokens/s, CPU {short_cpu:.2} us/token; 5,000-token streams, 32 in flight: {long_rate:.0} tokens/s, CPU {long_cpu:.2} us/token (short/long {:.2}x)",
            short_cpu / long_cpu
        );
    }
}

#[tokio::main]
async fn main() {
    // reqwest is built without a bundled TLS provider.
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    // `cargo bench` passes --bench; a filter picks scenarios by name.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wanted = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    if wanted("dialects") {
        dialects().await;
    }
    if wanted("throughput") {
        throughput().await;
    }
    if wanted("memory") {
        slow_streams_memory().await;
        slow_streams_memory_h2().await;
        idle_connections_memory().await;
    }
    if wanted("cancel") {
        cancel_previous_latency().await;
    }
    if wanted("retention") {
        retained_generations().await;
    }
    if wanted("relay_memory") {
        relay_memory().await;
    }
    if wanted("relay_load") {
        relay_load().await;
    }
    if wanted("relay") {
        relay().await;
    }
    if wanted("scale") {
        scale().await;
    }
    if wanted("workers") {
        workers().await;
    }
}
