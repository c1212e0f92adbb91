//! A llama-family decoder on candle's quantized CPU kernels, shaped for
//! serving: weights loaded once and shared by every generation, each
//! generation with its own KV cache that grows in place.
//!
//! Differences from candle's stock `quantized_llama`, each for speed:
//! - Q, K and V are one matmul, and so are gate and up: fewer passes over
//!   the activations and fewer dispatches per token.
//! - Q4_1 weights, which candle multiplies with scalar code, run on the
//!   AVX2 Q4_0 kernel plus an exact offset term (see `linear`).
//! - The embedding table stays quantized (rows are dequantized on lookup).
//! - The KV cache is appended in place, not concatenated every step, and
//!   grouped-query attention runs per KV head without copying K and V.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor, gguf_file};
use candle_core::{D, DType, Device, Tensor};
use candle_nn::kv_cache::KvCache;

use super::linear::Linear;

pub type Result<T> = candle_core::Result<T>;

/// KV cache growth step, in positions.
const KV_CHUNK: usize = 256;

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
}

struct Layer {
    attn_norm: Tensor,
    /// Q, K and V projections stacked: `n_head + 2 * n_kv_head` heads out.
    qkv: Linear,
    wo: Linear,
    ffn_norm: Tensor,
    /// Gate and up projections stacked: `2 * n_ff` out.
    gate_up: Linear,
    down: Linear,
}

/// The model's weights, shared by all generations.
pub struct Weights {
    pub config: LlamaConfig,
    /// Shared with `output` when the embeddings are tied.
    embedding: Arc<QTensor>,
    layers: Vec<Layer>,
    norm: Tensor,
    output: Linear,
    cos: Tensor,
    sin: Tensor,
    device: Device,
}

/// One generation's attention state.
pub struct Cache {
    layers: Vec<KvCache>,
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
            qkv: Linear::stacked(&[q, k, v], &device)?,
            wo: Linear::single(get("attn_output")?, &device)?,
            ffn_norm: get("ffn_norm")?.dequantize(&device)?,
            gate_up: Linear::stacked(&[gate, up], &device)?,
            down: Linear::single(get("ffn_down")?, &device)?,
        });
    }
    let embedding = Arc::new(tensor("token_embd.weight")?);
    let output = match tensor("output.weight") {
        Ok(output) => Linear::single(output, &device)?,
        // Tied embeddings: the output projection is the embedding table.
        Err(_) if embedding.dtype() == GgmlDType::Q8_0 || embedding.dtype() == GgmlDType::Q4_0 => {
            Linear::Plain(QMatMul::from_arc(Arc::clone(&embedding))?)
        }
        Err(_) => Linear::Plain(QMatMul::from_qtensor(QTensor::quantize(
            &embedding.dequantize(&device)?,
            GgmlDType::Q8_0,
        )?)?),
    };
    let norm = tensor("output_norm.weight")?.dequantize(&device)?;
    let (cos, sin) = rope_tables(&config, &device)?;
    let weights = Weights {
        config,
        embedding,
        layers,
        norm,
        output,
        cos,
        sin,
        device,
    };
    Ok((content, weights))
}

fn rope_tables(config: &LlamaConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = config.head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| {
            1.0 / config
                .rope_base
                .powf((2 * i) as f32 / config.head_dim as f32)
        })
        .collect();
    let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
    let positions = Tensor::arange(0u32, config.context_length as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((config.context_length, 1))?;
    let angles = positions.matmul(&inv_freq)?;
    Ok((angles.cos()?, angles.sin()?))
}

impl Weights {
    pub fn new_cache(&self) -> Cache {
        Cache {
            layers: (0..self.config.n_layer)
                .map(|_| KvCache::new(2, KV_CHUNK))
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
        let group = c.n_head / c.n_kv_head;
        let (hd, n_q, n_kv) = (c.head_dim, c.n_head * c.head_dim, c.n_kv_head * c.head_dim);
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embedding.embedding(&ids)?.unsqueeze(0)?;
        let cos = self.cos.narrow(0, start, seq)?;
        let sin = self.sin.narrow(0, start, seq)?;
        let mask = (seq > 1)
            .then(|| causal_mask(seq, start, group, &self.device))
            .transpose()?;
        let scale = 1.0 / (hd as f64).sqrt();

        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, c.rms_eps)?;
            let qkv = layer.qkv.forward(&h)?;
            let heads = |offset: usize, width: usize, n: usize| {
                qkv.narrow(D::Minus1, offset, width)?
                    .reshape((1, seq, n, hd))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let q = candle_nn::rotary_emb::rope_i(&heads(0, n_q, c.n_head)?, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope_i(&heads(n_q, n_kv, c.n_kv_head)?, &cos, &sin)?;
            let v = heads(n_q + n_kv, n_kv, c.n_kv_head)?;
            let (k, v) = kv.append(&k, &v)?;
            // Query heads that share a KV head become rows of one matrix.
            let q = q.reshape((1, c.n_kv_head, group * seq, hd))?;
            let scores = (q.matmul(&k.t()?)? * scale)?;
            let scores = match &mask {
                Some(mask) => scores.broadcast_add(mask)?,
                None => scores,
            };
            let attn = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v.contiguous()?)?;
            let attn = attn
                .reshape((1, c.n_head, seq, hd))?
                .transpose(1, 2)?
                .reshape((1, seq, c.n_embd))?;
            x = (x + layer.wo.forward(&attn)?)?;

            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, c.rms_eps)?;
            let gate_up = layer.gate_up.forward(&h)?;
            let gate = gate_up.narrow(D::Minus1, 0, c.n_ff)?;
            let up = gate_up.narrow(D::Minus1, c.n_ff, c.n_ff)?;
            let act = (candle_nn::ops::silu(&gate)? * up)?;
            x = (x + layer.down.forward(&act)?)?;
        }
        cache.position += seq;
        let last = x.narrow(1, seq - 1, 1)?;
        let h = candle_nn::ops::rms_norm(&last, &self.norm, c.rms_eps)?;
        self.output.forward(&h)?.flatten_all()?.to_vec1::<f32>()
    }
}

/// Additive mask for `seq` new positions after `start` cached ones, with
/// the rows repeated for the `group` query heads sharing a KV head.
fn causal_mask(seq: usize, start: usize, group: usize, device: &Device) -> Result<Tensor> {
    let total = start + seq;
    let row = |s: usize| {
        (0..total).map(move |j| {
            if j > start + s {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
    };
    let values: Vec<f32> = (0..group).flat_map(|_| (0..seq).flat_map(row)).collect();
    Tensor::from_vec(values, (group * seq, total), device)
}
