//! `llama_omnikv` against transformers' logits for tiny random Llama-3 and
//! Llama-3.1 (llama3 rope scaling) checkpoints, loaded from safetensors and
//! from GGUF (where the scaling travels as `rope_freqs.weight`).
//! Fixtures: `scripts/make_tiny_llama_fixtures.py`.
//!
//! Tolerance: |ours - reference| <= 1e-3 + 1e-3 * |reference| per logit
//! (float32 on both sides; the difference is summation order).

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::max_abs_diff;
use mistralrs_core::kv_backend::{DefaultKvCacheBackend, KvCacheBackend};
use omnikv_backend::model::{llama3_inv_freq, LlamaConfig, LlamaOmniKv};
use omnikv_backend::{OmniKvBackend, OmniKvConfig};

const ATOL: f32 = 1e-3;

const RTOL: f32 = 1e-3;

fn fixture(variant: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(variant)
}

struct Reference {
    ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

fn reference(variant: &str) -> Reference {
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture(variant).join("reference.json")).unwrap(),
    )
    .unwrap();
    Reference {
        ids: v["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect(),
        logits: v["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect()
            })
            .collect(),
    }
}

fn omnikv() -> Arc<dyn KvCacheBackend> {
    Arc::new(OmniKvBackend::new(OmniKvConfig::full_budget()))
}

fn load_gguf(variant: &str, file: &str) -> LlamaOmniKv {
    LlamaOmniKv::load_gguf(
        &[fixture(variant).join(file)],
        DType::F32,
        &Device::Cpu,
        omnikv(),
    )
    .unwrap()
}

/// Largest violation of the tolerance (<= 0 means within tolerance) and the
/// largest absolute difference.
fn compare(got: &[f32], want: &[f32]) -> (f32, f32) {
    assert_eq!(got.len(), want.len());
    let mut worst = f32::NEG_INFINITY;
    let mut max_abs = 0f32;
    for (g, w) in got.iter().zip(want) {
        let d = (g - w).abs();
        max_abs = max_abs.max(d);
        worst = worst.max(d - (ATOL + RTOL * w.abs()));
    }
    (worst, max_abs)
}

/// Prefill the first `split` tokens, then decode the rest one at a time
/// through the KV cache; return logits for every position.
fn run(model: &LlamaOmniKv, ids: &[u32], split: usize) -> Vec<Vec<f32>> {
    model.reset_cache();
    let dev = Device::Cpu;
    let prompt = Tensor::new(&ids[..split], &dev)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model.forward(&prompt, &[0], vec![(0, split)]).unwrap();
    let mut rows: Vec<Vec<f32>> = logits.squeeze(0).unwrap().to_vec2().unwrap();
    for (pos, &id) in ids.iter().enumerate().skip(split) {
        let x = Tensor::new(&[id], &dev).unwrap().unsqueeze(0).unwrap();
        let l = model.forward(&x, &[pos], vec![(0, 1)]).unwrap();
        rows.push(l.flatten_all().unwrap().to_vec1().unwrap());
    }
    rows
}

fn assert_matches(name: &str, rows: &[Vec<f32>], r: &Reference) {
    assert_eq!(rows.len(), r.logits.len());
    for (pos, (got, want)) in rows.iter().zip(&r.logits).enumerate() {
        let (worst, max_abs) = compare(got, want);
        assert!(
            worst <= 0.0,
            "{name}: position {pos} off by up to {max_abs}"
        );
    }
}

#[test]
fn hf_checkpoints_match_transformers() {
    for variant in ["tiny-llama3", "tiny-llama31"] {
        let r = reference(variant);
        let model = common::tiny_fixture(variant, omnikv());
        // Whole sequence as one prefill, and prefill + cached decode steps.
        assert_matches(
            &format!("{variant} prefill"),
            &run(&model, &r.ids, r.ids.len()),
            &r,
        );
        assert_matches(
            &format!("{variant} prefill+decode"),
            &run(&model, &r.ids, 24),
            &r,
        );
    }
}

#[test]
fn gguf_files_match_transformers() {
    for variant in ["tiny-llama3", "tiny-llama31"] {
        let r = reference(variant);
        let model = load_gguf(variant, "model.gguf");
        assert_matches(&format!("{variant} gguf"), &run(&model, &r.ids, 24), &r);
    }
}

#[test]
fn gguf_rope_freqs_are_honoured() {
    // The same Llama-3.1 weights without `rope_freqs.weight` must not match:
    // this is what stock mistral.rs 0.8.1 computed for Llama-3.1 GGUF files.
    let r = reference("tiny-llama31");
    let model = load_gguf("tiny-llama31", "model-no-rope-freqs.gguf");
    let rows = run(&model, &r.ids, r.ids.len());
    let max_abs = rows
        .iter()
        .zip(&r.logits)
        .map(|(g, w)| compare(g, w).1)
        .fold(0f32, f32::max);
    assert!(
        max_abs > 0.05,
        "dropping rope_freqs changed logits by only {max_abs}"
    );
}

#[test]
fn host_gguf_rope_uses_freq_factors() {
    // The host patch builds GGUF Llama's rotary tables with rope_freqs; they
    // must equal llama3 scaling computed from the HF config.
    let dir = fixture("tiny-llama31");
    let cfg = LlamaConfig::from_hf_json(&std::fs::read_to_string(dir.join("config.json")).unwrap())
        .unwrap();
    let scaling = cfg.rope_scaling.clone().expect("llama3 scaling");
    let hd = cfg.head_dim();
    let plain = llama3_inv_freq(cfg.rope_theta, hd, None);
    let scaled = llama3_inv_freq(cfg.rope_theta, hd, Some(&scaling));
    let factors: Vec<f32> = plain.iter().zip(&scaled).map(|(p, s)| p / s).collect();
    assert!(
        factors.iter().any(|f| (f - 1.0).abs() > 1e-3),
        "scaling must change some frequency"
    );
    let host = mistralrs_core::layers::RotaryEmbedding::new_with_freq_factors(
        cfg.rope_theta,
        hd,
        64,
        &Device::Cpu,
        false,
        DType::F32,
        Some(&factors),
    )
    .unwrap();
    let (cos, sin) = host.get_cos_sin().unwrap();
    let pos = Tensor::arange(0u32, 64, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .reshape((64, 1))
        .unwrap();
    let freqs = pos
        .matmul(
            &Tensor::new(scaled.as_slice(), &Device::Cpu)
                .unwrap()
                .reshape((1, hd / 2))
                .unwrap(),
        )
        .unwrap();
    let dc = max_abs_diff(&cos, &freqs.cos().unwrap());
    let ds = max_abs_diff(&sin, &freqs.sin().unwrap());
    assert!(
        dc < 1e-4 && ds < 1e-4,
        "host rotary tables off by {dc} / {ds}"
    );
    // Without factors the host keeps its old tables.
    let none = mistralrs_core::layers::RotaryEmbedding::new_with_freq_factors(
        cfg.rope_theta,
        hd,
        64,
        &Device::Cpu,
        false,
        DType::F32,
        None,
    )
    .unwrap();
    let old = mistralrs_core::layers::RotaryEmbedding::new(
        cfg.rope_theta,
        hd,
        64,
        &Device::Cpu,
        false,
        DType::F32,
    )
    .unwrap();
    let d = max_abs_diff(
        &none.get_cos_sin().unwrap().0,
        &old.get_cos_sin().unwrap().0,
    );
    assert_eq!(d, 0.0);
}

#[test]
fn own_attention_matches_host_sdpa() {
    // The same model through the host's stock attention (`default` backend)
    // and through this crate's attention gives the same logits, exactly.
    let r = reference("tiny-llama31");
    // The exact prefill: prompt passes with the fast one run the tiled
    // kernel whatever their length.
    let exact = OmniKvConfig::from_value(&serde_json::json!({
        "do_select_layers": "0",
        "num_of_selected_tokens": 1.0,
        "prefill": "exact",
    }))
    .unwrap();
    let ours = run(
        &common::tiny_fixture("tiny-llama31", Arc::new(OmniKvBackend::new(exact))),
        &r.ids,
        24,
    );
    let host = run(
        &common::tiny_fixture("tiny-llama31", Arc::new(DefaultKvCacheBackend)),
        &r.ids,
        24,
    );
    // The dense path keeps the host kernel's summation order: bit-identical.
    for (pos, (a, b)) in ours.iter().zip(&host).enumerate() {
        let (_, max_abs) = compare(a, b);
        assert_eq!(
            max_abs, 0.0,
            "position {pos}: own attention vs host Sdpa off by {max_abs}"
        );
    }
}

#[test]
fn batched_prefill_matches_single_sequences() {
    let r = reference("tiny-llama3");
    let model = common::tiny_fixture("tiny-llama3", omnikv());
    let dev = Device::Cpu;
    let a = &r.ids[..20];
    let b = &r.ids[20..40];
    let batch = Tensor::stack(
        &[Tensor::new(a, &dev).unwrap(), Tensor::new(b, &dev).unwrap()],
        0,
    )
    .unwrap();
    model.reset_cache();
    let both: Vec<Vec<Vec<f32>>> = model
        .forward(&batch, &[0, 0], vec![(0, 20), (0, 20)])
        .unwrap()
        .to_vec3()
        .unwrap();
    for (i, ids) in [a, b].into_iter().enumerate() {
        model.reset_cache();
        let x = Tensor::new(ids, &dev).unwrap().unsqueeze(0).unwrap();
        let single: Vec<Vec<f32>> = model
            .forward(&x, &[0], vec![(0, 20)])
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        for (pos, (g, w)) in both[i].iter().zip(&single).enumerate() {
            let (worst, max_abs) = compare(g, w);
            assert!(
                worst <= 0.0,
                "sequence {i} position {pos}: batched vs single off by {max_abs}"
            );
        }
    }
}

#[test]
fn config_reads_legacy_and_transformers5_rope_keys() {
    let legacy = LlamaConfig::from_hf_json(
        &std::fs::read_to_string(fixture("tiny-llama31").join("config.json")).unwrap(),
    )
    .unwrap();
    let mut v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("tiny-llama31").join("config.json")).unwrap(),
    )
    .unwrap();
    let obj = v.as_object_mut().unwrap();
    let mut params = obj.remove("rope_scaling").unwrap();
    params["rope_theta"] = obj.remove("rope_theta").unwrap();
    obj.insert("rope_parameters".into(), params);
    let v5 = LlamaConfig::from_hf_json(&v.to_string()).unwrap();
    assert_eq!(v5.rope_scaling, legacy.rope_scaling);
    assert_eq!(v5.rope_theta, legacy.rope_theta);
    let bad = v.to_string().replace("\"llama3\"", "\"yarn\"");
    let e = LlamaConfig::from_hf_json(&bad).unwrap_err().to_string();
    assert!(
        e.contains("rope scaling type `yarn` is not supported"),
        "{e}"
    );
}

/// The fast prefill (tiled attention, f32 weight copies) against the exact
/// one (the stock kernels' arithmetic) on a 150-token prompt, prefill logits
/// and the decode steps after it.
#[test]
fn fast_prefill_matches_exact_prefill() {
    let load = |prefill: &str| {
        let cfg = OmniKvConfig::from_value(&serde_json::json!({
            "do_select_layers": "0",
            "num_of_selected_tokens": 1.0,
            "prefill": prefill,
        }))
        .unwrap();
        LlamaOmniKv::load_gguf(
            &[fixture("tiny-llama31").join("model.gguf")],
            DType::F32,
            &Device::Cpu,
            Arc::new(OmniKvBackend::new(cfg)),
        )
        .unwrap()
    };
    let ids: Vec<u32> = (0..160u32).map(|i| (i * 37 + 11) % 256).collect();
    let split = 150;
    let fast = run(&load("fast"), &ids, split);
    let exact = run(&load("exact"), &ids, split);
    let mut worst = 0f32;
    for (f, e) in fast.iter().zip(&exact) {
        worst = worst.max(compare(f, e).1);
    }
    assert!(worst < 1e-4, "fast vs exact prefill: max |d| = {worst}");
}
