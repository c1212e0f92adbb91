//! The block layouts: the two weight formats as GGUF stores them, and the
//! 8-bit blocks activations are quantized into before a product.

use half::f16;

/// Weights per block, in every format here.
pub const QK: usize = 32;

/// GGUF `Q4_1`: `w = d * q + m` with `q` in `0..16`. Byte `j` of `qs` holds
/// weight `j` in its low nibble and weight `j + 16` in its high one
/// (ggml's `block_q4_1`, candle's `BlockQ4_1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct BlockQ4_1 {
    /// Scale, f16 bits.
    pub d: u16,
    /// Minimum, f16 bits.
    pub m: u16,
    pub qs: [u8; QK / 2],
}

/// GGUF `Q8_0`: `w = d * q` (ggml's `block_q8_0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct BlockQ8_0 {
    /// Scale, f16 bits.
    pub d: u16,
    pub qs: [i8; QK],
}

/// 32 activations as `x ≈ d * q`, with `s = d * Σq` for the minimum term
/// of Q4_1 (ggml's `block_q8_1`, with f32 scales: activations are
/// quantized per call, so size does not matter but conversions would).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[repr(C)]
pub(crate) struct BlockQ8 {
    pub d: f32,
    pub s: f32,
    pub qs: [i8; QK],
}

/// A weight format, as a block type that can be read from GGUF bytes.
pub(crate) trait WeightBlock: Copy + Default + Send + Sync + 'static {
    /// Bytes per block in the file.
    const BYTES: usize;
    fn from_bytes(bytes: &[u8]) -> Self;
    /// The 32 weights the block stands for.
    fn dequantize(&self, out: &mut [f32]);
}

fn f16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

pub(crate) fn f32_of(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

impl WeightBlock for BlockQ4_1 {
    const BYTES: usize = 20;

    fn from_bytes(bytes: &[u8]) -> Self {
        let mut qs = [0; QK / 2];
        qs.copy_from_slice(&bytes[4..Self::BYTES]);
        Self {
            d: f16_at(bytes, 0),
            m: f16_at(bytes, 2),
            qs,
        }
    }

    fn dequantize(&self, out: &mut [f32]) {
        let (d, m) = (f32_of(self.d), f32_of(self.m));
        for (j, &q) in self.qs.iter().enumerate() {
            out[j] = d * f32::from(q & 0x0f) + m;
            out[j + QK / 2] = d * f32::from(q >> 4) + m;
        }
    }
}

impl WeightBlock for BlockQ8_0 {
    const BYTES: usize = 34;

    fn from_bytes(bytes: &[u8]) -> Self {
        let mut qs = [0; QK];
        for (q, &b) in qs.iter_mut().zip(&bytes[2..Self::BYTES]) {
            *q = b as i8;
        }
        Self {
            d: f16_at(bytes, 0),
            qs,
        }
    }

    fn dequantize(&self, out: &mut [f32]) {
        let d = f32_of(self.d);
        for (o, &q) in out.iter_mut().zip(&self.qs) {
            *o = d * f32::from(q);
        }
    }
}

/// Quantizes one block of 32 activations the scalar way (the reference the
/// SIMD quantizers are tested against). Rounds half to even, as
/// `cvtps2dq` does.
#[inline(always)]
pub(crate) fn quantize_block(x: &[f32]) -> BlockQ8 {
    // The largest magnitude in eight lanes, so that it runs in a vector
    // (a fold in order was a chain of 32 scalar maxima, most of the
    // quantization's time). A maximum does not depend on the order.
    let mut lanes = [0.0f32; 8];
    for chunk in x.chunks_exact(8) {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(v.abs());
        }
    }
    let amax = lanes.iter().fold(0.0f32, |a, &v| a.max(v));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; QK];
    let mut sum = 0i32;
    for (q, &v) in qs.iter_mut().zip(x) {
        // In -127..=127 by construction of `id`.
        *q = (v * id).round_ties_even() as i8;
        sum += i32::from(*q);
    }
    BlockQ8 {
        d,
        s: d * sum as f32,
        qs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scale from the lanes' maxima is the one an in-order fold over
    /// the block gives, to the bit, whichever lane holds the largest.
    #[test]
    fn the_scale_is_the_largest_magnitude_over_127() {
        for at in 0..QK {
            for big in [3.5f32, -3.5, 1e-30, f32::MAX, -0.0] {
                let mut x: Vec<f32> = (0..QK).map(|i| (i as f32 * 0.37).sin() * 1e-31).collect();
                x[at] = big;
                let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                assert_eq!(
                    quantize_block(&x).d.to_bits(),
                    (amax / 127.0).to_bits(),
                    "{big} at {at}"
                );
            }
        }
    }

    #[test]
    fn q4_1_nibbles_are_low_then_high_halves() {
        let mut bytes = vec![0u8; 20];
        bytes[0..2].copy_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
        bytes[2..4].copy_from_slice(&f16::from_f32(-1.0).to_bits().to_le_bytes());
        bytes[4] = 0x3a; // weight 0 = 10, weight 16 = 3
        let block = BlockQ4_1::from_bytes(&bytes);
        let mut out = [0.0; QK];
        block.dequantize(&mut out);
        assert_eq!(out[0], 0.5 * 10.0 - 1.0);
        assert_eq!(out[16], 0.5 * 3.0 - 1.0);
        assert_eq!(out[1], -1.0);
    }

    #[test]
    fn q8_0_reads_signed_bytes() {
        let mut bytes = vec![0u8; 34];
        bytes[0..2].copy_from_slice(&f16::from_f32(2.0).to_bits().to_le_bytes());
        bytes[2] = 0xff;
        bytes[33] = 5;
        let mut out = [0.0; QK];
        BlockQ8_0::from_bytes(&bytes).dequantize(&mut out);
        assert_eq!((out[0], out[31]), (-2.0, 10.0));
    }

    #[test]
    fn quantized_activations_are_within_half_a_step() {
        let x: Vec<f32> = (0..QK).map(|i| (i as f32 - 13.3) * 0.37).collect();
        let b = quantize_block(&x);
        let sum: i32 = b.qs.iter().map(|&q| i32::from(q)).sum();
        assert!((b.s - b.d * sum as f32).abs() < 1e-6);
        for (&q, &v) in b.qs.iter().zip(&x) {
            assert!((b.d * f32::from(q) - v).abs() <= b.d * 0.5 + 1e-6);
        }
        assert_eq!(quantize_block(&[0.0; QK]).qs, [0; QK]);
    }
}
