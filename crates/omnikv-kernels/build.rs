//! With the `cuda` feature, compiles `kernels/omnikv_decode.cu` to
//! PTX (loaded at run time by `cuda`). Without it, does nothing.
//!
//! * nvcc: `$NVCC`, else `$CUDA_HOME/bin/nvcc`, else `nvcc` on `PATH`;
//! * target: `$CUDA_COMPUTE_CAP` (e.g. `90`), else what `nvidia-smi`
//!   reports, else 80. PTX for compute_XX runs on that and newer GPUs;
//! * extra nvcc flags: `$NVCC_APPEND_FLAGS` (read by nvcc itself).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels/omnikv_decode.cu");
    for var in ["NVCC", "CUDA_HOME", "CUDA_COMPUTE_CAP", "NVCC_APPEND_FLAGS"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let source = manifest.join("kernels/omnikv_decode.cu");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("omnikv_decode.ptx");
    let nvcc = std::env::var("NVCC")
        .ok()
        .or_else(|| {
            let home = std::env::var("CUDA_HOME").ok()?;
            let p = PathBuf::from(home).join("bin/nvcc");
            p.exists().then(|| p.display().to_string())
        })
        .unwrap_or_else(|| "nvcc".to_string());
    let cap = std::env::var("CUDA_COMPUTE_CAP")
        .ok()
        .or_else(detect_compute_cap)
        .unwrap_or_else(|| "80".to_string());
    let mut cmd = Command::new(&nvcc);
    cmd.args(["--ptx", "-std=c++17", "-O3"])
        .arg(format!("-arch=compute_{cap}"))
        .arg(&source)
        .arg("-o")
        .arg(&out);
    if let Ok(home) = std::env::var("CUDA_HOME") {
        cmd.arg(format!("-I{home}/include"));
    }
    let status = cmd.status().unwrap_or_else(|e| {
        panic!(
            "omnikv-kernels: the `cuda` feature needs nvcc to compile {}; running `{nvcc}` failed: {e}. \
             Install the CUDA toolkit, or set NVCC / CUDA_HOME (scripts/check-cuda-kernels.sh installs one from PyPI).",
            source.display()
        )
    });
    if !status.success() {
        panic!(
            "omnikv-kernels: nvcc failed on {} ({status})",
            source.display()
        );
    }
}

fn detect_compute_cap() -> Option<String> {
    let out = Command::new("nvidia-smi")
        .args(["--query-gpu=compute_cap", "--format=csv,noheader"])
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let cap = text.lines().next()?.trim().replace('.', "");
    (!cap.is_empty()).then_some(cap)
}
