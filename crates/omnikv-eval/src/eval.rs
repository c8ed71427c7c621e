//! Fidelity evaluation through the real server: needle-in-a-haystack on an
//! essay haystack, the spec's two-stage retrieval (2StageRetr) and a
//! two-needle variant, each case sent as one greedy chat request to a server
//! per variant (`--kv-cache default`, or `omnikv` at a budget).
//!
//! Cases are generated deterministically (fixed seeds), so two runs ask the
//! same questions; answers are cached per variant and case in a JSONL file,
//! so an interrupted run resumes where it stopped.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{root, Server};

/// Characters per token of English prose for SmolLM2's tokenizer (measured on
/// the essay haystack); used to size haystacks, the report shows the real
/// token counts the server returned.
pub const CHARS_PER_TOKEN: f64 = 4.3;

/// Tiny deterministic generator (SplitMix64), so cases do not depend on a
/// crate's RNG stream.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Suite {
    /// One passcode sentence at a depth of an essay haystack.
    Needle,
    /// The spec's 2StageRetr: a `{key: colour}` dictionary and a sum that
    /// names the key.
    TwoStage,
    /// Two facts in the haystack: the first names a locker, the second (among
    /// distractor lockers) holds the code; the second is only needed once the
    /// first is found.
    TwoNeedle,
    /// A LongBench or InfiniteBench task file, scored with its published
    /// metric (the case's `length` numbers the task, its id is
    /// `format/task/id`).
    Bench,
}

impl Suite {
    pub fn name(self) -> &'static str {
        match self {
            Suite::Needle => "needle",
            Suite::TwoStage => "2StageRetr",
            Suite::TwoNeedle => "two-needle",
            Suite::Bench => "bench",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Case {
    pub id: String,
    pub suite: Suite,
    /// Target prompt length in tokens (the bucket in the report).
    pub length: usize,
    /// Depth of the (first) needle in percent, where it applies.
    pub depth: Option<u32>,
    pub prompt: String,
    /// What a correct answer contains.
    pub answer: String,
    /// Wrong answers that the task plants (distractors); an output naming
    /// one of them before the answer is wrong.
    pub distractors: Vec<String>,
    pub max_tokens: usize,
    /// How the prompt is sent (see [`PromptMode::apply`]).
    #[serde(default = "chat_mode")]
    pub mode: PromptMode,
}

fn chat_mode() -> PromptMode {
    PromptMode::Chat
}

/// Is `output` correct for `case`? The answer must appear, and no planted
/// distractor may appear before it.
pub fn score(case: &Case, output: &str) -> bool {
    let out = answer_part(case.mode, output).to_lowercase();
    let Some(at) = find_word(&out, &case.answer.to_lowercase()) else {
        return false;
    };
    !case
        .distractors
        .iter()
        .filter_map(|d| find_word(&out, &d.to_lowercase()))
        .any(|d| d < at)
}

/// Position of `word` in `text` as a whole word (not inside a longer word or
/// number).
fn find_word(text: &str, word: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(i) = text[from..].find(word) {
        let s = from + i;
        let e = s + word.len();
        let before = s == 0 || !bytes[s - 1].is_ascii_alphanumeric();
        let after = e == bytes.len() || !bytes[e].is_ascii_alphanumeric();
        if before && after {
            return Some(s);
        }
        from = s + 1;
    }
    None
}

/// The essay haystack (`scripts/fetch-haystack.sh`), essays concatenated in
/// file-name order, whitespace normalised.
pub fn load_haystack(dir: &Path) -> Result<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| {
            format!(
                "cannot read the haystack in `{}`: run scripts/fetch-haystack.sh first",
                dir.display()
            )
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!(
            "no essays in `{}`: run scripts/fetch-haystack.sh first",
            dir.display()
        );
    }
    let mut text = String::new();
    for f in files {
        let t = std::fs::read_to_string(&f)?;
        text.push_str(&t.split_whitespace().collect::<Vec<_>>().join(" "));
        text.push(' ');
    }
    Ok(text)
}

/// The first `chars` characters of the haystack, cut at a sentence end.
fn haystack_prefix(haystack: &str, chars: usize) -> &str {
    let mut end = chars.min(haystack.len());
    while !haystack.is_char_boundary(end) {
        end -= 1;
    }
    let cut = haystack[..end].rfind(". ").map(|i| i + 1).unwrap_or(end);
    &haystack[..cut]
}

/// Insert `needles` (depth in percent, sentence) into `text` at sentence
/// boundaries.
fn insert_needles(text: &str, needles: &[(u32, String)]) -> String {
    let mut spots: Vec<(usize, &str)> = needles
        .iter()
        .map(|(depth, s)| {
            let want = text.len() * (*depth as usize) / 100;
            let at = if want >= text.len() {
                text.len()
            } else {
                text[..want].rfind(". ").map(|i| i + 2).unwrap_or(0)
            };
            (at, s.as_str())
        })
        .collect();
    spots.sort_by_key(|(at, _)| *at);
    let mut out = String::with_capacity(text.len() + 256);
    let mut last = 0;
    for (at, s) in spots {
        out.push_str(&text[last..at]);
        if !out.is_empty() && !out.ends_with(' ') {
            out.push(' ');
        }
        out.push_str(s);
        out.push(' ');
        last = at;
    }
    out.push_str(&text[last..]);
    out
}

fn document_prompt(document: &str, question: &str) -> String {
    format!(
        "Read the document and answer the question.\n\nDocument:\n{document}\n\nQuestion: {question}"
    )
}

/// Needle-in-a-haystack: one case per length and depth.
pub fn needle_cases(haystack: &str, lengths: &[usize], depths: &[u32]) -> Vec<Case> {
    let mut rng = Rng::new(0x5eed_0001);
    let mut cases = Vec::new();
    for &len in lengths {
        let text = haystack_prefix(haystack, (len as f64 * CHARS_PER_TOKEN) as usize);
        for &depth in depths {
            let code = 10_000 + rng.below(90_000);
            let needle = format!("The secret code of the blue vault is {code}.");
            let doc = insert_needles(text, &[(depth, needle)]);
            cases.push(Case {
                id: format!("needle-{len}-{depth}"),
                suite: Suite::Needle,
                length: len,
                depth: Some(depth),
                prompt: document_prompt(&doc, "What is the secret code of the blue vault?"),
                answer: code.to_string(),
                distractors: Vec::new(),
                max_tokens: 32,
                mode: PromptMode::Chat,
            });
        }
    }
    cases
}

pub const COLOURS: [&str; 23] = [
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white",
    "grey", "gold", "silver", "cyan", "magenta", "maroon", "navy", "olive", "teal", "violet",
    "indigo", "beige", "lime",
];

/// 2StageRetr: a dictionary `{i: colour}` for `i < n` and a sum `a + b`
/// naming the key; `per_size` cases for each dictionary size.
pub fn two_stage_cases(sizes: &[usize], per_size: usize) -> Vec<Case> {
    let mut rng = Rng::new(0x5eed_0002);
    let mut cases = Vec::new();
    for &n in sizes {
        for c in 0..per_size {
            let colours: Vec<&str> = (0..n)
                .map(|_| COLOURS[rng.below(COLOURS.len() as u64) as usize])
                .collect();
            // Keys spread over the dictionary; `a` a multiple of ten so the
            // arithmetic stays within a small model's reach.
            let key = ((c * 2 + 1) * n / (per_size * 2)).min(n - 1);
            let a = key / 10 * 10;
            let b = key - a;
            let dict: String = colours
                .iter()
                .enumerate()
                .map(|(i, col)| format!("{i}: {col}\n"))
                .collect();
            let answer = colours[key].to_string();
            let distractors = COLOURS
                .iter()
                .filter(|c| **c != answer)
                .map(|c| c.to_string())
                .collect();
            cases.push(Case {
                id: format!("2stage-{n}-{c}"),
                suite: Suite::TwoStage,
                length: n,
                depth: Some((100 * key / n) as u32),
                prompt: format!(
                    "Here is a dictionary that maps numbers to colours:\n{dict}\nQuestion: compute {a} + {b}, then give the colour that the dictionary maps that number to."
                ),
                answer,
                distractors,
                max_tokens: 40,
                mode: PromptMode::Chat,
            });
        }
    }
    cases
}

/// Two needles: locker number first, then the code in that locker among
/// distractor lockers; one case per length and depth pair.
pub fn two_needle_cases(haystack: &str, lengths: &[usize], depths: &[(u32, u32)]) -> Vec<Case> {
    let mut rng = Rng::new(0x5eed_0003);
    let mut cases = Vec::new();
    for &len in lengths {
        let text = haystack_prefix(haystack, (len as f64 * CHARS_PER_TOKEN) as usize);
        for &(d1, d2) in depths {
            let locker = 10 + rng.below(80);
            let other = [(locker + 17) % 90 + 10, (locker + 41) % 90 + 10];
            let code = 10_000 + rng.below(90_000);
            let wrong: Vec<u64> = (0..2).map(|_| 10_000 + rng.below(90_000)).collect();
            let mut needles = vec![
                (
                    d1,
                    format!("The key to the archive is kept in locker {locker}."),
                ),
                (d2, format!("Locker {locker} holds the access code {code}.")),
            ];
            for (i, (l, w)) in other.iter().zip(&wrong).enumerate() {
                needles.push((
                    (d2 + 37 * (i as u32 + 1)) % 100,
                    format!("Locker {l} holds the access code {w}."),
                ));
            }
            let doc = insert_needles(text, &needles);
            cases.push(Case {
                id: format!("2needle-{len}-{d1}-{d2}"),
                suite: Suite::TwoNeedle,
                length: len,
                depth: Some(d1),
                prompt: document_prompt(
                    &doc,
                    "Which access code is in the locker where the key to the archive is kept? First name the locker, then its code.",
                ),
                answer: code.to_string(),
                distractors: wrong.iter().map(|w| w.to_string()).collect(),
                max_tokens: 48,
                mode: PromptMode::Chat,
            });
        }
    }
    cases
}

/// A budget as the config wants it: whole numbers above 1 are token counts
/// (JSON integers), anything else a fraction.
pub fn budget_value(b: f64) -> Value {
    if b > 1.0 && b.fract() == 0.0 {
        Value::from(b as u64)
    } else {
        Value::from(b)
    }
}

/// What runs a case: the stock cache, full attention with OmniKV's prefill,
/// OmniKV with a base config, a budget and optional extra config keys, or a
/// token-dropping baseline (`h2o`, `streaming`, `snapkv`) with a budget and
/// optional config keys.
#[derive(Debug, Clone, PartialEq)]
pub enum Variant {
    /// The stock mistral.rs KV cache (`--kv-cache default`): the host's own
    /// prefill and decode.
    Default,
    /// Full attention after OmniKV's prefill: the `omnikv` backend with the
    /// base config, every request sending `"kv_cache": {"enabled": false}`
    /// (spec, "Per-request options"). Against `default` it measures the
    /// prefill's own effect; against `omnikv@B` the selection's, with the
    /// prefill held equal (issue 15, item 4).
    Full,
    OmniKv {
        budget: f64,
        extra: serde_json::Map<String, Value>,
    },
    Evict {
        backend: String,
        budget: f64,
        extra: serde_json::Map<String, Value>,
    },
}

/// Split a `--variants` (or `--reference`) list on the commas outside
/// brackets, so a variant may carry a list value
/// (`omnikv@0.1:do_select_layers=[2,8,18],h2o@0.1` is two variants); empty
/// items are dropped.
pub fn split_variant_list(s: &str) -> Vec<String> {
    let (mut out, mut cur, mut depth) = (Vec::new(), String::new(), 0i32);
    for c in s.chars() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    out.push(cur);
    out.into_iter().filter(|s| !s.trim().is_empty()).collect()
}

/// The token-dropping baselines a variant can name.
pub const BASELINES: [&str; 3] = ["h2o", "streaming", "snapkv"];

fn label_with(name: &str, budget: f64, extra: &serde_json::Map<String, Value>) -> String {
    if extra.is_empty() {
        return format!("{name}@{budget}");
    }
    format!(
        "{name}@{budget}:{}",
        extra
            .iter()
            .map(|(k, v)| format!(
                "{k}={}",
                v.as_str().map(String::from).unwrap_or(v.to_string())
            ))
            .collect::<Vec<_>>()
            .join("+")
    )
}

impl Variant {
    /// `default`, `full`, `omnikv@0.1`, `omnikv@0.1:key=value+key=value`
    /// (values are JSON, bare words are strings), `h2o@0.1`,
    /// `streaming@0.1[:...]`, `snapkv@0.1[:...]`.
    ///
    /// # Errors
    /// Any other spelling, or a budget that is not a number > 0.
    pub fn parse(spec: &str) -> Result<Self> {
        match spec {
            "default" => return Ok(Variant::Default),
            "full" => return Ok(Variant::Full),
            _ => {}
        }
        let Some((name, rest)) = spec
            .split_once('@')
            .filter(|(n, _)| *n == "omnikv" || BASELINES.contains(n))
        else {
            bail!(
                "variant `{spec}`: expected `default`, `full` or `<omnikv|h2o|streaming|snapkv>@<budget>[:key=value+key=value]`"
            );
        };
        let (budget, extra_spec) = rest.split_once(':').unwrap_or((rest, ""));
        let budget: f64 = budget
            .parse()
            .ok()
            .filter(|b: &f64| *b > 0.0)
            .with_context(|| format!("variant `{spec}`: budget `{budget}` is not a number > 0"))?;
        let mut extra = serde_json::Map::new();
        for kv in extra_spec.split('+').filter(|s| !s.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("variant `{spec}`: `{kv}` is not key=value"))?;
            let v = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
            extra.insert(k.to_string(), v);
        }
        if name == "omnikv" {
            Ok(Variant::OmniKv { budget, extra })
        } else {
            Ok(Variant::Evict {
                backend: name.to_string(),
                budget,
                extra,
            })
        }
    }

    /// The `--kv-cache` backend name.
    pub fn backend(&self) -> &str {
        match self {
            Variant::Default => "default",
            Variant::Full | Variant::OmniKv { .. } => "omnikv",
            Variant::Evict { backend, .. } => backend,
        }
    }

    /// The budget, for variants that have one.
    pub fn budget(&self) -> Option<f64> {
        match self {
            Variant::Default | Variant::Full => None,
            Variant::OmniKv { budget, .. } | Variant::Evict { budget, .. } => Some(*budget),
        }
    }

    pub fn label(&self) -> String {
        match self {
            Variant::Default => "default".into(),
            Variant::Full => "full".into(),
            Variant::OmniKv { budget, extra } => label_with("omnikv", *budget, extra),
            Variant::Evict {
                backend,
                budget,
                extra,
            } => label_with(backend, *budget, extra),
        }
    }

    /// The backend config JSON for this variant: OmniKV's on top of `base`
    /// (`base` itself for `full`), a baseline's from its budget and keys.
    pub fn config(&self, base: &Value) -> Option<Value> {
        let (budget, extra) = match self {
            Variant::Default => return None,
            Variant::Full => return Some(base.clone()),
            Variant::Evict { budget, extra, .. } => {
                let mut cfg = extra.clone();
                cfg.insert("budget".into(), budget_value(*budget));
                return Some(Value::Object(cfg));
            }
            Variant::OmniKv { budget, extra } => (budget, extra),
        };
        let mut cfg = base.as_object().cloned().unwrap_or_default();
        cfg.insert("num_of_selected_tokens".into(), budget_value(*budget));
        for (k, v) in extra {
            cfg.insert(k.clone(), v.clone());
        }
        Some(Value::Object(cfg))
    }

    /// The per-request `kv_cache` options every request of this variant
    /// sends: `{"enabled": false}` for `full`, none otherwise.
    pub fn request_kv_cache(&self) -> Option<Value> {
        match self {
            Variant::Full => Some(serde_json::json!({"enabled": false})),
            _ => None,
        }
    }

    /// Start a server for this variant.
    pub fn start(&self, base: &Value, scratch: &Path) -> Result<Server> {
        self.start_with(base, scratch, &[])
    }

    /// Start a server for this variant with extra CLI arguments.
    pub fn start_with(&self, base: &Value, scratch: &Path, extra: &[&str]) -> Result<Server> {
        match self.config(base) {
            None => Server::start("default", extra),
            Some(cfg) => {
                std::fs::create_dir_all(scratch)?;
                let label: String = self
                    .label()
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                    .collect();
                let path = scratch.join(format!("{label}.json"));
                std::fs::write(&path, serde_json::to_string_pretty(&cfg)?)?;
                let mut args = vec!["--kv-cache-config", path.to_str().unwrap()];
                args.extend_from_slice(extra);
                Server::start(self.backend(), &args)
            }
        }
    }
}

/// One answered case.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    pub variant: String,
    pub case: String,
    /// FNV-1a of the prompt and the variant's config: a changed case or
    /// config is asked again.
    pub key: u64,
    pub prompt_tokens: usize,
    pub output: String,
    pub correct: bool,
    pub prompt_time_sec: f64,
    pub total_time_sec: f64,
    /// Generated tokens and the server's time for them (decode speed).
    #[serde(default)]
    pub completion_tokens: usize,
    #[serde(default)]
    pub completion_time_sec: f64,
    /// A metric value in [0, 1] for benchmark-format cases (`correct` is
    /// `score >= 0.5` there); `None` for pass/fail tasks.
    #[serde(default)]
    pub score: Option<f64>,
}

impl Outcome {
    /// The case's score in [0, 1].
    pub fn value(&self) -> f64 {
        self.score.unwrap_or(if self.correct { 1.0 } else { 0.0 })
    }

    /// Decode tokens per second, when the server reported the time.
    pub fn decode_tok_s(&self) -> Option<f64> {
        (self.completion_tokens > 1 && self.completion_time_sec > 0.0)
            .then(|| self.completion_tokens as f64 / self.completion_time_sec)
    }
}

/// How a case's prompt reaches the model (the `use_chat_template` and `cot`
/// config keys of the published runner).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PromptMode {
    /// Raw text on `/v1/completions` (`use_chat_template` = false).
    Plain,
    /// One user message on `/v1/chat/completions`, the model's chat template.
    Chat,
    /// Chat template plus a step-by-step instruction (`cot` = true); the
    /// answer is read from the final `Answer:` line.
    Cot,
}

/// The instruction chain-of-thought prompts end with.
pub const COT_INSTRUCTION: &str = "Let's think step by step. Write out your reasoning first, then give the final answer on the last line in the form \"Answer: <answer>\".";

impl PromptMode {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "plain" => PromptMode::Plain,
            "chat" => PromptMode::Chat,
            "cot" => PromptMode::Cot,
            _ => bail!("prompt mode `{s}`: expected plain, chat or cot"),
        })
    }

    /// From the config keys: `use_chat_template` (default true here: the
    /// suites are written for an instruction-tuned model) and `cot`.
    pub fn from_config(config: &Value) -> Result<Self> {
        let chat = config
            .get("use_chat_template")
            .map(|v| {
                v.as_bool()
                    .context("`use_chat_template` must be true or false")
            })
            .transpose()?
            .unwrap_or(true);
        let cot = config
            .get("cot")
            .map(|v| v.as_bool().context("`cot` must be true or false"))
            .transpose()?
            .unwrap_or(false);
        match (chat, cot) {
            (_, true) if !chat => bail!("`cot` = true needs `use_chat_template` = true"),
            (_, true) => Ok(PromptMode::Cot),
            (true, false) => Ok(PromptMode::Chat),
            (false, false) => Ok(PromptMode::Plain),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            PromptMode::Plain => "plain",
            PromptMode::Chat => "chat",
            PromptMode::Cot => "cot",
        }
    }

    /// The id [`Self::apply`] gives a case with id `id`.
    pub fn apply_id(self, id: &str) -> String {
        match self {
            PromptMode::Chat => id.to_string(),
            m => format!("{id}~{}", m.name()),
        }
    }

    /// `case` as this mode asks it: chat cases keep their id; the others get
    /// a `~plain`/`~cot` suffix, and chain-of-thought cases the instruction and
    /// room for the reasoning.
    pub fn apply(self, case: &Case) -> Case {
        let mut c = case.clone();
        c.mode = self;
        match self {
            PromptMode::Chat => {}
            PromptMode::Plain => {
                c.id = self.apply_id(&case.id);
                if case.suite != Suite::Bench {
                    // Benchmark templates already end where the answer starts.
                    c.prompt = format!("{}\nAnswer:", case.prompt);
                }
            }
            PromptMode::Cot => {
                c.id = self.apply_id(&case.id);
                c.prompt = format!("{}\n\n{COT_INSTRUCTION}", case.prompt);
                c.max_tokens = case.max_tokens.max(200);
            }
        }
        c
    }
}

/// The part of an output that is scored: for chain-of-thought cases the text
/// after the last `Answer:` (or the last line when there is none).
pub fn answer_part(mode: PromptMode, output: &str) -> &str {
    if mode != PromptMode::Cot {
        return output;
    }
    let lower = output.to_lowercase();
    if let Some(at) = lower.rfind("answer:") {
        return &output[at + "answer:".len()..];
    }
    output.trim_end().rsplit('\n').next().unwrap_or(output)
}

pub fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0xff)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Answers already in the cache file, by (variant, case).
pub fn load_cache(path: &Path) -> BTreeMap<(String, String), Outcome> {
    let mut map = BTreeMap::new();
    if let Ok(text) = std::fs::read_to_string(path) {
        for line in text.lines() {
            if let Ok(o) = serde_json::from_str::<Outcome>(line) {
                map.insert((o.variant.clone(), o.case.clone()), o);
            }
        }
    }
    map
}

pub fn append_cache(path: &Path, o: &Outcome) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(f, "{}", serde_json::to_string(o)?)?;
    Ok(())
}

/// Median of `v` (sorted in place); NaN when empty.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A short description of this machine for result files (CPU-only runs).
pub fn machine_description() -> String {
    machine_description_on(None)
}

/// [`machine_description`] for a run on `gpu` (its name), or on the CPU
/// alone (`None`).
pub fn machine_description_on(gpu: Option<&str>) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map(|kib| kib / (1024.0 * 1024.0))
        .unwrap_or(0.0);
    let gpu = gpu.map_or_else(|| "no GPU".to_string(), |g| format!("GPU: {g}"));
    format!(
        "{cpu}, {cores} cores, {mem_gib:.0} GiB RAM, {gpu}; build: {}",
        build_profile()
    )
}

/// The build the figures were taken with. The workspace has one profile for
/// the server, the tools and the tests (`dev`, see the root `Cargo.toml`),
/// so the tool's own build says how the server was built.
pub fn build_profile() -> &'static str {
    if cfg!(debug_assertions) {
        "dev profile with debug assertions and overflow checks on"
    } else {
        "dev profile (opt-level 3 for the host and the OmniKV crates, no debug assertions or overflow checks)"
    }
}

/// Default location of the haystack essays.
pub fn haystack_dir() -> PathBuf {
    root().join("data/haystack")
}

/// Benchmark-format cases from `paths` (files, or directories of `.jsonl`
/// files; the format is `format`, or else taken from the path: a path
/// naming `infinitebench` is InfiniteBench, anything else LongBench). Each
/// prompt is middle-truncated to `max_len` tokens of `tok` as the published
/// runners do. Returns the cases and, by case id, the samples to score them.
pub fn bench_cases(
    paths: &[PathBuf],
    format: Option<crate::bench_format::Format>,
    tok: &tokenizers::Tokenizer,
    max_len: usize,
) -> Result<(Vec<Case>, BTreeMap<String, crate::bench_format::Sample>)> {
    use crate::bench_format::{load_jsonl, truncate_middle, Format};
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut inner: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("cannot list `{}`", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|e| e == "jsonl"))
                .collect();
            inner.sort();
            if inner.is_empty() {
                bail!("`{}` has no .jsonl files", p.display());
            }
            files.extend(inner);
        } else if p.is_file() {
            files.push(p.clone());
        } else {
            bail!("benchmark file `{}` does not exist", p.display());
        }
    }
    let mut tasks: Vec<String> = Vec::new();
    let mut cases = Vec::new();
    let mut samples = BTreeMap::new();
    for f in files {
        let fmt = format.unwrap_or_else(|| {
            if f.to_string_lossy().to_lowercase().contains("infinitebench") {
                Format::InfiniteBench
            } else {
                Format::LongBench
            }
        });
        for sample in load_jsonl(&f, fmt)? {
            let task = format!("{}/{}", fmt.name(), sample.task);
            let index = match tasks.iter().position(|t| *t == task) {
                Some(i) => i,
                None => {
                    tasks.push(task.clone());
                    tasks.len() - 1
                }
            };
            let id = format!("{task}/{}", sample.id);
            if samples.contains_key(&id) {
                bail!(
                    "`{}`: sample id `{}` appears twice in task {task}",
                    f.display(),
                    sample.id
                );
            }
            cases.push(Case {
                id: id.clone(),
                suite: Suite::Bench,
                length: index,
                depth: None,
                prompt: truncate_middle(&sample.prompt, tok, max_len)?,
                answer: String::new(),
                distractors: Vec::new(),
                max_tokens: sample.max_new_tokens,
                mode: PromptMode::Chat,
            });
            samples.insert(id, sample);
        }
    }
    Ok((cases, samples))
}
