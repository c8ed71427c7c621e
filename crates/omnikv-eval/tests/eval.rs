//! The evaluation library's tests: benchmark formats, cases, the teacher-forced instrument.
//!
//! One test binary per crate: every file of `tests/` is a module here
//! (`autotests = false` in the manifest), so the workspace links a handful
//! of test executables against the host instead of one per file. Run one
//! file's tests with `cargo test --workspace --test eval <file>::`.

mod bench_format;
mod eval_cases;
mod teacher_forced;
