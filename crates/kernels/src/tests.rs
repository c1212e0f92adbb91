//! Every kernel against the scalar reference on random inputs, and the
//! dispatching entry point against an f32 product of the dequantized
//! weights.

use half::f16;

use super::*;

/// xorshift64*: reproducible inputs without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `[lo, hi)`.
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }

    fn f16(&mut self, lo: f32, hi: f32) -> u16 {
        f16::from_f32(self.uniform(lo, hi)).to_bits()
    }

    fn floats(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.uniform(-2.0, 2.0)).collect()
    }
}

fn q4_1(rng: &mut Rng, blocks: usize) -> Vec<BlockQ4_1> {
    (0..blocks)
        .map(|_| BlockQ4_1 {
            d: rng.f16(0.001, 0.1),
            m: rng.f16(-0.8, 0.1),
            qs: std::array::from_fn(|_| rng.next() as u8),
        })
        .collect()
}

fn q8_0(rng: &mut Rng, blocks: usize) -> Vec<BlockQ8_0> {
    (0..blocks)
        .map(|_| BlockQ8_0 {
            d: rng.f16(0.0001, 0.01),
            // ggml's quantizer never writes -128, but the kernel must not
            // care: include it.
            qs: std::array::from_fn(|_| rng.next() as i8),
        })
        .collect()
}

fn activations(rng: &mut Rng, blocks: usize) -> Vec<BlockQ8> {
    rng.floats(blocks * QK)
        .chunks_exact(QK)
        .map(quantize_block)
        .collect()
}

fn close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
            "{what}: element {i}: {g} vs {w}"
        );
    }
}

/// Row counts and activation counts around every tile size and remainder.
const ROWS: [usize; 7] = [1, 2, 3, 4, 5, 7, 13];
const NS: [usize; 7] = [1, 2, 3, 4, 5, 6, 9];
const KBS: [usize; 3] = [1, 2, 18];

fn kernels_match_scalar<B: Kernel>(make: fn(&mut Rng, usize) -> Vec<B>) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for isa in Isa::available() {
        for rows in ROWS {
            for n in NS {
                for kb in KBS {
                    let w = make(&mut rng, rows * kb);
                    let x = activations(&mut rng, n * kb);
                    let mut want = vec![0.0; rows * n];
                    B::rows(Isa(IsaKind::Scalar), &w, kb, &x, n, &mut want);
                    let mut got = vec![f32::NAN; rows * n];
                    B::rows(isa, &w, kb, &x, n, &mut got);
                    close(&got, &want, &format!("{} {rows}x{n}x{kb}", isa.name()));
                }
            }
        }
    }
}

#[test]
fn q4_1_kernels_match_scalar() {
    kernels_match_scalar(q4_1);
}

#[test]
fn q8_0_kernels_match_scalar() {
    kernels_match_scalar(q8_0);
}

#[test]
fn this_machine_has_a_simd_path_when_it_should() {
    let isa = Isa::detect();
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        assert_ne!(isa.name(), "scalar");
    }
    println!("kernels run on {}", isa.name());
}

fn to_bytes_q4_1(blocks: &[BlockQ4_1]) -> Vec<u8> {
    blocks
        .iter()
        .flat_map(|b| {
            let mut v = b.d.to_le_bytes().to_vec();
            v.extend(b.m.to_le_bytes());
            v.extend(b.qs);
            v
        })
        .collect()
}

fn to_bytes_q8_0(blocks: &[BlockQ8_0]) -> Vec<u8> {
    blocks
        .iter()
        .flat_map(|b| {
            let mut v = b.d.to_le_bytes().to_vec();
            v.extend(b.qs.map(|q| q as u8));
            v
        })
        .collect()
}

fn random_matrix(rng: &mut Rng, format: Format, rows: usize, cols: usize) -> QMatrix {
    let blocks = rows * cols / QK;
    let bytes = match format {
        Format::Q4_1 => to_bytes_q4_1(&q4_1(rng, blocks)),
        Format::Q8_0 => to_bytes_q8_0(&q8_0(rng, blocks)),
    };
    QMatrix::from_bytes(format, rows, cols, &bytes).unwrap()
}

/// `x · Wᵀ` in f32 over the dequantized weights, and the bound that
/// quantizing `x` to 8 bits may move each output by: half a step of
/// `amax / 127` per activation, times `Σ|w|`.
fn reference(w: &QMatrix, x: &[f32], n: usize) -> (Vec<f32>, Vec<f32>) {
    let mut row = vec![0.0; w.cols()];
    let mut want = vec![0.0; n * w.rows()];
    let mut bound = vec![0.0; n * w.rows()];
    for r in 0..w.rows() {
        w.dequantize_row(r, &mut row);
        for j in 0..n {
            let xr = &x[j * w.cols()..][..w.cols()];
            want[j * w.rows() + r] = row.iter().zip(xr).map(|(a, b)| a * b).sum();
            bound[j * w.rows() + r] = row
                .chunks_exact(QK)
                .zip(xr.chunks_exact(QK))
                .map(|(wb, xb)| {
                    let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    wb.iter().map(|v| v.abs()).sum::<f32>() * amax / 254.0
                })
                .sum::<f32>()
                + 1e-3;
        }
    }
    (want, bound)
}

#[test]
fn matmul_matches_f32_product_on_every_isa_and_thread_split() {
    two_threads(matmul_matches_f32_product);
}

/// Runs `f` on a pool of two threads, as on the machines the engine is
/// measured on, whatever this one has: the splits a test means to cover
/// depend on the count.
fn two_threads(f: impl FnOnce() + Send) {
    rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("a pool")
        .install(f);
}

fn matmul_matches_f32_product() {
    let mut rng = Rng(42);
    // The model's shapes, shrunk: odd row counts, and sizes past
    // `PARALLEL_PAIRS` so rayon splits the weight rows (1, 7, 5) or a
    // prompt's many rows (33, 130, in tasks with a short last one; 130
    // also quantized in parallel).
    for (format, rows, cols, n) in [
        (Format::Q4_1, 97, 64, 1),
        (Format::Q4_1, 960, 576, 1),
        (Format::Q4_1, 301, 576, 7),
        (Format::Q4_1, 64, 1536, 33),
        (Format::Q4_1, 97, 576, 130),
        (Format::Q8_0, 1001, 576, 1),
        (Format::Q8_0, 129, 96, 5),
    ] {
        let w = random_matrix(&mut rng, format, rows, cols);
        let x = rng.floats(n * cols);
        let (want, bound) = reference(&w, &x, n);
        for isa in Isa::available() {
            let got = w.matmul_on(isa, &x, n);
            for (i, ((g, r), b)) in got.iter().zip(&want).zip(&bound).enumerate() {
                assert!(
                    (g - r).abs() <= *b,
                    "{} {format:?} {rows}x{cols} n={n}: element {i}: {g} vs {r} (bound {b})",
                    isa.name()
                );
            }
        }
        assert_eq!(w.matmul(&x, n), w.matmul_on(Isa::detect(), &x, n));
    }
}

/// Batched decoding must pick the tokens each sequence picks alone: a
/// row's product may not depend on the rows multiplied beside it.
#[test]
fn a_row_in_a_batch_is_the_same_to_the_bit_as_alone() {
    two_threads(a_row_in_a_batch_is_the_same_as_alone);
}

fn a_row_in_a_batch_is_the_same_as_alone() {
    let mut rng = Rng(11);
    for format in [Format::Q4_1, Format::Q8_0] {
        let w = random_matrix(&mut rng, format, 301, 576);
        // The weight rows split across threads, then the activation rows.
        for n in [
            9,
            SPLIT_ACTIVATIONS_PER_THREAD * rayon::current_num_threads() + 5,
        ] {
            let x = rng.floats(n * 576);
            for isa in Isa::available() {
                let all = w.matmul_on(isa, &x, n);
                for j in 0..n {
                    let alone = w.matmul_on(isa, &x[j * 576..][..576], 1);
                    assert_eq!(
                        &all[j * 301..][..301],
                        &alone[..],
                        "{} {format:?} row {j} of {n}",
                        isa.name()
                    );
                }
            }
        }
    }
}

#[test]
fn stacked_rows_give_the_parts_products() {
    let mut rng = Rng(7);
    let parts: Vec<QMatrix> = [64, 32, 32]
        .into_iter()
        .map(|rows| random_matrix(&mut rng, Format::Q4_1, rows, 96))
        .collect();
    let x = rng.floats(3 * 96);
    let stacked = QMatrix::stack(parts.clone()).unwrap();
    assert_eq!(stacked.rows(), 128);
    assert!(stacked.matmul(&[], 0).is_empty(), "no rows, no product");
    let all = stacked.matmul(&x, 3);
    for j in 0..3 {
        let row: Vec<f32> = parts
            .iter()
            .flat_map(|p| p.matmul(&x[j * 96..][..96], 1))
            .collect();
        assert_eq!(&all[j * 128..][..128], &row[..], "stacked");
    }
    let other = random_matrix(&mut rng, Format::Q8_0, 4, 96);
    assert!(QMatrix::stack(vec![parts[0].clone(), other]).is_err());
}

#[test]
fn reading_checks_columns_and_length() {
    assert!(QMatrix::from_bytes(Format::Q4_1, 1, 48, &[0; 40]).is_err());
    assert!(QMatrix::from_bytes(Format::Q4_1, 2, 32, &[0; 39]).is_err());
    let m = QMatrix::from_bytes(Format::Q8_0, 2, 32, &[0; 68]).unwrap();
    assert_eq!((m.rows(), m.cols(), m.format()), (2, 32, Format::Q8_0));
}
