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
#include "common/hopper.cuh"

// Threads per CTA: the producer warpgroup and two consumer warpgroups.
constexpr int SPARSE_SM90_THREADS = 384;

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

using namespace tessera;

// d (64 rows x 128 tokens) += A·B: A 2:4-sparse (64 x 32) from registers with its metadata `e`
// (sparsity selector SEL: lanes 4g + 2·SEL and 4g + 2·SEL + 1 supply it), B (32 x 128) from
// shared memory, K-major. Register 4i + j of d holds row 16w + g + 8·(j / 2), token
// 8i + 2c + j % 2 (warp w of the warpgroup, g = lane / 4, c = lane % 4).
template <typename T, int SEL>
struct SparseWgmma;

#define TESSERA_SPARSE_WGMMA(T, TY, SEL)                                                                       \
    template <>                                                                                                \
    struct SparseWgmma<T, SEL> {                                                                               \
        static __device__ __forceinline__ void rs_n128(float (&d)[64], const uint32_t (&a)[4], uint64_t b,    \
                                                       uint32_t e) {                                           \
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %70, 0;\n"                                        \
                         "wgmma.mma_async.sp.sync.aligned.m64n128k32.f32" TY TY " {" TESSERA_WGMMA_REGS64     \
                         "}, {%64, %65, %66, %67}, %68, %69, " #SEL ", p, 1, 1, 0;\n}\n"                      \
                         : TESSERA_WGMMA_ACC64(d)                                                              \
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(e), "r"(1));                \
        }                                                                                                      \
    };

TESSERA_SPARSE_WGMMA(__nv_bfloat16, ".bf16", 0)
TESSERA_SPARSE_WGMMA(__nv_bfloat16, ".bf16", 1)
TESSERA_SPARSE_WGMMA(__half, ".f16", 0)
TESSERA_SPARSE_WGMMA(__half, ".f16", 1)

template <typename T>
__device__ __forceinline__ void sparse_gemm_sm90(const TensorMap* map_values, const TensorMap* map_meta,
                                                 const TensorMap* map_x, const SparseHopperParams& p) {
    __shared__ uint64_t full[STAGES];   // the stage's copies have landed
    __shared__ uint64_t empty[STAGES];  // both consumer warpgroups are done with the stage
    extern __shared__ unsigned char dynamic_shared[];
    // Offset from the array itself (not through an integer cast), so that the compiler keeps
    // the accesses in the shared address space.
    unsigned char* const ring = dynamic_shared + ((1024 - (smem(dynamic_shared) & 1023)) & 1023);

    const int row0 = blockIdx.x * ROWS, token0 = blockIdx.y * TOKENS;
    const int blocks = p.k / 64;

    if (threadIdx.x == 0) {
        ring_init(full, empty, 2 * 128);
        barrier_init_fence();
    }
    __syncthreads();

    const int warpgroup = threadIdx.x / 128;
    if (warpgroup == 0) {
        // Producer: one thread issues the copies; the group keeps few registers.
        registers_decrease<40>();
        if (threadIdx.x == 0) {
            for (int b = 0; b < blocks; ++b) {
                const int s = b % STAGES;
                // The (b / STAGES)-th reuse of stage s waits for the consumers' release of the
                // previous one, phase b / STAGES - 1.
                if (b >= STAGES) barrier_wait(&empty[s], (uint32_t)(b / STAGES - 1) & 1);
                barrier_arrive_expect(&full[s], STAGE_BYTES);
                unsigned char* const stage = ring + s * STAGE_BYTES;
                tma_load_2d(smem(stage), map_x, &full[s], b * 64, token0);
                tma_load_2d(smem(stage + X_BYTES), map_values, &full[s], b * 32, row0);
                tma_load_2d(smem(stage + X_BYTES + VALUE_BYTES), map_meta, &full[s], b * 32, row0 / 16);
            }
        }
        return;
    }

    registers_increase<232>();
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
        SparseWgmma<T, 0>::rs_n128(acc[0], a[0][0], descriptor(x_address, 16, 1024), e[0]);
        SparseWgmma<T, 0>::rs_n128(acc[1], a[1][0], descriptor(x_address, 16, 1024), e[1]);
        SparseWgmma<T, 1>::rs_n128(acc[0], a[0][1], descriptor(x_address + 64, 16, 1024), e[0]);
        SparseWgmma<T, 1>::rs_n128(acc[1], a[1][1], descriptor(x_address + 64, 16, 1024), e[1]);
        wgmma_commit();
    };
    // One k-block's group stays in flight while the next one's registers are loaded and issued:
    // two register sets, alternating (unrolled by two, so that each set is a fixed set of
    // registers), and a stage is released once the group that read it has completed.
    uint32_t a_even[2][2][4], a_odd[2][2][4], e_even[2], e_odd[2];
    issue(0, a_even, e_even);
    for (int b = 1; b < blocks; b += 2) {
        issue(b, a_odd, e_odd);
        wgmma_wait<1>();
        barrier_arrive(&empty[(b - 1) % STAGES]);
        if (b + 1 < blocks) {
            issue(b + 1, a_even, e_even);
            wgmma_wait<1>();
            barrier_arrive(&empty[b % STAGES]);
        }
    }
    wgmma_wait<0>();
    fence_registers(acc[0]);
    fence_registers(acc[1]);
    barrier_arrive(&empty[(blocks - 1) % STAGES]);

    // Every copy has landed and been read: the ring is free for the epilogue once both consumer
    // warpgroups are past their last k-block.
    named_sync<1, 256>();
    float* const tile = reinterpret_cast<float*>(ring) + consumer * TOKENS * OUT_STRIDE;
    const T* const bias = static_cast<const T*>(p.bias);
#pragma unroll
    for (int sl = 0; sl < 2; ++sl) {
        float b[2] = {0.0f, 0.0f};
        if (bias != nullptr && slice_live[sl]) {
            b[0] = widen(bias[row0 + slice_row[sl] + g]);
            b[1] = widen(bias[row0 + slice_row[sl] + g + 8]);
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
    if (consumer == 0) {
        named_sync<2, 128>();
    } else {
        named_sync<3, 128>();
    }

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
        const __grid_constant__ tessera::TensorMap map_values, const __grid_constant__ tessera::TensorMap map_meta,     \
        const __grid_constant__ tessera::TensorMap map_x, const SparseHopperParams p) {                              \
        SPARSE_SM90_BODY(T)                                                                                      \
    }

SPARSE_SM90_KERNEL(bf16, __nv_bfloat16)
SPARSE_SM90_KERNEL(f16, __half)
