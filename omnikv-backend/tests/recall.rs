//! Inter-layer recall and the filter-layer dynamic program against plain
//! references written out in the test.

use omnikv_backend::omnikv::recall::{plan_score, propose, step_recall};

/// Deterministic pseudo-random numbers in [0, 1).
fn rng(seed: u64) -> impl FnMut() -> f64 {
    let mut s = seed;
    move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn random_matrix(l: usize, seed: u64) -> Vec<Vec<f64>> {
    let mut r = rng(seed);
    (0..l)
        .map(|a| (0..l).map(|b| if a == b { 1.0 } else { r() }).collect())
        .collect()
}

/// Every increasing set of `m` layers from `first` whose gaps exceed `w`.
fn all_sets(l: usize, m: usize, w: usize, first: usize) -> Vec<Vec<usize>> {
    fn rec(l: usize, m: usize, w: usize, cur: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
        if cur.len() == m {
            out.push(cur.clone());
            return;
        }
        let from = cur.last().map(|&f| f + w + 1).unwrap_or(0);
        for f in from..l {
            cur.push(f);
            rec(l, m, w, cur, out);
            cur.pop();
        }
    }
    let mut out = Vec::new();
    if first < l {
        rec(l, m, w, &mut vec![first], &mut out);
    }
    out.into_iter().filter(|s| s.len() == m).collect()
}

#[test]
fn dynamic_program_finds_the_brute_force_optimum() {
    for (l, m, w, first, seed) in [
        (12, 2, 1, 2, 1),
        (16, 3, 1, 2, 2),
        (16, 3, 0, 1, 3),
        (20, 4, 2, 3, 4),
        (30, 3, 1, 2, 5),
        (8, 1, 1, 0, 6),
        (6, 3, 1, 1, 7),
    ] {
        let s = random_matrix(l, seed);
        let sets = all_sets(l, m, w, first);
        let want = sets
            .iter()
            .map(|set| plan_score(&s, set, w))
            .fold(f64::NEG_INFINITY, f64::max);
        match propose(&s, m, w, first) {
            Some((set, score)) => {
                assert!(
                    sets.contains(&set),
                    "L={l} m={m} W={w}: {set:?} is not a valid set"
                );
                assert!(
                    (score - want).abs() < 1e-9,
                    "L={l} m={m} W={w}: {score} vs {want}"
                );
                assert!((plan_score(&s, &set, w) - score).abs() < 1e-9);
            }
            None => assert!(sets.is_empty(), "L={l} m={m} W={w}: no proposal"),
        }
    }
    // With W=1, three filter layers fit in 6 layers from layer 1 (1, 3, 5);
    // four do not.
    assert!(propose(&random_matrix(6, 8), 4, 1, 1).is_none());
}

#[test]
fn plan_score_counts_only_sparse_layers() {
    // L=10, filters {2,6}, W=1: sparse 4,5 served by 2; 8,9 served by 6.
    let mut s = vec![vec![0.0; 10]; 10];
    for (a, b, v) in [
        (2, 4, 0.5),
        (2, 5, 0.25),
        (6, 8, 1.0),
        (6, 9, 0.125),
        (2, 3, 9.0),
        (6, 7, 9.0),
    ] {
        s[a][b] = v;
    }
    assert_eq!(plan_score(&s, &[2, 6], 1), 0.5 + 0.25 + 1.0 + 0.125);
}

#[test]
fn step_recall_matches_definition() {
    let mut r = rng(9);
    for (layers, p, k) in [(4, 10, 3), (3, 50, 5), (5, 7, 7), (2, 30, 1)] {
        let dists: Vec<Vec<f32>> = (0..layers)
            .map(|_| {
                let raw: Vec<f64> = (0..p).map(|_| r()).collect();
                let sum: f64 = raw.iter().sum();
                raw.iter().map(|x| (x / sum) as f32).collect()
            })
            .collect();
        let got = step_recall(&dists, k);
        for a in 0..layers {
            // Plain top-k by sorting all positions.
            let mut order: Vec<usize> = (0..p).collect();
            order.sort_by(|&x, &y| dists[a][y].total_cmp(&dists[a][x]).then(x.cmp(&y)));
            for b in 0..layers {
                let want: f64 = order[..k].iter().map(|&j| dists[b][j] as f64).sum();
                assert!((got[a * layers + b] - want).abs() < 1e-6);
            }
            if k == p {
                assert!((got[a * layers + a] - 1.0).abs() < 1e-5);
            }
        }
    }
}
