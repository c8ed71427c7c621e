//! The LongBench / InfiniteBench formats and metrics
//! (`omnikv_eval::{bench_format, metrics}`): every metric against
//! values worked out by hand (the arithmetic is in the comments), the
//! loaders on every committed sample file and on broken rows, the GGUF
//! tokenizer, and middle truncation. The GGUF tokenizer against the real
//! server's token counts is an end-to-end test
//! (`integration-tests/tests/gguf_tokenizer.rs`).
//!
//! All expected values were also checked against the published Python
//! (LongBench `metrics.py`, InfiniteBench `compute_scores.py`, with the
//! `rouge`, `rouge_score`, `fuzzywuzzy` and `jieba` packages).

use std::path::{Path, PathBuf};

use omnikv_eval::bench_format::{
    count_tokens, format_template, gguf_tokenizer, load_jsonl, score_sample, truncate_middle,
    Format, Sample,
};
use omnikv_eval::metrics::*;

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn close(got: f64, want: f64) {
    assert!((got - want).abs() < 1e-9, "got {got}, want {want}");
}

fn samples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("samples")
}

fn model_path() -> PathBuf {
    omnikv_eval::model_dir().join(omnikv_eval::MODEL_FILE)
}

/// A scratch directory of its own for each test.
fn scratch(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("omnikv-bench-format-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(dir: &Path, file: &str, text: &str) -> PathBuf {
    let p = dir.join(file);
    std::fs::write(&p, text).unwrap();
    p
}

// ---------------------------------------------------------------------------
// LongBench metrics

#[test]
fn normalize_answer_lowercases_drops_punctuation_articles_and_spaces() {
    // lower: "the cat's hat, a red one!"; no punctuation: "the cats hat a red one";
    // articles -> " ": " cats hat   red one"; whitespace collapsed.
    assert_eq!(
        normalize_answer("The Cat's hat, a red one!"),
        "cats hat red one"
    );
    // "an" inside a word stays ("banana"); only whole words go.
    assert_eq!(
        normalize_answer("An  anthem\tof banana"),
        "anthem of banana"
    );
    assert_eq!(normalize_answer(""), "");
    // Chinese: punctuation of both kinds and all whitespace removed.
    assert_eq!(normalize_zh_answer("北京， 中国。ABC!"), "北京中国abc");
}

#[test]
fn qa_f1_by_hand() {
    // pred "big red cat", gold "big red fluffy dog": common {big, red} = 2;
    // precision 2/3, recall 2/4 -> F1 = 2*(2/3)*(1/2) / (2/3 + 1/2) = 4/7 = 0.5714.
    close(qa_f1_score("Big red cat", "big red fluffy dog"), 4.0 / 7.0);
    // pred "eiffel tower in paris" (4), gold "eiffel tower" (2): common 2;
    // P 2/4, R 2/2 -> F1 = 2*0.5*1/1.5 = 0.6667.
    close(
        qa_f1_score("The Eiffel Tower, in Paris.", "Eiffel Tower"),
        2.0 / 3.0,
    );
    // Multiplicity: "dog dog dog" vs "dog": common 1; P 1/3, R 1 -> F1 0.5.
    close(qa_f1_score("dog dog dog", "dog"), 0.5);
    // Empty prediction, or one that normalises to nothing -> 0.
    close(qa_f1_score("", "Paris"), 0.0);
    close(qa_f1_score("The.", "Paris"), 0.0);
    // Max over the answers.
    close(
        Metric::QaF1.score("Paris", &s(&["London", "the city of Paris", "Paris"]), &[]),
        1.0,
    );
    close(Metric::QaF1.score("Paris", &[], &[]), 0.0);
}

#[test]
fn qa_f1_zh_uses_jieba_words() {
    // jieba: 北京 / 是 / 中国 / 的 / 首都 / 。 -> "。" normalises to "" and is
    // dropped: 5 words; gold 北京 (1 word). common 1: P 1/5, R 1 ->
    // F1 = 2*0.2*1/1.2 = 0.3333.
    assert_eq!(
        jieba_cut("北京是中国的首都。"),
        vec!["北京", "是", "中国", "的", "首都", "。"]
    );
    close(qa_f1_zh_score("北京是中国的首都。", "北京"), 1.0 / 3.0);
    // 北京市 is one jieba word, so it does not match 北京 at all.
    assert_eq!(jieba_cut("北京市"), vec!["北京市"]);
    close(qa_f1_zh_score("北京市", "北京"), 0.0);
    close(qa_f1_zh_score("", "北京"), 0.0);
}

#[test]
fn rouge_l_as_the_rouge_package_computes_it() {
    // One sentence each. Distinct words: hyp {the, cat, sat, on, mat} n = 5,
    // ref {the, cat, lay, on, mat} m = 5. LCS "the cat on the mat" -> distinct
    // words {the, cat, on, mat} = 4. r = p = 4/5 ->
    // f = 2 * (0.64 / (1.6 + 1e-8)) = 0.79999999500 (a plain token LCS-F would be 5/6).
    close(
        rouge_score("the cat sat on the mat", "the cat lay on the mat"),
        2.0 * (0.64 / (1.6 + 1e-8)),
    );
    // Sentences end at ".": hyp ["cats purr", "dogs bark"] (n = 4 words),
    // ref ["dogs bark loudly"] (m = 3). LCS with "cats purr": none; with
    // "dogs bark": {dogs, bark}. union 2: r = 2/3, p = 2/4 ->
    // f = 2 * ((1/3) / (7/6 + 1e-8)) = 0.5714.
    close(
        rouge_score("cats purr. dogs bark", "dogs bark loudly"),
        2.0 * ((1.0 / 3.0) / (7.0 / 6.0 + 1e-8)),
    );
    // No sentence at all (empty, or only dots): the package raises -> 0.
    close(rouge_score("", "dogs bark"), 0.0);
    close(rouge_score("...", "dogs bark"), 0.0);
    close(
        Metric::Rouge.score("dogs bark", &s(&["cats purr", "dogs bark"]), &[]),
        2.0 * (1.0 / (2.0 + 1e-8)),
    );
}

#[test]
fn rouge_l_recursion_limit_as_in_python() {
    // The package reads the LCS back recursively; under eval.py Python's
    // recursion limit leaves 991 frames for it. ref "w x0 .. x4" (6 words),
    // hyp "w y0 .. y(k-2)" (k words): the read-out visits (6, k) .. (6, 1),
    // (5, 1) .. (1, 1), then (0, 0): k + 6 frames. k = 985 -> 991 frames
    // (scored: LCS {w}, r = 1/6, p = 1/985); k = 986 -> RecursionError -> 0.
    let reference = "w x0 x1 x2 x3 x4";
    let hyp = |k: usize| {
        let mut words = vec!["w".to_string()];
        words.extend((0..k - 1).map(|i| format!("y{i}")));
        words.join(" ")
    };
    let (r, p) = (1.0 / 6.0, 1.0 / 985.0);
    close(
        rouge_score(&hyp(985), reference),
        2.0 * ((p * r) / (p + r + 1e-8)),
    );
    close(rouge_score(&hyp(986), reference), 0.0);
}

#[test]
fn rouge_zh_on_jieba_words() {
    // 我们 / 今天 / 开会 vs 我们 / 明天 / 开会: n = m = 3, LCS {我们, 开会} = 2,
    // r = p = 2/3 -> f = 2 * ((4/9) / (4/3 + 1e-8)) = 0.6667.
    close(
        rouge_zh_score("我们今天开会", "我们明天开会"),
        2.0 * ((4.0 / 9.0) / (4.0 / 3.0 + 1e-8)),
    );
    close(rouge_zh_score("", "我们明天开会"), 0.0);
}

#[test]
fn classification_with_several_matches() {
    let classes = s(&["Cat", "Cat A", "Dog", "A"]);
    // In the prediction: [Cat, Cat A, Dog, A]. Walk: "Cat" is inside the
    // truth "Cat A" -> removed, [Cat A, Dog, A], the walk moves to index 1
    // ("Dog", kept), then index 2 ("A", inside the truth) -> removed:
    // [Cat A, Dog]. Truth among 2 matches -> 1/2.
    close(classification_score("Cat A or Dog", "Cat A", &classes), 0.5);
    // The skip: classes [Cat, A, Cat A], all in "Cat A". "Cat" removed ->
    // [A, Cat A]; the walk goes on at index 1 ("Cat A"), so "A" is never
    // looked at and stays: 1/2, not 1.
    close(
        classification_score("Cat A", "Cat A", &s(&["Cat", "A", "Cat A"])),
        0.5,
    );
    // Only the truth matches -> 1; the truth not matched -> 0.
    close(classification_score("It is a Dog.", "Dog", &classes), 1.0);
    close(classification_score("It is a Dog.", "Cat", &classes), 0.0);
    close(classification_score("", "Cat", &classes), 0.0);
    close(
        Metric::Classification.score("Dog", &s(&["Cat", "Dog"]), &classes),
        1.0,
    );
}

#[test]
fn retrieval_and_count() {
    // Numbers in the prediction [3, 12]; the truth's paragraph is 3 -> 1/2.
    close(
        retrieval_score("Paragraph 3, not Paragraph 12", "Paragraph 3"),
        0.5,
    );
    close(
        retrieval_score("The answer is: Paragraph 3", "Paragraph 3"),
        1.0,
    );
    close(retrieval_score("I do not know", "Paragraph 3"), 0.0);
    // No "Paragraph N" in the truth: Python raises IndexError; 0 here.
    close(retrieval_score("3", "paragraph 3"), 0.0);
    // [12, 3] against 段落3 -> 1/2.
    close(retrieval_zh_score("答案是段落12和段落3", "段落3"), 0.5);
    close(retrieval_zh_score("段落3", "段落3"), 1.0);
    // [7, 9] against 7 -> 1/2.
    close(
        count_score("There are 7 unique paragraphs out of 9", "7"),
        0.5,
    );
    close(count_score("seven", "7"), 0.0);
}

#[test]
fn fuzz_ratio_is_difflib_rounded_half_to_even() {
    // SequenceMatcher("abcd", "abce"): block "abc" -> 2*3/8 = 0.75 -> 75.
    assert_eq!(fuzz_ratio("abcd", "abce"), 75);
    // 2*1/16 = 0.125 -> 12.5 -> 12 (half to even); 2*3/16 -> 37.5 -> 38.
    assert_eq!(fuzz_ratio("abcdefgh", "azzzzzzz"), 12);
    assert_eq!(fuzz_ratio("abcdefgh", "abczzzzz"), 38);
    // Not an LCS: "cbc" vs "bac". The first longest block is a[0] = b[2]
    // ("c"); nothing is left on its right in b and nothing on its left in
    // a, so M = 1 -> 2/6 -> 33 (the LCS "bc" would give 67).
    assert_eq!(fuzz_ratio("cbc", "bac"), 33);
    // Autojunk: b = "ab" x 100 has 200 items, so "a" and "b" (100 > 200/100+1
    // times) never start a block. "zab": no block -> 0 (2 without autojunk).
    // "ab": the empty match at (0, 0) is still extended over the common
    // prefix "ab" -> 2*2/202 = 1.98 -> 2.
    let b = "ab".repeat(100);
    assert_eq!(fuzz_ratio("zab", &b), 0);
    assert_eq!(fuzz_ratio("ab", &b), 2);
    // Equal strings (also both empty) -> 100; one empty -> 0.
    assert_eq!(fuzz_ratio("", ""), 100);
    assert_eq!(fuzz_ratio("a", ""), 0);
}

#[test]
fn code_sim_takes_the_first_plain_line() {
    // Lines: "```python" (backtick), "# compute" (#), "    return total" -> equal -> 1.
    close(
        code_sim_score(
            "```python\n# compute\n    return total\n",
            "    return total",
        ),
        1.0,
    );
    // Leading newlines are dropped first; "x = 1  // c++" has "//", so the
    // line compared is "y = 2": vs "y = 3" -> block "y = " (4) -> 2*4/10 -> 80.
    close(code_sim_score("\n\nx = 1  // c++\ny = 2", "y = 3"), 0.8);
    // No plain line: the empty string is compared -> 0 (or 100 against "").
    close(code_sim_score("# only\n// comments", "return x"), 0.0);
    close(code_sim_score("# only\n// comments", ""), 1.0);
    close(code_sim_score("", "return x"), 0.0);
}

// ---------------------------------------------------------------------------
// InfiniteBench metrics

#[test]
fn infinitebench_retrieval_metrics() {
    // First run of ASCII digits.
    assert_eq!(first_int_match("The pass key is 48213."), "48213");
    close(
        Metric::IbFirstInt.score("The pass key is 48213.", &s(&["48213"]), &[]),
        1.0,
    );
    close(Metric::IbFirstInt.score("48 213", &s(&["48213"]), &[]), 0.0);
    close(Metric::IbFirstInt.score("", &s(&["48213"]), &[]), 0.0);
    // kv: `" . :` become spaces, words ["The", "value", "is", "3f2a-77"].
    close(
        Metric::IbKvRetrieval.score("The value is: \"3f2a-77\".", &s(&["3f2a-77"]), &[]),
        1.0,
    );
    close(
        Metric::IbKvRetrieval.score("3f2a-77x", &s(&["3f2a-77"]), &[]),
        0.0,
    );
}

#[test]
fn infinitebench_choice_and_code_debug() {
    let label = s(&["The orchard", "C"]);
    let choice = |p: &str| Metric::IbChoice.score(p, &label, &[]);
    close(choice("C"), 1.0); // first character among A-D and it is the letter
    close(choice("C. The orchard"), 1.0);
    close(choice("B. The orchard"), 0.0); // the first letter decides
    close(choice("The orchard"), 1.0); // the whole prediction is a label
    close(choice("I think the answer is: C"), 1.0); // after "answer is:" + 1 char
    close(choice("The answer is"), 0.0); // prefix at the very end
    close(choice("Probably B"), 0.0); // first word inside "ABCD": "B", not a label
    close(choice("maybe CD"), 0.0); // "CD" is inside "ABCD" but not a label
    close(choice("  "), 0.0);

    let label = s(&["parse_args", "B"]);
    let debug = |p: &str| Metric::IbCodeDebug.score(p, &label, &[]);
    close(debug("B. parse_args"), 1.0); // "B." at the start
    close(debug("The answer is: parse_args"), 1.0); // text after the prefix starts with the name
    close(debug("The correct option is: B"), 1.0); // "is:" matches first, then "B"
    close(debug("Option B"), 0.0); // "Option" becomes a space: no prefix, 0 as published
    close(debug("A"), 0.0);
}

#[test]
fn infinitebench_numbers() {
    // code_run: "." becomes a space, last word "12".
    close(
        Metric::IbCodeRun.score("The value of func_1(2) is 12.", &s(&["12"]), &[]),
        1.0,
    );
    close(
        Metric::IbCodeRun.score("it returns -3", &s(&["-3"]), &[]),
        1.0,
    );
    close(Metric::IbCodeRun.score("12 or 13", &s(&["12"]), &[]), 0.0);
    // math_find: first number; integer label compared as integers, a float
    // label as floats; an integer label with a decimal in the prediction
    // (Python raises) -> 0.
    close(
        Metric::IbMathFind.score("The largest number is 88.", &s(&["88"]), &[]),
        1.0,
    );
    close(Metric::IbMathFind.score("12.50", &s(&["12.5"]), &[]), 1.0);
    close(Metric::IbMathFind.score("88.0", &s(&["88"]), &[]), 0.0);
    // math_calc: [1, 4, 9] against [1, 4, 8]: prefix of 2 -> 2/3.
    close(
        Metric::IbMathCalc.score("[1, 4, 9]", &s(&["1", "4", "8"]), &[]),
        2.0 / 3.0,
    );
    // Signs are lost ("-1" reads as 1): [3, 1] against [3, -1] -> 1/2.
    close(
        Metric::IbMathCalc.score("3, -1", &s(&["3", "-1"]), &[]),
        0.5,
    );
}

#[test]
fn infinitebench_text_metrics() {
    // longdialogue: any label, upper-cased, inside the upper-cased prediction.
    let names = s(&["MARA", "MARA QUILL"]);
    close(
        Metric::IbLongDialogue.score("probably Mara Quill", &names, &[]),
        1.0,
    );
    close(Metric::IbLongDialogue.score("Tomas", &names, &[]), 0.0);
    // longbook_qa_chn: characters. 北 京 市 vs 北 京: P 2/3, R 1 -> F1 0.8.
    close(
        Metric::IbQaF1ZhChars.score("北京市。", &s(&["北京"]), &[]),
        0.8,
    );
    // longbook_qa_eng: LongBench's qa F1.
    close(
        Metric::QaF1.score("Big red cat", &s(&["big red fluffy dog"]), &[]),
        4.0 / 7.0,
    );
    // rougeLsum: tokens the cat sat on the mat / the cat lay on the mat (6
    // each, counted with repeats); LCS the cat on the mat = 5 hits ->
    // P = R = 5/6 -> F 0.8333.
    close(
        rouge_lsum("The cat sat on the mat.", "the cat lay on the mat"),
        5.0 / 6.0,
    );
    // Sentences are lines: cands [cats purr] [dogs bark] (n 4), ref
    // [dogs bark loudly] (m 3): 2 hits -> R 2/3, P 1/2 -> F 4/7.
    close(
        rouge_lsum("cats purr\ndogs bark", "dogs bark loudly"),
        4.0 / 7.0,
    );
    close(rouge_lsum("", "dogs bark"), 0.0);
    close(rouge_lsum("!!!", "dogs bark"), 0.0);
    // Several references: the best.
    close(
        Metric::IbRougeLsum.score("dogs bark", &s(&["cats purr", "dogs bark"]), &[]),
        1.0,
    );
}

#[test]
fn metric_names_are_distinct_and_scores_in_range() {
    let names: std::collections::HashSet<_> = Metric::ALL.iter().map(|m| m.name()).collect();
    assert_eq!(names.len(), Metric::ALL.len());
    for m in Metric::ALL {
        for pred in ["", "A", "the answer is: 3", "北京", "Paragraph 1"] {
            let v = m.score(pred, &s(&["3", "A"]), &s(&["A", "B"]));
            assert!((0.0..=1.0).contains(&v), "{m}: {v}");
        }
    }
}

// ---------------------------------------------------------------------------
// Loaders

fn load(format: Format, file: &str) -> Vec<Sample> {
    let dir = match format {
        Format::LongBench => "longbench",
        Format::InfiniteBench => "infinitebench",
    };
    load_jsonl(&samples_dir().join(dir).join(file), format).unwrap()
}

#[test]
fn format_names() {
    assert_eq!("longbench".parse::<Format>().unwrap(), Format::LongBench);
    assert_eq!(
        "InfiniteBench".parse::<Format>().unwrap(),
        Format::InfiniteBench
    );
    let err = "ruler".parse::<Format>().unwrap_err().to_string();
    assert!(err.contains("ruler") && err.contains("longbench"), "{err}");
    assert_eq!(Format::LongBench.tasks().len(), 21);
    assert_eq!(Format::InfiniteBench.tasks().len(), 12);
}

#[test]
fn template_filling() {
    assert_eq!(
        format_template("{{x}} {a}-{b}", &[("a", "1"), ("b", "{a}")]).unwrap(),
        "{x} 1-{a}"
    );
    assert!(format_template("{missing}", &[]).is_err());
    // Every published template fills with the fields its loader supplies.
    let all = [
        ("context", "C"),
        ("input", "I"),
        ("question", "Q"),
        ("OPTION_A", "a"),
        ("OPTION_B", "b"),
        ("OPTION_C", "c"),
        ("OPTION_D", "d"),
        ("func", "f"),
        ("func_call", "f(1)"),
        ("prefix", "P"),
    ];
    for format in [Format::LongBench, Format::InfiniteBench] {
        for task in format.tasks() {
            let spec = format.task(task).unwrap();
            let filled = format_template(spec.template, &all).unwrap();
            assert!(!filled.contains("{context}"), "{task}");
        }
    }
}

#[test]
fn longbench_samples_load() {
    let hotpot = load(Format::LongBench, "hotpotqa.jsonl");
    assert_eq!(hotpot.len(), 2);
    for smp in &hotpot {
        assert_eq!(smp.task, "hotpotqa"); // row 2 has no `dataset`: from the file name
        assert_eq!(smp.max_new_tokens, 32);
        assert_eq!(smp.metric, Metric::QaF1);
        assert!(smp.prompt.starts_with(
            "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\nPassage 1:\n"
        ));
        assert!(smp.all_classes.is_empty());
    }
    assert_eq!(hotpot[0].id, "sample-hotpotqa-0");
    assert_eq!(hotpot[0].answers, s(&["the river Osk", "Osk"]));
    assert!(hotpot[0]
        .prompt
        .contains("She opened her first workshop in Tellin in 1998"));
    assert!(hotpot[0].prompt.ends_with(
        "\n\nQuestion: Which river runs through the town where Mara Quill opened her first glass workshop?\nAnswer:"
    ));
    close(score_sample(&hotpot[0], "Osk"), 1.0);
    // "river osk" vs "river osk" (the answer "the river Osk" normalised) -> 1.
    close(score_sample(&hotpot[0], "The river Osk."), 1.0);

    let zh = load(Format::LongBench, "multifieldqa_zh.jsonl");
    assert_eq!(zh.len(), 1);
    assert_eq!(
        (zh[0].task.as_str(), zh[0].max_new_tokens, zh[0].metric),
        ("multifieldqa_zh", 64, Metric::QaF1Zh)
    );
    assert!(zh[0]
        .prompt
        .starts_with("阅读以下文字并用中文简短回答：\n\n青石镇图书馆"));
    assert!(zh[0]
        .prompt
        .ends_with("问题：小镇图书馆每周几闭馆？\n回答："));
    // jieba: 每周 / 一 / 。 (。 dropped) against 每周 / 一 -> 1.
    close(score_sample(&zh[0], "每周一。"), 1.0);

    let trec = load(Format::LongBench, "trec.jsonl");
    assert_eq!(
        (
            trec[0].task.as_str(),
            trec[0].max_new_tokens,
            trec[0].metric
        ),
        ("trec", 64, Metric::Classification)
    );
    assert_eq!(trec[0].all_classes.len(), 10);
    assert!(trec[0].prompt.starts_with(
        "Please determine the type of the question below. Here are some examples of questions.\n\nQuestion: What does the abbreviation NGO stand for?"
    ));
    assert!(trec[0]
        .prompt
        .ends_with("Type: Animal\nQuestion: Which city is home to the Osk river bridge?\nType:"));
    // First-line rule: only "City" counts; the whole text would match City and
    // Country -> 1/2.
    close(score_sample(&trec[0], "\nCity\nCountry"), 1.0);
    close(
        Metric::Classification.score("City\nCountry", &trec[0].answers, &trec[0].all_classes),
        0.5,
    );

    let pre = load(Format::LongBench, "passage_retrieval_en.jsonl");
    assert_eq!(
        (pre[0].max_new_tokens, pre[0].metric),
        (32, Metric::Retrieval)
    );
    assert!(pre[0]
        .prompt
        .contains("Paragraph 2: Mara Quill left Tellin for the coast"));
    assert!(pre[0]
        .prompt
        .contains("The following is an abstract.\n\nA glassblower moves her workshop"));
    close(score_sample(&pre[0], "Paragraph 2"), 1.0);

    let lcc = load(Format::LongBench, "lcc.jsonl");
    assert_eq!(
        (lcc[0].max_new_tokens, lcc[0].metric),
        (64, Metric::CodeSim)
    );
    assert!(lcc[0]
        .prompt
        .starts_with("Please complete the code given below. \ndef total_weight(parcels):"));
    assert!(lcc[0]
        .prompt
        .ends_with("        total += parcel.weight\nNext line of code:\n"));
    close(score_sample(&lcc[0], "    return total\n"), 1.0);

    let gov = load(Format::LongBench, "gov_report.jsonl");
    assert_eq!((gov[0].max_new_tokens, gov[0].metric), (512, Metric::Rouge));
    assert!(gov[0]
        .prompt
        .contains("Report:\nThe river authority reviewed flood defences"));
    assert!(gov[0]
        .prompt
        .ends_with("Now, write a one-page summary of the report.\n\nSummary:"));
    let summary = &gov[0].answers[0];
    close(score_sample(&gov[0], summary), 2.0 * (1.0 / (2.0 + 1e-8)));
}

#[test]
fn infinitebench_samples_load() {
    let pk = load(Format::InfiniteBench, "passkey.jsonl");
    assert_eq!(
        (pk[0].task.as_str(), pk[0].max_new_tokens, pk[0].metric),
        ("passkey", 6, Metric::IbFirstInt)
    );
    assert_eq!(pk[0].id, "0");
    assert!(pk[0].prompt.starts_with(
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about the important information.\n\nThe grass is green."
    ));
    assert!(pk[0].prompt.contains("The pass key is 48213. Remember it."));
    assert!(pk[0]
        .prompt
        .ends_with("\n\nWhat is the pass key?\n\nThe pass key is"));
    close(score_sample(&pk[0], " 48213."), 1.0);

    let kv = load(Format::InfiniteBench, "kv_retrieval.jsonl");
    assert_eq!(
        (kv[0].max_new_tokens, kv[0].metric),
        (50, Metric::IbKvRetrieval)
    );
    assert!(kv[0].prompt.starts_with(
        "Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n{\""
    ));
    assert!(kv[0]
        .prompt
        .ends_with("The value associated with the specified key is: "));
    close(
        score_sample(&kv[0], "\"19c8d7e6-f5a4-4b3c-a2d1-e0f9a8b7c6d5\""),
        1.0,
    );

    let qa = load(Format::InfiniteBench, "longbook_qa_eng.jsonl");
    assert_eq!((qa[0].max_new_tokens, qa[0].metric), (40, Metric::QaF1));
    assert!(qa[0].prompt.starts_with(
        "Read the book and answer the question. Be very concise in your answer.\n\nChapter One. Ivo Brand"
    ));
    assert!(qa[0]
        .prompt
        .ends_with("\n\nQuestion: What did Ivo Brand record in the green ledger?\nAnswer:"));
    close(score_sample(&qa[0], "The weather."), 1.0);

    let ch = load(Format::InfiniteBench, "longbook_choice_eng.jsonl");
    assert_eq!((ch[0].max_new_tokens, ch[0].metric), (40, Metric::IbChoice));
    // `get_answer`: [option text, its letter].
    assert_eq!(ch[0].answers, s(&["He rowed out with a lantern", "C"]));
    assert!(ch[0].prompt.contains("Chapter Two. One stormy night"));
    assert!(ch[0].prompt.ends_with(
        "Question: How did Ivo guide the fishing boat into the cove?\nA. He lit a bonfire on the rocks\nB. He rang the station bell\nC. He rowed out with a lantern\nD. He turned the lens towards it\n\nThe letter of the correct answer is"
    ));
    close(score_sample(&ch[0], " C"), 1.0);
    close(score_sample(&ch[0], " B"), 0.0);
}

#[test]
fn infinitebench_prompt_rules() {
    let dir = scratch("ib-rules");
    // math_find: "What is <the ... number> in the following list?" from the input.
    let p = write(
        &dir,
        "math_find.jsonl",
        r#"{"id": 3, "context": "[4, 9, 1]", "input": "Answer with one number. The largest number of the list is: ", "answer": [9], "options": []}"#,
    );
    let v = load_jsonl(&p, Format::InfiniteBench).unwrap();
    assert_eq!(v[0].answers, s(&["9"]));
    assert_eq!(v[0].max_new_tokens, 3);
    // `The .+ of` finds "The largest number of"; lower-cased, minus " of".
    assert_eq!(
        v[0].prompt,
        "What is the largest number in the following list?\n\n[4, 9, 1]\n\nAnswer with one number. The largest number of the list is: "
    );
    // code_run: the call is found in the input.
    let p = write(
        &dir,
        "code_run.jsonl",
        r#"{"id": 0, "context": "def func_7(x):\n    return x + 1", "input": "What is func_7(-2)?", "answer": -1, "options": []}"#,
    );
    let v = load_jsonl(&p, Format::InfiniteBench).unwrap();
    assert!(v[0]
        .prompt
        .starts_with("There is a function called func_7 in the following Python code."));
    assert!(v[0]
        .prompt
        .ends_with("Please compute the exact value of func_7(-2). The value of func_7(-2) is"));
    close(score_sample(&v[0], " -1"), 1.0);
    // math_calc: a nested answer list is flattened.
    let p = write(
        &dir,
        "math_calc.jsonl",
        r#"{"id": 0, "context": "2 + 3 - 1", "input": "", "answer": [[2, 5, 4]], "options": []}"#,
    );
    let v = load_jsonl(&p, Format::InfiniteBench).unwrap();
    assert_eq!(
        (v[0].answers.clone(), v[0].max_new_tokens),
        (s(&["2", "5", "4"]), 30000)
    );
    close(score_sample(&v[0], "[2, 5, 4]"), 1.0);
    // code_debug with an answer already [name, letter].
    let p = write(
        &dir,
        "code_debug.jsonl",
        r#"{"id": 0, "context": "def a(): pass", "input": "", "answer": ["b", "B"], "options": ["a", "b", "c", "d"]}"#,
    );
    let v = load_jsonl(&p, Format::InfiniteBench).unwrap();
    assert_eq!(v[0].answers, s(&["b", "B"]));
    assert!(v[0]
        .prompt
        .ends_with("Options:\nA. a\nB. b\nC. c\nD. d\n\nThe correct option is:"));
}

#[test]
fn longbench_e_and_dataset_field() {
    let dir = scratch("lb-e");
    let row = r#"{"input": "q?", "context": "c.", "answers": ["x"], "length": 2, "all_classes": null, "_id": "e1"}"#;
    // LongBench-E file name: `_e` dropped.
    let v = load_jsonl(&write(&dir, "hotpotqa_e.jsonl", row), Format::LongBench).unwrap();
    assert_eq!(v[0].task, "hotpotqa");
    // The `dataset` field wins over the file name, `_e` dropped there too.
    let v = load_jsonl(
        &write(
            &dir,
            "anything.jsonl",
            &row.replace("\"_id\"", "\"dataset\": \"gov_report_e\", \"_id\""),
        ),
        Format::LongBench,
    )
    .unwrap();
    assert_eq!(
        (v[0].task.as_str(), v[0].max_new_tokens),
        ("gov_report", 512)
    );
    // Blank lines are skipped; a missing `_id` gives `<task>-<line>`.
    let v = load_jsonl(
        &write(
            &dir,
            "qasper.jsonl",
            &format!("\n{}\n", row.replace(", \"_id\": \"e1\"", "")),
        ),
        Format::LongBench,
    )
    .unwrap();
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].id, "qasper-2");
}

#[test]
fn bad_rows_name_file_line_and_field() {
    let dir = scratch("bad");
    let good = r#"{"input": "q?", "context": "c.", "answers": ["x"]}"#;
    let err = |path: &Path, format: Format| format!("{:#}", load_jsonl(path, format).unwrap_err());

    let p = write(
        &dir,
        "hotpotqa.jsonl",
        &format!("{good}\n{}\n", r#"{"input": "q?", "context": "c."}"#),
    );
    let e = err(&p, Format::LongBench);
    assert!(
        e.contains("hotpotqa.jsonl:2:") && e.contains("missing field `answers`"),
        "{e}"
    );

    let p = write(
        &dir,
        "trec.jsonl",
        &format!(
            "{good}\n{good}\n{}\n",
            r#"{"input": "q?", "context": 5, "answers": ["x"]}"#
        ),
    );
    let e = err(&p, Format::LongBench);
    assert!(
        e.contains("trec.jsonl:3:")
            && e.contains("field `context` must be a string, found a number"),
        "{e}"
    );

    let p = write(
        &dir,
        "lcc.jsonl",
        r#"{"input": "", "context": "c", "answers": "x"}"#,
    );
    let e = err(&p, Format::LongBench);
    assert!(
        e.contains("lcc.jsonl:1:") && e.contains("field `answers` must be a list"),
        "{e}"
    );

    let p = write(&dir, "qmsum.jsonl", "{\"input\": ");
    let e = err(&p, Format::LongBench);
    assert!(
        e.contains("qmsum.jsonl:1:") && e.contains("not a JSON object"),
        "{e}"
    );

    let p = write(&dir, "nosuchtask.jsonl", good);
    let e = err(&p, Format::LongBench);
    assert!(
        e.contains("unknown longbench task `nosuchtask`")
            && e.contains("supported: narrativeqa, qasper,")
            && e.contains("repobench-p"),
        "{e}"
    );
    let p = write(
        &dir,
        "x.jsonl",
        &good.replace("{\"input\"", "{\"dataset\": \"squad\", \"input\""),
    );
    let e = err(&p, Format::LongBench);
    assert!(
        e.contains("x.jsonl:1:") && e.contains("unknown longbench task `squad`"),
        "{e}"
    );

    let p = write(
        &dir,
        "passkey_long.jsonl",
        r#"{"context": "c", "input": "q", "answer": ["1"]}"#,
    );
    let e = err(&p, Format::InfiniteBench);
    assert!(
        e.contains("unknown infinitebench task `passkey_long`") && e.contains("kv_retrieval"),
        "{e}"
    );

    let p = write(
        &dir,
        "passkey.jsonl",
        r#"{"id": 0, "context": "c", "input": "q"}"#,
    );
    let e = err(&p, Format::InfiniteBench);
    assert!(
        e.contains("passkey.jsonl:1:") && e.contains("missing field `answer`"),
        "{e}"
    );

    let p = write(
        &dir,
        "longbook_choice_eng.jsonl",
        r#"{"id": 0, "context": "c", "input": "q", "answer": ["x"], "options": ["a", "b"]}"#,
    );
    let e = err(&p, Format::InfiniteBench);
    assert!(
        e.contains("longbook_choice_eng.jsonl:1:") && e.contains("`options` must have 4 items"),
        "{e}"
    );

    let p = write(
        &dir,
        "code_debug.jsonl",
        r#"{"id": 0, "context": "c", "input": "", "answer": ["e"], "options": ["a", "b", "c", "d"]}"#,
    );
    let e = err(&p, Format::InfiniteBench);
    assert!(
        e.contains("code_debug.jsonl:1:") && e.contains("not one of the options"),
        "{e}"
    );

    let p = write(
        &dir,
        "kv_retrieval.jsonl",
        r#"{"id": 0, "context": "c", "answer": ["v"]}"#,
    );
    let e = err(&p, Format::InfiniteBench);
    assert!(
        e.contains("kv_retrieval.jsonl:1:") && e.contains("missing field `input`"),
        "{e}"
    );

    let e = err(&dir.join("missing.jsonl"), Format::LongBench);
    assert!(e.contains("missing.jsonl"), "{e}");
}

// ---------------------------------------------------------------------------
// Tokenizer and truncation

#[test]
fn gguf_tokenizer_refuses_other_models() {
    use candle_core::quantized::gguf_file::{write as write_gguf, Value};
    let dir = scratch("gguf");
    let path = dir.join("spm.gguf");
    let mut f = std::fs::File::create(&path).unwrap();
    let model = Value::String("llama".to_string());
    write_gguf(&mut f, &[("tokenizer.ggml.model", &model)], &[]).unwrap();
    drop(f);
    let e = format!("{:#}", gguf_tokenizer(&path).unwrap_err());
    assert!(
        e.contains("tokenizer model `llama` is not supported"),
        "{e}"
    );
    let e = format!("{:#}", gguf_tokenizer(&dir.join("none.gguf")).unwrap_err());
    assert!(e.contains("none.gguf"), "{e}");
}

#[test]
fn truncate_middle_keeps_both_ends() {
    let tok = gguf_tokenizer(&model_path()).unwrap();
    let body = "Filler sentence number one goes here, and then some more words follow. ".repeat(60);
    let prompt =
        format!("BEGIN: read the text carefully.\n{body}\nQuestion: what is the END marker?");
    let total = count_tokens(&tok, &prompt).unwrap();
    assert!(total > 600, "{total}");
    // Short enough: unchanged.
    assert_eq!(truncate_middle(&prompt, &tok, total).unwrap(), prompt);
    for max_len in [64, 101, 300] {
        let cut = truncate_middle(&prompt, &tok, max_len).unwrap();
        let n = count_tokens(&tok, &cut).unwrap();
        assert!(
            n <= max_len && n + 2 >= max_len,
            "max_len {max_len}: {n} tokens"
        );
        assert!(
            cut.starts_with("BEGIN: read the text carefully.\nFiller"),
            "{cut}"
        );
        assert!(
            cut.ends_with("\nQuestion: what is the END marker?"),
            "{cut}"
        );
        assert!(cut.len() < prompt.len());
    }
    // Chinese text: halves cut inside UTF-8 sequences still decode.
    let zh = format!("开头。{}结尾。", "会议讨论了预算问题。".repeat(50));
    let cut = truncate_middle(&zh, &tok, 40).unwrap();
    assert!(count_tokens(&tok, &cut).unwrap() <= 40);
    assert!(
        cut.starts_with("开头。") && cut.ends_with("结尾。"),
        "{cut}"
    );
}
