//! OmniKV (ICLR 2025, "Dynamic Context Selection for Efficient Long-Context
//! LLMs") as a KV-cache backend for mistral.rs.
//!
//! [`register`] adds the `omnikv` KV-cache backend, the token-dropping
//! baselines `h2o`, `streaming` and `snapkv` ([`baselines`]) and the
//! `llama_omnikv` architecture ([`model`]) to the host's registries; the
//! patched `mistralrs` CLI calls it at start-up, after which `--kv-cache
//! omnikv --kv-cache-config <file.json>` selects them.
//!
//! Modules, in dependency order (each uses only those above it):
//!
//! | module | what |
//! |---|---|
//! | [`names`], [`accounting`], [`telemetry`], [`budget`], [`tensor_parallel`] | registered names, per-sequence release records, Prometheus metrics and per-sequence statistics, token budgets and context limits, this process as one rank of several (the host's communicator, the exact shared top-k) |
//! | [`attention`] | the attention kernels of this crate (exact, tiled, accelerator, sparse), over `omnikv_kernels` |
//! | [`prefill`] | the one place that decides which kernel a prompt pass runs |
//! | [`omnikv`] | the OmniKV backend: config, layer plan, selectors, tiered store, calibration recorder |
//! | [`baselines`] | H2O, StreamingLLM and SnapKV: one policy per file over a shared row store |
//! | [`model`] | `llama_omnikv`: Llama-3/3.1 with llama3 rope scaling, attention through the host's backend trait |
//!
//! Backends never import the model; the model reaches them through the
//! host's `KvCacheBackend` trait. `ARCHITECTURE.md` at the repository root
//! draws one decode step through these modules.

pub mod accounting;
pub mod attention;
pub mod baselines;
pub mod batch_invariant;
pub mod budget;
pub mod model;
pub mod names;
pub mod omnikv;
pub mod prefill;
pub mod rope;
pub mod telemetry;
pub mod tensor_parallel;

use std::sync::{Arc, Once};

use mistralrs_core::kv_backend::{
    register_architecture, register_kv_cache_backend, KvCacheBackend,
};

pub use baselines::{EvictingBackend, EvictionConfig};
pub use model::{LlamaOmniKv, LlamaOmniKvArchitecture};
pub use names::{ARCHITECTURE_NAME, BACKEND_NAME, H2O_NAME, SNAPKV_NAME, STREAMING_NAME};
pub use omnikv::{OmniKvBackend, OmniKvConfig, OmniKvConfigFile};

/// Register the `omnikv` backend, the baselines and the `llama_omnikv`
/// architecture with the host. Safe to call more than once (later calls do
/// nothing).
pub fn register() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        register_architecture(Arc::new(LlamaOmniKvArchitecture));
        register_kv_cache_backend(
            BACKEND_NAME,
            Arc::new(|config: Option<&serde_json::Value>| {
                let Some(config) = config else {
                    anyhow::bail!(
                        "the `omnikv` backend needs a configuration: pass `--kv-cache-config <file.json>` (see configs/example.json)"
                    );
                };
                let config = OmniKvConfig::from_value(config)?;
                tracing::info!(
                    "OmniKV: filter layers {:?}, {} wait-load layer(s), budget {:?}, selector {:?}",
                    config.filter_layers,
                    config.num_wait_load_layers,
                    config.budget,
                    config.selector
                );
                Ok(Arc::new(OmniKvBackend::new(config)) as Arc<dyn KvCacheBackend>)
            }),
        );
        for name in [H2O_NAME, STREAMING_NAME, SNAPKV_NAME] {
            register_kv_cache_backend(
                name,
                Arc::new(move |config: Option<&serde_json::Value>| {
                    let config = EvictionConfig::from_value(name, config)?;
                    tracing::info!(
                        "{name}: {}, budget {:?} (at least {} rows), prompts from {} tokens evicted from",
                        config.policy,
                        config.budget,
                        config.min_tokens,
                        config.min_prompt_len
                    );
                    Ok(Arc::new(EvictingBackend::new(config)) as Arc<dyn KvCacheBackend>)
                }),
            );
        }
    });
}
