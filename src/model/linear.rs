//! `Linear`: a weight matrix on candle's SIMD kernels.
//!
//! candle has no SIMD kernel for Q4_1, the type of most of SmolLM2's
//! weights. A Q4_1 block is `w = d·q + m` (q in 0..16); Q4_0, which has an
//! AVX2 kernel, is `w = d·(q − 8)`. So, exactly,
//! `w = Q4_0(d, q) + (8d + m)` and, for an input row x,
//! `x·w = Q4_0 dot + Σ_blocks (8d + m) · Σ_{i in block} x_i`:
//! the same nibbles and scales as a Q4_0 matrix, plus a small matmul of
//! per-block input sums with per-block offsets. Lossless, and it reads
//! 22 bytes per 32 weights against 34 for a Q8_0 copy.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor, ggml_file};
use candle_core::{D, Device, Module, Tensor};
use half::f16;

use super::llama::Result;

const BLOCK: usize = 32;
const Q4_1_BYTES: usize = 20;

pub enum Linear {
    Plain(QMatMul),
    /// Q4_1 as Q4_0 plus offsets.
    SplitQ4_1 {
        base: QMatMul,
        /// `8d + m` per (block, output row): shape `(k / 32, n_out)`.
        offsets: Tensor,
    },
}

impl Linear {
    /// Several weight matrices over the same input, rows stacked into one
    /// (Q, K and V; gate and up).
    pub fn stacked(parts: &[QTensor], device: &Device) -> Result<Self> {
        if parts.iter().all(|p| p.dtype() == GgmlDType::Q4_1) {
            return split_q4_1(parts, device);
        }
        let rows = parts
            .iter()
            .map(|p| p.dequantize(device))
            .collect::<Result<Vec<_>>>()?;
        let joined = Tensor::cat(&rows, 0)?;
        // Near-lossless from 4 to 8 bits, and on the AVX2 kernel.
        Ok(Self::Plain(QMatMul::from_qtensor(QTensor::quantize(
            &joined,
            GgmlDType::Q8_0,
        )?)?))
    }

    pub fn single(weight: QTensor, device: &Device) -> Result<Self> {
        if has_simd(weight.dtype()) {
            return Ok(Self::Plain(QMatMul::from_qtensor(weight)?));
        }
        Self::stacked(&[weight], device)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Plain(matmul) => matmul.forward(x),
            Self::SplitQ4_1 { base, offsets } => {
                let y = base.forward(x)?;
                let (batch, seq, k) = x.dims3()?;
                let sums = x.reshape((batch * seq, k / BLOCK, BLOCK))?.sum(D::Minus1)?;
                let correction = sums.matmul(offsets)?.reshape((batch, seq, ()))?;
                y + correction
            }
        }
    }
}

/// Types candle multiplies with SIMD on x86.
fn has_simd(dtype: GgmlDType) -> bool {
    !matches!(
        dtype,
        GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q8_1
    )
}

fn split_q4_1(parts: &[QTensor], device: &Device) -> Result<Linear> {
    let k = parts
        .first()
        .map_or(Ok(0), |p| p.shape().dims2().map(|d| d.1))?;
    let blocks_per_row = k / BLOCK;
    let mut q4_0 = Vec::new();
    let mut offsets = Vec::new();
    let mut n_out = 0;
    for part in parts {
        let (rows, cols) = part.shape().dims2()?;
        if cols != k {
            candle_core::bail!("stacked weights disagree on their input size");
        }
        n_out += rows;
        let raw = part.data()?;
        for block in raw.chunks_exact(Q4_1_BYTES) {
            let d = f16::from_le_bytes([block[0], block[1]]);
            let m = f16::from_le_bytes([block[2], block[3]]);
            q4_0.extend_from_slice(&block[..2]);
            q4_0.extend_from_slice(&block[4..]);
            offsets.push(8.0 * d.to_f32() + m.to_f32());
        }
    }
    let base = ggml_file::qtensor_from_ggml(GgmlDType::Q4_0, &q4_0, vec![n_out, k], device)?;
    let offsets = Tensor::from_vec(offsets, (n_out, blocks_per_row), device)?
        .t()?
        .contiguous()?;
    Ok(Linear::SplitQ4_1 {
        base: QMatMul::from_qtensor(base)?,
        offsets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Q4_1 matrix straight from bytes: two rows of 64 weights.
    fn q4_1_matrix(device: &Device) -> QTensor {
        let mut raw = Vec::new();
        for block in 0..4u8 {
            raw.extend_from_slice(&f16::from_f32(0.25 + f32::from(block) * 0.1).to_le_bytes());
            raw.extend_from_slice(&f16::from_f32(-1.0 + f32::from(block) * 0.3).to_le_bytes());
            raw.extend(
                (0..16u8).map(|i| (i.wrapping_mul(7) & 0x0f) | ((i.wrapping_mul(3) & 0x0f) << 4)),
            );
        }
        ggml_file::qtensor_from_ggml(GgmlDType::Q4_1, &raw, vec![2, 64], device).expect("q4_1")
    }

    #[test]
    fn the_split_equals_the_q4_1_weights_exactly() {
        let device = Device::Cpu;
        let weights = q4_1_matrix(&device);
        let reference = weights.dequantize(&device).expect("dequantized");
        let x = Tensor::arange(0f32, 64.0, &device)
            .and_then(|t| (t * 0.01).and_then(|t| t.reshape((1, 1, 64))))
            .expect("input");
        let Linear::SplitQ4_1 { base, offsets } =
            Linear::stacked(&[weights], &device).expect("split")
        else {
            panic!("Q4_1 is split");
        };
        // The split's own weights, dequantized, are the Q4_1 weights.
        let QMatMul::QTensor(base_weights) = &base else {
            panic!("quantized base");
        };
        let rebuilt = base_weights
            .dequantize(&device)
            .and_then(|b| b.reshape((2, 2, 32)))
            .and_then(|b| b.broadcast_add(&offsets.t()?.reshape((2, 2, 1))?))
            .and_then(|b| b.reshape((2, 64)))
            .expect("rebuilt");
        let diff = (rebuilt - &reference)
            .and_then(|d| d.abs())
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar::<f32>())
            .expect("diff");
        assert!(diff < 1e-5, "weights differ by {diff}");

        // And the product is close to the f32 product (activations go
        // through Q8_0 in the kernel, as in llama.cpp).
        let linear = Linear::SplitQ4_1 { base, offsets };
        let y = linear
            .forward(&x)
            .expect("forward")
            .flatten_all()
            .expect("flat")
            .to_vec1::<f32>()
            .expect("vec");
        let want = x
            .reshape((1, 64))
            .and_then(|x| x.matmul(&reference.t()?))
            .and_then(|y| y.flatten_all())
            .and_then(|y| y.to_vec1::<f32>())
            .expect("reference product");
        for (got, want) in y.iter().zip(&want) {
            assert!(
                (got - want).abs() < 0.02 * want.abs().max(1.0),
                "{got} vs {want}"
            );
        }
    }
}
