//! Per-sequence KV accounting as an API. When the host releases a sequence
//! (finished, cancelled or failed), a backend reports what it held as a
//! [`ReleaseRecord`]: a JSON object on one log line after [`LOG_PREFIX`]
//! (tracing target [`LOG_TARGET`]), next to the human-readable line.
//! Tests and tools read these records instead of parsing prose; in-process
//! callers use `OmniKvBackend::store_usage` and `EvictingBackend::held`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Tracing target of the release records.
pub const LOG_TARGET: &str = "omnikv::accounting";

/// Text before the JSON object on a release record's log line.
pub const LOG_PREFIX: &str = "kv accounting: ";

/// What one sequence held when it was released, and what the backend holds
/// for all live sequences after the release. Byte counts are bytes; rows are
/// positions x layers x KV heads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRecord {
    /// The backend's registered name (`omnikv`, `h2o`, `streaming`, `snapkv`).
    pub backend: String,
    /// The host's sequence id.
    pub seq: usize,
    /// Bytes the sequence held in host memory (OmniKV's host tier; the
    /// baselines' row store).
    pub held_host_bytes: u64,
    /// Bytes the sequence held in the device tier (OmniKV with
    /// `real_offload`; 0 for the baselines, whose rows live in host memory).
    pub held_device_bytes: u64,
    /// Rows held at the end (baselines).
    pub rows: Option<u64>,
    /// Most rows held at any time (baselines).
    pub peak_rows: Option<u64>,
    /// Most bytes held at any time (baselines).
    pub peak_bytes: Option<u64>,
    /// Positions (tokens) the sequence saw, prompt + generated (baselines).
    pub positions: Option<u64>,
    /// Rows a cache that keeps every position holds: positions x layers x
    /// KV heads (baselines).
    pub full_rows: Option<u64>,
    /// Sequences still holding rows after this release.
    pub live: usize,
    /// Their host-memory bytes, together.
    pub live_host_bytes: u64,
    /// Their device-tier bytes, together.
    pub live_device_bytes: u64,
    /// Bytes of the window selectors' past queries the sequence held (OmniKV
    /// with `uniform` or `exp`; on the model's device).
    #[serde(default)]
    pub held_query_bytes: u64,
    /// Window queries of the sequences still live, together.
    #[serde(default)]
    pub live_query_bytes: u64,
}

impl ReleaseRecord {
    /// Log the record at info level, as one line `kv accounting: {json}`.
    pub fn log(&self) {
        match serde_json::to_string(self) {
            Ok(json) => tracing::info!(target: LOG_TARGET, "{LOG_PREFIX}{json}"),
            Err(e) => tracing::warn!(target: LOG_TARGET, "release record not serialisable: {e}"),
        }
    }

    /// The record on a log line written by [`ReleaseRecord::log`], if any.
    pub fn from_log_line(line: &str) -> Option<Self> {
        let (_, json) = line.split_once(LOG_PREFIX)?;
        serde_json::from_str(json.trim()).ok()
    }

    /// Nothing is held for any sequence after this release.
    pub fn backend_empty(&self) -> bool {
        self.live == 0
            && self.live_host_bytes == 0
            && self.live_device_bytes == 0
            && self.live_query_bytes == 0
    }
}

/// Human-readable byte counts for log lines.
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0 as f64;
        if b >= 1024.0 * 1024.0 {
            write!(f, "{:.2} MiB", b / (1024.0 * 1024.0))
        } else if b >= 1024.0 {
            write!(f, "{:.1} KiB", b / 1024.0)
        } else {
            write!(f, "{} B", self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_through_its_log_line() {
        let r = ReleaseRecord {
            backend: "h2o".into(),
            seq: 7,
            held_host_bytes: 1024,
            rows: Some(12),
            live: 1,
            live_host_bytes: 2048,
            ..Default::default()
        };
        let line = format!(
            "2026-11-30T05:00:00Z  INFO omnikv::accounting: {LOG_PREFIX}{}",
            serde_json::to_string(&r).unwrap()
        );
        assert_eq!(ReleaseRecord::from_log_line(&line), Some(r.clone()));
        assert!(!r.backend_empty());
        assert_eq!(
            ReleaseRecord::from_log_line("omnikv store: released sequence 7"),
            None
        );
    }
}
