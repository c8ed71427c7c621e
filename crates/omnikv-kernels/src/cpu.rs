//! CPU forward passes of the kernels: row views read in place from candle's
//! storage, the online-softmax decode tiles, fused selection scores, top-k
//! and the vectorisable exponential. The custom ops in [`crate::ops`] run
//! these on the CPU; the backend's exact attention kernel reuses
//! [`decode_tiles`], [`Online`] and [`dot4`], so the dense and sparse paths
//! share one summation order.

use candle_core::{DType, Result, Tensor};

/// Dot product in f32, accumulated four products at a time. The summation
/// order is fixed (and the same as mistral.rs's CPU attention kernel), so the
/// dense path reproduces the stock cache's logits bit for bit.
///
/// # Panics
/// If `b` is shorter than `a`.
#[inline]
pub fn dot4(a: &[f32], b: &[f32]) -> f32 {
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

/// Running state of a streaming (online) softmax over key positions:
/// `acc` is the weighted sum of value rows, `sum` the softmax denominator,
/// both relative to the running maximum logit `max`.
#[derive(Clone)]
pub struct Online {
    acc: Vec<f32>,
    sum: f32,
    max: f32,
}

impl Online {
    /// An empty state for value rows of `d` elements.
    pub fn new(d: usize) -> Self {
        Self {
            acc: vec![0.0; d],
            sum: 0.0,
            max: f32::NEG_INFINITY,
        }
    }

    /// Add one key with logit `s` and value row `v`.
    #[inline]
    pub fn push(&mut self, s: f32, v: &[f32]) {
        online_push(&mut self.acc, &mut self.sum, &mut self.max, s, v);
    }

    /// Merge a later block of keys into this one.
    pub fn merge(&mut self, other: &Online) {
        online_merge(
            &mut self.acc,
            &mut self.sum,
            &mut self.max,
            &other.acc,
            other.sum,
            other.max,
        );
    }

    /// Write the normalised output (`d` values) into `out`.
    pub fn finish(&self, out: &mut [f32]) {
        online_finish(&self.acc, self.sum, out);
    }
}

/// [`Online::push`] on a state held elsewhere (`acc` of `d` values, `sum`,
/// `max`).
#[inline]
fn online_push(acc: &mut [f32], sum: &mut f32, max: &mut f32, s: f32, v: &[f32]) {
    let mut ms = 1.0f32;
    let mut vs = 1.0f32;
    if s > *max {
        let old = *max;
        *max = s;
        ms = (old - s).exp();
        acc.iter_mut().for_each(|a| *a *= ms);
    } else {
        vs = (s - *max).exp();
    }
    for (a, x) in acc.iter_mut().zip(v) {
        *a += x * vs;
    }
    *sum = *sum * ms + vs;
}

/// [`Online::merge`] on states held elsewhere: the later block
/// `(b, b_sum, b_max)` into `(acc, sum, max)`.
#[inline]
fn online_merge(acc: &mut [f32], sum: &mut f32, max: &mut f32, b: &[f32], b_sum: f32, b_max: f32) {
    if *max >= b_max {
        let f = (b_max - *max).exp();
        for (a, b) in acc.iter_mut().zip(b) {
            *a += b * f;
        }
        *sum += b_sum * f;
    } else {
        let f = (*max - b_max).exp();
        for (a, b) in acc.iter_mut().zip(b) {
            *a = b + *a * f;
        }
        *sum = b_sum + *sum * f;
        *max = b_max;
    }
}

/// [`Online::finish`] on a state held elsewhere.
#[inline]
fn online_finish(acc: &[f32], sum: f32, out: &mut [f32]) {
    let inv = 1.0 / sum;
    for (o, a) in out.iter_mut().zip(acc) {
        *o = a * inv;
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
    ///
    /// # Panics
    /// If the row lies beyond the borrowed storage, or (f32 rows) `out` does
    /// not hold exactly `d` values.
    #[inline]
    pub fn load(&self, bi: usize, head: usize, pos: usize, out: &mut [f32]) {
        let at =
            self.offset + bi * self.strides[0] + head * self.strides[1] + pos * self.strides[2];
        let d = self.d;
        match self.data {
            RowData::F32(x) => out.copy_from_slice(&x[at..at + d]),
            RowData::F16(x) => {
                // half's slice conversion: F16C eight at a time where the
                // build targets it; every f16 is exact in f32.
                use half::slice::HalfFloatSliceExt;
                let n = d.min(out.len());
                x[at..at + n].convert_to_f32_slice(&mut out[..n]);
            }
            RowData::BF16(x) => {
                // `bf16::to_f32` without its branch, so the loop vectorises:
                // the bits shifted into the high half, a NaN's quiet bit set
                // as `to_f32` sets it. The same value for every input.
                for (o, v) in out.iter_mut().zip(&x[at..at + d]) {
                    let bits = v.to_bits();
                    let quiet = u32::from(bits & 0x7FFF > 0x7F80) << 6;
                    *o = f32::from_bits((u32::from(bits) | quiet) << 16);
                }
            }
        }
    }
}

/// Run `f` with a [`RowView`] of `t` (rank 4). CPU tensors in f32/f16/bf16
/// with a contiguous last dimension are borrowed in place; anything else is
/// first copied to a contiguous f32 tensor.
///
/// # Errors
/// If `t` is not rank 4, the copy fails, or `f` fails.
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
pub fn row_view3<'a>(
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
pub type LoadRow<'a> = dyn Fn(usize, usize, usize, &mut [f32], &mut [f32]) + Sync + 'a;

/// The decode-step kernel shared by the backend's exact attention,
/// [`indexed_decode_attention`] and the CPU pass of
/// [`crate::ops::indexed_decode`]: `n` logical keys in blocks of
/// [`DECODE_TILE`] run in parallel (every head of a block together), then
/// the blocks merge in order.
///
/// `qv` holds the queries `(b, h, d)` as flat f32 (b sequences, h query
/// heads, d head dim); `load` fills key and value row `(bi, kv_head, j)`,
/// `j < n`. Query head `i` reads KV head `i / (h / kv_h)`. Returns the
/// `(b, h, d)` outputs, flat f32.
///
/// # Panics
/// If `kv_h == 0`, `n == 0` (with `b * h > 0`), or `qv` holds fewer than
/// `b * h * d` values.
#[allow(clippy::too_many_arguments)]
pub fn decode_tiles(
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
    let bh = b * h;
    if bh * d == 0 {
        return Vec::new();
    }
    // Each block's states live in two flat buffers (`d` accumulator values
    // and `(sum, max)` per sequence and head) and each of rayon's splits
    // reuses one set of row buffers: at 7.5K keys a layer has ~470 blocks,
    // and a buffer or state per block and head was thousands of allocations
    // per layer. The arithmetic is `Online`'s, in the same order.
    let mut accs = vec![0f32; tiles * bh * d];
    let mut stats = vec![(0f32, f32::NEG_INFINITY); tiles * bh];
    let scratch = || {
        (
            vec![0f32; DECODE_TILE * d],
            vec![0f32; DECODE_TILE * d],
            KeyTile::default(),
            vec![0f32; DECODE_TILE],
        )
    };
    accs.par_chunks_mut(bh * d)
        .zip(stats.par_chunks_mut(bh))
        .enumerate()
        .for_each_init(scratch, |(kbuf, vbuf, keys, logits), (t, (acc, stat))| {
            let (start, end) = (t * DECODE_TILE, ((t + 1) * DECODE_TILE).min(n));
            let len = end - start;
            let logits = &mut logits[..len];
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
                    keys.fill(kbuf, len, d);
                    for gi in 0..g {
                        let head = bi * h + kh * g + gi;
                        let qr = &qv[head * d..(head + 1) * d];
                        keys.logits(qr, scale, logits);
                        let o = &mut acc[head * d..(head + 1) * d];
                        let (sum, max) = &mut stat[head];
                        for (r, &logit) in logits.iter().enumerate() {
                            online_push(o, sum, max, logit, &vbuf[r * d..(r + 1) * d]);
                        }
                    }
                }
            }
        });
    let mut out = vec![0f32; bh * d];
    let (first, later) = accs.split_at_mut(bh * d);
    for head in 0..bh {
        let acc = &mut first[head * d..(head + 1) * d];
        let (mut sum, mut max) = stats[head];
        for t in 1..tiles {
            let (b_sum, b_max) = stats[t * bh + head];
            let b_acc = &later[((t - 1) * bh + head) * d..((t - 1) * bh + head + 1) * d];
            online_merge(acc, &mut sum, &mut max, b_acc, b_sum, b_max);
        }
        online_finish(acc, sum, &mut out[head * d..(head + 1) * d]);
    }
    out
}

/// `out[(j0 + j) * stride + r0 + i] = rows[(r0 + i) * d + j0 + j]` for
/// `i, j < 8`: an 8 x 8 block of row-major `rows` (`d` columns) stored
/// transposed (a [`KeyTile`] fill).
///
/// # Panics
/// If the block lies outside `rows` or `out`.
#[cfg(target_feature = "avx")]
#[inline]
fn transpose8(rows: &[f32], d: usize, r0: usize, j0: usize, out: &mut [f32], stride: usize) {
    use std::arch::x86_64::*;
    assert!((r0 + 7) * d + j0 + 8 <= rows.len() && j0 + 8 <= d);
    assert!((j0 + 7) * stride + r0 + 8 <= out.len());
    // SAFETY: the build targets AVX (cfg above); the asserts keep the eight
    // 8-float loads (row `r0 + i`, columns `j0..j0 + 8`) inside `rows` and
    // the eight 8-float stores (column `j0 + j`, lanes `r0..r0 + 8`) inside
    // `out`.
    unsafe {
        let r = |i: usize| _mm256_loadu_ps(rows.as_ptr().add((r0 + i) * d + j0));
        let (a0, a1, a2, a3) = (
            _mm256_unpacklo_ps(r(0), r(1)),
            _mm256_unpackhi_ps(r(0), r(1)),
            _mm256_unpacklo_ps(r(2), r(3)),
            _mm256_unpackhi_ps(r(2), r(3)),
        );
        let (a4, a5, a6, a7) = (
            _mm256_unpacklo_ps(r(4), r(5)),
            _mm256_unpackhi_ps(r(4), r(5)),
            _mm256_unpacklo_ps(r(6), r(7)),
            _mm256_unpackhi_ps(r(6), r(7)),
        );
        let (b0, b1, b2, b3) = (
            _mm256_shuffle_ps::<0x44>(a0, a2),
            _mm256_shuffle_ps::<0xEE>(a0, a2),
            _mm256_shuffle_ps::<0x44>(a1, a3),
            _mm256_shuffle_ps::<0xEE>(a1, a3),
        );
        let (b4, b5, b6, b7) = (
            _mm256_shuffle_ps::<0x44>(a4, a6),
            _mm256_shuffle_ps::<0xEE>(a4, a6),
            _mm256_shuffle_ps::<0x44>(a5, a7),
            _mm256_shuffle_ps::<0xEE>(a5, a7),
        );
        let cols = [
            _mm256_permute2f128_ps::<0x20>(b0, b4),
            _mm256_permute2f128_ps::<0x20>(b1, b5),
            _mm256_permute2f128_ps::<0x20>(b2, b6),
            _mm256_permute2f128_ps::<0x20>(b3, b7),
            _mm256_permute2f128_ps::<0x31>(b0, b4),
            _mm256_permute2f128_ps::<0x31>(b1, b5),
            _mm256_permute2f128_ps::<0x31>(b2, b6),
            _mm256_permute2f128_ps::<0x31>(b3, b7),
        ];
        for (j, c) in cols.into_iter().enumerate() {
            _mm256_storeu_ps(out.as_mut_ptr().add((j0 + j) * stride + r0), c);
        }
    }
}

/// Positions per parallel block of [`score_max_rows`].
const SCORE_BLOCK: usize = 256;

/// Selection scores of one query, fused (the CPU pass of
/// [`crate::ops::score_max`]): for each key, the maximum over query heads of the
/// scaled dot product. Keys are read in place (f16 and bf16 rows converted a
/// block at a time), blocks of positions run in parallel, and no
/// `(heads, P)` logit matrix is formed; equals the backend selector's
/// `head_max_scores(q, keys, scale, false)` up to the summation order. `qv`
/// is `(h, d)` flat f32, `kr` holds the keys as rows `(0, kv_head, pos)` for
/// `pos < p` (p prompt positions). Returns `p` scores.
///
/// # Panics
/// If `kv_h == 0`, `qv` holds fewer than `h * d` values, or `kr` has fewer
/// than `kv_h` heads of `p` rows.
pub fn score_max_rows(
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
            // Keys a decode tile at a time through a `KeyTile`: each logit
            // is `dot4(q, key) * scale` bit for bit, eight keys per vector.
            let mut rows = vec![0f32; DECODE_TILE * d];
            let mut keys = KeyTile::default();
            let mut logits = [0f32; DECODE_TILE];
            for kh in 0..kv_h {
                for t0 in (start..end).step_by(DECODE_TILE) {
                    let len = DECODE_TILE.min(end - t0);
                    for r in 0..len {
                        kr.load(0, kh, t0 + r, &mut rows[r * d..(r + 1) * d]);
                    }
                    keys.fill(&rows, len, d);
                    let slots = &mut best[t0 - start..t0 - start + len];
                    for gi in 0..g {
                        let hq = kh * g + gi;
                        keys.logits(&qv[hq * d..(hq + 1) * d], scale, &mut logits);
                        for (slot, &s) in slots.iter_mut().zip(&logits[..len]) {
                            if s > *slot {
                                *slot = s;
                            }
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
/// the backend's exact attention (same blocks, same order).
///
/// * `q`: `(1, h, 1, d)`;
/// * each part: `k`, `v` of shape `(1, kv_h, n_i, d)`, and row indices
///   below `n_i`.
///
/// Returns `(1, h, 1, d)` in `q`'s dtype.
///
/// # Errors
/// If `q` is not one decode query, `parts` is empty, a part's shapes differ
/// from the first part's or from `q`'s `d`, a row is beyond its part, or a
/// copy fails.
///
/// # Panics
/// If no part names any row, or `kv_h == 0` (see [`decode_tiles`]).
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
pub const DECODE_TILE: usize = 16;

/// The key rows of one decode tile, ready for [`KeyTile::logits`]: with AVX
/// they are stored transposed (`(d, len)` padded to a multiple of 8 keys) so
/// that eight keys' dot products run in the lanes of one vector, each lane
/// computing exactly [`dot4`]'s sequence of roundings; without AVX they are
/// kept as rows.
#[derive(Default)]
pub struct KeyTile {
    data: Vec<f32>,
    len: usize,
    d: usize,
    /// Keys per transposed row (`len` rounded up to 8); 0 when rows are kept.
    stride: usize,
}

impl KeyTile {
    /// Take `len` key rows of `d` values (`rows` is `(len, d)` row-major).
    ///
    /// # Panics
    /// If `rows` holds fewer than `len * d` values.
    pub fn fill(&mut self, rows: &[f32], len: usize, d: usize) {
        let rows = &rows[..len * d];
        self.len = len;
        self.d = d;
        self.data.clear();
        if cfg!(target_feature = "avx") {
            let stride = len.div_ceil(8) * 8;
            self.stride = stride;
            if len != stride {
                // The padding lanes read as zeros.
                self.data.clear();
            }
            self.data.resize(d * stride, 0.0);
            let mut done = 0;
            #[cfg(target_feature = "avx")]
            if d % 8 == 0 {
                // Whole groups of eight keys, eight dimensions at a time.
                done = len / 8 * 8;
                for r0 in (0..done).step_by(8) {
                    for j0 in (0..d).step_by(8) {
                        transpose8(rows, d, r0, j0, &mut self.data, stride);
                    }
                }
            }
            for (r, row) in rows.chunks_exact(d).enumerate().skip(done) {
                for (j, &x) in row.iter().enumerate() {
                    self.data[j * stride + r] = x;
                }
            }
        } else {
            self.stride = 0;
            self.data.extend_from_slice(rows);
        }
    }

    /// `out[r] = dot4(q, key r) * scale` for every key of the tile, bit for
    /// bit (the same products, the same order of additions per key).
    ///
    /// # Panics
    /// If `q` holds fewer than `d` values or `out` fewer than the tile's keys.
    pub fn logits(&self, q: &[f32], scale: f32, out: &mut [f32]) {
        let (len, d) = (self.len, self.d);
        let q = &q[..d];
        let out = &mut out[..len];
        #[cfg(target_feature = "avx")]
        if self.stride > 0 {
            self.logits_avx(q, scale, out);
            return;
        }
        for (r, o) in out.iter_mut().enumerate() {
            *o = dot4(q, &self.data[r * d..(r + 1) * d]) * scale;
        }
    }

    #[cfg(target_feature = "avx")]
    fn logits_avx(&self, q: &[f32], scale: f32, out: &mut [f32]) {
        use std::arch::x86_64::*;
        let (d, stride) = (self.d, self.stride);
        assert!(self.data.len() >= d * stride && q.len() >= d);
        let column = |j: usize, r0: usize| self.data[j * stride + r0..].as_ptr();
        for r0 in (0..stride).step_by(8) {
            let mut lanes = [0f32; 8];
            // SAFETY: the build targets AVX (cfg above); every load reads 8
            // floats at `j * stride + r0` with `j < d` and `r0 + 8 <= stride`,
            // inside `data` (assert above); the store writes `lanes`' 8.
            unsafe {
                let mut sum = _mm256_setzero_ps();
                let chunks = d / 4;
                for c in 0..chunks {
                    let j = c * 4;
                    // dot4: sum += ((q0 k0 + q1 k1) + q2 k2) + q3 k3, with
                    // separate roundings (no fused multiply-add).
                    let p0 = _mm256_mul_ps(_mm256_set1_ps(q[j]), _mm256_loadu_ps(column(j, r0)));
                    let p1 =
                        _mm256_mul_ps(_mm256_set1_ps(q[j + 1]), _mm256_loadu_ps(column(j + 1, r0)));
                    let p2 =
                        _mm256_mul_ps(_mm256_set1_ps(q[j + 2]), _mm256_loadu_ps(column(j + 2, r0)));
                    let p3 =
                        _mm256_mul_ps(_mm256_set1_ps(q[j + 3]), _mm256_loadu_ps(column(j + 3, r0)));
                    let t = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(p0, p1), p2), p3);
                    sum = _mm256_add_ps(sum, t);
                }
                for j in chunks * 4..d {
                    let p = _mm256_mul_ps(_mm256_set1_ps(q[j]), _mm256_loadu_ps(column(j, r0)));
                    sum = _mm256_add_ps(sum, p);
                }
                _mm256_storeu_ps(
                    lanes.as_mut_ptr(),
                    _mm256_mul_ps(sum, _mm256_set1_ps(scale)),
                );
            }
            let n = (out.len() - r0.min(out.len())).min(8);
            out[r0..r0 + n].copy_from_slice(&lanes[..n]);
        }
    }
}

/// `t` as a flat f32 vector (converted and made contiguous first).
///
/// # Errors
/// If the conversion or the copy fails (e.g. a device error).
pub fn to_f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?
        .contiguous()?
        .flatten_all()?
        .to_vec1::<f32>()
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

/// Indices of the `k` largest scores, ascending: the CPU pass of
/// [`crate::ops::top_k`]. Ties go to the earlier position; NaN ranks lowest.
/// Partial selection, no full sort of all scores. `k` above `scores.len()`
/// is clamped.
pub fn top_k_sorted(scores: &[f32], k: usize) -> Vec<u32> {
    let k = k.min(scores.len());
    if k == 0 {
        return Vec::new();
    }
    let key = |i: u32| {
        let s = scores[i as usize];
        if s.is_nan() {
            f32::NEG_INFINITY
        } else {
            s
        }
    };
    let mut idx: Vec<u32> = (0..scores.len() as u32).collect();
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, |&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
        idx.truncate(k);
    }
    idx.sort_unstable();
    idx
}

#[cfg(test)]
mod key_tile_tests {
    use super::*;

    /// Every key's logit from a [`KeyTile`] equals `dot4(q, key) * scale`
    /// bit for bit: tiles of 1 to 20 keys (padding lanes included), head
    /// dimensions with and without a remainder after the groups of four.
    /// A row read from f16 or bf16 storage equals each value's own
    /// `to_f32`, NaNs and infinities included.
    #[test]
    fn row_loads_convert_as_to_f32() {
        let bits: Vec<u16> = (0..=u16::MAX)
            .step_by(7)
            .chain([0x7F80, 0xFF80, 0x7FC1, 0x7F81, 0xFFFF])
            .collect();
        let d = bits.len();
        let bf: Vec<half::bf16> = bits.iter().map(|&b| half::bf16::from_bits(b)).collect();
        let hf: Vec<half::f16> = bits.iter().map(|&b| half::f16::from_bits(b)).collect();
        for (data, want) in [
            (
                RowData::BF16(&bf),
                bf.iter().map(|v| v.to_f32().to_bits()).collect::<Vec<_>>(),
            ),
            (
                RowData::F16(&hf),
                hf.iter().map(|v| v.to_f32().to_bits()).collect(),
            ),
        ] {
            let view = RowView {
                data,
                offset: 0,
                strides: [0, 0, 0],
                d,
            };
            let mut out = vec![0f32; d];
            view.load(0, 0, 0, &mut out);
            let got: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
            assert_eq!(got, want);
        }
    }

    /// Selection scores equal `max over the group's heads of dot4(q, key) *
    /// scale` per key bit for bit (the scalar form they replaced), over
    /// blocks and tiles with remainders.
    #[test]
    fn score_max_rows_equals_the_per_key_form_bit_for_bit() {
        let (kv_h, g, d) = (3, 3, 64);
        for p in [1usize, 15, 16, 17, 300, 530] {
            let keys: Vec<f32> = crate::testing::rand_vec(kv_h * p * d, p as u64);
            let q = crate::testing::rand_vec(kv_h * g * d, p as u64 + 1);
            let view = RowView {
                data: RowData::F32(&keys),
                offset: 0,
                strides: [0, p * d, d],
                d,
            };
            let got = score_max_rows(&q, &view, kv_h * g, kv_h, p, d, 0.125);
            for (j, s) in got.iter().enumerate() {
                let mut want = f32::NEG_INFINITY;
                for kh in 0..kv_h {
                    let key = &keys[(kh * p + j) * d..(kh * p + j + 1) * d];
                    for gi in 0..g {
                        let hq = kh * g + gi;
                        want = want.max(dot4(&q[hq * d..(hq + 1) * d], key) * 0.125);
                    }
                }
                assert_eq!(s.to_bits(), want.to_bits(), "{p} keys, key {j}");
            }
        }
    }

    #[test]
    fn key_tile_logits_equal_dot4_bit_for_bit() {
        let mut tile = KeyTile::default();
        for &d in &[64usize, 7, 3, 128, 24] {
            for len in (1..=20).chain((1..=20).rev()) {
                let rows = crate::testing::rand_vec(len * d, (d * 100 + len) as u64);
                let mut q = crate::testing::rand_vec(d, d as u64 + 7);
                q.iter_mut().step_by(5).for_each(|x| *x *= 300.0);
                tile.fill(&rows, len, d);
                let mut out = vec![f32::NAN; len];
                tile.logits(&q, 0.125, &mut out);
                for r in 0..len {
                    let want = dot4(&q, &rows[r * d..(r + 1) * d]) * 0.125;
                    assert_eq!(
                        out[r].to_bits(),
                        want.to_bits(),
                        "d {d}, {len} keys, key {r}"
                    );
                }
            }
        }
    }
}
