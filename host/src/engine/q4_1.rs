//! Matrix products with Q4_1 weights, with a SIMD dot product.
//!
//! candle has no SIMD path for Q4_1 (only Q4_0, Q8_0 and the K-quants have one), and SmolLM2's
//! GGUF stores every layer's weights as Q4_1, so its scalar loop was most of the time of a
//! forward pass. As in candle (and llama.cpp), activations are quantized to Q8_1 (32 values,
//! an f16 scale `d` and `s = d·Σq`) and each Q4_1 × Q8_1 block product is
//! `d_x·d_y·Σ(q_x·q_y) + m_x·s_y`. The integer sums, exact whatever the order, are done
//! 32 lanes at a time (AVX2); the quantization and the float arithmetic are candle's, in
//! candle's order, so the results are bit-identical to candle's `QMatMul` (a test checks it).
//! That keeps the decoder bit-identical to candle-transformers' `quantized_llama`, whose
//! agreement with llama.cpp is measured in docs/performance.md.
//!
//! Work is split over output columns with candle's own persistent thread pool, so it runs on
//! the same threads as the rest of candle's CPU kernels.

use std::sync::atomic::{AtomicU32, Ordering};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Result, Tensor};
use half::f16;

/// Values per block, for Q4_1 and Q8_1 alike.
const BLOCK: usize = 32;
/// Bytes of one Q4_1 block in a GGUF: f16 `d`, f16 `m`, 16 bytes of nibbles.
const Q4_1_BYTES: usize = 20;

/// A Q4_1 weight matrix of shape (`rows`, `cols`), used as `x · Wᵀ`.
#[derive(Debug)]
pub struct Q41Matrix {
    rows: usize,
    cols: usize,
    /// Per block, row-major: scale, minimum and the 32 nibbles.
    d: Vec<f32>,
    m: Vec<f32>,
    qs: Vec<[u8; 16]>,
}

/// One row of activations quantized to Q8_1.
struct Q81Row {
    d: Vec<f32>,
    s: Vec<f32>,
    qs: Vec<[i8; BLOCK]>,
}

fn f16_bits(bytes: &[u8]) -> f32 {
    f16::from_le_bytes([bytes[0], bytes[1]]).to_f32()
}

impl Q41Matrix {
    /// The matrix of `t` if it is a 2-D Q4_1 tensor whose rows are whole blocks.
    pub fn from_qtensor(t: &QTensor) -> Result<Option<Self>> {
        if t.dtype() != GgmlDType::Q4_1 {
            return Ok(None);
        }
        let (rows, cols) = t.shape().dims2()?;
        if cols % BLOCK != 0 {
            return Ok(None);
        }
        let data = t.data()?;
        let blocks = rows * cols / BLOCK;
        if data.len() != blocks * Q4_1_BYTES {
            candle_core::bail!("Q4_1 tensor of {} bytes for {blocks} blocks", data.len());
        }
        let mut m = Self {
            rows,
            cols,
            d: Vec::with_capacity(blocks),
            m: Vec::with_capacity(blocks),
            qs: Vec::with_capacity(blocks),
        };
        for block in data.chunks_exact(Q4_1_BYTES) {
            m.d.push(f16_bits(&block[0..2]));
            m.m.push(f16_bits(&block[2..4]));
            let mut qs = [0u8; 16];
            qs.copy_from_slice(&block[4..]);
            m.qs.push(qs);
        }
        Ok(Some(m))
    }

    /// `x · Wᵀ` for `x` of shape (..., `cols`); the result has shape (..., `rows`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let Some((&k, lead)) = dims.split_last() else {
            candle_core::bail!("Q4_1 matmul of a scalar");
        };
        if k != self.cols {
            candle_core::bail!("Q4_1 matmul: input width {k}, weights {}", self.cols);
        }
        let input = x.flatten_all()?.to_vec1::<f32>()?;
        let n_rows = input.len() / k;
        let quantized: Vec<Q81Row> = input.chunks_exact(k).map(quantize_row).collect();
        let out: Vec<AtomicU32> = (0..n_rows * self.rows).map(|_| AtomicU32::new(0)).collect();
        let blocks = self.cols / BLOCK;
        let avx2 = has_avx2();
        candle_core::utils::barrier_pool().execute_chunked(self.rows, |cols| {
            for col in cols {
                let w = col * blocks..(col + 1) * blocks;
                for (r, row) in quantized.iter().enumerate() {
                    let v = if avx2 {
                        // SAFETY: the CPU has AVX2 and FMA (checked above).
                        #[allow(unsafe_code)]
                        unsafe {
                            dot_avx2(
                                &self.d[w.clone()],
                                &self.m[w.clone()],
                                &self.qs[w.clone()],
                                row,
                            )
                        }
                    } else {
                        dot_scalar(
                            &self.d[w.clone()],
                            &self.m[w.clone()],
                            &self.qs[w.clone()],
                            row,
                        )
                    };
                    out[r * self.rows + col].store(v.to_bits(), Ordering::Relaxed);
                }
            }
        });
        let out: Vec<f32> = out
            .into_iter()
            .map(|b| f32::from_bits(b.into_inner()))
            .collect();
        let mut shape = lead.to_vec();
        shape.push(self.rows);
        Tensor::from_vec(out, shape, x.device())
    }
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Q8_1 quantization exactly as candle's `BlockQ8_1::from_float`: round half away from zero,
/// `d` rounded to f16, and `s` the f16 product of the f16-rounded sum and `d`.
fn quantize_row(x: &[f32]) -> Q81Row {
    let n = x.len() / BLOCK;
    let mut row = Q81Row {
        d: Vec::with_capacity(n),
        s: Vec::with_capacity(n),
        qs: Vec::with_capacity(n),
    };
    for block in x.chunks_exact(BLOCK) {
        let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut qs = [0i8; BLOCK];
        let mut sum = 0i32;
        for (q, &v) in qs.iter_mut().zip(block) {
            *q = (v * id).round() as i8;
            sum += i32::from(*q);
        }
        let d16 = f16::from_f32(d);
        row.d.push(d16.to_f32());
        row.s.push((f16::from_f32(sum as f32) * d16).to_f32());
        row.qs.push(qs);
    }
    row
}

/// The block sums in candle's order: `sumf += sumi·d_x·d_y + m_x·s_y`.
fn dot_scalar(d: &[f32], m: &[f32], qs: &[[u8; 16]], y: &Q81Row) -> f32 {
    let mut sumf = 0f32;
    for i in 0..d.len() {
        let (lo, hi) = y.qs[i].split_at(16);
        let sumi: i32 = qs[i]
            .iter()
            .zip(lo.iter().zip(hi))
            .map(|(&x, (&a, &b))| {
                i32::from(x & 0x0F) * i32::from(a) + i32::from(x >> 4) * i32::from(b)
            })
            .sum();
        sumf += sumi as f32 * d[i] * y.d[i] + m[i] * y.s[i];
    }
    sumf
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(unsafe_code)]
unsafe fn dot_avx2(d: &[f32], m: &[f32], qs: &[[u8; 16]], y: &Q81Row) -> f32 {
    dot_scalar(d, m, qs, y)
}

/// One row of Q4_1 blocks against one Q8_1 row: [`dot_scalar`] with the integer sums and the
/// per-block scaling in SIMD, four blocks at a time. The running sum is still added block by
/// block in order, and no multiply-add is fused, so the result is bit-identical.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(d: &[f32], m: &[f32], qs: &[[u8; 16]], y: &Q81Row) -> f32 {
    use std::arch::x86_64::*;
    let low = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    // Σ(q_x·q_y) of block `i` as 8 partial i32 sums.
    let block = |i: usize| {
        // SAFETY: both loads read exactly the 16 and 32 bytes of their arrays (unaligned).
        let (packed, qy) = unsafe {
            (
                _mm_loadu_si128(qs[i].as_ptr().cast()),
                _mm256_loadu_si256(y.qs[i].as_ptr().cast()),
            )
        };
        // Low nibbles in lanes 0..16, high nibbles in lanes 16..32: Q8_1's order.
        let nibbles = _mm256_and_si256(
            low,
            _mm256_inserti128_si256(_mm256_castsi128_si256(packed), _mm_srli_epi16(packed, 4), 1),
        );
        // u8 × i8 pairs to i16 (at most 2·15·127, no saturation), then to 8 × i32.
        _mm256_madd_epi16(_mm256_maddubs_epi16(nibbles, qy), ones)
    };
    let n = d.len();
    let mut sumf = 0f32;
    let mut i = 0;
    while i + 4 <= n {
        // Four blocks' integer sums reduced together: [s0, s1, s2, s3].
        let h01 = _mm256_hadd_epi32(block(i), block(i + 1));
        let h23 = _mm256_hadd_epi32(block(i + 2), block(i + 3));
        let h = _mm256_hadd_epi32(h01, h23);
        let sumi = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
        // SAFETY: i + 4 <= n, and every slice has n elements.
        let (dx, dy, mx, sy) = unsafe {
            (
                _mm_loadu_ps(d.as_ptr().add(i)),
                _mm_loadu_ps(y.d.as_ptr().add(i)),
                _mm_loadu_ps(m.as_ptr().add(i)),
                _mm_loadu_ps(y.s.as_ptr().add(i)),
            )
        };
        // sumi·d_x·d_y + m_x·s_y, rounded step by step as the scalar code.
        let t = _mm_add_ps(
            _mm_mul_ps(_mm_mul_ps(_mm_cvtepi32_ps(sumi), dx), dy),
            _mm_mul_ps(mx, sy),
        );
        let mut lanes = [0f32; 4];
        // SAFETY: `lanes` holds 4 floats.
        unsafe { _mm_storeu_ps(lanes.as_mut_ptr(), t) };
        for v in lanes {
            sumf += v;
        }
        i += 4;
    }
    for i in i..n {
        let sums = block(i);
        let s4 = _mm_add_epi32(
            _mm256_castsi256_si128(sums),
            _mm256_extracti128_si256(sums, 1),
        );
        let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b01_00_11_10));
        let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0b10_11_00_01));
        let sumi = _mm_cvtsi128_si32(s1);
        sumf += sumi as f32 * d[i] * y.d[i] + m[i] * y.s[i];
    }
    sumf
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module};

    fn weights(rows: usize, cols: usize) -> QTensor {
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.3)
            .collect();
        let t = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
        QTensor::quantize(&t, GgmlDType::Q4_1).unwrap()
    }

    #[test]
    fn matches_dequantized_weights_and_the_scalar_path() {
        // 10 blocks per row: two groups of four and a remainder of two (candle needs an even count).
        let (rows, cols) = (37, 320);
        let q = weights(rows, cols);
        let m = Q41Matrix::from_qtensor(&q).unwrap().unwrap();
        let x: Vec<f32> = (0..3 * cols)
            .map(|i| ((i * 31 % 97) as f32 - 48.0) / 17.0)
            .collect();
        let xt = Tensor::from_vec(x.clone(), (1, 3, cols), &Device::Cpu).unwrap();
        let got = m.forward(&xt).unwrap();
        assert_eq!(got.dims(), &[1, 3, rows]);
        let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        // Against f32 arithmetic on the dequantized weights: only activation rounding differs.
        let w = q.dequantize(&Device::Cpu).unwrap();
        let want: Vec<f32> = xt
            .reshape((3, cols))
            .unwrap()
            .matmul(&w.t().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 0.05 * w.abs().max(1.0), "{g} vs {w}");
        }
        // Bit-identical to candle's own Q4_1 matrix product, and to the scalar path.
        let candle: Vec<f32> = candle_core::quantized::QMatMul::from_qtensor(q)
            .unwrap()
            .forward(&xt)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(got, candle);
        let blocks = cols / BLOCK;
        for (r, row) in x.chunks_exact(cols).map(quantize_row).enumerate() {
            for col in 0..rows {
                let w = col * blocks..(col + 1) * blocks;
                let s = dot_scalar(&m.d[w.clone()], &m.m[w.clone()], &m.qs[w], &row);
                assert_eq!(got[r * rows + col].to_bits(), s.to_bits());
            }
        }
    }

    #[test]
    fn other_types_are_left_to_candle() {
        let t = Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
        assert!(Q41Matrix::from_qtensor(&q).unwrap().is_none());
    }
}
