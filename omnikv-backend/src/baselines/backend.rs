//! [`EvictingBackend`]: the host's KV-cache backend trait over the row
//! store, for all three policies. Prompt passes attend densely (the kernel
//! chosen by [`crate::prefill`]) and evict when the prompt is complete;
//! decode steps append, attend over the kept rows and evict.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Result, Tensor};
use mistralrs_core::kv_backend::{
    AttentionInput, ForwardInfo, ForwardState, KvCache, KvCacheBackend,
};

use super::rows::{head_tensors, held_of, HeadRows, Held, LayerRows, SeqRows};
use super::{rows_to_keep, EvictionConfig, EvictionPolicy};
use super::{H2O_NAME, SNAPKV_NAME, STREAMING_NAME};
use crate::accounting::{Bytes, ReleaseRecord};
use crate::attention::causal_mask;
use crate::prefill::dense_attention;
use omnikv_kernels::cpu::decode_tiles;

/// The `h2o`, `streaming` or `snapkv` KV-cache backend, by its config's
/// policy. Clones share the row store.
#[derive(Debug, Clone)]
pub struct EvictingBackend {
    name: &'static str,
    config: Arc<EvictionConfig>,
    seqs: Arc<Mutex<HashMap<usize, SeqRows>>>,
}

/// State of one forward pass.
struct Pass {
    ids: Vec<usize>,
    prompt_lens: Vec<usize>,
    offsets: Vec<usize>,
    num_layers: usize,
}

impl EvictingBackend {
    /// A backend for `config`'s policy, holding no sequence yet.
    pub fn new(config: EvictionConfig) -> Self {
        let name = match config.policy {
            EvictionPolicy::H2o { .. } => H2O_NAME,
            EvictionPolicy::Streaming { .. } => STREAMING_NAME,
            EvictionPolicy::SnapKv { .. } => SNAPKV_NAME,
        };
        crate::telemetry::describe();
        Self {
            name,
            config: Arc::new(config),
            seqs: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The validated configuration.
    pub fn config(&self) -> &EvictionConfig {
        &self.config
    }

    /// The row store, also after a panic elsewhere poisoned its lock: every
    /// update of a sequence's rows completes or fails before the guard is
    /// dropped, and a sequence whose pass failed is released by the host, so
    /// later requests keep being served instead of failing on the poison.
    fn lock_seqs(&self) -> std::sync::MutexGuard<'_, HashMap<usize, SeqRows>> {
        self.seqs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Rows and bytes each live sequence holds now, by sequence id.
    pub fn held(&self) -> Vec<(usize, Held)> {
        let seqs = self.lock_seqs();
        let mut out: Vec<_> = seqs.iter().map(|(&id, s)| (id, held_of(s))).collect();
        out.sort_by_key(|(id, _)| *id);
        out
    }

    fn is_h2o(&self) -> bool {
        matches!(self.config.policy, EvictionPolicy::H2o { .. })
    }

    /// Rows a head may hold while decoding (SnapKV compresses the prompt
    /// only and then lets the cache grow).
    fn decode_capacity(&self, prompt_len: usize) -> usize {
        match self.config.policy {
            EvictionPolicy::SnapKv { .. } => usize::MAX,
            _ => self.config.capacity(prompt_len).unwrap_or(usize::MAX),
        }
    }

    /// Evict a layer's rows down to the budget for a complete prompt of
    /// `prompt_len` tokens.
    fn evict_prompt(&self, rows: &mut LayerRows, prompt_len: usize) {
        let Some(cap) = self.config.capacity(prompt_len) else {
            return;
        };
        for head in rows.heads.iter_mut() {
            let d = head.k.len() / head.len().max(1);
            if let Some(keep) = rows_to_keep(self.config.policy, &head.pos, &head.mass, cap) {
                head.retain(&keep, d);
            }
        }
    }

    /// Start sequence `to` of this backend from the rows sequence `from`
    /// of `source` held right after its prompt pass, evicting down to this
    /// backend's budget as this backend's own prompt pass would have: the
    /// same rows, masses and logits afterwards, bit for bit. So one prompt
    /// pass serves every budget (the teacher-forced divergence tool decodes
    /// each budget from one shared prefill).
    ///
    /// `source` must keep every row (budget `1.0`, or a prompt below its
    /// `min_prompt_len`) and have decoded nothing yet for `from`; H2O needs
    /// an H2O source (its masses sum every prompt query), SnapKV a SnapKV
    /// source with the same `window_size` (its observation window);
    /// StreamingLLM reads no masses and takes any source.
    ///
    /// # Errors
    /// If `source` holds no complete prompt for `from`, has evicted or
    /// decoded rows, or its masses do not fit this backend's policy.
    pub fn adopt_prompt(&self, source: &EvictingBackend, from: usize, to: usize) -> Result<()> {
        let fits = match (source.config.policy, self.config.policy) {
            (_, EvictionPolicy::Streaming { .. }) => true,
            (EvictionPolicy::H2o { .. }, EvictionPolicy::H2o { .. }) => true,
            (
                EvictionPolicy::SnapKv { window: a, .. },
                EvictionPolicy::SnapKv { window: b, .. },
            ) => a == b,
            _ => false,
        };
        if !fits {
            candle_core::bail!(
                "{}: cannot start from the prompt rows of a `{}` backend ({}): their attention masses are not this policy's ({})",
                self.name,
                source.name,
                source.config.policy,
                self.config.policy
            );
        }
        let (prompt_len, layers) = {
            let seqs = source.lock_seqs();
            let Some(s) = seqs.get(&from) else {
                candle_core::bail!("{}: sequence {from} holds no rows", source.name);
            };
            let p = s.prompt_len;
            let complete = s.capacity.is_some()
                && !s.layers.is_empty()
                && s.layers
                    .iter()
                    .all(|l| !l.heads.is_empty() && l.heads.iter().all(|h| h.len() == p));
            if !complete || source.config.capacity(p).is_some() {
                candle_core::bail!(
                    "{}: sequence {from} does not hold exactly its {p} prompt rows in every layer and head (the source must keep every row and have decoded nothing)",
                    source.name
                );
            }
            (p, s.layers.clone())
        };
        let mut s = SeqRows {
            prompt_len,
            capacity: Some(self.decode_capacity(prompt_len)),
            layers,
            ..Default::default()
        };
        s.note_peak();
        for layer in s.layers.iter_mut() {
            self.evict_prompt(layer, prompt_len);
        }
        self.lock_seqs().insert(to, s);
        Ok(())
    }

    /// A prompt pass of sequence `seq` at `offset` for `layer`: attend densely
    /// over the stored rows and the new ones, add the attention mass (H2O),
    /// store the new rows and, once the prompt is complete, evict.
    #[allow(clippy::too_many_arguments)]
    fn prompt_pass(
        &self,
        s: &mut SeqRows,
        layer: usize,
        offset: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
    ) -> Result<Tensor> {
        // q (1, h, s, d); k, v (1, kv_h, s, d)
        let (_, _h, n_new, d) = q.dims4()?;
        let prompt_len = s.prompt_len;
        let kv_h = k.dim(1)?;
        let rows = &mut s.layers[layer];
        if rows.heads.is_empty() {
            rows.heads = vec![HeadRows::default(); kv_h];
        }
        let stored = rows.heads[0].len();
        if stored != offset || rows.heads.iter().any(|h| h.len() != stored) {
            candle_core::bail!(
                "{}: layer {layer} holds {stored} rows but the prompt pass starts at position {offset}",
                self.name
            );
        }
        let (k_all, v_all) = if stored == 0 {
            (k.clone(), v.clone())
        } else {
            let (pk, pv) = head_tensors(&rows.heads, d, q.device())?;
            // Stored rows `(kv_h, stored, d)` before this pass's `(1, kv_h, s, d)`
            // (a prompt continued after a host chunk).
            (
                Tensor::cat(&[&pk.to_dtype(k.dtype())?.unsqueeze(0)?, k], 2)?,
                Tensor::cat(&[&pv.to_dtype(v.dtype())?.unsqueeze(0)?, v], 2)?,
            )
        };
        // Every position of a prompt pass is a prompt position.
        let out = dense_attention(self.config.prefill, true, q, &k_all, &v_all, scale)?;
        let mass = match self.config.policy {
            EvictionPolicy::H2o { .. } => {
                Some(causal_attention_mass(&q.get(0)?, &k_all.get(0)?, scale)?)
            }
            // The observation window: the prompt's last queries (those of
            // this pass when the prompt ends in it).
            EvictionPolicy::SnapKv { window, .. } if offset + n_new >= prompt_len => {
                let w = window.min(n_new);
                let qw = q.get(0)?.narrow(1, n_new - w, w)?;
                Some(causal_attention_mass(&qw, &k_all.get(0)?, scale)?)
            }
            _ => None,
        };
        let kf = k.get(0)?.to_dtype(DType::F32)?.contiguous()?;
        let vf = v.get(0)?.to_dtype(DType::F32)?.contiguous()?;
        for (g, head) in rows.heads.iter_mut().enumerate() {
            let kg = kf.get(g)?.flatten_all()?.to_vec1::<f32>()?;
            let vg = vf.get(g)?.flatten_all()?.to_vec1::<f32>()?;
            for t in 0..n_new {
                head.push(
                    (offset + t) as u32,
                    &kg[t * d..(t + 1) * d],
                    &vg[t * d..(t + 1) * d],
                );
            }
            if let Some(mass) = &mass {
                let n = head.len();
                for (m, add) in head.mass.iter_mut().zip(&mass[g * n..(g + 1) * n]) {
                    *m += add;
                }
            }
        }
        Ok(out)
    }

    /// Decode tokens of one sequence for `layer`: per new token, append its
    /// row, attend over the kept rows, add the probabilities to the masses
    /// (H2O) and drop rows beyond the capacity.
    fn decode_pass(
        &self,
        s: &mut SeqRows,
        layer: usize,
        offset: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
    ) -> Result<Tensor> {
        let (_, h, n_new, d) = q.dims4()?;
        let kv_h = k.dim(1)?;
        let g = h / kv_h;
        let capacity = s.capacity.unwrap_or(usize::MAX);
        let policy = self.config.policy;
        let h2o = self.is_h2o();
        let rows = &mut s.layers[layer];
        if rows.heads.len() != kv_h {
            candle_core::bail!(
                "{}: layer {layer} has no prompt rows for this sequence (decode before prefill)",
                self.name
            );
        }
        let qf = q.get(0)?.to_dtype(DType::F32)?.contiguous()?; // (h, s, d)
        let kf = k.get(0)?.to_dtype(DType::F32)?.contiguous()?;
        let vf = v.get(0)?.to_dtype(DType::F32)?.contiguous()?;
        let (qv, kv, vv) = (
            qf.flatten_all()?.to_vec1::<f32>()?,
            kf.flatten_all()?.to_vec1::<f32>()?,
            vf.flatten_all()?.to_vec1::<f32>()?,
        );
        let mut out = vec![0f32; h * n_new * d];
        use rayon::prelude::*;
        let results: Vec<Vec<Vec<f32>>> = rows
            .heads
            .par_iter_mut()
            .enumerate()
            .map(|(kvh, head)| {
                let mut outs = vec![Vec::new(); g * n_new];
                for t in 0..n_new {
                    let at = (kvh * n_new + t) * d;
                    head.push((offset + t) as u32, &kv[at..at + d], &vv[at..at + d]);
                    let n = head.len();
                    // The output with the exact kernel's arithmetic (the
                    // dense path's), so a budget that keeps every row gives
                    // the dense logits bit for bit.
                    let qa = kvh * g * n_new * d;
                    let qg: Vec<f32> = (0..g)
                        .flat_map(|j| {
                            let at = qa + (j * n_new + t) * d;
                            qv[at..at + d].iter().copied()
                        })
                        .collect();
                    let o = decode_tiles(&qg, 1, g, 1, d, n, scale as f32, &|_, _, r, ko, vo| {
                        ko.copy_from_slice(&head.k[r * d..(r + 1) * d]);
                        vo.copy_from_slice(&head.v[r * d..(r + 1) * d]);
                    });
                    for j in 0..g {
                        outs[j * n_new + t] = o[j * d..(j + 1) * d].to_vec();
                    }
                    // H2O: the probabilities each kept row got this step,
                    // summed over the query group.
                    let mut add = vec![0f32; if h2o { n } else { 0 }];
                    if h2o {
                        for j in 0..g {
                            let at = qa + (j * n_new + t) * d;
                            let p = probabilities(&qv[at..at + d], &head.k, n, d, scale);
                            for (a, x) in add.iter_mut().zip(&p) {
                                *a += x;
                            }
                        }
                    }
                    if h2o {
                        for (m, a) in head.mass.iter_mut().zip(&add) {
                            *m += a;
                        }
                    }
                    if let Some(keep) = rows_to_keep(policy, &head.pos, &head.mass, capacity) {
                        if keep.len() + 1 == n {
                            // The usual step: exactly one row goes.
                            let mut gone = vec![true; n];
                            for &r in &keep {
                                gone[r] = false;
                            }
                            // `keep` has `n - 1` distinct rows, so one is gone.
                            if let Some(r) = gone.iter().position(|&x| x) {
                                head.remove(r, d);
                            }
                        } else {
                            head.retain(&keep, d);
                        }
                    }
                }
                outs
            })
            .collect();
        for (kvh, outs) in results.into_iter().enumerate() {
            for j in 0..g {
                let hq = kvh * g + j;
                for t in 0..n_new {
                    let at = (hq * n_new + t) * d;
                    out[at..at + d].copy_from_slice(&outs[j * n_new + t]);
                }
            }
        }
        Tensor::from_vec(out, (1, h, n_new, d), q.device())?.to_dtype(q.dtype())
    }
}

/// Softmax probabilities of one query `q` (`d` values) over `n` rows of
/// `k` (row-major, `n * d`), scaled by `scale`.
fn probabilities(q: &[f32], k: &[f32], n: usize, d: usize, scale: f64) -> Vec<f32> {
    let scale = scale as f32;
    let mut p: Vec<f32> = (0..n)
        .map(|r| {
            k[r * d..(r + 1) * d]
                .iter()
                .zip(q)
                .map(|(a, b)| a * b)
                .sum::<f32>()
                * scale
        })
        .collect();
    let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for x in p.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    for x in p.iter_mut() {
        *x /= sum;
    }
    p
}

/// H2O's accumulated attention mass after a causal prompt pass: for query
/// heads `q` `(h, s, d)` at the last `s` of `n` positions and keys `k`
/// `(kv_h, n, d)`, the softmax probability each key got, summed over the
/// queries and over the query heads of its KV head. Returns `kv_h * n`
/// values, head-major. Computed in query blocks (no `s x n` matrix per head
/// at once). Requires `n >= s` and `h` a multiple of `kv_h`.
///
/// # Errors
/// If a tensor is not rank 3 or a tensor operation fails.
///
/// # Panics
/// If `k` has no KV heads (`kv_h == 0`).
pub fn causal_attention_mass(q: &Tensor, k: &Tensor, scale: f64) -> Result<Vec<f32>> {
    let (h, s, d) = q.dims3()?;
    let (kv_h, n, _) = k.dims3()?;
    let g = h / kv_h;
    let past = n - s;
    let q = q.to_dtype(DType::F32)?;
    // (h, d, n): each query head next to its KV head's keys.
    let kt = k
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .expand((kv_h, g, n, d))?
        .reshape((h, n, d))?
        .transpose(1, 2)?
        .contiguous()?;
    let mut mass = vec![0f32; kv_h * n];
    const BLOCK: usize = 128;
    let mut start = 0;
    while start < s {
        let len = BLOCK.min(s - start);
        let visible = past + start + len;
        let scores = (q
            .narrow(1, start, len)?
            .matmul(&kt.narrow(2, 0, visible)?)?
            * scale)?;
        let mask = causal_mask(len, past + start, q.device())?;
        let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?)?;
        let per_kv = probs.sum(1)?.reshape((kv_h, g, visible))?.sum(1)?; // (kv_h, visible)
        let per_kv = per_kv.to_vec2::<f32>()?;
        for (hh, row) in per_kv.iter().enumerate() {
            for (m, x) in mass[hh * n..hh * n + visible].iter_mut().zip(row) {
                *m += x;
            }
        }
        start += len;
    }
    Ok(mass)
}

impl KvCacheBackend for EvictingBackend {
    fn name(&self) -> &str {
        self.name
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn model_architecture(&self) -> Option<&str> {
        Some(crate::names::ARCHITECTURE_NAME)
    }

    fn supports_prefix_cache(&self) -> bool {
        // The rows live in this backend, not in the model's cache.
        false
    }

    fn validate_prompt(
        &self,
        prompt_len: usize,
        max_new_tokens: Option<usize>,
    ) -> anyhow::Result<()> {
        crate::budget::check_context_len(
            self.name,
            self.config.max_context_len,
            prompt_len,
            max_new_tokens,
        )
    }

    fn sequence_finished(&self, seq_id: usize) {
        // One lock: the record's "live" figures are one snapshot.
        let (removed, live, live_bytes, live_rows) = {
            let mut seqs = self.lock_seqs();
            let removed = seqs.remove(&seq_id);
            let live_bytes: u64 = seqs.values().map(SeqRows::bytes).sum();
            let live_rows: u64 = seqs.values().map(|s| held_of(s).rows).sum();
            (removed, seqs.len(), live_bytes, live_rows)
        };
        if let Some(s) = removed {
            let held = held_of(&s);
            let layers = s.layers.len().max(1) as u64;
            let heads = s.layers.first().map_or(1, |l| l.heads.len().max(1)) as u64;
            crate::telemetry::baseline_rows(
                self.name,
                live_rows,
                Some((held.positions * layers * heads).saturating_sub(held.rows)),
            );
            tracing::info!(
                "{} cache: released sequence {seq_id} ({} rows, {}; peak {} rows, {}; {} positions, a full cache holds {} rows); {live} sequence(s) live",
                self.name,
                held.rows,
                Bytes(held.bytes),
                held.peak_rows,
                Bytes(held.peak_bytes),
                held.positions,
                held.positions * layers * heads,
            );
            ReleaseRecord {
                backend: self.name.into(),
                seq: seq_id,
                held_host_bytes: held.bytes,
                held_device_bytes: 0,
                rows: Some(held.rows),
                peak_rows: Some(held.peak_rows),
                peak_bytes: Some(held.peak_bytes),
                positions: Some(held.positions),
                full_rows: Some(held.positions * layers * heads),
                live,
                live_host_bytes: live_bytes,
                live_device_bytes: 0,
                ..Default::default()
            }
            .log();
        }
    }

    fn begin_forward(&self, info: &ForwardInfo<'_>) -> Result<ForwardState> {
        let ids = mistralrs_core::kv_backend::current_sequence_ids()
            .filter(|ids| ids.len() == info.batch_size);
        let (Some(ids), Some(prompt_lens)) = (ids, info.prompt_lens.clone()) else {
            candle_core::bail!(
                "{}: this backend needs the host to report sequence ids and prompt lengths (mistral.rs with this project's patches, text pipeline)",
                self.name
            );
        };
        if prompt_lens.len() != ids.len() || info.seqlen_offsets.len() != ids.len() {
            candle_core::bail!(
                "{}: a pass of {} sequences came with {} prompt lengths and {} offsets; the host must report one of each per sequence",
                self.name,
                ids.len(),
                prompt_lens.len(),
                info.seqlen_offsets.len()
            );
        }
        let mut seqs = self.lock_seqs();
        for (i, &id) in ids.iter().enumerate() {
            let offset = info.seqlen_offsets[i];
            let s = seqs.entry(id).or_default();
            if offset == 0 {
                // A new sequence, or the host re-runs its prompt: start over.
                *s = SeqRows::default();
            }
            s.prompt_len = prompt_lens[i];
            s.layers.resize_with(info.num_layers, LayerRows::default);
        }
        Ok(Box::new(Pass {
            ids,
            prompt_lens,
            offsets: info.seqlen_offsets.to_vec(),
            num_layers: info.num_layers,
        }))
    }

    fn attention(
        &self,
        input: &AttentionInput<'_>,
        _cache: &mut KvCache,
        state: &mut ForwardState,
    ) -> Result<Tensor> {
        let Some(pass) = state.downcast_mut::<Pass>() else {
            candle_core::bail!(
                "{}: the forward pass was not started by this backend",
                self.name
            );
        };
        let layer = input.layer_idx;
        let scale = input.sdpa_params.softmax_scale as f64;
        let (b, _h, s_new, _d) = input.q.dims4()?;
        if b != pass.ids.len() || layer >= pass.num_layers {
            candle_core::bail!(
                "{}: layer {layer} of a batch of {b} sequences, but the pass was started for {} sequences and {} layers",
                self.name,
                pass.ids.len(),
                pass.num_layers
            );
        }
        let mut seqs = self.lock_seqs();
        let mut outs = Vec::with_capacity(b);
        for i in 0..b {
            let id = pass.ids[i];
            let Some(s) = seqs.get_mut(&id) else {
                candle_core::bail!("{}: sequence {id} was released during its pass", self.name);
            };
            let (q, k, v) = (
                input.q.narrow(0, i, 1)?,
                input.k.narrow(0, i, 1)?,
                input.v.narrow(0, i, 1)?,
            );
            let offset = pass.offsets[i];
            let p = pass.prompt_lens[i];
            if offset < p {
                outs.push(self.prompt_pass(s, layer, offset, &q, &k, &v, scale)?);
                if offset + s_new >= p {
                    // The prompt is complete: evict down to the budget.
                    s.note_peak();
                    self.evict_prompt(&mut s.layers[layer], p);
                    s.capacity = Some(self.decode_capacity(p));
                }
            } else {
                if s.capacity.is_none() {
                    s.capacity = Some(self.decode_capacity(p));
                }
                outs.push(self.decode_pass(s, layer, offset, &q, &k, &v, scale)?);
            }
            if layer + 1 == pass.num_layers {
                s.note_peak();
            }
        }
        if layer + 1 == pass.num_layers {
            let held: u64 = seqs.values().map(|s| held_of(s).rows).sum();
            crate::telemetry::baseline_rows(self.name, held, None);
        }
        Tensor::cat(&outs, 0)
    }
}
