//! The token-dropping baselines (`h2o`, `streaming`) against plain
//! references: the keep rule against a full sort, H2O's attention mass
//! against plain loops, and the whole backend on the tiny model against a
//! reference backend that keeps every row in the model cache and masks the
//! evicted ones out with a naive policy. Plus: nothing is evicted when the
//! budget covers everything (logits equal dense attention), memory really
//! shrinks and returns to zero, and bad configs are refused by name.

use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor};
use mistralrs_core::kv_backend::{
    AttentionInput, CustomTextModel, ForwardScope, ForwardState, KvCache, KvCacheBackend,
    SequenceIdsScope,
};
use omnikv_backend::baselines::{causal_attention_mass, rows_to_keep, EvictionPolicy};
use omnikv_backend::{EvictingBackend, EvictionConfig, OmniKvBackend, OmniKvConfig};

use crate::common::Lcg;

/// The keep rule written the slow, obvious way: sort everything.
fn naive_keep(policy: EvictionPolicy, pos: &[u32], mass: &[f32], cap: usize) -> Vec<u32> {
    let mut by_pos: Vec<usize> = (0..pos.len()).collect();
    by_pos.sort_by_key(|&r| pos[r]);
    if pos.len() <= cap {
        return by_pos.iter().map(|&r| pos[r]).collect();
    }
    let mut kept: Vec<u32> = match policy {
        EvictionPolicy::Streaming { sink_tokens } => {
            let sinks = sink_tokens.min(cap);
            let mut k: Vec<u32> = by_pos.iter().take(sinks).map(|&r| pos[r]).collect();
            k.extend(by_pos.iter().rev().take(cap - sinks).map(|&r| pos[r]));
            k
        }
        EvictionPolicy::H2o { heavy_ratio } => {
            let heavy = (cap as f64 * heavy_ratio).floor() as usize;
            let recent = cap - heavy;
            let mut k: Vec<u32> = by_pos.iter().rev().take(recent).map(|&r| pos[r]).collect();
            let mut older: Vec<usize> = by_pos[..pos.len() - recent].to_vec();
            // Heaviest first, earlier position first among equals.
            older.sort_by(|&a, &b| {
                mass[b]
                    .partial_cmp(&mass[a])
                    .unwrap()
                    .then(pos[a].cmp(&pos[b]))
            });
            k.extend(older.iter().take(heavy).map(|&r| pos[r]));
            k
        }
        EvictionPolicy::SnapKv { window, kernel } => {
            let window = window.min(cap);
            let older = &by_pos[..pos.len() - window];
            // avg_pool1d with zero padding, written out.
            let h = kernel as isize / 2;
            let pooled: Vec<f32> = (0..older.len() as isize)
                .map(|i| {
                    (i - h..=i + h)
                        .filter(|&j| j >= 0 && (j as usize) < older.len())
                        .map(|j| mass[older[j as usize]])
                        .sum::<f32>()
                        / kernel as f32
                })
                .collect();
            let mut order: Vec<usize> = (0..older.len()).collect();
            order.sort_by(|&a, &b| pooled[b].partial_cmp(&pooled[a]).unwrap().then(a.cmp(&b)));
            let mut k: Vec<u32> = order
                .iter()
                .take(cap - window)
                .map(|&i| pos[older[i]])
                .collect();
            k.extend(by_pos.iter().rev().take(window).map(|&r| pos[r]));
            k
        }
    };
    kept.sort();
    kept
}

#[test]
fn keep_rule_matches_a_full_sort() {
    let mut rng = Lcg(5);
    let policies = [
        EvictionPolicy::Streaming { sink_tokens: 4 },
        EvictionPolicy::Streaming { sink_tokens: 0 },
        EvictionPolicy::H2o { heavy_ratio: 0.5 },
        EvictionPolicy::H2o { heavy_ratio: 0.0 },
        EvictionPolicy::H2o { heavy_ratio: 1.0 },
        EvictionPolicy::H2o { heavy_ratio: 0.3 },
        EvictionPolicy::SnapKv {
            window: 4,
            kernel: 5,
        },
        EvictionPolicy::SnapKv {
            window: 1,
            kernel: 1,
        },
        EvictionPolicy::SnapKv {
            window: 8,
            kernel: 3,
        },
    ];
    for trial in 0..400 {
        let n = 1 + (rng.next() % 80) as usize;
        // Distinct positions in arbitrary order (rows get reordered by
        // swap-removal), masses with some ties.
        let mut pos: Vec<u32> = (0..n as u32).map(|p| p * 3 + (trial % 3)).collect();
        for i in (1..n).rev() {
            pos.swap(i, (rng.next() % (i as u64 + 1)) as usize);
        }
        let mass: Vec<f32> = (0..n).map(|_| (rng.next() % 7) as f32 * 0.25).collect();
        let cap = 1 + (rng.next() % 60) as usize;
        for policy in policies {
            let want = naive_keep(policy, &pos, &mass, cap);
            let got = match rows_to_keep(policy, &pos, &mass, cap) {
                None => {
                    assert!(
                        n <= cap,
                        "{policy:?}: nothing evicted from {n} rows at cap {cap}"
                    );
                    let mut all = pos.clone();
                    all.sort();
                    all
                }
                Some(keep) => {
                    assert_eq!(keep.len(), cap, "{policy:?}: keeps exactly the capacity");
                    let mut p: Vec<u32> = keep.iter().map(|&r| pos[r]).collect();
                    p.sort();
                    p
                }
            };
            assert_eq!(got, want, "{policy:?}, n {n}, cap {cap}");
        }
    }
}

#[test]
fn attention_mass_matches_plain_loops() {
    let mut rng = Lcg(11);
    for (h, kv_h, s, n, d) in [(4, 2, 5, 5, 8), (6, 2, 130, 150, 16), (2, 2, 1, 9, 4)] {
        let q: Vec<f32> = (0..h * s * d).map(|_| rng.f32()).collect();
        let k: Vec<f32> = (0..kv_h * n * d).map(|_| rng.f32()).collect();
        let scale = 1.0 / (d as f64).sqrt();
        let got = causal_attention_mass(
            &Tensor::from_vec(q.clone(), (h, s, d), &Device::Cpu).unwrap(),
            &Tensor::from_vec(k.clone(), (kv_h, n, d), &Device::Cpu).unwrap(),
            scale,
        )
        .unwrap();
        let g = h / kv_h;
        let past = n - s;
        let mut want = vec![0f64; kv_h * n];
        for hq in 0..h {
            let kvh = hq / g;
            for i in 0..s {
                let visible = past + i + 1;
                let scores: Vec<f64> = (0..visible)
                    .map(|j| {
                        (0..d)
                            .map(|x| {
                                q[(hq * s + i) * d + x] as f64 * k[(kvh * n + j) * d + x] as f64
                            })
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = scores.iter().map(|x| (x - max).exp()).sum();
                for (j, x) in scores.iter().enumerate() {
                    want[kvh * n + j] += (x - max).exp() / z;
                }
            }
        }
        for (a, b) in got.iter().zip(&want) {
            assert!(
                (*a as f64 - b).abs() < 1e-4,
                "mass {a} vs {b} (h {h}, s {s}, n {n})"
            );
        }
        // Every query hands out a total mass of one per query head.
        let total: f64 = want.iter().sum();
        assert!((total - (h * s) as f64).abs() < 1e-6);
    }
}

/// Reference backend: every row stays in the model cache; a per-head `alive`
/// mask marks the evicted ones; attention and masses are plain loops; the
/// keep rule is [`naive_keep`]. One sequence.
#[derive(Debug)]
struct Reference {
    policy: EvictionPolicy,
    cap: usize,
    state: Mutex<Vec<RefLayer>>,
}

#[derive(Debug, Default, Clone)]
struct RefLayer {
    alive: Vec<Vec<bool>>,
    mass: Vec<Vec<f32>>,
}

impl Reference {
    fn new(policy: EvictionPolicy, cap: usize) -> Self {
        Self {
            policy,
            cap,
            state: Mutex::new(vec![RefLayer::default(); 2]),
        }
    }
    fn evict(&self, l: &mut RefLayer) {
        for hh in 0..l.alive.len() {
            let rows: Vec<usize> = (0..l.alive[hh].len()).filter(|&r| l.alive[hh][r]).collect();
            let pos: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
            let mass: Vec<f32> = rows.iter().map(|&r| l.mass[hh][r]).collect();
            let keep = naive_keep(self.policy, &pos, &mass, self.cap);
            for r in rows {
                l.alive[hh][r] = keep.contains(&(r as u32));
            }
        }
    }
}

impl KvCacheBackend for Reference {
    fn name(&self) -> &str {
        "reference"
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn attention(
        &self,
        input: &AttentionInput<'_>,
        cache: &mut KvCache,
        _state: &mut ForwardState,
    ) -> candle_core::Result<Tensor> {
        let (k, v) = cache.append(input.k, input.v)?;
        let (_, h, s, d) = input.q.dims4()?;
        let (kv_h, n) = (k.dim(1)?, k.dim(2)?);
        let g = h / kv_h;
        let q: Vec<f32> = input.q.flatten_all()?.to_vec1()?;
        let k: Vec<f32> = k.flatten_all()?.to_vec1()?;
        let v: Vec<f32> = v.flatten_all()?.to_vec1()?;
        let prompt = mistralrs_core::kv_backend::current_prompt_lens().unwrap()[0];
        let scale = input.sdpa_params.softmax_scale as f64;
        let mut st = self.state.lock().unwrap();
        let l = &mut st[input.layer_idx];
        let past = n - s;
        if past == 0 {
            *l = RefLayer {
                alive: vec![Vec::new(); kv_h],
                mass: vec![Vec::new(); kv_h],
            };
        }
        let mut out = vec![0f32; h * s * d];
        for t in 0..s {
            let p = past + t;
            for kvh in 0..kv_h {
                l.alive[kvh].push(true);
                l.mass[kvh].push(0.0);
            }
            for hq in 0..h {
                let kvh = hq / g;
                let rows: Vec<usize> = (0..=p).filter(|&r| l.alive[kvh][r]).collect();
                let scores: Vec<f64> = rows
                    .iter()
                    .map(|&r| {
                        (0..d)
                            .map(|x| {
                                q[(hq * s + t) * d + x] as f64 * k[(kvh * n + r) * d + x] as f64
                            })
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = scores.iter().map(|x| (x - max).exp()).sum();
                let votes = match self.policy {
                    EvictionPolicy::SnapKv { window, .. } => p < prompt && p + window >= prompt,
                    _ => true,
                };
                for (&r, x) in rows.iter().zip(&scores) {
                    let w = (x - max).exp() / z;
                    if votes {
                        l.mass[kvh][r] += w as f32;
                    }
                    for x in 0..d {
                        out[(hq * s + t) * d + x] += (w * v[(kvh * n + r) * d + x] as f64) as f32;
                    }
                }
            }
            // Decode steps evict after every token (SnapKV: never); the
            // prompt once, at its end.
            let snap = matches!(self.policy, EvictionPolicy::SnapKv { .. });
            if p + 1 == prompt || (p + 1 > prompt && !snap) {
                self.evict(l);
            }
        }
        Tensor::from_vec(out, (1, h, s, d), input.q.device())
    }
}

use crate::common;
use common::{decode_steps as decode, tiny_llama as load, token_ids as ids};

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

fn evicting(name: &str, config: serde_json::Value) -> EvictingBackend {
    EvictingBackend::new(EvictionConfig::from_value(name, Some(&config)).unwrap())
}

#[test]
fn backends_equal_the_masked_reference_on_the_tiny_model() {
    // 30-token prompts take the exact prefill kernel, 90-token ones the tiled one.
    for (prompt, total) in [(30, 45), (90, 110)] {
        let toks = ids(total, 13);
        for (name, policy, extra) in [
            (
                "h2o",
                EvictionPolicy::H2o { heavy_ratio: 0.5 },
                serde_json::json!({}),
            ),
            (
                "h2o",
                EvictionPolicy::H2o { heavy_ratio: 0.75 },
                serde_json::json!({"heavy_ratio": 0.75}),
            ),
            (
                "streaming",
                EvictionPolicy::Streaming { sink_tokens: 4 },
                serde_json::json!({}),
            ),
            (
                "streaming",
                EvictionPolicy::Streaming { sink_tokens: 1 },
                serde_json::json!({"sink_tokens": 1}),
            ),
        ] {
            for cap in [8usize, 20] {
                let mut cfg = extra.clone();
                cfg["budget"] = cap.into();
                cfg["min_tokens"] = 2.into();
                let backend = evicting(name, cfg);
                // SnapKV's floor: its window plus `min_tokens` voted rows.
                let eff = backend.config().capacity(prompt).unwrap();
                let got = decode(&load(Arc::new(backend.clone())), 1, &toks, prompt);
                let want = decode(
                    &load(Arc::new(Reference::new(policy, eff))),
                    1,
                    &toks,
                    prompt,
                );
                let diff = max_diff(&got, &want);
                assert!(
                    diff < 2e-4,
                    "{name} {policy:?}, cap {cap}, prompt {prompt}: logits differ by {diff}"
                );
                // Memory: exactly the capacity per layer and KV head remains
                // (SnapKV: the compressed prompt plus every generated row).
                let held = backend.held();
                assert_eq!(held.len(), 1);
                let per_head = match policy {
                    EvictionPolicy::SnapKv { .. } => eff.min(prompt) + total - prompt,
                    _ => eff,
                };
                assert_eq!(
                    held[0].1.rows,
                    (per_head * 2 * 2) as u64,
                    "{name}: rows held"
                );
                assert_eq!(held[0].1.positions, total as u64);
                assert!(held[0].1.peak_rows >= (prompt * 2) as u64);
                backend.sequence_finished(1);
                assert!(backend.held().is_empty(), "released");
            }
        }
    }
}

#[test]
fn nothing_is_evicted_when_the_budget_covers_everything() {
    let toks = ids(80, 3);
    let dense = OmniKvBackend::new(
        OmniKvConfig::from_value(&serde_json::json!({
            "do_select_layers": "0", "num_wait_load_layers": 0, "num_of_selected_tokens": 1.0
        }))
        .unwrap(),
    );
    let want = decode(&load(Arc::new(dense)), 1, &toks, 70);
    for name in ["h2o", "streaming", "snapkv"] {
        for cfg in [
            serde_json::json!({"budget": 200}),
            serde_json::json!({"min_prompt_len": 71}),
            // The whole prompt: nothing goes, also while generating.
            serde_json::json!({"budget": 1.0}),
        ] {
            let backend = evicting(name, cfg.clone());
            let got = decode(&load(Arc::new(backend.clone())), 1, &toks, 70);
            // The dense kernel's arithmetic: equal bit for bit.
            let diff = max_diff(&got, &want);
            assert!(
                diff == 0.0,
                "{name} {cfg}: differs from dense attention by {diff}"
            );
            assert_eq!(backend.held()[0].1.rows, 80 * 2 * 2, "{name} {cfg}");
        }
    }
}

#[test]
fn rows_stay_out_of_the_model_cache_and_memory_shrinks() {
    let toks = ids(100, 9);
    let backend = evicting("h2o", serde_json::json!({"budget": 0.1, "min_tokens": 4}));
    let model = load(Arc::new(backend.clone()));
    decode(&model, 7, &toks, 90);
    let cache = CustomTextModel::cache(&model).normal();
    assert!(
        cache.0.iter().all(|c| c.k().unwrap().is_none()),
        "nothing in the model cache"
    );
    drop(cache);
    let held = backend.held()[0].1;
    // 10% of 90 = 9 rows per layer and head, 2 layers, 2 KV heads.
    assert_eq!(held.rows, 9 * 2 * 2);
    let full_bytes = 100 * 2 * 2 * 16 * 4 * 2; // positions x layers x heads x d x f32 x (k, v)
    assert!(held.bytes < full_bytes / 4, "{held:?}");
    assert!(held.peak_bytes >= held.bytes);
    // A second prompt on the same id starts over (the host re-ran it).
    decode(&model, 7, &toks[..50], 40);
    assert_eq!(backend.held()[0].1.positions, 50);
    backend.sequence_finished(7);
    assert!(backend.held().is_empty());
}

#[test]
fn batched_decode_equals_single_sequences() {
    let backend = evicting("h2o", serde_json::json!({"budget": 10, "min_tokens": 2}));
    let a = ids(60, 21);
    let b = ids(60, 22);
    let solo_a = decode(&load(Arc::new(backend.clone())), 1, &a, 50);
    let solo_b = decode(&load(Arc::new(backend.clone())), 2, &b, 50);
    backend.sequence_finished(1);
    backend.sequence_finished(2);
    // Both prompts one at a time, then the decode steps as a batch of two.
    let model = load(Arc::new(backend.clone()));
    for (seq, toks) in [(1usize, &a), (2, &b)] {
        let _scope = ForwardScope::enter(vec![50]);
        let _ids = SequenceIdsScope::enter(vec![seq]);
        model.reset_cache();
        let x = Tensor::new(&toks[..50], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        model.forward(&x, &[0], vec![(49, 1)]).unwrap();
    }
    let _scope = ForwardScope::enter(vec![50, 50]);
    let _ids = SequenceIdsScope::enter(vec![1, 2]);
    for pos in 50..60 {
        let x = Tensor::new(&[a[pos], b[pos]], &Device::Cpu)
            .unwrap()
            .unsqueeze(1)
            .unwrap();
        let out: Vec<Vec<f32>> = model
            .forward(&x, &[pos, pos], vec![(0, 1), (0, 1)])
            .unwrap()
            .squeeze(1)
            .unwrap()
            .to_vec2()
            .unwrap();
        let step = pos - 50 + 1;
        assert!(
            max_diff(&[out[0].clone()], &[solo_a[step].clone()]) < 1e-5,
            "sequence 1, position {pos}"
        );
        assert!(
            max_diff(&[out[1].clone()], &[solo_b[step].clone()]) < 1e-5,
            "sequence 2, position {pos}"
        );
    }
}

#[test]
fn bad_configs_are_refused_by_name() {
    for (name, cfg, expect) in [
        ("h2o", serde_json::json!({"budget": 0}), "`budget` = 0"),
        ("h2o", serde_json::json!({"budget": 1.5}), "`budget` = 1.5"),
        ("h2o", serde_json::json!({"budget": "10%"}), "`budget`"),
        (
            "h2o",
            serde_json::json!({"heavy_ratio": 2}),
            "`heavy_ratio` = 2",
        ),
        (
            "h2o",
            serde_json::json!({"sink_tokens": 4}),
            "unknown key `sink_tokens`",
        ),
        (
            "streaming",
            serde_json::json!({"heavy_ratio": 0.5}),
            "unknown key `heavy_ratio`",
        ),
        (
            "streaming",
            serde_json::json!({"min_tokens": 0}),
            "`min_tokens` = 0",
        ),
        (
            "streaming",
            serde_json::json!({"prefill": "slow"}),
            "`prefill`",
        ),
        (
            "streaming",
            serde_json::json!({"max_context_len": -1}),
            "`max_context_len`",
        ),
        (
            "streaming",
            serde_json::json!([1, 2]),
            "must be a JSON object",
        ),
    ] {
        let err = EvictionConfig::from_value(name, Some(&cfg))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(expect),
            "{name} {cfg}: `{err}` does not mention `{expect}`"
        );
    }
    // Two problems are reported together.
    let err = EvictionConfig::from_value("h2o", Some(&serde_json::json!({"budget": 0, "foo": 1})))
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("2 problems"), "{err}");
    let d = EvictionConfig::from_value("streaming", None).unwrap();
    assert_eq!(d.policy, EvictionPolicy::Streaming { sink_tokens: 4 });
    assert_eq!(d.capacity(1000), Some(100));
    assert_eq!(d.capacity(100), Some(32), "never below min_tokens");
    let sinks =
        EvictionConfig::from_value("streaming", Some(&serde_json::json!({"sink_tokens": 40})))
            .unwrap();
    assert_eq!(
        sinks.capacity(100),
        Some(41),
        "room for the sinks and one recent row"
    );
}

#[test]
fn an_adopted_prompt_equals_a_prompt_pass_of_its_own() {
    // One keep-everything prefill per policy serves every budget: the rows
    // a budget adopts from it decode exactly as after its own prompt pass.
    use common::step_logits;
    let toks = ids(90, 21);
    let prompt = 70;
    for (name, extra) in [
        ("h2o", serde_json::json!({"min_tokens": 4})),
        (
            "snapkv",
            serde_json::json!({"min_tokens": 4, "window_size": 8}),
        ),
        ("streaming", serde_json::json!({"min_tokens": 4})),
    ] {
        for budget in [0.1, 0.3] {
            let mut cfg = extra.clone();
            cfg["budget"] = budget.into();
            let own = evicting(name, cfg.clone());
            let want = decode(&load(Arc::new(own)), 1, &toks, prompt);

            let mut all = extra.clone();
            all["budget"] = 1.0.into();
            let source = evicting(name, all);
            let model = load(Arc::new(source.clone()));
            let first = {
                let _scope = ForwardScope::enter(vec![prompt]);
                let _ids = SequenceIdsScope::enter(vec![5]);
                step_logits(&model, &toks[..prompt], 0, prompt - 1)
            };
            let adopted = evicting(name, cfg.clone());
            adopted.adopt_prompt(&source, 5, 9).unwrap();
            let model = load(Arc::new(adopted.clone()));
            let _scope = ForwardScope::enter(vec![prompt]);
            let _ids = SequenceIdsScope::enter(vec![9]);
            let mut got = vec![first];
            for (pos, &id) in toks.iter().enumerate().skip(prompt) {
                got.push(step_logits(&model, &[id], pos, 0));
            }
            assert_eq!(got, want, "{name} at {budget}");
            assert!(
                adopted.held()[0].1.rows < (90 * 2 * 2) as u64,
                "{name}: evicted"
            );
        }
    }
    // Masses that do not fit the policy are refused.
    let h2o = evicting("h2o", serde_json::json!({"budget": 1.0}));
    let snap = evicting("snapkv", serde_json::json!({"budget": 0.1}));
    let e = snap.adopt_prompt(&h2o, 1, 2).unwrap_err().to_string();
    assert!(e.contains("masses"), "{e}");
    let e = h2o.adopt_prompt(&h2o, 77, 2).unwrap_err().to_string();
    assert!(e.contains("holds no rows"), "{e}");
}
