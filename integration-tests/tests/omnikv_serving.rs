//! Through the real HTTP server: under `--kv-cache default`, concurrent
//! requests of different lengths get exactly their solo outputs; under
//! `--kv-cache omnikv` with the published config (budget 0.067, filter
//! layers 2,8,18), a repeated prompt of over 1,000 tokens that hits the
//! host's prefix cache gets the same output as the cold request.
//!
//! The same concurrency check under `omnikv` is `reliability.rs`'s (16
//! requests of 40 to 1,400 tokens with mixed budgets, in cache and with
//! offload), a superset of the eight prompts here; `same_answer.rs` checks
//! prefix-cache hits at several offsets and batches for every backend.

use std::thread;

use integration_tests::{root, serial, Server};

/// A prompt of roughly `records * 14` tokens with one fact to retrieve.
fn prompt(records: usize, seed: usize) -> String {
    let colours = ["red", "blue", "green", "yellow", "black", "white", "purple"];
    let mut s = String::new();
    for i in 0..records {
        s.push_str(&format!(
            "Record {i}: the {} box is on shelf {}. ",
            colours[(i + seed) % colours.len()],
            (i * 13 + seed) % 97
        ));
    }
    let target = records / 2 + seed % 3;
    s.push_str(&format!(
        "Question: which shelf holds the box of record {target}? Answer briefly."
    ));
    s
}

fn config() -> String {
    root().join("configs/example.json").display().to_string()
}

/// Eight prompts of different lengths, solo and then all at once.
fn check_concurrency(backend: &str, extra: &[&str]) {
    let _guard = serial();
    let mut args = vec!["--prefix-cache-n", "0"];
    args.extend_from_slice(extra);
    let server = Server::start(backend, &args).expect("server starts");
    let prompts: Vec<String> = [3, 5, 8, 12, 16, 20, 25, 30]
        .iter()
        .enumerate()
        .map(|(i, &n)| prompt(n, i))
        .collect();
    let solo: Vec<_> = prompts
        .iter()
        .map(|p| {
            server
                .chat(p, 24)
                .unwrap_or_else(|e| panic!("solo: {e}\n{}", server.log_tail()))
        })
        .collect();
    let port = server.port;
    let handles: Vec<_> = prompts
        .iter()
        .cloned()
        .map(|p| {
            thread::spawn(move || {
                let body = serde_json::json!({
                    "model": "default",
                    "messages": [{"role": "user", "content": p}],
                    "temperature": 0.0,
                    "max_tokens": 24,
                });
                integration_tests::http(
                    port,
                    "POST",
                    "/v1/chat/completions",
                    Some(&body.to_string()),
                )
            })
        })
        .collect();
    let mut failures = Vec::new();
    for (i, h) in handles.into_iter().enumerate() {
        let (status, text) = h.join().unwrap().expect("request");
        assert_eq!(status, 200, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let got = v["choices"][0]["message"]["content"].as_str().unwrap();
        if got != solo[i].text {
            failures.push(format!(
                "prompt {i} ({} tokens):\n  solo:       {:?}\n  concurrent: {got:?}",
                solo[i].prompt_tokens, solo[i].text
            ));
        }
    }
    assert!(failures.is_empty(), "{backend}:\n{}", failures.join("\n"));
}

#[test]
fn concurrent_requests_match_solo_outputs_default() {
    check_concurrency("default", &[]);
}

#[test]
fn prefix_cache_hit_matches_cold_request() {
    let _guard = serial();
    // Two questions about the same long list of records: after the first, the
    // second reuses the cached records (prompt positions) from the host's
    // prefix cache. Its output must equal a cold run on a server without a
    // prefix cache.
    let records = prompt(80, 5);
    let records = &records[..records.find("Question:").unwrap()];
    let ask = |target: usize| {
        format!("{records}Question: which shelf holds the box of record {target}? Answer briefly.")
    };
    let warm = {
        let server =
            Server::start("omnikv", &["--kv-cache-config", &config()]).expect("server starts");
        let first = server.chat(&ask(41), 32).unwrap();
        let warm = server.chat(&ask(17), 32).unwrap();
        assert!(
            first.prompt_tokens > 1000,
            "{} prompt tokens",
            first.prompt_tokens
        );
        // A prefix-cache hit skips most of the prompt pass.
        assert!(
            warm.prompt_time_sec < first.prompt_time_sec / 3.0,
            "the shared records did not hit the prefix cache (prompt time {:.2} s, then {:.2} s)",
            first.prompt_time_sec,
            warm.prompt_time_sec
        );
        warm
    };
    let cold = {
        let server = Server::start(
            "omnikv",
            &["--kv-cache-config", &config(), "--prefix-cache-n", "0"],
        )
        .expect("server starts");
        server.chat(&ask(17), 32).unwrap()
    };
    assert_eq!(cold.text, warm.text, "cold vs prefix-cache hit");
}
