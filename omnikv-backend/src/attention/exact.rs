//! The exact dense kernel: a streaming (online) softmax in f32 with the
//! stock mistral.rs CPU kernel's summation order, so the dense path of
//! every backend reproduces the stock cache's logits bit for bit.

use candle_core::{Result, Tensor};
use omnikv_kernels::cpu::{decode_tiles, dot4, to_f32_vec, with_rows, Online};

use super::{device_attention, Dims};

/// Causal attention with a streaming (online) softmax, computed in f32 with a
/// fixed summation order: prompt rows stream over their visible keys in
/// order; a decode step streams over blocks of [`omnikv_kernels::cpu::DECODE_TILE`] keys in
/// parallel and merges the blocks in order. This is the exact dense path
/// (identical logits to the stock cache).
///
/// * `q`: `(b, h, s, d)`, the `s` newest positions;
/// * `k`, `v`: `(b, kv_h, past + s, d)` with `h % kv_h == 0` (query head
///   `i` reads KV head `i / (h / kv_h)`);
///
/// returns `(b, h, s, d)` in `q`'s dtype; arithmetic in f32. Not on the
/// CPU, runs [`super::device_attention`].
///
/// # Errors
/// If a tensor is not rank 4, `h` is not a multiple of `kv_h`, the cache
/// holds fewer than `s` keys, or a tensor operation fails.
///
/// # Panics
/// If `k` has no KV heads (`kv_h == 0`).
pub fn exact_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    exact_kernel(q, k, v, scale, false)
}

/// [`exact_attention`] for a prompt pass: every position streams over its
/// visible keys in order, also when the pass holds a single position (the
/// rest of a prompt after a prefix-cache hit), so a prompt position's output
/// does not depend on how its prompt was split into passes. Same shapes,
/// errors and panics as [`exact_attention`].
///
/// # Errors
/// As [`exact_attention`].
pub fn exact_prompt_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    exact_kernel(q, k, v, scale, true)
}

fn exact_kernel(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, prompt: bool) -> Result<Tensor> {
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
    let qv = to_f32_vec(q)?;
    fn row(
        t: &[f32],
        d: usize,
        bi: usize,
        head: usize,
        pos: usize,
        heads: usize,
        len: usize,
    ) -> &[f32] {
        let base = ((bi * heads + head) * len + pos) * d;
        &t[base..base + d]
    }
    let mut out = vec![0f32; b * h * s * d];
    if s == 1 && !prompt {
        // Keys and values are read in place from the cache (f16/bf16 rows
        // converted a tile at a time), not copied to f32 as a whole: the
        // arithmetic is unchanged, the per-step conversion of the entire
        // cache is gone.
        out = with_rows(k, |kr| {
            with_rows(v, |vr| {
                Ok(decode_tiles(
                    &qv,
                    b,
                    h,
                    kv_h,
                    d,
                    n,
                    scale,
                    &|bi, kh, j, ko, vo| {
                        kr.load(bi, kh, j, ko);
                        vr.load(bi, kh, j, vo);
                    },
                ))
            })
        })?;
    } else {
        let (kv, vv) = (to_f32_vec(k)?, to_f32_vec(v)?);
        out.par_chunks_mut(d).enumerate().for_each(|(r, o)| {
            let (bi, rem) = (r / (h * s), r % (h * s));
            let (hi, qi) = (rem / s, rem % s);
            let qr = row(&qv, d, bi, hi, qi, h, s);
            let mut acc = Online::new(d);
            for j in 0..=past + qi {
                let logit = dot4(qr, row(&kv, d, bi, hi / g, j, kv_h, n)) * scale;
                acc.push(logit, row(&vv, d, bi, hi / g, j, kv_h, n));
            }
            acc.finish(o);
        });
    }
    Tensor::from_vec(out, (b, h, s, d), q.device())?.to_dtype(q.dtype())
}
