//! The layering of the crates, read from their sources: no import cycle
//! between the modules of `omnikv-backend`, backends never import the model,
//! and `omnikv-kernels` depends on candle only (nothing of the backend, the
//! model or the host). Each check is shown to fail on a planted violation.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read source dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module a file belongs to at the granularity of the check: the
/// top-level module, and the file for the directory modules (`omnikv::store`).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("file under src");
    let parts: Vec<String> = rel
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    match parts.as_slice() {
        [one] if one == "lib" => "crate".into(),
        [one] => one.clone(),
        [dir, m] if m == "mod" => dir.clone(),
        [dir, m, ..] => format!("{dir}::{m}"),
        [] => unreachable!(),
    }
}

/// Code without comments (doc links are not imports).
fn code(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Paths this code names through `crate::a::b` or `super::b`, resolved to
/// the granularity of [`module_of`], given the file's own module.
fn imports(module: &str, text: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let resolve = |path: Vec<&str>| -> Option<String> {
        if path.len() >= 2 {
            let two = format!("{}::{}", path[0], path[1]);
            if modules.contains(&two) {
                return Some(two);
            }
        }
        path.first()
            .map(|s| s.to_string())
            .filter(|m| modules.contains(m))
    };
    let idents = |rest: &str| -> Vec<String> {
        rest.split("::")
            .map(|seg| {
                seg.chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect::<String>()
            })
            .take_while(|s| !s.is_empty())
            .collect()
    };
    for (at, _) in text.match_indices("crate::") {
        let path = idents(&text[at + "crate::".len()..]);
        if let Some(m) = resolve(path.iter().map(String::as_str).collect()) {
            out.insert(m);
        }
    }
    let parent = module.split("::").next().unwrap_or(module);
    for (at, _) in text.match_indices("super::") {
        if at > 0 && text[..at].ends_with("::") {
            continue;
        }
        let path = idents(&text[at + "super::".len()..]);
        let mut full = vec![parent];
        full.extend(path.iter().map(String::as_str));
        if let Some(m) = resolve(full) {
            out.insert(m);
        }
    }
    out.remove(module);
    out.remove("crate");
    out
}

/// File-level imports: each file's module (see [`module_of`]) and the
/// modules it names.
fn file_imports(src: &Path) -> Vec<(String, BTreeSet<String>)> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(src, f)).collect();
    files
        .iter()
        .map(|f| {
            let module = module_of(src, f);
            let text = code(&std::fs::read_to_string(f).expect("read source"));
            let found = imports(&module, &text, &modules);
            (module, found)
        })
        .collect()
}

fn top(m: &str) -> &str {
    m.split("::").next().unwrap_or(m)
}

/// Two views of the imports, each of which must be acyclic: between the
/// top-level modules (`attention`, `omnikv`, `model`, ...), and between the
/// files of one directory module (`omnikv::config`, `omnikv::selector`, ...).
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, found) in file_imports(src) {
        deps.entry(top(&module).to_string()).or_default();
        for m in &found {
            if top(m) != top(&module) {
                deps.entry(top(&module).to_string())
                    .or_default()
                    .insert(top(m).to_string());
            }
        }
        if module.contains("::") {
            let entry = deps.entry(module.clone()).or_default();
            for m in found {
                // Siblings only: a file naming its own directory module (the
                // re-exports of `mod.rs`) is not an edge between files.
                if m.contains("::") && top(&m) == top(&module) {
                    entry.insert(m);
                }
            }
        }
    }
    deps
}

/// Which modules import the model, at file level.
fn model_importers(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    file_imports(src)
        .into_iter()
        .filter(|(_, found)| found.iter().any(|m| top(m) == "model"))
        .collect()
}

/// A cycle in `deps`, if there is one, as the list of modules around it.
fn find_cycle(deps: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        m: &str,
        deps: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(m.to_string(), 1);
        stack.push(m.to_string());
        for d in deps.get(m).into_iter().flatten() {
            match state.get(d.as_str()).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|s| s == d).unwrap_or(0);
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(d.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(d, deps, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(m.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for m in deps.keys() {
        if state.get(m.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(m, deps, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

fn backend_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn backend_modules_have_no_import_cycle() {
    let deps = graph(&backend_src());
    assert!(deps.len() > 10, "too few modules found: {deps:?}");
    if let Some(cycle) = find_cycle(&deps) {
        panic!("import cycle between modules: {}", cycle.join(" -> "));
    }
}

#[test]
fn backends_do_not_import_the_model() {
    for (m, uses) in model_importers(&backend_src()) {
        assert!(
            top(&m) == "model" || m == "crate",
            "{m} imports the model: {uses:?}"
        );
    }
}

#[test]
fn the_checks_catch_a_planted_cycle() {
    let dir = std::env::temp_dir().join(format!("omnikv-layering-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("omnikv")).unwrap();
    std::fs::write(dir.join("lib.rs"), "pub mod omnikv; pub mod model;").unwrap();
    std::fs::write(
        dir.join("omnikv/mod.rs"),
        "pub mod config; pub mod plan; pub mod store;",
    )
    .unwrap();
    std::fs::write(
        dir.join("omnikv/config.rs"),
        "// crate::model is only named in a comment\nuse super::plan::LayerPlan;",
    )
    .unwrap();
    std::fs::write(
        dir.join("omnikv/plan.rs"),
        "use crate::omnikv::config::Config;",
    )
    .unwrap();
    std::fs::write(dir.join("omnikv/store.rs"), "use crate::model::X;").unwrap();
    std::fs::write(dir.join("model.rs"), "").unwrap();
    let deps = graph(&dir);
    let cycle = find_cycle(&deps).expect("the planted cycle is found");
    assert!(cycle.contains(&"omnikv::config".to_string()), "{cycle:?}");
    assert!(cycle.contains(&"omnikv::plan".to_string()), "{cycle:?}");
    let importers = model_importers(&dir);
    assert!(importers.contains_key("omnikv::store"), "{importers:?}");
    assert!(!importers.contains_key("omnikv::config"), "{importers:?}");
    // A cycle through a directory module's re-exports is one between
    // top-level modules.
    std::fs::write(dir.join("model.rs"), "use crate::omnikv::Plan;").unwrap();
    std::fs::write(dir.join("omnikv/plan.rs"), "").unwrap();
    assert!(find_cycle(&graph(&dir)).is_some(), "{:?}", graph(&dir));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `[dependencies]` of a manifest, by name.
fn dependencies(manifest: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            inside = line == "[dependencies]";
        } else if inside && !line.is_empty() && !line.starts_with('#') {
            if let Some((name, _)) = line.split_once('=') {
                out.push(name.trim().trim_end_matches(".workspace").to_string());
            }
        }
    }
    out
}

fn kernels_crate() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/omnikv-kernels")
}

#[test]
fn kernels_crate_depends_on_candle_only() {
    let manifest = std::fs::read_to_string(kernels_crate().join("Cargo.toml")).unwrap();
    let deps = dependencies(&manifest);
    assert_eq!(deps, ["candle-core", "half", "rayon"], "{manifest}");
    let mut files = Vec::new();
    rust_files(&kernels_crate().join("src"), &mut files);
    assert!(files.len() >= 4, "{files:?}");
    for f in files {
        let text = code(&std::fs::read_to_string(&f).unwrap());
        for name in [
            "omnikv_backend",
            "mistralrs",
            "selector",
            "OmniKvConfig",
            "LlamaOmniKv",
        ] {
            assert!(!text.contains(name), "{} names `{name}`", f.display());
        }
    }
    // The check itself sees a violation.
    assert_ne!(
        dependencies(
            "[dependencies]\ncandle-core.workspace = true\nomnikv-backend = { path = \"x\" }\n"
        ),
        ["candle-core", "half", "rayon"]
    );
}
