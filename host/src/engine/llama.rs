//! A llama-family decoder over GGUF (quantized) weights.
//!
//! The weights ([`Weights`]) are shared and immutable; everything that belongs to one
//! sequence (its KV cache, [`KvCache`]) is a separate value passed into [`Weights::forward`].
//! That keeps sequences independent (a greedy answer does not depend on what else runs) and
//! leaves room for continuous batching of several sequences per forward pass.

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::Embedding;
use candle_transformers::quantized_nn::RmsNorm;

use super::q4_1::Q41Matrix;

/// Shape of the model, from the GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Transformer blocks.
    pub n_layer: usize,
    /// Attention heads.
    pub n_head: usize,
    /// Key/value heads (grouped-query attention).
    pub n_kv_head: usize,
    /// Embedding width.
    pub n_embd: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Context window the model was trained for.
    pub context_length: usize,
    /// RMS norm epsilon.
    pub rms_eps: f64,
    /// RoPE base frequency.
    pub rope_base: f32,
}

impl LlamaConfig {
    /// Read from the GGUF metadata; only the llama architecture is accepted.
    pub fn from_gguf(content: &Content) -> Result<Self> {
        let arch = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if arch != "llama" {
            candle_core::bail!("architecture `{arch}` is not supported (llama family only)");
        }
        let get = |k: &str| {
            content
                .metadata
                .get(&format!("llama.{k}"))
                .ok_or_else(|| candle_core::Error::Msg(format!("llama.{k} is missing")))
        };
        let n_head = get("attention.head_count")?.to_u32()? as usize;
        let n_embd = get("embedding_length")?.to_u32()? as usize;
        let head_dim = match get("rope.dimension_count") {
            Ok(v) => v.to_u32()? as usize,
            Err(_) => n_embd / n_head,
        };
        Ok(Self {
            n_layer: get("block_count")?.to_u32()? as usize,
            n_head,
            n_kv_head: get("attention.head_count_kv")?.to_u32()? as usize,
            n_embd,
            head_dim,
            context_length: get("context_length")?.to_u32()? as usize,
            rms_eps: get("attention.layer_norm_rms_epsilon")?.to_f32()? as f64,
            rope_base: get("rope.freq_base")
                .and_then(|v| v.to_f32())
                .unwrap_or(10_000.),
        })
    }
}

/// A weight matrix: Q4_1 through Warden's SIMD kernel, anything else through candle's.
#[derive(Debug)]
enum Linear {
    Q41(Q41Matrix),
    Candle(QMatMul),
}

impl Linear {
    fn new(t: QTensor) -> Result<Self> {
        Ok(match Q41Matrix::from_qtensor(&t)? {
            Some(m) => Linear::Q41(m),
            None => Linear::Candle(QMatMul::from_qtensor(t)?),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Q41(m) => m.forward(x),
            Linear::Candle(m) => m.forward(x),
        }
    }
}

#[derive(Debug)]
struct Layer {
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// The shared, immutable model.
#[derive(Debug)]
pub struct Weights {
    /// The model's shape.
    pub config: LlamaConfig,
    embeddings: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: Linear,
    cos: Tensor,
    sin: Tensor,
    device: Device,
}

/// One sequence's attention cache: keys and values of every position so far, per layer.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Keep the first `len` positions (at most those cached).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        let keep = len.min(self.len);
        for layer in &mut self.layers {
            if let Some((k, v)) = layer.take()
                && keep > 0
            {
                *layer = Some((k.narrow(2, 0, keep)?, v.narrow(2, 0, keep)?));
            }
        }
        self.len = keep;
        Ok(())
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Weights {
    /// Load from an open GGUF file.
    pub fn from_gguf<R: std::io::Read + std::io::Seek>(
        content: &Content,
        reader: &mut R,
        device: &Device,
    ) -> Result<Self> {
        let config = LlamaConfig::from_gguf(content)?;
        let mut tensor = |name: &str| content.tensor(reader, name, device);
        let embeddings_q = tensor("token_embd.weight")?;
        let embeddings = Embedding::new(embeddings_q.dequantize(device)?, config.n_embd);
        let norm = RmsNorm::from_qtensor(tensor("output_norm.weight")?, config.rms_eps)?;
        // Small models tie the output projection to the embeddings.
        let output: QTensor = match tensor("output.weight") {
            Ok(t) => t,
            Err(_) => embeddings_q,
        };
        let mut layers = Vec::with_capacity(config.n_layer);
        for i in 0..config.n_layer {
            let mut q = |n: &str| -> Result<Linear> {
                Linear::new(tensor(&format!("blk.{i}.{n}.weight"))?)
            };
            let (wq, wk, wv, wo) = (q("attn_q")?, q("attn_k")?, q("attn_v")?, q("attn_output")?);
            let (gate, up, down) = (q("ffn_gate")?, q("ffn_up")?, q("ffn_down")?);
            let attn_norm = RmsNorm::from_qtensor(
                tensor(&format!("blk.{i}.attn_norm.weight"))?,
                config.rms_eps,
            )?;
            let ffn_norm = RmsNorm::from_qtensor(
                tensor(&format!("blk.{i}.ffn_norm.weight"))?,
                config.rms_eps,
            )?;
            layers.push(Layer {
                wq,
                wk,
                wv,
                wo,
                attn_norm,
                ffn_norm,
                gate,
                up,
                down,
            });
        }
        let (cos, sin) = rope_tables(&config, device)?;
        Ok(Self {
            config,
            embeddings,
            layers,
            norm,
            output: Linear::new(output)?,
            cos,
            sin,
            device: device.clone(),
        })
    }

    /// A new, empty cache for one sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: vec![None; self.config.n_layer],
            len: 0,
        }
    }

    /// Run `tokens` (the next positions of the sequence whose cache is `cache`) and return
    /// the logits of the last one, as a vector over the vocabulary.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        let seq_len = tokens.len();
        if seq_len == 0 {
            candle_core::bail!("no tokens to run");
        }
        let pos = cache.len;
        if pos + seq_len > self.config.context_length {
            candle_core::bail!("the sequence is longer than the context window");
        }
        let input = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        let mask = (seq_len > 1)
            .then(|| candle_transformers::utils::build_causal_mask(seq_len, pos, &self.device))
            .transpose()?;
        let cos = self.cos.narrow(0, pos, seq_len)?;
        let sin = self.sin.narrow(0, pos, seq_len)?;
        let mut x = self.embeddings.forward(&input)?;
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let h = layer.attn_norm.forward(&x)?;
            let (q, k, v) = (
                layer.wq.forward(&h)?,
                layer.wk.forward(&h)?,
                layer.wv.forward(&h)?,
            );
            let y = self.attend(&q, &k, &v, kv, mask.as_ref(), &cos, &sin)?;
            x = self.finish_layer(layer, &y, &x)?;
        }
        cache.len += seq_len;
        let x = self.norm.forward(&x)?;
        let last = x.i((.., seq_len - 1, ..))?;
        let logits = self.output.forward(&last)?;
        logits.squeeze(0)?.to_dtype(DType::F32)?.to_vec1()
    }

    /// One decoding step of several sequences at once: `tokens[i]` is the next token of the
    /// sequence whose cache is `caches[i]`; returns each one's logits. The projections and
    /// the feed-forward run once over all rows, so the weights are read once per step
    /// instead of once per sequence; attention runs per sequence, over its own cache. Every
    /// row is computed as [`Weights::forward`] computes it alone (no operation mixes rows),
    /// so the logits are the same bits.
    pub fn forward_batch(
        &self,
        tokens: &[u32],
        caches: &mut [&mut KvCache],
    ) -> Result<Vec<Vec<f32>>> {
        let n = tokens.len();
        if n == 0 || caches.len() != n {
            candle_core::bail!("{n} tokens for {} sequences", caches.len());
        }
        if caches
            .iter()
            .any(|c| c.len + 1 > self.config.context_length)
        {
            candle_core::bail!("the sequence is longer than the context window");
        }
        let rope = caches
            .iter()
            .map(|c| Ok((self.cos.narrow(0, c.len, 1)?, self.sin.narrow(0, c.len, 1)?)))
            .collect::<Result<Vec<_>>>()?;
        let input = Tensor::new(tokens, &self.device)?.unsqueeze(1)?;
        let mut x = self.embeddings.forward(&input)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let h = layer.attn_norm.forward(&x)?;
            let (q, k, v) = (
                layer.wq.forward(&h)?,
                layer.wk.forward(&h)?,
                layer.wv.forward(&h)?,
            );
            let mut ys = Vec::with_capacity(n);
            for (i, (cache, (cos, sin))) in caches.iter_mut().zip(&rope).enumerate() {
                let row = |t: &Tensor| t.narrow(0, i, 1);
                ys.push(self.attend(
                    &row(&q)?,
                    &row(&k)?,
                    &row(&v)?,
                    &mut cache.layers[l],
                    None,
                    cos,
                    sin,
                )?);
            }
            x = self.finish_layer(layer, &Tensor::cat(&ys, 0)?, &x)?;
        }
        for cache in caches.iter_mut() {
            cache.len += 1;
        }
        let x = self.norm.forward(&x)?.squeeze(1)?;
        self.output.forward(&x)?.to_dtype(DType::F32)?.to_vec2()
    }

    /// The rest of a layer after attention: the output projection and the residual, then
    /// the feed-forward block and its residual.
    fn finish_layer(&self, layer: &Layer, attended: &Tensor, x: &Tensor) -> Result<Tensor> {
        let x1 = (layer.wo.forward(attended)? + x)?;
        let h = layer.ffn_norm.forward(&x1)?;
        let gate = candle_nn::ops::silu(&layer.gate.forward(&h)?)?;
        let h = layer.down.forward(&(gate * layer.up.forward(&h)?)?)?;
        h + x1
    }

    /// Attention of one sequence from its projections (`[1, seq_len, width]` each),
    /// appending its keys and values to `kv`; the result is ready for the output projection.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        kv: &mut Option<(Tensor, Tensor)>,
        mask: Option<&Tensor>,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, seq_len, _) = q.dims3()?;
        let heads = |t: &Tensor, n: usize| -> Result<Tensor> {
            t.reshape((b, seq_len, n, c.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = heads(q, c.n_head)?;
        let k = heads(k, c.n_kv_head)?;
        let v = heads(v, c.n_kv_head)?;
        // llama uses the interleaved ("normal") RoPE layout in GGUF.
        let q = candle_nn::rotary_emb::rope_i(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope_i(&k, cos, sin)?;
        let (k, v) = match kv.take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        };
        *kv = Some((k.clone(), v.clone()));
        let rep = c.n_head / c.n_kv_head;
        let k = candle_transformers::utils::repeat_kv(k, rep)?;
        let v = candle_transformers::utils::repeat_kv(v, rep)?;
        let scores = (q.matmul(&k.t()?)? / (c.head_dim as f64).sqrt())?;
        let scores = match mask {
            None => scores,
            Some(m) => {
                let m = m.broadcast_as(scores.shape())?;
                let neg = Tensor::new(f32::NEG_INFINITY, scores.device())?
                    .broadcast_as(scores.shape())?;
                m.where_cond(&neg, &scores)?
            }
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let y = probs.matmul(&v.contiguous()?)?;
        y.transpose(1, 2)?
            .reshape((b, seq_len, c.n_head * c.head_dim))
    }
}

fn rope_tables(c: &LlamaConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let inv: Vec<f32> = (0..c.head_dim)
        .step_by(2)
        .map(|i| 1.0 / c.rope_base.powf(i as f32 / c.head_dim as f32))
        .collect();
    let inv = Tensor::new(inv.as_slice(), device)?;
    let positions = Tensor::arange(0, c.context_length as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((c.context_length, 1))?;
    let angles = positions.broadcast_mul(&inv.reshape((1, ()))?)?;
    Ok((angles.cos()?, angles.sin()?))
}

/// Index of the largest logit (greedy decoding); ties go to the lowest id, as llama.cpp.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}
