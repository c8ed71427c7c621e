//! This crate's GQA attention kernels (exact streaming, tiled prefill) against
//! a plain reference (repeated KV heads, full score matrix, explicit mask).

use crate::common;

use candle_core::{DType, Device, Tensor};
use common::max_abs_diff;
use omnikv_backend::attention::{
    exact_attention, matmul_attention, tiled_causal_attention, PREFILL_TILE,
};
use omnikv_kernels::cpu::exp_nonpositive;

struct Case {
    head_dim: usize,
    kv_heads: usize,
    group: usize,
    past: usize,
    new: usize,
    batch: usize,
}

const CASES: &[Case] = &[
    Case {
        head_dim: 64,
        kv_heads: 3,
        group: 3,
        past: 0,
        new: 37,
        batch: 1,
    },
    Case {
        head_dim: 64,
        kv_heads: 3,
        group: 3,
        past: 100,
        new: 1,
        batch: 1,
    },
    Case {
        head_dim: 128,
        kv_heads: 2,
        group: 4,
        past: 0,
        new: PREFILL_TILE * 2 + 45,
        batch: 1,
    },
    Case {
        head_dim: 32,
        kv_heads: 4,
        group: 1,
        past: 17,
        new: 9,
        batch: 2,
    },
    Case {
        head_dim: 16,
        kv_heads: 1,
        group: 8,
        past: 300,
        new: PREFILL_TILE * 4,
        batch: 1,
    },
    Case {
        head_dim: 64,
        kv_heads: 8,
        group: 4,
        past: 511,
        new: 1,
        batch: 3,
    },
    Case {
        head_dim: 64,
        kv_heads: 3,
        group: 3,
        past: 5,
        new: PREFILL_TILE * 3 + 1,
        batch: 2,
    },
];

#[test]
fn fast_exp_matches_std() {
    // The argument reduction `x * log2(e)` rounds in f32, so the relative
    // error grows with |x|: ~1e-6 where softmax weights matter, 1e-5 at the
    // bottom of the normal range.
    let (mut near, mut far) = (0f32, 0f32);
    let mut x = 0f32;
    while x > -90.0 {
        let (got, want) = (exp_nonpositive(x), (x as f64).exp());
        if want > f32::MIN_POSITIVE as f64 {
            let rel = ((got as f64 - want) / want).abs() as f32;
            if x > -20.0 {
                near = near.max(rel);
            } else {
                far = far.max(rel);
            }
        } else {
            assert!(got <= 2.0 * f32::MIN_POSITIVE, "exp({x}) = {got}");
        }
        x -= 0.001_37;
    }
    assert!(near < 2e-6, "max relative error on [-20, 0]: {near}");
    assert!(far < 1e-5, "max relative error below -20: {far}");
    assert_eq!(exp_nonpositive(0.0), 1.0);
    assert!(exp_nonpositive(-1000.0) < 1e-37);
}

#[test]
fn chunked_attention_matches_reference() {
    let dev = Device::Cpu;
    for c in CASES {
        let h = c.kv_heads * c.group;
        let n = c.past + c.new;
        let q = Tensor::randn(0f32, 1.0, (c.batch, h, c.new, c.head_dim), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (c.batch, c.kv_heads, n, c.head_dim), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (c.batch, c.kv_heads, n, c.head_dim), &dev).unwrap();
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let want = matmul_attention(&q, &k, &v, scale).unwrap();
        for (name, got) in [
            ("streaming", exact_attention(&q, &k, &v, scale).unwrap()),
            (
                "tiled prefill",
                tiled_causal_attention(&q, &k, &v, scale).unwrap(),
            ),
        ] {
            assert_eq!(got.dims(), want.dims());
            let diff = max_abs_diff(&got, &want);
            assert!(
                diff < 1e-4,
                "{name}: d={} kv={} g={} past={} new={} b={}: max diff {diff}",
                c.head_dim,
                c.kv_heads,
                c.group,
                c.past,
                c.new,
                c.batch
            );
        }
    }
}

#[test]
fn keeps_input_dtype() {
    let dev = Device::Cpu;
    let q = Tensor::randn(0f32, 1.0, (1, 4, 3, 16), &dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let k = Tensor::randn(0f32, 1.0, (1, 2, 5, 16), &dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let out = tiled_causal_attention(&q, &k, &k, 0.25).unwrap();
    assert_eq!(out.dtype(), DType::BF16);
    assert!(tiled_causal_attention(
        &q,
        &k.narrow(2, 0, 2).unwrap(),
        &k.narrow(2, 0, 2).unwrap(),
        0.25
    )
    .is_err());
}

/// Decode steps read the cache in place: an f16 cache handed out as a view of
/// a larger preallocated buffer (as the host's `KvCache` does) gives exactly
/// the result of the same values copied to a contiguous f32 tensor.
#[test]
fn decode_reads_strided_half_cache_in_place() {
    let dev = Device::Cpu;
    for (b, kv_h, g, d, n, cap) in [
        (1, 3, 3, 64, 100, 160),
        (2, 2, 4, 32, 37, 64),
        (1, 1, 8, 16, 5, 8),
    ] {
        let buf = |seed: f32| {
            Tensor::randn(seed, 1.0, (b, kv_h, cap, d), &dev)
                .unwrap()
                .to_dtype(DType::F16)
                .unwrap()
        };
        let (kbuf, vbuf) = (buf(0.0), buf(0.5));
        let (k, v) = (kbuf.narrow(2, 0, n).unwrap(), vbuf.narrow(2, 0, n).unwrap());
        assert!(!k.is_contiguous() || b * kv_h == 1);
        let q = Tensor::randn(0f32, 1.0, (b, kv_h * g, 1, d), &dev)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        let scale = 1.0 / (d as f64).sqrt();
        let got = exact_attention(&q, &k, &v, scale).unwrap();
        let f32c = |t: &Tensor| t.to_dtype(DType::F32).unwrap().contiguous().unwrap();
        let want = exact_attention(&q, &f32c(&k), &f32c(&v), scale).unwrap();
        let diff = max_abs_diff(&got, &want);
        assert_eq!(diff, 0.0, "b={b} kv_h={kv_h} g={g} d={d} n={n}");
    }
}
