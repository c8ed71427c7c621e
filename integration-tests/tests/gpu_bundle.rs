//! The GPU bundle's run script (`scripts/gpu-run.sh`, copied into the bundle
//! as `run.sh` by `scripts/gpu-bundle.sh`) on a machine without a GPU: it
//! must stop before running anything, say "no CUDA device" (or which
//! library is missing, or which compute capability to rebuild for), and exit
//! with its documented status, never with a loader error from a binary.
//!
//! The bundle's binaries need a CUDA build (minutes to build, a GPU to run);
//! here a stand-in ELF binary with the same kind of missing library takes
//! their place, and `nvidia-smi` is absent or a stand-in script.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use integration_tests::root;

/// A bundle folder holding the run script, a `BUILD` file for `cap` and,
/// when `missing_lib` is given, a binary linked against a library that is
/// then deleted (what `ldd` reports as "not found").
fn bundle(name: &str, cap: &str, missing_lib: Option<&str>) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("omnikv-gpu-bundle-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(root().join("scripts/gpu-run.sh"), dir.join("run.sh")).unwrap();
    std::fs::write(dir.join("BUILD"), format!("compute_cap={cap}\ncuda=13.0\n")).unwrap();
    if let Some(lib) = missing_lib {
        let c = dir.join("lib.c");
        std::fs::write(&c, "void cublasCreate_v2(void) {}\n").unwrap();
        let so = dir.join(format!("lib{lib}.so"));
        let ok = Command::new("cc")
            .args(["-shared", "-fPIC", "-o"])
            .arg(&so)
            .arg(&c)
            .arg(format!("-Wl,-soname,lib{lib}.so.13"))
            .status()
            .unwrap()
            .success();
        assert!(ok, "cc could not build the stand-in library");
        let main = dir.join("main.c");
        std::fs::write(
            &main,
            "void cublasCreate_v2(void);\nint main(void) { cublasCreate_v2(); return 0; }\n",
        )
        .unwrap();
        let ok = Command::new("cc")
            .arg("-o")
            .arg(dir.join("omnikv-kernels-cuda"))
            .arg(&main)
            .arg(format!("-L{}", dir.display()))
            .arg(format!("-l{lib}"))
            .status()
            .unwrap()
            .success();
        assert!(ok, "cc could not build the stand-in binary");
        std::fs::remove_file(&so).unwrap();
    }
    dir
}

/// A folder with a stand-in `nvidia-smi` that prints `stdout` and exits
/// with `code`.
fn fake_smi(dir: &Path, stdout: &str, code: i32) -> PathBuf {
    let bin = dir.join("fake-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let smi = bin.join("nvidia-smi");
    std::fs::write(
        &smi,
        format!("#!/bin/sh\nprintf '%s\\n' '{stdout}'\nexit {code}\n"),
    )
    .unwrap();
    std::fs::set_permissions(&smi, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

/// Run `run.sh OUT` with `PATH=extra:/usr/bin:/bin`.
fn run(dir: &Path, extra_path: Option<&Path>) -> (Output, String) {
    let path = match extra_path {
        Some(p) => format!("{}:/usr/bin:/bin", p.display()),
        None => "/usr/bin:/bin".to_string(),
    };
    let out = Command::new("bash")
        .arg(dir.join("run.sh"))
        .arg(dir.join("out"))
        .env("PATH", path)
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("GPU_CHECK_LIBS")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

fn ran_nothing(dir: &Path) {
    assert!(
        !dir.join("out/gpu-tests.log").exists() && !dir.join("out/synthetic-gpu.md").exists(),
        "the run script ran a check without a usable GPU"
    );
}

#[test]
fn without_a_driver_it_says_no_cuda_device() {
    let have_smi = Command::new("sh")
        .args(["-c", "PATH=/usr/bin:/bin command -v nvidia-smi"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if have_smi {
        eprintln!("skipped: this machine has nvidia-smi in /usr/bin:/bin");
        return;
    }
    let dir = bundle("nodriver", "90", Some("cublas"));
    let (out, text) = run(&dir, None);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(text.contains("no CUDA device"), "{text}");
    assert!(
        !text.contains("error while loading shared libraries"),
        "{text}"
    );
    let log = std::fs::read_to_string(dir.join("out/gpu-check.log")).unwrap();
    assert!(
        log.contains("no CUDA device"),
        "the log must say why: {log}"
    );
    ran_nothing(&dir);
}

#[test]
fn with_a_driver_but_no_gpu_it_says_no_cuda_device() {
    // What nvidia-smi prints and returns when the driver sees no GPU.
    let dir = bundle("nogpu", "90", Some("cublas"));
    let smi = fake_smi(&dir, "No devices were found", 6);
    let (out, text) = run(&dir, Some(&smi));
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(text.contains("no CUDA device"), "{text}");
    assert!(
        text.contains("No devices were found"),
        "the driver's words are passed on: {text}"
    );
    ran_nothing(&dir);
}

#[test]
fn missing_cuda_libraries_are_named_before_anything_runs() {
    let dir = bundle("nolibs", "90", Some("cublas"));
    let smi = fake_smi(&dir, "0, NVIDIA H200, 143771 MiB, 580.159.03, 9.0", 0);
    let (out, text) = run(&dir, Some(&smi));
    assert_eq!(out.status.code(), Some(4), "{text}");
    assert!(
        text.contains("CUDA libraries not found: libcublas.so.13"),
        "{text}"
    );
    assert!(
        text.contains("GPU_CHECK_LIBS"),
        "the message names the fix: {text}"
    );
    assert!(
        !text.contains("error while loading shared libraries"),
        "{text}"
    );
    ran_nothing(&dir);
}

#[test]
fn an_older_gpu_than_the_build_is_told_how_to_rebuild() {
    let dir = bundle("oldgpu", "90", None);
    let smi = fake_smi(
        &dir,
        "0, NVIDIA A100-SXM4-80GB, 81920 MiB, 580.159.03, 8.0",
        0,
    );
    let (out, text) = run(&dir, Some(&smi));
    assert_eq!(out.status.code(), Some(4), "{text}");
    assert!(
        text.contains("CUDA_COMPUTE_CAP=80 scripts/gpu-bundle.sh"),
        "{text}"
    );
    ran_nothing(&dir);
}

#[test]
fn usage_errors_exit_2() {
    let dir = bundle("usage", "90", None);
    let out = Command::new("bash")
        .arg(dir.join("run.sh"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage: run.sh OUT_DIR"));
}
