//! `omnikv-calibrate`: find filter layers for a model, through the real
//! server.
//!
//! 1. A recording server (`record_recall`: dense decoding) answers the
//!    calibration prompts and accumulates the inter-layer recall `S(a, b)` at
//!    the target budget (spec: "Finding filter layers").
//! 2. A dynamic program over `S` proposes one filter-layer set per first
//!    filter layer (`--first`), plus any `--candidates` given.
//! 3. Candidates are ranked by their mean teacher-forced KL from full
//!    attention on held-out documents at the target budget
//!    (`omnikv_eval::teacher_forced`, in process on the GGUF; one prefill
//!    per document serves every candidate). The best `--greedy-top` also
//!    serve held-out prompts through the real server, and their greedy
//!    agreement with full attention (identical outputs, shared prefix,
//!    task accuracy) is a secondary column. With `--plain-model` (no GGUF)
//!    every candidate is ranked by greedy agreement alone.
//! 4. Writes the best config (`--out`), the recall matrix as JSON and as an
//!    SVG heatmap, and a Markdown table with the evidence next to it.
//!
//! ```text
//! target/debug/omnikv-calibrate --filters 1,2,3,4 --wait-load 0,1,2 --budget 0.1 --candidates 2,8,18
//! ```

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::DType;
use indicatif::{ProgressBar, ProgressStyle};
use omnikv_backend::omnikv::recall::{plan_score, propose, RecallStats};
use omnikv_eval::bench_format::gguf_tokenizer;
use omnikv_eval::eval::{
    budget_value, load_haystack, machine_description, needle_cases, score, Case, Variant,
};
use omnikv_eval::teacher_forced::{
    document, document_sources, mean_ci, DocSummary, TeacherForced, TfVariant,
};
use omnikv_eval::{model_args, model_dir, root, Server, MODEL_FILE};
use serde_json::{json, Value};

const USAGE: &str = "usage: omnikv-calibrate [options]
  --filters LIST          numbers of filter layers the DP proposes sets for (default 3)
  --wait-load LIST        wait-load layers after each filter layer (default 1)
  --budget B              target budget, fraction or count (default 0.1)
  --first LIST            first filter layers the DP starts from (default 1,2,3,4)
  --candidates SETS       extra candidate sets, e.g. \"2,8,18;3,6,19\"
  --base FILE             config the result is based on (default configs/example.json)
  --out FILE              config to write (default configs/smollm2-135m.json)
  --calib-lengths LIST    needle prompts for recording, tokens (default 2000,3000)
  --heldout-lengths LIST  held-out needle prompts, tokens (default 2000,4000)
  --prompts FILE          JSON list of calibration prompts instead of needle prompts
  --heldout FILE          JSON list of held-out prompts instead of needle prompts
  --max-tokens N          tokens generated per prompt (default 24)
  --heldout-docs N        held-out documents per kind (essays, code) for the
                          teacher-forced ranking (default 2)
  --tf-length P           their prompt length in tokens (default 4096)
  --tf-steps M            teacher-forced decode steps per document (default 64)
  --doc-kinds LIST        document kinds (default essays,code)
  --doc-seed N            their order seed (default 1009; omnikv-divergence uses 7)
  --greedy-top N          candidates, best by KL first, that also serve the
                          held-out prompts for greedy agreement (default 3)
  --plain-model DIR       serve a safetensors model directory instead of SmolLM2";

struct Args {
    filters: Vec<usize>,
    wait_load: Vec<usize>,
    budget: f64,
    first: Vec<usize>,
    candidates: Vec<Vec<usize>>,
    base: PathBuf,
    out: PathBuf,
    calib_lengths: Vec<usize>,
    heldout_lengths: Vec<usize>,
    prompts: Option<PathBuf>,
    heldout: Option<PathBuf>,
    max_tokens: usize,
    plain_model: Option<PathBuf>,
    heldout_docs: usize,
    tf_length: usize,
    tf_steps: usize,
    doc_seed: u64,
    doc_kinds: Vec<String>,
    greedy_top: usize,
}

fn list(s: &str) -> Result<Vec<usize>> {
    s.split(',')
        .filter(|x| !x.trim().is_empty())
        .map(|x| {
            x.trim()
                .parse()
                .with_context(|| format!("`{x}` is not a number"))
        })
        .collect()
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        filters: vec![3],
        wait_load: vec![1],
        budget: 0.1,
        first: vec![1, 2, 3, 4],
        candidates: vec![],
        base: root().join("configs/example.json"),
        out: root().join("configs/smollm2-135m.json"),
        calib_lengths: vec![2000, 3000],
        heldout_lengths: vec![2000, 4000],
        prompts: None,
        heldout: None,
        max_tokens: 24,
        plain_model: None,
        heldout_docs: 2,
        tf_length: 4096,
        tf_steps: 64,
        doc_seed: 1009,
        doc_kinds: vec!["essays".into(), "code".into()],
        greedy_top: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let v = it
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--filters" => a.filters = list(&v)?,
            "--wait-load" => a.wait_load = list(&v)?,
            "--budget" => a.budget = v.parse()?,
            "--first" => a.first = list(&v)?,
            "--candidates" => {
                a.candidates = v
                    .split(';')
                    .filter(|s| !s.is_empty())
                    .map(list)
                    .collect::<Result<_>>()?
            }
            "--base" => a.base = v.into(),
            "--out" => a.out = v.into(),
            "--calib-lengths" => a.calib_lengths = list(&v)?,
            "--heldout-lengths" => a.heldout_lengths = list(&v)?,
            "--prompts" => a.prompts = Some(v.into()),
            "--heldout" => a.heldout = Some(v.into()),
            "--max-tokens" => a.max_tokens = v.parse()?,
            "--plain-model" => a.plain_model = Some(v.into()),
            "--heldout-docs" => a.heldout_docs = v.parse()?,
            "--tf-length" => a.tf_length = v.parse()?,
            "--tf-steps" => a.tf_steps = v.parse()?,
            "--doc-seed" => a.doc_seed = v.parse()?,
            "--doc-kinds" => a.doc_kinds = v.split(',').map(|k| k.trim().to_string()).collect(),
            "--greedy-top" => a.greedy_top = v.parse()?,
            _ => bail!("unknown option `{flag}`\n{USAGE}"),
        }
    }
    if a.filters.is_empty() || a.filters.contains(&0) {
        bail!("--filters: every count must be at least 1");
    }
    if a.wait_load.is_empty() {
        bail!("--wait-load: give at least one count");
    }
    if a.heldout_docs == 0 || a.tf_steps == 0 || a.tf_length < 2 {
        bail!("--heldout-docs and --tf-steps must be at least 1, --tf-length at least 2");
    }
    if !(a.budget > 0.0) {
        bail!("--budget must be > 0");
    }
    Ok(a)
}

/// Prompts from a JSON list of strings, or needle prompts at `lengths` and
/// `depths`.
fn prompts(file: &Option<PathBuf>, lengths: &[usize], depths: &[u32]) -> Result<Vec<Case>> {
    if let Some(f) = file {
        let list: Vec<String> = serde_json::from_str(&std::fs::read_to_string(f)?)
            .with_context(|| format!("`{}` must be a JSON list of strings", f.display()))?;
        return Ok(list
            .into_iter()
            .enumerate()
            .map(|(i, prompt)| Case {
                id: format!("prompt-{i}"),
                suite: omnikv_eval::eval::Suite::Needle,
                length: 0,
                depth: None,
                prompt,
                answer: String::new(),
                distractors: vec![],
                max_tokens: 0,
                mode: omnikv_eval::eval::PromptMode::Chat,
            })
            .collect());
    }
    let haystack = load_haystack(&omnikv_eval::eval::haystack_dir())?;
    Ok(needle_cases(&haystack, lengths, depths))
}

struct Ctx {
    model: Vec<String>,
    scratch: PathBuf,
    max_tokens: usize,
}

impl Ctx {
    fn start(&self, name: &str, cfg: &Value) -> Result<Server> {
        std::fs::create_dir_all(&self.scratch)?;
        let path = self.scratch.join(format!("{name}.json"));
        std::fs::write(&path, serde_json::to_string_pretty(cfg)?)?;
        Server::start_model(
            "omnikv",
            &["--kv-cache-config", path.to_str().unwrap()],
            &self.model,
        )
    }

    fn answer(&self, server: &Server, cases: &[Case], bar: &ProgressBar) -> Result<Vec<String>> {
        cases
            .iter()
            .map(|c| {
                let r = server
                    .chat(&c.prompt, self.max_tokens)
                    .with_context(|| format!("{}:\n{}", c.id, server.log_tail()))
                    .map(|c| c.text);
                bar.inc(1);
                r
            })
            .collect()
    }
}

fn shared_prefix(a: &str, b: &str) -> f64 {
    let n = a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count();
    let len = a.chars().count().max(b.chars().count()).max(1);
    n as f64 / len as f64
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let base: Value = serde_json::from_str(
        &std::fs::read_to_string(&args.base)
            .with_context(|| format!("cannot read `{}`", args.base.display()))?,
    )?;
    let mut base = base
        .as_object()
        .cloned()
        .context("--base must be a JSON object")?;
    for k in ["model_name", "record_recall"] {
        base.remove(k);
    }
    let ctx = Ctx {
        model: match &args.plain_model {
            Some(dir) => vec![
                "--dtype".into(),
                "f32".into(),
                "-m".into(),
                dir.display().to_string(),
            ],
            None => model_args(),
        },
        scratch: std::env::temp_dir().join(format!("omnikv-calibrate-{}", std::process::id())),
        max_tokens: args.max_tokens,
    };
    let calib = prompts(&args.prompts, &args.calib_lengths, &[20, 50, 80])?;
    let heldout = prompts(&args.heldout, &args.heldout_lengths, &[10, 40, 70, 90])?;
    let style =
        ProgressStyle::with_template("{prefix:>28} [{bar:30}] {pos}/{len} {elapsed_precise} {msg}")
            .unwrap()
            .progress_chars("=> ");
    let bar = |n: usize, what: &str| {
        if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            eprintln!("omnikv-calibrate: {what} ({n} prompts)");
        }
        ProgressBar::new(n as u64)
            .with_style(style.clone())
            .with_prefix(what.to_string())
    };

    // 1. Record recall with dense decoding; the same server gives the
    //    full-attention reference outputs afterwards.
    let recall_file = ctx.scratch.join("recall.json");
    std::fs::create_dir_all(&ctx.scratch)?;
    let mut rec_cfg = base.clone();
    rec_cfg.insert("do_select_layers".into(), json!("1"));
    rec_cfg.insert("num_wait_load_layers".into(), json!(0));
    rec_cfg.insert("num_of_selected_tokens".into(), budget_value(args.budget));
    rec_cfg.insert(
        "record_recall".into(),
        json!(recall_file.display().to_string()),
    );
    let server = ctx.start("record", &Value::Object(rec_cfg))?;
    let b = bar(calib.len(), "recording recall");
    ctx.answer(&server, &calib, &b)?;
    b.finish();
    let stats: RecallStats = serde_json::from_str(
        &std::fs::read_to_string(&recall_file)
            .context("the recording server wrote no recall (no decode steps?)")?,
    )?;
    let b = bar(heldout.len(), "full-attention reference");
    let reference = ctx.answer(&server, &heldout, &b)?;
    b.finish();
    drop(server);
    let layers = stats.layers;
    let s = &stats.recall;

    // 2. Candidates.
    // (filter layers, W, where it came from)
    let mut cands: Vec<(Vec<usize>, usize, String)> = Vec::new();
    for &w in &args.wait_load {
        for &m in &args.filters {
            for &first in &args.first {
                if let Some((set, _)) = propose(s, m, w, first) {
                    if !cands.iter().any(|(c, cw, _)| *c == set && *cw == w) {
                        cands.push((set, w, format!("DP, first filter layer {first}")));
                    }
                }
            }
        }
        for c in &args.candidates {
            if c.iter().any(|&l| l >= layers) {
                bail!("candidate {c:?} names a layer beyond the model's {layers} layers");
            }
            if let Some((_, _, why)) = cands.iter_mut().find(|(x, xw, _)| x == c && *xw == w) {
                why.push_str(" + given");
            } else {
                cands.push((c.clone(), w, "given".into()));
            }
        }
    }
    if cands.is_empty() {
        bail!(
            "no candidate fits {layers} layers with --filters {:?} --wait-load {:?}",
            args.filters,
            args.wait_load
        );
    }
    let layers_str = |set: &[usize]| {
        set.iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };

    // 3a. Teacher-forced KL on held-out documents, in process: one prefill
    //     per document, every candidate decodes from it.
    let tf_ranked = args.plain_model.is_none();
    let mut tf: Vec<Vec<DocSummary>> = vec![Vec::new(); cands.len()];
    if tf_ranked {
        let gguf = model_dir().join(MODEL_FILE);
        let tok = gguf_tokenizer(&gguf)?;
        let mut tf_base = base.clone();
        tf_base.insert("num_of_selected_tokens".into(), budget_value(args.budget));
        let mut model = TeacherForced::new(&gguf, DType::BF16, &Value::Object(tf_base), false)?;
        let variants: Vec<TfVariant> = cands
            .iter()
            .map(|(set, w, _)| {
                let mut extra = serde_json::Map::new();
                extra.insert("do_select_layers".into(), json!(layers_str(set)));
                extra.insert("num_wait_load_layers".into(), json!(w));
                TfVariant::Backend(Variant::OmniKv {
                    budget: args.budget,
                    extra,
                })
            })
            .collect();
        let b = bar(
            args.doc_kinds.len() * args.heldout_docs,
            "teacher-forced KL",
        );
        for kind in &args.doc_kinds {
            let files = document_sources(kind)?;
            for i in 0..args.heldout_docs {
                let ids = document(
                    &tok,
                    &files,
                    kind,
                    args.doc_seed,
                    i,
                    args.tf_length + args.tf_steps + 1,
                )?;
                let runs = model.run(&ids, args.tf_length, args.tf_steps, &variants)?;
                for (t, run) in tf.iter_mut().zip(runs) {
                    t.push(DocSummary::of(&run.steps));
                }
                b.inc(1);
            }
        }
        b.finish();
    }
    let mean_kl = |i: usize| mean_ci(&tf[i].iter().map(|d| d.kl).collect::<Vec<_>>()).0;
    let mut order: Vec<usize> = (0..cands.len()).collect();
    if tf_ranked {
        order.sort_by(|&a, &b| mean_kl(a).total_cmp(&mean_kl(b)));
    }
    let greedy: Vec<bool> = {
        let mut g = vec![!tf_ranked; cands.len()];
        for &i in order.iter().take(args.greedy_top) {
            g[i] = true;
        }
        g
    };

    // 3. Rank by agreement with full attention on held-out prompts.
    // 3b. Greedy agreement through the server, for the best by KL.
    struct Row {
        set: Vec<usize>,
        wait_load: usize,
        why: String,
        recall: f64,
        mean_recall: f64,
        /// Mean KL, top-1 agreement and rows read, with 95% half-widths.
        kl: Option<(f64, f64)>,
        top1: Option<(f64, f64)>,
        rows_read: Option<(f64, f64)>,
        /// Identical outputs, shared prefix, correct answers.
        greedy: Option<(usize, f64, usize)>,
    }
    let mut rows = Vec::new();
    for (i, (set, w, why)) in cands.into_iter().enumerate() {
        let greedy = if greedy[i] {
            let mut cfg = base.clone();
            cfg.insert("do_select_layers".into(), json!(layers_str(&set)));
            cfg.insert("num_wait_load_layers".into(), json!(w));
            cfg.insert("num_of_selected_tokens".into(), budget_value(args.budget));
            let name = format!("cand-{}-w{w}", layers_str(&set).replace(',', "-"));
            let server = ctx.start(&name, &Value::Object(cfg))?;
            let b = bar(
                heldout.len(),
                &format!("filter layers {} W {w}", layers_str(&set)),
            );
            let outs = ctx.answer(&server, &heldout, &b)?;
            b.finish();
            Some((
                outs.iter().zip(&reference).filter(|(a, b)| a == b).count(),
                outs.iter()
                    .zip(&reference)
                    .map(|(a, b)| shared_prefix(a, b))
                    .sum::<f64>()
                    / outs.len().max(1) as f64,
                heldout
                    .iter()
                    .zip(&outs)
                    .filter(|(c, o)| !c.answer.is_empty() && score(c, o))
                    .count(),
            ))
        } else {
            None
        };
        let sparse: usize = (0..set.len())
            .map(|i| {
                let next = set.get(i + 1).copied().unwrap_or(layers);
                next.saturating_sub(set[i] + w + 1)
            })
            .sum();
        let recall = plan_score(s, &set, w);
        let col = |f: fn(&DocSummary) -> f64| {
            (!tf[i].is_empty()).then(|| mean_ci(&tf[i].iter().map(f).collect::<Vec<_>>()))
        };
        rows.push(Row {
            recall,
            mean_recall: if sparse == 0 {
                1.0
            } else {
                recall / sparse as f64
            },
            kl: col(|d| d.kl),
            top1: col(|d| d.agree),
            rows_read: col(|d| d.rows_read),
            greedy,
            set,
            wait_load: w,
            why,
        });
    }
    if tf_ranked {
        rows.sort_by(|a, b| {
            let kl = |r: &Row| r.kl.map_or(f64::INFINITY, |k| k.0);
            kl(a).total_cmp(&kl(b))
        });
    } else {
        rows.sort_by(|a, b| {
            let g = |r: &Row| r.greedy.unwrap_or((0, 0.0, 0));
            let (ga, gb) = (g(a), g(b));
            gb.0.cmp(&ga.0)
                .then(gb.1.total_cmp(&ga.1))
                .then(gb.2.cmp(&ga.2))
                .then(b.recall.total_cmp(&a.recall))
        });
    }
    let best = &rows[0];

    // 4. Outputs.
    let mut cfg = base.clone();
    cfg.insert(
        "do_select_layers".into(),
        json!(best
            .set
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join(",")),
    );
    cfg.insert("num_wait_load_layers".into(), json!(best.wait_load));
    cfg.insert("num_of_selected_tokens".into(), budget_value(args.budget));
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(
        &args.out,
        serde_json::to_string_pretty(&Value::Object(cfg))? + "\n",
    )?;
    let stem = args.out.with_extension("");
    let recall_json = PathBuf::from(format!("{}-recall.json", stem.display()));
    let heatmap = PathBuf::from(format!("{}-recall.svg", stem.display()));
    let report = PathBuf::from(format!("{}-calibration.md", stem.display()));
    std::fs::write(&recall_json, serde_json::to_string_pretty(&stats)? + "\n")?;
    std::fs::write(
        &heatmap,
        heatmap_svg(
            s,
            &format!("inter-layer recall S(a, b) at budget {}", args.budget),
        ),
    )?;
    let ref_correct = heldout
        .iter()
        .zip(&reference)
        .filter(|(c, o)| !c.answer.is_empty() && score(c, o))
        .count();
    let mut md = format!(
        "# Filter-layer calibration\n\nMachine: {}. Command: `target/debug/omnikv-calibrate {}`.\n\n\
         Recall recorded over {} decode steps of {} calibration prompts at budget {} (`{}`); \
         {} layers, mean off-diagonal recall {:.3}. Heatmap: `{}`.\n\n\
         {}\n\n\
         Greedy agreement with full attention on {} held-out prompts \
         (full attention answered {}/{} of them correctly){}.\n\n\
         | rank | filter layers | W | source | KL (nats) | top-1 agreement (%) | rows read (%) | recall score (sum / mean per sparse layer) | identical outputs | shared prefix | correct |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
        machine_description(),
        std::env::args()
            .skip(1)
            .map(|a| if a.contains([';', ' ']) { format!("\"{a}\"") } else { a })
            .collect::<Vec<_>>()
            .join(" "),
        stats.steps,
        calib.len(),
        args.budget,
        stats.budget,
        layers,
        mean_off_diagonal(s),
        file_name(&heatmap),
        if tf_ranked {
            format!(
                "Candidates ranked by mean teacher-forced KL(full ‖ candidate) per decode step at budget {} \
                 (`omnikv_eval::teacher_forced`): {} held-out documents ({} per kind: {}; seed {}), \
                 prompts of {} tokens, {} steps each; ± is the 95% interval over documents. Rows read: the \
                 share of full attention's KV rows a step reads.",
                args.budget,
                args.doc_kinds.len() * args.heldout_docs,
                args.heldout_docs,
                args.doc_kinds.join(", "),
                args.doc_seed,
                args.tf_length,
                args.tf_steps
            )
        } else {
            "Candidates ranked by greedy agreement (`--plain-model`: the teacher-forced ranking runs on the GGUF).".into()
        },
        heldout.len(),
        ref_correct,
        heldout.len(),
        if tf_ranked {
            format!(", for the best {} by KL", args.greedy_top)
        } else {
            String::new()
        },
    );
    let pm = |x: Option<(f64, f64)>, scale: f64, digits: usize| match x {
        Some((m, h)) if h.is_nan() => format!("{:.*}", digits, m * scale),
        Some((m, h)) => format!("{:.*} ± {:.*}", digits, m * scale, digits, h * scale),
        None => String::new(),
    };
    for (i, r) in rows.iter().enumerate() {
        let (identical, prefix, correct) = match r.greedy {
            Some((a, b, c)) => (
                format!("{a}/{}", heldout.len()),
                format!("{:.0}%", 100.0 * b),
                format!("{c}/{}", heldout.len()),
            ),
            None => (String::new(), String::new(), String::new()),
        };
        md.push_str(&format!(
            "| {} | {:?} | {} | {} | {} | {} | {} | {:.2} / {:.3} | {identical} | {prefix} | {correct} |\n",
            i + 1,
            r.set,
            r.wait_load,
            r.why,
            pm(r.kl, 1.0, 4),
            pm(r.top1, 100.0, 1),
            pm(r.rows_read, 100.0, 1),
            r.recall,
            r.mean_recall,
        ));
    }
    md.push_str(&format!(
        "\nChosen: {:?} with W = {}, written to `{}`.\n",
        best.set,
        best.wait_load,
        file_name(&args.out)
    ));
    std::fs::write(&report, &md)?;
    println!("{md}");
    eprintln!(
        "wrote {}, {}, {}, {}",
        args.out.display(),
        recall_json.display(),
        heatmap.display(),
        report.display()
    );
    let _ = std::fs::remove_dir_all(&ctx.scratch);
    Ok(())
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn mean_off_diagonal(s: &[Vec<f64>]) -> f64 {
    let l = s.len();
    if l < 2 {
        return 1.0;
    }
    let mut t = 0.0;
    for (a, row) in s.iter().enumerate() {
        for (b, v) in row.iter().enumerate() {
            if a != b {
                t += v;
            }
        }
    }
    t / (l * (l - 1)) as f64
}

/// The recall matrix as an SVG heatmap (rows: selecting layer `a`, columns:
/// served layer `b`), with layer labels and a colour scale.
pub fn heatmap_svg(s: &[Vec<f64>], title: &str) -> String {
    let l = s.len();
    let cell = 18usize;
    let (left, top) = (40usize, 40usize);
    let w = left + l * cell + 90;
    let h = top + l * cell + 40;
    let colour = |v: f64| -> String {
        // Dark blue (0) -> teal -> yellow (1).
        let v = v.clamp(0.0, 1.0);
        let stops = [
            (0.0, (68, 1, 84)),
            (0.5, (33, 145, 140)),
            (1.0, (253, 231, 37)),
        ];
        let (i, f) = if v <= 0.5 {
            (0, v / 0.5)
        } else {
            (1, (v - 0.5) / 0.5)
        };
        let (a, b) = (stops[i].1, stops[i + 1].1);
        let mix = |x: i32, y: i32| (x as f64 + (y - x) as f64 * f).round() as i32;
        format!("rgb({},{},{})", mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
    };
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"9\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{left}\" y=\"16\" font-size=\"12\">{title}</text>\n<text x=\"{left}\" y=\"30\">columns: served layer b; rows: selecting layer a</text>\n"
    );
    for (a, row) in s.iter().enumerate() {
        svg.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{a}</text>\n",
            left - 4,
            top + a * cell + cell * 2 / 3
        ));
        for (b, v) in row.iter().enumerate() {
            svg.push_str(&format!(
                "<rect x=\"{}\" y=\"{}\" width=\"{cell}\" height=\"{cell}\" fill=\"{}\"><title>S({a},{b}) = {v:.3}</title></rect>\n",
                left + b * cell,
                top + a * cell,
                colour(*v)
            ));
        }
    }
    for b in 0..l {
        svg.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{b}</text>\n",
            left + b * cell + cell / 2,
            top + l * cell + 12
        ));
    }
    let sx = left + l * cell + 20;
    for i in 0..=10 {
        let v = 1.0 - i as f64 / 10.0;
        svg.push_str(&format!(
            "<rect x=\"{sx}\" y=\"{}\" width=\"14\" height=\"{}\" fill=\"{}\"/>\n",
            top + i * l * cell / 11,
            l * cell / 11 + 1,
            colour(v)
        ));
        if i % 5 == 0 {
            svg.push_str(&format!(
                "<text x=\"{}\" y=\"{}\">{v:.1}</text>\n",
                sx + 18,
                top + i * l * cell / 11 + 8
            ));
        }
    }
    svg.push_str("</svg>\n");
    svg
}
