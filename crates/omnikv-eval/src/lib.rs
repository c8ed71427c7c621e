//! Evaluation of the KV-cache backends, mostly through the real `mistralrs` server:
//! the library behind the `omnikv-*` tools (`tools/`) and the end-to-end
//! tests (`integration-tests/`).
//!
//! - [`server`]: start the patched `mistralrs` binary on the real model (or
//!   attach to one) and talk to it over loopback HTTP;
//! - [`eval`]: the fidelity and A/B evaluation (needle-in-a-haystack,
//!   two-stage retrieval, two needles, benchmark files), deterministic
//!   cases, scoring, the answer cache and variants;
//! - [`bench_format`]: LongBench / InfiniteBench data files (loading,
//!   prompt templates, middle truncation, the GGUF tokenizer);
//! - [`metrics`]: the benchmarks' published scoring functions;
//! - [`plot`]: small SVG charts for the reports;
//! - [`teacher_forced`]: in process, no server: the teacher-forced
//!   divergence of each backend from full attention on the real model.
//!
//! The committed benchmark sample files are in `samples/` next to this
//! crate's manifest ([`samples_dir`]).

pub mod bench_format;
pub mod eval;
pub mod metrics;
pub mod plot;
pub mod server;
pub mod teacher_forced;

pub use server::{
    http, mistralrs_bin, model_args, model_dir, root, Completion, EvictRelease, Server,
    StoreRelease, MODEL_FILE,
};

/// The committed LongBench / InfiniteBench sample files
/// (`crates/omnikv-eval/samples/`: `longbench/`, `infinitebench/`).
pub fn samples_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("samples")
}
