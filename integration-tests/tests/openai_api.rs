//! OpenAI API behaviour that clients, evaluation harnesses and agent
//! frameworks rely on, through the real server on the real model, served
//! the way `make serve` serves it (`--kv-cache omnikv`, `configs/serve.json`).
//! One test per fault kind (issue 14, items 3-9, and the faults found while
//! fixing them), each fixed by a host patch in `patches/fixes/`:
//!
//! - streams end with `data: [DONE]` and one finish reason per choice
//!   (`n > 1`, text ending inside a UTF-8 sequence, a choice ending on its
//!   first token): core `0004`, `0009`, server `0006`; non-streamed choices
//!   are listed by index: core `0010`;
//! - logprobs are natural-log probabilities in the chat and completions
//!   shapes: core `0007`;
//! - `/v1/completions` text keeps its leading space: core `0005`;
//! - stop strings never reach a stream: core `0006`;
//! - `seed` reproduces sampling: core `0008`, server `0005`;
//! - every 4xx/5xx body is the OpenAI error object: server `0007`;
//! - `prompt` lists and token ids are served: server `0008` (ids outside the
//!   vocabulary are refused: core `0011`);
//! - a client that disconnects stops its generation: core `0012`;
//! - `logit_bias` is applied: core `0013`.
//!
//! Where a client's parsing is the point, the official OpenAI Python client
//! (`scripts/test-requirements.txt`) checks it too.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::thread;

use integration_tests::{http, root, serial, Server};
use serde_json::{json, Value};

fn start() -> Server {
    let config = root().join("configs/serve.json");
    Server::start("omnikv", &["--kv-cache-config", config.to_str().unwrap()])
        .expect("server starts")
}

/// POST a JSON body; the status and the parsed response body.
fn post(server: &Server, path: &str, body: &Value) -> (u16, Value) {
    let (status, text) = server.post(path, body).unwrap();
    let value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("body of {status} is not JSON ({e}): {text:?}"));
    (status, value)
}

/// POST a JSON body that must succeed.
fn ok(server: &Server, path: &str, body: &Value) -> Value {
    let (status, value) = post(server, path, body);
    assert_eq!(status, 200, "{value}");
    value
}

/// A streamed request: its JSON events, after checking that the stream
/// ends with `data: [DONE]` and has nothing after it.
fn stream(server: &Server, path: &str, body: &Value) -> Vec<Value> {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let (status, text) = http(server.port, "POST", path, Some(&body.to_string())).unwrap();
    assert_eq!(status, 200, "{text}");
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(
        data.last(),
        Some(&"[DONE]"),
        "the stream must end with `data: [DONE]`; request {body}, stream:\n{text}"
    );
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("event {d:?}: {e}")))
        .collect()
}

/// The text of a chat choice or a completion choice, streamed or not.
fn choice_text(choice: &Value) -> String {
    for key in [
        &["text"][..],
        &["message", "content"],
        &["delta", "content"],
    ] {
        let mut v = choice;
        for k in key {
            v = &v[*k];
        }
        if let Some(s) = v.as_str() {
            return s.to_string();
        }
    }
    String::new()
}

/// Per choice index: the concatenated streamed text and the finish reasons
/// seen (each choice must have exactly one).
fn collect_stream(events: &[Value]) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for event in events {
        for choice in event["choices"].as_array().unwrap() {
            let i = choice["index"].as_u64().unwrap() as usize;
            if out.len() <= i {
                out.resize(i + 1, (String::new(), Vec::new()));
            }
            out[i].0.push_str(&choice_text(choice));
            if let Some(reason) = choice["finish_reason"].as_str() {
                out[i].1.push(reason.to_string());
            }
        }
    }
    out
}

/// Run a Python snippet with the OpenAI client against the server; it prints
/// "ok" on success.
fn python(server: &Server, snippet: &str) {
    let script = format!(
        "import openai, math, sys\nclient = openai.OpenAI(base_url='http://127.0.0.1:{}/v1', api_key='x')\n{snippet}\nprint('ok')\n",
        server.port
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim_end().ends_with("ok"),
        "OpenAI client check failed:\n{script}\nstdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn chat(content: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": "default",
        "messages": [{"role": "user", "content": content}],
        "temperature": 0.0,
        "max_tokens": 24,
    });
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

fn completion(prompt: Value, extra: Value) -> Value {
    let mut body = json!({
        "model": "default",
        "prompt": prompt,
        "temperature": 0.0,
        "max_tokens": 12,
    });
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

#[test]
fn stream_terminates() {
    let _guard = serial();
    let server = start();

    // n = 2 sampled choices of different lengths: each gets its text and
    // exactly one finish reason, and the stream ends with [DONE].
    for seed in [7, 1234] {
        let body = chat(
            "Name one colour.",
            json!({"n": 2, "temperature": 1.0, "seed": seed, "max_tokens": 20}),
        );
        let solo = ok(&server, "/v1/chat/completions", &body);
        let indices: Vec<u64> = solo["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["index"].as_u64().unwrap())
            .collect();
        assert_eq!(indices, [0, 1], "choices are listed by index (seed {seed})");
        let streamed = collect_stream(&stream(&server, "/v1/chat/completions", &body));
        assert_eq!(streamed.len(), 2, "{streamed:?}");
        for (i, (text, reasons)) in streamed.iter().enumerate() {
            assert_eq!(reasons.len(), 1, "choice {i}: finish reasons {reasons:?}");
            let expected = solo["choices"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["index"] == i)
                .unwrap();
            assert_eq!(reasons[0], expected["finish_reason"].as_str().unwrap());
            assert_eq!(text, &choice_text(expected), "choice {i} (seed {seed})");
        }
    }

    // Completions that end inside an emoji (a UTF-8 sequence split over
    // tokens): every length still ends with its finish reason and [DONE],
    // and the streamed text equals the non-streamed one.
    let prompt = json!("Happy faces: 😀 😃 😄 😁 😆 😅 😂 🤣");
    for max_tokens in 1..=8 {
        let body = completion(prompt.clone(), json!({"max_tokens": max_tokens}));
        let solo = ok(&server, "/v1/completions", &body);
        let streamed = collect_stream(&stream(&server, "/v1/completions", &body));
        assert_eq!(streamed.len(), 1);
        assert_eq!(
            streamed[0].1,
            vec!["length".to_string()],
            "max_tokens {max_tokens}"
        );
        assert_eq!(
            streamed[0].0,
            choice_text(&solo["choices"][0]),
            "max_tokens {max_tokens}"
        );
    }
}

#[test]
fn logprobs_are_log_probabilities() {
    let _guard = serial();
    let server = start();
    let check_entry = |entry: &Value, top_n: usize| {
        let token = entry["token"]
            .as_str()
            .expect("`token` is the token's text");
        let logprob = entry["logprob"].as_f64().unwrap();
        assert!(logprob <= 0.0, "{entry}");
        let bytes: Vec<u8> = entry["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(String::from_utf8_lossy(&bytes), token, "{entry}");
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), top_n, "{entry}");
        let values: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
        assert!(values.windows(2).all(|w| w[0] >= w[1]), "{entry}");
        assert!(values.iter().all(|v| *v <= 0.0), "{entry}");
        assert!(
            values.iter().map(|v| v.exp()).sum::<f64>() <= 1.0 + 1e-4,
            "{entry}"
        );
        // Greedy: the chosen token is the most likely one.
        assert_eq!(top[0]["token"].as_str().unwrap(), token, "{entry}");
        assert!((values[0] - logprob).abs() < 1e-5, "{entry}");
        assert!(top.iter().all(|t| t["token"].is_string()), "{entry}");
    };

    let body = chat(
        "What is the capital of Japan?",
        json!({"logprobs": true, "top_logprobs": 3, "max_tokens": 12}),
    );
    let response = ok(&server, "/v1/chat/completions", &body);
    let content = response["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(
        content.len() as u64,
        response["usage"]["completion_tokens"].as_u64().unwrap()
    );
    content.iter().for_each(|e| check_entry(e, 3));
    let events = stream(&server, "/v1/chat/completions", &body);
    let streamed: Vec<&Value> = events
        .iter()
        .flat_map(|e| e["choices"].as_array().unwrap())
        .filter_map(|c| c["logprobs"]["content"].as_array())
        .flatten()
        .collect();
    assert_eq!(streamed.len(), content.len(), "{events:?}");
    for (s, n) in streamed.iter().zip(content) {
        check_entry(s, 3);
        assert_eq!(s["token"], n["token"]);
    }

    // Tokens whose text is held back (parts of an emoji) still stream their
    // logprob: one entry per token, as in the non-streamed response.
    let body = chat(
        "Say hello 🎉",
        json!({"logprobs": true, "top_logprobs": 1, "max_tokens": 8}),
    );
    let response = ok(&server, "/v1/chat/completions", &body);
    let tokens: Vec<Value> = response["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["token"].clone())
        .collect();
    let events = stream(&server, "/v1/chat/completions", &body);
    let streamed: Vec<Value> = events
        .iter()
        .flat_map(|e| e["choices"].as_array().unwrap())
        .filter_map(|c| c["logprobs"]["content"].as_array())
        .flatten()
        .map(|e| e["token"].clone())
        .collect();
    assert_eq!(streamed, tokens, "one streamed logprob per token");
    assert!(
        choice_text(&response["choices"][0])
            .chars()
            .any(|c| c.len_utf8() == 4),
        "the answer has a 4-byte character: {response}"
    );

    // Completions: `tokens`, `token_logprobs`, `top_logprobs`, `text_offset`.
    let body = completion(json!("1, 2, 3, 4, 5,"), json!({"logprobs": 2}));
    let response = ok(&server, "/v1/completions", &body);
    let choice = &response["choices"][0];
    let lp = &choice["logprobs"];
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let n = tokens.len();
    assert_eq!(
        n as u64,
        response["usage"]["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(tokens.concat(), choice_text(choice), "{lp}");
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    let mut expected = 0;
    for (t, o) in tokens.iter().zip(&offsets) {
        assert_eq!(*o, expected, "{lp}");
        expected += t.chars().count() as u64;
    }
    let token_logprobs = lp["token_logprobs"].as_array().unwrap();
    let top = lp["top_logprobs"].as_array().unwrap();
    assert_eq!((token_logprobs.len(), top.len()), (n, n), "{lp}");
    for ((t, l), m) in tokens.iter().zip(token_logprobs).zip(top) {
        let l = l.as_f64().unwrap();
        let m = m.as_object().unwrap();
        assert!(l <= 0.0 && m.len() <= 2 && !m.is_empty(), "{lp}");
        let best = m
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert!(
            (best - l).abs() < 1e-5,
            "greedy token {t:?} is the most likely: {lp}"
        );
        assert!(m.contains_key(*t), "{lp}");
    }
    let events = stream(&server, "/v1/completions", &body);
    let streamed: Vec<String> = events
        .iter()
        .flat_map(|e| e["choices"].as_array().unwrap())
        .filter_map(|c| c["logprobs"]["tokens"].as_array())
        .flatten()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    assert_eq!(streamed, tokens);

    python(
        &server,
        r#"
r = client.chat.completions.create(model='default', temperature=0, max_tokens=8, logprobs=True, top_logprobs=3,
        messages=[{'role': 'user', 'content': 'What is the capital of Japan?'}])
c = r.choices[0].logprobs.content
assert all(isinstance(e.token, str) and e.logprob <= 0 for e in c), c
assert all(e.top_logprobs[0].token == e.token for e in c), c
r = client.completions.create(model='default', prompt='1, 2, 3, 4, 5,', temperature=0, max_tokens=6, logprobs=2)
l = r.choices[0].logprobs
assert ''.join(l.tokens) == r.choices[0].text, l
assert all(x <= 0 for x in l.token_logprobs), l
assert all(abs(max(m.values()) - x) < 1e-5 for m, x in zip(l.top_logprobs, l.token_logprobs)), l
"#,
    );
}

#[test]
fn completion_text_is_verbatim() {
    let _guard = serial();
    let server = start();
    let body = completion(json!("1, 2, 3, 4, 5,"), json!({"max_tokens": 8}));
    let text = choice_text(&ok(&server, "/v1/completions", &body)["choices"][0]);
    assert!(
        text.starts_with(" 6"),
        "prompt + completion must reproduce the generated tokens: {text:?}"
    );
    let streamed = collect_stream(&stream(&server, "/v1/completions", &body));
    assert_eq!(streamed[0].0, text);
    // Echo: the prompt, then the completion exactly.
    let echoed = choice_text(
        &ok(
            &server,
            "/v1/completions",
            &completion(
                json!("1, 2, 3, 4, 5,"),
                json!({"max_tokens": 8, "echo": true}),
            ),
        )["choices"][0],
    );
    assert_eq!(echoed, format!("1, 2, 3, 4, 5,{text}"));
    // Chat answers still start without a space.
    let answer = choice_text(
        &ok(
            &server,
            "/v1/chat/completions",
            &chat("What is the capital of Japan?", json!({})),
        )["choices"][0],
    );
    assert!(!answer.starts_with(' '), "{answer:?}");
}

#[test]
fn stop_strings_do_not_leak() {
    let _guard = serial();
    let server = start();
    let prompt = json!("1, 10, 100, 1000,");
    let free = choice_text(
        &ok(
            &server,
            "/v1/completions",
            &completion(prompt.clone(), json!({"max_tokens": 16})),
        )["choices"][0],
    );
    // Stop strings of several tokens, found where the model goes (checked
    // below), one that ends inside a token, and one never produced.
    for stop in [" 10000", "000,", "0, 1000", " 1", "never produced"] {
        let body = completion(prompt.clone(), json!({"max_tokens": 16, "stop": [stop]}));
        let solo = ok(&server, "/v1/completions", &body);
        let text = choice_text(&solo["choices"][0]);
        let streamed = collect_stream(&stream(&server, "/v1/completions", &body));
        assert_eq!(
            streamed[0].0, text,
            "stop {stop:?}: streamed vs not streamed"
        );
        assert!(
            !streamed[0].0.contains(stop),
            "stop {stop:?} leaked: {:?}",
            streamed[0].0
        );
        if let Some(pos) = free.find(stop) {
            assert_eq!(text, free[..pos], "stop {stop:?}");
            assert_eq!(solo["choices"][0]["finish_reason"], "stop");
        } else {
            assert_eq!(text, free, "stop {stop:?}");
        }
        // Chat: streamed and not streamed agree too.
        let body = chat(
            "Count from 1 to 20.",
            json!({"max_tokens": 40, "stop": [stop]}),
        );
        let solo = choice_text(&ok(&server, "/v1/chat/completions", &body)["choices"][0]);
        let streamed = collect_stream(&stream(&server, "/v1/chat/completions", &body));
        assert_eq!(streamed[0].0, solo, "chat, stop {stop:?}");
    }
    assert!(
        free.contains(" 10000"),
        "the model continues the series: {free:?}"
    );
}

#[test]
fn seed_reproduces_sampling() {
    let _guard = serial();
    let server = start();
    for (path, body) in [
        (
            "/v1/chat/completions",
            chat(
                "Write a sentence about the sea.",
                json!({"temperature": 1.0, "seed": 1234}),
            ),
        ),
        (
            "/v1/completions",
            completion(
                json!("Once upon a time"),
                json!({"temperature": 1.0, "seed": 1234, "max_tokens": 24}),
            ),
        ),
    ] {
        let text = |body: &Value| choice_text(&ok(&server, path, body)["choices"][0]);
        let first = text(&body);
        assert_eq!(text(&body), first, "{path}: same seed, same answer");
        // Alongside other sampled requests.
        let others: Vec<_> = (0..2)
            .map(|i| {
                let port = server.port;
                let mut other = body.clone();
                other["seed"] = json!(99 + i);
                thread::spawn(move || http(port, "POST", path, Some(&other.to_string())))
            })
            .collect();
        assert_eq!(text(&body), first, "{path}: same seed while others sample");
        for o in others {
            assert_eq!(o.join().unwrap().unwrap().0, 200);
        }
        let mut other = body.clone();
        other["seed"] = json!(4321);
        let other_text = text(&other);
        let mut unseeded = body.clone();
        unseeded.as_object_mut().unwrap().remove("seed");
        let a = text(&unseeded);
        let b = text(&unseeded);
        assert!(
            other_text != first || a != b,
            "{path}: sampling must depend on the seed (and vary without one)"
        );
    }
}

/// Send raw bytes; the status and body of the answer.
fn raw(server: &Server, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

fn assert_error_object(status: u16, body: &str, what: &str) {
    assert!((400..600).contains(&status), "{what}: status {status}");
    let v: Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {body:?}"));
    let error = &v["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {v}"
    );
    let expected = if status >= 500 {
        "server_error"
    } else if status == 404 {
        "not_found_error"
    } else {
        "invalid_request_error"
    };
    assert_eq!(error["type"], expected, "{what}: {v}");
    let e = error.as_object().unwrap();
    assert!(
        e.contains_key("param") && e.contains_key("code"),
        "{what}: {v}"
    );
    assert!(v.get("message").is_none(), "{what}: {v}");
}

#[test]
fn error_bodies_are_openai_objects() {
    let _guard = serial();
    let server = start();
    let long = "word ".repeat(9000);
    let cases = [
        (
            "prompt over the context",
            "/v1/completions",
            completion(json!(long), json!({})),
        ),
        (
            "chat prompt over the context",
            "/v1/chat/completions",
            chat(&long, json!({})),
        ),
        (
            "invalid kv_cache option",
            "/v1/chat/completions",
            chat("Hi", json!({"kv_cache": {"budget": -3}})),
        ),
        (
            "invalid sampling parameter",
            "/v1/chat/completions",
            chat("Hi", json!({"top_p": 7})),
        ),
        (
            "field of the wrong type",
            "/v1/completions",
            completion(json!("Hi"), json!({"max_tokens": "ten"})),
        ),
        (
            "empty prompt list",
            "/v1/completions",
            completion(json!([]), json!({})),
        ),
        (
            "token id past the vocabulary",
            "/v1/completions",
            completion(json!([1_000_000_000]), json!({})),
        ),
        (
            "token id one past the vocabulary",
            "/v1/completions",
            completion(json!([[17, 49152]]), json!({})),
        ),
        (
            "unknown model",
            "/v1/chat/completions",
            chat("Hi", json!({"model": "gpt-9"})),
        ),
    ];
    for (what, path, body) in &cases {
        let (status, text) = server.post(path, body).unwrap();
        assert!(
            (400..500).contains(&status),
            "{what} is a client error: {status} {text}"
        );
        assert_error_object(status, &text, what);
    }
    let (status, text) = http(server.port, "POST", "/v1/completions", Some("{not json")).unwrap();
    assert_error_object(status, &text, "malformed JSON");
    let (status, text) = http(server.port, "POST", "/v1/nothing-here", Some("{}")).unwrap();
    assert_eq!(status, 404);
    assert_error_object(status, &text, "unknown route");
    let (status, text) = raw(
        &server,
        "GET /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 405);
    assert_error_object(status, &text, "wrong method");
    let body = completion(json!("Hi"), json!({})).to_string();
    let (status, text) = raw(
        &server,
        &format!(
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    );
    assert_error_object(status, &text, "no Content-Type");
    // The server keeps serving, and a bad request does not fail the
    // requests scheduled with it.
    ok(
        &server,
        "/v1/completions",
        &completion(json!("Hi"), json!({"max_tokens": 2})),
    );
    let port = server.port;
    let handles: Vec<_> = (0..6)
        .map(|i| {
            let prompt = if i == 2 {
                json!([49152])
            } else {
                json!(format!("Item {i}:"))
            };
            let body = completion(prompt, json!({"max_tokens": 4})).to_string();
            thread::spawn(move || http(port, "POST", "/v1/completions", Some(&body)).unwrap())
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let (status, text) = h.join().unwrap();
        if i == 2 {
            assert!((400..500).contains(&status), "{status} {text}");
            assert_error_object(status, &text, "token id past the vocabulary, batched");
        } else {
            assert_eq!(status, 200, "request {i} next to a bad one: {text}");
        }
    }

    python(
        &server,
        r#"
for make in (lambda: client.completions.create(model='default', prompt='word ' * 9000, max_tokens=4),
             lambda: client.chat.completions.create(model='default', max_tokens=4, top_p=7,
                 messages=[{'role': 'user', 'content': 'Hi'}])):
    try:
        make()
        sys.exit('no error raised')
    except openai.APIStatusError as e:
        assert isinstance(e.body, dict) and isinstance(e.body.get('message'), str), e.body
        assert e.body.get('type') == 'invalid_request_error' and 'param' in e.body, e.body
        assert e.body['message'] in e.message, e.message
"#,
    );
}

#[test]
fn prompt_lists_are_served() {
    let _guard = serial();
    let server = start();
    let prompts = ["1, 2, 3, 4,", "The capital of France is"];
    let solo: Vec<String> = prompts
        .iter()
        .map(|p| {
            choice_text(
                &ok(&server, "/v1/completions", &completion(json!(p), json!({})))["choices"][0],
            )
        })
        .collect();
    let both = ok(
        &server,
        "/v1/completions",
        &completion(json!(prompts), json!({})),
    );
    let choices = both["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2, "{both}");
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(choice_text(c), solo[i], "prompt {i}");
    }
    let single = ok(
        &server,
        "/v1/completions",
        &completion(json!([prompts[1]]), json!({})),
    );
    assert_eq!(choice_text(&single["choices"][0]), solo[1]);
    // n = 2: choice c of prompt p has index p * 2 + c.
    let n2 = ok(
        &server,
        "/v1/completions",
        &completion(json!(prompts), json!({"n": 2})),
    );
    let texts: Vec<String> = n2["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(choice_text)
        .collect();
    assert_eq!(
        texts,
        vec![
            solo[0].clone(),
            solo[0].clone(),
            solo[1].clone(),
            solo[1].clone()
        ]
    );
    // Streamed.
    let streamed = collect_stream(&stream(
        &server,
        "/v1/completions",
        &completion(json!(prompts), json!({})),
    ));
    assert_eq!(streamed.len(), 2);
    for (i, (text, reasons)) in streamed.iter().enumerate() {
        assert_eq!(text, &solo[i], "streamed prompt {i}");
        assert_eq!(reasons.len(), 1);
    }
    // Token ids (as the OpenAI client sends them) are served.
    let ids = ok(
        &server,
        "/v1/completions",
        &completion(json!([[16, 28, 17, 28]]), json!({"max_tokens": 4})),
    );
    assert_eq!(ids["choices"].as_array().unwrap().len(), 1, "{ids}");
    python(
        &server,
        r#"
r = client.completions.create(model='default', prompt=['1, 2, 3, 4,', 'The capital of France is'], temperature=0, max_tokens=12)
assert [c.index for c in r.choices] == [0, 1], r
"#,
    );
}

#[test]
fn disconnected_client_stops_generation() {
    let _guard = serial();
    // With offload the backend logs a store release when the host drops a
    // sequence (the served config plus `real_offload`).
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("configs/serve.json")).unwrap())
            .unwrap();
    config["real_offload"] = json!(true);
    let path = std::env::temp_dir().join(format!("openai-api-offload-{}.json", std::process::id()));
    std::fs::write(&path, config.to_string()).unwrap();
    let server = Server::start("omnikv", &["--kv-cache-config", path.to_str().unwrap()])
        .expect("server starts");
    // A long non-streamed generation (the model counts on to `max_tokens`,
    // about two minutes here), abandoned by its client after two seconds.
    let body = completion(
        json!("1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"),
        json!({"max_tokens": 4000}),
    )
    .to_string();
    // A finished request first, so that the count below starts after the
    // releases of start-up and warm-up.
    ok(
        &server,
        "/v1/completions",
        &completion(json!("Hi"), json!({"max_tokens": 2})),
    );
    let before = server
        .wait_for_releases(1, std::time::Duration::from_secs(30))
        .unwrap()
        .len();
    std::thread::sleep(std::time::Duration::from_secs(1));
    let before = before.max(server.store_releases().len());
    {
        let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        write!(
            s,
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        thread::sleep(std::time::Duration::from_secs(2));
    }
    let released = server.wait_for_releases(before + 1, std::time::Duration::from_secs(30));
    assert!(
        released.is_ok(),
        "the abandoned request kept generating: {}",
        server.log_tail()
    );
    // The server keeps serving.
    ok(
        &server,
        "/v1/completions",
        &completion(json!("Hi"), json!({"max_tokens": 2})),
    );
}

#[test]
fn logit_bias_is_applied() {
    let _guard = serial();
    let server = start();
    let tok = omnikv_eval::bench_format::gguf_tokenizer(
        &integration_tests::model_dir().join(integration_tests::MODEL_FILE),
    )
    .unwrap();
    let tokens = |response: &Value| -> Vec<String> {
        response["choices"][0]["logprobs"]["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect()
    };
    let prompt = json!("1, 2, 3, 4, 5,");
    let free = tokens(&ok(
        &server,
        "/v1/completions",
        &completion(prompt.clone(), json!({"max_tokens": 4, "logprobs": 1})),
    ));
    let first = tok.encode(free[0].as_str(), false).unwrap().get_ids()[0];
    // Banned: the greedy first token is never generated.
    let banned = tokens(&ok(
        &server,
        "/v1/completions",
        &completion(
            prompt.clone(),
            json!({"max_tokens": 4, "logprobs": 1, "logit_bias": {first.to_string(): -100.0}}),
        ),
    ));
    assert!(
        !banned.contains(&free[0]),
        "{free:?} then, banned, {banned:?}"
    );
    // Forced: +100 makes a token the greedy choice at every step.
    let seven = tok.encode("7", false).unwrap().get_ids()[0];
    let forced = ok(
        &server,
        "/v1/completions",
        &completion(
            prompt.clone(),
            json!({"max_tokens": 4, "logit_bias": {seven.to_string(): 100.0}}),
        ),
    );
    assert_eq!(choice_text(&forced["choices"][0]), "7777", "{forced}");
    // Chat: with the end-of-turn token banned the answer runs to its limit.
    let eot = tok.token_to_id("<|im_end|>").unwrap();
    let long = ok(
        &server,
        "/v1/chat/completions",
        &chat(
            "Say hi.",
            json!({"max_tokens": 40, "logit_bias": {eot.to_string(): -100.0}}),
        ),
    );
    assert_eq!(long["choices"][0]["finish_reason"], "length", "{long}");
    // An id outside the vocabulary is refused.
    let (status, body) = post(
        &server,
        "/v1/completions",
        &completion(prompt, json!({"logit_bias": {"49152": 5.0}})),
    );
    assert_eq!(status, 422, "{body}");
    assert_error_object(
        status,
        &body.to_string(),
        "logit_bias id past the vocabulary",
    );
}
