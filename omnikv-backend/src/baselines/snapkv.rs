//! SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before
//! Generation", 2024): once, at the end of the prompt, the last `window`
//! queries (the observation window) vote for the earlier rows with the
//! attention they gave them, pooled over `kernel` neighbouring positions; the
//! best-voted rows and the window are kept. Decoding appends without
//! evicting, as published.

/// Rows to keep, as indices into a head's rows: the newest `window` rows
/// plus the `capacity - window` older rows with the largest pooled vote
/// ([`avg_pool`] of `mass` over `kernel` positions; ties to the earlier
/// position), in position order. `by_pos` lists the rows oldest first and
/// holds more than `capacity`; `mass` is indexed by row.
///
/// # Panics
/// If `by_pos` names a row beyond `mass`, or holds fewer rows than the
/// window.
pub fn keep(
    by_pos: &[usize],
    mass: &[f32],
    window: usize,
    kernel: usize,
    capacity: usize,
) -> Vec<usize> {
    let n = by_pos.len();
    let window = window.min(capacity);
    let (older, newest) = by_pos.split_at(n - window);
    let pooled = avg_pool(&older.iter().map(|&r| mass[r]).collect::<Vec<_>>(), kernel);
    let voted = capacity - window;
    let mut idx: Vec<usize> = (0..older.len()).collect();
    if voted < idx.len() {
        idx.select_nth_unstable_by(voted, |&a, &b| {
            pooled[b].total_cmp(&pooled[a]).then(a.cmp(&b))
        });
        idx.truncate(voted);
    }
    idx.sort_unstable();
    let mut keep: Vec<usize> = idx.iter().map(|&i| older[i]).collect();
    keep.extend_from_slice(newest);
    keep
}

/// `avg_pool1d(x, kernel, stride 1, padding kernel / 2)` with zero padding
/// counted in the average (PyTorch's default), as SnapKV pools its votes.
/// `kernel` is odd and at least 1 (the config checks); returns `x.len()`
/// values.
pub fn avg_pool(x: &[f32], kernel: usize) -> Vec<f32> {
    let half = kernel / 2;
    (0..x.len())
        .map(|i| {
            let lo = i.saturating_sub(half);
            let hi = (i + half + 1).min(x.len());
            x[lo..hi].iter().sum::<f32>() / kernel as f32
        })
        .collect()
}
