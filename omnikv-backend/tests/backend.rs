//! The backend's integration tests: kernels' ops, selection, offload, the baselines and the model on the tiny fixtures.
//!
//! One test binary per crate: every file of `tests/` is a module here
//! (`autotests = false` in the manifest), so the workspace links a handful
//! of test executables against the host instead of one per file. Run one
//! file's tests with `cargo test --workspace --test backend <file>::`.

mod attention;
mod common;
mod config;
mod determinism;
mod evict;
mod layering;
mod model_logits;
mod offload;
mod ops;
mod plan;
mod recall;
mod registry;
mod selection;
mod tensor_parallel;
