//! Selectors, top-k and sparse attention against naive references written
//! plainly here; and the backend end to end on a tiny model: a full budget
//! reproduces dense decoding exactly, a small one changes it, and batched
//! decoding equals single-sequence decoding.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use mistralrs_core::kv_backend::{CustomTextModel, ForwardScope, SequenceIdsScope};
use omnikv_backend::attention::{
    attended_rows, exact_attention, sparse_decode_attention, sparse_decode_attention_per_kv_head,
};
use omnikv_backend::omnikv::selector::SelectorKind;
use omnikv_backend::omnikv::selector::{
    make_selector, select, select_keeping, select_per_kv_head, top_k_sorted, Keep, Last, Selection,
};
use omnikv_backend::{LlamaOmniKv, OmniKvBackend, OmniKvConfig};
use omnikv_kernels::cpu::indexed_decode_attention;

use crate::common;

/// Plain reference of [`sparse_decode_attention`]: copy the rows out of the
/// `(1, kv_h, n, d)` cache with candle's `index_select`, then attend densely.
fn gathered_decode_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rows: &[u32],
    scale: f64,
) -> candle_core::Result<Tensor> {
    let idx = Tensor::from_slice(rows, rows.len(), k.device())?;
    let gather = |t: &Tensor| t.contiguous()?.index_select(&idx, 2);
    exact_attention(q, &gather(k)?, &gather(v)?, scale)
}

/// Deterministic pseudo-random numbers in [-1, 1).
fn naive_top_k(scores: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap().then(a.cmp(&b)));
    let mut out: Vec<u32> = idx.into_iter().take(k).map(|i| i as u32).collect();
    out.sort();
    out
}

#[test]
fn top_k_matches_full_sort() {
    for (n, k, seed) in [
        (1, 1, 1),
        (10, 3, 2),
        (100, 7, 3),
        (1000, 67, 4),
        (513, 512, 5),
        (64, 64, 6),
        (50, 80, 7),
    ] {
        // Quantise to create ties.
        let scores: Vec<f32> = common::rand_vec(n, seed)
            .iter()
            .map(|x| (x * 8.0).round())
            .collect();
        assert_eq!(
            top_k_sorted(&scores, k),
            naive_top_k(&scores, k.min(n)),
            "n={n} k={k}"
        );
    }
    assert_eq!(top_k_sorted(&[f32::NAN, 1.0, 0.5], 1), vec![1]);
}

struct Case {
    head_dim: usize,
    kv_heads: usize,
    group: usize,
    prompt: usize,
    window: usize,
}

const CASES: &[Case] = &[
    Case {
        head_dim: 64,
        kv_heads: 3,
        group: 3,
        prompt: 50,
        window: 1,
    },
    Case {
        head_dim: 16,
        kv_heads: 1,
        group: 8,
        prompt: 300,
        window: 4,
    },
    Case {
        head_dim: 32,
        kv_heads: 4,
        group: 1,
        prompt: 17,
        window: 16,
    },
    Case {
        head_dim: 128,
        kv_heads: 2,
        group: 4,
        prompt: 129,
        window: 8,
    },
];

/// Plain reference of the spec's formulas: per window query, per head,
/// scaled dot products (optionally softmax over positions), max over heads;
/// then `last` = newest row, `uniform` = sum, `exp` = 0.5^(w-1-i)-weighted sum.
fn reference_scores(q: &[f32], k: &[f32], c: &Case, w: usize, kind: SelectorKind) -> Vec<f32> {
    let (d, kvh, h, p) = (c.head_dim, c.kv_heads, c.kv_heads * c.group, c.prompt);
    let scale = 1.0 / (d as f32).sqrt();
    let rows: Vec<usize> = match kind {
        SelectorKind::Last | SelectorKind::SoftmaxBeforeLast => vec![w - 1],
        _ => (0..w).collect(),
    };
    let softmax = kind != SelectorKind::Last;
    let mut total = vec![0f32; p];
    for &i in &rows {
        let mut best = vec![f32::NEG_INFINITY; p];
        for head in 0..h {
            let kv = head / c.group;
            let qv = &q[(i * h + head) * d..(i * h + head + 1) * d];
            let mut row: Vec<f32> = (0..p)
                .map(|j| (0..d).map(|x| qv[x] * k[(kv * p + j) * d + x]).sum::<f32>() * scale)
                .collect();
            if softmax {
                let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let z: f32 = row.iter().map(|x| (x - m).exp()).sum();
                row.iter_mut().for_each(|x| *x = (*x - m).exp() / z);
            }
            for (b, r) in best.iter_mut().zip(row) {
                *b = b.max(r);
            }
        }
        let weight = if kind == SelectorKind::Exp {
            0.5f32.powi((w - 1 - i) as i32)
        } else {
            1.0
        };
        for (t, b) in total.iter_mut().zip(best) {
            *t += weight * b;
        }
        let _ = kvh;
    }
    total
}

#[test]
fn selectors_match_reference() {
    let dev = Device::Cpu;
    for c in CASES {
        let h = c.kv_heads * c.group;
        let w = c.window;
        let q = common::rand_vec(w * h * c.head_dim, 11 + c.prompt as u64);
        let k = common::rand_vec(c.kv_heads * c.prompt * c.head_dim, 12 + c.prompt as u64);
        let qt = Tensor::from_slice(&q, (w, h, c.head_dim), &dev).unwrap();
        let kt = Tensor::from_slice(&k, (c.kv_heads, c.prompt, c.head_dim), &dev).unwrap();
        for kind in [
            SelectorKind::Last,
            SelectorKind::SoftmaxBeforeLast,
            SelectorKind::Uniform,
            SelectorKind::Exp,
        ] {
            let sel = make_selector(kind, w);
            let got: Vec<f32> = sel
                .scores(&qt, &kt, 1.0 / (c.head_dim as f64).sqrt())
                .unwrap()
                .to_vec1()
                .unwrap();
            let want = reference_scores(&q, &k, c, w, kind);
            let diff = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                diff < 1e-4,
                "{kind:?} d={} kv={} g={} P={} w={w}: {diff}",
                c.head_dim,
                c.kv_heads,
                c.group,
                c.prompt
            );
        }
    }
}

/// The fused CPU scoring of `last` (keys read in place, blocks in parallel)
/// against the matrix form, for f32 and f16 keys and several blocks.
#[test]
fn fused_scores_match_the_matrix_form() {
    let dev = Device::Cpu;
    for (kvh, g, d, p, seed) in [(3, 3, 64, 700, 7u64), (1, 8, 16, 256, 8), (4, 1, 32, 3, 9)] {
        let h = kvh * g;
        let q = Tensor::from_vec(common::rand_vec(h * d, seed as u64), (h, d), &dev).unwrap();
        let k =
            Tensor::from_vec(common::rand_vec(kvh * p * d, seed + 1), (kvh, p, d), &dev).unwrap();
        for dtype in [DType::F32, DType::F16] {
            let k = k.to_dtype(dtype).unwrap();
            let scale = 1.0 / (d as f64).sqrt();
            let got: Vec<f32> = omnikv_kernels::ops::score_max(&q, &k, scale)
                .unwrap()
                .to_vec1()
                .unwrap();
            let want: Vec<f32> = omnikv_backend::omnikv::selector::head_max_scores(
                &q.unsqueeze(0).unwrap(),
                &k,
                scale,
                false,
            )
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
            assert_eq!(got.len(), p);
            let diff = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-5, "{dtype:?} P={p}: {diff}");
        }
    }
}

#[test]
fn selection_budget_and_prompt_tail_rule() {
    let dev = Device::Cpu;
    let (h, d, p) = (4, 8, 40);
    let q = Tensor::from_slice(&common::rand_vec(16 * h * d, 3), (16, h, d), &dev).unwrap();
    let k = Tensor::from_slice(&common::rand_vec(2 * p * d, 4), (2, p, d), &dev).unwrap();
    let last = make_selector(SelectorKind::Last, 16);
    let s = select(&*last, &q.narrow(0, 15, 1).unwrap(), &k, 0.3, 5, 1).unwrap();
    assert_eq!(s.len(), 5);
    assert!(s.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(
        select(&*last, &q.narrow(0, 15, 1).unwrap(), &k, 0.3, 40, 1).unwrap(),
        (0..40).collect::<Vec<u32>>()
    );
    // Window 16 after 3 decoded tokens: the last 13 prompt positions are kept
    // and k = 20 shrinks to 7 others.
    let uniform = make_selector(SelectorKind::Uniform, 16);
    let s = select(&*uniform, &q, &k, 0.3, 20, 3).unwrap();
    assert_eq!(s.len(), 20);
    assert!((27..40).all(|j| s.contains(&j)));
    // k smaller than the kept tail still selects at least one other position.
    let s = select(&*uniform, &q, &k, 0.3, 5, 3).unwrap();
    assert_eq!(s.len(), 14);
    // Once the window holds only generated tokens, plain top-k.
    assert_eq!(select(&*uniform, &q, &k, 0.3, 5, 16).unwrap().len(), 5);
}

/// Plain reference of a window selector's selection while its window still
/// holds prompt positions (published code): the candidates are the prompt
/// without its last `w - decoded` positions, the softmax runs over the
/// candidates only, the top `k - tail` candidates are kept with the tail.
fn reference_window_selection(
    q: &[f32],
    k_all: &[f32],
    c: &Case,
    w: usize,
    kind: SelectorKind,
    budget: usize,
    decoded: usize,
    softmax_over_all: bool,
) -> Vec<u32> {
    let tail = w - decoded;
    let cand = c.prompt - tail;
    let scores = if softmax_over_all {
        // The earlier behaviour: normalise over every prompt key, then drop
        // the tail.
        reference_scores(q, k_all, c, w, kind)[..cand].to_vec()
    } else {
        let d = c.head_dim;
        let k: Vec<f32> = (0..c.kv_heads)
            .flat_map(|kv| k_all[kv * c.prompt * d..(kv * c.prompt + cand) * d].to_vec())
            .collect();
        reference_scores(q, &k, &Case { prompt: cand, ..*c }, w, kind)
    };
    let mut out = naive_top_k(&scores, budget - tail);
    out.extend(cand as u32..c.prompt as u32);
    out
}

#[test]
fn window_selectors_normalise_over_the_candidates_only() {
    let dev = Device::Cpu;
    let c = Case {
        head_dim: 16,
        kv_heads: 2,
        group: 2,
        prompt: 48,
        window: 8,
    };
    let (h, d, p, w) = (c.kv_heads * c.group, c.head_dim, c.prompt, c.window);
    let q = common::rand_vec(w * h * d, 21);
    let mut k = common::rand_vec(c.kv_heads * p * d, 22);
    // KV head 0's keys in the window's prompt tail align with every query of
    // query head 0: over all positions, that head's softmax puts its mass on
    // the tail and its candidate scores collapse; over the candidates only,
    // they do not.
    let decoded = 3;
    for j in p - (w - decoded)..p {
        for x in 0..d {
            let mean_q: f32 = (0..w).map(|i| q[(i * h) * d + x]).sum::<f32>() / w as f32;
            k[j * d + x] += 6.0 * mean_q;
        }
    }
    let qt = Tensor::from_slice(&q, (w, h, d), &dev).unwrap();
    let kt = Tensor::from_slice(&k, (c.kv_heads, p, d), &dev).unwrap();
    let scale = 1.0 / (d as f64).sqrt();
    for kind in [SelectorKind::Uniform, SelectorKind::Exp] {
        let sel = make_selector(kind, w);
        let budget = 12;
        let got = select(&*sel, &qt, &kt, scale, budget, decoded).unwrap();
        let want = reference_window_selection(&q, &k, &c, w, kind, budget, decoded, false);
        assert_eq!(got, want, "{kind:?}: published selection");
        let earlier = reference_window_selection(&q, &k, &c, w, kind, budget, decoded, true);
        assert_ne!(
            want, earlier,
            "{kind:?}: the case must tell the two normalisers apart"
        );
    }
}

#[test]
fn sparse_attention_matches_masked_full_attention() {
    let dev = Device::Cpu;
    for (kvh, g, d, p, n, keep, seed) in [
        (3, 3, 64, 50, 60, 7, 1u64),
        (1, 8, 16, 200, 201, 20, 2),
        (4, 1, 32, 33, 40, 33, 3),
    ] {
        let h = kvh * g;
        let q = common::rand_vec(h * d, seed as u64);
        let k = common::rand_vec(kvh * n * d, seed + 10);
        let v = common::rand_vec(kvh * n * d, seed + 20);
        let sel: Vec<u32> = (0..p as u32)
            .filter(|j| (j * 7 + seed as u32) % (p as u32 / keep as u32).max(1) == 0)
            .take(keep)
            .collect();
        let rows = attended_rows(&sel, p, n);
        let scale = 1.0 / (d as f32).sqrt();
        let qt = Tensor::from_slice(&q, (1, h, 1, d), &dev).unwrap();
        let kt = Tensor::from_slice(&k, (1, kvh, n, d), &dev).unwrap();
        let vt = Tensor::from_slice(&v, (1, kvh, n, d), &dev).unwrap();
        let got: Vec<f32> = sparse_decode_attention(&qt, &kt, &vt, &rows, scale as f64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let shape = (h, g, n, d);
        assert_masked_attention(&got, (&q, &k, &v), shape, scale, &|_| rows.clone());
    }
}

/// Check `got` `(h, d)` against full attention over all `n` rows with -inf
/// on the rows head `i` does not attend (`rows_of(i)`); `q` `(h, d)`, `k`,
/// `v` `(kv_h, n, d)`, `shape` = `(h, g, n, d)` with `g` query heads per KV
/// head.
fn assert_masked_attention(
    got: &[f32],
    (q, k, v): (&[f32], &[f32], &[f32]),
    (h, g, n, d): (usize, usize, usize, usize),
    scale: f32,
    rows_of: &dyn Fn(usize) -> Vec<u32>,
) {
    for head in 0..h {
        let kv = head / g;
        let rows = rows_of(head);
        let logits: Vec<f32> = (0..n)
            .map(|j| {
                if rows.contains(&(j as u32)) {
                    (0..d)
                        .map(|x| q[head * d + x] * k[(kv * n + j) * d + x])
                        .sum::<f32>()
                        * scale
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let z: f32 = logits.iter().map(|x| (x - m).exp()).sum();
        for x in 0..d {
            let want: f32 = (0..n)
                .map(|j| (logits[j] - m).exp() / z * v[(kv * n + j) * d + x])
                .sum();
            let diff = (got[head * d + x] - want).abs();
            assert!(diff < 1e-5, "head {head} dim {x}: {diff}");
        }
    }
}

/// The in-place sparse decode (rows read where they are, blocks in
/// parallel) is bit-identical to copying the rows first, for f32 and f16
/// caches, cache views with spare capacity, and rows split over two sources
/// (host-tier prompt rows + generated rows).
#[test]
fn in_place_sparse_decode_equals_the_gathered_copy() {
    let dev = Device::Cpu;
    for (kvh, g, d, cap, n, seed) in [
        (3, 3, 64, 80, 60, 4u64),
        (2, 4, 16, 300, 257, 5),
        (1, 1, 8, 5, 5, 6),
    ] {
        let h = kvh * g;
        let q = Tensor::from_vec(common::rand_vec(h * d, seed as u64), (1, h, 1, d), &dev).unwrap();
        let buf_k = Tensor::from_vec(
            common::rand_vec(kvh * cap * d, seed + 1),
            (1, kvh, cap, d),
            &dev,
        )
        .unwrap();
        let buf_v = Tensor::from_vec(
            common::rand_vec(kvh * cap * d, seed + 2),
            (1, kvh, cap, d),
            &dev,
        )
        .unwrap();
        for dtype in [DType::F32, DType::F16] {
            // A cache view: the first n rows of a larger buffer (strided).
            let k = buf_k.to_dtype(dtype).unwrap().narrow(2, 0, n).unwrap();
            let v = buf_v.to_dtype(dtype).unwrap().narrow(2, 0, n).unwrap();
            let q = q.to_dtype(dtype).unwrap();
            let rows: Vec<u32> = (0..n as u32)
                .filter(|j| (j * 5 + seed as u32) % 3 != 0)
                .collect();
            let scale = 1.0 / (d as f64).sqrt();
            let want = gathered_decode_attention(&q, &k, &v, &rows, scale).unwrap();
            let got = sparse_decode_attention(&q, &k, &v, &rows, scale).unwrap();
            assert_eq!(common::max_abs_diff(&got, &want), 0.0, "{dtype:?} n {n}");
            // Two sources: prompt rows 0..p (selected) and generated rows p..n.
            let p = n - n / 4;
            let (sel, tail): (Vec<u32>, Vec<u32>) = rows.iter().partition(|&&r| (r as usize) < p);
            let tail_rows: Vec<u32> = tail.iter().map(|r| r - p as u32).collect();
            let (kp, vp) = (k.narrow(2, 0, p).unwrap(), v.narrow(2, 0, p).unwrap());
            let (kt, vt) = (
                k.narrow(2, p, n - p).unwrap(),
                v.narrow(2, p, n - p).unwrap(),
            );
            let two = indexed_decode_attention(
                &q,
                &[(&kp, &vp, sel.as_slice()), (&kt, &vt, tail_rows.as_slice())],
                scale,
            )
            .unwrap();
            assert_eq!(
                common::max_abs_diff(&two, &want),
                0.0,
                "two parts, {dtype:?} n {n}"
            );
        }
    }
    // Rows beyond a source are refused, not read.
    let k = Tensor::zeros((1, 1, 4, 8), DType::F32, &dev).unwrap();
    let q = Tensor::zeros((1, 1, 1, 8), DType::F32, &dev).unwrap();
    let err = sparse_decode_attention(&q, &k, &k, &[0, 4], 1.0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("row 4"), "{err}");
}

fn tiny(config: serde_json::Value) -> LlamaOmniKv {
    common::tiny_llama(Arc::new(OmniKvBackend::new(
        OmniKvConfig::from_value(&config).unwrap(),
    )))
}

/// Greedy-free decode: feed `ids[prompt..]` one by one after a prompt pass,
/// with the host's prompt lengths and sequence id 0 in scope; returns every
/// step's logits.
fn decode(model: &LlamaOmniKv, ids: &[u32], prompt: usize) -> Vec<Vec<f32>> {
    decode_as(model, 0, ids, prompt)
}

/// [`decode`] as host sequence `seq`.
fn decode_as(model: &LlamaOmniKv, seq: usize, ids: &[u32], prompt: usize) -> Vec<Vec<f32>> {
    model.reset_cache();
    let dev = Device::Cpu;
    let _scope = ForwardScope::enter(vec![prompt]);
    let _ids = SequenceIdsScope::enter(vec![seq]);
    let x = Tensor::new(&ids[..prompt], &dev)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut out = vec![model
        .forward(&x, &[0], vec![(prompt - 1, 1)])
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()];
    for (pos, &id) in ids.iter().enumerate().skip(prompt) {
        let x = Tensor::new(&[id], &dev).unwrap().unsqueeze(0).unwrap();
        out.push(
            model
                .forward(&x, &[pos], vec![(0, 1)])
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap(),
        );
    }
    out
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0f32, f32::max)
}

const IDS: [u32; 40] = [
    5, 17, 33, 200, 7, 9, 81, 120, 44, 45, 46, 250, 3, 99, 101, 18, 64, 65, 66, 70, 12, 13, 140,
    141, 150, 160, 170, 180, 190, 210, 220, 230, 240, 6, 8, 10, 11, 14, 15, 16,
];

#[test]
fn full_budget_equals_dense_and_small_budget_differs() {
    for selector in ["last", "softmax_before_last", "uniform", "exp"] {
        let full = tiny(
            serde_json::json!({"do_select_layers": "0", "num_wait_load_layers": 0, "num_of_selected_tokens": 1.0, "selector_cls": selector, "window_size": 4}),
        );
        let small = tiny(
            serde_json::json!({"do_select_layers": "0", "num_wait_load_layers": 0, "num_of_selected_tokens": 3, "selector_cls": selector, "window_size": 4}),
        );
        let dense = {
            let m =
                tiny(serde_json::json!({"do_select_layers": "1", "num_of_selected_tokens": 1.0}));
            // Layer 1 as the only filter layer: nothing is sparse.
            decode(&m, &IDS, 30)
        };
        let d_full = max_diff(&decode(&full, &IDS, 30), &dense);
        assert_eq!(
            d_full, 0.0,
            "{selector}: 100% budget must equal dense decoding exactly"
        );
        let d_small = max_diff(&decode(&small, &IDS, 30), &dense);
        assert!(
            d_small > 1e-3,
            "{selector}: a 3-token budget should change the logits (diff {d_small})"
        );
    }
}

fn snapshot(model: &LlamaOmniKv) -> Vec<(Tensor, Tensor)> {
    CustomTextModel::cache(model)
        .normal()
        .0
        .iter()
        .map(|kv| (kv.k().unwrap().unwrap(), kv.v().unwrap().unwrap()))
        .collect()
}

/// Prefill `ids[..prompt]`, then decode `ids[prompt..upto]`; returns the cache
/// and the logits of one more decode step with `ids[upto]`.
fn run_to(
    model: &LlamaOmniKv,
    seq: usize,
    ids: &[u32],
    prompt: usize,
    upto: usize,
) -> (Vec<(Tensor, Tensor)>, Vec<f32>) {
    let all = decode_as(model, seq, &ids[..upto], prompt);
    let _ = all;
    let cache = snapshot(model);
    let _scope = ForwardScope::enter(vec![prompt]);
    let _ids = SequenceIdsScope::enter(vec![seq]);
    let x = Tensor::new(&[ids[upto]], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model
        .forward(&x, &[upto], vec![(0, 1)])
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    (cache, logits)
}

#[test]
fn batched_decode_equals_single_sequences() {
    // Two sequences with the same cache length but different prompt lengths
    // (so different selections) decode in one batch exactly as they do alone.
    for (selector, per_kv_head) in [
        ("last", false),
        ("uniform", false),
        ("exp", false),
        ("last", true),
    ] {
        let model = tiny(
            serde_json::json!({"do_select_layers": "0", "num_wait_load_layers": 0, "num_of_selected_tokens": 0.25, "selector_cls": selector, "window_size": 4, "selection_per_kv_head": per_kv_head}),
        );
        let a: Vec<u32> = IDS[..34].to_vec();
        let b: Vec<u32> = IDS[6..40].to_vec();
        let (cache_a, solo_a) = run_to(&model, 1, &a, 30, 33);
        let (cache_b, solo_b) = run_to(&model, 2, &b, 33, 33);
        {
            let mut c = CustomTextModel::cache(&model).normal();
            for (kv, ((ka, va), (kb, vb))) in c.0.iter_mut().zip(cache_a.iter().zip(&cache_b)) {
                kv.reset();
                kv.append(
                    &Tensor::cat(&[ka, kb], 0).unwrap(),
                    &Tensor::cat(&[va, vb], 0).unwrap(),
                )
                .unwrap();
            }
        }
        let _scope = ForwardScope::enter(vec![30, 33]);
        let _ids = SequenceIdsScope::enter(vec![1, 2]);
        let x = Tensor::new(&[[a[33]], [b[33]]], &Device::Cpu).unwrap();
        let both: Vec<Vec<Vec<f32>>> = model
            .forward(&x, &[33, 33], vec![(0, 1), (0, 1)])
            .unwrap()
            .to_vec3()
            .unwrap();
        let da = max_diff(&both[0], &[solo_a.clone()]);
        let db = max_diff(&both[1], &[solo_b.clone()]);
        assert!(
            da < 1e-4 && db < 1e-4,
            "{selector}: batched vs alone differ by {da} / {db}"
        );
    }
}

#[test]
fn recomputed_sequence_replays_its_decode_steps() {
    // The host may re-run prompt + generated tokens as one prompt pass; the
    // model must end up with the logits the sequence had when decoding.
    let model = tiny(
        serde_json::json!({"do_select_layers": "0", "num_wait_load_layers": 0, "num_of_selected_tokens": 3}),
    );
    let stepwise = decode(&model, &IDS[..37], 30);
    model.reset_cache();
    let _scope = ForwardScope::enter(vec![30]);
    let _ids = SequenceIdsScope::enter(vec![0]);
    let x = Tensor::new(&IDS[..37], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let replayed: Vec<f32> = model
        .forward(&x, &[0], vec![(36, 1)])
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(max_diff(&[replayed], &stepwise[stepwise.len() - 1..]), 0.0);
}

#[test]
fn prompts_below_min_prompt_len_decode_densely() {
    let cfg = |min: usize| serde_json::json!({"do_select_layers": "0", "num_wait_load_layers": 0, "num_of_selected_tokens": 3, "min_prompt_len": min});
    let dense = decode(
        &tiny(serde_json::json!({"do_select_layers": "1", "num_of_selected_tokens": 1.0})),
        &IDS,
        30,
    );
    assert_eq!(
        max_diff(&decode(&tiny(cfg(31)), &IDS, 30), &dense),
        0.0,
        "30-token prompt below 31 must be dense"
    );
    assert!(
        max_diff(&decode(&tiny(cfg(30)), &IDS, 30), &dense) > 1e-3,
        "30-token prompt at 30 is sparse"
    );
}

#[test]
fn min_selected_tokens_floors_the_configured_budget() {
    let cfg = |floor: usize| serde_json::json!({"do_select_layers": "0", "num_wait_load_layers": 0, "num_of_selected_tokens": 3, "min_selected_tokens": floor});
    let dense = decode(
        &tiny(serde_json::json!({"do_select_layers": "1", "num_of_selected_tokens": 1.0})),
        &IDS,
        30,
    );
    let three = decode(&tiny(cfg(0)), &IDS, 30);
    assert!(max_diff(&three, &dense) > 1e-3, "3 of 30 rows is sparse");
    // A floor above the prompt reads it whole: dense decoding exactly.
    assert_eq!(max_diff(&decode(&tiny(cfg(64)), &IDS, 30), &dense), 0.0);
    // A floor below the budget changes nothing.
    assert_eq!(max_diff(&decode(&tiny(cfg(2)), &IDS, 30), &three), 0.0);
    // In between, more rows than the budget: neither of the two.
    let twelve = decode(&tiny(cfg(12)), &IDS, 30);
    assert!(max_diff(&twelve, &dense) > 0.0 && max_diff(&twelve, &three) > 0.0);
}

#[test]
fn keeping_sinks_and_recent_tokens() {
    let dev = Device::Cpu;
    let (h, d, p) = (4, 8, 60);
    let q = Tensor::from_slice(&common::rand_vec(h * d, 11), (1, h, d), &dev).unwrap();
    let k = Tensor::from_slice(&common::rand_vec(2 * p * d, 12), (2, p, d), &dev).unwrap();
    let last = make_selector(SelectorKind::Last, 16);
    let scores: Vec<f32> = last.scores(&q, &k, 0.3).unwrap().to_vec1().unwrap();
    for (sink, recent, budget) in [
        (0, 0, 10),
        (4, 0, 10),
        (0, 8, 10),
        (4, 8, 20),
        (4, 8, 12),
        (4, 8, 5),
        (30, 30, 10),
    ] {
        let got = select_keeping(&*last, &q, &k, 0.3, budget, 1, Keep { sink, recent }).unwrap();
        // Plain reference: sinks, recent tail, best of the middle by a full sort.
        let tail = recent.min(p);
        let sink_n = sink.min(p - tail);
        let mut want: Vec<u32> = (0..sink_n as u32).collect();
        if sink_n + tail < p {
            let mut mid: Vec<usize> = (sink_n..p - tail).collect();
            mid.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
            let take = budget.saturating_sub(sink_n + tail).max(1);
            let mut best: Vec<u32> = mid[..take.min(mid.len())]
                .iter()
                .map(|&j| j as u32)
                .collect();
            best.sort();
            want.extend(best);
        }
        want.extend((p - tail) as u32..p as u32);
        assert_eq!(got, want, "sink {sink} recent {recent} budget {budget}");
    }
    // No kept tokens: exactly the published selection.
    assert_eq!(
        select_keeping(&*last, &q, &k, 0.3, 9, 1, Keep::default()).unwrap(),
        select(&*last, &q, &k, 0.3, 9, 1).unwrap()
    );
}

/// Plain reference of the mean-over-heads softmax mass of one query.
fn reference_mass(
    q: &[f32],
    k: &[f32],
    h: usize,
    kv_h: usize,
    n: usize,
    d: usize,
    scale: f64,
) -> Vec<f64> {
    let g = h / kv_h;
    let mut mass = vec![0f64; n];
    for hi in 0..h {
        let kh = hi / g;
        let logits: Vec<f64> = (0..n)
            .map(|j| {
                (0..d)
                    .map(|x| q[hi * d + x] as f64 * k[(kh * n + j) * d + x] as f64)
                    .sum::<f64>()
                    * scale
            })
            .collect();
        let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = logits.iter().map(|l| (l - max).exp()).sum();
        for (m, l) in mass.iter_mut().zip(&logits) {
            *m += (l - max).exp() / sum / h as f64;
        }
    }
    mass
}

#[test]
fn mass_budget_keeps_the_fewest_rows_covering_the_target() {
    use omnikv_backend::omnikv::selector::mass_capped;
    let (h, kv_h, d, n, p) = (6, 2, 8, 50, 40);
    let dev = Device::Cpu;
    for seed in 0..6u32 {
        // Sharper logits for some seeds, so the mass concentrates.
        let sharp = 1.0 + seed as f32;
        let qv: Vec<f32> = common::rand_vec(h * d, seed as u64)
            .iter()
            .map(|x| x * sharp)
            .collect();
        let kv = common::rand_vec(kv_h * n * d, seed as u64 + 100);
        let q = Tensor::from_vec(qv.clone(), (h, d), &dev).unwrap();
        let k = Tensor::from_vec(kv.clone(), (kv_h, n, d), &dev).unwrap();
        let scale = 1.0 / (d as f64).sqrt();
        let mass = reference_mass(&qv, &kv, h, kv_h, n, d, scale);
        let sel: Vec<u32> = (0..p as u32).filter(|j| j % 3 != 1).collect();
        let keep = Keep { sink: 2, recent: 3 };
        for target in [0.3, 0.6, 0.9, 1.0] {
            let got = mass_capped(&sel, &q, &k, p, scale, target, keep).unwrap();
            assert!(got.windows(2).all(|w| w[0] < w[1]), "ascending");
            assert!(
                got.iter().all(|j| sel.contains(j)),
                "a subset of the selection"
            );
            for j in [0u32, 1, 37, 38, 39].iter().filter(|j| sel.contains(j)) {
                assert!(got.contains(j), "sink and recent positions stay: {j}");
            }
            let cover = |set: &[u32]| -> f64 {
                mass[p..].iter().sum::<f64>() + set.iter().map(|&j| mass[j as usize]).sum::<f64>()
            };
            let all = cover(&sel);
            if all >= target + 1e-9 {
                assert!(
                    cover(&got) >= target - 1e-9,
                    "seed {seed} target {target}: covers {}",
                    cover(&got)
                );
                // Minimal: without its lightest free row it falls short.
                let free: Vec<u32> = got
                    .iter()
                    .copied()
                    .filter(|&j| j >= 2 && (j as usize) + 3 < p)
                    .collect();
                if let Some(&light) = free
                    .iter()
                    .min_by(|&&a, &&b| mass[a as usize].total_cmp(&mass[b as usize]))
                {
                    let without: Vec<u32> = got.iter().copied().filter(|&j| j != light).collect();
                    assert!(
                        cover(&without) < target + 1e-6,
                        "seed {seed} target {target}: {} rows where fewer cover it",
                        got.len()
                    );
                }
            } else {
                assert_eq!(
                    got, sel,
                    "a target above what the selection holds keeps it whole"
                );
            }
        }
    }
}

#[test]
fn mass_budget_of_everything_is_dense_and_a_low_one_differs() {
    let cfg = |mass: f64| {
        serde_json::json!({"do_select_layers": "0", "num_wait_load_layers": 0,
            "num_of_selected_tokens": 1.0, "selection_mass": mass})
    };
    let dense = decode(
        &tiny(serde_json::json!({"do_select_layers": "1", "num_of_selected_tokens": 1.0})),
        &IDS,
        30,
    );
    assert_eq!(max_diff(&decode(&tiny(cfg(1.0)), &IDS, 30), &dense), 0.0);
    let low = max_diff(&decode(&tiny(cfg(0.3)), &IDS, 30), &dense);
    assert!(
        low > 1e-4,
        "30% of the mass should change the logits ({low})"
    );
    let e = OmniKvConfig::from_value(&cfg(1.5)).unwrap_err().to_string();
    assert!(e.contains("selection_mass"), "{e}");
}

/// One selection per KV head: KV head `j` keeps the top-k of the max over
/// its own query group's scaled logits (a plain reference), the same `k`
/// per head; with one KV head it is the shared selection.
#[test]
fn per_kv_head_selection_ranks_by_each_query_group() {
    let dev = Device::Cpu;
    let mut heads_differ = false;
    for (kvh, g, d, n, p, k, seed) in [
        (2, 2, 16, 40, 37, 5, 1u64),
        (3, 3, 64, 100, 90, 10, 2),
        (1, 4, 8, 20, 20, 4, 3),
    ] {
        let h = kvh * g;
        let qv = common::rand_vec(h * d, seed);
        let kv = common::rand_vec(kvh * n * d, seed + 10);
        let q = Tensor::from_slice(&qv, (1, h, d), &dev).unwrap();
        let keys = Tensor::from_slice(&kv, (kvh, n, d), &dev).unwrap();
        let scale = 1.0 / (d as f64).sqrt();
        let got = select_per_kv_head(&Last, &q, &keys, p, scale, k, n - p, Keep::default(), None)
            .unwrap();
        let Selection::PerKvHead(sets) = &got else {
            panic!("expected one set per KV head, got {got:?}");
        };
        assert_eq!(sets.len(), kvh);
        for (j, set) in sets.iter().enumerate() {
            let scores: Vec<f32> = (0..p)
                .map(|pos| {
                    (j * g..(j + 1) * g)
                        .map(|head| {
                            (0..d)
                                .map(|x| qv[head * d + x] * kv[(j * n + pos) * d + x])
                                .sum::<f32>()
                                * scale as f32
                        })
                        .fold(f32::NEG_INFINITY, f32::max)
                })
                .collect();
            assert_eq!(set, &naive_top_k(&scores, k), "KV head {j} of {kvh}");
            assert_eq!(got.for_kv_head(j), set.as_slice());
        }
        heads_differ |= sets.windows(2).any(|w| w[0] != w[1]);
        assert_eq!(got.rows_per_kv_head(), k as f64);
        if kvh == 1 {
            let shared =
                select(&Last, &q, &keys.narrow(1, 0, p).unwrap(), scale, k, n - p).unwrap();
            assert_eq!(sets[0], shared, "one KV head: the shared selection");
        }
    }
    assert!(heads_differ, "the cases must give KV heads different sets");
}

/// Per-KV-head sparse attention: each head attends its own KV head's set
/// plus the generated rows; checked against full attention with -inf on
/// the rows that head does not attend.
#[test]
fn per_kv_head_sparse_attention_matches_masked_full_attention() {
    let dev = Device::Cpu;
    for (kvh, g, d, p, n, seed) in [(2, 2, 16, 30, 34, 1u64), (3, 3, 64, 50, 60, 2)] {
        let h = kvh * g;
        let q = common::rand_vec(h * d, seed);
        let k = common::rand_vec(kvh * n * d, seed + 10);
        let v = common::rand_vec(kvh * n * d, seed + 20);
        let sets: Vec<Vec<u32>> = (0..kvh as u32)
            .map(|j| (0..p as u32).filter(|x| (x + j) % (j + 2) == 0).collect())
            .collect();
        let scale = 1.0 / (d as f32).sqrt();
        let qt = Tensor::from_slice(&q, (1, h, 1, d), &dev).unwrap();
        let kt = Tensor::from_slice(&k, (1, kvh, n, d), &dev).unwrap();
        let vt = Tensor::from_slice(&v, (1, kvh, n, d), &dev).unwrap();
        let got: Vec<f32> =
            sparse_decode_attention_per_kv_head(&qt, &kt, &vt, &sets, p, scale as f64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
        // Head i attends its KV head's set plus the generated rows.
        let rows_of = |head: usize| attended_rows(&sets[head / g], p, n);
        assert_masked_attention(&got, (&q, &k, &v), (h, g, n, d), scale, &rows_of);
    }
    let q = Tensor::zeros((1, 4, 1, 8), DType::F32, &dev).unwrap();
    let k = Tensor::zeros((1, 2, 5, 8), DType::F32, &dev).unwrap();
    let err = sparse_decode_attention_per_kv_head(&q, &k, &k, &[vec![0]], 5, 1.0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("1 row sets for 2 KV heads"), "{err}");
}

/// `selection_per_kv_head` end to end on the tiny model: at a full budget
/// (also with a mass target of 1.0) it is dense decoding bit for bit; at 3
/// tokens it differs from dense decoding and from the shared selection of
/// the same budget; with `real_offload` the config is refused, and so is
/// tensor parallelism.
#[test]
fn per_kv_head_selection_in_the_backend() {
    let cfg = |budget: serde_json::Value, per_kv_head: bool| {
        serde_json::json!({"do_select_layers": "0", "num_wait_load_layers": 0,
            "num_of_selected_tokens": budget, "selection_per_kv_head": per_kv_head})
    };
    let dense = decode(
        &tiny(serde_json::json!({"do_select_layers": "1", "num_of_selected_tokens": 1.0})),
        &IDS,
        30,
    );
    assert_eq!(
        max_diff(&decode(&tiny(cfg(1.0.into(), true)), &IDS, 30), &dense),
        0.0
    );
    let mut by_mass = cfg(1.0.into(), true);
    by_mass["selection_mass"] = 1.0.into();
    assert_eq!(max_diff(&decode(&tiny(by_mass), &IDS, 30), &dense), 0.0);
    let per_head = decode(&tiny(cfg(3.into(), true)), &IDS, 30);
    let shared = decode(&tiny(cfg(3.into(), false)), &IDS, 30);
    let from_dense = max_diff(&per_head, &dense);
    let from_shared = max_diff(&per_head, &shared);
    assert!(
        from_dense > 1e-3,
        "3 rows per KV head should change the logits ({from_dense})"
    );
    assert!(
        from_shared > 1e-4,
        "per-KV-head sets should differ from the shared set ({from_shared})"
    );
    let mut offload = cfg(3.into(), true);
    offload["real_offload"] = true.into();
    let e = OmniKvConfig::from_value(&offload).unwrap_err().to_string();
    assert!(
        e.contains("selection_per_kv_head") && e.contains("real_offload"),
        "{e}"
    );
    // Not across tensor-parallel ranks (yet): refused before the ranks connect.
    let backend = OmniKvBackend::new(OmniKvConfig::from_value(&cfg(3.into(), true)).unwrap());
    let e = backend.check_tensor_parallel().unwrap_err().to_string();
    assert!(e.contains("selection_per_kv_head"), "{e}");
}
