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
        .flat_map(|i| {
            (0..n).map(move |j| {
                if j <= past + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (s, n), device)
}

/// Shapes of an attention call, checked once.
struct Dims {
    b: usize,
    h: usize,
    s: usize,
    d: usize,
    kv_h: usize,
    n: usize,
}

impl Dims {
    fn of(q: &Tensor, k: &Tensor) -> Result<Self> {
        let (b, h, s, d) = q.dims4()?;
        let (_, kv_h, n, _) = k.dims4()?;
        if h % kv_h != 0 {
            candle_core::bail!("query heads {h} are not a multiple of KV heads {kv_h}");
        }
        if n < s {
            candle_core::bail!("{n} cached keys cannot hold {s} new positions");
        }
        Ok(Self {
            b,
            h,
            s,
            d,
            kv_h,
            n,
        })
    }
}

/// Causal scaled dot-product attention.
///
/// * `q`: `(b, h, s, d)`, the `s` newest positions;
/// * `k`, `v`: `(b, kv_h, past + s, d)` with `h % kv_h == 0` (query head
///   `i` reads KV head `i / (h / kv_h)`);
///
/// returns `(b, h, s, d)` in `q`'s dtype. Softmax runs in f32.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
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
        let qc = q
            .narrow(3, start, c)?
            .contiguous()?
            .reshape((b, kv_h, g * c, d))?;
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

/// Dot product in f32, accumulated four products at a time. The summation
/// order is fixed (and the same as mistral.rs's CPU attention kernel), so the
/// dense path reproduces the stock cache's logits bit for bit.
#[inline]
fn dot4(a: &[f32], b: &[f32]) -> f32 {
    let mut sum = 0f32;
    let chunks = a.len() / 4;
    for i in 0..chunks {
        let j = i * 4;
        sum += a[j] * b[j] + a[j + 1] * b[j + 1] + a[j + 2] * b[j + 2] + a[j + 3] * b[j + 3];
    }
    for j in chunks * 4..a.len() {
        sum += a[j] * b[j];
    }
    sum
}

/// Running state of a streaming softmax over key positions.
#[derive(Clone)]
struct Online {
    acc: Vec<f32>,
    sum: f32,
    max: f32,
}

impl Online {
    fn new(d: usize) -> Self {
        Self {
            acc: vec![0.0; d],
            sum: 0.0,
            max: f32::NEG_INFINITY,
        }
    }

    /// Add one key with logit `s` and value row `v`.
    #[inline]
    fn push(&mut self, s: f32, v: &[f32]) {
        let mut ms = 1.0f32;
        let mut vs = 1.0f32;
        if s > self.max {
            let old = self.max;
            self.max = s;
            ms = (old - s).exp();
            self.acc.iter_mut().for_each(|a| *a *= ms);
        } else {
            vs = (s - self.max).exp();
        }
        for (a, x) in self.acc.iter_mut().zip(v) {
            *a += x * vs;
        }
        self.sum = self.sum * ms + vs;
    }

    /// Merge a later block of keys into this one.
    fn merge(&mut self, other: &Online) {
        if self.max >= other.max {
            let f = (other.max - self.max).exp();
            for (a, b) in self.acc.iter_mut().zip(&other.acc) {
                *a += b * f;
            }
            self.sum += other.sum * f;
        } else {
            let f = (self.max - other.max).exp();
            for (a, b) in self.acc.iter_mut().zip(&other.acc) {
                *a = b + *a * f;
            }
            self.sum = other.sum + self.sum * f;
            self.max = other.max;
        }
    }

    fn finish(&self, out: &mut [f32]) {
        let inv = 1.0 / self.sum;
        for (o, a) in out.iter_mut().zip(&self.acc) {
            *o = a * inv;
        }
    }
}

/// Keys per block of a decode step (blocks run in parallel, then merge in order).
const DECODE_TILE: usize = 16;

fn to_f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?
        .contiguous()?
        .flatten_all()?
        .to_vec1::<f32>()
}

/// Causal attention with a streaming (online) softmax, computed in f32 with a
/// fixed summation order: prompt rows stream over their visible keys in
/// order; a decode step streams over blocks of [`DECODE_TILE`] keys in
/// parallel and merges the blocks in order. Same shapes and contract as
/// [`causal_attention`]; this is the exact dense path (identical logits to the
/// stock cache), [`causal_attention`] the blocked-matmul alternative.
pub fn streaming_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    use rayon::prelude::*;
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
    let (qv, kv, vv) = (to_f32_vec(q)?, to_f32_vec(k)?, to_f32_vec(v)?);
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
    if s == 1 {
        let tiles = n.div_ceil(DECODE_TILE);
        let partial: Vec<Vec<Online>> = (0..tiles)
            .into_par_iter()
            .map(|t| {
                let (start, end) = (t * DECODE_TILE, ((t + 1) * DECODE_TILE).min(n));
                (0..b * h)
                    .map(|bh| {
                        let (bi, hi) = (bh / h, bh % h);
                        let qr = row(&qv, d, bi, hi, 0, h, 1);
                        let mut o = Online::new(d);
                        for j in start..end {
                            let logit = dot4(qr, row(&kv, d, bi, hi / g, j, kv_h, n)) * scale;
                            o.push(logit, row(&vv, d, bi, hi / g, j, kv_h, n));
                        }
                        o
                    })
                    .collect()
            })
            .collect();
        for bh in 0..b * h {
            let mut acc = partial[0][bh].clone();
            for tile in &partial[1..] {
                acc.merge(&tile[bh]);
            }
            acc.finish(&mut out[bh * d..(bh + 1) * d]);
        }
    } else {
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
