//! Q8_0 weights × Q8 activations, repacked for SIMD: the output layer (SmolLM2's
//! `token_embd`, 49,152 rows, also its embedding table).
//!
//! A GGUF stores a Q8_0 matrix row by row in blocks of 32 values: an f16 scale `d` and 32
//! signed bytes. [`Q80Packed`] regroups it, losslessly, into groups of 16 rows: for each
//! group and block, 512 bytes in which the 4-byte word `t` (of 8) of row `r` (of 16) sits
//! at `64·t + 4·r`, then the 16 rows' `d`. The activations are the [`Q81`] rows the Q4_1
//! layers use, whose bytes and scales are exactly Q8_0's.
//!
//! `vpdpbusd` multiplies unsigned by signed bytes, so the AVX-512 kernel flips each weight
//! byte's top bit (`w + 128`, as unsigned) and subtracts `128·Σq_x` afterwards; AVX2 uses
//! `vpsignb` to move the weight's sign onto the activation. Both give the exact integer
//! sum, and every path rounds `Σ_blocks sumi·d_w·d_x` in the same order, so all of them
//! return the same bits as the scalar reference (tested). Against candle's Q8_0 `QMatMul`,
//! which sums the blocks in another order, the results differ by float rounding only.

use half::f16;

use super::pool::Pool;
use super::q4::{BLOCK, GROUP, Q81};
use super::{Isa, TILE};

/// Bytes of one Q8_0 block in a GGUF: f16 `d`, 32 signed bytes.
pub const Q8_0_BYTES: usize = 34;
/// Bytes of one (group, block) of interleaved weights.
const GROUP_BYTES: usize = GROUP * BLOCK;

/// A Q8_0 matrix of shape (`rows`, `cols`), repacked; used as `x · Wᵀ`.
pub struct Q80Packed {
    rows: usize,
    cols: usize,
    groups: usize,
    blocks: usize,
    /// Per (group, block): 512 interleaved signed bytes.
    qs: Vec<i8>,
    /// Per (group, block): 16 f16 scales.
    d: Vec<u16>,
}

impl std::fmt::Debug for Q80Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Q80Packed")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish_non_exhaustive()
    }
}

impl Q80Packed {
    /// Repack GGUF Q8_0 `data` of shape (`rows`, `cols`).
    pub fn from_gguf(data: &[u8], rows: usize, cols: usize) -> Result<Self, String> {
        if !cols.is_multiple_of(BLOCK) {
            return Err(format!("Q8_0 rows of {cols} values are not whole blocks"));
        }
        let blocks = cols / BLOCK;
        if data.len() != rows * blocks * Q8_0_BYTES {
            return Err(format!(
                "Q8_0 tensor of {} bytes for {rows}×{cols}",
                data.len()
            ));
        }
        let groups = rows.div_ceil(GROUP);
        let mut qs = vec![0i8; groups * blocks * GROUP_BYTES];
        let mut d = vec![0u16; groups * blocks * GROUP];
        for row in 0..rows {
            let (g, r) = (row / GROUP, row % GROUP);
            for b in 0..blocks {
                let src = &data[(row * blocks + b) * Q8_0_BYTES..][..Q8_0_BYTES];
                let gb = g * blocks + b;
                d[gb * GROUP + r] = u16::from_le_bytes([src[0], src[1]]);
                for t in 0..8 {
                    let dst = &mut qs[gb * GROUP_BYTES + 64 * t + 4 * r..][..4];
                    for (o, &v) in dst.iter_mut().zip(&src[2 + 4 * t..][..4]) {
                        *o = v as i8;
                    }
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

    /// Row `row` dequantized (`d · q`, as candle dequantizes), into `out` (`cols` long).
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        assert!(
            row < self.rows && out.len() == self.cols,
            "row {row} of {self:?}"
        );
        let (g, r) = (row / GROUP, row % GROUP);
        for (b, out) in out.chunks_exact_mut(BLOCK).enumerate() {
            let gb = g * self.blocks + b;
            let d = f16::from_bits(self.d[gb * GROUP + r]).to_f32();
            for (k, o) in out.iter_mut().enumerate() {
                *o = f32::from(self.qs[gb * GROUP_BYTES + 64 * (k / 4) + 4 * r + k % 4]) * d;
            }
        }
    }

    /// The reference: [`super::Grouped::group`] in plain Rust.
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
                    for (k, &q) in qx.iter().enumerate() {
                        let w = self.qs[gb * GROUP_BYTES + 64 * (k / 4) + 4 * r + k % 4];
                        sumi += i32::from(w) * i32::from(q);
                    }
                    let dw = f16::from_bits(self.d[gb * GROUP + r]).to_f32();
                    sumf += sumi as f32 * dw * x.d[xb];
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
        let flip = _mm512_set1_epi8(i8::MIN);
        let mut acc = [_mm512_setzero_ps(); TILE];
        for b in 0..self.blocks {
            let gb = g * self.blocks + b;
            // SAFETY: (group, block) `gb` has 512 bytes of weights and 16 scales.
            let (w, dw) = unsafe {
                let p = self.qs.as_ptr().add(gb * GROUP_BYTES);
                let w: [__m512i; 8] = std::array::from_fn(|t| {
                    _mm512_xor_si512(_mm512_loadu_si512(p.add(64 * t).cast()), flip)
                });
                let dw =
                    _mm512_cvtph_ps(_mm256_loadu_si256(self.d.as_ptr().add(gb * GROUP).cast()));
                (w, dw)
            };
            for (i, acc) in acc[..count].iter_mut().enumerate() {
                let xb = (start + i) * self.blocks + b;
                // SAFETY: block `xb` of the activations has 32 bytes.
                let words: [i32; 8] =
                    unsafe { std::ptr::read_unaligned(x.qs.as_ptr().add(xb * BLOCK).cast()) };
                // Σ(w + 128)·q, then less 128·Σq: the exact Σw·q.
                let mut sumi = _mm512_set1_epi32(-128 * x.sums[xb]);
                for (t, &w) in w.iter().enumerate() {
                    sumi = _mm512_dpbusd_epi32(sumi, w, _mm512_set1_epi32(words[t]));
                }
                let t = _mm512_mul_ps(
                    _mm512_mul_ps(_mm512_cvtepi32_ps(sumi), dw),
                    _mm512_set1_ps(x.d[xb]),
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
        let ones = _mm256_set1_epi16(1);
        // Two halves of 8 rows: lanes `4·r` of each 64-byte word, in its first or second 32.
        for half in 0..2 {
            let mut acc = [_mm256_setzero_ps(); TILE];
            for b in 0..self.blocks {
                let gb = g * self.blocks + b;
                // SAFETY: (group, block) `gb` has 512 bytes of weights and 16 scales.
                let (w, dw) = unsafe {
                    let p = self.qs.as_ptr().add(gb * GROUP_BYTES + 32 * half);
                    let w: [__m256i; 8] =
                        std::array::from_fn(|t| _mm256_loadu_si256(p.add(64 * t).cast()));
                    let at = gb * GROUP + 8 * half;
                    let dw = _mm256_cvtph_ps(_mm_loadu_si128(self.d.as_ptr().add(at).cast()));
                    (w, dw)
                };
                let magnitude = w.map(|v| _mm256_sign_epi8(v, v));
                for (i, acc) in acc[..count].iter_mut().enumerate() {
                    let xb = (start + i) * self.blocks + b;
                    // SAFETY: block `xb` of the activations has 32 bytes.
                    let words: [i32; 8] =
                        unsafe { std::ptr::read_unaligned(x.qs.as_ptr().add(xb * BLOCK).cast()) };
                    let mut sumi = _mm256_setzero_si256();
                    for t in 0..8 {
                        // |w| × (q with w's sign): pairs of at most 2·128·127, no saturation.
                        let signed = _mm256_sign_epi8(_mm256_set1_epi32(words[t]), w[t]);
                        let pairs = _mm256_maddubs_epi16(magnitude[t], signed);
                        sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(pairs, ones));
                    }
                    let t = _mm256_mul_ps(
                        _mm256_mul_ps(_mm256_cvtepi32_ps(sumi), dw),
                        _mm256_set1_ps(x.d[xb]),
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

impl super::Grouped for Q80Packed {
    fn rows(&self) -> usize {
        self.rows
    }

    fn groups(&self) -> usize {
        self.groups
    }

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
            // SAFETY: `grouped_matmul` asserted that the CPU supports AVX-512 VNNI.
            #[allow(unsafe_code)]
            Isa::Avx512Vnni => unsafe { self.group_avx512(g, x, start, count, tile) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `grouped_matmul` asserted that the CPU supports AVX2 and F16C.
            #[allow(unsafe_code)]
            Isa::Avx2 => unsafe { self.group_avx2(g, x, start, count, tile) },
            _ => self.group_scalar(g, x, start, count, tile),
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
        QTensor::quantize(&t, GgmlDType::Q8_0).unwrap()
    }

    #[test]
    fn every_path_matches_the_reference_and_candle() {
        let pool = Pool::new(3);
        for (rows, cols, seed) in [(37, 320, 1), (16, 64, 2), (64, 576, 3), (5, 64, 4)] {
            let q = weights(rows, cols, seed);
            let data = q.data().unwrap();
            let packed = Q80Packed::from_gguf(&data, rows, cols).unwrap();
            // Dequantization is lossless repacking: candle's own values, row by row.
            let dense: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let mut row = vec![0f32; cols];
            for r in 0..rows {
                packed.dequantize_row(r, &mut row);
                assert_eq!(row, dense[r * cols..][..cols]);
            }
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
                let mut q81 = Q81::default();
                q81.quantize(Isa::Scalar, &x, cols);
                let mut reference = vec![f32::NAN; n * rows];
                packed.matmul(&q81, &mut reference, Isa::Scalar, &pool);
                // Same integer sums and scales as candle, blocks summed in another order:
                // a few ulps of the largest term.
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (a, b) in reference.iter().zip(&want) {
                    assert!((a - b).abs() <= scale * 1e-5, "{a} vs candle {b}");
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

    #[test]
    fn extreme_bytes_do_not_saturate() {
        // Weights of -128 and 127 against activations of ±127: the sign and offset tricks
        // must still give the exact integer sum.
        let pool = Pool::new(2);
        let (rows, cols) = (16, 64);
        let mut data = Vec::new();
        for r in 0..rows {
            for b in 0..cols / BLOCK {
                data.extend_from_slice(&f16::from_f32(0.5).to_le_bytes());
                for k in 0..BLOCK {
                    let v: i8 = if (r + k + b) % 2 == 0 { -128 } else { 127 };
                    data.push(v as u8);
                }
            }
        }
        let packed = Q80Packed::from_gguf(&data, rows, cols).unwrap();
        let x: Vec<f32> = (0..cols)
            .map(|k| if k % 3 == 0 { -1.0 } else { 1.0 })
            .collect();
        let mut q81 = Q81::default();
        q81.quantize(Isa::Scalar, &x, cols);
        let mut reference = vec![0f32; rows];
        packed.matmul(&q81, &mut reference, Isa::Scalar, &pool);
        for isa in Isa::available() {
            let mut got = vec![0f32; rows];
            packed.matmul(&q81, &mut got, isa, &pool);
            assert_eq!(got, reference, "{}", isa.as_str());
        }
    }

    #[test]
    fn bad_shapes_are_refused() {
        assert!(Q80Packed::from_gguf(&[0; 34], 1, 16).is_err());
        assert!(Q80Packed::from_gguf(&[0; 33], 1, 32).is_err());
    }
}
