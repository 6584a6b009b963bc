//! The register tiles of the dense products, one per instruction set: 32 outputs × up to
//! 12 tokens of f32 sums (AVX-512), 32 × 6 in two halves (AVX2), and the bf16 tile
//! (`vdpbf16ps`). The token count is a constant inside each, so the sums stay in registers.

#[cfg(target_arch = "x86_64")]
use super::{AVX2_TOKENS, BLOCK_ROWS, TILE_TOKENS};

/// Dispatch a tile kernel on its token count, a constant inside, so that the accumulators
/// stay in registers.
macro_rules! by_count {
    ($kernel:ident, $count:expr, $($arg:expr),*) => {
        match $count {
            1 => $kernel::<1>($($arg),*),
            2 => $kernel::<2>($($arg),*),
            3 => $kernel::<3>($($arg),*),
            4 => $kernel::<4>($($arg),*),
            5 => $kernel::<5>($($arg),*),
            6 => $kernel::<6>($($arg),*),
            7 => $kernel::<7>($($arg),*),
            8 => $kernel::<8>($($arg),*),
            9 => $kernel::<9>($($arg),*),
            10 => $kernel::<10>($($arg),*),
            11 => $kernel::<11>($($arg),*),
            _ => $kernel::<12>($($arg),*),
        }
    };
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f,avx2,fma")]
pub(super) unsafe fn f32_tile_avx512(
    w: &[f32],
    panel: &[u32],
    cols: usize,
    count: usize,
    tile: &mut [[f32; BLOCK_ROWS]; TILE_TOKENS],
) {
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn kernel<const T: usize>(
        w: &[f32],
        panel: &[u32],
        cols: usize,
        tile: &mut [[f32; BLOCK_ROWS]; TILE_TOKENS],
    ) {
        use std::arch::x86_64::*;
        // SAFETY: the caller passes `cols` columns of 32 weights and a panel of `cols`
        // columns of 12 f32 words (see `pack_panels`).
        unsafe {
            let mut lo = [_mm512_setzero_ps(); T];
            let mut hi = [_mm512_setzero_ps(); T];
            let (w, x) = (w.as_ptr(), panel.as_ptr().cast::<f32>());
            for k in 0..cols {
                let w0 = _mm512_loadu_ps(w.add(k * BLOCK_ROWS));
                let w1 = _mm512_loadu_ps(w.add(k * BLOCK_ROWS + 16));
                for t in 0..T {
                    let v = _mm512_set1_ps(*x.add(k * TILE_TOKENS + t));
                    lo[t] = _mm512_fmadd_ps(v, w0, lo[t]);
                    hi[t] = _mm512_fmadd_ps(v, w1, hi[t]);
                }
            }
            for t in 0..T {
                _mm512_storeu_ps(tile[t].as_mut_ptr(), lo[t]);
                _mm512_storeu_ps(tile[t].as_mut_ptr().add(16), hi[t]);
            }
        }
    }
    // SAFETY: as the caller's.
    unsafe { by_count!(kernel, count, w, panel, cols, tile) }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn f32_tile_avx2(
    w: &[f32],
    x: &[f32],
    cols: usize,
    count: usize,
    tile: &mut [[f32; BLOCK_ROWS]; TILE_TOKENS],
) {
    #[target_feature(enable = "avx2,fma")]
    unsafe fn kernel<const T: usize>(
        w: &[f32],
        x: &[f32],
        cols: usize,
        half: usize,
        tile: &mut [[f32; BLOCK_ROWS]],
    ) {
        use std::arch::x86_64::*;
        // SAFETY: as `f32_tile_avx512`'s; `half` is 0 or 16.
        unsafe {
            let mut lo = [_mm256_setzero_ps(); T];
            let mut hi = [_mm256_setzero_ps(); T];
            let (w, x) = (w.as_ptr().add(half), x.as_ptr());
            for k in 0..cols {
                let w0 = _mm256_loadu_ps(w.add(k * BLOCK_ROWS));
                let w1 = _mm256_loadu_ps(w.add(k * BLOCK_ROWS + 8));
                for t in 0..T {
                    let v = _mm256_set1_ps(*x.add(t * cols + k));
                    lo[t] = _mm256_fmadd_ps(v, w0, lo[t]);
                    hi[t] = _mm256_fmadd_ps(v, w1, hi[t]);
                }
            }
            for t in 0..T {
                _mm256_storeu_ps(tile[t].as_mut_ptr().add(half), lo[t]);
                _mm256_storeu_ps(tile[t].as_mut_ptr().add(half + 8), hi[t]);
            }
        }
    }
    // Six tokens at a time: twelve accumulators of the sixteen registers.
    for t0 in (0..count).step_by(AVX2_TOKENS) {
        let n = AVX2_TOKENS.min(count - t0);
        let (x, tile) = (&x[t0 * cols..], &mut tile[t0..]);
        for half in [0, 16] {
            // SAFETY: as the caller's.
            unsafe { by_count!(kernel, n, w, x, cols, half, tile) }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn bf16_tile_avx512(
    w: &[u16],
    panel: &[u32],
    cols: usize,
    count: usize,
    tile: &mut [[f32; BLOCK_ROWS]; TILE_TOKENS],
) {
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn kernel<const T: usize>(
        w: &[u16],
        panel: &[u32],
        cols: usize,
        tile: &mut [[f32; BLOCK_ROWS]; TILE_TOKENS],
    ) {
        use std::arch::x86_64::*;
        // SAFETY: the caller passes `cols / 2` pairs of 32 × 2 weights and a panel of
        // `cols / 2` columns of 12 tokens' bf16 pairs (see `pack_panels`).
        unsafe {
            let mut lo = [_mm512_setzero_ps(); T];
            let mut hi = [_mm512_setzero_ps(); T];
            let (w, x) = (w.as_ptr(), panel.as_ptr());
            for p in 0..cols / 2 {
                let w0: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(w.add(p * 2 * BLOCK_ROWS).cast()));
                let w1: __m512bh = std::mem::transmute(_mm512_loadu_si512(
                    w.add(p * 2 * BLOCK_ROWS + BLOCK_ROWS).cast(),
                ));
                for t in 0..T {
                    let pair = *x.add(p * TILE_TOKENS + t) as i32;
                    let v: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                    lo[t] = _mm512_dpbf16_ps(lo[t], v, w0);
                    hi[t] = _mm512_dpbf16_ps(hi[t], v, w1);
                }
            }
            for t in 0..T {
                _mm512_storeu_ps(tile[t].as_mut_ptr(), lo[t]);
                _mm512_storeu_ps(tile[t].as_mut_ptr().add(16), hi[t]);
            }
        }
    }
    // SAFETY: as the caller's.
    unsafe { by_count!(kernel, count, w, panel, cols, tile) }
}
