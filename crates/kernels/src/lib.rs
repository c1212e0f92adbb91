//! Matrix products `y = x · Wᵀ` over GGUF Q4_1 and Q8_0 weights as the file
//! stores them, for one activation row (decode) and many (prefill, batched
//! steps), with SIMD picked at run time and weight rows split across
//! rayon's threads.
//!
//! Activations are quantized to 8 bits per block of 32 (as llama.cpp does
//! for its `q4_1 · q8_1` dot), so the inner loop is integer multiply-adds
//! over bytes: 4-bit weights are read once from memory and never widened to
//! f32. This is the workspace's only crate that may use `unsafe`: SIMD
//! loads and calls into `target_feature` functions.
//!
//! # Layout
//! - `blocks`: the GGUF block formats and the activation blocks.
//! - `scalar`: portable kernels, also the reference for the tests.
//! - `x86`: AVX2, AVX-VNNI and AVX-512-VNNI kernels from one template.
//! - `activation`: the feed-forward's SiLU gate, compiled per
//!   instruction set.
//! - `attention`: one query head's attention in f32 over an f16 cache,
//!   compiled per instruction set.

mod activation;
mod attention;
mod blocks;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::fmt;
use std::io::Read;

use rayon::prelude::*;

pub use activation::silu_mul;
pub use attention::{BLOCK_POSITIONS, attend, narrow};
pub use blocks::{BlockQ4_1, BlockQ8_0, QK};
use blocks::{BlockQ8, WeightBlock, quantize_block};

/// The instruction set a product runs on. Only `detect` and `available`
/// make one, so holding a value proves the CPU has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Isa(IsaKind);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IsaKind {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    AvxVnni,
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
}

impl Isa {
    /// The fastest this CPU runs.
    /// Detected once per process: callers ask per product and per layer.
    pub fn detect() -> Self {
        static DETECTED: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| Self::available().pop().unwrap_or(Self(IsaKind::Scalar)))
    }

    /// Every instruction set this CPU runs, slowest first.
    pub fn available() -> Vec<Self> {
        #[allow(unused_mut)] // only x86-64 adds more
        let mut all = vec![Self(IsaKind::Scalar)];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") && has!("f16c") {
                all.push(Self(IsaKind::Avx2));
                if has!("avxvnni") {
                    all.push(Self(IsaKind::AvxVnni));
                }
                if has!("avx512f") && has!("avx512vl") && has!("avx512vnni") {
                    all.push(Self(IsaKind::Avx512Vnni));
                }
            }
        }
        all
    }

    pub fn name(self) -> &'static str {
        match self.0 {
            IsaKind::Scalar => "scalar",
            #[cfg(target_arch = "x86_64")]
            IsaKind::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            IsaKind::AvxVnni => "avxvnni",
            #[cfg(target_arch = "x86_64")]
            IsaKind::Avx512Vnni => "avx512vnni",
        }
    }
}

/// A weight format with a kernel per instruction set.
trait Kernel: WeightBlock {
    /// `r` weight rows times `n` activation rows into `out` (`n × r`);
    /// see `scalar`.
    fn rows(isa: Isa, w: &[Self], kb: usize, x: &[BlockQ8], n: usize, out: &mut [f32]);
}

macro_rules! dispatch {
    ($block:ty, $kernel:ident) => {
        impl Kernel for $block {
            fn rows(isa: Isa, w: &[Self], kb: usize, x: &[BlockQ8], n: usize, out: &mut [f32]) {
                match isa.0 {
                    IsaKind::Scalar => scalar::$kernel(w, kb, x, n, out),
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: an `Isa` of this kind exists only once
                    // `available` saw AVX2, FMA and F16C.
                    IsaKind::Avx2 => unsafe { x86::avx2::$kernel(w, kb, x, n, out) },
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as above, plus AVX-VNNI.
                    IsaKind::AvxVnni => unsafe { x86::avxvnni::$kernel(w, kb, x, n, out) },
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as above, plus AVX-512F, VL and VNNI.
                    IsaKind::Avx512Vnni => unsafe { x86::avx512vnni::$kernel(w, kb, x, n, out) },
                }
            }
        }
    };
}
dispatch!(BlockQ4_1, rows_q4_1);
dispatch!(BlockQ8_0, rows_q8_0);

/// The storage formats this crate multiplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Q4_1,
    Q8_0,
}

#[derive(Debug)]
pub struct Error(String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Self(e.to_string())
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Blocks {
    Q4_1(Vec<BlockQ4_1>),
    Q8_0(Vec<BlockQ8_0>),
}

/// A `rows × cols` weight matrix in a GGUF block format, row-major: row
/// `r` is blocks `r * cols / 32 ..`.
#[derive(Debug, Clone, PartialEq)]
pub struct QMatrix {
    rows: usize,
    cols: usize,
    blocks: Blocks,
}

/// Products below this many block pairs stay on the calling thread: a
/// rayon round trip costs more than they do.
const PARALLEL_PAIRS: usize = 4096;

impl QMatrix {
    /// Reads `rows × cols` weights of `format` as GGUF lays them out,
    /// a chunk at a time (no second copy of the whole tensor).
    pub fn read(
        format: Format,
        rows: usize,
        cols: usize,
        reader: &mut impl Read,
    ) -> Result<Self, Error> {
        if !cols.is_multiple_of(QK) {
            return Err(Error(format!("{cols} columns are not a multiple of {QK}")));
        }
        let n = rows * cols / QK;
        let blocks = match format {
            Format::Q4_1 => Blocks::Q4_1(read_blocks(reader, n)?),
            Format::Q8_0 => Blocks::Q8_0(read_blocks(reader, n)?),
        };
        Ok(Self { rows, cols, blocks })
    }

    /// [`QMatrix::read`] from memory.
    pub fn from_bytes(
        format: Format,
        rows: usize,
        cols: usize,
        mut bytes: &[u8],
    ) -> Result<Self, Error> {
        Self::read(format, rows, cols, &mut bytes)
    }

    /// The matrices' rows one after the other: several projections of the
    /// same input as one product.
    pub fn stack(parts: Vec<QMatrix>) -> Result<Self, Error> {
        let mut parts = parts.into_iter();
        let mut all = parts
            .next()
            .ok_or_else(|| Error("nothing to stack".into()))?;
        for part in parts {
            if part.cols != all.cols {
                return Err(Error(format!(
                    "cannot stack {} columns on {}",
                    part.cols, all.cols
                )));
            }
            match (&mut all.blocks, part.blocks) {
                (Blocks::Q4_1(a), Blocks::Q4_1(b)) => a.extend(b),
                (Blocks::Q8_0(a), Blocks::Q8_0(b)) => a.extend(b),
                _ => return Err(Error("cannot stack matrices of different formats".into())),
            }
            all.rows += part.rows;
        }
        Ok(all)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn format(&self) -> Format {
        match self.blocks {
            Blocks::Q4_1(_) => Format::Q4_1,
            Blocks::Q8_0(_) => Format::Q8_0,
        }
    }

    /// Row `row` in f32 (an embedding lookup).
    ///
    /// # Panics
    /// If `row` is out of range or `out` is not `cols` long.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        assert_eq!(out.len(), self.cols);
        let kb = self.cols / QK;
        let blocks = out.chunks_exact_mut(QK);
        match &self.blocks {
            Blocks::Q4_1(b) => b[row * kb..][..kb]
                .iter()
                .zip(blocks)
                .for_each(|(b, o)| b.dequantize(o)),
            Blocks::Q8_0(b) => b[row * kb..][..kb]
                .iter()
                .zip(blocks)
                .for_each(|(b, o)| b.dequantize(o)),
        }
    }

    /// `x · Wᵀ` for `n` rows of `x` (`n × cols`, row-major): `n × rows`,
    /// on the fastest instruction set of this CPU.
    ///
    /// # Panics
    /// If `x` is not `n × cols` long.
    pub fn matmul(&self, x: &[f32], n: usize) -> Vec<f32> {
        self.matmul_on(Isa::detect(), x, n)
    }

    /// [`QMatrix::matmul`] on a chosen instruction set (for tests and
    /// benches).
    pub fn matmul_on(&self, isa: Isa, x: &[f32], n: usize) -> Vec<f32> {
        assert_eq!(x.len(), n * self.cols, "x must be n × cols");
        if n == 0 {
            return Vec::new();
        }
        let xq = quantize(isa, x);
        match &self.blocks {
            Blocks::Q4_1(w) => product(isa, w, self.rows, self.cols / QK, &xq, n),
            Blocks::Q8_0(w) => product(isa, w, self.rows, self.cols / QK, &xq, n),
        }
    }
}

/// Activation blocks per parallel task when a prompt's rows are
/// quantized.
const QUANTIZE_BLOCKS_PER_TASK: usize = 1024;

/// The activations in 8-bit blocks, with the rounding instructions of the
/// CPU (elsewhere each rounding is a library call); a prompt's rows in
/// parallel.
fn quantize(isa: Isa, x: &[f32]) -> Vec<BlockQ8> {
    let mut blocks = vec![BlockQ8::default(); x.len() / QK];
    if rayon::current_num_threads() == 1 || blocks.len() < 2 * QUANTIZE_BLOCKS_PER_TASK {
        quantize_into(isa, x, &mut blocks);
    } else {
        blocks
            .par_chunks_mut(QUANTIZE_BLOCKS_PER_TASK)
            .zip(x.par_chunks(QUANTIZE_BLOCKS_PER_TASK * QK))
            .for_each(|(blocks, x)| quantize_into(isa, x, blocks));
    }
    blocks
}

fn quantize_into(isa: Isa, x: &[f32], out: &mut [BlockQ8]) {
    match isa.0 {
        IsaKind::Scalar => {
            for (block, x) in out.iter_mut().zip(x.chunks_exact(QK)) {
                *block = quantize_block(x);
            }
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: an `Isa` of these kinds exists only once `available`
        // saw AVX2.
        _ => unsafe { quantize_avx2(x, out) },
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn quantize_avx2(x: &[f32], out: &mut [BlockQ8]) {
    // An indexed loop in this function, not an iterator adapter's
    // closure: the adapters are generic functions of their own, compiled
    // without AVX2, and `quantize_block` would be inlined into them.
    for (i, block) in x.chunks_exact(QK).enumerate() {
        out[i] = quantize_block(block);
    }
}

fn read_blocks<B: WeightBlock>(reader: &mut impl Read, n: usize) -> Result<Vec<B>, Error> {
    const CHUNK: usize = 4096;
    let mut blocks = Vec::with_capacity(n);
    let mut buf = vec![0u8; CHUNK * B::BYTES];
    while blocks.len() < n {
        let take = (n - blocks.len()).min(CHUNK);
        let bytes = &mut buf[..take * B::BYTES];
        reader.read_exact(bytes)?;
        blocks.extend(bytes.chunks_exact(B::BYTES).map(B::from_bytes));
    }
    Ok(blocks)
}

/// Activation rows per thread from which a product splits them, rather
/// than the weight rows, across threads: each thread then reads all the
/// weights (from the caches: a layer's matrices are a few hundred KB to a
/// few MB) for at least this many rows, and writes whole rows of the
/// result. Fewer rows (decoding) split the weights, which stream from
/// memory and are read once.
const SPLIT_ACTIVATIONS_PER_THREAD: usize = 16;

/// `n × rows`, split across rayon's threads: a prompt's activation rows,
/// one share per thread (each task writes its own rows of the result, and
/// reads every weight and converts every Q4_1 block's minimum: four tasks
/// a thread cost a prompt 6% more), or else the weight rows (each task its
/// columns, put in place after).
fn product<B: Kernel>(
    isa: Isa,
    w: &[B],
    rows: usize,
    kb: usize,
    x: &[BlockQ8],
    n: usize,
) -> Vec<f32> {
    let mut out = vec![0.0f32; n * rows];
    let threads = rayon::current_num_threads();
    // Weight rows per task, when they are split: a few tasks per thread,
    // so a thread slowed by other work on the machine hands its share over.
    let chunk = rows.div_ceil(threads * 4).next_multiple_of(4);
    if threads == 1 || rows * kb * n < PARALLEL_PAIRS {
        B::rows(isa, w, kb, x, n, &mut out);
    } else if n >= SPLIT_ACTIVATIONS_PER_THREAD * threads {
        let share = n.div_ceil(threads);
        out.par_chunks_mut(share * rows)
            .zip(x.par_chunks(share * kb))
            .for_each(|(out, x)| B::rows(isa, w, kb, x, out.len() / rows, out));
    } else if n == 1 {
        // One row of the result: each task's columns are contiguous.
        out.par_chunks_mut(chunk)
            .zip(w.par_chunks(chunk * kb))
            .for_each(|(out, w)| B::rows(isa, w, kb, x, 1, out));
    } else {
        let parts: Vec<Vec<f32>> = w
            .par_chunks(chunk * kb)
            .map(|w| {
                let mut part = vec![0.0f32; w.len() / kb * n];
                B::rows(isa, w, kb, x, n, &mut part);
                part
            })
            .collect();
        for (c, part) in parts.iter().enumerate() {
            let r = part.len() / n;
            for (j, row) in part.chunks_exact(r).enumerate() {
                out[j * rows + c * chunk..][..r].copy_from_slice(row);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;
