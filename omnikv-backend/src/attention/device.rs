//! The accelerator path: attention with the tensors where they are (no copy
//! to the CPU), flash decoding for decode steps and chunked matrix-product
//! attention for prompt passes.

use candle_core::{DType, Result, Tensor, D};

use super::causal_mask;

/// Causal attention as plain tensor algebra: repeat the KV heads, form the
/// full `(s, n)` score matrix, add the causal mask, softmax, multiply. Runs
/// on any device with candle's own kernels; the accelerator prompt path
/// ([`chunked_prompt_attention`]) calls it per query chunk, and the tests use
/// it as the plain reference of the other kernels.
///
/// `q` `(b, h, s, d)`, `k`/`v` `(b, kv_h, n, d)` with `n >= s` and `h` a
/// multiple of `kv_h`; returns `(b, h, s, d)` f32.
///
/// # Errors
/// If the shapes do not fit or a tensor operation fails.
///
/// # Panics
/// If `k` has no KV heads (`kv_h == 0`).
pub fn matmul_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (_b, h, s, _d) = q.dims4()?;
    let (_, kv_h, n, _) = k.dims4()?;
    let g = h / kv_h;
    let rep = |t: &Tensor| -> Result<Tensor> {
        let (b, kh, n, d) = t.dims4()?;
        t.unsqueeze(2)?
            .expand((b, kh, g, n, d))?
            .reshape((b, kh * g, n, d))
    };
    let q = q.to_dtype(DType::F32)?;
    let k = rep(&k.to_dtype(DType::F32)?)?;
    let v = rep(&v.to_dtype(DType::F32)?)?;
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let mask = causal_mask(s, n - s, q.device())?;
    let scores = scores.broadcast_add(&mask)?;
    let max = scores.max_keepdim(D::Minus1)?;
    let e = scores.broadcast_sub(&max)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    p.matmul(&v)
}

/// Attention on an accelerator, with the tensors where they are (no copy to
/// the CPU): a decode step (`s == 1`) runs [`omnikv_kernels::ops::indexed_decode`]
/// over every cached row (flash decoding on CUDA), a prompt pass
/// [`chunked_prompt_attention`] with candle's kernels, in query chunks whose
/// score matrices stay under [`PROMPT_SCORE_BYTES`]. Same shapes and dtype
/// as [`super::exact_attention`].
///
/// # Errors
/// If the shapes do not fit or a kernel fails on the device.
///
/// # Panics
/// On a prompt pass, if `k` has no KV heads (see [`matmul_attention`]).
pub fn device_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, h, s, d) = q.dims4()?;
    let n = k.dim(2)?;
    if s != 1 {
        let chunk = (PROMPT_SCORE_BYTES / (b * h * n * 4).max(1)).clamp(1, s);
        return chunked_prompt_attention(q, k, v, scale, chunk);
    }
    let all = Tensor::arange(0u32, n as u32, q.device())?;
    let outs = (0..b)
        .map(|i| {
            omnikv_kernels::ops::indexed_decode(
                &q.get(i)?.reshape((h, d))?,
                &k.get(i)?,
                &v.get(i)?,
                &all,
                scale,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::stack(&outs, 0)?
        .reshape((b, h, 1, d))?
        .to_dtype(q.dtype())
}

/// Largest f32 score matrix [`device_attention`] forms at once in a prompt
/// pass (a 32K-token prompt would need 128 GiB for 32 heads unchunked).
pub const PROMPT_SCORE_BYTES: usize = 512 << 20;

/// Causal attention of a prompt pass in chunks of `chunk` query rows (0 is
/// taken as 1): each chunk runs [`matmul_attention`] over the keys it can
/// see, so at most `(b, h, chunk, n)` scores exist at once. Shapes as
/// [`matmul_attention`] (`n >= s`); returns `(b, h, s, d)` in `q`'s dtype.
///
/// # Errors
/// If the shapes do not fit or a tensor operation fails.
///
/// # Panics
/// If `k` has no KV heads (see [`matmul_attention`]).
pub fn chunked_prompt_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    chunk: usize,
) -> Result<Tensor> {
    let s = q.dim(2)?;
    let past = k.dim(2)? - s;
    let mut outs = Vec::with_capacity(s.div_ceil(chunk.max(1)));
    let mut start = 0;
    while start < s {
        let len = chunk.max(1).min(s - start);
        let visible = past + start + len;
        outs.push(matmul_attention(
            &q.narrow(2, start, len)?,
            &k.narrow(2, 0, visible)?,
            &v.narrow(2, 0, visible)?,
            scale,
        )?);
        start += len;
    }
    Tensor::cat(&outs, 2)?.to_dtype(q.dtype())
}
