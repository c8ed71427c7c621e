//! Registration with the host: backend and architecture registries.

use mistralrs_core::kv_backend::{
    active_kv_cache_backend, architecture, registered_architectures, registered_kv_cache_backends,
    select_kv_cache_backend,
};

#[test]
fn omnikv_registers_with_the_host() {
    omnikv_backend::register();
    omnikv_backend::register(); // idempotent
    assert_eq!(
        registered_kv_cache_backends(),
        ["default", "h2o", "omnikv", "snapkv", "streaming"].map(String::from)
    );
    assert_eq!(registered_architectures(), vec!["llama_omnikv".to_string()]);
    let arch = architecture("llama_omnikv").unwrap();
    assert_eq!(arch.gguf_architectures(), &["llama"]);

    // The default is the stock backend until something else is selected.
    assert_eq!(active_kv_cache_backend().name(), "default");
    assert!(active_kv_cache_backend().supports_paged_attention());

    let e = select_kv_cache_backend("nope", None)
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "unknown KV-cache backend `nope`; registered backends: default, h2o, omnikv, snapkv, streaming"
    );
    let e = select_kv_cache_backend("omnikv", None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs a configuration"), "{e}");
    let bad = serde_json::json!({"do_select_layers": "x"});
    let e = format!(
        "{:#}",
        select_kv_cache_backend("omnikv", Some(&bad)).unwrap_err()
    );
    assert!(
        e.contains("invalid configuration for KV-cache backend `omnikv`")
            && e.contains("`x` is not a layer index"),
        "{e}"
    );
    // A failed selection leaves the active backend alone.
    assert_eq!(active_kv_cache_backend().name(), "default");

    let example: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../configs/example.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let b = select_kv_cache_backend("omnikv", Some(&example)).unwrap();
    assert_eq!(b.name(), "omnikv");
    assert_eq!(b.model_architecture(), Some("llama_omnikv"));
    assert!(!b.supports_paged_attention());
    assert_eq!(active_kv_cache_backend().name(), "omnikv");
    let e = select_kv_cache_backend("default", Some(&example))
        .unwrap_err()
        .to_string();
    assert!(e.contains("takes no configuration"), "{e}");
    select_kv_cache_backend("default", None).unwrap();
    assert_eq!(active_kv_cache_backend().name(), "default");

    // The baselines run without a config (defaults) and refuse bad ones.
    for name in ["h2o", "streaming", "snapkv"] {
        let b = select_kv_cache_backend(name, None).unwrap();
        assert_eq!(b.name(), name);
        assert_eq!(b.model_architecture(), Some("llama_omnikv"));
        assert!(!b.supports_prefix_cache());
    }
    let e = format!(
        "{:#}",
        select_kv_cache_backend("snapkv", Some(&serde_json::json!({"budget": 2.5}))).unwrap_err()
    );
    assert!(e.contains("`budget` = 2.5"), "{e}");
    select_kv_cache_backend("default", None).unwrap();
}
