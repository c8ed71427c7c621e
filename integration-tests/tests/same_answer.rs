//! Same request, same answer: a prompt's greedy answer is a function of the
//! request alone. For `default`, `omnikv` (selection active) and `omnikv`
//! with offload, each prompt's answer is compared with its cold solo answer
//! (a server without a prefix cache): after requests that share a prefix of
//! it (prefix-cache hits at several offsets, down to the whole prompt), when
//! repeated, and inside a concurrent batch, on both servers.
//!
//! The prompts are SmolLM2 chat prompts of about 140 and 520 tokens: a short
//! story and a list of records, each with a question. Before the fix, every
//! such prompt sent after a request about the same text (so only the
//! question was computed, by other kernels) answered differently.

use std::thread;

use integration_tests::{http, root, serial, Server};
use serde_json::{json, Value};

const MAX_TOKENS: usize = 16;

fn story() -> &'static str {
    "Once upon a time a grey donkey lived on a farm by the river with a brown horse, \
     three white geese and an old black dog. Every morning the farmer's daughter brought \
     the donkey a basket of carrots and told him about the town, the market and the \
     ships that came up the river. One day the horse ran away to the hills, and the \
     donkey carried the farmer's tools all summer long. In the autumn the horse came \
     back, tired and hungry, and the donkey shared his carrots with him. "
}

fn records(n: usize, seed: usize) -> String {
    let colours = ["red", "blue", "green", "yellow", "black", "white", "purple"];
    (0..n)
        .map(|i| {
            format!(
                "Record {i}: the {} box is on shelf {}. ",
                colours[(i + seed) % colours.len()],
                (i * 13 + seed * 7) % 97
            )
        })
        .collect()
}

/// A shared text, the question asked first about it (it puts the text in
/// the prefix cache), and the target question.
struct Case {
    text: String,
    first: &'static str,
    target: &'static str,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            text: story().into(),
            first: "Question: Where did the horse go? Answer:",
            target: "Question: What colour is the donkey? Answer:",
        },
        Case {
            text: records(36, 2),
            first: "Question: what colour is the box of record 3?",
            target: "Question: which shelf holds the box of record 31? Answer briefly.",
        },
    ]
}

/// Asked after a request sharing only the first third of the story.
const EARLY_TARGET: &str = "Question: Who brought the carrots? Answer:";

fn body(prompt: &str) -> Value {
    json!({
        "model": "default",
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0.0,
        "max_tokens": MAX_TOKENS,
    })
}

fn answer(server: &Server, prompt: &str) -> String {
    server
        .chat(prompt, MAX_TOKENS)
        .unwrap_or_else(|e| panic!("{e}\n{}", server.log_tail()))
        .text
}

/// All prompts at once; their answers in order.
fn concurrent(server: &Server, prompts: &[String]) -> Vec<String> {
    let port = server.port;
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let b = body(p).to_string();
            thread::spawn(move || http(port, "POST", "/v1/chat/completions", Some(&b)).unwrap())
        })
        .collect();
    handles
        .into_iter()
        .map(|h| {
            let (status, text) = h.join().unwrap();
            assert_eq!(status, 200, "{text}");
            let v: Value = serde_json::from_str(&text).unwrap();
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// Cold solo answers (no prefix cache, one request at a time) and the same
/// prompts in a concurrent batch; then, where the backend keeps the host's
/// prefix cache, each prompt after requests that share a prefix of it.
fn check(label: &str, backend: &str, extra: &[&str], prefix_cache: bool) {
    let _guard = serial();
    let cases = cases();
    let early = format!("{}{EARLY_TARGET}", cases[0].text);
    let mut targets: Vec<String> = cases
        .iter()
        .map(|c| format!("{}{}", c.text, c.target))
        .collect();
    targets.push(early.clone());

    let mut cold_args = extra.to_vec();
    cold_args.extend(["--prefix-cache-n", "0"]);
    let cold_server = Server::start(backend, &cold_args).expect("server starts");
    let cold: Vec<String> = targets.iter().map(|p| answer(&cold_server, p)).collect();
    let mut failures = Vec::new();
    let mut expect = |what: String, got: &str, want: &str| {
        if got != want {
            failures.push(format!("{what}:\n  cold: {want:?}\n  got:  {got:?}"));
        }
    };
    for (i, got) in concurrent(&cold_server, &targets).iter().enumerate() {
        expect(
            format!("{label}: prompt {i} in a concurrent batch"),
            got,
            &cold[i],
        );
    }
    drop(cold_server);
    if prefix_cache {
        let server = Server::start(backend, extra).expect("server starts");
        // A hit on the first third of the story (a long rest of the prompt).
        let third = &cases[0].text[..cases[0].text.len() / 3];
        answer(&server, &format!("{third}Say hello."));
        let last = targets.len() - 1;
        expect(
            format!("{label}: after a request sharing a third of the prompt"),
            &answer(&server, &early),
            &cold[last],
        );
        for (i, c) in cases.iter().enumerate() {
            // A hit on the whole shared text: only the question is computed.
            answer(&server, &format!("{}{}", c.text, c.first));
            expect(
                format!("{label}: prompt {i} after a request about the same text"),
                &answer(&server, &targets[i]),
                &cold[i],
            );
            // A hit on the whole prompt.
            expect(
                format!("{label}: prompt {i} repeated"),
                &answer(&server, &targets[i]),
                &cold[i],
            );
        }
        for (i, got) in concurrent(&server, &targets).iter().enumerate() {
            expect(
                format!("{label}: prompt {i} in a concurrent batch of prefix-cache hits"),
                got,
                &cold[i],
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn smollm2_config() -> String {
    root()
        .join("configs/smollm2-135m.json")
        .display()
        .to_string()
}

#[test]
fn default_answers_do_not_depend_on_cache_state_or_batching() {
    check("default", "default", &[], true);
}

#[test]
fn omnikv_answers_do_not_depend_on_cache_state_or_batching() {
    let cfg = smollm2_config();
    check("omnikv", "omnikv", &["--kv-cache-config", &cfg], true);
}

#[test]
fn omnikv_offload_answers_do_not_depend_on_batching() {
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(smollm2_config()).unwrap()).unwrap();
    cfg["real_offload"] = true.into();
    let path =
        std::env::temp_dir().join(format!("omnikv-same-offload-{}.json", std::process::id()));
    std::fs::write(&path, cfg.to_string()).unwrap();
    // Offload turns the host's prefix cache off: batching is what varies.
    check(
        "omnikv offload",
        "omnikv",
        &["--kv-cache-config", path.to_str().unwrap()],
        false,
    );
    let _ = std::fs::remove_file(&path);
}
