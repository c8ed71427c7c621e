//! Batch-invariant matrix products: a row's result does not depend on how
//! many other rows share the product, where the row sits in it, or how many
//! zero-padded columns follow its data (same request, same output: the KV
//! rows and logits of a position are bit-identical whether its prompt ran in
//! one pass, was split by a prefix-cache hit or host chunking, or was
//! batched with other prompts).
//!
//! candle's CPU GEMM picks its blocking from the product's shape: a
//! one-row product takes a matrix-vector path, the reduction over `k` is
//! split into blocks whose size depends on `k`, and for some shapes the row
//! count changes the blocking too; each changes the order of the float
//! additions. Products of one fixed shape are computed with one order, for
//! every row wherever it sits (measured on this crate's shapes, and checked
//! end to end by `tests/determinism.rs`). So every product here has a fixed
//! row count (the last block padded with zero rows), and where `k` varies
//! with the input (attention over a growing prefix) it is cut into fixed
//! blocks of [`K_BLOCK`] aligned at 0 and the partial products are added in
//! order; zero-padded columns contribute exact zeros.

use candle_core::{Result, Tensor};

/// Rows per product of [`matmul_fixed_rows`] for projections.
pub const ROW_BLOCK: usize = 128;

/// Reduction block of [`matmul_fixed_blocks`]: a single block of candle's
/// GEMM at this size (no internal split of `k`).
pub const K_BLOCK: usize = 512;

/// Zero rows appended to `a` `(m, k)` up to `rows` (`a` itself when it
/// has `rows` rows).
///
/// # Errors
/// If `a` is not rank 2, has more than `rows` rows, or a tensor operation
/// fails.
pub fn pad_rows(a: &Tensor, rows: usize) -> Result<Tensor> {
    let (m, k) = a.dims2()?;
    if m == rows {
        return Ok(a.clone());
    }
    Tensor::cat(
        &[a, &Tensor::zeros((rows - m, k), a.dtype(), a.device())?],
        0,
    )
}

/// `a` `(m, k)` times `b` `(k, n)`, each block of `rows` rows of `a` in a
/// product of exactly `rows` rows (the last block padded with zero rows):
/// a row's result depends only on its own values, `b`, `rows` and `k`.
///
/// # Errors
/// If `a` is not rank 2, the shapes do not fit, or a tensor operation fails.
///
/// # Panics
/// If `rows` is 0.
pub fn matmul_fixed_rows(a: &Tensor, b: &Tensor, rows: usize) -> Result<Tensor> {
    assert!(rows > 0, "a row block must hold a row");
    let (m, _k) = a.dims2()?;
    let mut outs = Vec::with_capacity(m.div_ceil(rows));
    let mut start = 0;
    while start < m {
        let c = rows.min(m - start);
        let block = a.narrow(0, start, c)?;
        // A full block is multiplied in place (the GEMM reads strided
        // views); only a short last block is copied and padded.
        let block = if c < rows {
            pad_rows(&block.contiguous()?, rows)?
        } else {
            block
        };
        let y = block.matmul(b)?;
        outs.push(if c < rows { y.narrow(0, 0, c)? } else { y });
        start += c;
    }
    if outs.len() == 1 {
        return Ok(outs.remove(0));
    }
    Tensor::cat(&outs, 0)
}

/// [`matmul_fixed_rows`] with the reduction cut into blocks of `k_block`
/// aligned at 0: each partial product has the shape `(rows, k_block, n)`
/// (the last block padded with zero columns of `a` and zero rows of `b`),
/// and the partials are added in order. A row's result then depends only on
/// its own values, `b`, `rows` and `k_block`, not on `k`: zeros after a
/// row's data (a shorter causal prefix) leave it unchanged.
///
/// # Errors
/// If `a` or `b` is not rank 2, the shapes do not fit, or a tensor operation
/// fails.
///
/// # Panics
/// If `rows` or `k_block` is 0.
pub fn matmul_fixed_blocks(a: &Tensor, b: &Tensor, rows: usize, k_block: usize) -> Result<Tensor> {
    assert!(k_block > 0, "a reduction block must hold a column");
    let (m, k) = a.dims2()?;
    let (_, n) = b.dims2()?;
    let mut acc: Option<Tensor> = None;
    let mut start = 0;
    while start < k {
        let w = k_block.min(k - start);
        let (mut ab, mut bb) = (a.narrow(1, start, w)?, b.narrow(0, start, w)?);
        if w < k_block {
            ab = Tensor::cat(
                &[
                    &ab,
                    &Tensor::zeros((m, k_block - w), a.dtype(), a.device())?,
                ],
                1,
            )?;
            bb = Tensor::cat(
                &[
                    &bb,
                    &Tensor::zeros((k_block - w, n), b.dtype(), b.device())?,
                ],
                0,
            )?;
        }
        // Callers that pad `k` to whole blocks themselves (the tiled
        // attention) multiply strided views in place, without copies.
        let p = matmul_fixed_rows(&ab, &bb, rows)?;
        acc = Some(match acc {
            None => p,
            Some(sum) => (sum + p)?,
        });
        start += w;
    }
    match acc {
        Some(t) => Ok(t),
        None => Tensor::zeros((m, n), a.dtype(), a.device()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    use omnikv_kernels::testing::rand_vec as rand;

    /// The shapes where candle's plain product is not row-invariant (a lone
    /// row; k = 576, n = 64 at different row counts) and not invariant to
    /// zero-padded reductions (k = 700 vs 1,200): the fixed products are.
    #[test]
    fn rows_do_not_depend_on_their_neighbours_or_padding() {
        let dev = Device::Cpu;
        let (k, n) = (576, 64);
        let a = Tensor::from_vec(rand(300 * k, 1), (300, k), &dev).unwrap();
        let b = Tensor::from_vec(rand(k * n, 2), (k, n), &dev).unwrap();
        let all: Vec<Vec<f32>> = matmul_fixed_rows(&a, &b, ROW_BLOCK)
            .unwrap()
            .to_vec2()
            .unwrap();
        for (start, len) in [(0, 1), (7, 1), (10, 30), (100, 64), (5, 290)] {
            let part: Vec<Vec<f32>> =
                matmul_fixed_rows(&a.narrow(0, start, len).unwrap(), &b, ROW_BLOCK)
                    .unwrap()
                    .to_vec2()
                    .unwrap();
            assert_eq!(&part[..], &all[start..start + len], "rows {start}..+{len}");
        }
        // Zero-padded reductions: a causal prefix of 700 keys, padded to more.
        let (m, d, vis) = (96, 64, 700);
        let p: Vec<f32> = rand(m * vis, 3).into_iter().map(f32::abs).collect();
        let pt = Tensor::from_vec(p, (m, vis), &dev).unwrap();
        let v = Tensor::from_vec(rand(1200 * d, 4), (1200, d), &dev).unwrap();
        let base: Vec<Vec<f32>> =
            matmul_fixed_blocks(&pt, &v.narrow(0, 0, vis).unwrap(), m, K_BLOCK)
                .unwrap()
                .to_vec2()
                .unwrap();
        for total in [701, 768, 1200] {
            let padded = Tensor::cat(
                &[
                    &pt,
                    &Tensor::zeros((m, total - vis), pt.dtype(), &dev).unwrap(),
                ],
                1,
            )
            .unwrap();
            let got: Vec<Vec<f32>> =
                matmul_fixed_blocks(&padded, &v.narrow(0, 0, total).unwrap(), m, K_BLOCK)
                    .unwrap()
                    .to_vec2()
                    .unwrap();
            assert_eq!(got, base, "reduction padded from {vis} to {total}");
        }
        // The plain product is not invariant there: the test can tell.
        let plain = |t: usize| -> Vec<Vec<f32>> {
            Tensor::cat(
                &[&pt, &Tensor::zeros((m, t - vis), pt.dtype(), &dev).unwrap()],
                1,
            )
            .unwrap()
            .matmul(&v.narrow(0, 0, t).unwrap())
            .unwrap()
            .to_vec2()
            .unwrap()
        };
        assert_ne!(
            plain(vis),
            plain(1200),
            "candle's own product changed: revisit this module"
        );
        // And the results agree with the plain product to rounding.
        let diff = (matmul_fixed_blocks(&pt, &v.narrow(0, 0, vis).unwrap(), m, K_BLOCK).unwrap()
            - pt.matmul(&v.narrow(0, 0, vis).unwrap()).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
        assert!(diff < 1e-3, "{diff}");
    }
}
