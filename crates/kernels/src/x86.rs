//! x86-64 kernels, one module per instruction set, all from one template:
//! 4-bit (or 8-bit) weights times 8-bit activations in integer lanes, one
//! f32 scale per block pair, as llama.cpp's `q4_1 · q8_1`.
//!
//! `avx2` multiplies with `vpmaddubsw` + `vpmaddwd`; `avxvnni` and
//! `avx512vnni` with one `vpdpbusd` (the latter also gets 32 vector
//! registers from AVX-512VL, so its many-row tile is larger).
//!
//! Tiles: a block of each of `NW` weight rows is unpacked once and
//! multiplied with the same block of `NX` activation rows.

macro_rules! kernels {
    (
        $name:ident, $features:literal,
        dot: |$u:ident, $s:ident| $dot:expr,
        tiles: (one_row: $nw1:literal, many_rows: $nw:literal x $nx:literal)
    ) => {
        pub(crate) mod $name {
            use std::arch::x86_64::*;

            use crate::blocks::{BlockQ4_1, BlockQ8, BlockQ8_0};

            /// Sums of four u8 × i8 products in each of 8 i32 lanes.
            #[target_feature(enable = $features)]
            #[inline]
            fn dot($u: __m256i, $s: __m256i) -> __m256i {
                $dot
            }

            #[target_feature(enable = $features)]
            #[inline]
            fn hsum(v: __m256) -> f32 {
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
            }

            #[target_feature(enable = $features)]
            #[inline]
            fn load_i8(qs: &[i8; 32]) -> __m256i {
                // SAFETY: `qs` is 32 readable bytes and `loadu` accepts
                // any alignment.
                unsafe { _mm256_loadu_si256(qs.as_ptr().cast()) }
            }

            /// The 32 nibbles of a Q4_1 block as bytes, in weight order.
            #[target_feature(enable = $features)]
            #[inline]
            fn load_q4(qs: &[u8; 16]) -> __m256i {
                // SAFETY: `qs` is 16 readable bytes and `loadu` accepts
                // any alignment.
                let raw = unsafe { _mm_loadu_si128(qs.as_ptr().cast()) };
                let mask = _mm_set1_epi8(0x0f);
                let lo = _mm_and_si128(raw, mask);
                let hi = _mm_and_si128(_mm_srli_epi16::<4>(raw), mask);
                _mm256_set_m128i(hi, lo)
            }

            /// Two f16 values to f32 in lanes 0 and 1.
            #[target_feature(enable = $features)]
            #[inline]
            fn halves(a: u16, b: u16) -> __m128 {
                _mm_cvtph_ps(_mm_cvtsi32_si128((u32::from(a) | u32::from(b) << 16) as i32))
            }

            /// A tile's results (weight row `ii`, activation row `jj`) into
            /// the `n × rows` output at weight row `i`, activation row `j`.
            #[inline(always)]
            fn put<const NW: usize, const NX: usize>(
                tile: &[[f32; NX]; NW],
                out: &mut [f32],
                rows: usize,
                i: usize,
                j: usize,
            ) {
                for (ii, row) in tile.iter().enumerate() {
                    for (jj, &v) in row.iter().enumerate() {
                        out[(j + jj) * rows + i + ii] = v;
                    }
                }
            }

            /// `N` rows of `kb` blocks. A loop rather than `array::from_fn`,
            /// so that it inlines and the optimizer sees every row is `kb`
            /// long (no bounds checks in the tile loops).
            #[inline(always)]
            fn rows_of<T, const N: usize>(all: &[T], kb: usize) -> [&[T]; N] {
                let mut rows: [&[T]; N] = [&[]; N];
                for (i, row) in rows.iter_mut().enumerate() {
                    *row = &all[i * kb..][..kb];
                }
                rows
            }

            /// `NW` weight rows times `NX` activation rows, `kb` blocks each.
            #[target_feature(enable = $features)]
            #[inline]
            ///
            /// Without `MINS` the `m · s` terms are left out, for
            /// `add_mins` to add for all activation rows at once.
            fn tile_q4_1<const NW: usize, const NX: usize, const MINS: bool>(
                w: &[BlockQ4_1],
                x: &[BlockQ8],
                kb: usize,
            ) -> [[f32; NX]; NW] {
                let w = rows_of::<BlockQ4_1, NW>(w, kb);
                let x = rows_of::<BlockQ8, NX>(x, kb);
                let mut acc = [[_mm256_setzero_ps(); NX]; NW];
                let mut mins = [[0.0f32; NX]; NW];
                for b in 0..kb {
                    let xq: [__m256i; NX] = std::array::from_fn(|j| load_i8(&x[j][b].qs));
                    let xd: [__m256; NX] = std::array::from_fn(|j| _mm256_set1_ps(x[j][b].d));
                    for i in 0..NW {
                        let block = &w[i][b];
                        let wq = load_q4(&block.qs);
                        let dm = halves(block.d, block.m);
                        let wd = _mm256_broadcastss_ps(dm);
                        let wm = _mm_cvtss_f32(_mm_movehdup_ps(dm));
                        for j in 0..NX {
                            // Scaled by x then by w: two vector ops, where
                            // `(wd * xd) * p` compiles to a scalar multiply,
                            // a broadcast and an FMA per block pair.
                            let p = _mm256_mul_ps(_mm256_cvtepi32_ps(dot(wq, xq[j])), xd[j]);
                            acc[i][j] = _mm256_fmadd_ps(p, wd, acc[i][j]);
                            if MINS {
                                mins[i][j] = wm.mul_add(x[j][b].s, mins[i][j]);
                            }
                        }
                    }
                }
                std::array::from_fn(|i| std::array::from_fn(|j| hsum(acc[i][j]) + mins[i][j]))
            }

            #[target_feature(enable = $features)]
            #[inline]
            fn tile_q4_1_all<const NW: usize, const NX: usize>(
                w: &[BlockQ4_1],
                x: &[BlockQ8],
                kb: usize,
            ) -> [[f32; NX]; NW] {
                tile_q4_1::<NW, NX, true>(w, x, kb)
            }

            #[target_feature(enable = $features)]
            #[inline]
            fn tile_q4_1_dots<const NW: usize, const NX: usize>(
                w: &[BlockQ4_1],
                x: &[BlockQ8],
                kb: usize,
            ) -> [[f32; NX]; NW] {
                tile_q4_1::<NW, NX, false>(w, x, kb)
            }

            /// Adds `Σ_b m[r][b] · s[j][b]` to `out` (`n × r`): per
            /// activation row, one multiply-add of a scalar into the `r`
            /// contiguous sums of its row, per block, instead of a scalar
            /// one per block pair inside the tiles.
            ///
            /// The sum starts at zero and is added last, in the order
            /// `tile_q4_1_all` uses for one row: a row's result is the same
            /// to the bit whether it is multiplied alone or in a batch, so
            /// batched decoding picks the same greedy tokens.
            #[target_feature(enable = $features)]
            fn add_mins(w: &[BlockQ4_1], kb: usize, x: &[BlockQ8], n: usize, out: &mut [f32]) {
                let r = w.len() / kb;
                // The weights' mins block-major: `mins[b * r + i]`.
                let mut mins = vec![0.0f32; kb * r];
                for (i, row) in w.chunks_exact(kb).enumerate() {
                    for (b, block) in row.iter().enumerate() {
                        mins[b * r + i] = _mm_cvtss_f32(halves(block.m, 0));
                    }
                }
                let mut sums = vec![0.0f32; r];
                for (row, out) in x.chunks_exact(kb).take(n).zip(out.chunks_exact_mut(r)) {
                    sums.fill(0.0);
                    for (block, m) in row.iter().zip(mins.chunks_exact(r)) {
                        for (acc, &m) in sums.iter_mut().zip(m) {
                            *acc = m.mul_add(block.s, *acc);
                        }
                    }
                    for (o, s) in out.iter_mut().zip(&sums) {
                        *o += s;
                    }
                }
            }

            #[target_feature(enable = $features)]
            #[inline]
            fn tile_q8_0<const NW: usize, const NX: usize>(
                w: &[BlockQ8_0],
                x: &[BlockQ8],
                kb: usize,
            ) -> [[f32; NX]; NW] {
                let w = rows_of::<BlockQ8_0, NW>(w, kb);
                let x = rows_of::<BlockQ8, NX>(x, kb);
                let mut acc = [[_mm256_setzero_ps(); NX]; NW];
                for b in 0..kb {
                    let xq: [__m256i; NX] = std::array::from_fn(|j| load_i8(&x[j][b].qs));
                    let xd: [__m256; NX] = std::array::from_fn(|j| _mm256_set1_ps(x[j][b].d));
                    for i in 0..NW {
                        let block = &w[i][b];
                        let wq = load_i8(&block.qs);
                        // |w| as unsigned bytes, w's sign moved onto x.
                        let wabs = _mm256_sign_epi8(wq, wq);
                        let wd = _mm256_broadcastss_ps(halves(block.d, 0));
                        for j in 0..NX {
                            let xs = _mm256_sign_epi8(xq[j], wq);
                            let p = _mm256_mul_ps(_mm256_cvtepi32_ps(dot(wabs, xs)), xd[j]);
                            acc[i][j] = _mm256_fmadd_ps(p, wd, acc[i][j]);
                        }
                    }
                }
                std::array::from_fn(|i| std::array::from_fn(|j| hsum(acc[i][j])))
            }

            /// Asks for the cache lines of `blocks` before they are read.
            #[target_feature(enable = $features)]
            #[inline]
            fn prefetch<T>(blocks: &[T]) {
                let start = blocks.as_ptr().cast::<i8>();
                for line in (0..std::mem::size_of_val(blocks)).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(line));
                }
            }

            /// Walks `NW × NX` tiles over the output (`n × rows`), with
            /// single-row tiles for what is left over.
            ///
            /// One activation row (decoding): weight rows in order.
            /// Several: `BAND` weight rows at a time (in the first level
            /// cache), each band times all the activation rows, `NX` at a
            /// time, so each tile's results land in a short run of an
            /// output row.
            ///
            /// The first time over each weight row, the weights of the
            /// one `AHEAD` tiles on are prefetched: the rows stream from
            /// memory, and the hardware's own prefetcher alone left the
            /// kernels waiting on their loads (perf, one stream's decode;
            /// without it, 8 streams' decode lost 5%).
            macro_rules! walk {
                ($tile:ident, $w:expr, $kb:expr, $x:expr, $n:expr, $out:expr, $NW:literal, $NX:literal) => {{
                    const AHEAD: usize = 4;
                    const BAND: usize = 32;
                    let (w, kb, x, n, out) = ($w, $kb, $x, $n, $out);
                    let rows = w.len() / kb;
                    let band = if n == 1 { rows } else { BAND };
                    let mut first = 0;
                    while first < rows {
                        let end = (first + band).min(rows);
                        let mut j = 0;
                        while j < n {
                            let here = if $NX > 1 && n - j >= $NX { $NX } else { 1 };
                            let x = &x[j * kb..(j + here) * kb];
                            let mut i = first;
                            while end - i >= $NW {
                                if j == 0 {
                                    if let Some(ahead) = w.get((i + AHEAD * $NW) * kb..(i + (AHEAD + 1) * $NW) * kb) {
                                        prefetch(ahead);
                                    }
                                }
                                let w = &w[i * kb..(i + $NW) * kb];
                                if here == $NX {
                                    put(&$tile::<$NW, $NX>(w, x, kb), out, rows, i, j);
                                } else {
                                    put(&$tile::<$NW, 1>(w, x, kb), out, rows, i, j);
                                }
                                i += $NW;
                            }
                            for i in i..end {
                                let w = &w[i * kb..(i + 1) * kb];
                                if here == $NX {
                                    put(&$tile::<1, $NX>(w, x, kb), out, rows, i, j);
                                } else {
                                    put(&$tile::<1, 1>(w, x, kb), out, rows, i, j);
                                }
                            }
                            j += here;
                        }
                        first = end;
                    }
                }};
            }

            /// See `scalar` for the layout of the arguments.
            #[target_feature(enable = $features)]
            pub(crate) fn rows_q4_1(
                w: &[BlockQ4_1],
                kb: usize,
                x: &[BlockQ8],
                n: usize,
                out: &mut [f32],
            ) {
                if n == 1 {
                    walk!(tile_q4_1_all, w, kb, x, n, out, $nw1, 1);
                } else {
                    walk!(tile_q4_1_dots, w, kb, x, n, &mut *out, $nw, $nx);
                    add_mins(w, kb, x, n, out);
                }
            }

            /// See `scalar` for the layout of the arguments.
            #[target_feature(enable = $features)]
            pub(crate) fn rows_q8_0(
                w: &[BlockQ8_0],
                kb: usize,
                x: &[BlockQ8],
                n: usize,
                out: &mut [f32],
            ) {
                if n == 1 {
                    walk!(tile_q8_0, w, kb, x, n, out, $nw1, 1);
                } else {
                    walk!(tile_q8_0, w, kb, x, n, out, $nw, $nx);
                }
            }
        }
    };
}

kernels!(
    avx2, "avx2,fma,f16c",
    dot: |u, s| _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)),
    tiles: (one_row: 4, many_rows: 2 x 2)
);

kernels!(
    avxvnni, "avx2,fma,f16c,avxvnni",
    dot: |u, s| _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s),
    tiles: (one_row: 4, many_rows: 2 x 2)
);

kernels!(
    avx512vnni, "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
    dot: |u, s| _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s),
    tiles: (one_row: 4, many_rows: 2 x 4)
);
