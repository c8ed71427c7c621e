//! Inter-layer recall and filter-layer proposals (spec: "Finding filter
//! layers").
//!
//! At a decode step, layer `l`'s distribution over prompt positions is
//! `p_l = softmax_j(max_h q_h . k_j * scale)`; the recall of layer `b` by layer
//! `a`'s top-K set is `S(a, b) = sum_{j in TopK(p_a)} p_b(j)`. A recording
//! backend (config key `record_recall`) decodes densely and accumulates `S`
//! over steps and sequences; [`propose`] then picks filter layers with a
//! dynamic program over `S`.

use std::path::PathBuf;
use std::sync::Mutex;

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use super::selector::{head_max_scores, top_k_sorted};

/// `p_l` for one sequence: `queries` `(1, h, d)`, `keys` `(kv_h, P, d)`.
/// Returns `P` probabilities (softmax in f64, stored as f32).
///
/// # Errors
/// As [`head_max_scores`], or if `queries` holds more than one query.
///
/// # Panics
/// If `keys` has no KV heads (`kv_h == 0`).
pub fn head_max_distribution(queries: &Tensor, keys: &Tensor, scale: f64) -> Result<Vec<f32>> {
    let s: Vec<f32> = head_max_scores(queries, keys, scale, false)?
        .squeeze(0)?
        .to_vec1()?;
    let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f64> = s.iter().map(|x| ((x - max) as f64).exp()).collect();
    let sum: f64 = e.iter().sum();
    Ok(e.iter().map(|x| (x / sum) as f32).collect())
}

/// `S(a, b)` of one step for all layer pairs, row-major `L x L`, from the
/// `L` layers' distributions `dists` and the budget `k` (tokens).
///
/// # Panics
/// If the distributions differ in length (a top-k position of a longer one
/// indexes past a shorter one).
pub fn step_recall(dists: &[Vec<f32>], k: usize) -> Vec<f64> {
    let l = dists.len();
    let mut out = vec![0.0; l * l];
    for (a, pa) in dists.iter().enumerate() {
        let top = top_k_sorted(pa, k);
        for (b, pb) in dists.iter().enumerate() {
            out[a * l + b] = top.iter().map(|&j| pb[j as usize] as f64).sum();
        }
    }
    out
}

/// Recall accumulated over decode steps, as written to the `record_recall`
/// file.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RecallStats {
    /// `L`, the model's layer count.
    pub layers: usize,
    /// Decode steps (per sequence) accumulated.
    pub steps: u64,
    /// The budget `K` was computed from (as in the config).
    pub budget: String,
    /// Mean `S(a, b)`, `layers x layers` (row `a` = selecting layer).
    pub recall: Vec<Vec<f64>>,
}

/// Accumulator shared by all passes of a recording backend.
#[derive(Debug)]
pub struct Recorder {
    /// The `record_recall` file, rewritten after every step.
    pub path: PathBuf,
    sum: Mutex<(u64, Vec<f64>)>,
}

impl Recorder {
    /// An empty accumulator writing to `path`.
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            sum: Mutex::new((0, Vec::new())),
        }
    }

    /// Add one step's `S` (row-major, `layers x layers`) and rewrite the
    /// file (through a `.tmp` file and a rename). A step of another size
    /// than the previous ones restarts the accumulation.
    ///
    /// # Errors
    /// If the file cannot be written.
    ///
    /// # Panics
    /// If `layers` is 0.
    pub fn add(&self, layers: usize, step: &[f64], budget: &str) -> Result<()> {
        let stats = {
            let mut g = self.sum.lock().unwrap_or_else(|e| e.into_inner());
            if g.1.len() != step.len() {
                *g = (0, vec![0.0; step.len()]);
            }
            g.0 += 1;
            for (acc, x) in g.1.iter_mut().zip(step) {
                *acc += x;
            }
            RecallStats {
                layers,
                steps: g.0,
                budget: budget.to_string(),
                recall: g
                    .1
                    .chunks(layers)
                    .map(|r| r.iter().map(|x| x / g.0 as f64).collect())
                    .collect(),
            }
        };
        let tmp = self.path.with_extension("tmp");
        let text = serde_json::to_string(&stats).map_err(candle_core::Error::msg)?;
        std::fs::write(&tmp, text)
            .and_then(|_| std::fs::rename(&tmp, &self.path))
            .map_err(|e| {
                candle_core::Error::msg(format!(
                    "omnikv: cannot write recall file `{}`: {e}",
                    self.path.display()
                ))
            })
    }
}

/// Total recall of the sparse layers under a plan: each sparse layer `l`
/// served by filter layer `f` contributes `S(f, l)`; dense layers contribute
/// nothing (they lose nothing, and every plan with the same first filter
/// layer, number of filter layers and `W` has the same number of them).
/// `recall` is the `L x L` mean of [`RecallStats::recall`], `w` is `W`.
///
/// # Panics
/// If `recall` is not square, or `filters` names a layer `>= L` that would
/// serve sparse layers.
pub fn plan_score(recall: &[Vec<f64>], filters: &[usize], w: usize) -> f64 {
    let l = recall.len();
    let mut total = 0.0;
    for (i, &f) in filters.iter().enumerate() {
        let next = filters.get(i + 1).copied().unwrap_or(l);
        for layer in (f + w + 1)..next {
            total += recall[f][layer];
        }
    }
    total
}

/// Best `m` filter layers starting at `first` (layers before it dense), each
/// next filter layer after the previous one's `w` wait-load layers, maximising
/// [`plan_score`]: a dynamic program over (filter count, position of the
/// latest filter layer). `None` if `m` filter layers do not fit. Returns
/// the filter layers (ascending) and their [`plan_score`].
///
/// # Panics
/// If `recall` is not square.
pub fn propose(recall: &[Vec<f64>], m: usize, w: usize, first: usize) -> Option<(Vec<usize>, f64)> {
    let l = recall.len();
    if m == 0 || first >= l {
        return None;
    }
    // gain(f, next): recall of the layers f serves when the next filter is `next`.
    let gain =
        |f: usize, next: usize| -> f64 { ((f + w + 1)..next).map(|layer| recall[f][layer]).sum() };
    // best[c][f]: best score of the layers before f with c+1 filters, the
    // (c+1)-th at f; parent pointers to rebuild the set.
    let mut best = vec![vec![f64::NEG_INFINITY; l]; m];
    let mut parent = vec![vec![usize::MAX; l]; m];
    best[0][first] = 0.0;
    for c in 1..m {
        for f in 0..l {
            for prev in first..f {
                if f < prev + w + 1 || best[c - 1][prev] == f64::NEG_INFINITY {
                    continue;
                }
                let v = best[c - 1][prev] + gain(prev, f);
                if v > best[c][f] {
                    best[c][f] = v;
                    parent[c][f] = prev;
                }
            }
        }
    }
    let (mut f, score) = (0..l)
        .filter(|&f| best[m - 1][f] > f64::NEG_INFINITY)
        .map(|f| (f, best[m - 1][f] + gain(f, l)))
        .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)))?;
    let mut set = vec![f];
    for c in (1..m).rev() {
        f = parent[c][f];
        set.push(f);
    }
    set.reverse();
    Some((set, score))
}
