//! The token-dropping baselines through the real server: `--kv-cache h2o`,
//! `--kv-cache streaming` and `--kv-cache snapkv` at a 10% budget hold a fraction of the rows the
//! stock cache holds for the same request (their memory accounting, checked
//! against the request's own token counts), free everything when a request
//! ends, and still answer short prompts sensibly.

use std::time::Duration;

use integration_tests::{serial, stock_fixture, Server};

/// SmolLM2-135M: 30 layers, 3 KV heads, head dim 64, f32 cache on CPU.
const LAYERS: u64 = 30;
const KV_HEADS: u64 = 3;

fn filler(sentences: usize) -> String {
    let subjects = [
        "The river",
        "A small boat",
        "The old bridge",
        "Every morning the market",
        "The lighthouse",
    ];
    let verbs = ["carried", "watched", "crossed", "welcomed", "guided"];
    let objects = [
        "the fishermen",
        "a quiet crowd",
        "the autumn fog",
        "travellers from the hills",
        "the evening light",
    ];
    (0..sentences)
        .map(|i| {
            format!(
                "{} {} {}.",
                subjects[i % 5],
                verbs[(i / 5) % 5],
                objects[(i / 25) % 5]
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn baselines_hold_fewer_rows_and_answer_short_prompts() {
    let _guard = serial();
    let fixture = stock_fixture().unwrap();
    let japan = fixture["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["prompt"] == "What is the capital of Japan?")
        .expect("fixture case")
        .clone();
    let dir = std::env::temp_dir().join(format!("omnikv-baselines-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for backend in ["h2o", "streaming", "snapkv"] {
        let cfg = dir.join(format!("{backend}.json"));
        std::fs::write(&cfg, r#"{"budget": 0.1}"#).unwrap();
        let server = Server::start(backend, &["--kv-cache-config", cfg.to_str().unwrap()]).unwrap();
        let warmup = server.evict_releases().len();

        // A long prompt: a tenth of its rows (or the 32-row floor) per layer
        // and KV head remain.
        let long = format!(
            "{}\n\nWhat does the lighthouse do? Answer in one sentence.",
            filler(120)
        );
        let done = server.chat(&long, 16).unwrap();
        let r = server
            .wait_for_evict_releases(warmup + 1, Duration::from_secs(30))
            .unwrap();
        let r = r.last().unwrap();
        assert_eq!(r.backend, backend);
        let positions = (done.prompt_tokens + done.completion_tokens - 1) as u64;
        assert_eq!(
            r.positions, positions,
            "{backend}: positions seen = prompt + generated - 1"
        );
        // The stock cache keeps every position in every layer and KV head.
        let stock_rows = positions * LAYERS * KV_HEADS;
        assert_eq!(r.full_rows, stock_rows);
        let kept = match backend {
            // SnapKV compresses the prompt (window 32 + at least 32 voted
            // rows) and keeps every generated row.
            "snapkv" => {
                (done.prompt_tokens as u64 / 10).max(64) + done.completion_tokens as u64 - 1
            }
            _ => (done.prompt_tokens as u64 / 10).max(32),
        };
        assert_eq!(r.rows, kept * LAYERS * KV_HEADS, "{backend}: {r:?}");
        assert!(
            r.rows * 5 < stock_rows,
            "{backend} holds {} rows, stock {stock_rows}",
            r.rows
        );
        assert_eq!(r.live, 0, "{backend}: nothing held after the request");
        eprintln!(
            "{backend}: {} prompt tokens, {} rows held ({}), stock cache {} rows; answer {:?}",
            done.prompt_tokens, r.rows, r.bytes, stock_rows, done.text
        );

        // Short prompts: evicted down to the 32-row floor while decoding.
        let c = server.chat("What is the capital of Japan?", 48).unwrap();
        assert!(
            c.text.contains("Tokyo"),
            "{backend}: {:?} (stock: {})",
            c.text,
            japan["output"]
        );
        let c = server
            .chat("Write two sentences about the ocean.", 48)
            .unwrap();
        assert!(
            c.text.to_lowercase().contains("ocean"),
            "{backend}: {:?}",
            c.text
        );
        assert!(c.completion_tokens >= 10, "{backend}: {:?}", c.text);
        let after = server
            .wait_for_evict_releases(warmup + 3, Duration::from_secs(30))
            .unwrap();
        assert!(after.iter().all(|r| r.live == 0), "{backend}: {after:?}");
        assert!(!server.log_contains("panicked"), "{}", server.log_tail());
    }
}
