//! The arithmetic of the dense products: f32, or bf16 with f32 sums where the CPU has
//! `vdpbf16ps`; the choice `auto` makes by measuring both at load; and rounding to bf16.

use super::super::Isa;
use super::super::pool::Pool;
use super::{Activation, DensePacked};

/// The arithmetic of a dense product (configured as a [`PrecisionSetting`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Precision {
    /// f32 weights and activations, f32 sums.
    F32,
    /// bf16 weights and activations, f32 sums (`vdpbf16ps`; needs AVX-512 BF16).
    Bf16,
}

impl Precision {
    /// Its name in settings and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    /// Whether the kernels of `isa` on this CPU run this precision at speed.
    pub fn fast_on(self, isa: Isa) -> bool {
        match self {
            Precision::F32 => true,
            Precision::Bf16 => bf16_supported(isa),
        }
    }
}

/// The embedding model's precision as configured: one of [`Precision`], or `auto` (the
/// default), which takes bf16 only where it is measurably faster than f32 on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PrecisionSetting {
    /// [`fastest`] at load.
    #[default]
    Auto,
    /// Always f32.
    F32,
    /// bf16 where the CPU has AVX-512 BF16, else f32.
    Bf16,
}

impl PrecisionSetting {
    /// Its name in settings and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            PrecisionSetting::Auto => "auto",
            PrecisionSetting::F32 => "f32",
            PrecisionSetting::Bf16 => "bf16",
        }
    }

    /// Parse a name as [`PrecisionSetting::as_str`] writes it.
    pub fn parse(name: &str) -> Option<PrecisionSetting> {
        [
            PrecisionSetting::Auto,
            PrecisionSetting::F32,
            PrecisionSetting::Bf16,
        ]
        .into_iter()
        .find(|p| p.as_str() == name.trim())
    }

    /// The precision to load with on `isa`: a fixed one as it is, `auto` measured.
    pub fn resolve(self, isa: Isa, pool: &Pool) -> Precision {
        match self {
            PrecisionSetting::Auto => fastest(isa, pool),
            PrecisionSetting::F32 => Precision::F32,
            PrecisionSetting::Bf16 => Precision::Bf16,
        }
    }
}

impl From<Precision> for PrecisionSetting {
    fn from(p: Precision) -> Self {
        match p {
            Precision::F32 => PrecisionSetting::F32,
            Precision::Bf16 => PrecisionSetting::Bf16,
        }
    }
}

/// bf16 if this CPU runs a product of the embedding model's shape (1536 × 384) over a
/// batch's worth of tokens (256) at least 1.15 times as fast in bf16 as in f32, else f32.
/// `vdpbf16ps` is about twice the f32 rate on AMD Zen 4 and about half of it on Intel
/// Sapphire Rapids, so no fixed choice is right everywhere. (Over a few tokens the product
/// is bound by reading the weights, and bf16's half-size weights win on both: the batch
/// must be large enough to measure the arithmetic.) It takes about 30 ms at load.
pub fn fastest(isa: Isa, pool: &Pool) -> Precision {
    if !bf16_supported(isa) {
        return Precision::F32;
    }
    let (rows, cols, n) = (1536, 384, 256);
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| (i % 251) as f32 / 251.0 - 0.5)
        .collect();
    let x: Vec<f32> = (0..n * cols)
        .map(|i| (i % 241) as f32 / 241.0 - 0.5)
        .collect();
    let bias = vec![0.0; rows];
    let mut out = vec![0.0; n * rows];
    let mut best = |precision| {
        let Ok(d) = DensePacked::new(&w, rows, cols, precision) else {
            return f64::INFINITY;
        };
        (0..4)
            .map(|_| {
                let t = std::time::Instant::now();
                d.matmul(&x, &bias, Activation::Identity, &mut out, isa, pool);
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    let (f32_time, bf16_time) = (best(Precision::F32), best(Precision::Bf16));
    let chosen = if bf16_time * 1.15 < f32_time {
        Precision::Bf16
    } else {
        Precision::F32
    };
    tracing::debug!(
        f32_us = f32_time * 1e6,
        bf16_us = bf16_time * 1e6,
        chosen = chosen.as_str(),
        "measured the embedding products"
    );
    chosen
}

/// Whether `isa` on this CPU has `vdpbf16ps`.
pub fn bf16_supported(isa: Isa) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        isa == Isa::Avx512Vnni && isa.supported() && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa;
        false
    }
}

/// `v` rounded to bf16 (nearest, ties to even; subnormals to zero, as `vcvtneps2bf16`).
pub fn to_bf16(v: f32) -> u16 {
    let v = if v.is_subnormal() {
        0f32.copysign(v)
    } else {
        v
    };
    let b = v.to_bits();
    if v.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// The f32 of a bf16.
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// `out[i] = to_bf16(x[i])`, with `vcvtneps2bf16` where the CPU has it.
pub(super) fn convert_bf16(isa: Isa, x: &[f32], out: &mut [u16]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if bf16_supported(isa) {
        // SAFETY: the CPU has AVX-512 BF16 (checked just above); `out` is as long as `x`.
        #[allow(unsafe_code)]
        unsafe {
            done = convert_bf16_avx512(x, out);
        }
    }
    for (o, &v) in out[done..].iter_mut().zip(&x[done..]) {
        *o = to_bf16(v);
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f,avx512bf16,avx512vl")]
unsafe fn convert_bf16_avx512(x: &[f32], out: &mut [u16]) -> usize {
    use std::arch::x86_64::*;
    let n = x.len().min(out.len());
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: `i + 16 ≤ n`, within both slices.
        unsafe {
            let h = _mm512_cvtneps_pbh(_mm512_loadu_ps(x.as_ptr().add(i)));
            let h = std::mem::transmute::<__m256bh, __m256i>(h);
            _mm256_storeu_si256(out.as_mut_ptr().add(i).cast(), h);
        }
        i += 16;
    }
    i
}
