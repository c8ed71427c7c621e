//! Token budgets and context limits shared by OmniKV and the baselines: how
//! many prompt tokens a filter layer keeps (spec: "Selection at a filter
//! layer", step 4, `num_of_selected_tokens`), or how many rows a
//! token-dropping policy keeps, and the `max_context_len` admission check.
//! Budgets and lengths are in tokens.

/// Token budget: a count of prompt tokens or a fraction of the prompt (a
/// filter layer's selection size, or a baseline's rows per KV head).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TokenBudget {
    /// Keep exactly this many prompt tokens (clamped to the prompt length).
    Count(usize),
    /// Keep `floor(ratio * prompt_len)` prompt tokens, ratio in (0, 1].
    Ratio(f64),
}

impl TokenBudget {
    /// Number of prompt tokens to keep for a prompt of `prompt_len` tokens,
    /// clamped to `[1, prompt_len]` (0 only for an empty prompt).
    pub fn tokens_for(&self, prompt_len: usize) -> usize {
        if prompt_len == 0 {
            return 0;
        }
        self.unclamped(prompt_len).clamp(1, prompt_len)
    }

    /// The count itself, or `floor(ratio * prompt_len)`, without clamping
    /// (a baseline applies its own floor).
    pub fn unclamped(&self, prompt_len: usize) -> usize {
        match *self {
            TokenBudget::Count(n) => n,
            TokenBudget::Ratio(r) => (r * prompt_len as f64).floor() as usize,
        }
    }

    /// The one parser of budgets in configuration files and request options:
    /// an integer count in `1..=u32::MAX`, or a non-integer fraction in
    /// `(0, 1]`. `None` for anything else; the caller names its key in the
    /// error.
    pub fn from_json(value: &serde_json::Value) -> Option<Self> {
        if let Some(n) = value.as_u64() {
            return (1..=u32::MAX as u64)
                .contains(&n)
                .then_some(TokenBudget::Count(n as usize));
        }
        value
            .as_f64()
            .filter(|f| *f > 0.0 && *f <= 1.0)
            .map(TokenBudget::Ratio)
    }
}

/// Refuse a prompt, or prompt plus `max_tokens`, longer than a backend's
/// `max_context_len`, with a message naming the limit and the fix.
///
/// # Errors
/// When `prompt_len`, or `prompt_len + max_new_tokens`, exceeds `max`; the
/// message names both numbers and what to change.
pub fn check_context_len(
    backend: &str,
    max: usize,
    prompt_len: usize,
    max_new_tokens: Option<usize>,
) -> anyhow::Result<()> {
    let total = prompt_len + max_new_tokens.unwrap_or(0);
    if prompt_len > max {
        anyhow::bail!(
            "the prompt has {prompt_len} tokens, more than `max_context_len` = {max} of the {backend} config: shorten the prompt or raise `max_context_len`"
        );
    }
    if total > max {
        anyhow::bail!(
            "the prompt ({prompt_len} tokens) plus `max_tokens` ({}) exceed `max_context_len` = {max} of the {backend} config: lower `max_tokens` or raise `max_context_len`",
            total - prompt_len
        );
    }
    Ok(())
}
