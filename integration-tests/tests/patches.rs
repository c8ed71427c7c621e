//! The patch pipeline: patches apply to pristine mistral.rs (the KV-cache
//! series `patches/<crate>/`, then the fixes series `patches/fixes/<crate>/`),
//! preparing twice is harmless, the prepared copy is exactly pristine +
//! patches, no upstream source is tracked, and the pinned host version matches
//! the patch set.

use std::path::Path;
use std::process::Command;

use integration_tests::root;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run command");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn copy_dir(src: &Path, dst: &Path) {
    run(Command::new("cp").arg("-a").arg(src).arg(dst));
}

#[test]
fn prepare_is_idempotent_and_reproduces_host() {
    let tmp = std::env::temp_dir().join(format!("omnikv-prepare-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    for d in ["scripts", "patches", "host-pin"] {
        copy_dir(&root().join(d), &tmp.join(d));
    }
    let prepare = || run(Command::new("bash").arg(tmp.join("scripts/prepare-host.sh")));
    let first = prepare();
    // Each crate's patch counts, as committed.
    let count = |dir: &str| {
        std::fs::read_dir(root().join(dir))
            .map(|d| {
                d.filter(|e| {
                    e.as_ref()
                        .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "patch"))
                })
                .count()
            })
            .unwrap_or(0)
    };
    let series = |c: &str| {
        (
            count(&format!("patches/{c}")),
            count(&format!("patches/fixes/{c}")),
        )
    };
    let (core_kv, core_fixes) = series("mistralrs-core");
    let (server_kv, server_fixes) = series("mistralrs-server-core");
    assert!(core_fixes > 0, "the test edits a mistralrs-core fix below");
    for line in [
        format!(
            "mistralrs-core 0.8.1 prepared with {} patches ({core_kv} KV-cache, {core_fixes} fixes)",
            core_kv + core_fixes
        ),
        format!(
            "mistralrs-server-core 0.8.1 prepared with {} patches ({server_kv} KV-cache, {server_fixes} fixes)",
            server_kv + server_fixes
        ),
    ] {
        assert!(first.contains(&line), "{line}:\n{first}");
    }
    let second = prepare();
    assert!(
        second.contains("mistralrs-core up to date") && !second.contains("prepared with"),
        "{second}"
    );
    for c in [
        "mistralrs-core",
        "mistralrs-cli",
        "mistralrs-server-core",
        "mistralrs",
        "mistralrs-quant",
    ] {
        let out = Command::new("diff")
            .args(["-r", "-q", "-x", ".prepared", "-x", "target"])
            .arg(tmp.join("host").join(c))
            .arg(root().join("host").join(c))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "host/{c} differs from pristine + patches; regenerate the patches (scripts/regen-patches.sh {c}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // A patch set that changes without changing the prepared sources (an
    // edited description, a split patch) keeps them, so they stay compiled.
    let fixes = tmp.join("patches/fixes/mistralrs-core");
    let fix = std::fs::read_dir(&fixes)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "patch"))
        .expect("a mistralrs-core fix");
    let text = std::fs::read_to_string(&fix).unwrap();
    std::fs::write(&fix, format!("An edited description.\n{text}")).unwrap();
    let third = prepare();
    assert!(
        third.contains(&format!(
            "mistralrs-core 0.8.1 already equals pristine + its {} patches",
            core_kv + core_fixes
        )) && !third.contains("prepared with"),
        "{third}"
    );
    // A patch that no longer applies stops the script with its name, in
    // either series.
    let broken =
        "--- a/src/lib.rs\n+++ b/src/lib.rs\n@@ -1,1 +1,1 @@\n-this line is not in lib.rs\n+x\n";
    let mut previous: Option<std::path::PathBuf> = None;
    for name in [
        "patches/mistralrs-core/0099-broken.patch",
        "patches/fixes/mistralrs-server-core/0099-broken.patch",
    ] {
        if let Some(p) = previous.take() {
            std::fs::remove_file(p).unwrap();
        }
        let path = tmp.join(name);
        std::fs::write(&path, broken).unwrap();
        previous = Some(path);
        let out = Command::new("bash")
            .arg(tmp.join("scripts/prepare-host.sh"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(&format!("{name} does not apply")),
            "{err}"
        );
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn no_upstream_source_is_tracked() {
    let files = run(Command::new("git").arg("-C").arg(root()).args(["ls-files"]));
    for f in files.lines() {
        assert!(
            !f.starts_with("host/"),
            "prepared host source is tracked: {f}"
        );
        let upstream_like = f.ends_with("kv_cache/mod.rs")
            || f.ends_with("pipeline/gguf.rs")
            || f.ends_with("models/quantized_llama.rs");
        assert!(!upstream_like, "looks like an upstream source file: {f}");
    }
}

#[test]
fn pinned_host_matches_patch_set() {
    let version = std::fs::read_to_string(root().join("patches/HOST_VERSION")).unwrap();
    let version = version.trim();
    let lock = std::fs::read_to_string(root().join("Cargo.lock")).unwrap();
    for krate in [
        "mistralrs-core",
        "mistralrs-cli",
        "mistralrs-server-core",
        "mistralrs",
        "mistralrs-quant",
    ] {
        let entry = format!("name = \"{krate}\"\nversion = \"");
        let at = lock
            .find(&entry)
            .unwrap_or_else(|| panic!("{krate} not in Cargo.lock"));
        let v = &lock[at + entry.len()..];
        let v = &v[..v.find('"').unwrap()];
        assert_eq!(
            v, version,
            "Cargo.lock pins {krate} {v}, but the patches target {version} (patches/HOST_VERSION); regenerate the patches for the new host version before changing the pin"
        );
    }
    let pin = std::fs::read_to_string(root().join("host-pin/Cargo.toml")).unwrap();
    assert!(
        pin.contains(&format!("mistralrs-core = \"={version}\"")),
        "host-pin/Cargo.toml must pin ={version}"
    );
}
