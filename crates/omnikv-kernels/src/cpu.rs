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
    pub fn merge(&mut self, other: &Online) {
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

    /// Write the normalised output (`d` values) into `out`.
    pub fn finish(&self, out: &mut [f32]) {
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
    let partial: Vec<Vec<Online>> = (0..tiles)
        .into_par_iter()
        .map(|t| {
            let (start, end) = (t * DECODE_TILE, ((t + 1) * DECODE_TILE).min(n));
            let len = end - start;
            let mut kbuf = vec![0f32; len * d];
            let mut vbuf = vec![0f32; len * d];
            let mut keys = KeyTile::default();
            let mut logits = vec![0f32; len];
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
                    keys.fill(&kbuf, len, d);
                    for gi in 0..g {
                        let base = (bi * h + kh * g + gi) * d;
                        let qr = &qv[base..base + d];
                        keys.logits(qr, scale, &mut logits);
                        let mut o = Online::new(d);
                        for (r, &logit) in logits.iter().enumerate() {
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
            self.data.resize(d * stride, 0.0);
            for (r, row) in rows.chunks_exact(d).enumerate() {
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
    #[test]
    fn key_tile_logits_equal_dot4_bit_for_bit() {
        let mut tile = KeyTile::default();
        for &d in &[64usize, 7, 3, 128] {
            for len in 1..=20 {
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
