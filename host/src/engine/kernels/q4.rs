//! Q4_1 weights × Q8_1 activations, repacked for SIMD.
//!
//! A GGUF stores a Q4_1 matrix row by row in blocks of 32 values: an f16 scale `d`, an f16
//! minimum `m` and 16 bytes whose low nibbles are values 0..16 and high nibbles values
//! 16..32. [`Q41Packed`] regroups it, losslessly, into groups of 16 rows: for each group
//! and block, 256 bytes in which the 4-byte word `t` (of 4) of row `r` (of 16) sits at
//! `64·t + 4·r`, then the 16 rows' `d` and `m` (f16). One 64-byte load then holds 4
//! nibble-bytes of all 16 rows, which is what `vpdpbusd` multiplies against 4 activation
//! bytes broadcast to every lane: 8 instructions per block for 16 rows.
//!
//! Activations are quantized to Q8_1 as ggml's `quantize_row_q8_1` does (llama.cpp's
//! arithmetic; candle's differs in the last step of rounding), and each row's sum is
//! `Σ_blocks (Σq_w·q_x)·d_w·d_x + m_w·s_x`, accumulated block by block with every product
//! and sum rounded in that order (no fused multiply-add). The integer sums are exact in
//! any order, so every path (AVX-512 VNNI, AVX2, scalar) gives the same bits (tested), and
//! they agree with candle's `QMatMul` to within one activation quantization step.

use half::f16;

use super::pool::Pool;
use super::{Isa, TILE};

/// Values per block, for Q4_1 and Q8_1 alike.
pub const BLOCK: usize = 32;
/// Rows per interleaved group.
pub const GROUP: usize = 16;
/// Bytes of one Q4_1 block in a GGUF: f16 `d`, f16 `m`, 16 bytes of nibbles.
pub const Q4_1_BYTES: usize = 20;

/// A Q4_1 matrix of shape (`rows`, `cols`), repacked; used as `x · Wᵀ`.
pub struct Q41Packed {
    rows: usize,
    cols: usize,
    groups: usize,
    blocks: usize,
    /// Per (group, block): 256 bytes of interleaved nibbles.
    qs: Vec<u8>,
    /// Per (group, block): 16 f16 scales, then `m` likewise.
    d: Vec<u16>,
    m: Vec<u16>,
}

impl std::fmt::Debug for Q41Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Q41Packed")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish_non_exhaustive()
    }
}

/// Activation rows quantized to Q8_1: per block an f16-rounded scale `d`, `s = d·Σq`
/// (f16), and 32 signed bytes; the Q8_0 kernel uses the same bytes and scales.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Q81 {
    pub(super) blocks: usize,
    pub(super) d: Vec<f32>,
    pub(super) s: Vec<f32>,
    /// `Σq` per block, exact (the Q8_0 kernel's offset correction).
    pub(super) sums: Vec<i32>,
    pub(super) qs: Vec<i8>,
}

/// How activations are rounded to bytes: the two libraries differ in the last step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rounding {
    /// ggml's `quantize_row_q8_1` (llama.cpp): `x · 127/max`, half to even.
    Ggml,
    /// candle's `BlockQ8_1::from_float`: `x · 1/d`, half away from zero.
    Candle,
}

impl Q81 {
    /// `x` (rows of `cols` values, `cols` a multiple of [`BLOCK`]) quantized as ggml's
    /// `quantize_row_q8_1` does (what llama.cpp runs), reusing this value's buffers.
    pub fn quantize(&mut self, isa: Isa, x: &[f32], cols: usize) {
        self.quantize_as(isa, x, cols, Rounding::Ggml);
    }

    /// [`Self::quantize`] with the rounding of `rounding`.
    pub fn quantize_as(&mut self, isa: Isa, x: &[f32], cols: usize, rounding: Rounding) {
        assert!(
            cols.is_multiple_of(BLOCK) && x.len().is_multiple_of(cols),
            "Q8_1 of {} by {cols}",
            x.len()
        );
        let n = x.len() / BLOCK;
        self.blocks = cols / BLOCK;
        self.d.resize(n, 0.0);
        self.s.resize(n, 0.0);
        self.sums.resize(n, 0);
        self.qs.resize(n * BLOCK, 0);
        let out = Blocks {
            d: &mut self.d,
            s: &mut self.s,
            sums: &mut self.sums,
            qs: &mut self.qs,
        };
        quantize_blocks(isa, x, rounding, out);
    }

    /// Rows quantized.
    pub fn rows(&self) -> usize {
        self.d.len().checked_div(self.blocks).unwrap_or(0)
    }
}

/// The output buffers of [`quantize_blocks`], one entry (or [`BLOCK`] bytes) per block.
struct Blocks<'a> {
    d: &'a mut [f32],
    s: &'a mut [f32],
    sums: &'a mut [i32],
    qs: &'a mut [i8],
}

super::per_isa! {
    /// Every block of `x` quantized into `out`.
    fn quantize_blocks(x: &[f32], rounding: Rounding, out: Blocks<'_>) {
        let blocks = x
            .chunks_exact(BLOCK)
            .zip(out.qs.chunks_exact_mut(BLOCK))
            .zip(out.d.iter_mut().zip(out.s.iter_mut()).zip(out.sums.iter_mut()));
        for ((block, qs), ((d_out, s_out), sum_out)) in blocks {
            let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let d16 = f16::from_f32(d);
            // `q = round-half-even(x · 127/max|x|)` (ggml) or `round-half-away(x · 1/d)`
            // (candle).
            match rounding {
                Rounding::Ggml => {
                    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
                    for (q, &v) in qs.iter_mut().zip(block) {
                        *q = (v * id).round_ties_even() as i8;
                    }
                }
                Rounding::Candle => {
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    for (q, &v) in qs.iter_mut().zip(block) {
                        *q = (v * id).round() as i8;
                    }
                }
            }
            let sum = qs.iter().map(|&q| i32::from(q)).sum::<i32>();
            // `s`: the f16 of `d · Σq` (ggml), or the f16 product of the f16-rounded sum
            // and `d` (candle).
            *s_out = match rounding {
                Rounding::Ggml => f16::from_f32(d * sum as f32).to_f32(),
                Rounding::Candle => (f16::from_f32(sum as f32) * d16).to_f32(),
            };
            *d_out = d16.to_f32();
            *sum_out = sum;
        }
    }
}

impl Q41Packed {
    /// Repack GGUF Q4_1 `data` of shape (`rows`, `cols`).
    pub fn from_gguf(data: &[u8], rows: usize, cols: usize) -> Result<Self, String> {
        if !cols.is_multiple_of(BLOCK) {
            return Err(format!("Q4_1 rows of {cols} values are not whole blocks"));
        }
        let blocks = cols / BLOCK;
        if data.len() != rows * blocks * Q4_1_BYTES {
            return Err(format!(
                "Q4_1 tensor of {} bytes for {rows}×{cols}",
                data.len()
            ));
        }
        let groups = rows.div_ceil(GROUP);
        let mut qs = vec![0u8; groups * blocks * 256];
        let mut d = vec![0u16; groups * blocks * GROUP];
        let mut m = vec![0u16; groups * blocks * GROUP];
        for row in 0..rows {
            let (g, r) = (row / GROUP, row % GROUP);
            for b in 0..blocks {
                let src = &data[(row * blocks + b) * Q4_1_BYTES..][..Q4_1_BYTES];
                let gb = g * blocks + b;
                d[gb * GROUP + r] = u16::from_le_bytes([src[0], src[1]]);
                m[gb * GROUP + r] = u16::from_le_bytes([src[2], src[3]]);
                for t in 0..4 {
                    qs[gb * 256 + 64 * t + 4 * r..][..4].copy_from_slice(&src[4 + 4 * t..][..4]);
                }
            }
        }
        Ok(Self {
            rows,
            cols,
            groups,
            blocks,
            qs,
            d,
            m,
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

    /// `out[n·rows + r] = x_n · W_r` for every activation row `n` of `x`, on `pool`, with
    /// the kernels of `isa` (which the CPU must support).
    pub fn matmul(&self, x: &Q81, out: &mut [f32], isa: Isa, pool: &Pool) {
        assert_eq!(x.blocks, self.blocks, "activation width");
        super::grouped_matmul(self, x, out, isa, pool);
    }
}

impl super::Grouped for Q41Packed {
    fn rows(&self) -> usize {
        self.rows
    }

    fn groups(&self) -> usize {
        self.groups
    }

    /// One group's 16 sums for activation rows `start..start + count`.
    fn group(
        &self,
        g: usize,
        x: &Q81,
        start: usize,
        count: usize,
        tile: &mut [[f32; GROUP]; TILE],
        isa: Isa,
    ) {
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `matmul` asserted that the CPU supports AVX-512 VNNI.
            #[allow(unsafe_code)]
            Isa::Avx512Vnni => unsafe { self.group_avx512(g, x, start, count, tile) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `matmul` asserted that the CPU supports AVX2 and F16C.
            #[allow(unsafe_code)]
            Isa::Avx2 => unsafe { self.group_avx2(g, x, start, count, tile) },
            _ => self.group_scalar(g, x, start, count, tile),
        }
    }
}

impl Q41Packed {
    /// The reference: [`Self::group`] in plain Rust.
    fn group_scalar(
        &self,
        g: usize,
        x: &Q81,
        start: usize,
        count: usize,
        tile: &mut [[f32; GROUP]; TILE],
    ) {
        for (i, sums) in tile[..count].iter_mut().enumerate() {
            let row = start + i;
            for (r, sum) in sums.iter_mut().enumerate() {
                let mut sumf = 0f32;
                for b in 0..self.blocks {
                    let gb = g * self.blocks + b;
                    let xb = row * self.blocks + b;
                    let qx = &x.qs[xb * BLOCK..][..BLOCK];
                    let mut sumi = 0i32;
                    for t in 0..4 {
                        let word = &self.qs[gb * 256 + 64 * t + 4 * r..][..4];
                        for (j, &byte) in word.iter().enumerate() {
                            let k = 4 * t + j;
                            sumi += i32::from(byte & 0x0F) * i32::from(qx[k])
                                + i32::from(byte >> 4) * i32::from(qx[k + 16]);
                        }
                    }
                    let dw = f16::from_bits(self.d[gb * GROUP + r]).to_f32();
                    let mw = f16::from_bits(self.m[gb * GROUP + r]).to_f32();
                    sumf += sumi as f32 * dw * x.d[xb] + mw * x.s[xb];
                }
                *sum = sumf;
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c")]
    unsafe fn group_avx512(
        &self,
        g: usize,
        x: &Q81,
        start: usize,
        count: usize,
        tile: &mut [[f32; GROUP]; TILE],
    ) {
        use std::arch::x86_64::*;
        let low = _mm512_set1_epi8(0x0F);
        let mut acc = [_mm512_setzero_ps(); TILE];
        for b in 0..self.blocks {
            let gb = g * self.blocks + b;
            // SAFETY: (group, block) `gb` has 256 bytes of nibbles and 16 + 16 scales.
            let (w, dw, mw) = unsafe {
                let p = self.qs.as_ptr().add(gb * 256);
                let w = [
                    _mm512_loadu_si512(p.cast()),
                    _mm512_loadu_si512(p.add(64).cast()),
                    _mm512_loadu_si512(p.add(128).cast()),
                    _mm512_loadu_si512(p.add(192).cast()),
                ];
                let dw =
                    _mm512_cvtph_ps(_mm256_loadu_si256(self.d.as_ptr().add(gb * GROUP).cast()));
                let mw =
                    _mm512_cvtph_ps(_mm256_loadu_si256(self.m.as_ptr().add(gb * GROUP).cast()));
                (w, dw, mw)
            };
            let lo = [
                _mm512_and_si512(w[0], low),
                _mm512_and_si512(w[1], low),
                _mm512_and_si512(w[2], low),
                _mm512_and_si512(w[3], low),
            ];
            let hi = [
                _mm512_and_si512(_mm512_srli_epi16(w[0], 4), low),
                _mm512_and_si512(_mm512_srli_epi16(w[1], 4), low),
                _mm512_and_si512(_mm512_srli_epi16(w[2], 4), low),
                _mm512_and_si512(_mm512_srli_epi16(w[3], 4), low),
            ];
            for (i, acc) in acc[..count].iter_mut().enumerate() {
                let xb = (start + i) * self.blocks + b;
                // SAFETY: block `xb` of the activations has 32 bytes.
                let words: [i32; 8] =
                    unsafe { std::ptr::read_unaligned(x.qs.as_ptr().add(xb * BLOCK).cast()) };
                let mut sumi = _mm512_setzero_si512();
                for t in 0..4 {
                    sumi = _mm512_dpbusd_epi32(sumi, lo[t], _mm512_set1_epi32(words[t]));
                    sumi = _mm512_dpbusd_epi32(sumi, hi[t], _mm512_set1_epi32(words[4 + t]));
                }
                // sumi·d_w·d_x + m_w·s_x, rounded step by step as the reference.
                let t = _mm512_add_ps(
                    _mm512_mul_ps(
                        _mm512_mul_ps(_mm512_cvtepi32_ps(sumi), dw),
                        _mm512_set1_ps(x.d[xb]),
                    ),
                    _mm512_mul_ps(mw, _mm512_set1_ps(x.s[xb])),
                );
                *acc = _mm512_add_ps(*acc, t);
            }
        }
        for (sums, acc) in tile[..count].iter_mut().zip(acc) {
            // SAFETY: `sums` holds 16 floats.
            unsafe { _mm512_storeu_ps(sums.as_mut_ptr(), acc) };
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn group_avx2(
        &self,
        g: usize,
        x: &Q81,
        start: usize,
        count: usize,
        tile: &mut [[f32; GROUP]; TILE],
    ) {
        use std::arch::x86_64::*;
        let low = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        // Two halves of 8 rows: lanes `4·r` of each 64-byte word, in its first or second 32.
        for half in 0..2 {
            let mut acc = [_mm256_setzero_ps(); TILE];
            for b in 0..self.blocks {
                let gb = g * self.blocks + b;
                // SAFETY: (group, block) `gb` has 256 bytes of nibbles and 16 + 16 scales.
                let (w, dw, mw) = unsafe {
                    let p = self.qs.as_ptr().add(gb * 256 + 32 * half);
                    let w = [
                        _mm256_loadu_si256(p.cast()),
                        _mm256_loadu_si256(p.add(64).cast()),
                        _mm256_loadu_si256(p.add(128).cast()),
                        _mm256_loadu_si256(p.add(192).cast()),
                    ];
                    let at = gb * GROUP + 8 * half;
                    let dw = _mm256_cvtph_ps(_mm_loadu_si128(self.d.as_ptr().add(at).cast()));
                    let mw = _mm256_cvtph_ps(_mm_loadu_si128(self.m.as_ptr().add(at).cast()));
                    (w, dw, mw)
                };
                let lo = w.map(|v| _mm256_and_si256(v, low));
                let hi = w.map(|v| _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
                for (i, acc) in acc[..count].iter_mut().enumerate() {
                    let xb = (start + i) * self.blocks + b;
                    // SAFETY: block `xb` of the activations has 32 bytes.
                    let words: [i32; 8] =
                        unsafe { std::ptr::read_unaligned(x.qs.as_ptr().add(xb * BLOCK).cast()) };
                    let mut sumi = _mm256_setzero_si256();
                    for t in 0..4 {
                        // u8 × i8 pairs to i16 (at most 2·15·128: no saturation), then to i32.
                        let plo = _mm256_maddubs_epi16(lo[t], _mm256_set1_epi32(words[t]));
                        let phi = _mm256_maddubs_epi16(hi[t], _mm256_set1_epi32(words[4 + t]));
                        sumi = _mm256_add_epi32(
                            sumi,
                            _mm256_madd_epi16(_mm256_add_epi16(plo, phi), ones),
                        );
                    }
                    let t = _mm256_add_ps(
                        _mm256_mul_ps(
                            _mm256_mul_ps(_mm256_cvtepi32_ps(sumi), dw),
                            _mm256_set1_ps(x.d[xb]),
                        ),
                        _mm256_mul_ps(mw, _mm256_set1_ps(x.s[xb])),
                    );
                    *acc = _mm256_add_ps(*acc, t);
                }
            }
            for (sums, acc) in tile[..count].iter_mut().zip(acc) {
                // SAFETY: `sums` holds 16 floats; this half writes 8 of them.
                unsafe { _mm256_storeu_ps(sums.as_mut_ptr().add(8 * half), acc) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    fn weights(rows: usize, cols: usize, seed: usize) -> QTensor {
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| (((i * 7919 + seed * 104_729) % 1000) as f32 / 500.0 - 1.0) * 0.3)
            .collect();
        let t = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
        QTensor::quantize(&t, GgmlDType::Q4_1).unwrap()
    }

    #[test]
    fn every_path_matches_the_reference_and_candle() {
        let pool = Pool::new(3);
        // Rows not a multiple of 16, 1 to 9 activation rows (tiles of 4 and remainders).
        for (rows, cols, seed) in [(37, 320, 1), (16, 64, 2), (64, 576, 3), (5, 64, 4)] {
            let q = weights(rows, cols, seed);
            let data = q.data().unwrap();
            let packed = Q41Packed::from_gguf(&data, rows, cols).unwrap();
            let candle = QMatMul::from_qtensor(q).unwrap();
            for n in [1, 2, 4, 5, 9] {
                let x: Vec<f32> = (0..n * cols)
                    .map(|i| (((i + seed) * 31 % 97) as f32 - 48.0) / 17.0)
                    .collect();
                let xt = Tensor::from_vec(x.clone(), (n, cols), &Device::Cpu).unwrap();
                let want: Vec<f32> = candle
                    .forward(&xt)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                for rounding in [Rounding::Candle, Rounding::Ggml] {
                    let mut q81 = Q81::default();
                    q81.quantize_as(Isa::Scalar, &x, cols, rounding);
                    for isa in Isa::available() {
                        let mut other = Q81::default();
                        other.quantize_as(isa, &x, cols, rounding);
                        assert_eq!(other, q81, "{} quantization", isa.as_str());
                    }
                    let mut reference = vec![f32::NAN; n * rows];
                    packed.matmul(&q81, &mut reference, Isa::Scalar, &pool);
                    for (a, b) in reference.iter().zip(&want) {
                        if rounding == Rounding::Candle {
                            // candle's own quantization and order: the same bits.
                            assert_eq!(a.to_bits(), b.to_bits(), "{a} vs candle {b}");
                        } else {
                            // ggml's: a byte may differ by one step where a value falls
                            // on a tie or next to one.
                            assert!((a - b).abs() <= scale * 1e-3, "{a} vs candle {b}");
                        }
                    }
                    for isa in Isa::available() {
                        let mut got = vec![f32::NAN; n * rows];
                        packed.matmul(&q81, &mut got, isa, &pool);
                        let same = got
                            .iter()
                            .zip(&reference)
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{} {rows}×{cols}, {n} rows", isa.as_str());
                    }
                }
            }
        }
    }

    #[test]
    fn bad_shapes_are_refused() {
        assert!(Q41Packed::from_gguf(&[0; 20], 1, 16).is_err());
        assert!(Q41Packed::from_gguf(&[0; 19], 1, 32).is_err());
    }
}
