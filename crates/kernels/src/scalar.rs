//! Portable kernels: the fallback on CPUs without the SIMD paths, and the
//! reference every SIMD kernel is tested against.
//!
//! A kernel multiplies `r` weight rows (`w`, `r * kb` blocks) by `n`
//! activation rows (`x`, `n * kb` blocks) into `out[j * r + i]`: weight row
//! `i` times activation row `j`, the product's own layout (`n × r`), so
//! that a prompt's rows need no transpose.

use crate::blocks::{BlockQ4_1, BlockQ8, BlockQ8_0, QK, f32_of};

pub(crate) fn dot_q4_1(w: &[BlockQ4_1], x: &[BlockQ8]) -> f32 {
    w.iter()
        .zip(x)
        .map(|(w, x)| {
            let mut sum = 0i32;
            for (j, &q) in w.qs.iter().enumerate() {
                sum += i32::from(q & 0x0f) * i32::from(x.qs[j]);
                sum += i32::from(q >> 4) * i32::from(x.qs[j + QK / 2]);
            }
            f32_of(w.d) * x.d * sum as f32 + f32_of(w.m) * x.s
        })
        .sum()
}

pub(crate) fn dot_q8_0(w: &[BlockQ8_0], x: &[BlockQ8]) -> f32 {
    w.iter()
        .zip(x)
        .map(|(w, x)| {
            let sum: i32 =
                w.qs.iter()
                    .zip(&x.qs)
                    .map(|(&a, &b)| i32::from(a) * i32::from(b))
                    .sum();
            f32_of(w.d) * x.d * sum as f32
        })
        .sum()
}

fn rows<W>(
    dot: fn(&[W], &[BlockQ8]) -> f32,
    w: &[W],
    kb: usize,
    x: &[BlockQ8],
    n: usize,
    out: &mut [f32],
) {
    let r = w.len() / kb;
    for (x, out) in x.chunks_exact(kb).take(n).zip(out.chunks_exact_mut(r)) {
        for (w, o) in w.chunks_exact(kb).zip(out.iter_mut()) {
            *o = dot(w, x);
        }
    }
}

pub(crate) fn rows_q4_1(w: &[BlockQ4_1], kb: usize, x: &[BlockQ8], n: usize, out: &mut [f32]) {
    rows(dot_q4_1, w, kb, x, n, out);
}

pub(crate) fn rows_q8_0(w: &[BlockQ8_0], kb: usize, x: &[BlockQ8], n: usize, out: &mut [f32]) {
    rows(dot_q8_0, w, kb, x, n, out);
}
