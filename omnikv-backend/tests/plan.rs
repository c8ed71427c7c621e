//! Layer plans from `do_select_layers` and `num_wait_load_layers`.

use omnikv_backend::omnikv::config::OmniKvConfig;
use omnikv_backend::omnikv::plan::{LayerPlan, LayerRole};
use serde_json::json;

fn plan(layers: &str, w: u64, n: usize) -> anyhow::Result<LayerPlan> {
    let cfg =
        OmniKvConfig::from_value(&json!({"do_select_layers": layers, "num_wait_load_layers": w}))
            .unwrap();
    LayerPlan::new(&cfg, n)
}

fn describe(p: &LayerPlan) -> String {
    p.roles
        .iter()
        .map(|r| match r {
            LayerRole::PreFilterDense => "D".to_string(),
            LayerRole::Filter => "F".to_string(),
            LayerRole::WaitLoad { filter } => format!("W{filter}"),
            LayerRole::Sparse { filter } => format!("S{filter}"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

struct Case {
    layers: &'static str,
    w: u64,
    n: usize,
    want: &'static str,
}

const CASES: &[Case] = &[
    // The spec's example: dense 0,1,2,3,8,9,18,19; sparse 4-7, 10-17, 20-31.
    Case {
        layers: "2,8,18",
        w: 1,
        n: 32,
        want: "D D F W2 S2 S2 S2 S2 F W8 S8 S8 S8 S8 S8 S8 S8 S8 F W18 S18 S18 S18 S18 S18 S18 S18 S18 S18 S18 S18 S18",
    },
    // Adjacent filter layers: the first serves nothing.
    Case { layers: "2,3", w: 1, n: 8, want: "D D F F W3 S3 S3 S3" },
    // W reaching the next filter layer leaves no sparse layer in between.
    Case { layers: "1,4", w: 3, n: 8, want: "D F W1 W1 F W4 W4 W4" },
    // Filter layer 0, no wait-load layers.
    Case { layers: "0", w: 0, n: 4, want: "F S0 S0 S0" },
    // Last layer as filter layer.
    Case { layers: "3", w: 1, n: 4, want: "D D D F" },
];

#[test]
fn plans_follow_the_spec() {
    for c in CASES {
        let p = plan(c.layers, c.w, c.n).unwrap();
        assert_eq!(
            describe(&p),
            c.want,
            "layers {} W={} L={}",
            c.layers,
            c.w,
            c.n
        );
    }
    assert_eq!(plan("2,8,18", 1, 32).unwrap().dense_layers(), 8);
}

#[test]
fn layers_beyond_the_model_are_rejected() {
    let e = plan("2,8,30", 1, 30).unwrap_err().to_string();
    assert!(
        e.contains("names layer 30, but the model has 30 layers (0..=29)"),
        "{e}"
    );
}
