//! Every selector (`last`, `softmax_before_last`, `uniform`, `exp`) through
//! the real server, on the real model (GGUF, the host's preallocated prompt
//! cache) and on the tiny Llama-3.1 checkpoint (safetensors; offload too):
//! each answers with HTTP 200, and concurrent requests get exactly their solo
//! answers. Window selectors keep their past queries in a store of their own,
//! released with each sequence and counted in its release record.

use std::thread;
use std::time::Duration;

use integration_tests::{http, root, serial, tiny_model_args, tiny_prompts, Server};

const SELECTORS: [&str; 4] = ["last", "softmax_before_last", "uniform", "exp"];

/// A prompt of roughly `records * 14` tokens with one fact to retrieve.
fn records_prompt(records: usize, seed: usize) -> String {
    let colours = ["red", "blue", "green", "yellow", "black", "white", "purple"];
    let mut s = String::new();
    for i in 0..records {
        s.push_str(&format!(
            "Record {i}: the {} box is on shelf {}. ",
            colours[(i + seed) % colours.len()],
            (i * 13 + seed) % 97
        ));
    }
    s.push_str(&format!(
        "Question: which shelf holds the box of record {}? Answer briefly.",
        records / 2
    ));
    s
}

/// A config file for `selector` written next to the other temp files.
fn write_config(name: &str, json: serde_json::Value) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("omnikv-{name}-{}.json", std::process::id()));
    std::fs::write(&path, json.to_string()).unwrap();
    path
}

/// Solo answers, then all prompts at once: every request succeeds and each
/// concurrent answer equals its solo one. Returns the solo answers.
fn solo_and_concurrent(
    server: &Server,
    label: &str,
    prompts: &[String],
    max_tokens: usize,
) -> Vec<String> {
    let solo: Vec<String> = prompts
        .iter()
        .map(|p| {
            let c = server
                .chat(p, max_tokens)
                .unwrap_or_else(|e| panic!("{label}: solo request: {e}\n{}", server.log_tail()));
            assert!(c.completion_tokens > 0, "{label}: no tokens generated");
            c.text
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
                    "max_tokens": max_tokens,
                });
                http(
                    port,
                    "POST",
                    "/v1/chat/completions",
                    Some(&body.to_string()),
                )
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let (status, text) = h.join().unwrap().expect("request");
        assert_eq!(status, 200, "{label}: concurrent request {i}: {text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let got = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(got, solo[i], "{label}: prompt {i}, concurrent vs solo");
    }
    solo
}

/// Every sequence's release record: window selectors held exactly
/// `query_bytes` of past queries (0 for the others), and nothing is left
/// after the last release.
fn check_releases(server: &Server, label: &str, before: usize, requests: usize, query_bytes: u64) {
    let releases = server
        .wait_for_releases(before + requests, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    assert_eq!(
        releases.len(),
        before + requests,
        "{label}: one release per request"
    );
    let last = releases.last().unwrap();
    for r in &releases[before..] {
        assert_eq!(
            r.held_queries, query_bytes,
            "{label}: window queries of {r:?}"
        );
    }
    assert!(
        last.store_empty(),
        "{label}: something is still held: {last:?}"
    );
}

#[test]
fn every_selector_serves_the_real_model() {
    let _guard = serial();
    let base: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("configs/smollm2-135m.json")).unwrap(),
    )
    .unwrap();
    // 110-400 prompt tokens: at budget 0.1 every request selects.
    let prompts: Vec<String> = [8, 16, 28]
        .iter()
        .enumerate()
        .map(|(i, &n)| records_prompt(n, i))
        .collect();
    for selector in SELECTORS {
        let mut cfg = base.clone();
        cfg["selector_cls"] = selector.into();
        cfg["window_size"] = 16.into();
        let path = write_config(&format!("selector-{selector}"), cfg);
        let server = Server::start("omnikv", &["--kv-cache-config", path.to_str().unwrap()])
            .expect("server starts");
        // The start-up dummy run's sequence, if any.
        let before = server.store_releases().len();
        let answers = solo_and_concurrent(&server, selector, &prompts, 12);
        for a in &answers {
            assert!(
                a.chars().any(char::is_alphanumeric),
                "{selector}: answer {a:?} has no words"
            );
        }
        // SmolLM2-135M: 9 query heads of 64 values in the model's 2-byte
        // attention dtype, one window of 16 per filter layer of the config.
        let windowed = matches!(selector, "uniform" | "exp");
        let filters = omnikv_backend::OmniKvConfig::from_value(&base)
            .unwrap()
            .filter_layers
            .len() as u64;
        let query_bytes = if windowed {
            filters * 16 * 9 * 64 * 2
        } else {
            0
        };
        check_releases(&server, selector, before, 2 * prompts.len(), query_bytes);
        let _ = std::fs::remove_file(&path);
    }
}

#[test]
fn every_selector_serves_the_tiny_checkpoint() {
    let _guard = serial();
    let model = tiny_model_args();
    let prompts = tiny_prompts(&[24, 40, 64]);
    let mut runs: Vec<(String, bool)> = SELECTORS.iter().map(|s| (s.to_string(), false)).collect();
    // Offload keeps the sparse layer's rows in the host tier.
    runs.push(("exp".into(), true));
    for (selector, offload) in runs {
        let label = format!("tiny {selector}{}", if offload { " offload" } else { "" });
        let path = write_config(
            &format!("tiny-{selector}-{offload}"),
            serde_json::json!({
                "do_select_layers": "0",
                "num_wait_load_layers": 0,
                "num_of_selected_tokens": 0.25,
                "selector_cls": selector,
                "window_size": 4,
                "real_offload": offload,
            }),
        );
        let server = Server::start_model(
            "omnikv",
            &["--kv-cache-config", path.to_str().unwrap()],
            &model,
        )
        .expect("server starts");
        let before = server.store_releases().len();
        solo_and_concurrent(&server, &label, &prompts, 10);
        // Tiny model: 4 query heads of 16 f32 values, 1 filter layer, window 4.
        let windowed = matches!(selector.as_str(), "uniform" | "exp");
        check_releases(
            &server,
            &label,
            before,
            2 * prompts.len(),
            if windowed { 4 * 4 * 16 * 4 } else { 0 },
        );
        let _ = std::fs::remove_file(&path);
    }
}

#[test]
fn the_opt_in_selection_keys_serve_the_real_model() {
    // `selection_mass` and `selection_per_kv_head` through the real server:
    // every request answers, the concurrent answers equal the solo ones,
    // and nothing stays held.
    let _guard = serial();
    for (key, value) in [
        ("selection_mass", serde_json::json!(0.9)),
        ("selection_per_kv_head", serde_json::json!(true)),
    ] {
        let mut cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(root().join("configs/smollm2-135m.json")).unwrap(),
        )
        .unwrap();
        cfg["num_of_selected_tokens"] = 0.3.into();
        cfg[key] = value;
        let path = write_config(key, cfg);
        let server = Server::start("omnikv", &["--kv-cache-config", path.to_str().unwrap()])
            .expect("server starts");
        let before = server.store_releases().len();
        let prompts: Vec<String> = [8, 20]
            .iter()
            .enumerate()
            .map(|(i, &n)| records_prompt(n, i))
            .collect();
        for a in solo_and_concurrent(&server, key, &prompts, 12) {
            assert!(
                a.chars().any(char::is_alphanumeric),
                "{key}: answer {a:?} has no words"
            );
        }
        check_releases(&server, key, before, 2 * prompts.len(), 0);
        let _ = std::fs::remove_file(&path);
    }
}
