//! The `omnikv` KV-cache backend as seen by the host.
//!
//! Every attention call of a model goes through [`OmniKvBackend::attention`]:
//! - prompt passes attend densely in every layer (the first generated token
//!   comes from full attention; spec: "Prefill");
//! - on decode steps, a filter layer scores the prompt positions with its
//!   current query (and, for window selectors, its recent queries), keeps the
//!   top-k, and hands the sorted index set to the sparse layers it serves
//!   through the per-pass state; dense layers (pre-filter, filter, wait-load)
//!   attend to everything; sparse layers attend to the selection plus all
//!   generated tokens (spec: "Layer roles", "Selection at a filter layer",
//!   "Sparse attention").
//!
//! No row is ever dropped from the cache. The prompt length comes from the
//! host with every pass; window selectors keep their filter layers' past
//! queries in a store of their own ([`super::queries`]), per sequence.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use candle_core::{Result, Tensor};
use mistralrs_core::kv_backend::{
    AttentionInput, ForwardInfo, ForwardState, KvCache, KvCacheBackend,
};

use super::config::{OmniKvConfig, RequestOverride};
use super::plan::{LayerPlan, LayerRole};
use super::queries::QueryStore;
use super::recall::{head_max_distribution, step_recall, Recorder};
use super::selector::{
    make_selector, mass_capped, select_keeping_across, select_per_kv_head, Selection, Selector,
    SelectorKind,
};
use super::store::{Bytes, StoreUsage, TieredStore};
use crate::accounting::ReleaseRecord;
use crate::attention::{
    attended_rows, exact_attention, sparse_decode_attention, sparse_decode_attention_per_kv_head,
};
use crate::budget::TokenBudget;
use crate::prefill::dense_attention;
use crate::rope::Rotary;
use crate::telemetry::{DenseReason, StatsTable};
use crate::tensor_parallel::TensorParallel;

/// Name under which the backend is registered with the host.
pub use crate::names::BACKEND_NAME;

/// The `omnikv` KV-cache backend: one per server, shared by all sequences.
/// Clones share the configuration, layer plan, store and gather workers.
#[derive(Debug, Clone)]
pub struct OmniKvBackend {
    config: Arc<OmniKvConfig>,
    selector: Arc<dyn Selector>,
    plan: Arc<OnceLock<LayerPlan>>,
    /// Set by `record_recall`: decode densely and record inter-layer recall.
    recorder: Option<Arc<Recorder>>,
    /// Sparse layers' rows with `real_offload`, and per-sequence accounting.
    store: Arc<TieredStore>,
    /// `cpu_num_threads` workers that stage sparse layers' rows while the
    /// wait-load layers compute (created on first use).
    gather_pool: Arc<OnceLock<rayon::ThreadPool>>,
    /// Window selectors: each filter layer's newest queries, per sequence.
    queries: Arc<QueryStore>,
    /// The model's rotary tables, attached at model load
    /// ([`Self::attach_rotary`]); window selectors re-rotate their queries
    /// with them.
    rotary: Arc<Mutex<Option<Arc<Rotary>>>>,
    /// This rank's place among several under tensor parallelism
    /// ([`Self::attach_tensor_parallel`]); `None` on one device.
    tp: Arc<Mutex<Option<Arc<TensorParallel>>>>,
    /// Per-sequence statistics; metrics go out through [`crate::telemetry`].
    stats: Arc<StatsTable>,
}

/// A staging job started at a filter layer for one sparse layer and one
/// sequence.
type Prefetch = std::sync::mpsc::Receiver<Result<super::store::Staged>>;

/// State of one forward pass.
pub struct Step {
    /// A decode step with known prompt lengths: selection is active.
    sparse: bool,
    /// The pass computes prompt positions (`ForwardInfo::is_prefill`).
    prompt_pass: bool,
    prompt_lens: Vec<usize>,
    /// Host sequence ids in batch order, when the host provides them.
    seq_ids: Option<Vec<usize>>,
    /// Position of each sequence's first new token in this pass.
    offsets: Vec<usize>,
    /// Staging jobs per sparse layer, per sequence (offload only).
    prefetch: std::collections::HashMap<usize, Vec<Option<Prefetch>>>,
    /// Per sequence: `None` decodes densely (selection switched off by the
    /// request), otherwise the budget to select with and the fewest rows it
    /// keeps (`min_selected_tokens`; 0 for a budget the request set).
    budgets: Vec<Option<(TokenBudget, usize)>>,
    /// For each layer, the prompt positions it selected, per sequence.
    selections: Vec<Option<Vec<Selection>>>,
    /// Recording only: each layer's distribution over prompt positions, per
    /// sequence.
    dists: Vec<Vec<Vec<f32>>>,
    /// When the pass started, and the time its filter layers spent scoring
    /// and selecting.
    started: Instant,
    selection_time: Duration,
    /// Some filter layer selected for some sequence in this pass.
    selected: bool,
    /// Where the pass reports its figures when it ends (dropped by the model).
    stats: Arc<StatsTable>,
    store: Arc<TieredStore>,
}

impl Step {
    /// The prompt positions filter layer `layer` selected in this pass, per
    /// sequence in batch order (ascending positions), or `None` before that
    /// layer ran, for other layers and for passes that do not select
    /// (prompt passes, dense decoding). Tools read it from the pass state
    /// handed to each layer (the teacher-forced divergence tool measures the
    /// attention mass a selection captures).
    pub fn selected_rows(&self, layer: usize) -> Option<&[Selection]> {
        self.selections.get(layer)?.as_deref()
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        let (total, per_seq) = self.store.figures();
        self.stats.after_pass(&total, &per_seq);
        if self.sparse {
            let step_secs = self.started.elapsed().as_secs_f64();
            let selection_secs = self.selection_time.as_secs_f64();
            crate::telemetry::record_pass_times(self.selected.then_some(selection_secs), step_secs);
            if let Some(ids) = &self.seq_ids {
                self.stats.pass_times(ids, selection_secs, step_secs);
            }
        }
    }
}

impl OmniKvBackend {
    /// A backend for a validated `config`. The layer plan is built on the
    /// first pass (or checked at model load), when the layer count is known.
    pub fn new(config: OmniKvConfig) -> Self {
        let selector: Arc<dyn Selector> =
            Arc::from(make_selector(config.selector, config.window_size));
        let recorder = config
            .record_recall
            .clone()
            .map(|p| Arc::new(Recorder::new(p)));
        let store = Arc::new(TieredStore::new(config.max_host_bytes));
        let queries = Arc::new(QueryStore::new(selector.window()));
        crate::telemetry::describe();
        Self {
            config: Arc::new(config),
            selector,
            plan: Arc::new(OnceLock::new()),
            recorder,
            store,
            gather_pool: Arc::new(OnceLock::new()),
            queries,
            rotary: Arc::new(Mutex::new(None)),
            tp: Arc::new(Mutex::new(None)),
            stats: Arc::new(StatsTable::default()),
        }
    }

    /// Run as one rank of several: the model holds this rank's heads only,
    /// and every filter layer merges the ranks' top-k so that all ranks
    /// attend the same rows ([`select_keeping_across`]). `llama_omnikv`
    /// calls this at load when the host runs it tensor parallel.
    ///
    /// # Errors
    /// If the configuration needs more than a max over heads to score
    /// positions, which the merge does not carry: a selector other than
    /// `last` (`softmax_before_last` normalises each head over all
    /// positions, then needs a global max of normalised scores, which is
    /// exact too but not implemented; the window selectors also keep past
    /// queries per rank and sum over them), `selection_mass` (a softmax mass
    /// over every head), `selection_per_kv_head` (not implemented across
    /// ranks), or `record_recall` (each rank would record its own heads'
    /// attention).
    pub fn attach_tensor_parallel(&self, tp: Arc<TensorParallel>) -> anyhow::Result<()> {
        self.check_tensor_parallel()?;
        tracing::info!(
            "omnikv: rank {} of {}, filter layers merge the ranks' top-k",
            tp.rank(),
            tp.world_size()
        );
        *self.tp.lock().unwrap_or_else(|e| e.into_inner()) = Some(tp);
        Ok(())
    }

    /// Whether this configuration can run as one rank of several (see
    /// [`Self::attach_tensor_parallel`]); checked before the ranks connect.
    ///
    /// # Errors
    /// As [`Self::attach_tensor_parallel`].
    pub fn check_tensor_parallel(&self) -> anyhow::Result<()> {
        let fix = "the `omnikv` backend under tensor parallelism supports";
        if self.config.selector != SelectorKind::Last {
            anyhow::bail!(
                "{fix} `selector_cls: \"last\"` only (got {}): set it, or run on one device",
                serde_json::to_string(&self.config.selector).unwrap_or_default()
            );
        }
        if self.config.selection_mass.is_some() {
            anyhow::bail!(
                "{fix} budgets in tokens only: remove `selection_mass`, or run on one device"
            );
        }
        if self.config.selection_per_kv_head {
            anyhow::bail!(
                "{fix} one selection shared by every head: remove `selection_per_kv_head`, or run on one device"
            );
        }
        if self.config.record_recall.is_some() {
            anyhow::bail!(
                "{fix} no recall recording: remove `record_recall`, or run on one device"
            );
        }
        Ok(())
    }

    fn tensor_parallel(&self) -> Option<Arc<TensorParallel>> {
        self.tp.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Give the backend the model's rotary tables: window selectors score
    /// their window's queries rotated at the current position (published
    /// semantics), which needs the model's RoPE. `llama_omnikv` calls this
    /// at load; the last model attached wins.
    pub fn attach_rotary(&self, rotary: Arc<Rotary>) {
        *self.rotary.lock().unwrap_or_else(|e| e.into_inner()) = Some(rotary);
    }

    /// Sequences with recorded window queries and the bytes they hold
    /// (window selectors only; see [`super::queries`]).
    pub fn query_usage(&self) -> (usize, u64) {
        self.queries.usage()
    }

    /// Whether the selector looks at more than the current query.
    fn windowed(&self) -> bool {
        self.selector.window() > 1
    }

    /// The window queries `(m, h, d)` of sequence `seq` at filter layer
    /// `layer`, rotated at the current position `current`.
    fn window_queries(&self, seq: usize, layer: usize, current: usize) -> Result<Tensor> {
        let Some((q, positions)) = self.queries.window(seq, layer, current)? else {
            candle_core::bail!(
                "omnikv: no window queries recorded for sequence {seq} at filter layer {layer}"
            );
        };
        let rotary = self
            .rotary
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(rotary) = rotary else {
            candle_core::bail!(
                "omnikv: the `{:?}` selector needs the model's rotary tables; the `llama_omnikv` model attaches them when it loads",
                self.config.selector
            );
        };
        rotary.rotate_to(&q, &positions, current)
    }

    fn gather_pool(&self) -> Result<&rayon::ThreadPool> {
        if let Some(p) = self.gather_pool.get() {
            return Ok(p);
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(self.config.cpu_num_threads)
            .thread_name(|i| format!("omnikv-gather-{i}"))
            .build()
            .map_err(candle_core::Error::wrap)?;
        Ok(self.gather_pool.get_or_init(|| pool))
    }

    /// Overlap: right after a filter layer selected, stage the selected rows
    /// of every sparse layer it serves on the gather workers; each sparse
    /// layer later waits only for its own rows.
    fn start_prefetch(
        &self,
        step: &mut Step,
        plan: &LayerPlan,
        filter: usize,
        device: &candle_core::Device,
    ) -> Result<()> {
        let (Some(ids), Some(selection)) = (&step.seq_ids, &step.selections[filter]) else {
            return Ok(());
        };
        let pool = self.gather_pool()?;
        for (layer, role) in plan.roles.iter().enumerate() {
            if *role != (LayerRole::Sparse { filter }) {
                continue;
            }
            let mut jobs = Vec::with_capacity(ids.len());
            for (i, sel) in selection.iter().enumerate() {
                // Offload runs with shared selections only (the config
                // refuses `selection_per_kv_head` with `real_offload`).
                let Some(sel) = sel.shared().filter(|s| s.len() < step.prompt_lens[i]) else {
                    jobs.push(None);
                    continue;
                };
                let (tx, rx) = std::sync::mpsc::channel();
                let (store, seq, sel, device) =
                    (self.store.clone(), ids[i], sel.to_vec(), device.clone());
                pool.spawn(move || {
                    let _ = tx.send(store.stage(seq, layer, &sel, &device));
                });
                jobs.push(Some(rx));
            }
            step.prefetch.insert(layer, jobs);
        }
        Ok(())
    }

    /// The tiered store (for filling it directly, e.g. in benchmarks).
    pub fn store(&self) -> &TieredStore {
        &self.store
    }

    /// Bytes held per tier, per sequence and in total (see
    /// [`super::store`]).
    pub fn store_usage(&self) -> StoreUsage {
        self.store.usage()
    }

    /// The validated configuration.
    pub fn config(&self) -> &OmniKvConfig {
        &self.config
    }

    fn plan(&self, num_layers: usize) -> Result<&LayerPlan> {
        if let Some(p) = self.plan.get() {
            if p.roles.len() != num_layers {
                candle_core::bail!(
                    "omnikv: this backend was set up for a {}-layer model, got {num_layers} layers",
                    p.roles.len()
                );
            }
            return Ok(p);
        }
        let plan = LayerPlan::new(&self.config, num_layers).map_err(candle_core::Error::msg)?;
        Ok(self.plan.get_or_init(|| plan))
    }
}

impl OmniKvBackend {
    /// Recording mode: keep this layer's distribution over prompt positions
    /// and, after the last layer, add the step's recall to the recorder.
    fn record(
        &self,
        recorder: &Recorder,
        step: &mut Step,
        input: &AttentionInput<'_>,
        k: &Tensor,
        layer: usize,
        scale: f64,
    ) -> Result<()> {
        let n = k.dim(2)?;
        let b = k.dim(0)?;
        if step.dists.is_empty() {
            step.dists = vec![Vec::new(); b];
        }
        for (i, d) in step.dists.iter_mut().enumerate() {
            let p = step.prompt_lens[i].min(n);
            let keys = k.get(i)?.narrow(1, 0, p)?;
            d.push(head_max_distribution(
                &input.q.get(i)?.transpose(0, 1)?,
                &keys,
                scale,
            )?);
        }
        if layer + 1 == step.selections.len() {
            for (i, dists) in step.dists.iter().enumerate() {
                let p = step.prompt_lens[i].min(n);
                let kk = self.config.budget.tokens_for(p);
                recorder.add(
                    dists.len(),
                    &step_recall(dists, kk),
                    &format!("{:?}", self.config.budget),
                )?;
            }
        }
        Ok(())
    }
}

impl OmniKvBackend {
    /// A sparse layer with `real_offload`: its rows live in the tiered store,
    /// not in the model cache (see [`super::store`]).
    fn offloaded_attention(
        &self,
        input: &AttentionInput<'_>,
        step: &mut Step,
        layer: usize,
        filter: usize,
        scale: f64,
    ) -> Result<Tensor> {
        let Some(ids) = step.seq_ids.as_ref() else {
            candle_core::bail!("omnikv: `real_offload` without sequence ids");
        };
        let (b, _h, _s, _d) = input.q.dims4()?;
        let device = input.q.device();
        for i in 0..b {
            self.store.append(
                ids[i],
                layer,
                step.prompt_lens[i],
                step.offsets[i],
                &input.k.get(i)?,
                &input.v.get(i)?,
            )?;
        }
        if !step.sparse {
            let (kernel, prompt_pass) = (self.config.prefill, step.prompt_pass);
            let attend = |q: &Tensor, k: &Tensor, v: &Tensor| {
                dense_attention(kernel, prompt_pass, q, k, v, scale)
            };
            if step.offsets.iter().all(|&o| o == 0) {
                return attend(input.q, input.k, input.v);
            }
            let mut outs = Vec::with_capacity(b);
            for (i, &id) in ids.iter().enumerate() {
                let (k, v) = self.store.all_rows(id, layer, device)?;
                outs.push(attend(&input.q.narrow(0, i, 1)?, &k, &v)?);
            }
            return Tensor::cat(&outs, 0);
        }
        let Some(selection) = step.selections[filter].as_ref() else {
            candle_core::bail!(
                "omnikv: layer {layer} runs before its filter layer {filter} selected tokens"
            );
        };
        let mut outs = Vec::with_capacity(b);
        for (i, sel) in selection.iter().enumerate() {
            let Some(sel) = sel.shared() else {
                candle_core::bail!(
                    "omnikv: `real_offload` with a per-KV-head selection (the config refuses `selection_per_kv_head` with `real_offload`)"
                );
            };
            let qi = input.q.narrow(0, i, 1)?;
            let prefetched = step
                .prefetch
                .get_mut(&layer)
                .and_then(|jobs| jobs.get_mut(i)?.take());
            let (k, v) = if sel.len() >= step.prompt_lens[i] {
                self.store.all_rows(ids[i], layer, device)?
            } else if let Some(job) = prefetched {
                let staged = job.recv().map_err(|_| {
                    candle_core::Error::Msg(format!(
                        "omnikv: the staging job of layer {layer} stopped without a result"
                    ))
                })??;
                self.store.with_tail(ids[i], layer, staged)?
            } else {
                self.store.gather(ids[i], layer, sel, device)?
            };
            outs.push(exact_attention(&qi, &k, &v, scale)?);
        }
        Tensor::cat(&outs, 0)
    }
}

impl KvCacheBackend for OmniKvBackend {
    fn name(&self) -> &str {
        BACKEND_NAME
    }

    fn validate_prompt(
        &self,
        prompt_len: usize,
        max_new_tokens: Option<usize>,
    ) -> anyhow::Result<()> {
        crate::budget::check_context_len(
            BACKEND_NAME,
            self.config.max_context_len,
            prompt_len,
            max_new_tokens,
        )
    }

    fn supports_prefix_cache(&self) -> bool {
        // A restored prefix would lack the offloaded rows, and the window
        // queries of the prompt positions it skips (a prefix-cache hit runs
        // only the rest of the prompt, which may be shorter than the window).
        !self.config.real_offload && !self.windowed()
    }

    fn sequence_finished(&self, seq_id: usize) {
        self.stats.remove(seq_id);
        let queries = self.queries.release(seq_id);
        let held = match (self.store.release(seq_id), queries) {
            (Some(held), _) => Some(held),
            (None, Some(_)) => Some(Default::default()),
            (None, None) => None,
        };
        if let Some(held) = held {
            let (now, _) = self.store.figures();
            crate::telemetry::publish_store(&now);
            let (query_seqs, query_bytes) = self.queries.usage();
            tracing::info!(
                "omnikv store: released sequence {seq_id} ({} host tier, {} device tier); {} sequence(s) hold {} host, {} device",
                Bytes(held.host),
                Bytes(held.device),
                now.sequences,
                Bytes(now.host_bytes),
                Bytes(now.device_bytes)
            );
            ReleaseRecord {
                backend: BACKEND_NAME.into(),
                seq: seq_id,
                held_host_bytes: held.host,
                held_device_bytes: held.device,
                live: now.sequences.max(query_seqs),
                live_host_bytes: now.host_bytes,
                live_device_bytes: now.device_bytes,
                held_query_bytes: queries.unwrap_or(0),
                live_query_bytes: query_bytes,
                ..Default::default()
            }
            .log();
            if now.staged_rows > 0 {
                tracing::info!(
                    "omnikv store: delta fetch moved {} of {} staged prompt rows so far ({:.1}% reused from the previous step)",
                    now.moved_rows,
                    now.staged_rows,
                    100.0 * (now.staged_rows - now.moved_rows) as f64 / now.staged_rows as f64
                );
            }
        }
    }

    fn sequence_stats(&self, seq_id: usize) -> Option<serde_json::Value> {
        serde_json::to_value(self.stats.requested(seq_id)?).ok()
    }

    fn validate_request_options(&self, options: &serde_json::Value) -> anyhow::Result<()> {
        RequestOverride::from_value(options)?;
        Ok(())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn model_architecture(&self) -> Option<&str> {
        Some(crate::names::ARCHITECTURE_NAME)
    }

    fn begin_forward(&self, info: &ForwardInfo<'_>) -> Result<ForwardState> {
        self.plan(info.num_layers)?;
        let b = info.batch_size;
        if info.seqlen_offsets.len() != b || info.prompt_lens.as_ref().is_some_and(|l| l.len() != b)
        {
            candle_core::bail!(
                "omnikv: a pass of {b} sequences came with {} offsets and prompt lengths {:?}; the host must report one of each per sequence",
                info.seqlen_offsets.len(),
                info.prompt_lens
            );
        }
        tracing::trace!(
            "omnikv pass: batch {} x {} tokens, offsets {:?}, prompt lengths {:?}, sequences {:?}",
            info.batch_size,
            info.seq_len,
            info.seqlen_offsets,
            info.prompt_lens,
            mistralrs_core::kv_backend::current_sequence_ids()
        );
        let (sparse, prompt_lens) = match &info.prompt_lens {
            Some(lens) if !info.is_prefill() => (true, lens.clone()),
            _ => (false, Vec::new()),
        };
        let options = mistralrs_core::kv_backend::current_request_options();
        let request = |i: usize| -> Result<RequestOverride> {
            Ok(options
                .as_ref()
                .and_then(|o| o.get(i).cloned().flatten())
                .map(|v| RequestOverride::from_value(&v))
                .transpose()
                .map_err(candle_core::Error::msg)?
                .unwrap_or_default())
        };
        let seq_ids = mistralrs_core::kv_backend::current_sequence_ids()
            .filter(|ids| ids.len() == info.batch_size);
        if let Some(ids) = &seq_ids {
            for (i, &id) in ids.iter().enumerate() {
                if request(i)?.stats {
                    self.stats.request(id);
                }
            }
        }
        let budgets = (0..prompt_lens.len())
            .map(|i| {
                let o = request(i)?;
                Ok(match o.enabled {
                    Some(false) => None,
                    _ => Some(match o.budget {
                        Some(b) => (b, 0),
                        None => (self.config.budget, self.config.min_selected_tokens),
                    }),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if self.config.real_offload && (seq_ids.is_none() || info.prompt_lens.is_none()) {
            candle_core::bail!(
                "omnikv: `real_offload` needs the host to report sequence ids and prompt lengths (mistral.rs with this project's patches, text pipeline); set `real_offload` = false to run here"
            );
        }
        if sparse && self.recorder.is_none() {
            for (i, budget) in budgets.iter().enumerate() {
                let dense = if budget.is_none() {
                    Some(DenseReason::Request)
                } else if prompt_lens[i] < self.config.min_prompt_len {
                    Some(DenseReason::ShortPrompt)
                } else {
                    None
                };
                let id = seq_ids.as_ref().map(|ids| ids[i]);
                self.stats.decode_step(id, dense);
            }
        }
        let prompt_lens = if self.config.real_offload {
            info.prompt_lens.clone().unwrap_or_default()
        } else {
            prompt_lens
        };
        Ok(Box::new(Step {
            sparse,
            prompt_pass: info.is_prefill(),
            prompt_lens,
            seq_ids,
            offsets: info.seqlen_offsets.to_vec(),
            prefetch: Default::default(),
            budgets,
            selections: vec![None; info.num_layers],
            dists: Vec::new(),
            started: Instant::now(),
            selection_time: Duration::ZERO,
            selected: false,
            stats: self.stats.clone(),
            store: self.store.clone(),
        }))
    }

    fn attention(
        &self,
        input: &AttentionInput<'_>,
        cache: &mut KvCache,
        state: &mut ForwardState,
    ) -> Result<Tensor> {
        let Some(step) = state.downcast_mut::<Step>() else {
            candle_core::bail!("omnikv: the forward pass was not started by this backend");
        };
        let plan = self.plan(step.selections.len())?;
        let layer = input.layer_idx;
        let Some(&role) = plan.roles.get(layer) else {
            candle_core::bail!(
                "omnikv: attention for layer {layer}, but the pass was started for {} layers",
                plan.roles.len()
            );
        };
        let scale = input.sdpa_params.softmax_scale as f64;
        let (b, _h, _s, _d) = input.q.dims4()?;
        // Every per-sequence vector of the step is indexed by batch row below.
        if b != step.offsets.len() {
            candle_core::bail!(
                "omnikv: layer {layer} got a batch of {b} sequences, but the pass was started for {}",
                step.offsets.len()
            );
        }
        let kv_h = input.k.dim(1)?;

        if let (true, LayerRole::Sparse { filter }) = (self.config.real_offload, role) {
            return self.offloaded_attention(input, step, layer, filter, scale);
        }
        let windowed = role == LayerRole::Filter && self.windowed();
        if windowed {
            let Some(ids) = &step.seq_ids else {
                candle_core::bail!(
                    "omnikv: the `{:?}` selector keeps each sequence's window queries and needs the host's sequence ids (mistral.rs with this project's patches)",
                    self.config.selector
                );
            };
            for (i, (&id, &offset)) in ids.iter().zip(&step.offsets).enumerate() {
                self.queries.append(id, layer, offset, &input.q.get(i)?)?;
            }
        }
        let (k, v) = cache.append(input.k, input.v)?;
        if let Some(ids) = &step.seq_ids {
            // Device-tier accounting: this layer's rows in the model cache.
            let row_bytes = ((k.dim(3)? + v.dim(3)?) * kv_h * k.dtype().size_in_bytes()) as u64;
            let s = input.k.dim(2)?;
            for (&id, &offset) in ids.iter().zip(&step.offsets) {
                self.store
                    .note_dense(id, layer, (offset + s) as u64 * row_bytes);
            }
        }

        if !step.sparse {
            return dense_attention(
                self.config.prefill,
                step.prompt_pass,
                input.q,
                &k,
                &v,
                scale,
            );
        }
        let n = k.dim(2)?;
        if let Some(recorder) = &self.recorder {
            self.record(recorder, step, input, &k, layer, scale)?;
            return exact_attention(input.q, &k, &v, scale);
        }
        match role {
            LayerRole::Filter => {
                let started = Instant::now();
                let tp = self.tensor_parallel();
                let mut per_seq = Vec::with_capacity(b);
                for i in 0..b {
                    let p = step.prompt_lens[i].min(n);
                    let id = step.seq_ids.as_ref().map(|ids| ids[i]);
                    let budget = match step.budgets[i] {
                        // Short prompt, or selection switched off by the
                        // request: keep every row, the sparse layers run dense.
                        _ if p < self.config.min_prompt_len => p,
                        None => p,
                        Some((budget, floor)) => budget.tokens_for(p).max(floor).min(p),
                    };
                    let selecting = step.budgets[i].is_some() && p >= self.config.min_prompt_len;
                    step.selected |= selecting;
                    // A mass-based budget selects also when the cap covers
                    // the prompt.
                    let by_mass = selecting && self.config.selection_mass.is_some();
                    if budget >= p && !by_mass {
                        if selecting {
                            self.stats.selection(id, p, p);
                        }
                        per_seq.push(Selection::Shared((0..p as u32).collect()));
                        continue;
                    }
                    let keys = k.get(i)?.narrow(1, 0, p)?; // (kv_h, P, d)
                    let queries = match &step.seq_ids {
                        // (m, h, d), all rotated at the current position.
                        Some(ids) if windowed => {
                            self.window_queries(ids[i], layer, step.offsets[i])?
                        }
                        _ => input.q.get(i)?.transpose(0, 1)?, // (1, h, d)
                    };
                    if self.config.selection_per_kv_head {
                        let sel = select_per_kv_head(
                            &*self.selector,
                            &queries,
                            &k.get(i)?,
                            p,
                            scale,
                            budget,
                            n - p,
                            self.config.keep,
                            self.config.selection_mass,
                        )?;
                        self.stats
                            .selection(id, sel.rows_per_kv_head().round() as usize, p);
                        per_seq.push(sel);
                        continue;
                    }
                    let mut sel = select_keeping_across(
                        &*self.selector,
                        &queries,
                        &keys,
                        scale,
                        budget,
                        n - p,
                        self.config.keep,
                        tp.as_deref(),
                    )?;
                    if let Some(target) = self.config.selection_mass {
                        // The current query's mass over every row.
                        let current = queries.get(queries.dim(0)? - 1)?; // (h, d)
                        sel = mass_capped(
                            &sel,
                            &current,
                            &k.get(i)?,
                            p,
                            scale,
                            target,
                            self.config.keep,
                        )?;
                    }
                    self.stats.selection(id, sel.len(), p);
                    per_seq.push(Selection::Shared(sel));
                }
                if let Some(ids) = &step.seq_ids {
                    // The delta-fetch figures of the host tier follow shared
                    // selections (offload runs with those only).
                    for (&id, sel) in ids.iter().zip(&per_seq) {
                        if let Some(sel) = sel.shared() {
                            self.store.note_selection(id, layer, sel);
                        }
                    }
                }
                step.selection_time += started.elapsed();
                tracing::trace!("omnikv layer {layer}: selected {per_seq:?} of {n} rows");
                if let Some(tp) = &tp {
                    tracing::debug!(
                        "omnikv rank {} layer {layer}: selected {per_seq:?} of {n} rows",
                        tp.rank()
                    );
                }
                step.selections[layer] = Some(per_seq);
                if self.config.real_offload {
                    self.start_prefetch(step, plan, layer, input.q.device())?;
                }
                exact_attention(input.q, &k, &v, scale)
            }
            LayerRole::Sparse { filter } => {
                let Some(selection) = step.selections[filter].as_ref() else {
                    candle_core::bail!("omnikv: layer {layer} runs before its filter layer {filter} selected tokens");
                };
                let mut outs = Vec::with_capacity(b);
                for (i, sel) in selection.iter().enumerate() {
                    let p = step.prompt_lens[i].min(n);
                    let (qi, ki, vi) = (
                        input.q.narrow(0, i, 1)?,
                        k.narrow(0, i, 1)?,
                        v.narrow(0, i, 1)?,
                    );
                    if sel.covers(p) {
                        // The budget covers the whole prompt: plain dense attention.
                        outs.push(exact_attention(&qi, &ki, &vi, scale)?);
                        continue;
                    }
                    match sel {
                        Selection::Shared(sel) => outs.push(sparse_decode_attention(
                            &qi,
                            &ki,
                            &vi,
                            &attended_rows(sel, p, n),
                            scale,
                        )?),
                        Selection::PerKvHead(sets) => outs.push(
                            sparse_decode_attention_per_kv_head(&qi, &ki, &vi, sets, p, scale)?,
                        ),
                    }
                }
                Tensor::cat(&outs, 0)
            }
            LayerRole::PreFilterDense | LayerRole::WaitLoad { .. } => {
                exact_attention(input.q, &k, &v, scale)
            }
        }
    }
}
