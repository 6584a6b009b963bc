//! Element-wise kernels of the decoder: `e^x`, the softmax's exponentials and SiLU × up.
//!
//! `e^x` is computed as ggml computes it (`ggml_v_expf`, what llama.cpp's softmax and SiLU
//! run): `n = round(x·log₂e)`, `b = x − n·ln2` (ln2 in two parts), a degree-5 polynomial
//! for `e^b`, then `2^n` applied exactly. It is within about 2 ulp of the true value, and the
//! AVX-512, AVX2 and scalar paths give the same bits wherever the result is a normal float
//! (tested); below that (`e^x` < 2⁻¹²⁶, which no softmax weight or SiLU output notices) they
//! may differ in the last bits of a subnormal.

use super::Isa;

const LOG2E: f32 = f32::from_bits(0x3fb8_aa3b); // 0x1.715476p+0
const LN2_HI: f32 = f32::from_bits(0x3f31_7200); // 0x1.62e4p-1
const LN2_LO: f32 = f32::from_bits(0x35bf_be8e); // 0x1.7f7d1cp-20
const ROUND: f32 = 12_582_912.0; // 0x1.8p23: adding it rounds to an integer
const P5: f32 = f32::from_bits(0x3c07_2010); // 0x1.0e4020p-7
const P4: f32 = f32::from_bits(0x3d2b_9f17); // 0x1.573e2ep-5
const P3: f32 = f32::from_bits(0x3e2a_af33); // 0x1.555e66p-3
const P2: f32 = f32::from_bits(0x3eff_fedb); // 0x1.fffdb6p-2
const P1: f32 = f32::from_bits(0x3f7f_fff6); // 0x1.ffffecp-1

/// `2^n` for an integer-valued `n` in `-126..=127`, exactly.
fn pow2(n: f32) -> f32 {
    f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// The reference `e^x`, in plain Rust.
pub fn exp(x: f32) -> f32 {
    let z = x.mul_add(LOG2E, ROUND);
    let n = z - ROUND;
    let b = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let u = b * b;
    let j = P5
        .mul_add(b, P4)
        .mul_add(u, P3.mul_add(b, P2))
        .mul_add(u, P1.mul_add(b, 1.0));
    scale(j, n)
}

/// `j·2^n` for an integer-valued `n`, in at most two exact steps; 0 or ∞ beyond ±192.
fn scale(j: f32, n: f32) -> f32 {
    if n.abs() > 192.0 {
        if n <= 0.0 { 0.0 } else { f32::INFINITY }
    } else if n < -126.0 {
        j * pow2(n + 63.0) * pow2(-63.0)
    } else if n > 127.0 {
        j * pow2(n - 63.0) * pow2(63.0)
    } else {
        j * pow2(n)
    }
}

/// `x[i] = e^(x[i] − max)` for every element; returns their sum, added in f64 (as ggml's
/// softmax does).
pub fn exp_sub_sum(isa: Isa, x: &mut [f32], max: f32) -> f64 {
    assert!(isa.supported(), "{} is not supported here", isa.as_str());
    let mut done = 0;
    let mut sum = 0f64;
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: the CPU supports the instruction set (asserted above).
        #[allow(unsafe_code)]
        Isa::Avx512Vnni => (done, sum) = unsafe { exp_sub_sum_avx512(x, max) },
        // SAFETY: as above.
        #[allow(unsafe_code)]
        Isa::Avx2 => (done, sum) = unsafe { exp_sub_sum_avx2(x, max) },
        Isa::Scalar => {}
    }
    for v in &mut x[done..] {
        *v = exp(*v - max);
        sum += f64::from(*v);
    }
    sum
}

/// `out[i] = silu(g[i]) · u[i]`, `silu(x) = x / (1 + e^−x)`.
pub fn silu_mul(isa: Isa, g: &[f32], u: &[f32], out: &mut [f32]) {
    assert!(g.len() == u.len() && u.len() == out.len(), "SiLU shapes");
    assert!(isa.supported(), "{} is not supported here", isa.as_str());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: the CPU supports the instruction set (asserted above), shapes checked.
        #[allow(unsafe_code)]
        Isa::Avx512Vnni => done = unsafe { silu_mul_avx512(g, u, out) },
        // SAFETY: as above.
        #[allow(unsafe_code)]
        Isa::Avx2 => done = unsafe { silu_mul_avx2(g, u, out) },
        Isa::Scalar => {}
    }
    for ((o, &g), &u) in out[done..].iter_mut().zip(&g[done..]).zip(&u[done..]) {
        *o = g / (1.0 + exp(-g)) * u;
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f")]
fn exp_avx512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
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
fn exp_avx2(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
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
unsafe fn exp_sub_sum_avx512(x: &mut [f32], max: f32) -> (usize, f64) {
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
    (i, sum)
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_sub_sum_avx2(x: &mut [f32], max: f32) -> (usize, f64) {
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
unsafe fn silu_mul_avx512(g: &[f32], u: &[f32], out: &mut [f32]) -> usize {
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
unsafe fn silu_mul_avx2(g: &[f32], u: &[f32], out: &mut [f32]) -> usize {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Inputs over the whole range: tiny, ordinary, near the overflow and underflow edges.
    fn inputs() -> Vec<f32> {
        let mut v: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.05).collect();
        v.extend([
            -200.0, -110.0, -87.0, -1e-7, 0.0, 1e-7, 88.0, 88.8, 89.0, 200.0,
        ]);
        v
    }

    #[test]
    fn the_reference_is_within_two_ulp_of_libm() {
        for x in inputs() {
            let (got, want) = (exp(x), x.exp());
            if want.is_normal() && want.is_finite() {
                let ulps = (got.to_bits() as i64 - want.to_bits() as i64).abs();
                assert!(ulps <= 2, "e^{x}: {got} vs {want} ({ulps} ulp)");
            } else if want == 0.0 || want.is_infinite() {
                assert!(got == want || got < 1.2e-38, "e^{x}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn every_path_agrees_with_the_reference() {
        let xs = inputs();
        for isa in Isa::available() {
            let mut v = xs.clone();
            let sum = exp_sub_sum(isa, &mut v, 0.0);
            let mut reference = 0f64;
            for (&got, &x) in v.iter().zip(&xs) {
                let want = exp(x);
                if want.is_normal() || want.is_infinite() || want == 0.0 {
                    assert_eq!(got.to_bits(), want.to_bits(), "{} e^{x}", isa.as_str());
                } else {
                    assert!(got < 1.2e-38, "{} e^{x}: {got}", isa.as_str());
                }
                reference += f64::from(want);
            }
            assert!(
                sum == reference || ((sum - reference) / reference).abs() < 1e-6,
                "{} sum {sum} vs {reference}",
                isa.as_str()
            );
            let g: Vec<f32> = xs.iter().map(|x| x / 10.0).collect();
            let u: Vec<f32> = xs.iter().map(|x| 1.0 - x / 100.0).collect();
            let mut want = vec![0f32; g.len()];
            silu_mul(Isa::Scalar, &g, &u, &mut want);
            let mut got = vec![0f32; g.len()];
            silu_mul(isa, &g, &u, &mut got);
            for (a, b) in got.iter().zip(&want) {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{} silu: {a} vs {b}",
                    isa.as_str()
                );
            }
        }
    }
}
