//! The `--kv-cache-config` JSON of the token-dropping baselines: every key
//! checked, every problem reported with the key, the value and what is
//! allowed.

use serde_json::Value;

use super::{EvictionPolicy, H2O_NAME, SNAPKV_NAME, STREAMING_NAME};
use crate::budget::TokenBudget;
use crate::prefill::PrefillKernel;

/// Configuration of an eviction backend (`--kv-cache-config` JSON).
#[derive(Debug, Clone, PartialEq)]
pub struct EvictionConfig {
    /// The backend's policy and its parameters.
    pub policy: EvictionPolicy,
    /// Rows kept per layer and KV head: a count, or a fraction of the prompt.
    pub budget: TokenBudget,
    /// The budget never goes below this many rows.
    pub min_tokens: usize,
    /// Prompts shorter than this keep every row.
    pub min_prompt_len: usize,
    /// Longest prompt + generation accepted (longer requests are refused).
    pub max_context_len: usize,
    /// Kernels of prompt passes (`prefill` key; see [`crate::prefill`]).
    pub prefill: PrefillKernel,
}

impl EvictionConfig {
    /// Keys each backend accepts.
    fn known_keys(name: &str) -> &'static [&'static str] {
        match name {
            H2O_NAME => &[
                "budget",
                "heavy_ratio",
                "min_tokens",
                "min_prompt_len",
                "max_context_len",
                "prefill",
            ],
            SNAPKV_NAME => &[
                "budget",
                "window_size",
                "kernel_size",
                "min_tokens",
                "min_prompt_len",
                "max_context_len",
                "prefill",
            ],
            _ => &[
                "budget",
                "sink_tokens",
                "min_tokens",
                "min_prompt_len",
                "max_context_len",
                "prefill",
            ],
        }
    }

    /// Defaults: budget 0.1 of the prompt, `heavy_ratio` 0.5 (H2O's equal
    /// heavy and recent shares), 4 sink tokens (StreamingLLM's), SnapKV's
    /// window of 32 and pooling kernel of 5, at least 32 rows, every prompt
    /// evicted from, `max_context_len` 128,500.
    ///
    /// # Errors
    /// If `name` is not `h2o`, `streaming` or `snapkv`.
    pub fn defaults(name: &str) -> anyhow::Result<Self> {
        let policy = match name {
            H2O_NAME => EvictionPolicy::H2o { heavy_ratio: 0.5 },
            STREAMING_NAME => EvictionPolicy::Streaming { sink_tokens: 4 },
            SNAPKV_NAME => EvictionPolicy::SnapKv {
                window: 32,
                kernel: 5,
            },
            other => anyhow::bail!(
                "`{other}` is not an eviction backend; expected `{H2O_NAME}`, `{STREAMING_NAME}` or `{SNAPKV_NAME}`"
            ),
        };
        Ok(Self {
            policy,
            budget: TokenBudget::Ratio(0.1),
            min_tokens: 32,
            min_prompt_len: 0,
            max_context_len: 128_500,
            prefill: PrefillKernel::Fast,
        })
    }

    /// Parse the JSON config of backend `name` (`h2o`, `streaming` or
    /// `snapkv`); `None` gives the defaults. Every problem is reported at
    /// once, naming the key.
    ///
    /// # Errors
    /// If `name` is not a baseline, `value` is not an object, or a key is
    /// unknown to that backend or has a bad value.
    pub fn from_value(name: &str, value: Option<&Value>) -> anyhow::Result<Self> {
        let mut cfg = Self::defaults(name)?;
        let Some(value) = value else {
            return Ok(cfg);
        };
        let Some(map) = value.as_object() else {
            anyhow::bail!("the `{name}` config must be a JSON object, got {value}");
        };
        let known = Self::known_keys(name);
        let mut e = Vec::new();
        let uint = |key: &str, v: &Value, e: &mut Vec<String>| -> Option<usize> {
            let n = v.as_u64().filter(|&n| n <= u32::MAX as u64);
            if n.is_none() {
                e.push(format!("`{key}` = {v}: expected a whole number >= 0"));
            }
            n.map(|n| n as usize)
        };
        for (key, v) in map {
            match key.as_str() {
                k if !known.contains(&k) => e.push(format!(
                    "unknown key `{key}`; the `{name}` backend knows: {}",
                    known.join(", ")
                )),
                "budget" => match TokenBudget::from_json(v) {
                    Some(budget) => cfg.budget = budget,
                    None => e.push(format!(
                        "`budget` = {v}: expected a row count >= 1 or a fraction of the prompt in (0, 1]"
                    )),
                },
                "heavy_ratio" => match v.as_f64() {
                    Some(f) if (0.0..=1.0).contains(&f) => {
                        cfg.policy = EvictionPolicy::H2o { heavy_ratio: f }
                    }
                    _ => e.push(format!(
                        "`heavy_ratio` = {v}: expected the share of the budget for heavy hitters, in [0, 1]"
                    )),
                },
                "sink_tokens" => {
                    if let Some(n) = uint(key, v, &mut e) {
                        cfg.policy = EvictionPolicy::Streaming { sink_tokens: n }
                    }
                }
                "window_size" => match (uint(key, v, &mut e), cfg.policy) {
                    (Some(0), _) => e.push("`window_size` = 0: expected at least 1 query".into()),
                    (Some(w), EvictionPolicy::SnapKv { kernel, .. }) => {
                        cfg.policy = EvictionPolicy::SnapKv { window: w, kernel }
                    }
                    _ => {}
                },
                "kernel_size" => match (uint(key, v, &mut e), cfg.policy) {
                    (Some(k), EvictionPolicy::SnapKv { window, .. }) if k % 2 == 1 => {
                        cfg.policy = EvictionPolicy::SnapKv { window, kernel: k }
                    }
                    (Some(k), _) => e.push(format!(
                        "`kernel_size` = {k}: expected an odd pooling width >= 1"
                    )),
                    _ => {}
                },
                "min_tokens" => match uint(key, v, &mut e) {
                    Some(0) => e.push("`min_tokens` = 0: expected at least 1 row".into()),
                    Some(n) => cfg.min_tokens = n,
                    None => {}
                },
                "min_prompt_len" => {
                    if let Some(n) = uint(key, v, &mut e) {
                        cfg.min_prompt_len = n
                    }
                }
                "max_context_len" => match uint(key, v, &mut e) {
                    Some(0) => e.push("`max_context_len` = 0: expected at least 1".into()),
                    Some(n) => cfg.max_context_len = n,
                    None => {}
                },
                "prefill" => match v.as_str().map(|s| PrefillKernel::parse(Some(s))) {
                    Some(Ok(kernel)) => cfg.prefill = kernel,
                    Some(Err(message)) => e.push(message),
                    None => e.push(format!(
                        "`prefill` = {v}: expected one of {}",
                        PrefillKernel::ALLOWED
                    )),
                },
                _ => unreachable!("every known key is matched above"),
            }
        }
        if !e.is_empty() {
            anyhow::bail!(
                "{} problem{} in the `{name}` config:\n  - {}",
                e.len(),
                if e.len() == 1 { "" } else { "s" },
                e.join("\n  - ")
            );
        }
        Ok(cfg)
    }

    /// Rows kept per layer and KV head for a prompt of `prompt_len` tokens;
    /// `None` keeps every row, also those generated later: a prompt below
    /// `min_prompt_len`, or a budget of the whole prompt (`1.0`), which is
    /// then full attention, bit for bit (the budget-1.0 reference of every
    /// comparison with OmniKV).
    pub fn capacity(&self, prompt_len: usize) -> Option<usize> {
        if prompt_len < self.min_prompt_len
            || matches!(self.budget, TokenBudget::Ratio(r) if r >= 1.0)
        {
            return None;
        }
        let k = self.budget.unclamped(prompt_len);
        let floor = match self.policy {
            // Room for the sinks and at least one recent row.
            EvictionPolicy::Streaming { sink_tokens } => self.min_tokens.max(sink_tokens + 1),
            // The window and at least `min_tokens` voted rows.
            EvictionPolicy::SnapKv { window, .. } => window + self.min_tokens,
            EvictionPolicy::H2o { .. } => self.min_tokens,
        };
        Some(k.max(floor))
    }
}
