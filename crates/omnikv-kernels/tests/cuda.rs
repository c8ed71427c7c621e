//! The CUDA kernels against their CPU forward passes, and the GPU staging
//! (`staging::stage`) against a CPU gather of the same rows. Built with
//! `--features cuda`; needs a GPU at run time (each test fails with "no CUDA
//! device" without one). Built and linked in CI by `make cuda-check`; carried
//! to a GPU machine in the bundle of `make gpu-bundle` (README, CUDA).
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor};
use omnikv_kernels::testing::{cache_view, max_abs_diff, rand_vec, SHAPES};
use omnikv_kernels::{ops, staging};

fn gpu() -> Device {
    match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => panic!("no CUDA device: the CUDA tests need a GPU ({e})"),
    }
}

#[test]
fn cuda_ops_equal_their_cpu_forward_passes() {
    let gpu = gpu();
    for (i, &(kv_h, g, d, n)) in SHAPES.iter().enumerate() {
        let h = kv_h * g;
        let q = Tensor::from_vec(rand_vec(h * d, 80 + i as u64), (h, d), &Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let k = cache_view(kv_h, n, d, 90 + i as u64, dtype);
            let v = cache_view(kv_h, n, d, 95 + i as u64, dtype);
            let (qg, kg, vg) = (
                q.to_device(&gpu).unwrap(),
                k.to_device(&gpu).unwrap(),
                v.to_device(&gpu).unwrap(),
            );
            let scale = 1.0 / (d as f64).sqrt();
            let sc = ops::score_max(&q, &k, scale).unwrap();
            let sg = ops::score_max(&qg, &kg, scale).unwrap();
            let diff = max_abs_diff(&sc, &sg);
            assert!(diff < 1e-4, "score {dtype:?} {i}: {diff}");
            for kk in [1, n / 2, n.saturating_sub(1)] {
                let want: Vec<u32> = ops::top_k(&sc, kk).unwrap().to_vec1().unwrap();
                let got: Vec<u32> = ops::top_k(&sc.to_device(&gpu).unwrap(), kk)
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert_eq!(got, want, "top-k {kk} of {n}");
            }
            let rows: Vec<u32> = (0..n as u32).filter(|r| r % 2 == 0).collect();
            let (ic, ig) = (
                Tensor::new(rows.as_slice(), &Device::Cpu).unwrap(),
                Tensor::new(rows.as_slice(), &gpu).unwrap(),
            );
            let gc = ops::gather_rows(&k, &ic).unwrap();
            let gg = ops::gather_rows(&kg, &ig).unwrap();
            assert_eq!(max_abs_diff(&gc, &gg), 0.0, "gather {dtype:?}");
            let dc = ops::indexed_decode(&q, &k, &v, &ic, scale).unwrap();
            let dg = ops::indexed_decode(&qg, &kg, &vg, &ig, scale).unwrap();
            let diff = max_abs_diff(&dc, &dg);
            assert!(diff < 1e-4, "decode {dtype:?} {i}: {diff}");
        }
    }
}

/// Top-k on the GPU ranks ties, NaN and -inf as the CPU does.
#[test]
fn cuda_top_k_equals_the_cpu_with_ties_and_nan() {
    let gpu = gpu();
    for n in [5usize, 1000, 70_000] {
        let mut scores = rand_vec(n, n as u64);
        for j in (0..n).step_by(3) {
            scores[j] = 0.5;
        }
        for j in (1..n).step_by(11) {
            scores[j] = f32::NAN;
        }
        for j in (2..n).step_by(13) {
            scores[j] = f32::NEG_INFINITY;
        }
        let c = Tensor::from_vec(scores, n, &Device::Cpu).unwrap();
        let g = c.to_device(&gpu).unwrap();
        for k in [1, 2, n / 3, n / 2, n - 1] {
            let want: Vec<u32> = ops::top_k(&c, k).unwrap().to_vec1().unwrap();
            let got: Vec<u32> = ops::top_k(&g, k).unwrap().to_vec1().unwrap();
            assert_eq!(got, want, "n {n} k {k}");
        }
    }
}

/// Pinned copy stream + merge kernel over several steps of changing
/// selections (delta fetch: rows kept from the previous staging are merged
/// on the GPU, only the fresh ones are copied): every staging equals the
/// CPU gather of its selection.
#[test]
fn cuda_staging_equals_a_cpu_gather() {
    let gpu = gpu();
    let Device::Cuda(dev) = &gpu else {
        unreachable!("Device::new_cuda returned another device")
    };
    let (kv_h, p, d) = (2, 500, 64);
    for dtype in [DType::F16, DType::F32, DType::BF16] {
        let hk = cache_view(kv_h, p, d, 100, dtype);
        let hv = cache_view(kv_h, p, d, 101, dtype);
        let mut prev: Option<(Vec<u32>, Tensor, Tensor)> = None;
        for step in 0..6u32 {
            let sel: Vec<u32> = (0..p as u32)
                .filter(|r| (r * 7 + step * 13) % 10 < 3)
                .collect();
            // Rows of the previous staging are reused, the rest are fresh.
            let (fresh, order) = match &prev {
                None => (sel.clone(), None),
                Some((pos, _, _)) => {
                    let mut fresh = Vec::new();
                    let order: Vec<u32> = sel
                        .iter()
                        .map(|s| match pos.binary_search(s) {
                            Ok(j) => j as u32,
                            Err(_) => {
                                fresh.push(*s);
                                (pos.len() + fresh.len() - 1) as u32
                            }
                        })
                        .collect();
                    (fresh, Some(order))
                }
            };
            let (k, v, done) = staging::stage(
                &hk,
                &hv,
                prev.as_ref().map(|(_, k, v)| (k, v)),
                &fresh,
                order.as_deref(),
                dev,
            )
            .unwrap();
            done.wait_on(dev).unwrap();
            let idx = Tensor::new(sel.as_slice(), &Device::Cpu).unwrap();
            let want_k = hk.index_select(&idx, 1).unwrap();
            let want_v = hv.index_select(&idx, 1).unwrap();
            assert_eq!(max_abs_diff(&want_k, &k), 0.0, "{dtype:?} step {step}");
            assert_eq!(max_abs_diff(&want_v, &v), 0.0, "{dtype:?} step {step}");
            prev = Some((sel, k, v));
        }
    }
}
