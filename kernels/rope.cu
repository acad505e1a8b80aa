// Rotary position embedding, forward and transposed (backward), for f32, bf16 and f16.
//
// One thread per rotated pair (token, head, pair index), grid-stride. The angle p·θ is formed in
// f64 and reduced modulo 2π (in half-turns) before the f32 sine and cosine (as the CPU twin does), so that large
// positions keep their precision; θ comes from a per-base table built in f64 on the host. Memory
// traffic: each element read once and written once; the op is bandwidth-bound.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

template <typename T>
__device__ __forceinline__ void rope(const T* __restrict__ x, T* __restrict__ out, const uint32_t* __restrict__ positions,
                                     const double* __restrict__ frequencies, uint64_t pairs, uint32_t heads,
                                     uint32_t head_dim, uint32_t groups, uint32_t interleaved, float sign) {
    const uint32_t half = head_dim / 2;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t n = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; n < pairs; n += stride) {
        const uint32_t i = (uint32_t)(n % half);
        const uint64_t token_head = n / half;
        const uint32_t h = (uint32_t)(token_head % heads);
        const uint64_t token = token_head / heads;
        const uint32_t group = (uint32_t)((uint64_t)h * groups / heads);
        const double angle = (double)positions[token] * frequencies[(uint64_t)group * half + i];
        // In half-turns, reduced to [-1, 1]: sincospif needs no slow argument reduction.
        const double half_turns = angle * (1.0 / 3.14159265358979323846);
        const float reduced = (float)(half_turns - 2.0 * round(0.5 * half_turns));
        float s, c;
        sincospif(reduced, &s, &c);
        s *= sign;
        const uint64_t base = token_head * head_dim;
        const uint64_t ia = base + (interleaved ? 2 * i : i);
        const uint64_t ib = base + (interleaved ? 2 * i + 1 : i + half);
        const float a = to_float(x[ia]);
        const float b = to_float(x[ib]);
        out[ia] = from_float<T>(a * c - b * s);
        out[ib] = from_float<T>(b * c + a * s);
    }
}

}  // namespace

#define ROPE_KERNEL(NAME, T)                                                                                        \
    extern "C" __global__ void __launch_bounds__(256)                                                               \
        NAME(const T* __restrict__ x, T* __restrict__ out, const uint32_t* __restrict__ positions,                  \
             const double* __restrict__ frequencies, uint64_t pairs, uint32_t heads, uint32_t head_dim,             \
             uint32_t groups, uint32_t interleaved, float sign) {                                                   \
        rope<T>(x, out, positions, frequencies, pairs, heads, head_dim, groups, interleaved, sign);                 \
    }

ROPE_KERNEL(rope_f32, float)
ROPE_KERNEL(rope_bf16, __nv_bfloat16)
ROPE_KERNEL(rope_f16, __half)
