//! `llama_omnikv`: a Llama-3/3.1 decoder for OmniKV, read top to bottom:
//! config, rotary embedding (with llama3 rope scaling), attention, MLP, block,
//! model. It loads a Hugging Face safetensors directory or a GGUF file, keeps
//! its KV cache in the host's per-layer [`KvCache`] (so the host's scheduler,
//! batching and prefix cache manage it like a built-in model's), and sends
//! every attention call through the selected KV-cache backend.
//!
//! Weight layout differences between the two formats:
//! - HF checkpoints rotate the two halves of each head (`rope`, GPT-NeoX
//!   order); GGUF converters permute `q`/`k` rows so that adjacent pairs are
//!   rotated (`rope_i`).
//! - HF carries llama3 rope scaling in `config.json` (`rope_scaling`); GGUF
//!   carries the resulting per-frequency divisors as `rope_freqs.weight`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use candle_core::quantized::{gguf_file, QMatMul};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use mistralrs_core::kv_backend::{
    AttentionInput, EitherCache, ForwardContext, ForwardInfo, ForwardState, KvCache,
    KvCacheBackend, NormalCache, SdpaParams,
};
use omnikv_kernels::quant;
use serde::Deserialize;

use crate::attention::causal_mask;
use crate::batch_invariant::{matmul_fixed_rows, ROW_BLOCK};
pub use crate::rope::Rotary;
use crate::tensor_parallel::TensorParallel;

// ---------------------------------------------------------------- config ---

/// Llama 3.1 (`rope_type: "llama3"`) rope scaling parameters (spec: "Llama
/// 3.1 rope scaling ("llama3" rope type)"; Llama-3.1: 8, 1, 4, 8192).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Llama3RopeScaling {
    /// Divisor of the low frequencies.
    pub factor: f32,
    /// Wavelengths above `O / low_freq_factor` are divided by `factor`.
    pub low_freq_factor: f32,
    /// Wavelengths below `O / high_freq_factor` are kept.
    pub high_freq_factor: f32,
    /// `O`, the context length (tokens) the model was pre-trained with.
    pub original_max_position_embeddings: usize,
}

/// Model hyper-parameters (the fields of an HF `config.json` we need).
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Tokens in the vocabulary (rows of the embedding).
    pub vocab_size: usize,
    /// `L`, the number of decoder layers.
    pub num_hidden_layers: usize,
    /// `h`, query heads per layer.
    pub num_attention_heads: usize,
    /// `kv_h`, KV heads per layer (GQA); `None` means `h`.
    pub num_key_value_heads: Option<usize>,
    /// `d`, the head dimension; `None` means `hidden_size / h`.
    pub head_dim: Option<usize>,
    /// Epsilon of the RMS norms.
    pub rms_norm_eps: f64,
    /// RoPE base `theta` (default 10,000).
    pub rope_theta: f32,
    /// Longest context in tokens: the rotary tables and the KV cache size.
    pub max_position_embeddings: usize,
    /// llama3 rope scaling, if the checkpoint uses it.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// The output projection reuses the token embedding.
    pub tie_word_embeddings: bool,
}

/// `config.json` as written: transformers < 5 uses `rope_theta` and
/// `rope_scaling`, transformers >= 5 nests both in `rope_parameters`.
#[derive(Deserialize)]
struct HfConfig {
    hidden_size: usize,
    intermediate_size: usize,
    vocab_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: f64,
    rope_theta: Option<f32>,
    max_position_embeddings: usize,
    rope_scaling: Option<serde_json::Value>,
    rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    tie_word_embeddings: bool,
    hidden_act: Option<String>,
}

impl LlamaConfig {
    /// Read an HF `config.json` (transformers < 5 and >= 5 layouts).
    ///
    /// # Errors
    /// If the text is not a Llama config, `hidden_act` is not `silu`, or the
    /// rope scaling type is neither `default` nor `llama3` (or its
    /// parameters are malformed).
    pub fn from_hf_json(text: &str) -> anyhow::Result<Self> {
        let raw: HfConfig =
            serde_json::from_str(text).context("config.json is not a Llama config")?;
        if let Some(act) = raw.hidden_act.as_deref() {
            if act != "silu" {
                anyhow::bail!("hidden_act `{act}` is not supported by llama_omnikv (only silu)");
            }
        }
        let params = raw.rope_parameters.as_ref();
        let rope_theta = raw
            .rope_theta
            .or_else(|| {
                params
                    .and_then(|p| p["rope_theta"].as_f64())
                    .map(|t| t as f32)
            })
            .unwrap_or(10_000.0);
        let scaling = raw
            .rope_scaling
            .as_ref()
            .or(params)
            .filter(|v| !v.is_null());
        let rope_scaling = match scaling {
            None => None,
            Some(v) => {
                let kind = v
                    .get("rope_type")
                    .or_else(|| v.get("type"))
                    .and_then(|t| t.as_str())
                    .unwrap_or("default");
                match kind {
                    "default" => None,
                    "llama3" => Some(
                        serde_json::from_value::<Llama3RopeScaling>(v.clone())
                            .context("llama3 rope scaling parameters")?,
                    ),
                    other => anyhow::bail!(
                        "rope scaling type `{other}` is not supported by llama_omnikv (only llama3)"
                    ),
                }
            }
        };
        Ok(LlamaConfig {
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            vocab_size: raw.vocab_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads: raw.num_key_value_heads,
            head_dim: raw.head_dim,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta,
            max_position_embeddings: raw.max_position_embeddings,
            rope_scaling,
            tie_word_embeddings: raw.tie_word_embeddings,
        })
    }

    /// `kv_h`: KV heads per layer.
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// `d`: the head dimension.
    ///
    /// # Panics
    /// If `head_dim` is unset and `num_attention_heads` is 0.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }
}

// ------------------------------------------------------------------ rope ---

/// Inverse frequencies `theta^(-2i/d)`, `head_dim / 2` of them, adjusted by
/// llama3 rope scaling when given (spec: "Llama 3.1 rope scaling ("llama3"
/// rope type)": low frequencies divided by `factor`, high ones kept, a smooth
/// blend in between).
pub fn llama3_inv_freq(
    theta: f32,
    head_dim: usize,
    scaling: Option<&Llama3RopeScaling>,
) -> Vec<f32> {
    let base: Vec<f32> = (0..head_dim)
        .step_by(2)
        .map(|i| 1.0 / theta.powf(i as f32 / head_dim as f32))
        .collect();
    let Some(s) = scaling else {
        return base;
    };
    let orig = s.original_max_position_embeddings as f32;
    let low_wavelen = orig / s.low_freq_factor;
    let high_wavelen = orig / s.high_freq_factor;
    base.into_iter()
        .map(|inv| {
            let wavelen = 2.0 * std::f32::consts::PI / inv;
            if wavelen < high_wavelen {
                inv
            } else if wavelen > low_wavelen {
                inv / s.factor
            } else {
                let smooth =
                    (orig / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                (1.0 - smooth) * inv / s.factor + smooth * inv
            }
        })
        .collect()
}

// ------------------------------------------------------------- attention ---

struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)
    }
}

/// A projection: the weights as loaded (quantized for GGUF) and, for the fast
/// prefill, an f32 copy used by prompt passes (candle has no SIMD kernel for
/// some quantizations, e.g. Q4_1, so prompts go through the threaded f32
/// GEMM instead). Every prompt pass uses the copy, whatever its length, and
/// decode steps the loaded weights: each position has one arithmetic
/// however its prompt was split (see [`crate::prefill`]).
struct Linear {
    weights: QMatMul,
    prefill_f32: Option<Tensor>,
    /// Row-parallel under tensor parallelism (output and down projections):
    /// this rank's product is a partial sum, completed across the ranks.
    reduce: Option<Arc<TensorParallel>>,
}

/// `x` `(.., k)` times `w.t()` (`w` `(n, k)`), each row computed in a
/// product of exactly [`ROW_BLOCK`] rows ([`crate::batch_invariant`]): a
/// position's result does not depend on how many positions or sequences
/// share the pass.
pub(crate) fn row_invariant_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&0);
    let rows = x.elem_count() / k.max(1);
    let y = matmul_fixed_rows(&x.reshape((rows, k))?, &w.t()?, ROW_BLOCK)?;
    let mut out = dims;
    if let Some(last) = out.last_mut() {
        *last = w.dim(0)?;
    }
    y.reshape(out)
}

/// `x` times the weights of `m`; unquantized weights go through
/// [`row_invariant_matmul`], so a row's result does not depend on how many
/// rows (sequences, prompt positions) share the product. Quantized products
/// are computed row by row already.
fn project(m: &QMatMul, x: &Tensor) -> Result<Tensor> {
    match m {
        QMatMul::Tensor(w) if w.dtype() == x.dtype() => row_invariant_matmul(x, w),
        // candle's own Q4_1 product is its generic loop; this one is the
        // same arithmetic, bit for bit, vectorised.
        QMatMul::QTensor(w) if quant::q4_1_applies(w, x) => quant::q4_1_matmul(w, x),
        // candle's Q8_0 product (SmolLM2's output matrix), bit for bit, four
        // rows at a time in fewer tasks.
        QMatMul::QTensor(w) if quant::q8_0_applies(w, x) => quant::q8_0_matmul(w, x),
        _ => m.forward(x),
    }
}

/// Each projection of `linears` applied to the same `x`: one fused Q4_1
/// product when every one is a decode-step Q4_1 product on the CPU (the
/// input quantized once, one hand-off to the pool instead of one per
/// matrix), otherwise one [`Linear::forward`] each. Same results either way.
fn project_all(linears: &[&Linear], x: &Tensor, prompt_pass: bool) -> Result<Vec<Tensor>> {
    let fused: Option<Vec<&candle_core::quantized::QTensor>> = linears
        .iter()
        .map(|l| match &l.weights {
            QMatMul::QTensor(w)
                if l.reduce.is_none()
                    && !(prompt_pass && l.prefill_f32.is_some())
                    && quant::q4_1_applies(w, x) =>
            {
                Some(w.as_ref())
            }
            _ => None,
        })
        .collect();
    match fused {
        Some(ws) if ws.len() > 1 => quant::q4_1_matmul_many(&ws, x),
        _ => linears.iter().map(|l| l.forward(x, prompt_pass)).collect(),
    }
}

impl Linear {
    fn forward(&self, x: &Tensor, prompt_pass: bool) -> Result<Tensor> {
        let y = match &self.prefill_f32 {
            Some(w) if prompt_pass => row_invariant_matmul(&x.to_dtype(w.dtype())?, w)?,
            _ => project(&self.weights, x)?,
        };
        match &self.reduce {
            Some(tp) => tp.sum(&y),
            None => Ok(y),
        }
    }
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    rotary: Arc<Rotary>,
    sdpa_params: SdpaParams,
    /// dtype of q/k/v, the rotary tables and the KV cache.
    attn_dtype: DType,
}

/// Per-layer context of one forward pass.
struct LayerCtx<'a> {
    layer_idx: usize,
    offsets: &'a [usize],
    /// Additive causal mask `(s, past + s)` for prompt passes, as the host's
    /// attention expects; `None` for single-token steps.
    mask: Option<&'a Tensor>,
    /// The pass computes prompt positions (`ForwardInfo::is_prefill`).
    prompt_pass: bool,
    backend: &'a dyn KvCacheBackend,
    state: &'a mut ForwardState,
}

impl Attention {
    fn forward(&self, x: &Tensor, cache: &mut KvCache, ctx: &mut LayerCtx<'_>) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let dtype = self.attn_dtype;
        let pp = ctx.prompt_pass;
        let [q, k, v]: [Tensor; 3] =
            project_all(&[&self.q_proj, &self.k_proj, &self.v_proj], x, pp)?
                .try_into()
                .map_err(|_| {
                    candle_core::Error::Msg("q/k/v projections: expected three outputs".into())
                })?;
        let q = q.to_dtype(dtype)?;
        let k = k.to_dtype(dtype)?;
        let v = v.to_dtype(dtype)?;
        let q = q
            .reshape((b, s, self.num_heads, self.head_dim))?
            .transpose(1, 2)?;
        let k = k
            .reshape((b, s, self.num_kv_heads, self.head_dim))?
            .transpose(1, 2)?;
        let v = v
            .reshape((b, s, self.num_kv_heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        let (q, k) = self.rotary.apply(&q, &k, ctx.offsets)?;
        let y = ctx.backend.attention(
            &AttentionInput {
                layer_idx: ctx.layer_idx,
                q: &q,
                k: &k,
                v: &v,
                mask: ctx.mask,
                sdpa_params: &self.sdpa_params,
                flash_params: None,
                seqlen_offsets: ctx.offsets,
            },
            cache,
            ctx.state,
        )?;
        let y = y
            .transpose(1, 2)?
            .reshape((b, s, self.num_heads * self.head_dim))?
            .to_dtype(x.dtype())?;
        self.o_proj.forward(&y, pp)
    }
}

// ------------------------------------------------------------------- mlp ---

struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn forward(&self, x: &Tensor, prompt_pass: bool) -> Result<Tensor> {
        let [gate, up]: [Tensor; 2] =
            project_all(&[&self.gate_proj, &self.up_proj], x, prompt_pass)?
                .try_into()
                .map_err(|_| {
                    candle_core::Error::Msg("gate/up projections: expected two outputs".into())
                })?;
        let gate = gate.silu()?;
        self.down_proj.forward(&(gate * up)?, prompt_pass)
    }
}

// ----------------------------------------------------------------- block ---

struct Block {
    input_layernorm: RmsNorm,
    attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    fn forward(&self, x: &Tensor, cache: &mut KvCache, ctx: &mut LayerCtx<'_>) -> Result<Tensor> {
        let residual = x;
        let h = self
            .attn
            .forward(&self.input_layernorm.forward(x)?, cache, ctx)?;
        let x = (h + residual)?;
        let h = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?, ctx.prompt_pass)?;
        h + x
    }
}

// ----------------------------------------------------------------- model ---

/// Where the weights come from; decides the rotary layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// An HF safetensors directory: rotate halves (`rope`).
    HfSafetensors,
    /// A GGUF file: rotate adjacent pairs (`rope_i`).
    Gguf,
}

/// The `llama_omnikv` model: weights, the host's per-layer KV cache, and the
/// KV-cache backend every attention call goes through.
pub struct LlamaOmniKv {
    embed_tokens: Embedding,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: QMatMul,
    cache: EitherCache,
    device: Device,
    /// dtype of the residual stream (f32 for GGUF, as the host's GGUF models).
    act_dtype: DType,
    /// dtype of q/k/v, the KV cache and the attention mask.
    attn_dtype: DType,
    max_seq_len: usize,
    backend: Arc<dyn KvCacheBackend>,
    cfg: LlamaConfig,
}

fn sdpa_params(cfg: &LlamaConfig) -> SdpaParams {
    SdpaParams {
        n_kv_groups: cfg.num_attention_heads / cfg.num_kv_heads(),
        softcap: None,
        softmax_scale: 1.0 / (cfg.head_dim() as f32).sqrt(),
        sliding_window: None,
        sinks: None,
    }
}

fn check_shape(cfg: &LlamaConfig) -> anyhow::Result<()> {
    if cfg.num_attention_heads == 0 || cfg.num_kv_heads() == 0 {
        anyhow::bail!("the model has no attention heads");
    }
    if cfg.num_attention_heads % cfg.num_kv_heads() != 0 {
        anyhow::bail!(
            "{} attention heads are not a multiple of {} KV heads",
            cfg.num_attention_heads,
            cfg.num_kv_heads()
        );
    }
    if cfg.head_dim() % 2 != 0 {
        anyhow::bail!(
            "head dim {} is odd; RoPE needs an even head dim",
            cfg.head_dim()
        );
    }
    Ok(())
}

impl LlamaOmniKv {
    /// Load an HF checkpoint: `config.json` text plus its safetensors files,
    /// weights in `dtype` on `device`, attention through `backend`.
    ///
    /// # Errors
    /// If the config is not supported (see [`LlamaConfig::from_hf_json`]),
    /// the head shapes do not fit, or a file or weight is missing or
    /// malformed.
    pub fn load_hf(
        config_json: &str,
        safetensors: &[PathBuf],
        dtype: DType,
        device: &Device,
        backend: Arc<dyn KvCacheBackend>,
    ) -> anyhow::Result<Self> {
        Self::load_hf_sharded(config_json, safetensors, dtype, device, backend, None)
    }

    /// [`Self::load_hf`] as one rank of several (`tp`; `None` is
    /// [`Self::load_hf`], bit for bit), the split of the host's Llama
    /// (Megatron-style): this rank holds query heads `[r h / n, (r + 1) h /
    /// n)` and the KV heads they read, the matching rows of `q/k/v_proj` and
    /// of `gate/up_proj` (`intermediate_size / n` of them), and the matching
    /// columns of `o_proj` and `down_proj`, whose products are summed across
    /// the ranks ([`TensorParallel::sum`]). Embedding, norms and `lm_head`
    /// are replicated. The projections stay this crate's batch-invariant
    /// products ([`row_invariant_matmul`]), not the host's parallel layers,
    /// so one rank computes what one device computes for its share.
    ///
    /// # Errors
    /// As [`Self::load_hf`], and if the query heads, the KV heads or the
    /// MLP width are not multiples of the world size.
    pub fn load_hf_sharded(
        config_json: &str,
        safetensors: &[PathBuf],
        dtype: DType,
        device: &Device,
        backend: Arc<dyn KvCacheBackend>,
        tp: Option<Arc<TensorParallel>>,
    ) -> anyhow::Result<Self> {
        let cfg = LlamaConfig::from_hf_json(config_json)?;
        check_shape(&cfg)?;
        let (rank, ranks) = tp.as_ref().map_or((0, 1), |t| (t.rank(), t.world_size()));
        for (what, n) in [
            ("attention heads", cfg.num_attention_heads),
            ("KV heads", cfg.num_kv_heads()),
            ("intermediate_size", cfg.intermediate_size),
        ] {
            if n % ranks != 0 {
                anyhow::bail!(
                    "tensor parallelism over {ranks} ranks needs {what} ({n}) to be a multiple of {ranks}; run with a world size that divides it"
                );
            }
        }
        // Sharded weights are read on the CPU and only this rank's part is
        // moved to the device.
        let load_device = if tp.is_some() { &Device::Cpu } else { device };
        // SAFETY: the files are memory-mapped read-only and not modified while
        // the model lives, as for every safetensors loader.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(safetensors, dtype, load_device)? };
        let (hd, kvh, nh) = (cfg.head_dim(), cfg.num_kv_heads(), cfg.num_attention_heads);
        let (kvh, nh) = (kvh / ranks, nh / ranks);
        /// Which dimension of a `(out, in)` weight a rank takes its share of.
        #[derive(Clone, Copy)]
        enum Split {
            Whole,
            /// Output rows (column-parallel); the product is this rank's part.
            Rows,
            /// Input columns (row-parallel); the products are summed.
            Columns,
        }
        let linear = |vb: &VarBuilder, out: usize, inp: usize, split: Split| -> Result<Linear> {
            let w = vb.get((out, inp), "weight")?;
            let (w, reduce) = match (split, &tp) {
                (Split::Rows, Some(_)) => (w.narrow(0, rank * out / ranks, out / ranks)?, None),
                (Split::Columns, Some(t)) => (
                    w.narrow(1, rank * inp / ranks, inp / ranks)?,
                    Some(t.clone()),
                ),
                _ => (w, None),
            };
            let w = if tp.is_some() {
                w.contiguous()?.to_device(device)?
            } else {
                w
            };
            Ok(Linear {
                weights: QMatMul::Tensor(w),
                prefill_f32: None,
                reduce,
            })
        };
        let to_device = |t: Tensor| -> Result<Tensor> { t.to_device(device) };
        let vb_m = vb.pp("model");
        let embed = to_device(
            vb_m.pp("embed_tokens")
                .get((cfg.vocab_size, cfg.hidden_size), "weight")?,
        )?;
        let lm_head = if cfg.tie_word_embeddings {
            QMatMul::Tensor(embed.clone())
        } else {
            linear(
                &vb.pp("lm_head"),
                cfg.vocab_size,
                cfg.hidden_size,
                Split::Whole,
            )?
            .weights
        };
        let rotary = Arc::new(Rotary::new(
            &llama3_inv_freq(cfg.rope_theta, hd, cfg.rope_scaling.as_ref()),
            cfg.max_position_embeddings,
            false,
            dtype,
            device,
        )?);
        super::attach_rotary(&*backend, &rotary);
        let norm = |vb: VarBuilder| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: to_device(vb.get(cfg.hidden_size, "weight")?)?,
                eps: cfg.rms_norm_eps as f32,
            })
        };
        let blocks = (0..cfg.num_hidden_layers)
            .map(|i| -> Result<Block> {
                let vb_l = vb_m.pp(format!("layers.{i}"));
                let vb_a = vb_l.pp("self_attn");
                let vb_f = vb_l.pp("mlp");
                Ok(Block {
                    input_layernorm: norm(vb_l.pp("input_layernorm"))?,
                    attn: Attention {
                        q_proj: linear(
                            &vb_a.pp("q_proj"),
                            ranks * nh * hd,
                            cfg.hidden_size,
                            Split::Rows,
                        )?,
                        k_proj: linear(
                            &vb_a.pp("k_proj"),
                            ranks * kvh * hd,
                            cfg.hidden_size,
                            Split::Rows,
                        )?,
                        v_proj: linear(
                            &vb_a.pp("v_proj"),
                            ranks * kvh * hd,
                            cfg.hidden_size,
                            Split::Rows,
                        )?,
                        o_proj: linear(
                            &vb_a.pp("o_proj"),
                            cfg.hidden_size,
                            ranks * nh * hd,
                            Split::Columns,
                        )?,
                        num_heads: nh,
                        num_kv_heads: kvh,
                        head_dim: hd,
                        rotary: rotary.clone(),
                        sdpa_params: sdpa_params(&cfg),
                        attn_dtype: dtype,
                    },
                    post_attention_layernorm: norm(vb_l.pp("post_attention_layernorm"))?,
                    mlp: Mlp {
                        gate_proj: linear(
                            &vb_f.pp("gate_proj"),
                            cfg.intermediate_size,
                            cfg.hidden_size,
                            Split::Rows,
                        )?,
                        up_proj: linear(
                            &vb_f.pp("up_proj"),
                            cfg.intermediate_size,
                            cfg.hidden_size,
                            Split::Rows,
                        )?,
                        down_proj: linear(
                            &vb_f.pp("down_proj"),
                            cfg.hidden_size,
                            cfg.intermediate_size,
                            Split::Columns,
                        )?,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embed_tokens: Embedding::new(embed, cfg.hidden_size),
            blocks,
            norm: norm(vb_m.pp("norm"))?,
            lm_head,
            cache: EitherCache::Normal(NormalCache::new(
                cfg.num_hidden_layers,
                cfg.max_position_embeddings,
            )),
            device: device.clone(),
            act_dtype: dtype,
            attn_dtype: dtype,
            max_seq_len: cfg.max_position_embeddings,
            backend,
            cfg,
        })
    }

    /// Load a single-file GGUF model of architecture `llama`: weights stay
    /// quantized, the residual stream is f32 and attention runs in `dtype`.
    /// With the fast prefill kernel, f32 copies of the projections are kept
    /// too.
    ///
    /// # Errors
    /// If there is not exactly one file, it is not a `llama` GGUF, metadata
    /// or a tensor is missing, the head shapes do not fit, or
    /// `rope_freqs.weight` has the wrong length (a `head_count` of 0
    /// included).
    pub fn load_gguf(
        files: &[PathBuf],
        dtype: DType,
        device: &Device,
        backend: Arc<dyn KvCacheBackend>,
    ) -> anyhow::Result<Self> {
        let [path] = files else {
            anyhow::bail!(
                "llama_omnikv loads one GGUF file, got {}; merge split GGUF files first",
                files.len()
            );
        };
        let mut file = std::fs::File::open(path)
            .with_context(|| format!("cannot open GGUF file `{}`", path.display()))?;
        let ct = gguf_file::Content::read(&mut file)
            .with_context(|| format!("`{}` is not a GGUF file", path.display()))?;
        let arch = ct
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if arch != "llama" {
            anyhow::bail!("llama_omnikv loads GGUF architecture `llama`, got `{arch}`");
        }
        let md = |key: &str| -> anyhow::Result<&gguf_file::Value> {
            ct.metadata
                .get(&format!("llama.{key}"))
                .with_context(|| format!("GGUF metadata `llama.{key}` is missing"))
        };
        let get_u32 = |key: &str| -> anyhow::Result<usize> { Ok(md(key)?.to_u32()? as usize) };
        let num_heads = get_u32("attention.head_count")?;
        let num_kv_heads = get_u32("attention.head_count_kv").unwrap_or(num_heads);
        let hidden = get_u32("embedding_length")?;
        if num_heads == 0 {
            anyhow::bail!("GGUF metadata `llama.attention.head_count` is 0: the file is not a usable Llama model");
        }
        let head_dim = get_u32("attention.key_length").unwrap_or(hidden / num_heads);
        let max_seq_len = get_u32("context_length").unwrap_or(4096);
        let rope_theta = md("rope.freq_base")
            .ok()
            .map(|v| v.to_f32())
            .transpose()?
            .unwrap_or(10_000.0);
        let cfg = LlamaConfig {
            hidden_size: hidden,
            intermediate_size: get_u32("feed_forward_length")?,
            vocab_size: 0, // filled from the embedding below
            num_hidden_layers: get_u32("block_count")?,
            num_attention_heads: num_heads,
            num_key_value_heads: Some(num_kv_heads),
            head_dim: Some(head_dim),
            rms_norm_eps: md("attention.layer_norm_rms_epsilon")?.to_f32()? as f64,
            rope_theta,
            max_position_embeddings: max_seq_len,
            rope_scaling: None,
            tie_word_embeddings: false,
        };
        check_shape(&cfg)?;
        let mut tensor = |name: &str| -> anyhow::Result<candle_core::quantized::QTensor> {
            ct.tensor(&mut file, name, device)
                .with_context(|| format!("GGUF tensor `{name}`"))
        };
        // Like the host's GGUF models: weights stay quantized, the residual
        // stream is f32, and only attention (q/k/v, cache) runs in `dtype`.
        let embed = tensor("token_embd.weight")?.dequantize(device)?;
        let vocab_size = embed.dim(0)?;
        let lm_head = match tensor("output.weight") {
            Ok(t) => QMatMul::from_qtensor(t)?,
            Err(_) => QMatMul::from_qtensor(tensor("token_embd.weight")?)?,
        };
        let mut inv_freq = llama3_inv_freq(rope_theta, head_dim, None);
        if let Ok(factors) = tensor("rope_freqs.weight") {
            let factors = factors
                .dequantize(device)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            if factors.len() != inv_freq.len() {
                anyhow::bail!(
                    "rope_freqs.weight has {} entries, expected head_dim / 2 = {}",
                    factors.len(),
                    inv_freq.len()
                );
            }
            for (inv, f) in inv_freq.iter_mut().zip(factors) {
                *inv /= f;
            }
        }
        let rotary = Arc::new(Rotary::new(&inv_freq, max_seq_len, true, dtype, device)?);
        super::attach_rotary(&*backend, &rotary);
        let mut norm = |name: &str| -> anyhow::Result<RmsNorm> {
            Ok(RmsNorm {
                weight: tensor(name)?.dequantize(device)?,
                eps: cfg.rms_norm_eps as f32,
            })
        };
        let final_norm = norm("output_norm.weight")?;
        let fast_prefill = super::prefill_kernel(&*backend) == crate::prefill::PrefillKernel::Fast;
        let mut prefill_bytes = 0usize;
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("blk.{i}");
            let mut q = |n: &str| -> anyhow::Result<Linear> {
                let t = ct
                    .tensor(&mut file, &format!("{p}.{n}.weight"), device)
                    .with_context(|| format!("GGUF tensor `{p}.{n}.weight`"))?;
                let prefill_f32 = if fast_prefill {
                    let w = t.dequantize(device)?.to_dtype(DType::F32)?;
                    prefill_bytes += w.elem_count() * 4;
                    Some(w)
                } else {
                    None
                };
                Ok(Linear {
                    weights: QMatMul::from_qtensor(t)?,
                    prefill_f32,
                    reduce: None,
                })
            };
            let attn = Attention {
                q_proj: q("attn_q")?,
                k_proj: q("attn_k")?,
                v_proj: q("attn_v")?,
                o_proj: q("attn_output")?,
                num_heads,
                num_kv_heads,
                head_dim,
                rotary: rotary.clone(),
                sdpa_params: sdpa_params(&cfg),
                attn_dtype: dtype,
            };
            let mlp = Mlp {
                gate_proj: q("ffn_gate")?,
                up_proj: q("ffn_up")?,
                down_proj: q("ffn_down")?,
            };
            let dq =
                |t: candle_core::quantized::QTensor| -> Result<Tensor> { t.dequantize(device) };
            let eps = cfg.rms_norm_eps as f32;
            let attn_norm = dq(ct.tensor(&mut file, &format!("{p}.attn_norm.weight"), device)?)?;
            let ffn_norm = dq(ct.tensor(&mut file, &format!("{p}.ffn_norm.weight"), device)?)?;
            blocks.push(Block {
                input_layernorm: RmsNorm {
                    weight: attn_norm,
                    eps,
                },
                attn,
                post_attention_layernorm: RmsNorm {
                    weight: ffn_norm,
                    eps,
                },
                mlp,
            });
        }
        if fast_prefill {
            tracing::info!(
                "llama_omnikv: fast prefill keeps f32 copies of the projections ({:.0} MiB)",
                prefill_bytes as f64 / (1 << 20) as f64
            );
        }
        let cfg = LlamaConfig { vocab_size, ..cfg };
        Ok(Self {
            embed_tokens: Embedding::new(embed, cfg.hidden_size),
            blocks,
            norm: final_norm,
            lm_head,
            cache: EitherCache::Normal(NormalCache::new(cfg.num_hidden_layers, max_seq_len)),
            device: device.clone(),
            act_dtype: DType::F32,
            attn_dtype: dtype,
            max_seq_len,
            backend,
            cfg,
        })
    }

    /// Attend through `backend` from the next pass on, keeping the cache
    /// and the prefill kernel chosen at load (the f32 weight copies of the
    /// fast prefill stay as they are). For tools that drive one model and
    /// cache through several backends in turn, such as the teacher-forced
    /// divergence tool; a server selects its backend once, at load.
    ///
    /// # Errors
    /// If `backend` is an `omnikv` backend whose layer plan does not fit
    /// this model.
    pub fn set_backend(&mut self, backend: Arc<dyn KvCacheBackend>) -> anyhow::Result<()> {
        super::check_backend(&backend, self.blocks.len())?;
        if let Some(block) = self.blocks.first() {
            super::attach_rotary(&*backend, &block.attn.rotary);
        }
        self.backend = backend;
        Ok(())
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// `L`, the number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    /// Clear the KV cache (for direct use outside the host pipeline).
    ///
    /// # Panics
    /// If the cache's lock was poisoned by a panic during a forward pass.
    pub fn reset_cache(&self) {
        for c in self.cache.normal().0.iter_mut() {
            c.reset();
        }
    }

    /// Forget every cached position from `len` on, keeping the first `len`
    /// (tools that decode several continuations of one prefill: the next
    /// continuation overwrites the rows of the previous one).
    ///
    /// # Errors
    /// If `len` exceeds the cache's capacity.
    ///
    /// # Panics
    /// If the cache's lock was poisoned by a panic during a forward pass.
    pub fn truncate_cache(&self, len: usize) -> Result<()> {
        for c in self.cache.normal().0.iter_mut() {
            if c.current_seq_len() > len {
                c.set_len(len)?;
            }
        }
        Ok(())
    }

    /// `input_ids` `(b, s)`; returns logits of the positions selected by
    /// `context_lens` (`(start, len)` per sequence), `(b, len, vocab)`.
    ///
    /// The host sometimes re-runs a sequence's prompt *and the tokens it has
    /// already generated* as one prompt pass (when it recomputes a preempted
    /// sequence). Generated positions were produced by decode steps, whose
    /// attention a backend such as OmniKV makes sparse; a dense recompute
    /// would change them. Such a pass is replayed as a prompt pass over the
    /// prompt followed by one decode step per generated token, which gives
    /// exactly the cache and logits the sequence had.
    ///
    /// # Errors
    /// If the backend refuses the pass, positions exceed the model's context,
    /// or a tensor operation fails.
    ///
    /// # Panics
    /// If the cache's lock was poisoned by a panic during an earlier pass
    /// (the host's `EitherCache::normal` unwraps it).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        offsets: &[usize],
        context_lens: Vec<(usize, usize)>,
    ) -> Result<Tensor> {
        if rayon::current_thread_index().is_some() {
            return self.forward_here(input_ids, offsets, context_lens);
        }
        // The pass runs on a worker of rayon's global pool, the pool every
        // product and attention kernel of the pass splits its work over: the
        // caller (the host's engine thread) sleeps until it is done, instead
        // of handing each of the ~250 parallel loops of a decode step to the
        // pool and competing for the cores with the workers that spin between
        // them (`results/peers-profile.md`). Same arithmetic, same results.
        //
        // The host's per-pass context (prompt lengths, request options,
        // sequence ids) is set on the worker exactly as the caller had it,
        // absent values included: a worker waiting inside another pass can
        // pick this pass up, and must not lend it that pass's context.
        let context = ForwardContext::current();
        rayon::scope(|_| {
            let _context = context.enter();
            self.forward_here(input_ids, offsets, context_lens)
        })
    }

    fn forward_here(
        &self,
        input_ids: &Tensor,
        offsets: &[usize],
        context_lens: Vec<(usize, usize)>,
    ) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        if offsets.len() != b {
            candle_core::bail!(
                "llama_omnikv: a batch of {b} sequences came with {} position offsets",
                offsets.len()
            );
        }
        let prompt_lens = mistralrs_core::kv_backend::current_prompt_lens();
        if let (1, Some([p])) = (b, prompt_lens.as_deref()) {
            let (off, p) = (offsets[0], *p);
            if off < p && p < off + s && context_lens == [(s - 1, 1)] {
                let split = p - off;
                self.forward_pass(
                    &input_ids.narrow(1, 0, split)?,
                    offsets,
                    vec![(split - 1, 1)],
                )?;
                let mut last = None;
                for t in split..s {
                    last = Some(self.forward_pass(
                        &input_ids.narrow(1, t, 1)?,
                        &[off + t],
                        vec![(0, 1)],
                    )?);
                }
                // `split < s`, so the loop ran at least once.
                return last.ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "llama_omnikv: a pass of {s} tokens split at {split} produced no logits"
                    ))
                });
            }
        }
        self.forward_pass(input_ids, offsets, context_lens)
    }

    fn forward_pass(
        &self,
        input_ids: &Tensor,
        offsets: &[usize],
        context_lens: Vec<(usize, usize)>,
    ) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        let mut x = self
            .embed_tokens
            .forward(input_ids)?
            .to_dtype(self.act_dtype)?;
        let mut cache = self.cache.normal();
        let mask = if s > 1 {
            let past = cache.0.first().map(KvCache::current_seq_len).unwrap_or(0);
            Some(causal_mask(s, past, &self.device)?.to_dtype(self.attn_dtype)?)
        } else {
            None
        };
        let info = ForwardInfo {
            batch_size: b,
            seq_len: s,
            seqlen_offsets: offsets,
            num_layers: self.blocks.len(),
            prompt_lens: mistralrs_core::kv_backend::current_prompt_lens(),
        };
        let prompt_pass = info.is_prefill();
        let mut state = self.backend.begin_forward(&info)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let mut ctx = LayerCtx {
                layer_idx: i,
                offsets,
                mask: mask.as_ref(),
                prompt_pass,
                backend: &*self.backend,
                state: &mut state,
            };
            x = block.forward(&x, &mut cache.0[i], &mut ctx)?;
        }
        drop(cache);
        let x = self.norm.forward(&x)?;
        let mut picked = Vec::with_capacity(b);
        for (i, (start, len)) in context_lens.into_iter().enumerate() {
            picked.push(x.narrow(0, i, 1)?.narrow(1, start, len)?);
        }
        let x = Tensor::cat(&picked, 0)?.contiguous()?;
        project(&self.lm_head, &x)?.to_dtype(DType::F32)
    }
}

impl mistralrs_core::kv_backend::CustomTextModel for LlamaOmniKv {
    fn forward(
        &self,
        input_ids: &Tensor,
        seqlen_offsets: &[usize],
        context_lens: Vec<(usize, usize)>,
    ) -> Result<Tensor> {
        LlamaOmniKv::forward(self, input_ids, seqlen_offsets, context_lens)
    }

    fn cache(&self) -> &EitherCache {
        &self.cache
    }

    fn cache_mut(&mut self) -> &mut EitherCache {
        &mut self.cache
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn max_seq_len(&self) -> usize {
        self.max_seq_len
    }

    /// This rank's query and KV heads when the model is split across ranks
    /// ([`LlamaOmniKv::load_hf_sharded`]); `None` on one device.
    fn heads_per_rank(&self) -> Option<(usize, usize)> {
        let attn = &self.blocks.first()?.attn;
        (attn.num_heads != self.cfg.num_attention_heads)
            .then_some((attn.num_heads, attn.num_kv_heads))
    }
}
