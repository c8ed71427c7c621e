//! The first answer a new user sees: the README's question ("What is the
//! capital of Japan?", 37 prompt tokens) through every KV-cache backend in
//! the configuration it ships with. `make serve` runs `omnikv` with
//! `configs/serve.json`, whose floor of 256 selected rows
//! (`min_selected_tokens`, results/short-prompt-floor.md) reads a short
//! prompt whole: the answer equals full attention's and names Tokyo.

use integration_tests::{root, serial, Server};
use serde_json::json;

const QUESTION: &str = "What is the capital of Japan?";

fn ask(server: &Server, options: Option<serde_json::Value>) -> String {
    let mut body = json!({
        "model": "default",
        "messages": [{"role": "user", "content": QUESTION}],
        "temperature": 0.0,
        "max_tokens": 48,
    });
    if let Some(o) = options {
        body["kv_cache"] = o;
    }
    server
        .chat_request(&body)
        .unwrap_or_else(|e| panic!("{e}\n{}", server.log_tail()))
        .text
}

#[test]
fn every_backend_answers_the_readme_question() {
    let _guard = serial();
    let serve = root().join("configs/serve.json").display().to_string();
    for (backend, extra) in [
        ("default", vec![]),
        ("omnikv", vec!["--kv-cache-config", serve.as_str()]),
        ("h2o", vec![]),
        ("streaming", vec![]),
        ("snapkv", vec![]),
    ] {
        let server = Server::start(backend, &extra).expect("server starts");
        let answer = ask(&server, None);
        assert!(
            answer.contains("Tokyo"),
            "{backend}: the README's question answered {answer:?}"
        );
        if backend == "omnikv" {
            assert_eq!(
                answer,
                ask(&server, Some(json!({"enabled": false}))),
                "omnikv with configs/serve.json vs full attention"
            );
        }
    }
}

#[test]
fn the_published_budget_alone_is_still_reachable() {
    let _guard = serial();
    // configs/example.json keeps the published behaviour (no floor): on a
    // 37-token prompt it selects 2 rows and its answer differs from full
    // attention's; the floor is an explicit setting, not a hidden change.
    let example = root().join("configs/example.json").display().to_string();
    let server = Server::start("omnikv", &["--kv-cache-config", &example]).expect("server starts");
    assert_ne!(
        ask(&server, None),
        ask(&server, Some(json!({"enabled": false})))
    );
}
