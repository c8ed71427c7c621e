//! StreamingLLM (Xiao et al., "Efficient Streaming Language Models with
//! Attention Sinks", ICLR 2024): a head keeps the first `sink_tokens`
//! positions (attention sinks) and the most recent ones.

/// Rows to keep, as indices into a head's rows: the `sink_tokens` oldest
/// and the newest `capacity - sink_tokens`. `by_pos` lists the rows oldest
/// first and holds more than `capacity` of them.
///
/// # Panics
/// If `by_pos` holds fewer rows than the sinks or than the recent window.
pub fn keep(by_pos: &[usize], sink_tokens: usize, capacity: usize) -> Vec<usize> {
    let n = by_pos.len();
    let sinks = sink_tokens.min(capacity);
    let recent = capacity - sinks;
    let mut keep: Vec<usize> = by_pos[..sinks].to_vec();
    keep.extend_from_slice(&by_pos[n - recent..]);
    keep
}
