//! Quantized matrix-vector products for decode steps on the CPU.
//!
//! candle 0.10 computes a Q4_1 product with its generic per-element loop
//! (`BlockQ4_1::vec_dot` is `vec_dot_unopt`): about half of a short-prompt
//! decode step on SmolLM2-135M Q4_1 (`results/peers-profile.md`).
//! [`q4_1_matmul`] computes the same product with the integer part of each
//! 32-element block vectorised (AVX2 where the build targets it), the
//! per-block float terms eight blocks per vector, and their sum in the
//! generic loop's order, so its result equals
//! candle's `QMatMul::forward` bit for bit: the model's outputs, and every
//! parity test written against the stock path, do not change.
//! [`q8_0_matmul`] is candle's AVX2 Q8_0 product (SmolLM2's output matrix,
//! 30 MB read per decode step), again bit for bit, in a few large tasks.
//!
//! Block formats (ggml, as in candle's `k_quants`): a Q4_1 block is
//! `d: f16, m: f16, qs: [u8; 16]` (value `j` is `d * q_j + m`, `q_j` the low
//! nibbles of `qs` for `j < 16` and the high ones after), 20 bytes; the
//! activation is quantized by candle's own `BlockQ8_1::from_float`
//! (`d: f16, s: f16, qs: [i8; 32]`, `s = d * sum(qs)`), 36 bytes.

use candle_core::quantized::k_quants::{BlockQ8_0, BlockQ8_1, GgmlType};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Result, Tensor};
use half::f16;
use rayon::prelude::*;

/// Elements per Q4_1 / Q8_1 block.
const QK: usize = 32;
/// Bytes per Q4_1 block.
const Q4_1_BYTES: usize = 20;
/// Bytes per Q8_1 block.
const Q8_1_BYTES: usize = 36;
const _: () = assert!(std::mem::size_of::<BlockQ8_1>() == Q8_1_BYTES);
/// Bytes per Q8_0 block (`d: f16, qs: [i8; 32]`).
const Q8_0_BYTES: usize = 34;
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == Q8_0_BYTES);

/// Whether [`q4_1_matmul`] computes `x` times `w`: Q4_1 weights in CPU
/// memory with rows a whole number of blocks long, and an f32 `x` on the
/// CPU whose last dimension is the weights' row length.
pub fn q4_1_applies(w: &QTensor, x: &Tensor) -> bool {
    cpu_product_applies(w, x, GgmlDType::Q4_1)
}

/// `w` holds `dtype` weights in CPU memory with rows a whole number of
/// 32-element blocks long, and `x` is an f32 CPU tensor of rank >= 2 whose
/// last dimension is the weights' row length.
fn cpu_product_applies(w: &QTensor, x: &Tensor, dtype: GgmlDType) -> bool {
    w.dtype() == dtype
        && matches!(w.device(), Device::Cpu)
        && matches!(x.device(), Device::Cpu)
        && x.dtype() == DType::F32
        && x.rank() >= 2
        && match w.shape().dims2() {
            Ok((_, k)) => k % QK == 0 && x.dims().last() == Some(&k),
            Err(_) => false,
        }
}

/// The rows `(n, k)` and bytes of the `dtype` weights `w` for a product
/// with `x`, after checking that `applies` holds and that the weights hold
/// `block_bytes` per 32-element block; `what` names the product in errors.
///
/// # Errors
/// If `applies` is false (the error says what the product needs: `needs`),
/// or the weights' size does not match their shape.
fn product_weights<'w>(
    w: &'w QTensor,
    x: &Tensor,
    applies: bool,
    what: &str,
    needs: &str,
    block_bytes: usize,
) -> Result<(usize, usize, std::borrow::Cow<'w, [u8]>)> {
    if !applies {
        candle_core::bail!(
            "{what}: needs {needs} weights (n, k) with k a multiple of {QK} and an f32 CPU input (.., k); got {:?} {:?} and {:?} {:?}",
            w.dtype(),
            w.shape(),
            x.dtype(),
            x.shape()
        )
    }
    let (n, k) = w.shape().dims2()?;
    let data = w.data()?;
    if data.len() != n * (k / QK) * block_bytes {
        candle_core::bail!(
            "{what}: {} bytes of weights for ({n}, {k}), expected {}",
            data.len(),
            n * (k / QK) * block_bytes
        )
    }
    Ok((n, k, data))
}

/// `x (.., k)` times the transpose of the Q4_1 weights `w (n, k)`, giving
/// `(.., n)` in f32: equal bit for bit to candle's
/// `QMatMul::from_qtensor(w)?.forward(x)` on the CPU (ggml's
/// `ggml_vec_dot_q4_1_q8_1`, the generic loop's summation order). Output
/// columns are computed in parallel on rayon's pool.
///
/// # Errors
/// If [`q4_1_applies`] is false for `w` and `x`, or candle cannot read
/// either tensor.
pub fn q4_1_matmul(w: &QTensor, x: &Tensor) -> Result<Tensor> {
    let mut out = q4_1_matmul_many(&[w], x)?;
    Ok(out.remove(0))
}

/// [`q4_1_matmul`] of one input with several weight matrices (the query,
/// key and value projections of a layer; its gate and up projections):
/// `x (.., k)` times each `ws[i] (n_i, k)` transposed, giving `(.., n_i)`
/// each. The input is quantized once and every matrix's columns are split
/// over rayon's pool in one go; each output equals [`q4_1_matmul`]'s, bit
/// for bit.
///
/// # Errors
/// If [`q4_1_applies`] is false for some matrix and `x`, or candle cannot
/// read a tensor.
pub fn q4_1_matmul_many(ws: &[&QTensor], x: &Tensor) -> Result<Vec<Tensor>> {
    let mut datas = Vec::with_capacity(ws.len());
    let mut ends = Vec::with_capacity(ws.len());
    let mut total = 0;
    let k = x.dims().last().copied().unwrap_or(0);
    for w in ws {
        let (n, _, data) = product_weights(
            w,
            x,
            q4_1_applies(w, x),
            "q4_1_matmul",
            "Q4_1 CPU",
            Q4_1_BYTES,
        )?;
        datas.push(data);
        total += n;
        ends.push(total);
    }
    let blocks = k / QK;
    let m = x.elem_count() / k.max(1);
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    let mut ys = vec![BlockQ8_1::zeros(); m * blocks];
    for (row, y) in xs
        .chunks_exact(k.max(1))
        .zip(ys.chunks_exact_mut(blocks.max(1)))
    {
        BlockQ8_1::from_float(row, y);
    }
    // SAFETY: `BlockQ8_1` is `#[repr(C)]` with fields `f16, f16, [i8; 32]`
    // (candle asserts its size is 36, and so does this module), so the
    // vector's memory is `m * blocks * 36` initialised bytes with no
    // padding; the byte slice borrows `ys`, which outlives it.
    let ys: &[u8] =
        unsafe { std::slice::from_raw_parts(ys.as_ptr().cast::<u8>(), ys.len() * Q8_1_BYTES) };
    let activations: Vec<Activation<'_>> = ys
        .chunks_exact((blocks * Q8_1_BYTES).max(1))
        .map(Activation::new)
        .collect();

    let row_bytes = blocks * Q4_1_BYTES;
    let dst = split_columns(m, total, |r, first, out| {
        let act = &activations[r];
        for (j, o) in out.iter_mut().enumerate() {
            let col = first + j;
            // The matrix this column belongs to, and its row there.
            let wi = ends.partition_point(|&e| e <= col);
            let row = col - if wi == 0 { 0 } else { ends[wi - 1] };
            *o = act.dot(&datas[wi][row * row_bytes..(row + 1) * row_bytes]);
        }
    });
    if let [_] = ws {
        let mut dims = x.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = total;
        }
        return Ok(vec![Tensor::from_vec(dst, dims, &Device::Cpu)?]);
    }
    let mut outs = Vec::with_capacity(ws.len());
    let mut start = 0;
    for &end in &ends {
        let mut y = Vec::with_capacity(m * (end - start));
        for r in 0..m {
            y.extend_from_slice(&dst[r * total + start..r * total + end]);
        }
        let mut dims = x.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = end - start;
        }
        outs.push(Tensor::from_vec(y, dims, &Device::Cpu)?);
        start = end;
    }
    Ok(outs)
}

/// The `(m, n)` output of a product, its columns split into a few large
/// tasks on rayon's pool: `task(row, first_column, out)` fills `out`, the
/// columns `first_column..` of output row `row`. A decode step runs ~200
/// products, and each rayon hand-off costs more than a short dot product,
/// so there are about two tasks per thread and row.
fn split_columns(m: usize, n: usize, task: impl Fn(usize, usize, &mut [f32]) + Sync) -> Vec<f32> {
    let mut dst = vec![0f32; m * n];
    let chunk = n.div_ceil(2 * rayon::current_num_threads().max(1)).max(32);
    let tasks: Vec<(usize, usize, &mut [f32])> = dst
        .chunks_mut(n.max(1))
        .enumerate()
        .flat_map(|(r, row)| {
            row.chunks_mut(chunk)
                .enumerate()
                .map(move |(c, out)| (r, c * chunk, out))
        })
        .collect();
    tasks
        .into_par_iter()
        .for_each(|(r, first, out)| task(r, first, out));
    dst
}

/// Whether [`q8_0_matmul`] computes `x` times `w`: Q8_0 weights in CPU
/// memory with rows a whole number of blocks long, and an f32 `x` on the
/// CPU whose last dimension is the weights' row length, in a build that
/// targets AVX2 (the kernel it reproduces is candle's AVX2 one).
pub fn q8_0_applies(w: &QTensor, x: &Tensor) -> bool {
    cfg!(target_feature = "avx2") && cpu_product_applies(w, x, GgmlDType::Q8_0)
}

/// `x (.., k)` times the transpose of the Q8_0 weights `w (n, k)`, giving
/// `(.., n)`: the same arithmetic as candle's `QMatMul::forward` on an AVX2
/// CPU (ggml's `ggml_vec_dot_q8_0_q8_0`: per row, one fused multiply-add
/// of each block's integer products into an 8-lane accumulator, block after
/// block, then candle's horizontal sum), so the result is equal bit for bit.
/// The weight rows are read in one linear stream per task, and the columns
/// are split over rayon's pool in a few large tasks where candle's loop
/// hands out tasks of at most 512 columns; the activation's scales are
/// converted once. SmolLM2's output matrix is Q8_0
/// (`results/peers-profile.md` has its timing, and why four rows
/// interleaved were slower).
///
/// # Errors
/// If [`q8_0_applies`] is false for `w` and `x`, or candle cannot read
/// either tensor.
pub fn q8_0_matmul(w: &QTensor, x: &Tensor) -> Result<Tensor> {
    let (n, k, data) = product_weights(
        w,
        x,
        q8_0_applies(w, x),
        "q8_0_matmul",
        "an AVX2 build and Q8_0 CPU",
        Q8_0_BYTES,
    )?;
    let blocks = k / QK;
    let row_bytes = blocks * Q8_0_BYTES;
    let mut out_dims = x.dims().to_vec();
    let m = x.elem_count() / k;
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    let mut ys = vec![BlockQ8_0::zeros(); m * blocks];
    for (row, y) in xs.chunks_exact(k).zip(ys.chunks_exact_mut(blocks)) {
        BlockQ8_0::from_float(row, y);
    }
    // SAFETY: `BlockQ8_0` is `#[repr(C)]` with fields `f16, [i8; 32]`
    // (candle asserts its size is 34, and so does this module), so the
    // vector's memory is `m * blocks * 34` initialised bytes with no
    // padding; the byte slice borrows `ys`, which outlives it.
    let ys: &[u8] =
        unsafe { std::slice::from_raw_parts(ys.as_ptr().cast::<u8>(), ys.len() * Q8_0_BYTES) };
    let dst = split_columns(m, n, |r, first, out| {
        let act = &ys[r * row_bytes..(r + 1) * row_bytes];
        let rows = &data[first * row_bytes..(first + out.len()) * row_bytes];
        q8_0_rows(rows, act, blocks, out);
    });
    if let Some(last) = out_dims.last_mut() {
        *last = n;
    }
    Tensor::from_vec(dst, out_dims, &Device::Cpu)
}

/// `out[i]` = weight row `i` of `rows` (`out.len()` rows of `blocks` Q8_0
/// blocks) dotted with the Q8_0 activation `act`, as candle's AVX2
/// `vec_dot_q8_0_q8_0`.
#[cfg(target_feature = "avx2")]
fn q8_0_rows(rows: &[u8], act: &[u8], blocks: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let row_bytes = blocks * Q8_0_BYTES;
    assert!(rows.len() >= out.len() * row_bytes && act.len() >= row_bytes);
    let scale = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
    let dy: Vec<f32> = act.chunks_exact(Q8_0_BYTES).map(scale).collect();
    // SAFETY: the build targets AVX2 (this function exists only under it);
    // the assert above keeps every 32-byte load at `2 + Q8_0_BYTES * b`
    // within a row of `rows` (row `i < out.len()`, block `b < blocks`) and
    // within `act`.
    unsafe {
        // candle's `mul_sum_i8_pairs_float`: |x| times sign(x) * y, pairs
        // of u8 x i8 into i16 (at most 2 * 128 * 127: no saturation), then
        // pairs of i16 into i32, as f32.
        let block = |w: *const u8, y: __m256i| {
            let x = _mm256_loadu_si256(w.cast::<__m256i>());
            let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x));
            _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_set1_epi16(1), pairs))
        };
        // candle's `hsum_float_8`.
        let hsum = |x: __m256| {
            let r = _mm_add_ps(_mm256_extractf128_ps::<1>(x), _mm256_castps256_ps128(x));
            let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
            _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)))
        };
        let w = rows.as_ptr();
        let y = act.as_ptr();
        for (r, o) in out.iter_mut().enumerate() {
            let mut acc = _mm256_setzero_ps();
            for b in 0..blocks {
                let yb = _mm256_loadu_si256(y.add(b * Q8_0_BYTES + 2).cast::<__m256i>());
                let wb = w.add(r * row_bytes + b * Q8_0_BYTES);
                let d = _mm256_set1_ps(scale(std::slice::from_raw_parts(wb, 2)) * dy[b]);
                acc = _mm256_fmadd_ps(d, block(wb.add(2), yb), acc);
            }
            *o = hsum(acc);
        }
    }
}

/// Never called: [`q8_0_applies`] is false without AVX2.
#[cfg(not(target_feature = "avx2"))]
fn q8_0_rows(_rows: &[u8], _act: &[u8], _blocks: usize, _out: &mut [f32]) {
    unreachable!("q8_0_matmul needs an AVX2 build")
}

/// One activation row in Q8_1, its per-block scales converted once.
struct Activation<'a> {
    /// `d` of each block, as f32.
    d: Vec<f32>,
    /// `s` of each block, as f32.
    s: Vec<f32>,
    /// The row's Q8_1 bytes.
    bytes: &'a [u8],
}

impl<'a> Activation<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        let mut d = Vec::with_capacity(bytes.len() / Q8_1_BYTES);
        let mut s = Vec::with_capacity(bytes.len() / Q8_1_BYTES);
        for b in bytes.chunks_exact(Q8_1_BYTES) {
            d.push(f16::from_le_bytes([b[0], b[1]]).to_f32());
            s.push(f16::from_le_bytes([b[2], b[3]]).to_f32());
        }
        Self { d, s, bytes }
    }

    /// Dot product with one Q4_1 weight row, in the generic loop's order:
    /// `sum += (sumi * dx) * dy + mx * sy` block after block. With AVX2,
    /// eight blocks' terms are computed at once (the same roundings: separate
    /// multiplies and adds, no fused multiply-add) and then added to `sum`
    /// one after the other.
    #[inline]
    fn dot(&self, w: &[u8]) -> f32 {
        let blocks = w.len() / Q4_1_BYTES;
        let mut sum = 0f32;
        let mut b = 0;
        #[cfg(all(target_feature = "avx2", target_feature = "f16c"))]
        while b + 8 <= blocks {
            let terms = terms8_avx2(
                &w[b * Q4_1_BYTES..(b + 8) * Q4_1_BYTES],
                &self.bytes[b * Q8_1_BYTES..(b + 8) * Q8_1_BYTES],
                &self.d[b..b + 8],
                &self.s[b..b + 8],
            );
            for t in terms {
                sum += t;
            }
            b += 8;
        }
        for b in b..blocks {
            let wb = &w[b * Q4_1_BYTES..(b + 1) * Q4_1_BYTES];
            let yb = &self.bytes[b * Q8_1_BYTES..(b + 1) * Q8_1_BYTES];
            let dx = f16::from_le_bytes([wb[0], wb[1]]).to_f32();
            let mx = f16::from_le_bytes([wb[2], wb[3]]).to_f32();
            let sumi = block_sumi(&wb[4..Q4_1_BYTES], &yb[4..Q8_1_BYTES]);
            sum += sumi as f32 * dx * self.d[b] + mx * self.s[b];
        }
        sum
    }
}

/// The terms `(sumi * dx) * dy + mx * sy` of eight consecutive blocks: `w`
/// their 8 x 20 bytes of Q4_1, `y` the activation's 8 x 36 bytes of Q8_1,
/// `d` and `s` its scales as f32.
///
/// # Panics
/// If a slice is shorter than eight blocks.
#[cfg(all(target_feature = "avx2", target_feature = "f16c"))]
#[inline]
fn terms8_avx2(w: &[u8], y: &[u8], d: &[f32], s: &[f32]) -> [f32; 8] {
    use std::arch::x86_64::*;
    assert!(w.len() >= 8 * Q4_1_BYTES && y.len() >= 8 * Q8_1_BYTES && d.len() >= 8 && s.len() >= 8);
    let mut dx = [0u16; 8];
    let mut mx = [0u16; 8];
    for i in 0..8 {
        let wb = &w[i * Q4_1_BYTES..];
        dx[i] = u16::from_le_bytes([wb[0], wb[1]]);
        mx[i] = u16::from_le_bytes([wb[2], wb[3]]);
    }
    let mut out = [0f32; 8];
    // SAFETY: the build targets AVX2 and F16C (this function exists only
    // under both features); the assert above keeps every unaligned load
    // from `w` and `y` in bounds, `d`, `s`, `dx` and `mx` hold the 8 values
    // loaded, and `out` the 8 floats stored.
    unsafe {
        let quads = |i: usize| {
            block_quads(
                w.as_ptr().add(i * Q4_1_BYTES + 4),
                y.as_ptr().add(i * Q8_1_BYTES + 4),
            )
        };
        // Eight blocks' eight partial sums each, reduced to one i32 per
        // block (integer adds: exact in any order).
        let h01 = _mm256_hadd_epi32(quads(0), quads(1));
        let h23 = _mm256_hadd_epi32(quads(2), quads(3));
        let h45 = _mm256_hadd_epi32(quads(4), quads(5));
        let h67 = _mm256_hadd_epi32(quads(6), quads(7));
        let h0123 = _mm256_hadd_epi32(h01, h23);
        let h4567 = _mm256_hadd_epi32(h45, h67);
        let lo = _mm_add_epi32(
            _mm256_castsi256_si128(h0123),
            _mm256_extracti128_si256::<1>(h0123),
        );
        let hi = _mm_add_epi32(
            _mm256_castsi256_si128(h4567),
            _mm256_extracti128_si256::<1>(h4567),
        );
        // |sumi| <= 32 * 15 * 128 < 2^24: exact in f32.
        let sumi = _mm256_cvtepi32_ps(_mm256_set_m128i(hi, lo));
        let dx = _mm256_cvtph_ps(_mm_loadu_si128(dx.as_ptr().cast::<__m128i>()));
        let mx = _mm256_cvtph_ps(_mm_loadu_si128(mx.as_ptr().cast::<__m128i>()));
        let dy = _mm256_loadu_ps(d.as_ptr());
        let sy = _mm256_loadu_ps(s.as_ptr());
        let t = _mm256_add_ps(
            _mm256_mul_ps(_mm256_mul_ps(sumi, dx), dy),
            _mm256_mul_ps(mx, sy),
        );
        _mm256_storeu_ps(out.as_mut_ptr(), t);
    }
    out
}

/// The eight i32 partial sums of one block's products (their total is
/// [`block_sumi`]): `x` 16 bytes of 4-bit values, `y` 32 signed bytes.
///
/// # Safety
/// Needs AVX2; `x` must be valid for reading 16 bytes and `y` 32.
#[cfg(target_feature = "avx2")]
#[inline]
unsafe fn block_quads(x: *const u8, y: *const u8) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees the feature and both reads.
    unsafe {
        let raw = _mm_loadu_si128(x.cast::<__m128i>());
        let low_mask = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(raw, low_mask);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(raw), low_mask);
        let q = _mm256_set_m128i(hi, lo);
        let ys = _mm256_loadu_si256(y.cast::<__m256i>());
        // u8 (0..=15) times i8, adjacent pairs added into i16: at most
        // 2 * 15 * 128 in magnitude, so the saturating add never saturates.
        let pairs = _mm256_maddubs_epi16(q, ys);
        _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
    }
}

/// `sum_j q_j * y_j` over one block: `x` the 16 bytes of 4-bit values (low
/// nibbles are elements 0-15, high nibbles 16-31), `y` 32 signed bytes.
///
/// # Panics
/// If `x` is shorter than 16 bytes or `y` shorter than 32.
#[inline]
fn block_sumi(x: &[u8], y: &[u8]) -> i32 {
    #[cfg(target_feature = "avx2")]
    {
        block_sumi_avx2(x, y)
    }
    #[cfg(not(target_feature = "avx2"))]
    {
        block_sumi_generic(x, y)
    }
}

/// The generic loop's integer part (also the reference of the tests).
#[inline]
pub fn block_sumi_generic(x: &[u8], y: &[u8]) -> i32 {
    let mut sumi = 0i32;
    for j in 0..QK / 2 {
        let v0 = (x[j] & 0x0F) as i32;
        let v1 = (x[j] >> 4) as i32;
        sumi += v0 * (y[j] as i8) as i32 + v1 * (y[j + QK / 2] as i8) as i32;
    }
    sumi
}

#[cfg(target_feature = "avx2")]
#[inline]
fn block_sumi_avx2(x: &[u8], y: &[u8]) -> i32 {
    use std::arch::x86_64::*;
    assert!(x.len() >= QK / 2 && y.len() >= QK);
    // SAFETY: the build targets AVX2 (this function exists only under
    // `target_feature = "avx2"`), and the assert above keeps the 16-byte
    // read from `x` and the 32-byte read from `y` in bounds.
    unsafe {
        let quads = block_quads(x.as_ptr(), y.as_ptr());
        let s = _mm_add_epi32(
            _mm256_castsi256_si128(quads),
            _mm256_extracti128_si256::<1>(quads),
        );
        let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01>(s));
        _mm_cvtsi128_si32(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ours` has `theirs`' shape and every value's bits.
    fn assert_same_bits(ours: &Tensor, theirs: &Tensor, label: &str) -> Result<()> {
        assert_eq!(ours.dims(), theirs.dims(), "{label}");
        let (a, b) = (
            ours.flatten_all()?.to_vec1::<f32>()?,
            theirs.flatten_all()?.to_vec1::<f32>()?,
        );
        let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "{label}: differs from candle's product");
        Ok(())
    }

    #[test]
    fn the_block_sum_equals_the_generic_loop() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..2000 {
            let x: Vec<u8> = (0..16).map(|_| next() as u8).collect();
            let y: Vec<u8> = (0..32).map(|_| next() as u8).collect();
            assert_eq!(block_sumi(&x, &y), block_sumi_generic(&x, &y));
        }
        // extremes: every nibble 15 against -128 and 127
        assert_eq!(block_sumi(&[0xFF; 16], &[0x80; 32]), -15 * 128 * 32);
        assert_eq!(block_sumi(&[0xFF; 16], &[0x7F; 32]), 15 * 127 * 32);
    }

    /// The product against candle's own `QMatMul::forward` on the same
    /// quantized weights: equal bit for bit, for single rows (decode),
    /// several rows, column counts that do not divide into the task size,
    /// and the shapes of SmolLM2's projections.
    #[test]
    fn the_product_equals_candles_bit_for_bit() -> Result<()> {
        use candle_core::quantized::QMatMul;
        use candle_core::Module;
        let cases = [
            (1, 576, 576),
            (1, 192, 576),
            (1, 576, 1536),
            (1, 1536, 576),
            (2, 40, 416),
            (3, 193, 64),
            (2, 1, 32),
            (5, 77, 96),
        ];
        for (i, &(m, n, k)) in cases.iter().enumerate() {
            let seed = 11 + i as u64;
            let w = Tensor::from_vec(crate::testing::rand_vec(n * k, seed), (n, k), &Device::Cpu)?;
            let q = QTensor::quantize(&w, GgmlDType::Q4_1)?;
            let mut xv = crate::testing::rand_vec(m * k, seed + 100);
            xv.iter_mut().step_by(7).for_each(|v| *v *= 40.0);
            let x = Tensor::from_vec(xv, (1, m, k), &Device::Cpu)?;
            assert!(q4_1_applies(&q, &x));
            let ours = q4_1_matmul(&q, &x)?;
            let theirs = QMatMul::from_qtensor(q)?.forward(&x)?;
            assert_same_bits(&ours, &theirs, &format!("{m}x{n}x{k}"))?;
        }
        Ok(())
    }

    /// Several matrices in one call give each one's own product, bit for
    /// bit, including rows split across the tasks' boundaries.
    #[test]
    fn the_fused_products_equal_the_single_ones() -> Result<()> {
        let k = 576;
        let ws: Vec<QTensor> = [576usize, 192, 193]
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let w = Tensor::from_vec(
                    crate::testing::rand_vec(n * k, 50 + i as u64),
                    (n, k),
                    &Device::Cpu,
                )?;
                QTensor::quantize(&w, GgmlDType::Q4_1)
            })
            .collect::<Result<_>>()?;
        let x = Tensor::from_vec(crate::testing::rand_vec(2 * k, 60), (1, 2, k), &Device::Cpu)?;
        let refs: Vec<&QTensor> = ws.iter().collect();
        let fused = q4_1_matmul_many(&refs, &x)?;
        for (w, got) in ws.iter().zip(&fused) {
            let want = q4_1_matmul(w, &x)?;
            assert_eq!(got.dims(), want.dims());
            let (a, b) = (
                got.flatten_all()?.to_vec1::<f32>()?,
                want.flatten_all()?.to_vec1::<f32>()?,
            );
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
        }
        Ok(())
    }

    /// The Q8_0 product against candle's `QMatMul::forward`: equal bit for
    /// bit, for row counts that do not divide into the task size, several
    /// activation rows, and SmolLM2's output-matrix width.
    #[test]
    fn the_q8_0_product_equals_candles_bit_for_bit() -> Result<()> {
        use candle_core::quantized::QMatMul;
        use candle_core::Module;
        if !cfg!(target_feature = "avx2") {
            return Ok(());
        }
        for (i, &(m, n, k)) in [
            (1, 4099, 576),
            (1, 576, 1536),
            (3, 37, 64),
            (2, 5, 32),
            (4, 3, 96),
        ]
        .iter()
        .enumerate()
        {
            let seed = 31 + i as u64;
            let w = Tensor::from_vec(crate::testing::rand_vec(n * k, seed), (n, k), &Device::Cpu)?;
            let q = QTensor::quantize(&w, GgmlDType::Q8_0)?;
            let mut xv = crate::testing::rand_vec(m * k, seed + 100);
            xv.iter_mut().step_by(5).for_each(|v| *v *= 30.0);
            let x = Tensor::from_vec(xv, (m, k), &Device::Cpu)?;
            assert!(q8_0_applies(&q, &x));
            let ours = q8_0_matmul(&q, &x)?;
            let theirs = QMatMul::from_qtensor(q)?.forward(&x)?;
            assert_same_bits(&ours, &theirs, &format!("{m}x{n}x{k}"))?;
        }
        Ok(())
    }

    #[test]
    fn other_inputs_are_refused_with_the_reason() -> Result<()> {
        let w = Tensor::from_vec(crate::testing::rand_vec(64 * 64, 3), (64, 64), &Device::Cpu)?;
        let q8 = QTensor::quantize(&w, GgmlDType::Q8_0)?;
        let q41 = QTensor::quantize(&w, GgmlDType::Q4_1)?;
        let x = Tensor::zeros((1, 64), DType::F32, &Device::Cpu)?;
        assert!(!q4_1_applies(&q8, &x));
        assert!(!q4_1_applies(&q41, &x.to_dtype(DType::F16)?));
        assert!(!q4_1_applies(
            &q41,
            &Tensor::zeros((1, 32), DType::F32, &Device::Cpu)?
        ));
        let err = q4_1_matmul(&q8, &x).unwrap_err().to_string();
        assert!(err.contains("needs Q4_1"), "{err}");
        assert!(!q8_0_applies(&q41, &x));
        let err = q8_0_matmul(&q41, &x).unwrap_err().to_string();
        assert!(err.contains("Q8_0 CPU weights"), "{err}");
        Ok(())
    }
}
