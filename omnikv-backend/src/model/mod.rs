//! The `llama_omnikv` architecture and its registration with the host.

pub mod llama;

use std::sync::Arc;

use mistralrs_core::kv_backend::{
    CustomArchitecture, CustomTextModel, GgufLoadArgs, KvCacheBackend, PlainLoadArgs,
};

pub use llama::{llama3_inv_freq, Llama3RopeScaling, LlamaConfig, LlamaOmniKv};

use crate::baselines::EvictingBackend;
use crate::omnikv::{LayerPlan, OmniKvBackend};
use crate::prefill::PrefillKernel;

pub use crate::names::ARCHITECTURE_NAME;

/// Llama-3/3.1 for OmniKV, loadable from GGUF (`general.architecture =
/// llama`) and from HF safetensors directories.
#[derive(Debug, Default)]
pub struct LlamaOmniKvArchitecture;

/// The prefill kernel the backend asked for: [`PrefillKernel::Fast`] makes
/// the model keep f32 copies of quantized projection weights for prompt
/// passes. Backends of other crates (and the host's default) get the stock
/// arithmetic. With [`attach_rotary`], the only places the model looks at a
/// backend's concrete type: the host trait carries no prefill preference or
/// rotary tables, and this crate's backends are recognised through
/// `KvCacheBackend::as_any`.
pub(crate) fn prefill_kernel(backend: &dyn KvCacheBackend) -> PrefillKernel {
    let any = backend.as_any();
    if let Some(b) = any.downcast_ref::<OmniKvBackend>() {
        b.config().prefill
    } else if let Some(b) = any.downcast_ref::<EvictingBackend>() {
        b.config().prefill
    } else {
        PrefillKernel::Exact
    }
}

/// Hand the model's rotary tables to an `omnikv` backend, whose window
/// selectors rotate their past queries to the current position with them.
pub(crate) fn attach_rotary(backend: &dyn KvCacheBackend, rotary: &Arc<crate::rope::Rotary>) {
    if let Some(b) = backend.as_any().downcast_ref::<OmniKvBackend>() {
        b.attach_rotary(rotary.clone());
    }
}

/// Reject a backend configuration that does not fit the model, at load time
/// rather than on the first request.
fn check_backend(backend: &Arc<dyn KvCacheBackend>, num_layers: usize) -> anyhow::Result<()> {
    if let Some(omnikv) = backend.as_any().downcast_ref::<OmniKvBackend>() {
        LayerPlan::new(omnikv.config(), num_layers)?;
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
