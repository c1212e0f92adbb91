//! Replicas against the in-process state, in one run: the binary on the
//! echo backend, a real `redis-server` on a free port (Debian's package,
//! scripts/setup-services), figures printed, nothing asserted.
//! `cargo bench --bench replicas [scenario]`.
//!
//! - server CPU per streamed token, 32 streams, with and without `--redis`
//!   (and Redis's own CPU);
//! - Redis commands and stream entries per streamed token;
//! - request to first byte of a new stream, with and without `--redis`;
//! - a resume on another instance: request to first replayed byte;
//! - a Responses API `starting_after` resume, request to first replayed
//!   byte, on the owner and on another instance;
//! - cancel-previous across instances: request to the old stream's `[DONE]`;
//! - Redis memory per retained 500-token generation;
//! - 1,000 concurrent streams over two instances.

#![allow(clippy::expect_used)] // a harness that cannot measure should stop loudly

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use support::{Server, chat, client, cpu_seconds_of, quantile, stream_count, words};
use tokio::process::{Child, Command};

struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--port", &port.to_string()])
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server (run scripts/setup-services)");
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self { child, port }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn cpu_seconds(&self) -> f64 {
        cpu_seconds_of(self.child.id().expect("running"))
    }

    /// Calls of every command so far, and of `XADD` (one per stream
    /// entry), scripts' own calls included.
    async fn command_calls(&self) -> (u64, u64) {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "INFO", "commandstats"])
            .output()
            .await
            .expect("redis-cli");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let calls = |line: &str| {
            line.split_once("calls=")
                .and_then(|(_, rest)| rest.split(',').next())
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let all = text
            .lines()
            // Not the bench's own INFO calls.
            .filter(|l| l.starts_with("cmdstat_") && !l.starts_with("cmdstat_info:"))
            .map(calls)
            .sum();
        let xadd = text
            .lines()
            .find(|l| l.starts_with("cmdstat_xadd:"))
            .map_or(0, calls);
        (all, xadd)
    }

    async fn used_memory(&self) -> u64 {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "INFO", "memory"])
            .output()
            .await
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("used_memory")
    }
}

/// Tokens per second of echo answers of `answer` tokens over `streams`
/// at once, and CPU per token, on `server` (and its Redis).
async fn cpu_per_token(
    server: &Server,
    redis: Option<&Redis>,
    answer: usize,
    streams: usize,
) -> (f64, f64, f64) {
    let url = format!("{}/v1/chat/completions", server.base);
    let body = chat(&words(answer));
    let run_for = Duration::from_secs(6);
    let (cpu_before, redis_before) = (server.cpu_seconds(), redis.map_or(0.0, Redis::cpu_seconds));
    let clients: Vec<_> = (0..streams).map(|_| client()).collect();
    let (tokens, mut wall) = support::stream_load(&clients, &url, &body, streams, run_for).await;
    if let Some(redis) = redis {
        // Mirrors may still be writing what was streamed: their work
        // counts, and so does the time it takes.
        let settling = Instant::now();
        let mut calls = redis.command_calls().await;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = redis.command_calls().await;
            if now == calls {
                break;
            }
            calls = now;
        }
        wall += settling.elapsed().as_secs_f64() - 0.1;
    }
    let cpu = server.cpu_seconds() - cpu_before;
    let redis_cpu = redis.map_or(0.0, Redis::cpu_seconds) - redis_before;
    (
        tokens as f64 / wall,
        cpu * 1e6 / tokens as f64,
        redis_cpu * 1e6 / tokens as f64,
    )
}

/// With and without `--redis`, side by side: long answers (where the
/// per-token cost shows) and 100-token answers over 50 connections (the
/// issue's h2load load, where the per-generation cost shows).
async fn throughput() {
    for (answer, streams) in [(2_000, 32), (100, 50)] {
        let local = Server::start(&["--max-queue", "1024"]).await;
        let (rate, cpu, _) = cpu_per_token(&local, None, answer, streams).await;
        println!(
            "in-process state: {streams} streams of {answer}-token answers, {rate:.0} tokens/s, server CPU {cpu:.2} us/token"
        );
        drop(local);
        let redis = Redis::start().await;
        let shared = Server::start(&["--max-queue", "1024", "--redis", &redis.url()]).await;
        let calls_before = redis.command_calls().await;
        let started = Instant::now();
        let (rate_r, cpu_r, redis_cpu) =
            cpu_per_token(&shared, Some(&redis), answer, streams).await;
        let tokens = rate_r * started.elapsed().as_secs_f64();
        let calls_after = redis.command_calls().await;
        println!(
            "with --redis: {streams} streams of {answer}-token answers, {rate_r:.0} tokens/s ({:.2}x), server CPU {cpu_r:.2} us/token ({:.2}x), redis-server CPU {redis_cpu:.2} us/token",
            rate_r / rate,
            cpu_r / cpu
        );
        println!(
            "with --redis: about {:.3} Redis commands and {:.3} stream entries per token",
            (calls_after.0 - calls_before.0) as f64 / tokens,
            (calls_after.1 - calls_before.1) as f64 / tokens,
        );
    }
}

/// Request to first byte of a new stream, one request at a time.
async fn first_byte_of(server: &Server) -> (f64, f64) {
    let url = format!("{}/v1/chat/completions", server.base);
    let http = client();
    let mut times = Vec::new();
    for _ in 0..300 {
        let started = Instant::now();
        let resp = http
            .post(&url)
            .json(&chat("a b c"))
            .send()
            .await
            .expect("sent");
        let mut body = resp.bytes_stream();
        body.next().await.expect("a first byte").expect("bytes");
        times.push(ms(started.elapsed()));
        while body.next().await.is_some() {}
    }
    times.sort_by(f64::total_cmp);
    (quantile(&times, 0.5), quantile(&times, 0.99))
}

async fn first_byte() {
    let local = Server::start(&[]).await;
    let (p50, p99) = first_byte_of(&local).await;
    drop(local);
    let redis = Redis::start().await;
    let shared = Server::start(&["--redis", &redis.url()]).await;
    let (r50, r99) = first_byte_of(&shared).await;
    println!(
        "first byte, 300 streams one at a time: in-process p50 {p50:.2} ms p99 {p99:.2} ms; with --redis p50 {r50:.2} ms p99 {r99:.2} ms"
    );
}

/// `GET /v1/responses/{id}?stream=true&starting_after=N` to its first
/// byte, 200 times on `base`.
async fn starting_after_on(base: &str, id: &str) -> (f64, f64) {
    let http = client();
    let url = format!("{base}/v1/responses/{id}?stream=true&starting_after=250");
    let mut times = Vec::new();
    for _ in 0..200 {
        let started = Instant::now();
        let resp = http.get(&url).send().await.expect("sent");
        assert_eq!(resp.status(), 200);
        let mut body = resp.bytes_stream();
        body.next().await.expect("a first byte").expect("bytes");
        times.push(ms(started.elapsed()));
    }
    times.sort_by(f64::total_cmp);
    (quantile(&times, 0.5), quantile(&times, 0.99))
}

async fn starting_after() {
    let redis = Redis::start().await;
    let a = Server::start(&["--redis", &redis.url()]).await;
    let b = Server::start(&["--redis", &redis.url()]).await;
    let created: serde_json::Value = client()
        .post(format!("{}/v1/responses", a.base))
        .json(&serde_json::json!({"model": "echo", "input": words(500)}))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    let id = created["id"].as_str().expect("an id").to_owned();
    // Wait for the mirror: B replays the whole response.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (own50, own99) = starting_after_on(&a.base, &id).await;
    let (far50, far99) = starting_after_on(&b.base, &id).await;
    println!(
        "starting_after=250 of a 500-token response, to first byte: on the owner p50 {own50:.2} ms p99 {own99:.2} ms; on another instance p50 {far50:.2} ms p99 {far99:.2} ms"
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn resume_elsewhere() {
    let redis = Redis::start().await;
    let a = Server::start(&["--redis", &redis.url()]).await;
    let b = Server::start(&["--redis", &redis.url()]).await;
    let client = client();
    let resp = client
        .post(format!("{}/v1/chat/completions", a.base))
        .json(&chat(&words(100)))
        .send()
        .await
        .expect("sent");
    let id = resp.headers()["x-completion-id"]
        .to_str()
        .expect("id")
        .to_owned();
    resp.bytes().await.expect("body");
    let url = format!("{}/v1/chat/completions/{id}/events", b.base);
    let mut samples = Vec::new();
    for i in 0..320 {
        let started = Instant::now();
        let resp = client
            .get(&url)
            .header("last-event-id", format!("{id}.50"))
            .send()
            .await
            .expect("sent");
        let mut body = resp.bytes_stream();
        body.next().await.expect("a replayed event").expect("chunk");
        if i >= 20 {
            samples.push(started.elapsed());
        }
        while body.next().await.is_some() {}
    }
    samples.sort();
    println!(
        "resume on another instance: request -> first replayed byte over {} runs: p50 {:.2} ms, p99 {:.2} ms",
        samples.len(),
        ms(quantile(&samples, 0.5)),
        ms(quantile(&samples, 0.99))
    );
}

async fn cancel_elsewhere() {
    let redis = Redis::start().await;
    let a = Server::start(&["--redis", &redis.url(), "--token-delay", "10s"]).await;
    let b = Server::start(&["--redis", &redis.url(), "--token-delay", "10s"]).await;
    let samples = support::cancel_previous(
        &format!("{}/v1/chat/completions", a.base),
        &format!("{}/v1/chat/completions", b.base),
        300,
        20,
    )
    .await;
    println!(
        "cancel-previous across instances: request on B -> A's old stream [DONE] over {} runs: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        samples.len(),
        ms(quantile(&samples, 0.5)),
        ms(quantile(&samples, 0.99)),
        ms(*samples.last().expect("samples"))
    );
}

async fn redis_memory() {
    let redis = Redis::start().await;
    let server = Server::start(&["--redis", &redis.url(), "--resume-ttl", "10m"]).await;
    let url = format!("{}/v1/chat/completions", server.base);
    let client = client();
    let body = chat(&words(500));
    stream_count(&client, &url, &body).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = redis.used_memory().await;
    let n = 400;
    for _ in 0..n {
        stream_count(&client, &url, &body).await;
    }
    // The mirrors finish a moment after the streams.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = redis.used_memory().await;
    println!(
        "Redis memory: {n} retained 500-token generations, used_memory +{} KiB = {:.1} KB per generation",
        (after - before) / 1024,
        (after - before) as f64 / 1000.0 / n as f64
    );
}

async fn many_streams() {
    let redis = Redis::start().await;
    let args = [
        "--redis",
        &redis.url(),
        "--token-delay",
        "100ms",
        "--max-queue",
        "100000",
    ];
    let a = Server::start(&args).await;
    let b = Server::start(&args).await;
    let n = 1_000;
    let connections: Vec<(reqwest::Client, String)> = (0..n / 100)
        .map(|i| {
            let base = if i % 2 == 0 { &a.base } else { &b.base };
            (
                reqwest::Client::builder()
                    .http2_prior_knowledge()
                    .build()
                    .expect("client"),
                format!("{base}/v1/chat/completions"),
            )
        })
        .collect();
    let body = chat("a b c d e f g h i j k l m n o p q r s t");
    let cpu_before = a.cpu_seconds() + b.cpu_seconds() + redis.cpu_seconds();
    let started = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (client, url) = connections[i / 100].clone();
            let body = body.clone();
            tokio::spawn(async move {
                let resp = client.post(&url).json(&body).send().await.expect("sent");
                support::token_gaps(resp).await
            })
        })
        .collect();
    let mut gaps = Vec::new();
    let mut complete = 0;
    for task in tasks {
        let (g, done) = task.await.expect("joined");
        gaps.extend(g);
        complete += usize::from(done);
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = a.cpu_seconds() + b.cpu_seconds() + redis.cpu_seconds() - cpu_before;
    gaps.sort();
    println!(
        "{n} streams over two instances with Redis, 10 tokens/s each: {complete} ended with [DONE]; token gap p50 {:.1} ms, p99 {:.1} ms (ideal 100); CPU of both instances and Redis {:.0}% of one core",
        ms(quantile(&gaps, 0.5)),
        ms(quantile(&gaps, 0.99)),
        cpu / wall * 100.0
    );
}

#[tokio::main]
async fn main() {
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wanted = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    if wanted("throughput") {
        throughput().await;
    }
    if wanted("first_byte") {
        first_byte().await;
    }
    if wanted("starting_after") {
        starting_after().await;
    }
    if wanted("resume") {
        resume_elsewhere().await;
    }
    if wanted("cancel") {
        cancel_elsewhere().await;
    }
    if wanted("memory") {
        redis_memory().await;
    }
    if wanted("streams") {
        many_streams().await;
    }
}
