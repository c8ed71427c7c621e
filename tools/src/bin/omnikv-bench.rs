//! `omnikv-bench`: prefill time and decode speed of the stock cache against
//! OmniKV on SmolLM2-135M through the real server, A/B in one run.
//!
//! Both servers run at once (prefix cache off); for every prompt length and
//! repeat the variants are measured alternately on a fresh prompt (each
//! request has its own records, so nothing is cached across requests).
//! Reports medians and ratios, writes a Markdown table and an SVG plot.
//!
//! ```text
//! target/debug/omnikv-bench --lengths 2000,4300,6800 --repeats 2
//! ```

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use omnikv_eval::eval::{machine_description, median, Variant};
use omnikv_eval::root;
use serde_json::Value;

const USAGE: &str = "usage: omnikv-bench [options]
  --lengths LIST        target prompt lengths (default 2000,4300,6800); prompts come
                        out about 10-17% longer, the report gives the server's
                        counts: 6800 is about 8,000 tokens, the most SmolLM2's 8,192
                        context holds with 64 decode tokens
  --repeats N           measurements per length and variant (default 1)
  --decode-tokens N     max_tokens per request (default 64)
  --variants LIST       as omnikv-eval (default default,omnikv@0.1)
  --config FILE         base OmniKV config (default configs/smollm2-135m.json)
  --out FILE            Markdown report (default target/omnikv-bench.md; plot next to it;
                        results/peers.md is the committed speed report)";

/// About `tokens` tokens of records with one question; `salt` makes every
/// request's text different.
fn prompt(tokens: usize, salt: usize) -> String {
    let colours = ["red", "blue", "green", "white", "black", "yellow"];
    // One record is about 16 tokens.
    let n = tokens / 16;
    let mut s = String::new();
    for i in 0..n {
        s.push_str(&format!(
            "Record {i}-{salt}: the {} box is on shelf {}. ",
            colours[(i + salt) % colours.len()],
            (i * 7 + salt) % 101
        ));
    }
    s.push_str("List every record about a red box, one per line, with its shelf.");
    s
}

fn main() -> Result<()> {
    let mut lengths = vec![2000usize, 4300, 6800];
    let mut repeats = 1usize;
    let mut decode_tokens = 64usize;
    let mut variants = "default,omnikv@0.1".to_string();
    let mut config = root().join("configs/smollm2-135m.json");
    let mut out = root().join("target/omnikv-bench.md");
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            return Ok(());
        }
        let v = it
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--lengths" => {
                lengths = v
                    .split(',')
                    .map(|x| x.trim().parse())
                    .collect::<Result<_, _>>()
                    .context("--lengths")?
            }
            "--repeats" => repeats = v.parse()?,
            "--decode-tokens" => decode_tokens = v.parse()?,
            "--variants" => variants = v,
            "--config" => config = PathBuf::from(v),
            "--out" => out = PathBuf::from(v),
            _ => bail!("unknown option `{flag}`\n{USAGE}"),
        }
    }
    let variants: Vec<Variant> = variants
        .split(',')
        .map(Variant::parse)
        .collect::<Result<_>>()?;
    let base: Value = serde_json::from_str(&std::fs::read_to_string(&config)?)?;
    let scratch = root().join("results/cache/configs");
    let servers = variants
        .iter()
        .map(|v| v.start_with(&base, &scratch, &["--prefix-cache-n", "0"]))
        .collect::<Result<Vec<_>>>()?;
    let labels: Vec<String> = variants.iter().map(Variant::label).collect();
    // (length, variant) -> (prefill s, decode tok/s, prompt tokens)
    let mut prefill = vec![vec![Vec::new(); variants.len()]; lengths.len()];
    let mut decode = vec![vec![Vec::new(); variants.len()]; lengths.len()];
    let mut tokens = vec![0usize; lengths.len()];
    let bar = ProgressBar::new((lengths.len() * repeats * variants.len()) as u64).with_style(
        ProgressStyle::with_template("[{bar:30}] {pos}/{len} {elapsed_precise} eta {eta} {msg}")
            .unwrap()
            .progress_chars("=> "),
    );
    let mut salt = 0;
    for (li, &len) in lengths.iter().enumerate() {
        for r in 0..repeats {
            // Alternate which variant goes first.
            let mut order: Vec<usize> = (0..variants.len()).collect();
            if r % 2 == 1 {
                order.reverse();
            }
            for vi in order {
                salt += 1;
                bar.set_message(format!("{} at {len} tokens", labels[vi]));
                if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                    eprintln!("omnikv-bench: {} at {len} tokens (repeat {r})", labels[vi]);
                }
                let c = servers[vi]
                    .chat(&prompt(len, salt), decode_tokens)
                    .with_context(|| format!("{}:\n{}", labels[vi], servers[vi].log_tail()))?;
                tokens[li] = c.prompt_tokens;
                prefill[li][vi].push(c.prompt_time_sec);
                decode[li][vi].push(c.completion_tokens as f64 / c.completion_time_sec.max(1e-9));
                bar.inc(1);
            }
        }
    }
    bar.finish();
    let mut md = format!(
        "# Decode and prefill: stock cache vs OmniKV on SmolLM2-135M\n\nMachine: {}. Model: SmolLM2-135M-Instruct Q4_1 GGUF through the patched `mistralrs serve` (prefix cache off), greedy, `max_tokens` {decode_tokens}; base config `{}`. Command: `target/debug/omnikv-bench {}`.\n\nMedians over {repeats} run(s) per cell, variants alternating. Decode speed is the server's completion tokens over completion time.\n\n| prompt tokens |",
        machine_description(),
        config.strip_prefix(root()).unwrap_or(&config).display(),
        std::env::args().skip(1).collect::<Vec<_>>().join(" "),
    );
    for l in &labels {
        md.push_str(&format!(" {l} prefill (s) | {l} decode (tok/s) |"));
    }
    if labels.len() == 2 {
        md.push_str(" prefill speed-up | decode speed-up |");
    }
    md.push_str("\n|---|");
    md.push_str(&"---|---|".repeat(labels.len()));
    if labels.len() == 2 {
        md.push_str("---|---|");
    }
    md.push('\n');
    let mut pts: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); labels.len()];
    for li in 0..lengths.len() {
        md.push_str(&format!("| {} |", tokens[li]));
        let mut meds = Vec::new();
        for vi in 0..labels.len() {
            let p = median(&mut prefill[li][vi]);
            let d = median(&mut decode[li][vi]);
            meds.push((p, d));
            pts[vi].push((tokens[li] as f64, p, d));
            md.push_str(&format!(" {p:.1} | {d:.1} |"));
        }
        if meds.len() == 2 {
            md.push_str(&format!(
                " {:.1}x | {:.2}x |",
                meds[0].0 / meds[1].0,
                meds[1].1 / meds[0].1
            ));
        }
        md.push('\n');
    }
    let plot = out.with_extension("svg");
    md.push_str(&format!(
        "\n![decode speed and prefill time vs prompt length]({})\n",
        plot.file_name().unwrap().to_string_lossy()
    ));
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&plot, plot_svg(&labels, &pts))?;
    std::fs::write(&out, &md)?;
    println!("{md}");
    eprintln!("wrote {} and {}", out.display(), plot.display());
    Ok(())
}

/// Two panels: decode tokens/s and prefill seconds against prompt tokens.
fn plot_svg(labels: &[String], pts: &[Vec<(f64, f64, f64)>]) -> String {
    let colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
    let (pw, ph, m) = (320.0, 220.0, 50.0);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
        2.0 * (pw + m) + m,
        ph + 2.0 * m + 20.0
    );
    let xmax = pts.iter().flatten().map(|p| p.0).fold(1.0, f64::max);
    for (panel, (title, pick)) in [("decode tokens/s", 2usize), ("prefill seconds", 1usize)]
        .into_iter()
        .enumerate()
    {
        let x0 = m + panel as f64 * (pw + m);
        let y0 = m;
        let val = |p: &(f64, f64, f64)| if pick == 2 { p.2 } else { p.1 };
        let ymax = pts.iter().flatten().map(val).fold(1e-9, f64::max) * 1.1;
        svg.push_str(&format!(
            "<text x=\"{x0}\" y=\"{}\" font-size=\"13\">{title}</text>\n<rect x=\"{x0}\" y=\"{y0}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#888\"/>\n",
            y0 - 10.0
        ));
        for i in 0..=4 {
            let v = ymax * i as f64 / 4.0;
            let y = y0 + ph - ph * i as f64 / 4.0;
            svg.push_str(&format!(
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{v:.0}</text>\n",
                x0 - 4.0,
                y + 4.0
            ));
            let x = xmax * i as f64 / 4.0;
            svg.push_str(&format!(
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{x:.0}</text>\n",
                x0 + pw * i as f64 / 4.0,
                y0 + ph + 15.0
            ));
        }
        svg.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">prompt tokens</text>\n",
            x0 + pw / 2.0,
            y0 + ph + 30.0
        ));
        for (vi, series) in pts.iter().enumerate() {
            let c = colours[vi % colours.len()];
            let path: Vec<String> = series
                .iter()
                .map(|p| {
                    format!(
                        "{:.1},{:.1}",
                        x0 + pw * p.0 / xmax,
                        y0 + ph - ph * val(p) / ymax
                    )
                })
                .collect();
            svg.push_str(&format!(
                "<polyline points=\"{}\" fill=\"none\" stroke=\"{c}\" stroke-width=\"2\"/>\n",
                path.join(" ")
            ));
            for p in series {
                svg.push_str(&format!(
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{c}\"/>\n",
                    x0 + pw * p.0 / xmax,
                    y0 + ph - ph * val(p) / ymax
                ));
            }
            if panel == 0 {
                svg.push_str(&format!(
                    "<text x=\"{}\" y=\"{}\" fill=\"{c}\">{}</text>\n",
                    x0 + 8.0,
                    y0 + 16.0 + 14.0 * vi as f64,
                    labels[vi]
                ));
            }
        }
    }
    svg.push_str("</svg>\n");
    svg
}
