//! Rotary embeddings and causal self-attention over one generation's KV
//! cache. At one query position per step a dozen candle ops per layer cost
//! more than the arithmetic, and keeping K and V per KV head lets
//! grouped-query heads read them without copies. The per-head arithmetic
//! is `sluicegate_kernels::attend`, compiled for this CPU's SIMD.

use std::sync::Arc;

use sluicegate_kernels::Isa;

/// RoPE tables for the "normal" (interleaved pairs) llama layout.
pub struct Rope {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    pub fn new(head_dim: usize, base: f32, positions: usize) -> Self {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for pos in 0..positions {
            for f in &inv_freq {
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Self { half, cos, sin }
    }

    /// Rotates one head's vector for position `pos`.
    fn apply(&self, x: &mut [f32], pos: usize) {
        let at = pos * self.half;
        let (cos, sin) = (&self.cos[at..at + self.half], &self.sin[at..at + self.half]);
        for ((pair, c), s) in x.chunks_exact_mut(2).zip(cos).zip(sin) {
            let (a, b) = (pair[0], pair[1]);
            pair[0] = a * c - b * s;
            pair[1] = a * s + b * c;
        }
    }
}

/// Shapes of one attention layer.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
}

/// Positions a block of the cache holds: room is taken a block at a
/// time, never doubled, so what a cache holds stays within a block of
/// what it uses; and a cache that starts with another's positions shares
/// its whole blocks instead of copying them. The kernel's unrolled size.
pub const BLOCK_POSITIONS: usize = sluicegate_kernels::BLOCK_POSITIONS;

/// Bytes of one cached number (f16).
pub const NUMBER_BYTES: usize = std::mem::size_of::<u16>();

/// Blocks that `positions` take.
pub fn blocks(positions: usize) -> usize {
    positions.div_ceil(BLOCK_POSITIONS)
}

/// One block of a layer's cache: per KV head its keys, then per KV head
/// its values, as f16 (bits; see `sluicegate_kernels::narrow`). A head's
/// keys (already rotated) are dimension-major, for each dimension the
/// block's positions one after another, so that scores are vector
/// products over positions; its values are position-major.
type Block = Arc<[u16]>;

/// One layer's keys and values in blocks (vLLM's paged attention): the
/// block table of one generation. Blocks are shared by reference between
/// caches that hold the same positions (a kept prompt, the choices of one
/// request) and copied only when one of them writes into a shared one.
#[derive(Default, Clone)]
pub struct KvStore {
    n_kv_head: usize,
    head_dim: usize,
    blocks: Vec<Block>,
    /// Positions held: the last block may hold fewer than it has room for.
    len: usize,
}

impl KvStore {
    pub fn new(n_kv_head: usize, head_dim: usize) -> Self {
        Self {
            n_kv_head,
            head_dim,
            blocks: Vec::new(),
            len: 0,
        }
    }

    /// Numbers in one head's part of a block.
    fn part(&self) -> usize {
        BLOCK_POSITIONS * self.head_dim
    }

    /// A new block, zeroed: keys and values of every KV head. Collected
    /// straight into the shared allocation.
    fn new_block(&self) -> Block {
        std::iter::repeat_n(0, 2 * self.n_kv_head * self.part()).collect()
    }

    /// Forgets the positions from `positions` on. A shared block stays as
    /// it is for the others: writing into it again copies it first.
    pub fn truncate(&mut self, positions: usize) {
        self.len = self.len.min(positions);
        self.blocks.truncate(blocks(self.len));
    }

    /// The first `positions`, sharing their blocks.
    pub fn prefix(&self, positions: usize) -> Self {
        let mut copy = self.clone();
        copy.truncate(positions);
        copy
    }

    #[cfg(test)]
    pub(crate) fn filled(positions: usize, n_kv_head: usize, head_dim: usize) -> Self {
        let mut store = Self::new(n_kv_head, head_dim);
        store.blocks = (0..blocks(positions)).map(|_| store.new_block()).collect();
        store.len = positions;
        store
    }

    /// Bytes of the blocks it refers to, shared or not.
    pub fn bytes(&self) -> usize {
        self.blocks.iter().map(|b| b.len()).sum::<usize>() * NUMBER_BYTES
    }

    /// Its blocks, by identity: the same block in two caches is one.
    pub fn block_ids(&self) -> impl Iterator<Item = usize> + '_ {
        self.blocks
            .iter()
            .map(|b| Arc::as_ptr(b).cast::<u16>() as usize)
    }

    /// Whether its last block is partly filled and shared, so that the
    /// next position written copies it.
    pub fn shares_its_tail(&self) -> bool {
        !self.len.is_multiple_of(BLOCK_POSITIONS)
            && self.blocks.last().is_some_and(|b| Arc::strong_count(b) > 1)
    }

    /// Room to write position `pos` (the next one): a new block, or the
    /// last one made its own. Returns the block and the position's slot.
    fn slot(&mut self, pos: usize) -> (&mut [u16], usize) {
        let (block, slot) = (pos / BLOCK_POSITIONS, pos % BLOCK_POSITIONS);
        if block == self.blocks.len() {
            self.blocks.push(self.new_block());
        }
        (Arc::make_mut(&mut self.blocks[block]), slot)
    }

    /// The keys (`values` false) or values of KV head `h`, block by block.
    fn head(&self, h: usize, values: bool) -> Vec<&[u16]> {
        let part = self.part();
        let at = (usize::from(values) * self.n_kv_head + h) * part;
        self.blocks.iter().map(|b| &b[at..at + part]).collect()
    }
}

/// Query rows per parallel task of a prompt's attention.
const ROWS_PER_TASK: usize = 8;

/// Below this many query-by-key scores a few rows' attention stays on the
/// calling thread: a parallel region costs more than it saves.
const SCORES_PER_PARALLEL_HEADS: usize = 4096;

/// Attention for `seq` new positions after `start` cached ones. `qkv` holds
/// per position the Q heads, then K heads, then V heads (un-rotated); `out`
/// receives per position the heads' outputs, `n_head * head_dim` wide.
/// Each query row is computed the same way whatever the rows beside it,
/// and whichever thread runs it: a prompt's rows run in parallel, and a
/// few rows over a long cache (decoding) run their KV heads in parallel.
pub fn attend(
    qkv: &[f32],
    seq: usize,
    start: usize,
    heads: Heads,
    rope: &Rope,
    store: &mut KvStore,
    out: &mut [f32],
) {
    use rayon::prelude::*;
    let Heads {
        n_head,
        n_kv_head,
        head_dim: hd,
    } = heads;
    let (q_width, kv_width) = (n_head * hd, n_kv_head * hd);
    let width = q_width + 2 * kv_width;
    if store.n_kv_head != n_kv_head || store.head_dim != hd {
        *store = KvStore::new(n_kv_head, hd);
    }
    let isa = Isa::detect();
    let part = store.part();
    let (mut key, mut narrow) = (vec![0.0f32; hd], vec![0u16; hd]);
    for s in 0..seq {
        let row = &qkv[s * width..(s + 1) * width];
        let (block, slot) = store.slot(start + s);
        for h in 0..n_kv_head {
            let key_at = q_width + h * hd;
            key.copy_from_slice(&row[key_at..key_at + hd]);
            rope.apply(&mut key, start + s);
            sluicegate_kernels::narrow(isa, &key, &mut narrow);
            let keys = &mut block[h * part..][..part];
            for (d, &bits) in narrow.iter().enumerate() {
                keys[d * BLOCK_POSITIONS + slot] = bits;
            }
            let value_at = q_width + kv_width + h * hd;
            let to = (n_kv_head + h) * part + slot * hd;
            sluicegate_kernels::narrow(isa, &row[value_at..value_at + hd], &mut block[to..to + hd]);
        }
    }
    store.len = start + seq;

    let store = &*store;
    let rows = |first: usize, out: &mut [f32]| {
        let rows = out.len() / q_width;
        let at = Rows {
            qkv: &qkv[first * width..],
            rows,
            pos: start + first,
            heads,
            isa,
        };
        for kv in 0..n_kv_head {
            at.scatter(kv, &at.kv_head(kv, rope, store), out);
        }
    };
    let out = &mut out[..seq * q_width];
    if seq >= 2 * ROWS_PER_TASK {
        out.par_chunks_mut(ROWS_PER_TASK * q_width)
            .enumerate()
            .for_each(|(c, out)| rows(c * ROWS_PER_TASK, out));
    } else if seq * (start + seq) * n_head >= SCORES_PER_PARALLEL_HEADS && n_kv_head > 1 {
        let at = Rows {
            qkv,
            rows: seq,
            pos: start,
            heads,
            isa,
        };
        let outs: Vec<Vec<f32>> = (0..n_kv_head)
            .into_par_iter()
            .map(|kv| at.kv_head(kv, rope, store))
            .collect();
        for (kv, outs) in outs.iter().enumerate() {
            at.scatter(kv, outs, out);
        }
    } else {
        rows(0, out);
    }
}

/// `rows` consecutive query positions from `pos`.
struct Rows<'a> {
    qkv: &'a [f32],
    rows: usize,
    pos: usize,
    heads: Heads,
    isa: Isa,
}

impl Rows<'_> {
    /// One KV head's part: the query heads that share it at all the rows
    /// go to the kernel together, so each cached key and value is read
    /// once for all of them. Their outputs, row by row, head by head.
    fn kv_head(&self, kv: usize, rope: &Rope, store: &KvStore) -> Vec<f32> {
        let Self {
            qkv,
            rows,
            pos,
            heads,
            isa,
        } = *self;
        let hd = heads.head_dim;
        let (q_width, kv_width) = (heads.n_head * hd, heads.n_kv_head * hd);
        let width = q_width + 2 * kv_width;
        let group = heads.n_head / heads.n_kv_head;
        let scale = 1.0 / (hd as f32).sqrt();
        let queries_n = rows * group;
        let mut queries = vec![0.0f32; queries_n * hd];
        let mut visible = vec![0usize; queries_n];
        let mut outs = vec![0.0f32; queries_n * hd];
        let mut scores = vec![0.0f32; queries_n * (pos + rows)];
        for r in 0..rows {
            for g in 0..group {
                let h = kv * group + g;
                let i = r * group + g;
                let q = &mut queries[i * hd..(i + 1) * hd];
                q.copy_from_slice(&qkv[r * width + h * hd..][..hd]);
                rope.apply(q, pos + r);
                visible[i] = pos + r + 1;
            }
        }
        sluicegate_kernels::attend(
            isa,
            hd,
            &queries,
            &visible,
            &store.head(kv, false),
            &store.head(kv, true),
            scale,
            &mut scores,
            &mut outs,
        );
        outs
    }

    /// A KV head's outputs into their heads' places in `out`.
    fn scatter(&self, kv: usize, outs: &[f32], out: &mut [f32]) {
        let hd = self.heads.head_dim;
        let q_width = self.heads.n_head * hd;
        let group = self.heads.n_head / self.heads.n_kv_head;
        for r in 0..self.rows {
            for g in 0..group {
                let (h, i) = (kv * group + g, r * group + g);
                out[r * q_width + h * hd..][..hd].copy_from_slice(&outs[i * hd..][..hd]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADS: Heads = Heads {
        n_head: 4,
        n_kv_head: 2,
        head_dim: 8,
    };

    fn qkv(seq: usize, seed: f32) -> Vec<f32> {
        let width = (HEADS.n_head + 2 * HEADS.n_kv_head) * HEADS.head_dim;
        (0..seq * width)
            .map(|i| ((i as f32 + seed) * 0.37).sin())
            .collect()
    }

    #[test]
    fn decoding_one_position_at_a_time_equals_the_whole_prompt_at_once() {
        // 40 rows run in parallel tasks; 5 on the calling thread.
        for seq in [5, 40] {
            let rope = Rope::new(8, 10_000.0, 64);
            let all = qkv(seq, 1.0);
            let mut whole = KvStore::default();
            let mut at_once = vec![0.0; seq * 32];
            attend(&all, seq, 0, HEADS, &rope, &mut whole, &mut at_once);
            let width = all.len() / seq;
            let mut stepwise = KvStore::default();
            let mut one_by_one = Vec::new();
            for s in 0..seq {
                let mut out = vec![0.0; 32];
                let row = &all[s * width..(s + 1) * width];
                attend(row, 1, s, HEADS, &rope, &mut stepwise, &mut out);
                one_by_one.extend(out);
            }
            assert_eq!(at_once, one_by_one, "the same to the bit");
        }
    }

    #[test]
    fn a_long_caches_kv_heads_in_parallel_give_the_prompts_answer_to_the_bit() {
        // 1,100 positions: the last one decoded alone takes the parallel
        // KV heads (4 heads x 1,100 scores is past the threshold).
        let seq = 1100;
        assert!(seq * HEADS.n_head >= SCORES_PER_PARALLEL_HEADS);
        let rope = Rope::new(8, 10_000.0, seq);
        let all = qkv(seq, 4.0);
        let width = all.len() / seq;
        let mut whole = KvStore::default();
        let mut at_once = vec![0.0; seq * 32];
        attend(&all, seq, 0, HEADS, &rope, &mut whole, &mut at_once);
        let mut stepwise = KvStore::default();
        let mut first = vec![0.0; (seq - 1) * 32];
        attend(&all, seq - 1, 0, HEADS, &rope, &mut stepwise, &mut first);
        let mut last = vec![0.0; 32];
        let row = &all[(seq - 1) * width..];
        attend(row, 1, seq - 1, HEADS, &rope, &mut stepwise, &mut last);
        assert_eq!(last, at_once[(seq - 1) * 32..], "the same to the bit");
    }

    #[test]
    fn a_kept_prefix_continues_like_the_original() {
        let rope = Rope::new(8, 10_000.0, 16);
        let all = qkv(6, 2.0);
        let width = all.len() / 6;
        let mut full = KvStore::default();
        let mut first = vec![0.0; 6 * 32];
        attend(&all, 6, 0, HEADS, &rope, &mut full, &mut first);
        let mut copy = full.prefix(4);
        full.truncate(4);
        for store in [&mut full, &mut copy] {
            let mut again = vec![0.0; 2 * 32];
            attend(&all[4 * width..], 2, 4, HEADS, &rope, store, &mut again);
            assert_eq!(again, first[4 * 32..], "positions 4 and 5 again");
        }
        // Two bytes a number, and room taken a block at a time.
        let used = 6 * 2 * 2 * 8 * 2;
        assert!(full.bytes() >= used);
        assert!(
            full.bytes() <= BLOCK_POSITIONS * 2 * 2 * 8 * 2,
            "{}",
            full.bytes()
        );
    }

    #[test]
    fn a_prefix_shares_whole_blocks_and_a_write_copies_only_its_own() {
        let n = BLOCK_POSITIONS + 6;
        let rope = Rope::new(8, 10_000.0, n + 1);
        let (all, other) = (qkv(n + 1, 5.0), qkv(n, 9.0));
        let width = all.len() / (n + 1);
        let mut original = KvStore::default();
        let mut first = vec![0.0; n * 32];
        attend(
            &all[..n * width],
            n,
            0,
            HEADS,
            &rope,
            &mut original,
            &mut first,
        );
        let ids = |s: &KvStore| s.block_ids().collect::<Vec<_>>();
        let mut fork = original.prefix(n - 2);
        assert_eq!(ids(&fork), ids(&original), "shared, not copied");
        assert!(fork.shares_its_tail() && original.shares_its_tail());
        // The fork writes other rows at its last two positions: the block
        // they fall in becomes its own, the first stays shared.
        let mut out = vec![0.0; 2 * 32];
        let rows = &other[(n - 2) * width..];
        attend(rows, 2, n - 2, HEADS, &rope, &mut fork, &mut out);
        let (mine, theirs) = (ids(&fork), ids(&original));
        assert_eq!(mine[0], theirs[0]);
        assert_ne!(mine[1], theirs[1]);
        assert!(!original.shares_its_tail());
        // The original goes on as if the fork had never written.
        let mut next = vec![0.0; 32];
        let row = &all[n * width..];
        attend(row, 1, n, HEADS, &rope, &mut original, &mut next);
        let mut whole = KvStore::default();
        let mut want = vec![0.0; (n + 1) * 32];
        attend(&all, n + 1, 0, HEADS, &rope, &mut whole, &mut want);
        assert_eq!(next, want[n * 32..], "the same to the bit");
    }

    #[test]
    fn a_single_position_attends_only_to_itself() {
        // With one key the softmax weight is 1: the output is the value.
        let rope = Rope::new(8, 10_000.0, 4);
        let input = qkv(1, 3.0);
        let mut out = vec![0.0; 32];
        attend(
            &input,
            1,
            0,
            HEADS,
            &rope,
            &mut KvStore::default(),
            &mut out,
        );
        // As the cache keeps it: in f16.
        let v0: Vec<f32> = input[(HEADS.n_head + HEADS.n_kv_head) * 8..][..8]
            .iter()
            .map(|&v| half::f16::from_f32(v).to_f32())
            .collect();
        assert_eq!(&out[..8], v0, "head 0 reads KV head 0");
        assert_eq!(&out[8..16], v0, "head 1 shares KV head 0");
    }

    #[test]
    fn rope_rotates_pairs_and_keeps_their_length() {
        let rope = Rope::new(4, 10_000.0, 8);
        let mut x = [1.0, 0.0, 0.0, 2.0];
        rope.apply(&mut x, 0);
        assert_eq!(x, [1.0, 0.0, 0.0, 2.0], "position 0 is the identity");
        rope.apply(&mut x, 3);
        assert!((x[0].hypot(x[1]) - 1.0).abs() < 1e-6);
        assert!((x[2].hypot(x[3]) - 2.0).abs() < 1e-6);
        assert!(
            (x[0] - 3f32.cos()).abs() < 1e-6,
            "first pair turns by pos * 1"
        );
    }
}
