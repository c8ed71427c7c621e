//! The OmniKV JSON schema: the published example loads unchanged, and every
//! invalid value is reported with its key, its value and what is allowed.

use omnikv_backend::budget::TokenBudget;
use omnikv_backend::omnikv::config::{OmniKvConfig, OmniKvConfigFile};
use omnikv_backend::omnikv::selector::SelectorKind;
use serde_json::json;

fn example() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../configs/example.json"
    ))
    .unwrap()
}

#[test]
fn published_example_loads_unchanged() {
    let cfg = OmniKvConfig::from_json_str(&example()).unwrap();
    assert_eq!(cfg.filter_layers, vec![2, 8, 18]);
    assert_eq!(cfg.num_wait_load_layers, 1);
    assert_eq!(cfg.budget, TokenBudget::Ratio(0.067));
    assert_eq!(cfg.selector, SelectorKind::Last);
    assert_eq!(cfg.window_size, 16);
    assert_eq!(cfg.cpu_num_threads, 8);
    assert_eq!(cfg.max_context_len, 128_500);
    // Keys of the published schema that only the evaluation harness reads
    // (prompt format, model path) are kept by the file type.
    let file = OmniKvConfigFile::from_value(&serde_json::from_str(&example()).unwrap()).unwrap();
    assert!(
        !cfg.real_offload
            && file.use_chat_template == Some(false)
            && file.cot == Some(false)
            && file.use_flash_attn == Some(true)
    );
    assert_eq!(
        file.model_name.as_deref(),
        Some("../models/Llama-3-8B-Instruct-262k")
    );
}

#[test]
fn defaults_follow_the_spec() {
    let cfg = OmniKvConfig::from_value(&json!({"do_select_layers": "2,8,18"})).unwrap();
    assert_eq!(cfg.num_wait_load_layers, 1);
    assert_eq!(cfg.budget, TokenBudget::Ratio(0.067));
    assert_eq!(cfg.selector, SelectorKind::Last);
    assert_eq!(cfg.window_size, 16);
    assert!(!cfg.real_offload);
    assert_eq!(cfg.min_prompt_len, 0);
    let cfg =
        OmniKvConfig::from_value(&json!({"do_select_layers": "2", "min_prompt_len": 512})).unwrap();
    assert_eq!(cfg.min_prompt_len, 512);
}

#[test]
fn budgets_count_and_ratio() {
    let parse = |v: serde_json::Value| {
        OmniKvConfig::from_value(&json!({"do_select_layers": "2", "num_of_selected_tokens": v}))
            .unwrap()
            .budget
    };
    assert_eq!(parse(json!(1)), TokenBudget::Count(1));
    assert_eq!(parse(json!(1.0)), TokenBudget::Ratio(1.0));
    assert_eq!(parse(json!(2048)), TokenBudget::Count(2048));
    assert_eq!(TokenBudget::Ratio(0.067).tokens_for(1000), 67);
    assert_eq!(
        TokenBudget::Ratio(0.067).tokens_for(10),
        1,
        "clamped up to 1"
    );
    assert_eq!(
        TokenBudget::Count(5).tokens_for(3),
        3,
        "clamped down to the prompt"
    );
    assert_eq!(TokenBudget::Ratio(1.0).tokens_for(2775), 2775);
    assert_eq!(TokenBudget::Count(5).tokens_for(0), 0);
    for (s, want) in [("\"2, 8 ,18\"", vec![2, 8, 18]), ("[0, 5]", vec![0, 5])] {
        let v: serde_json::Value =
            serde_json::from_str(&format!("{{\"do_select_layers\": {s}}}")).unwrap();
        assert_eq!(OmniKvConfig::from_value(&v).unwrap().filter_layers, want);
    }
}

struct Bad {
    json: &'static str,
    expect: &'static str,
}

const BAD: &[Bad] = &[
    Bad { json: r#"{}"#, expect: "`do_select_layers` is required" },
    Bad { json: r#"[1, 2]"#, expect: "must be a JSON object" },
    Bad { json: r#"{"do_select_layers": ""}"#, expect: "got an empty list" },
    Bad { json: r#"{"do_select_layers": []}"#, expect: "got an empty list" },
    Bad { json: r#"{"do_select_layers": "2,2"}"#, expect: "strictly ascending without duplicates" },
    Bad { json: r#"{"do_select_layers": "8,2"}"#, expect: "strictly ascending" },
    Bad { json: r#"{"do_select_layers": "2,x"}"#, expect: "`x` is not a layer index" },
    Bad { json: r#"{"do_select_layers": "-1"}"#, expect: "`-1` is not a layer index" },
    Bad { json: r#"{"do_select_layers": 2}"#, expect: "`do_select_layers` = 2: expected a comma-separated list" },
    Bad { json: r#"{"do_select_layers": "99999999999999999999"}"#, expect: "is not a layer index" },
    Bad { json: r#"{"do_select_layers": "5000"}"#, expect: "layer 5000 is out of range" },
    Bad { json: r#"{"do_select_layers": "2", "num_of_selected_tokens": 0}"#, expect: "`num_of_selected_tokens` = 0" },
    Bad { json: r#"{"do_select_layers": "2", "num_of_selected_tokens": 1.5}"#, expect: "`num_of_selected_tokens` = 1.5: expected an integer count >= 1 or a fraction in (0, 1]" },
    Bad { json: r#"{"do_select_layers": "2", "num_of_selected_tokens": -0.1}"#, expect: "`num_of_selected_tokens` = -0.1" },
    Bad { json: r#"{"do_select_layers": "2", "num_of_selected_tokens": "0.1"}"#, expect: "`num_of_selected_tokens` = \"0.1\": expected" },
    Bad { json: r#"{"do_select_layers": "2", "selector_cls": "h2o"}"#, expect: "`selector_cls` = \"h2o\": expected one of \"last\", \"softmax_before_last\", \"uniform\", \"exp\"" },
    Bad { json: r#"{"do_select_layers": "2", "window_size": 0}"#, expect: "`window_size` = 0: expected 1..=4096" },
    Bad { json: r#"{"do_select_layers": "2", "cpu_num_threads": 0}"#, expect: "`cpu_num_threads` = 0" },
    Bad { json: r#"{"do_select_layers": "2", "cpu_num_threads": 1e9}"#, expect: "`cpu_num_threads` = 1000000000.0: expected a non-negative integer" },
    Bad { json: r#"{"do_select_layers": "2", "max_context_len": 0}"#, expect: "`max_context_len` = 0" },
    Bad { json: r#"{"do_select_layers": "2", "cot": true}"#, expect: "`cot` = true needs `use_chat_template` = true" },
    Bad { json: r#"{"do_select_layers": "2", "dense_more": false}"#, expect: "`dense_more` = false: only true is supported" },
    Bad { json: r#"{"do_select_layers": "2", "model_cls": "h2o"}"#, expect: "`model_cls` = \"h2o\": only \"multi\"" },
    Bad { json: r#"{"do_select_layers": "2", "load_in_8bit": true}"#, expect: "`load_in_8bit` = true: bitsandbytes loading is not supported" },
    Bad { json: r#"{"do_select_layers": "2", "real_offload": "yes"}"#, expect: "`real_offload` = \"yes\": expected true or false" },
    Bad { json: r#"{"do_select_layers": "2", "num_wait_load_layers": -1}"#, expect: "`num_wait_load_layers` = -1: expected a non-negative integer" },
    Bad { json: r#"{"do_select_layers": "2", "selector": "last"}"#, expect: "unknown key `selector`; known keys: cpu_num_threads" },
    Bad { json: r#"{"do_select_layers": "2", "prefill": "turbo"}"#, expect: "`prefill` = \"turbo\": expected one of \"fast\", \"exact\"" },
    Bad { json: r#"{"do_select_layers": "2", "keep_sink_tokens": -4}"#, expect: "`keep_sink_tokens` = -4: expected a non-negative integer" },
    Bad { json: r#"{"do_select_layers": "2", "keep_recent_tokens": 99999999}"#, expect: "`keep_recent_tokens` = 99999999: expected 0..=1048576" },
    Bad { json: r#"{"do_select_layers": "2", "record_recall": ""}"#, expect: "`record_recall` = \"\": expected the path" },
    Bad { json: r#"{"do_select_layers": "2", "max_host_bytes": 1000}"#, expect: "set `real_offload` = true or remove `max_host_bytes`" },
    Bad { json: r#"{"do_select_layers": "2", "real_offload": true, "max_host_bytes": 0}"#, expect: "`max_host_bytes` = 0" },
    Bad { json: r#"{"do_select_layers": "2", "real_offload": true, "max_host_bytes": "1GB"}"#, expect: "`max_host_bytes` = \"1GB\": expected a non-negative integer" },
    Bad { json: r#"{"do_select_layers": "2", "real_offload": true, "record_recall": "r.json"}"#, expect: "cannot run with `real_offload` = true" },
];

#[test]
fn request_overrides() {
    use omnikv_backend::budget::TokenBudget;
    use omnikv_backend::omnikv::config::RequestOverride;
    let ok = |v: serde_json::Value| RequestOverride::from_value(&v).unwrap();
    assert_eq!(ok(json!({})), RequestOverride::default());
    assert_eq!(ok(json!({"enabled": false})).enabled, Some(false));
    assert_eq!(
        ok(json!({"budget": 0.2})).budget,
        Some(TokenBudget::Ratio(0.2))
    );
    assert_eq!(
        ok(json!({"budget": 1.0})).budget,
        Some(TokenBudget::Ratio(1.0))
    );
    assert_eq!(
        ok(json!({"budget": 512})).budget,
        Some(TokenBudget::Count(512))
    );
    for (bad, want) in [
        (json!({"budget": 0}), "`budget` = 0"),
        (json!({"budget": -0.5}), "`budget` = -0.5"),
        (json!({"budget": 1.5}), "`budget` = 1.5"),
        (json!({"budget": "all"}), "`budget` = \"all\""),
        (
            json!({"enabled": 1}),
            "`enabled` = 1: expected true or false",
        ),
        (json!({"enable": true}), "unknown key `enable`"),
        (json!("off"), "must be an object"),
    ] {
        let e = RequestOverride::from_value(&bad).unwrap_err().to_string();
        assert!(e.contains(want), "{bad}: {e}");
    }
    // Every problem at once.
    let e = RequestOverride::from_value(&json!({"budget": 0, "enabled": "x"})).unwrap_err();
    assert_eq!(e.0.len(), 2, "{e}");
}

#[test]
fn new_keys_default_to_the_published_behaviour() {
    use omnikv_backend::omnikv::selector::Keep;
    use omnikv_backend::prefill::PrefillKernel;
    let cfg = OmniKvConfig::from_value(&json!({"do_select_layers": "2"})).unwrap();
    assert_eq!(cfg.prefill, PrefillKernel::Fast);
    assert_eq!(cfg.keep, Keep::default());
    assert_eq!(cfg.record_recall, None);
    let cfg = OmniKvConfig::from_value(&json!({
        "do_select_layers": "2", "prefill": "exact", "keep_sink_tokens": 4, "keep_recent_tokens": 32
    }))
    .unwrap();
    assert_eq!(cfg.prefill, PrefillKernel::Exact);
    assert_eq!(
        cfg.keep,
        Keep {
            sink: 4,
            recent: 32
        }
    );
}

#[test]
fn each_invalid_value_is_named() {
    let mut failures = Vec::new();
    for case in BAD {
        match OmniKvConfig::from_json_str(case.json) {
            Ok(cfg) => failures.push(format!("{}: accepted as {cfg:?}", case.json)),
            Err(e) => {
                let msg = e.to_string();
                if !msg.contains(case.expect) {
                    failures.push(format!(
                        "{}:\n  want {:?}\n  got  {msg}",
                        case.json, case.expect
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn all_problems_are_reported_at_once() {
    let e = OmniKvConfig::from_value(&json!({
        "do_select_layers": "8,2",
        "num_of_selected_tokens": 0,
        "selector_cls": "max",
        "window_size": "16",
        "typo_key": true,
    }))
    .unwrap_err();
    assert_eq!(e.0.len(), 5, "{e}");
    assert!(e
        .to_string()
        .starts_with("5 problems in the OmniKV config:"));
}

#[test]
fn malformed_json_is_reported() {
    let e = OmniKvConfig::from_json_str("{\"do_select_layers\": ").unwrap_err();
    assert!(e.to_string().contains("not valid JSON"), "{e}");
}

/// Many generated configs (valid and not): parsing never panics, and every
/// rejection carries at least one message naming a key or the JSON problem.
#[test]
fn generated_configs_never_panic() {
    let values = [
        json!(null),
        json!(true),
        json!(0),
        json!(-3),
        json!(1.0),
        json!(0.5),
        json!(1e300),
        json!("2,8,18"),
        json!(""),
        json!("a"),
        json!([]),
        json!([1, 1]),
        json!({}),
        json!(u64::MAX),
        json!("\u{0}"),
        json!([2, 8, 18]),
        json!(16),
        json!("fast"),
        json!(-0.0),
        json!({"nested": [1, {"deep": null}]}),
    ];
    let keys = [
        "cpu_num_threads",
        "use_chat_template",
        "cot",
        "max_context_len",
        "model_name",
        "load_in_8bit",
        "model_cls",
        "do_select_layers",
        "num_wait_load_layers",
        "real_offload",
        "dense_more",
        "num_of_selected_tokens",
        "selector_cls",
        "window_size",
        "min_prompt_len",
        "prefill",
        "keep_sink_tokens",
        "keep_recent_tokens",
        "record_recall",
        "max_host_bytes",
        "other",
    ];
    // A small deterministic LCG keeps this reproducible without extra crates.
    let mut state = 0x2545F4914F6CDD1Du64;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    for _ in 0..5000 {
        let mut obj = serde_json::Map::new();
        for _ in 0..(next() % 6) {
            obj.insert(
                keys[next() % keys.len()].to_string(),
                values[next() % values.len()].clone(),
            );
        }
        match OmniKvConfig::from_value(&serde_json::Value::Object(obj)) {
            Ok(cfg) => assert!(!cfg.filter_layers.is_empty()),
            Err(e) => assert!(!e.0.is_empty()),
        }
    }
}
