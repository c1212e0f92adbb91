//! Load harness for what hostile or merely numerous clients cost: the
//! binary on the echo backend, figures printed, nothing asserted.
//! `cargo bench --bench hostile [scenario]`.
//!
//! - `streams`: RSS per open slow stream, 10,000 at once, over HTTP/1.1
//!   (one connection each) and over HTTP/2 (200 per connection);
//! - `slowloris`: 200 live streams' token gaps with and without 500
//!   connections that trickle a header line every 5 s.

#![allow(clippy::expect_used)] // a harness that cannot measure should stop loudly

mod support;

use std::time::Duration;

use futures_util::StreamExt;
use support::{Server, chat, quantile};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const STREAMS: usize = 10_000;

fn request(addr: &str, body: &str) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// One HTTP/1.1 connection with a stream open on it, its first event read.
async fn open_h1(addr: &str, body: &str) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(request(addr, body).as_bytes())
        .await
        .expect("sent");
    let mut seen = Vec::new();
    let mut buf = [0u8; 2048];
    while !seen.windows(2).any(|w| w == b"\n\n") {
        let n = tcp.read(&mut buf).await.expect("read");
        assert!(n > 0, "closed early");
        seen.extend_from_slice(&buf[..n]);
    }
    tcp
}

async fn rss_per_stream() {
    let args = [
        "--token-delay",
        "600s",
        "--max-queue",
        "100000",
        "--max-connections",
        "15000",
    ];
    let body = chat("a b c").to_string();

    let server = Server::start(&args).await;
    let addr = server.base.trim_start_matches("http://").to_owned();
    let warm: Vec<_> = futures_util::future::join_all((0..50).map(|_| open_h1(&addr, &body))).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = server.rss_kib();
    let mut held = Vec::with_capacity(STREAMS);
    for _ in 0..STREAMS / 100 {
        let opened = futures_util::future::join_all((0..100).map(|_| open_h1(&addr, &body))).await;
        held.extend(opened);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = server.rss_kib();
    println!(
        "{STREAMS} slow streams over HTTP/1.1 (one connection each): server RSS {before} KiB -> {after} KiB = {:.1} KB per stream",
        (after - before) as f64 * 1024.0 / 1000.0 / STREAMS as f64
    );
    drop((warm, held));
    drop(server);

    let server = Server::start(&args).await;
    let url = format!("{}/v1/chat/completions", server.base);
    // hyper allows 200 concurrent streams per HTTP/2 connection: the
    // warm-up takes the last connection, the rest take 200 each.
    let connections: Vec<reqwest::Client> = (0..STREAMS / 200 + 1)
        .map(|_| {
            reqwest::Client::builder()
                .http2_prior_knowledge()
                .build()
                .expect("client")
        })
        .collect();
    let open = |i: usize| {
        let client = connections[i / 200].clone();
        let url = url.clone();
        async move {
            let resp = client
                .post(&url)
                .json(&chat("a b c"))
                .send()
                .await
                .expect("sent");
            let mut body = resp.bytes_stream();
            body.next().await.expect("role").expect("chunk");
            body
        }
    };
    let warm: Vec<_> = futures_util::future::join_all((STREAMS..STREAMS + 50).map(open)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = server.rss_kib();
    let mut held = Vec::with_capacity(STREAMS);
    for connection in 0..STREAMS / 200 {
        let opened =
            futures_util::future::join_all((connection * 200..(connection + 1) * 200).map(open))
                .await;
        held.extend(opened);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = server.rss_kib();
    println!(
        "{STREAMS} slow streams over HTTP/2 ({} connections): server RSS {before} KiB -> {after} KiB = {:.1} KB per stream",
        STREAMS / 200,
        (after - before) as f64 * 1024.0 / 1000.0 / STREAMS as f64
    );
    drop((warm, held));
}

/// Token gaps of `live` streams at 10 tokens/s (100 ms) over HTTP/2.
async fn live_gaps(server: &Server, live: usize) -> Vec<Duration> {
    let url = format!("{}/v1/chat/completions", server.base);
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let body = chat(&vec!["t"; 30].join(" "));
    let tasks: Vec<_> = (0..live)
        .map(|_| {
            let (client, url, body) = (client.clone(), url.clone(), body.clone());
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
    gaps
}

async fn slowloris() {
    let args = ["--token-delay", "100ms", "--max-queue", "10000"];
    let server = Server::start(&args).await;
    let quiet = live_gaps(&server, 200).await;
    drop(server);

    let server = Server::start(&args).await;
    let addr = server.base.trim_start_matches("http://").to_owned();
    let trickle = tokio::spawn(async move {
        let mut sockets = Vec::new();
        for _ in 0..500 {
            if let Ok(mut tcp) = TcpStream::connect(&addr).await {
                let _ = tcp
                    .write_all(b"POST /v1/chat/completions HTTP/1.1\r\n")
                    .await;
                sockets.push(tcp);
            }
        }
        // A header line every 5 s, never the end of the head.
        for round in 0.. {
            tokio::time::sleep(Duration::from_secs(5)).await;
            for tcp in &mut sockets {
                let _ = tcp
                    .write_all(format!("X-Slow-{round}: 1\r\n").as_bytes())
                    .await;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let loris = live_gaps(&server, 200).await;
    trickle.abort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "200 live streams at 10 tokens/s: token gap p50 {:.1} ms, p99 {:.1} ms alone; p50 {:.1} ms, p99 {:.1} ms beside 500 slowloris connections",
        ms(quantile(&quiet, 0.5)),
        ms(quantile(&quiet, 0.99)),
        ms(quantile(&loris, 0.5)),
        ms(quantile(&loris, 0.99)),
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
    if wanted("streams") {
        rss_per_stream().await;
    }
    if wanted("slowloris") {
        slowloris().await;
    }
}
