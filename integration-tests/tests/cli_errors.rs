//! Bad CLI input fails at start with a clear message, a non-zero exit code
//! and no panic.

use std::time::Duration;

use integration_tests::{model_args, run_cli, serial};

struct Case {
    name: &'static str,
    backend: Option<&'static str>,
    /// Contents of a config file passed with `--kv-cache-config`; `None` for
    /// no flag, `Some(None)` for a path that does not exist.
    config: Option<Option<&'static [u8]>>,
    extra: &'static [&'static str],
    expect: &'static [&'static str],
}

const CASES: &[Case] = &[
    Case {
        name: "unknown backend",
        backend: Some("nope"),
        config: None,
        extra: &[],
        expect: &["unknown KV-cache backend `nope`", "registered backends: default, h2o, omnikv, snapkv, streaming"],
    },
    Case {
        name: "omnikv without a config",
        backend: Some("omnikv"),
        config: None,
        extra: &[],
        expect: &["needs a configuration", "--kv-cache-config"],
    },
    Case {
        name: "missing config file",
        backend: Some("omnikv"),
        config: Some(None),
        extra: &[],
        expect: &["cannot read KV-cache config file", "does-not-exist.json"],
    },
    Case {
        name: "malformed JSON",
        backend: Some("omnikv"),
        config: Some(Some(b"{\"do_select_layers\": \"2,8,18\",")),
        extra: &[],
        expect: &["is not valid JSON"],
    },
    Case {
        name: "non-UTF-8 config",
        backend: Some("omnikv"),
        config: Some(Some(b"{\"do_select_layers\": \"\xff\xfe\"}")),
        extra: &[],
        expect: &["cannot read KV-cache config file"],
    },
    Case {
        name: "invalid values, all reported at once",
        backend: Some("omnikv"),
        config: Some(Some(
            br#"{"do_select_layers": "8,2", "num_of_selected_tokens": 0, "selector_cls": "max", "window_size": "16", "bogus": 1}"#,
        )),
        extra: &[],
        expect: &[
            "5 problems in the OmniKV config",
            "`do_select_layers` = \"8,2\": layers must be strictly ascending",
            "`num_of_selected_tokens` = 0",
            "`selector_cls` = \"max\": expected one of \"last\"",
            "`window_size` = \"16\": expected a non-negative integer",
            "unknown key `bogus`",
        ],
    },
    Case {
        name: "default backend given a config",
        backend: Some("default"),
        config: Some(Some(br#"{"do_select_layers": "2,8,18"}"#)),
        extra: &[],
        expect: &["takes no configuration"],
    },
    Case {
        name: "omnikv with PagedAttention forced on",
        backend: Some("omnikv"),
        config: Some(Some(br#"{"do_select_layers": "2,8,18"}"#)),
        extra: &["--paged-attn", "on"],
        expect: &["does not work with PagedAttention"],
    },
    Case {
        name: "filter layer beyond the model",
        backend: Some("omnikv"),
        config: Some(Some(br#"{"do_select_layers": "2,8,40"}"#)),
        extra: &[],
        expect: &["names layer 40, but the model has 30 layers"],
    },
];

#[test]
fn bad_cli_input_fails_cleanly() {
    let _guard = serial();
    let dir = std::env::temp_dir().join(format!("omnikv-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut failures = Vec::new();
    for (i, case) in CASES.iter().enumerate() {
        let mut args: Vec<String> = vec![
            "serve".into(),
            "-p".into(),
            "0".into(),
            "--host".into(),
            "127.0.0.1".into(),
        ];
        if let Some(b) = case.backend {
            args.extend(["--kv-cache".into(), b.into()]);
        }
        match case.config {
            None => {}
            Some(None) => args.extend([
                "--kv-cache-config".into(),
                dir.join("does-not-exist.json").display().to_string(),
            ]),
            Some(Some(bytes)) => {
                let path = dir.join(format!("case-{i}.json"));
                std::fs::write(&path, bytes).unwrap();
                args.extend(["--kv-cache-config".into(), path.display().to_string()]);
            }
        }
        args.extend(case.extra.iter().map(|s| s.to_string()));
        args.extend(model_args());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run_cli(&argv, Duration::from_secs(300)).expect("run mistralrs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let all = format!("{stdout}\n{stderr}");
        let mut problems = Vec::new();
        if out.status.success() {
            problems.push("exited successfully".to_string());
        }
        if all.contains("panicked") {
            problems.push("panicked".to_string());
        }
        for want in case.expect {
            if !all.contains(want) {
                problems.push(format!("missing {want:?}"));
            }
        }
        if !problems.is_empty() {
            let tail: Vec<&str> = all.lines().rev().take(15).collect();
            failures.push(format!(
                "{}: {}\n    output tail:\n{}",
                case.name,
                problems.join("; "),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// `omnikv-eval` refuses a bad variant or `--reference` before it starts a
/// server or runs a case, naming what it accepts.
#[test]
fn eval_tool_refuses_bad_variants_and_references_at_start() {
    use integration_tests::tool_bin;
    let cases: [(&[&str], &[&str]); 3] = [
        (
            &["--variants", "full,omnikv@0.1", "--reference", "nope"],
            &[
                "--reference `nope` is not one of the variants",
                "\"full\", \"omnikv@0.1\"",
            ],
        ),
        (
            &["--variants", "fullx"],
            &["variant `fullx`", "expected `default`, `full` or"],
        ),
        (
            &[
                "--variants",
                "default,full",
                "--reference",
                "default,omnikv@0.1",
            ],
            &["--reference `omnikv@0.1` is not one of the variants"],
        ),
    ];
    for (args, expect) in cases {
        let start = std::time::Instant::now();
        let out = std::process::Command::new(tool_bin("omnikv-eval"))
            .args(args)
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(!text.contains("panicked"), "{args:?}: {text}");
        for want in expect {
            assert!(text.contains(want), "{args:?}: no {want:?} in\n{text}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{args:?} ran cases before refusing"
        );
    }
}
