//! `e^x` on 16 and 8 lanes (AVX-512, AVX2), the same steps as the scalar [`super::exp`],
//! and the row loops built on it: the softmax's exponentials and SiLU × up.

#![cfg(target_arch = "x86_64")]

use super::{LN2_HI, LN2_LO, LOG2E, P1, P2, P3, P4, P5, ROUND, scale};

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f")]
pub(super) fn exp_avx512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let z = _mm512_fmadd_ps(x, _mm512_set1_ps(LOG2E), _mm512_set1_ps(ROUND));
    let n = _mm512_sub_ps(z, _mm512_set1_ps(ROUND));
    let b = _mm512_fnmadd_ps(
        n,
        _mm512_set1_ps(LN2_LO),
        _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x),
    );
    let u = _mm512_mul_ps(b, b);
    let j = _mm512_fmadd_ps(
        _mm512_fmadd_ps(
            _mm512_fmadd_ps(_mm512_set1_ps(P5), b, _mm512_set1_ps(P4)),
            u,
            _mm512_fmadd_ps(_mm512_set1_ps(P3), b, _mm512_set1_ps(P2)),
        ),
        u,
        _mm512_fmadd_ps(_mm512_set1_ps(P1), b, _mm512_set1_ps(1.0)),
    );
    let res = _mm512_scalef_ps(j, n);
    let big = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_abs_ps(n), _mm512_set1_ps(192.0));
    if big == 0 {
        return res;
    }
    let negative = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(n, _mm512_setzero_ps());
    let alt = _mm512_mask_blend_ps(negative, _mm512_set1_ps(f32::INFINITY), _mm512_setzero_ps());
    _mm512_mask_blend_ps(big, res, alt)
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,fma")]
pub(super) fn exp_avx2(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let z = _mm256_fmadd_ps(x, _mm256_set1_ps(LOG2E), _mm256_set1_ps(ROUND));
    let n = _mm256_sub_ps(z, _mm256_set1_ps(ROUND));
    let b = _mm256_fnmadd_ps(
        n,
        _mm256_set1_ps(LN2_LO),
        _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x),
    );
    let u = _mm256_mul_ps(b, b);
    let j = _mm256_fmadd_ps(
        _mm256_fmadd_ps(
            _mm256_fmadd_ps(_mm256_set1_ps(P5), b, _mm256_set1_ps(P4)),
            u,
            _mm256_fmadd_ps(_mm256_set1_ps(P3), b, _mm256_set1_ps(P2)),
        ),
        u,
        _mm256_fmadd_ps(_mm256_set1_ps(P1), b, _mm256_set1_ps(1.0)),
    );
    let abs = _mm256_andnot_ps(_mm256_set1_ps(-0.0), n);
    let outside = _mm256_cmp_ps::<_CMP_GT_OQ>(abs, _mm256_set1_ps(126.0));
    if _mm256_movemask_ps(outside) == 0 {
        // 2^n from its exponent bits: exact for n in -126..=126.
        let k = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        )));
        return _mm256_mul_ps(j, k);
    }
    // Rare: finish lane by lane with the reference's exact two-step scaling.
    let mut lanes = [0f32; 8];
    let mut js = [0f32; 8];
    let mut ns = [0f32; 8];
    // SAFETY: each array holds 8 floats.
    unsafe {
        _mm256_storeu_ps(js.as_mut_ptr(), j);
        _mm256_storeu_ps(ns.as_mut_ptr(), n);
    }
    for ((l, &j), &n) in lanes.iter_mut().zip(&js).zip(&ns) {
        *l = scale(j, n);
    }
    // SAFETY: `lanes` holds 8 floats.
    unsafe { _mm256_loadu_ps(lanes.as_ptr()) }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn exp_sub_sum_avx512(x: &mut [f32], max: f32) -> (usize, f64) {
    use std::arch::x86_64::*;
    let mut sum = 0f64;
    let mut i = 0;
    while i + 16 <= x.len() {
        // SAFETY: `i + 16 ≤ x.len()`.
        unsafe {
            let p = x.as_mut_ptr().add(i);
            let v = exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(p), _mm512_set1_ps(max)));
            _mm512_storeu_ps(p, v);
            sum += f64::from(_mm512_reduce_add_ps(v));
        }
        i += 16;
    }
    // The tail in one masked vector, its values then added one by one as the scalar
    // tail would add them: the same bits as the reference, without its calls to `fmaf`.
    let rest = x.len() - i;
    if rest > 0 {
        let mask: __mmask16 = (1u16 << rest) - 1;
        // SAFETY: the mask covers only the `rest` elements from `i`, all within `x`.
        unsafe {
            let p = x.as_mut_ptr().add(i);
            let v = _mm512_maskz_loadu_ps(mask, p);
            let v = exp_avx512(_mm512_sub_ps(v, _mm512_set1_ps(max)));
            _mm512_mask_storeu_ps(p, mask, v);
        }
        for &v in &x[i..] {
            sum += f64::from(v);
        }
        i = x.len();
    }
    (i, sum)
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn exp_sub_sum_avx2(x: &mut [f32], max: f32) -> (usize, f64) {
    use std::arch::x86_64::*;
    let mut sum = 0f64;
    let mut i = 0;
    while i + 8 <= x.len() {
        // SAFETY: `i + 8 ≤ x.len()`.
        unsafe {
            let p = x.as_mut_ptr().add(i);
            let v = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(p), _mm256_set1_ps(max)));
            _mm256_storeu_ps(p, v);
            let h = _mm_add_ps(_mm256_extractf128_ps::<1>(v), _mm256_castps256_ps128(v));
            let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            let h = _mm_add_ss(h, _mm_movehdup_ps(h));
            sum += f64::from(_mm_cvtss_f32(h));
        }
        i += 8;
    }
    (i, sum)
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn silu_mul_avx512(g: &[f32], u: &[f32], out: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let mut i = 0;
    while i + 16 <= out.len() {
        // SAFETY: `i + 16` is within all three slices (of equal length).
        unsafe {
            let x = _mm512_loadu_ps(g.as_ptr().add(i));
            let e = exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), x));
            let s = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0), e));
            _mm512_storeu_ps(
                out.as_mut_ptr().add(i),
                _mm512_mul_ps(s, _mm512_loadu_ps(u.as_ptr().add(i))),
            );
        }
        i += 16;
    }
    i
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn silu_mul_avx2(g: &[f32], u: &[f32], out: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let mut i = 0;
    while i + 8 <= out.len() {
        // SAFETY: `i + 8` is within all three slices (of equal length).
        unsafe {
            let x = _mm256_loadu_ps(g.as_ptr().add(i));
            let e = exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), x));
            let s = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), e));
            _mm256_storeu_ps(
                out.as_mut_ptr().add(i),
                _mm256_mul_ps(s, _mm256_loadu_ps(u.as_ptr().add(i))),
            );
        }
        i += 8;
    }
    i
}
