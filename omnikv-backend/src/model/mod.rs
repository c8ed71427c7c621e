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
use crate::tensor_parallel::TensorParallel;

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

/// What every rank must agree on: the model's `config.json`, the dtype, the
/// backend and its configuration.
fn setup(args: &PlainLoadArgs<'_>) -> String {
    let backend = args.backend.as_any();
    let config = if let Some(b) = backend.downcast_ref::<OmniKvBackend>() {
        format!("{:?}", b.config())
    } else if let Some(b) = backend.downcast_ref::<EvictingBackend>() {
        format!("{:?}", b.config())
    } else {
        String::new()
    };
    format!(
        "model config.json {:016x} ({:?}), backend `{}` {config}",
        crate::tensor_parallel::fingerprint(args.config_json),
        args.dtype,
        args.backend.name()
    )
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
        let ranks = crate::tensor_parallel::requested_world_size()?;
        if ranks > 1 {
            anyhow::bail!(
                "tensor parallelism ({ranks} ranks) is not available for GGUF models (mistral.rs has no tensor parallel GGUF path): serve the model's safetensors directory with `--format plain -m <dir>`, or run a single process"
            );
        }
        let model =
            LlamaOmniKv::load_gguf(args.files, args.dtype, args.device, args.backend.clone())?;
        check_backend(&args.backend, model.num_layers())?;
        Ok(Box::new(model))
    }

    fn load_plain(&self, args: PlainLoadArgs<'_>) -> anyhow::Result<Box<dyn CustomTextModel>> {
        // An `omnikv` backend merges the ranks' selections; the baselines
        // need nothing (each KV head keeps its rows from its own query
        // group's attention, all on one rank).
        let omnikv = args.backend.as_any().downcast_ref::<OmniKvBackend>();
        if let (Some(b), true) = (
            omnikv,
            args.comm.as_ref().is_some_and(|c| c.world_size() > 1),
        ) {
            // Refuse what cannot run across ranks before they connect.
            b.check_tensor_parallel()?;
        }
        let tp = args.comm.clone().and_then(TensorParallel::new);
        if let Some(tp) = &tp {
            tp.check_same_setup(&setup(&args), args.device)?;
            if let Some(b) = omnikv {
                b.attach_tensor_parallel(tp.clone())?;
            }
        }
        let model = LlamaOmniKv::load_hf_sharded(
            args.config_json,
            args.safetensors,
            args.dtype,
            args.device,
            args.backend.clone(),
            tp,
        )?;
        check_backend(&args.backend, model.num_layers())?;
        Ok(Box::new(model))
    }
}
