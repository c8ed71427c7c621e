//! `omnikv-eval`: fidelity of `--kv-cache omnikv` against full attention on
//! SmolLM2-135M, through the real server (see `integration_tests::eval`).
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
use integration_tests::eval::*;
use integration_tests::root;
use serde_json::Value;

struct Args {
    variants: Vec<Variant>,
    reference: Option<String>,
    config: PathBuf,
    suites: Vec<String>,
    needle_lengths: Vec<usize>,
    depths: Vec<u32>,
    two_stage_sizes: Vec<usize>,
    two_stage_per_size: usize,
    two_needle_lengths: Vec<usize>,
    out: PathBuf,
    cache: PathBuf,
    fresh: bool,
    title: String,
}

const USAGE: &str = "usage: omnikv-eval [options]
  --variants LIST         comma-separated: default | omnikv@<budget>[:key=value+key=value]
                          (extra OmniKV config keys, values as JSON)
                          (default: omnikv@1.0,omnikv@0.067,omnikv@0.1; `default`,
                          the stock cache, prefills long prompts ~17x slower)
  --reference LABEL       the variant others are compared with (default: the first)
  --config FILE           base OmniKV config (default: configs/smollm2-135m.json)
  --suites LIST           needle,2stage,2needle (default: all)
  --needle-lengths LIST   prompt lengths in tokens (default: 1000,3500,7000)
  --depths LIST           needle depths in percent (default: 0,25,50,75,100)
  --two-stage-sizes LIST  dictionary sizes (default: 250)
  --two-stage-per-size N  cases per size (default: 4)
  --two-needle-lengths L  (default: 2000,5000)
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
        reference: None,
        config: root().join("configs/smollm2-135m.json"),
        suites: vec!["needle".into(), "2stage".into(), "2needle".into()],
        needle_lengths: vec![1000, 3500, 7000],
        depths: vec![0, 25, 50, 75, 100],
        two_stage_sizes: vec![250],
        two_stage_per_size: 4,
        two_needle_lengths: vec![2000, 5000],
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
            "--reference" => a.reference = Some(val),
            "--config" => a.config = PathBuf::from(val),
            "--suites" => a.suites = list(&val, "--suites")?,
            "--needle-lengths" => a.needle_lengths = list(&val, "--needle-lengths")?,
            "--depths" => a.depths = list(&val, "--depths")?,
            "--two-stage-sizes" => a.two_stage_sizes = list(&val, "--two-stage-sizes")?,
            "--two-stage-per-size" => a.two_stage_per_size = val.parse()?,
            "--two-needle-lengths" => a.two_needle_lengths = list(&val, "--two-needle-lengths")?,
            "--out" => a.out = PathBuf::from(val),
            "--cache" => a.cache = PathBuf::from(val),
            "--title" => a.title = val,
            _ => bail!("unknown option `{flag}`\n{USAGE}"),
        }
    }
    a.variants = variants
        .split(',')
        .filter(|s| !s.is_empty())
        .map(Variant::parse)
        .collect::<Result<_>>()?;
    if a.variants.is_empty() {
        bail!("--variants is empty\n{USAGE}");
    }
    for s in &a.suites {
        if !["needle", "2stage", "2needle"].contains(&s.as_str()) {
            bail!("unknown suite `{s}`: expected needle, 2stage or 2needle");
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
    let need_haystack = args.suites.iter().any(|s| s != "2stage");
    let haystack = if need_haystack {
        load_haystack(&haystack_dir())?
    } else {
        String::new()
    };
    for s in &args.suites {
        match s.as_str() {
            "needle" => cases.extend(needle_cases(&haystack, &args.needle_lengths, &args.depths)),
            "2stage" => cases.extend(two_stage_cases(
                &args.two_stage_sizes,
                args.two_stage_per_size,
            )),
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
        let cfg_text = variant
            .config(&base)
            .map(|c| c.to_string())
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
            bar.set_message("starting server");
            let server = variant.start(&base, &scratch)?;
            for c in todo {
                bar.set_message(c.id.clone());
                let t = Instant::now();
                let got = server
                    .chat(&c.prompt, c.max_tokens)
                    .with_context(|| format!("{label} on {}:\n{}", c.id, server.log_tail()))?;
                let o = Outcome {
                    variant: label.clone(),
                    case: c.id.clone(),
                    key: key_of(c),
                    prompt_tokens: got.prompt_tokens,
                    correct: score(c, &got.text),
                    output: got.text,
                    prompt_time_sec: got.prompt_time_sec,
                    total_time_sec: t.elapsed().as_secs_f64(),
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
    let reference = args.reference.clone().unwrap_or_else(|| labels[0].clone());
    if !labels.contains(&reference) {
        bail!("--reference `{reference}` is not one of the variants {labels:?}");
    }
    let cmd: Vec<String> = std::env::args().skip(1).collect();
    let report = render_report(
        &args.title,
        &cases,
        &labels,
        &reference,
        &results,
        &format!("target/debug/omnikv-eval {}", cmd.join(" ")),
        &args.config,
    );
    println!("{report}");
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
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
    reference: &str,
    results: &BTreeMap<String, BTreeMap<String, Outcome>>,
    command: &str,
    config: &std::path::Path,
) -> String {
    let get = |label: &str, id: &str| results.get(label).and_then(|m| m.get(id));
    let mut buckets: BTreeMap<(Suite, usize), Vec<&Case>> = BTreeMap::new();
    for c in cases {
        buckets.entry((c.suite, c.length)).or_default().push(c);
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
        "Command: `{command}` (base OmniKV config `{config_name}`; each `omnikv@B` variant sets `num_of_selected_tokens` to B).\n\n"
    ));
    md.push_str("## Accuracy\n\n| suite | prompt tokens (mean) | cases |");
    for l in labels {
        md.push_str(&format!(" {l} |"));
    }
    md.push_str("\n|---|---|---|");
    md.push_str(&"---|".repeat(labels.len()));
    md.push('\n');
    let mut totals = vec![(0usize, 0usize); labels.len()];
    for ((suite, len), cs) in &buckets {
        let toks: Vec<usize> = cs
            .iter()
            .filter_map(|c| get(reference, &c.id).map(|o| o.prompt_tokens))
            .collect();
        let mean = if toks.is_empty() {
            0
        } else {
            toks.iter().sum::<usize>() / toks.len()
        };
        let size = if *suite == Suite::TwoStage {
            format!("{} ({len} entries)", suite.name())
        } else {
            format!("{} ~{len}", suite.name())
        };
        md.push_str(&format!("| {size} | {mean} | {} |", cs.len()));
        for (i, l) in labels.iter().enumerate() {
            let done: Vec<&Outcome> = cs.iter().filter_map(|c| get(l, &c.id)).collect();
            let k = done.iter().filter(|o| o.correct).count();
            totals[i].0 += k;
            totals[i].1 += done.len();
            md.push_str(&format!(" {} |", pct(k, done.len())));
        }
        md.push('\n');
    }
    md.push_str("| **all** | | |");
    for (k, n) in &totals {
        md.push_str(&format!(" **{}** |", pct(*k, *n)));
    }
    md.push('\n');
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
    md.push_str("\nAnswers (first 100 characters) are in the cache file next to the command's output; cases are generated deterministically by `integration_tests::eval`.\n");
    md
}
