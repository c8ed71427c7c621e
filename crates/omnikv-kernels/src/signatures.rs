//! The one table of the CUDA kernels' C entry points and their argument
//! lists, in the order `kernels/omnikv_decode.cu` declares them. `T` is the
//! element type of keys and values (`float`, `__half`, `__nv_bfloat16`);
//! kernels named `*_{T}` exist once per element type with the suffix `f32`,
//! `f16` or `bf16`.
//!
//! The `cuda` module (and the backend's offload staging, for
//! `omnikv_merge_rows_*`) push launch arguments in this order; the test below
//! reads `kernels/omnikv_decode.cu` and fails when a declaration there and
//! this table disagree, so the two cannot drift apart silently.

/// One kernel: its C name (`{T}` marks the element-type suffix) and its
/// parameters as `(C type, name)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelSignature {
    /// C symbol; `{T}` stands for `f32`, `f16` or `bf16`.
    pub name: &'static str,
    /// Parameters in order, `(C type, name)`; `T` is the element type.
    pub params: &'static [(&'static str, &'static str)],
}

/// Every kernel of `kernels/omnikv_decode.cu`.
pub const KERNELS: &[KernelSignature] = &[
    KernelSignature {
        name: "omnikv_score_max_{T}",
        params: &[
            ("const float*", "q"),
            ("const T*", "keys"),
            ("float*", "scores"),
            ("int", "h"),
            ("int", "kv_h"),
            ("int", "n"),
            ("int", "d"),
            ("long long", "head_stride"),
            ("float", "scale"),
        ],
    },
    KernelSignature {
        name: "omnikv_gather_rows_{T}",
        params: &[
            ("const T*", "src"),
            ("const uint32_t*", "rows"),
            ("T*", "staging"),
            ("long long", "head_stride"),
            ("int", "m"),
            ("int", "d"),
        ],
    },
    KernelSignature {
        name: "omnikv_merge_rows_{T}",
        params: &[
            ("const T*", "a"),
            ("int", "na"),
            ("const T*", "b"),
            ("int", "nb"),
            ("const uint32_t*", "order"),
            ("T*", "staging"),
            ("int", "m"),
            ("int", "d"),
        ],
    },
    KernelSignature {
        name: "omnikv_flash_decode_split_{T}",
        params: &[
            ("const float*", "q"),
            ("const T*", "keys"),
            ("const T*", "values"),
            ("const uint32_t*", "rows"),
            ("int", "m"),
            ("int", "h"),
            ("int", "kv_h"),
            ("long long", "k_head_stride"),
            ("long long", "v_head_stride"),
            ("int", "d"),
            ("float", "scale"),
            ("int", "rows_per_split"),
            ("float*", "part_max"),
            ("float*", "part_sum"),
            ("float*", "part_acc"),
        ],
    },
    KernelSignature {
        name: "omnikv_topk_threshold",
        params: &[
            ("const float*", "scores"),
            ("int", "n"),
            ("int", "k"),
            ("uint32_t*", "out"),
        ],
    },
    KernelSignature {
        name: "omnikv_topk_compact",
        params: &[
            ("const float*", "scores"),
            ("int", "n"),
            ("const uint32_t*", "thr"),
            ("uint32_t*", "selected"),
        ],
    },
    KernelSignature {
        name: "omnikv_flash_decode_merge",
        params: &[
            ("const float*", "part_max"),
            ("const float*", "part_sum"),
            ("const float*", "part_acc"),
            ("int", "splits"),
            ("int", "d"),
            ("float*", "out"),
        ],
    },
];

/// The kernel source, for the drift test (and for readers of the table).
pub const SOURCE: &str = include_str!("../kernels/omnikv_decode.cu");

#[cfg(test)]
mod tests {
    use super::*;

    /// `(name, [(type, param)])` of every `extern "C" __global__` declaration
    /// in `src`, with macro continuations removed and `##NAME` written `_{T}`.
    fn declarations(src: &str) -> Vec<(String, Vec<(String, String)>)> {
        let flat = src.replace("\\\n", " ");
        let mut out = Vec::new();
        let mut rest = flat.as_str();
        while let Some(at) = rest.find("extern \"C\" __global__ void ") {
            rest = &rest[at + "extern \"C\" __global__ void ".len()..];
            let open = rest.find('(').expect("parameter list");
            let close = rest.find(')').expect("end of parameter list");
            let name = rest[..open].trim().replace("_##NAME", "_{T}");
            let params = rest[open + 1..close]
                .split(',')
                .map(|p| {
                    let p = p.split_whitespace().collect::<Vec<_>>().join(" ");
                    let (ty, name) = p.rsplit_once(' ').expect("type and name");
                    (ty.to_string(), name.to_string())
                })
                .collect();
            out.push((name, params));
            rest = &rest[close..];
        }
        out
    }

    #[test]
    fn table_matches_the_kernel_source() {
        let found = declarations(SOURCE);
        let want: Vec<(String, Vec<(String, String)>)> = KERNELS
            .iter()
            .map(|k| {
                let params = k
                    .params
                    .iter()
                    .map(|(t, n)| (t.to_string(), n.to_string()))
                    .collect();
                (k.name.to_string(), params)
            })
            .collect();
        assert_eq!(found, want, "kernels/omnikv_decode.cu and KERNELS disagree");
    }

    #[test]
    fn a_changed_declaration_is_caught() {
        let edited = SOURCE.replacen(
            "omnikv_score_max_##NAME(const float* q",
            "omnikv_score_max_##NAME(const double* q",
            1,
        );
        assert_ne!(edited, SOURCE);
        assert_ne!(declarations(&edited), declarations(SOURCE));
    }
}
