//! `GET /metrics` on the real server: the exposition parses with the
//! Prometheus project's own text-format parser (`prometheus_client`), and
//! the counters move by exactly what the requests did: HTTP requests by
//! path and status, prompt and generated tokens equal to `usage`, OmniKV's
//! decode steps and selected rows equal to the budget times the prompt at
//! every filter layer, dense sequences by reason, time to first token for a
//! stream; and a request's `usage.kv_cache_stats` (`{"stats": true}`), in a
//! response and in a stream's last chunk, equals what the metrics counted
//! for it. Without `stats` no response carries them. `--disable-metrics`
//! answers 503.

use std::collections::BTreeMap;
use std::process::Command;

use integration_tests::{serial, Server};
use omnikv_backend::budget::TokenBudget;
use serde_json::{json, Value};

/// Filter layers and budget of the config below.
const FILTER_LAYERS: usize = 3;
const BUDGET: f64 = 0.1;

fn config() -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("omnikv-metrics-{}.json", std::process::id()));
    let cfg = json!({
        "do_select_layers": "2,8,18",
        "num_wait_load_layers": 1,
        "num_of_selected_tokens": BUDGET,
        "min_selected_tokens": 0,
        "selector_cls": "last",
        "real_offload": false,
    });
    std::fs::write(&path, cfg.to_string()).unwrap();
    path
}

/// Every sample of the exposition as `(name, labels) -> value`, parsed by
/// `prometheus_client.parser` (fails the test if the text does not parse).
fn scrape(server: &Server) -> BTreeMap<(String, BTreeMap<String, String>), f64> {
    let (status, text) = server.get("/metrics").unwrap();
    assert_eq!(status, 200, "{text}");
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.append([s.name, s.labels, s.value])
print(json.dumps(out))
"#;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the exposition does not parse: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let samples: Vec<(String, BTreeMap<String, String>, f64)> =
        serde_json::from_slice(&out.stdout).unwrap();
    samples.into_iter().map(|(n, l, v)| ((n, l), v)).collect()
}

type Samples = BTreeMap<(String, BTreeMap<String, String>), f64>;

/// The sum of the samples named `name` whose labels include `labels`.
fn value(s: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.iter()
        .filter(|((n, l), _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| *v)
        .sum()
}

fn delta(before: &Samples, after: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    value(after, name, labels) - value(before, name, labels)
}

/// The metric names a text mentions (identifiers starting with `http_`,
/// `mistralrs_` or `omnikv_`).
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| {
            ["http_", "mistralrs_", "omnikv_"]
                .iter()
                .any(|p| w.starts_with(p))
        })
        .filter(|w| *w != "omnikv_mistralrs")
        .map(str::to_string)
        .collect()
}

fn prompt() -> String {
    let mut p = String::from("Here is a list of warehouse records.\n");
    for i in 0..30 {
        p.push_str(&format!(
            "Record {i}: a {} box sits on shelf {}.\n",
            ["red", "blue", "green"][i % 3],
            i * 7 % 13
        ));
    }
    p.push_str("Which shelf holds record 12?");
    p
}

#[test]
fn metrics_count_what_the_requests_did() {
    let _guard = serial();
    let config = config();
    let server = Server::start("omnikv", &["--kv-cache-config", config.to_str().unwrap()])
        .expect("server starts");
    let before = scrape(&server);
    for name in [
        "mistralrs_sequences_running",
        "mistralrs_sequences_waiting",
        "omnikv_tier_bytes",
    ] {
        assert!(
            before.keys().any(|(n, _)| n == name),
            "{name} is missing from /metrics"
        );
    }

    // 1. A greedy chat request with selection active.
    let (status, text) = server
        .post(
            "/v1/chat/completions",
            &json!({
                "model": "default",
                "messages": [{"role": "user", "content": prompt()}],
                "temperature": 0.0,
                "max_tokens": 12,
                "kv_cache": {"stats": true},
            }),
        )
        .unwrap();
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let (p1, c1) = (
        v["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
        v["usage"]["completion_tokens"].as_u64().unwrap() as usize,
    );
    let model = v["model"].as_str().unwrap().to_string();
    let finish = v["choices"][0]["finish_reason"]
        .as_str()
        .unwrap()
        .to_string();
    let mid = scrape(&server);
    let chat = [
        ("method", "POST"),
        ("path", "/v1/chat/completions"),
        ("status", "200"),
        ("model", model.as_str()),
    ];
    assert_eq!(delta(&before, &mid, "http_requests_total", &chat), 1.0);
    assert_eq!(
        delta(&before, &mid, "mistralrs_prompt_tokens_total", &[]),
        p1 as f64
    );
    assert_eq!(
        delta(&before, &mid, "mistralrs_generation_tokens_total", &[]),
        c1 as f64
    );
    assert_eq!(
        delta(
            &before,
            &mid,
            "mistralrs_sequences_completed_total",
            &[("reason", finish.as_str())]
        ),
        1.0
    );
    // The first token comes from the prompt pass; every later one is a
    // decode step in which each filter layer keeps floor(0.1 * P) rows.
    let steps = c1 - 1;
    assert_eq!(
        delta(&before, &mid, "omnikv_decode_steps_total", &[]),
        steps as f64
    );
    let kept = TokenBudget::Ratio(BUDGET).tokens_for(p1);
    assert_eq!(
        delta(&before, &mid, "omnikv_selected_rows_total", &[]),
        (FILTER_LAYERS * steps * kept) as f64,
        "{kept} rows of {p1} per filter layer and step"
    );
    assert_eq!(
        delta(&before, &mid, "omnikv_candidate_rows_total", &[]),
        (FILTER_LAYERS * steps * p1) as f64
    );
    assert!(value(&mid, "omnikv_decode_step_seconds_count", &[]) >= steps as f64);

    // Per-request statistics equal what the metrics counted.
    let st = &v["usage"]["kv_cache_stats"];
    assert_eq!(st["decode_steps"], json!(steps), "{st}");
    assert_eq!(st["dense_decode_steps"], json!(0), "{st}");
    assert_eq!(
        st["selected_rows"],
        json!(FILTER_LAYERS * steps * kept),
        "{st}"
    );
    assert_eq!(
        st["candidate_rows"],
        json!(FILTER_LAYERS * steps * p1),
        "{st}"
    );
    let fraction = st["mean_selected_fraction"].as_f64().unwrap();
    assert!((fraction - kept as f64 / p1 as f64).abs() < 1e-9, "{st}");
    // Its decode passes' time and their selection's share, as the
    // summaries summed them.
    for (field, summary) in [
        ("decode_seconds", "omnikv_decode_step_seconds_sum"),
        ("selection_seconds", "omnikv_selection_seconds_sum"),
    ] {
        let got = st[field].as_f64().unwrap();
        let want = delta(&before, &mid, summary, &[]);
        assert!(
            got > 0.0 && (got - want).abs() <= 1e-6 * want,
            "{field}: {st}, {summary} moved by {want}"
        );
    }
    assert!(
        st["selection_seconds"].as_f64() < st["decode_seconds"].as_f64(),
        "{st}"
    );

    // 2. A streamed chat request with selection switched off by the
    // request, asking for its statistics.
    let body = json!({
        "model": "default",
        "messages": [{"role": "user", "content": format!("{}\nNow list every record again, one per line.", prompt())}],
        "temperature": 0.0,
        "max_tokens": 6,
        "stream": true,
        "kv_cache": {"enabled": false, "stats": true},
    });
    let (status, stream_text) = server.post("/v1/chat/completions", &body).unwrap();
    assert_eq!(status, 200, "{stream_text}");
    assert!(stream_text.contains("[DONE]"), "{stream_text}");
    let last: Value = stream_text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|c| c["usage"].is_object())
        .last()
        .unwrap_or_else(|| panic!("no chunk carries usage:\n{stream_text}"));
    let stream_stats = last["usage"]["kv_cache_stats"].clone();
    let streamed = last["usage"]["completion_tokens"].as_u64().unwrap();
    // 3. A bad request.
    let (status, _) = server
        .post(
            "/v1/chat/completions",
            &json!({"model": "default", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
        )
        .unwrap();
    assert_eq!(status, 422);
    // 4. A made-up HTTP method: counted, but under `OTHER` (clients cannot
    // create series at will).
    let (status, _) =
        integration_tests::http(server.port, "FROBNICATE", "/v1/models", None).unwrap();
    assert!(status >= 400, "{status}");
    let after = scrape(&server);
    assert_eq!(
        delta(&mid, &after, "http_requests_total", &[("method", "OTHER")]),
        1.0
    );
    assert!(
        !after
            .keys()
            .any(|(_, l)| l.get("method").is_some_and(|m| m == "FROBNICATE")),
        "a client-chosen method became a label value"
    );
    let stream = [("path", "/v1/chat/completions"), ("status", "200")];
    assert_eq!(delta(&mid, &after, "http_requests_total", &stream), 1.0);
    assert_eq!(
        delta(
            &mid,
            &after,
            "http_requests_total",
            &[("path", "/v1/chat/completions"), ("status", "422")]
        ),
        1.0
    );
    assert_eq!(
        delta(
            &mid,
            &after,
            "mistralrs_time_to_first_token_seconds_count",
            &stream
        ),
        1.0
    );
    let generated = delta(&mid, &after, "mistralrs_generation_tokens_total", &[]);
    assert_eq!(generated, streamed as f64);
    assert!(
        (2.0..=6.0).contains(&generated),
        "{generated} tokens:\n{stream_text}"
    );
    // One interval per event after the first (a held-back chunk can carry
    // more than one token).
    let itl = delta(
        &mid,
        &after,
        "mistralrs_inter_token_latency_seconds_count",
        &stream,
    );
    assert!(
        itl >= 1.0,
        "{itl} intervals for {generated} tokens:\n{stream_text}"
    );
    assert_eq!(
        delta(
            &mid,
            &after,
            "omnikv_dense_sequences_total",
            &[("reason", "request")]
        ),
        1.0
    );
    assert_eq!(
        delta(
            &mid,
            &after,
            "omnikv_dense_decode_steps_total",
            &[("reason", "request")]
        ),
        generated - 1.0
    );
    assert_eq!(delta(&mid, &after, "omnikv_selected_rows_total", &[]), 0.0);
    assert_eq!(delta(&mid, &after, "omnikv_decode_steps_total", &[]), 0.0);
    // The final chunk's statistics: every decode step dense, nothing selected.
    assert_eq!(stream_stats["decode_steps"], json!(0), "{stream_stats}");
    assert_eq!(
        stream_stats["dense_decode_steps"],
        json!(streamed - 1),
        "{stream_stats}"
    );
    assert_eq!(stream_stats["selected_rows"], json!(0), "{stream_stats}");
    assert_eq!(stream_stats["decode_seconds"], json!(0.0), "{stream_stats}");
    // Nothing is in flight once every response is complete.
    assert_eq!(value(&after, "http_requests_in_flight", &[]), 0.0);
    // Every series the Grafana dashboard queries exists (the baselines'
    // only on a baseline server).
    let dashboard =
        std::fs::read_to_string(integration_tests::root().join("docs/grafana-dashboard.json"))
            .unwrap();
    for name in metric_names(&dashboard) {
        if name.starts_with("omnikv_baseline_") {
            continue;
        }
        assert!(
            after.keys().any(|(n, _)| *n == name),
            "docs/grafana-dashboard.json queries {name}, which /metrics does not have"
        );
    }
    // Statistics only when asked for.
    let (_, text) = server
        .post(
            "/v1/chat/completions",
            &json!({"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
        )
        .unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert!(v["usage"].get("kv_cache_stats").is_none(), "{text}");
}

#[test]
fn disable_metrics_answers_503() {
    let _guard = serial();
    let server = Server::start("default", &["--disable-metrics"]).expect("server starts");
    let (status, text) = server.get("/metrics").unwrap();
    assert_eq!(status, 503, "{text}");
    assert!(!server.chat("Hi", 2).unwrap().text.is_empty());
}
