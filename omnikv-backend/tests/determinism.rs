//! Same request, same output, however the prompt pass is split: a prompt
//! computed in one pass, or in two passes split at any offset (what a host
//! prefix-cache hit or host prompt chunking does, down to a single remaining
//! token), gives bit-identical logits for the prompt's last position and for
//! every decode step after it. For each prefill kernel, with and without
//! offload, for a window selector and a token-dropping backend, on
//! the tiny Llama-3.1 as GGUF (projections with f32 copies for prompt
//! passes) and as safetensors (f32 weights).
//!
//! Not here: the host's `default` backend, whose stock attention computes a
//! one-token prompt pass on its decode path (2e-6 apart on this model); the
//! HTTP tests check its greedy answers instead.

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use mistralrs_core::kv_backend::{ForwardContext, ForwardScope, KvCacheBackend, SequenceIdsScope};
use omnikv_backend::{EvictingBackend, EvictionConfig, LlamaOmniKv, OmniKvBackend, OmniKvConfig};

const PROMPT: usize = 150;
const TOTAL: usize = 160;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny-llama31")
        .join(name)
}

fn gguf(backend: Arc<dyn KvCacheBackend>) -> LlamaOmniKv {
    LlamaOmniKv::load_gguf(&[fixture("model.gguf")], DType::F32, &Device::Cpu, backend).unwrap()
}

fn omnikv(extra: serde_json::Value) -> Arc<dyn KvCacheBackend> {
    let mut cfg = serde_json::json!({
        "do_select_layers": "0",
        "num_wait_load_layers": 0,
        "num_of_selected_tokens": 0.25,
    });
    for (k, v) in extra.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    Arc::new(OmniKvBackend::new(OmniKvConfig::from_value(&cfg).unwrap()))
}

/// A fresh host sequence id per run, so no backend state carries over.
fn next_seq() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(100);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The prompt in passes starting at `cuts` (0 first), then one decode step
/// per remaining token; the logits of the last prompt position and of every
/// decode step.
fn run(model: &LlamaOmniKv, ids: &[u32], cuts: &[usize]) -> Vec<Vec<f32>> {
    model.reset_cache();
    let _scope = ForwardScope::enter(vec![PROMPT]);
    let _ids = SequenceIdsScope::enter(vec![next_seq()]);
    let dev = Device::Cpu;
    let mut bounds = cuts.to_vec();
    bounds.push(PROMPT);
    let mut last = None;
    for w in bounds.windows(2) {
        let x = Tensor::new(&ids[w[0]..w[1]], &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        last = Some(
            model
                .forward(&x, &[w[0]], vec![(w[1] - w[0] - 1, 1)])
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        );
    }
    let mut out = vec![last.unwrap()];
    for (pos, &id) in ids.iter().enumerate().take(TOTAL).skip(PROMPT) {
        out.push(common::step_logits(model, &[id], pos, 0));
    }
    out
}

/// Bit-identical logits, step by step.
fn assert_same(label: &str, what: &str, got: &[Vec<f32>], cold: &[Vec<f32>]) {
    assert_eq!(got.len(), cold.len());
    for (step, (g, c)) in got.iter().zip(cold).enumerate() {
        let diff = g
            .iter()
            .zip(c)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert_eq!(
            diff, 0.0,
            "{label}: {what}, step {step}: logits differ by {diff}"
        );
    }
}

fn check(label: &str, model: &LlamaOmniKv) {
    let ids: Vec<u32> = (0..TOTAL as u32).map(|i| (i * 37 + 11) % 253 + 3).collect();
    let cold = run(model, &ids, &[0]);
    for split in [1, 10, 63, 64, 100, 128, PROMPT - 1] {
        let got = run(model, &ids, &[0, split]);
        assert_same(label, &format!("prompt split at {split}"), &got, &cold);
    }
    // Three passes, as host chunking after a prefix-cache hit could give.
    for cuts in [[0, 40, 149], [0, 40, 100], [0, 1, 2]] {
        let got = run(model, &ids, &cuts);
        assert_same(label, &format!("passes from {cuts:?}"), &got, &cold);
    }
}

/// The prompt in one pass, then one decode step per remaining token, called
/// with no forward context on this thread (as a direct caller of the model,
/// such as a test, has); every pass's last logits.
fn run_without_context(model: &LlamaOmniKv, ids: &[u32]) -> Vec<Vec<f32>> {
    model.reset_cache();
    let mut out = vec![common::step_logits(model, &ids[..PROMPT], 0, PROMPT - 1)];
    for (pos, &id) in ids.iter().enumerate().take(TOTAL).skip(PROMPT) {
        out.push(common::step_logits(model, &[id], pos, 0));
    }
    out
}

#[test]
fn a_pass_on_the_pool_sees_only_its_callers_context() {
    // The model runs each pass on a worker of rayon's global pool. A worker
    // waiting inside one request's pass can pick up another pass, so every
    // worker here is left as if inside another request (prompt lengths that
    // make each step a prompt pass, `kv_cache.enabled = false`, another
    // sequence id): a pass whose caller had no context must not see it.
    let model = gguf(omnikv(serde_json::json!({})));
    let ids: Vec<u32> = (0..TOTAL as u32).map(|i| (i * 41 + 5) % 251 + 3).collect();
    let clean = run_without_context(&model, &ids);
    rayon::broadcast(|_| {
        let options = Some(vec![Some(Arc::new(serde_json::json!({"enabled": false})))]);
        std::mem::forget(ForwardScope::enter_with_options(vec![4 * TOTAL], options));
        std::mem::forget(SequenceIdsScope::enter(vec![next_seq()]));
    });
    let with_foreign = run_without_context(&model, &ids);
    rayon::broadcast(|_| std::mem::forget(ForwardContext::default().enter()));
    assert_same(
        "omnikv",
        "another pass's context on the pool's workers",
        &with_foreign,
        &clean,
    );
}

#[test]
fn omnikv_fast_prefill_is_split_invariant() {
    check("omnikv fast", &gguf(omnikv(serde_json::json!({}))));
}

#[test]
fn omnikv_exact_prefill_is_split_invariant() {
    check(
        "omnikv exact",
        &gguf(omnikv(serde_json::json!({"prefill": "exact"}))),
    );
}

#[test]
fn omnikv_offload_is_split_invariant() {
    check(
        "omnikv offload",
        &gguf(omnikv(serde_json::json!({"real_offload": true}))),
    );
}

#[test]
fn window_selector_is_split_invariant() {
    check(
        "omnikv exp",
        &gguf(omnikv(
            serde_json::json!({"selector_cls": "exp", "window_size": 8}),
        )),
    );
}

#[test]
fn safetensors_model_is_split_invariant() {
    check(
        "omnikv safetensors",
        &common::tiny_llama(omnikv(serde_json::json!({}))),
    );
}

#[test]
fn h2o_is_split_invariant() {
    let h2o = EvictingBackend::new(
        EvictionConfig::from_value("h2o", Some(&serde_json::json!({"budget": 0.5}))).unwrap(),
    );
    check("h2o", &gguf(Arc::new(h2o)));
}
