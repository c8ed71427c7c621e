//! OmniKV's decode-step kernels as candle custom ops.
//!
//! | op | CPU (`cpu_fwd`, the reference) | CUDA (`cuda_fwd`, `kernels/omnikv_decode.cu` of this crate) |
//! |---|---|---|
//! | [`score_max`] | fused in-place scoring | `omnikv_score_max_*` |
//! | [`top_k`] | [`crate::cpu::top_k_sorted`] | `omnikv_topk_threshold` + `omnikv_topk_compact` |
//! | [`gather_rows`] | row copies | `omnikv_gather_rows_*` |
//! | [`indexed_decode`] | the in-place decode tiles of [`crate::cpu::indexed_decode_attention`] | `omnikv_flash_decode_split_*` + `omnikv_flash_decode_merge` (split-K, log-sum-exp merge) |
//!
//! The backend calls these ops on every device, so the CPU tests of the
//! decode path run through the same op plumbing a GPU uses. The CUDA side
//! is compiled with the `cuda` feature (PTX built by `build.rs`).
//!
//! Layout contract: keys and values are `(kv_h, n, d)` with contiguous rows
//! (strides `(hs, d, 1)`, any head stride `hs`), which is how the model
//! cache hands out a view of its preallocated buffer; the wrappers copy any
//! other layout first. Queries are `(h, d)` f32, with `h % kv_h == 0`; query
//! head `i` reads KV head `i / (h / kv_h)`. Element types f32, f16, bf16.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};

use crate::cpu::{decode_tiles, row_view3, score_max_rows, top_k_sorted};

#[cfg(feature = "cuda")]
use crate::cuda;

fn rows_contiguous(l: &Layout) -> bool {
    let (dims, st) = (l.dims(), l.stride());
    dims.len() == 3 && (st[2] == 1 || dims[2] == 1) && (st[1] == dims[2] || dims[1] <= 1)
}

/// `t` itself when its rows are contiguous, else a contiguous copy.
fn rowwise(t: &Tensor) -> Result<Tensor> {
    if rows_contiguous(t.layout()) {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

fn float_kv(what: &str, t: &Tensor) -> Result<()> {
    match t.dtype() {
        DType::F32 | DType::F16 | DType::BF16 => Ok(()),
        other => candle_core::bail!("omnikv ops: {what} must be f32, f16 or bf16, got {other:?}"),
    }
}

fn check_query(op: &str, q: &Tensor, keys: &Tensor) -> Result<(usize, usize, usize, usize)> {
    let (h, d) = q.dims2()?;
    let (kv_h, n, kd) = keys.dims3()?;
    if kv_h == 0 || h % kv_h != 0 || kd != d {
        candle_core::bail!(
            "omnikv {op}: query {:?} does not match keys {:?} (expected (h, d) and (kv_h, n, d) with h a multiple of kv_h)",
            q.dims(),
            keys.dims()
        );
    }
    Ok((h, kv_h, n, d))
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(x) = s else {
        candle_core::bail!("omnikv ops: {what} must be f32");
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&x[a..b]),
        None => candle_core::bail!("omnikv ops: {what} must be contiguous"),
    }
}

fn u32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [u32]> {
    let CpuStorage::U32(x) = s else {
        candle_core::bail!("omnikv ops: {what} must be u32");
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&x[a..b]),
        None => candle_core::bail!("omnikv ops: {what} must be contiguous"),
    }
}

fn check_rows(op: &str, rows: &[u32], n: usize) -> Result<()> {
    if let Some(&r) = rows.iter().find(|&&r| r as usize >= n) {
        candle_core::bail!("omnikv {op}: row {r} is beyond the {n} cached rows");
    }
    Ok(())
}

// ------------------------------------------------------------ score max --

/// Selection scores of one query (spec: "Selection at a filter layer", the
/// `last` selector): for each of the `n` keys, the maximum over query heads
/// of the scaled dot product, raw logits (no softmax). `q`: `(h, d)` (h query
/// heads, d head dim, any float dtype, converted to f32); `keys`:
/// `(kv_h, n, d)` (kv_h KV heads, n cached positions) in f32/f16/bf16.
/// Returns `(n,)` f32 on `q`'s device.
///
/// # Errors
/// If the shapes are not `(h, d)` and `(kv_h, n, d)` with `h` a multiple of
/// `kv_h` and equal `d`, the keys are not f32/f16/bf16, or the kernel or a
/// copy fails on the device.
pub fn score_max(q: &Tensor, keys: &Tensor, scale: f64) -> Result<Tensor> {
    let (_, _, n, _) = check_query("score_max", q, keys)?;
    float_kv("keys", keys)?;
    if n == 0 {
        return Tensor::zeros(0, DType::F32, q.device());
    }
    let q = q.to_dtype(DType::F32)?.contiguous()?;
    q.apply_op2_no_bwd(
        &rowwise(keys)?,
        &ScoreMax {
            scale: scale as f32,
        },
    )
}

struct ScoreMax {
    scale: f32,
}

impl CustomOp2 for ScoreMax {
    fn name(&self) -> &'static str {
        "omnikv-score-max"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (h, d) = ql.shape().dims2()?;
        let (kv_h, n, _) = kl.shape().dims3()?;
        let qv = f32_slice(q, ql, "the query")?;
        let kr = row_view3(k, kl)
            .ok_or_else(|| candle_core::Error::Msg("omnikv score_max: unreadable keys".into()))?;
        let out = score_max_rows(qv, &kr, h, kv_h, n, d, self.scale);
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::score_max(self.scale, q, ql, k, kl)
    }
}

// ---------------------------------------------------------------- top-k --

/// Positions of the `k` largest of `scores` (`(n,)` f32), ascending, as a
/// `(min(k, n),)` u32 tensor on the scores' device. Ties go to the earlier
/// position; NaN ranks lowest. The top-k step of spec: "Selection at a
/// filter layer" (the caller clamps `k`).
///
/// # Errors
/// If `scores` is not a 1-D f32 tensor, or the kernel fails on the device.
pub fn top_k(scores: &Tensor, k: usize) -> Result<Tensor> {
    let n = scores.dims1()?;
    if scores.dtype() != DType::F32 {
        candle_core::bail!("omnikv top_k: scores must be f32, got {:?}", scores.dtype());
    }
    if k >= n {
        return Tensor::arange(0u32, n as u32, scores.device());
    }
    if k == 0 {
        return Tensor::zeros(0, DType::U32, scores.device());
    }
    scores.contiguous()?.apply_op1_no_bwd(&TopK { k })
}

struct TopK {
    k: usize,
}

impl CustomOp1 for TopK {
    fn name(&self) -> &'static str {
        "omnikv-top-k"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "the scores")?;
        let idx = top_k_sorted(x, self.k);
        let len = idx.len();
        Ok((CpuStorage::U32(idx), Shape::from(len)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::top_k(self.k, s, l)
    }
}

// --------------------------------------------------------------- gather --

/// `src[:, rows, :]`: `src` `(kv_h, n, d)` in f32/f16/bf16, `rows` `(m,)`
/// u32, each below `n`. Returns a contiguous `(kv_h, m, d)` tensor of `src`'s
/// dtype.
///
/// # Errors
/// If `src` is not rank 3 or not a float dtype, `rows` is not a 1-D u32
/// tensor, or the kernel fails. The CPU pass also fails on a row `>= n`; the
/// CUDA kernel does not check, so callers must keep rows below `n`.
pub fn gather_rows(src: &Tensor, rows: &Tensor) -> Result<Tensor> {
    src.dims3()?;
    float_kv("rows to gather", src)?;
    if rows.dtype() != DType::U32 || rows.rank() != 1 {
        candle_core::bail!("omnikv gather_rows: row indices must be a (m,) u32 tensor");
    }
    rowwise(src)?.apply_op2_no_bwd(&rows.contiguous()?, &GatherRows)
}

struct GatherRows;

fn gather_cpu<T: Copy>(x: &[T], l: &Layout, rows: &[u32]) -> Vec<T> {
    let (dims, st) = (l.dims(), l.stride());
    let (kv_h, d) = (dims[0], dims[2]);
    let mut out = Vec::with_capacity(kv_h * rows.len() * d);
    for kh in 0..kv_h {
        for &r in rows {
            let at = l.start_offset() + kh * st[0] + r as usize * st[1];
            out.extend_from_slice(&x[at..at + d]);
        }
    }
    out
}

impl CustomOp2 for GatherRows {
    fn name(&self) -> &'static str {
        "omnikv-gather-rows"
    }

    fn cpu_fwd(
        &self,
        src: &CpuStorage,
        sl: &Layout,
        rows: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (kv_h, n, d) = sl.shape().dims3()?;
        let rows = u32_slice(rows, rl, "the row indices")?;
        check_rows("gather_rows", rows, n)?;
        let out = match src {
            CpuStorage::F32(x) => CpuStorage::F32(gather_cpu(x, sl, rows)),
            CpuStorage::F16(x) => CpuStorage::F16(gather_cpu(x, sl, rows)),
            CpuStorage::BF16(x) => CpuStorage::BF16(gather_cpu(x, sl, rows)),
            _ => candle_core::bail!("omnikv gather_rows: unsupported dtype"),
        };
        Ok((out, Shape::from((kv_h, rows.len(), d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        src: &candle_core::CudaStorage,
        sl: &Layout,
        rows: &candle_core::CudaStorage,
        rl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::gather_rows(src, sl, rows, rl)
    }
}

// ------------------------------------------------------- indexed decode --

/// One query attending to chosen rows of a cache, read in place: softmax
/// over `k[:, rows, :]`, weights applied to `v[:, rows, :]`.
///
/// * `q`: `(h, d)`; `k`, `v`: `(kv_h, n, d)`, same dtype;
/// * `rows`: `(m,)` u32, `m >= 1`, each below `n`, on `q`'s device.
///
/// Returns `(h, d)` f32. On the CPU the result is bit-identical to
/// [`crate::cpu::indexed_decode_attention`] with one part. This is a sparse
/// layer's decode step (spec: "Sparse attention") and, over every row, the
/// dense decode step on accelerators.
///
/// # Errors
/// If `q` and `k` do not fit (see [`score_max`]), `v` differs from `k` in
/// shape or dtype, the dtype is not f32/f16/bf16, `rows` is not a non-empty
/// `(m,)` u32 tensor on `q`'s device, or the kernel fails (on CUDA also for
/// `d > 256`). The CPU pass also fails on a row `>= n`; the CUDA kernel does
/// not check, so callers must keep rows below `n`.
pub fn indexed_decode(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rows: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    check_query("indexed_decode", q, k)?;
    if v.dims() != k.dims() || v.dtype() != k.dtype() {
        candle_core::bail!(
            "omnikv indexed_decode: values {:?} {:?} do not match keys {:?} {:?}",
            v.dims(),
            v.dtype(),
            k.dims(),
            k.dtype()
        );
    }
    float_kv("keys and values", k)?;
    if rows.dtype() != DType::U32 || rows.rank() != 1 || rows.dim(0)? == 0 {
        candle_core::bail!(
            "omnikv indexed_decode: row indices must be a non-empty (m,) u32 tensor, got {:?} {:?}",
            rows.dims(),
            rows.dtype()
        );
    }
    if !rows.device().same_device(q.device()) {
        candle_core::bail!("omnikv indexed_decode: row indices live on another device");
    }
    let q = q.to_dtype(DType::F32)?.contiguous()?;
    q.apply_op3_no_bwd(
        &rowwise(k)?,
        &rowwise(v)?,
        &IndexedDecode {
            rows: rows.contiguous()?,
            scale: scale as f32,
        },
    )
}

struct IndexedDecode {
    rows: Tensor,
    scale: f32,
}

impl CustomOp3 for IndexedDecode {
    fn name(&self) -> &'static str {
        "omnikv-indexed-decode"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (h, d) = ql.shape().dims2()?;
        let (kv_h, n, _) = kl.shape().dims3()?;
        let qv = f32_slice(q, ql, "the query")?;
        let (rs, rl) = self.rows.storage_and_layout();
        let candle_core::Storage::Cpu(rs) = &*rs else {
            candle_core::bail!("omnikv indexed_decode: row indices live on another device");
        };
        let rows = u32_slice(rs, rl, "the row indices")?;
        check_rows("indexed_decode", rows, n)?;
        let unreadable =
            || candle_core::Error::Msg("omnikv indexed_decode: unreadable keys or values".into());
        let kr = row_view3(k, kl).ok_or_else(unreadable)?;
        let vr = row_view3(v, vl).ok_or_else(unreadable)?;
        let out = decode_tiles(
            qv,
            1,
            h,
            kv_h,
            d,
            rows.len(),
            self.scale,
            &|_, kh, j, ko, vo| {
                kr.load(0, kh, rows[j] as usize, ko);
                vr.load(0, kh, rows[j] as usize, vo);
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((h, d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::indexed_decode(&self.rows, self.scale, q, ql, k, kl, v, vl)
    }
}
