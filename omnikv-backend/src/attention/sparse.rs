//! Decode-step attention of a sparse layer: the current query attends to the
//! selected prompt rows plus every generated row, keys keeping the RoPE of
//! their original positions (spec: "Sparse attention").
//!
//! ```text
//!   cached rows:  0 .. P-1 (prompt)        | P .. n-1 (generated)
//!   attended:     idx[0] < idx[1] < ...    | all of them
//! ```

use candle_core::{Result, Tensor};

use crate::attention::streaming_attention;

/// Rows one sequence attends to: the sorted prompt selection, then every
/// generated position `prompt_len .. n`.
pub fn attended_rows(selection: &[u32], prompt_len: usize, n: usize) -> Vec<u32> {
    let mut rows = Vec::with_capacity(selection.len() + n.saturating_sub(prompt_len));
    rows.extend_from_slice(selection);
    rows.extend(prompt_len as u32..n as u32);
    rows
}

/// * `q`: `(1, h, 1, d)`, one sequence's current query;
/// * `k`, `v`: `(1, kv_h, n, d)`, that sequence's whole cache;
/// * `rows`: ascending cache rows to attend (see [`attended_rows`]).
///
/// Returns `(1, h, 1, d)`. The softmax runs over the attended rows only. The
/// rows are read in place from the cache through [`crate::ops::indexed_decode`]:
/// on the CPU, blocks of rows in parallel, bit-identical to
/// [`gathered_decode_attention`]; on CUDA, split-K flash decoding.
pub fn sparse_decode_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rows: &[u32],
    scale: f64,
) -> Result<Tensor> {
    let (b, h, s, d) = q.dims4()?;
    if b != 1 || s != 1 || k.dim(0)? != 1 || rows.is_empty() {
        candle_core::bail!(
            "sparse_decode_attention: expected one decode query, one sequence's cache and at least one row, got q {:?}, k {:?}, {} rows",
            q.dims(),
            k.dims(),
            rows.len()
        );
    }
    let idx = Tensor::from_slice(rows, rows.len(), q.device())?;
    let out = crate::ops::indexed_decode(
        &q.reshape((h, d))?,
        &k.squeeze(0)?,
        &v.squeeze(0)?,
        &idx,
        scale,
    )?;
    out.reshape((1, h, 1, d))?.to_dtype(q.dtype())
}

/// Plain reference of [`sparse_decode_attention`]: copy the rows, then
/// attend densely.
pub fn gathered_decode_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rows: &[u32],
    scale: f64,
) -> Result<Tensor> {
    let idx = Tensor::from_slice(rows, rows.len(), k.device())?;
    streaming_attention(q, &gather_rows(k, &idx)?, &gather_rows(v, &idx)?, scale)
}

/// `(1, kv_h, n, d)` -> `(1, kv_h, rows, d)`. The cache hands out a view of
/// its preallocated buffer; each head's `(n, d)` block of it is contiguous,
/// so rows are gathered head by head without copying the whole cache.
pub fn gather_rows(t: &Tensor, idx: &Tensor) -> Result<Tensor> {
    let t = t.squeeze(0)?;
    let heads = (0..t.dim(0)?)
        .map(|h| {
            let block = t.get(h)?;
            let block = if block.is_contiguous() {
                block
            } else {
                block.contiguous()?
            };
            block.index_select(idx, 0)
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::stack(&heads, 0)?.unsqueeze(0)
}
