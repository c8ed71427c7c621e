//! `omnikv-calibrate` end to end on a small input: the tiny safetensors
//! Llama-3.1 served by the real server, three short calibration prompts and
//! two held-out ones. Checks the files it writes: a config that loads, the
//! recall matrix (one row per layer, values in [0, 1], self-recall of a
//! budget covering everything = 1), the SVG heatmap and the evidence table.

use std::process::Command;

use integration_tests::{root, serial, tool_bin};
use omnikv_backend::omnikv::recall::RecallStats;
use omnikv_backend::OmniKvConfig;

/// An empty scratch directory for one test.
fn fresh_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn calibration_writes_config_recall_and_heatmap() {
    let _guard = serial();
    let dir = fresh_dir("omnikv-calib-test");
    let prompts = dir.join("prompts.json");
    let heldout = dir.join("heldout.json");
    let base = dir.join("base.json");
    std::fs::write(
        &prompts,
        r#"["t5 t9 t33 t100 t7 t250 t18 t40 t41 t42 t43 t44", "t200 t201 t3 t4 t5 t6 t7 t8 t9 t10", "t1 t2 t3 t4 t5 t6 t7 t8 t9 t10 t11 t12 t13"]"#,
    )
    .unwrap();
    std::fs::write(
        &heldout,
        r#"["t9 t8 t7 t6 t5 t4 t3 t2 t1", "t60 t61 t62 t63 t64 t65"]"#,
    )
    .unwrap();
    std::fs::write(
        &base,
        r#"{"do_select_layers": "1", "selector_cls": "last"}"#,
    )
    .unwrap();
    let out = dir.join("tiny.json");
    let run = Command::new(tool_bin("omnikv-calibrate"))
        .args(["--plain-model"])
        .arg(root().join("omnikv-backend/tests/fixtures/tiny-llama31"))
        .args([
            "--filters",
            "1",
            "--wait-load",
            "0",
            "--first",
            "0,1",
            "--budget",
            "1.0",
        ])
        .args(["--max-tokens", "6", "--candidates", "1"])
        .arg("--prompts")
        .arg(&prompts)
        .arg("--heldout")
        .arg(&heldout)
        .arg("--base")
        .arg(&base)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run omnikv-calibrate");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(run.status.success(), "omnikv-calibrate failed:\n{log}");

    let cfg = OmniKvConfig::from_file(&out).expect("the written config loads");
    assert_eq!(cfg.num_wait_load_layers, 0);
    assert_eq!(cfg.filter_layers.len(), 1);

    let stats: RecallStats =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tiny-recall.json")).unwrap())
            .unwrap();
    assert_eq!(stats.layers, 2);
    assert!(stats.steps >= 3, "{} decode steps recorded", stats.steps);
    assert_eq!(stats.recall.len(), 2);
    for row in &stats.recall {
        assert_eq!(row.len(), 2);
        for v in row {
            assert!((0.0..=1.0 + 1e-6).contains(v), "recall {v}");
        }
    }
    // Budget 1.0 keeps every prompt position: every layer recalls all mass.
    for (a, row) in stats.recall.iter().enumerate() {
        for (b, v) in row.iter().enumerate() {
            assert!((v - 1.0).abs() < 1e-4, "S({a},{b}) = {v} at a full budget");
        }
    }
    let svg = std::fs::read_to_string(dir.join("tiny-recall.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("S(1,0)"), "{svg}");
    let md = std::fs::read_to_string(dir.join("tiny-calibration.md")).unwrap();
    assert!(
        md.contains("| rank | filter layers |") && md.contains("Chosen:"),
        "{md}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn calibration_ranks_candidates_by_teacher_forced_kl_on_the_gguf() {
    // The real SmolLM2 GGUF, short inputs: recall from three short prompts,
    // the candidates ranked by KL on one held-out code document of 300
    // tokens, the best one also served for greedy agreement.
    let _guard = serial();
    let dir = fresh_dir("omnikv-calib-kl");
    let prompts = dir.join("prompts.json");
    std::fs::write(
        &prompts,
        r#"["Summarise the plot of Hamlet in three sentences, naming every main character and what happens to each of them by the end of the play.", "List the planets of the solar system in order from the Sun, with one fact about each planet.", "Explain how a hash map works, including collisions, resizing and the cost of lookups."]"#,
    )
    .unwrap();
    let heldout = dir.join("heldout.json");
    std::fs::write(
        &heldout,
        r#"["Name three rivers in Europe and the seas they flow into."]"#,
    )
    .unwrap();
    let out = dir.join("smol.json");
    let run = Command::new(tool_bin("omnikv-calibrate"))
        .args([
            "--filters",
            "1,2",
            "--wait-load",
            "0",
            "--first",
            "2,3",
            "--budget",
            "0.1",
            "--candidates",
            "2,8",
            "--max-tokens",
            "8",
            "--heldout-docs",
            "1",
            "--tf-length",
            "300",
            "--tf-steps",
            "4",
            "--doc-kinds",
            "code",
            "--greedy-top",
            "1",
        ])
        .arg("--prompts")
        .arg(&prompts)
        .arg("--heldout")
        .arg(&heldout)
        .arg("--base")
        .arg(root().join("configs/smollm2-135m.json"))
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run omnikv-calibrate");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(run.status.success(), "omnikv-calibrate failed:\n{log}");
    let md = std::fs::read_to_string(dir.join("smol-calibration.md")).unwrap();
    assert!(md.contains("ranked by mean teacher-forced KL"), "{md}");
    // Table rows: rank 1 has a KL and greedy figures; ranks are in KL order.
    let rows: Vec<Vec<String>> = md
        .lines()
        .filter(|l| {
            l.starts_with("| ")
                && l.split('|')
                    .nth(1)
                    .is_some_and(|c| c.trim().parse::<usize>().is_ok())
        })
        .map(|l| l.split('|').map(|c| c.trim().to_string()).collect())
        .collect();
    assert!(rows.len() >= 2, "{md}");
    let kl = |r: &Vec<String>| -> f64 { r[5].split(' ').next().unwrap().parse().unwrap() };
    assert!(rows.windows(2).all(|w| kl(&w[0]) <= kl(&w[1])), "{md}");
    assert!(
        rows[0][9].ends_with("/1") && rows[1][9].is_empty(),
        "greedy for the best only:\n{md}"
    );
    let cfg = OmniKvConfig::from_file(&out).expect("the written config loads");
    assert_eq!(format!("{:?}", cfg.filter_layers), rows[0][2], "{md}");
    let _ = std::fs::remove_dir_all(&dir);
}
