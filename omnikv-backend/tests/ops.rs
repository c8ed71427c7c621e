//! The decode-step custom ops (`omnikv_kernels::ops`) against plain
//! references: their CPU forward passes here (the CUDA kernels against
//! these CPU passes are `crates/omnikv-kernels/tests/cuda.rs`).

use crate::common;

use candle_core::{DType, Device, IndexOp, Tensor};
use omnikv_backend::attention::{
    chunked_prompt_attention, device_attention, exact_attention, matmul_attention,
};
use omnikv_backend::omnikv::selector::head_max_scores;
use omnikv_kernels::cpu::indexed_decode_attention;
use omnikv_kernels::ops;
use omnikv_kernels::testing::{cache_view, SHAPES};

fn query(h: usize, d: usize, seed: u64) -> Tensor {
    Tensor::from_vec(common::rand_vec(h * d, seed), (h, d), &Device::Cpu).unwrap()
}

#[test]
fn score_max_equals_the_matrix_form() {
    for (i, &(kv_h, g, d, n)) in SHAPES.iter().enumerate() {
        let q = query(kv_h * g, d, 10 + i as u64);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let k = cache_view(kv_h, n, d, 20 + i as u64, dtype);
            assert!(
                kv_h == 1 || !k.is_contiguous(),
                "the test reads a strided view"
            );
            let scale = 1.0 / (d as f64).sqrt();
            let got: Vec<f32> = ops::score_max(&q, &k, scale).unwrap().to_vec1().unwrap();
            let want: Vec<f32> = head_max_scores(&q.unsqueeze(0).unwrap(), &k, scale, false)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(got.len(), n);
            for (j, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{dtype:?} {i} pos {j}: {a} vs {b}"
                );
            }
        }
    }
}

/// Top-k against a full sort: ascending positions of the k largest, ties to
/// the earlier position, NaN lowest; k = 0 and k >= n included.
#[test]
fn top_k_equals_a_full_sort() {
    for (n, seed) in [(1usize, 1u64), (7, 2), (300, 3), (4097, 4)] {
        let mut scores = common::rand_vec(n, seed);
        // Ties and NaN.
        for j in (0..n).step_by(5) {
            scores[j] = 0.25;
        }
        if n > 3 {
            scores[3] = f32::NAN;
        }
        let t = Tensor::from_vec(scores.clone(), n, &Device::Cpu).unwrap();
        for k in [0, 1, 2, n / 3, n.saturating_sub(1), n, n + 3] {
            let got: Vec<u32> = ops::top_k(&t, k).unwrap().to_vec1().unwrap();
            let key = |i: usize| {
                if scores[i].is_nan() {
                    f32::NEG_INFINITY
                } else {
                    scores[i]
                }
            };
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
            let mut want: Vec<u32> = order[..k.min(n)].iter().map(|&i| i as u32).collect();
            want.sort_unstable();
            assert_eq!(got, want, "n {n} k {k}");
        }
    }
    // A narrowed (offset) view is read from its offset.
    let t = Tensor::new(&[9f32, 1.0, 5.0, 3.0], &Device::Cpu).unwrap();
    let got: Vec<u32> = ops::top_k(&t.narrow(0, 1, 3).unwrap(), 1)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(got, vec![1]);
}

#[test]
fn gather_rows_equals_index_select() {
    let rows = [0u32, 3, 4, 17, 31, 32];
    let idx = Tensor::new(&rows, &Device::Cpu).unwrap();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let src = cache_view(3, 33, 16, 5, dtype);
        let got = ops::gather_rows(&src, &idx).unwrap();
        let want = src.contiguous().unwrap().index_select(&idx, 1).unwrap();
        assert_eq!(got.dims(), &[3, rows.len(), 16]);
        assert_eq!(got.dtype(), dtype);
        assert_eq!(common::max_abs_diff(&got, &want), 0.0, "{dtype:?}");
    }
    let src = cache_view(1, 4, 8, 6, DType::F32);
    let err = ops::gather_rows(&src, &Tensor::new(&[1u32, 4], &Device::Cpu).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("row 4"), "{err}");
}

/// Decode attention over an index list: against the plain reference on the
/// gathered rows, and bit for bit against the backend's in-place CPU path.
#[test]
fn indexed_decode_equals_attention_over_the_gathered_rows() {
    for (i, &(kv_h, g, d, n)) in SHAPES.iter().enumerate() {
        let h = kv_h * g;
        let q = query(h, d, 40 + i as u64);
        let rows: Vec<u32> = (0..n as u32)
            .filter(|r| r % 3 != 1 || *r + 1 == n as u32)
            .collect();
        let idx = Tensor::new(rows.as_slice(), &Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let k = cache_view(kv_h, n, d, 50 + i as u64, dtype);
            let v = cache_view(kv_h, n, d, 60 + i as u64, dtype);
            let scale = 1.0 / (d as f64).sqrt();
            let got = ops::indexed_decode(&q, &k, &v, &idx, scale).unwrap();
            assert_eq!(got.dims(), &[h, d]);
            let gk = k
                .contiguous()
                .unwrap()
                .index_select(&idx, 1)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let gv = v
                .contiguous()
                .unwrap()
                .index_select(&idx, 1)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let q4 = q.reshape((1, h, 1, d)).unwrap();
            let want = matmul_attention(&q4, &gk, &gv, scale)
                .unwrap()
                .reshape((h, d))
                .unwrap();
            let diff = common::max_abs_diff(&got, &want);
            assert!(diff < 2e-5, "{dtype:?} shape {i}: {diff}");
            let (k4, v4) = (k.unsqueeze(0).unwrap(), v.unsqueeze(0).unwrap());
            let in_place = indexed_decode_attention(&q4, &[(&k4, &v4, &rows)], scale)
                .unwrap()
                .reshape((h, d))
                .unwrap();
            assert_eq!(
                common::max_abs_diff(&got, &in_place),
                0.0,
                "{dtype:?} shape {i}"
            );
        }
    }
}

#[test]
fn indexed_decode_refuses_bad_input() {
    let q = query(4, 8, 1);
    let k = cache_view(2, 5, 8, 2, DType::F32);
    let cases: Vec<(Tensor, Tensor, Tensor, &str)> = vec![
        (
            q.clone(),
            k.clone(),
            Tensor::new(&[0u32, 5], &Device::Cpu).unwrap(),
            "row 5",
        ),
        (
            q.clone(),
            k.clone(),
            Tensor::zeros(0, DType::U32, &Device::Cpu).unwrap(),
            "non-empty",
        ),
        (
            q.clone(),
            k.clone(),
            Tensor::new(&[0f32], &Device::Cpu).unwrap(),
            "u32",
        ),
        (
            query(3, 8, 3),
            k.clone(),
            Tensor::new(&[0u32], &Device::Cpu).unwrap(),
            "multiple of kv_h",
        ),
        (
            q.clone(),
            cache_view(2, 6, 8, 4, DType::F32),
            Tensor::new(&[0u32], &Device::Cpu).unwrap(),
            "do not match",
        ),
    ];
    for (i, (q, v, rows, want)) in cases.into_iter().enumerate() {
        let err = ops::indexed_decode(&q, &k, &v, &rows, 1.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "case {i}: {err}");
    }
}

/// The accelerator attention path (ops for decode, candle kernels for
/// prompts), run here on the CPU, equals the CPU kernels.
#[test]
fn device_attention_equals_the_cpu_kernels() {
    let dev = Device::Cpu;
    for (b, kv_h, g, d, past, s) in [
        (1, 2, 2, 16, 40, 1),
        (3, 1, 4, 32, 9, 1),
        (2, 2, 2, 16, 7, 5),
    ] {
        let h = kv_h * g;
        let n = past + s;
        let q = Tensor::from_vec(common::rand_vec(b * h * s * d, 70), (b, h, s, d), &dev).unwrap();
        let k = Tensor::from_vec(
            common::rand_vec(b * kv_h * n * d, 71),
            (b, kv_h, n, d),
            &dev,
        )
        .unwrap();
        let v = Tensor::from_vec(
            common::rand_vec(b * kv_h * n * d, 72),
            (b, kv_h, n, d),
            &dev,
        )
        .unwrap();
        let got = device_attention(&q, &k, &v, 0.3).unwrap();
        let want = exact_attention(&q, &k, &v, 0.3).unwrap();
        assert_eq!(got.dims(), want.dims());
        let diff = common::max_abs_diff(&got, &want);
        assert!(diff < 1e-5, "b {b} s {s}: {diff}");
        // A prompt pass in chunks of query rows equals it in one piece.
        for chunk in [1, 2, 3] {
            let chunked = chunked_prompt_attention(&q, &k, &v, 0.3, chunk).unwrap();
            let diff = common::max_abs_diff(&chunked, &want);
            assert!(diff < 1e-5, "b {b} s {s} chunk {chunk}: {diff}");
        }
        if s == 1 && b > 1 {
            // The per-sequence decode of a batch equals decoding it alone.
            let one = device_attention(
                &q.i(1..2).unwrap(),
                &k.i(1..2).unwrap(),
                &v.i(1..2).unwrap(),
                0.3,
            )
            .unwrap();
            assert_eq!(common::max_abs_diff(&got.i(1..2).unwrap(), &one), 0.0);
        }
    }
}
