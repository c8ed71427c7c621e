//! LongBench and InfiniteBench data files: load their JSONL rows into
//! [`Sample`]s with the published prompt template and generation length,
//! cut prompts in the middle to a token budget as the published prediction
//! scripts do, and score predictions with the published metrics
//! ([`crate::metrics`]).
//!
//! Sources (data copied from them: templates and lengths):
//! * LongBench (v1): `LongBench/config/dataset2prompt.json`,
//!   `LongBench/config/dataset2maxlen.json`, `LongBench/pred.py`
//!   (middle truncation) and `LongBench/eval.py` (metric per dataset, the
//!   first-line rule) of THUDM/LongBench;
//! * InfiniteBench: `src/prompt.py` (`yarn_mistral_templates`, the ones the
//!   repository uses for open models: YaRN-Mistral, Yi, ChatGLM3),
//!   `src/eval_utils.py` (`create_prompt`, `get_answer`,
//!   `DATA_NAME_TO_MAX_NEW_TOKENS`, `truncate_input`) and
//!   `src/compute_scores.py` of OpenBMB/InfiniteBench.
//!
//! The chat wrapping LongBench's `pred.py` applies per model (`build_chat`)
//! is not part of the format: a prompt here is the filled template, to be
//! sent as a completion prompt or a single user message.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::metrics::Metric;

/// The benchmark a data file belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    LongBench,
    InfiniteBench,
}

impl Format {
    pub fn name(&self) -> &'static str {
        match self {
            Format::LongBench => "longbench",
            Format::InfiniteBench => "infinitebench",
        }
    }

    /// The tasks this module knows, in the published order.
    pub fn tasks(&self) -> Vec<&'static str> {
        match self {
            Format::LongBench => LONGBENCH.iter().map(|t| t.name).collect(),
            Format::InfiniteBench => INFINITEBENCH.iter().map(|t| t.name).collect(),
        }
    }

    /// The template, generation length and metric of `task`.
    pub fn task(&self, task: &str) -> Option<&'static TaskSpec> {
        let table: &[TaskSpec] = match self {
            Format::LongBench => LONGBENCH,
            Format::InfiniteBench => INFINITEBENCH,
        };
        table.iter().find(|t| t.name == task)
    }
}

impl std::str::FromStr for Format {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "longbench" => Ok(Format::LongBench),
            "infinitebench" => Ok(Format::InfiniteBench),
            other => {
                bail!("unknown benchmark format `{other}`: expected `longbench` or `infinitebench`")
            }
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One task of a benchmark: its published prompt template (Python
/// `str.format` syntax), maximum number of generated tokens and metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskSpec {
    pub name: &'static str,
    pub template: &'static str,
    pub max_new_tokens: usize,
    pub metric: Metric,
}

const fn lb(
    name: &'static str,
    template: &'static str,
    max_new_tokens: usize,
    metric: Metric,
) -> TaskSpec {
    TaskSpec {
        name,
        template,
        max_new_tokens,
        metric,
    }
}

/// LongBench: `dataset2prompt.json`, `dataset2maxlen.json` and
/// `eval.py`'s `dataset2metric`, verbatim (typos included).
static LONGBENCH: &[TaskSpec] = &[
    lb("narrativeqa", "You are given a story, which can be either a novel or a movie script, and a question. Answer the question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:", 128, Metric::QaF1),
    lb("qasper", "You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:", 128, Metric::QaF1),
    lb("multifieldqa_en", "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:", 64, Metric::QaF1),
    lb("multifieldqa_zh", "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答：", 64, Metric::QaF1Zh),
    lb("hotpotqa", "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:", 32, Metric::QaF1),
    lb("2wikimqa", "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:", 32, Metric::QaF1),
    lb("musique", "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:", 32, Metric::QaF1),
    lb("dureader", "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：", 128, Metric::RougeZh),
    lb("gov_report", "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:", 512, Metric::Rouge),
    lb("qmsum", "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:", 512, Metric::Rouge),
    lb("multi_news", "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:", 512, Metric::Rouge),
    lb("vcsum", "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：", 512, Metric::RougeZh),
    lb("trec", "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}", 64, Metric::Classification),
    lb("triviaqa", "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}", 32, Metric::QaF1),
    lb("samsum", "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}", 128, Metric::Rouge),
    lb("lsht", "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}", 64, Metric::Classification),
    lb("passage_count", "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ", 32, Metric::Count),
    lb("passage_retrieval_en", "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ", 32, Metric::Retrieval),
    lb("passage_retrieval_zh", "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式\n\n答案是：", 32, Metric::RetrievalZh),
    lb("lcc", "Please complete the code given below. \n{context}Next line of code:\n", 64, Metric::CodeSim),
    lb("repobench-p", "Please complete the code given below. \n{context}{input}Next line of code:\n", 64, Metric::CodeSim),
];

/// InfiniteBench: `yarn_mistral_templates` of `prompt.py`,
/// `DATA_NAME_TO_MAX_NEW_TOKENS` of `eval_utils.py`, the getters of
/// `compute_scores.py`.
static INFINITEBENCH: &[TaskSpec] = &[
    lb("passkey", "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about the important information.\n\n{context}\n\n{input}\n\nThe pass key is", 6, Metric::IbFirstInt),
    lb("number_string", "There is an important info hidden inside a lot of irrelevant text. Find it. I will quiz you about the important information there.\n\n{context}\n\n{input}\n\nThe sequence of digits is", 12, Metric::IbFirstInt),
    lb("kv_retrieval", "Extract the value corresponding to the specified key in the JSON object below.\n\n{context}\n\n{input}", 50, Metric::IbKvRetrieval),
    lb("longdialogue_qa_eng", "Below is a dialogue script where one random occurrence of a character name is replaced with \"$$MASK$$\", and you should try to guess who that character is.\n\n{context}\n\nThe name that has been replaced with $$MASK$$ is likely", 40, Metric::IbLongDialogue),
    lb("longbook_sum_eng", "Summarize the book below.\n\n{context}\n\nSummary:", 1200, Metric::IbRougeLsum),
    lb("longbook_choice_eng", "Read the book and answer the question.\n\n{context}\n\nQuestion: {question}\nA. {OPTION_A}\nB. {OPTION_B}\nC. {OPTION_C}\nD. {OPTION_D}\n\nThe letter of the correct answer is", 40, Metric::IbChoice),
    lb("longbook_qa_eng", "Read the book and answer the question. Be very concise in your answer.\n\n{context}\n\nQuestion: {question}\nAnswer:", 40, Metric::QaF1),
    lb("longbook_qa_chn", "阅读以下书籍然后回答问题。\n\n{context}\n\n问题：{question}\n答案：", 40, Metric::IbQaF1ZhChars),
    lb("math_find", "{prefix}\n\n{context}\n\n{input}", 3, Metric::IbMathFind),
    lb("math_calc", "Let us calculate the intermediate values of an expression.\n\nExpression: 1 + 3 + 4\nValues: [1, 4, 8]\n\nExpression: 8 - 3 + 2 - 4\nValues: [8, 5, 7, 3]\n\nExpression: {context}\nValues:", 30000, Metric::IbMathCalc),
    lb("code_run", "There is a function called {func} in the following Python code.\n\n{context}\n\nPlease compute the exact value of {func_call}. The value of {func_call} is", 5, Metric::IbCodeRun),
    lb("code_debug", "Following is a Python code where exactly one of the functions/methods has a deliberate error that makes it crash.\n\n{context}\n\nOptions:\nA. {OPTION_A}\nB. {OPTION_B}\nC. {OPTION_C}\nD. {OPTION_D}\n\nThe correct option is:", 5, Metric::IbCodeDebug),
];

/// LongBench tasks whose prediction is cut to its first line before
/// scoring (`eval.py`).
const FIRST_LINE_TASKS: [&str; 4] = ["trec", "triviaqa", "samsum", "lsht"];

/// One benchmark example, ready to send.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// `_id` (LongBench) or `id` (InfiniteBench); `<task>-<line>` if absent.
    pub id: String,
    /// The task (LongBench dataset name without the `_e` of LongBench-E).
    pub task: String,
    /// The filled template, not yet truncated (see [`truncate_middle`]).
    pub prompt: String,
    /// The accepted answers, as the metric takes them (see
    /// [`Metric::score`]).
    pub answers: Vec<String>,
    /// LongBench `all_classes` (classification tasks), else empty.
    pub all_classes: Vec<String>,
    /// The published generation length of the task.
    pub max_new_tokens: usize,
    pub metric: Metric,
}

/// Fill a Python `str.format` template with named values (`{{`/`}}` are
/// literal braces); every placeholder must have a value.
pub fn format_template(template: &str, values: &[(&str, &str)]) -> Result<String> {
    let mut out =
        String::with_capacity(template.len() + values.iter().map(|(_, v)| v.len()).sum::<usize>());
    let mut rest = template;
    while let Some(pos) = rest.find(['{', '}']) {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        if tail.starts_with("{{") {
            out.push('{');
            rest = &tail[2..];
        } else if tail.starts_with("}}") {
            out.push('}');
            rest = &tail[2..];
        } else if tail.starts_with('}') {
            bail!("single `}}` in template");
        } else {
            let end = tail
                .find('}')
                .ok_or_else(|| anyhow!("unclosed `{{` in template"))?;
            let name = &tail[1..end];
            let value = values
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| *v)
                .ok_or_else(|| anyhow!("no value for template field `{name}`"))?;
            out.push_str(value);
            rest = &tail[end + 1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Errors of one row: they name the file and line.
struct Row<'a> {
    path: &'a Path,
    line: usize,
    obj: &'a serde_json::Map<String, Value>,
}

impl Row<'_> {
    fn err(&self, msg: impl std::fmt::Display) -> anyhow::Error {
        anyhow!("{}:{}: {msg}", self.path.display(), self.line)
    }

    fn get(&self, field: &str) -> Option<&Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    fn string(&self, field: &str) -> Result<&str> {
        match self.get(field) {
            None => Err(self.err(format!("missing field `{field}`"))),
            Some(Value::String(s)) => Ok(s),
            Some(other) => Err(self.err(format!(
                "field `{field}` must be a string, found {}",
                kind(other)
            ))),
        }
    }

    /// A string, or a number written as JSON writes it.
    fn scalar(&self, field: &str, v: &Value) -> Result<String> {
        match v {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            other => Err(self.err(format!(
                "field `{field}` must hold strings or numbers, found {}",
                kind(other)
            ))),
        }
    }

    /// A list of strings (numbers allowed); `None` when absent or null.
    fn list(&self, field: &str) -> Result<Option<Vec<String>>> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| self.scalar(field, v))
                .collect::<Result<_>>()
                .map(Some),
            Some(other) => Err(self.err(format!(
                "field `{field}` must be a list, found {}",
                kind(other)
            ))),
        }
    }

    /// The id: a string or a number.
    fn id(&self, field: &str, task: &str) -> Result<String> {
        match self.get(field) {
            None => Ok(format!("{task}-{}", self.line)),
            Some(v @ (Value::String(_) | Value::Number(_))) => self.scalar(field, v),
            Some(other) => Err(self.err(format!(
                "field `{field}` must be a string or a number, found {}",
                kind(other)
            ))),
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The LongBench task of a dataset name, file stem or LongBench-E name
/// (`hotpotqa_e`).
fn longbench_task(name: &str) -> Option<&'static TaskSpec> {
    Format::LongBench.task(name).or_else(|| {
        name.strip_suffix("_e")
            .and_then(|base| Format::LongBench.task(base))
    })
}

fn unknown_task(format: Format, name: &str) -> String {
    format!(
        "unknown {format} task `{name}`; supported: {}",
        format.tasks().join(", ")
    )
}

/// Read a LongBench or InfiniteBench JSONL file (blank lines skipped).
///
/// LongBench rows: `input`, `context`, `answers` (required), `all_classes`,
/// `_id`, `dataset` (the task; else the file name, e.g. `hotpotqa.jsonl` or
/// LongBench-E's `hotpotqa_e.jsonl`), `length` and `language` (not used).
/// InfiniteBench rows: `context` (or `content`), `input`, `answer` (a
/// string, a number or a list), `options` (for `longbook_choice_eng` and
/// `code_debug`), `id`; the task is the file name (`passkey.jsonl`, ...).
pub fn load_jsonl(path: &Path, format: Format) -> Result<Vec<Sample>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| anyhow!("{}: no file name to take the task from", path.display()))?;
    let file_task = match format {
        Format::LongBench => longbench_task(stem),
        Format::InfiniteBench => Format::InfiniteBench.task(stem),
    };
    let mut samples = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line)
            .map_err(|e| anyhow!("{}:{line_no}: not a JSON object: {e}", path.display()))?;
        let Value::Object(obj) = &value else {
            bail!(
                "{}:{line_no}: not a JSON object: found {}",
                path.display(),
                kind(&value)
            );
        };
        let row = Row {
            path,
            line: line_no,
            obj,
        };
        let sample = match format {
            Format::LongBench => {
                let spec = match row.get("dataset") {
                    Some(Value::String(d)) => {
                        longbench_task(d).ok_or_else(|| row.err(unknown_task(format, d)))?
                    }
                    Some(other) => {
                        return Err(row.err(format!(
                            "field `dataset` must be a string, found {}",
                            kind(other)
                        )))
                    }
                    None => file_task.ok_or_else(|| {
                        anyhow!("{}: {}", path.display(), unknown_task(format, stem))
                    })?,
                };
                longbench_sample(&row, spec)?
            }
            Format::InfiniteBench => {
                let spec = file_task
                    .ok_or_else(|| anyhow!("{}: {}", path.display(), unknown_task(format, stem)))?;
                infinitebench_sample(&row, spec)?
            }
        };
        samples.push(sample);
    }
    Ok(samples)
}

fn longbench_sample(row: &Row, spec: &TaskSpec) -> Result<Sample> {
    let input = row.string("input")?;
    let context = row.string("context")?;
    let answers = row
        .list("answers")?
        .ok_or_else(|| row.err("missing field `answers`"))?;
    let all_classes = row.list("all_classes")?.unwrap_or_default();
    let prompt = format_template(spec.template, &[("context", context), ("input", input)])
        .map_err(|e| row.err(e))?;
    Ok(Sample {
        id: row.id("_id", spec.name)?,
        task: spec.name.to_string(),
        prompt,
        answers,
        all_classes,
        max_new_tokens: spec.max_new_tokens,
        metric: spec.metric,
    })
}

/// `answer` as a list of strings; one nested list (`math_calc`) is
/// flattened.
fn ib_answers(row: &Row) -> Result<Vec<String>> {
    match row.get("answer") {
        None => Err(row.err("missing field `answer`")),
        Some(Value::Array(items)) => match items.as_slice() {
            [Value::Array(inner)] => inner.iter().map(|v| row.scalar("answer", v)).collect(),
            _ => items.iter().map(|v| row.scalar("answer", v)).collect(),
        },
        Some(v) => Ok(vec![row.scalar("answer", v)?]),
    }
}

fn infinitebench_sample(row: &Row, spec: &TaskSpec) -> Result<Sample> {
    static FUNC_CALL: OnceLock<Regex> = OnceLock::new();
    static TARGET: OnceLock<Regex> = OnceLock::new();
    let task = spec.name;
    // `create_prompt` renames `content` to `context`.
    let context = if row.get("context").is_none() && row.get("content").is_some() {
        row.string("content")?
    } else {
        row.string("context")?
    };
    let mut answers = ib_answers(row)?;
    let options = || -> Result<Vec<String>> {
        let options = row
            .list("options")?
            .ok_or_else(|| row.err("missing field `options`"))?;
        if options.len() < 4 {
            return Err(row.err(format!(
                "field `options` must have 4 items (A-D), found {}",
                options.len()
            )));
        }
        Ok(options)
    };
    let fill =
        |values: &[(&str, &str)]| format_template(spec.template, values).map_err(|e| row.err(e));
    let prompt = match task {
        "code_run" => {
            let input = row.string("input")?;
            let re = FUNC_CALL.get_or_init(|| Regex::new(r"func_[0-9]+\(\-?[0-9]+\)").unwrap());
            let call = re
                .find(input)
                .ok_or_else(|| row.err("field `input` has no call like `func_12(-3)`"))?
                .as_str();
            let func = call.split('(').next().unwrap_or(call);
            fill(&[("func", func), ("func_call", call), ("context", context)])?
        }
        "code_debug" | "longbook_choice_eng" => {
            let options = options()?;
            // `get_answer`: [answer, letter of the answer among the options]
            answers = match answers.as_slice() {
                [a] => {
                    let idx = options[..4].iter().position(|o| o == a).ok_or_else(|| {
                        row.err(format!("field `answer` ({a:?}) is not one of the options"))
                    })?;
                    vec![a.clone(), ["A", "B", "C", "D"][idx].to_string()]
                }
                [_, letter] if ["A", "B", "C", "D"].contains(&letter.as_str()) => answers,
                _ => {
                    return Err(
                        row.err("field `answer` must be one option, or [option, letter A-D]")
                    )
                }
            };
            let opts = [
                ("OPTION_A", options[0].as_str()),
                ("OPTION_B", options[1].as_str()),
                ("OPTION_C", options[2].as_str()),
                ("OPTION_D", options[3].as_str()),
                ("context", context),
            ];
            if task == "code_debug" {
                fill(&opts)?
            } else {
                let question = row.string("input")?;
                let mut values = opts.to_vec();
                values.push(("question", question));
                fill(&values)?
            }
        }
        "longbook_qa_eng" | "longbook_qa_chn" => {
            fill(&[("question", row.string("input")?), ("context", context)])?
        }
        "longdialogue_qa_eng" | "longbook_sum_eng" | "math_calc" => fill(&[("context", context)])?,
        "math_find" => {
            let input = row.string("input")?;
            let re = TARGET.get_or_init(|| Regex::new(r"The .+ of").unwrap());
            let found = re
                .find(input)
                .ok_or_else(|| {
                    row.err("field `input` has no `The ... of` naming the number to find")
                })?
                .as_str()
                .to_lowercase();
            // `find_result[0].lower()[:-3]`: drop " of"
            let target: String = {
                let chars: Vec<char> = found.chars().collect();
                chars[..chars.len() - 3].iter().collect()
            };
            let prefix = format!("What is {target} in the following list?");
            fill(&[("prefix", &prefix), ("context", context), ("input", input)])?
        }
        _ => fill(&[("context", context), ("input", row.string("input")?)])?,
    };
    Ok(Sample {
        id: row.id("id", task)?,
        task: task.to_string(),
        prompt,
        answers,
        all_classes: Vec::new(),
        max_new_tokens: spec.max_new_tokens,
        metric: spec.metric,
    })
}

/// The score of a prediction for a sample, in [0, 1]: for LongBench's
/// `trec`, `triviaqa`, `samsum` and `lsht` only the first line of the
/// prediction (after leading newlines) counts; then [`Metric::score`]
/// (the maximum over the answers).
pub fn score_sample(sample: &Sample, prediction: &str) -> f64 {
    let prediction = if FIRST_LINE_TASKS.contains(&sample.task.as_str()) {
        prediction
            .trim_start_matches('\n')
            .split('\n')
            .next()
            .unwrap_or("")
    } else {
        prediction
    };
    sample
        .metric
        .score(prediction, &sample.answers, &sample.all_classes)
}

/// Cut a prompt longer than `max_len` tokens in the middle, as LongBench's
/// `pred.py` (and InfiniteBench's `truncate_input`) do: keep the first and
/// the last `max_len / 2` tokens, each half decoded on its own (special
/// tokens skipped) and the two texts concatenated. Tokens are counted
/// without special tokens (LongBench counts the BOS its Hugging Face
/// tokenizer adds; SmolLM2's GGUF adds none).
///
/// Re-encoding the result can give a different count than the two halves
/// (tokens may merge or split at the seam); if it gives more than
/// `max_len`, both halves are shortened a token at a time until it fits.
pub fn truncate_middle(
    prompt: &str,
    tok: &tokenizers::Tokenizer,
    max_len: usize,
) -> Result<String> {
    let encode = |text: &str| -> Result<Vec<u32>> {
        Ok(tok
            .encode(text, false)
            .map_err(|e| anyhow!("tokenize: {e}"))?
            .get_ids()
            .to_vec())
    };
    let ids = encode(prompt)?;
    if ids.len() <= max_len {
        return Ok(prompt.to_string());
    }
    let mut half = max_len / 2;
    loop {
        let head = tok
            .decode(&ids[..half], true)
            .map_err(|e| anyhow!("detokenize: {e}"))?;
        let tail = tok
            .decode(&ids[ids.len() - half..], true)
            .map_err(|e| anyhow!("detokenize: {e}"))?;
        let text = head + &tail;
        if half == 0 || encode(&text)?.len() <= max_len {
            return Ok(text);
        }
        half -= 1;
    }
}

/// The pre-tokenizer pattern mistral.rs's GGUF conversion uses for
/// `gpt2` (byte-level BPE) vocabularies, so token counts agree with the
/// server's.
const GPT2_SPLIT_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A Hugging Face tokenizer built from a GGUF file's `tokenizer.ggml.*`
/// metadata, as mistral.rs builds the one its server uses: for
/// `tokenizer.ggml.model = "gpt2"`, byte-level BPE over
/// `tokenizer.ggml.tokens` and `tokenizer.ggml.merges`, the split pattern
/// above then the byte-level mapping (no prefix space), a byte-level
/// decoder, and the control tokens (`tokenizer.ggml.token_type` 3) plus
/// BOS/EOS/UNK as special added tokens (mistral.rs takes every type other
/// than 1, normal; SmolLM2 has only types 1 and 3). Nothing is added when
/// encoding (no BOS post-processor). Other tokenizer models are refused.
///
/// Note: the model's own `tokenizer.json` may pre-tokenize differently
/// (SmolLM2's: digits one by one, then the GPT-2 pattern; GGUF records it
/// as `tokenizer.ggml.pre = "smollm"`); this follows the server.
pub fn gguf_tokenizer(path: &Path) -> Result<tokenizers::Tokenizer> {
    use candle_core::quantized::gguf_file::{Content, Value as G};
    use tokenizers::models::bpe::{Vocab, BPE};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::sequence::Sequence;
    use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
    use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

    let mut file = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let content = Content::read(&mut file)
        .with_context(|| format!("read GGUF header of {}", path.display()))?;
    let md = &content.metadata;
    let get = |key: &str| -> Result<&G> {
        md.get(key)
            .ok_or_else(|| anyhow!("{}: no `{key}` in the GGUF metadata", path.display()))
    };
    let strings = |key: &str| -> Result<Vec<String>> {
        get(key)?
            .to_vec()
            .map_err(|e| anyhow!("{}: `{key}`: {e}", path.display()))?
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<candle_core::Result<Vec<String>>>()
            .map_err(|e| anyhow!("{}: `{key}`: {e}", path.display()))
    };
    let int = |v: &G| -> Option<i64> {
        match v {
            G::U8(x) => Some(*x as i64),
            G::I8(x) => Some(*x as i64),
            G::U16(x) => Some(*x as i64),
            G::I16(x) => Some(*x as i64),
            G::U32(x) => Some(*x as i64),
            G::I32(x) => Some(*x as i64),
            G::U64(x) => Some(*x as i64),
            G::I64(x) => Some(*x),
            _ => None,
        }
    };

    let model = get("tokenizer.ggml.model")?
        .to_string()
        .map_err(|e| anyhow!("{}: `tokenizer.ggml.model`: {e}", path.display()))?;
    if model != "gpt2" {
        bail!(
            "{}: tokenizer model `{model}` is not supported: only `gpt2` (byte-level BPE) is",
            path.display()
        );
    }
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges: Vec<(String, String)> = strings("tokenizer.ggml.merges")?
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| anyhow!("{}: merge `{m}` is not two tokens", path.display()))
        })
        .collect::<Result<_>>()?;
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| anyhow!("{}: build BPE: {e}", path.display()))?;

    let mut tokenizer = Tokenizer::new(bpe);
    let split = Split::new(
        SplitPattern::Regex(GPT2_SPLIT_PATTERN.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| anyhow!("split pattern: {e}"))?;
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
    ])));
    tokenizer.with_decoder(Some(ByteLevel::new(false, false, false)));

    let mut special: Vec<usize> = Vec::new();
    if let Some(types) = md.get("tokenizer.ggml.token_type") {
        let types = types
            .to_vec()
            .map_err(|e| anyhow!("{}: `tokenizer.ggml.token_type`: {e}", path.display()))?;
        special.extend(
            types
                .iter()
                .enumerate()
                .filter(|(_, t)| int(t) == Some(3))
                .map(|(i, _)| i),
        );
    }
    for key in ["bos_token_id", "eos_token_id", "unknown_token_id"] {
        if let Some(id) = md.get(&format!("tokenizer.ggml.{key}")).and_then(int) {
            special.push(id as usize);
        }
    }
    special.sort_unstable();
    special.dedup();
    let added: Vec<AddedToken> = special
        .into_iter()
        .filter_map(|i| tokens.get(i))
        .map(|t| AddedToken::from(t.clone(), true))
        .collect();
    tokenizer.add_special_tokens(&added);
    Ok(tokenizer)
}

/// How many tokens `text` is without special tokens.
pub fn count_tokens(tok: &tokenizers::Tokenizer, text: &str) -> Result<usize> {
    Ok(tok
        .encode(text, false)
        .map_err(|e| anyhow!("tokenize: {e}"))?
        .len())
}
