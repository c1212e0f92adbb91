//! Per-token costs below the network: encoding one chunk, recording the
//! per-token metric, and replaying a 1,000-event log.
//! `cargo bench --bench sse`.

#![allow(clippy::expect_used)] // a harness that cannot measure should stop loudly

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use sluicegate::api::sse::{ChunkEncoder, Flavor};
use std::sync::Arc;

use sluicegate::session::{GenerationId, LogReader, MemoryLog};

fn encode(c: &mut Criterion) {
    let id = GenerationId::new("chatcmpl-");
    let mut encoder = ChunkEncoder::new(&id, "SmolLM2-135M-Instruct", 1_700_000_000, Flavor::Chat);
    let mut out = Vec::with_capacity(256);
    c.bench_function("encode one token chunk", |b| {
        b.iter(|| {
            out.clear();
            encoder.text(black_box(" word"), &mut out);
        });
    });
}

fn replay(c: &mut Criterion) {
    let id = GenerationId::new("chatcmpl-");
    let mut encoder = ChunkEncoder::new(&id, "echo", 1_700_000_000, Flavor::Chat);
    let log = Arc::new(MemoryLog::default());
    for _ in 0..1_000 {
        log.push_with(|out| encoder.text(" word", out));
    }
    log.close();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    c.bench_function("replay a 1000-event log", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let mut reader = LogReader::new(log.clone(), 0);
                let mut bytes = 0;
                while let Some(chunk) = reader.next().await.expect("a memory log") {
                    bytes += chunk.len();
                }
                black_box(bytes)
            })
        });
    });
}

/// What metrics add per token: one histogram sample into the Prometheus
/// recorder (installed here as the binary installs it).
fn metrics_per_token(c: &mut Criterion) {
    let _ = sluicegate::telemetry::install_metrics();
    let histogram = sluicegate::telemetry::inter_token();
    let gap = std::time::Duration::from_micros(850);
    c.bench_function("record one inter-token sample", |b| {
        b.iter(|| histogram.record(black_box(gap)));
    });
}

criterion_group!(benches, encode, replay, metrics_per_token);
criterion_main!(benches);
