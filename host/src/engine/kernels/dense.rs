//! Dense matrices of f32 weights (the embedding model's linear layers): `y = x·Wᵀ + b`,
//! optionally through GELU, for every token of a packed batch at once.
//!
//! [`DensePacked`] repacks `W` (`rows × cols`) in blocks of 32 rows, column by column:
//! for each block and column `k`, the 32 rows' weights side by side (f32), or for each
//! pair of columns the 32 rows' two bf16 weights side by side ([`Precision::Bf16`]). A
//! register tile is 32 outputs × 12 tokens: per column, two 16-lane weight loads, twelve
//! broadcast activations and 24 fused multiply-adds (AVX-512); AVX2 runs it as tiles of
//! 6 tokens and two halves of 16 rows; the bf16 tile uses `vdpbf16ps` (two products per
//! lane and instruction: about twice the f32 rate on AMD Zen 4, about half of it on Intel
//! Sapphire Rapids, whose two 512-bit FMA units run f32 at twice Zen 4's rate) with f32
//! accumulation.
//!
//! In f32 every path adds the products in column order with one rounding each (fused
//! multiply-add), so AVX-512, AVX2 and scalar give the same bits (tested). In bf16 the
//! weights and the activations are rounded to bf16 (nearest, ties to even) and the sums
//! kept in f32; the scalar reference does the same arithmetic.

use std::cell::RefCell;

#[cfg(target_arch = "x86_64")]
use super::amx;
use super::pool::Pool;
use super::{Isa, SendPtr, math};

mod precision;
mod tiles;

use precision::convert_bf16;
pub use precision::{Precision, PrecisionSetting, bf16_supported, fastest, from_bf16, to_bf16};
#[cfg(target_arch = "x86_64")]
use tiles::{bf16_tile_avx512, f32_tile_avx2, f32_tile_avx512};

/// Whether the bf16 products run on AMX tiles ([`amx::active`]).
fn amx_active() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        amx::active()
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Rows per packed block.
const BLOCK_ROWS: usize = 32;
#[cfg(target_arch = "x86_64")]
const _: () = assert!(BLOCK_ROWS == amx::OUTPUTS, "an AMX product fills one block");
/// Tokens per register tile: 12 × 32 sums are 24 AVX-512 accumulators, which leaves room
/// for the two weight vectors and the broadcast in 32 registers. Each weight vector loaded
/// feeds 12 FMAs: with 6, a core with two 512-bit FMA units (Intel's server parts) waits on
/// L2 for the weights, at about 40 % of its peak.
const TILE_TOKENS: usize = 12;
/// Tokens per AVX2 register tile (16 registers: 12 accumulators).
const AVX2_TOKENS: usize = 6;
/// Tokens per task of an AMX product: one product's 32 tokens, whose activations stay in L1
/// while every block's weights stream past from L2. Measured against 64, 128 and 256
/// (fewer weight reads, but activations read from L2): 32 was 3–10 % faster.
#[cfg(target_arch = "x86_64")]
const AMX_CHUNK: usize = 32;

/// What follows the bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Nothing.
    Identity,
    /// `x·Φ(x)` with the exact (erf) normal CDF, BERT's `gelu`.
    Gelu,
}

/// A dense matrix repacked for [`DensePacked::matmul`].
pub struct DensePacked {
    rows: usize,
    cols: usize,
    blocks: usize,
    precision: Precision,
    /// f32: per block, per column, 32 weights.
    w32: Vec<f32>,
    /// bf16: per block, per column pair, 32 rows × 2 weights.
    w16: Vec<u16>,
}

impl std::fmt::Debug for DensePacked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DensePacked")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("precision", &self.precision)
            .finish_non_exhaustive()
    }
}

thread_local! {
    /// The activations in bf16, for the calling thread's products.
    static ACTIVATIONS: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
    /// The activations in panels, for the calling thread's AVX-512 products.
    static PANELS: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// Drop `v`'s buffer if it is large: a long pass's activations are not kept resident.
fn give_back<T>(v: &mut Vec<T>) {
    if v.len() > 512 * 1536 {
        *v = Vec::new();
    }
}

/// Lay the activations out in panels for the AVX-512 tiles: tile `j` (tokens
/// `12j..12j + 12`) is one panel, column by column, the tile's 12 words of a column side
/// by side, so that its twelve broadcasts of a column read one cache line rather than
/// twelve lines a row apart. A word is an f32, or (`bf16`) a pair of columns rounded to
/// bf16, converted here row by row, so the activations are read once. Tokens past `n`
/// are zero. With the 12-token tile this gained 10–25 % per product on Intel Sapphire
/// Rapids (single thread, 86–108 GFLOP/s from 67–89).
fn pack_panels(
    isa: Isa,
    x: &[f32],
    bf16: bool,
    cols: usize,
    n: usize,
    out: &mut Vec<u32>,
    pool: &Pool,
) {
    let words = if bf16 { cols / 2 } else { cols };
    let panel = words * TILE_TOKENS;
    out.resize(n.div_ceil(TILE_TOKENS) * panel, 0);
    pool.for_each_chunk(out, panel, &|j, piece| {
        let mut row = vec![0u16; if bf16 { cols } else { 0 }];
        for t in 0..TILE_TOKENS {
            let token = j * TILE_TOKENS + t;
            if token >= n {
                for k in 0..words {
                    piece[k * TILE_TOKENS + t] = 0;
                }
            } else if !bf16 {
                for (k, v) in x[token * cols..][..cols].iter().enumerate() {
                    piece[k * TILE_TOKENS + t] = v.to_bits();
                }
            } else {
                convert_bf16(isa, &x[token * cols..][..cols], &mut row);
                for (k, pair) in row.chunks_exact(2).enumerate() {
                    piece[k * TILE_TOKENS + t] = u32::from(pair[0]) | u32::from(pair[1]) << 16;
                }
            }
        }
    });
}

impl DensePacked {
    /// Pack `w`, row-major `rows × cols` (`cols` even), for `precision`.
    pub fn new(w: &[f32], rows: usize, cols: usize, precision: Precision) -> Result<Self, String> {
        if w.len() != rows * cols || cols == 0 || !cols.is_multiple_of(2) {
            return Err(format!(
                "a dense matrix of {} values for {rows}×{cols}",
                w.len()
            ));
        }
        let blocks = rows.div_ceil(BLOCK_ROWS);
        let weight = |r: usize, k: usize| if r < rows { w[r * cols + k] } else { 0.0 };
        let (mut w32, mut w16) = (Vec::new(), Vec::new());
        match precision {
            Precision::F32 => {
                w32.reserve(blocks * cols * BLOCK_ROWS);
                for b in 0..blocks {
                    for k in 0..cols {
                        w32.extend((0..BLOCK_ROWS).map(|i| weight(b * BLOCK_ROWS + i, k)));
                    }
                }
            }
            Precision::Bf16 => {
                w16.reserve(blocks * cols * BLOCK_ROWS);
                for b in 0..blocks {
                    for p in 0..cols / 2 {
                        for i in 0..BLOCK_ROWS {
                            let r = b * BLOCK_ROWS + i;
                            w16.push(to_bf16(weight(r, 2 * p)));
                            w16.push(to_bf16(weight(r, 2 * p + 1)));
                        }
                    }
                }
            }
        }
        Ok(Self {
            rows,
            cols,
            blocks,
            precision,
            w32,
            w16,
        })
    }

    /// Output width.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input width.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The arithmetic it was packed for.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// `out[t·rows + r] = act(x_t · W_r + bias_r)` for every token row `t` of `x`, the
    /// blocks of 32 rows split among the pool's threads. bf16 needs
    /// [`bf16_supported`]`(isa)` or [`Isa::Scalar`]; it runs on AMX's tiles where
    /// [`amx::active`] says so and `isa` is AVX-512.
    pub fn matmul(
        &self,
        x: &[f32],
        bias: &[f32],
        act: Activation,
        out: &mut [f32],
        isa: Isa,
        pool: &Pool,
    ) {
        self.matmul_with(x, bias, act, out, isa, amx_active(), pool);
    }

    /// [`Self::matmul`], with AMX used or not (if active) as `amx` says: tests run both.
    #[allow(clippy::too_many_arguments)]
    fn matmul_with(
        &self,
        x: &[f32],
        bias: &[f32],
        act: Activation,
        out: &mut [f32],
        isa: Isa,
        amx: bool,
        pool: &Pool,
    ) {
        assert!(!amx || amx_active(), "AMX is not active");
        let (rows, cols) = (self.rows, self.cols);
        assert!(
            x.len().is_multiple_of(cols) && bias.len() == rows,
            "dense shapes"
        );
        let n = x.len() / cols;
        assert_eq!(out.len(), n * rows, "dense output size");
        assert!(isa.supported(), "{} is not supported here", isa.as_str());
        assert!(
            self.precision == Precision::F32 || isa == Isa::Scalar || bf16_supported(isa),
            "bf16 products need AVX-512 BF16"
        );
        if n == 0 {
            return;
        }
        let out_ptr = SendPtr(out.as_mut_ptr());
        #[cfg(target_arch = "x86_64")]
        if self.precision == Precision::Bf16
            && isa == Isa::Avx512Vnni
            && amx
            && cols.is_multiple_of(amx::STEP)
        {
            self.matmul_amx(x, n, bias, act, out_ptr, pool);
            return;
        }
        let run = |xb: &[u16], panels: &[u32]| {
            let words = if self.precision == Precision::F32 {
                cols
            } else {
                cols / 2
            };
            pool.run(self.blocks, &|b| {
                let mut t0 = 0;
                while t0 < n {
                    let count = TILE_TOKENS.min(n - t0);
                    let mut tile = [[0f32; BLOCK_ROWS]; TILE_TOKENS];
                    let panel = match panels.is_empty() {
                        true => &[][..],
                        false => &panels[t0 * words..][..TILE_TOKENS * words],
                    };
                    self.tile(b, x, xb, panel, t0, count, &mut tile, isa);
                    self.finish(b, t0, &tile[..count], bias, act, isa, out_ptr);
                    t0 += count;
                }
            });
        };
        // The AVX-512 tiles read panels (f32 or bf16); the others read the rows as they
        // are, or (scalar bf16) rounded to bf16. A large pass's buffers are not kept.
        if isa == Isa::Avx512Vnni {
            let bf16 = self.precision == Precision::Bf16;
            PANELS.with_borrow_mut(|panels| {
                pack_panels(isa, x, bf16, cols, n, panels, pool);
                run(&[], panels);
                give_back(panels);
            });
            return;
        }
        match self.precision {
            Precision::F32 => run(&[], &[]),
            Precision::Bf16 => ACTIVATIONS.with_borrow_mut(|xb| {
                xb.resize(x.len(), 0);
                pool.for_each_chunk(xb, 16 * 1024, &|i, piece| {
                    convert_bf16(isa, &x[i * 16 * 1024..][..piece.len()], piece);
                });
                run(xb, &[]);
                give_back(xb);
            }),
        }
    }

    /// Add the bias to block `b`'s sums for tokens `t0..t0 + sums.len()`, apply `act`, and
    /// store them in the block's columns of `out`.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        b: usize,
        t0: usize,
        sums: &[[f32; BLOCK_ROWS]],
        bias: &[f32],
        act: Activation,
        isa: Isa,
        out: SendPtr,
    ) {
        let rows = self.rows;
        let width = BLOCK_ROWS.min(rows - b * BLOCK_ROWS);
        let bias = &bias[b * BLOCK_ROWS..][..width];
        for (i, sums) in sums.iter().enumerate() {
            let at = (t0 + i) * rows + b * BLOCK_ROWS;
            // SAFETY: block `b` writes only its own columns `b·32..b·32+width` of each
            // output row, and each (block, token) is stored by one task, so no two threads
            // write the same element; `at + width ≤ n·rows = out.len()` (asserted by
            // `matmul_with`).
            #[allow(unsafe_code)]
            let to = unsafe { std::slice::from_raw_parts_mut(out.get().add(at), width) };
            math::bias_gelu(isa, &sums[..width], bias, act == Activation::Gelu, to);
        }
    }

    /// The bf16 product on AMX tiles. The activations are rounded to bf16 once, row by row
    /// (padded with zero rows to a multiple of 16 tokens); the work is a grid of chunks of
    /// [`AMX_CHUNK`] tokens × groups of blocks, so that a chunk's activations stay in L1
    /// while a group's weights stream past them, and a short input still splits its blocks
    /// among the threads.
    #[cfg(target_arch = "x86_64")]
    fn matmul_amx(
        &self,
        x: &[f32],
        n: usize,
        bias: &[f32],
        act: Activation,
        out: SendPtr,
        pool: &Pool,
    ) {
        let cols = self.cols;
        let padded = n.next_multiple_of(16);
        ACTIVATIONS.with_borrow_mut(|xb| {
            xb.resize(padded * cols, 0);
            xb[n * cols..].fill(0);
            pool.for_each_chunk(&mut xb[..n * cols], 16 * 1024, &|i, piece| {
                convert_bf16(Isa::Avx512Vnni, &x[i * 16 * 1024..][..piece.len()], piece);
            });
            let chunks = padded.div_ceil(AMX_CHUNK);
            let groups = (4 * pool.threads()).div_ceil(chunks).clamp(1, self.blocks);
            let per_group = self.blocks.div_ceil(groups);
            let xs = &xb[..];
            pool.run(chunks * groups, &|task| {
                let (chunk, group) = (task / groups, task % groups);
                let tiles = amx::Tiles::configure();
                let mut sums = [[0f32; amx::OUTPUTS]; amx::TOKENS];
                let tokens = chunk * AMX_CHUNK..padded.min((chunk + 1) * AMX_CHUNK);
                for b in group * per_group..self.blocks.min((group + 1) * per_group) {
                    let w = &self.w16[b * cols * BLOCK_ROWS..][..cols * BLOCK_ROWS];
                    for t0 in tokens.clone().step_by(amx::TOKENS) {
                        let pairs = if tokens.end - t0 >= amx::TOKENS { 2 } else { 1 };
                        // SAFETY: rows `t0..t0 + 16·pairs` are within the `padded` rows of
                        // `xs`, each `cols` bf16 long; `w` is block `b`'s `cols / 2` pairs
                        // of 32 × 2 weights; `cols` is a multiple of 32 (checked by the
                        // caller).
                        #[allow(unsafe_code)]
                        unsafe {
                            let x = xs[t0 * cols..].as_ptr();
                            tiles.product(
                                x,
                                cols * 2,
                                w.as_ptr(),
                                cols / amx::STEP,
                                pairs,
                                &mut sums,
                            );
                        }
                        let done = &sums[..n.saturating_sub(t0).min(16 * pairs)];
                        self.finish(b, t0, done, bias, act, Isa::Avx512Vnni, out);
                    }
                }
            });
            give_back(xb);
        });
    }

    /// Block `b`'s sums for tokens `t0..t0 + count` (`count` ≤ [`TILE_TOKENS`]).
    #[allow(clippy::too_many_arguments)]
    fn tile(
        &self,
        b: usize,
        x: &[f32],
        xb: &[u16],
        panel: &[u32],
        t0: usize,
        count: usize,
        tile: &mut [[f32; BLOCK_ROWS]; TILE_TOKENS],
        isa: Isa,
    ) {
        let cols = self.cols;
        match (self.precision, isa) {
            #[cfg(target_arch = "x86_64")]
            (Precision::F32, Isa::Avx512Vnni) => {
                let w = &self.w32[b * cols * BLOCK_ROWS..][..cols * BLOCK_ROWS];
                // SAFETY: the CPU supports AVX-512 (asserted by `matmul`); `w` holds
                // `cols` columns of 32 weights and `panel` `cols` columns of 12 tokens.
                #[allow(unsafe_code)]
                unsafe {
                    f32_tile_avx512(w, panel, cols, count, tile)
                }
            }
            #[cfg(target_arch = "x86_64")]
            (Precision::F32, Isa::Avx2) => {
                let w = &self.w32[b * cols * BLOCK_ROWS..][..cols * BLOCK_ROWS];
                let x = &x[t0 * cols..][..count * cols];
                // SAFETY: the CPU supports AVX2 and FMA; shapes as above.
                #[allow(unsafe_code)]
                unsafe {
                    f32_tile_avx2(w, x, cols, count, tile)
                }
            }
            #[cfg(target_arch = "x86_64")]
            (Precision::Bf16, Isa::Avx512Vnni) => {
                let w = &self.w16[b * cols * BLOCK_ROWS..][..cols * BLOCK_ROWS];
                // SAFETY: the CPU has AVX-512 BF16 (asserted by `matmul`); `w` holds
                // `cols / 2` pairs of 32 × 2 weights and `panel` `cols / 2` columns of 12
                // tokens' bf16 pairs.
                #[allow(unsafe_code)]
                unsafe {
                    bf16_tile_avx512(w, panel, cols, count, tile)
                }
            }
            (Precision::F32, _) => {
                let w = &self.w32[b * cols * BLOCK_ROWS..][..cols * BLOCK_ROWS];
                for (t, sums) in tile[..count].iter_mut().enumerate() {
                    let x = &x[(t0 + t) * cols..][..cols];
                    for (i, s) in sums.iter_mut().enumerate() {
                        *s = x
                            .iter()
                            .enumerate()
                            .fold(0f32, |acc, (k, &v)| v.mul_add(w[k * BLOCK_ROWS + i], acc));
                    }
                }
            }
            (Precision::Bf16, _) => {
                let w = &self.w16[b * cols * BLOCK_ROWS..][..cols * BLOCK_ROWS];
                for (t, sums) in tile[..count].iter_mut().enumerate() {
                    let x = &xb[(t0 + t) * cols..][..cols];
                    for (i, s) in sums.iter_mut().enumerate() {
                        let mut acc = 0f32;
                        for p in 0..cols / 2 {
                            let at = (p * BLOCK_ROWS + i) * 2;
                            acc += from_bf16(x[2 * p + 1]) * from_bf16(w[at + 1]);
                            acc += from_bf16(x[2 * p]) * from_bf16(w[at]);
                        }
                        *s = acc;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, salt: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + salt) % 1009) as f32 / 504.5 - 1.0) * 0.7)
            .collect()
    }

    #[test]
    fn precision_settings_parse_and_resolve() {
        for setting in [
            PrecisionSetting::Auto,
            PrecisionSetting::F32,
            PrecisionSetting::Bf16,
        ] {
            assert_eq!(PrecisionSetting::parse(setting.as_str()), Some(setting));
        }
        assert_eq!(PrecisionSetting::parse("fp16"), None);
        assert_eq!(PrecisionSetting::default(), PrecisionSetting::Auto);
        let pool = Pool::new(1);
        // Fixed settings are kept; `auto` without bf16 hardware is f32, with it whichever
        // was faster.
        assert_eq!(
            PrecisionSetting::Bf16.resolve(Isa::Scalar, &pool),
            Precision::Bf16
        );
        assert_eq!(
            PrecisionSetting::F32.resolve(Isa::active(), &pool),
            Precision::F32
        );
        assert_eq!(
            PrecisionSetting::Auto.resolve(Isa::Scalar, &pool),
            Precision::F32
        );
        let auto = PrecisionSetting::Auto.resolve(Isa::active(), &pool);
        assert!(auto == Precision::F32 || bf16_supported(Isa::active()));
    }

    #[test]
    fn every_path_matches_plain_arithmetic() {
        let pool = Pool::new(2);
        // 70 rows: two whole blocks and a partial one; 45 tokens: three whole tiles of 12
        // and a part (for AVX2, seven tiles of 6 and a part; for AMX, a product of 32
        // tokens and one of 16, 13 of them real); 96 columns: three AMX steps.
        let (rows, cols, n) = (70, 96, 45);
        let w = data(rows * cols, 1);
        let bias = data(rows, 2);
        let x = data(n * cols, 3);
        let exact: Vec<f64> = (0..n * rows)
            .map(|i| {
                let (t, r) = (i / rows, i % rows);
                (0..cols)
                    .map(|k| f64::from(x[t * cols + k]) * f64::from(w[r * cols + k]))
                    .sum::<f64>()
                    + f64::from(bias[r])
            })
            .collect();
        for precision in [Precision::F32, Precision::Bf16] {
            let packed = DensePacked::new(&w, rows, cols, precision).unwrap();
            let mut want = vec![f32::NAN; n * rows];
            packed.matmul(
                &x,
                &bias,
                Activation::Identity,
                &mut want,
                Isa::Scalar,
                &pool,
            );
            let bound = match precision {
                Precision::F32 => 1e-5,
                Precision::Bf16 => 2e-2,
            };
            for (a, b) in want.iter().zip(&exact) {
                assert!(
                    (f64::from(*a) - b).abs() < bound,
                    "{precision:?}: {a} vs {b}"
                );
            }
            // Every instruction set, and AMX's tiles beside AVX-512 where they are active.
            let paths = Isa::available()
                .into_iter()
                .map(|isa| (isa, false))
                .chain(amx_active().then_some((Isa::Avx512Vnni, true)));
            for (isa, amx) in paths {
                if !precision.fast_on(isa) {
                    continue;
                }
                let path = format!("{}{}", isa.as_str(), if amx { " amx" } else { "" });
                let mut got = vec![f32::NAN; n * rows];
                packed.matmul_with(&x, &bias, Activation::Identity, &mut got, isa, amx, &pool);
                for (a, b) in got.iter().zip(&want) {
                    match precision {
                        Precision::F32 => assert_eq!(a.to_bits(), b.to_bits(), "{path}"),
                        // The same products, summed in another order.
                        Precision::Bf16 => assert!((a - b).abs() < 2e-5, "{path}: {a} vs {b}"),
                    }
                }
                let mut gelu = vec![f32::NAN; n * rows];
                packed.matmul_with(&x, &bias, Activation::Gelu, &mut gelu, isa, amx, &pool);
                for (g, &y) in gelu.iter().zip(&got) {
                    let mut v = [y];
                    math::gelu(Isa::Scalar, &mut v);
                    assert_eq!(
                        g.to_bits(),
                        v[0].to_bits(),
                        "{precision:?} {path} gelu({y})"
                    );
                }
            }
        }
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        assert_eq!(from_bf16(to_bf16(1.0 + 1.0 / 256.0)), 1.0); // a tie, to even
        assert_eq!(from_bf16(to_bf16(1.0 + 3.0 / 256.0)), 1.0 + 4.0 / 256.0);
        assert_eq!(to_bf16(f32::MIN_POSITIVE / 2.0), 0);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert!(DensePacked::new(&[0.0; 6], 2, 3, Precision::F32).is_err());
        // The vector conversion rounds as the scalar one, subnormals and ties included.
        let mut xs = data(1000, 5);
        xs.extend([
            f32::MIN_POSITIVE / 3.0,
            -1e-40,
            1.0 + 1.0 / 256.0,
            3.0e38,
            -0.0,
        ]);
        for isa in Isa::available() {
            let mut got = vec![0u16; xs.len()];
            convert_bf16(isa, &xs, &mut got);
            let want: Vec<u16> = xs.iter().map(|&v| to_bf16(v)).collect();
            assert_eq!(got, want, "{}", isa.as_str());
        }
    }
}
