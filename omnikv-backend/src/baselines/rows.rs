//! The per-sequence row store of the baselines: for each layer and KV head
//! the rows a policy kept (keys after RoPE, values, positions and, for H2O,
//! accumulated attention mass), and the accounting of what a sequence held.

use candle_core::{Device, Result, Tensor};

/// The rows one KV head of one layer keeps. Row `r` is `k[r*d..(r+1)*d]`
/// (after RoPE) and `v[..]`, at position `pos[r]` with accumulated attention
/// mass `mass[r]` (H2O only). Order is arbitrary (attention does not care).
#[derive(Debug, Clone, Default)]
pub(super) struct HeadRows {
    pub(super) pos: Vec<u32>,
    pub(super) mass: Vec<f32>,
    pub(super) k: Vec<f32>,
    pub(super) v: Vec<f32>,
}

impl HeadRows {
    pub(super) fn len(&self) -> usize {
        self.pos.len()
    }

    pub(super) fn push(&mut self, pos: u32, k: &[f32], v: &[f32]) {
        if self.pos.len() == self.pos.capacity() {
            // Grow by an eighth (at least 16 rows), not double: the rows are
            // what the backend reports and the memory it holds.
            let more = (self.pos.len() / 8).max(16);
            self.pos.reserve_exact(more);
            self.mass.reserve_exact(more);
            self.k.reserve_exact(more * k.len());
            self.v.reserve_exact(more * v.len());
        }
        self.pos.push(pos);
        self.mass.push(0.0);
        self.k.extend_from_slice(k);
        self.v.extend_from_slice(v);
    }

    /// Keep the rows `keep` (indices into the current rows), in that order,
    /// and give the memory of the others back.
    pub(super) fn retain(&mut self, keep: &[usize], d: usize) {
        let mut out = HeadRows {
            pos: Vec::with_capacity(keep.len() + 1),
            mass: Vec::with_capacity(keep.len() + 1),
            k: Vec::with_capacity((keep.len() + 1) * d),
            v: Vec::with_capacity((keep.len() + 1) * d),
        };
        for &r in keep {
            out.pos.push(self.pos[r]);
            out.mass.push(self.mass[r]);
            out.k.extend_from_slice(&self.k[r * d..(r + 1) * d]);
            out.v.extend_from_slice(&self.v[r * d..(r + 1) * d]);
        }
        *self = out;
    }

    /// Drop row `r` (the last row takes its place).
    pub(super) fn remove(&mut self, r: usize, d: usize) {
        let last = self.len() - 1;
        self.pos.swap_remove(r);
        self.mass.swap_remove(r);
        if r != last {
            self.k.copy_within(last * d..(last + 1) * d, r * d);
            self.v.copy_within(last * d..(last + 1) * d, r * d);
        }
        self.k.truncate(last * d);
        self.v.truncate(last * d);
    }

    pub(super) fn bytes(&self) -> u64 {
        ((self.k.capacity() + self.v.capacity()) * 4
            + self.pos.capacity() * 4
            + self.mass.capacity() * 4) as u64
    }
}

/// One layer of one sequence: a row set per KV head.
#[derive(Debug, Clone, Default)]
pub(super) struct LayerRows {
    pub(super) heads: Vec<HeadRows>,
}

#[derive(Debug, Default)]
pub(super) struct SeqRows {
    pub(super) prompt_len: usize,
    /// `None` until the prompt is complete, then the rows kept per head
    /// (`usize::MAX` for prompts that keep everything).
    pub(super) capacity: Option<usize>,
    pub(super) layers: Vec<LayerRows>,
    /// Most rows (summed over layers and heads) held at any time.
    pub(super) peak_rows: u64,
    pub(super) peak_bytes: u64,
}

impl SeqRows {
    pub(super) fn rows(&self) -> u64 {
        self.layers
            .iter()
            .flat_map(|l| &l.heads)
            .map(|h| h.len() as u64)
            .sum()
    }
    pub(super) fn bytes(&self) -> u64 {
        self.layers
            .iter()
            .flat_map(|l| &l.heads)
            .map(HeadRows::bytes)
            .sum()
    }
    pub(super) fn note_peak(&mut self) {
        self.peak_rows = self.peak_rows.max(self.rows());
        self.peak_bytes = self.peak_bytes.max(self.bytes());
    }
}

/// What a sequence held when it was released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// Rows (positions x layers x KV heads) at the end.
    pub rows: u64,
    /// Bytes of the row buffers at the end (their capacity: f32 keys,
    /// values and masses, u32 positions).
    pub bytes: u64,
    /// Most rows held at any time.
    pub peak_rows: u64,
    /// Most bytes held at any time.
    pub peak_bytes: u64,
    /// Positions the sequence saw (prompt + generated): a cache that keeps
    /// everything holds this many rows per layer and KV head.
    pub positions: u64,
}

pub(super) fn held_of(s: &SeqRows) -> Held {
    let positions = s
        .layers
        .iter()
        .flat_map(|l| &l.heads)
        .filter_map(|h| h.pos.iter().max().map(|&p| p as u64 + 1))
        .max()
        .unwrap_or(0);
    Held {
        rows: s.rows(),
        bytes: s.bytes(),
        peak_rows: s.peak_rows,
        peak_bytes: s.peak_bytes,
        positions,
    }
}

/// `(kv_h, n, d)` tensors of the stored rows (all heads hold the same number).
pub(super) fn head_tensors(
    heads: &[HeadRows],
    d: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let n = heads[0].len();
    let k: Vec<f32> = heads.iter().flat_map(|h| h.k.iter().copied()).collect();
    let v: Vec<f32> = heads.iter().flat_map(|h| h.v.iter().copied()).collect();
    Ok((
        Tensor::from_vec(k, (heads.len(), n, d), device)?,
        Tensor::from_vec(v, (heads.len(), n, d), device)?,
    ))
}
