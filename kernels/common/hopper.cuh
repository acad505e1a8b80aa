// Device helpers of the sm_90a kernels (attention_hopper.cu, attention_hopper_bwd.cu,
// sparse_nm_hopper.cu): mbarriers, TMA and bulk copies into shared memory, wgmma with f32
// accumulators, register fences, named barriers, setmaxnreg, and the 16-bit pack/widen helpers.
//
// Conventions every user follows (PTX ISA, "asynchronous warpgroup level matrix" and
// "cp.async.bulk.tensor"):
// - Tiles that TMA writes with the 128-byte swizzle and wgmma reads are stored as column blocks of
//   rows x 128 bytes, each block 1024-byte aligned (the swizzle's period), so that the
//   descriptors' base offset is 0.
// - Descriptor fields: start address >> 4 in bits 0-13, leading byte offset >> 4 in 16-29, stride
//   byte offset >> 4 in 32-45, base offset (0) in 49-51, swizzle mode in 62-63 (1: 128 bytes).
//   K-major operands: the stride byte offset steps from one 8-row group to the next (1024 bytes),
//   the leading byte offset is unused (16); a k16 step of 16-bit elements advances the start
//   address by 32 bytes inside the swizzled 128-byte row. MN-major operands (transpose bit set):
//   the leading byte offset steps from one 64-element column block to the next along M or N, the
//   stride byte offset from one 8-row group to the next along K.
// - f32 accumulator fragments: warp w of the warpgroup holds rows 16w..16w+15; register 4i + e
//   holds row 16w + g + 8·(e / 2), column 8i + 2c + e % 2 (g = lane / 4, c = lane % 4). An A
//   operand from registers has, warp by warp, the layout of mma.sync's m16n8k16 A fragment.
// - Ordinary shared-memory stores that TMA or the tensor cores read next need fence_proxy_async()
//   in each writing thread before the barrier that hands the data over.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace tessera {

// The layout of CUtensorMap: 128 opaque bytes, passed by value as a __grid_constant__ parameter.
// Every image declares it: the sm_80 and compute_80 images export the same entry points.
struct alignas(64) TensorMap {
    unsigned long long opaque[16];
};

// 16-bit values to and from f32; the sm_80 images use them too (the backward's prep kernel).
__device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float widen(__half x) { return __half2float(x); }

// Two floats rounded to T and packed, the lower one in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack<__nv_bfloat16>(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
}

template <>
__device__ __forceinline__ uint32_t pack<__half>(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
}

// The two 16-bit values of a packed word as floats.
template <typename T>
__device__ __forceinline__ float2 unpack(uint32_t word) {
    const T* v = reinterpret_cast<const T*>(&word);
    return make_float2(widen(v[0]), widen(v[1]));
}

}  // namespace tessera

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)

namespace tessera {

__device__ __forceinline__ uint32_t smem(const void* pointer) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// ---- mbarriers ------------------------------------------------------------------------------

__device__ __forceinline__ void barrier_init(uint64_t* bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem(bar)), "r"(count) : "memory");
}

// A ring of STAGES stages: full[s] completes on the producer's one arrival (with the bytes it
// announces), empty[s] on `consumers` arrivals.
template <int STAGES>
__device__ __forceinline__ void ring_init(uint64_t (&full)[STAGES], uint64_t (&empty)[STAGES], int consumers) {
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
        barrier_init(&full[s], 1);
        barrier_init(&empty[s], consumers);
    }
}

// Makes the initialised barriers visible to the copy engine (and the rest of the cluster) before
// the first copy that completes on them; a __syncthreads() after it publishes them to the CTA.
__device__ __forceinline__ void barrier_init_fence() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// One arrival that also announces `bytes` of copies that will complete on this phase.
__device__ __forceinline__ void barrier_arrive_expect(uint64_t* bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem(bar)), "r"(bytes)
                 : "memory");
}

__device__ __forceinline__ void barrier_arrive(uint64_t* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem(bar)) : "memory");
}

// Waits until the phase of parity `parity` has completed.
__device__ __forceinline__ void barrier_wait(uint64_t* bar, uint32_t parity) {
    uint32_t done = 0;
    while (!done) {
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(smem(bar)), "r"(parity)
            : "memory");
    }
}

// ---- copies into shared memory ----------------------------------------------------------------

// Copies the box at (c0, c1) of `map` to shared address `dst`; completes on `bar`. TMA always
// writes the whole box (zeros out of bounds), so the barrier expects the box's full size.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const TensorMap* map, uint64_t* bar, int c0, int c1) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
            dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(smem(bar))
        : "memory");
}

// The same for a 4-d map, box at (c0, c1, c2, c3).
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const TensorMap* map, uint64_t* bar, int c0, int c1, int c2,
                                            int c3) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
        "[%6];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(smem(bar))
        : "memory");
}

// Copies `bytes` (a multiple of 16, both addresses 16-byte aligned) from global memory into
// shared memory; completes on `bar`.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(smem(dst)),
        "l"(reinterpret_cast<uint64_t>(src)), "r"(bytes), "r"(smem(bar))
        : "memory");
}

// Orders this thread's earlier ordinary shared-memory stores before later reads and writes of
// the async proxy (TMA, wgmma) of the same memory.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// ---- named barriers and registers ---------------------------------------------------------------

// Barrier ID among THREADS threads (barrier 0 is __syncthreads'): sync waits for THREADS
// arrivals, its own included; arrive counts toward them without waiting.
template <int ID, int THREADS>
__device__ __forceinline__ void named_sync() {
    asm volatile("bar.sync %0, %1;\n" ::"n"(ID), "n"(THREADS) : "memory");
}
template <int ID, int THREADS>
__device__ __forceinline__ void named_arrive() {
    asm volatile("bar.arrive %0, %1;\n" ::"n"(ID), "n"(THREADS) : "memory");
}

// A warpgroup's register budget after the launch (the kernel needs __launch_bounds__(threads, 1)
// and each warpgroup's role in one branch, or the compiler ignores the request).
template <int REGISTERS>
__device__ __forceinline__ void registers_decrease() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(REGISTERS) : "memory");
}
template <int REGISTERS>
__device__ __forceinline__ void registers_increase() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(REGISTERS) : "memory");
}

// Keeps the compiler from moving reads or writes of accumulator registers across the
// asynchronous wgmma that owns them.
template <int N>
__device__ __forceinline__ void fence_registers(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// The same for A operands in registers, which an asynchronous wgmma reads until it completes:
// keeping them live up to the wait stops the compiler from reusing their registers earlier.
template <int N>
__device__ __forceinline__ void fence_registers(uint32_t (&r)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(r[i][e])::"memory");
    }
}

// ---- wgmma --------------------------------------------------------------------------------------

// Shared-memory matrix descriptor with the 128-byte swizzle and base offset 0 (see the header).
__device__ __forceinline__ uint64_t descriptor(uint32_t address, uint32_t leading, uint32_t stride) {
    return (uint64_t)((address & 0x3FFFF) >> 4) | ((uint64_t)(leading >> 4) << 16) |
           ((uint64_t)(stride >> 4) << 32) | (1ull << 62);
}

// A K-major tile of 16-bit elements: k16 step kk is 32 bytes into column block kk / 4 (blocks
// `block_bytes` apart); 8-row groups are 1024 bytes apart.
__device__ __forceinline__ uint64_t k_major(uint32_t tile, int kk, uint32_t block_bytes) {
    return descriptor(tile + (kk / 4) * block_bytes + (kk % 4) * 32, 16, 1024);
}

// An MN-major tile (the contraction along its rows, M or N along its 128-byte rows): k16 step kk
// is 16 rows (2048 bytes) down; 64-column blocks are `block_bytes` apart (leading byte offset),
// 8-row groups 1024 (stride byte offset).
__device__ __forceinline__ uint64_t mn_major(uint32_t tile, int kk, uint32_t block_bytes) {
    return descriptor(tile + kk * 16 * 128, block_bytes, 1024);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Waits until at most N of this warpgroup's committed wgmma groups are still running.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

#define TESSERA_WGMMA_ACC32(d, o)                                                                               \
    "+f"(d[o + 0]), "+f"(d[o + 1]), "+f"(d[o + 2]), "+f"(d[o + 3]), "+f"(d[o + 4]), "+f"(d[o + 5]),             \
        "+f"(d[o + 6]), "+f"(d[o + 7]), "+f"(d[o + 8]), "+f"(d[o + 9]), "+f"(d[o + 10]), "+f"(d[o + 11]),       \
        "+f"(d[o + 12]), "+f"(d[o + 13]), "+f"(d[o + 14]), "+f"(d[o + 15]), "+f"(d[o + 16]), "+f"(d[o + 17]),   \
        "+f"(d[o + 18]), "+f"(d[o + 19]), "+f"(d[o + 20]), "+f"(d[o + 21]), "+f"(d[o + 22]), "+f"(d[o + 23]),   \
        "+f"(d[o + 24]), "+f"(d[o + 25]), "+f"(d[o + 26]), "+f"(d[o + 27]), "+f"(d[o + 28]), "+f"(d[o + 29]),   \
        "+f"(d[o + 30]), "+f"(d[o + 31])
#define TESSERA_WGMMA_ACC64(d) TESSERA_WGMMA_ACC32(d, 0), TESSERA_WGMMA_ACC32(d, 32)
#define TESSERA_WGMMA_REGS32                                                                                   \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
    "%23, %24, %25, %26, %27, %28, %29, %30, %31"
#define TESSERA_WGMMA_REGS64                                                                                   \
    TESSERA_WGMMA_REGS32 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "   \
                         "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"

// wgmma.mma_async (dense) with f32 accumulators, T = __nv_bfloat16 or __half. ss: both operands
// K-major in shared memory, D = A·B (+ D when `accumulate`); rs: A from registers, B N-major in
// shared memory, D += A·B.
template <typename T>
struct Wgmma;

#define TESSERA_WGMMA_OPS(T, TY)                                                                                  \
    template <>                                                                                                   \
    struct Wgmma<T> {                                                                                             \
        static __device__ __forceinline__ void ss_n64(float (&d)[32], uint64_t a, uint64_t b, int accumulate) {  \
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                            \
                         "wgmma.mma_async.sync.aligned.m64n64k16.f32" TY TY " {" TESSERA_WGMMA_REGS32            \
                         "}, %32, %33, p, 1, 1, 0, 0;\n}\n"                                                       \
                         : TESSERA_WGMMA_ACC32(d, 0)                                                              \
                         : "l"(a), "l"(b), "r"(accumulate));                                                      \
        }                                                                                                         \
        static __device__ __forceinline__ void ss_n128(float (&d)[64], uint64_t a, uint64_t b, int accumulate) { \
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                            \
                         "wgmma.mma_async.sync.aligned.m64n128k16.f32" TY TY " {" TESSERA_WGMMA_REGS64           \
                         "}, %64, %65, p, 1, 1, 0, 0;\n}\n"                                                       \
                         : TESSERA_WGMMA_ACC64(d)                                                                 \
                         : "l"(a), "l"(b), "r"(accumulate));                                                      \
        }                                                                                                         \
        static __device__ __forceinline__ void rs_n64(float (&d)[32], const uint32_t (&a)[4], uint64_t b) {      \
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                            \
                         "wgmma.mma_async.sync.aligned.m64n64k16.f32" TY TY " {" TESSERA_WGMMA_REGS32            \
                         "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                                         \
                         : TESSERA_WGMMA_ACC32(d, 0)                                                              \
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));                           \
        }                                                                                                         \
        static __device__ __forceinline__ void rs_n128(float (&d)[64], const uint32_t (&a)[4], uint64_t b) {     \
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                            \
                         "wgmma.mma_async.sync.aligned.m64n128k16.f32" TY TY " {" TESSERA_WGMMA_REGS64           \
                         "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                                         \
                         : TESSERA_WGMMA_ACC64(d)                                                                 \
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));                           \
        }                                                                                                         \
    };

TESSERA_WGMMA_OPS(__nv_bfloat16, ".bf16")
TESSERA_WGMMA_OPS(__half, ".f16")

#undef TESSERA_WGMMA_OPS

}  // namespace tessera

#endif
