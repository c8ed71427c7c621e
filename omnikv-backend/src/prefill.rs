//! The one place that decides how a prompt pass computes (spec: "Prefill";
//! not part of the published schema): the exact kernels (the stock
//! arithmetic, bit for bit) or the fast ones (tiled attention and f32 copies
//! of quantized projection weights), and from how many new tokens the fast
//! ones pay off. OmniKV's dense layers, the baselines and the model all ask
//! here.

use candle_core::{Result, Tensor};

use crate::attention::{exact_attention, tiled_causal_attention};

/// How prompt passes compute (not in the published schema).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefillKernel {
    /// Tiled attention on matrix products and f32 copies of quantized
    /// weights: an order of magnitude faster on CPU, equal to the stock
    /// arithmetic up to float rounding.
    Fast,
    /// The stock kernels' arithmetic, bit for bit (quantized matmuls and the
    /// host's per-pair attention loop).
    Exact,
}

impl PrefillKernel {
    /// The accepted spellings of the `prefill` key, for error messages.
    pub const ALLOWED: &'static str = "\"fast\", \"exact\"";
}

/// Prompt passes of at least this many tokens take the fast prefill kernels
/// (when configured); shorter ones cost little and keep the stock arithmetic.
pub const FAST_PREFILL_MIN_TOKENS: usize = 64;

impl PrefillKernel {
    /// Whether a pass of `new_tokens` positions runs the fast kernels.
    pub fn is_fast_for(self, new_tokens: usize) -> bool {
        self == PrefillKernel::Fast && new_tokens >= FAST_PREFILL_MIN_TOKENS
    }

    /// Parse the `prefill` key's value; `None` is the default, `fast`.
    ///
    /// # Errors
    /// A value other than `"fast"` or `"exact"`, with a message naming it
    /// and the allowed values.
    pub fn parse(value: Option<&str>) -> std::result::Result<Self, String> {
        match value {
            None | Some("fast") => Ok(PrefillKernel::Fast),
            Some("exact") => Ok(PrefillKernel::Exact),
            Some(other) => Err(format!(
                "`prefill` = \"{other}\": expected one of {}",
                PrefillKernel::ALLOWED
            )),
        }
    }
}

/// Dense causal attention of a pass: `q` `(b, h, s, d)` over `k`, `v`
/// `(b, kv_h, past + s, d)`, with the kernel `kernel` asks for at this `s`
/// (tiled when fast, else exact; decode steps are always exact).
///
/// # Errors
/// As [`exact_attention`] / [`tiled_causal_attention`].
///
/// # Panics
/// As those kernels: if `k` has no KV heads (`kv_h == 0`).
pub fn dense_attention(
    kernel: PrefillKernel,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    if kernel.is_fast_for(q.dim(2)?) {
        tiled_causal_attention(q, k, v, scale)
    } else {
        exact_attention(q, k, v, scale)
    }
}
