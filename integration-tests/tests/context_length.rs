//! Generation that reaches the model's context length ends cleanly with
//! `finish_reason: "length"` and the tokens that fit: for `default`, `omnikv`
//! (with and without offload) and a token-dropping backend (`h2o`), plain and
//! streamed, without `max_tokens`, for a prompt one token short of the
//! context, on a prefix-cache hit and in a concurrent batch; the server keeps
//! serving. And with `RUST_BACKTRACE=1` in the server's environment, a failed
//! pass answers with an error message free of backtrace frames.
//!
//! The tiny Llama-3.1 checkpoint has a context of 256 tokens and a
//! word-level tokenizer (`t3` .. `t255`, one token each), so prompts near
//! the limit are cheap and exact. Its end-of-sequence token is biased away
//! (`logit_bias`), so every request runs until a length limit.

use std::thread;

use integration_tests::{http, serial, tiny_model_args, Server};
use serde_json::{json, Value};

const CONTEXT: usize = 256;

/// `n` words of the tiny vocabulary.
fn words(n: usize, seed: usize) -> String {
    (0..n)
        .map(|i| format!("t{}", (i * 37 + seed * 11) % 250 + 3))
        .collect::<Vec<_>>()
        .join(" ")
}

fn body(prompt: &str, max_tokens: Option<usize>, stream: bool) -> Value {
    let mut b = json!({
        "model": "default",
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0.0,
        "logit_bias": {"2": -100.0},
        "stream": stream,
    });
    if let Some(m) = max_tokens {
        b["max_tokens"] = m.into();
    }
    b
}

/// The outcome of a chat request: text, finish reason, usage.
#[derive(Debug, Clone, PartialEq)]
struct Outcome {
    text: String,
    finish: String,
    prompt_tokens: usize,
    completion_tokens: usize,
}

fn parse_plain(status: u16, text: &str) -> Outcome {
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(text).unwrap();
    Outcome {
        text: v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string(),
        finish: v["choices"][0]["finish_reason"]
            .as_str()
            .unwrap_or("")
            .to_string(),
        prompt_tokens: v["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
        completion_tokens: v["usage"]["completion_tokens"].as_u64().unwrap() as usize,
    }
}

/// A streamed answer: the content pieces joined, the last finish reason, the
/// usage of the chunk that carries it; the stream must end with `[DONE]`.
fn parse_stream(status: u16, text: &str) -> Outcome {
    assert_eq!(status, 200, "{text}");
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(
        events.last(),
        Some(&"[DONE]"),
        "stream without [DONE]:\n{text}"
    );
    let mut out = Outcome {
        text: String::new(),
        finish: String::new(),
        prompt_tokens: 0,
        completion_tokens: 0,
    };
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap_or_else(|_| panic!("bad event {e:?}"));
        assert!(v.get("error").is_none(), "error in stream: {e}");
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            out.text.push_str(c);
        }
        if let Some(f) = v["choices"][0]["finish_reason"].as_str() {
            out.finish = f.to_string();
        }
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            out.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0) as usize;
            out.completion_tokens = u["completion_tokens"].as_u64().unwrap_or(0) as usize;
        }
    }
    out
}

fn chat(server: &Server, body: &Value) -> Outcome {
    let (status, text) = server.post("/v1/chat/completions", body).unwrap();
    if body["stream"].as_bool() == Some(true) {
        parse_stream(status, &text)
    } else {
        parse_plain(status, &text)
    }
}

/// Words whose chat prompt is exactly `tokens` tokens long (the template
/// adds a fixed number of tokens, measured once).
fn prompt_of(server: &Server, tokens: usize, seed: usize) -> String {
    let probe = chat(server, &body(&words(10, seed), Some(1), false));
    let overhead = probe.prompt_tokens - 10;
    let p = words(tokens - overhead, seed);
    assert_eq!(
        chat(server, &body(&p, Some(1), false)).prompt_tokens,
        tokens,
        "prompt sizing"
    );
    p
}

fn check_backend(label: &str, backend: &str, config: Option<Value>) {
    let _guard = serial();
    let cfg_path = config.map(|c| {
        let p =
            std::env::temp_dir().join(format!("omnikv-ctx-{label}-{}.json", std::process::id()));
        std::fs::write(&p, c.to_string()).unwrap();
        p
    });
    let mut extra = Vec::new();
    if let Some(p) = &cfg_path {
        extra = vec!["--kv-cache-config".to_string(), p.display().to_string()];
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let server = Server::start_model(backend, &extra, &tiny_model_args()).expect("server starts");

    // Context - 20 with `max_tokens` 100: the 20 tokens that fit.
    let near = prompt_of(&server, CONTEXT - 20, 1);
    let plain = chat(&server, &body(&near, Some(100), false));
    assert_eq!(
        (
            plain.finish.as_str(),
            plain.prompt_tokens,
            plain.completion_tokens
        ),
        ("length", CONTEXT - 20, 20),
        "{label}: plain {plain:?}\n{}",
        server.log_tail()
    );
    let streamed = chat(&server, &body(&near, Some(100), true));
    assert_eq!(streamed.finish, "length", "{label}: streamed {streamed:?}");
    assert_eq!(streamed.text, plain.text, "{label}: streamed vs plain text");

    // Without `max_tokens`: capped by the context.
    let open = chat(&server, &body(&near, None, false));
    assert_eq!(
        (open.finish.as_str(), open.completion_tokens, &open.text),
        ("length", 20, &plain.text),
        "{label}: without max_tokens"
    );

    // A prompt one token short of the context: one token.
    let full = prompt_of(&server, CONTEXT - 1, 2);
    let one = chat(&server, &body(&full, Some(50), false));
    assert_eq!(
        (one.finish.as_str(), one.completion_tokens),
        ("length", 1),
        "{label}: prompt of context - 1"
    );

    // Again (a prefix-cache hit where the backend allows one): same answer.
    let again = chat(&server, &body(&near, Some(100), false));
    assert_eq!(again, plain, "{label}: repeated request");

    // Two near-limit requests and a short one at once: each as alone.
    let other = prompt_of(&server, CONTEXT - 7, 3);
    let other_solo = chat(&server, &body(&other, Some(100), false));
    assert_eq!(other_solo.completion_tokens, 7, "{label}: {other_solo:?}");
    let short_solo = chat(&server, &body(&words(12, 4), Some(9), false));
    let port = server.port;
    let handles: Vec<_> = [
        body(&near, Some(100), false),
        body(&other, Some(100), true),
        body(&words(12, 4), Some(9), false),
    ]
    .into_iter()
    .map(|b| {
        thread::spawn(move || {
            http(port, "POST", "/v1/chat/completions", Some(&b.to_string())).unwrap()
        })
    })
    .collect();
    let got: Vec<Outcome> = handles
        .into_iter()
        .enumerate()
        .map(|(i, h)| {
            let (status, text) = h.join().unwrap();
            if i == 1 {
                parse_stream(status, &text)
            } else {
                parse_plain(status, &text)
            }
        })
        .collect();
    assert_eq!(got[0], plain, "{label}: batched near-limit request");
    assert_eq!(
        (got[1].text.as_str(), got[1].finish.as_str()),
        (other_solo.text.as_str(), "length"),
        "{label}: batched streamed near-limit request"
    );
    assert_eq!(got[2], short_solo, "{label}: batched short request");

    // Still serving, and no failed pass on the way.
    assert_eq!(
        chat(&server, &body(&words(12, 4), Some(9), false)),
        short_solo
    );
    assert!(
        !server.log_contains("Model failed with error"),
        "{label}: a pass failed:\n{}",
        server.log_tail()
    );
    if let Some(p) = cfg_path {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn default_stops_at_the_context_length() {
    check_backend("default", "default", None);
}

#[test]
fn omnikv_stops_at_the_context_length() {
    check_backend(
        "omnikv",
        "omnikv",
        Some(
            json!({"do_select_layers": "0", "num_wait_load_layers": 0, "num_of_selected_tokens": 0.25}),
        ),
    );
}

#[test]
fn omnikv_offload_stops_at_the_context_length() {
    check_backend(
        "omnikv-offload",
        "omnikv",
        Some(
            json!({"do_select_layers": "0", "num_wait_load_layers": 0, "num_of_selected_tokens": 0.25, "real_offload": true}),
        ),
    );
}

#[test]
fn h2o_stops_at_the_context_length() {
    check_backend("h2o", "h2o", Some(json!({"budget": 0.5, "min_tokens": 4})));
}

/// A line of a captured backtrace: an indented frame number or `at` line.
fn is_frame(line: &str) -> bool {
    let t = line.trim_start();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    line.len() > t.len() && ((digits > 0 && t[digits..].starts_with(": ")) || t.starts_with("at "))
}

#[test]
fn error_bodies_carry_no_backtrace() {
    let _guard = serial();
    // A host tier of 1 KB cannot hold any prompt: every pass fails in the
    // backend with a candle error, which captures a backtrace under
    // RUST_BACKTRACE=1.
    let cfg = std::env::temp_dir().join(format!("omnikv-ctx-bt-{}.json", std::process::id()));
    std::fs::write(
        &cfg,
        json!({"do_select_layers": "0", "num_wait_load_layers": 0, "num_of_selected_tokens": 0.25, "real_offload": true, "max_host_bytes": 1024}).to_string(),
    )
    .unwrap();
    let server = Server::start_model_env(
        "omnikv",
        &["--kv-cache-config", cfg.to_str().unwrap()],
        &tiny_model_args(),
        &[("RUST_BACKTRACE", "1")],
    )
    .expect("server starts");
    let prompt = words(40, 5);
    let (status, text) = server
        .post("/v1/chat/completions", &body(&prompt, Some(5), false))
        .unwrap();
    assert!(status >= 400, "the pass must fail: {status} {text}");
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    let message = v["message"]
        .as_str()
        .or(v["error"]["message"].as_str())
        .unwrap_or_else(|| panic!("no message: {text}"));
    assert!(message.contains("max_host_bytes"), "{message}");
    assert!(
        !message.lines().any(is_frame) && !message.contains("backtrace"),
        "backtrace in the body: {message}"
    );
    // Streamed: an OpenAI error object, no frames either.
    let (status, text) = server
        .post("/v1/chat/completions", &body(&prompt, Some(5), true))
        .unwrap();
    assert_eq!(status, 200, "{text}");
    let err = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .find(|v| v.get("error").is_some())
        .unwrap_or_else(|| panic!("no error event: {text}"));
    let message = err["error"]["message"].as_str().unwrap();
    assert!(message.contains("max_host_bytes"), "{message}");
    assert!(
        !message.lines().any(is_frame),
        "backtrace in the stream: {message}"
    );
    // The log keeps the detail.
    assert!(server.log_contains("max_host_bytes"));
    let _ = std::fs::remove_file(&cfg);
}
