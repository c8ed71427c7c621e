//! The tiered KV store behind `real_offload`, and per-sequence KV accounting
//! (spec: "KV placement and offload").
//!
//! With `real_offload`, a sparse layer's keys/values never enter the model's
//! cache. Its prompt rows go to the *host tier* (CPU memory); rows of
//! generated tokens stay in the *device tier* (the model's device), and each
//! decode step gathers only the selected prompt rows into a device-tier
//! staging copy:
//!
//! ```text
//!                  prompt rows 0..P          generated rows P..n
//!   dense layer:   device (model cache)      device (model cache)
//!   sparse layer:  host tier (this store)    device tier (this store)
//!                  └─ selected rows ─► staging (device, one layer at a time)
//! ```
//!
//! On a CPU-only machine both tiers are host memory, but the code path, the
//! copies and the accounting are the same. Entries are keyed by the host's
//! sequence id and released by [`TieredStore::release`] when the host drops
//! the sequence (finished, cancelled or failed).
//!
//! Accounting (bytes per tier per sequence, totals) is kept whether or not
//! offload is on, so the same numbers compare both modes: without offload
//! every layer's rows count as device tier.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Mutex;

use candle_core::{Device, Result, Tensor};

use crate::telemetry::{SequenceFigures, StoreFigures};

/// A growable `(kv_h, len, d)` row buffer (capacity doubles, so appending a
/// row per decode step costs amortised O(1) copies).
#[derive(Debug)]
struct Rows {
    buf: Tensor,
    len: usize,
}

impl Rows {
    /// Copies `rows` (never keeps a view of the caller's tensor, whose
    /// storage may hold the whole batch).
    fn new(rows: &Tensor) -> Result<Self> {
        let buf = Tensor::zeros(rows.dims(), rows.dtype(), rows.device())?;
        buf.slice_set(&rows.contiguous()?, 1, 0)?;
        Ok(Self {
            buf,
            len: rows.dim(1)?,
        })
    }

    /// Append `rows`; `exact` grows the buffer to exactly the rows it holds
    /// (host-tier prompt rows: the view stays contiguous, which gathers
    /// need), otherwise capacity doubles.
    fn push(&mut self, rows: &Tensor, exact: bool) -> Result<()> {
        let add = rows.dim(1)?;
        let cap = self.buf.dim(1)?;
        if self.len + add > cap {
            let new_cap = if exact {
                self.len + add
            } else {
                (self.len + add).max(cap * 2).max(16)
            };
            let (kv_h, _, d) = self.buf.dims3()?;
            let grown = Tensor::zeros((kv_h, new_cap, d), self.buf.dtype(), self.buf.device())?;
            grown.slice_set(&self.view()?.contiguous()?, 1, 0)?;
            self.buf = grown;
        }
        self.buf.slice_set(&rows.contiguous()?, 1, self.len)?;
        self.len += add;
        Ok(())
    }

    fn view(&self) -> Result<Tensor> {
        self.buf.narrow(1, 0, self.len)
    }

    /// Bytes held (capacity, not just the rows in use).
    fn bytes(&self) -> u64 {
        (self.buf.elem_count() * self.buf.dtype().size_in_bytes()) as u64
    }
}

/// One sparse layer's rows of one sequence.
#[derive(Debug, Default)]
struct LayerRows {
    /// Host tier: prompt rows, keys and values.
    host: Option<(Rows, Rows)>,
    /// Device tier: generated rows.
    tail: Option<(Rows, Rows)>,
    /// Device tier: the prompt rows staged for the last decode step, and
    /// their positions (delta fetch starts from these).
    staged: Option<Staged>,
}

/// Selected prompt rows copied to the device tier, `(kv_h, sel, d)` each
/// (sel selected positions).
#[derive(Debug, Clone)]
pub struct Staged {
    /// The staged prompt positions, ascending; row `j` of `k`/`v` is
    /// position `positions[j]`.
    pub positions: Vec<u32>,
    /// Keys `(kv_h, sel, d)`, the host tier's dtype.
    pub k: Tensor,
    /// Values `(kv_h, sel, d)`, the host tier's dtype.
    pub v: Tensor,
    /// When the copy that filled `k` and `v` is done.
    pub ready: Ready,
}

/// Completion of a staging copy. On CUDA the copy runs on a copy stream
/// (`omnikv_kernels::staging`) and the consumer's compute stream must wait for
/// it; everywhere else the copy is complete when the staging exists.
#[derive(Clone, Default)]
pub struct Ready {
    #[cfg(feature = "cuda-kernels")]
    copy: Option<omnikv_kernels::staging::CopyDone>,
}

impl Ready {
    /// Make `device`'s compute stream wait for the copy. Enqueues a wait on
    /// the GPU; never blocks the calling thread. A no-op off CUDA.
    ///
    /// # Errors
    /// If the CUDA driver refuses the wait.
    pub fn wait_on(&self, device: &Device) -> Result<()> {
        #[cfg(feature = "cuda-kernels")]
        if let (Some(copy), Device::Cuda(dev)) = (&self.copy, device) {
            return copy.wait_on(dev);
        }
        let _ = device;
        Ok(())
    }
}

impl fmt::Debug for Ready {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        #[cfg(feature = "cuda-kernels")]
        if self.copy.is_some() {
            return f.write_str("Ready(copy stream)");
        }
        f.write_str("Ready(done)")
    }
}

impl Staged {
    fn bytes(&self) -> u64 {
        ((self.k.elem_count() + self.v.elem_count()) * self.k.dtype().size_in_bytes()) as u64
    }
}

fn push_pair(slot: &mut Option<(Rows, Rows)>, k: &Tensor, v: &Tensor, exact: bool) -> Result<()> {
    match slot {
        Some((kb, vb)) => {
            kb.push(k, exact)?;
            vb.push(v, exact)
        }
        None => {
            *slot = Some((Rows::new(k)?, Rows::new(v)?));
            Ok(())
        }
    }
}

fn pair_bytes(slot: &Option<(Rows, Rows)>) -> u64 {
    slot.as_ref().map_or(0, |(k, v)| k.bytes() + v.bytes())
}

fn cat_rows(parts: &[Tensor]) -> Result<Tensor> {
    match parts {
        [one] => Ok(one.clone()),
        _ => Tensor::cat(parts, 1),
    }
}

#[derive(Debug, Default)]
struct SeqEntry {
    sparse: BTreeMap<usize, LayerRows>,
    /// Device-tier bytes of dense layers' rows in the model cache, per layer.
    dense: BTreeMap<usize, u64>,
    /// Rows of the previous step's selection, per filter layer (delta fetch
    /// statistics).
    last_selection: BTreeMap<usize, Vec<u32>>,
    /// Prompt rows this sequence's delta fetches copied from the host tier.
    moved_rows: u64,
    /// Prompt rows staged for it.
    staged_rows: u64,
}

impl SeqEntry {
    fn host_bytes(&self) -> u64 {
        self.sparse.values().map(|l| pair_bytes(&l.host)).sum()
    }

    fn device_bytes(&self) -> u64 {
        self.dense.values().sum::<u64>()
            + self
                .sparse
                .values()
                .map(|l| pair_bytes(&l.tail) + l.staged.as_ref().map_or(0, Staged::bytes))
                .sum::<u64>()
    }
}

/// Bytes held for one sequence, or for all of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TierBytes {
    /// Host tier: offloaded prompt rows (buffer capacity), in bytes.
    pub host: u64,
    /// Device tier: dense layers' cached rows, sparse layers' generated rows
    /// and staged rows, in bytes.
    pub device: u64,
}

/// A snapshot of the store's accounting.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoreUsage {
    /// Sequences with an entry.
    pub sequences: usize,
    /// Sum over all sequences.
    pub total: TierBytes,
    /// Per sequence id.
    pub per_sequence: BTreeMap<usize, TierBytes>,
    /// Selected prompt rows that were already selected at the previous step,
    /// summed over filter layers and decode steps (what delta fetch reuses).
    pub reused_rows: u64,
    /// All selected prompt rows, summed the same way.
    pub selected_rows: u64,
    /// Prompt rows copied from the host tier to the device tier by delta
    /// fetches.
    pub moved_rows: u64,
    /// Rows a full gather would have copied for the same stagings.
    pub staged_rows: u64,
}

pub use crate::accounting::Bytes;

#[derive(Debug, Default)]
struct Inner {
    seqs: HashMap<usize, SeqEntry>,
    host_total: u64,
    reused_rows: u64,
    selected_rows: u64,
    moved_rows: u64,
    staged_rows: u64,
}

/// The tiered KV store: per sequence, the host-tier prompt rows, device-tier
/// generated rows and last staging of each offloaded sparse layer, plus the
/// byte accounting of every layer (see the module documentation). Shared by
/// the backend and its gather workers; one lock guards it.
#[derive(Debug)]
pub struct TieredStore {
    host: Device,
    max_host_bytes: Option<u64>,
    inner: Mutex<Inner>,
}

impl TieredStore {
    /// An empty store; `max_host_bytes` limits the host tier of all
    /// sequences together (`None`: no limit).
    pub fn new(max_host_bytes: Option<u64>) -> Self {
        Self {
            host: Device::Cpu,
            max_host_bytes,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (every update
        // is a single assignment), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Append one sequence's new rows of sparse layer `layer`: `k`, `v` are
    /// `(kv_h, s, d)` for positions `offset .. offset + s`; positions below
    /// `prompt_len` go to the host tier, the others to the device tier. A
    /// pass at `offset == 0` over stored rows starts the layer over.
    ///
    /// # Errors
    /// If `offset` is neither 0 nor the number of rows stored, the new host
    /// rows would exceed `max_host_bytes`, or a copy fails.
    pub fn append(
        &self,
        seq: usize,
        layer: usize,
        prompt_len: usize,
        offset: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<()> {
        let s = k.dim(1)?;
        let to_host = prompt_len.saturating_sub(offset).min(s);
        let mut inner = self.lock();
        let stored = inner
            .seqs
            .get(&seq)
            .and_then(|e| e.sparse.get(&layer))
            .map_or(0, |l| {
                l.host.as_ref().map_or(0, |(k, _)| k.len)
                    + l.tail.as_ref().map_or(0, |(k, _)| k.len)
            });
        if offset == 0 && stored > 0 {
            // The host recomputes the sequence from its first token (after a
            // cache reset): start the layer over.
            let freed = inner
                .seqs
                .get_mut(&seq)
                .and_then(|e| e.sparse.remove(&layer))
                .map_or(0, |l| pair_bytes(&l.host));
            inner.host_total -= freed;
        } else if offset != stored {
            candle_core::bail!(
                "omnikv: sequence {seq}, layer {layer}: {stored} rows stored but the pass starts at position {offset}"
            );
        }
        if to_host > 0 {
            let (kh, vh) = (
                k.narrow(1, 0, to_host)?.to_device(&self.host)?,
                v.narrow(1, 0, to_host)?.to_device(&self.host)?,
            );
            let entry_before = inner
                .seqs
                .get(&seq)
                .and_then(|e| e.sparse.get(&layer))
                .map_or(0, |l| pair_bytes(&l.host));
            // Prompt rows arrive in one piece per pass, so the buffer grows
            // to exactly what it holds on the first pass.
            let estimate =
                ((kh.elem_count() + vh.elem_count()) * kh.dtype().size_in_bytes()) as u64;
            if let Some(max) = self.max_host_bytes {
                if inner.host_total + estimate > max {
                    candle_core::bail!(
                        "omnikv: the host tier is full: sequence {seq} needs {} more for layer {layer}, {} of `max_host_bytes` = {} are in use; raise `max_host_bytes` in the omnikv config or send a shorter prompt",
                        Bytes(estimate),
                        Bytes(inner.host_total),
                        Bytes(max)
                    );
                }
            }
            let entry = inner.seqs.entry(seq).or_default();
            let rows = entry.sparse.entry(layer).or_default();
            // A prompt split over several passes (a host chunk, a prefix-cache
            // hit) grows the host rows exactly, so they stay one contiguous
            // block for the gathers.
            push_pair(&mut rows.host, &kh, &vh, true)?;
            let after = pair_bytes(&rows.host);
            inner.host_total += after - entry_before;
        }
        if to_host < s {
            let (kt, vt) = (
                k.narrow(1, to_host, s - to_host)?,
                v.narrow(1, to_host, s - to_host)?,
            );
            let entry = inner.seqs.entry(seq).or_default();
            push_pair(
                &mut entry.sparse.entry(layer).or_default().tail,
                &kt,
                &vt,
                false,
            )?;
        }
        Ok(())
    }

    /// All rows of a sparse layer for one sequence, `(1, kv_h, n, d)` each,
    /// on `device` (prompt-pass continuation, or a budget covering the
    /// whole prompt).
    ///
    /// # Errors
    /// If nothing is stored for `seq` and `layer`, or a copy fails.
    pub fn all_rows(&self, seq: usize, layer: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let inner = self.lock();
        let Some(rows) = inner.seqs.get(&seq).and_then(|e| e.sparse.get(&layer)) else {
            candle_core::bail!("omnikv: no stored rows for sequence {seq}, layer {layer}");
        };
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for (k, v) in rows.host.iter().chain(rows.tail.iter()) {
            ks.push(k.view()?.to_device(device)?);
            vs.push(v.view()?.to_device(device)?);
        }
        Ok((cat_rows(&ks)?.unsqueeze(0)?, cat_rows(&vs)?.unsqueeze(0)?))
    }

    /// Stage the selected prompt rows (ascending positions) of a sparse
    /// layer on `device`: `(kv_h, sel, d)` keys and values, in selection
    /// order. Delta fetch: rows the previous step staged are taken from that
    /// staging copy; only newly selected positions are copied from the host
    /// tier. The copies run outside the store's lock, so stagings of several
    /// layers proceed in parallel (see the backend's prefetch).
    ///
    /// # Errors
    /// If no prompt rows are stored for `seq` and `layer`, or a copy fails
    /// (see [`delta_stage`]).
    pub fn stage(
        &self,
        seq: usize,
        layer: usize,
        selection: &[u32],
        device: &Device,
    ) -> Result<Staged> {
        let (host_k, host_v, previous) = {
            let inner = self.lock();
            let Some(rows) = inner.seqs.get(&seq).and_then(|e| e.sparse.get(&layer)) else {
                candle_core::bail!("omnikv: no stored rows for sequence {seq}, layer {layer}");
            };
            let Some((kh, vh)) = &rows.host else {
                candle_core::bail!("omnikv: sequence {seq} has no prompt rows in layer {layer}");
            };
            (kh.view()?, vh.view()?, rows.staged.clone())
        };
        let (staged, moved) = delta_stage(&host_k, &host_v, previous.as_ref(), selection, device)?;
        let mut inner = self.lock();
        inner.moved_rows += moved as u64;
        inner.staged_rows += selection.len() as u64;
        if let Some(e) = inner.seqs.get_mut(&seq) {
            e.moved_rows += moved as u64;
            e.staged_rows += selection.len() as u64;
        }
        if let Some(rows) = inner
            .seqs
            .get_mut(&seq)
            .and_then(|e| e.sparse.get_mut(&layer))
        {
            rows.staged = Some(staged.clone());
        }
        Ok(staged)
    }

    /// Generated rows of a sparse layer (device tier), `(kv_h, t, d)` each
    /// (t generated tokens so far); `None` before the first one.
    ///
    /// # Errors
    /// If nothing is stored for `seq` and `layer`.
    pub fn tail(&self, seq: usize, layer: usize) -> Result<Option<(Tensor, Tensor)>> {
        let inner = self.lock();
        let Some(rows) = inner.seqs.get(&seq).and_then(|e| e.sparse.get(&layer)) else {
            candle_core::bail!("omnikv: no stored rows for sequence {seq}, layer {layer}");
        };
        rows.tail
            .as_ref()
            .map(|(k, v)| Ok((k.view()?, v.view()?)))
            .transpose()
    }

    /// [`Self::stage`] followed by the generated rows:
    /// `(1, kv_h, sel + generated, d)` keys and values.
    ///
    /// # Errors
    /// As [`Self::stage`] and [`Self::with_tail`].
    pub fn gather(
        &self,
        seq: usize,
        layer: usize,
        selection: &[u32],
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let staged = self.stage(seq, layer, selection, device)?;
        self.with_tail(seq, layer, staged)
    }

    /// Append the generated rows to staged prompt rows:
    /// `(1, kv_h, sel + generated, d)` keys and values. First makes the
    /// staging's device wait for its copy ([`Ready::wait_on`]).
    ///
    /// # Errors
    /// If nothing is stored for `seq` and `layer`, the wait fails, or the
    /// staging and the generated rows do not concatenate.
    pub fn with_tail(&self, seq: usize, layer: usize, staged: Staged) -> Result<(Tensor, Tensor)> {
        staged.ready.wait_on(staged.k.device())?;
        let mut ks = vec![staged.k];
        let mut vs = vec![staged.v];
        if let Some((kt, vt)) = self.tail(seq, layer)? {
            ks.push(kt);
            vs.push(vt);
        }
        Ok((cat_rows(&ks)?.unsqueeze(0)?, cat_rows(&vs)?.unsqueeze(0)?))
    }

    /// Record a filter layer's selection for one sequence: counts rows that
    /// the previous step had selected too (what a delta fetch reuses).
    pub fn note_selection(&self, seq: usize, filter: usize, selection: &[u32]) {
        let mut inner = self.lock();
        let Some(entry) = inner.seqs.get_mut(&seq) else {
            return;
        };
        let reused = match entry.last_selection.get(&filter) {
            Some(prev) => count_common_sorted(prev, selection),
            None => 0,
        };
        entry.last_selection.insert(filter, selection.to_vec());
        inner.reused_rows += reused as u64;
        inner.selected_rows += selection.len() as u64;
    }

    /// Device-tier bytes a dense layer holds for one sequence in the model
    /// cache: `bytes` is its cached rows times the bytes of a row (keys and
    /// values, all KV heads). Replaces the layer's previous figure.
    pub fn note_dense(&self, seq: usize, layer: usize, bytes: u64) {
        self.lock()
            .seqs
            .entry(seq)
            .or_default()
            .dense
            .insert(layer, bytes);
    }

    /// Release everything held for a sequence; returns what it held, or
    /// `None` if it held nothing.
    pub fn release(&self, seq: usize) -> Option<TierBytes> {
        let mut inner = self.lock();
        let entry = inner.seqs.remove(&seq)?;
        let held = TierBytes {
            host: entry.host_bytes(),
            device: entry.device_bytes(),
        };
        inner.host_total -= held.host;
        Some(held)
    }

    /// The store's figures for the metrics: totals, and per live sequence.
    pub fn figures(&self) -> (StoreFigures, Vec<SequenceFigures>) {
        let inner = self.lock();
        let mut per_seq: Vec<SequenceFigures> = inner
            .seqs
            .iter()
            .map(|(&seq, e)| SequenceFigures {
                seq,
                host_bytes: e.host_bytes(),
                device_bytes: e.device_bytes(),
                moved_rows: e.moved_rows,
                staged_rows: e.staged_rows,
            })
            .collect();
        per_seq.sort_unstable_by_key(|f| f.seq);
        let total = StoreFigures {
            host_bytes: per_seq.iter().map(|f| f.host_bytes).sum(),
            device_bytes: per_seq.iter().map(|f| f.device_bytes).sum(),
            sequences: per_seq.len(),
            staged_rows: inner.staged_rows,
            moved_rows: inner.moved_rows,
        };
        (total, per_seq)
    }

    /// A snapshot of the accounting: bytes per tier, per sequence and in
    /// total, and the delta-fetch counters.
    pub fn usage(&self) -> StoreUsage {
        let inner = self.lock();
        let per_sequence: BTreeMap<usize, TierBytes> = inner
            .seqs
            .iter()
            .map(|(&id, e)| {
                (
                    id,
                    TierBytes {
                        host: e.host_bytes(),
                        device: e.device_bytes(),
                    },
                )
            })
            .collect();
        let total = per_sequence
            .values()
            .fold(TierBytes::default(), |a, b| TierBytes {
                host: a.host + b.host,
                device: a.device + b.device,
            });
        StoreUsage {
            sequences: per_sequence.len(),
            total,
            per_sequence,
            reused_rows: inner.reused_rows,
            selected_rows: inner.selected_rows,
            moved_rows: inner.moved_rows,
            staged_rows: inner.staged_rows,
        }
    }
}

/// Stage `selection` (ascending) from the host-tier rows `host_k`/`host_v`
/// `(kv_h, P, d)`, reusing the rows of `previous` that are still selected.
/// Returns the staging and the number of rows copied from the host tier.
/// The result equals `host.index_select(selection)` exactly (rows are
/// copied, never recomputed). On CUDA (`cuda-kernels`) the copy runs on the
/// copy stream and the staging's [`Ready`] carries its event.
///
/// # Errors
/// If an index is beyond the host rows or a copy or kernel fails.
pub fn delta_stage(
    host_k: &Tensor,
    host_v: &Tensor,
    previous: Option<&Staged>,
    selection: &[u32],
    device: &Device,
) -> Result<(Staged, usize)> {
    let host = host_k.device().clone();
    let fetch = |positions: &[u32]| -> Result<(Tensor, Tensor)> {
        let idx = Tensor::from_slice(positions, positions.len(), &host)?;
        Ok((
            host_k.index_select(&idx, 1)?.to_device(device)?,
            host_v.index_select(&idx, 1)?.to_device(device)?,
        ))
    };
    let prev = previous.filter(|p| p.k.device().same_device(device));
    // Where each selected position comes from: the previous staging (its
    // index there) or the rows fetched now (after the previous rows).
    let (fresh, order) = match prev {
        None => (selection.to_vec(), None),
        Some(prev) => {
            let mut fresh = Vec::new();
            let mut order = Vec::with_capacity(selection.len());
            let mut j = 0;
            for &pos in selection {
                while j < prev.positions.len() && prev.positions[j] < pos {
                    j += 1;
                }
                if j < prev.positions.len() && prev.positions[j] == pos {
                    order.push(j as u32);
                } else {
                    order.push((prev.positions.len() + fresh.len()) as u32);
                    fresh.push(pos);
                }
            }
            if fresh.is_empty() && selection == prev.positions.as_slice() {
                return Ok((prev.clone(), 0));
            }
            (fresh, Some(order))
        }
    };
    #[cfg(feature = "cuda-kernels")]
    if let (Device::Cuda(dev), true) = (device, host.is_cpu()) {
        // Pinned buffer, copy stream, merge kernel, event.
        let (k, v, copy) = omnikv_kernels::staging::stage(
            host_k,
            host_v,
            prev.map(|p| (&p.k, &p.v)),
            &fresh,
            order.as_deref(),
            dev,
        )?;
        let staged = Staged {
            positions: selection.to_vec(),
            k,
            v,
            ready: Ready { copy: Some(copy) },
        };
        return Ok((staged, fresh.len()));
    }
    let (Some(prev), Some(order)) = (prev, order) else {
        let (k, v) = fetch(selection)?;
        return Ok((
            Staged {
                positions: selection.to_vec(),
                k,
                v,
                ready: Ready::default(),
            },
            selection.len(),
        ));
    };
    let (k_all, v_all) = if fresh.is_empty() {
        (prev.k.clone(), prev.v.clone())
    } else {
        let (kf, vf) = fetch(&fresh)?;
        (
            Tensor::cat(&[&prev.k, &kf], 1)?,
            Tensor::cat(&[&prev.v, &vf], 1)?,
        )
    };
    let idx = Tensor::from_slice(&order, order.len(), device)?;
    Ok((
        Staged {
            positions: selection.to_vec(),
            k: k_all.index_select(&idx, 1)?,
            v: v_all.index_select(&idx, 1)?,
            ready: Ready::default(),
        },
        fresh.len(),
    ))
}

/// Number of common elements of two ascending lists.
fn count_common_sorted(a: &[u32], b: &[u32]) -> usize {
    let (mut i, mut j, mut n) = (0, 0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                n += 1;
                i += 1;
                j += 1;
            }
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn rows(kv_h: usize, s: usize, d: usize, start: f32) -> Tensor {
        Tensor::arange(start, start + (kv_h * s * d) as f32, &Device::Cpu)
            .unwrap()
            .reshape((kv_h, s, d))
            .unwrap()
    }

    #[test]
    fn splits_tiers_gathers_and_releases() {
        let store = TieredStore::new(None);
        let (kv_h, d) = (2, 4);
        let k = rows(kv_h, 5, d, 0.0);
        let v = rows(kv_h, 5, d, 1000.0);
        // Prompt of 5 rows, then two generated rows one by one.
        store.append(7, 3, 5, 0, &k, &v).unwrap();
        for pos in 5..7 {
            let kt = rows(kv_h, 1, d, 100.0 * pos as f32);
            store.append(7, 3, 5, pos, &kt, &kt).unwrap();
        }
        let u = store.usage();
        assert_eq!(u.sequences, 1);
        assert_eq!(u.total.host, 2 * (kv_h * 5 * d * 4) as u64);
        assert!(u.total.device >= 2 * (kv_h * 2 * d * 4) as u64);

        let (gk, gv) = store.gather(7, 3, &[1, 4], &Device::Cpu).unwrap();
        assert_eq!(gk.dims(), &[1, kv_h, 4, d]);
        let want_prompt = k
            .index_select(&Tensor::new(&[1u32, 4], &Device::Cpu).unwrap(), 1)
            .unwrap();
        assert_eq!(
            gk.squeeze(0)
                .unwrap()
                .narrow(1, 0, 2)
                .unwrap()
                .to_vec3::<f32>()
                .unwrap(),
            want_prompt.to_vec3::<f32>().unwrap()
        );
        assert_eq!(
            gv.squeeze(0)
                .unwrap()
                .narrow(1, 2, 1)
                .unwrap()
                .to_vec3::<f32>()
                .unwrap(),
            rows(kv_h, 1, d, 500.0).to_vec3::<f32>().unwrap()
        );
        let (ak, _) = store.all_rows(7, 3, &Device::Cpu).unwrap();
        assert_eq!(ak.dims(), &[1, kv_h, 7, d]);
        assert_eq!(
            ak.squeeze(0)
                .unwrap()
                .narrow(1, 0, 5)
                .unwrap()
                .to_vec3::<f32>()
                .unwrap(),
            k.to_vec3::<f32>().unwrap()
        );

        let held = store.release(7).unwrap();
        assert_eq!(held.host, u.total.host);
        let after = store.usage();
        assert_eq!((after.sequences, after.total), (0, TierBytes::default()));
        assert!(store.release(7).is_none());
    }

    #[test]
    fn delta_staging_equals_a_full_gather_and_moves_only_new_rows() {
        let store = TieredStore::new(None);
        let k = rows(2, 20, 4, 0.0);
        let v = rows(2, 20, 4, 500.0);
        store.append(1, 5, 20, 0, &k, &v).unwrap();
        let steps: [&[u32]; 4] = [&[1, 4, 7, 9], &[1, 4, 8, 9], &[0, 2, 3, 19], &[0, 2, 3, 19]];
        let mut previous: &[u32] = &[];
        let mut moved = 0;
        for sel in steps {
            let staged = store.stage(1, 5, sel, &Device::Cpu).unwrap();
            let idx = Tensor::new(sel, &Device::Cpu).unwrap();
            assert_eq!(
                staged.k.to_vec3::<f32>().unwrap(),
                k.index_select(&idx, 1).unwrap().to_vec3::<f32>().unwrap()
            );
            assert_eq!(
                staged.v.to_vec3::<f32>().unwrap(),
                v.index_select(&idx, 1).unwrap().to_vec3::<f32>().unwrap()
            );
            moved += sel.iter().filter(|p| !previous.contains(p)).count() as u64;
            previous = sel;
        }
        let u = store.usage();
        assert_eq!((u.moved_rows, u.staged_rows), (moved, 16));
        assert_eq!(moved, 4 + 1 + 4);
    }

    #[test]
    fn host_limit_fails_the_sequence_that_exceeds_it() {
        let k = rows(2, 8, 4, 0.0).to_dtype(DType::F16).unwrap();
        let one = 2 * k.elem_count() as u64 * 2;
        let store = TieredStore::new(Some(one + one / 2));
        store.append(1, 3, 8, 0, &k, &k).unwrap();
        let err = store.append(2, 3, 8, 0, &k, &k).unwrap_err().to_string();
        assert!(err.contains("max_host_bytes"), "{err}");
        assert_eq!(store.usage().total.host, one);
        store.release(1);
        store.release(2);
        store.append(2, 3, 8, 0, &k, &k).unwrap();
        assert_eq!(store.usage().total.host, one);
    }

    #[test]
    fn delta_counts_rows_kept_from_the_previous_step() {
        let store = TieredStore::new(None);
        store.note_dense(1, 0, 10);
        store.note_selection(1, 2, &[1, 3, 5, 7]);
        store.note_selection(1, 2, &[1, 2, 5, 8]);
        let u = store.usage();
        assert_eq!((u.reused_rows, u.selected_rows), (2, 8));
        assert_eq!(count_common_sorted(&[1, 2, 3], &[0, 2, 3, 9]), 2);
    }
}
