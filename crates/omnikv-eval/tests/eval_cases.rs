//! The fidelity evaluation's cases and scoring (no server needed): cases
//! are deterministic, needles sit where they should, prompts have about the
//! requested size, and scoring honours whole words and distractors.

use omnikv_eval::eval::*;

fn haystack() -> String {
    // A stand-in for the essays: numbered sentences.
    (0..4000)
        .map(|i| format!("Sentence number {i} talks about startups."))
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn needle_cases_place_the_needle_at_its_depth() {
    let h = haystack();
    let cases = needle_cases(&h, &[500, 2000], &[0, 50, 100]);
    assert_eq!(cases.len(), 6);
    assert_eq!(
        needle_cases(&h, &[500, 2000], &[0, 50, 100])[4].prompt,
        cases[4].prompt
    );
    for c in &cases {
        let at = c
            .prompt
            .find("The secret code of the blue vault is")
            .unwrap() as f64;
        let doc_start = c.prompt.find("Document:").unwrap() as f64;
        let doc_end = c.prompt.find("\n\nQuestion:").unwrap() as f64;
        let depth = (at - doc_start) / (doc_end - doc_start) * 100.0;
        let want = c.depth.unwrap() as f64;
        assert!(
            (depth - want).abs() < 3.0,
            "{}: needle at {depth:.1}%",
            c.id
        );
        assert!(c.prompt.contains(&c.answer));
        let chars = c.prompt.len() as f64;
        let target = c.length as f64 * CHARS_PER_TOKEN;
        assert!(
            chars > 0.9 * target && chars < 1.1 * target + 300.0,
            "{}: {chars} chars",
            c.id
        );
    }
}

#[test]
fn two_stage_and_two_needle_cases() {
    let c = &two_stage_cases(&[100], 3)[1];
    let (a, b) = {
        let q = &c.prompt[c.prompt.find("compute ").unwrap() + 8..];
        let mut it = q
            .split(|ch: char| !ch.is_ascii_digit())
            .filter(|s| !s.is_empty());
        (
            it.next().unwrap().parse::<usize>().unwrap(),
            it.next().unwrap().parse::<usize>().unwrap(),
        )
    };
    assert!(c.prompt.contains(&format!("\n{}: {}\n", a + b, c.answer)));
    assert!(COLOURS.contains(&c.answer.as_str()));

    let h = haystack();
    let cases = two_needle_cases(&h, &[1000], &[(10, 70), (70, 10)]);
    for c in &cases {
        let locker = c.prompt[c.prompt.find("kept in locker ").unwrap() + 15..]
            .split('.')
            .next()
            .unwrap()
            .to_string();
        assert!(c.prompt.contains(&format!(
            "Locker {locker} holds the access code {}.",
            c.answer
        )));
        assert_eq!(c.distractors.len(), 2);
        for d in &c.distractors {
            assert!(c.prompt.contains(&format!("holds the access code {d}.")));
        }
    }
}

#[test]
fn scoring() {
    let case = Case {
        id: "x".into(),
        suite: Suite::TwoNeedle,
        length: 0,
        depth: None,
        prompt: String::new(),
        answer: "48213".into(),
        distractors: vec!["55555".into()],
        max_tokens: 8,
        mode: PromptMode::Chat,
    };
    assert!(score(&case, "The code is 48213."));
    assert!(
        !score(&case, "The code is 482130."),
        "inside a longer number"
    );
    assert!(
        !score(&case, "Locker 12 holds 55555, not 48213"),
        "distractor first"
    );
    assert!(score(&case, "It is 48213 (not 55555)"));
    assert!(!score(&case, "I don't know"));
    let colour = Case {
        answer: "red".into(),
        distractors: vec!["blue".into()],
        ..case.clone()
    };
    assert!(score(&colour, "47: Red"));
    assert!(!score(&colour, "the colour is bored"), "not a whole word");
}

#[test]
fn variants_parse() {
    assert_eq!(Variant::parse("default").unwrap(), Variant::Default);
    assert_eq!(Variant::parse("default").unwrap().request_kv_cache(), None);
    // `full`: the omnikv backend with the base config untouched, every
    // request decoding densely.
    let full = Variant::parse("full").unwrap();
    let base =
        serde_json::json!({"do_select_layers": [4, 8, 17, 22], "num_of_selected_tokens": 0.1});
    assert_eq!(
        (full.label().as_str(), full.backend(), full.budget()),
        ("full", "omnikv", None)
    );
    assert_eq!(full.config(&base), Some(base.clone()));
    assert_eq!(
        full.request_kv_cache(),
        Some(serde_json::json!({"enabled": false}))
    );
    let v = Variant::parse("omnikv@0.1:keep_sink_tokens=4+selector_cls=exp").unwrap();
    assert_eq!(v.label(), "omnikv@0.1:keep_sink_tokens=4+selector_cls=exp");
    let cfg = v
        .config(&serde_json::json!({"do_select_layers": "2,8,18"}))
        .unwrap();
    assert_eq!(cfg["num_of_selected_tokens"], 0.1);
    assert_eq!(cfg["keep_sink_tokens"], 4);
    assert_eq!(cfg["selector_cls"], "exp");
    assert_eq!(
        Variant::parse("omnikv@2048")
            .unwrap()
            .config(&serde_json::json!({}))
            .unwrap()["num_of_selected_tokens"],
        2048
    );
    assert!(Variant::parse("omnikv@0").is_err());
    assert!(Variant::parse("quest@0.1").is_err());
    // Baselines: their own budget key, no OmniKV base config.
    let h2o = Variant::parse("h2o@0.1:heavy_ratio=0.25").unwrap();
    assert_eq!((h2o.backend(), h2o.budget()), ("h2o", Some(0.1)));
    assert_eq!(h2o.label(), "h2o@0.1:heavy_ratio=0.25");
    assert_eq!(
        h2o.config(&serde_json::json!({"do_select_layers": "2,8,18"}))
            .unwrap(),
        serde_json::json!({"budget": 0.1, "heavy_ratio": 0.25})
    );
    assert_eq!(
        Variant::parse("streaming@64")
            .unwrap()
            .config(&serde_json::json!({}))
            .unwrap(),
        serde_json::json!({"budget": 64})
    );
}

#[test]
fn prompt_modes() {
    let base = two_stage_cases(&[20], 1).remove(0);
    assert_eq!(
        PromptMode::Chat.apply(&base).id,
        base.id,
        "chat keeps the cached ids"
    );
    let cot = PromptMode::Cot.apply(&base);
    assert_eq!(cot.id, format!("{}~cot", base.id));
    assert!(cot.prompt.ends_with(COT_INSTRUCTION) && cot.max_tokens >= 200);
    let plain = PromptMode::Plain.apply(&base);
    assert!(plain.id.ends_with("~plain") && plain.prompt.ends_with("Answer:"));
    // The config keys choose the mode; `cot` needs the chat template.
    for (cfg, want) in [
        (serde_json::json!({}), Some(PromptMode::Chat)),
        (
            serde_json::json!({"use_chat_template": false}),
            Some(PromptMode::Plain),
        ),
        (
            serde_json::json!({"use_chat_template": true, "cot": true}),
            Some(PromptMode::Cot),
        ),
        (
            serde_json::json!({"use_chat_template": false, "cot": true}),
            None,
        ),
        (serde_json::json!({"cot": "yes"}), None),
    ] {
        assert_eq!(PromptMode::from_config(&cfg).ok(), want, "{cfg}");
    }
    // Chain-of-thought answers are read from the final `Answer:` line, so
    // colours named while reasoning do not count as distractors.
    let case = Case {
        answer: "teal".into(),
        distractors: vec!["red".into()],
        ..cot
    };
    assert!(score(
        &case,
        "Key 7 is red? No: 3 + 4 = 7, and 7 maps to teal.\nAnswer: teal"
    ));
    assert!(!score(&case, "7 maps to teal.\nAnswer: red"));
    assert!(
        score(&case, "3 + 4 = 7\nteal"),
        "no Answer line: the last line"
    );
    assert!(
        !score(&case, "Answer: teal\nAnswer: red"),
        "the last Answer line counts"
    );
}

#[test]
fn benchmark_files_become_cases() {
    let samples = omnikv_eval::samples_dir();
    let gguf = omnikv_eval::model_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let tok = omnikv_eval::bench_format::gguf_tokenizer(&gguf).unwrap();
    let (cases, by_id) = bench_cases(
        &[
            samples.join("longbench"),
            samples.join("infinitebench/passkey.jsonl"),
        ],
        None,
        &tok,
        100,
    )
    .unwrap();
    assert_eq!(cases.len(), by_id.len());
    assert!(cases
        .iter()
        .all(|c| c.suite == Suite::Bench && by_id.contains_key(&c.id)));
    // Format from the path, task from the file, one case-length index per task.
    assert!(cases
        .iter()
        .any(|c| c.id.starts_with("longbench/hotpotqa/")));
    let passkey: Vec<&Case> = cases
        .iter()
        .filter(|c| c.id.starts_with("infinitebench/passkey/"))
        .collect();
    assert_eq!(passkey.len(), 1);
    assert!(cases
        .iter()
        .filter(|c| c.length == passkey[0].length)
        .all(|c| c.id.starts_with("infinitebench/passkey/")));
    // Middle truncation to 100 tokens keeps both ends of a longer prompt.
    for c in &cases {
        let n = omnikv_eval::bench_format::count_tokens(&tok, &c.prompt).unwrap();
        assert!(n <= 100, "{}: {n} tokens", c.id);
        let full = &by_id[&c.id].prompt;
        let head: String = full.chars().take(20).collect();
        let tail: String = full
            .chars()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        assert!(
            c.prompt.starts_with(&head) && c.prompt.ends_with(&tail),
            "{}",
            c.id
        );
    }
    // Chain-of-thought ids and the scoring sample stay paired.
    let cot = PromptMode::Cot.apply(&cases[0]);
    assert_eq!(cot.id, PromptMode::Cot.apply_id(&cases[0].id));
    let missing = bench_cases(&[samples.join("nope.jsonl")], None, &tok, 100).unwrap_err();
    assert!(missing.to_string().contains("does not exist"), "{missing}");
}

#[test]
fn variant_lists_split_outside_brackets() {
    use omnikv_eval::eval::split_variant_list;
    assert_eq!(
        split_variant_list(
            "full,omnikv@0.1:do_select_layers=[2,8,18]+num_wait_load_layers=1,,h2o@0.1"
        ),
        [
            "full",
            "omnikv@0.1:do_select_layers=[2,8,18]+num_wait_load_layers=1",
            "h2o@0.1"
        ]
    );
    let v = Variant::parse(&split_variant_list("omnikv@0.1:do_select_layers=[2,8,18]")[0]).unwrap();
    assert_eq!(
        v.config(&serde_json::json!({})).unwrap()["do_select_layers"],
        serde_json::json!([2, 8, 18])
    );
}
