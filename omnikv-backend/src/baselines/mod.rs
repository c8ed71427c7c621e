//! Token-dropping baselines, `h2o` and `streaming`, as KV-cache backends in the
//! same server, so OmniKV can be A/B-tested against them on the same model.
//!
//! Both evict for real: after the prompt pass a sequence keeps at most
//! `C` rows per layer and KV head (`C` = the budget), every decode step appends
//! its row and drops one, and the dropped rows are gone.
//!
//! - **H2O** ("Heavy-Hitter Oracle", Zhang et al., NeurIPS 2023): each KV head
//!   keeps the `heavy` rows with the largest accumulated attention mass (the
//!   softmax probabilities every query gave them, summed over the query heads
//!   of the group) plus the `recent` most recent positions; `heavy + recent =
//!   C`, split by `heavy_ratio` like the published heavy/recent ratios. During
//!   decoding the new step's probabilities are added to the masses and the
//!   lightest non-recent row is dropped.
//! - **StreamingLLM** (Xiao et al., ICLR 2024): the first `sink_tokens`
//!   positions (attention sinks) plus the most recent `C - sink_tokens`.
//! - **SnapKV** (Li et al., 2024): once, at the end of the prompt, the last
//!   `window_size` queries (the observation window) vote: each earlier row
//!   gets the attention they gave it (summed over the group's query heads),
//!   average-pooled over `kernel_size` neighbouring positions; the top
//!   `C - window_size` rows plus the window are kept. Decoding appends
//!   without evicting, as published.
//!
//! Rows live in a per-sequence store owned by the backend (keyed by the host's
//! sequence ids, released in `sequence_finished`), not in the model's cache,
//! so what a sequence holds is exactly what the policy kept. Keys are stored
//! after RoPE with their original positions (as the published H2O does);
//! StreamingLLM's re-rotation to in-cache positions, which matters only beyond
//! the model's trained context, is not done.
//!
//! Prompt passes attend densely over the whole prompt (both published methods
//! prefill with full attention) and the eviction happens when the prompt is
//! complete. Prompts of fewer than `min_prompt_len` tokens are not evicted
//! from, and the budget never goes below `min_tokens` rows (for SnapKV:
//! `min_tokens` voted rows besides the window).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Tensor};
use mistralrs_core::kv_backend::{
    AttentionInput, ForwardInfo, ForwardState, KvCache, KvCacheBackend,
};
use serde_json::Value;

use crate::attention::{streaming_attention, tiled_causal_attention};
use crate::config::{PrefillKernel, TokenBudget};
use crate::store::Bytes;

/// Names the baselines are registered under.
pub const H2O_NAME: &str = "h2o";
pub const STREAMING_NAME: &str = "streaming";
pub const SNAPKV_NAME: &str = "snapkv";

/// Which rows a sequence keeps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EvictionPolicy {
    /// Heavy hitters by accumulated attention plus a recent window;
    /// `heavy_ratio` of the budget goes to heavy hitters.
    H2o { heavy_ratio: f64 },
    /// `sink_tokens` first positions plus a recent window.
    Streaming { sink_tokens: usize },
    /// Observation-window voting at the end of the prompt, pooled over
    /// `kernel` positions; no eviction while decoding.
    SnapKv { window: usize, kernel: usize },
}

/// Configuration of an eviction backend (`--kv-cache-config` JSON).
#[derive(Debug, Clone, PartialEq)]
pub struct EvictionConfig {
    pub policy: EvictionPolicy,
    /// Rows kept per layer and KV head: a count, or a fraction of the prompt.
    pub budget: TokenBudget,
    /// The budget never goes below this many rows.
    pub min_tokens: usize,
    /// Prompts shorter than this keep every row.
    pub min_prompt_len: usize,
    /// Longest prompt + generation accepted (longer requests are refused).
    pub max_context_len: usize,
    pub prefill: PrefillKernel,
}

impl EvictionConfig {
    /// Keys each backend accepts.
    fn known_keys(name: &str) -> &'static [&'static str] {
        match name {
            H2O_NAME => &[
                "budget",
                "heavy_ratio",
                "min_tokens",
                "min_prompt_len",
                "max_context_len",
                "prefill",
            ],
            SNAPKV_NAME => &[
                "budget",
                "window_size",
                "kernel_size",
                "min_tokens",
                "min_prompt_len",
                "max_context_len",
                "prefill",
            ],
            _ => &[
                "budget",
                "sink_tokens",
                "min_tokens",
                "min_prompt_len",
                "max_context_len",
                "prefill",
            ],
        }
    }

    /// Defaults: budget 0.1 of the prompt, `heavy_ratio` 0.5 (H2O's equal
    /// heavy and recent shares), 4 sink tokens (StreamingLLM's), SnapKV's
    /// window of 32 and pooling kernel of 5, at least 32 rows, every prompt
    /// evicted from, `max_context_len` 128,500.
    pub fn defaults(name: &str) -> anyhow::Result<Self> {
        let policy = match name {
            H2O_NAME => EvictionPolicy::H2o { heavy_ratio: 0.5 },
            STREAMING_NAME => EvictionPolicy::Streaming { sink_tokens: 4 },
            SNAPKV_NAME => EvictionPolicy::SnapKv {
                window: 32,
                kernel: 5,
            },
            other => anyhow::bail!(
                "`{other}` is not an eviction backend; expected `{H2O_NAME}`, `{STREAMING_NAME}` or `{SNAPKV_NAME}`"
            ),
        };
        Ok(Self {
            policy,
            budget: TokenBudget::Ratio(0.1),
            min_tokens: 32,
            min_prompt_len: 0,
            max_context_len: 128_500,
            prefill: PrefillKernel::Fast,
        })
    }

    /// Parse the JSON config of backend `name` (`h2o` or `streaming`); `None`
    /// gives the defaults. Every problem is reported at once, naming the key.
    pub fn from_value(name: &str, value: Option<&Value>) -> anyhow::Result<Self> {
        let mut cfg = Self::defaults(name)?;
        let Some(value) = value else {
            return Ok(cfg);
        };
        let Some(map) = value.as_object() else {
            anyhow::bail!("the `{name}` config must be a JSON object, got {value}");
        };
        let known = Self::known_keys(name);
        let mut e = Vec::new();
        let uint = |key: &str, v: &Value, e: &mut Vec<String>| -> Option<usize> {
            let n = v.as_u64().filter(|&n| n <= u32::MAX as u64);
            if n.is_none() {
                e.push(format!("`{key}` = {v}: expected a whole number >= 0"));
            }
            n.map(|n| n as usize)
        };
        for (key, v) in map {
            match key.as_str() {
                k if !known.contains(&k) => e.push(format!(
                    "unknown key `{key}`; the `{name}` backend knows: {}",
                    known.join(", ")
                )),
                "budget" => match v.as_u64() {
                    Some(n) if n >= 1 && v.is_u64() => cfg.budget = TokenBudget::Count(n as usize),
                    _ => match v.as_f64() {
                        Some(f) if f > 0.0 && f <= 1.0 && !v.is_u64() => {
                            cfg.budget = TokenBudget::Ratio(f)
                        }
                        _ => e.push(format!(
                            "`budget` = {v}: expected a row count >= 1 or a fraction of the prompt in (0, 1]"
                        )),
                    },
                },
                "heavy_ratio" => match v.as_f64() {
                    Some(f) if (0.0..=1.0).contains(&f) => {
                        cfg.policy = EvictionPolicy::H2o { heavy_ratio: f }
                    }
                    _ => e.push(format!(
                        "`heavy_ratio` = {v}: expected the share of the budget for heavy hitters, in [0, 1]"
                    )),
                },
                "sink_tokens" => {
                    if let Some(n) = uint(key, v, &mut e) {
                        cfg.policy = EvictionPolicy::Streaming { sink_tokens: n }
                    }
                }
                "window_size" => match (uint(key, v, &mut e), cfg.policy) {
                    (Some(0), _) => e.push("`window_size` = 0: expected at least 1 query".into()),
                    (Some(w), EvictionPolicy::SnapKv { kernel, .. }) => {
                        cfg.policy = EvictionPolicy::SnapKv { window: w, kernel }
                    }
                    _ => {}
                },
                "kernel_size" => match (uint(key, v, &mut e), cfg.policy) {
                    (Some(k), EvictionPolicy::SnapKv { window, .. }) if k % 2 == 1 => {
                        cfg.policy = EvictionPolicy::SnapKv { window, kernel: k }
                    }
                    (Some(k), _) => e.push(format!(
                        "`kernel_size` = {k}: expected an odd pooling width >= 1"
                    )),
                    _ => {}
                },
                "min_tokens" => match uint(key, v, &mut e) {
                    Some(0) => e.push("`min_tokens` = 0: expected at least 1 row".into()),
                    Some(n) => cfg.min_tokens = n,
                    None => {}
                },
                "min_prompt_len" => {
                    if let Some(n) = uint(key, v, &mut e) {
                        cfg.min_prompt_len = n
                    }
                }
                "max_context_len" => match uint(key, v, &mut e) {
                    Some(0) => e.push("`max_context_len` = 0: expected at least 1".into()),
                    Some(n) => cfg.max_context_len = n,
                    None => {}
                },
                "prefill" => match v.as_str() {
                    Some("fast") => cfg.prefill = PrefillKernel::Fast,
                    Some("exact") => cfg.prefill = PrefillKernel::Exact,
                    _ => e.push(format!(
                        "`prefill` = {v}: expected one of {}",
                        PrefillKernel::ALLOWED
                    )),
                },
                _ => unreachable!("every known key is matched above"),
            }
        }
        if !e.is_empty() {
            anyhow::bail!(
                "{} problem{} in the `{name}` config:\n  - {}",
                e.len(),
                if e.len() == 1 { "" } else { "s" },
                e.join("\n  - ")
            );
        }
        Ok(cfg)
    }

    /// Rows kept per layer and KV head for a prompt of `prompt_len` tokens;
    /// `None` keeps every row (prompt below `min_prompt_len`).
    pub fn capacity(&self, prompt_len: usize) -> Option<usize> {
        if prompt_len < self.min_prompt_len {
            return None;
        }
        let k = match self.budget {
            TokenBudget::Count(n) => n,
            TokenBudget::Ratio(r) => (r * prompt_len as f64).floor() as usize,
        };
        let floor = match self.policy {
            // Room for the sinks and at least one recent row.
            EvictionPolicy::Streaming { sink_tokens } => self.min_tokens.max(sink_tokens + 1),
            // The window and at least `min_tokens` voted rows.
            EvictionPolicy::SnapKv { window, .. } => window + self.min_tokens,
            EvictionPolicy::H2o { .. } => self.min_tokens,
        };
        Some(k.max(floor))
    }
}

/// The rows one KV head of one layer keeps. Row `r` is `k[r*d..(r+1)*d]`
/// (after RoPE) and `v[..]`, at position `pos[r]` with accumulated attention
/// mass `mass[r]` (H2O only). Order is arbitrary (attention does not care).
#[derive(Debug, Clone, Default)]
struct HeadRows {
    pos: Vec<u32>,
    mass: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl HeadRows {
    fn len(&self) -> usize {
        self.pos.len()
    }

    fn push(&mut self, pos: u32, k: &[f32], v: &[f32]) {
        if self.pos.len() == self.pos.capacity() {
            // Grow by an eighth (at least 16 rows), not double: the rows are
            // what the backend reports and the memory it holds.
            let more = (self.pos.len() / 8).max(16);
            self.pos.reserve_exact(more);
            self.mass.reserve_exact(more);
            self.k.reserve_exact(more * k.len());
            self.v.reserve_exact(more * v.len());
        }
        self.pos.push(pos);
        self.mass.push(0.0);
        self.k.extend_from_slice(k);
        self.v.extend_from_slice(v);
    }

    /// Keep the rows `keep` (indices into the current rows), in that order,
    /// and give the memory of the others back.
    fn retain(&mut self, keep: &[usize], d: usize) {
        let mut out = HeadRows {
            pos: Vec::with_capacity(keep.len() + 1),
            mass: Vec::with_capacity(keep.len() + 1),
            k: Vec::with_capacity((keep.len() + 1) * d),
            v: Vec::with_capacity((keep.len() + 1) * d),
        };
        for &r in keep {
            out.pos.push(self.pos[r]);
            out.mass.push(self.mass[r]);
            out.k.extend_from_slice(&self.k[r * d..(r + 1) * d]);
            out.v.extend_from_slice(&self.v[r * d..(r + 1) * d]);
        }
        *self = out;
    }

    /// Drop row `r` (the last row takes its place).
    fn remove(&mut self, r: usize, d: usize) {
        let last = self.len() - 1;
        self.pos.swap_remove(r);
        self.mass.swap_remove(r);
        if r != last {
            self.k.copy_within(last * d..(last + 1) * d, r * d);
            self.v.copy_within(last * d..(last + 1) * d, r * d);
        }
        self.k.truncate(last * d);
        self.v.truncate(last * d);
    }

    fn bytes(&self) -> u64 {
        ((self.k.capacity() + self.v.capacity()) * 4
            + self.pos.capacity() * 4
            + self.mass.capacity() * 4) as u64
    }
}

/// Which rows of a head to keep when it holds more than `capacity` rows; the
/// newest position is `newest`. Returns indices into the rows, or `None` when
/// nothing has to go. This is the whole policy; everything else is storage.
pub fn rows_to_keep(
    policy: EvictionPolicy,
    pos: &[u32],
    mass: &[f32],
    capacity: usize,
) -> Option<Vec<usize>> {
    let n = pos.len();
    if n <= capacity {
        return None;
    }
    let mut by_pos: Vec<usize> = (0..n).collect();
    by_pos.sort_unstable_by_key(|&r| pos[r]);
    let keep = match policy {
        EvictionPolicy::Streaming { sink_tokens } => {
            let sinks = sink_tokens.min(capacity);
            let recent = capacity - sinks;
            let mut keep: Vec<usize> = by_pos[..sinks].to_vec();
            keep.extend_from_slice(&by_pos[n - recent..]);
            keep
        }
        EvictionPolicy::H2o { heavy_ratio } => {
            let heavy = ((capacity as f64 * heavy_ratio).floor() as usize).min(capacity);
            let recent = capacity - heavy;
            let (older, newest) = by_pos.split_at(n - recent);
            let mut older = older.to_vec();
            if heavy < older.len() {
                // Heaviest first; ties go to the earlier position.
                older.select_nth_unstable_by(heavy, |&a, &b| {
                    mass[b].total_cmp(&mass[a]).then(pos[a].cmp(&pos[b]))
                });
                older.truncate(heavy);
            }
            older.sort_unstable_by_key(|&r| pos[r]);
            older.extend_from_slice(newest);
            older
        }
        EvictionPolicy::SnapKv { window, kernel } => {
            let window = window.min(capacity);
            let (older, newest) = by_pos.split_at(n - window);
            let pooled = avg_pool(&older.iter().map(|&r| mass[r]).collect::<Vec<_>>(), kernel);
            let voted = capacity - window;
            let mut idx: Vec<usize> = (0..older.len()).collect();
            if voted < idx.len() {
                idx.select_nth_unstable_by(voted, |&a, &b| {
                    pooled[b].total_cmp(&pooled[a]).then(a.cmp(&b))
                });
                idx.truncate(voted);
            }
            idx.sort_unstable();
            let mut keep: Vec<usize> = idx.iter().map(|&i| older[i]).collect();
            keep.extend_from_slice(newest);
            keep
        }
    };
    Some(keep)
}

/// `avg_pool1d(x, kernel, stride 1, padding kernel / 2)` with zero padding
/// counted in the average (PyTorch's default), as SnapKV pools its votes.
pub fn avg_pool(x: &[f32], kernel: usize) -> Vec<f32> {
    let half = kernel / 2;
    (0..x.len())
        .map(|i| {
            let lo = i.saturating_sub(half);
            let hi = (i + half + 1).min(x.len());
            x[lo..hi].iter().sum::<f32>() / kernel as f32
        })
        .collect()
}

/// One layer of one sequence: a row set per KV head.
#[derive(Debug, Clone, Default)]
struct LayerRows {
    heads: Vec<HeadRows>,
}

#[derive(Debug, Default)]
struct SeqRows {
    prompt_len: usize,
    /// `None` until the prompt is complete, then the rows kept per head
    /// (`usize::MAX` for prompts that keep everything).
    capacity: Option<usize>,
    layers: Vec<LayerRows>,
    /// Most rows (summed over layers and heads) held at any time.
    peak_rows: u64,
    peak_bytes: u64,
}

impl SeqRows {
    fn rows(&self) -> u64 {
        self.layers
            .iter()
            .flat_map(|l| &l.heads)
            .map(|h| h.len() as u64)
            .sum()
    }
    fn bytes(&self) -> u64 {
        self.layers
            .iter()
            .flat_map(|l| &l.heads)
            .map(HeadRows::bytes)
            .sum()
    }
    fn note_peak(&mut self) {
        self.peak_rows = self.peak_rows.max(self.rows());
        self.peak_bytes = self.peak_bytes.max(self.bytes());
    }
}

/// What a sequence held when it was released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// Rows (positions x layers x KV heads) at the end.
    pub rows: u64,
    pub bytes: u64,
    pub peak_rows: u64,
    pub peak_bytes: u64,
    /// Positions the sequence saw (prompt + generated): a cache that keeps
    /// everything holds this many rows per layer and KV head.
    pub positions: u64,
}

/// `h2o` or `streaming`.
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
    pub fn new(config: EvictionConfig) -> Self {
        let name = match config.policy {
            EvictionPolicy::H2o { .. } => H2O_NAME,
            EvictionPolicy::Streaming { .. } => STREAMING_NAME,
            EvictionPolicy::SnapKv { .. } => SNAPKV_NAME,
        };
        Self {
            name,
            config: Arc::new(config),
            seqs: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    pub fn config(&self) -> &EvictionConfig {
        &self.config
    }

    /// Rows and bytes each live sequence holds now, by sequence id.
    pub fn held(&self) -> Vec<(usize, Held)> {
        let seqs = self.seqs.lock().expect("eviction store poisoned");
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
            (
                Tensor::cat(&[&pk.to_dtype(k.dtype())?, k], 2)?,
                Tensor::cat(&[&pv.to_dtype(v.dtype())?, v], 2)?,
            )
        };
        let out = if n_new >= crate::model::llama::FAST_PREFILL_MIN_TOKENS
            && self.config.prefill == PrefillKernel::Fast
        {
            tiled_causal_attention(q, &k_all, &v_all, scale)?
        } else {
            streaming_attention(q, &k_all, &v_all, scale)?
        };
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
                    let mut add = vec![0f32; n];
                    for j in 0..g {
                        let hq = kvh * g + j;
                        let qa = (hq * n_new + t) * d;
                        let (o, p) = attend_one(&qv[qa..qa + d], &head.k, &head.v, n, d, scale);
                        for (a, x) in add.iter_mut().zip(&p) {
                            *a += x;
                        }
                        outs[j * n_new + t] = o;
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
                            let r = gone.iter().position(|&x| x).expect("one row to drop");
                            head.remove(r, d);
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

fn held_of(s: &SeqRows) -> Held {
    let positions = s
        .layers
        .iter()
        .flat_map(|l| &l.heads)
        .filter_map(|h| h.pos.iter().max().map(|&p| p as u64 + 1))
        .max()
        .unwrap_or(0);
    Held {
        rows: s.rows(),
        bytes: s.bytes(),
        peak_rows: s.peak_rows,
        peak_bytes: s.peak_bytes,
        positions,
    }
}

/// `(kv_h, n, d)` tensors of the stored rows (all heads hold the same number).
fn head_tensors(heads: &[HeadRows], d: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let n = heads[0].len();
    let k: Vec<f32> = heads.iter().flat_map(|h| h.k.iter().copied()).collect();
    let v: Vec<f32> = heads.iter().flat_map(|h| h.v.iter().copied()).collect();
    Ok((
        Tensor::from_vec(k, (heads.len(), n, d), device)?,
        Tensor::from_vec(v, (heads.len(), n, d), device)?,
    ))
}

/// Attention of one query over `n` rows: the output and the probabilities.
fn attend_one(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n: usize,
    d: usize,
    scale: f64,
) -> (Vec<f32>, Vec<f32>) {
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
    let mut o = vec![0f32; d];
    for (r, x) in p.iter_mut().enumerate() {
        *x /= sum;
        for (oi, vi) in o.iter_mut().zip(&v[r * d..(r + 1) * d]) {
            *oi += *x * vi;
        }
    }
    (o, p)
}

/// H2O's accumulated attention mass after a causal prompt pass: for query
/// heads `q` `(h, s, d)` at the last `s` of `n` positions and keys `k`
/// `(kv_h, n, d)`, the softmax probability each key got, summed over the
/// queries and over the query heads of its KV head. Returns `kv_h * n`
/// values, head-major. Computed in query blocks (no `s x n` matrix per head
/// at once).
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
        let mask = crate::attention::causal_mask(len, past + start, q.device())?;
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
        Some(crate::model::ARCHITECTURE_NAME)
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
        crate::config::check_context_len(
            self.name,
            self.config.max_context_len,
            prompt_len,
            max_new_tokens,
        )
    }

    fn sequence_finished(&self, seq_id: usize) {
        let removed = self
            .seqs
            .lock()
            .expect("eviction store poisoned")
            .remove(&seq_id);
        if let Some(s) = removed {
            let held = held_of(&s);
            let layers = s.layers.len().max(1) as u64;
            let heads = s.layers.first().map_or(1, |l| l.heads.len().max(1)) as u64;
            let live = self.seqs.lock().expect("eviction store poisoned").len();
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
        let mut seqs = self.seqs.lock().expect("eviction store poisoned");
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
        let mut seqs = self.seqs.lock().expect("eviction store poisoned");
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
                    let cap = self.config.capacity(p);
                    s.note_peak();
                    let rows = &mut s.layers[layer];
                    if let Some(cap) = cap {
                        let d = input.k.dim(3)?;
                        for head in rows.heads.iter_mut() {
                            if let Some(keep) =
                                rows_to_keep(self.config.policy, &head.pos, &head.mass, cap)
                            {
                                head.retain(&keep, d);
                            }
                        }
                    }
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
        Tensor::cat(&outs, 0)
    }
}

impl fmt::Display for EvictionPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EvictionPolicy::H2o { heavy_ratio } => write!(f, "H2O, heavy ratio {heavy_ratio}"),
            EvictionPolicy::Streaming { sink_tokens } => {
                write!(f, "StreamingLLM, {sink_tokens} sink tokens")
            }
            EvictionPolicy::SnapKv { window, kernel } => {
                write!(f, "SnapKV, window {window}, pooling kernel {kernel}")
            }
        }
    }
}
