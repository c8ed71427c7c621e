//! Helpers shared by this crate's integration tests.

use candle_core::{DType, Tensor};

/// Largest |a - b| over all elements, compared in f32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
