//! OmniKV: dynamic context selection at decode time (ICLR 2025, "Dynamic
//! Context Selection for Efficient Long-Context LLMs", §3).
//!
//! A few *filter layers* score the prompt with the current query and keep the
//! top-k tokens (the budget); the *sparse* layers after each filter layer
//! attend only to that selection plus every generated token, and the
//! *wait-load* layers right after a filter layer attend densely while the
//! selection is fetched. No token is ever dropped: the tiered store keeps
//! every row, so a later step can select different ones.
//!
//! | module | what (spec section) |
//! |---|---|
//! | [`config`] | the published JSON schema and the validated runtime config ("Configuration keys (published JSON schema)") |
//! | [`plan`] | each layer's role: pre-filter dense, filter, wait-load, sparse ("Layer roles") |
//! | [`selector`] | token scoring and top-k at a filter layer ("Selection at a filter layer") |
//! | [`queries`] | the window selectors' past queries, per sequence ("Selection at a filter layer") |
//! | [`backend`] | [`OmniKvBackend`], the host's KV-cache backend: one decode step end to end |
//! | [`store`] | the tiered KV store behind `real_offload` and per-sequence accounting ("KV placement and offload") |
//! | [`recall`] | the calibration recorder: inter-layer recall and filter-layer proposals ("Finding filter layers") |

pub mod backend;
pub mod config;
pub mod plan;
pub mod queries;
pub mod recall;
pub mod selector;
pub mod store;

pub use backend::{OmniKvBackend, BACKEND_NAME};
pub use config::{OmniKvConfig, OmniKvConfigFile};
pub use plan::{LayerPlan, LayerRole};
