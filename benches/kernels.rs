//! The model's projections at its shapes (SmolLM2-135M: QKV 576→960, gate
//! and up 576→3072, down 1536→576, the tied output 576→49152), for one row
//! (decode) and 64 (a prompt): `sluicegate_kernels` on the weights as
//! stored, on rayon's threads and on one, against the path it replaced
//! (Q4_1 re-quantized to Q8_0 for candle's kernel below 8 rows, an f32
//! GEMM over a freshly dequantized copy from 8). `cargo bench --bench kernels`.

#![allow(clippy::expect_used)] // a harness that cannot measure should stop loudly

use std::hint::black_box;
use std::time::Duration;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use sluicegate_kernels::{Format, QMatrix};

/// Random but plausible blocks: small positive f16 scales (and negative
/// minimums for Q4_1), random quants.
fn random_matrix(format: Format, rows: usize, cols: usize) -> QMatrix {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state as u8
    };
    let half = |v: f32| half_bits(v).to_le_bytes();
    let blocks = rows * cols / 32;
    let mut bytes = Vec::new();
    for _ in 0..blocks {
        let d = 0.001 + f32::from(next()) / 255.0 * 0.05;
        bytes.extend(half(d));
        match format {
            Format::Q4_1 => {
                bytes.extend(half(-d * 8.0));
                bytes.extend((0..16).map(|_| next()));
            }
            Format::Q8_0 => bytes.extend((0..32).map(|_| next())),
        }
    }
    QMatrix::from_bytes(format, rows, cols, &bytes).expect("well-formed blocks")
}

/// f32 to f16 bits for normal values in range (enough for scales).
fn half_bits(v: f32) -> u16 {
    let bits = v.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32 - 127 + 15;
    let mantissa = ((bits >> 13) & 0x3ff) as u16;
    sign | ((exp.clamp(1, 30) as u16) << 10) | mantissa
}

/// The replaced path's weights: a Q8_0 copy (as `simd_ready` made), or
/// the stored Q8_0 matrix itself.
fn old_weights(m: &QMatrix) -> QMatMul {
    let mut f32s = vec![0.0f32; m.rows() * m.cols()];
    for (r, row) in f32s.chunks_exact_mut(m.cols()).enumerate() {
        m.dequantize_row(r, row);
    }
    let t = Tensor::from_vec(f32s, (m.rows(), m.cols()), &Device::Cpu).expect("tensor");
    QMatMul::from_qtensor(QTensor::quantize(&t, GgmlDType::Q8_0).expect("Q8_0")).expect("qmatmul")
}

/// The replaced `project`.
fn old_project(w: &QMatMul, x: &Tensor, rows: usize) -> Tensor {
    match w {
        QMatMul::QTensor(q) if rows >= 8 => x
            .broadcast_matmul(&q.dequantize(&Device::Cpu).expect("f32").t().expect("t"))
            .expect("gemm"),
        _ => w.forward(x).expect("qmatmul"),
    }
}

fn projections(c: &mut Criterion) {
    let one_thread = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");
    let shapes = [
        ("qkv 576x960", Format::Q4_1, 960, 576, &[1, 64][..]),
        ("gate_up 576x3072", Format::Q4_1, 3072, 576, &[1, 64][..]),
        ("down 1536x576", Format::Q4_1, 576, 1536, &[1, 64][..]),
        ("output 576x49152", Format::Q8_0, 49152, 576, &[1][..]),
    ];
    let mut group = c.benchmark_group("projection");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    for (name, format, rows, cols, ns) in shapes {
        let new = random_matrix(format, rows, cols);
        let old = old_weights(&new);
        for &n in ns {
            let x: Vec<f32> = (0..n * cols)
                .map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0)
                .collect();
            let xt = Tensor::from_vec(x.clone(), (1, n, cols), &Device::Cpu).expect("x");
            let id = |what: &str| BenchmarkId::new(what, format!("{name} rows={n}"));
            group.bench_function(id("old: candle Q8_0 copy / f32 GEMM"), |b| {
                b.iter(|| black_box(old_project(&old, &xt, n)))
            });
            group.bench_function(id("kernels"), |b| b.iter(|| black_box(new.matmul(&x, n))));
            group.bench_function(id("kernels, 1 thread"), |b| {
                b.iter(|| one_thread.install(|| black_box(new.matmul(&x, n))))
            });
        }
    }
    group.finish();
}

/// One KV head's decode attention at the model's shape (head width 64,
/// three query heads to a KV head) over 1,500 cached positions in
/// 64-position blocks, each its own allocation (the paged cache's block
/// table).
fn attention(c: &mut Criterion) {
    let (hd, group, positions) = (64, 3, 1500);
    let isa = sluicegate_kernels::Isa::detect();
    let bits = |seed: usize| -> Vec<u16> {
        (0..positions * hd)
            .map(|i| half_bits((((i + seed) * 7919) % 2001) as f32 / 1000.0 - 1.0))
            .collect()
    };
    let (keys, values) = (bits(1), bits(2));
    // As the cache keeps them: keys dimension-major in each block.
    let blocks = |all: &[u16], keys: bool| -> Vec<Vec<u16>> {
        all.chunks(64 * hd)
            .map(|chunk| {
                let mut block = vec![0u16; 64 * hd];
                for p in 0..chunk.len() / hd {
                    for d in 0..hd {
                        let at = if keys { d * 64 + p } else { p * hd + d };
                        block[at] = chunk[p * hd + d];
                    }
                }
                block
            })
            .collect()
    };
    let (key_blocks, value_blocks) = (blocks(&keys, true), blocks(&values, false));
    let queries: Vec<f32> = (0..group * hd).map(|i| (i as f32 * 0.37).sin()).collect();
    let visible = vec![positions; group];
    let mut scores = vec![0.0; group * positions];
    let mut out = vec![0.0; group * hd];
    let mut run = |keys: &[&[u16]], values: &[&[u16]]| {
        sluicegate_kernels::attend(
            isa,
            hd,
            &queries,
            &visible,
            keys,
            values,
            0.125,
            &mut scores,
            &mut out,
        );
        black_box(out[0])
    };
    let mut bench = c.benchmark_group("attention, decode over 1500 positions");
    bench
        .sample_size(30)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));

    let (kb, vb): (Vec<&[u16]>, Vec<&[u16]>) = (
        key_blocks.iter().map(Vec::as_slice).collect(),
        value_blocks.iter().map(Vec::as_slice).collect(),
    );
    bench.bench_function("64-position blocks", |b| b.iter(|| run(&kb, &vb)));
    bench.finish();
}

criterion_group!(benches, projections, attention);
criterion_main!(benches);
