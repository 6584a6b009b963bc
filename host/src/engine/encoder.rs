//! The fused BERT encoder: Warden's own forward pass for sentence-transformers BERT models
//! (all-MiniLM-L6-v2), on the kernels and the thread pool the text decoder uses.
//!
//! A batch is packed, not padded: the sequences' tokens sit end to end (`tokens × hidden`),
//! every linear layer runs once over all of them ([`DensePacked`], bias and GELU applied
//! to each tile as it is stored), and attention runs per (sequence, head) over that
//! sequence's own span only, one pool task each. Residual + LayerNorm, and the mean
//! pooling with L2 normalisation, are single passes ([`math`]). The weights are read from
//! the model's safetensors with candle and repacked once at load, in f32 or in bf16
//! ([`Precision`]).

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::bert::{Config, HiddenAct, PositionEmbeddingType};

use super::kernels::dense::{Activation, DensePacked, Precision};
use super::kernels::pool::Pool;
use super::kernels::{Isa, SendPtr, math, span};

/// Passes of at most this many tokens keep their buffers for the next one.
const KEEP_TOKENS: usize = 512;

/// One transformer layer, repacked.
struct Layer {
    /// Query, key and value stacked (3 × hidden rows).
    qkv: DensePacked,
    qkv_bias: Vec<f32>,
    out: DensePacked,
    out_bias: Vec<f32>,
    attn_norm: (Vec<f32>, Vec<f32>),
    up: DensePacked,
    up_bias: Vec<f32>,
    down: DensePacked,
    down_bias: Vec<f32>,
    ffn_norm: (Vec<f32>, Vec<f32>),
}

/// Buffers kept between batches.
#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    qkv: Vec<f32>,
    ctx: Vec<f32>,
    proj: Vec<f32>,
    act: Vec<f32>,
}

/// A BERT encoder with mean pooling, repacked for the fused path.
pub struct Encoder {
    hidden: usize,
    heads: usize,
    eps: f32,
    max_positions: usize,
    vocab: usize,
    precision: Precision,
    word: Vec<f32>,
    position: Vec<f32>,
    /// Token type 0's embedding (sentence-transformers passes no token types).
    token_type: Vec<f32>,
    norm: (Vec<f32>, Vec<f32>),
    layers: Vec<Layer>,
    scratch: Scratch,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("hidden", &self.hidden)
            .field("layers", &self.layers.len())
            .field("precision", &self.precision)
            .finish_non_exhaustive()
    }
}

thread_local! {
    /// One attention task's transposed keys, scores and outputs.
    static SPAN: RefCell<span::SpanScratch> = RefCell::new(span::SpanScratch::default());
}

/// Why an encoder cannot be built from a model's files.
fn invalid(reason: impl Into<String>) -> String {
    reason.into()
}

impl Encoder {
    /// Build from `config.json` and the bytes of `model.safetensors`, packed for
    /// `precision` (bf16 falls back to f32, with a warning, where the CPU lacks
    /// AVX-512 BF16).
    pub fn load(config: &Config, safetensors: &[u8], precision: Precision) -> Result<Self, String> {
        if !matches!(config.hidden_act, HiddenAct::Gelu) {
            return Err(invalid("only the exact (erf) GELU activation is supported"));
        }
        if !matches!(
            config.position_embedding_type,
            PositionEmbeddingType::Absolute
        ) {
            return Err(invalid("only absolute position embeddings are supported"));
        }
        let (hidden, heads) = (config.hidden_size, config.num_attention_heads);
        if heads == 0 || !hidden.is_multiple_of(heads) || !hidden.is_multiple_of(2) {
            return Err(invalid(format!(
                "hidden size {hidden} does not split into {heads} heads"
            )));
        }
        let precision = if precision.fast_on(Isa::active()) {
            precision
        } else {
            tracing::warn!(
                requested = precision.as_str(),
                used = "f32",
                "this CPU has no AVX-512 BF16: the embedding model runs in f32"
            );
            Precision::F32
        };
        let tensors = candle_core::safetensors::load_buffer(safetensors, &Device::Cpu)
            .map_err(|e| invalid(e.to_string()))?;
        let weights = Weights { tensors: &tensors };
        let vector = |name: &str, len: usize| weights.vector(name, len);
        let matrix = |name: &str, rows: usize, cols: usize| weights.vector(name, rows * cols);
        let dense = |names: &[&str], rows: usize, cols: usize| -> Result<DensePacked, String> {
            let mut w = Vec::with_capacity(names.len() * rows * cols);
            for name in names {
                w.extend(matrix(&format!("{name}.weight"), rows, cols)?);
            }
            DensePacked::new(&w, names.len() * rows, cols, precision)
        };
        let bias = |names: &[&str], rows: usize| -> Result<Vec<f32>, String> {
            let mut b = Vec::with_capacity(names.len() * rows);
            for name in names {
                b.extend(vector(&format!("{name}.bias"), rows)?);
            }
            Ok(b)
        };
        let norm = |name: &str| -> Result<(Vec<f32>, Vec<f32>), String> {
            Ok((
                vector(&format!("{name}.weight"), hidden)?,
                vector(&format!("{name}.bias"), hidden)?,
            ))
        };
        let inter = config.intermediate_size;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            let qkv = [
                format!("{p}.attention.self.query"),
                format!("{p}.attention.self.key"),
                format!("{p}.attention.self.value"),
            ];
            let qkv: Vec<&str> = qkv.iter().map(String::as_str).collect();
            let out = format!("{p}.attention.output.dense");
            let up = format!("{p}.intermediate.dense");
            let down = format!("{p}.output.dense");
            layers.push(Layer {
                qkv: dense(&qkv, hidden, hidden)?,
                qkv_bias: bias(&qkv, hidden)?,
                out: dense(&[&out], hidden, hidden)?,
                out_bias: bias(&[&out], hidden)?,
                attn_norm: norm(&format!("{p}.attention.output.LayerNorm"))?,
                up: dense(&[&up], inter, hidden)?,
                up_bias: bias(&[&up], inter)?,
                down: dense(&[&down], hidden, inter)?,
                down_bias: bias(&[&down], hidden)?,
                ffn_norm: norm(&format!("{p}.output.LayerNorm"))?,
            });
        }
        let token_types = matrix(
            "embeddings.token_type_embeddings.weight",
            config.type_vocab_size,
            hidden,
        )?;
        Ok(Self {
            hidden,
            heads,
            eps: config.layer_norm_eps as f32,
            max_positions: config.max_position_embeddings,
            vocab: config.vocab_size,
            precision,
            word: matrix(
                "embeddings.word_embeddings.weight",
                config.vocab_size,
                hidden,
            )?,
            position: matrix(
                "embeddings.position_embeddings.weight",
                config.max_position_embeddings,
                hidden,
            )?,
            token_type: token_types[..hidden].to_vec(),
            norm: norm("embeddings.LayerNorm")?,
            layers,
            scratch: Scratch::default(),
        })
    }

    /// Vector size.
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// Tokens the vocabulary has.
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// Most tokens per sequence.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// The arithmetic of the linear layers.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The mean-pooled, L2-normalised vector of every sequence (token ids, framed).
    pub fn forward(&mut self, seqs: &[&[u32]]) -> Result<Vec<Vec<f32>>, String> {
        self.forward_with(Isa::active(), seqs)
    }

    /// [`Self::forward`] with the kernels of `isa` (tests run every path).
    pub fn forward_with(&mut self, isa: Isa, seqs: &[&[u32]]) -> Result<Vec<Vec<f32>>, String> {
        let h = self.hidden;
        if let Some(s) = seqs
            .iter()
            .find(|s| s.is_empty() || s.len() > self.max_positions)
        {
            return Err(format!(
                "a sequence of {} tokens (1 to {} are allowed)",
                s.len(),
                self.max_positions
            ));
        }
        if let Some(t) = seqs
            .iter()
            .flat_map(|s| s.iter())
            .find(|&&t| t as usize >= self.vocab)
        {
            return Err(format!("token {t} is not in the vocabulary"));
        }
        let isa = if self.precision.fast_on(isa) || isa == Isa::Scalar {
            isa
        } else {
            Isa::Scalar
        };
        let pool = Pool::global();
        let spans: Vec<(usize, usize)> = seqs
            .iter()
            .scan(0, |at, s| {
                let span = (*at, s.len());
                *at += s.len();
                Some(span)
            })
            .collect();
        let n: usize = seqs.iter().map(|s| s.len()).sum();
        let mut s = std::mem::take(&mut self.scratch);
        s.x.clear();
        for seq in seqs {
            for (p, &t) in seq.iter().enumerate() {
                let word = &self.word[t as usize * h..][..h];
                let pos = &self.position[p * h..][..h];
                s.x.extend(
                    word.iter()
                        .zip(&self.token_type)
                        .zip(pos)
                        .map(|((&w, &t), &p)| (w + t) + p),
                );
            }
        }
        math::layer_norm(isa, &mut s.x, &[], &self.norm.0, &self.norm.1, self.eps);
        for layer in &self.layers {
            s.qkv.resize(n * 3 * h, 0.0);
            layer.qkv.matmul(
                &s.x,
                &layer.qkv_bias,
                Activation::Identity,
                &mut s.qkv,
                isa,
                pool,
            );
            s.ctx.resize(n * h, 0.0);
            self.attend(isa, &s.qkv, &spans, &mut s.ctx, pool);
            s.proj.resize(n * h, 0.0);
            layer.out.matmul(
                &s.ctx,
                &layer.out_bias,
                Activation::Identity,
                &mut s.proj,
                isa,
                pool,
            );
            let (g, b) = &layer.attn_norm;
            math::layer_norm(isa, &mut s.proj, &s.x, g, b, self.eps);
            std::mem::swap(&mut s.x, &mut s.proj);
            s.act.resize(n * layer.up.rows(), 0.0);
            layer.up.matmul(
                &s.x,
                &layer.up_bias,
                Activation::Gelu,
                &mut s.act,
                isa,
                pool,
            );
            layer.down.matmul(
                &s.act,
                &layer.down_bias,
                Activation::Identity,
                &mut s.proj,
                isa,
                pool,
            );
            let (g, b) = &layer.ffn_norm;
            math::layer_norm(isa, &mut s.proj, &s.x, g, b, self.eps);
            std::mem::swap(&mut s.x, &mut s.proj);
        }
        let out = spans
            .iter()
            .map(|&(start, len)| {
                let mut v = vec![0f32; h];
                math::mean_normalized(isa, &s.x[start * h..(start + len) * h], &mut v);
                v
            })
            .collect();
        // Buffers for a few hundred tokens are kept; a large pass's are given back, so a
        // burst of long inputs does not stay resident.
        if n <= KEEP_TOKENS {
            self.scratch = s;
        }
        Ok(out)
    }

    /// Attention of every (sequence, head) over its own span, one pool task each, into
    /// `ctx` (`tokens × hidden`).
    fn attend(
        &self,
        isa: Isa,
        qkv: &[f32],
        spans: &[(usize, usize)],
        ctx: &mut [f32],
        pool: &Pool,
    ) {
        let (h, heads) = (self.hidden, self.heads);
        let dim = h / heads;
        let ctx_len = ctx.len();
        let ctx_ptr = SendPtr(ctx.as_mut_ptr());
        pool.run(spans.len() * heads, &|task| {
            let ((start, len), head) = (spans[task / heads], task % heads);
            SPAN.with_borrow_mut(|scratch| {
                let span = span::Span {
                    rows: &qkv[start * 3 * h..(start + len) * 3 * h],
                    stride: 3 * h,
                    q: head * dim,
                    k: h + head * dim,
                    v: 2 * h + head * dim,
                    dim,
                };
                span::attend_span(isa, span, scratch, |i, o| {
                    let at = (start + i) * h + head * dim;
                    assert!(o.len() == dim && at + dim <= ctx_len, "attention output");
                    // SAFETY: task (sequence, head) writes only columns
                    // `head·dim..(head+1)·dim` of its own sequence's rows: no two tasks
                    // write the same element, and `at + dim ≤ ctx.len()` (asserted).
                    #[allow(unsafe_code)]
                    unsafe {
                        std::ptr::copy_nonoverlapping(o.as_ptr(), ctx_ptr.get().add(at), dim);
                    }
                });
            });
        });
    }
}

/// The model's tensors by name, with or without a `bert.` prefix.
struct Weights<'a> {
    tensors: &'a HashMap<String, Tensor>,
}

impl Weights<'_> {
    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, String> {
        let t = self
            .tensors
            .get(name)
            .or_else(|| self.tensors.get(&format!("bert.{name}")))
            .ok_or_else(|| format!("tensor {name} is missing"))?;
        let v: Vec<f32> = t
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .map_err(|e| format!("tensor {name}: {e}"))?;
        if v.len() != len {
            return Err(format!(
                "tensor {name} has {} values, {len} expected",
                v.len()
            ));
        }
        Ok(v)
    }
}
