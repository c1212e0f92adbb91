//! A llama-family decoder on candle's quantized CPU kernels, shaped for
//! serving: weights loaded once and shared by every generation, each
//! generation with its own KV cache.
//!
//! Differences from candle's stock `quantized_llama`, each for speed:
//! - Q, K and V are one matmul, and so are gate and up: fewer passes over
//!   the activations and fewer dispatches per token.
//! - Weights whose type has no SIMD kernel in candle (Q4_1, Q5_x) are
//!   re-quantized to Q8_0 at load (near-lossless; AVX2, and for inputs of
//!   256-multiples candle's VNNI kernel).
//! - The embedding table stays quantized (rows are dequantized on lookup)
//!   and doubles as the output projection when the two are tied.
//! - Attention and RoPE run as plain loops over a KV cache kept per KV
//!   head (see `attention`), instead of a dozen tensor ops per layer.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor, gguf_file};
use candle_core::{D, Device, Module, Tensor};

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
    attn_norm: Tensor,
    /// Q, K and V projections stacked: `n_head + 2 * n_kv_head` heads out.
    qkv: QMatMul,
    wo: QMatMul,
    ffn_norm: Tensor,
    /// Gate and up projections stacked: `2 * n_ff` out.
    gate_up: QMatMul,
    down: QMatMul,
}

/// The model's weights, shared by all generations.
pub struct Weights {
    pub config: LlamaConfig,
    /// Shared with `output` when the embeddings are tied.
    embedding: Arc<QTensor>,
    layers: Vec<Layer>,
    norm: Tensor,
    output: QMatMul,
    rope: Rope,
    device: Device,
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
    let mut tensor = |name: &str| content.tensor(&mut reader, name, &device);

    let mut layers = Vec::with_capacity(config.n_layer);
    for i in 0..config.n_layer {
        let mut get = |part: &str| tensor(&format!("blk.{i}.{part}.weight"));
        let (q, k, v) = (get("attn_q")?, get("attn_k")?, get("attn_v")?);
        let (gate, up) = (get("ffn_gate")?, get("ffn_up")?);
        layers.push(Layer {
            attn_norm: get("attn_norm")?.dequantize(&device)?,
            qkv: stacked(&[q, k, v], &device)?,
            wo: simd_ready(get("attn_output")?, &device)?,
            ffn_norm: get("ffn_norm")?.dequantize(&device)?,
            gate_up: stacked(&[gate, up], &device)?,
            down: simd_ready(get("ffn_down")?, &device)?,
        });
    }
    let embedding = Arc::new(tensor("token_embd.weight")?);
    let output = match tensor("output.weight") {
        Ok(output) => simd_ready(output, &device)?,
        // Tied embeddings: the output projection is the embedding table.
        Err(_) if has_simd(embedding.dtype()) => QMatMul::from_arc(Arc::clone(&embedding))?,
        Err(_) => QMatMul::from_qtensor(QTensor::quantize(
            &embedding.dequantize(&device)?,
            GgmlDType::Q8_0,
        )?)?,
    };
    let norm = tensor("output_norm.weight")?.dequantize(&device)?;
    let rope = Rope::new(config.head_dim, config.rope_base, config.context_length);
    let weights = Weights {
        config,
        embedding,
        layers,
        norm,
        output,
        rope,
        device,
    };
    Ok((content, weights))
}

/// Types candle multiplies with SIMD on x86.
fn has_simd(dtype: GgmlDType) -> bool {
    !matches!(
        dtype,
        GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q8_1
    )
}

fn simd_ready(weight: QTensor, device: &Device) -> Result<QMatMul> {
    if has_simd(weight.dtype()) {
        return QMatMul::from_qtensor(weight);
    }
    QMatMul::from_qtensor(QTensor::quantize(
        &weight.dequantize(device)?,
        GgmlDType::Q8_0,
    )?)
}

/// Several projections of the same input as one matrix (rows stacked),
/// in Q8_0: exact for 8-bit sources, near-exact for 4 and 5 bits.
fn stacked(parts: &[QTensor], device: &Device) -> Result<QMatMul> {
    let rows = parts
        .iter()
        .map(|p| p.dequantize(device))
        .collect::<Result<Vec<_>>>()?;
    QMatMul::from_qtensor(QTensor::quantize(&Tensor::cat(&rows, 0)?, GgmlDType::Q8_0)?)
}

/// Rows from which a dequantized f32 matmul beats the quantized kernel,
/// which handles one row at a time.
const GEMM_ROWS: usize = 8;

/// `x @ Wᵀ`: the quantized kernel for a token or a few, an f32 GEMM over
/// the dequantized weights for a prompt.
fn project(weights: &QMatMul, x: &Tensor, rows: usize) -> Result<Tensor> {
    match weights {
        QMatMul::QTensor(q) if rows >= GEMM_ROWS => {
            x.broadcast_matmul(&q.dequantize(&x.device().clone())?.t()?)
        }
        _ => weights.forward(x),
    }
}

impl Weights {
    pub fn new_cache(&self) -> Cache {
        Cache {
            layers: (0..self.config.n_layer)
                .map(|_| KvStore::default())
                .collect(),
            position: 0,
        }
    }

    /// Feeds `tokens` (the prompt, or the last sampled token) and returns
    /// the logits for the next position.
    pub fn forward(&self, tokens: &[u32], cache: &mut Cache) -> Result<Vec<f32>> {
        let c = &self.config;
        let seq = tokens.len();
        let start = cache.position;
        if seq == 0 || start + seq > c.context_length {
            candle_core::bail!(
                "{} positions do not fit the context of {}",
                start + seq,
                c.context_length
            );
        }
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embedding.embedding(&ids)?.unsqueeze(0)?;
        for (layer, store) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, c.rms_eps)?;
            let qkv = project(&layer.qkv, &h, seq)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let attn = attention::attend(&qkv, seq, start, c.heads(), &self.rope, store);
            let attn = Tensor::from_vec(attn, (1, seq, c.n_head * c.head_dim), &self.device)?;
            x = (x + project(&layer.wo, &attn, seq)?)?;

            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, c.rms_eps)?;
            let gate_up = project(&layer.gate_up, &h, seq)?;
            let gate = gate_up.narrow(D::Minus1, 0, c.n_ff)?;
            let up = gate_up.narrow(D::Minus1, c.n_ff, c.n_ff)?;
            let act = (candle_nn::ops::silu(&gate)? * up)?;
            x = (x + project(&layer.down, &act, seq)?)?;
        }
        cache.position += seq;
        let last = x.narrow(1, seq - 1, 1)?;
        let h = candle_nn::ops::rms_norm(&last, &self.norm, c.rms_eps)?;
        self.output.forward(&h)?.flatten_all()?.to_vec1::<f32>()
    }
}
