//! Dense attention computed by this crate (used for prefill and for every
//! dense layer), GQA-aware and chunked over queries.
//!
//! Queries are processed in blocks of [`QUERY_CHUNK`] positions so that the
//! score matrix held at once is `(heads, QUERY_CHUNK, kv_len)`, never the full
//! `(heads, n, n)` of a long prompt.
//!
//! ```text
//!   keys:     0 ........ past-1 | past ........ past+s-1
//!   query i:  sees all of these | sees past+0 ..= past+i
//! ```

use candle_core::{DType, Device, Result, Tensor, D};

/// Query positions per block.
pub const QUERY_CHUNK: usize = 256;

/// Additive causal mask `(s, past + s)`: 0 where query `i` may see key `j`
/// (`j <= past + i`), `-inf` elsewhere.
pub fn causal_mask(s: usize, past: usize, device: &Device) -> Result<Tensor> {
    let n = past + s;
    let mask: Vec<f32> = (0..s)
        .flat_map(|i| (0..n).map(move |j| if j <= past + i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Tensor::from_vec(mask, (s, n), device)
}

/// Causal scaled dot-product attention.
///
/// * `q`: `(b, h, s, d)`, the `s` newest positions;
/// * `k`, `v`: `(b, kv_h, past + s, d)` with `h % kv_h == 0` (query head
///   `i` reads KV head `i / (h / kv_h)`);
///
/// returns `(b, h, s, d)` in `q`'s dtype. Softmax runs in f32.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, h, s, d) = q.dims4()?;
    let (_, kv_h, n, _) = k.dims4()?;
    if h % kv_h != 0 {
        candle_core::bail!("query heads {h} are not a multiple of KV heads {kv_h}");
    }
    if n < s {
        candle_core::bail!("{n} cached keys cannot hold {s} new positions");
    }
    let g = h / kv_h;
    let past = n - s;
    let out_dtype = q.dtype();
    let k = k.to_dtype(DType::F32)?.contiguous()?;
    let v = v.to_dtype(DType::F32)?.contiguous()?;
    let kt = k.transpose(2, 3)?.contiguous()?; // (b, kv_h, d, n)
    // (b, kv_h, g, s, d): the g query heads of one KV head side by side.
    let q = q.to_dtype(DType::F32)?.reshape((b, kv_h, g, s, d))?;
    let mut outs = Vec::with_capacity(s.div_ceil(QUERY_CHUNK));
    let mut start = 0;
    while start < s {
        let c = QUERY_CHUNK.min(s - start);
        let qc = q.narrow(3, start, c)?.contiguous()?.reshape((b, kv_h, g * c, d))?;
        let scores = (qc.matmul(&kt)? * scale)?; // (b, kv_h, g*c, n)
        let scores = if s > 1 {
            // Query start+i sees keys 0 ..= past+start+i.
            let mask = causal_mask(c, past + start, q.device())?; // (c, past+start+c)
            let visible = past + start + c;
            let mask = if visible < n {
                let hidden = Tensor::full(f32::NEG_INFINITY, (c, n - visible), q.device())?;
                Tensor::cat(&[&mask, &hidden], 1)?
            } else {
                mask
            };
            scores
                .reshape((b, kv_h, g, c, n))?
                .broadcast_add(&mask)?
                .reshape((b, kv_h, g * c, n))?
        } else {
            scores
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v)?; // (b, kv_h, g*c, d)
        outs.push(out.reshape((b, kv_h, g, c, d))?);
        start += c;
    }
    let out = if outs.len() == 1 {
        outs.pop().expect("one chunk")
    } else {
        Tensor::cat(&outs, 3)?
    };
    out.reshape((b, h, s, d))?.to_dtype(out_dtype)
}

/// Plain reference: repeat KV heads, full score matrix, explicit mask.
/// Used by tests to check [`causal_attention`].
pub fn reference_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
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
