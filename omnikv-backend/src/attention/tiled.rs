//! The tiled prompt-pass kernel: tiles of query positions against the keys
//! they can see, one matrix product each way and a vectorised masked
//! softmax, never an `(n, n)` score matrix. An order of magnitude faster
//! than the exact kernel on the CPU, equal to it up to float rounding.

use candle_core::{DType, Result, Tensor};
use omnikv_kernels::cpu::exp_nonpositive;

use super::{device_attention, Dims};
use crate::batch_invariant::{matmul_fixed_blocks, matmul_fixed_rows, pad_rows, K_BLOCK};

/// Lanes of the softmax reductions: independent accumulators, so the max and
/// sum loops vectorise (a single float accumulator forces sequential order).
const LANES: usize = 16;

/// Softmax of `row[..visible]` in place (scaled by `scale` first), zeros after.
#[inline]
fn softmax_prefix(row: &mut [f32], visible: usize, scale: f32) {
    let (live, hidden) = row.split_at_mut(visible);
    let mut maxes = [f32::NEG_INFINITY; LANES];
    let mut chunks = live.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (x, m) in c.iter_mut().zip(maxes.iter_mut()) {
            *x *= scale;
            *m = m.max(*x);
        }
    }
    for x in chunks.into_remainder() {
        *x *= scale;
        maxes[0] = maxes[0].max(*x);
    }
    let max = maxes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sums = [0f32; LANES];
    let mut chunks = live.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (x, s) in c.iter_mut().zip(sums.iter_mut()) {
            *x = exp_nonpositive(*x - max);
            *s += *x;
        }
    }
    for x in chunks.into_remainder() {
        *x = exp_nonpositive(*x - max);
        sums[0] += *x;
    }
    let inv = 1.0 / sums.iter().sum::<f32>();
    live.iter_mut().for_each(|x| *x *= inv);
    hidden.iter_mut().for_each(|x| *x = 0.0);
}

/// Query positions per tile of [`tiled_causal_attention`].
pub const PREFILL_TILE: usize = 128;

/// Fast causal attention for prompt passes: for each KV head, tiles of
/// [`PREFILL_TILE`] query positions (all query heads of the group stacked)
/// take one matrix product against the keys they can see (none past the
/// tile's last position), a masked softmax with a vectorised exponential,
/// and one product with the values. The score block held at once is
/// `(g * PREFILL_TILE, visible)`, never `(n, n)`; the products use candle's
/// threaded GEMM. Same shapes and contract as [`super::exact_attention`];
/// results agree with [`super::matmul_attention`] to float rounding (not bit
/// for bit with the stock kernel: that is [`super::exact_attention`]).
///
/// # Errors
/// If a tensor is not rank 4, `h` is not a multiple of `kv_h`, the cache
/// holds fewer than `s` keys, or a tensor operation fails.
///
/// # Panics
/// If `k` has no KV heads (`kv_h == 0`).
pub fn tiled_causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    use rayon::prelude::*;
    if !q.device().is_cpu() {
        return device_attention(q, k, v, scale);
    }
    let Dims {
        b,
        h,
        s,
        d,
        kv_h,
        n,
    } = Dims::of(q, k)?;
    let g = h / kv_h;
    let past = n - s;
    let scale = scale as f32;
    let dev = q.device();
    let out_dtype = q.dtype();
    let q = q.to_dtype(DType::F32)?.contiguous()?;
    let k = k.to_dtype(DType::F32)?.contiguous()?;
    let v = v.to_dtype(DType::F32)?.contiguous()?;
    let mut out = vec![0f32; b * h * s * d];
    // Keys and values zero-padded to whole reduction blocks: every tile's
    // products then have fixed shapes without copying (see below).
    let n_pad = n.div_ceil(K_BLOCK) * K_BLOCK;
    for bi in 0..b {
        for kh in 0..kv_h {
            let kb = pad_rows(&k.get(bi)?.get(kh)?, n_pad)?; // (n_pad, d)
            let vb = pad_rows(&v.get(bi)?.get(kh)?, n_pad)?;
            // (g, s, d): the query heads reading this KV head.
            let qb = q.get(bi)?.narrow(0, kh * g, g)?;
            let mut start = 0;
            while start < s {
                let c = PREFILL_TILE.min(s - start);
                // Keys this tile sees, and that count rounded up to whole
                // reduction blocks (the extra columns get probability 0).
                let seen = past + start + c;
                let visible = seen.div_ceil(K_BLOCK) * K_BLOCK;
                let qt = qb.narrow(1, start, c)?.contiguous()?.reshape((g * c, d))?;
                // Batch-invariant products (crate::batch_invariant): every
                // tile is computed as a full one, and the values' reduction
                // in fixed key blocks, so a position's output does not
                // depend on how its prompt was split into passes.
                let scores =
                    matmul_fixed_rows(&qt, &kb.narrow(0, 0, seen)?.t()?, g * PREFILL_TILE)?
                        .flatten_all()?
                        .to_vec1::<f32>()?; // (g*c, seen)
                let mut sv = vec![0f32; g * c * visible];
                sv.par_chunks_mut(visible)
                    .zip(scores.par_chunks(seen))
                    .enumerate()
                    .for_each(|(r, (row, sc))| {
                        row[..seen].copy_from_slice(sc);
                        let i = r % c; // query start+i sees keys ..= past+start+i
                        softmax_prefix(&mut row[..seen], past + start + i + 1, scale);
                    });
                let probs = Tensor::from_vec(sv, (g * c, visible), dev)?;
                let o = matmul_fixed_blocks(
                    &probs,
                    &vb.narrow(0, 0, visible)?,
                    g * PREFILL_TILE,
                    K_BLOCK,
                )?
                .flatten_all()?
                .to_vec1::<f32>()?; // (g*c, d)
                for gi in 0..g {
                    let head = kh * g + gi;
                    let dst = ((bi * h + head) * s + start) * d;
                    out[dst..dst + c * d].copy_from_slice(&o[gi * c * d..(gi + 1) * c * d]);
                }
                start += c;
            }
        }
    }
    Tensor::from_vec(out, (b, h, s, d), dev)?.to_dtype(out_dtype)
}
