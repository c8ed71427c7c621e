//! Token scoring at a filter layer (spec: "Selection at a filter layer").
//!
//! A selector turns the filter layer's recent queries and the cached prompt
//! keys into one score per prompt position; [`omnikv_kernels::ops::top_k`]
//! (shared; its CPU pass is [`top_k_sorted`]) keeps the best `k` positions
//! in ascending order, and [`select_keeping`] applies the prompt-tail rule
//! of the window selectors.
//!
//! Shapes: queries `(w, h, d)` oldest first (post-RoPE, the newest is the
//! current token; w window queries, h query heads, d head dim), prompt keys
//! `(kv_h, P, d)` (post-RoPE; kv_h KV heads, P prompt length); query head
//! `i` reads KV head `i / (h / kv_h)`.

use candle_core::{DType, Result, Tensor};

use crate::tensor_parallel::{shared_top_k, TensorParallel};

use serde::{Deserialize, Serialize};

/// Token scoring rule at a filter layer (`selector_cls`; spec: "Selection at
/// a filter layer").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SelectorKind {
    /// `last` (published default): the current query's raw scaled logits,
    /// max over query heads ([`Last`]).
    Last,
    /// `softmax_before_last`: softmax over positions per head, then max over
    /// heads ([`SoftmaxBeforeLast`]).
    SoftmaxBeforeLast,
    /// `uniform`: observation window, every window query weighs 1 ([`Window`]).
    Uniform,
    /// `exp`: observation window, query `i` of `w` weighs `0.5^(w-1-i)`
    /// ([`Window`]).
    Exp,
}

impl SelectorKind {
    /// The accepted spellings, for error messages.
    pub const ALLOWED: &'static str = "\"last\", \"softmax_before_last\", \"uniform\", \"exp\"";
}

/// A scoring rule: scores of prompt positions, `(P,)` f32, higher is more
/// important. Top-k and the prompt-tail rule live in [`select_keeping`].
pub trait Selector: Send + Sync + std::fmt::Debug {
    /// How many of the newest queries the selector looks at.
    fn window(&self) -> usize;
    /// Scores `(P,)` f32 of the prompt keys `prompt_keys` `(kv_h, P, d)` for
    /// the newest queries `queries` `(w', h, d)` (oldest first, at least
    /// one), with logits scaled by `scale`.
    ///
    /// # Errors
    /// If the shapes do not fit or a tensor operation fails.
    fn scores(&self, queries: &Tensor, prompt_keys: &Tensor, scale: f64) -> Result<Tensor>;
}

/// `(w, P)` f32: for each window query, the max over query heads of its
/// scaled logits over the prompt keys, optionally softmax-normalised over
/// positions per head first. `queries` `(w, h, d)`, `keys` `(kv_h, P, d)`.
///
/// # Errors
/// If a tensor is not rank 3, `h` is not a multiple of `kv_h`, or a tensor
/// operation fails.
///
/// # Panics
/// If `keys` has no KV heads (`kv_h == 0`).
pub fn head_max_scores(
    queries: &Tensor,
    keys: &Tensor,
    scale: f64,
    softmax: bool,
) -> Result<Tensor> {
    let (w, h, d) = queries.dims3()?;
    let (kv_h, p, _) = keys.dims3()?;
    if h % kv_h != 0 {
        candle_core::bail!("query heads {h} are not a multiple of KV heads {kv_h}");
    }
    let g = h / kv_h;
    let q = queries
        .to_dtype(DType::F32)?
        .transpose(0, 1)? // (h, w, d)
        .contiguous()?
        .reshape((kv_h, g * w, d))?;
    let k = keys.to_dtype(DType::F32)?.contiguous()?;
    let s = (q.matmul(&k.t()?)? * scale)?.reshape((h, w, p))?;
    let s = if softmax {
        candle_nn::ops::softmax_last_dim(&s)?
    } else {
        s
    };
    s.max(0)
}

/// Published default: raw scaled logits of the current query, max over heads.
#[derive(Debug, Clone, Copy)]
pub struct Last;

impl Selector for Last {
    fn window(&self) -> usize {
        1
    }
    fn scores(&self, queries: &Tensor, keys: &Tensor, scale: f64) -> Result<Tensor> {
        // The current query `(h, d)`, scored fused: keys read in place, no
        // `(h, P)` logit matrix.
        let q = queries.get(queries.dim(0)? - 1)?;
        omnikv_kernels::ops::score_max(&q, keys, scale)
    }
}

/// Softmax over positions per head, then max over heads.
#[derive(Debug, Clone, Copy)]
pub struct SoftmaxBeforeLast;

impl Selector for SoftmaxBeforeLast {
    fn window(&self) -> usize {
        1
    }
    fn scores(&self, queries: &Tensor, keys: &Tensor, scale: f64) -> Result<Tensor> {
        let n = queries.dim(0)?;
        head_max_scores(&queries.narrow(0, n - 1, 1)?, keys, scale, true)?.squeeze(0)
    }
}

/// Observation window: `s_j = sum_i weight_i * max_h softmax_j(q_i . k_j /
/// sqrt(d))`; `uniform` weighs every query 1, `exp` weighs query `i` (0 =
/// oldest of the `m <= w` queries given) by `0.5^(m-1-i)`.
///
/// Published semantics (OmniKV `modeling/omnikv.py`,
/// `select_tokens_by_attn_universal`): the queries are the window's hidden
/// states projected with `q_proj` and all rotated at the *current* decode
/// position, and the softmax over `j` runs over the candidate positions only
/// (the prompt without its tail inside the window). [`select_keeping`] passes
/// only the candidates' keys; the backend rotates the window
/// ([`super::queries`]).
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// `w`, the number of newest queries scored (`window_size`).
    pub size: usize,
    /// `exp` weights when true, `uniform` when false.
    pub exponential: bool,
}

impl Selector for Window {
    fn window(&self) -> usize {
        self.size
    }
    fn scores(&self, queries: &Tensor, keys: &Tensor, scale: f64) -> Result<Tensor> {
        let w = queries.dim(0)?;
        let p = head_max_scores(queries, keys, scale, true)?; // (w, P)
        if !self.exponential {
            return p.sum(0);
        }
        let weights: Vec<f32> = (0..w).map(|i| 0.5f32.powi((w - 1 - i) as i32)).collect();
        let weights = Tensor::from_vec(weights, (w, 1), queries.device())?;
        p.broadcast_mul(&weights)?.sum(0)
    }
}

/// The selector of `kind`; `window_size` is `w` for the window selectors.
pub fn make_selector(kind: SelectorKind, window_size: usize) -> Box<dyn Selector> {
    match kind {
        SelectorKind::Last => Box::new(Last),
        SelectorKind::SoftmaxBeforeLast => Box::new(SoftmaxBeforeLast),
        SelectorKind::Uniform => Box::new(Window {
            size: window_size,
            exponential: false,
        }),
        SelectorKind::Exp => Box::new(Window {
            size: window_size,
            exponential: true,
        }),
    }
}

/// The top-k of the kernels crate: indices of the `k` largest scores,
/// ascending (ties to the earlier position, NaN lowest).
pub use omnikv_kernels::cpu::top_k_sorted;

/// Prompt positions kept at every step whatever their score (an opt-in
/// extension; the published selection keeps none). Both count against the
/// budget.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Keep {
    /// The first prompt positions (attention sinks).
    pub sink: usize,
    /// The last prompt positions.
    pub recent: usize,
}

/// The whole selection for one sequence at one decode step.
///
/// * `queries`: `(w', h, d)`, the newest `w' <= selector.window()` queries,
///   the current token's last;
/// * `prompt_keys`: `(kv_h, P, d)`;
/// * `decoded`: how many generated positions (the current one included) the
///   window holds so far.
///
/// Returns the sorted prompt positions to attend. While a window selector's
/// window still reaches into the prompt (`decoded < w`), the last `w - decoded`
/// prompt positions are kept and `k` shrinks by as many (at least 1), as the
/// spec's prompt-tail rule says (spec: "Selection at a filter layer"); the
/// other prompt positions are the *candidates*, and the selector's softmax
/// runs over them only (published code: keys cut to `consider_len`).
///
/// Window selectors expect `queries` rotated at the current position (see
/// [`super::queries`]).
///
/// # Errors
/// As [`select_keeping`].
pub fn select(
    selector: &dyn Selector,
    queries: &Tensor,
    prompt_keys: &Tensor,
    scale: f64,
    k: usize,
    decoded: usize,
) -> Result<Vec<u32>> {
    select_keeping(
        selector,
        queries,
        prompt_keys,
        scale,
        k,
        decoded,
        Keep::default(),
    )
}

/// [`select`] that also always keeps `keep.sink` leading and `keep.recent`
/// trailing prompt positions, within the same budget `k`: the top-k runs over
/// the positions between them with what is left of `k` (at least 1).
/// Returns every prompt position when `k >= P` or the kept positions cover
/// the prompt.
///
/// # Errors
/// If `prompt_keys` is not rank 3, or scoring or the top-k fails.
pub fn select_keeping(
    selector: &dyn Selector,
    queries: &Tensor,
    prompt_keys: &Tensor,
    scale: f64,
    k: usize,
    decoded: usize,
    keep: Keep,
) -> Result<Vec<u32>> {
    select_keeping_across(
        selector,
        queries,
        prompt_keys,
        scale,
        k,
        decoded,
        keep,
        None,
    )
}

/// [`select_keeping`] for one rank of several (`tp`): `queries` and
/// `prompt_keys` hold this rank's heads only, and the top-k runs over the
/// global scores, the max over every rank's ([`shared_top_k`]), so every
/// rank returns the same positions, those the single-device selection over
/// all heads returns. Exact for selectors whose score is a max over heads
/// of a per-head value (`last`); the backend refuses the others under
/// tensor parallelism. `tp = None` is [`select_keeping`].
///
/// # Errors
/// As [`select_keeping`], and if the collective fails.
#[allow(clippy::too_many_arguments)]
pub fn select_keeping_across(
    selector: &dyn Selector,
    queries: &Tensor,
    prompt_keys: &Tensor,
    scale: f64,
    k: usize,
    decoded: usize,
    keep: Keep,
    tp: Option<&TensorParallel>,
) -> Result<Vec<u32>> {
    let p = prompt_keys.dim(1)?;
    if k >= p {
        return Ok((0..p as u32).collect());
    }
    let window_tail = if selector.window() > 1 {
        selector.window().saturating_sub(decoded).min(p)
    } else {
        0
    };
    let tail = window_tail.max(keep.recent).min(p);
    let sink = keep.sink.min(p - tail);
    if sink + tail == p {
        return Ok((0..p as u32).collect());
    }
    let rest = p - tail;
    // Only the candidates are scored: the prompt tail inside a window
    // selector's window is kept anyway, and is outside the softmax
    // normaliser too, as in the published code (its keys are cut to the
    // candidates before scoring).
    let candidates = p - window_tail;
    let scores = selector.scores(queries, &prompt_keys.narrow(1, 0, candidates)?, scale)?;
    // Top-k where the scores are (on the GPU too); only k indices come back.
    let middle = scores.narrow(0, sink, rest - sink)?;
    let k_middle = k.saturating_sub(sink + tail).max(1);
    let top = match tp {
        None => omnikv_kernels::ops::top_k(&middle, k_middle)?.to_vec1::<u32>()?,
        Some(tp) => shared_top_k(&middle, k_middle, tp)?,
    };
    let mut out: Vec<u32> = (0..sink as u32).collect();
    out.extend(top.into_iter().map(|i| i + sink as u32));
    out.extend(rest as u32..p as u32);
    Ok(out)
}

/// One sequence's selection at a filter layer: ascending prompt positions
/// that the sparse layers it serves attend (spec: "Selection at a filter
/// layer").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// One set for every head (published).
    Shared(Vec<u32>),
    /// One set per KV head, `kv_h` of them (`selection_per_kv_head`, an
    /// opt-in extension): KV head `j` and the query heads that read it
    /// attend set `j`.
    PerKvHead(Vec<Vec<u32>>),
}

impl Selection {
    /// The set every head attends, or `None` for a per-KV-head selection.
    pub fn shared(&self) -> Option<&[u32]> {
        match self {
            Selection::Shared(rows) => Some(rows),
            Selection::PerKvHead(_) => None,
        }
    }

    /// The positions KV head `kv_head` attends.
    ///
    /// # Panics
    /// If a per-KV-head selection has no set for `kv_head`.
    pub fn for_kv_head(&self, kv_head: usize) -> &[u32] {
        match self {
            Selection::Shared(rows) => rows,
            Selection::PerKvHead(sets) => &sets[kv_head],
        }
    }

    /// Whether every head attends all `p` prompt positions (the sparse
    /// layers then run dense attention).
    pub fn covers(&self, p: usize) -> bool {
        match self {
            Selection::Shared(rows) => rows.len() >= p,
            Selection::PerKvHead(sets) => sets.iter().all(|s| s.len() >= p),
        }
    }

    /// Positions attended per KV head, the mean over KV heads (for a shared
    /// set, its length): the selection's size in rows, comparable between
    /// both forms at equal bytes read.
    pub fn rows_per_kv_head(&self) -> f64 {
        match self {
            Selection::Shared(rows) => rows.len() as f64,
            Selection::PerKvHead(sets) if sets.is_empty() => 0.0,
            Selection::PerKvHead(sets) => {
                sets.iter().map(|s| s.len()).sum::<usize>() as f64 / sets.len() as f64
            }
        }
    }
}

/// [`select_keeping`] (with [`mass_capped`] when `target` is set) once per
/// KV head (`selection_per_kv_head`): KV head `j` ranks prompt positions by
/// the scores of its own query group only (query heads `j*g .. (j+1)*g`,
/// `g = h / kv_h`; for `last`, the max over that group of the current
/// query's scaled logits) and keeps its own top-k, with the same budget `k`
/// per head. Every KV head reads as many rows as a shared selection of the
/// same budget, so the bytes read per step are equal.
///
/// * `queries`: `(w', h, d)`, as for [`select`];
/// * `keys`: `(kv_h, n, d)`, the sequence's whole cache at this layer (the
///   first `p` rows are the prompt);
/// * `decoded`: as for [`select`].
///
/// # Errors
/// If `h` is not a multiple of `kv_h`, or scoring, the top-k or the mass
/// fails.
#[allow(clippy::too_many_arguments)]
pub fn select_per_kv_head(
    selector: &dyn Selector,
    queries: &Tensor,
    keys: &Tensor,
    p: usize,
    scale: f64,
    k: usize,
    decoded: usize,
    keep: Keep,
    target: Option<f64>,
) -> Result<Selection> {
    let (_, h, _) = queries.dims3()?;
    let kv_h = keys.dim(0)?;
    if kv_h == 0 || h % kv_h != 0 {
        candle_core::bail!("query heads {h} are not a multiple of KV heads {kv_h}");
    }
    let g = h / kv_h;
    let mut sets = Vec::with_capacity(kv_h);
    for j in 0..kv_h {
        let q = queries.narrow(1, j * g, g)?; // (w', g, d)
        let head_keys = keys.narrow(0, j, 1)?; // (1, n, d)
        let prompt_keys = head_keys.narrow(1, 0, p)?;
        let mut sel = select_keeping(selector, &q, &prompt_keys, scale, k, decoded, keep)?;
        if let Some(target) = target {
            let current = q.get(q.dim(0)? - 1)?; // (g, d)
            sel = mass_capped(&sel, &current, &head_keys, p, scale, target, keep)?;
        }
        sets.push(sel);
    }
    Ok(Selection::PerKvHead(sets))
}

/// The mass-based budget (`selection_mass`, not in the published schema):
/// of a selection `sel` (prompt positions), keep the fewest, in order of
/// their attention mass, whose mass together with the rows every step
/// attends anyway (positions from `p` on, the generated rows, and the
/// positions `keep` always selects) reaches `target` of the filter layer's
/// softmax attention; at least one. The budget that sized `sel` stays the
/// cap, so a concentrated distribution reads fewer rows and a flat one
/// reads the budget.
///
/// Mass: the softmax over every key of `keys` `(kv_h, n, d)` (prompt and
/// generated rows) of the current query `q` `(h, d)`, logits scaled by
/// `scale`, mean over query heads (query head `i` reads KV head
/// `i / (h / kv_h)`). Returns positions ascending.
///
/// # Errors
/// If the shapes do not fit (`h` not a multiple of `kv_h`) or a tensor
/// operation fails.
pub fn mass_capped(
    sel: &[u32],
    q: &Tensor,
    keys: &Tensor,
    p: usize,
    scale: f64,
    target: f64,
    keep: Keep,
) -> Result<Vec<u32>> {
    let mass = mean_head_mass(q, keys, scale)?;
    let n = mass.len();
    let p = p.min(n);
    let forced = |j: usize| j < keep.sink || j + keep.recent >= p;
    let mut covered: f64 = mass[p..].iter().sum();
    let mut out = Vec::with_capacity(sel.len());
    let mut rest = Vec::with_capacity(sel.len());
    for &j in sel {
        if forced(j as usize) {
            covered += mass[j as usize];
            out.push(j);
        } else {
            rest.push(j);
        }
    }
    rest.sort_by(|&a, &b| {
        mass[b as usize]
            .total_cmp(&mass[a as usize])
            .then(a.cmp(&b))
    });
    for j in rest {
        if covered >= target && !out.is_empty() {
            break;
        }
        covered += mass[j as usize];
        out.push(j);
    }
    out.sort_unstable();
    Ok(out)
}

/// Softmax attention of `q` `(h, d)` over `keys` `(kv_h, n, d)`, mean over
/// query heads: `n` values summing to 1.
fn mean_head_mass(q: &Tensor, keys: &Tensor, scale: f64) -> Result<Vec<f64>> {
    let q = q.to_dtype(candle_core::DType::F32)?;
    let keys = keys.to_dtype(candle_core::DType::F32)?;
    let (h, _) = q.dims2()?;
    let (kv_h, n, _) = keys.dims3()?;
    if kv_h == 0 || h % kv_h != 0 {
        candle_core::bail!("mass of {h} query heads over {kv_h} KV heads");
    }
    let g = h / kv_h;
    let mut mass = vec![0f64; n];
    for kh in 0..kv_h {
        let logits = q
            .narrow(0, kh * g, g)?
            .matmul(&keys.get(kh)?.t()?)?
            .to_vec2::<f32>()?;
        for row in logits {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64 * scale;
            let e: Vec<f64> = row
                .iter()
                .map(|&x| (x as f64 * scale - max).exp())
                .collect();
            let sum: f64 = e.iter().sum();
            for (m, x) in mass.iter_mut().zip(e) {
                *m += x / sum / h as f64;
            }
        }
    }
    Ok(mass)
}
