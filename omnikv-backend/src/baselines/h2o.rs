//! H2O ("Heavy-Hitter Oracle", Zhang et al., NeurIPS 2023): a head keeps the
//! rows with the largest accumulated attention mass (heavy hitters) plus a
//! window of recent positions; `heavy_ratio` of the budget goes to heavy
//! hitters.

/// Rows to keep, as indices into a head's rows: the newest
/// `capacity - heavy` rows, plus the `heavy = floor(capacity * heavy_ratio)`
/// heaviest of the older ones by `mass` (ties to the earlier position), in
/// position order. `by_pos` lists the rows oldest first and holds more than
/// `capacity`; `pos` and `mass` are indexed by row.
///
/// # Panics
/// If `by_pos` names a row beyond `pos` or `mass`, or holds fewer rows than
/// the recent window.
pub fn keep(
    by_pos: &[usize],
    pos: &[u32],
    mass: &[f32],
    heavy_ratio: f64,
    capacity: usize,
) -> Vec<usize> {
    let n = by_pos.len();
    let heavy = ((capacity as f64 * heavy_ratio).floor() as usize).min(capacity);
    let recent = capacity - heavy;
    let (older, newest) = by_pos.split_at(n - recent);
    let mut older = older.to_vec();
    if heavy < older.len() {
        // Heaviest first; ties go to the earlier position.
        older.select_nth_unstable_by(heavy, |&a, &b| {
            mass[b].total_cmp(&mass[a]).then(pos[a].cmp(&pos[b]))
        });
        older.truncate(heavy);
    }
    older.sort_unstable_by_key(|&r| pos[r]);
    older.extend_from_slice(newest);
    older
}
