//! The names this crate registers with the host (`--kv-cache NAME`, the
//! architecture a backend asks the loader for). A leaf module, so backends
//! name the architecture without importing the model.

/// The OmniKV backend (`--kv-cache omnikv`).
pub const BACKEND_NAME: &str = "omnikv";
/// The H2O baseline (`--kv-cache h2o`).
pub const H2O_NAME: &str = "h2o";
/// The StreamingLLM baseline (`--kv-cache streaming`).
pub const STREAMING_NAME: &str = "streaming";
/// The SnapKV baseline (`--kv-cache snapkv`).
pub const SNAPKV_NAME: &str = "snapkv";
/// The model the backends ask the host to load (`llama_omnikv`).
pub const ARCHITECTURE_NAME: &str = "llama_omnikv";
