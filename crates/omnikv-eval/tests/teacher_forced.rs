//! The teacher-forced divergence instrument on the tiny random Llama-3.1
//! checkpoint: at a budget that keeps everything every variant is full
//! attention bit for bit (KL exactly 0, argmax always agrees); a budget of
//! one row diverges; a shared prefill gives the same figures as a prefill
//! of the variant's own.

use std::path::PathBuf;

use candle_core::DType;
use omnikv_eval::teacher_forced::{TeacherForced, TfVariant};

fn gguf() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../omnikv-backend/tests/fixtures/tiny-llama31/model.gguf")
}

/// Layer 0 selects for layer 1.
fn base() -> serde_json::Value {
    serde_json::json!({
        "do_select_layers": "0", "num_wait_load_layers": 0, "num_of_selected_tokens": 0.1
    })
}

/// Deterministic token ids below the tiny vocabulary (256).
fn document(n: usize) -> Vec<u32> {
    let mut x = 0x9e37_79b9u32;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x % 256
        })
        .collect()
}

fn variants(specs: &[&str]) -> Vec<TfVariant> {
    specs.iter().map(|s| TfVariant::parse(s).unwrap()).collect()
}

const PROMPT: usize = 96;
const STEPS: usize = 16;

#[test]
fn a_budget_of_everything_is_full_attention_exactly() {
    let mut tf = TeacherForced::new(&gguf(), DType::F32, &base(), true).unwrap();
    let ids = document(PROMPT + STEPS + 1);
    let specs = [
        "full",
        "omnikv@1.0",
        "h2o@1.0",
        "streaming@1.0",
        "snapkv@1.0",
        // A filter layer that keeps every row of a different config.
        "omnikv@1.0:selector_cls=softmax_before_last",
        // One selection per KV head, each keeping every row.
        "omnikv@1.0:selection_per_kv_head=true",
    ];
    let runs = tf.run(&ids, PROMPT, STEPS, &variants(&specs)).unwrap();
    assert_eq!(runs.len(), specs.len());
    for run in &runs {
        assert_eq!(run.steps.len(), STEPS, "{}", run.label);
        for (j, s) in run.steps.iter().enumerate() {
            assert_eq!(s.kl, 0.0, "{} step {j}: KL {}", run.label, s.kl);
            assert!(s.agree, "{} step {j}", run.label);
            assert_eq!(s.nll, s.nll_full, "{} step {j}", run.label);
            assert!(
                (s.rows_read - 1.0).abs() < 1e-12,
                "{} step {j}: read {} of the rows",
                run.label,
                s.rows_read
            );
        }
    }
    // OmniKV's probe saw the filter layer keep all of the mass.
    let mass = runs[1].steps[0]
        .mass
        .expect("omnikv reports the captured mass");
    assert!((mass - 1.0).abs() < 1e-9, "captured mass {mass}");
}

#[test]
fn one_row_diverges_and_reads_less() {
    let mut tf = TeacherForced::new(&gguf(), DType::F32, &base(), false).unwrap();
    let ids = document(PROMPT + STEPS + 1);
    // 0.001 of 96 rounds down to 0, clamped to one row.
    let specs = [
        "omnikv@0.001",
        "h2o@0.05:min_tokens=1",
        "streaming@0.05:min_tokens=1",
        "omnikv@0.001:selection_per_kv_head=true",
    ];
    let runs = tf.run(&ids, PROMPT, STEPS, &variants(&specs)).unwrap();
    for run in &runs {
        let kl: f64 = run.steps.iter().map(|s| s.kl).sum();
        assert!(kl > 0.0, "{}: KL {kl}", run.label);
        let read = run.steps[0].rows_read;
        assert!(read < 0.9, "{}: read {read} of the rows", run.label);
    }
    let mass = runs[0].steps[0].mass.unwrap();
    assert!(mass > 0.0 && mass < 1.0, "captured mass {mass}");
    // What the selection missed, by position, is the rest of the mass.
    let missed = runs[0].steps[0]
        .missed
        .expect("omnikv reports the missed mass");
    let rest = missed.start + missed.middle + missed.end;
    assert!(
        (rest - (1.0 - mass)).abs() < 1e-9,
        "missed {missed:?}, captured {mass}"
    );
    // Per KV head: one row per head, a different selection, same rows read.
    let (shared, per_head) = (&runs[0], &runs[3]);
    assert_ne!(shared.steps, per_head.steps);
    for (a, b) in shared.steps.iter().zip(&per_head.steps) {
        assert!(
            (a.rows_read - b.rows_read).abs() < 1e-12,
            "{} vs {}",
            a.rows_read,
            b.rows_read
        );
        assert!(b.margin >= 0.0 && b.margin == a.margin);
    }
    // Layer 1 is the only sparse layer; it reports what it kept.
    let layers = &runs[0].steps[0].layer_mass;
    assert_eq!(layers.len(), 1, "{layers:?}");
    assert!(
        layers[0].0 == 1 && layers[0].1 > 0.0 && layers[0].1 < 1.0,
        "{layers:?}"
    );
}

#[test]
fn the_shared_prefill_equals_a_prefill_of_its_own() {
    // The baselines start from a copy of a keep-everything instance's rows;
    // running a variant alone (its own watcher) or next to others with other
    // budgets gives the same figures, bit for bit.
    let ids = document(PROMPT + STEPS + 1);
    let mut tf = TeacherForced::new(&gguf(), DType::F32, &base(), false).unwrap();
    let together = tf
        .run(
            &ids,
            PROMPT,
            STEPS,
            &variants(&[
                "h2o@0.3",
                "h2o@0.1",
                "snapkv@0.3",
                "omnikv@0.2",
                "omnikv@0.1",
            ]),
        )
        .unwrap();
    for (i, spec) in [
        "h2o@0.3",
        "h2o@0.1",
        "snapkv@0.3",
        "omnikv@0.2",
        "omnikv@0.1",
    ]
    .iter()
    .enumerate()
    {
        let alone = tf.run(&ids, PROMPT, STEPS, &variants(&[spec])).unwrap();
        assert_eq!(alone[0].steps, together[i].steps, "{spec}");
    }
}

#[test]
fn bad_variants_are_refused_before_any_pass() {
    let mut tf = TeacherForced::new(&gguf(), DType::F32, &base(), false).unwrap();
    let ids = document(PROMPT + STEPS + 1);
    let mut err = |specs: &[&str]| {
        tf.run(&ids, PROMPT, STEPS, &variants(specs))
            .unwrap_err()
            .to_string()
    };
    let e = err(&["omnikv@0.1:selector_cls=exp"]);
    assert!(e.contains("window selectors"), "{e}");
    let e = err(&["full-exact-prefill"]);
    assert!(e.contains("exact_prefill"), "{e}");
    let e = err(&["omnikv@0.1:min_prompt_len=1000"]);
    assert!(e.contains("min_prompt_len"), "{e}");
    let e = tf
        .run(&document(50), PROMPT, STEPS, &variants(&["full"]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs 113 tokens"), "{e}");
    assert!(TfVariant::parse("nonsense@0.1").is_err());
}

#[test]
fn documents_differ_by_index_and_repeat_by_seed() {
    // Every index is its own document (indices 0 and 1 once shared a seed).
    use omnikv_eval::teacher_forced::{document, document_sources};
    let gguf = omnikv_eval::model_dir().join(omnikv_eval::MODEL_FILE);
    let tok = omnikv_eval::bench_format::gguf_tokenizer(&gguf).unwrap();
    let files = document_sources("code").unwrap();
    let docs: Vec<Vec<u32>> = (0..4)
        .map(|i| document(&tok, &files, "code", 7, i, 300).unwrap())
        .collect();
    for i in 0..docs.len() {
        assert_eq!(docs[i].len(), 300);
        for j in 0..i {
            assert_ne!(docs[i], docs[j], "documents {j} and {i} are the same");
        }
    }
    assert_eq!(docs[0], document(&tok, &files, "code", 7, 0, 300).unwrap());
    assert_ne!(docs[0], document(&tok, &files, "code", 8, 0, 300).unwrap());
}
