//! `omnikv-peers`: this project against llama.cpp, the engine a user who
//! wants long-context inference on a CPU would pick, on the same GGUF, the
//! same CPU and the same thread count, in one run.
//!
//! For each prompt depth and repeat it measures, alternating which side goes
//! first:
//! - llama.cpp: `llama-bench` (flash attention on) decoding `--decode-tokens`
//!   tokens after a context of the same number of tokens as our prompt
//!   (`-d`), and the prefill of that many tokens (`-p`) at the prefill
//!   depths;
//! - this project through the real server (`--kv-cache omnikv` with the
//!   calibrated config): full attention (`"kv_cache": {"enabled": false}`)
//!   and OmniKV at each budget (`"kv_cache": {"budget": b}`), one request
//!   each on the same fresh prompt; the first request of a prompt pays its
//!   prefill (that is the prefill figure, the same kernels for every
//!   variant), the others find it in the prefix cache; and the stock
//!   mistral.rs cache (`--kv-cache default`, its own server) where
//!   affordable.
//!
//! Every row also gets the memory-bandwidth bound of a decode step: the
//! bytes it must read (the GGUF's weights plus the f16 KV rows each layer
//! attends to: every row in dense layers, the selection plus the generated
//! rows in OmniKV's sparse layers, from the request's own
//! `usage.kv_cache_stats`) over the machine's read bandwidth, measured in
//! the same run.
//!
//! ```text
//! target/debug/omnikv-peers --repeats 3          # writes results/peers.md and results/peers.svg
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use omnikv_eval::bench_format::{count_tokens, gguf_tokenizer};
use omnikv_eval::eval::{machine_description, median};
use omnikv_eval::plot::{line_chart, Series};
use omnikv_eval::root;
use omnikv_eval::server::{model_dir, Server, MODEL_FILE};
use serde_json::{json, Value};

const USAGE: &str = "usage: omnikv-peers [options]
  --depths LIST         prompt depths in tokens for decode (default 40,2000,4000,7500)
  --prefill LIST        of those, the depths whose prefill time is reported (default 2000,7500)
  --repeats N           alternating repeats per cell (default 3; medians are reported)
  --decode-tokens N     tokens decoded per measurement (default 64)
  --budgets LIST        OmniKV budgets (default 0.05,0.1,0.2)
  --stock-max-depth N   measure the stock mistral.rs cache up to this depth (default 2000; 0: never)
  --threads N           threads for llama.cpp; the server's come from the config (default 2)
  --llama-bench PATH    llama.cpp's llama-bench (default: built by scripts/build-llama-cpp.sh)
  --config FILE         OmniKV config the server runs (default configs/smollm2-135m.json)
  --out FILE            Markdown report (default results/peers.md; plot next to it; every
                        sample in results/cache/peers-samples.json)
  --bandwidth-only      print this machine's read bandwidth and exit";

struct Args {
    depths: Vec<usize>,
    prefill: Vec<usize>,
    repeats: usize,
    decode_tokens: usize,
    budgets: Vec<f64>,
    stock_max_depth: usize,
    threads: usize,
    llama_bench: Option<PathBuf>,
    config: PathBuf,
    out: PathBuf,
}

fn list<T: std::str::FromStr>(flag: &str, v: &str) -> Result<Vec<T>>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    v.split(',')
        .map(|x| x.trim().parse::<T>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("{flag} {v}: expected a comma-separated list of numbers"))
}

fn parse_args() -> Result<Option<Args>> {
    let mut a = Args {
        depths: vec![40, 2000, 4000, 7500],
        prefill: vec![2000, 7500],
        repeats: 3,
        decode_tokens: 64,
        budgets: vec![0.05, 0.1, 0.2],
        stock_max_depth: 2000,
        threads: 2,
        llama_bench: None,
        config: root().join("configs/smollm2-135m.json"),
        out: root().join("results/peers.md"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            return Ok(None);
        }
        if flag == "--bandwidth-only" {
            println!("{:.2} GB/s", read_bandwidth(a.threads) / 1e9);
            return Ok(None);
        }
        let v = it
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--depths" => a.depths = list(&flag, &v)?,
            "--prefill" => a.prefill = list(&flag, &v)?,
            "--repeats" => a.repeats = v.parse().context("--repeats")?,
            "--decode-tokens" => a.decode_tokens = v.parse().context("--decode-tokens")?,
            "--budgets" => a.budgets = list(&flag, &v)?,
            "--stock-max-depth" => a.stock_max_depth = v.parse().context("--stock-max-depth")?,
            "--threads" => a.threads = v.parse().context("--threads")?,
            "--llama-bench" => a.llama_bench = Some(PathBuf::from(v)),
            "--config" => a.config = PathBuf::from(v),
            "--out" => a.out = PathBuf::from(v),
            _ => bail!("unknown option `{flag}`\n{USAGE}"),
        }
    }
    if a.repeats == 0 || a.decode_tokens == 0 || a.depths.is_empty() {
        bail!("--repeats, --decode-tokens and --depths must be positive\n{USAGE}");
    }
    if let Some(p) = a.prefill.iter().find(|p| !a.depths.contains(p)) {
        bail!("--prefill {p} is not one of --depths (the prefill is timed on the depth prompts)");
    }
    if let Some(b) = a.budgets.iter().find(|b| !(**b > 0.0 && **b <= 1.0)) {
        bail!("--budgets {b}: a budget here is a fraction in (0, 1]");
    }
    Ok(Some(a))
}

/// llama.cpp's `llama-bench`: the path given, or the one
/// `scripts/build-llama-cpp.sh` builds (or has built) under target/.
fn llama_bench(given: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p);
    }
    eprintln!("omnikv-peers: building or finding llama-bench (scripts/build-llama-cpp.sh)");
    let out = Command::new("bash")
        .arg(root().join("scripts/build-llama-cpp.sh"))
        .output()
        .context("run scripts/build-llama-cpp.sh")?;
    if !out.status.success() {
        bail!(
            "scripts/build-llama-cpp.sh failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string();
    Ok(PathBuf::from(path))
}

/// One `llama-bench` measurement (one repetition): seconds and tokens/s.
fn llama(bin: &Path, threads: usize, args: &[String]) -> Result<(f64, f64)> {
    let model = model_dir().join(MODEL_FILE);
    let out = Command::new(bin)
        .arg("-m")
        .arg(&model)
        .args([
            "-t",
            &threads.to_string(),
            "-fa",
            "1",
            "-r",
            "1",
            "-o",
            "json",
        ])
        .args(args)
        .output()
        .with_context(|| format!("run {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "llama-bench {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("llama-bench JSON output")?;
    let t = &v[0];
    match (t["avg_ns"].as_f64(), t["avg_ts"].as_f64()) {
        (Some(ns), Some(ts)) => Ok((ns / 1e9, ts)),
        _ => bail!("llama-bench printed no avg_ns/avg_ts: {v}"),
    }
}

/// Read bandwidth of this machine in bytes/s: the best of five passes of
/// `threads` threads summing their share of a 512 MiB buffer (eight
/// independent sums per thread, so the loop is bound by memory, not by one
/// chain of additions; this crate is built at opt-level 3).
fn read_bandwidth(threads: usize) -> f64 {
    let words: usize = 64 << 20; // 512 MiB of u64
    let buf: Vec<u64> = (0..words as u64).collect();
    let mut best = 0f64;
    for _ in 0..5 {
        let t = Instant::now();
        let sum: u64 = std::thread::scope(|s| {
            buf.chunks(words.div_ceil(threads))
                .map(|c| {
                    s.spawn(move || {
                        let mut acc = [0u64; 8];
                        for block in c.chunks_exact(8) {
                            for (a, &x) in acc.iter_mut().zip(block) {
                                *a = a.wrapping_add(x);
                            }
                        }
                        acc.iter().fold(0u64, |a, &x| a.wrapping_add(x))
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|h| h.join().unwrap_or(0))
                .fold(0u64, u64::wrapping_add)
        });
        std::hint::black_box(sum);
        best = best.max((words * 8) as f64 / t.elapsed().as_secs_f64());
    }
    best
}

/// The model's shape as the bound needs it, from the GGUF header.
struct Shape {
    layers: usize,
    /// f16 bytes of one token's K and V rows in one layer.
    kv_row_bytes: usize,
    weight_bytes: u64,
}

fn model_shape() -> Result<Shape> {
    use candle_core::quantized::gguf_file::Content;
    let path = model_dir().join(MODEL_FILE);
    let mut f = std::fs::File::open(&path).with_context(|| format!("open {}", path.display()))?;
    let c = Content::read(&mut f).context("read the GGUF header")?;
    let get = |k: &str| -> Result<usize> {
        Ok(c.metadata
            .get(k)
            .with_context(|| format!("GGUF has no {k}"))?
            .to_u32()? as usize)
    };
    let layers = get("llama.block_count")?;
    let heads = get("llama.attention.head_count")?;
    let kv_heads = get("llama.attention.head_count_kv")?;
    let hidden = get("llama.embedding_length")?;
    let weight_bytes = c
        .tensor_infos
        .values()
        .map(|t| {
            (t.shape.elem_count() / t.ggml_dtype.block_size() * t.ggml_dtype.type_size()) as u64
        })
        .sum();
    Ok(Shape {
        layers,
        kv_row_bytes: 2 * kv_heads * (hidden / heads) * 2,
        weight_bytes,
    })
}

/// The dense layers of the OmniKV config (pre-filter, filter and wait-load
/// layers attend to every row at a decode step).
fn dense_layers(config: &Value, layers: usize) -> Result<usize> {
    let cfg = omnikv_backend::OmniKvConfig::from_value(config)
        .map_err(|e| anyhow::anyhow!("{}", e))
        .context("the OmniKV config")?;
    Ok(omnikv_backend::omnikv::plan::LayerPlan::new(&cfg, layers)?.dense_layers())
}

/// About `target` prompt tokens (chat template included) of records with
/// one question; `salt` makes every repeat's text different.
fn prompt(tok: &tokenizers::Tokenizer, target: usize, salt: usize) -> Result<String> {
    let colours = ["red", "blue", "green", "white", "black", "yellow"];
    let record = |i: usize| {
        format!(
            "Record {i}-{salt}: the {} box is on shelf {}. ",
            colours[(i + salt) % colours.len()],
            (i * 7 + salt) % 101
        )
    };
    if target < 100 {
        return Ok("What is the capital of Japan? Answer in a long paragraph.".into());
    }
    let question = "List every record about a red box, one per line, with its shelf.";
    // SmolLM2's chat template adds about 30 tokens around the message.
    let want = target.saturating_sub(30 + count_tokens(tok, question)?);
    let mut s = String::new();
    let mut i = 0;
    while count_tokens(tok, &s)? < want {
        // Grow in steps of ~32 records, then one at a time near the end.
        let step = if count_tokens(tok, &s)? + 600 < want {
            32
        } else {
            1
        };
        for _ in 0..step {
            s.push_str(&record(i));
            i += 1;
        }
    }
    s.push_str(question);
    Ok(s)
}

#[derive(Clone, Copy, PartialEq)]
enum Method {
    Llama,
    Full,
    OmniKv(f64),
    Stock,
}

impl Method {
    fn label(self) -> String {
        match self {
            Method::Llama => "llama.cpp".into(),
            Method::Full => "full attention".into(),
            Method::OmniKv(b) => format!("OmniKV {b}"),
            Method::Stock => "stock mistral.rs".into(),
        }
    }
}

#[derive(Default, Clone)]
struct Cell {
    decode: Vec<f64>,
    /// Bytes one decode step reads (mean over the request's steps).
    step_bytes: Vec<f64>,
    /// Share of the decode passes spent scoring and selecting (OmniKV,
    /// from the request's `usage.kv_cache_stats`).
    selection_share: Vec<f64>,
}

fn main() -> Result<()> {
    let Some(args) = parse_args()? else {
        return Ok(());
    };
    let bench = llama_bench(args.llama_bench.clone())?;
    let shape = model_shape()?;
    let base: Value = serde_json::from_str(
        &std::fs::read_to_string(&args.config)
            .with_context(|| format!("read {}", args.config.display()))?,
    )?;
    let dense = dense_layers(&base, shape.layers)?;
    let tok = gguf_tokenizer(&model_dir().join(MODEL_FILE))?;
    let bw_before = read_bandwidth(args.threads);

    let config_arg = args.config.display().to_string();
    let server = Server::start("omnikv", &["--kv-cache-config", &config_arg])?;
    let stock = if args.stock_max_depth > 0 {
        Some(Server::start("default", &[])?)
    } else {
        None
    };
    let mut methods = vec![Method::Llama, Method::Full];
    methods.extend(args.budgets.iter().map(|&b| Method::OmniKv(b)));
    if stock.is_some() {
        methods.push(Method::Stock);
    }
    let nd = args.depths.len();
    let mut cells = vec![vec![Cell::default(); methods.len()]; nd];
    let mut tokens = vec![0usize; nd];
    let mut ours_prefill = vec![Vec::new(); nd];
    let mut llama_prefill = vec![Vec::new(); nd];
    let mut stock_prefill = vec![Vec::new(); nd];
    let per_repeat: usize = args
        .depths
        .iter()
        .map(|&d| {
            methods
                .iter()
                .filter(|m| **m != Method::Stock || d <= args.stock_max_depth)
                .count()
                + usize::from(args.prefill.contains(&d))
        })
        .sum();
    let bar = ProgressBar::new((per_repeat * args.repeats) as u64).with_style(
        ProgressStyle::with_template("[{bar:30}] {pos}/{len} {elapsed_precise} eta {eta} {msg}")?
            .progress_chars("=> "),
    );
    let plain_log = !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut salt = 0;
    for r in 0..args.repeats {
        for (di, &depth) in args.depths.iter().enumerate() {
            salt += 1;
            let text = prompt(&tok, depth, salt)?;
            // Ours first on even repeats (the first one learns the token
            // count llama.cpp is then given), llama.cpp first on odd ones.
            let ours_first = r % 2 == 0 || tokens[di] == 0;
            for side in if ours_first { [0, 1] } else { [1, 0] } {
                if side == 1 {
                    let n = tokens[di];
                    bar.set_message(format!("llama.cpp at {n} tokens"));
                    if plain_log {
                        eprintln!("omnikv-peers: llama.cpp at {n} tokens (repeat {r})");
                    }
                    let (_, ts) = llama(
                        &bench,
                        args.threads,
                        &[
                            "-p".into(),
                            "0".into(),
                            "-n".into(),
                            args.decode_tokens.to_string(),
                            "-d".into(),
                            n.to_string(),
                        ],
                    )?;
                    cells[di][0].decode.push(ts);
                    cells[di][0].step_bytes.push(
                        shape.weight_bytes as f64
                            + (shape.layers * shape.kv_row_bytes) as f64
                                * (n as f64 + args.decode_tokens as f64 / 2.0),
                    );
                    bar.inc(1);
                    if args.prefill.contains(&depth) {
                        let (s, _) = llama(
                            &bench,
                            args.threads,
                            &[
                                "-p".into(),
                                n.to_string(),
                                "-n".into(),
                                "0".into(),
                                "--no-warmup".into(),
                            ],
                        )?;
                        llama_prefill[di].push(s);
                        bar.inc(1);
                    }
                    continue;
                }
                // Our variants, rotated so no one always goes first.
                let ours: Vec<usize> = (1..methods.len())
                    .filter(|&m| methods[m] != Method::Stock || depth <= args.stock_max_depth)
                    .collect();
                let k = ours.len();
                let mut prefilled = false;
                for j in 0..k {
                    let mi = ours[(j + r) % k];
                    let m = methods[mi];
                    bar.set_message(format!("{} at {depth} tokens", m.label()));
                    if plain_log {
                        eprintln!("omnikv-peers: {} at {depth} tokens (repeat {r})", m.label());
                    }
                    let mut body = json!({
                        "model": "default",
                        "messages": [{"role": "user", "content": text}],
                        "temperature": 0.0,
                        "max_tokens": args.decode_tokens,
                    });
                    let srv = match m {
                        Method::Full => {
                            body["kv_cache"] = json!({"enabled": false});
                            &server
                        }
                        Method::OmniKv(b) => {
                            body["kv_cache"] = json!({"budget": b, "stats": true});
                            &server
                        }
                        _ => stock.as_ref().context("no stock server")?,
                    };
                    let (status, resp) = srv.post("/v1/chat/completions", &body)?;
                    if status != 200 {
                        bail!(
                            "{} at {depth}: HTTP {status}: {resp}\n{}",
                            m.label(),
                            srv.log_tail()
                        );
                    }
                    let v: Value = serde_json::from_str(&resp)?;
                    let u = &v["usage"];
                    let prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0) as usize;
                    let gen = u["completion_tokens"].as_u64().unwrap_or(0) as f64;
                    let ct = u["total_completion_time_sec"].as_f64().unwrap_or(0.0);
                    let pt = u["total_prompt_time_sec"].as_f64().unwrap_or(0.0);
                    tokens[di] = prompt_tokens;
                    // The first request on this prompt paid its prefill;
                    // the stock server always does (its own cache).
                    if !prefilled && m != Method::Stock {
                        ours_prefill[di].push(pt);
                        prefilled = true;
                    }
                    if m == Method::Stock && args.prefill.contains(&depth) {
                        stock_prefill[di].push(pt);
                    }
                    if gen < args.decode_tokens as f64 / 2.0 {
                        eprintln!(
                            "omnikv-peers: {} at {depth} stopped after {gen} tokens",
                            m.label()
                        );
                    }
                    cells[di][mi].decode.push(gen / ct.max(1e-9));
                    let n = prompt_tokens as f64;
                    let g = gen / 2.0;
                    let rows = match m {
                        Method::OmniKv(_) => {
                            let s = &u["kv_cache_stats"];
                            let steps = s["decode_steps"].as_f64().unwrap_or(0.0);
                            let frac = s["mean_selected_fraction"].as_f64().unwrap_or(1.0);
                            let secs = s["decode_seconds"].as_f64().unwrap_or(0.0);
                            if secs > 0.0 {
                                cells[di][mi]
                                    .selection_share
                                    .push(s["selection_seconds"].as_f64().unwrap_or(0.0) / secs);
                            }
                            if steps > 0.0 {
                                dense as f64 * (n + g)
                                    + (shape.layers - dense) as f64 * (frac * n + g)
                            } else {
                                shape.layers as f64 * (n + g)
                            }
                        }
                        _ => shape.layers as f64 * (n + g),
                    };
                    cells[di][mi]
                        .step_bytes
                        .push(shape.weight_bytes as f64 + rows * shape.kv_row_bytes as f64);
                    bar.inc(1);
                }
            }
        }
    }
    bar.finish();
    let bw_after = read_bandwidth(args.threads);
    let bw = bw_before.max(bw_after);

    // Report.
    let rel = |p: &Path| p.strip_prefix(root()).unwrap_or(p).display().to_string();
    let mut md = format!(
        "# This project against llama.cpp on the same CPU\n\n\
Machine: {}. Model: SmolLM2-135M-Instruct Q4_1 GGUF ({:.1} MB of weights), {} threads on both sides.\n\n\
- llama.cpp: `llama-bench` built by `scripts/build-llama-cpp.sh` (the sources of the `llama-cpp-python` sdist pinned there, Release, `GGML_NATIVE`), flash attention on, `-r 1` per measurement; decode is `-p 0 -n {} -d N` (the context filled with N tokens first, untimed), prefill `-p N -n 0 --no-warmup`.\n\
- This project: the real server (`mistralrs serve --kv-cache omnikv --kv-cache-config {}`, prefix cache on), one greedy chat request of `max_tokens` {} per variant on the same fresh prompt (`\"kv_cache\": {{\"enabled\": false}}` for full attention, `{{\"budget\": b}}` for OmniKV); decode speed is the server's completion tokens over completion time; the prefill is the first request's prompt time on that prompt (every variant's prompt pass runs the same kernels). The stock cache is `--kv-cache default` on its own server, up to `--stock-max-depth`; its request's prompt time is its prefill figure.\n\
- N is the server's prompt token count (chat template included) for the depth asked.\n\
- Medians of {} alternating repeats. Bound: the machine's read bandwidth ({:.1} GB/s, best of 5 passes of {} threads over 512 MiB, before and after the run: {:.1} and {:.1} GB/s) over the bytes one decode step must read: the weights plus the f16 KV rows attended ({} dense layers of {} for OmniKV, the rest reading the selection, whose size comes from the request's `usage.kv_cache_stats`, plus the generated rows).\n\n\
Command: `target/debug/omnikv-peers {}`\n\n",
        machine_description(),
        shape.weight_bytes as f64 / 1e6,
        args.threads,
        args.decode_tokens,
        rel(&args.config),
        args.decode_tokens,
        args.repeats,
        bw / 1e9,
        args.threads,
        bw_before / 1e9,
        bw_after / 1e9,
        dense,
        shape.layers,
        std::env::args().skip(1).collect::<Vec<_>>().join(" "),
    );
    md.push_str(
        "## Decode (tokens/s; in brackets: share of the bandwidth bound)\n\n| prompt tokens |",
    );
    for m in &methods {
        md.push_str(&format!(" {} |", m.label()));
    }
    for m in methods.iter().skip(1) {
        md.push_str(&format!(" {} / llama.cpp |", m.label()));
    }
    md.push_str("\n|---|");
    md.push_str(&"---|".repeat(2 * methods.len() - 1));
    md.push('\n');
    let mut series: Vec<Series> = methods
        .iter()
        .map(|m| Series {
            label: m.label(),
            points: Vec::new(),
            reference: false,
        })
        .collect();
    let mut ymax = 1f64;
    for di in 0..nd {
        md.push_str(&format!("| {} |", tokens[di]));
        let meds: Vec<f64> = (0..methods.len())
            .map(|mi| median(&mut cells[di][mi].decode.clone()))
            .collect();
        for (mi, &d) in meds.iter().enumerate() {
            if d.is_nan() {
                md.push_str(" - |");
                continue;
            }
            let bytes = median(&mut cells[di][mi].step_bytes.clone());
            let bound = bw / bytes;
            md.push_str(&format!(
                " {d:.1} ({:.0}% of {bound:.0}) |",
                100.0 * d / bound
            ));
            series[mi].points.push((tokens[di] as f64, d));
            ymax = ymax.max(d);
        }
        for &d in meds.iter().skip(1) {
            if d.is_nan() {
                md.push_str(" - |");
            } else {
                md.push_str(&format!(" {:.2}x |", d / meds[0]));
            }
        }
        md.push('\n');
    }
    let budgets: Vec<(usize, f64)> = methods
        .iter()
        .enumerate()
        .filter_map(|(mi, m)| match m {
            Method::OmniKv(b) => Some((mi, *b)),
            _ => None,
        })
        .collect();
    if !budgets.is_empty() {
        md.push_str("\n## Selection's share of an OmniKV decode step\n\nScoring and top-k at the filter layers over the whole decode pass (`selection_seconds / decode_seconds` of the request's `usage.kv_cache_stats`); medians.\n\n| prompt tokens |");
        for (_, b) in &budgets {
            md.push_str(&format!(" OmniKV {b} |"));
        }
        md.push_str("\n|---|");
        md.push_str(&"---|".repeat(budgets.len()));
        md.push('\n');
        for di in 0..nd {
            md.push_str(&format!("| {} |", tokens[di]));
            for &(mi, _) in &budgets {
                let share = median(&mut cells[di][mi].selection_share.clone());
                if share.is_nan() {
                    md.push_str(" - |");
                } else {
                    md.push_str(&format!(" {:.1}% |", 100.0 * share));
                }
            }
            md.push('\n');
        }
    }
    md.push_str("\n## Prefill (seconds)\n\n| prompt tokens | llama.cpp | this project | stock mistral.rs | this project / llama.cpp (speed) | stock mistral.rs / llama.cpp (speed) |\n|---|---|---|---|---|---|\n");
    for (di, &depth) in args.depths.iter().enumerate() {
        if !args.prefill.contains(&depth) {
            continue;
        }
        let l = median(&mut llama_prefill[di].clone());
        let o = median(&mut ours_prefill[di].clone());
        let st = median(&mut stock_prefill[di].clone());
        let (st_s, st_r) = if st.is_nan() {
            ("-".to_string(), "-".to_string())
        } else {
            (format!("{st:.1}"), format!("{:.2}x", l / st))
        };
        md.push_str(&format!(
            "| {} | {l:.1} | {o:.1} | {st_s} | {:.2}x | {st_r} |\n",
            tokens[di],
            l / o
        ));
    }
    let samples = root().join("results/cache/peers-samples.json");
    if let Some(dir) = samples.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let raw = json!({
        "command": std::env::args().skip(1).collect::<Vec<_>>(),
        "bandwidth_bytes_per_s": [bw_before, bw_after],
        "prompt_tokens": tokens,
        "methods": methods.iter().map(|m| m.label()).collect::<Vec<_>>(),
        "decode_tok_s": cells.iter().map(|row| row.iter().map(|c| c.decode.clone()).collect::<Vec<_>>()).collect::<Vec<_>>(),
        "step_bytes": cells.iter().map(|row| row.iter().map(|c| c.step_bytes.clone()).collect::<Vec<_>>()).collect::<Vec<_>>(),
        "prefill_s": {"llama.cpp": llama_prefill, "this project": ours_prefill, "stock mistral.rs": stock_prefill},
        "selection_share": cells.iter().map(|row| row.iter().map(|c| c.selection_share.clone()).collect::<Vec<_>>()).collect::<Vec<_>>(),
    });
    std::fs::write(&samples, serde_json::to_string_pretty(&raw)?)?;
    let plot = args.out.with_extension("svg");
    let max_x = tokens.iter().copied().max().unwrap_or(1) as f64;
    let ticks: Vec<f64> = (0..=4).map(|i| max_x * i as f64 / 4.0).collect();
    let svg = line_chart(
        "Decode speed against prompt depth, same CPU, same GGUF",
        &[("decode tokens/s".to_string(), series)],
        "prompt tokens",
        &ticks,
        "tokens/s",
        (0.0, ymax * 1.1),
    );
    md.push_str(&format!(
        "\n![decode speed against prompt depth]({})\n",
        plot.file_name().unwrap_or_default().to_string_lossy()
    ));
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&plot, svg)?;
    std::fs::write(&args.out, &md)?;
    println!("{md}");
    eprintln!("wrote {} and {}", args.out.display(), plot.display());
    Ok(())
}
