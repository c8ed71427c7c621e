//! `omnikv-eval`: fidelity of `--kv-cache omnikv` against full attention on
//! SmolLM2-135M, through the real server (see `omnikv_eval::eval`).
//!
//! ```text
//! cargo build --workspace
//! target/debug/omnikv-eval --variants default,omnikv@0.067,omnikv@0.1
//! ```
//!
//! Prints a table and writes a Markdown report (default
//! `results/fidelity.md`); answers are cached in `results/cache/` so a run
//! resumes where it stopped (`--fresh` asks everything again).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use omnikv_eval::eval::*;
use omnikv_eval::root;
use serde_json::Value;

struct Args {
    variants: Vec<Variant>,
    references: Vec<String>,
    config: PathBuf,
    suites: Vec<String>,
    needle_lengths: Vec<usize>,
    depths: Vec<u32>,
    two_stage_sizes: Vec<usize>,
    two_stage_per_size: usize,
    two_needle_lengths: Vec<usize>,
    /// Prompt modes for 2stage (and benchmark files); `None`: from the config.
    modes: Option<Vec<PromptMode>>,
    bench_files: Vec<PathBuf>,
    bench_format: Option<omnikv_eval::bench_format::Format>,
    max_context_len: usize,
    /// Variants served by servers already running: label -> port.
    targets: BTreeMap<String, u16>,
    out: PathBuf,
    cache: PathBuf,
    fresh: bool,
    title: String,
}

const USAGE: &str = "usage: omnikv-eval [options]
  --variants LIST         comma-separated: default | full | omnikv@<budget>[:key=value+key=value]
                          | <h2o|streaming|snapkv>@<budget>[:key=value+...]
                          (extra config keys, values as JSON); `full` is full
                          attention after OmniKV's prefill (the omnikv backend,
                          each request sending \"kv_cache\": {\"enabled\": false})
                          (default: omnikv@1.0,omnikv@0.067,omnikv@0.1; `default`,
                          the stock cache, prefills long prompts ~17x slower)
  --reference LIST        the variants others are compared with, one table each
                          (default: the first variant)
  --config FILE           base OmniKV config (default: configs/smollm2-135m.json)
  --suites LIST           needle,2stage,2needle,bench (default: needle,2stage,2needle;
                          bench needs --bench-files)
  --needle-lengths LIST   prompt lengths in tokens (default: 1000,3500,7000)
  --depths LIST           needle depths in percent (default: 0,25,50,75,100)
  --two-stage-sizes LIST  dictionary sizes (default: 250)
  --two-stage-per-size N  cases per size (default: 4)
  --two-needle-lengths L  (default: 2000,5000)
  --prompt-modes LIST     plain,chat,cot: how 2stage prompts are sent (default: from the
                          config's `use_chat_template` and `cot` keys; chat when unset);
                          needle suites always use chat
  --bench-files LIST      LongBench / InfiniteBench JSONL files or directories of them
                          (published field names; see crates/omnikv-eval/samples/)
  --bench-format F        longbench | infinitebench (default: from the path)
  --max-context-len N     middle-truncate benchmark prompts to N tokens (default 7000)
  --targets LIST          VARIANT=PORT,...: use servers already running on 127.0.0.1:PORT
                          for these variants (started by you with the matching
                          --kv-cache and config) instead of starting them
  --out FILE              Markdown report (default: results/fidelity.md)
  --cache FILE            answer cache (default: results/cache/fidelity.jsonl)
  --title TEXT            report title
  --fresh                 ignore cached answers";

fn list<T: std::str::FromStr>(s: &str, what: &str) -> Result<Vec<T>> {
    s.split(',')
        .filter(|x| !x.is_empty())
        .map(|x| {
            x.trim()
                .parse()
                .map_err(|_| anyhow::anyhow!("{what}: `{x}` is not valid"))
        })
        .collect()
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        variants: vec![],
        references: Vec::new(),
        config: root().join("configs/smollm2-135m.json"),
        suites: vec!["needle".into(), "2stage".into(), "2needle".into()],
        needle_lengths: vec![1000, 3500, 7000],
        depths: vec![0, 25, 50, 75, 100],
        two_stage_sizes: vec![250],
        two_stage_per_size: 4,
        two_needle_lengths: vec![2000, 5000],
        modes: None,
        bench_files: vec![],
        bench_format: None,
        max_context_len: 7000,
        targets: BTreeMap::new(),
        out: root().join("results/fidelity.md"),
        cache: root().join("results/cache/fidelity.jsonl"),
        fresh: false,
        title: "Fidelity of OmniKV on SmolLM2-135M-Instruct".into(),
    };
    let mut variants = "omnikv@1.0,omnikv@0.067,omnikv@0.1".to_string();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--fresh" {
            a.fresh = true;
            continue;
        }
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let val = it
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--variants" => variants = val,
            "--reference" => a.references = omnikv_eval::eval::split_variant_list(&val),
            "--config" => a.config = PathBuf::from(val),
            "--suites" => a.suites = list(&val, "--suites")?,
            "--needle-lengths" => a.needle_lengths = list(&val, "--needle-lengths")?,
            "--depths" => a.depths = list(&val, "--depths")?,
            "--two-stage-sizes" => a.two_stage_sizes = list(&val, "--two-stage-sizes")?,
            "--two-stage-per-size" => a.two_stage_per_size = val.parse()?,
            "--two-needle-lengths" => a.two_needle_lengths = list(&val, "--two-needle-lengths")?,
            "--bench-files" => {
                a.bench_files = val
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from)
                    .collect()
            }
            "--bench-format" => a.bench_format = Some(val.parse()?),
            "--max-context-len" => a.max_context_len = val.parse()?,
            "--targets" => {
                for t in val.split(',').filter(|s| !s.is_empty()) {
                    let (label, port) = t
                        .rsplit_once('=')
                        .with_context(|| format!("--targets: `{t}` is not VARIANT=PORT"))?;
                    let port = port
                        .parse()
                        .with_context(|| format!("--targets: `{port}` is not a port"))?;
                    a.targets.insert(Variant::parse(label)?.label(), port);
                }
            }
            "--prompt-modes" => {
                a.modes = Some(
                    val.split(',')
                        .filter(|s| !s.is_empty())
                        .map(PromptMode::parse)
                        .collect::<Result<_>>()?,
                )
            }
            "--out" => a.out = PathBuf::from(val),
            "--cache" => a.cache = PathBuf::from(val),
            "--title" => a.title = val,
            _ => bail!("unknown option `{flag}`\n{USAGE}"),
        }
    }
    a.variants = omnikv_eval::eval::split_variant_list(&variants)
        .iter()
        .map(|v| Variant::parse(v))
        .collect::<Result<_>>()?;
    for label in a.targets.keys() {
        if !a.variants.iter().any(|v| v.label() == *label) {
            bail!("--targets names `{label}`, which is not in --variants");
        }
    }
    if a.variants.is_empty() {
        bail!("--variants is empty\n{USAGE}");
    }
    // A reference spelled as a variant (`omnikv@1.0`) is named by its label
    // (`omnikv@1`); checked here, before any case runs.
    let labels: Vec<String> = a.variants.iter().map(Variant::label).collect();
    a.references = a
        .references
        .iter()
        .map(|r| Variant::parse(r).map_or_else(|_| r.clone(), |v| v.label()))
        .collect();
    if a.references.is_empty() {
        a.references.push(labels[0].clone());
    }
    for reference in &a.references {
        if !labels.contains(reference) {
            bail!("--reference `{reference}` is not one of the variants {labels:?}");
        }
    }
    for s in &a.suites {
        if !["needle", "2stage", "2needle", "bench"].contains(&s.as_str()) {
            bail!("unknown suite `{s}`: expected needle, 2stage, 2needle or bench");
        }
        if s == "bench" && a.bench_files.is_empty() {
            bail!("the bench suite needs --bench-files FILE[,FILE...]\n{USAGE}");
        }
    }
    Ok(a)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let base: Value = serde_json::from_str(
        &std::fs::read_to_string(&args.config)
            .with_context(|| format!("cannot read `{}`", args.config.display()))?,
    )
    .with_context(|| format!("`{}` is not JSON", args.config.display()))?;

    let mut cases = Vec::new();
    let need_haystack = args.suites.iter().any(|s| s == "needle" || s == "2needle");
    let modes = match &args.modes {
        Some(m) => m.clone(),
        None => vec![PromptMode::from_config(&base)?],
    };
    let mut samples = BTreeMap::new();
    let haystack = if need_haystack {
        load_haystack(&haystack_dir())?
    } else {
        String::new()
    };
    for s in &args.suites {
        match s.as_str() {
            "needle" => cases.extend(needle_cases(&haystack, &args.needle_lengths, &args.depths)),
            "2stage" => {
                for c in two_stage_cases(&args.two_stage_sizes, args.two_stage_per_size) {
                    cases.extend(modes.iter().map(|m| m.apply(&c)));
                }
            }
            "bench" => {
                let gguf = omnikv_eval::model_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf");
                let tok = omnikv_eval::bench_format::gguf_tokenizer(&gguf)?;
                let (bench, s) = bench_cases(
                    &args.bench_files,
                    args.bench_format,
                    &tok,
                    args.max_context_len,
                )?;
                for c in bench {
                    cases.extend(modes.iter().map(|m| m.apply(&c)));
                }
                for m in &modes {
                    for (id, sample) in &s {
                        samples.insert(m.apply_id(id), sample.clone());
                    }
                }
            }
            _ => cases.extend(two_needle_cases(
                &haystack,
                &args.two_needle_lengths,
                &[(10, 70), (30, 90), (50, 20), (70, 40), (90, 60)],
            )),
        }
    }

    let mut cache = if args.fresh {
        Default::default()
    } else {
        load_cache(&args.cache)
    };
    let scratch = root().join("results/cache/configs");
    let style = ProgressStyle::with_template(
        "{prefix:>24} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta} {msg}",
    )
    .unwrap()
    .progress_chars("=> ");
    let mut results: BTreeMap<String, BTreeMap<String, Outcome>> = BTreeMap::new();
    for variant in &args.variants {
        let label = variant.label();
        let request_kv_cache = variant.request_kv_cache();
        let cfg_text = variant
            .config(&base)
            .map(|c| c.to_string())
            .unwrap_or_default()
            + &request_kv_cache
                .as_ref()
                .map(|o| format!(" request {o}"))
                .unwrap_or_default();
        let key_of = |c: &Case| fnv1a(&[&c.prompt, &cfg_text, &c.max_tokens.to_string()]);
        let todo: Vec<&Case> = cases
            .iter()
            .filter(|c| {
                cache
                    .get(&(label.clone(), c.id.clone()))
                    .is_none_or(|o| o.key != key_of(c))
            })
            .collect();
        let bar = ProgressBar::new(cases.len() as u64)
            .with_style(style.clone())
            .with_prefix(label.clone());
        bar.inc((cases.len() - todo.len()) as u64);
        if !todo.is_empty() {
            if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                eprintln!(
                    "omnikv-eval: {label}: {} of {} cases to run",
                    todo.len(),
                    cases.len()
                );
            }
            let server = match args.targets.get(&label) {
                Some(&port) => {
                    bar.set_message(format!("using the server on port {port}"));
                    omnikv_eval::Server::attach(port)?
                }
                None => {
                    bar.set_message("starting server");
                    variant.start(&base, &scratch)?
                }
            };
            for c in todo {
                bar.set_message(c.id.clone());
                let t = Instant::now();
                let got = server
                    .ask_with(c, request_kv_cache.as_ref())
                    .with_context(|| format!("{label} on {}:\n{}", c.id, server.log_tail()))?;
                let metric = samples.get(&c.id).map(|s| {
                    omnikv_eval::bench_format::score_sample(s, answer_part(c.mode, &got.text))
                });
                let o = Outcome {
                    variant: label.clone(),
                    case: c.id.clone(),
                    key: key_of(c),
                    prompt_tokens: got.prompt_tokens,
                    correct: metric.map_or_else(|| score(c, &got.text), |m| m >= 0.5),
                    output: got.text,
                    prompt_time_sec: got.prompt_time_sec,
                    total_time_sec: t.elapsed().as_secs_f64(),
                    completion_tokens: got.completion_tokens,
                    completion_time_sec: got.completion_time_sec,
                    score: metric,
                };
                append_cache(&args.cache, &o)?;
                cache.insert((label.clone(), c.id.clone()), o);
                bar.inc(1);
            }
        }
        bar.finish_with_message("done");
        for c in &cases {
            if let Some(o) = cache.get(&(label.clone(), c.id.clone())) {
                results
                    .entry(label.clone())
                    .or_default()
                    .insert(c.id.clone(), o.clone());
            }
        }
    }

    let labels: Vec<String> = args.variants.iter().map(Variant::label).collect();
    let references = &args.references;
    // Quote arguments with spaces so the printed command can be pasted.
    let cmd: Vec<String> = std::env::args()
        .skip(1)
        .map(|a| {
            if a.contains(' ') {
                format!("\"{a}\"")
            } else {
                a
            }
        })
        .collect();
    let report = render_report(
        &args.title,
        &cases,
        &labels,
        references,
        &results,
        &format!("target/debug/omnikv-eval {}", cmd.join(" ")),
        &args.config,
    );
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let report = report + &render_plots_and_speed(&args.out, &cases, &args.variants, &results)?;
    println!("{report}");
    std::fs::write(&args.out, &report)?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

fn pct(k: usize, n: usize) -> String {
    if n == 0 {
        "-".into()
    } else {
        format!("{k}/{n} ({:.0}%)", 100.0 * k as f64 / n as f64)
    }
}

fn render_report(
    title: &str,
    cases: &[Case],
    labels: &[String],
    references: &[String],
    results: &BTreeMap<String, BTreeMap<String, Outcome>>,
    command: &str,
    config: &std::path::Path,
) -> String {
    let get = |label: &str, id: &str| results.get(label).and_then(|m| m.get(id));
    let mut buckets: BTreeMap<(Suite, usize, PromptMode), Vec<&Case>> = BTreeMap::new();
    for c in cases {
        buckets
            .entry((c.suite, c.length, c.mode))
            .or_default()
            .push(c);
    }
    let mut md = String::new();
    md.push_str(&format!("# {title}\n\n"));
    md.push_str(&format!(
        "Machine: {}. Model: SmolLM2-135M-Instruct Q4_1 GGUF, greedy decoding, one request at a time through the patched `mistralrs serve`.\n\n",
        machine_description()
    ));
    let config_name = config
        .strip_prefix(root())
        .unwrap_or(config)
        .display()
        .to_string();
    md.push_str(&format!(
        "Command: `{command}` (base OmniKV config `{config_name}`; each `omnikv@B` variant sets `num_of_selected_tokens` to B, each `h2o@B` / `streaming@B` the baseline's `budget` to B).\n\n"
    ));
    md.push_str("## Accuracy\n\nPass/fail suites: correct of run. Benchmark-format tasks: the published metric's mean x 100.\n\n| suite | prompt tokens (mean) | cases |");
    for l in labels {
        md.push_str(&format!(" {l} |"));
    }
    md.push_str("\n|---|---|---|");
    md.push_str(&"---|".repeat(labels.len()));
    md.push('\n');
    let mut totals = vec![(0usize, 0usize); labels.len()];
    for ((suite, len, mode), cs) in &buckets {
        let toks: Vec<usize> = cs
            .iter()
            .filter_map(|c| get(&references[0], &c.id).map(|o| o.prompt_tokens))
            .collect();
        let mean = if toks.is_empty() {
            0
        } else {
            toks.iter().sum::<usize>() / toks.len()
        };
        let mut size = match suite {
            Suite::TwoStage => format!("{} ({len} entries)", suite.name()),
            // `format/task/id`: the task.
            Suite::Bench => cs[0]
                .id
                .rsplitn(2, '/')
                .nth(1)
                .unwrap_or("bench")
                .to_string(),
            _ => format!("{} ~{len}", suite.name()),
        };
        if *mode != PromptMode::Chat {
            size.push_str(&format!(", {}", mode.name()));
        }
        md.push_str(&format!("| {size} | {mean} | {} |", cs.len()));
        for (i, l) in labels.iter().enumerate() {
            let done: Vec<&Outcome> = cs.iter().filter_map(|c| get(l, &c.id)).collect();
            let k = done.iter().filter(|o| o.correct).count();
            totals[i].0 += k;
            totals[i].1 += done.len();
            if *suite == Suite::Bench {
                let mean = done.iter().map(|o| o.value()).sum::<f64>() / done.len().max(1) as f64;
                let cell = if done.is_empty() {
                    "-".to_string()
                } else {
                    format!("{:.1}", 100.0 * mean)
                };
                md.push_str(&format!(" {cell} |"));
            } else {
                md.push_str(&format!(" {} |", pct(k, done.len())));
            }
        }
        md.push('\n');
    }
    md.push_str("| **all** (benchmark cases count as correct at a score of 0.5 or more) | | |");
    for (k, n) in &totals {
        md.push_str(&format!(" **{}** |", pct(*k, *n)));
    }
    md.push('\n');
    for reference in references {
        let ri = labels.iter().position(|l| l == reference).unwrap_or(0);
        md.push_str(&format!("\n## Against `{reference}`\n\n| variant | accuracy relative to {reference} | identical outputs | mean prompt time (s) | mean request time (s) |\n|---|---|---|---|---|\n"));
        for (i, l) in labels.iter().enumerate() {
            let rel = if totals[ri].0 == 0 {
                "-".into()
            } else {
                format!("{:.1}%", 100.0 * totals[i].0 as f64 / totals[ri].0 as f64)
            };
            let (mut same, mut both, mut pt, mut tt, mut n) = (0, 0, 0.0, 0.0, 0);
            for c in cases {
                if let Some(o) = get(l, &c.id) {
                    pt += o.prompt_time_sec;
                    tt += o.total_time_sec;
                    n += 1;
                    if let Some(r) = get(reference, &c.id) {
                        both += 1;
                        same += (r.output == o.output) as usize;
                    }
                }
            }
            let n = n.max(1) as f64;
            md.push_str(&format!(
                "| {l} | {rel} | {} | {:.1} | {:.1} |\n",
                pct(same, both),
                pt / n,
                tt / n
            ));
        }
    }
    md.push_str("\n## Every case\n\n`+` correct, `-` wrong, blank not run.\n\n| case | tokens |");
    for l in labels {
        md.push_str(&format!(" {l} |"));
    }
    md.push_str("\n|---|---|");
    md.push_str(&"---|".repeat(labels.len()));
    md.push('\n');
    for c in cases {
        let toks = labels
            .iter()
            .find_map(|l| get(l, &c.id).map(|o| o.prompt_tokens.to_string()))
            .unwrap_or_default();
        md.push_str(&format!("| {} | {toks} |", c.id));
        for l in labels {
            let mark = match get(l, &c.id) {
                Some(o) if o.correct => "+",
                Some(_) => "-",
                None => "",
            };
            md.push_str(&format!(" {mark} |"));
        }
        md.push('\n');
    }
    md.push_str("\nAnswers (first 100 characters) are in the cache file next to the command's output; cases are generated deterministically by `omnikv_eval::eval`.\n");
    md
}

/// Series label of a variant in the budget plot: the label without its
/// budget (`h2o@0.1:heavy_ratio=0.25` -> `h2o:heavy_ratio=0.25`).
fn method_of(v: &Variant) -> String {
    let label = v.label();
    match label.split_once('@') {
        None => label,
        Some((name, rest)) => match rest.split_once(':') {
            Some((_, extra)) => format!("{name}:{extra}"),
            None => name.to_string(),
        },
    }
}

/// Accuracy-vs-budget plot, needle heatmaps (SVG files next to `out`) and
/// the decode-speed table; returns the Markdown that shows them.
fn render_plots_and_speed(
    out: &std::path::Path,
    cases: &[Case],
    variants: &[Variant],
    results: &BTreeMap<String, BTreeMap<String, Outcome>>,
) -> Result<String> {
    use omnikv_eval::plot::{heatmaps, line_chart, Series};
    let mut md = String::new();
    let stem = out.file_stem().and_then(|s| s.to_str()).unwrap_or("report");
    let dir = out.parent().unwrap_or(std::path::Path::new("."));
    let mean = |label: &str, cs: &[&Case]| -> Option<f64> {
        let vals: Vec<f64> = cs
            .iter()
            .filter_map(|c| results.get(label)?.get(&c.id).map(Outcome::value))
            .collect();
        (!vals.is_empty()).then(|| vals.iter().sum::<f64>() / vals.len() as f64)
    };
    // Task groups: suite (and prompt mode) across lengths.
    let mut groups: BTreeMap<String, Vec<&Case>> = BTreeMap::new();
    for c in cases {
        let name = match c.mode {
            PromptMode::Chat => c.suite.name().to_string(),
            m => format!("{} ({})", c.suite.name(), m.name()),
        };
        groups.entry(name).or_default().push(c);
    }
    let mut budgets: Vec<f64> = variants.iter().filter_map(Variant::budget).collect();
    budgets.sort_by(f64::total_cmp);
    budgets.dedup();
    if budgets.len() >= 2 {
        let mut panels = Vec::new();
        for (name, cs) in &groups {
            let mut series: BTreeMap<String, Series> = BTreeMap::new();
            for v in variants {
                let Some(acc) = mean(&v.label(), cs) else {
                    continue;
                };
                let m = method_of(v);
                let s = series.entry(m.clone()).or_insert_with(|| Series {
                    label: m,
                    points: vec![],
                    reference: v.budget().is_none(),
                });
                s.points.push((v.budget().unwrap_or(0.0), 100.0 * acc));
            }
            for s in series.values_mut() {
                s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
            }
            panels.push((
                format!("{name} ({} cases)", cs.len()),
                series.into_values().collect(),
            ));
        }
        let svg = line_chart(
            "Accuracy vs KV budget (dashed: full attention; default = stock cache, full = OmniKV prefill)",
            &panels,
            "budget (fraction of the prompt)",
            &budgets,
            "accuracy (%)",
            (0.0, 100.0),
        );
        let file = format!("{stem}-budget.svg");
        std::fs::write(dir.join(&file), svg)?;
        md.push_str(&format!(
            "\n## Accuracy vs budget\n\n![accuracy vs budget]({file})\n"
        ));
    }
    let needle: Vec<&Case> = cases.iter().filter(|c| c.suite == Suite::Needle).collect();
    if !needle.is_empty() {
        let mut lengths: Vec<usize> = needle.iter().map(|c| c.length).collect();
        lengths.sort();
        lengths.dedup();
        let mut depths: Vec<u32> = needle.iter().filter_map(|c| c.depth).collect();
        depths.sort();
        depths.dedup();
        let grids: Vec<(String, Vec<Vec<Option<f64>>>)> = variants
            .iter()
            .map(|v| {
                let label = v.label();
                let cells = depths
                    .iter()
                    .map(|&d| {
                        lengths
                            .iter()
                            .map(|&l| {
                                let cs: Vec<&Case> = needle
                                    .iter()
                                    .copied()
                                    .filter(|c| c.length == l && c.depth == Some(d))
                                    .collect();
                                mean(&label, &cs)
                            })
                            .collect()
                    })
                    .collect();
                (label, cells)
            })
            .collect();
        let svg = heatmaps(
            "Needle in a haystack: accuracy (%) by depth and length",
            &grids,
            &depths
                .iter()
                .map(|d| format!("depth {d}%"))
                .collect::<Vec<_>>(),
            &lengths.iter().map(|l| format!("~{l}")).collect::<Vec<_>>(),
            "needle depth",
            "prompt length (tokens)",
        );
        let file = format!("{stem}-needle.svg");
        std::fs::write(dir.join(&file), svg)?;
        md.push_str(&format!(
            "\n## Needle in a haystack, depth x length\n\n![needle heatmaps]({file})\n"
        ));
    }
    md.push_str("\n## Speed per variant\n\nMedians over the cases each variant ran; decode speed is the server's `completion_tokens / total_completion_time_sec` (cases with at least two generated tokens), prompt time its `total_prompt_time_sec`. One request at a time.\n\n| variant | cases | median prompt tokens | median prompt time (s) | median decode tokens/s |\n|---|---|---|---|---|\n");
    for v in variants {
        let label = v.label();
        let Some(done) = results.get(&label) else {
            continue;
        };
        let mut toks: Vec<f64> = done.values().map(|o| o.prompt_tokens as f64).collect();
        let mut pt: Vec<f64> = done.values().map(|o| o.prompt_time_sec).collect();
        let mut ds: Vec<f64> = done.values().filter_map(Outcome::decode_tok_s).collect();
        let speed = if ds.is_empty() {
            "-".to_string()
        } else {
            format!("{:.1}", median(&mut ds))
        };
        md.push_str(&format!(
            "| {label} | {} | {:.0} | {:.1} | {speed} |\n",
            done.len(),
            median(&mut toks),
            median(&mut pt)
        ));
    }
    Ok(md)
}
