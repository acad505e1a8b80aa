// The many-token 2:4 sparse GEMM y = x·W_sᵀ (+ bias) (+ y when `accumulate`) for Hopper (sm_90a):
// TMA loads into a shared-memory ring that mbarriers hand between a producer warp and two
// consumer warpgroups, the products on the sparse form of wgmma (wgmma.mma_async.sp, m64n128k32,
// bf16 and f16, f32 accumulation). src/ops/sparse.rs runs it for calls above the few-token
// threshold when `SparseKernel::Hopper` is selected; every other call (and, until a GPU run has
// measured this kernel, every call by default) runs the mma.sp kernels of sparse_nm.cu.
//
// Operands: the sparse A is W_s (rows = output features), B is xᵀ (K x tokens, K-major: rows of
// x), D is yᵀ, stored transposed. A is read from registers (the RS form of wgmma.mma_async.sp):
// the PTX ISA's register fragment of the sparse m64nNk32 A (per warp w of the warpgroup, rows
// 16w..16w+15) is, warp by warp, the A fragment of mma.sp.m16n8k32, and so is its metadata
// register (rows g and g + 8, sparsity selector = k-step within a 64-column block). The compressed
// format of src/ops/sparse.rs stores values and metadata in exactly that order, so TMA copies its
// tiles unchanged and each lane takes its A registers of both k-steps of a 64-column block with
// one 16-byte shared-memory load per row (g and g + 8), its metadata with one 4-byte load. No
// second layout of the weight exists.
//
// CTA: 3 warpgroups (384 threads), 256 rows of W_s x 128 tokens. Warpgroup 0 is the producer:
// one thread issues the TMA copies of every 64-column k-block (values 256 rows x 64 bytes,
// metadata 16 tiles x 128 bytes, x 128 tokens x 128 bytes with the 128-byte swizzle) into a ring
// of STAGES stages; the group gives its registers to the consumers (setmaxnreg). Warpgroups 1 and
// 2 own 128 rows each (two 64-row slices) and all 128 tokens: per k-block each issues 4
// wgmma.mma_async.sp m64n128k32 (2 slices x 2 k-steps) as one group, keeps it in flight while it
// issues the next k-block's, then releases its stage.
//
// Out of range: rows past n read TMA's zero fill as values, and their metadata (zero fill, which
// the ISA calls invalid) is replaced by a valid code in registers; tokens past m read zeros. Neither
// is stored.
//
// Epilogue: the accumulators plus the bias (f32) are written transposed into shared memory (the
// ring, free by then), then each warpgroup writes its 128 tokens x 128 features to y with 16-byte
// stores (adding y's values first when accumulating, one rounding of the sum).
//
// Tensor maps (built by src/ops/sparse.rs): values 2-d (k/2, n) 16-bit, box (32, 256); metadata
// 2-d (32 · k/64, n/16) u32, box (32, 16); x 2-d (k, m) 16-bit, box (64, 128), 128-byte swizzle.
// Zero fill out of bounds.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// Threads per CTA: the producer warpgroup and two consumer warpgroups.
constexpr int SPARSE_SM90_THREADS = 384;

// The layout of CUtensorMap: 128 opaque bytes, passed by value as a __grid_constant__ parameter.
struct alignas(64) SparseTensorMap {
    unsigned long long opaque[16];
};

// Layout shared with src/ops/sparse.rs (#[repr(C)] HopperParams).
struct SparseHopperParams {
    const void* bias;  // n elements of the input dtype, or null
    void* y;           // (m, n)
    int m;
    int n;
    int k;
    int accumulate;
};

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)

namespace {

constexpr int ROWS = 256;    // rows of W_s per CTA: 2 consumer warpgroups x 2 slices of 64
constexpr int TOKENS = 128;  // tokens per CTA (the wgmma's N)
constexpr int STAGES = 4;
constexpr uint32_t X_BYTES = TOKENS * 128;           // 64 columns of x per token
constexpr uint32_t VALUE_BYTES = ROWS * 64;          // 32 kept values per row
constexpr uint32_t META_BYTES = ROWS / 16 * 32 * 4;  // 32 words per 16-row tile
// x first: its 128-byte swizzle repeats every 1024 bytes, which TMA and the descriptor assume
// aligned; the stage size is a multiple of 1024.
constexpr uint32_t STAGE_BYTES = X_BYTES + VALUE_BYTES + META_BYTES;
static_assert(STAGE_BYTES % 1024 == 0, "stages keep the x tile 1024-byte aligned");
// The epilogue's f32 tile per consumer warpgroup: 128 tokens x 128 features, rows padded by 4
// floats so that the 4 token rows of one store instruction start 8 banks apart.
constexpr int OUT_STRIDE = 128 + 4;
static_assert(2 * TOKENS * OUT_STRIDE * 4 <= STAGES * STAGE_BYTES, "the epilogue tiles fit in the ring");
// A metadata word whose every nibble names positions 0 and 1: stands in for the zero fill of
// row tiles past n (0b0000 is an invalid code).
constexpr uint32_t PLACEHOLDER_META = 0x44444444u;

__device__ __forceinline__ uint32_t smem(const void* pointer) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

__device__ __forceinline__ void barrier_init(uint64_t* bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem(bar)), "r"(count) : "memory");
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

// Copies the box at (c0, c1) of `map` into shared memory; completes on `bar`.
__device__ __forceinline__ void tma_load(void* dst, const SparseTensorMap* map, uint64_t* bar, int c0, int c1) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
            smem(dst)),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(smem(bar))
        : "memory");
}

// A barrier among `threads` threads of the CTA (the consumers), leaving out the producer.
__device__ __forceinline__ void named_barrier(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Shared-memory matrix descriptor (PTX ISA, wgmma "matrix descriptor"): start address >> 4 in
// bits 0-13, leading byte offset >> 4 in 16-29 (unused by the swizzled K-major layout), stride
// byte offset >> 4 in 32-45 (1024: from one 8-row group to the next), base offset 0 (the tile is
// 1024-byte aligned), 128-byte swizzle (1) in bits 62-63.
__device__ __forceinline__ uint64_t descriptor(uint32_t address) {
    return (uint64_t)((address & 0x3FFFF) >> 4) | ((uint64_t)(16 >> 4) << 16) | ((uint64_t)(1024 >> 4) << 32) |
           (1ull << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// Waits until at most one commit group of this warpgroup is still in flight.
__device__ __forceinline__ void wgmma_wait_one() { asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory"); }

// Keeps the compiler from moving reads or writes of accumulator registers across the
// asynchronous wgmma that owns them.
template <int N>
__device__ __forceinline__ void fence_registers(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// d (64 rows x 128 tokens) += A·B: A 2:4-sparse (64 x 32) from registers with its metadata `e`
// (sparsity selector SEL: lanes 4g + 2·SEL and 4g + 2·SEL + 1 supply it), B (32 x 128) from
// shared memory, K-major. Register 4i + j of d holds row 16w + g + 8·(j / 2), token
// 8i + 2c + j % 2 (warp w of the warpgroup, g = lane / 4, c = lane % 4).
template <typename T, int SEL>
struct SparseWgmma;

#define TESSERA_SPARSE_WGMMA(T, TY, SEL)                                                                           \
    template <>                                                                                                    \
    struct SparseWgmma<T, SEL> {                                                                                   \
        static __device__ __forceinline__ void rs_n128(float (&d)[64], const uint32_t (&a)[4], uint64_t b,        \
                                                       uint32_t e) {                                               \
            asm volatile(                                                                                          \
                "{\n.reg .pred p;\nsetp.ne.b32 p, %70, 0;\n"                                                       \
                "wgmma.mma_async.sp.sync.aligned.m64n128k32.f32" TY TY                                             \
                " {"                                                                                               \
                "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"                            \
                "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"                  \
                "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"                   \
                "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"                    \
                "}, {%64, %65, %66, %67}, %68, %69, " #SEL ", p, 1, 1, 0;\n}\n"                                    \
                : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),  \
                  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),         \
                  "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]),       \
                  "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]),       \
                  "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),       \
                  "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]),       \
                  "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]),       \
                  "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),       \
                  "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])        \
                : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(e), "r"(1));                             \
        }                                                                                                          \
    };

TESSERA_SPARSE_WGMMA(__nv_bfloat16, ".bf16", 0)
TESSERA_SPARSE_WGMMA(__nv_bfloat16, ".bf16", 1)
TESSERA_SPARSE_WGMMA(__half, ".f16", 0)
TESSERA_SPARSE_WGMMA(__half, ".f16", 1)

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }

// Two floats rounded to T and packed, the lower one in the low half.
template <typename T> __device__ __forceinline__ uint32_t pack(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack<__nv_bfloat16>(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack<__half>(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
}

// The two 16-bit values of a packed word as floats.
template <typename T>
__device__ __forceinline__ float2 unpack(uint32_t word) {
    const T* v = reinterpret_cast<const T*>(&word);
    return make_float2(to_float(v[0]), to_float(v[1]));
}

template <typename T>
__device__ __forceinline__ void sparse_gemm_sm90(const SparseTensorMap* map_values, const SparseTensorMap* map_meta,
                                                 const SparseTensorMap* map_x, const SparseHopperParams& p) {
    __shared__ uint64_t full[STAGES];   // the stage's copies have landed
    __shared__ uint64_t empty[STAGES];  // both consumer warpgroups are done with the stage
    extern __shared__ unsigned char dynamic_shared[];
    // Offset from the array itself (not through an integer cast), so that the compiler keeps
    // the accesses in the shared address space.
    unsigned char* const ring = dynamic_shared + ((1024 - (smem(dynamic_shared) & 1023)) & 1023);

    const int row0 = blockIdx.x * ROWS, token0 = blockIdx.y * TOKENS;
    const int blocks = p.k / 64;

    if (threadIdx.x == 0) {
#pragma unroll
        for (int s = 0; s < STAGES; ++s) {
            barrier_init(&full[s], 1);
            barrier_init(&empty[s], 2 * 128);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    const int warpgroup = threadIdx.x / 128;
    if (warpgroup == 0) {
        // Producer: one thread issues the copies; the group keeps few registers.
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
        if (threadIdx.x == 0) {
            for (int b = 0; b < blocks; ++b) {
                const int s = b % STAGES;
                // The (b / STAGES)-th reuse of stage s waits for the consumers' release of the
                // previous one, phase b / STAGES - 1.
                if (b >= STAGES) barrier_wait(&empty[s], (uint32_t)(b / STAGES - 1) & 1);
                barrier_arrive_expect(&full[s], STAGE_BYTES);
                unsigned char* const stage = ring + s * STAGE_BYTES;
                tma_load(stage, map_x, &full[s], b * 64, token0);
                tma_load(stage + X_BYTES, map_values, &full[s], b * 32, row0);
                tma_load(stage + X_BYTES + VALUE_BYTES, map_meta, &full[s], b * 32, row0 / 16);
            }
        }
        return;
    }

    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
    const int consumer = warpgroup - 1;
    const int t = threadIdx.x % 128, warp = t / 32, lane = t % 32, g = lane / 4, c = lane % 4;
    // This warp's rows of slice `sl`, relative to the CTA: slice_row[sl] + g and + g + 8.
    int slice_row[2];
    bool slice_live[2];
#pragma unroll
    for (int sl = 0; sl < 2; ++sl) {
        slice_row[sl] = consumer * 128 + sl * 64 + warp * 16;
        // n is a multiple of 16: a warp's 16 rows are all inside or all past it.
        slice_live[sl] = row0 + slice_row[sl] < p.n;
    }

    float acc[2][64];
#pragma unroll
    for (int sl = 0; sl < 2; ++sl) {
#pragma unroll
        for (int i = 0; i < 64; ++i) acc[sl][i] = 0.0f;
    }

    // Issues the 4 wgmmas of k-block b (one commit group) with its A registers and metadata in
    // `a` and `e`, which must stay untouched until that group has completed.
    auto issue = [&](int b, uint32_t (&a)[2][2][4], uint32_t (&e)[2]) {
        const int s = b % STAGES;
        barrier_wait(&full[s], (uint32_t)(b / STAGES) & 1);
        const unsigned char* const stage = ring + s * STAGE_BYTES;
        const uint32_t x_address = smem(stage);
        // Values: row r of the tile at r · 64 bytes, lane c's 16 bytes at c · 16 (the format's
        // order: words 0, 1 are a0a1 and a4a5 of k-step 0, words 2, 3 those of k-step 1).
#pragma unroll
        for (int sl = 0; sl < 2; ++sl) {
            const int r = slice_row[sl] + g;
            const uint4 lo = *reinterpret_cast<const uint4*>(stage + X_BYTES + r * 64 + c * 16);
            const uint4 hi = *reinterpret_cast<const uint4*>(stage + X_BYTES + (r + 8) * 64 + c * 16);
            a[sl][0][0] = lo.x;
            a[sl][0][1] = hi.x;
            a[sl][0][2] = lo.y;
            a[sl][0][3] = hi.y;
            a[sl][1][0] = lo.z;
            a[sl][1][1] = hi.z;
            a[sl][1][2] = lo.w;
            a[sl][1][3] = hi.w;
            const uint32_t word =
                *reinterpret_cast<const uint32_t*>(stage + X_BYTES + VALUE_BYTES + (slice_row[sl] / 16 * 32 + lane) * 4);
            e[sl] = slice_live[sl] ? word : PLACEHOLDER_META;
        }
        fence_registers(acc[0]);
        fence_registers(acc[1]);
        wgmma_fence();
        // k-step 0 reads columns 0..31 of the block (bytes 0..63 of each x row), step 1 the rest.
        SparseWgmma<T, 0>::rs_n128(acc[0], a[0][0], descriptor(x_address), e[0]);
        SparseWgmma<T, 0>::rs_n128(acc[1], a[1][0], descriptor(x_address), e[1]);
        SparseWgmma<T, 1>::rs_n128(acc[0], a[0][1], descriptor(x_address + 64), e[0]);
        SparseWgmma<T, 1>::rs_n128(acc[1], a[1][1], descriptor(x_address + 64), e[1]);
        wgmma_commit();
    };
    // One k-block's group stays in flight while the next one's registers are loaded and issued:
    // two register sets, alternating (unrolled by two, so that each set is a fixed set of
    // registers), and a stage is released once the group that read it has completed.
    uint32_t a_even[2][2][4], a_odd[2][2][4], e_even[2], e_odd[2];
    issue(0, a_even, e_even);
    for (int b = 1; b < blocks; b += 2) {
        issue(b, a_odd, e_odd);
        wgmma_wait_one();
        barrier_arrive(&empty[(b - 1) % STAGES]);
        if (b + 1 < blocks) {
            issue(b + 1, a_even, e_even);
            wgmma_wait_one();
            barrier_arrive(&empty[b % STAGES]);
        }
    }
    wgmma_wait_all();
    fence_registers(acc[0]);
    fence_registers(acc[1]);
    barrier_arrive(&empty[(blocks - 1) % STAGES]);

    // Every copy has landed and been read: the ring is free for the epilogue once both consumer
    // warpgroups are past their last k-block.
    named_barrier(1, 256);
    float* const tile = reinterpret_cast<float*>(ring) + consumer * TOKENS * OUT_STRIDE;
    const T* const bias = static_cast<const T*>(p.bias);
#pragma unroll
    for (int sl = 0; sl < 2; ++sl) {
        float b[2] = {0.0f, 0.0f};
        if (bias != nullptr && slice_live[sl]) {
            b[0] = to_float(bias[row0 + slice_row[sl] + g]);
            b[1] = to_float(bias[row0 + slice_row[sl] + g + 8]);
        }
        // Feature (relative to the warpgroup's 128) sl·64 + 16·warp + g + 8·(j / 2), token
        // 8i + 2c + j % 2.
#pragma unroll
        for (int i = 0; i < 16; ++i) {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int feature = sl * 64 + warp * 16 + g + 8 * (j / 2);
                const int token = 8 * i + 2 * c + (j % 2);
                tile[token * OUT_STRIDE + feature] = acc[sl][4 * i + j] + b[j / 2];
            }
        }
    }
    named_barrier(2 + consumer, 128);

    // 128 tokens x 16 chunks of 8 features, 16 per thread; half a warp covers one token's row.
    T* const y = static_cast<T*>(p.y);
    const int feature0 = row0 + consumer * 128;
#pragma unroll 4
    for (int it = 0; it < TOKENS * 16 / 128; ++it) {
        const int q = it * 128 + t;
        const int token = q / 16, chunk = q % 16;
        const int global_token = token0 + token, feature = feature0 + chunk * 8;
        // n is a multiple of 16: a chunk of 8 features is all inside or all past it.
        if (global_token >= p.m || feature >= p.n) continue;
        const float4 v0 = *reinterpret_cast<const float4*>(tile + token * OUT_STRIDE + chunk * 8);
        const float4 v1 = *reinterpret_cast<const float4*>(tile + token * OUT_STRIDE + chunk * 8 + 4);
        float v[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
        uint4* const out = reinterpret_cast<uint4*>(y + (int64_t)global_token * p.n + feature);
        if (p.accumulate) {
            const uint4 old = *out;
            const uint32_t words[4] = {old.x, old.y, old.z, old.w};
#pragma unroll
            for (int w = 0; w < 4; ++w) {
                const float2 f = unpack<T>(words[w]);
                v[2 * w] += f.x;
                v[2 * w + 1] += f.y;
            }
        }
        *out = make_uint4(pack<T>(v[0], v[1]), pack<T>(v[2], v[3]), pack<T>(v[4], v[5]), pack<T>(v[6], v[7]));
    }
}

}  // namespace

#define SPARSE_SM90_BODY(T) sparse_gemm_sm90<T>(&map_values, &map_meta, &map_x, p);

#else

// The sm_80 and compute_80 images export the same entry points without a body: the host
// launches them only on a device that loads the sm_90a image.
#define SPARSE_SM90_BODY(T)

#endif

#define SPARSE_SM90_KERNEL(NAME, T)                                                                              \
    extern "C" __global__ void __launch_bounds__(SPARSE_SM90_THREADS, 1) sparse24_gemm_sm90_##NAME(              \
        const __grid_constant__ SparseTensorMap map_values, const __grid_constant__ SparseTensorMap map_meta,     \
        const __grid_constant__ SparseTensorMap map_x, const SparseHopperParams p) {                              \
        SPARSE_SM90_BODY(T)                                                                                      \
    }

SPARSE_SM90_KERNEL(bf16, __nv_bfloat16)
SPARSE_SM90_KERNEL(f16, __half)
