//! The architecture registry's plain (safetensors) path through the real
//! server: a tiny random Llama-3.1 checkpoint (llama3 rope scaling) is served
//! by the stock Llama model under `--kv-cache default` and by `llama_omnikv`
//! under `--kv-cache omnikv`, and both give the same greedy tokens.

use integration_tests::{serial, tiny_model_args, Server};

#[test]
fn safetensors_model_loads_as_llama_omnikv() {
    let _guard = serial();
    let model = tiny_model_args();
    let config = std::env::temp_dir().join(format!("omnikv-tiny-{}.json", std::process::id()));
    std::fs::write(
        &config,
        r#"{"do_select_layers": "1", "num_of_selected_tokens": 1.0}"#,
    )
    .unwrap();
    let prompts = ["t5 t9 t33 t100 t7 t250 t18", "t40 t41 t42 t43", "t200"];
    let mut outputs = Vec::new();
    for (backend, extra) in [
        ("default", vec![]),
        (
            "omnikv",
            vec!["--kv-cache-config", config.to_str().unwrap()],
        ),
    ] {
        let server = Server::start_model(backend, &extra, &model).expect("server starts");
        let texts: Vec<String> = prompts
            .iter()
            .map(|p| {
                let c = server
                    .chat(p, 12)
                    .unwrap_or_else(|e| panic!("{backend}: {e}\n{}", server.log_tail()));
                assert!(c.completion_tokens > 0, "{backend}: no tokens for {p:?}");
                c.text
            })
            .collect();
        if backend == "omnikv" {
            assert!(
                server.log_contains("as `llama_omnikv`"),
                "the omnikv server did not load llama_omnikv:\n{}",
                server.log_tail()
            );
        }
        outputs.push(texts);
    }
    let _ = std::fs::remove_file(&config);
    assert_eq!(
        outputs[0], outputs[1],
        "stock Llama (default) vs llama_omnikv (omnikv) greedy outputs"
    );
}
