//! Layer roles of an OmniKV model (see the spec's "Layer roles").
//!
//! ```text
//!  L=32, F=2,8,18, W=1
//!  layer: 0 1 2 3 4 5 6 7 8 9 10 .. 17 18 19 20 .. 31
//!  role:  D D F W S S S S F W S  .. S  F  W  S  .. S
//!  serves            <-2->      <--8-->      <--18-->
//! ```
//! D = pre-filter dense, F = filter (dense, selects), W = wait-load (dense),
//! S = sparse (attends to the serving filter layer's selection).

use super::config::OmniKvConfig;

/// What one layer does at a decode step (spec: "Layer roles"). Every role
/// attends densely during prompt passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerRole {
    /// Before the first filter layer: attends to every token.
    PreFilterDense,
    /// Selects prompt tokens for later layers, attends to every token.
    Filter,
    /// One of the `num_wait_load_layers` layers right after filter layer
    /// `filter`: attends to every token while the selection is fetched.
    WaitLoad { filter: usize },
    /// Attends to the selection of filter layer `filter` (the nearest one
    /// before it) plus all decoded tokens.
    Sparse { filter: usize },
}

impl LayerRole {
    /// Attends to every token at decode steps (every role but sparse).
    pub fn is_dense(&self) -> bool {
        !matches!(self, LayerRole::Sparse { .. })
    }
}

/// The role of every layer of one model under one configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerPlan {
    /// One role per layer, indexed by layer.
    pub roles: Vec<LayerRole>,
}

impl LayerPlan {
    /// Build the plan for a model of `num_layers` layers, or explain why the
    /// configured filter layers do not fit it. Expects `cfg.filter_layers`
    /// strictly ascending, as [`OmniKvConfig`] validates.
    ///
    /// # Errors
    /// If a filter layer is `>= num_layers`; the message names it and the
    /// model's layer count.
    pub fn new(cfg: &OmniKvConfig, num_layers: usize) -> anyhow::Result<Self> {
        if let Some(&bad) = cfg.filter_layers.iter().find(|&&l| l >= num_layers) {
            anyhow::bail!(
                "`do_select_layers` names layer {bad}, but the model has {num_layers} layers (0..={}); choose filter layers below {num_layers}",
                num_layers.saturating_sub(1)
            );
        }
        let mut roles = vec![LayerRole::PreFilterDense; num_layers];
        for (n, &f) in cfg.filter_layers.iter().enumerate() {
            let next = cfg.filter_layers.get(n + 1).copied().unwrap_or(num_layers);
            roles[f] = LayerRole::Filter;
            for (l, role) in roles.iter_mut().enumerate().take(next).skip(f + 1) {
                *role = if l <= f + cfg.num_wait_load_layers {
                    LayerRole::WaitLoad { filter: f }
                } else {
                    LayerRole::Sparse { filter: f }
                };
            }
        }
        Ok(Self { roles })
    }

    /// Number of layers that attend densely at decode steps.
    pub fn dense_layers(&self) -> usize {
        self.roles.iter().filter(|r| r.is_dense()).count()
    }
}
