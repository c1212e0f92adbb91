//! One query head's attention over its keys and values: the scores
//! `q · k` scaled, their softmax, and the weighted sum of the values, in
//! f32 over keys and values stored as f16 (half the cache's bytes to
//! read, as llama.cpp keeps them), each row widened with F16C where the
//! CPU has it. The main crate builds for any x86-64, so its loops get
//! SSE2 at best; here the same code is compiled once per instruction set
//! (with FMA where the CPU has it) and picked at run time.

use crate::{Isa, IsaKind};

/// Lanes of independent partial sums in a dot product: one AVX-512
/// register, two AVX2 ones.
const LANES: usize = 16;

/// Attention of several queries over the same keys and values, each
/// query seeing the first `visible[i]` positions (causal prompts): the
/// queries `i` are `queries[i * hd..][..hd]`, the keys and values
/// (f16 bits, see [`narrow`]) in blocks (a paged cache's): a block of
/// keys dimension-major (for each of the `hd` dimensions, the block's
/// positions one after another), a block of values position-major
/// (positions × `hd`), each block room for whole positions, the outputs
/// go to
/// `out[i * hd..][..hd]`. `scores` is scratch, at least `queries ×
/// positions` long.
///
/// Each key and value is read once for all the queries, not once per
/// query: a prompt's attention is bound by how often the cache is read.
/// A query's result is the same to the bit whatever queries come with it.
///
/// # Panics
/// If the slices' lengths disagree, a block holds part of a position, or
/// a query sees more positions than there are.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    isa: Isa,
    hd: usize,
    queries: &[f32],
    visible: &[usize],
    keys: &[&[u16]],
    values: &[&[u16]],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let n = visible.len();
    let positions = visible.iter().copied().max().unwrap_or(0);
    assert!(hd > 0 && queries.len() == n * hd && out.len() == n * hd);
    let held = |blocks: &[&[u16]]| {
        assert!(blocks.iter().all(|b| b.len() % hd == 0), "whole positions");
        blocks.iter().map(|b| b.len()).sum::<usize>()
    };
    assert!(held(keys) >= positions * hd && held(values) >= positions * hd);
    assert!(scores.len() >= n * positions);
    let args = Args {
        hd,
        queries,
        visible,
        keys,
        values,
        scale,
    };
    let scores = &mut scores[..n * positions];
    match isa.0 {
        IsaKind::Scalar => many::<false, false>(&args, positions, scores, out),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: an `Isa` of these kinds exists only once `available`
        // saw AVX2, FMA and F16C.
        IsaKind::Avx2 | IsaKind::AvxVnni => unsafe { many_avx2(&args, positions, scores, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, plus AVX-512F.
        IsaKind::Avx512Vnni => unsafe { many_avx512(&args, positions, scores, out) },
    }
}

/// f32 values as f16 bits, rounded to nearest even (as F16C's
/// `vcvtps2ph` and the `half` crate round): how keys and values are
/// stored for [`attend`].
///
/// # Panics
/// If the slices' lengths differ.
pub fn narrow(isa: Isa, src: &[f32], dst: &mut [u16]) {
    assert_eq!(src.len(), dst.len());
    match isa.0 {
        IsaKind::Scalar => narrow_scalar(src, dst),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: an `Isa` other than `Scalar` exists only once
        // `available` saw AVX2, FMA and F16C.
        _ => unsafe { narrow_f16c(src, dst) },
    }
}

fn narrow_scalar(src: &[f32], dst: &mut [u16]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = half::f16::from_f32(*s).to_bits();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
fn narrow_f16c(src: &[f32], dst: &mut [u16]) {
    use std::arch::x86_64::*;
    let whole = src.len() / 8 * 8;
    for (s, d) in src[..whole]
        .chunks_exact(8)
        .zip(dst[..whole].chunks_exact_mut(8))
    {
        // SAFETY: 8 f32 are read from and 8 u16 written to slices of
        // exactly that length (unaligned loads and stores).
        unsafe {
            let x = _mm256_loadu_ps(s.as_ptr());
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x);
            _mm_storeu_si128(d.as_mut_ptr().cast(), h);
        }
    }
    narrow_scalar(&src[whole..], &mut dst[whole..]);
}

/// f16 bits widened to f32: with F16C in the SIMD builds (`F16C`),
/// else one by one.
#[inline(always)]
fn widen<const F16C: bool>(src: &[u16], dst: &mut [f32]) {
    let mut whole = 0;
    #[cfg(target_arch = "x86_64")]
    if F16C {
        use std::arch::x86_64::*;
        whole = src.len().min(dst.len()) / 8 * 8;
        for (s, d) in src[..whole]
            .chunks_exact(8)
            .zip(dst[..whole].chunks_exact_mut(8))
        {
            // SAFETY: `F16C` is true only where `many` is inlined into
            // `many_avx2` or `many_avx512`, compiled with F16C, whose
            // callers hold an `Isa` that saw it; 8 u16 are read from and 8
            // f32 written to slices of exactly that length (unaligned).
            unsafe {
                let h = _mm_loadu_si128(s.as_ptr().cast());
                _mm256_storeu_ps(d.as_mut_ptr(), _mm256_cvtph_ps(h));
            }
        }
    }
    for (d, s) in dst[whole..].iter_mut().zip(&src[whole..]) {
        *d = half::f16::from_bits(*s).to_f32();
    }
}

struct Args<'a> {
    hd: usize,
    queries: &'a [f32],
    visible: &'a [usize],
    keys: &'a [&'a [u16]],
    values: &'a [&'a [u16]],
    scale: f32,
}

/// The positions' rows (keys or values), block after block.
#[inline(always)]
fn rows<'a>(blocks: &'a [&'a [u16]], hd: usize) -> impl Iterator<Item = &'a [u16]> + 'a {
    blocks.iter().flat_map(move |b| b.chunks_exact(hd))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn many_avx2(args: &Args<'_>, positions: usize, scores: &mut [f32], out: &mut [f32]) {
    many::<true, false>(args, positions, scores, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
fn many_avx512(args: &Args<'_>, positions: usize, scores: &mut [f32], out: &mut [f32]) {
    many::<true, true>(args, positions, scores, out);
}

/// Picks the loops for the head width: the usual 64 gets its vectors
/// unrolled and each query's output kept in registers. `AVX512`: called
/// only from [`many_avx512`].
#[inline(always)]
fn many<const FMA: bool, const AVX512: bool>(
    args: &Args<'_>,
    positions: usize,
    scores: &mut [f32],
    out: &mut [f32],
) {
    // A block of keys, then of values, widened: one buffer for both.
    let mut wide = Vec::new();
    if args.hd == 64 {
        scores_and_softmax::<FMA, AVX512, 64>(args, positions, scores, &mut wide);
        weighted_values::<FMA, 64>(args, positions, scores, &mut wide, out);
    } else {
        scores_and_softmax::<FMA, AVX512, 0>(args, positions, scores, &mut wide);
        weighted_values::<FMA, 0>(args, positions, scores, &mut wide, out);
    }
}

/// The head width: `HD`, or the arguments' when `HD` is 0.
#[inline(always)]
fn width<const HD: usize>(args: &Args<'_>) -> usize {
    if HD == 0 { args.hd } else { HD }
}

#[inline(always)]
fn scores_and_softmax<const FMA: bool, const AVX512: bool, const HD: usize>(
    args: &Args<'_>,
    positions: usize,
    scores: &mut [f32],
    wide: &mut Vec<f32>,
) {
    let hd = width::<HD>(args);
    // Scores a block at a time: its keys widened once for all the queries,
    // then each query's dot products with all the block's keys at once,
    // dimension by dimension (keys are stored dimension-major), so each
    // multiply-add is a whole vector of positions and no dot product
    // ends in a sum across lanes. Key by key, those sums were most of
    // decode attention.
    let mut first = 0;
    for block in args.keys {
        let room = block.len() / hd;
        let here = room.min(positions - first);
        wide.resize(block.len(), 0.0);
        widen::<FMA>(block, wide);
        for (i, q) in args.queries.chunks_exact(hd).enumerate() {
            let seen = args.visible[i].saturating_sub(first).min(here);
            if seen == 0 {
                continue;
            }
            let row = &mut scores[i * positions + first..][..seen];
            #[cfg(target_arch = "x86_64")]
            if AVX512 && room == BLOCK_POSITIONS {
                // SAFETY: `AVX512` is true only inside `many_avx512`, whose
                // callers hold an `Isa` that saw AVX-512F and FMA.
                unsafe { block_dots_avx512(q, wide, args.scale, row) };
                continue;
            }
            if room == BLOCK_POSITIONS {
                block_dots::<FMA>(q, wide, args.scale, row);
            } else {
                for (p, score) in row.iter_mut().enumerate() {
                    let mut dot = 0.0;
                    for (d, &qd) in q.iter().enumerate() {
                        dot = madd::<FMA>(qd, wide[d * room + p], dot);
                    }
                    *score = dot * args.scale;
                }
            }
        }
        first += here;
        if first == positions {
            break;
        }
    }
    // Each query's softmax over what it sees: every loop a plain one over
    // the row (lanes of partial sums where order would chain them), so
    // that it runs in vectors. `exp` was most of a long prompt's attention
    // as a library call per score.
    for (i, row) in scores.chunks_exact_mut(positions).enumerate() {
        let row = &mut row[..args.visible[i]];
        let max = lane_max(row);
        for score in row.iter_mut() {
            *score = exp::<FMA>(*score - max);
        }
        let inv = 1.0 / lane_sum(row);
        for score in row.iter_mut() {
            *score *= inv;
        }
    }
}

/// `e^x` within two units in the last place for `x` in `[-87, 88]`
/// (outside, that of the nearer end: about 1.6e-38 below, which a softmax
/// cannot tell from 0, and 1.7e38 above): `2^n · e^r` with `r` in
/// `[-ln 2 / 2, ln 2 / 2]` and Cephes' `expf` polynomial for `e^r`. No
/// branch and no call, so a loop of it is a vector loop.
#[inline(always)]
pub(crate) fn exp<const FMA: bool>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts: `n · LN2_HI` is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let n = madd::<FMA>(x, LOG2E, 0.5).floor();
    let r = madd::<FMA>(n, -LN2_LO, madd::<FMA>(n, -LN2_HI, x));
    let mut p = 1.987_569_1e-4;
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = madd::<FMA>(p, r, c);
    }
    let e_r = madd::<FMA>(p, r * r, r + 1.0);
    // n is in [-126, 127]: 2^n is a normal number, built from its
    // exponent. Added to 2^23, the integer `n + 127` is the sum's low
    // mantissa bits, which the shift moves into the exponent (the bits of
    // 2^23 leave the word): a vector add and shift, where `n as i32`
    // (saturating) was a scalar conversion per lane.
    const BIAS: f32 = 8_388_608.0 + 127.0;
    e_r * f32::from_bits((n + BIAS).to_bits() << 23)
}

/// A row's largest value, in `LANES` running maxima (`f32::max`, which
/// orders NaN, is a scalar compare per value). Scores are never NaN.
#[inline(always)]
fn lane_max(row: &[f32]) -> f32 {
    let larger = |a: f32, b: f32| if b > a { b } else { a };
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, larger);
    for chunk in chunks {
        for i in 0..LANES {
            acc[i] = larger(acc[i], chunk[i]);
        }
    }
    acc.into_iter().fold(tail, larger)
}

/// A row's sum in `LANES` partial sums.
#[inline(always)]
fn lane_sum(row: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for i in 0..LANES {
            acc[i] += chunk[i];
        }
    }
    fold_lanes(&mut acc) + tail
}

/// The lanes' total, halves added pairwise: a few vector adds, where a
/// sum in lane order is a chain of sixteen scalar ones.
#[inline(always)]
fn fold_lanes(acc: &mut [f32; LANES]) -> f32 {
    let mut w = LANES / 2;
    while w > 0 {
        for i in 0..w {
            acc[i] += acc[i + w];
        }
        w /= 2;
    }
    acc[0]
}

/// Each query's weighted sum of the values it sees. For the usual width,
/// a block of values at a time, widened once for all the queries (as the
/// keys are for the scores), each query's sums carried from block to
/// block; per query the same multiply-adds in the same order as alone.
#[inline(always)]
fn weighted_values<const FMA: bool, const HD: usize>(
    args: &Args<'_>,
    positions: usize,
    scores: &[f32],
    wide: &mut Vec<f32>,
    out: &mut [f32],
) {
    let hd = width::<HD>(args);
    if HD == 0 {
        let mut acc = vec![0.0f32; hd];
        wide.resize(hd, 0.0);
        for (i, o) in out.chunks_exact_mut(hd).enumerate() {
            let seen = args.visible[i];
            let weights = &scores[i * positions..][..seen];
            acc.fill(0.0);
            for (&w, value) in weights.iter().zip(rows(args.values, hd)) {
                widen::<FMA>(value, &mut wide[..hd]);
                for (a, &v) in acc.iter_mut().zip(wide.iter()) {
                    *a = madd::<FMA>(w, v, *a);
                }
            }
            o.copy_from_slice(&acc);
        }
        return;
    }
    // Per query two sums, of even and odd positions (each pair within a
    // block), so that each multiply-add waits on the one two values
    // back, not one: `sums` holds a query's even sums, then its odd ones.
    let mut sums = vec![0.0f32; 2 * out.len()];
    let mut at = 0;
    for block in args.values {
        let room = (block.len() / HD).min(positions - at);
        wide.resize(room * HD, 0.0);
        widen::<FMA>(&block[..room * HD], &mut wide[..room * HD]);
        for (i, sum) in sums.chunks_exact_mut(2 * HD).enumerate() {
            let seen = args.visible[i];
            if seen <= at {
                continue;
            }
            let here = room.min(seen - at);
            let weights = &scores[i * positions + at..][..here];
            let (mut even, mut odd) = ([0.0f32; 64], [0.0f32; 64]);
            let (even, odd) = (&mut even[..HD], &mut odd[..HD]);
            even.copy_from_slice(&sum[..HD]);
            odd.copy_from_slice(&sum[HD..]);
            for (w, values) in weights.chunks_exact(2).zip(wide.chunks_exact(2 * HD)) {
                let (v0, v1) = values.split_at(HD);
                for d in 0..HD {
                    even[d] = madd::<FMA>(w[0], v0[d], even[d]);
                    odd[d] = madd::<FMA>(w[1], v1[d], odd[d]);
                }
            }
            if here % 2 == 1 {
                let (w, v) = (weights[here - 1], &wide[(here - 1) * HD..][..HD]);
                for d in 0..HD {
                    even[d] = madd::<FMA>(w, v[d], even[d]);
                }
            }
            sum[..HD].copy_from_slice(even);
            sum[HD..].copy_from_slice(odd);
        }
        at += room;
        if at == positions {
            break;
        }
    }
    for (o, sum) in out.chunks_exact_mut(HD).zip(sums.chunks_exact(2 * HD)) {
        let (even, odd) = sum.split_at(HD);
        for ((o, e), d) in o.iter_mut().zip(even).zip(odd) {
            *o = e + d;
        }
    }
}

/// Positions in a block of the paged cache: its blocks get the unrolled
/// dot products of [`block_dots`]; other sizes a plain loop.
pub const BLOCK_POSITIONS: usize = 64;

/// One query's scaled dot products with a [`BLOCK_POSITIONS`] of keys
/// (widened, dimension-major) into `out` (the first `out.len()`
/// positions). Sixteen positions at a time, each position's sum in four
/// partial sums over the dimensions (`d` mod 4): small arrays of fixed
/// size that the compiler keeps in registers, and four multiply-adds
/// that do not wait on each other. Per position the same sum in the
/// same order, whatever the block's other positions (and the same as
/// [`block_dots_avx512`]'s).
#[inline(always)]
fn block_dots<const FMA: bool>(q: &[f32], keys: &[f32], scale: f32, out: &mut [f32]) {
    const W: usize = 16;
    let whole = q.len() / 4 * 4;
    for (c, out) in out.chunks_mut(W).enumerate() {
        let mut acc = [[0.0f32; W]; 4];
        for d in (0..whole).step_by(4) {
            for (u, acc) in acc.iter_mut().enumerate() {
                let (qd, k) = (q[d + u], &keys[(d + u) * BLOCK_POSITIONS + c * W..][..W]);
                for l in 0..W {
                    acc[l] = madd::<FMA>(qd, k[l], acc[l]);
                }
            }
        }
        for d in whole..q.len() {
            let (qd, k) = (q[d], &keys[d * BLOCK_POSITIONS + c * W..][..W]);
            for l in 0..W {
                acc[0][l] = madd::<FMA>(qd, k[l], acc[0][l]);
            }
        }
        // All `W` lanes, then as many as `out` has: a loop over `out`'s
        // own length was scalar.
        let mut sums = [0.0f32; W];
        for (l, s) in sums.iter_mut().enumerate() {
            *s = ((acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l])) * scale;
        }
        out.copy_from_slice(&sums[..out.len()]);
    }
}

/// [`block_dots`] with the whole block at once in AVX-512 registers:
/// sixteen sums (four groups of sixteen positions, four partial sums
/// each) that do not wait on each other, where the portable loop, left
/// to the compiler, kept four (more spilled them to the stack). The same
/// multiply-adds in the same order per position.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
fn block_dots_avx512(q: &[f32], keys: &[f32], scale: f32, out: &mut [f32]) {
    use std::arch::x86_64::*;
    const P: usize = BLOCK_POSITIONS;
    let keys = &keys[..q.len() * P];
    let mut acc = [[_mm512_setzero_ps(); 4]; 4];
    let (whole, rest) = q.split_at(q.len() / 4 * 4);
    for (q4, k4) in whole.chunks_exact(4).zip(keys.chunks_exact(4 * P)) {
        for u in 0..4 {
            let qd = _mm512_set1_ps(q4[u]);
            let k = &k4[u * P..][..P];
            for (c, acc) in acc.iter_mut().enumerate() {
                // SAFETY: 16 f32 from `k`, which holds `P` = 64 of them,
                // at `c * 16` for `c` < 4 (unaligned load).
                let kv = unsafe { _mm512_loadu_ps(k.as_ptr().add(c * 16)) };
                acc[u] = _mm512_fmadd_ps(qd, kv, acc[u]);
            }
        }
    }
    let k_rest = &keys[whole.len() * P..];
    for (&qd, k) in rest.iter().zip(k_rest.chunks_exact(P)) {
        let qd = _mm512_set1_ps(qd);
        for (c, acc) in acc.iter_mut().enumerate() {
            // SAFETY: as above.
            let kv = unsafe { _mm512_loadu_ps(k.as_ptr().add(c * 16)) };
            acc[0] = _mm512_fmadd_ps(qd, kv, acc[0]);
        }
    }
    let mut sums = [0.0f32; P];
    let scale = _mm512_set1_ps(scale);
    for (c, a) in acc.iter().enumerate() {
        let sum = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
        // SAFETY: 16 f32 into `sums`, which holds 64, at `c * 16` for
        // `c` < 4 (unaligned store).
        unsafe { _mm512_storeu_ps(sums.as_mut_ptr().add(c * 16), _mm512_mul_ps(sum, scale)) };
    }
    out.copy_from_slice(&sums[..out.len()]);
}

/// `a · b + c`, fused where the caller was compiled with FMA (elsewhere a
/// fused multiply-add is a slow library call).
#[inline(always)]
pub(crate) fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain f64 attention, the reference.
    fn reference(q: &[f32], keys: &[f32], values: &[f32], scale: f32) -> Vec<f32> {
        let hd = q.len();
        let scores: Vec<f64> = keys
            .chunks_exact(hd)
            .map(|k| q.iter().zip(k).map(|(a, b)| f64::from(a * b)).sum::<f64>() * f64::from(scale))
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f64 = exps.iter().sum();
        let mut out = vec![0.0f64; hd];
        for (e, v) in exps.iter().zip(values.chunks_exact(hd)) {
            for (o, &v) in out.iter_mut().zip(v) {
                *o += e / sum * f64::from(v);
            }
        }
        out.into_iter().map(|v| v as f32).collect()
    }

    /// Keys or values (positions × `hd`) as a paged cache holds them:
    /// blocks with room for `room` positions, keys dimension-major.
    fn paged(bits: &[u16], hd: usize, room: usize, keys: bool) -> Vec<Vec<u16>> {
        bits.chunks(room * hd)
            .map(|chunk| {
                let mut block = vec![0u16; room * hd];
                for p in 0..chunk.len() / hd {
                    for d in 0..hd {
                        let at = if keys { d * room + p } else { p * hd + d };
                        block[at] = chunk[p * hd + d];
                    }
                }
                block
            })
            .collect()
    }

    #[test]
    fn every_isa_matches_the_reference_and_queries_do_not_disturb_each_other() {
        let mut seed = 7u32;
        let mut next = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1 << 24) as f32 * 2.0 - 1.0
        };
        for (hd, positions) in [(64usize, 1usize), (64, 37), (48, 300), (8, 5), (6, 70)] {
            // As stored: f16, and the reference reads the same values.
            let stored = |n: usize, next: &mut dyn FnMut() -> f32| {
                let wide: Vec<f32> = (0..n).map(|_| next()).collect();
                let mut bits = vec![0u16; n];
                narrow(Isa(IsaKind::Scalar), &wide, &mut bits);
                let wide: Vec<f32> = bits
                    .iter()
                    .map(|&b| half::f16::from_bits(b).to_f32())
                    .collect();
                (bits, wide)
            };
            let (keys, keys_f32) = stored(hd * positions, &mut next);
            let (values, values_f32) = stored(hd * positions, &mut next);
            // Causal: query i sees positions - 2 + i, at least 1.
            let visible: Vec<usize> = (0..3)
                .map(|i| (positions + i).saturating_sub(2).clamp(1, positions))
                .collect();
            let queries: Vec<f32> = (0..3 * hd).map(|_| next()).collect();
            // One block, blocks of 3 positions (odd, so that the value
            // pairs straddle them), and blocks of `BLOCK_POSITIONS` (the
            // unrolled dot products), the last one partly filled.
            for room in [positions, 3, BLOCK_POSITIONS] {
                let (key_blocks, value_blocks) = (
                    paged(&keys, hd, room, true),
                    paged(&values, hd, room, false),
                );
                let keys: Vec<&[u16]> = key_blocks.iter().map(Vec::as_slice).collect();
                let values: Vec<&[u16]> = value_blocks.iter().map(Vec::as_slice).collect();
                let (keys, values) = (&keys[..], &values[..]);
                for isa in Isa::available() {
                    let mut scores = vec![0.0; 3 * positions];
                    let mut out = vec![0.0; 3 * hd];
                    attend(
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
                    for (i, &seen) in visible.iter().enumerate() {
                        let q = &queries[i * hd..][..hd];
                        let want =
                            reference(q, &keys_f32[..seen * hd], &values_f32[..seen * hd], 0.125);
                        let got = &out[i * hd..][..hd];
                        for (g, w) in got.iter().zip(&want) {
                            assert!((g - w).abs() < 1e-5, "{} hd {hd}: {g} vs {w}", isa.name());
                        }
                        let mut alone = vec![0.0; hd];
                        let mut scratch = vec![0.0; seen];
                        attend(
                            isa,
                            hd,
                            q,
                            &[seen],
                            keys,
                            values,
                            0.125,
                            &mut scratch,
                            &mut alone,
                        );
                        assert_eq!(got, &alone[..], "{} query {i}", isa.name());
                    }
                }
            }
        }
    }

    #[test]
    fn every_isa_narrows_to_f16_as_the_half_crate_rounds() {
        let mut values: Vec<f32> = (0..1000)
            .map(|i| (i as f32 * 0.731).sin() * 70_000.0)
            .collect();
        values.extend([
            0.0,
            -0.0,
            1e-8,
            -1e-8,
            65_504.0,
            65_520.0,
            f32::INFINITY,
            6.1e-5,
            3.0e-5,
        ]);
        let want: Vec<u16> = values
            .iter()
            .map(|&v| half::f16::from_f32(v).to_bits())
            .collect();
        for isa in Isa::available() {
            let mut got = vec![0u16; values.len()];
            narrow(isa, &values, &mut got);
            assert_eq!(got, want, "{}", isa.name());
        }
    }

    #[test]
    fn exp_is_within_two_ulps_from_minus_87_to_88() {
        let mut x = 88.0f32;
        while x > -87.0 {
            let (fast, fused) = (exp::<false>(x), exp::<true>(x));
            let want = f64::from(x).exp();
            // Two units in the last place: 2 × 2^-23 of the value.
            for got in [fast, fused] {
                let err = (f64::from(got) - want).abs() / want;
                assert!(err < 2.5e-7, "exp({x}) = {got}, want {want}: {err:e}");
            }
            x -= 0.013_7;
        }
        assert_eq!(exp::<false>(0.0), 1.0);
        assert!(exp::<true>(-200.0) < 1e-37);
    }
}
