//! The CUDA launches of the custom ops in [`crate::ops`] (the `cuda`
//! feature). The kernels live in `kernels/omnikv_decode.cu`, compiled to PTX
//! by `build.rs` and loaded once per device into candle's module cache;
//! their argument lists are the table [`crate::signatures::KERNELS`].

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::{CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda::{CudaDType, CudaDevice, CudaStorage, WrapErr};
use candle_core::{DType, Layout, Result, Shape};

/// Name of the PTX module in candle's per-device module cache.
pub const MODULE: &str = "omnikv_decode";
/// The kernels, compiled to PTX by `build.rs`.
pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/omnikv_decode.ptx"));

/// Rows of a split of [`indexed_decode`]'s index list.
const ROWS_PER_SPLIT: usize = 256;
/// Largest head dimension the decode kernel supports (its `MAX_D`).
const MAX_D: usize = 256;

/// The kernel `name` of this crate's PTX module on `dev`, loading the module on
/// first use.
///
/// # Errors
/// If the PTX does not load or has no such kernel.
pub fn func(
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
        // SAFETY: the arguments are those of `omnikv_score_max_{T}` in
        // `signatures::KERNELS`, in order and C type (i32 for int, i64 for long
        // long). `qv` holds the `h * d` f32 of the contiguous query (`ops::score_max`
        // makes it so); `kv` starts at the keys' offset and covers `kv_h` heads of
        // `n` rows of `d` elements, `hs` apart (the layout `ops` checked has
        // contiguous rows); `out` holds `n` f32. Each warp handles one position
        // below `n`, so every access is in bounds.
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
    // SAFETY: arguments as `omnikv_topk_threshold` in `signatures::KERNELS`;
    // `scores` holds `n` contiguous f32 (`ops::top_k` made them contiguous) and
    // `thr` the 2 u32 the kernel writes. One block of 1,024 threads, the shape
    // the kernel is written for.
    unsafe { b.launch(cfg((1, 1, 1), 1024)) }.w()?;
    let compact = func(&dev, "omnikv_topk_compact")?;
    let mut b = stream.launch_builder(&compact);
    b.arg(&scores).arg(&n32).arg(&thr).arg(&mut out);
    // SAFETY: arguments as `omnikv_topk_compact`; `out` holds `k` u32 and the
    // kernel writes exactly `k` positions: those above the threshold and the
    // first ties at it, as counted by the threshold pass (`0 < k < n`, checked
    // by `ops::top_k`).
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
        // SAFETY: uninitialised device memory of `kv_h * m * d` elements. With
        // `m > 0` the launch below writes every element (one block per (row, head),
        // threads over `d`) before anything reads it; with `m == 0` it is empty.
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
            // SAFETY: arguments as `omnikv_gather_rows_{T}`; `sv` covers `kv_h` heads
            // `hs` apart of `n` rows of `d`, `rv` holds `m` u32 and `out` `kv_h * m * d`
            // elements. Every row index is below `n`: that is `ops::gather_rows`'s
            // documented contract, which the CPU pass checks and this crate's callers
            // keep (they gather top-k positions of the same cache).
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
    // SAFETY: arguments as `omnikv_flash_decode_split_{T}`; `qv` holds `h * d`
    // f32, `kv`/`vv` cover `kv_h` heads (`khs`/`vhs` apart) of `n` rows of `d`
    // (`d <= MAX_D`, checked above), `rv` holds `m` row indices below `n`
    // (`ops::indexed_decode`'s contract), and the three partial buffers hold
    // `h * splits` (times `d`) f32 for the `splits * h` blocks launched.
    unsafe { b.launch(cfg((splits as u32, h as u32, 1), 128)) }.w()?;
    let merge = func(&dev, "omnikv_flash_decode_merge")?;
    let mut b = stream.launch_builder(&merge);
    b.arg(&part_max)
        .arg(&part_sum)
        .arg(&part_acc)
        .arg(&splits32)
        .arg(&d32)
        .arg(&mut out);
    // SAFETY: arguments as `omnikv_flash_decode_merge`; the partial buffers
    // are the `h * splits` (times `d`) f32 the split kernel wrote on this same
    // stream (so in order), and `out` holds the `h * d` f32 written, one block
    // per query head.
    unsafe { b.launch(cfg((h as u32, 1, 1), d.min(128) as u32)) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((h, d))))
}
