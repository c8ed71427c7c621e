//! The exact shared selection of tensor parallelism: merging the ranks'
//! local top-k equals the single-device top-k of the global scores (the max
//! over ranks), ties and NaN included; world size 1 adds nothing.

use std::sync::Arc;

use candle_core::Device;
use omnikv_backend::omnikv::selector::top_k_sorted;
use omnikv_backend::tensor_parallel::{merge_top_k, TensorParallel};

use crate::common::Lcg;

/// The merge of each rank's local top-k `(position, local score)` pairs.
fn merged(locals: &[Vec<f32>], k: usize) -> Vec<u32> {
    let candidates: Vec<(u32, f32)> = locals
        .iter()
        .flat_map(|scores| {
            top_k_sorted(scores, k)
                .into_iter()
                .map(move |i| (i, scores[i as usize]))
        })
        .collect();
    merge_top_k(&candidates, k)
}

/// The single-device scores: per position, the max over ranks (NaN is the
/// lowest score, as in the top-k).
fn global(locals: &[Vec<f32>]) -> Vec<f32> {
    let key = |s: f32| if s.is_nan() { f32::NEG_INFINITY } else { s };
    (0..locals[0].len())
        .map(|i| {
            locals
                .iter()
                .map(|l| key(l[i]))
                .fold(f32::NEG_INFINITY, f32::max)
        })
        .collect()
}

#[test]
fn merged_local_top_k_equals_single_device_top_k() {
    let mut rng = Lcg(17);
    let mut cases = 0;
    for p in 1..48usize {
        for ranks in [2usize, 3, 4] {
            for k in (1..=p).step_by(1 + p / 8) {
                // Scores from a handful of values: ties everywhere, across
                // ranks and within one; now and then a NaN.
                let locals: Vec<Vec<f32>> = (0..ranks)
                    .map(|_| {
                        (0..p)
                            .map(|_| match rng.next() % 23 {
                                0 => f32::NAN,
                                r => (r % 5) as f32 - 2.0,
                            })
                            .collect()
                    })
                    .collect();
                assert_eq!(
                    merged(&locals, k),
                    top_k_sorted(&global(&locals), k),
                    "P {p}, {ranks} ranks, k {k}, scores {locals:?}"
                );
                cases += 1;
            }
        }
    }
    assert!(cases > 300);
}

#[test]
fn merge_takes_a_positions_best_score_over_ranks() {
    // Position 3 is rank 1's best and only rank 0's worst: its global score
    // is rank 1's, which beats position 1 (rank 0's second best).
    let candidates = [(0, 5.0), (1, 4.0), (3, -9.0), (3, 4.5), (2, 1.0)];
    assert_eq!(merge_top_k(&candidates, 2), vec![0, 3]);
    // Equal scores go to the earlier position, whichever rank sent them.
    let tied = [(7, 1.0), (2, 1.0), (5, 1.0)];
    assert_eq!(merge_top_k(&tied, 2), vec![2, 5]);
}

#[test]
fn one_rank_is_not_tensor_parallel() {
    // Without RING_CONFIG (and without NCCL) the host's communicator is the
    // one-rank dummy: the model loads exactly as on one device.
    assert!(std::env::var("RING_CONFIG").is_err());
    let comm = mistralrs_quant::Comm::from_device(mistralrs_quant::Id::new(), &Device::Cpu, 0, 1)
        .expect("a one-rank communicator");
    assert_eq!(comm.world_size(), 1);
    assert!(TensorParallel::new(Arc::new(comm)).is_none());
}
