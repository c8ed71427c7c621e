//! The `omnikv` KV-cache backend as seen by the host.
//!
//! The host's `KvCacheBackend` interface hands every attention call of a
//! model to this type. At this stage every layer attends densely through this
//! crate's own attention ([`crate::attention`]); the layer plan and the
//! filter-layer selection build on the same entry point.

use std::sync::Arc;

use candle_core::{Result, Tensor};
use mistralrs_core::kv_backend::{AttentionInput, ForwardState, KvCache, KvCacheBackend};

use crate::attention::causal_attention;
use crate::config::OmniKvConfig;

/// Name under which the backend is registered with the host.
pub const BACKEND_NAME: &str = "omnikv";

#[derive(Debug, Clone)]
pub struct OmniKvBackend {
    config: Arc<OmniKvConfig>,
}

impl OmniKvBackend {
    pub fn new(config: OmniKvConfig) -> Self {
        Self {
            config: Arc::new(config),
        }
    }

    pub fn config(&self) -> &OmniKvConfig {
        &self.config
    }
}

impl KvCacheBackend for OmniKvBackend {
    fn name(&self) -> &str {
        BACKEND_NAME
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn model_architecture(&self) -> Option<&str> {
        Some(crate::model::ARCHITECTURE_NAME)
    }

    fn attention(
        &self,
        input: &AttentionInput<'_>,
        cache: &mut KvCache,
        _state: &mut ForwardState,
    ) -> Result<Tensor> {
        let (k, v) = cache.append(input.k, input.v)?;
        causal_attention(input.q, &k, &v, input.sdpa_params.softmax_scale as f64)
    }
}
