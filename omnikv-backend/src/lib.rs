//! OmniKV (ICLR 2025, "Dynamic Context Selection for Efficient Long-Context
//! LLMs") as a KV-cache backend for mistral.rs.
//!
//! [`register`] adds the `omnikv` KV-cache backend, the token-dropping
//! baselines `h2o`, `streaming` and `snapkv` ([`evict`]) and the `llama_omnikv`
//! architecture to the host's registries; the patched `mistralrs` CLI calls it
//! at start-up, after which `--kv-cache omnikv --kv-cache-config <file.json>`
//! selects them.

pub mod attention;
pub mod backend;
pub mod config;
#[cfg(feature = "cuda-kernels")]
pub mod cuda_staging;
pub mod evict;
pub mod model;
pub mod ops;
pub mod plan;
pub mod recall;
pub mod selector;
pub mod sparse_attention;
pub mod store;

use std::sync::{Arc, Once};

use mistralrs_core::kv_backend::{
    register_architecture, register_kv_cache_backend, KvCacheBackend,
};

pub use backend::{OmniKvBackend, BACKEND_NAME};
pub use config::{OmniKvConfig, OmniKvConfigFile};
pub use evict::{EvictingBackend, EvictionConfig, H2O_NAME, SNAPKV_NAME, STREAMING_NAME};
pub use model::{LlamaOmniKv, LlamaOmniKvArchitecture, ARCHITECTURE_NAME};

/// Register the `omnikv` backend and the `llama_omnikv` architecture with the
/// host. Safe to call more than once.
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
