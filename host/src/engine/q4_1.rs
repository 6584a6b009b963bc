//! Matrix products with Q4_1 weights, on Warden's own kernels.
//!
//! candle has no SIMD path for Q4_1 (only Q4_0, Q8_0 and the K-quants have one), and SmolLM2's
//! GGUF stores every layer's weights as Q4_1, so its scalar loop was most of the time of a
//! forward pass. [`Q41Matrix`] repacks the weights at load ([`kernels::q4`](super::kernels::q4))
//! and runs them with AVX-512 VNNI, AVX2 or portable code, chosen at run time, on the shared
//! kernel thread pool. The activations' Q8_1 quantization ([`Rounding::Candle`]) and the
//! float arithmetic are candle's, in candle's order, so the results are bit-identical to candle's `QMatMul` (the
//! tests check it), which keeps the decoder bit-identical to candle-transformers'
//! `quantized_llama`, whose agreement with llama.cpp is measured in docs/performance.md.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Result, Tensor};

use super::kernels::Isa;
use super::kernels::pool::Pool;
use super::kernels::q4::{BLOCK, Q41Packed, Q81, Rounding};

/// A Q4_1 weight matrix of shape (`rows`, `cols`), used as `x · Wᵀ`.
#[derive(Debug)]
pub struct Q41Matrix {
    packed: Q41Packed,
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
        let packed = Q41Packed::from_gguf(&data, rows, cols).map_err(candle_core::Error::Msg)?;
        Ok(Some(Self { packed }))
    }

    /// `x · Wᵀ` for `x` of shape (..., `cols`); the result has shape (..., `rows`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let Some((&k, lead)) = dims.split_last() else {
            candle_core::bail!("Q4_1 matmul of a scalar");
        };
        if k != self.packed.cols() {
            candle_core::bail!(
                "Q4_1 matmul: input width {k}, weights {}",
                self.packed.cols()
            );
        }
        let input = x.flatten_all()?.to_vec1::<f32>()?;
        let mut quantized = Q81::default();
        quantized.quantize_as(Isa::active(), &input, k, Rounding::Candle);
        let mut out = vec![0f32; quantized.rows() * self.packed.rows()];
        self.packed
            .matmul(&quantized, &mut out, Isa::active(), Pool::global());
        let mut shape = lead.to_vec();
        shape.push(self.packed.rows());
        Tensor::from_vec(out, shape, x.device())
    }
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
        // Bit-identical to candle's own Q4_1 matrix product.
        let candle: Vec<f32> = candle_core::quantized::QMatMul::from_qtensor(q)
            .unwrap()
            .forward(&xt)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(got, candle);
    }

    #[test]
    fn other_types_are_left_to_candle() {
        let t = Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
        assert!(Q41Matrix::from_qtensor(&q).unwrap().is_none());
    }
}
