// Vector loads and stores shared by the memory-bound kernels: 16-byte f32x4 and 8-byte bf16x4
// accesses with the streaming cache hint, for data that is touched once per kernel.
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

namespace tessera {

__device__ __forceinline__ float4 load_f32x4_streaming(const float* address) {
    return __ldcs(reinterpret_cast<const float4*>(address));
}

__device__ __forceinline__ void store_f32x4_streaming(float* address, float4 value) {
    __stcs(reinterpret_cast<float4*>(address), value);
}

__device__ __forceinline__ float4 load_bf16x4_streaming(const __nv_bfloat16* address) {
    const uint2 raw = __ldcs(reinterpret_cast<const uint2*>(address));
    const float2 lo = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
    const float2 hi = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
    return make_float4(lo.x, lo.y, hi.x, hi.y);
}

__device__ __forceinline__ void store_bf16x4_streaming(__nv_bfloat16* address, float4 value) {
    const __nv_bfloat162 lo = __floats2bfloat162_rn(value.x, value.y);
    const __nv_bfloat162 hi = __floats2bfloat162_rn(value.z, value.w);
    uint2 raw;
    raw.x = *reinterpret_cast<const uint32_t*>(&lo);
    raw.y = *reinterpret_cast<const uint32_t*>(&hi);
    __stcs(reinterpret_cast<uint2*>(address), raw);
}

}  // namespace tessera
