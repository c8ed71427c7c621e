//! The one place that decides how a prompt pass computes (spec: "Prefill";
//! not part of the published schema): the exact kernels (the stock
//! arithmetic, bit for bit) or the fast ones (tiled attention and f32 copies
//! of quantized projection weights). The choice follows the *positions* a
//! pass computes, never its length: prompt positions take the prompt
//! kernels, decode positions the decode kernels, so a prompt split
//! differently (a prefix-cache hit, host chunking, batching) gives the same
//! rows and logits bit for bit. OmniKV's dense layers, the baselines and the
//! model all ask here.

use candle_core::{Result, Tensor};

use crate::attention::{exact_attention, exact_prompt_attention, tiled_causal_attention};

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

impl PrefillKernel {
    /// Whether a pass runs the fast kernels: every prompt pass does when
    /// configured, whatever its length (a whole prompt, a host chunk, the
    /// rest after a prefix-cache hit, even a single token); decode steps
    /// never do. So each position's KV rows and logits come from one
    /// arithmetic however the prompt was split (same request, same output).
    pub fn is_fast_for(self, prompt_pass: bool) -> bool {
        self == PrefillKernel::Fast && prompt_pass
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
/// `(b, kv_h, past + s, d)`, with the kernel `kernel` asks for
/// ([`PrefillKernel::is_fast_for`]: tiled for prompt passes when fast,
/// else exact; decode steps are always exact). `prompt_pass` is
/// `ForwardInfo::is_prefill` of the pass: its positions are prompt positions.
///
/// # Errors
/// As [`exact_attention`] / [`tiled_causal_attention`].
///
/// # Panics
/// As those kernels: if `k` has no KV heads (`kv_h == 0`).
pub fn dense_attention(
    kernel: PrefillKernel,
    prompt_pass: bool,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    if kernel.is_fast_for(prompt_pass) {
        tiled_causal_attention(q, k, v, scale)
    } else if prompt_pass {
        exact_prompt_attention(q, k, v, scale)
    } else {
        exact_attention(q, k, v, scale)
    }
}
