//! Element-wise and row-wise kernels of the decoder and the encoder: `e^x`, the softmax's
//! exponentials, SiLU × up, GELU, RMSNorm, LayerNorm, RoPE, residual adds, mean pooling
//! and rounding to f16.
//!
//! `e^x` is computed as ggml computes it (`ggml_v_expf`, what llama.cpp's softmax and SiLU
//! run): `n = round(x·log₂e)`, `b = x − n·ln2` (ln2 in two parts), a degree-5 polynomial
//! for `e^b`, then `2^n` applied exactly. It is within about 2 ulp of the true value, and the
//! AVX-512, AVX2 and scalar paths give the same bits wherever the result is a normal float
//! (tested); below that (`e^x` < 2⁻¹²⁶, which no softmax weight or SiLU output notices) they
//! may differ in the last bits of a subnormal.

use super::{Isa, per_isa};

#[cfg(target_arch = "x86_64")]
mod exp_simd;
#[cfg(target_arch = "x86_64")]
use exp_simd::{
    exp_avx2, exp_avx512, exp_sub_sum_avx2, exp_sub_sum_avx512, silu_mul_avx2, silu_mul_avx512,
};

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
        // `n + 126` is in -66..0 and `j·2^(n+126)` a normal float: the one rounding is
        // the second product's, as in `vscalefps`.
        j * pow2(n + 126.0) * pow2(-126.0)
    } else if n > 127.0 {
        j * pow2(n - 127.0) * pow2(127.0)
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

per_isa! {
    /// `out = x / √(mean(x²) + ε) · w`, row by row (rows of `w.len()` values), as ggml's
    /// `rms_norm` and candle's: the squares summed in f64, then `x · (1/√(mean + ε)) · w`.
    pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        let dim = w.len();
        assert!(x.len() == out.len() && x.len().is_multiple_of(dim), "RMSNorm shapes");
        for (x, out) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
            let sum2 = x.iter().map(|&v| f64::from(v * v)).sum::<f64>();
            let scale = 1.0 / ((sum2 / dim as f64) as f32 + eps).sqrt();
            for ((o, &v), &a) in out.iter_mut().zip(x).zip(w) {
                *o = v * scale * a;
            }
        }
    }
}

per_isa! {
    /// Interleaved RoPE (pairs `2i, 2i+1`, as candle's `rope_i`) of every head of
    /// `2·cos.len()` values in `x`, with one position's `cos` and `sin` tables.
    pub fn rope(x: &mut [f32], cos: &[f32], sin: &[f32]) {
        assert!(cos.len() == sin.len() && x.len().is_multiple_of(2 * cos.len()), "RoPE shapes");
        for head in x.chunks_exact_mut(2 * cos.len()) {
            for ((pair, &c), &s) in head.chunks_exact_mut(2).zip(cos).zip(sin) {
                let (x0, x1) = (pair[0], pair[1]);
                pair[0] = x0 * c - x1 * s;
                pair[1] = x0 * s + x1 * c;
            }
        }
    }
}

per_isa! {
    /// `x += y`, element by element (a residual connection).
    pub fn add(x: &mut [f32], y: &[f32]) {
        assert_eq!(x.len(), y.len(), "residual shapes");
        for (x, &y) in x.iter_mut().zip(y) {
            *x += y;
        }
    }
}

// GELU's `erf`, Abramowitz & Stegun 7.1.26: `1 − t·(a₁ + t·(a₂ + …)) · e^(−z²)` with
// `t = 1/(1 + p·z)` for `z ≥ 0`, within 1.5·10⁻⁷ of the true value.
const ERF_P: f32 = 0.327_591_1;
const ERF_A: [f32; 5] = [
    0.254_829_6,
    -0.284_496_74,
    1.421_413_8,
    -1.453_152,
    1.061_405_4,
];

/// `x·Φ(x) = x/2 · (1 + erf(x/√2))`, the reference for [`gelu`].
pub fn gelu_one(x: f32) -> f32 {
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let a = z.abs();
    let t = 1.0 / (1.0 + ERF_P * a);
    let poly = ((((ERF_A[4] * t + ERF_A[3]) * t + ERF_A[2]) * t + ERF_A[1]) * t + ERF_A[0]) * t;
    let erf = (1.0 - poly * exp(-(a * a))).copysign(z);
    0.5 * x * (1.0 + erf)
}

/// `x[i] = gelu(x[i])` (BERT's exact-erf GELU); every path gives the reference's bits
/// wherever `e^(−z²)` is a normal float.
pub fn gelu(isa: Isa, x: &mut [f32]) {
    let n = x.len();
    let p = x.as_mut_ptr();
    // SAFETY: `p` is valid for `n` reads and writes; each element is read before it is
    // written, by the same lane.
    #[allow(unsafe_code)]
    unsafe {
        bias_act::<false, true>(isa, p, std::ptr::null(), p, n)
    }
}

/// `out[i] = x[i] + bias[i]`, through [`gelu`] if `gelu`: a dense layer's epilogue in one
/// pass, with loads and stores of one width (a row added by one loop and read by another
/// at another width waited on every load for a failed store forward).
pub fn bias_gelu(isa: Isa, x: &[f32], bias: &[f32], gelu: bool, out: &mut [f32]) {
    let n = x.len();
    assert!(bias.len() == n && out.len() == n, "bias_gelu shapes");
    let (x, bias, out) = (x.as_ptr(), bias.as_ptr(), out.as_mut_ptr());
    // SAFETY: the three pointers are valid for `n` elements (asserted above), and `out`,
    // borrowed mutably, does not overlap the other two.
    #[allow(unsafe_code)]
    unsafe {
        match gelu {
            true => bias_act::<true, true>(isa, x, bias, out, n),
            false => bias_act::<true, false>(isa, x, bias, out, n),
        }
    }
}

/// `out[i] = act(x[i] + bias[i])` (no bias unless `BIAS`; `act` GELU if `GELU`).
///
/// # Safety
/// `x`, `out` (and `bias` if `BIAS`) valid for `n` elements; `out` may be `x`.
#[allow(unsafe_code)]
unsafe fn bias_act<const BIAS: bool, const GELU: bool>(
    isa: Isa,
    x: *const f32,
    bias: *const f32,
    out: *mut f32,
    n: usize,
) {
    assert!(isa.supported(), "{} is not supported here", isa.as_str());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: the CPU supports the instruction set (asserted above); the caller's.
        Isa::Avx512Vnni => done = unsafe { bias_act_avx512::<BIAS, GELU>(x, bias, out, n) },
        // SAFETY: as above.
        Isa::Avx2 => done = unsafe { bias_act_avx2::<BIAS, GELU>(x, bias, out, n) },
        Isa::Scalar => {}
    }
    for i in done..n {
        // SAFETY: `i < n`, the caller's promise.
        unsafe {
            let mut v = *x.add(i);
            if BIAS {
                v += *bias.add(i);
            }
            *out.add(i) = if GELU { gelu_one(v) } else { v };
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f")]
unsafe fn bias_act_avx512<const BIAS: bool, const GELU: bool>(
    x: *const f32,
    bias: *const f32,
    out: *mut f32,
    n: usize,
) -> usize {
    use std::arch::x86_64::*;
    let c = |v: f32| _mm512_set1_ps(v);
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: `i + 16 ≤ n`, the caller's promise.
        unsafe {
            let mut v = _mm512_loadu_ps(x.add(i));
            if BIAS {
                v = _mm512_add_ps(v, _mm512_loadu_ps(bias.add(i)));
            }
            if GELU {
                let z = _mm512_mul_ps(v, c(std::f32::consts::FRAC_1_SQRT_2));
                let bits = _mm512_castps_si512(z);
                let sign = _mm512_and_si512(bits, _mm512_set1_epi32(i32::MIN));
                let a = _mm512_castsi512_ps(_mm512_andnot_si512(_mm512_set1_epi32(i32::MIN), bits));
                let t = _mm512_div_ps(c(1.0), _mm512_add_ps(c(1.0), _mm512_mul_ps(c(ERF_P), a)));
                let mut poly = c(ERF_A[4]);
                for &k in ERF_A[..4].iter().rev() {
                    poly = _mm512_add_ps(_mm512_mul_ps(poly, t), c(k));
                }
                poly = _mm512_mul_ps(poly, t);
                let e = exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(a, a)));
                let erf = _mm512_castsi512_ps(_mm512_or_si512(
                    _mm512_castps_si512(_mm512_sub_ps(c(1.0), _mm512_mul_ps(poly, e))),
                    sign,
                ));
                v = _mm512_mul_ps(_mm512_mul_ps(c(0.5), v), _mm512_add_ps(c(1.0), erf));
            }
            _mm512_storeu_ps(out.add(i), v);
        }
        i += 16;
    }
    i
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,fma")]
unsafe fn bias_act_avx2<const BIAS: bool, const GELU: bool>(
    x: *const f32,
    bias: *const f32,
    out: *mut f32,
    n: usize,
) -> usize {
    use std::arch::x86_64::*;
    let c = |v: f32| _mm256_set1_ps(v);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: `i + 8 ≤ n`, the caller's promise.
        unsafe {
            let mut v = _mm256_loadu_ps(x.add(i));
            if BIAS {
                v = _mm256_add_ps(v, _mm256_loadu_ps(bias.add(i)));
            }
            if GELU {
                let z = _mm256_mul_ps(v, c(std::f32::consts::FRAC_1_SQRT_2));
                let sign = _mm256_and_ps(z, c(-0.0));
                let a = _mm256_andnot_ps(c(-0.0), z);
                let t = _mm256_div_ps(c(1.0), _mm256_add_ps(c(1.0), _mm256_mul_ps(c(ERF_P), a)));
                let mut poly = c(ERF_A[4]);
                for &k in ERF_A[..4].iter().rev() {
                    poly = _mm256_add_ps(_mm256_mul_ps(poly, t), c(k));
                }
                poly = _mm256_mul_ps(poly, t);
                let e = exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(a, a)));
                let erf = _mm256_or_ps(_mm256_sub_ps(c(1.0), _mm256_mul_ps(poly, e)), sign);
                v = _mm256_mul_ps(_mm256_mul_ps(c(0.5), v), _mm256_add_ps(c(1.0), erf));
            }
            _mm256_storeu_ps(out.add(i), v);
        }
        i += 8;
    }
    i
}

/// The sum of `f(x[i])`, added in 16 lanes and then lane by lane: one order for every path,
/// and one the compiler vectorizes.
#[inline(always)]
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for chunk in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(chunk) {
            *l += f(v);
        }
    }
    for (l, &v) in lanes.iter_mut().zip(chunks.remainder()) {
        *l += f(v);
    }
    lanes.iter().sum()
}

per_isa! {
    /// `x = LayerNorm(x + residual) · g + b`, row by row (rows of `g.len()` values; no
    /// residual if it is empty): mean and variance in f32, two passes.
    pub fn layer_norm(x: &mut [f32], residual: &[f32], g: &[f32], b: &[f32], eps: f32) {
        let dim = g.len();
        assert!(
            b.len() == dim
                && x.len().is_multiple_of(dim)
                && (residual.is_empty() || residual.len() == x.len()),
            "LayerNorm shapes"
        );
        for (row, x) in x.chunks_exact_mut(dim).enumerate() {
            if !residual.is_empty() {
                for (x, &r) in x.iter_mut().zip(&residual[row * dim..][..dim]) {
                    *x += r;
                }
            }
            let mean = lane_sum(x, |v| v) / dim as f32;
            let var = lane_sum(x, |v| (v - mean) * (v - mean)) / dim as f32;
            let inv = 1.0 / (var + eps).sqrt();
            for ((x, &g), &b) in x.iter_mut().zip(g).zip(b) {
                *x = (*x - mean) * inv * g + b;
            }
        }
    }
}

per_isa! {
    /// `out` = the mean of the rows of `x` (rows of `out.len()` values), scaled to unit
    /// length (`max(‖·‖, 10⁻¹²)`), as sentence-transformers' mean pooling and `Normalize`.
    pub fn mean_normalized(x: &[f32], out: &mut [f32]) {
        let dim = out.len();
        assert!(dim > 0 && x.len().is_multiple_of(dim) && !x.is_empty(), "pooling shapes");
        out.fill(0.0);
        for row in x.chunks_exact(dim) {
            for (o, &v) in out.iter_mut().zip(row) {
                *o += v;
            }
        }
        let n = (x.len() / dim) as f32;
        for o in out.iter_mut() {
            *o /= n;
        }
        let norm = lane_sum(out, |v| v * v).sqrt().max(1e-12);
        for o in out.iter_mut() {
            *o /= norm;
        }
    }
}

/// `x[i] = f16(x[i] · scale)` as f32: each value scaled, then rounded to the nearest f16
/// (what ggml's f16 products do to their f32 operand), with F16C where the CPU has it.
pub fn round_f16(isa: Isa, x: &mut [f32], scale: f32) {
    assert!(isa.supported(), "{} is not supported here", isa.as_str());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: the CPU supports the instruction set (asserted above).
        #[allow(unsafe_code)]
        Isa::Avx512Vnni => done = unsafe { round_f16_avx512(x, scale) },
        // SAFETY: as above.
        #[allow(unsafe_code)]
        Isa::Avx2 => done = unsafe { round_f16_avx2(x, scale) },
        Isa::Scalar => {}
    }
    for v in &mut x[done..] {
        *v = half::f16::from_f32(*v * scale).to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f")]
unsafe fn round_f16_avx512(x: &mut [f32], scale: f32) -> usize {
    use std::arch::x86_64::*;
    let mut i = 0;
    while i + 16 <= x.len() {
        // SAFETY: `i + 16 ≤ x.len()`.
        unsafe {
            let p = x.as_mut_ptr().add(i);
            let v = _mm512_mul_ps(_mm512_loadu_ps(p), _mm512_set1_ps(scale));
            let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
            _mm512_storeu_ps(p, _mm512_cvtph_ps(h));
        }
        i += 16;
    }
    i
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,f16c")]
unsafe fn round_f16_avx2(x: &mut [f32], scale: f32) -> usize {
    use std::arch::x86_64::*;
    let mut i = 0;
    while i + 8 <= x.len() {
        // SAFETY: `i + 8 ≤ x.len()`.
        unsafe {
            let p = x.as_mut_ptr().add(i);
            let v = _mm256_mul_ps(_mm256_loadu_ps(p), _mm256_set1_ps(scale));
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
            _mm256_storeu_ps(p, _mm256_cvtph_ps(h));
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
            -200.0, -133.5, -132.9, -132.2, -131.4, -110.0, -87.0, -1e-7, 0.0, 1e-7, 88.0, 88.8,
            89.0, 131.4, 132.9, 200.0,
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
            // Past |x| ≈ 13, e^(−z²) is below 2^-126 (16.3 once came out as 7.6e18).
            let mut g: Vec<f32> = xs.iter().map(|x| x / 10.0).collect();
            g.extend([16.3, -16.3, 16.4, -16.4, 25.0, -25.0]);
            let u: Vec<f32> = g.iter().map(|x| 1.0 - x / 10.0).collect();
            let mut gelu_got = g.clone();
            gelu(isa, &mut gelu_got);
            for (&a, &x) in gelu_got.iter().zip(&g) {
                assert_eq!(
                    a.to_bits(),
                    gelu_one(x).to_bits(),
                    "{} gelu({x})",
                    isa.as_str()
                );
            }
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

    #[test]
    fn bias_and_gelu_in_one_pass_give_the_reference_bits() {
        // 37 values: two AVX-512 vectors, four AVX2 ones and a scalar tail.
        let x: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 0.61).collect();
        let bias: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        for isa in Isa::available() {
            for apply in [false, true] {
                let mut got = vec![f32::NAN; x.len()];
                bias_gelu(isa, &x, &bias, apply, &mut got);
                for ((&g, &v), &b) in got.iter().zip(&x).zip(&bias) {
                    let want = if apply { gelu_one(v + b) } else { v + b };
                    assert_eq!(
                        g.to_bits(),
                        want.to_bits(),
                        "{} {apply} {v}+{b}",
                        isa.as_str()
                    );
                }
            }
        }
    }

    #[test]
    fn gelu_is_the_erf_gelu() {
        // x·Φ(x), from the normal CDF's tables.
        for (x, want) in [
            (0.0, 0.0),
            (1.0, 0.841_344_7),
            (-1.0, -0.158_655_3),
            (3.0, 2.995_950_2),
            (-3.0, -0.004_049_8),
            (0.5, 0.345_731_3),
        ] {
            let got = gelu_one(x);
            assert!((got - want).abs() < 3e-7, "gelu({x}) = {got}, not {want}");
        }
    }

    #[test]
    fn row_kernels_give_the_same_bits_on_every_path() {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        // Three rows of 96 values (not a multiple of 64: the vector loops have tails).
        let x: Vec<f32> = (0..288)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0)
            .collect();
        let w: Vec<f32> = (0..96).map(|i| 0.5 + (i % 13) as f32 / 7.0).collect();
        let cos: Vec<f32> = (0..24).map(|i| (i as f32 * 0.3).cos()).collect();
        let sin: Vec<f32> = (0..24).map(|i| (i as f32 * 0.3).sin()).collect();
        let run = |isa: Isa| {
            let mut norm = vec![0f32; x.len()];
            rms_norm(isa, &x, &w, 1e-5, &mut norm);
            let mut roped = x.clone();
            rope(isa, &mut roped, &cos, &sin);
            let mut sum = x.clone();
            add(isa, &mut sum, &norm);
            let mut rounded = x.clone();
            round_f16(isa, &mut rounded, 0.37);
            [norm, roped, sum, rounded].map(|v| bits(&v))
        };
        let want = run(Isa::Scalar);
        // The scalar results against plain formulas.
        let first = &x[..96];
        let mean = first.iter().map(|&v| f64::from(v * v)).sum::<f64>() / 96.0;
        let scale = 1.0 / (mean as f32 + 1e-5).sqrt();
        assert_eq!(want[0][5], (first[5] * scale * w[5]).to_bits());
        assert_eq!(want[1][1], (x[0] * sin[0] + x[1] * cos[0]).to_bits());
        assert_eq!(
            want[3][7],
            half::f16::from_f32(x[7] * 0.37).to_f32().to_bits()
        );
        for isa in Isa::available() {
            assert_eq!(run(isa), want, "{}", isa.as_str());
        }
    }
}
