//! Helpers shared by this crate's integration tests.
#![allow(dead_code)]

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use mistralrs_core::kv_backend::{ForwardScope, KvCacheBackend, SequenceIdsScope};
use omnikv_backend::LlamaOmniKv;

/// The tiny random Llama-3.1 fixture (2 layers, 4 heads, 2 KV heads, head
/// dim 16) in f32 on the CPU, attending through `backend`.
pub fn tiny_llama(backend: Arc<dyn KvCacheBackend>) -> LlamaOmniKv {
    tiny_fixture("tiny-llama31", backend)
}

/// A tiny safetensors fixture (`tests/fixtures/<variant>`) in f32 on the CPU.
pub fn tiny_fixture(variant: &str, backend: Arc<dyn KvCacheBackend>) -> LlamaOmniKv {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(variant);
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    LlamaOmniKv::load_hf(
        &cfg,
        &[dir.join("model.safetensors")],
        DType::F32,
        &Device::Cpu,
        backend,
    )
    .unwrap()
}

/// Deterministic token ids below the tiny vocabulary size.
pub fn token_ids(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed)) >> 24)
        .collect()
}

/// Largest |a - b| over all elements, compared in f32.
#[allow(unused_imports)] // not every test binary compares tensors
pub use omnikv_kernels::testing::max_abs_diff;

/// Logits of the last of `x`'s tokens (position `last` in `x`), fed at
/// `offset`, for one sequence.
pub fn step_logits(model: &LlamaOmniKv, x: &[u32], offset: usize, last: usize) -> Vec<f32> {
    let x = Tensor::new(x, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    model
        .forward(&x, &[offset], vec![(last, 1)])
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Prompt pass, then one decode step per remaining token, as host sequence
/// `seq`; every step's logits.
pub fn decode_steps(model: &LlamaOmniKv, seq: usize, ids: &[u32], prompt: usize) -> Vec<Vec<f32>> {
    model.reset_cache();
    let _scope = ForwardScope::enter(vec![prompt]);
    let _ids = SequenceIdsScope::enter(vec![seq]);
    let mut out = vec![step_logits(model, &ids[..prompt], 0, prompt - 1)];
    for (pos, &id) in ids.iter().enumerate().skip(prompt) {
        out.push(step_logits(model, &[id], pos, 0));
    }
    out
}

/// Deterministic values in [-1, 1) (xorshift).
#[allow(unused_imports)] // not every test binary draws random values
pub use omnikv_kernels::testing::rand_vec;

/// Deterministic pseudo-random numbers (64-bit LCG, high bits).
pub struct Lcg(pub u64);

impl Lcg {
    /// The next value, 31 bits.
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    /// A value in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        (self.next() % 20_000) as f32 / 10_000.0 - 1.0
    }
}
