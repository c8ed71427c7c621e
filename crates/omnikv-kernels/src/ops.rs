//! OmniKV's decode-step kernels as candle custom ops.
//!
//! | op | CPU (`cpu_fwd`, the reference) | CUDA (`cuda_fwd`, `kernels/omnikv_decode.cu`) |
//! |---|---|---|
//! | [`score_max`] | fused in-place scoring | `omnikv_score_max_*` |
//! | [`top_k`] | [`crate::selector::top_k_sorted`] | `omnikv_topk_threshold` + `omnikv_topk_compact` |
//! | [`gather_rows`] | row copies | `omnikv_gather_rows_*` |
//! | [`indexed_decode`] | the in-place decode tiles of [`crate::attention::indexed_decode_attention`] | `omnikv_flash_decode_split_*` + `omnikv_flash_decode_merge` (split-K, log-sum-exp merge) |
//!
//! The backend calls these ops on every device, so the CPU tests of the
//! decode path run through the same op plumbing a GPU uses. The CUDA side
//! is compiled with the `cuda-kernels` feature (PTX built by `build.rs`).
//!
//! Layout contract: keys and values are `(kv_h, n, d)` with contiguous rows
//! (strides `(hs, d, 1)`, any head stride `hs`), which is how the model
//! cache hands out a view of its preallocated buffer; the wrappers copy any
//! other layout first. Queries are `(h, d)` f32, with `h % kv_h == 0`; query
//! head `i` reads KV head `i / (h / kv_h)`. Element types f32, f16, bf16.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};

use crate::attention::{decode_tiles, row_view3, score_max_rows};

/// Name of the PTX module in candle's per-device module cache.
#[cfg(feature = "cuda-kernels")]
pub(crate) const MODULE: &str = "omnikv_decode";
#[cfg(feature = "cuda-kernels")]
pub(crate) const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/omnikv_decode.ptx"));

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

/// Selection scores of one query: for each of the `n` keys, the maximum over
/// query heads of the scaled dot product. `q`: `(h, d)`; `keys`:
/// `(kv_h, n, d)`. Returns `(n,)` f32.
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

    #[cfg(feature = "cuda-kernels")]
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
/// `(min(k, n),)` u32 tensor. Ties go to the earlier position; NaN ranks
/// lowest.
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
        let idx = crate::selector::top_k_sorted(x, self.k);
        let len = idx.len();
        Ok((CpuStorage::U32(idx), Shape::from(len)))
    }

    #[cfg(feature = "cuda-kernels")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::top_k(self.k, s, l)
    }
}

// --------------------------------------------------------------- gather --

/// `src[:, rows, :]`: `src` `(kv_h, n, d)`, `rows` `(m,)` u32 below `n`.
/// Returns a contiguous `(kv_h, m, d)` tensor of `src`'s dtype.
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

    #[cfg(feature = "cuda-kernels")]
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
/// [`crate::attention::indexed_decode_attention`] with one part.
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

    #[cfg(feature = "cuda-kernels")]
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

/// The CUDA launches of the ops above.
#[cfg(feature = "cuda-kernels")]
pub(crate) mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda::cudarc::driver::{CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda::{CudaDType, CudaDevice, CudaStorage, WrapErr};
    use candle_core::{DType, Layout, Result, Shape};

    use super::{MODULE, PTX};

    /// Rows of a split of [`indexed_decode`]'s index list.
    const ROWS_PER_SPLIT: usize = 256;
    /// Largest head dimension the decode kernel supports (its `MAX_D`).
    const MAX_D: usize = 256;

    pub(crate) fn func(
        dev: &CudaDevice,
        name: &str,
    ) -> Result<candle_core::cuda::cudarc::driver::CudaFunction> {
        Ok(dev
            .get_or_load_custom_func(name, MODULE, PTX)?
            .into_cuda_function())
    }

    fn suffix(dtype: DType) -> Result<&'static str> {
        Ok(match dtype {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            other => candle_core::bail!("omnikv ops: unsupported dtype {other:?} on CUDA"),
        })
    }

    /// The storage's elements from the layout's start offset on.
    fn view<'a, T: CudaDType + DeviceRepr + candle_core::WithDType>(
        s: &'a CudaStorage,
        l: &Layout,
    ) -> Result<CudaView<'a, T>> {
        Ok(s.as_cuda_slice::<T>()?.slice(l.start_offset()..))
    }

    fn cfg(grid: (u32, u32, u32), block: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: grid,
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    pub(crate) fn score_max(
        scale: f32,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        fn run<T: CudaDType + DeviceRepr + candle_core::WithDType>(
            scale: f32,
            q: &CudaStorage,
            ql: &Layout,
            k: &CudaStorage,
            kl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let dev = q.device().clone();
            let (h, d) = ql.shape().dims2()?;
            let (kv_h, n, _) = kl.shape().dims3()?;
            let f = func(&dev, &format!("omnikv_score_max_{}", suffix(T::DTYPE)?))?;
            let qv = view::<f32>(q, ql)?;
            let kv = view::<T>(k, kl)?;
            let mut out = dev.alloc_zeros::<f32>(n)?;
            let (h, kv_h, n32, d, hs) = (
                h as i32,
                kv_h as i32,
                n as i32,
                d as i32,
                kl.stride()[0] as i64,
            );
            let warps = 8u32;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&qv)
                .arg(&kv)
                .arg(&mut out)
                .arg(&h)
                .arg(&kv_h)
                .arg(&n32)
                .arg(&d)
                .arg(&hs)
                .arg(&scale);
            unsafe { b.launch(cfg(((n as u32).div_ceil(warps), 1, 1), 32 * warps)) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(n)))
        }
        match k.dtype() {
            DType::F32 => run::<f32>(scale, q, ql, k, kl),
            DType::F16 => run::<half::f16>(scale, q, ql, k, kl),
            DType::BF16 => run::<half::bf16>(scale, q, ql, k, kl),
            other => candle_core::bail!("omnikv score_max: unsupported dtype {other:?}"),
        }
    }

    pub(crate) fn top_k(k: usize, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = s.device().clone();
        let n = l.shape().dims1()?;
        let scores = view::<f32>(s, l)?;
        let mut thr = dev.alloc_zeros::<u32>(2)?;
        let mut out = dev.alloc_zeros::<u32>(k)?;
        let stream = dev.cuda_stream();
        let (n32, k32) = (n as i32, k as i32);
        let threshold = func(&dev, "omnikv_topk_threshold")?;
        let mut b = stream.launch_builder(&threshold);
        b.arg(&scores).arg(&n32).arg(&k32).arg(&mut thr);
        unsafe { b.launch(cfg((1, 1, 1), 1024)) }.w()?;
        let compact = func(&dev, "omnikv_topk_compact")?;
        let mut b = stream.launch_builder(&compact);
        b.arg(&scores).arg(&n32).arg(&thr).arg(&mut out);
        unsafe { b.launch(cfg((1, 1, 1), 1024)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(k)))
    }

    pub(crate) fn gather_rows(
        src: &CudaStorage,
        sl: &Layout,
        rows: &CudaStorage,
        rl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        fn run<T: CudaDType + DeviceRepr + candle_core::WithDType>(
            src: &CudaStorage,
            sl: &Layout,
            rows: &CudaStorage,
            rl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let dev = src.device().clone();
            let (kv_h, _n, d) = sl.shape().dims3()?;
            let m = rl.shape().dims1()?;
            let f = func(&dev, &format!("omnikv_gather_rows_{}", suffix(T::DTYPE)?))?;
            let sv = view::<T>(src, sl)?;
            let rv = view::<u32>(rows, rl)?;
            let mut out = unsafe { dev.alloc::<T>(kv_h * m * d)? };
            let (hs, m32, d32) = (sl.stride()[0] as i64, m as i32, d as i32);
            if m > 0 {
                let stream = dev.cuda_stream();
                let mut b = stream.launch_builder(&f);
                b.arg(&sv)
                    .arg(&rv)
                    .arg(&mut out)
                    .arg(&hs)
                    .arg(&m32)
                    .arg(&d32);
                unsafe { b.launch(cfg((m as u32, kv_h as u32, 1), d.min(256) as u32)) }.w()?;
            }
            Ok((
                CudaStorage::wrap_cuda_slice(out, dev),
                Shape::from((kv_h, m, d)),
            ))
        }
        match src.dtype() {
            DType::F32 => run::<f32>(src, sl, rows, rl),
            DType::F16 => run::<half::f16>(src, sl, rows, rl),
            DType::BF16 => run::<half::bf16>(src, sl, rows, rl),
            other => candle_core::bail!("omnikv gather_rows: unsupported dtype {other:?}"),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn indexed_decode(
        rows: &candle_core::Tensor,
        scale: f32,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        match k.dtype() {
            DType::F32 => decode_t::<f32>(rows, scale, q, ql, k, kl, v, vl),
            DType::F16 => decode_t::<half::f16>(rows, scale, q, ql, k, kl, v, vl),
            DType::BF16 => decode_t::<half::bf16>(rows, scale, q, ql, k, kl, v, vl),
            other => candle_core::bail!("omnikv indexed_decode: unsupported dtype {other:?}"),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn decode_t<T: CudaDType + DeviceRepr + candle_core::WithDType>(
        rows: &candle_core::Tensor,
        scale: f32,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (rs, rl) = rows.storage_and_layout();
        let candle_core::Storage::Cuda(rs) = &*rs else {
            candle_core::bail!("omnikv indexed_decode: row indices live on another device");
        };
        let (h, d) = ql.shape().dims2()?;
        if d > MAX_D {
            candle_core::bail!(
                "omnikv indexed_decode: head dimension {d} is above the CUDA kernel's {MAX_D}"
            );
        }
        let (kv_h, _n, _) = kl.shape().dims3()?;
        let m = rl.shape().dims1()?;
        let dev = q.device().clone();
        let splits = m.div_ceil(ROWS_PER_SPLIT).max(1);
        let mut part_max = dev.alloc_zeros::<f32>(h * splits)?;
        let mut part_sum = dev.alloc_zeros::<f32>(h * splits)?;
        let mut part_acc = dev.alloc_zeros::<f32>(h * splits * d)?;
        let mut out = dev.alloc_zeros::<f32>(h * d)?;
        let qv = view::<f32>(q, ql)?;
        let rv = view::<u32>(rs, rl)?;
        let (m32, h32, kvh32, d32) = (m as i32, h as i32, kv_h as i32, d as i32);
        let (khs, vhs) = (kl.stride()[0] as i64, vl.stride()[0] as i64);
        let (rps, splits32) = (ROWS_PER_SPLIT as i32, splits as i32);
        let stream = dev.cuda_stream();
        let split = func(
            &dev,
            &format!("omnikv_flash_decode_split_{}", suffix(T::DTYPE)?),
        )?;
        let (kv, vv) = (view::<T>(k, kl)?, view::<T>(v, vl)?);
        let mut b = stream.launch_builder(&split);
        b.arg(&qv)
            .arg(&kv)
            .arg(&vv)
            .arg(&rv)
            .arg(&m32)
            .arg(&h32)
            .arg(&kvh32)
            .arg(&khs)
            .arg(&vhs)
            .arg(&d32)
            .arg(&scale)
            .arg(&rps)
            .arg(&mut part_max)
            .arg(&mut part_sum)
            .arg(&mut part_acc);
        unsafe { b.launch(cfg((splits as u32, h as u32, 1), 128)) }.w()?;
        let merge = func(&dev, "omnikv_flash_decode_merge")?;
        let mut b = stream.launch_builder(&merge);
        b.arg(&part_max)
            .arg(&part_sum)
            .arg(&part_acc)
            .arg(&splits32)
            .arg(&d32)
            .arg(&mut out);
        unsafe { b.launch(cfg((h as u32, 1, 1), d.min(128) as u32)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((h, d))))
    }
}
