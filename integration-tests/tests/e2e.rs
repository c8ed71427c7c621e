//! End-to-end tests: the real binary, the real model, real HTTP.
//!
//! One test binary per crate: every file of `tests/` is a module here
//! (`autotests = false` in the manifest), so the workspace links a handful
//! of test executables against the host instead of one per file. Run one
//! file's tests with `cargo test --workspace --test e2e <file>::`.

mod baselines;
mod calibrate;
mod cli_errors;
mod context_length;
mod gguf_tokenizer;
mod gpu_bundle;
mod metrics;
mod openai_api;
mod patches;
mod plain_architecture;
mod reliability;
mod request_options;
mod same_answer;
mod selectors;
mod server_defaults;
mod short_prompts;
mod stock_parity;
mod tensor_parallel;
