//! The GGUF tokenizer of `omnikv_eval::bench_format` against the real
//! server's token counts, on short texts and on committed benchmark sample
//! files (the tokenizer's own tests are in
//! `crates/omnikv-eval/tests/bench_format.rs`).

use std::path::PathBuf;

use integration_tests::{serial, Server};
use omnikv_eval::bench_format::{count_tokens, gguf_tokenizer, load_jsonl, Format, Sample};

fn model_path() -> PathBuf {
    integration_tests::model_dir().join(integration_tests::MODEL_FILE)
}

fn load(format: Format, file: &str) -> Vec<Sample> {
    let dir = match format {
        Format::LongBench => "longbench",
        Format::InfiniteBench => "infinitebench",
    };
    load_jsonl(&omnikv_eval::samples_dir().join(dir).join(file), format).unwrap()
}

#[test]
fn gguf_tokenizer_counts_like_the_server() {
    let tok = gguf_tokenizer(&model_path()).unwrap();
    // Round trip and the chat control tokens as single special tokens.
    let text = "The pass key is 48213. Remember it!\n\n  Indented 中文 text (café) don't";
    let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
    let chat = tok.encode("<|im_start|>user\nhi<|im_end|>", false).unwrap();
    assert_eq!(chat.get_tokens()[0], "<|im_start|>");
    assert_eq!(chat.get_ids().len(), 5); // <|im_start|> user \n hi <|im_end|>
    assert_eq!(tok.decode(chat.get_ids(), true).unwrap(), "user\nhi");

    let samples: Vec<String> = vec![
        "Hello world".into(),
        text.into(),
        load(Format::LongBench, "hotpotqa.jsonl")[0].prompt.clone(),
        load(Format::LongBench, "multifieldqa_zh.jsonl")[0]
            .prompt
            .clone(),
        load(Format::LongBench, "lcc.jsonl")[0].prompt.clone(),
        load(Format::InfiniteBench, "kv_retrieval.jsonl")[0]
            .prompt
            .clone(),
    ];
    let _guard = serial();
    let server = Server::start("default", &[]).unwrap();
    for prompt in &samples {
        let body = serde_json::json!({
            "model": "default", "prompt": prompt, "max_tokens": 1, "temperature": 0.0,
        });
        let (status, reply) = server.post("/v1/completions", &body).unwrap();
        assert_eq!(status, 200, "{reply}");
        let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
        let served = v["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
        // SmolLM2's GGUF has add_bos_token = false: the server adds nothing.
        assert_eq!(count_tokens(&tok, prompt).unwrap(), served, "{prompt:?}");
    }
}
