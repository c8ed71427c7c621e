//! The fidelity evaluation's cases and scoring (no server needed): cases
//! are deterministic, needles sit where they should, prompts have about the
//! requested size, and scoring honours whole words and distractors.

use integration_tests::eval::*;

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
    assert!(Variant::parse("h2o@0.1").is_err());
}
