//! The observation window of the window selectors (`uniform`, `exp`): each
//! filter layer's newest `w` queries, per sequence (spec: "Selection at a
//! filter layer", observation-window selectors).
//!
//! The published code keeps the filter layer's last `w` post-norm hidden
//! states (the prompt's tail after prefill, then one per decoded token) and,
//! at every decode step, projects them with `q_proj` and rotates all of them
//! at the *current* position. This store keeps the same queries after their
//! projection, post-RoPE at their own positions; the selection re-rotates
//! them to the current position with [`crate::rope::Rotary::rotate_to`],
//! which is the same rotation (rotations by `pos * inv_freq` compose).
//!
//! The store belongs to the backend, not to the host's KV cache: it is keyed
//! by the host's sequence id, filled on every pass through a filter layer
//! (prompt passes, prompt chunks and decode steps alike), and released with
//! the sequence ([`QueryStore::release`], counted in its
//! [`crate::accounting::ReleaseRecord`]). Rows are addressed by position, so a
//! pass that starts at position `o` replaces every row from `o` on: a
//! recomputed or replayed sequence ends up with exactly the rows of its
//! first run.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{Result, Tensor};

/// One filter layer's window for one sequence: queries `(m, h, d)` of the
/// positions `start .. start + m`, `m <= w`, post-RoPE at their own
/// positions.
#[derive(Debug)]
struct Window {
    start: usize,
    queries: Tensor,
}

impl Window {
    fn bytes(&self) -> u64 {
        (self.queries.elem_count() * self.queries.dtype().size_in_bytes()) as u64
    }
}

/// Per sequence, per filter layer: the newest `w` queries.
#[derive(Debug)]
pub struct QueryStore {
    window: usize,
    seqs: Mutex<HashMap<usize, HashMap<usize, Window>>>,
}

/// A fresh tensor holding only `x`'s elements (a narrowed view would keep a
/// whole prompt pass's queries alive).
fn own(x: Tensor) -> Result<Tensor> {
    if x.is_contiguous() {
        x.copy()
    } else {
        x.contiguous()
    }
}

impl QueryStore {
    /// A store that keeps the newest `window` queries of each filter layer.
    pub fn new(window: usize) -> Self {
        Self {
            window,
            seqs: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<usize, HashMap<usize, Window>>> {
        // The map stays consistent even if a panic interrupted an earlier
        // holder: every update replaces a whole entry.
        self.seqs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Record sequence `seq`'s queries `q` `(h, s, d)` (post-RoPE) at filter
    /// layer `layer`, for positions `offset .. offset + s`. Rows at or after
    /// `offset` from an earlier pass are replaced; only the newest `w` rows
    /// are kept.
    ///
    /// # Errors
    /// If `q` is not rank 3 or a tensor operation fails.
    pub fn append(&self, seq: usize, layer: usize, offset: usize, q: &Tensor) -> Result<()> {
        let (_h, s, _d) = q.dims3()?;
        let w = self.window;
        if s == 0 || w == 0 {
            return Ok(());
        }
        let new = q.transpose(0, 1)?; // (s, h, d)
        let mut seqs = self.lock();
        let layers = seqs.entry(seq).or_default();
        let kept = match layers.get(&layer) {
            // Rows before `offset` that are still inside the window.
            Some(old) if old.start <= offset && offset <= old.start + old.queries.dim(0)? => {
                let keep = (offset - old.start).min(old.queries.dim(0)?);
                let from = keep.saturating_sub(w.saturating_sub(s));
                (keep > from)
                    .then(|| old.queries.narrow(0, from, keep - from))
                    .transpose()?
            }
            _ => None,
        };
        let (start, queries) = match kept {
            Some(old) => {
                let m = old.dim(0)?;
                let all = Tensor::cat(&[&old, &new.to_dtype(old.dtype())?], 0)?;
                let n = m + s;
                let from = n.saturating_sub(w);
                (offset + s - (n - from), all.narrow(0, from, n - from)?)
            }
            None => {
                let from = s.saturating_sub(w);
                (offset + from, new.narrow(0, from, s - from)?)
            }
        };
        layers.insert(
            layer,
            Window {
                start,
                queries: own(queries)?,
            },
        );
        Ok(())
    }

    /// Sequence `seq`'s window at `layer` up to position `current`
    /// (inclusive): the queries `(m, h, d)`, oldest first, and their
    /// positions. `None` if the store holds nothing for the sequence at
    /// that layer.
    ///
    /// # Errors
    /// If the window does not reach `current` (the pass at `current` was not
    /// recorded), or a tensor operation fails.
    pub fn window(
        &self,
        seq: usize,
        layer: usize,
        current: usize,
    ) -> Result<Option<(Tensor, Vec<usize>)>> {
        let seqs = self.lock();
        let Some(win) = seqs.get(&seq).and_then(|l| l.get(&layer)) else {
            return Ok(None);
        };
        let m = win.queries.dim(0)?;
        if current < win.start || current >= win.start + m {
            candle_core::bail!(
                "omnikv: the query window of sequence {seq} at layer {layer} holds positions {}..{}, not the current position {current}",
                win.start,
                win.start + m
            );
        }
        let upto = current - win.start + 1;
        let from = upto.saturating_sub(self.window);
        Ok(Some((
            win.queries.narrow(0, from, upto - from)?,
            (win.start + from..win.start + upto).collect(),
        )))
    }

    /// Drop sequence `seq`'s windows; the bytes they held, `None` if the
    /// store held nothing for it.
    pub fn release(&self, seq: usize) -> Option<u64> {
        self.lock()
            .remove(&seq)
            .map(|layers| layers.values().map(Window::bytes).sum())
    }

    /// Sequences with windows, and the bytes all windows hold together.
    pub fn usage(&self) -> (usize, u64) {
        let seqs = self.lock();
        let bytes = seqs
            .values()
            .flat_map(|l| l.values().map(Window::bytes))
            .sum();
        (seqs.len(), bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// `(h, s, d)` queries whose every element is its position.
    fn q_at(offset: usize, s: usize) -> Tensor {
        let v: Vec<f32> = (0..s)
            .flat_map(|i| std::iter::repeat((offset + i) as f32).take(2 * 3))
            .collect();
        Tensor::from_vec(v, (s, 2, 3), &Device::Cpu)
            .unwrap()
            .transpose(0, 1)
            .unwrap()
    }

    fn positions_held(store: &QueryStore, seq: usize, current: usize) -> Vec<usize> {
        let (q, pos) = store.window(seq, 0, current).unwrap().unwrap();
        let firsts: Vec<f32> = q
            .to_dtype(DType::F32)
            .unwrap()
            .narrow(2, 0, 1)
            .unwrap()
            .narrow(1, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(
            firsts,
            pos.iter().map(|&p| p as f32).collect::<Vec<_>>(),
            "rows must hold the queries of their positions"
        );
        pos
    }

    #[test]
    fn keeps_the_newest_rows_by_position() {
        let store = QueryStore::new(4);
        store.append(1, 0, 0, &q_at(0, 10)).unwrap();
        assert_eq!(positions_held(&store, 1, 9), vec![6, 7, 8, 9]);
        store.append(1, 0, 10, &q_at(10, 1)).unwrap();
        assert_eq!(positions_held(&store, 1, 10), vec![7, 8, 9, 10]);
        // A chunked prompt pass: two chunks give the rows of one pass.
        store.append(2, 0, 0, &q_at(0, 5)).unwrap();
        store.append(2, 0, 5, &q_at(5, 2)).unwrap();
        assert_eq!(positions_held(&store, 2, 6), vec![3, 4, 5, 6]);
        // A replay from an earlier position replaces the rows after it (the
        // rows before it that had left the window stay gone).
        store.append(1, 0, 8, &q_at(8, 2)).unwrap();
        assert_eq!(positions_held(&store, 1, 9), vec![7, 8, 9]);
        // A gap (no rows before the offset) starts over.
        store.append(1, 0, 20, &q_at(20, 1)).unwrap();
        assert_eq!(positions_held(&store, 1, 20), vec![20]);
        // A prompt shorter than the window.
        store.append(3, 0, 0, &q_at(0, 2)).unwrap();
        assert_eq!(positions_held(&store, 3, 1), vec![0, 1]);
        assert!(
            store.window(3, 0, 2).is_err(),
            "position 2 was never recorded"
        );
        assert!(store.window(4, 0, 0).unwrap().is_none());
    }

    #[test]
    fn release_reports_and_frees_the_bytes() {
        let store = QueryStore::new(4);
        store.append(1, 0, 0, &q_at(0, 100)).unwrap();
        store.append(1, 5, 0, &q_at(0, 2)).unwrap();
        // 4 + 2 rows of 2 x 3 f32: only the window is held, not the pass.
        assert_eq!(store.usage(), (1, (4 + 2) * 6 * 4));
        assert_eq!(store.release(1), Some((4 + 2) * 6 * 4));
        assert_eq!(store.usage(), (0, 0));
        assert_eq!(store.release(1), None);
    }
}
