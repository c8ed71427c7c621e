//! Attention computed by this crate, GQA-aware (query head `i` reads KV head
//! `i / (h / kv_h)`), one module per kernel:
//!
//! | entry point | module | used for |
//! |---|---|---|
//! | [`exact_attention`] | `exact` | decode steps and exact prompt passes on the CPU: the stock cache's arithmetic, bit for bit |
//! | [`tiled_causal_attention`] | `tiled` | fast prompt passes on the CPU (matrix products, vectorised softmax) |
//! | [`device_attention`] | `device` | both, on an accelerator (flash decoding, chunked prompt attention) |
//! | [`sparse_decode_attention`] | `sparse` | a sparse layer's decode step over the selected rows (spec: "Sparse attention") |
//!
//! [`exact_attention`] and [`tiled_causal_attention`] dispatch to
//! [`device_attention`] when their inputs are not on the CPU, so callers pick
//! a kernel by what it computes, not by device. Which kernel a prompt pass
//! runs is decided in one place, [`crate::prefill`]. [`matmul_attention`]
//! (plain tensor algebra, in `device`) is the reference the tests compare the
//! others against.
//!
//! Shapes: `q` `(b, h, s, d)`, `k`/`v` `(b, kv_h, n, d)` with b sequences, h
//! query heads, kv_h KV heads, s new positions, n = past + s cached
//! positions, d head dim.
//!
//! ```text
//!   keys:     0 ........ past-1 | past ........ past+s-1
//!   query i:  sees all of these | sees past+0 ..= past+i
//! ```

mod device;
mod exact;
mod sparse;
mod tiled;

pub use device::{
    chunked_prompt_attention, device_attention, matmul_attention, PROMPT_SCORE_BYTES,
};
pub use exact::{exact_attention, exact_prompt_attention};
pub use sparse::{attended_rows, sparse_decode_attention, sparse_decode_attention_per_kv_head};
pub use tiled::{tiled_causal_attention, PREFILL_TILE};

use candle_core::{Device, Result, Tensor};

/// Additive causal mask `(s, past + s)`: 0 where query `i` may see key `j`
/// (`j <= past + i`), `-inf` elsewhere.
///
/// # Errors
/// If the tensor cannot be created on `device`.
pub fn causal_mask(s: usize, past: usize, device: &Device) -> Result<Tensor> {
    let n = past + s;
    let mask: Vec<f32> = (0..s)
        .flat_map(|i| {
            (0..n).map(move |j| {
                if j <= past + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (s, n), device)
}

/// Shapes of an attention call, checked once.
pub(crate) struct Dims {
    pub(crate) b: usize,
    pub(crate) h: usize,
    pub(crate) s: usize,
    pub(crate) d: usize,
    pub(crate) kv_h: usize,
    pub(crate) n: usize,
}

impl Dims {
    /// `q` `(b, h, s, d)` against `k` `(b, kv_h, n, d)`.
    ///
    /// # Errors
    /// If a tensor is not rank 4, `h` is not a multiple of `kv_h`, or the
    /// cache holds fewer than `s` keys.
    pub(crate) fn of(q: &Tensor, k: &Tensor) -> Result<Self> {
        let (b, h, s, d) = q.dims4()?;
        let (_, kv_h, n, _) = k.dims4()?;
        if h % kv_h != 0 {
            candle_core::bail!("query heads {h} are not a multiple of KV heads {kv_h}");
        }
        if n < s {
            candle_core::bail!("{n} cached keys cannot hold {s} new positions");
        }
        Ok(Self {
            b,
            h,
            s,
            d,
            kv_h,
            n,
        })
    }
}
