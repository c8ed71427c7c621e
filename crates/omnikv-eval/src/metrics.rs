//! The scoring functions of LongBench and InfiniteBench, written in Rust to
//! give the same numbers as the published Python.
//!
//! # Sources
//!
//! * LongBench: `LongBench/metrics.py` and `LongBench/eval.py` of the
//!   THUDM/LongBench repository (the LongBench v1 metrics). The Python
//!   packages they call are reproduced too:
//!   * `rouge` (pltrdy/rouge 1.0.1, `Rouge().get_scores(..., avg=True)`,
//!     `["rouge-l"]["f"]`): the text is cut into sentences at every `.`,
//!     and "rouge-l" is its *summary-level union LCS* with `exclusive=True`,
//!     i.e. computed over **sets** of words (see [`rouge_score`]);
//!   * `fuzzywuzzy` (`fuzz.ratio`), which without the optional
//!     `python-Levenshtein` package (not in LongBench's requirements) is
//!     `difflib.SequenceMatcher(None, a, b).ratio()` rounded by Python's
//!     `round` (see [`fuzz_ratio`]);
//!   * `jieba.cut(text, cut_all=False)` (HMM on), here the `jieba-rs`
//!     crate with its default dictionary, the same `dict.txt` as jieba's.
//! * InfiniteBench: `src/compute_scores.py` of OpenBMB/InfiniteBench
//!   (snapshot of 2024-06-13, commit `88b3daa`), with `model_name` other
//!   than `gpt4`. `longbook_sum_eng` there is the Hugging Face `evaluate`
//!   "rouge" metric, i.e. Google's `rouge_score` package's `rougeLsum`
//!   without stemming (see [`rouge_lsum`]).
//!
//! # Where this differs from the Python, on purpose
//!
//! * Where the Python raises (LongBench `retrieval_score` on an answer
//!   without `Paragraph N`, InfiniteBench `math_find` with an integer label
//!   and a decimal in the prediction, `math_calc` with an empty label), the
//!   score here is 0.
//! * InfiniteBench `kv_retrieval` compares the label *string* with the
//!   prediction's words; with the downloaded data the label is a one-element
//!   list, which the published code compares as a whole (never equal), so
//!   each label string is checked instead (max over labels).
//! * InfiniteBench `longdialogue_qa_eng` follows the fix the maintainers
//!   made after issue #18 (any label, upper-cased, a substring of the
//!   upper-cased prediction); the 2024-06 snapshot took only the first label
//!   and compared whole words.
//! * Python's `int()` also accepts non-ASCII decimal digits; here such digits
//!   never parse (they are matched by `\d` as in Python, but never equal).

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------
// Python string helpers

/// Python's `str.isspace()`: Unicode `White_Space` plus the four ASCII
/// separators U+001C..U+001F.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || matches!(c, '\u{1c}'..='\u{1f}')
}

/// Python's `str.split()` with no argument.
fn py_split(s: &str) -> Vec<&str> {
    s.split(is_py_space).filter(|t| !t.is_empty()).collect()
}

/// Python's `str.strip()` with no argument.
fn py_strip(s: &str) -> &str {
    s.trim_matches(is_py_space)
}

/// `s.replace(c, " ")` for each of `chars`, in order.
fn replace_all_with_space(s: &str, pats: &[&str]) -> String {
    let mut out = s.to_string();
    for p in pats {
        out = out.replace(p, " ");
    }
    out
}

/// `while "  " in s: s = s.replace("  ", " ")`
fn collapse_double_spaces(mut s: String) -> String {
    while s.contains("  ") {
        s = s.replace("  ", " ");
    }
    s
}

/// The text after `prefix` and one more character, as
/// `pred[idx + len(prefix) + 1:]`; `None` where the prediction ends before
/// that character (`len(pred) < idx + len(prefix) + 1`).
fn after_prefix<'a>(pred: &'a str, idx: usize, prefix: &str) -> Option<&'a str> {
    let rest = &pred[idx + prefix.len()..];
    let mut chars = rest.chars();
    chars.next()?;
    Some(chars.as_str())
}

fn regex(cell: &'static OnceLock<Regex>, pattern: &str) -> &'static Regex {
    cell.get_or_init(|| Regex::new(pattern).expect("valid regex"))
}

/// `re.findall(r"\d+", text)` (Unicode digits, as Python's `str` patterns).
fn find_numbers(text: &str) -> Vec<&str> {
    static RE: OnceLock<Regex> = OnceLock::new();
    regex(&RE, r"\d+")
        .find_iter(text)
        .map(|m| m.as_str())
        .collect()
}

/// Runs of ASCII digits, as `re.split("[^0-9]", text)` without the empty
/// items.
fn ascii_digit_runs(text: &str) -> Vec<&str> {
    text.split(|c: char| !c.is_ascii_digit())
        .filter(|t| !t.is_empty())
        .collect()
}

/// A Python integer literal as `int()` reads it (sign, ASCII digits,
/// single underscores between digits), in canonical form: no leading
/// zeros, `-` only for non-zero negatives. `None` where `int()` raises.
fn py_int_canonical(s: &str) -> Option<String> {
    let s = py_strip(s);
    let (neg, body) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    if body.is_empty() || body.starts_with('_') || body.ends_with('_') || body.contains("__") {
        return None;
    }
    let digits: String = body.chars().filter(|&c| c != '_').collect();
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let trimmed = digits.trim_start_matches('0');
    Some(match (trimmed.is_empty(), neg) {
        (true, _) => "0".to_string(),
        (false, true) => format!("-{trimmed}"),
        (false, false) => trimmed.to_string(),
    })
}

// ---------------------------------------------------------------------------
// Normalisation and token F1 (LongBench metrics.py, InfiniteBench too)

/// Chinese punctuation removed by `normalize_zh_answer`, as published
/// (it has `》` but not `《`).
const CN_PUNCTUATION: &str = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏.";

/// Lower-case, drop ASCII punctuation (`string.punctuation`), replace the
/// words `a`, `an`, `the` with a space, collapse whitespace.
pub fn normalize_answer(s: &str) -> String {
    static ARTICLES: OnceLock<Regex> = OnceLock::new();
    let lower = s.to_lowercase();
    let no_punc: String = lower
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    let no_articles = regex(&ARTICLES, r"\b(a|an|the)\b").replace_all(&no_punc, " ");
    py_split(&no_articles).join(" ")
}

/// Lower-case, drop ASCII and Chinese punctuation, remove all whitespace.
pub fn normalize_zh_answer(s: &str) -> String {
    let lower = s.to_lowercase();
    let no_punc: String = lower
        .chars()
        .filter(|&c| !c.is_ascii_punctuation() && !CN_PUNCTUATION.contains(c))
        .collect();
    py_split(&no_punc).concat()
}

/// F1 of two token lists with multiplicity (`Counter(a) & Counter(b)`).
pub fn f1_tokens<T: AsRef<str>>(prediction: &[T], ground_truth: &[T]) -> f64 {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for t in ground_truth {
        *counts.entry(t.as_ref()).or_default() += 1;
    }
    let mut num_same = 0usize;
    for t in prediction {
        if let Some(c) = counts.get_mut(t.as_ref()) {
            if *c > 0 {
                *c -= 1;
                num_same += 1;
            }
        }
    }
    if num_same == 0 {
        return 0.0;
    }
    let precision = num_same as f64 / prediction.len() as f64;
    let recall = num_same as f64 / ground_truth.len() as f64;
    (2.0 * precision * recall) / (precision + recall)
}

/// LongBench `qa_f1_score`: token F1 of the normalised texts.
pub fn qa_f1_score(prediction: &str, ground_truth: &str) -> f64 {
    let p = normalize_answer(prediction);
    let g = normalize_answer(ground_truth);
    f1_tokens(&py_split(&p), &py_split(&g))
}

/// `jieba.cut(text, cut_all=False)` (HMM on), with the default dictionary.
pub fn jieba_cut(text: &str) -> Vec<&str> {
    static JIEBA: OnceLock<jieba_rs::Jieba> = OnceLock::new();
    JIEBA
        .get_or_init(jieba_rs::Jieba::new)
        .cut(text, true)
        .into_iter()
        .map(|t| t.word)
        .collect()
}

/// LongBench `qa_f1_zh_score`: jieba words, each normalised with
/// [`normalize_zh_answer`], empty ones dropped, token F1.
pub fn qa_f1_zh_score(prediction: &str, ground_truth: &str) -> f64 {
    let words = |s: &str| -> Vec<String> {
        jieba_cut(s)
            .into_iter()
            .map(normalize_zh_answer)
            .filter(|t| !t.is_empty())
            .collect()
    };
    f1_tokens(&words(prediction), &words(ground_truth))
}

// ---------------------------------------------------------------------------
// ROUGE-L as the `rouge` package (pltrdy/rouge 1.0.1) computes it

/// Python's default recursion limit (1000) less the frames above
/// `_recon` when LongBench's `eval.py` scores a file (module, `scorer`,
/// `rouge_score`, `get_scores`, `_get_avg_scores`, the metric lambda,
/// `rouge_l_summary_level`, `_union_lcs`, `_recon_lcs`): a longer LCS
/// read-out raises `RecursionError`, which `rouge_score` turns into 0
/// (measured with CPython 3.11; long Chinese answers without `.` reach it).
pub const PLTRDY_MAX_RECON_DEPTH: usize = 1000 - 9;

/// The sentences `Rouge.get_scores` makes of a text: split at `.`, empty
/// pieces dropped, whitespace collapsed (a piece of only spaces stays, as
/// an empty sentence).
fn pltrdy_sentences(text: &str) -> Vec<String> {
    text.split('.')
        .filter(|p| !p.is_empty())
        .map(|p| py_split(p).join(" "))
        .collect()
}

/// The words of `_recon_lcs(x, y)` (one LCS, read back from the end with
/// the package's tie rule), and the depth its recursive read-out reaches.
fn pltrdy_recon_lcs<'a>(x: &[&'a str], y: &[&str]) -> (Vec<&'a str>, usize) {
    let (n, m) = (x.len(), y.len());
    let w = m + 1;
    let mut table = vec![0u32; (n + 1) * (m + 1)];
    for i in 1..=n {
        for j in 1..=m {
            table[i * w + j] = if x[i - 1] == y[j - 1] {
                table[(i - 1) * w + j - 1] + 1
            } else {
                table[(i - 1) * w + j].max(table[i * w + j - 1])
            };
        }
    }
    let (mut i, mut j) = (n, m);
    let mut words = Vec::new();
    let mut depth = 1;
    while i > 0 && j > 0 {
        if x[i - 1] == y[j - 1] {
            words.push(x[i - 1]);
            i -= 1;
            j -= 1;
        } else if table[(i - 1) * w + j] > table[i * w + j - 1] {
            i -= 1;
        } else {
            j -= 1;
        }
        depth += 1;
    }
    (words, depth)
}

/// LongBench `rouge_score`: `Rouge().get_scores([prediction],
/// [ground_truth], avg=True)["rouge-l"]["f"]`, 0 where it raises.
///
/// With `exclusive=True` (the default) the package counts *distinct*
/// words: `m` and `n` are the numbers of distinct words of the reference
/// and the prediction, and the overlap is the number of distinct words in
/// the union of the LCS of every (reference sentence, prediction sentence)
/// pair; `f = 2 * (p * r) / (p + r + 1e-8)`. Sentences end at every `.`.
/// An empty prediction or reference (no sentence) raises in the package
/// (score 0), and so does an LCS read-out deeper than
/// [`PLTRDY_MAX_RECON_DEPTH`] (Python's recursion limit).
pub fn rouge_score(prediction: &str, ground_truth: &str) -> f64 {
    let hyp = pltrdy_sentences(prediction);
    let refs = pltrdy_sentences(ground_truth);
    if hyp.is_empty() || refs.is_empty() {
        return 0.0;
    }
    let hyp_words: Vec<Vec<&str>> = hyp.iter().map(|s| s.split(' ').collect()).collect();
    let ref_words: Vec<Vec<&str>> = refs.iter().map(|s| s.split(' ').collect()).collect();
    let m = ref_words.iter().flatten().collect::<HashSet<_>>().len();
    let n = hyp_words.iter().flatten().collect::<HashSet<_>>().len();
    let mut union: HashSet<&str> = HashSet::new();
    for r in &ref_words {
        for h in &hyp_words {
            let (words, depth) = pltrdy_recon_lcs(r, h);
            if depth > PLTRDY_MAX_RECON_DEPTH {
                return 0.0;
            }
            union.extend(words);
        }
    }
    let llcs = union.len() as f64;
    let r_lcs = llcs / m as f64;
    let p_lcs = llcs / n as f64;
    2.0 * ((p_lcs * r_lcs) / (p_lcs + r_lcs + 1e-8))
}

/// LongBench `rouge_zh_score`: both texts cut by jieba and joined with
/// spaces, then [`rouge_score`].
pub fn rouge_zh_score(prediction: &str, ground_truth: &str) -> f64 {
    rouge_score(
        &jieba_cut(prediction).join(" "),
        &jieba_cut(ground_truth).join(" "),
    )
}

// ---------------------------------------------------------------------------
// Classification, retrieval, counting, code

/// LongBench `classification_score`: the classes that occur in the
/// prediction; then, walking that list as Python's `for` does while it
/// removes items (so the item after a removed one is skipped), a class that
/// is a substring of the ground truth but not equal to it is removed; the
/// score is `1 / len(list)` if the ground truth is in the list, else 0.
pub fn classification_score(prediction: &str, ground_truth: &str, all_classes: &[String]) -> f64 {
    let mut matches: Vec<&str> = all_classes
        .iter()
        .map(String::as_str)
        .filter(|c| prediction.contains(c))
        .collect();
    let mut i = 0;
    while i < matches.len() {
        let term = matches[i];
        if ground_truth.contains(term) && term != ground_truth {
            // list.remove: the first equal item
            let pos = matches.iter().position(|&t| t == term).expect("present");
            matches.remove(pos);
        }
        i += 1;
    }
    if matches.contains(&ground_truth) {
        1.0 / matches.len() as f64
    } else {
        0.0
    }
}

fn share_equal(numbers: &[&str], target: &str) -> f64 {
    if numbers.is_empty() {
        return 0.0;
    }
    let right = numbers.iter().filter(|&&n| n == target).count();
    right as f64 / numbers.len() as f64
}

/// LongBench `retrieval_score`: the share of the numbers in the prediction
/// that equal N in the ground truth's first `Paragraph N`.
pub fn retrieval_score(prediction: &str, ground_truth: &str) -> f64 {
    static RE: OnceLock<Regex> = OnceLock::new();
    match regex(&RE, r"Paragraph (\d+)").captures(ground_truth) {
        Some(c) => share_equal(&find_numbers(prediction), c.get(1).unwrap().as_str()),
        None => 0.0,
    }
}

/// LongBench `retrieval_zh_score`: as [`retrieval_score`] with `段落N`.
pub fn retrieval_zh_score(prediction: &str, ground_truth: &str) -> f64 {
    static RE: OnceLock<Regex> = OnceLock::new();
    match regex(&RE, r"段落(\d+)").captures(ground_truth) {
        Some(c) => share_equal(&find_numbers(prediction), c.get(1).unwrap().as_str()),
        None => 0.0,
    }
}

/// LongBench `count_score`: the share of the numbers in the prediction
/// that equal the ground truth (as strings).
pub fn count_score(prediction: &str, ground_truth: &str) -> f64 {
    share_equal(&find_numbers(prediction), ground_truth)
}

/// The matched characters of `difflib.SequenceMatcher(None, a, b)`
/// (`sum` of the sizes of `get_matching_blocks()`), with its "autojunk"
/// rule: when `b` has 200 or more items, an item occurring more than
/// `len(b) // 100 + 1` times in `b` never starts a match (it may still
/// extend one).
pub fn sequence_matcher_matches(a: &[char], b: &[char]) -> usize {
    let mut b2j: HashMap<char, Vec<usize>> = HashMap::new();
    for (j, &c) in b.iter().enumerate() {
        b2j.entry(c).or_default().push(j);
    }
    if b.len() >= 200 {
        let ntest = b.len() / 100 + 1;
        b2j.retain(|_, idxs| idxs.len() <= ntest);
    }
    let longest = |alo: usize, ahi: usize, blo: usize, bhi: usize| -> (usize, usize, usize) {
        let (mut besti, mut bestj, mut bestsize) = (alo, blo, 0usize);
        let mut j2len: HashMap<usize, usize> = HashMap::new();
        for (i, c) in a.iter().enumerate().take(ahi).skip(alo) {
            let mut newj2len = HashMap::new();
            if let Some(js) = b2j.get(c) {
                for &j in js {
                    if j < blo {
                        continue;
                    }
                    if j >= bhi {
                        break;
                    }
                    let prev = if j == 0 {
                        0
                    } else {
                        j2len.get(&(j - 1)).copied().unwrap_or(0)
                    };
                    let k = prev + 1;
                    newj2len.insert(j, k);
                    if k > bestsize {
                        besti = i + 1 - k;
                        bestj = j + 1 - k;
                        bestsize = k;
                    }
                }
            }
            j2len = newj2len;
        }
        // No `isjunk` function: every item counts as non-junk when extending.
        while besti > alo && bestj > blo && a[besti - 1] == b[bestj - 1] {
            besti -= 1;
            bestj -= 1;
            bestsize += 1;
        }
        while besti + bestsize < ahi
            && bestj + bestsize < bhi
            && a[besti + bestsize] == b[bestj + bestsize]
        {
            bestsize += 1;
        }
        (besti, bestj, bestsize)
    };
    let mut queue = vec![(0, a.len(), 0, b.len())];
    let mut total = 0;
    while let Some((alo, ahi, blo, bhi)) = queue.pop() {
        let (i, j, k) = longest(alo, ahi, blo, bhi);
        if k > 0 {
            total += k;
            if alo < i && blo < j {
                queue.push((alo, i, blo, j));
            }
            if i + k < ahi && j + k < bhi {
                queue.push((i + k, ahi, j + k, bhi));
            }
        }
    }
    total
}

/// `fuzzywuzzy.fuzz.ratio(s1, s2)` (an integer 0..=100) as installed by
/// LongBench's requirements (no `python-Levenshtein`): 100 for equal
/// strings (two empty strings included), 0 if one is empty, else
/// `round(100 * 2 * M / (len(s1) + len(s2)))` with `M` the matched
/// characters of `difflib.SequenceMatcher` ([`sequence_matcher_matches`]:
/// recursive longest common *substrings*, not an LCS) and Python's
/// round-half-to-even. Lengths are in code points.
pub fn fuzz_ratio(s1: &str, s2: &str) -> u32 {
    if s1 == s2 {
        return 100;
    }
    if s1.is_empty() || s2.is_empty() {
        return 0;
    }
    let a: Vec<char> = s1.chars().collect();
    let b: Vec<char> = s2.chars().collect();
    let matches = sequence_matcher_matches(&a, &b);
    let ratio = 2.0 * matches as f64 / (a.len() + b.len()) as f64;
    (100.0 * ratio).round_ties_even() as u32
}

/// LongBench `code_sim_score`: the first line of the prediction (after
/// leading newlines) that contains none of `` ` ``, `#`, `//` (or the empty
/// string if none does), compared with [`fuzz_ratio`], divided by 100.
pub fn code_sim_score(prediction: &str, ground_truth: &str) -> f64 {
    let line = prediction
        .trim_start_matches('\n')
        .split('\n')
        .find(|l| !l.contains('`') && !l.contains('#') && !l.contains("//"))
        .unwrap_or("");
    fuzz_ratio(line, ground_truth) as f64 / 100.0
}

// ---------------------------------------------------------------------------
// InfiniteBench (src/compute_scores.py)

/// InfiniteBench `first_int_match`: the first run of ASCII digits, or "".
pub fn first_int_match(prediction: &str) -> &str {
    ascii_digit_runs(prediction).first().copied().unwrap_or("")
}

/// `passkey` / `number_string`: the label equals [`first_int_match`].
pub fn ib_first_int_score(prediction: &str, label: &str) -> f64 {
    (label == first_int_match(prediction)) as u8 as f64
}

/// `kv_retrieval`: the label is one of the prediction's words after
/// `\n : " ' . , ? ! { }` become spaces.
pub fn ib_kv_retrieval_score(prediction: &str, label: &str) -> f64 {
    let pred = replace_all_with_space(
        prediction,
        &["\n", ":", "\"", "'", ".", ",", "?", "!", "{", "}"],
    );
    py_split(&pred).contains(&label) as u8 as f64
}

/// `code_run`: the last word (after `\n . ` ' " :` become spaces) read as
/// a Python integer equals the label (an integer).
pub fn ib_code_run_score(prediction: &str, label: &str) -> f64 {
    let pred = replace_all_with_space(py_strip(prediction), &["\n", ".", "`", "'", "\"", ":"]);
    let (Some(last), Some(label)) = (py_split(&pred).last().copied(), py_int_canonical(label))
    else {
        return 0.0;
    };
    (py_int_canonical(last) == Some(label)) as u8 as f64
}

/// `code_debug`, with `label = [function name, option letter]` as
/// InfiniteBench's `get_answer` builds it.
pub fn ib_code_debug_score(prediction: &str, label: &[String]) -> f64 {
    let [fn_name, letter, ..] = label else {
        return 0.0;
    };
    let pred = py_strip(prediction);
    let head: String = pred.chars().take(2).collect();
    if head == format!("{letter}.") || head == format!("{letter}:") {
        return 1.0;
    }
    let pred = collapse_double_spaces(replace_all_with_space(
        pred,
        &["\n", "`", "'", "\"", "-", "*", "Option", "option"],
    ));
    for prefix in ["answer is:", "is:", "answer:", "correct option is:"] {
        let Some(idx) = pred.find(prefix) else {
            continue;
        };
        let Some(rest) = after_prefix(&pred, idx, prefix) else {
            return 0.0;
        };
        return (rest.starts_with(letter.as_str()) || rest.starts_with(fn_name.as_str())) as u8
            as f64;
    }
    0.0
}

/// `math_find`: the first number (`\d+\.\d+|\d+`) of the prediction equals
/// the label, compared as an integer if the label is one (a JSON integer)
/// and as a float otherwise.
pub fn ib_math_find_score(prediction: &str, label: &str) -> f64 {
    static RE: OnceLock<Regex> = OnceLock::new();
    let Some(first) = regex(&RE, r"\d+\.\d+|\d+").find(prediction) else {
        return 0.0;
    };
    let first = first.as_str();
    if let Some(label) = py_int_canonical(label) {
        // int(first): raises for a decimal (score 0 here)
        return (py_int_canonical(first) == Some(label)) as u8 as f64;
    }
    match (first.parse::<f64>(), label.trim().parse::<f64>()) {
        (Ok(p), Ok(l)) => (p == l) as u8 as f64,
        _ => 0.0,
    }
}

/// `math_calc` (model other than `gpt4`): the labels are the expected
/// intermediate values; the score is the length of the prefix of the
/// prediction's digit runs (read as non-negative integers, as published)
/// that equals them, over the number of labels.
pub fn ib_math_calc_score(prediction: &str, labels: &[String]) -> f64 {
    if labels.is_empty() {
        return 0.0;
    }
    let pred: Vec<Option<String>> = ascii_digit_runs(prediction)
        .into_iter()
        .map(py_int_canonical)
        .collect();
    let mut cnt = 0;
    for (label, p) in labels.iter().zip(pred.iter()) {
        if py_int_canonical(label).is_some() && py_int_canonical(label) == *p {
            cnt += 1;
        } else {
            break;
        }
    }
    cnt as f64 / labels.len() as f64
}

/// `longdialogue_qa_eng` (after the maintainers' fix for issue #18): 1 if
/// any label, upper-cased, occurs in the stripped, upper-cased prediction.
pub fn ib_longdialogue_score(prediction: &str, labels: &[String]) -> f64 {
    let pred = py_strip(prediction).to_uppercase();
    labels.iter().any(|l| pred.contains(&l.to_uppercase())) as u8 as f64
}

/// `longbook_choice_eng`, with `label = [option text, option letter]`: the
/// first character if it is one of A-D; the whole prediction equal to a
/// label; the text after "answer is:", "answer:", "answer is" or
/// "option is" (and one more character) starting with a label; or the
/// first word that is a substring of "ABCD" being a label.
pub fn ib_choice_score(prediction: &str, label: &[String]) -> f64 {
    let is_label = |s: &str| label.iter().any(|l| l == s);
    let pred = py_strip(prediction);
    let Some(first) = pred.chars().next() else {
        return 0.0;
    };
    if "ABCD".contains(first) {
        return is_label(&first.to_string()) as u8 as f64;
    }
    if is_label(pred) {
        return 1.0;
    }
    let pred = collapse_double_spaces(replace_all_with_space(
        pred,
        &["\n", "\"", "'", ".", ",", "?", "!", "{", "}"],
    ));
    for prefix in ["answer is:", "answer:", "answer is", "option is"] {
        let Some(idx) = pred.find(prefix) else {
            continue;
        };
        let Some(rest) = after_prefix(&pred, idx, prefix) else {
            return 0.0;
        };
        return label.iter().any(|l| rest.starts_with(l.as_str())) as u8 as f64;
    }
    for word in py_split(&pred) {
        if "ABCD".contains(word) {
            return is_label(word) as u8 as f64;
        }
    }
    0.0
}

/// `longbook_qa_chn` (`qa_f1_score_zh` of compute_scores.py): F1 over
/// *characters* of the [`normalize_zh_answer`] texts (no jieba here).
pub fn ib_qa_f1_zh_chars(prediction: &str, ground_truth: &str) -> f64 {
    let p: Vec<String> = normalize_zh_answer(prediction)
        .chars()
        .map(String::from)
        .collect();
    let g: Vec<String> = normalize_zh_answer(ground_truth)
        .chars()
        .map(String::from)
        .collect();
    f1_tokens(&p, &g)
}

/// `rouge_score`'s tokenizer without stemming: lower-case, then the runs of
/// `[a-z0-9]` (everything else separates tokens and is dropped).
fn rouge_score_tokens(text: &str) -> Vec<String> {
    let lower = text.to_lowercase();
    lower
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

/// One LCS of `r` and `c` as indices into `r` (`_backtrack_norec`).
fn lcs_indices(r: &[String], c: &[String]) -> Vec<usize> {
    let (n, m) = (r.len(), c.len());
    let w = m + 1;
    let mut t = vec![0u32; (n + 1) * (m + 1)];
    for i in 1..=n {
        for j in 1..=m {
            t[i * w + j] = if r[i - 1] == c[j - 1] {
                t[(i - 1) * w + j - 1] + 1
            } else {
                t[(i - 1) * w + j].max(t[i * w + j - 1])
            };
        }
    }
    let (mut i, mut j) = (n, m);
    let mut out = Vec::new();
    while i > 0 && j > 0 {
        if r[i - 1] == c[j - 1] {
            out.push(i - 1);
            i -= 1;
            j -= 1;
        } else if t[i * w + j - 1] > t[(i - 1) * w + j] {
            j -= 1;
        } else {
            i -= 1;
        }
    }
    out
}

/// `longbook_sum_eng`: the `rougeLsum` F-measure of Google's `rouge_score`
/// (through Hugging Face `evaluate`, `use_stemmer=False`): sentences are
/// the non-empty lines, tokens as [`rouge_score_tokens`]; summary-level
/// union LCS with the 1.5.5-style guard against counting a token more often
/// than it occurs; `f = 2pr / (p + r)`.
pub fn rouge_lsum(prediction: &str, ground_truth: &str) -> f64 {
    let sents = |s: &str| -> Vec<Vec<String>> {
        s.split('\n')
            .filter(|x| !x.is_empty())
            .map(rouge_score_tokens)
            .collect()
    };
    let refs = sents(ground_truth);
    let cands = sents(prediction);
    if refs.is_empty() || cands.is_empty() {
        return 0.0;
    }
    let m: usize = refs.iter().map(Vec::len).sum();
    let n: usize = cands.iter().map(Vec::len).sum();
    if m == 0 || n == 0 {
        return 0.0;
    }
    let mut cnt_r: HashMap<&str, usize> = HashMap::new();
    let mut cnt_c: HashMap<&str, usize> = HashMap::new();
    for t in refs.iter().flatten() {
        *cnt_r.entry(t).or_default() += 1;
    }
    for t in cands.iter().flatten() {
        *cnt_c.entry(t).or_default() += 1;
    }
    let mut hits = 0usize;
    for r in &refs {
        let mut union: Vec<usize> = cands
            .iter()
            .flat_map(|c| lcs_indices(r, c))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        union.sort_unstable();
        for i in union {
            let t = r[i].as_str();
            let (cc, cr) = (
                cnt_c.get(t).copied().unwrap_or(0),
                cnt_r.get(t).copied().unwrap_or(0),
            );
            if cc > 0 && cr > 0 {
                hits += 1;
                cnt_c.insert(t, cc - 1);
                cnt_r.insert(t, cr - 1);
            }
        }
    }
    let recall = hits as f64 / m as f64;
    let precision = hits as f64 / n as f64;
    if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    }
}

// ---------------------------------------------------------------------------

/// A task's scoring function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// LongBench `qa_f1_score` (also InfiniteBench `longbook_qa_eng`).
    QaF1,
    /// LongBench `qa_f1_zh_score` (jieba words).
    QaF1Zh,
    /// LongBench `rouge_score` (pltrdy `rouge`, "rouge-l" f).
    Rouge,
    /// LongBench `rouge_zh_score`.
    RougeZh,
    /// LongBench `classification_score`.
    Classification,
    /// LongBench `retrieval_score` (`Paragraph N`).
    Retrieval,
    /// LongBench `retrieval_zh_score` (`段落N`).
    RetrievalZh,
    /// LongBench `count_score`.
    Count,
    /// LongBench `code_sim_score`.
    CodeSim,
    /// InfiniteBench `passkey` / `number_string`.
    IbFirstInt,
    /// InfiniteBench `kv_retrieval`.
    IbKvRetrieval,
    /// InfiniteBench `longbook_qa_chn` (character F1).
    IbQaF1ZhChars,
    /// InfiniteBench `longbook_sum_eng` (`rougeLsum`).
    IbRougeLsum,
    /// InfiniteBench `longbook_choice_eng`.
    IbChoice,
    /// InfiniteBench `code_debug`.
    IbCodeDebug,
    /// InfiniteBench `code_run`.
    IbCodeRun,
    /// InfiniteBench `math_find`.
    IbMathFind,
    /// InfiniteBench `math_calc`.
    IbMathCalc,
    /// InfiniteBench `longdialogue_qa_eng`.
    IbLongDialogue,
}

impl Metric {
    /// Every metric.
    pub const ALL: [Metric; 19] = [
        Metric::QaF1,
        Metric::QaF1Zh,
        Metric::Rouge,
        Metric::RougeZh,
        Metric::Classification,
        Metric::Retrieval,
        Metric::RetrievalZh,
        Metric::Count,
        Metric::CodeSim,
        Metric::IbFirstInt,
        Metric::IbKvRetrieval,
        Metric::IbQaF1ZhChars,
        Metric::IbRougeLsum,
        Metric::IbChoice,
        Metric::IbCodeDebug,
        Metric::IbCodeRun,
        Metric::IbMathFind,
        Metric::IbMathCalc,
        Metric::IbLongDialogue,
    ];

    /// The name of the published function (InfiniteBench ones prefixed
    /// `ib_`).
    pub fn name(&self) -> &'static str {
        match self {
            Metric::QaF1 => "qa_f1_score",
            Metric::QaF1Zh => "qa_f1_zh_score",
            Metric::Rouge => "rouge_score",
            Metric::RougeZh => "rouge_zh_score",
            Metric::Classification => "classification_score",
            Metric::Retrieval => "retrieval_score",
            Metric::RetrievalZh => "retrieval_zh_score",
            Metric::Count => "count_score",
            Metric::CodeSim => "code_sim_score",
            Metric::IbFirstInt => "ib_first_int_match",
            Metric::IbKvRetrieval => "ib_kv_retrieval",
            Metric::IbQaF1ZhChars => "ib_qa_f1_score_zh",
            Metric::IbRougeLsum => "ib_rouge_lsum",
            Metric::IbChoice => "ib_longbook_choice_eng",
            Metric::IbCodeDebug => "ib_code_debug",
            Metric::IbCodeRun => "ib_code_run",
            Metric::IbMathFind => "ib_math_find",
            Metric::IbMathCalc => "ib_math_calc",
            Metric::IbLongDialogue => "ib_longdialogue_qa_eng",
        }
    }

    /// The score of one prediction, in [0, 1].
    ///
    /// For the LongBench metrics and the InfiniteBench ones that score one
    /// label at a time it is the maximum over `answers` (0 without
    /// answers), as `eval.py`'s `scorer` / `qa_f1_score` do (for
    /// `passkey`, `number_string`, `code_run` and `math_find`, where the
    /// data has one label and the published code reads `label[0]`, the same
    /// thing). `IbChoice` and `IbCodeDebug` take `answers` as the pair
    /// `[option text or function name, letter]`; `IbMathCalc` as the
    /// sequence of expected values; `IbLongDialogue` as the accepted names.
    /// `all_classes` is used by `Classification` only.
    pub fn score(&self, prediction: &str, answers: &[String], all_classes: &[String]) -> f64 {
        let max_over =
            |f: &dyn Fn(&str) -> f64| answers.iter().fold(0.0f64, |acc, a| acc.max(f(a)));
        match self {
            Metric::QaF1 => max_over(&|a| qa_f1_score(prediction, a)),
            Metric::QaF1Zh => max_over(&|a| qa_f1_zh_score(prediction, a)),
            Metric::Rouge => max_over(&|a| rouge_score(prediction, a)),
            Metric::RougeZh => max_over(&|a| rouge_zh_score(prediction, a)),
            Metric::Classification => {
                max_over(&|a| classification_score(prediction, a, all_classes))
            }
            Metric::Retrieval => max_over(&|a| retrieval_score(prediction, a)),
            Metric::RetrievalZh => max_over(&|a| retrieval_zh_score(prediction, a)),
            Metric::Count => max_over(&|a| count_score(prediction, a)),
            Metric::CodeSim => max_over(&|a| code_sim_score(prediction, a)),
            Metric::IbFirstInt => max_over(&|a| ib_first_int_score(prediction, a)),
            Metric::IbKvRetrieval => max_over(&|a| ib_kv_retrieval_score(prediction, a)),
            Metric::IbQaF1ZhChars => max_over(&|a| ib_qa_f1_zh_chars(prediction, a)),
            Metric::IbRougeLsum => max_over(&|a| rouge_lsum(prediction, a)),
            Metric::IbCodeRun => max_over(&|a| ib_code_run_score(prediction, a)),
            Metric::IbMathFind => max_over(&|a| ib_math_find_score(prediction, a)),
            Metric::IbChoice => ib_choice_score(prediction, answers),
            Metric::IbCodeDebug => ib_code_debug_score(prediction, answers),
            Metric::IbMathCalc => ib_math_calc_score(prediction, answers),
            Metric::IbLongDialogue => ib_longdialogue_score(prediction, answers),
        }
    }
}

impl std::fmt::Display for Metric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
