// Helpers of the row-wise transformer kernels (norm, activation, cross entropy, embedding,
// gradient norm, sampling): float conversion for the three element types, 16-byte packs, and
// warp and block reductions whose order is fixed (so that results are bit-identical run to run).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace tessera {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// N elements of T loaded or stored as one access of N * sizeof(T) bytes (16 for the vector paths).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
    T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_floats(const T* address, float (&out)[N]) {
    const Pack<T, N> pack = *reinterpret_cast<const Pack<T, N>*>(address);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_float(pack.v[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store_floats(T* address, const float (&in)[N]) {
    Pack<T, N> pack;
#pragma unroll
    for (int i = 0; i < N; ++i) pack.v[i] = from_float<T>(in[i]);
    *reinterpret_cast<Pack<T, N>*>(address) = pack;
}

// Elements per 16-byte vector.
template <typename T>
__host__ __device__ constexpr int vector_width() {
    return 16 / (int)sizeof(T);
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
    return x;
}

// Sum over the block, returned to every thread. `scratch` holds at least 32 floats; the block's
// size is a multiple of 32. Safe to call repeatedly with the same scratch.
__device__ __forceinline__ float block_sum(float x, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    x = warp_sum(x);
    __syncthreads();  // the previous call's readers are done with scratch
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(x);
}

__device__ __forceinline__ float block_max(float x, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    x = warp_max(x);
    __syncthreads();
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = lane < warps ? scratch[lane] : __int_as_float(0xff800000);  // -inf
    return warp_max(x);
}

// Two sums over the block at once (one pair of barriers instead of two); `scratch` holds at
// least 64 floats.
__device__ __forceinline__ float2 block_sum2(float2 x, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    x.x = warp_sum(x.x);
    x.y = warp_sum(x.y);
    __syncthreads();
    if (lane == 0) {
        scratch[2 * warp] = x.x;
        scratch[2 * warp + 1] = x.y;
    }
    __syncthreads();
    x = lane < warps ? make_float2(scratch[2 * lane], scratch[2 * lane + 1]) : make_float2(0.0f, 0.0f);
    x.x = warp_sum(x.x);
    x.y = warp_sum(x.y);
    return x;
}

}  // namespace tessera
