//! `omnikv-soak`: many sequential short requests against one real server
//! with `--kv-cache omnikv` and `real_offload`, on the loopback interface.
//!
//! After every request it waits for the backend's store release line and
//! checks that no sequence holds rows any more; it samples the server's
//! resident memory after a warm-up and at the end, counts errors and panics,
//! and writes a Markdown report.
//!
//! ```text
//! target/debug/omnikv-soak --requests 1000            # results/reliability.md
//! ```
//!
//! Exits non-zero if a request failed, the server panicked, the store was
//! not empty after a request, or RSS grew more than `--max-rss-growth`
//! percent after the warm-up.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use omnikv_eval::eval::machine_description;
use omnikv_eval::{root, Server};
use serde_json::{json, Value};

const USAGE: &str = "usage: omnikv-soak [options]
  --requests N          sequential requests (default 1000)
  --warmup N            requests before the first RSS sample (default requests/10, at least 5)
  --max-rss-growth PCT  allowed RSS growth after warm-up, percent (default 5)
  --config FILE         base OmniKV config (default configs/smollm2-135m.json; real_offload is switched on)
  --out FILE            Markdown report (default results/reliability.md)";

/// Short prompts, different lengths and contents (about 35 to 120 tokens).
fn prompt(i: usize) -> String {
    let topics = [
        "What is the capital of Japan?",
        "Write two sentences about the ocean.",
        "Name three colours of the rainbow.",
        "Explain what a KV cache is in one sentence.",
        "Count from one to ten in words.",
    ];
    let mut s = String::new();
    for r in 0..(i % 6) {
        s.push_str(&format!(
            "Note {r}-{i}: shelf {} holds box {}. ",
            (r * 7 + i) % 31,
            i % 97
        ));
    }
    s.push_str(topics[i % topics.len()]);
    s
}

struct Args {
    requests: usize,
    warmup: Option<usize>,
    max_rss_growth: f64,
    config: PathBuf,
    out: PathBuf,
}

fn parse_args() -> Result<Option<Args>> {
    let mut a = Args {
        requests: 1000,
        warmup: None,
        max_rss_growth: 5.0,
        config: root().join("configs/smollm2-135m.json"),
        out: root().join("results/reliability.md"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .with_context(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            "--requests" => a.requests = value()?.parse().context("--requests")?,
            "--warmup" => a.warmup = Some(value()?.parse().context("--warmup")?),
            "--max-rss-growth" => {
                a.max_rss_growth = value()?.parse().context("--max-rss-growth")?
            }
            "--config" => a.config = value()?.into(),
            "--out" => a.out = value()?.into(),
            other => bail!("unknown option {other}\n{USAGE}"),
        }
    }
    if a.requests == 0 {
        bail!("--requests must be at least 1");
    }
    Ok(Some(a))
}

fn main() -> Result<()> {
    let Some(args) = parse_args()? else {
        return Ok(());
    };
    let warmup = args
        .warmup
        .unwrap_or((args.requests / 10).max(5))
        .min(args.requests - 1);
    let mut cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(&args.config)
            .with_context(|| format!("read {}", args.config.display()))?,
    )?;
    cfg["real_offload"] = json!(true);
    let cfg_path = std::env::temp_dir().join(format!("omnikv-soak-{}.json", std::process::id()));
    std::fs::write(&cfg_path, cfg.to_string())?;

    let server = Server::start("omnikv", &["--kv-cache-config", cfg_path.to_str().unwrap()])?;
    let base_releases = server.store_releases().len();
    let rss_start = server.rss_kib()?;
    let bar = ProgressBar::new(args.requests as u64).with_style(
        ProgressStyle::with_template("[{bar:30}] {pos}/{len} {elapsed_precise} eta {eta} {msg}")
            .unwrap(),
    );
    let started = Instant::now();
    let (mut served, mut errors, mut empty_after) = (0usize, 0usize, 0usize);
    let mut rss_warm = None;
    let mut rss_max = rss_start;
    let mut first_error = None;
    for i in 0..args.requests {
        let body = json!({
            "model": "default",
            "messages": [{"role": "user", "content": prompt(i)}],
            "temperature": 0.0,
            "max_tokens": 8,
        });
        match server.chat_request(&body) {
            Ok(_) => served += 1,
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("request {i}: {e:#}"));
            }
        }
        let releases = server.wait_for_releases(base_releases + i + 1, Duration::from_secs(30))?;
        if releases.last().is_some_and(|r| r.store_empty()) {
            empty_after += 1;
        }
        let rss = server.rss_kib()?;
        rss_max = rss_max.max(rss);
        if i + 1 == warmup {
            rss_warm = Some(rss);
        }
        bar.set_message(format!("RSS {} MiB, errors {errors}", rss / 1024));
        bar.inc(1);
    }
    bar.finish();
    let elapsed = started.elapsed();
    let rss_end = server.rss_kib()?;
    let rss_warm = rss_warm.unwrap_or(rss_start);
    let growth = 100.0 * (rss_end as f64 - rss_warm as f64) / rss_warm as f64;
    let log = std::fs::read_to_string(server.log_path()).unwrap_or_default();
    let panics = log.matches("panicked").count();
    drop(server);

    let command = format!(
        "target/debug/omnikv-soak {}",
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    );
    let mib = |k: u64| format!("{:.1} MiB", k as f64 / 1024.0);
    let report = format!(
        "# Soak: sequential short requests, `omnikv` with `real_offload`\n\n\
         Machine: {machine}. Model: SmolLM2-135M-Instruct Q4_1 (GGUF), `configs/smollm2-135m.json` with \
         `real_offload: true`, debug build of the patched `mistralrs serve` on 127.0.0.1. \
         Requests: greedy chat completions, prompts of about 35 to 120 tokens, `max_tokens` 8, one at a time.\n\n\
         Command: `{command}`\n\n\
         | what | value |\n|---|---|\n\
         | requests served | {served} |\n\
         | errors returned | {errors} |\n\
         | panics | {panics} |\n\
         | store empty after each request | {empty_after} of {requests} |\n\
         | RSS at start | {rss_start} |\n\
         | RSS after warm-up ({warmup} requests) | {rss_warm_s} |\n\
         | RSS at the end | {rss_end_s} |\n\
         | RSS growth after warm-up | {growth:+.2}% (limit {limit}%) |\n\
         | RSS peak | {rss_max_s} |\n\
         | wall time | {secs:.0} s ({per:.2} s per request) |\n{err}",
        machine = machine_description(),
        requests = args.requests,
        rss_start = mib(rss_start),
        rss_warm_s = mib(rss_warm),
        rss_end_s = mib(rss_end),
        rss_max_s = mib(rss_max),
        limit = args.max_rss_growth,
        secs = elapsed.as_secs_f64(),
        per = elapsed.as_secs_f64() / args.requests as f64,
        err = first_error
            .as_ref()
            .map(|e| format!("\nFirst error: {e}\n"))
            .unwrap_or_default(),
    );
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, &report)?;
    println!("{report}");
    println!("wrote {}", args.out.display());
    if errors > 0 || panics > 0 || empty_after != args.requests || growth > args.max_rss_growth {
        bail!(
            "soak failed: {errors} errors, {panics} panics, store empty after {empty_after} of {} requests, RSS growth {growth:+.2}%",
            args.requests
        );
    }
    Ok(())
}
