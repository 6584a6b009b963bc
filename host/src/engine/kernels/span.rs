//! Bidirectional attention of one head over a span of packed `q | k | v` rows: an
//! encoder's, over one sequence of a packed batch. Both of its products (q·kᵀ and the
//! probabilities × V) are register tiles of several query rows, so each key and value row
//! loaded serves all of them.

use super::Isa;

/// One head's queries, keys and values within a span of packed `q | k | v` rows (an
/// encoder's projections of one sequence), read where they are.
#[derive(Debug, Clone, Copy)]
pub struct Span<'a> {
    /// The span's rows, `stride` values each.
    pub rows: &'a [f32],
    /// Values per row.
    pub stride: usize,
    /// Where this head's query starts within a row.
    pub q: usize,
    /// Where its key starts.
    pub k: usize,
    /// Where its value starts.
    pub v: usize,
    /// Values per head.
    pub dim: usize,
}

/// Buffers an attention task keeps from one span to the next.
#[derive(Debug, Default)]
pub struct SpanScratch {
    kt: Vec<f32>,
    scores: Vec<f32>,
    out: Vec<f32>,
}

/// Query rows attended together: their scores and outputs are register tiles of this many
/// rows, so each key or value row loaded serves all of them.
const QUERY_BLOCK: usize = 6;

/// Bidirectional attention of one head over a span (an encoder's), in f32: for every
/// position `i` of the span, `out_i = softmax(q_i·Kᵀ / √dim) · V`, handed to
/// `emit(i, out_i)`. The keys are transposed once (zero-padded to a multiple of 16
/// positions); the queries and values are read in place. Both products run as register
/// tiles of up to six query rows × 32 (AVX-512) or 16 columns, each sum a chain of
/// fused multiply-adds in the order of its inner dimension, the same on every path; the
/// paths differ only by the rounding of the softmax's SIMD exponentials.
pub fn attend_span(
    isa: Isa,
    span: Span<'_>,
    scratch: &mut SpanScratch,
    mut emit: impl FnMut(usize, &[f32]),
) {
    let Span {
        rows, stride, dim, ..
    } = span;
    assert!(
        dim > 0
            && rows.len().is_multiple_of(stride)
            && [span.q, span.k, span.v].iter().all(|&o| o + dim <= stride),
        "span attention shapes"
    );
    let len = rows.len() / stride;
    let width = len.next_multiple_of(16);
    let SpanScratch { kt, scores, out } = scratch;
    kt.clear();
    kt.resize(dim * width, 0.0);
    for j in 0..len {
        for (d, &x) in rows[j * stride + span.k..][..dim].iter().enumerate() {
            kt[d * width + j] = x;
        }
    }
    scores.resize(QUERY_BLOCK * width, 0.0);
    out.resize(QUERY_BLOCK * dim, 0.0);
    let scale = [1.0 / (dim as f32).sqrt(); QUERY_BLOCK];
    for i0 in (0..len).step_by(QUERY_BLOCK) {
        let n = QUERY_BLOCK.min(len - i0);
        let q_kt = Product {
            a: &rows[i0 * stride + span.q..],
            a_stride: stride,
            rows: n,
            depth: dim,
            b: kt,
            b_stride: width,
            cols: width,
            scale,
        };
        product(isa, &q_kt, scores, width);
        // The softmax's normalization is the second product's row scale.
        let mut inverse = [1f32; QUERY_BLOCK];
        for (row, inverse) in scores.chunks_exact_mut(width).zip(&mut inverse).take(n) {
            let row = &mut row[..len];
            let mut max = f32::NEG_INFINITY;
            row_max(isa, row, &mut max);
            *inverse = (1.0 / super::math::exp_sub_sum(isa, row, max)) as f32;
        }
        let p_v = Product {
            a: scores,
            a_stride: width,
            rows: n,
            depth: len,
            b: &rows[span.v..],
            b_stride: stride,
            cols: dim,
            scale: inverse,
        };
        product(isa, &p_v, out, dim);
        for (i, o) in out.chunks_exact(dim).take(n).enumerate() {
            emit(i0 + i, o);
        }
    }
}

super::per_isa! {
    /// `max` raised to the largest of `x` (16 running maxima, then one).
    fn row_max(x: &[f32], max: &mut f32) {
        let mut m = [*max; 16];
        let mut chunks = x.chunks_exact(16);
        for c in &mut chunks {
            for (m, &x) in m.iter_mut().zip(c) {
                *m = if x > *m { x } else { *m };
            }
        }
        for &x in chunks.remainder().iter().chain(&m) {
            *max = if x > *max { x } else { *max };
        }
    }
}

/// `c[r][j] = scale[r] · Σ_k a[r][k] · b[k][j]` for `r < rows` (at most
/// [`QUERY_BLOCK`]), `j < cols`, `k < depth`;
/// row `r` of `a` at `r · a_stride`, row `k` of `b` at `k · b_stride`.
struct Product<'a> {
    a: &'a [f32],
    a_stride: usize,
    rows: usize,
    depth: usize,
    b: &'a [f32],
    b_stride: usize,
    cols: usize,
    scale: [f32; QUERY_BLOCK],
}

/// [`Product`] into `c` (row `r` at `r · c_stride`): register tiles of up to 6 rows ×
/// 32 columns (AVX-512) or × 16 (AVX2), the portable code for the rest.
fn product(isa: Isa, p: &Product<'_>, c: &mut [f32], c_stride: usize) {
    assert!(
        p.rows > 0
            && p.rows <= QUERY_BLOCK
            && p.depth > 0
            && p.a.len() >= (p.rows - 1) * p.a_stride + p.depth
            && p.b.len() >= (p.depth - 1) * p.b_stride + p.cols
            && c.len() >= (p.rows - 1) * c_stride + p.cols,
        "product shapes"
    );
    assert!(isa.supported(), "{} is not supported here", isa.as_str());
    let mut r0 = 0;
    while r0 < p.rows {
        let n = match p.rows - r0 {
            6.. => 6,
            4 | 5 => 4,
            2 | 3 => 2,
            _ => 1,
        };
        let mut j0 = 0;
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports the instruction set (asserted above); every tile lies
        // within the shapes asserted above.
        #[allow(unsafe_code)]
        unsafe {
            match isa {
                Isa::Avx512Vnni => j0 = simd::avx512(p, n, r0, c, c_stride),
                Isa::Avx2 => j0 = simd::avx2(p, n, r0, c, c_stride),
                Isa::Scalar => {}
            }
        }
        if j0 < p.cols {
            match n {
                6 => product_tile::<6>(p, r0, j0, c, c_stride),
                4 => product_tile::<4>(p, r0, j0, c, c_stride),
                2 => product_tile::<2>(p, r0, j0, c, c_stride),
                _ => product_tile::<1>(p, r0, j0, c, c_stride),
            }
        }
        r0 += n;
    }
}

/// The portable tile of [`product`]: rows `r0..r0 + R`, columns `j0..p.cols`, the same
/// sums in the same order as the SIMD tiles.
fn product_tile<const R: usize>(
    p: &Product<'_>,
    r0: usize,
    j0: usize,
    c: &mut [f32],
    c_stride: usize,
) {
    for j in j0..p.cols {
        let mut acc = [0f32; R];
        for k in 0..p.depth {
            let y = p.b[k * p.b_stride + j];
            for (r, s) in acc.iter_mut().enumerate() {
                *s = p.a[(r0 + r) * p.a_stride + k].mul_add(y, *s);
            }
        }
        for (r, s) in acc.iter().enumerate() {
            c[(r0 + r) * c_stride + j] = s * p.scale[r0 + r];
        }
    }
}

/// [`product`]'s SIMD tiles, one macro for both register widths.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod simd {
    use std::arch::x86_64::*;

    use super::Product;

    macro_rules! tiles {
        ($name:ident, $tile:ident, $feature:literal, $v:ty, $lanes:literal,
         $zero:ident, $load:ident, $set1:ident, $fmadd:ident, $mul:ident, $store:ident) => {
            /// Rows `r0..r0 + n` (`n` of 6, 4, 2, 1) in tiles of two and then one
            /// register per row; returns the first column left to the caller.
            ///
            /// # Safety
            /// The CPU supports the feature, and `p`, `c` hold the shapes `product`
            /// asserts.
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn $name(
                p: &Product<'_>,
                n: usize,
                r0: usize,
                c: &mut [f32],
                c_stride: usize,
            ) -> usize {
                let mut j0 = 0;
                // SAFETY: as this function's contract; tiles end at or before `p.cols`.
                unsafe {
                    while j0 + 2 * $lanes <= p.cols {
                        match n {
                            6 => $tile::<6, 2>(p, r0, j0, c, c_stride),
                            4 => $tile::<4, 2>(p, r0, j0, c, c_stride),
                            2 => $tile::<2, 2>(p, r0, j0, c, c_stride),
                            _ => $tile::<1, 2>(p, r0, j0, c, c_stride),
                        }
                        j0 += 2 * $lanes;
                    }
                    if j0 + $lanes <= p.cols {
                        match n {
                            6 => $tile::<6, 1>(p, r0, j0, c, c_stride),
                            4 => $tile::<4, 1>(p, r0, j0, c, c_stride),
                            2 => $tile::<2, 1>(p, r0, j0, c, c_stride),
                            _ => $tile::<1, 1>(p, r0, j0, c, c_stride),
                        }
                        j0 += $lanes;
                    }
                }
                j0
            }

            /// One tile: `R` rows × `L` registers of columns from `j0`, the sums in
            /// registers, each a chain of fused multiply-adds over `k` in order.
            #[target_feature(enable = $feature)]
            unsafe fn $tile<const R: usize, const L: usize>(
                p: &Product<'_>,
                r0: usize,
                j0: usize,
                c: &mut [f32],
                c_stride: usize,
            ) {
                let mut acc: [[$v; L]; R] = [[$zero(); L]; R];
                // SAFETY: rows `r0..r0 + R` of `a` hold `depth` values, rows of `b` hold
                // `j0 + L·lanes ≤ cols` values, and rows of `c` likewise (the caller's
                // contract).
                unsafe {
                    let a = p.a.as_ptr().add(r0 * p.a_stride);
                    let mut b = p.b.as_ptr().add(j0);
                    for k in 0..p.depth {
                        let y: [$v; L] = std::array::from_fn(|l| $load(b.add(l * $lanes)));
                        for (r, acc) in acc.iter_mut().enumerate() {
                            let x = $set1(*a.add(r * p.a_stride + k));
                            for (s, &y) in acc.iter_mut().zip(&y) {
                                *s = $fmadd(x, y, *s);
                            }
                        }
                        b = b.add(p.b_stride);
                    }
                    for (r, acc) in acc.iter().enumerate() {
                        let scale = $set1(p.scale[r0 + r]);
                        let row = c.as_mut_ptr().add((r0 + r) * c_stride + j0);
                        for (l, &s) in acc.iter().enumerate() {
                            $store(row.add(l * $lanes), $mul(s, scale));
                        }
                    }
                }
            }
        };
    }

    tiles!(
        avx512,
        tile_avx512,
        "avx512f",
        __m512,
        16,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps,
        _mm512_mul_ps,
        _mm512_storeu_ps
    );
    tiles!(
        avx2,
        tile_avx2,
        "avx2,fma",
        __m256,
        8,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_set1_ps,
        _mm256_fmadd_ps,
        _mm256_mul_ps,
        _mm256_storeu_ps
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Span attention on every path agrees with the scalar path to float rounding (the
    /// SIMD exponentials round differently), and the scalar path matches softmax attention
    /// in f64; head widths and span lengths cover full
    /// and partial tiles of rows and columns.
    #[test]
    fn span_attention_agrees_on_every_path_and_with_exact_arithmetic() {
        let mut scratch = SpanScratch::default();
        for (dim, heads) in [(32, 3), (24, 2), (64, 1)] {
            let stride = 3 * dim * heads + 5;
            for len in [1, 2, 5, 13, 40, 123] {
                let rows: Vec<f32> = (0..len * stride)
                    .map(|i| ((i * 7919 % 1013) as f32 / 506.5 - 1.0) * 1.5)
                    .collect();
                let head = heads - 1;
                let span = Span {
                    rows: &rows,
                    stride,
                    q: head * dim,
                    k: (heads + head) * dim,
                    v: (2 * heads + head) * dim + 5,
                    dim,
                };
                let run = |isa: Isa, scratch: &mut SpanScratch| {
                    let mut out = vec![f32::NAN; len * dim];
                    attend_span(isa, span, scratch, |i, o| {
                        out[i * dim..][..dim].copy_from_slice(o);
                    });
                    out
                };
                let want = run(Isa::Scalar, &mut scratch);
                for i in 0..len {
                    let q = &rows[i * stride + span.q..][..dim];
                    let scores: Vec<f64> = (0..len)
                        .map(|j| {
                            let k = &rows[j * stride + span.k..][..dim];
                            q.iter()
                                .zip(k)
                                .map(|(&a, &b)| f64::from(a * b))
                                .sum::<f64>()
                                / (dim as f64).sqrt()
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for d in 0..dim {
                        let exact: f64 = (0..len)
                            .map(|j| e[j] / sum * f64::from(rows[j * stride + span.v + d]))
                            .sum();
                        let got = f64::from(want[i * dim + d]);
                        assert!((got - exact).abs() <= 1e-4, "{dim}/{len}: {got} vs {exact}");
                    }
                }
                for isa in Isa::available() {
                    let got = run(isa, &mut scratch);
                    for (a, b) in got.iter().zip(&want) {
                        assert!(
                            (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                            "{}, dim {dim}, len {len}: {a} vs {b}",
                            isa.as_str()
                        );
                    }
                }
            }
        }
    }
}
