// Fused AdamW: one pass over f32 master weights, f32 moments and f32 or bf16 gradients, for any
// number of tensors in one launch, optionally writing a bf16 copy of the updated weights.
//
// Work split: the host lays the tensors ("segments") end to end in blocks of BLOCK_ELEMENTS and
// passes a table of segments with the index of each one's first block. A block finds its segment
// by binary search (a few cached loads), then each thread updates UNROLL vectors of 4 elements,
// issuing all loads before any arithmetic so that 16 independent 16-byte loads are in flight.
// Memory traffic per element: 28 bytes (param, m, v read and written; f32 grad read), 26 with
// bf16 gradients, +2 for the bf16 copy. Nothing is read twice: the kernel is bandwidth-bound.
//
// The arithmetic follows PyTorch's fused AdamW step exactly, in f32:
//   p -= lr * wd * p;  m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g*g;
//   p -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
#include "common/vec.cuh"

namespace {

constexpr int THREADS = 256;
constexpr int VEC = 4;
constexpr int UNROLL = 4;
constexpr int BLOCK_ELEMENTS = THREADS * VEC * UNROLL;

constexpr uint32_t GRAD_IS_BF16 = 1u;
constexpr uint32_t VECTOR_ALIGNED = 2u;

}  // namespace

// Layout shared with src/ops/adamw.rs (#[repr(C)] AdamWSegment).
struct AdamWSegment {
    float* param;
    const void* grad;
    float* exp_avg;
    float* exp_avg_sq;
    __nv_bfloat16* param_bf16;  // optional: null when no copy is wanted
    uint64_t numel;
    uint64_t first_block;
    float weight_decay;
    uint32_t flags;
};

// Layout shared with src/ops/adamw.rs (#[repr(C)] AdamWHyper).
struct AdamWHyper {
    float lr;
    float beta1;
    float beta2;
    float eps;
    float step_size;              // lr / (1 - beta1^t)
    float bias_correction2_sqrt;  // sqrt(1 - beta2^t)
    float grad_scale;
    uint32_t segment_count;
};

namespace {

__device__ __forceinline__ void adamw_update(float& p, float g, float& m, float& v, float weight_decay,
                                             const AdamWHyper& h) {
    g *= h.grad_scale;
    p -= h.lr * weight_decay * p;
    m = h.beta1 * m + (1.0f - h.beta1) * g;
    v = h.beta2 * v + (1.0f - h.beta2) * g * g;
    const float denom = sqrtf(v) / h.bias_correction2_sqrt + h.eps;
    p -= h.step_size * m / denom;
}

__device__ __forceinline__ void adamw_update4(float4& p, float4 g, float4& m, float4& v, float weight_decay,
                                              const AdamWHyper& h) {
    adamw_update(p.x, g.x, m.x, v.x, weight_decay, h);
    adamw_update(p.y, g.y, m.y, v.y, weight_decay, h);
    adamw_update(p.z, g.z, m.z, v.z, weight_decay, h);
    adamw_update(p.w, g.w, m.w, v.w, weight_decay, h);
}

template <bool GradIsBf16>
__device__ __forceinline__ float4 load_grad4(const void* grad, uint64_t i) {
    if constexpr (GradIsBf16) {
        return tessera::load_bf16x4_streaming(static_cast<const __nv_bfloat16*>(grad) + i);
    } else {
        return tessera::load_f32x4_streaming(static_cast<const float*>(grad) + i);
    }
}

template <bool GradIsBf16>
__device__ __forceinline__ float load_grad(const void* grad, uint64_t i) {
    if constexpr (GradIsBf16) {
        return __bfloat162float(static_cast<const __nv_bfloat16*>(grad)[i]);
    } else {
        return static_cast<const float*>(grad)[i];
    }
}

// A whole block of aligned elements: no bounds checks, 16-byte accesses.
template <bool GradIsBf16>
__device__ __forceinline__ void update_full_block(const AdamWSegment& s, uint64_t base, const AdamWHyper& h) {
    float4 p[UNROLL], g[UNROLL], m[UNROLL], v[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        const uint64_t i = base + (uint64_t)(u * THREADS + threadIdx.x) * VEC;
        p[u] = tessera::load_f32x4_streaming(s.param + i);
        g[u] = load_grad4<GradIsBf16>(s.grad, i);
        m[u] = tessera::load_f32x4_streaming(s.exp_avg + i);
        v[u] = tessera::load_f32x4_streaming(s.exp_avg_sq + i);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        const uint64_t i = base + (uint64_t)(u * THREADS + threadIdx.x) * VEC;
        adamw_update4(p[u], g[u], m[u], v[u], s.weight_decay, h);
        tessera::store_f32x4_streaming(s.param + i, p[u]);
        tessera::store_f32x4_streaming(s.exp_avg + i, m[u]);
        tessera::store_f32x4_streaming(s.exp_avg_sq + i, v[u]);
        if (s.param_bf16 != nullptr) tessera::store_bf16x4_streaming(s.param_bf16 + i, p[u]);
    }
}

// The last, partial block of a segment, or a segment whose pointers are not 16-byte aligned.
template <bool GradIsBf16>
__device__ __forceinline__ void update_partial_block(const AdamWSegment& s, uint64_t base, const AdamWHyper& h) {
    const uint64_t end = min(base + (uint64_t)BLOCK_ELEMENTS, s.numel);
    for (uint64_t i = base + threadIdx.x; i < end; i += THREADS) {
        float p = s.param[i], m = s.exp_avg[i], v = s.exp_avg_sq[i];
        adamw_update(p, load_grad<GradIsBf16>(s.grad, i), m, v, s.weight_decay, h);
        s.param[i] = p;
        s.exp_avg[i] = m;
        s.exp_avg_sq[i] = v;
        if (s.param_bf16 != nullptr) s.param_bf16[i] = __float2bfloat16_rn(p);
    }
}

template <bool GradIsBf16>
__device__ __forceinline__ void update_block(const AdamWSegment& s, uint64_t base, const AdamWHyper& h) {
    if ((s.flags & VECTOR_ALIGNED) && base + BLOCK_ELEMENTS <= s.numel) {
        update_full_block<GradIsBf16>(s, base, h);
    } else {
        update_partial_block<GradIsBf16>(s, base, h);
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS) adamw_step(const AdamWSegment* __restrict__ segments,
                                                                 AdamWHyper h) {
    __shared__ uint32_t segment_index;
    if (threadIdx.x == 0) {
        // Last segment whose first block is at or before this block.
        uint32_t lo = 0, hi = h.segment_count - 1;
        while (lo < hi) {
            const uint32_t mid = (lo + hi + 1) / 2;
            if (segments[mid].first_block <= blockIdx.x) lo = mid; else hi = mid - 1;
        }
        segment_index = lo;
    }
    __syncthreads();
    const AdamWSegment s = segments[segment_index];
    const uint64_t base = (blockIdx.x - s.first_block) * (uint64_t)BLOCK_ELEMENTS;
    if (s.flags & GRAD_IS_BF16) {
        update_block<true>(s, base, h);
    } else {
        update_block<false>(s, base, h);
    }
}
