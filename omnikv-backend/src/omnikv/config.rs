//! OmniKV configuration: the published JSON schema ([`OmniKvConfigFile`]) and
//! the validated runtime type ([`OmniKvConfig`]) built from it once.
//!
//! Every problem in a file is reported at once, each naming the key, the bad
//! value and what is allowed (unknown keys included), so a user fixes a config
//! in one round trip. The keys and their published defaults are the spec's
//! "Configuration keys (published JSON schema)"; keys outside it are marked
//! as such. Also [`RequestOverride`], the per-request `kv_cache` options.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt;
use std::path::Path;

use super::selector::{Keep, SelectorKind};
pub use crate::budget::{check_context_len, TokenBudget};
pub use crate::prefill::PrefillKernel;

/// The JSON file as published (`configs/example.json`), every key optional
/// here so that missing, mistyped and unknown keys can all be reported.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct OmniKvConfigFile {
    /// Threads of the host-side gather (default 8).
    pub cpu_num_threads: Option<u64>,
    /// Wrap prompts in the chat template (read by the evaluation harness;
    /// the backend only checks it against `cot`).
    pub use_chat_template: Option<bool>,
    /// Chain-of-thought prompt variant; needs `use_chat_template`.
    pub cot: Option<bool>,
    /// Longest prompt + generation in tokens (default 128,500).
    pub max_context_len: Option<u64>,
    /// Model path; the backend does not use it (the host loads the model).
    pub model_name: Option<String>,
    /// bitsandbytes 8-bit loading; only `false` is accepted.
    pub load_in_8bit: Option<bool>,
    /// bitsandbytes 4-bit loading; only `false` is accepted.
    pub load_in_4bit: Option<bool>,
    /// Only `"multi"` (OmniKV) is accepted.
    pub model_cls: Option<String>,
    /// Only `"multi"` (OmniKV) is accepted.
    pub cache_cls: Option<String>,
    /// Accepted, not used by the backend; prompt kernels follow `prefill`.
    pub use_flash_attn: Option<bool>,
    /// `"2,8,18"` as published; a JSON array of integers is accepted too.
    pub do_select_layers: Option<Value>,
    /// `W`, dense layers after each filter layer (default 1).
    pub num_wait_load_layers: Option<u64>,
    /// Keep sparse layers' prompt KV in the host tier (default false).
    pub real_offload: Option<bool>,
    /// Wait-load layers attend densely; only `true` is supported.
    pub dense_more: Option<bool>,
    /// An integer count or a fraction in (0, 1].
    pub num_of_selected_tokens: Option<serde_json::Number>,
    /// `last` (default), `softmax_before_last`, `uniform` or `exp`.
    pub selector_cls: Option<String>,
    /// Window of `uniform`/`exp`, in tokens (default 16).
    pub window_size: Option<u64>,
    /// Not in the published schema: prompts shorter than this decode densely.
    pub min_prompt_len: Option<u64>,
    /// Not in the published schema: the fewest prompt rows a selection
    /// keeps under the configured budget (0, the default, is published).
    pub min_selected_tokens: Option<u64>,
    /// Not in the published schema: `"fast"` (default) or `"exact"`.
    pub prefill: Option<String>,
    /// Not in the published schema: leading prompt tokens always selected.
    pub keep_sink_tokens: Option<u64>,
    /// Not in the published schema: trailing prompt tokens always selected.
    pub keep_recent_tokens: Option<u64>,
    /// Not in the published schema: calibration mode, decode densely and
    /// write the inter-layer recall to this file.
    pub record_recall: Option<String>,
    /// Not in the published schema: limit of the host tier (offloaded
    /// sparse-layer keys/values of all sequences), in bytes.
    pub max_host_bytes: Option<u64>,
    /// Not in the published schema: a mass-based budget, the share of the
    /// filter layer's attention mass a selection must cover (the budget
    /// caps it).
    pub selection_mass: Option<f64>,
    /// Not in the published schema: one selection per KV head instead of
    /// one shared by every head.
    pub selection_per_kv_head: Option<bool>,
}

const KNOWN_KEYS: &[&str] = &[
    "cpu_num_threads",
    "use_chat_template",
    "cot",
    "max_context_len",
    "model_name",
    "load_in_8bit",
    "load_in_4bit",
    "model_cls",
    "cache_cls",
    "use_flash_attn",
    "do_select_layers",
    "num_wait_load_layers",
    "real_offload",
    "dense_more",
    "num_of_selected_tokens",
    "selector_cls",
    "window_size",
    "min_prompt_len",
    "min_selected_tokens",
    "prefill",
    "keep_sink_tokens",
    "keep_recent_tokens",
    "record_recall",
    "max_host_bytes",
    "selection_mass",
    "selection_per_kv_head",
];

/// All problems found in a config (or a request's `kv_cache` object), one
/// line each; `Display` lists them under a count.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} problem{} in the OmniKV config:",
            self.0.len(),
            if self.0.len() == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            write!(f, "\n  - {e}")?;
        }
        Ok(())
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        format!("{}...", s.chars().take(60).collect::<String>())
    } else {
        s
    }
}

fn field<T: DeserializeOwned>(
    map: &Map<String, Value>,
    key: &str,
    expected: &str,
    errors: &mut Vec<String>,
) -> Option<T> {
    let v = map.get(key)?;
    match serde_json::from_value::<T>(v.clone()) {
        Ok(t) => Some(t),
        Err(_) => {
            errors.push(format!("`{key}` = {}: expected {expected}", short(v)));
            None
        }
    }
}

impl OmniKvConfigFile {
    /// Read the file fields from a JSON value, reporting type errors and
    /// unknown keys together. Ranges are checked later, by the `TryFrom`
    /// conversion to [`OmniKvConfig`].
    ///
    /// # Errors
    /// If `value` is not an object, has unknown keys, or a key has the wrong
    /// JSON type; every problem at once.
    pub fn from_value(value: &Value) -> Result<Self, ConfigErrors> {
        let (file, errors) = Self::from_value_lenient(value);
        if errors.is_empty() {
            Ok(file)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Like [`Self::from_value`], but returns what could be read (mistyped
    /// keys left unset) together with the problems, so that range checks can
    /// still run and every problem is reported in one go.
    pub fn from_value_lenient(value: &Value) -> (Self, Vec<String>) {
        let Some(map) = value.as_object() else {
            return (
                Self::default(),
                vec![format!(
                    "the config must be a JSON object, got {}",
                    short(value)
                )],
            );
        };
        let mut e = Vec::new();
        for key in map.keys() {
            if !KNOWN_KEYS.contains(&key.as_str()) {
                e.push(format!(
                    "unknown key `{key}`; known keys: {}",
                    KNOWN_KEYS.join(", ")
                ));
            }
        }
        let int = "a non-negative integer";
        let boolean = "true or false";
        let string = "a string";
        let file = OmniKvConfigFile {
            cpu_num_threads: field(map, "cpu_num_threads", int, &mut e),
            use_chat_template: field(map, "use_chat_template", boolean, &mut e),
            cot: field(map, "cot", boolean, &mut e),
            max_context_len: field(map, "max_context_len", int, &mut e),
            model_name: field(map, "model_name", string, &mut e),
            load_in_8bit: field(map, "load_in_8bit", boolean, &mut e),
            load_in_4bit: field(map, "load_in_4bit", boolean, &mut e),
            model_cls: field(map, "model_cls", string, &mut e),
            cache_cls: field(map, "cache_cls", string, &mut e),
            use_flash_attn: field(map, "use_flash_attn", boolean, &mut e),
            do_select_layers: map.get("do_select_layers").cloned(),
            num_wait_load_layers: field(map, "num_wait_load_layers", int, &mut e),
            real_offload: field(map, "real_offload", boolean, &mut e),
            dense_more: field(map, "dense_more", boolean, &mut e),
            num_of_selected_tokens: field(
                map,
                "num_of_selected_tokens",
                "an integer count >= 1 or a fraction in (0, 1]",
                &mut e,
            ),
            selector_cls: field(map, "selector_cls", string, &mut e),
            window_size: field(map, "window_size", int, &mut e),
            min_prompt_len: field(map, "min_prompt_len", int, &mut e),
            min_selected_tokens: field(map, "min_selected_tokens", int, &mut e),
            prefill: field(map, "prefill", string, &mut e),
            keep_sink_tokens: field(map, "keep_sink_tokens", int, &mut e),
            keep_recent_tokens: field(map, "keep_recent_tokens", int, &mut e),
            record_recall: field(map, "record_recall", string, &mut e),
            max_host_bytes: field(map, "max_host_bytes", int, &mut e),
            selection_mass: field(map, "selection_mass", "a fraction in (0, 1]", &mut e),
            selection_per_kv_head: field(map, "selection_per_kv_head", boolean, &mut e),
        };
        (file, e)
    }
}

/// The validated configuration the backend runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct OmniKvConfig {
    /// Threads of the offload gather workers.
    pub cpu_num_threads: usize,
    /// Longest prompt + generation accepted (longer requests are refused).
    pub max_context_len: usize,
    /// Filter layers, strictly ascending (`do_select_layers`).
    pub filter_layers: Vec<usize>,
    /// `W`: dense wait-load layers after each filter layer.
    pub num_wait_load_layers: usize,
    /// Sparse layers' prompt KV lives in the host tier of
    /// [`super::store::TieredStore`] (spec: "KV placement and offload").
    pub real_offload: bool,
    /// Prompt tokens each filter layer selects (`num_of_selected_tokens`).
    pub budget: TokenBudget,
    /// The scoring rule (`selector_cls`).
    pub selector: SelectorKind,
    /// `w` of the window selectors, in tokens.
    pub window_size: usize,
    /// Prompts shorter than this are decoded densely (selection gains
    /// nothing on short prompts); 0, the default, keeps the published
    /// behaviour.
    pub min_prompt_len: usize,
    /// The fewest prompt rows a selection under the configured budget keeps
    /// (`min(P, max(k, min_selected_tokens))`): short prompts are read whole,
    /// long ones are unaffected. 0, the default, keeps the published
    /// behaviour; a budget a request sets itself is taken as given.
    pub min_selected_tokens: usize,
    /// Kernels of prompt passes.
    pub prefill: PrefillKernel,
    /// Prompt positions every selection keeps (opt-in; none by default, as
    /// published). They count against the budget.
    pub keep: Keep,
    /// Calibration: decode densely and record inter-layer recall here.
    pub record_recall: Option<std::path::PathBuf>,
    /// With `real_offload`: the most bytes the host tier may hold for all
    /// sequences together; a prompt that would exceed it fails alone.
    pub max_host_bytes: Option<u64>,
    /// Mass-based budget (opt-in; off as published): each selection keeps
    /// the fewest of its positions that, with the rows every step attends
    /// anyway, cover this share of the filter layer's softmax attention
    /// mass ([`super::selector::mass_capped`]); the budget stays the cap.
    pub selection_mass: Option<f64>,
    /// One selection per KV head (opt-in; off as published): each KV head
    /// ranks the prompt by its own query group's scores and keeps its own
    /// top-k of the same budget, so a step reads as many rows as with one
    /// shared set ([`super::selector::select_per_kv_head`]).
    pub selection_per_kv_head: bool,
}

/// Upper bound for counts that size allocations or threads; anything larger
/// is certainly a typo.
const MAX_THREADS: u64 = 1024;
const MAX_LAYERS: u64 = 4096;

fn parse_layers(v: &Value, errors: &mut Vec<String>) -> Option<Vec<usize>> {
    let what = "a comma-separated list of layer indices like \"2,8,18\" (or an array of integers), strictly ascending";
    let raw: Vec<Result<u64, String>> = match v {
        Value::String(s) => {
            if s.trim().is_empty() {
                errors.push(format!(
                    "`do_select_layers` = {}: expected {what}, got an empty list",
                    short(v)
                ));
                return None;
            }
            s.split(',')
                .map(|p| p.trim().parse::<u64>().map_err(|_| p.trim().to_string()))
                .collect()
        }
        Value::Array(a) => {
            if a.is_empty() {
                errors.push(format!(
                    "`do_select_layers` = []: expected {what}, got an empty list"
                ));
                return None;
            }
            a.iter()
                .map(|x| x.as_u64().ok_or_else(|| x.to_string()))
                .collect()
        }
        _ => {
            errors.push(format!(
                "`do_select_layers` = {}: expected {what}",
                short(v)
            ));
            return None;
        }
    };
    let mut out = Vec::with_capacity(raw.len());
    for r in raw {
        match r {
            Ok(n) if n < MAX_LAYERS => out.push(n as usize),
            Ok(n) => {
                errors.push(format!(
                    "`do_select_layers`: layer {n} is out of range (at most {})",
                    MAX_LAYERS - 1
                ));
                return None;
            }
            Err(bad) => {
                errors.push(format!(
                    "`do_select_layers` = {}: `{bad}` is not a layer index; expected {what}",
                    short(v)
                ));
                return None;
            }
        }
    }
    if out.windows(2).any(|w| w[0] >= w[1]) {
        errors.push(format!(
            "`do_select_layers` = {}: layers must be strictly ascending without duplicates",
            short(v)
        ));
        return None;
    }
    Some(out)
}

fn parse_budget(n: &serde_json::Number, errors: &mut Vec<String>) -> Option<TokenBudget> {
    let budget = TokenBudget::from_json(&Value::Number(n.clone()));
    if budget.is_none() {
        errors.push(format!(
            "`num_of_selected_tokens` = {n}: expected an integer count >= 1 or a fraction in (0, 1]"
        ));
    }
    budget
}

impl TryFrom<OmniKvConfigFile> for OmniKvConfig {
    type Error = ConfigErrors;

    fn try_from(f: OmniKvConfigFile) -> Result<Self, Self::Error> {
        let mut e = Vec::new();
        let cpu_num_threads = f.cpu_num_threads.unwrap_or(8);
        if cpu_num_threads == 0 || cpu_num_threads > MAX_THREADS {
            e.push(format!(
                "`cpu_num_threads` = {cpu_num_threads}: expected 1..={MAX_THREADS}"
            ));
        }
        let use_chat_template = f.use_chat_template.unwrap_or(false);
        let cot = f.cot.unwrap_or(false);
        if cot && !use_chat_template {
            e.push("`cot` = true needs `use_chat_template` = true (chain-of-thought prompts use the chat template)".into());
        }
        let max_context_len = f.max_context_len.unwrap_or(128_500);
        if max_context_len == 0 || max_context_len > u32::MAX as u64 {
            e.push(format!(
                "`max_context_len` = {max_context_len}: expected 1..={}",
                u32::MAX
            ));
        }
        for (key, on) in [
            ("load_in_8bit", f.load_in_8bit),
            ("load_in_4bit", f.load_in_4bit),
        ] {
            if on == Some(true) {
                e.push(format!("`{key}` = true: bitsandbytes loading is not supported; quantize with a GGUF file or mistral.rs in-situ quantization (`--isq`) instead, and set `{key}` to false"));
            }
        }
        for (key, v) in [("model_cls", &f.model_cls), ("cache_cls", &f.cache_cls)] {
            if let Some(v) = v {
                if v != "multi" {
                    e.push(format!(
                        "`{key}` = \"{v}\": only \"multi\" (OmniKV) is supported"
                    ));
                }
            }
        }
        let filter_layers = match &f.do_select_layers {
            Some(v) => parse_layers(v, &mut e),
            None => {
                e.push("`do_select_layers` is required: the filter layers, e.g. \"2,8,18\"".into());
                None
            }
        };
        let num_wait_load_layers = f.num_wait_load_layers.unwrap_or(1);
        if num_wait_load_layers >= MAX_LAYERS {
            e.push(format!(
                "`num_wait_load_layers` = {num_wait_load_layers}: expected 0..{MAX_LAYERS}"
            ));
        }
        if f.dense_more == Some(false) {
            e.push(
                "`dense_more` = false: only true is supported (wait-load layers attend densely)"
                    .into(),
            );
        }
        let budget = match &f.num_of_selected_tokens {
            Some(n) => parse_budget(n, &mut e),
            None => Some(TokenBudget::Ratio(0.067)),
        };
        let selector = match f.selector_cls.as_deref() {
            None | Some("last") => Some(SelectorKind::Last),
            Some("softmax_before_last") => Some(SelectorKind::SoftmaxBeforeLast),
            Some("uniform") => Some(SelectorKind::Uniform),
            Some("exp") => Some(SelectorKind::Exp),
            Some(other) => {
                e.push(format!(
                    "`selector_cls` = \"{other}\": expected one of {}",
                    SelectorKind::ALLOWED
                ));
                None
            }
        };
        let min_prompt_len = f.min_prompt_len.unwrap_or(0);
        if min_prompt_len > u32::MAX as u64 {
            e.push(format!(
                "`min_prompt_len` = {min_prompt_len}: expected 0..={}",
                u32::MAX
            ));
        }
        let min_selected_tokens = f.min_selected_tokens.unwrap_or(0);
        if min_selected_tokens > u32::MAX as u64 {
            e.push(format!(
                "`min_selected_tokens` = {min_selected_tokens}: expected 0..={}",
                u32::MAX
            ));
        }
        let prefill = match PrefillKernel::parse(f.prefill.as_deref()) {
            Ok(kernel) => Some(kernel),
            Err(message) => {
                e.push(message);
                None
            }
        };
        let mut keep = Keep::default();
        for (key, v, slot) in [
            ("keep_sink_tokens", f.keep_sink_tokens, &mut keep.sink),
            ("keep_recent_tokens", f.keep_recent_tokens, &mut keep.recent),
        ] {
            match v {
                Some(n) if n > 1 << 20 => {
                    e.push(format!("`{key}` = {n}: expected 0..={}", 1 << 20))
                }
                Some(n) => *slot = n as usize,
                None => {}
            }
        }
        if f.max_host_bytes.is_some() && f.real_offload != Some(true) {
            e.push("`max_host_bytes` limits the host tier of `real_offload`: set `real_offload` = true or remove `max_host_bytes`".into());
        }
        if f.max_host_bytes == Some(0) {
            e.push("`max_host_bytes` = 0: expected at least 1 (omit the key for no limit)".into());
        }
        if f.record_recall.is_some() && f.real_offload == Some(true) {
            e.push("`record_recall` (calibration) decodes densely and cannot run with `real_offload` = true: set `real_offload` = false".into());
        }
        if f.record_recall.as_deref() == Some("") {
            e.push("`record_recall` = \"\": expected the path of the file to write".into());
        }
        if let Some(m) = f.selection_mass {
            if !(m > 0.0 && m <= 1.0) {
                e.push(format!(
                    "`selection_mass` = {m}: expected a share of the attention mass in (0, 1], such as 0.95"
                ));
            }
        }
        let selection_per_kv_head = f.selection_per_kv_head.unwrap_or(false);
        if selection_per_kv_head && f.real_offload == Some(true) {
            e.push("`selection_per_kv_head` = true with `real_offload` = true: the host tier stages one row set per sparse layer; set `real_offload` = false or `selection_per_kv_head` = false".into());
        }
        let window_size = f.window_size.unwrap_or(16);
        if window_size == 0 || window_size > 4096 {
            e.push(format!("`window_size` = {window_size}: expected 1..=4096"));
        }
        if !e.is_empty() {
            return Err(ConfigErrors(e));
        }
        Ok(OmniKvConfig {
            cpu_num_threads: cpu_num_threads as usize,
            max_context_len: max_context_len as usize,
            filter_layers: filter_layers.expect("checked above"),
            num_wait_load_layers: num_wait_load_layers as usize,
            real_offload: f.real_offload.unwrap_or(false),
            budget: budget.expect("checked above"),
            selector: selector.expect("checked above"),
            window_size: window_size as usize,
            min_prompt_len: min_prompt_len as usize,
            min_selected_tokens: min_selected_tokens as usize,
            prefill: prefill.expect("checked above"),
            keep,
            record_recall: f.record_recall.map(std::path::PathBuf::from),
            max_host_bytes: f.max_host_bytes,
            selection_mass: f.selection_mass,
            selection_per_kv_head,
        })
    }
}

impl OmniKvConfig {
    /// Validate a JSON value, reporting every problem at once.
    ///
    /// # Errors
    /// Every type, range and consistency problem of the value (see
    /// [`OmniKvConfigFile::from_value`] and the `TryFrom` conversion).
    pub fn from_value(value: &Value) -> Result<Self, ConfigErrors> {
        let (file, mut errors) = OmniKvConfigFile::from_value_lenient(value);
        if !value.is_object() {
            return Err(ConfigErrors(errors));
        }
        match OmniKvConfig::try_from(file) {
            Ok(cfg) if errors.is_empty() => Ok(cfg),
            Ok(_) => Err(ConfigErrors(errors)),
            Err(more) => {
                errors.extend(more.0);
                Err(ConfigErrors(errors))
            }
        }
    }

    /// Parse and validate JSON text.
    ///
    /// # Errors
    /// If the text is not JSON, or as [`Self::from_value`].
    pub fn from_json_str(text: &str) -> Result<Self, ConfigErrors> {
        let value: Value = serde_json::from_str(text)
            .map_err(|err| ConfigErrors(vec![format!("not valid JSON: {err}")]))?;
        Self::from_value(&value)
    }

    /// Read, parse and validate a config file.
    ///
    /// # Errors
    /// If the file cannot be read, or as [`Self::from_json_str`]; the message
    /// names the path.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read OmniKV config `{}`: {e}", path.display()))?;
        Self::from_json_str(&text).map_err(|e| anyhow::anyhow!("`{}`: {e}", path.display()))
    }

    /// A configuration whose every decode step attends to the whole prompt
    /// (one filter layer at 0 keeping 100% of the prompt).
    ///
    /// # Panics
    /// Only if the built-in configuration stopped validating (a bug).
    pub fn full_budget() -> Self {
        OmniKvConfig::from_value(&serde_json::json!({
            "do_select_layers": "0",
            "num_of_selected_tokens": 1.0,
        }))
        .expect("built-in config is valid")
    }
}

/// Per-request override of the `omnikv` backend, the `kv_cache` field of a
/// chat or completion request: `{"enabled": false}` decodes this request with
/// full attention, `{"budget": 0.2}` (a fraction or a token count) changes its
/// budget, `{"stats": true}` returns the request's statistics in
/// `usage.kv_cache_stats`. Absent keys keep the server's configuration.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RequestOverride {
    /// `Some(false)`: full attention for this request.
    pub enabled: Option<bool>,
    /// This request's selection budget instead of `num_of_selected_tokens`.
    pub budget: Option<TokenBudget>,
    /// `true`: the response's `usage.kv_cache_stats` carries the request's
    /// statistics ([`crate::telemetry::SequenceStats`]).
    pub stats: bool,
}

impl RequestOverride {
    /// The accepted keys and their values, for error messages.
    pub const KEYS: &'static str =
        "\"enabled\" (true/false), \"budget\" (a token count >= 1 or a fraction in (0, 1]), \"stats\" (true/false)";

    /// Parse and check a request's `kv_cache` object, every problem at once.
    ///
    /// # Errors
    /// If `v` is not an object, has a key other than `enabled`, `budget` and
    /// `stats`, or a value of the wrong type or range.
    pub fn from_value(v: &Value) -> Result<Self, ConfigErrors> {
        let Some(map) = v.as_object() else {
            return Err(ConfigErrors(vec![format!(
                "`kv_cache` must be an object with {}, got {}",
                Self::KEYS,
                short(v)
            )]));
        };
        let mut e = Vec::new();
        let mut out = Self::default();
        for (key, value) in map {
            match key.as_str() {
                "enabled" => match value.as_bool() {
                    Some(b) => out.enabled = Some(b),
                    None => e.push(format!(
                        "`enabled` = {}: expected true or false",
                        short(value)
                    )),
                },
                "budget" => match TokenBudget::from_json(value) {
                    Some(b) => out.budget = Some(b),
                    None => e.push(format!(
                        "`budget` = {}: expected a token count >= 1 or a fraction in (0, 1]",
                        short(value)
                    )),
                },
                "stats" => match value.as_bool() {
                    Some(b) => out.stats = b,
                    None => e.push(format!(
                        "`stats` = {}: expected true or false",
                        short(value)
                    )),
                },
                other => e.push(format!("unknown key `{other}`; known keys: {}", Self::KEYS)),
            }
        }
        if e.is_empty() {
            Ok(out)
        } else {
            Err(ConfigErrors(e))
        }
    }
}
