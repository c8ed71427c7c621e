//! Reliability of the patched server with `--kv-cache omnikv` and
//! `real_offload` (issue: reliability under load, faults and bad input):
//!
//! - bad requests get a 4xx with a message naming the problem, and the
//!   server keeps serving;
//! - 16 concurrent requests of mixed lengths, budgets and sampling settings:
//!   every greedy one equals its solo output (with offload; batches in the
//!   model cache are `same_answer.rs`'s);
//! - a client that disconnects mid-stream frees its sequence's store;
//! - a request that fails inside the backend (the host tier is full) fails
//!   alone: a request decoding at the same time finishes with its solo
//!   output, and later requests succeed;
//! - a short soak: store accounting returns to zero after every request
//!   (the long soak is `omnikv-soak`, see the README).
//!
//! Store accounting is read from the backend's log line
//! `omnikv store: released sequence ...`, written when the host drops a
//! sequence.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use integration_tests::{http, root, serial, tool_bin, Completion, Server};
use serde_json::{json, Value};

/// The calibrated SmolLM2 config with offload on (unless `extra` says
/// otherwise) and the given extra keys, written to a temporary file.
fn offload_config(name: &str, extra: Value) -> PathBuf {
    let mut cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("configs/smollm2-135m.json")).unwrap(),
    )
    .unwrap();
    cfg["real_offload"] = json!(true);
    for (k, v) in extra.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    let path = std::env::temp_dir().join(format!("omnikv-{name}-{}.json", std::process::id()));
    std::fs::write(&path, cfg.to_string()).unwrap();
    path
}

fn start(config: &PathBuf) -> Server {
    Server::start("omnikv", &["--kv-cache-config", config.to_str().unwrap()]).unwrap()
}

/// A prompt of about `records * 14` tokens: the first `records` records of
/// the fixture's long prompt and a question about one of them.
fn records_prompt(records: usize, ask: usize) -> String {
    let mut s = String::new();
    for i in 0..records {
        let colour = ["red", "blue", "green", "yellow", "black"][i % 5];
        s.push_str(&format!(
            "Record {i}: the {colour} box is on shelf {}. ",
            (i * 13) % 97
        ));
    }
    s.push_str(&format!(
        "Question: on which shelf is the box of record {ask}?"
    ));
    s
}

fn chat_body(prompt: &str, max_tokens: usize) -> Value {
    json!({
        "model": "default",
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0.0,
        "max_tokens": max_tokens,
    })
}

#[test]
fn bad_requests_get_4xx_and_the_server_keeps_serving() {
    let _guard = serial();
    let config = offload_config("bad-input", json!({"max_context_len": 3000}));
    let server = start(&config);
    let ok = chat_body("What is the capital of Japan?", 8);
    let with = |key: &str, value: Value| {
        let mut b = ok.clone();
        b[key] = value;
        b.to_string().into_bytes()
    };
    let long_words = |n: usize| chat_body(&"word ".repeat(n), 8).to_string().into_bytes();
    let mut non_utf8 =
        br#"{"model":"default","messages":[{"role":"user","content":"x"}],"max_tokens":5}"#
            .to_vec();
    let x = non_utf8.iter().position(|&c| c == b'x').unwrap();
    non_utf8[x] = 0xff;
    // (what, body, expected status, text the message must contain)
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "max_tokens 0",
            with("max_tokens", json!(0)),
            422,
            "`max_tokens` must be at least 1",
        ),
        (
            "max_tokens beyond max_context_len",
            with("max_tokens", json!(1_000_000_000u64)),
            422,
            "max_context_len",
        ),
        (
            "max_tokens a string",
            with("max_tokens", json!("ten")),
            422,
            "max_tokens",
        ),
        (
            "max_tokens negative",
            with("max_tokens", json!(-1)),
            422,
            "max_tokens",
        ),
        (
            "unknown model",
            with("model", json!("gpt-nope")),
            422,
            "Requested model 'gpt-nope' is not available",
        ),
        (
            "negative temperature",
            with("temperature", json!(-3.0)),
            422,
            "`temperature` = -3",
        ),
        ("top_p 0", with("top_p", json!(0.0)), 422, "`top_p` = 0"),
        (
            "top_p above 1",
            with("top_p", json!(1.5)),
            422,
            "`top_p` = 1.5",
        ),
        ("n 0", with("n", json!(0)), 422, "`n` must be at least 1"),
        (
            "kv_cache budget negative",
            with("kv_cache", json!({"budget": -1})),
            422,
            "budget",
        ),
        (
            "kv_cache not an object",
            with("kv_cache", json!(5)),
            422,
            "kv_cache",
        ),
        (
            "kv_cache unknown key",
            with("kv_cache", json!({"budgte": 0.1})),
            422,
            "budgte",
        ),
        (
            "messages missing",
            br#"{"model":"default","max_tokens":5}"#.to_vec(),
            422,
            "messages",
        ),
        (
            "truncated JSON",
            br#"{"model":"default","messages":[{"role":"user""#.to_vec(),
            400,
            "JSON",
        ),
        ("not JSON", b"max_tokens=5".to_vec(), 400, "JSON"),
        ("non-UTF-8 body", non_utf8, 400, "JSON"),
        (
            "prompt beyond max_context_len",
            long_words(3500),
            422,
            "more than `max_context_len` = 3000",
        ),
        (
            "prompt beyond the model context",
            long_words(9000),
            422,
            "greater than 8192",
        ),
    ];
    let mut tried = 0;
    for (what, body, status, needle) in &cases {
        let (got, text) = raw_post(&server, "/v1/chat/completions", body);
        assert_eq!(got, *status, "{what}: {text}");
        assert!(
            text.contains(needle),
            "{what}: expected {needle:?} in {text}"
        );
        tried += 1;
    }
    // Completions endpoint: same checks apply there.
    let (got, text) = server
        .post(
            "/v1/completions",
            &json!({"model": "default", "prompt": "Hello", "max_tokens": 0}),
        )
        .unwrap();
    assert_eq!(got, 422, "{text}");
    tried += 1;
    eprintln!("bad requests tried: {tried}");
    // Rejections by the server are logged (JSON syntax errors are answered
    // by the HTTP framework before any handler and are not).
    for logged in [
        "Rejected request: `max_tokens` must be at least 1",
        "Rejected request: Requested model 'gpt-nope' is not available",
        "Rejected request: the prompt has",
    ] {
        assert!(
            server.log_contains(logged),
            "{logged:?} not logged:\n{}",
            server.log_tail()
        );
    }
    // Still serving, nothing panicked.
    let done = server.chat("What is the capital of Japan?", 8).unwrap();
    assert!(!done.text.is_empty());
    assert!(!server.log_contains("panicked"), "{}", server.log_tail());
    // Nothing was left in the store by the rejected requests.
    let releases = server
        .wait_for_releases(2, Duration::from_secs(10))
        .unwrap();
    assert!(releases.last().unwrap().store_empty(), "{releases:?}");
}

fn raw_post(server: &Server, path: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut text = String::new();
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut r, &mut raw).unwrap();
    text.push_str(&String::from_utf8_lossy(&raw));
    let code = status.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, text)
}

#[test]
fn concurrent_requests_match_their_solo_outputs_with_offload() {
    concurrent_requests_match_their_solo_outputs(true);
}

fn concurrent_requests_match_their_solo_outputs(offload: bool) {
    let _guard = serial();
    let config = offload_config("concurrency", json!({"real_offload": offload}));
    // Offload turns the host's prefix cache off by itself; in cache it is
    // turned off here too: with it on and these prompts (long shared
    // prefixes, 16 at once), the host's scheduler re-runs the prompt pass of
    // sequences it had waitlisted, starting at their prefix-cache offset,
    // and some of them never finish (seen in the backend's pass trace; the
    // decision to re-prefill is the scheduler's). Left for a host fix.
    let server = Server::start(
        "omnikv",
        &[
            "--kv-cache-config",
            config.to_str().unwrap(),
            "--prefix-cache-n",
            "0",
        ],
    )
    .unwrap();
    // 16 requests: prompt lengths from ~40 to ~1,400 tokens, different
    // budgets (the config's 0.1, 0.2, 64 tokens, selection off), max_tokens
    // 6..20; four of them sample (temperature, top_p, top_k) and are only
    // checked for success. Two pairs share a prompt (and so a length) to be
    // batched together in prefill with different options.
    let budgets = [
        None,
        Some(json!({"budget": 0.2})),
        Some(json!({"budget": 64})),
        Some(json!({"enabled": false})),
    ];
    let mut bodies = Vec::new();
    for i in 0..16usize {
        let records = [2, 20, 50, 100][i % 4] + if i >= 12 { 0 } else { i / 4 };
        let prompt = records_prompt(records, records / 2);
        let mut body = chat_body(&prompt, 6 + (i % 8) * 2);
        if let Some(k) = &budgets[(i / 2) % 4] {
            body["kv_cache"] = k.clone();
        }
        if i % 4 == 3 {
            body["temperature"] = json!(0.9);
            body["top_p"] = json!(0.9);
            body["top_k"] = json!(40);
        }
        bodies.push(body);
    }
    let greedy: Vec<usize> = (0..16).filter(|i| i % 4 != 3).collect();
    let solo: Vec<Completion> = greedy
        .iter()
        .map(|&i| server.chat_request(&bodies[i]).unwrap())
        .collect();
    let port = server.port;
    let handles: Vec<_> = bodies
        .iter()
        .cloned()
        .map(|body| {
            thread::spawn(move || {
                http(
                    port,
                    "POST",
                    "/v1/chat/completions",
                    Some(&body.to_string()),
                )
                .unwrap()
            })
        })
        .collect();
    let results: Vec<(u16, String)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (i, (status, text)) in results.iter().enumerate() {
        assert_eq!(*status, 200, "request {i}: {text}");
    }
    for (j, &i) in greedy.iter().enumerate() {
        let v: Value = serde_json::from_str(&results[i].1).unwrap();
        let got = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(
            got, solo[j].text,
            "request {i} ({} prompt tokens) differs from its solo output",
            solo[j].prompt_tokens
        );
    }
    // Every sequence released its rows (dummy run + 12 solo + 16 concurrent).
    let releases = server
        .wait_for_releases(1 + 12 + 16, Duration::from_secs(20))
        .unwrap();
    assert!(
        releases.last().unwrap().store_empty(),
        "{:?}",
        releases.last()
    );
    assert!(!server.log_contains("panicked"));
    eprintln!(
        "concurrent requests checked (offload {offload}): 16 ({} greedy against solo outputs)",
        greedy.len()
    );
}

#[test]
fn cancelled_stream_frees_its_store() {
    let _guard = serial();
    let config = offload_config("cancel", json!({}));
    let server = start(&config);
    let mut prompt = records_prompt(60, 30);
    prompt.push_str(" Then list every record about a red box, one per line, with its shelf.");
    let mut body = chat_body(&prompt, 200);
    // The same request without streaming runs all 200 tokens: the streamed
    // one below can only end early by being cancelled.
    let started = std::time::Instant::now();
    let full = server.chat_request(&body).unwrap();
    let full_secs = started.elapsed().as_secs_f64();
    assert_eq!(full.completion_tokens, 200, "{full:?}");
    let before = server.store_releases().len();

    body["stream"] = json!(true);
    let body = body.to_string();
    let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut chunks = 0;
    let mut line = String::new();
    while chunks < 3 {
        line.clear();
        assert!(r.read_line(&mut line).unwrap() > 0, "stream ended early");
        if line.starts_with("data: {") {
            chunks += 1;
        }
    }
    // Disconnect mid-stream.
    let disconnected = std::time::Instant::now();
    s.shutdown(std::net::Shutdown::Both).unwrap();
    drop(r);
    drop(s);
    let releases = server
        .wait_for_releases(before + 1, Duration::from_secs(60))
        .unwrap();
    let freed_after = disconnected.elapsed().as_secs_f64();
    let last = releases.last().unwrap();
    assert!(last.store_empty(), "{last:?}");
    assert_ne!(
        last.held_host, 0,
        "the cancelled sequence held offloaded rows: {last:?}"
    );
    assert!(
        freed_after < full_secs / 2.0,
        "released {freed_after:.1} s after the disconnect; the full generation takes {full_secs:.1} s, so it was not cancelled"
    );
    // The server keeps serving.
    assert!(!server
        .chat("What is the capital of Japan?", 8)
        .unwrap()
        .text
        .is_empty());
}

#[test]
fn backend_failure_fails_alone() {
    let _guard = serial();
    // SmolLM2 offloads 22 of its 30 layers: about 17 KB of host tier per
    // prompt token. 12 MB hold a ~400-token prompt, not a ~1,400-token one.
    let config = offload_config("fault", json!({"max_host_bytes": 12_000_000}));
    let server = start(&config);
    let steady = chat_body(&records_prompt(25, 12), 40);
    let solo = server.chat_request(&steady).unwrap();
    // The steady request decodes while the oversized one is admitted.
    let port = server.port;
    let steady_body = steady.to_string();
    let running = thread::spawn(move || {
        http(port, "POST", "/v1/chat/completions", Some(&steady_body)).unwrap()
    });
    thread::sleep(Duration::from_millis(1500));
    let (status, text) = server
        .post(
            "/v1/chat/completions",
            &chat_body(&records_prompt(100, 50), 8),
        )
        .unwrap();
    assert!(
        status >= 400,
        "the oversized prompt must fail: {status} {text}"
    );
    assert!(text.contains("max_host_bytes"), "{text}");
    let (status, text) = running.join().unwrap();
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"].as_str().unwrap(),
        solo.text
    );
    // Later requests succeed and the store ends empty.
    for _ in 0..3 {
        assert_eq!(server.chat_request(&steady).unwrap().text, solo.text);
    }
    let releases = server
        .wait_for_releases(1 + 1 + 1 + 1 + 3, Duration::from_secs(20))
        .unwrap();
    assert!(
        releases.last().unwrap().store_empty(),
        "{:?}",
        releases.last()
    );
    assert!(!server.log_contains("panicked"));
}

#[test]
fn short_soak_returns_the_store_to_zero_after_every_request() {
    let _guard = serial();
    // The full soak (1,000 requests, RSS within 5%) is `omnikv-soak`; here
    // 40 requests, where the allocator's warm-up is a larger share, so the
    // RSS bound is loose.
    let out = std::env::temp_dir().join(format!("omnikv-soak-{}.md", std::process::id()));
    let status = std::process::Command::new(tool_bin("omnikv-soak"))
        .args([
            "--requests",
            "40",
            "--warmup",
            "10",
            "--max-rss-growth",
            "25",
            "--out",
        ])
        .arg(&out)
        .current_dir(root())
        .status()
        .unwrap();
    let report = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(status.success(), "omnikv-soak failed:\n{report}");
    assert!(report.contains("| requests served | 40 |"), "{report}");
    assert!(report.contains("| errors returned | 0 |"), "{report}");
    assert!(report.contains("| panics | 0 |"), "{report}");
    assert!(
        report.contains("| store empty after each request | 40 of 40 |"),
        "{report}"
    );
}
