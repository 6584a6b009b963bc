//! Attention of one query head over a sequence's cached keys and values, stored as f16
//! (llama.cpp's default KV cache type): scores `q·k_j / √d`, a softmax, and the
//! probability-weighted sum of the values.
//!
//! The keys and values of all heads of a position sit side by side (`stride` values per
//! position, this head's at `offset`), so grouped-query heads share a cache by indexing.
//! The SIMD paths convert f16 with F16C and multiply-add in 16 (AVX-512) or 8 (AVX2)
//! lanes; the scalar reference adds in another order, so the paths agree to float rounding
//! (tested against a bound), not bit for bit.

use half::f16;

use super::Isa;

/// Where one head's keys and values are in a cache.
#[derive(Debug, Clone, Copy)]
pub struct HeadView<'a> {
    /// Keys, f16 bits, `stride` per position.
    pub keys: &'a [u16],
    /// Values likewise.
    pub values: &'a [u16],
    /// Values per position (all kv heads).
    pub stride: usize,
    /// This head's first value within a position.
    pub offset: usize,
}

/// `out = softmax(q·Kᵀ / √d) · V` over the first `seen` positions of `kv`, with `scores`
/// as scratch.
pub fn attend(
    isa: Isa,
    q: &[f32],
    kv: HeadView<'_>,
    seen: usize,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let dim = q.len();
    assert!(
        out.len() == dim
            && dim <= 256
            && kv.offset + dim <= kv.stride
            && kv.keys.len() >= seen * kv.stride
            && kv.values.len() >= seen * kv.stride,
        "attention shapes"
    );
    assert!(isa.supported(), "{} is not supported here", isa.as_str());
    let scale = 1.0 / (dim as f32).sqrt();
    let mut q16 = [0f32; 256];
    let q16 = &mut q16[..dim];
    q16.copy_from_slice(q);
    super::math::round_f16(isa, q16, 1.0);
    let q = &*q16;
    scores.clear();
    scores.resize(seen, 0.0);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX-512 (asserted above); the shapes were checked.
        #[allow(unsafe_code)]
        Isa::Avx512Vnni if dim.is_multiple_of(16) => unsafe { scores_avx512(q, kv, scores, scale) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX2, FMA and F16C; the shapes were checked.
        #[allow(unsafe_code)]
        Isa::Avx2 | Isa::Avx512Vnni if dim.is_multiple_of(8) => unsafe {
            scores_avx2(q, kv, scores, scale)
        },
        _ => {
            for (j, s) in scores.iter_mut().enumerate() {
                let k = &kv.keys[j * kv.stride + kv.offset..][..dim];
                *s = q
                    .iter()
                    .zip(k)
                    .map(|(&a, &b)| a * f16::from_bits(b).to_f32())
                    .sum::<f32>()
                    * scale;
            }
        }
    }
    // The softmax as ggml's: e^(s − max) summed in f64, scaled by the f32 of its inverse,
    // and the probabilities rounded to f16 as ggml's f16 product with V rounds them.
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    let sum = super::math::exp_sub_sum(isa, scores, max);
    let scale = (1.0 / sum) as f32;
    super::math::round_f16(isa, scores, scale);
    out.fill(0.0);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        #[allow(unsafe_code)]
        Isa::Avx512Vnni if dim.is_multiple_of(16) => unsafe { weighted_avx512(kv, scores, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        #[allow(unsafe_code)]
        Isa::Avx2 | Isa::Avx512Vnni if dim.is_multiple_of(8) => unsafe {
            weighted_avx2(kv, scores, out)
        },
        _ => {
            for (j, &p) in scores.iter().enumerate() {
                let v = &kv.values[j * kv.stride + kv.offset..][..dim];
                for (a, &v) in out.iter_mut().zip(v) {
                    *a += p * f16::from_bits(v).to_f32();
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn scores_avx512(q: &[f32], kv: HeadView<'_>, scores: &mut [f32], scale: f32) {
    use std::arch::x86_64::*;
    let dim = q.len();
    for (j, s) in scores.iter_mut().enumerate() {
        let base = j * kv.stride + kv.offset;
        let mut acc = _mm512_setzero_ps();
        for i in (0..dim).step_by(16) {
            // SAFETY: `base + i + 16 ≤ (j + 1)·stride` ≤ keys.len() and `i + 16 ≤ dim`.
            unsafe {
                let k = _mm512_cvtph_ps(_mm256_loadu_si256(kv.keys.as_ptr().add(base + i).cast()));
                acc = _mm512_fmadd_ps(_mm512_loadu_ps(q.as_ptr().add(i)), k, acc);
            }
        }
        *s = _mm512_reduce_add_ps(acc) * scale;
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn weighted_avx512(kv: HeadView<'_>, scores: &[f32], out: &mut [f32]) {
    // The outputs in registers, 64 at a time (a head of 64 in one pass), so no key waits on
    // the previous key's store; the number of registers a constant, so they stay registers.
    for c in (0..out.len()).step_by(64) {
        let end = (c + 64).min(out.len());
        let out = &mut out[c..end];
        // SAFETY: the CPU supports AVX-512 (the caller's contract); `c + out.len() ≤ dim`.
        unsafe {
            match out.len() / 16 {
                4 => weighted_block_avx512::<4>(kv, scores, c, out),
                3 => weighted_block_avx512::<3>(kv, scores, c, out),
                2 => weighted_block_avx512::<2>(kv, scores, c, out),
                _ => weighted_block_avx512::<1>(kv, scores, c, out),
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn weighted_block_avx512<const L: usize>(
    kv: HeadView<'_>,
    scores: &[f32],
    c: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); L];
    for (j, &p) in scores.iter().enumerate() {
        let p = _mm512_set1_ps(p);
        let base = j * kv.stride + kv.offset + c;
        for (l, acc) in acc.iter_mut().enumerate() {
            // SAFETY: as in `scores_avx512`, for the values: `c + 16·L ≤ dim`.
            let v = unsafe {
                _mm512_cvtph_ps(_mm256_loadu_si256(
                    kv.values.as_ptr().add(base + 16 * l).cast(),
                ))
            };
            *acc = _mm512_fmadd_ps(p, v, *acc);
        }
    }
    for (l, acc) in acc.iter().enumerate() {
        // SAFETY: `16·L ≤ out.len()`.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(16 * l), *acc) };
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scores_avx2(q: &[f32], kv: HeadView<'_>, scores: &mut [f32], scale: f32) {
    use std::arch::x86_64::*;
    let dim = q.len();
    for (j, s) in scores.iter_mut().enumerate() {
        let base = j * kv.stride + kv.offset;
        let mut acc = _mm256_setzero_ps();
        for i in (0..dim).step_by(8) {
            // SAFETY: `base + i + 8 ≤ (j + 1)·stride` ≤ keys.len() and `i + 8 ≤ dim`.
            unsafe {
                let k = _mm256_cvtph_ps(_mm_loadu_si128(kv.keys.as_ptr().add(base + i).cast()));
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(i)), k, acc);
            }
        }
        let half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
        let one = _mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1));
        *s = _mm_cvtss_f32(one) * scale;
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted_avx2(kv: HeadView<'_>, scores: &[f32], out: &mut [f32]) {
    // As `weighted_avx512`: up to 64 outputs at a time in registers.
    for c in (0..out.len()).step_by(64) {
        let end = (c + 64).min(out.len());
        let out = &mut out[c..end];
        // SAFETY: the CPU supports AVX2 and FMA (the caller's contract); `c + out.len() ≤ dim`.
        unsafe {
            match out.len() / 8 {
                8 => weighted_block_avx2::<8>(kv, scores, c, out),
                4 => weighted_block_avx2::<4>(kv, scores, c, out),
                n => {
                    for l in 0..n {
                        weighted_block_avx2::<1>(kv, scores, c + 8 * l, &mut out[8 * l..]);
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted_block_avx2<const L: usize>(
    kv: HeadView<'_>,
    scores: &[f32],
    c: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); L];
    for (j, &p) in scores.iter().enumerate() {
        let p = _mm256_set1_ps(p);
        let base = j * kv.stride + kv.offset + c;
        for (l, acc) in acc.iter_mut().enumerate() {
            // SAFETY: as in `scores_avx2`, for the values: `c + 8·L ≤ dim`.
            let v = unsafe {
                _mm256_cvtph_ps(_mm_loadu_si128(kv.values.as_ptr().add(base + 8 * l).cast()))
            };
            *acc = _mm256_fmadd_ps(p, v, *acc);
        }
    }
    for (l, acc) in acc.iter().enumerate() {
        // SAFETY: `8·L ≤ out.len()`.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(8 * l), *acc) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_agrees_with_the_reference() {
        let (dim, heads, seen) = (64, 3, 77);
        let stride = dim * heads;
        let bits = |i: usize, salt: usize| {
            f16::from_f32((((i * 7919 + salt) % 1009) as f32 / 504.5 - 1.0) * 2.0).to_bits()
        };
        let keys: Vec<u16> = (0..seen * stride).map(|i| bits(i, 1)).collect();
        let values: Vec<u16> = (0..seen * stride).map(|i| bits(i, 2)).collect();
        let q: Vec<f32> = (0..dim)
            .map(|i| ((i * 31 % 17) as f32 - 8.0) / 4.0)
            .collect();
        let mut scores = Vec::new();
        for offset in [0, dim, 2 * dim] {
            let kv = HeadView {
                keys: &keys,
                values: &values,
                stride,
                offset,
            };
            for n in [1, 2, seen] {
                let mut want = vec![0f32; dim];
                attend(Isa::Scalar, &q, kv, n, &mut scores, &mut want);
                for isa in Isa::available() {
                    let mut got = vec![f32::NAN; dim];
                    attend(isa, &q, kv, n, &mut scores, &mut got);
                    for (a, b) in got.iter().zip(&want) {
                        assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
                    }
                }
            }
        }
    }
}
