//! Decode-step attention of a sparse layer: the current query attends to the
//! selected prompt rows plus every generated row, keys keeping the RoPE of
//! their original positions (spec: "Sparse attention").
//!
//! ```text
//!   cached rows:  0 .. P-1 (prompt)        | P .. n-1 (generated)
//!   attended:     idx[0] < idx[1] < ...    | all of them
//! ```

use candle_core::{Result, Tensor};

/// Rows one sequence attends to: the sorted prompt selection (positions
/// below `prompt_len`), then every generated position `prompt_len .. n`.
/// Rows are cache positions (tokens).
pub fn attended_rows(selection: &[u32], prompt_len: usize, n: usize) -> Vec<u32> {
    let mut rows = Vec::with_capacity(selection.len() + n.saturating_sub(prompt_len));
    rows.extend_from_slice(selection);
    rows.extend(prompt_len as u32..n as u32);
    rows
}

/// A sparse layer's decode step for one sequence (spec: "Sparse attention"):
/// the query attends to the chosen rows of its own cache only.
///
/// * `q`: `(1, h, 1, d)`, one sequence's current query;
/// * `k`, `v`: `(1, kv_h, n, d)`, that sequence's whole cache;
/// * `rows`: ascending cache rows to attend (see [`attended_rows`]).
///
/// Returns `(1, h, 1, d)` in `q`'s dtype. The softmax runs over the
/// attended rows only. The rows are read in place from the cache through
/// [`omnikv_kernels::ops::indexed_decode`]: on the CPU, blocks of rows in
/// parallel, bit-identical to gathering the rows and running
/// [`super::exact_attention`]; on CUDA, split-K flash decoding.
///
/// # Errors
/// If the shapes are not one sequence's decode step, `rows` is empty, or
/// the kernel fails; on the CPU also if a row is beyond the cache (the CUDA
/// kernel does not check: rows must be below `n`).
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
    let out = omnikv_kernels::ops::indexed_decode(
        &q.reshape((h, d))?,
        &k.squeeze(0)?,
        &v.squeeze(0)?,
        &idx,
        scale,
    )?;
    out.reshape((1, h, 1, d))?.to_dtype(q.dtype())
}

/// [`sparse_decode_attention`] with one selection per KV head
/// (`selection_per_kv_head`): KV head `j` and the query heads that read it
/// (`j*g .. (j+1)*g`, `g = h / kv_h`) attend `sets[j]` (sorted prompt
/// positions below `prompt_len`) plus every generated row
/// `prompt_len .. n`.
///
/// * `q`: `(1, h, 1, d)`; `k`, `v`: `(1, kv_h, n, d)`; `sets`: `kv_h` sets.
///
/// Returns `(1, h, 1, d)` in `q`'s dtype; each head's output is what
/// [`sparse_decode_attention`] gives it over its own rows.
///
/// # Errors
/// If `sets` does not hold one set per KV head, `h` is not a multiple of
/// `kv_h`, or as [`sparse_decode_attention`].
pub fn sparse_decode_attention_per_kv_head(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    sets: &[Vec<u32>],
    prompt_len: usize,
    scale: f64,
) -> Result<Tensor> {
    let (_, h, _, _) = q.dims4()?;
    let (_, kv_h, n, _) = k.dims4()?;
    if sets.len() != kv_h || kv_h == 0 || h % kv_h != 0 {
        candle_core::bail!(
            "sparse_decode_attention_per_kv_head: {} row sets for {kv_h} KV heads and {h} query heads",
            sets.len()
        );
    }
    let g = h / kv_h;
    let heads = sets
        .iter()
        .enumerate()
        .map(|(j, set)| {
            sparse_decode_attention(
                &q.narrow(1, j * g, g)?,
                &k.narrow(1, j, 1)?,
                &v.narrow(1, j, 1)?,
                &attended_rows(set, prompt_len, n),
                scale,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&heads, 1)
}
