// One decode step of attention against a key/value cache, with every per-step value read from
// device memory: the new query's position `p` (and so the key count p + 1) comes from a u32 in
// device memory, never from a launch argument, and the grid does not depend on it, so that one
// captured launch serves every step of a CUDA graph.
//
// attention_decode: one block per query head (the batch folded into the heads). The cache holds
// keys position-major, row j = (batch · heads_kv · head_dim) elements; query head `qh` reads key
// head `qh / group`. The visible keys of position p form at most two runs, [0, first) and
// [second, p + 1) (causal: all; window: from p − left; Λ: the globals and the last `window`),
// numbered t = 0 .. count. Eight lanes share one key: each holds up to four 8-element chunks of
// the head (chunk c = lane % 8 + 8 i), so a key's dot product takes three shuffles, and the block's
// 32 lane groups take keys t, t + 32, ... with an online softmax (exp2, f32) each. The groups'
// states merge in shared memory at the end; the output is rounded once.
//
// kv_append: row p of the cache (`row` elements) = the step's new row.
//
// decode_advance: adds 1 to each of `n` positions, the last node of a decode step, so that the
// next replay reads the next position without a copy from the host.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

#include "common/nn.cuh"

namespace {

constexpr int THREADS = 256;
constexpr int LANES_PER_KEY = 8;
constexpr int GROUPS = THREADS / LANES_PER_KEY;
constexpr int CHUNK = 8;
// Chunks per lane: head_dim ≤ 256 = 8 lanes × 4 chunks × 8 elements.
constexpr int CHUNKS = 4;
constexpr int MAX_HEAD_DIM = LANES_PER_KEY * CHUNKS * CHUNK;

template <typename T>
__device__ __forceinline__ void load8(const T* address, float (&out)[CHUNK]) {
    static_assert(sizeof(T) == 2, "16-bit elements");
    const uint4 raw = *reinterpret_cast<const uint4*>(address);
    const T* values = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < CHUNK; ++i) out[i] = tessera::to_float(values[i]);
}

template <typename T>
__device__ __forceinline__ void decode(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                       T* __restrict__ out, const uint32_t* __restrict__ position, int group,
                                       int head_dim, int64_t row, int capacity, float scale_log2, int mask_kind,
                                       int left, int global, int window) {
    __shared__ float state_m[GROUPS];
    __shared__ float state_l[GROUPS];
    __shared__ float state_acc[GROUPS * MAX_HEAD_DIM];

    const int head = blockIdx.x;
    const int kv_head = head / group;
    const int lane_group = threadIdx.x / LANES_PER_KEY;
    const int sub = threadIdx.x % LANES_PER_KEY;
    const int chunks = head_dim / CHUNK;

    // Keys 0 ..= p are in the cache; a position past the cache (never written by the host) reads
    // no key rather than out of bounds.
    const int64_t p = min(int64_t(position[0]), int64_t(capacity) - 1);
    const int64_t n = p + 1;
    int64_t first = 0;
    int64_t second = 0;
    if (mask_kind == 2) {
        second = max(int64_t(0), p - left);
    } else if (mask_kind == 3) {
        first = min(int64_t(global), n);
        second = max(first, p - window + 1);
    }
    const int64_t count = first + (n - second);

    float qv[CHUNKS][CHUNK];
    float acc[CHUNKS][CHUNK];
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
        const int chunk = sub + LANES_PER_KEY * c;
#pragma unroll
        for (int i = 0; i < CHUNK; ++i) {
            qv[c][i] = 0.0f;
            acc[c][i] = 0.0f;
        }
        if (chunk < chunks) load8(q + int64_t(head) * head_dim + chunk * CHUNK, qv[c]);
    }

    // The lane groups of one warp take keys warp_first + 0..3 of each round of 32, so that every
    // lane of a warp runs the loop (and its full-mask shuffles) equally often; a group whose key
    // lies past the end adds nothing.
    const int64_t warp_first = (threadIdx.x / 32) * (32 / LANES_PER_KEY);
    const int in_warp = lane_group % (32 / LANES_PER_KEY);
    float m = -INFINITY;
    float l = 0.0f;
    for (int64_t round = warp_first; round < count; round += GROUPS) {
        const int64_t t = round + in_warp;
        const bool valid = t < count;
        const int64_t j = t < first ? t : second + (t - first);
        const int64_t base = j * row + int64_t(kv_head) * head_dim;
        float dot = 0.0f;
        if (valid) {
#pragma unroll
            for (int c = 0; c < CHUNKS; ++c) {
                const int chunk = sub + LANES_PER_KEY * c;
                if (chunk < chunks) {
                    float kv[CHUNK];
                    load8(k + base + chunk * CHUNK, kv);
#pragma unroll
                    for (int i = 0; i < CHUNK; ++i) dot = fmaf(qv[c][i], kv[i], dot);
                }
            }
        }
        // The eight lanes of a key are consecutive and aligned to 8 within the warp.
#pragma unroll
        for (int offset = LANES_PER_KEY / 2; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
        if (valid) {
            const float s = dot * scale_log2;
            const float m_new = fmaxf(m, s);
            const float correction = exp2f(m - m_new);
            const float weight = exp2f(s - m_new);
            l = l * correction + weight;
#pragma unroll
            for (int c = 0; c < CHUNKS; ++c) {
                const int chunk = sub + LANES_PER_KEY * c;
                if (chunk < chunks) {
                    float vv[CHUNK];
                    load8(v + base + chunk * CHUNK, vv);
#pragma unroll
                    for (int i = 0; i < CHUNK; ++i) acc[c][i] = fmaf(weight, vv[i], acc[c][i] * correction);
                }
            }
            m = m_new;
        }
    }
    if (sub == 0) {
        state_m[lane_group] = m;
        state_l[lane_group] = l;
    }
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
        const int chunk = sub + LANES_PER_KEY * c;
        if (chunk < chunks) {
#pragma unroll
            for (int i = 0; i < CHUNK; ++i) state_acc[lane_group * MAX_HEAD_DIM + chunk * CHUNK + i] = acc[c][i];
        }
    }
    __syncthreads();
    for (int d = threadIdx.x; d < head_dim; d += THREADS) {
        float m_all = -INFINITY;
        for (int g = 0; g < GROUPS; ++g) m_all = fmaxf(m_all, state_m[g]);
        float sum = 0.0f;
        float total = 0.0f;
        if (m_all != -INFINITY) {
            for (int g = 0; g < GROUPS; ++g) {
                const float w = exp2f(state_m[g] - m_all);
                total += state_l[g] * w;
                sum += state_acc[g * MAX_HEAD_DIM + d] * w;
            }
        }
        out[int64_t(head) * head_dim + d] = tessera::from_float<T>(total > 0.0f ? sum / total : 0.0f);
    }
}

template <typename T>
__device__ __forceinline__ void append(const T* __restrict__ src, T* __restrict__ dst,
                                       const uint32_t* __restrict__ position, int64_t row, int capacity) {
    const int64_t p = int64_t(position[0]);
    if (p >= capacity) return;
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < row; i += int64_t(gridDim.x) * blockDim.x) {
        dst[p * row + i] = src[i];
    }
}

}  // namespace

#define DECODE_KERNELS(T, NAME)                                                                                 \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                      \
        attention_decode_##NAME(const T* q, const T* k, const T* v, T* out, const uint32_t* position, int group, \
                                int head_dim, int64_t row, int capacity, float scale_log2, int mask_kind,        \
                                int left, int global, int window) {                                             \
        decode<T>(q, k, v, out, position, group, head_dim, row, capacity, scale_log2, mask_kind, left, global,   \
                  window);                                                                                       \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                      \
        kv_append_##NAME(const T* src, T* dst, const uint32_t* position, int64_t row, int capacity) {           \
        append<T>(src, dst, position, row, capacity);                                                            \
    }

extern "C" __global__ void __launch_bounds__(THREADS) decode_advance(uint32_t* positions, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) positions[i] += 1u;
}

DECODE_KERNELS(__nv_bfloat16, bf16)
DECODE_KERNELS(__half, f16)
