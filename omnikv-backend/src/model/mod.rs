//! The `llama_omnikv` architecture and its registration with the host.

pub mod llama;

use std::sync::Arc;

use mistralrs_core::kv_backend::{
    CustomArchitecture, CustomTextModel, GgufLoadArgs, KvCacheBackend, PlainLoadArgs,
};

pub use llama::{llama3_inv_freq, Llama3RopeScaling, LlamaConfig, LlamaOmniKv};

use crate::backend::OmniKvBackend;

/// Name under which the architecture is registered with the host.
pub const ARCHITECTURE_NAME: &str = "llama_omnikv";

/// Llama-3/3.1 for OmniKV, loadable from GGUF (`general.architecture =
/// llama`) and from HF safetensors directories.
#[derive(Debug, Default)]
pub struct LlamaOmniKvArchitecture;

/// Whether the backend asked for the fast prefill kernels (f32 copies of the
/// quantized weights for prompt passes).
pub(crate) fn fast_prefill(backend: &dyn KvCacheBackend) -> bool {
    use crate::config::PrefillKernel::Fast;
    let any = backend.as_any();
    any.downcast_ref::<OmniKvBackend>()
        .is_some_and(|b| b.config().prefill == Fast)
        || any
            .downcast_ref::<crate::evict::EvictingBackend>()
            .is_some_and(|b| b.config().prefill == Fast)
}

/// Reject a backend configuration that does not fit the model, at load time
/// rather than on the first request.
fn check_backend(backend: &Arc<dyn KvCacheBackend>, num_layers: usize) -> anyhow::Result<()> {
    if let Some(omnikv) = backend.as_any().downcast_ref::<OmniKvBackend>() {
        crate::plan::LayerPlan::new(omnikv.config(), num_layers)?;
    }
    Ok(())
}

impl CustomArchitecture for LlamaOmniKvArchitecture {
    fn name(&self) -> &str {
        ARCHITECTURE_NAME
    }

    fn gguf_architectures(&self) -> &[&str] {
        &["llama"]
    }

    fn plain_architectures(&self) -> &[&str] {
        &["LlamaForCausalLM"]
    }

    fn load_gguf(&self, args: GgufLoadArgs<'_>) -> anyhow::Result<Box<dyn CustomTextModel>> {
        let model =
            LlamaOmniKv::load_gguf(args.files, args.dtype, args.device, args.backend.clone())?;
        check_backend(&args.backend, model.num_layers())?;
        Ok(Box::new(model))
    }

    fn load_plain(&self, args: PlainLoadArgs<'_>) -> anyhow::Result<Box<dyn CustomTextModel>> {
        let model = LlamaOmniKv::load_hf(
            args.config_json,
            args.safetensors,
            args.dtype,
            args.device,
            args.backend.clone(),
        )?;
        check_backend(&args.backend, model.num_layers())?;
        Ok(Box::new(model))
    }
}
