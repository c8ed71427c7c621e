//! The numeric kernels of OmniKV's decode step (ICLR 2025, "Dynamic Context
//! Selection for Efficient Long-Context LLMs", §3.2-3.3; spec: "Selection at
//! a filter layer" and "Sparse attention"), as candle custom ops with a CPU
//! forward pass on every op and CUDA kernels behind the `cuda` feature.
//!
//! | module | what |
//! |---|---|
//! | [`ops`] | `score_max`, `top_k`, `gather_rows`, `indexed_decode`: the ops a backend calls on any device |
//! | [`cpu`] | their CPU passes (the references the CUDA kernels are written against) and the shared decode tiles |
//! | [`quant`] | the Q4_1 and Q8_0 decode products (bit for bit candle's, vectorised) the model's projections and output matrix use on the CPU |
//! | [`signatures`] | the one table of the CUDA entry points and their argument lists, checked against the `.cu` source |
//! | `cuda` | the launches (`cuda` feature; PTX built by `build.rs` from `kernels/omnikv_decode.cu`) |
//! | [`testing`] | deterministic inputs and comparisons for the ops' tests (here and in the backend) |
//! | `staging` | pinned host buffers, the copy stream and the row merge that stage offloaded rows on a GPU (`cuda` feature) |
//!
//! This crate depends on candle only: it knows nothing of models, backend
//! configuration or selection policy (`omnikv-backend/tests/layering.rs`
//! enforces it).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod ops;
pub mod quant;
pub mod signatures;
#[cfg(feature = "cuda")]
pub mod staging;
pub mod testing;
