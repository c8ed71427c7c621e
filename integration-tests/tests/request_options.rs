//! Per-request control of the KV-cache backend through the `kv_cache` field
//! of an OpenAI chat request (host patch `0003-per-request-kv-cache-options`).
//!
//! On an `omnikv` server at budget 0.067:
//! - `{"enabled": false}` decodes with full attention: on the 2,775-token
//!   fixture prompt it gives the output of `{"budget": 1.0}`;
//! - `{"budget": 1}` (one prompt token) changes that output;
//! - requests with different options served at once each get their solo
//!   output;
//! - malformed options are refused with 422 and a message naming the key,
//!   and the server keeps serving.
//! A `default` server refuses the field (the stock cache takes no options).

use std::thread;

use integration_tests::{http, root, serial, stock_fixture, Server};
use serde_json::{json, Value};

fn request(prompt: &str, max_tokens: usize, kv_cache: Option<Value>) -> Value {
    let mut body = json!({
        "model": "default",
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0.0,
        "max_tokens": max_tokens,
    });
    if let Some(k) = kv_cache {
        body["kv_cache"] = k;
    }
    body
}

fn text(status: u16, body: &str) -> String {
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(body).unwrap();
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The stock fixture's 2,775-token prompt.
fn long_fixture_prompt(fixture: &Value) -> String {
    fixture["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["prompt_tokens"].as_u64().unwrap() > 2000)
        .unwrap()["prompt"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn omnikv_request_options() {
    let _guard = serial();
    let fixture = stock_fixture().unwrap();
    let max_tokens = fixture["request"]["max_tokens"].as_u64().unwrap() as usize;
    let prompt = &long_fixture_prompt(&fixture);
    let config = root().join("configs/example.json");
    let server = Server::start(
        "omnikv",
        &[
            "--kv-cache-config",
            config.to_str().unwrap(),
            "--prefix-cache-n",
            "0",
        ],
    )
    .expect("server starts");
    let ask = |kv: Option<Value>| {
        let (s, b) = server
            .post("/v1/chat/completions", &request(prompt, max_tokens, kv))
            .unwrap();
        text(s, &b)
    };
    let dense = ask(Some(json!({"enabled": false})));
    let full = ask(Some(json!({"budget": 1.0})));
    assert_eq!(
        dense, full,
        "`enabled: false` must decode with full attention"
    );
    let one = ask(Some(json!({"budget": 1})));
    assert_ne!(one, dense, "`budget: 1` must change the selection");
    let configured = ask(None);

    // Different options at once: each request gets its solo output.
    let port = server.port;
    let cases = [
        (None, configured.clone()),
        (Some(json!({"enabled": false})), dense.clone()),
        (Some(json!({"budget": 1})), one.clone()),
    ];
    let handles: Vec<_> = cases
        .iter()
        .map(|(kv, _)| {
            let body = request(prompt, max_tokens, kv.clone()).to_string();
            thread::spawn(move || http(port, "POST", "/v1/chat/completions", Some(&body)))
        })
        .collect();
    for (h, (kv, want)) in handles.into_iter().zip(&cases) {
        let (s, b) = h.join().unwrap().unwrap();
        assert_eq!(
            &text(s, &b),
            want,
            "concurrent request with kv_cache {kv:?}"
        );
    }

    // Malformed options: 422 naming the problem, nothing else affected.
    for (bad, needle) in [
        (json!({"budget": 0}), "budget"),
        (json!({"budget": 1.5}), "budget"),
        (json!({"budget": "lots"}), "budget"),
        (json!({"enabled": "no"}), "enabled"),
        (json!({"bugdet": 0.1}), "unknown key `bugdet`"),
        (json!([0.1]), "must be an object"),
    ] {
        let (s, b) = server
            .post("/v1/chat/completions", &request("Hi", 4, Some(bad.clone())))
            .unwrap();
        assert_eq!(s, 422, "{bad}: {b}");
        assert!(b.contains(needle), "{bad}: {b}");
    }
    let (s, b) = server
        .post(
            "/v1/chat/completions",
            &request("What is the capital of Japan?", 8, None),
        )
        .unwrap();
    assert!(!text(s, &b).is_empty());
}

#[test]
fn default_backend_refuses_request_options() {
    let _guard = serial();
    let server = Server::start("default", &[]).expect("server starts");
    let (s, b) = server
        .post(
            "/v1/chat/completions",
            &request("Hi", 4, Some(json!({"budget": 0.1}))),
        )
        .unwrap();
    assert_eq!(s, 422, "{b}");
    assert!(b.contains("takes no per-request options"), "{b}");
    let (s, b) = server
        .post("/v1/chat/completions", &request("Hi", 4, None))
        .unwrap();
    assert!(!text(s, &b).is_empty());
}

/// `omnikv-eval --variants full` (issue 15, item 4): the `omnikv` server
/// with the base config, each request sending `{"enabled": false}`, in both
/// prompt modes. Its answer is full attention's (`{"budget": 1.0}`), not the
/// base config's one-row selection, so the tool really sends the field.
#[test]
fn the_eval_full_variant_decodes_densely() {
    use omnikv_eval::eval::{Case, PromptMode, Suite, Variant};
    let _guard = serial();
    let prompt = long_fixture_prompt(&stock_fixture().unwrap());
    let full = Variant::parse("full").unwrap();
    let mut base: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("configs/example.json")).unwrap(),
    )
    .unwrap();
    base["num_of_selected_tokens"] = json!(1);
    let scratch = std::env::temp_dir().join(format!("omnikv-full-variant-{}", std::process::id()));
    let server = full.start(&base, &scratch).expect("server starts");
    let options = full.request_kv_cache();
    assert_eq!(options, Some(json!({"enabled": false})));
    for mode in [PromptMode::Chat, PromptMode::Plain] {
        let case = Case {
            id: "fixture-long".into(),
            suite: Suite::Needle,
            length: 2775,
            depth: None,
            // A raw completion continues text: end on an open sentence.
            prompt: match mode {
                PromptMode::Plain => format!("{prompt}\n\nIn short, the text above says that"),
                _ => prompt.clone(),
            },
            answer: String::new(),
            distractors: vec![],
            max_tokens: 12,
            mode,
        };
        let ask = |kv: Option<&Value>| server.ask_with(&case, kv).unwrap().text;
        let variant = ask(options.as_ref());
        let dense = ask(Some(&json!({"budget": 1.0})));
        assert!(!dense.is_empty(), "{mode:?}: an answer to compare");
        let one_row = ask(None);
        assert_eq!(
            variant, dense,
            "{mode:?}: `full` decodes with full attention"
        );
        assert_ne!(
            variant, one_row,
            "{mode:?}: one selected row changes the answer, so `full` did send its options"
        );
    }
    let _ = std::fs::remove_dir_all(&scratch);
}
