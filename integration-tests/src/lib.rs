//! Helpers for the end-to-end tests: start the real patched `mistralrs`
//! server on the real model, talk to it over real HTTP on the loopback
//! interface, and run the CLI and the `omnikv-*` tools to check their
//! errors and output.
//!
//! The server launcher and the HTTP client are `omnikv_eval::server`'s
//! (re-exported here); this crate adds what only the tests need.
//!
//! The tests expect `scripts/prepare-host.sh`, `scripts/fetch-model.sh` and
//! `cargo build --workspace` to have run (`make test` does all three).

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::Value;

pub use omnikv_eval::{
    http, mistralrs_bin, model_args, model_dir, root, Completion, EvictRelease, Server,
    StoreRelease, MODEL_FILE,
};

/// The machine has two cores; servers in parallel tests would only slow each
/// other down and distort timeouts, so tests that start one hold this lock.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A binary of this workspace's `omnikv-tools` package (`omnikv-eval`,
/// `omnikv-calibrate`, `omnikv-soak`, ...) in its target directory. Tools
/// are a package of their own, so `cargo test` does not build them for
/// these tests: `cargo build --workspace` (or `make test`) does.
pub fn tool_bin(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    let bin = target.join("debug").join(name);
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace` (or `make test`) first",
        bin.display()
    );
    bin
}

/// Server arguments that serve the tiny random Llama-3.1 checkpoint
/// (safetensors, f32; context 256, word-level tokenizer `t3` .. `t255`).
pub fn tiny_model_args() -> Vec<String> {
    let dir = root().join("omnikv-backend/tests/fixtures/tiny-llama31");
    vec![
        "--dtype".into(),
        "f32".into(),
        "-m".into(),
        dir.display().to_string(),
    ]
}

/// Prompts for the tiny checkpoint ([`tiny_model_args`]), one of each
/// length in words, deterministic: `t3` .. `t252` in a fixed stride.
pub fn tiny_prompts(lengths: &[usize]) -> Vec<String> {
    lengths
        .iter()
        .map(|&n| {
            (0..n)
                .map(|i| format!("t{}", (i * 37 + n) % 250 + 3))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// Run the CLI to completion with a time limit.
pub fn run_cli(args: &[&str], timeout: Duration) -> Result<Output> {
    let mut child = Command::new(mistralrs_bin())
        .args(args)
        .current_dir(root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + timeout;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!(
                "`mistralrs {}` did not exit within {timeout:?}",
                args.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(child.wait_with_output()?)
}

/// The stock host's reference outputs (a copy of the shared fixture
/// `stock-mistralrs-0.8.1-smollm2.json`: unpatched mistral.rs 0.8.1, greedy).
pub fn stock_fixture() -> Result<Value> {
    let path = root().join("integration-tests/fixtures/stock-mistralrs-0.8.1-smollm2.json");
    Ok(serde_json::from_str(&std::fs::read_to_string(&path)?)?)
}
