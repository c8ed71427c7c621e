//! The backends' operational figures: Prometheus metrics through the
//! [`metrics`] facade (the server's recorder exports them at `/metrics`; without a
//! recorder they cost a lookup and are dropped) and per-sequence statistics.
//!
//! | metric | type | what |
//! |---|---|---|
//! | `omnikv_decode_steps_total` | counter | decode steps with selection active, one per sequence per step |
//! | `omnikv_dense_decode_steps_total{reason}` | counter | decode steps of sequences served densely: `short_prompt` (under `min_prompt_len`) or `request` (`"kv_cache": {"enabled": false}`) |
//! | `omnikv_dense_sequences_total{reason}` | counter | sequences served densely, counted at their first decode step |
//! | `omnikv_selected_rows_total` | counter | prompt rows kept by the filter layers, summed over filter layers and sequence steps |
//! | `omnikv_candidate_rows_total` | counter | prompt rows they chose from, summed the same way (`selected / candidate` is the effective budget) |
//! | `omnikv_staged_rows_total` | counter | prompt rows staged on the device tier for sparse layers (`real_offload`) |
//! | `omnikv_moved_rows_total` | counter | of those, rows copied from the host tier (the rest the delta fetch reused) |
//! | `omnikv_tier_bytes{tier}` | gauge | bytes held now in the `host` and `device` tiers, all sequences |
//! | `omnikv_sequences` | gauge | sequences holding rows in the store |
//! | `omnikv_selection_seconds` | summary | scoring and top-k time of one decode pass that selected, all filter layers (on a GPU including the wait for earlier queued work) |
//! | `omnikv_decode_step_seconds` | summary | one decode pass, from its first layer to the end of the model's forward |
//!
//! The baselines report `omnikv_baseline_rows_held{backend}` (gauge: rows
//! the live sequences hold) and `omnikv_baseline_rows_evicted_total{backend}`
//! (counter: rows a full cache would hold minus rows held, per released
//! sequence).

use std::collections::HashMap;
use std::sync::{Mutex, Once};

use serde::Serialize;

/// Why a sequence decodes densely.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenseReason {
    /// The prompt is shorter than `min_prompt_len`.
    ShortPrompt,
    /// The request switched selection off.
    Request,
}

impl DenseReason {
    fn label(self) -> &'static str {
        match self {
            DenseReason::ShortPrompt => "short_prompt",
            DenseReason::Request => "request",
        }
    }
}

/// One sequence's figures so far (what a request with
/// `"kv_cache": {"stats": true}` gets back, per sequence).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SequenceStats {
    /// Decode steps with selection active.
    pub decode_steps: u64,
    /// Decode steps served densely.
    pub dense_decode_steps: u64,
    /// Prompt rows kept, summed over filter layers and steps.
    pub selected_rows: u64,
    /// Prompt rows chosen from, summed the same way.
    pub candidate_rows: u64,
    /// `selected_rows / candidate_rows` (1 when nothing was selected).
    pub mean_selected_fraction: f64,
    /// Prompt rows copied from the host tier by delta fetches.
    pub moved_rows: u64,
    /// Prompt rows staged on the device tier.
    pub staged_rows: u64,
    /// Most host-tier bytes held at once.
    pub peak_host_bytes: u64,
    /// Most device-tier bytes held at once.
    pub peak_device_bytes: u64,
    /// Seconds of the decode passes with selection active, from their first
    /// layer to the end of the model's forward (a batched pass counts in
    /// full for each of its sequences).
    pub decode_seconds: f64,
    /// Seconds those passes spent scoring and selecting at the filter layers
    /// (`omnikv_selection_seconds`); `selection_seconds / decode_seconds` is
    /// the selection's share of a decode step.
    pub selection_seconds: f64,
}

/// One live sequence's entry: its figures, why it is dense (if it is) and
/// whether its request asked for the figures.
#[derive(Debug, Default)]
struct Entry {
    stats: SequenceStats,
    dense: Option<DenseReason>,
    requested: bool,
}

/// Per-sequence statistics of the live sequences, by host sequence id.
#[derive(Debug, Default)]
pub struct StatsTable {
    seqs: Mutex<HashMap<usize, Entry>>,
}

impl StatsTable {
    fn with<R>(&self, seq: usize, f: impl FnOnce(&mut Entry) -> R) -> R {
        let mut seqs = self.seqs.lock().unwrap_or_else(|e| e.into_inner());
        f(seqs.entry(seq).or_default())
    }

    /// The request of `seq` asked for its statistics.
    pub fn request(&self, seq: usize) {
        self.with(seq, |e| e.requested = true);
    }

    /// A decode step of `seq` (`None` without host sequence ids): with
    /// selection active, or dense for `dense`.
    pub fn decode_step(&self, seq: Option<usize>, dense: Option<DenseReason>) {
        match dense {
            None => metrics::counter!("omnikv_decode_steps_total").increment(1),
            Some(r) => metrics::counter!("omnikv_dense_decode_steps_total", "reason" => r.label())
                .increment(1),
        }
        let Some(seq) = seq else { return };
        self.with(seq, |e| match dense {
            None => e.stats.decode_steps += 1,
            Some(r) => {
                e.stats.dense_decode_steps += 1;
                if e.dense.is_none() {
                    e.dense = Some(r);
                    metrics::counter!("omnikv_dense_sequences_total", "reason" => r.label())
                        .increment(1);
                }
            }
        });
    }

    /// A filter layer kept `selected` of `candidates` prompt rows for `seq`.
    pub fn selection(&self, seq: Option<usize>, selected: usize, candidates: usize) {
        metrics::counter!("omnikv_selected_rows_total").increment(selected as u64);
        metrics::counter!("omnikv_candidate_rows_total").increment(candidates as u64);
        if let Some(seq) = seq {
            self.with(seq, |e| {
                e.stats.selected_rows += selected as u64;
                e.stats.candidate_rows += candidates as u64;
            });
        }
    }

    /// After a pass: the store's totals as metrics, and each live
    /// sequence's bytes (for its peaks) and delta-fetch rows so far.
    pub fn after_pass(&self, store: &StoreFigures, per_seq: &[SequenceFigures]) {
        publish_store(store);
        let mut seqs = self.seqs.lock().unwrap_or_else(|e| e.into_inner());
        for f in per_seq {
            if let Some(Entry { stats: s, .. }) = seqs.get_mut(&f.seq) {
                s.peak_host_bytes = s.peak_host_bytes.max(f.host_bytes);
                s.peak_device_bytes = s.peak_device_bytes.max(f.device_bytes);
                s.moved_rows = f.moved_rows;
                s.staged_rows = f.staged_rows;
            }
        }
    }

    /// A decode pass of `seqs` took `step_secs`, of which `selection_secs`
    /// scoring and selecting; counted for the sequences with selection
    /// active (not those decoding densely).
    pub fn pass_times(&self, seqs: &[usize], selection_secs: f64, step_secs: f64) {
        let mut table = self.seqs.lock().unwrap_or_else(|e| e.into_inner());
        for seq in seqs {
            if let Some(Entry {
                stats: s,
                dense: None,
                ..
            }) = table.get_mut(seq)
            {
                s.decode_seconds += step_secs;
                s.selection_seconds += selection_secs;
            }
        }
    }

    /// The figures of `seq` if its request asked for them.
    pub fn requested(&self, seq: usize) -> Option<SequenceStats> {
        let seqs = self.seqs.lock().unwrap_or_else(|e| e.into_inner());
        seqs.get(&seq)
            .filter(|e| e.requested)
            .map(|e| finish(e.stats.clone()))
    }

    /// Forget `seq` (it was released).
    pub fn remove(&self, seq: usize) {
        let mut seqs = self.seqs.lock().unwrap_or_else(|e| e.into_inner());
        seqs.remove(&seq);
    }
}

fn finish(mut s: SequenceStats) -> SequenceStats {
    s.mean_selected_fraction = if s.candidate_rows == 0 {
        1.0
    } else {
        s.selected_rows as f64 / s.candidate_rows as f64
    };
    s
}

/// The OmniKV store's totals.
#[derive(Debug, Clone, Copy, Default)]
pub struct StoreFigures {
    /// Host-tier bytes, all sequences.
    pub host_bytes: u64,
    /// Device-tier bytes, all sequences.
    pub device_bytes: u64,
    /// Sequences with rows in the store.
    pub sequences: usize,
    /// Prompt rows staged so far (cumulative).
    pub staged_rows: u64,
    /// Prompt rows copied from the host tier so far (cumulative).
    pub moved_rows: u64,
}

/// One live sequence's figures in the OmniKV store.
#[derive(Debug, Clone, Copy, Default)]
pub struct SequenceFigures {
    /// Host sequence id.
    pub seq: usize,
    /// Host-tier bytes now.
    pub host_bytes: u64,
    /// Device-tier bytes now.
    pub device_bytes: u64,
    /// Rows its delta fetches copied so far.
    pub moved_rows: u64,
    /// Rows staged for it so far.
    pub staged_rows: u64,
}

/// The store's totals as metrics.
pub fn publish_store(f: &StoreFigures) {
    metrics::gauge!("omnikv_tier_bytes", "tier" => "host").set(f.host_bytes as f64);
    metrics::gauge!("omnikv_tier_bytes", "tier" => "device").set(f.device_bytes as f64);
    metrics::gauge!("omnikv_sequences").set(f.sequences as f64);
    metrics::counter!("omnikv_staged_rows_total").absolute(f.staged_rows);
    metrics::counter!("omnikv_moved_rows_total").absolute(f.moved_rows);
}

/// The times of one decode pass: its selection (`None` when no filter
/// layer selected for any sequence, so dense passes do not pull the
/// selection quantiles to zero) and the whole pass. On a GPU the selection
/// time includes waiting for the work queued before it (top-k returns its
/// indices to the host).
pub fn record_pass_times(selection_secs: Option<f64>, step_secs: f64) {
    if let Some(s) = selection_secs {
        metrics::histogram!("omnikv_selection_seconds").record(s);
    }
    metrics::histogram!("omnikv_decode_step_seconds").record(step_secs);
}

/// A baseline's rows held now (all live sequences) and rows evicted by a
/// released sequence.
pub fn baseline_rows(backend: &'static str, held: u64, evicted: Option<u64>) {
    metrics::gauge!("omnikv_baseline_rows_held", "backend" => backend).set(held as f64);
    if let Some(e) = evicted {
        metrics::counter!("omnikv_baseline_rows_evicted_total", "backend" => backend).increment(e);
    }
}

/// Describe every metric to the installed recorder (once per process; the
/// server installs its recorder before backends are built).
pub fn describe() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
        describe_counter!(
            "omnikv_decode_steps_total",
            "OmniKV decode steps with selection active, one per sequence per step"
        );
        describe_counter!(
            "omnikv_dense_decode_steps_total",
            "OmniKV decode steps of sequences served densely, by reason (short_prompt, request)"
        );
        describe_counter!(
            "omnikv_dense_sequences_total",
            "Sequences OmniKV served densely, by reason (short_prompt, request)"
        );
        describe_counter!(
            "omnikv_selected_rows_total",
            "Prompt rows kept by OmniKV's filter layers, summed over filter layers and sequence steps"
        );
        describe_counter!(
            "omnikv_candidate_rows_total",
            "Prompt rows OmniKV's filter layers chose from, summed over filter layers and sequence steps"
        );
        describe_counter!(
            "omnikv_staged_rows_total",
            "Prompt rows staged on the device tier for sparse layers (real_offload)"
        );
        describe_counter!(
            "omnikv_moved_rows_total",
            "Staged prompt rows copied from the host tier (the rest were reused by the delta fetch)"
        );
        describe_gauge!(
            "omnikv_tier_bytes",
            Unit::Bytes,
            "Bytes OmniKV holds now, by tier (host, device)"
        );
        describe_gauge!("omnikv_sequences", "Sequences holding rows in OmniKV's store");
        describe_histogram!(
            "omnikv_selection_seconds",
            Unit::Seconds,
            "Scoring and top-k time of one OmniKV decode pass, all filter layers"
        );
        describe_histogram!(
            "omnikv_decode_step_seconds",
            Unit::Seconds,
            "Time of one decode pass of the OmniKV backend, first layer to end of forward"
        );
        describe_gauge!(
            "omnikv_baseline_rows_held",
            "Rows the live sequences of a token-dropping baseline hold, by backend"
        );
        describe_counter!(
            "omnikv_baseline_rows_evicted_total",
            "Rows a token-dropping baseline evicted (full-cache rows minus rows held at release), by backend"
        );
    });
}
