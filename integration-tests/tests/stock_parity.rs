//! Greedy outputs through the real HTTP server match unpatched mistral.rs
//! 0.8.1 (the committed fixture), for the stock cache (`default`) and for
//! `omnikv`, on five short prompts and one of 2,775 tokens.
//!
//! `omnikv` runs with a budget of 100% of the prompt here (and at this stage
//! attends densely in every layer anyway), so it must reproduce the stock
//! tokens exactly.

use integration_tests::{serial, stock_fixture, Server};

fn check_backend(backend: &str, extra: &[&str]) {
    let _guard = serial();
    let fixture = stock_fixture().expect("fixture");
    let max_tokens = fixture["request"]["max_tokens"].as_u64().unwrap() as usize;
    let server = Server::start(backend, extra).expect("server starts");
    let mut failures = Vec::new();
    for case in fixture["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let want = case["output"].as_str().unwrap();
        let got = server
            .chat(prompt, max_tokens)
            .unwrap_or_else(|e| panic!("{backend}: request failed: {e}\n{}", server.log_tail()));
        assert_eq!(
            got.prompt_tokens,
            case["prompt_tokens"].as_u64().unwrap() as usize,
            "{backend}: prompt token count for {:?}",
            &prompt[..prompt.len().min(40)]
        );
        if got.text != want
            || got.completion_tokens != case["completion_tokens"].as_u64().unwrap() as usize
        {
            failures.push(format!(
                "prompt ({} tokens) {:?}:\n  stock:  {want:?}\n  {backend}: {:?}",
                got.prompt_tokens,
                &prompt[..prompt.len().min(60)],
                got.text
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{backend} differs from stock mistral.rs 0.8.1:\n{}",
        failures.join("\n")
    );
}

#[test]
fn default_backend_matches_stock_mistralrs() {
    check_backend("default", &[]);
}

#[test]
fn omnikv_full_budget_matches_stock_mistralrs() {
    let config =
        integration_tests::root().join("integration-tests/fixtures/omnikv-full-budget.json");
    check_backend("omnikv", &["--kv-cache-config", config.to_str().unwrap()]);
}
