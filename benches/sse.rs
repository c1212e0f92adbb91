//! Per-token costs below the network: encoding one chunk, and replaying a
//! 1,000-event log. `cargo bench --bench sse`.

#![allow(clippy::expect_used)] // a harness that cannot measure should stop loudly

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use sluicegate::api::sse::{ChunkEncoder, Flavor};
use sluicegate::session::{EventLog, GenerationId};

fn encode(c: &mut Criterion) {
    let id = GenerationId::new("chatcmpl-");
    let mut encoder = ChunkEncoder::new(&id, "SmolLM2-135M-Instruct", 1_700_000_000, Flavor::Chat);
    c.bench_function("encode one token chunk", |b| {
        b.iter(|| encoder.text(black_box(" word")));
    });
}

fn replay(c: &mut Criterion) {
    let id = GenerationId::new("chatcmpl-");
    let mut encoder = ChunkEncoder::new(&id, "echo", 1_700_000_000, Flavor::Chat);
    let log = EventLog::default();
    for _ in 0..1_000 {
        log.push(encoder.text(" word"));
    }
    log.close();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    c.bench_function("replay a 1000-event log", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let mut reader = log.reader(0);
                let mut bytes = 0;
                while let Some(chunk) = reader.next().await {
                    bytes += chunk.len();
                }
                black_box(bytes)
            })
        });
    });
}

criterion_group!(benches, encode, replay);
criterion_main!(benches);
