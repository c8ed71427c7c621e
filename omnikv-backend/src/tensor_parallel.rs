//! Tensor parallelism: this process as one rank of several, through the
//! host's communicator (`mistralrs_quant::Comm`: NCCL across GPUs, or the
//! ring backend across processes over TCP, configured by `RING_CONFIG`).
//!
//! `llama_omnikv` splits its heads as the host's Llama does (Megatron-style:
//! query, key, value, gate and up projections by output rows, output and down
//! projections by input columns, their partial products summed across ranks
//! with [`TensorParallel::sum`]); the `omnikv` backend then sees only this
//! rank's heads. At a filter layer every rank must attend the same prompt
//! rows, so the ranks merge their local top-k exactly
//! ([`shared_top_k`], [`merge_top_k`]).

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};
use mistralrs_quant::distributed::AllGather;
use mistralrs_quant::{Comm, SumAllReduce};

/// This rank's place among the ranks and its collectives.
pub struct TensorParallel {
    comm: Arc<Comm>,
    reduce: SumAllReduce,
    gather: AllGather,
}

impl std::fmt::Debug for TensorParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorParallel")
            .field("rank", &self.rank())
            .field("world_size", &self.world_size())
            .finish()
    }
}

impl TensorParallel {
    /// The ranks of `comm`, or `None` when it has one rank (nothing to
    /// split: the model stays exactly the single-device one).
    pub fn new(comm: Arc<Comm>) -> Option<Arc<Self>> {
        if comm.world_size() <= 1 {
            return None;
        }
        Some(Arc::new(Self {
            reduce: SumAllReduce::new(&comm),
            gather: AllGather::new(&comm, 0),
            comm,
        }))
    }

    /// This process's rank, `0..world_size`.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// The number of ranks (at least 2).
    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// `x` summed over the ranks, elementwise (every rank gets the same
    /// tensor). Same shape and dtype as `x`.
    ///
    /// # Errors
    /// If the collective fails (a rank left, a dtype the backend does not
    /// carry).
    pub fn sum(&self, x: &Tensor) -> Result<Tensor> {
        self.reduce.sum_all_reduce(x)
    }

    /// Every rank's `local` (the same length on every rank), concatenated
    /// in rank order: `world_size * local.len()` values. `device` is the
    /// device of the communicator (the model's).
    ///
    /// # Errors
    /// If the collective fails.
    pub fn all_gather_f32(&self, local: &[f32], device: &Device) -> Result<Vec<f32>> {
        let t = Tensor::from_slice(local, (1, local.len()), device)?;
        self.gather
            .all_gather(&t)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()
    }
}

/// The `k` best positions of the union of the ranks' local top-k lists,
/// ascending: `candidates` are `(position, local score)` pairs of every
/// rank, in any order, a position possibly listed by several ranks.
///
/// A position's global score is the max over ranks of its local score (the
/// `last` selector's score is a max over query heads, and the heads are
/// split across ranks). If every rank sends its local top-k (same `k`,
/// ordered as [`omnikv_kernels::cpu::top_k_sorted`]: higher score first,
/// NaN lowest, ties to the earlier position), the result equals the
/// single-device top-k of the global scores: a position of the global
/// top-k is in the local top-k of the rank where it scores highest
/// (otherwise `k` positions beat it there, and so globally), so its merged
/// score is its global score; any other candidate's merged score is at most
/// its global score, so it cannot overtake a global winner.
pub fn merge_top_k(candidates: &[(u32, f32)], k: usize) -> Vec<u32> {
    let key = |s: f32| if s.is_nan() { f32::NEG_INFINITY } else { s };
    let mut best: Vec<(u32, f32)> = candidates.iter().map(|&(p, s)| (p, key(s))).collect();
    // Per position, its highest score.
    best.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.total_cmp(&a.1)));
    best.dedup_by_key(|c| c.0);
    best.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    best.truncate(k);
    let mut out: Vec<u32> = best.into_iter().map(|(p, _)| p).collect();
    out.sort_unstable();
    out
}

/// The top-`k` positions of `scores` `(P,)` (this rank's scores over its own
/// heads) by the global score, the max over every rank's scores, the same on
/// every rank: local top-k on the device, one all-gather of `k` (score,
/// position) pairs per rank, and [`merge_top_k`]. Positions ascending.
///
/// # Errors
/// If `k` is 0 or above `P`, `P` is beyond 2^24 (positions travel as f32),
/// or the top-k or the collective fails.
pub fn shared_top_k(scores: &Tensor, k: usize, tp: &TensorParallel) -> Result<Vec<u32>> {
    let p = scores.dim(0)?;
    if k == 0 || k > p {
        candle_core::bail!("shared top-k of {k} among {p} positions");
    }
    if p > 1 << 24 {
        candle_core::bail!("shared top-k over {p} positions: at most 2^24 positions");
    }
    let top = omnikv_kernels::ops::top_k(scores, k)?;
    let values = scores
        .index_select(&top, 0)?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?;
    let positions = top.to_vec1::<u32>()?;
    let mut local = values;
    local.extend(positions.iter().map(|&i| i as f32));
    let all = tp.all_gather_f32(&local, scores.device())?;
    let candidates: Vec<(u32, f32)> = all
        .chunks_exact(2 * k)
        .flat_map(|rank| {
            let (s, pos) = rank.split_at(k);
            pos.iter().zip(s).map(|(&i, &s)| (i as u32, s))
        })
        .collect();
    Ok(merge_top_k(&candidates, k))
}

/// The world size this process was started with: the ring backend's
/// `world_size` when `RING_CONFIG` is set (ring builds), the host's NCCL
/// world size when NCCL is in use, else 1. For refusing what cannot run
/// distributed before any rank connects.
///
/// # Errors
/// If `RING_CONFIG` names a file that cannot be read or has no
/// `world_size`, or the NCCL device count cannot be read.
pub fn requested_world_size() -> anyhow::Result<usize> {
    use anyhow::Context;
    if mistralrs_quant::distributed::use_ring() {
        let path = std::env::var("RING_CONFIG").unwrap_or_default();
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read the ring configuration RING_CONFIG=`{path}`"))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("RING_CONFIG=`{path}` is not JSON"))?;
        return v["world_size"]
            .as_u64()
            .map(|n| n as usize)
            .with_context(|| format!("RING_CONFIG=`{path}` has no `world_size`"));
    }
    if mistralrs_quant::distributed::use_nccl() {
        return Ok(mistralrs_quant::distributed::get_global_tp_size_from_devices()?);
    }
    Ok(1)
}

impl TensorParallel {
    /// Check that every rank runs with the same `setup` (a description of
    /// the model and the KV-cache configuration): ranks that disagree (for
    /// example on the selection budget) would select different rows and
    /// leave the ring out of step, answering wrongly and then hanging. One
    /// all-gather of a 64-bit fingerprint of `setup` at load. `device` is
    /// the communicator's.
    ///
    /// # Errors
    /// If the ranks' fingerprints differ (the message names the first rank
    /// that differs from rank 0), or the collective fails.
    pub fn check_same_setup(&self, setup: &str, device: &Device) -> anyhow::Result<()> {
        let h = fingerprint(setup);
        // Four 16-bit pieces: exact in f32.
        let local: Vec<f32> = (0..4).map(|i| ((h >> (16 * i)) & 0xffff) as f32).collect();
        let all = self.all_gather_f32(&local, device)?;
        let ranks: Vec<&[f32]> = all.chunks_exact(4).collect();
        if let Some(r) = ranks.iter().position(|f| *f != ranks[0]) {
            anyhow::bail!(
                "tensor parallel rank {r} runs another model or KV-cache configuration than rank 0 (this is rank {}: {setup}); start every rank with the same model arguments and the same --kv-cache-config",
                self.rank()
            );
        }
        Ok(())
    }
}

/// FNV-1a (64 bits) of `text`: the same on every machine and build.
pub fn fingerprint(text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}
