//! Token-dropping baselines, `h2o`, `streaming` and `snapkv`, as KV-cache
//! backends in the same server, so OmniKV can be A/B-tested against them on
//! the same model (spec: "Published claims" names them).
//!
//! All three evict for real: after the prompt pass a sequence keeps at most
//! `C` rows per layer and KV head (`C` = the budget); with H2O and
//! StreamingLLM every decode step appends its row and drops one, and the
//! dropped rows are gone.
//!
//! - **H2O** ("Heavy-Hitter Oracle", Zhang et al., NeurIPS 2023): each KV head
//!   keeps the `heavy` rows with the largest accumulated attention mass (the
//!   softmax probabilities every query gave them, summed over the query heads
//!   of the group) plus the `recent` most recent positions; `heavy + recent =
//!   C`, split by `heavy_ratio` like the published heavy/recent ratios. During
//!   decoding the new step's probabilities are added to the masses and the
//!   lightest non-recent row is dropped.
//! - **StreamingLLM** (Xiao et al., ICLR 2024): the first `sink_tokens`
//!   positions (attention sinks) plus the most recent `C - sink_tokens`.
//! - **SnapKV** (Li et al., 2024): once, at the end of the prompt, the last
//!   `window_size` queries (the observation window) vote: each earlier row
//!   gets the attention they gave it (summed over the group's query heads),
//!   average-pooled over `kernel_size` neighbouring positions; the top
//!   `C - window_size` rows plus the window are kept. Decoding appends
//!   without evicting, as published.
//!
//! Rows live in a per-sequence store owned by the backend (keyed by the host's
//! sequence ids, released in `sequence_finished`), not in the model's cache,
//! so what a sequence holds is exactly what the policy kept. Keys are stored
//! after RoPE with their original positions (as the published H2O does);
//! StreamingLLM's re-rotation to in-cache positions, which matters only beyond
//! the model's trained context, is not done.
//!
//! Prompt passes attend densely over the whole prompt (the published methods
//! prefill with full attention) and the eviction happens when the prompt is
//! complete. Prompts of fewer than `min_prompt_len` tokens are not evicted
//! from, and the budget never goes below `min_tokens` rows (for SnapKV:
//! `min_tokens` voted rows besides the window).
//!
//! | file | what |
//! |---|---|
//! | `h2o.rs`, `streaming.rs`, `snapkv.rs` | one policy each: which rows of a head to keep |
//! | `config.rs` | the `--kv-cache-config` keys of the three backends |
//! | `rows.rs` | the per-sequence row store and its accounting |
//! | `backend.rs` | [`EvictingBackend`]: prompt and decode passes, attention over the kept rows |

use std::fmt;

mod backend;
mod config;
mod h2o;
mod rows;
mod snapkv;
mod streaming;

pub use backend::{causal_attention_mass, EvictingBackend};
pub use config::EvictionConfig;
pub use rows::Held;
pub use snapkv::avg_pool;

pub use crate::names::{H2O_NAME, SNAPKV_NAME, STREAMING_NAME};

/// Which rows a sequence keeps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EvictionPolicy {
    /// Heavy hitters by accumulated attention plus a recent window;
    /// `heavy_ratio` of the budget goes to heavy hitters.
    H2o { heavy_ratio: f64 },
    /// `sink_tokens` first positions plus a recent window.
    Streaming { sink_tokens: usize },
    /// Observation-window voting at the end of the prompt, pooled over
    /// `kernel` positions; no eviction while decoding.
    SnapKv { window: usize, kernel: usize },
}

/// Which rows of a head to keep when it holds more than `capacity` rows
/// (`pos[r]` is row `r`'s position, `mass[r]` its accumulated attention, H2O
/// only). Returns indices into the rows, or `None` when nothing has to go.
/// This is the whole policy, delegated to the policy's file; everything else
/// is storage.
///
/// # Panics
/// With H2O or SnapKV, if `mass` is shorter than `pos`.
pub fn rows_to_keep(
    policy: EvictionPolicy,
    pos: &[u32],
    mass: &[f32],
    capacity: usize,
) -> Option<Vec<usize>> {
    let n = pos.len();
    if n <= capacity {
        return None;
    }
    let mut by_pos: Vec<usize> = (0..n).collect();
    by_pos.sort_unstable_by_key(|&r| pos[r]);
    let keep = match policy {
        EvictionPolicy::Streaming { sink_tokens } => {
            streaming::keep(&by_pos, sink_tokens, capacity)
        }
        EvictionPolicy::H2o { heavy_ratio } => h2o::keep(&by_pos, pos, mass, heavy_ratio, capacity),
        EvictionPolicy::SnapKv { window, kernel } => {
            snapkv::keep(&by_pos, mass, window, kernel, capacity)
        }
    };
    Some(keep)
}

impl fmt::Display for EvictionPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EvictionPolicy::H2o { heavy_ratio } => write!(f, "H2O, heavy ratio {heavy_ratio}"),
            EvictionPolicy::Streaming { sink_tokens } => {
                write!(f, "StreamingLLM, {sink_tokens} sink tokens")
            }
            EvictionPolicy::SnapKv { window, kernel } => {
                write!(f, "SnapKV, window {window}, pooling kernel {kernel}")
            }
        }
    }
}
