//! Deterministic inputs and comparisons for tests of the ops: this crate's
//! CUDA tests and the backend's tests build their tensors with these, so a
//! failing case reproduces anywhere.

use candle_core::{DType, Device, Tensor};

/// Shapes the op tests cover: (KV heads, query heads per KV head, head
/// dimension, rows). Odd row counts, one head, a group of one, and a size
/// over a thousand rows.
pub const SHAPES: [(usize, usize, usize, usize); 4] = [
    (2, 4, 64, 700),
    (1, 8, 16, 33),
    (4, 1, 32, 3),
    (8, 4, 128, 1030),
];

/// `n` deterministic values in [-1, 1) from `seed` (xorshift64).
pub fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// The largest absolute difference between two tensors of one shape, on
/// any devices and in any float dtypes (compared as f32 on the CPU).
///
/// # Panics
/// If the shapes differ or a tensor cannot be copied to the CPU.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let cpu = |t: &Tensor| {
        t.to_device(&Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .expect("tensor to f32 on the CPU")
    };
    (cpu(a) - cpu(b))
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar::<f32>())
        .expect("tensors of one shape")
}

/// `(kv_h, n, d)` rows as a model cache hands them out: a view of the first
/// `n` rows of a larger `(kv_h, n + 5, d)` buffer (head stride `(n + 5) *
/// d`), in `dtype`.
///
/// # Panics
/// If candle cannot build the tensor (not for valid sizes).
pub fn cache_view(kv_h: usize, n: usize, d: usize, seed: u64, dtype: DType) -> Tensor {
    let cap = n + 5;
    Tensor::from_vec(rand_vec(kv_h * cap * d, seed), (kv_h, cap, d), &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .and_then(|t| t.narrow(1, 0, n))
        .expect("a cache view")
}
