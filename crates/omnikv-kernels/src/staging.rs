//! Host-to-device staging of offloaded prompt rows on CUDA (`cuda` feature;
//! used by the backend's store for `real_offload` with the model on a GPU;
//! spec: "KV placement and offload", the improvements it asks for).
//!
//! The published code gathers with `index_select` from pageable host memory
//! on the default stream, so the copy cannot overlap anything. Here, per
//! staging job (one sparse layer of one sequence, run on the backend's
//! gather workers while the wait-load layer computes; the backend decides
//! which rows are fresh and the order, this module only moves them):
//!
//! 1. the newly selected rows are copied on the CPU into a **pinned** buffer
//!    (reused from a pool; reuse waits for the buffer's previous copy);
//! 2. one asynchronous host-to-device copy on a per-device **copy stream**;
//! 3. on the same stream, `omnikv_merge_rows` assembles the staging from the
//!    previous step's staging and the new rows (delta fetch);
//! 4. an **event** is recorded on the copy stream. The sparse layer makes
//!    the compute stream wait on it just before its attention
//!    (the store's `Ready::wait_on`, through [`CopyDone::wait_on`]), so the first sparse layer waits
//!    only for its own rows and no CPU thread blocks on the copy.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda::cudarc::driver::{
    CudaEvent, CudaSlice, CudaStream, CudaView, DeviceRepr, LaunchConfig, PinnedHostSlice,
    PushKernelArg,
};
use candle_core::cuda::{CudaDType, CudaDevice, CudaStorage, DeviceId, WrapErr};
use candle_core::{CpuStorage, DType, Result, Storage, Tensor, WithDType};

/// A copy stream and its pinned buffers, one per CUDA device.
struct CopyEngine {
    stream: Arc<CudaStream>,
    pool: Mutex<Vec<PinnedHostSlice<u8>>>,
}

/// Pinned buffers kept for reuse per device.
const POOL_SIZE: usize = 16;

fn engine(dev: &CudaDevice) -> Result<Arc<CopyEngine>> {
    static ENGINES: OnceLock<Mutex<HashMap<DeviceId, Arc<CopyEngine>>>> = OnceLock::new();
    let mut engines = ENGINES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(e) = engines.get(&dev.id()) {
        return Ok(e.clone());
    }
    let stream = dev.cuda_stream().context().new_stream().w()?;
    let e = Arc::new(CopyEngine {
        stream,
        pool: Mutex::new(Vec::new()),
    });
    engines.insert(dev.id(), e.clone());
    Ok(e)
}

impl CopyEngine {
    /// A pinned buffer of at least `bytes` (sizes rounded up to a power of
    /// two so buffers are reused across steps).
    fn take(&self, bytes: usize) -> Result<PinnedHostSlice<u8>> {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = pool.iter().position(|b| b.len() >= bytes) {
            return Ok(pool.swap_remove(i));
        }
        drop(pool);
        let ctx = self.stream.context();
        // SAFETY: a fresh page-locked host allocation of plain bytes; it is
        // written (`pack_rows`) before any copy reads it. cudarc's pinned slice
        // records an event for each copy that reads it and `as_mut_slice` waits on
        // that event, so a buffer taken again from the pool is never overwritten
        // while an earlier asynchronous copy still reads it.
        unsafe { ctx.alloc_pinned::<u8>(bytes.next_power_of_two().max(4096)) }.w()
    }

    fn give_back(&self, buf: PinnedHostSlice<u8>) {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < POOL_SIZE {
            pool.push(buf);
        }
    }
}

/// The completion of one staging copy on the copy stream.
#[derive(Clone)]
pub struct CopyDone(Arc<CudaEvent>);

impl CopyDone {
    /// Enqueue a wait for the copy on `dev`'s compute stream.
    ///
    /// # Errors
    /// If the CUDA driver refuses the wait.
    pub fn wait_on(&self, dev: &CudaDevice) -> Result<()> {
        dev.cuda_stream().wait(&self.0).w()
    }
}

fn cpu_bytes(s: &CpuStorage) -> Result<&[u8]> {
    fn bytes<T>(x: &[T]) -> &[u8] {
        // Plain old data (f32 / f16 / bf16) viewed as bytes.
        // SAFETY: `x` is a live slice of f32/f16/bf16 (plain old data without
        // padding or invalid bit patterns); its bytes are the same memory, the
        // same length in bytes and borrowed for the same lifetime, and u8 has
        // alignment 1.
        unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<u8>(), std::mem::size_of_val(x)) }
    }
    Ok(match s {
        CpuStorage::F32(x) => bytes(x),
        CpuStorage::F16(x) => bytes(x),
        CpuStorage::BF16(x) => bytes(x),
        _ => candle_core::bail!("omnikv: offloaded rows must be f32, f16 or bf16"),
    })
}

/// Copy rows `positions` of the CPU tensor `t` `(kv_h, P, d)` (contiguous
/// rows) into `out` as a contiguous `(kv_h, positions, d)` block.
fn pack_rows(t: &Tensor, positions: &[u32], out: &mut [u8]) -> Result<()> {
    let (kv_h, p, d) = t.dims3()?;
    let es = t.dtype().size_in_bytes();
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("omnikv: the host tier is not in CPU memory");
    };
    let st = layout.stride();
    if st[2] != 1 && d != 1 {
        candle_core::bail!("omnikv: host-tier rows are not contiguous");
    }
    let src = cpu_bytes(cpu)?;
    let row = d * es;
    for kh in 0..kv_h {
        for (j, &pos) in positions.iter().enumerate() {
            if pos as usize >= p {
                candle_core::bail!("omnikv: staged position {pos} is beyond the {p} prompt rows");
            }
            let at = (layout.start_offset() + kh * st[0] + pos as usize * st[1]) * es;
            let to = (kh * positions.len() + j) * row;
            out[to..to + row].copy_from_slice(&src[at..at + row]);
        }
    }
    Ok(())
}

/// Stage prompt rows on `dev` (see the module documentation).
///
/// * `host_k`, `host_v`: the host tier's `(kv_h, P, d)` rows (CPU);
/// * `previous`: the previous staging `(kv_h, m', d)` on `dev`, if any;
/// * `fresh`: positions to copy from the host tier;
/// * `order[j]`: where row `j` of the new staging comes from: `< m'` a row of
///   `previous`, else row `order[j] - m'` of the fresh rows. Without
///   `previous`, the staging is the fresh rows in order.
///
/// Returns the staged keys and values `(kv_h, m, d)` and the copy's event.
///
/// # Errors
/// If the dtype is not f32/f16/bf16, the host rows are not CPU rows with a
/// contiguous last dimension, a position is beyond them, the previous
/// staging is not a contiguous CUDA tensor, or an allocation, copy or kernel
/// launch fails.
pub fn stage(
    host_k: &Tensor,
    host_v: &Tensor,
    previous: Option<(&Tensor, &Tensor)>,
    fresh: &[u32],
    order: Option<&[u32]>,
    dev: &CudaDevice,
) -> Result<(Tensor, Tensor, CopyDone)> {
    match host_k.dtype() {
        DType::F32 => stage_t::<f32>(host_k, host_v, previous, fresh, order, dev),
        DType::F16 => stage_t::<half::f16>(host_k, host_v, previous, fresh, order, dev),
        DType::BF16 => stage_t::<half::bf16>(host_k, host_v, previous, fresh, order, dev),
        other => candle_core::bail!("omnikv: cannot stage {other:?} rows"),
    }
}

fn stage_t<T: CudaDType + DeviceRepr + WithDType>(
    host_k: &Tensor,
    host_v: &Tensor,
    previous: Option<(&Tensor, &Tensor)>,
    fresh: &[u32],
    order: Option<&[u32]>,
    dev: &CudaDevice,
) -> Result<(Tensor, Tensor, CopyDone)> {
    let eng = engine(dev)?;
    let stream = &eng.stream;
    let (kv_h, _, d) = host_k.dims3()?;
    let es = std::mem::size_of::<T>();
    let f = fresh.len();
    let half_bytes = kv_h * f * d * es;
    let identity: Vec<u32>;
    let order = match (previous, order) {
        (Some(_), Some(o)) => o,
        _ => {
            identity = (0..f as u32).collect();
            &identity
        }
    };
    let m = order.len();

    // 1-2. New rows: CPU gather into pinned memory, one async copy.
    let mut pinned = eng.take((2 * half_bytes).max(1))?;
    {
        let buf = pinned.as_mut_slice().w()?;
        pack_rows(host_k, fresh, &mut buf[..half_bytes])?;
        pack_rows(host_v, fresh, &mut buf[half_bytes..2 * half_bytes])?;
    }
    // SAFETY: uninitialised device bytes, fully written by the
    // `memcpy_htod` on the next line (same length, same stream) before the
    // merge kernel on that stream reads them.
    let mut fresh_dev = unsafe { stream.alloc::<u8>(pinned.len()) }.w()?;
    stream.memcpy_htod(&pinned, &mut fresh_dev).w()?;
    eng.give_back(pinned);
    // SAFETY: the first `half_bytes = kv_h * f * d * size_of::<T>()` bytes
    // are the packed key rows of type `T` (`pack_rows` wrote them as `T`);
    // `transmute` checks the length and returns `None` if it does not fit.
    // Device allocations are aligned far beyond `T`'s alignment.
    let fresh_k = unsafe { fresh_dev.transmute::<T>(kv_h * f * d) }
        .ok_or_else(|| candle_core::Error::Msg("omnikv: staging buffer too small".into()))?;
    // SAFETY: as above, for the value rows that start `half_bytes` in (a
    // multiple of `size_of::<T>()`, so still aligned for `T`).
    let fresh_v = unsafe { fresh_dev.slice(half_bytes..).transmute::<T>(kv_h * f * d) }
        .ok_or_else(|| candle_core::Error::Msg("omnikv: staging buffer too small".into()))?;

    // 3. Merge with the previous staging on the copy stream.
    let order_dev = stream.clone_htod(order).w()?;
    // SAFETY: uninitialised device memory that the merge kernel writes in
    // full (one block per (row, head), every one of the `m` output rows of
    // `d` elements) before the event that readers wait on is recorded; with
    // `m == 0` it is empty and never read.
    let mut out_k = unsafe { stream.alloc::<T>(kv_h * m * d) }.w()?;
    // SAFETY: as for `out_k`.
    let mut out_v = unsafe { stream.alloc::<T>(kv_h * m * d) }.w()?;
    let name = format!(
        "omnikv_merge_rows_{}",
        match T::DTYPE {
            DType::F32 => "f32",
            DType::F16 => "f16",
            _ => "bf16",
        }
    );
    let merge = crate::cuda::func(dev, &name)?;
    let (na, nf, m32, d32) = (
        previous.map_or(0, |(k, _)| k.dim(1).unwrap_or(0)) as i32,
        f as i32,
        m as i32,
        d as i32,
    );
    let launch = LaunchConfig {
        grid_dim: (m as u32, kv_h as u32, 1),
        block_dim: (d.min(256) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let merge_into = |prev: Option<&Tensor>,
                      fresh_x: &CudaView<'_, T>,
                      out_x: &mut CudaSlice<T>|
     -> Result<()> {
        if m == 0 {
            return Ok(());
        }
        let guard = prev.map(|t| t.storage_and_layout());
        let prev_view = match &guard {
            Some((s, l)) => {
                let Storage::Cuda(s) = &**s else {
                    candle_core::bail!("omnikv: the previous staging is not on the GPU");
                };
                if !l.is_contiguous() {
                    candle_core::bail!("omnikv: the previous staging is not contiguous");
                }
                Some(s.as_cuda_slice::<T>()?.slice(l.start_offset()..))
            }
            None => None,
        };
        let mut b = stream.launch_builder(&merge);
        match &prev_view {
            Some(p) => b.arg(p),
            None => b.arg(fresh_x),
        };
        b.arg(&na)
            .arg(fresh_x)
            .arg(&nf)
            .arg(&order_dev)
            .arg(out_x)
            .arg(&m32)
            .arg(&d32);
        // SAFETY: arguments as `omnikv_merge_rows_{T}` in
        // `crate::signatures::KERNELS`: the previous staging (`na` rows
        // per head, contiguous, checked above; the fresh rows stand in when there
        // is none and `na == 0`), the `nf` fresh rows, `order` with `m` entries
        // each naming a row of one of the two (built by the store's delta fetch),
        // and `out_x` with `kv_h * m * d` elements. All on this copy stream, so the
        // copy of the fresh rows has completed when the kernel runs.
        unsafe { b.launch(launch) }.w()?;
        Ok(())
    };
    merge_into(previous.map(|(k, _)| k), &fresh_k, &mut out_k)?;
    merge_into(previous.map(|(_, v)| v), &fresh_v, &mut out_v)?;

    // 4. The event the sparse layer's compute waits on.
    let done = CopyDone(Arc::new(stream.record_event(None).w()?));
    let wrap = |s| {
        Tensor::from_storage(
            Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone())),
            (kv_h, m, d),
            candle_core::op::BackpropOp::none(),
            false,
        )
    };
    Ok((wrap(out_k), wrap(out_v), done))
}
