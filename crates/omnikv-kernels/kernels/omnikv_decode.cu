// OmniKV decode-step kernels (batch-1 decode, one sequence per launch).
//
// The CPU passes in src/cpu.rs of this crate are the references these
// kernels are written against (tests/ops.rs of omnikv-backend compares
// them on a GPU); their argument lists are the table in src/signatures.rs,
// which a test checks against this file:
//
//   omnikv_score_max      cpu::score_max_rows: per prompt key, the max over
//                         query heads of the scaled dot product (`last`)
//   omnikv_topk_*         cpu::top_k_sorted: the k best positions, ascending
//   omnikv_gather_rows    ops::gather_rows: selected rows into a staging
//                         buffer
//   omnikv_merge_rows     the backend's CUDA staging: delta fetch, the
//                         previous staging and the newly copied rows merged
//                         on the copy stream
//   omnikv_flash_decode_* cpu::indexed_decode_attention: one query over an
//                         index list, split-K with a log-sum-exp merge
//
// Layouts (row-major):
//   q       [h, d]            (f32, contiguous)
//   keys    [kv_h, n, d]      (T = half or bfloat16 or float)
//   values  [kv_h, n, d]
//   rows    [m]               (uint32, ascending, < n)
// Rows of keys and values are contiguous (stride d); heads are
// `head_stride` elements apart (>= n * d), so the model cache's view of its
// preallocated buffer is read in place. Query head `hq` reads KV head
// `hq / (h / kv_h)`.
//
// Compile-checked with scripts/check-cuda-kernels.sh (nvcc from the CUDA
// toolkit wheels).

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>
#include <float.h>

namespace omnikv {

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// ---------------------------------------------------------------- scoring --
// One warp per prompt position: the warp loads the key row of every KV head
// once and scores all query heads of its group against it.
// grid: ceil(n / warps_per_block), block: 32 * warps_per_block.
template <typename T>
__device__ void score_max(const float* __restrict__ q, const T* __restrict__ keys,
                          float* __restrict__ scores, int h, int kv_h, int n, int d,
                          long long head_stride, float scale) {
    const int warps = blockDim.x / 32;
    const int pos = blockIdx.x * warps + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (pos >= n) return;
    const int g = h / kv_h;
    float best = -FLT_MAX;
    for (int kh = 0; kh < kv_h; ++kh) {
        const T* k = keys + (size_t)kh * head_stride + (size_t)pos * d;
        for (int gi = 0; gi < g; ++gi) {
            const float* qh = q + (size_t)(kh * g + gi) * d;
            float acc = 0.f;
            for (int x = lane; x < d; x += 32) acc += qh[x] * to_f32(k[x]);
            acc = warp_sum(acc) * scale;
            best = fmaxf(best, acc);
        }
    }
    if (lane == 0) scores[pos] = best;
}

// ------------------------------------------------------------------ top-k --
// Radix select on the order-preserving integer image of the scores, then a
// compaction that keeps positions in ascending order. Ties go to the earlier
// position (as top_k_sorted). Single block; n up to a few million.
__device__ __forceinline__ uint32_t ordered(float f) {
    // NaN ranks as -inf (as top_k_sorted on the CPU: ties by position).
    if (f != f) f = __int_as_float(0xff800000);
    uint32_t u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Finds the k-th largest key (threshold) and how many keys equal to it are
// kept (1 <= k <= n). block: 1024 threads, grid: 1.
__device__ void topk_threshold(const float* __restrict__ scores, int n, int k,
                               uint32_t* __restrict__ out /* [threshold, keep_equal] */) {
    __shared__ uint32_t hist[256];
    __shared__ uint32_t prefix, prefix_mask, remaining;
    if (threadIdx.x == 0) {
        prefix = 0u;
        prefix_mask = 0u;
        remaining = (uint32_t)k;
    }
    __syncthreads();
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0u;
        __syncthreads();
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            uint32_t key = ordered(scores[i]);
            if ((key & prefix_mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xffu], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            uint32_t acc = 0u;
            int digit = 255;
            for (; digit > 0; --digit) {
                if (acc + hist[digit] >= remaining) break;
                acc += hist[digit];
            }
            remaining -= acc;
            prefix |= ((uint32_t)digit) << shift;
            prefix_mask |= 0xffu << shift;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        out[0] = prefix;     // the k-th largest key
        out[1] = remaining;  // how many keys equal to it are kept
    }
}

// Writes the selected positions in ascending order: every key above the
// threshold, and the first `keep_equal` keys equal to it. Single block of
// 1024 threads scanning the scores in order, chunk by chunk.
__device__ void topk_compact(const float* __restrict__ scores, int n,
                             const uint32_t* __restrict__ thr,
                             uint32_t* __restrict__ selected) {
    __shared__ uint32_t warp_counts[32];
    __shared__ uint32_t warp_eq[32];
    __shared__ uint32_t base, equal_used;
    const uint32_t threshold = thr[0];
    const uint32_t keep_equal = thr[1];
    if (threadIdx.x == 0) {
        base = 0u;
        equal_used = 0u;
    }
    __syncthreads();
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    for (int start = 0; start < n; start += blockDim.x) {
        const int i = start + threadIdx.x;
        uint32_t key = i < n ? ordered(scores[i]) : 0u;
        const bool above = i < n && key > threshold;
        const bool equal = i < n && key == threshold;
        // Equal keys are kept in position order: rank them within the chunk.
        unsigned eq_mask = __ballot_sync(0xffffffffu, equal);
        if (lane == 0) warp_eq[warp] = __popc(eq_mask);
        __syncthreads();
        uint32_t eq_before = equal_used;
        for (int w = 0; w < warp; ++w) eq_before += warp_eq[w];
        eq_before += __popc(eq_mask & ((1u << lane) - 1u));
        const bool keep = above || (equal && eq_before < keep_equal);
        unsigned keep_mask = __ballot_sync(0xffffffffu, keep);
        if (lane == 0) warp_counts[warp] = __popc(keep_mask);
        __syncthreads();
        uint32_t offset = base;
        for (int w = 0; w < warp; ++w) offset += warp_counts[w];
        offset += __popc(keep_mask & ((1u << lane) - 1u));
        if (keep) selected[offset] = (uint32_t)i;
        __syncthreads();
        if (threadIdx.x == 0) {
            uint32_t total = 0u, eq_total = 0u;
            for (int w = 0; w < (int)(blockDim.x / 32); ++w) {
                total += warp_counts[w];
                eq_total += warp_eq[w];
            }
            base += total;
            equal_used += eq_total;
        }
        __syncthreads();
    }
}

// ----------------------------------------------------------------- gather --
// staging[kh, j, :] = src[kh, rows[j], :] for j < m. One block per (j, kh);
// src may be host-pinned memory mapped into the device address space (the
// host tier) or device memory (delta fetch from the previous staging).
template <typename T>
__device__ void gather_rows(const T* __restrict__ src, const uint32_t* __restrict__ rows,
                            T* __restrict__ staging, long long head_stride, int m, int d) {
    const int j = blockIdx.x, kh = blockIdx.y;
    if (j >= m) return;
    const T* from = src + (size_t)kh * head_stride + (size_t)rows[j] * d;
    T* to = staging + ((size_t)kh * m + j) * d;
    for (int x = threadIdx.x; x < d; x += blockDim.x) to[x] = from[x];
}

// Delta fetch: staging[kh, j, :] = order[j] < na ? a[kh, order[j], :]
// : b[kh, order[j] - na, :], with a = the previous staging [kv_h, na, d] and
// b = the newly copied rows [kv_h, nb, d] (both contiguous). Runs on the copy
// stream. One block per (j, kh).
template <typename T>
__device__ void merge_rows(const T* __restrict__ a, int na, const T* __restrict__ b, int nb,
                           const uint32_t* __restrict__ order, T* __restrict__ staging, int m,
                           int d) {
    const int j = blockIdx.x, kh = blockIdx.y;
    if (j >= m) return;
    const uint32_t o = order[j];
    const T* from = o < (uint32_t)na ? a + ((size_t)kh * na + o) * d
                                     : b + ((size_t)kh * nb + (o - na)) * d;
    T* to = staging + ((size_t)kh * m + j) * d;
    for (int x = threadIdx.x; x < d; x += blockDim.x) to[x] = from[x];
}

// ------------------------------------------------------- flash decoding --
// Split-K decode attention over an index list. Phase 1: grid (splits, h),
// block 128 threads (4 warps); each block streams its slice of the index
// list with an online softmax and writes (max, sum, acc[d]) for its split.
// Phase 2: grid h, merges the splits with their log-sum-exp weights.
// d <= 256.
constexpr int MAX_D = 256;

template <typename T>
__device__ void flash_decode_split(const float* __restrict__ q, const T* __restrict__ keys,
                                   const T* __restrict__ values,
                                   const uint32_t* __restrict__ rows, int m, int h, int kv_h,
                                   long long k_head_stride, long long v_head_stride, int d,
                                   float scale, int rows_per_split,
                                   float* __restrict__ part_max, float* __restrict__ part_sum,
                                   float* __restrict__ part_acc) {
    const int split = blockIdx.x, hq = blockIdx.y;
    const int splits = gridDim.x;
    const int kh = hq / (h / kv_h);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    const int begin = split * rows_per_split;
    const int end = min(m, begin + rows_per_split);
    __shared__ float qs[MAX_D];
    __shared__ float w_max[32], w_sum[32];
    __shared__ float w_acc[32][MAX_D];
    for (int x = threadIdx.x; x < d; x += blockDim.x) qs[x] = q[(size_t)hq * d + x];
    __syncthreads();
    // Each warp handles every `warps`-th row of the slice, online softmax.
    float mx = -FLT_MAX, sum = 0.f;
    float acc[MAX_D / 32];
    for (int i = 0; i < MAX_D / 32; ++i) acc[i] = 0.f;
    for (int r = begin + warp; r < end; r += warps) {
        const T* krow = keys + (size_t)kh * k_head_stride + (size_t)rows[r] * d;
        const T* vrow = values + (size_t)kh * v_head_stride + (size_t)rows[r] * d;
        float dot = 0.f;
        for (int x = lane; x < d; x += 32) dot += qs[x] * to_f32(krow[x]);
        const float logit = warp_sum(dot) * scale;
        const float new_max = fmaxf(mx, logit);
        const float correction = __expf(mx - new_max);
        const float p = __expf(logit - new_max);
        sum = sum * correction + p;
        for (int i = 0, x = lane; x < d; ++i, x += 32)
            acc[i] = acc[i] * correction + p * to_f32(vrow[x]);
        mx = new_max;
    }
    if (lane == 0) {
        w_max[warp] = mx;
        w_sum[warp] = sum;
    }
    for (int i = 0, x = lane; x < d; ++i, x += 32) w_acc[warp][x] = acc[i];
    __syncthreads();
    // Merge the warps of this block.
    if (warp == 0) {
        float bmax = -FLT_MAX;
        for (int w = 0; w < warps; ++w) bmax = fmaxf(bmax, w_max[w]);
        float bsum = 0.f;
        for (int w = 0; w < warps; ++w)
            if (w_sum[w] > 0.f) bsum += w_sum[w] * __expf(w_max[w] - bmax);
        for (int x = lane; x < d; x += 32) {
            float a = 0.f;
            for (int w = 0; w < warps; ++w)
                if (w_sum[w] > 0.f) a += w_acc[w][x] * __expf(w_max[w] - bmax);
            part_acc[((size_t)hq * splits + split) * d + x] = a;
        }
        if (lane == 0) {
            part_max[(size_t)hq * splits + split] = bmax;
            part_sum[(size_t)hq * splits + split] = bsum;
        }
    }
}

__device__ void flash_decode_merge(const float* __restrict__ part_max,
                                   const float* __restrict__ part_sum,
                                   const float* __restrict__ part_acc, int splits, int d,
                                   float* __restrict__ out) {
    const int hq = blockIdx.x;
    float gmax = -FLT_MAX;
    for (int s = 0; s < splits; ++s)
        if (part_sum[(size_t)hq * splits + s] > 0.f)
            gmax = fmaxf(gmax, part_max[(size_t)hq * splits + s]);
    float total = 0.f;
    for (int s = 0; s < splits; ++s) {
        const float ps = part_sum[(size_t)hq * splits + s];
        if (ps > 0.f) total += ps * __expf(part_max[(size_t)hq * splits + s] - gmax);
    }
    const float inv = total > 0.f ? 1.f / total : 0.f;
    for (int x = threadIdx.x; x < d; x += blockDim.x) {
        float a = 0.f;
        for (int s = 0; s < splits; ++s) {
            const float ps = part_sum[(size_t)hq * splits + s];
            if (ps > 0.f)
                a += part_acc[((size_t)hq * splits + s) * d + x] *
                     __expf(part_max[(size_t)hq * splits + s] - gmax);
        }
        out[(size_t)hq * d + x] = a * inv;
    }
}

}  // namespace omnikv

// ------------------------------------------------------------ entry points --
// C symbols for the candle custom ops (one per element type).

#define OMNIKV_TYPED(NAME, T)                                                                    \
    extern "C" __global__ void omnikv_score_max_##NAME(const float* q, const T* keys,           \
                                                       float* scores, int h, int kv_h, int n,   \
                                                       int d, long long head_stride,            \
                                                       float scale) {                           \
        omnikv::score_max<T>(q, keys, scores, h, kv_h, n, d, head_stride, scale);               \
    }                                                                                            \
    extern "C" __global__ void omnikv_gather_rows_##NAME(const T* src, const uint32_t* rows,    \
                                                         T* staging, long long head_stride,     \
                                                         int m, int d) {                        \
        omnikv::gather_rows<T>(src, rows, staging, head_stride, m, d);                          \
    }                                                                                            \
    extern "C" __global__ void omnikv_merge_rows_##NAME(const T* a, int na, const T* b, int nb, \
                                                        const uint32_t* order, T* staging,      \
                                                        int m, int d) {                         \
        omnikv::merge_rows<T>(a, na, b, nb, order, staging, m, d);                              \
    }                                                                                            \
    extern "C" __global__ void omnikv_flash_decode_split_##NAME(                                \
        const float* q, const T* keys, const T* values, const uint32_t* rows, int m, int h,     \
        int kv_h, long long k_head_stride, long long v_head_stride, int d, float scale,         \
        int rows_per_split, float* part_max, float* part_sum, float* part_acc) {                 \
        omnikv::flash_decode_split<T>(q, keys, values, rows, m, h, kv_h, k_head_stride,         \
                                      v_head_stride, d, scale, rows_per_split, part_max,        \
                                      part_sum, part_acc);                                       \
    }

OMNIKV_TYPED(f32, float)
OMNIKV_TYPED(f16, __half)
OMNIKV_TYPED(bf16, __nv_bfloat16)

extern "C" __global__ void omnikv_topk_threshold(const float* scores, int n, int k,
                                                 uint32_t* out) {
    omnikv::topk_threshold(scores, n, k, out);
}

extern "C" __global__ void omnikv_topk_compact(const float* scores, int n, const uint32_t* thr,
                                               uint32_t* selected) {
    omnikv::topk_compact(scores, n, thr, selected);
}

extern "C" __global__ void omnikv_flash_decode_merge(const float* part_max, const float* part_sum,
                                                     const float* part_acc, int splits, int d,
                                                     float* out) {
    omnikv::flash_decode_merge(part_max, part_sum, part_acc, splits, d, out);
}
