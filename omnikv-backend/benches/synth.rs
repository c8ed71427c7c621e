//! The `synth` bench of the backend: decode-step time of a Llama-3.2-1B-shaped decoder with
//! random weights at long contexts, stock KV-cache backend against OmniKV
//! (in cache and with `real_offload`), A/B in one run.
//!
//! The decoder has the real shapes (16 layers, hidden 2048, 32 query and 8
//! KV heads of 64, MLP 8192, vocabulary 128256, Q4_0 weights: speed does not
//! depend on weight values); every layer's attention goes through the real
//! backends (`DefaultKvCacheBackend`, `OmniKvBackend`) and the host's
//! `KvCache`. Norms and RoPE are left out (well under 1% of a step's bytes).
//! The caches are filled directly with random f16 rows (the same rows for
//! every variant) instead of by a prefill.
//!
//! For each length it reports the median step time of each variant
//! (measured alternately), the speed-up, the bound on that speed-up from the
//! bytes each variant must read per step (weights + KV rows), the selection
//! overhead (scoring + top-k at the filter layers, timed with the same
//! kernels) as a share of an OmniKV step, and device-tier KV bytes.
//!
//! ```text
//! cargo bench --workspace --profile dev --bench synth -- --lengths 8192,32768,131072 --steps 5
//! ```
//!
//! `--device cuda` runs the same on the first GPU (with `--features
//! omnikv-backend/cuda-kernels`, or `cuda` for the host's own CUDA kernels in the stock
//! variant): weights, caches and queries live there, OmniKV runs the CUDA
//! kernels (`omnikv_kernels::ops`), offload stages through the pinned copy
//! stream, and every step ends with a device synchronisation before its
//! time is taken.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use mistralrs_core::kv_backend::{
    AttentionInput, DefaultKvCacheBackend, ForwardInfo, ForwardScope, KvCache, KvCacheBackend,
    SdpaParams, SequenceIdsScope,
};
use omnikv_backend::{OmniKvBackend, OmniKvConfig};
use omnikv_eval::eval::{machine_description_on, median};

/// The workspace root (results are written relative to it).
fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_default()
}

const USAGE: &str = "usage: cargo bench --workspace --profile dev --bench synth -- [options]
  --lengths LIST     context lengths in tokens (default 8192,32768,131072)
  --steps N          decode steps per variant and length (default 5)
  --filter-layers L  OmniKV filter layers (default 2,8)
  --budget B         OmniKV budget, fraction or count (default 0.1)
  --device D         cpu (default) or cuda
  --out FILE         Markdown report (default results/synthetic.md; plot next to it)";

const LAYERS: usize = 16;
const HIDDEN: usize = 2048;
const HEADS: usize = 32;
const KV_HEADS: usize = 8;
const HEAD_DIM: usize = 64;
const MLP: usize = 8192;
const VOCAB: usize = 128_256;

struct Layer {
    q: QMatMul,
    k: QMatMul,
    v: QMatMul,
    o: QMatMul,
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
}

fn q4(out: usize, inp: usize, seed: u64, dev: &Device) -> Result<(QMatMul, u64)> {
    // Cheap deterministic pseudo-random values (speed does not depend on
    // them); randn for a billion weights would dominate the run.
    let n = out * inp;
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let vals: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.05
        })
        .collect();
    let t = Tensor::from_vec(vals, (out, inp), &Device::Cpu)?;
    let qt = QTensor::quantize_onto(&t, GgmlDType::Q4_0, dev)?;
    let bytes = qt.storage_size_in_bytes() as u64;
    Ok((QMatMul::from_qtensor(qt)?, bytes))
}

struct Model {
    layers: Vec<Layer>,
    lm_head: QMatMul,
    weight_bytes: u64,
    sdpa: SdpaParams,
}

impl Model {
    fn new(bar: &ProgressBar, dev: &Device) -> Result<Self> {
        let mut weight_bytes = 0;
        let mut mk = |o, i, seed| -> Result<QMatMul> {
            let (m, b) = q4(o, i, seed, dev)?;
            weight_bytes += b;
            Ok(m)
        };
        let mut layers = Vec::new();
        for l in 0..LAYERS as u64 {
            bar.set_message(format!("random Q4_0 weights, layer {l}"));
            layers.push(Layer {
                q: mk(HEADS * HEAD_DIM, HIDDEN, l * 10 + 1)?,
                k: mk(KV_HEADS * HEAD_DIM, HIDDEN, l * 10 + 2)?,
                v: mk(KV_HEADS * HEAD_DIM, HIDDEN, l * 10 + 3)?,
                o: mk(HIDDEN, HEADS * HEAD_DIM, l * 10 + 4)?,
                gate: mk(MLP, HIDDEN, l * 10 + 5)?,
                up: mk(MLP, HIDDEN, l * 10 + 6)?,
                down: mk(HIDDEN, MLP, l * 10 + 7)?,
            });
        }
        bar.set_message("random Q4_0 weights, lm_head");
        let lm_head = mk(VOCAB, HIDDEN, 999)?;
        Ok(Self {
            layers,
            lm_head,
            weight_bytes,
            sdpa: SdpaParams {
                n_kv_groups: HEADS / KV_HEADS,
                softcap: None,
                softmax_scale: 1.0 / (HEAD_DIM as f32).sqrt(),
                sliding_window: None,
                sinks: None,
            },
        })
    }

    /// One decode step at position `pos` of a sequence with `prompt` prompt
    /// tokens; returns the logits.
    fn step(
        &self,
        backend: &dyn KvCacheBackend,
        caches: &mut [KvCache],
        x: &Tensor,
        pos: usize,
        prompt: usize,
    ) -> Result<Tensor> {
        let offsets = [pos];
        let mut state = backend.begin_forward(&ForwardInfo {
            batch_size: 1,
            seq_len: 1,
            seqlen_offsets: &offsets,
            num_layers: LAYERS,
            prompt_lens: Some(vec![prompt]),
        })?;
        let mut x = x.clone();
        for (i, (layer, cache)) in self.layers.iter().zip(caches.iter_mut()).enumerate() {
            let heads = |t: Tensor, n: usize| -> Result<Tensor> {
                Ok(t.reshape((1, 1, n, HEAD_DIM))?
                    .transpose(1, 2)?
                    .contiguous()?
                    .to_dtype(DType::F16)?)
            };
            let q = heads(layer.q.forward(&x)?, HEADS)?;
            let k = heads(layer.k.forward(&x)?, KV_HEADS)?;
            let v = heads(layer.v.forward(&x)?, KV_HEADS)?;
            let a = backend.attention(
                &AttentionInput {
                    layer_idx: i,
                    q: &q,
                    k: &k,
                    v: &v,
                    mask: None,
                    sdpa_params: &self.sdpa,
                    flash_params: None,
                    seqlen_offsets: &offsets,
                },
                cache,
                &mut state,
            )?;
            let a = a
                .to_dtype(DType::F32)?
                .transpose(1, 2)?
                .reshape((1, 1, HEADS * HEAD_DIM))?;
            x = (x + layer.o.forward(&a)?)?;
            let g = candle_nn::ops::silu(&layer.gate.forward(&x)?)?;
            let h = (g * layer.up.forward(&x)?)?;
            x = (&x + layer.down.forward(&h)?)?;
        }
        Ok(self.lm_head.forward(&x)?)
    }
}

fn gib(b: f64) -> String {
    format!("{:.2} GiB", b / (1u64 << 30) as f64)
}

struct Row {
    n: usize,
    stock: f64,
    dense: f64,
    omnikv: f64,
    offload: f64,
    bound: f64,
    selection: f64,
    stock_device: u64,
    offload_device: u64,
    offload_host: u64,
}

fn main() -> Result<()> {
    let mut lengths = vec![8192usize, 32768, 131_072];
    let mut steps = 5usize;
    let mut filter_layers = "2,8".to_string();
    let mut budget = serde_json::json!(0.1);
    let mut out = root().join("results/synthetic.md");
    let mut device = "cpu".to_string();
    // `cargo bench` passes `--bench` to a harness-less bench: not ours.
    let mut it = std::env::args().skip(1).filter(|a| a != "--bench");
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .with_context(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            "--lengths" => {
                lengths = value()?
                    .split(',')
                    .map(|s| s.trim().parse())
                    .collect::<std::result::Result<_, _>>()
                    .context("--lengths")?
            }
            "--steps" => steps = value()?.parse().context("--steps")?,
            "--filter-layers" => filter_layers = value()?,
            "--budget" => budget = serde_json::from_str(&value()?).context("--budget")?,
            "--out" => out = value()?.into(),
            "--device" => device = value()?,
            other => bail!("unknown option {other}\n{USAGE}"),
        }
    }
    let dev = match device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0).context(
            "--device cuda: no CUDA device (run with --features omnikv-backend/cuda-kernels on a machine with a GPU)",
        )?,
        other => bail!("--device must be cpu or cuda, got {other}"),
    };
    // The GPU's name, for the report: `GPU_NAME` (the bundle's run.sh sets
    // it from nvidia-smi), else the device ordinal.
    let gpu_name = dev
        .is_cuda()
        .then(|| std::env::var("GPU_NAME").unwrap_or_else(|_| "CUDA device 0".into()));
    if steps == 0 || lengths.is_empty() {
        bail!("--steps and --lengths must be non-empty");
    }
    let config = |offload: bool| -> Result<OmniKvConfig> {
        Ok(OmniKvConfig::from_value(&serde_json::json!({
            "do_select_layers": filter_layers,
            "num_wait_load_layers": 1,
            "num_of_selected_tokens": budget,
            "selector_cls": "last",
            "real_offload": offload,
            "cpu_num_threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
        }))?)
    };
    let plan = omnikv_backend::omnikv::plan::LayerPlan::new(&config(false)?, LAYERS)
        .map_err(anyhow::Error::msg)?;
    let sparse_layers: Vec<usize> = (0..LAYERS)
        .filter(|&l| {
            matches!(
                plan.roles[l],
                omnikv_backend::omnikv::plan::LayerRole::Sparse { .. }
            )
        })
        .collect();
    let filters = config(false)?.filter_layers.len();

    let bar = ProgressBar::new((lengths.len() * steps * 4) as u64).with_style(
        ProgressStyle::with_template("[{bar:30}] {pos}/{len} {elapsed_precise} {msg}").unwrap(),
    );
    let model = Model::new(&bar, &dev)?;
    let x = Tensor::randn(0f32, 1.0, (1, 1, HIDDEN), &dev)?;
    let row_bytes = (KV_HEADS * HEAD_DIM * 2 * 2) as u64; // keys + values, f16
    let mut rows = Vec::new();
    for &n in &lengths {
        bar.set_message(format!("{n} tokens: filling caches"));
        let keys =
            Tensor::randn(0f32, 1.0, (1, KV_HEADS, n, HEAD_DIM), &dev)?.to_dtype(DType::F16)?;
        let values =
            Tensor::randn(0f32, 1.0, (1, KV_HEADS, n, HEAD_DIM), &dev)?.to_dtype(DType::F16)?;
        let cap = n + 4 * steps + 8;
        let fill = |layers: &[usize]| -> Result<Vec<KvCache>> {
            (0..LAYERS)
                .map(|l| {
                    let mut c = KvCache::new_normal(2, cap, cap);
                    if layers.contains(&l) {
                        c.append(&keys, &values)?;
                    }
                    Ok(c)
                })
                .collect()
        };
        // Stock and OmniKV (in cache) share one cache; offload has its own
        // dense layers and keeps the sparse layers' rows in its store.
        let all: Vec<usize> = (0..LAYERS).collect();
        let dense: Vec<usize> = all
            .iter()
            .copied()
            .filter(|l| !sparse_layers.contains(l))
            .collect();
        let mut shared = fill(&all)?;
        let mut own = fill(&dense)?;
        let stock = DefaultKvCacheBackend;
        let omnikv = OmniKvBackend::new(config(false)?);
        // The same backend at a 100% budget: dense attention with this
        // project's kernels (isolates selection from kernel speed).
        let mut dense_cfg = config(false)?;
        dense_cfg.budget = omnikv_backend::budget::TokenBudget::Ratio(1.0);
        let dense_backend = OmniKvBackend::new(dense_cfg);
        let offload = OmniKvBackend::new(config(true)?);
        let (k3, v3) = (keys.squeeze(0)?, values.squeeze(0)?);
        for &l in &sparse_layers {
            offload.store().append(1, l, n, 0, &k3, &v3)?;
        }
        drop((k3, v3));
        let _scope = ForwardScope::enter(vec![n]);
        let _ids = SequenceIdsScope::enter(vec![1]);
        let (mut pos_shared, mut pos_own) = (n, n);
        let mut times = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
        for s in 0..steps {
            for v in 0..4 {
                bar.set_message(format!("{n} tokens: step {} of {steps}", s + 1));
                let t = Instant::now();
                match v {
                    0 => {
                        model.step(&stock, &mut shared, &x, pos_shared, n)?;
                        pos_shared += 1;
                    }
                    1 => {
                        model.step(&omnikv, &mut shared, &x, pos_shared, n)?;
                        pos_shared += 1;
                    }
                    2 => {
                        model.step(&dense_backend, &mut shared, &x, pos_shared, n)?;
                        pos_shared += 1;
                    }
                    _ => {
                        model.step(&offload, &mut own, &x, pos_own, n)?;
                        pos_own += 1;
                    }
                }
                dev.synchronize()?;
                times[v].push(t.elapsed().as_secs_f64());
                bar.inc(1);
            }
        }
        // Selection overhead: the filter layers' scoring + top-k, same kernels.
        let q = Tensor::randn(0f32, 1.0, (HEADS, HEAD_DIM), &dev)?;
        let keys3 = keys.squeeze(0)?;
        let budget_rows = config(false)?.budget.tokens_for(n);
        let mut sel_times = Vec::new();
        for _ in 0..steps {
            let t = Instant::now();
            let scores = omnikv_kernels::ops::score_max(&q, &keys3, (HEAD_DIM as f64).powf(-0.5))?;
            let _ = omnikv_kernels::ops::top_k(&scores, budget_rows)?.to_vec1::<u32>()?;
            dev.synchronize()?;
            sel_times.push(t.elapsed().as_secs_f64() * filters as f64);
        }
        let usage = offload.store_usage();
        let (stock_t, omni_t, dense_t, off_t) = (
            median(&mut times[0]),
            median(&mut times[1]),
            median(&mut times[2]),
            median(&mut times[3]),
        );
        // Bytes a step must read: weights, then KV rows (dense layers all
        // rows, sparse layers the budget, filter layers' keys once more for
        // scoring).
        let w = model.weight_bytes as f64;
        let stock_bytes = w + (LAYERS * n) as f64 * row_bytes as f64;
        let omni_bytes = w
            + ((LAYERS - sparse_layers.len()) * n) as f64 * row_bytes as f64
            + (sparse_layers.len() * budget_rows) as f64 * row_bytes as f64
            + (filters * n) as f64 * row_bytes as f64 / 2.0;
        rows.push(Row {
            n,
            stock: stock_t,
            dense: dense_t,
            omnikv: omni_t,
            offload: off_t,
            bound: stock_bytes / omni_bytes,
            selection: median(&mut sel_times) / omni_t,
            stock_device: (LAYERS * n) as u64 * row_bytes,
            offload_device: usage.total.device,
            offload_host: usage.total.host,
        });
    }
    bar.finish_with_message("done");

    let command = format!(
        "cargo bench --workspace --profile dev --bench synth -- {}",
        std::env::args()
            .skip(1)
            .filter(|a| a != "--bench")
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut md = format!(
        "# Synthetic Llama-3.2-1B shape: decode step, stock cache vs OmniKV\n\n\
         Machine: {}. Device: {device}. Decoder of Llama-3.2-1B shape (16 layers, hidden 2048, 32/8 heads of 64, MLP 8192, \
         vocabulary 128256) with random Q4_0 weights ({} read per step), f16 KV cache filled directly; \
         attention through the real backends. OmniKV: filter layers {filter_layers}, one wait-load layer, \
         budget {budget}, selector `last` ({} of 16 layers sparse). Medians of {steps} steps per variant, \
         variants alternating. Debug build of the workspace crates, dependencies optimised.\n\n\
         Command: `{command}`\n\n\
         | context | stock step | dense step (our kernels) | OmniKV step | vs stock | vs dense | OmniKV + offload step | vs stock | bound (bytes) | share of bound | selection share | device-tier KV stock | device-tier KV offload | host tier |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        machine_description_on(gpu_name.as_deref()),
        gib(model.weight_bytes as f64),
        sparse_layers.len(),
    );
    for r in &rows {
        md.push_str(&format!(
            "| {} | {:.3} s | {:.3} s | {:.3} s | {:.2}x | {:.2}x | {:.3} s | {:.2}x | {:.2}x | {:.0}% | {:.1}% | {} | {} ({:.0}%) | {} |\n",
            r.n,
            r.stock,
            r.dense,
            r.omnikv,
            r.stock / r.omnikv,
            r.dense / r.omnikv,
            r.offload,
            r.stock / r.offload,
            r.bound,
            100.0 * (r.dense / r.omnikv) / r.bound,
            100.0 * r.selection,
            gib(r.stock_device as f64),
            gib(r.offload_device as f64),
            100.0 * r.offload_device as f64 / r.stock_device as f64,
            gib(r.offload_host as f64),
        ));
    }
    md.push_str(
        "\nThe bound is the ratio of bytes each variant must read per step (weights plus KV rows; \
         FLOPs per byte are the same for both, so a batch-1 step is memory bound). \
         \"Share of bound\" is OmniKV's speed-up over dense decoding with the same kernels \
         (the same backend at a 100% budget) divided by that bound. The stock backend's CPU attention \
         is the host's own kernel, slower than this project's streaming kernel, so \"vs stock\" \
         also contains the kernel gain.\n",
    );
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, &md)?;
    let svg = plot(&rows);
    std::fs::write(out.with_extension("svg"), svg)?;
    println!("{md}");
    println!(
        "wrote {} and {}",
        out.display(),
        out.with_extension("svg").display()
    );
    Ok(())
}

/// Step time against context length, one line per variant (log-x).
fn plot(rows: &[Row]) -> String {
    let (w, h, m) = (640.0, 360.0, 60.0);
    let max_t = rows
        .iter()
        .map(|r| r.stock.max(r.dense).max(r.omnikv).max(r.offload))
        .fold(0.0, f64::max)
        * 1.1;
    let (lo, hi) = (
        (rows.first().map_or(1, |r| r.n) as f64).log2(),
        (rows.last().map_or(2, |r| r.n) as f64).log2().max(1.0),
    );
    let xs = |n: usize| {
        let span = (hi - lo).max(1e-9);
        m + ((n as f64).log2() - lo) / span * (w - 2.0 * m)
    };
    let ys = |t: f64| h - m - t / max_t * (h - 2.0 * m);
    let mut s = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>\
         <rect width='100%' height='100%' fill='white'/>\
         <text x='{}' y='20' text-anchor='middle'>Decode step time, Llama-3.2-1B shape (random weights)</text>\
         <line x1='{m}' y1='{}' x2='{}' y2='{}' stroke='black'/><line x1='{m}' y1='{m}' x2='{m}' y2='{}' stroke='black'/>\
         <text x='{}' y='{}' text-anchor='middle'>context tokens</text>\
         <text x='15' y='{}' transform='rotate(-90 15 {})' text-anchor='middle'>seconds per step</text>",
        w / 2.0,
        h - m,
        w - m,
        h - m,
        h - m,
        w / 2.0,
        h - 15.0,
        h / 2.0,
        h / 2.0
    );
    for r in rows {
        s.push_str(&format!(
            "<text x='{}' y='{}' text-anchor='middle'>{}</text>",
            xs(r.n),
            h - m + 16.0,
            r.n
        ));
    }
    for (name, colour, get) in [
        ("stock", "#c0392b", (|r: &Row| r.stock) as fn(&Row) -> f64),
        ("dense (our kernels)", "#7f8c8d", |r: &Row| r.dense),
        ("OmniKV", "#2471a3", |r: &Row| r.omnikv),
        ("OmniKV + offload", "#27ae60", |r: &Row| r.offload),
    ] {
        let pts: Vec<String> = rows
            .iter()
            .map(|r| format!("{:.1},{:.1}", xs(r.n), ys(get(r))))
            .collect();
        s.push_str(&format!(
            "<polyline fill='none' stroke='{colour}' stroke-width='2' points='{}'/>",
            pts.join(" ")
        ));
        if let Some(last) = rows.last() {
            s.push_str(&format!(
                "<text x='{}' y='{}' fill='{colour}' text-anchor='end'>{name}</text>",
                xs(last.n) - 4.0,
                ys(get(last)) - 6.0
            ));
        }
    }
    s.push_str("</svg>\n");
    s
}
