//! Dense attention computed by this crate, GQA-aware: the exact kernel
//! ([`streaming_attention`], the stock arithmetic) for decode steps and exact
//! prefill, the tiled kernel ([`tiled_causal_attention`]) for fast prefill,
//! and a plain reference for tests.
//!
//! ```text
//!   keys:     0 ........ past-1 | past ........ past+s-1
//!   query i:  sees all of these | sees past+0 ..= past+i
//! ```

use candle_core::{DType, Device, Result, Tensor, D};

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

/// Plain reference: repeat KV heads, full score matrix, explicit mask.
/// Used by tests to check the kernels.
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

/// Attention on an accelerator, with the tensors where they are (no copy to
/// the CPU): a decode step (`s == 1`) runs [`crate::ops::indexed_decode`]
/// over every cached row (flash decoding on CUDA), a prompt pass
/// [`chunked_prompt_attention`] with candle's kernels, in query chunks whose
/// score matrices stay under [`PROMPT_SCORE_BYTES`]. Same shapes and dtype
/// as [`streaming_attention`].
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
            crate::ops::indexed_decode(
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

/// Causal attention of a prompt pass in chunks of `chunk` query rows: each
/// chunk runs [`reference_attention`] over the keys it can see. Returns
/// `(b, h, s, d)` in `q`'s dtype.
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
        outs.push(reference_attention(
            &q.narrow(2, start, len)?,
            &k.narrow(2, 0, visible)?,
            &v.narrow(2, 0, visible)?,
            scale,
        )?);
        start += len;
    }
    Tensor::cat(&outs, 2)?.to_dtype(q.dtype())
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

/// Rows of a CPU tensor `(b, heads, len, d)` whose last dimension is
/// contiguous, borrowed from its storage in their own dtype.
pub struct RowView<'a> {
    data: RowData<'a>,
    offset: usize,
    strides: [usize; 3],
    d: usize,
}

enum RowData<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
    BF16(&'a [half::bf16]),
}

impl RowView<'_> {
    /// Row `(bi, head, pos)` converted to f32 into `out` (`d` values).
    #[inline]
    pub fn load(&self, bi: usize, head: usize, pos: usize, out: &mut [f32]) {
        let at =
            self.offset + bi * self.strides[0] + head * self.strides[1] + pos * self.strides[2];
        let d = self.d;
        match self.data {
            RowData::F32(x) => out.copy_from_slice(&x[at..at + d]),
            RowData::F16(x) => {
                for (o, v) in out.iter_mut().zip(&x[at..at + d]) {
                    *o = v.to_f32();
                }
            }
            RowData::BF16(x) => {
                for (o, v) in out.iter_mut().zip(&x[at..at + d]) {
                    *o = v.to_f32();
                }
            }
        }
    }
}

/// Run `f` with a [`RowView`] of `t` (rank 4). CPU tensors in f32/f16/bf16
/// with a contiguous last dimension are borrowed in place; anything else is
/// first copied to a contiguous f32 tensor.
pub fn with_rows<R>(t: &Tensor, f: impl FnOnce(&RowView<'_>) -> Result<R>) -> Result<R> {
    let (_, _, _, d) = t.dims4()?;
    {
        let (storage, layout) = t.storage_and_layout();
        if let Some(view) = row_view(&storage, layout, d) {
            return f(&view);
        }
    }
    with_rows(&rowable(t)?, f)
}

/// A [`RowView`] of a rank-3 `(heads, len, d)` CPU storage (read with
/// `bi = 0`), if its last dimension is contiguous and its dtype f32/f16/bf16.
pub(crate) fn row_view3<'a>(
    cpu: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
) -> Option<RowView<'a>> {
    let (st, dims) = (layout.stride(), layout.dims());
    if dims.len() != 3 || (st[2] != 1 && dims[2] != 1) {
        return None;
    }
    Some(RowView {
        data: row_data(cpu)?,
        offset: layout.start_offset(),
        strides: [0, st[0], st[1]],
        d: dims[2],
    })
}

fn row_data(cpu: &candle_core::CpuStorage) -> Option<RowData<'_>> {
    use candle_core::CpuStorage;
    match cpu {
        CpuStorage::F32(x) => Some(RowData::F32(x)),
        CpuStorage::F16(x) => Some(RowData::F16(x)),
        CpuStorage::BF16(x) => Some(RowData::BF16(x)),
        _ => None,
    }
}

/// A [`RowView`] of a rank-4 tensor's storage, if it can be read in place.
fn row_view<'a>(
    storage: &'a candle_core::Storage,
    layout: &candle_core::Layout,
    d: usize,
) -> Option<RowView<'a>> {
    let st = layout.stride();
    let candle_core::Storage::Cpu(cpu) = storage else {
        return None;
    };
    if st[3] != 1 && d != 1 {
        return None;
    }
    Some(RowView {
        data: row_data(cpu)?,
        offset: layout.start_offset(),
        strides: [st[0], st[1], st[2]],
        d,
    })
}

/// A tensor [`row_view`] accepts: `t` itself when it can be read in place,
/// otherwise a contiguous f32 copy on the CPU.
fn rowable(t: &Tensor) -> Result<Tensor> {
    let d = t.dim(3)?;
    let in_place = {
        let (storage, layout) = t.storage_and_layout();
        row_view(&storage, layout, d).is_some()
    };
    if in_place {
        Ok(t.clone())
    } else {
        t.to_device(&candle_core::Device::Cpu)?
            .to_dtype(DType::F32)?
            .contiguous()
    }
}

/// Loads key and value row `(bi, kv_head, j)` of a decode step's logical
/// key sequence into the two buffers.
type LoadRow<'a> = dyn Fn(usize, usize, usize, &mut [f32], &mut [f32]) + Sync + 'a;

/// The decode-step kernel shared by [`streaming_attention`] and
/// [`indexed_decode_attention`]: `n` logical keys in blocks of
/// [`DECODE_TILE`] run in parallel (every head of a block together), then
/// the blocks merge in order. Returns `(b * h * d)` outputs.
#[allow(clippy::too_many_arguments)]
pub(crate) fn decode_tiles(
    qv: &[f32],
    b: usize,
    h: usize,
    kv_h: usize,
    d: usize,
    n: usize,
    scale: f32,
    load: &LoadRow<'_>,
) -> Vec<f32> {
    use rayon::prelude::*;
    let g = h / kv_h;
    let tiles = n.div_ceil(DECODE_TILE);
    let partial: Vec<Vec<Online>> = (0..tiles)
        .into_par_iter()
        .map(|t| {
            let (start, end) = (t * DECODE_TILE, ((t + 1) * DECODE_TILE).min(n));
            let len = end - start;
            let mut kbuf = vec![0f32; len * d];
            let mut vbuf = vec![0f32; len * d];
            let mut outs = Vec::with_capacity(b * h);
            for bi in 0..b {
                for kh in 0..kv_h {
                    for (r, j) in (start..end).enumerate() {
                        load(
                            bi,
                            kh,
                            j,
                            &mut kbuf[r * d..(r + 1) * d],
                            &mut vbuf[r * d..(r + 1) * d],
                        );
                    }
                    for gi in 0..g {
                        let base = (bi * h + kh * g + gi) * d;
                        let qr = &qv[base..base + d];
                        let mut o = Online::new(d);
                        for r in 0..len {
                            let logit = dot4(qr, &kbuf[r * d..(r + 1) * d]) * scale;
                            o.push(logit, &vbuf[r * d..(r + 1) * d]);
                        }
                        outs.push(o);
                    }
                }
            }
            outs
        })
        .collect();
    let mut out = vec![0f32; b * h * d];
    for bh in 0..b * h {
        let mut acc = partial[0][bh].clone();
        for tile in &partial[1..] {
            acc.merge(&tile[bh]);
        }
        acc.finish(&mut out[bh * d..(bh + 1) * d]);
    }
    out
}

/// Positions per parallel block of [`score_max_rows`].
const SCORE_BLOCK: usize = 256;

/// Selection scores of one query, fused (the CPU pass of
/// `ops::score_max`): for each key, the maximum over query heads of the
/// scaled dot product. Keys are read in place (f16 and bf16 rows converted a
/// block at a time), blocks of positions run in parallel, and no
/// `(heads, P)` logit matrix is formed; equals `head_max_scores(q, keys,
/// scale, false)` up to the summation order. `qv` is `(h, d)`, `kr` holds
/// the keys as rows `(0, kv_head, pos)`.
pub(crate) fn score_max_rows(
    qv: &[f32],
    kr: &RowView<'_>,
    h: usize,
    kv_h: usize,
    p: usize,
    d: usize,
    scale: f32,
) -> Vec<f32> {
    use rayon::prelude::*;
    let g = h / kv_h;
    let blocks = p.div_ceil(SCORE_BLOCK);
    let parts: Vec<Vec<f32>> = (0..blocks)
        .into_par_iter()
        .map(|blk| {
            let (start, end) = (blk * SCORE_BLOCK, ((blk + 1) * SCORE_BLOCK).min(p));
            let mut best = vec![f32::NEG_INFINITY; end - start];
            let mut row = vec![0f32; d];
            for kh in 0..kv_h {
                for (slot, j) in best.iter_mut().zip(start..end) {
                    kr.load(0, kh, j, &mut row);
                    for gi in 0..g {
                        let hq = kh * g + gi;
                        let s = dot4(&qv[hq * d..(hq + 1) * d], &row) * scale;
                        if s > *slot {
                            *slot = s;
                        }
                    }
                }
            }
            best
        })
        .collect();
    parts.concat()
}

/// One sequence's decode query attending to chosen rows of one or more
/// key/value sources, read in place (no gathered copy). The logical key
/// sequence is the concatenation over `parts` of `k[0, :, rows, :]`;
/// results are bit-identical to gathering those rows and calling
/// [`streaming_attention`] (same blocks, same order).
///
/// * `q`: `(1, h, 1, d)`;
/// * each part: `k`, `v` of shape `(1, kv_h, n_i, d)`, and row indices
///   below `n_i`.
pub fn indexed_decode_attention(
    q: &Tensor,
    parts: &[(&Tensor, &Tensor, &[u32])],
    scale: f64,
) -> Result<Tensor> {
    let (b, h, s, d) = q.dims4()?;
    if b != 1 || s != 1 || parts.is_empty() {
        candle_core::bail!(
            "indexed_decode_attention: expected one decode query and at least one part, got q {:?} and {} parts",
            q.dims(),
            parts.len()
        );
    }
    let kv_h = parts[0].0.dim(1)?;
    let mut map: Vec<(usize, usize)> = Vec::new();
    for (p, (k, v, rows)) in parts.iter().enumerate() {
        let n = k.dim(2)?;
        if k.dim(1)? != kv_h || v.dims() != k.dims() || k.dim(3)? != d {
            candle_core::bail!(
                "indexed_decode_attention: part {p} has keys {:?} / values {:?}, expected (1, {kv_h}, n, {d})",
                k.dims(),
                v.dims()
            );
        }
        if let Some(&r) = rows.iter().find(|&&r| r as usize >= n) {
            candle_core::bail!(
                "indexed_decode_attention: row {r} of part {p} is beyond its {n} rows"
            );
        }
        map.extend(rows.iter().map(|&r| (p, r as usize)));
    }
    let owned = parts
        .iter()
        .map(|(k, v, _)| Ok((rowable(k)?, rowable(v)?)))
        .collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = owned
        .iter()
        .map(|(k, v)| (k.storage_and_layout(), v.storage_and_layout()))
        .collect();
    let views = guards
        .iter()
        .map(|((ks, kl), (vs, vl))| Some((row_view(ks, kl, d)?, row_view(vs, vl, d)?)))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| {
            candle_core::Error::Msg("indexed_decode_attention: unreadable part".into())
        })?;
    let qv = to_f32_vec(q)?;
    let out = decode_tiles(
        &qv,
        1,
        h,
        kv_h,
        d,
        map.len(),
        scale as f32,
        &|_, kh, j, ko, vo| {
            let (p, r) = map[j];
            views[p].0.load(0, kh, r, ko);
            views[p].1.load(0, kh, r, vo);
        },
    );
    Tensor::from_vec(out, (1, h, 1, d), q.device())?.to_dtype(q.dtype())
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
/// parallel and merges the blocks in order. This is the exact dense path
/// (identical logits to the stock cache).
///
/// * `q`: `(b, h, s, d)`, the `s` newest positions;
/// * `k`, `v`: `(b, kv_h, past + s, d)` with `h % kv_h == 0` (query head
///   `i` reads KV head `i / (h / kv_h)`);
///
/// returns `(b, h, s, d)` in `q`'s dtype; arithmetic in f32.
pub fn streaming_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
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
    if s == 1 {
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

/// `e^x` for `x <= 0` (softmax arguments), vectorisable: `2^(x log2 e)` split
/// into an integer power set in the exponent bits and a degree-6 polynomial
/// on `[-0.5, 0.5]`. Relative error about 1e-6 where softmax weights matter
/// (see the test); inputs under -87 give at most `2^-126`. Only float and
/// wrapping integer operations, so the compiler vectorises loops over it.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    // Adding 1.5 * 2^23 rounds to an integer held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let t = (x * std::f32::consts::LOG2_E).max(-126.0);
    let y = t + MAGIC;
    let n = y - MAGIC; // round(t), ties to even
    let f = t - n; // [-0.5, 0.5]
                   // 2^f, Taylor coefficients of e^(f ln 2).
    let p = 1.540_353e-4f32;
    let p = p.mul_add(f, 1.333_355_8e-3);
    let p = p.mul_add(f, 9.618_129e-3);
    let p = p.mul_add(f, 5.550_411e-2);
    let p = p.mul_add(f, 2.402_265e-1);
    let p = p.mul_add(f, 6.931_472e-1);
    let p = p.mul_add(f, 1.0);
    // 2^n: n + 127 in the exponent field.
    let bits = y.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127) << 23;
    p * f32::from_bits(bits)
}

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
/// threaded GEMM. Same shapes and contract as [`streaming_attention`]; results
/// agree with [`reference_attention`] to float rounding (not bit for bit with
/// the stock kernel: that is [`streaming_attention`]).
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
    for bi in 0..b {
        for kh in 0..kv_h {
            let kb = k.get(bi)?.get(kh)?; // (n, d)
            let vb = v.get(bi)?.get(kh)?;
            // (g, s, d): the query heads reading this KV head.
            let qb = q.get(bi)?.narrow(0, kh * g, g)?;
            let mut start = 0;
            while start < s {
                let c = PREFILL_TILE.min(s - start);
                let visible = past + start + c;
                let qt = qb.narrow(1, start, c)?.contiguous()?.reshape((g * c, d))?;
                let kt = kb.narrow(0, 0, visible)?;
                let scores = qt.matmul(&kt.t()?)?; // (g*c, visible)
                let mut sv = scores.flatten_all()?.to_vec1::<f32>()?;
                sv.par_chunks_mut(visible).enumerate().for_each(|(r, row)| {
                    let i = r % c; // query start+i sees keys ..= past+start+i
                    softmax_prefix(row, past + start + i + 1, scale);
                });
                let probs = Tensor::from_vec(sv, (g * c, visible), dev)?;
                let o = probs
                    .matmul(&vb.narrow(0, 0, visible)?)?
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
