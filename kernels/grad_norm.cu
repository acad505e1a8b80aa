// Global L2 norm over many gradient tensors, and clipping by a maximum norm, each in one launch
// over all tensors (plus a one-block finishing launch).
//
// Work split, as in adamw.cu: the host lays the tensors ("segments") end to end in blocks of
// BLOCK_ELEMENTS and passes a table of segments with each one's first block; a block finds its
// segment by binary search. grad_norm_partials: each block writes the f32 sum of squares of its
// elements (each thread UNROLL strided loads in flight, then a fixed-order block sum).
// grad_norm_finish: one block adds the partials in f64 in a fixed order, writes the norm and the
// clipping scale min(1, max_norm / (norm + 1e-6)) (1 when the norm is not finite: the gradients
// are left as they are, and the norm says why). grad_clip_scale multiplies every element by the
// scale, and returns at once when it is 1. Traffic: one read of every gradient; clipping adds a
// read and a write when the scale is below 1. Deterministic: no atomics.
#include "common/nn.cuh"

namespace {

constexpr int THREADS = 256;
constexpr int UNROLL = 16;
constexpr int BLOCK_ELEMENTS = THREADS * UNROLL;
constexpr int FINISH_THREADS = 1024;

}  // namespace

// Layout shared with src/ops/grad_norm.rs (#[repr(C)] GradSegment).
struct GradSegment {
    void* data;
    uint64_t numel;
    uint64_t first_block;
    uint32_t dtype;  // 0 f32, 1 bf16, 2 f16
    uint32_t padding;
};

namespace {

__device__ __forceinline__ const GradSegment& find_segment(const GradSegment* segments, uint32_t count) {
    __shared__ uint32_t index;
    if (threadIdx.x == 0) {
        uint32_t lo = 0, hi = count - 1;
        while (lo < hi) {
            const uint32_t mid = (lo + hi + 1) / 2;
            if (segments[mid].first_block <= blockIdx.x) lo = mid; else hi = mid - 1;
        }
        index = lo;
    }
    __syncthreads();
    return segments[index];
}

template <typename T>
__device__ __forceinline__ float block_squares(const T* data, uint64_t base, uint64_t numel) {
    float v[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        const uint64_t i = base + (uint64_t)(u * THREADS + threadIdx.x);
        v[u] = i < numel ? tessera::to_float(data[i]) : 0.0f;
    }
    float sum = 0.0f;
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) sum += v[u] * v[u];
    return sum;
}

template <typename T>
__device__ __forceinline__ void block_scale(T* data, uint64_t base, uint64_t numel, float scale) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        const uint64_t i = base + (uint64_t)(u * THREADS + threadIdx.x);
        if (i < numel) data[i] = tessera::from_float<T>(tessera::to_float(data[i]) * scale);
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS)
    grad_norm_partials(const GradSegment* __restrict__ segments, uint32_t segment_count, float* __restrict__ partials) {
    __shared__ float reduce[32];
    const GradSegment& s = find_segment(segments, segment_count);
    const uint64_t base = (blockIdx.x - s.first_block) * (uint64_t)BLOCK_ELEMENTS;
    float sum;
    if (s.dtype == 0) {
        sum = block_squares(static_cast<const float*>(s.data), base, s.numel);
    } else if (s.dtype == 1) {
        sum = block_squares(static_cast<const __nv_bfloat16*>(s.data), base, s.numel);
    } else {
        sum = block_squares(static_cast<const __half*>(s.data), base, s.numel);
    }
    sum = tessera::block_sum(sum, reduce);
    if (threadIdx.x == 0) partials[blockIdx.x] = sum;
}

// norm[0] = sqrt(sum of partials); scale[0] = the clipping factor (max_norm < 0: no clipping).
extern "C" __global__ void __launch_bounds__(FINISH_THREADS)
    grad_norm_finish(const float* __restrict__ partials, uint32_t count, float max_norm, float* __restrict__ norm,
                     float* __restrict__ scale) {
    __shared__ double reduce[32];
    double sum = 0.0;
    for (uint32_t i = threadIdx.x; i < count; i += FINISH_THREADS) sum += (double)partials[i];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (lane == 0) reduce[warp] = sum;
    __syncthreads();
    if (warp == 0) {
        sum = lane < FINISH_THREADS / 32 ? reduce[lane] : 0.0;
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
        if (lane == 0) {
            const float total = (float)sqrt(sum);
            *norm = total;
            float factor = 1.0f;
            if (max_norm >= 0.0f && isfinite(total)) factor = fminf(1.0f, max_norm / (total + 1e-6f));
            *scale = factor;
        }
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
    grad_clip_scale(const GradSegment* __restrict__ segments, uint32_t segment_count, const float* __restrict__ scale) {
    const float factor = *scale;
    if (factor == 1.0f) return;
    const GradSegment& s = find_segment(segments, segment_count);
    const uint64_t base = (blockIdx.x - s.first_block) * (uint64_t)BLOCK_ELEMENTS;
    if (s.dtype == 0) {
        block_scale(static_cast<float*>(s.data), base, s.numel, factor);
    } else if (s.dtype == 1) {
        block_scale(static_cast<__nv_bfloat16*>(s.data), base, s.numel, factor);
    } else {
        block_scale(static_cast<__half*>(s.data), base, s.numel, factor);
    }
}
