//! The fused llama decoder: Warden's own forward pass for GGUF models whose layers are
//! Q4_1 (SmolLM2's), on the shared kernels ([`super::kernels`]).
//!
//! One pass runs any set of rows: a prompt chunk of one sequence, or one next token of each
//! of several sequences (batched decode), or both. Every matrix product runs once over all
//! rows, so the weights are read once per pass whatever the number of sequences: the merged
//! query/key/value product (960 rows for SmolLM2), the output projection, the merged
//! gate/up product (3,072 rows) and the down projection, four products per layer on the
//! repacked Q4_1 kernels. RMSNorm, RoPE, SiLU × up and the residuals are plain loops over
//! preallocated buffers; attention is one pass per (row, head) over that sequence's own key
//! and value cache (f16, as llama.cpp's), grouped-query heads by indexing, spread over the
//! kernel pool. No candle tensor operation runs on the hot path: the output layer (Q8_0,
//! tied to the embeddings) runs on Warden's own kernel, for the rows whose logits are wanted.
//!
//! The arithmetic follows ggml's, what llama.cpp runs, where it matters for agreement:
//! activations quantized to Q8_1 as `quantize_row_q8_1` does, RMSNorm's squares summed in
//! f64, RoPE angles by repeated multiplication, the query and the attention probabilities
//! rounded to f16 as ggml's f16 matrix products round them, `e^x` in the softmax and SiLU
//! as ggml's vector `expf` ([`math`]), the softmax's sum in f64. Measured (tests/tests/e2e): the
//! perplexity of a public-domain text within 0.2 % of `llama-perplexity`'s, teacher-forced
//! greedy tokens equal to llama.cpp's at 60 of 64 positions (the tensor-graph path, candle's
//! arithmetic: 59), and the logits within a stated bound of the tensor-graph path's.

use std::cell::RefCell;
use std::sync::Mutex;

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Result};

use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

use super::kernels::Isa;
use super::kernels::attention::{self, HeadView};
use super::kernels::math;
use super::kernels::pool::Pool;
use super::kernels::q4::{Q41Packed, Q81};
use super::kernels::q8::Q80Packed;
use super::llama::LlamaConfig;

struct Layer {
    qkv: Q41Packed,
    wo: Q41Packed,
    gate_up: Q41Packed,
    down: Q41Packed,
    attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
}

/// The model, repacked for the fused path; shared and immutable.
pub struct Decoder {
    /// The model's shape.
    pub config: LlamaConfig,
    /// Token embeddings (Q8_0), dequantized when looked up; also the output layer when
    /// the model ties them (SmolLM2 does).
    embeddings: Q80Packed,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    /// A separate output layer, if the model has one.
    output: Option<Q80Packed>,
    /// cos and sin per (position, pair).
    cos: Vec<f32>,
    sin: Vec<f32>,
    scratch: Mutex<Scratch>,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// One sequence's keys and values: per layer, `len × kv_width` values each, after RoPE,
/// as f16 (bits), llama.cpp's default cache type.
#[derive(Debug, Clone, Default)]
pub struct Cache {
    k: Vec<Vec<u16>>,
    v: Vec<Vec<u16>>,
    len: usize,
    /// Values per position in each layer's keys (and values).
    width: usize,
}

impl Cache {
    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Keep the first `len` positions (at most those cached): the keys and values of a
    /// prefix do not depend on what followed it. Each layer is cut to the same length,
    /// whatever a pass that failed half-way left in it.
    pub fn truncate(&mut self, len: usize) {
        let keep = len.min(self.len);
        for layer in self.k.iter_mut().chain(self.v.iter_mut()) {
            layer.truncate(keep * self.width);
        }
        self.len = keep;
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Buffers of one pass, kept between passes so a pass allocates nothing once warm.
#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    h: Vec<f32>,
    qkv: Vec<f32>,
    att: Vec<f32>,
    proj: Vec<f32>,
    gate_up: Vec<f32>,
    act: Vec<f32>,
    q8: Q81,
}

thread_local! {
    /// Attention scores of one (row, head), per kernel thread.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

fn q4_1_data(t: &QTensor) -> Result<(Vec<u8>, usize, usize)> {
    if t.dtype() != GgmlDType::Q4_1 {
        candle_core::bail!("the fused decoder needs Q4_1 layers, found {:?}", t.dtype());
    }
    let (rows, cols) = t.shape().dims2()?;
    Ok((t.data()?.into_owned(), rows, cols))
}

/// Several Q4_1 matrices of one width, stacked row-wise into one product.
fn stacked(parts: &[QTensor]) -> Result<Q41Packed> {
    let mut data = Vec::new();
    let (mut rows, mut width) = (0, None);
    for t in parts {
        let (d, r, c) = q4_1_data(t)?;
        if width.replace(c).is_some_and(|w| w != c) {
            candle_core::bail!("stacked matrices of different widths");
        }
        data.extend_from_slice(&d);
        rows += r;
    }
    Q41Packed::from_gguf(&data, rows, width.unwrap_or(0)).map_err(candle_core::Error::Msg)
}

fn q8_0(t: &QTensor) -> Result<Q80Packed> {
    if t.dtype() != GgmlDType::Q8_0 {
        candle_core::bail!(
            "the fused decoder needs a Q8_0 output layer, found {:?}",
            t.dtype()
        );
    }
    let (rows, cols) = t.shape().dims2()?;
    Q80Packed::from_gguf(&t.data()?, rows, cols).map_err(candle_core::Error::Msg)
}

fn f32_vector(t: QTensor) -> Result<Vec<f32>> {
    t.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()
}

impl Decoder {
    /// Load from an open GGUF file; an error if a layer is not Q4_1 or the embeddings are
    /// not Q8_0 (the caller then uses the tensor-graph decoder).
    pub fn from_gguf<R: std::io::Read + std::io::Seek>(
        content: &Content,
        reader: &mut R,
    ) -> Result<Self> {
        let config = LlamaConfig::from_gguf(content)?;
        if config.head_dim % 2 != 0
            || config.n_kv_head == 0
            || config.n_head % config.n_kv_head != 0
        {
            candle_core::bail!("unsupported attention shape");
        }
        let device = Device::Cpu;
        let mut tensor = |name: &str| content.tensor(reader, name, &device);
        let embeddings = q8_0(&tensor("token_embd.weight")?)?;
        let output = match tensor("output.weight") {
            Ok(t) => Some(q8_0(&t)?),
            Err(_) => None,
        };
        let norm = f32_vector(tensor("output_norm.weight")?)?;
        let mut layers = Vec::with_capacity(config.n_layer);
        for i in 0..config.n_layer {
            let mut t = |n: &str| tensor(&format!("blk.{i}.{n}.weight"));
            let (q, k, v) = (t("attn_q")?, t("attn_k")?, t("attn_v")?);
            let wo = t("attn_output")?;
            let (gate, up, down) = (t("ffn_gate")?, t("ffn_up")?, t("ffn_down")?);
            let attn_norm = f32_vector(t("attn_norm")?)?;
            let ffn_norm = f32_vector(t("ffn_norm")?)?;
            layers.push(Layer {
                qkv: stacked(&[q, k, v])?,
                wo: stacked(&[wo])?,
                gate_up: stacked(&[gate, up])?,
                down: stacked(&[down])?,
                attn_norm,
                ffn_norm,
            });
        }
        let half = config.head_dim / 2;
        let mut cos = Vec::with_capacity(config.context_length * half);
        let mut sin = Vec::with_capacity(config.context_length * half);
        // As ggml's rope cache: θ starts at the position and is multiplied by
        // base^(-2/d) pair after pair, in f32.
        let theta_scale = config.rope_base.powf(-2.0 / config.head_dim as f32);
        for pos in 0..config.context_length {
            let mut theta = pos as f32;
            for _ in 0..half {
                cos.push(theta.cos());
                sin.push(theta.sin());
                theta *= theta_scale;
            }
        }
        Ok(Self {
            config,
            embeddings,
            layers,
            norm,
            output,
            cos,
            sin,
            scratch: Mutex::new(Scratch::default()),
        })
    }

    /// A new, empty cache for one sequence.
    pub fn new_cache(&self) -> Cache {
        Cache {
            k: vec![Vec::new(); self.config.n_layer],
            v: vec![Vec::new(); self.config.n_layer],
            len: 0,
            width: self.config.n_kv_head * self.config.head_dim,
        }
    }

    /// Run `tokens` (the next positions of the sequence whose cache is `cache`) and return
    /// the logits of the last one.
    pub fn forward(&self, tokens: &[u32], cache: &mut Cache) -> Result<Vec<f32>> {
        let owners = vec![0; tokens.len()];
        let mut logits = self.pass(
            tokens,
            &owners,
            &mut [cache],
            &[tokens.len().wrapping_sub(1)],
        )?;
        logits
            .pop()
            .ok_or_else(|| candle_core::Error::Msg("no tokens to run".into()))
    }

    /// Run `tokens` (the next positions of the sequence whose cache is `cache`) and return
    /// the logits of the rows in `wanted` (indices into `tokens`), all from one pass: what
    /// scoring a text (its perplexity) needs.
    pub fn forward_rows(
        &self,
        tokens: &[u32],
        cache: &mut Cache,
        wanted: &[usize],
    ) -> Result<Vec<Vec<f32>>> {
        let owners = vec![0; tokens.len()];
        self.pass(tokens, &owners, &mut [cache], wanted)
    }

    /// One decoding step of several sequences: `tokens[i]` is the next token of the
    /// sequence whose cache is `caches[i]`; returns each one's logits.
    pub fn forward_batch(
        &self,
        tokens: &[u32],
        caches: &mut [&mut Cache],
    ) -> Result<Vec<Vec<f32>>> {
        if tokens.len() != caches.len() {
            candle_core::bail!("{} tokens for {} sequences", tokens.len(), caches.len());
        }
        let owners: Vec<usize> = (0..tokens.len()).collect();
        let wanted: Vec<usize> = (0..tokens.len()).collect();
        self.pass(tokens, &owners, caches, &wanted)
    }

    /// One forward pass over `tokens`, row `i` belonging to sequence `owners[i]` (rows of a
    /// sequence consecutive, in order); returns the logits of the rows in `wanted`.
    fn pass(
        &self,
        tokens: &[u32],
        owners: &[usize],
        caches: &mut [&mut Cache],
        wanted: &[usize],
    ) -> Result<Vec<Vec<f32>>> {
        let c = &self.config;
        let rows = tokens.len();
        if rows == 0 {
            candle_core::bail!("no tokens to run");
        }
        // Each row's position: its sequence's cached length plus its place among that
        // sequence's rows.
        let mut positions = Vec::with_capacity(rows);
        let mut seen = vec![0usize; caches.len()];
        for &o in owners {
            let cache = caches
                .get(o)
                .ok_or_else(|| candle_core::Error::Msg("row of no sequence".into()))?;
            positions.push(cache.len + seen[o]);
            seen[o] += 1;
        }
        if positions.iter().any(|&p| p >= c.context_length) {
            candle_core::bail!("the sequence is longer than the context window");
        }
        let vocab = self.embeddings.rows();
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= vocab) {
            candle_core::bail!("token {t} is outside the vocabulary");
        }
        let isa = Isa::active();
        let pool = Pool::global();
        let width = c.n_embd;
        let kv_width = c.n_kv_head * c.head_dim;
        let q_width = c.n_head * c.head_dim;
        let mut guard = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut *guard;
        s.x.resize(rows * width, 0.0);
        for (row, &t) in tokens.iter().enumerate() {
            self.embed(t as usize, &mut s.x[row * width..][..width]);
        }
        for (l, layer) in self.layers.iter().enumerate() {
            // Attention block.
            rms_norm(isa, &s.x, &layer.attn_norm, c.rms_eps as f32, &mut s.h);
            s.q8.quantize(isa, &s.h, width);
            let qkv_width = layer.qkv.rows();
            s.qkv.resize(rows * qkv_width, 0.0);
            layer.qkv.matmul(&s.q8, &mut s.qkv, isa, pool);
            for (row, &pos) in positions.iter().enumerate() {
                let r = &mut s.qkv[row * qkv_width..][..qkv_width];
                let (q, kv) = r.split_at_mut(q_width);
                let (k, v) = kv.split_at_mut(kv_width);
                self.rope(isa, q, pos);
                self.rope(isa, k, pos);
                let cache = &mut caches[owners[row]];
                push_f16(&mut cache.k[l], k);
                push_f16(&mut cache.v[l], v);
            }
            s.att.resize(rows * q_width, 0.0);
            self.attend(
                l, &s.qkv, qkv_width, &positions, owners, &*caches, &mut s.att, pool,
            );
            s.q8.quantize(isa, &s.att, q_width);
            s.proj.resize(rows * width, 0.0);
            layer.wo.matmul(&s.q8, &mut s.proj, isa, pool);
            // x1 = wo·y + x, as candle adds them.
            math::add(isa, &mut s.x, &s.proj);
            // Feed-forward block.
            rms_norm(isa, &s.x, &layer.ffn_norm, c.rms_eps as f32, &mut s.h);
            s.q8.quantize(isa, &s.h, width);
            let gu = layer.gate_up.rows();
            let hidden = gu / 2;
            s.gate_up.resize(rows * gu, 0.0);
            layer.gate_up.matmul(&s.q8, &mut s.gate_up, isa, pool);
            s.act.resize(rows * hidden, 0.0);
            for row in 0..rows {
                let (g, u) = s.gate_up[row * gu..][..gu].split_at(hidden);
                math::silu_mul(isa, g, u, &mut s.act[row * hidden..][..hidden]);
            }
            s.q8.quantize(isa, &s.act, hidden);
            layer.down.matmul(&s.q8, &mut s.proj, isa, pool);
            math::add(isa, &mut s.x, &s.proj);
        }
        for (cache, n) in caches.iter_mut().zip(seen) {
            cache.len += n;
        }
        // The output layer for the wanted rows only.
        // Gathered into the attention buffer, free by now: no allocation per pass.
        let mut gathered = std::mem::take(&mut s.att);
        gathered.clear();
        for &row in wanted {
            let x =
                s.x.get(row * width..(row + 1) * width)
                    .ok_or_else(|| candle_core::Error::Msg("wanted row out of range".into()))?;
            gathered.extend_from_slice(x);
        }
        rms_norm(isa, &gathered, &self.norm, c.rms_eps as f32, &mut s.h);
        s.att = gathered;
        s.q8.quantize(isa, &s.h, width);
        let head = self.output.as_ref().unwrap_or(&self.embeddings);
        let vocab = head.rows();
        let mut logits = vec![0f32; wanted.len() * vocab];
        head.matmul(&s.q8, &mut logits, isa, pool);
        Ok(logits.chunks_exact(vocab).map(<[f32]>::to_vec).collect())
    }

    /// Token `t`'s embedding, dequantized as candle does (`d · q`).
    fn embed(&self, t: usize, out: &mut [f32]) {
        self.embeddings.dequantize_row(t, out);
    }

    /// Interleaved RoPE (pairs `2i, 2i+1`) of every head in `x` at `pos`, as candle's
    /// `rope_i`.
    fn rope(&self, isa: Isa, x: &mut [f32], pos: usize) {
        let half = self.config.head_dim / 2;
        let (cos, sin) = (
            &self.cos[pos * half..][..half],
            &self.sin[pos * half..][..half],
        );
        math::rope(isa, x, cos, sin);
    }

    /// Attention of every row and head of layer `l` over its sequence's cache up to its
    /// own position, into `out` (`rows × q_width`), on the pool.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        l: usize,
        qkv: &[f32],
        qkv_width: usize,
        positions: &[usize],
        owners: &[usize],
        caches: &[&mut Cache],
        out: &mut [f32],
        pool: &Pool,
    ) {
        let c = &self.config;
        let (dim, heads) = (c.head_dim, c.n_head);
        let group = heads / c.n_kv_head;
        let stride = c.n_kv_head * dim;
        let isa = Isa::active();
        // One task per (row, head), each writing its own `dim` outputs.
        pool.for_each_chunk(out, dim, &|task, out| {
            let (row, head) = (task / heads, task % heads);
            let q = &qkv[row * qkv_width + head * dim..][..dim];
            let cache = &caches[owners[row]];
            let kv = HeadView {
                keys: &cache.k[l],
                values: &cache.v[l],
                stride,
                offset: head / group * dim,
            };
            SCORES.with_borrow_mut(|scores| {
                attention::attend(isa, q, kv, positions[row] + 1, scores, out)
            });
        });
    }
}

/// Append `values` to an f16 cache, rounded to nearest.
fn push_f16(cache: &mut Vec<u16>, values: &[f32]) {
    let at = cache.len();
    cache.resize(at + values.len(), 0);
    cache[at..]
        .reinterpret_cast_mut::<half::f16>()
        .convert_from_f32_slice(values);
}

/// RMSNorm of every row of `x` into `out`, resized to fit.
fn rms_norm(isa: Isa, x: &[f32], w: &[f32], eps: f32, out: &mut Vec<f32>) {
    out.resize(x.len(), 0.0);
    math::rms_norm(isa, x, w, eps, out);
}

/// The environment variable that picks the decoder: `fused` (this module's, the default,
/// when the model allows it) or `graph` (the tensor-graph path, candle's arithmetic: the
/// tests' reference, and the fallback for models whose layers are not Q4_1).
pub const DECODER_VARIABLE: &str = "WARDEN_DECODER";

/// The text model's weights on whichever decoder serves them.
#[derive(Debug)]
pub enum TextWeights {
    /// The fused decoder (Q4_1 layers, Q8_0 embeddings).
    Fused(Box<Decoder>),
    /// The tensor-graph decoder, for any llama-family GGUF.
    Graph(Box<super::llama::Weights>),
}

/// One sequence's cache on the decoder of its [`TextWeights`].
#[derive(Debug, Clone)]
pub enum SeqCache {
    /// Of [`TextWeights::Fused`].
    Fused(Cache),
    /// Of [`TextWeights::Graph`].
    Graph(super::llama::KvCache),
}

impl SeqCache {
    /// Positions cached so far.
    pub fn len(&self) -> usize {
        match self {
            SeqCache::Fused(c) => c.len(),
            SeqCache::Graph(c) => c.len(),
        }
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keep the first `len` positions.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        match self {
            SeqCache::Fused(c) => {
                c.truncate(len);
                Ok(())
            }
            SeqCache::Graph(c) => c.truncate(len),
        }
    }
}

fn mismatch() -> candle_core::Error {
    candle_core::Error::Msg("a cache of the other decoder".into())
}

impl TextWeights {
    /// Load from an open GGUF file: the fused decoder if the model allows it and
    /// [`DECODER_VARIABLE`] does not ask for the tensor graph, else the tensor graph.
    pub fn from_gguf<R: std::io::Read + std::io::Seek>(
        content: &Content,
        reader: &mut R,
    ) -> Result<Self> {
        let fused = std::env::var(DECODER_VARIABLE).map_or(true, |v| v.trim() != "graph");
        if fused {
            match Decoder::from_gguf(content, reader) {
                Ok(d) => {
                    tracing::info!(kernels = Isa::active().as_str(), "fused decoder");
                    return Ok(TextWeights::Fused(Box::new(d)));
                }
                Err(e) => tracing::warn!(
                    reason = %e,
                    "the fused decoder cannot run this model; the slower tensor-graph decoder serves it"
                ),
            }
        }
        super::llama::Weights::from_gguf(content, reader, &Device::Cpu)
            .map(|w| TextWeights::Graph(Box::new(w)))
    }

    /// The model's shape.
    pub fn config(&self) -> &LlamaConfig {
        match self {
            TextWeights::Fused(d) => &d.config,
            TextWeights::Graph(w) => &w.config,
        }
    }

    /// A new, empty cache for one sequence.
    pub fn new_cache(&self) -> SeqCache {
        match self {
            TextWeights::Fused(d) => SeqCache::Fused(d.new_cache()),
            TextWeights::Graph(w) => SeqCache::Graph(w.new_cache()),
        }
    }

    /// Logits of the last of `tokens`, fed after what `cache` holds.
    pub fn forward(&self, tokens: &[u32], cache: &mut SeqCache) -> Result<Vec<f32>> {
        match (self, cache) {
            (TextWeights::Fused(d), SeqCache::Fused(c)) => d.forward(tokens, c),
            (TextWeights::Graph(w), SeqCache::Graph(c)) => w.forward(tokens, c),
            _ => Err(mismatch()),
        }
    }

    /// One decoding step of several sequences at once.
    pub fn forward_batch(
        &self,
        tokens: &[u32],
        caches: &mut [&mut SeqCache],
    ) -> Result<Vec<Vec<f32>>> {
        match self {
            TextWeights::Fused(d) => {
                let mut inner = caches
                    .iter_mut()
                    .map(|c| match &mut **c {
                        SeqCache::Fused(c) => Ok(c),
                        SeqCache::Graph(_) => Err(mismatch()),
                    })
                    .collect::<Result<Vec<_>>>()?;
                d.forward_batch(tokens, &mut inner)
            }
            TextWeights::Graph(w) => {
                let mut inner = caches
                    .iter_mut()
                    .map(|c| match &mut **c {
                        SeqCache::Graph(c) => Ok(c),
                        SeqCache::Fused(_) => Err(mismatch()),
                    })
                    .collect::<Result<Vec<_>>>()?;
                w.forward_batch(tokens, &mut inner)
            }
        }
    }
}
