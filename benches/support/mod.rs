//! What the load harnesses share: the binary on a loopback port, its CPU
//! and memory from `/proc`, and request helpers.

#![allow(dead_code)] // each harness uses its part

use std::process::Stdio;

use futures_util::StreamExt;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub(crate) struct Server {
    pub(crate) child: Child,
    pub(crate) base: String,
}

impl Server {
    /// The binary on the echo backend.
    pub(crate) async fn start(args: &[&str]) -> Self {
        Self::spawn(&[&["--backend", "echo"], args].concat()).await
    }

    pub(crate) async fn spawn(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sluicegate"))
            .args(["--port", "0", "--log", "warn"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn sluicegate");
        // The binary says where it listens in one stdout line.
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let line = lines
            .next_line()
            .await
            .expect("read")
            .expect("a listening line");
        let base = line
            .strip_prefix("listening ")
            .expect("a listening line")
            .to_owned();
        Self { child, base }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// utime + stime of the server process, in seconds.
    pub(crate) fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).expect("stat");
        let after_name = stat.rsplit_once(')').expect("comm").1;
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let ticks: f64 =
            fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
        ticks / 100.0
    }

    pub(crate) fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS")
    }
}

pub(crate) fn client() -> reqwest::Client {
    reqwest::Client::builder().build().expect("client")
}

pub(crate) fn words(n: usize) -> String {
    vec!["tok"; n].join(" ")
}

pub(crate) fn chat(text: &str) -> serde_json::Value {
    json!({"model": "echo", "stream": true, "messages": [{"role": "user", "content": text}]})
}

/// Streams one answer to its end; returns the number of `data:` events.
pub(crate) async fn stream_count(
    client: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
) -> usize {
    let resp = client.post(url).json(body).send().await.expect("sent");
    let mut body = resp.bytes_stream();
    let mut events = 0;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.expect("chunk");
        events += chunk.windows(6).filter(|w| w == b"data: ").count();
    }
    events
}

/// utime + stime of any process, in seconds.
pub(crate) fn cpu_seconds_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after_name = stat.rsplit_once(')').expect("comm").1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    ticks / 100.0
}

/// The `p` quantile of sorted samples.
pub(crate) fn quantile<T: Copy>(sorted: &[T], p: f64) -> T {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// A gauge or counter from the server's `/metrics`, 0 when absent.
pub(crate) async fn metric(server: &Server, name: &str) -> f64 {
    let text = client()
        .get(format!("{}/metrics", server.base))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            (series == name).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// Streams `body` to its end, again and again, from `streams` tasks over
/// `clients` (task `i` uses client `i % clients.len()`) for `run_for`;
/// returns the tokens received and the wall time in seconds.
pub(crate) async fn stream_load(
    clients: &[reqwest::Client],
    url: &str,
    body: &serde_json::Value,
    streams: usize,
    run_for: std::time::Duration,
) -> (usize, f64) {
    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..streams)
        .map(|i| {
            let client = clients[i % clients.len()].clone();
            let (url, body) = (url.to_owned(), body.clone());
            tokio::spawn(async move {
                let mut tokens = 0;
                while started.elapsed() < run_for {
                    // role, finish and [DONE] are not tokens
                    tokens += stream_count(&client, &url, &body).await - 3;
                }
                tokens
            })
        })
        .collect();
    let mut tokens = 0;
    for t in tasks {
        tokens += t.await.expect("joined");
    }
    (tokens, started.elapsed().as_secs_f64())
}

/// A stream read to its end: the gaps between its content tokens (the
/// role chunk's empty content is not one) and whether it ended with
/// `[DONE]`.
pub(crate) async fn token_gaps(resp: reqwest::Response) -> (Vec<std::time::Duration>, bool) {
    let mut stream = resp.bytes_stream();
    let mut arrivals = Vec::new();
    let mut done = false;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("chunk");
        let tokens = chunk.windows(11).filter(|w| w == b"\"content\":\"").count();
        arrivals.extend(std::iter::repeat_n(std::time::Instant::now(), tokens));
        done |= chunk.windows(12).any(|w| w == b"data: [DONE]");
    }
    let gaps = arrivals.windows(2).skip(1).map(|w| w[1] - w[0]).collect();
    (gaps, done)
}

/// Cancel-previous latency, `runs` times: a slow stream in a session on
/// `first`, then the session's next request on `second`; the time from
/// sending that request to the old stream's `[DONE]`. Sorted, without
/// the first `warm_up` runs.
pub(crate) async fn cancel_previous(
    first: &str,
    second: &str,
    runs: usize,
    warm_up: usize,
) -> Vec<std::time::Duration> {
    let client = client();
    let mut samples = Vec::with_capacity(runs);
    for i in 0..runs + warm_up {
        let session = format!("s{i}");
        let old = client
            .post(first)
            .header("x-session-id", &session)
            .json(&chat("x y z"))
            .send()
            .await
            .expect("sent");
        let mut old = old.bytes_stream();
        old.next().await.expect("role").expect("chunk");
        let started = std::time::Instant::now();
        let next = client
            .post(second)
            .header("x-session-id", &session)
            .json(&chat("q"))
            .send();
        let wait_done = async {
            let mut seen = Vec::new();
            while let Some(chunk) = old.next().await {
                seen.extend_from_slice(&chunk.expect("chunk"));
                if seen.windows(12).any(|w| w == b"data: [DONE]") {
                    return started.elapsed();
                }
            }
            panic!("old stream ended without [DONE]");
        };
        let (next, elapsed) = tokio::join!(next, wait_done);
        drop(next);
        if i >= warm_up {
            samples.push(elapsed);
        }
    }
    samples.sort();
    samples
}

/// The tests' services (nginx), for a bench to start beside the binary.
#[path = "../../tests/api/services.rs"]
pub(crate) mod services;
