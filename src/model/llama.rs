//! A llama-family decoder shaped for serving: weights loaded once and
//! shared by every generation, each generation with its own KV cache.
//!
//! Differences from candle's stock `quantized_llama`, each for speed:
//! - Projections run on `sluicegate_kernels` over the weights as the file
//!   stores them (Q4_1 and Q8_0; other types are re-quantized to Q8_0 at
//!   load), for one row and for a prompt's many rows alike: decode reads 4
//!   bits per weight, and no f32 copy of a matrix is ever made.
//! - Q, K and V are one matmul, and so are gate and up (their stored rows
//!   concatenated): fewer passes over the activations and fewer dispatches
//!   per token.
//! - The embedding table stays quantized (rows are dequantized on lookup)
//!   and doubles as the output projection when the two are tied.
//! - Attention and RoPE run as plain loops over a KV cache kept per KV
//!   head (see `attention`), instead of a dozen tensor ops per layer.
//! - Several sequences share one forward pass (`forward_batch`): their
//!   rows go through every projection together.

use std::fs::File;
use std::io::{BufReader, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;

use candle_core::Device;
use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use sluicegate_kernels::{Format, QMatrix};

use super::attention::{self, Heads, KvStore, Rope};

pub type Result<T> = candle_core::Result<T>;

#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub context_length: usize,
    pub rope_base: f32,
    pub rms_eps: f32,
    pub vocab_size: usize,
}

impl LlamaConfig {
    /// Reads the hyper-parameters of a `llama` GGUF.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let get = |key: &str| {
            content
                .metadata
                .get(&format!("llama.{key}"))
                .ok_or_else(|| candle_core::Error::Msg(format!("missing llama.{key}")))
        };
        let arch = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .map_or("", String::as_str);
        if arch != "llama" {
            candle_core::bail!("architecture `{arch}` is not of the llama family");
        }
        let n_embd = get("embedding_length")?.to_u32()? as usize;
        let n_head = get("attention.head_count")?.to_u32()? as usize;
        let n_kv_head = get("attention.head_count_kv")
            .and_then(|v| v.to_u32())
            .map_or(n_head, |v| v as usize);
        let vocab_size = match content.metadata.get("tokenizer.ggml.tokens") {
            Some(tokens) => tokens.to_vec()?.len(),
            None => get("vocab_size")?.to_u32()? as usize,
        };
        Ok(Self {
            n_layer: get("block_count")?.to_u32()? as usize,
            n_head,
            n_kv_head,
            head_dim: n_embd / n_head,
            n_embd,
            n_ff: get("feed_forward_length")?.to_u32()? as usize,
            context_length: get("context_length")?.to_u32()? as usize,
            rope_base: get("rope.freq_base")
                .and_then(|v| v.to_f32())
                .unwrap_or(10_000.0),
            rms_eps: get("attention.layer_norm_rms_epsilon")
                .and_then(|v| v.to_f32())
                .unwrap_or(1e-5),
            vocab_size,
        })
    }

    fn heads(&self) -> Heads {
        Heads {
            n_head: self.n_head,
            n_kv_head: self.n_kv_head,
            head_dim: self.head_dim,
        }
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    /// Q, K and V projections stacked: `n_head + 2 * n_kv_head` heads out.
    qkv: QMatrix,
    wo: QMatrix,
    ffn_norm: Vec<f32>,
    /// Gate and up projections stacked: `2 * n_ff` out.
    gate_up: QMatrix,
    down: QMatrix,
}

/// The model's weights, shared by all generations.
pub struct Weights {
    pub config: LlamaConfig,
    /// Shared with `output` when the embeddings are tied.
    embedding: Arc<QMatrix>,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    output: Arc<QMatrix>,
    rope: Rope,
}

/// One generation's attention state.
pub struct Cache {
    layers: Vec<KvStore>,
    /// Positions already in the cache.
    pub position: usize,
}

/// Loads the metadata and weights of a GGUF file.
pub fn load(path: &Path) -> Result<(gguf_file::Content, Weights)> {
    let device = Device::Cpu;
    let mut reader = BufReader::new(File::open(path)?);
    let content = gguf_file::Content::read(&mut reader)?;
    let config = LlamaConfig::from_gguf(&content)?;
    let reader = &mut reader;
    let vector = |reader: &mut BufReader<File>, name: &str| {
        content
            .tensor(reader, name, &device)?
            .dequantize(&device)?
            .flatten_all()?
            .to_vec1::<f32>()
    };

    let embedding = Arc::new(matrix(&content, reader, "token_embd.weight")?);
    let mut layers = Vec::with_capacity(config.n_layer);
    for i in 0..config.n_layer {
        let name = |part: &str| format!("blk.{i}.{part}.weight");
        let mut get = |part: &str| matrix(&content, reader, &name(part));
        let qkv = stacked(vec![get("attn_q")?, get("attn_k")?, get("attn_v")?])?;
        let wo = get("attn_output")?;
        let gate_up = stacked(vec![get("ffn_gate")?, get("ffn_up")?])?;
        let down = get("ffn_down")?;
        layers.push(Layer {
            attn_norm: vector(reader, &name("attn_norm"))?,
            qkv,
            wo,
            ffn_norm: vector(reader, &name("ffn_norm"))?,
            gate_up,
            down,
        });
    }
    let output = if content.tensor_infos.contains_key("output.weight") {
        Arc::new(matrix(&content, reader, "output.weight")?)
    } else {
        // Tied embeddings: the output projection is the embedding table.
        Arc::clone(&embedding)
    };
    let norm = vector(reader, "output_norm.weight")?;
    let rope = Rope::new(config.head_dim, config.rope_base, config.context_length);
    let weights = Weights {
        config,
        embedding,
        layers,
        norm,
        output,
        rope,
    };
    Ok((content, weights))
}

/// The kernels' name for a GGUF type they multiply as stored.
fn kernel_format(dtype: GgmlDType) -> Option<Format> {
    match dtype {
        GgmlDType::Q4_1 => Some(Format::Q4_1),
        GgmlDType::Q8_0 => Some(Format::Q8_0),
        _ => None,
    }
}

/// A weight matrix as the file stores it when the kernels take its type;
/// any other type is re-quantized to Q8_0 (near-lossless from 4 to 6 bits).
fn matrix(
    content: &gguf_file::Content,
    reader: &mut BufReader<File>,
    name: &str,
) -> Result<QMatrix> {
    let info = content
        .tensor_infos
        .get(name)
        .ok_or_else(|| candle_core::Error::Msg(format!("missing tensor {name}")))?;
    let (rows, cols) = info.shape.dims2()?;
    let bad = |e: sluicegate_kernels::Error| candle_core::Error::Msg(format!("{name}: {e}"));
    match kernel_format(info.ggml_dtype) {
        Some(format) => {
            reader.seek(SeekFrom::Start(content.tensor_data_offset + info.offset))?;
            QMatrix::read(format, rows, cols, reader).map_err(bad)
        }
        None => {
            let f32s = content
                .tensor(reader, name, &Device::Cpu)?
                .dequantize(&Device::Cpu)?;
            let q8 = QTensor::quantize(&f32s, GgmlDType::Q8_0)?;
            QMatrix::from_bytes(Format::Q8_0, rows, cols, &q8.data()?).map_err(bad)
        }
    }
}

/// Several projections of the same input as one matrix (rows stacked, as
/// stored).
fn stacked(parts: Vec<QMatrix>) -> Result<QMatrix> {
    QMatrix::stack(parts).map_err(|e| candle_core::Error::Msg(format!("cannot stack: {e}")))
}

/// `x · Wᵀ` for `rows` rows of `x` (`rows × W.cols()`): `rows × W.rows()`.
pub fn project_rows(weights: &QMatrix, x: &[f32], rows: usize) -> Vec<f32> {
    weights.matmul(x, rows)
}

/// One sequence's share of a batched forward pass: its new tokens, after
/// the positions its cache holds.
pub struct Segment<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut Cache,
    /// Whether to compute the logits after its last token (a prompt chunk
    /// that is not the prompt's last needs none).
    pub logits: bool,
    /// Logits after every one of its tokens, one row each (drafted tokens
    /// being verified); implies `logits`.
    pub every_row: bool,
}

impl Cache {
    /// Positions kept: the first `positions` (a reused prefix).
    pub fn truncate(&mut self, positions: usize) {
        if positions < self.position {
            for layer in &mut self.layers {
                layer.truncate(positions);
            }
            self.position = positions;
        }
    }

    /// The first `positions` positions, sharing their blocks: writing
    /// past them copies only the block it writes into.
    pub fn prefix(&self, positions: usize) -> Cache {
        let positions = positions.min(self.position);
        Cache {
            layers: self.layers.iter().map(|l| l.prefix(positions)).collect(),
            position: positions,
        }
    }

    /// Bytes of the blocks the cache refers to, shared or not.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(KvStore::bytes).sum()
    }

    /// Its blocks by identity, one per block of positions: every layer's
    /// table is shared and copied alike, so the first layer's stands for
    /// all of them.
    pub fn block_ids(&self) -> impl Iterator<Item = usize> + '_ {
        self.layers.iter().take(1).flat_map(KvStore::block_ids)
    }

    /// Whether writing the next position copies a shared block.
    pub fn shares_its_tail(&self) -> bool {
        self.layers.first().is_some_and(KvStore::shares_its_tail)
    }

    /// A cache of `positions` zeros, for tests of what keeps caches.
    #[cfg(test)]
    pub(crate) fn filled(
        positions: usize,
        layers: usize,
        n_kv_head: usize,
        head_dim: usize,
    ) -> Self {
        Cache {
            layers: (0..layers)
                .map(|_| KvStore::filled(positions, n_kv_head, head_dim))
                .collect(),
            position: positions,
        }
    }
}

impl Weights {
    pub fn new_cache(&self) -> Cache {
        let c = &self.config;
        Cache {
            layers: (0..c.n_layer)
                .map(|_| KvStore::new(c.n_kv_head, c.head_dim))
                .collect(),
            position: 0,
        }
    }

    /// Bytes of KV cache one position takes over all layers.
    pub fn kv_bytes_per_position(&self) -> usize {
        let c = &self.config;
        c.n_layer * 2 * c.n_kv_head * c.head_dim * attention::NUMBER_BYTES
    }

    /// Feeds `tokens` (the prompt, or the last sampled token) and returns
    /// the logits for the next position.
    pub fn forward(&self, tokens: &[u32], cache: &mut Cache) -> Result<Vec<f32>> {
        let mut segments = [Segment {
            tokens,
            cache,
            logits: true,
            every_row: false,
        }];
        self.forward_batch(&mut segments)?
            .pop()
            .flatten()
            .ok_or_else(|| candle_core::Error::Msg("no logits".into()))
    }

    /// One forward pass over several sequences: their rows concatenated for
    /// every projection (the weights are read once for all of them),
    /// attention per sequence over its own cache, and the output head only
    /// on the last row of the segments that ask for logits (on every row
    /// of those that ask for all, one after another). A row's result does
    /// not depend on the rows beside it.
    pub fn forward_batch(&self, segments: &mut [Segment<'_>]) -> Result<Vec<Option<Vec<f32>>>> {
        with_pool_awake(|| self.forward_all(segments))
    }

    fn forward_all(&self, segments: &mut [Segment<'_>]) -> Result<Vec<Option<Vec<f32>>>> {
        let c = &self.config;
        for segment in segments.iter() {
            let end = segment.cache.position + segment.tokens.len();
            if segment.tokens.is_empty() || end > c.context_length {
                candle_core::bail!(
                    "{end} positions do not fit the context of {}",
                    c.context_length
                );
            }
        }
        let rows: usize = segments.iter().map(|s| s.tokens.len()).sum();
        let (n_embd, q_width) = (c.n_embd, c.n_head * c.head_dim);
        let qkv_width = q_width + 2 * c.n_kv_head * c.head_dim;
        let mut x = self.embed(segments.iter().flat_map(|s| s.tokens.iter().copied()), rows)?;
        let mut h = vec![0.0f32; rows * n_embd];
        let mut attn = vec![0.0f32; rows * q_width];
        let isa = sluicegate_kernels::Isa::detect();
        for (l, layer) in self.layers.iter().enumerate() {
            rms_norm(&x, &layer.attn_norm, c.rms_eps, &mut h);
            let qkv = project_rows(&layer.qkv, &h, rows);
            // Each segment over its own cache, side by side when several.
            let mut jobs = Vec::with_capacity(segments.len());
            let (mut qkv_left, mut attn_left) = (&qkv[..], &mut attn[..]);
            for segment in segments.iter_mut() {
                let seq = segment.tokens.len();
                let (qkv_here, qkv_rest) = qkv_left.split_at(seq * qkv_width);
                let (attn_here, attn_rest) = attn_left.split_at_mut(seq * q_width);
                (qkv_left, attn_left) = (qkv_rest, attn_rest);
                jobs.push((qkv_here, segment, attn_here));
            }
            let attend = |(qkv, segment, out): (&[f32], &mut Segment<'_>, &mut [f32])| {
                attention::attend(
                    qkv,
                    segment.tokens.len(),
                    segment.cache.position,
                    c.heads(),
                    &self.rope,
                    &mut segment.cache.layers[l],
                    out,
                );
            };
            if jobs.len() > 1 {
                use rayon::prelude::*;
                jobs.into_par_iter().for_each(attend);
            } else {
                jobs.into_iter().for_each(attend);
            }
            add(&mut x, &project_rows(&layer.wo, &attn, rows));

            rms_norm(&x, &layer.ffn_norm, c.rms_eps, &mut h);
            let gate_up = project_rows(&layer.gate_up, &h, rows);
            let mut act = vec![0.0f32; rows * c.n_ff];
            for (row, out) in gate_up
                .chunks_exact(2 * c.n_ff)
                .zip(act.chunks_exact_mut(c.n_ff))
            {
                let (gate, up) = row.split_at(c.n_ff);
                sluicegate_kernels::silu_mul(isa, gate, up, out);
            }
            add(&mut x, &project_rows(&layer.down, &act, rows));
        }
        // The last row of each segment that wants logits (every row of
        // those that want all), all at once.
        let mut last = Vec::new();
        let mut at = 0;
        for segment in segments.iter_mut() {
            let seq = segment.tokens.len();
            at += seq;
            segment.cache.position += seq;
            if segment.every_row {
                last.extend_from_slice(&x[(at - seq) * n_embd..at * n_embd]);
            } else if segment.logits {
                last.extend_from_slice(&x[(at - 1) * n_embd..at * n_embd]);
            }
        }
        let wanted = last.len() / n_embd;
        if wanted == 0 {
            return Ok(segments.iter().map(|_| None).collect());
        }
        let mut normed = vec![0.0f32; last.len()];
        rms_norm(&last, &self.norm, c.rms_eps, &mut normed);
        let logits = project_rows(&self.output, &normed, wanted);
        let vocab = self.output.rows();
        let mut from = 0;
        Ok(segments
            .iter()
            .map(|s| {
                let rows = if s.every_row {
                    s.tokens.len()
                } else {
                    usize::from(s.logits)
                };
                let these = logits.get(from..from + rows * vocab).filter(|_| rows > 0);
                from += rows * vocab;
                these.map(<[f32]>::to_vec)
            })
            .collect())
    }

    /// The tokens' rows of the embedding table, `rows × n_embd`.
    fn embed(&self, tokens: impl Iterator<Item = u32>, rows: usize) -> Result<Vec<f32>> {
        let n = self.config.n_embd;
        let mut x = vec![0.0f32; rows * n];
        for (token, row) in tokens.zip(x.chunks_exact_mut(n)) {
            if token as usize >= self.embedding.rows() {
                candle_core::bail!("token {token} is outside the vocabulary");
            }
            self.embedding.dequantize_row(token as usize, row);
        }
        Ok(x)
    }
}

/// Runs `f` on this thread while the compute pool's other threads wait
/// for its parallel parts spinning, not asleep.
///
/// A forward pass is about 120 parallel products with a little serial work
/// between them (norms, attention of one sequence). Left to rayon, the
/// other threads fall asleep in each gap and are woken for the next
/// product: perf showed both cores a quarter idle and a tenth in the
/// scheduler during one stream's decode. Here each of them runs a job that
/// takes the pool's work as it comes until `f` returns.
fn with_pool_awake<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Sets the flag however `f` ends, so that no helper spins on.
    struct Done<'a>(&'a AtomicBool);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }

    if rayon::current_num_threads() == 1 {
        return f();
    }
    let done = AtomicBool::new(false);
    rayon::scope(|s| {
        // The scope runs here on a thread of the pool (the caller's, or
        // one of the global pool's for a caller outside any).
        let (here, done) = (rayon::current_thread_index(), &done);
        for _ in 1..rayon::current_num_threads() {
            s.spawn(move |_| {
                // This thread may take a helper job itself while it waits
                // inside `f`; spinning there would wait on itself.
                if rayon::current_thread_index() == here {
                    return;
                }
                while !done.load(Ordering::Acquire) {
                    if rayon::yield_now() != Some(rayon::Yield::Executed) {
                        std::hint::spin_loop();
                    }
                }
            });
        }
        let _done = Done(done);
        f()
    })
}

/// RMS norm of each row of `x` (rows as wide as `weight`) into `out`.
fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let n = weight.len();
    for (row, out) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let mean = row.iter().map(|v| v * v).sum::<f32>() / n as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for ((o, &v), &w) in out.iter_mut().zip(row).zip(weight) {
            *o = v * scale * w;
        }
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    for (x, y) in x.iter_mut().zip(y) {
        *x += y;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use rayon::prelude::*;

    use super::with_pool_awake;

    fn squares(n: u64) -> u64 {
        (0..n).into_par_iter().map(|i| i * i).sum()
    }

    /// The helpers take the parallel parts and let go when `f` ends,
    /// however it ends: inside a pool of two, outside any pool, and by a
    /// panic (after which the pool still runs work).
    #[test]
    fn helpers_spin_only_while_the_pass_runs() {
        let want: u64 = (0..100_000u64).map(|i| i * i).sum();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        assert_eq!(pool.install(|| with_pool_awake(|| squares(100_000))), want);
        assert_eq!(with_pool_awake(|| squares(100_000)), want);

        // A helper left spinning would keep the scope, and so this thread,
        // from ever returning: wait for it with a bound.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let ended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                pool.install(|| with_pool_awake(|| -> u64 { panic!("a pass that fails") }))
            }));
            let after = pool.install(|| with_pool_awake(|| squares(1_000)));
            let _ = tx.send((ended.is_err(), after));
        });
        let (panicked, after) = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the helpers stop after a panic");
        assert!(panicked);
        assert_eq!(after, (0..1_000u64).map(|i| i * i).sum::<u64>());
    }
}
