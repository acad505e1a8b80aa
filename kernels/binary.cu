// Binarized linear layers (FBI-LLM, src/ops/binary.rs): sign-bit pack/unpack, the packed forward
// y[n,i] = Σ_j s_ij·(α_j x[n,j]) + Σ_j β_j x[n,j] + b_i as a streaming GEMV (1..16 tokens) and a
// tensor-core GEMM (more tokens), and the autoregressive distillation loss.
//
// Packed layout: bits [d_out][words], words = ceil(d_in/32); bit j%32 of word j/32 is 1 for a
// negative weight (s = -1), 0 for s = +1. Padding bits past d_in are ignored: the activations
// they meet are zero.
//
// Bits become tensor-core operands without a lookup: for a 32-bit word w and a pair index p
// (0..15), ((w << (15 - p)) & 0x80008000) | ONE2 is a pair of 16-bit floats ±1 whose signs are
// bits p and p+16 (ONE2 = 1.0 in both halves). A shift and one LOP3 per two weights.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace {

constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;

// ---- element types ------------------------------------------------------------------------

template <typename T>
struct Half;

template <>
struct Half<__nv_bfloat16> {
    static constexpr uint32_t ONE2 = 0x3F803F80u;
    static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
    static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
    static __device__ __forceinline__ uint16_t bits(float v) {
        const __nv_bfloat16 h = __float2bfloat16_rn(v);
        return *reinterpret_cast<const uint16_t*>(&h);
    }
    // d += a·b for a 16x16 A (row), 16x8 B (col), f32 accumulators.
    static __device__ __forceinline__ void mma(float* d, const uint32_t* a, const uint32_t* b) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
};

template <>
struct Half<__half> {
    static constexpr uint32_t ONE2 = 0x3C003C00u;
    static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
    static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
    static __device__ __forceinline__ uint16_t bits(float v) {
        const __half h = __float2half_rn(v);
        return *reinterpret_cast<const uint16_t*>(&h);
    }
    static __device__ __forceinline__ void mma(float* d, const uint32_t* a, const uint32_t* b) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
};

// Two ±1 values whose signs are bits p and p+16 of w (bit 1 = negative). Written as one LOP3
// ((a & b) | c, lookup 0xEA) with both constants in registers: from C, the AND and the OR each
// carry an immediate and compile to two LOP3s, and the integer pipe (16 lanes per scheduler on
// sm_80/sm_90) bounds the GEMV. The shift compiles to IMAD.SHL, on the FMA pipe.
template <typename T>
__device__ __forceinline__ uint32_t sign_pair(uint32_t w, int p) {
    uint32_t out;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(out) : "r"(w << (15 - p)), "r"(0x80008000u), "r"(Half<T>::ONE2));
    return out;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

}  // namespace

// ---- pack / unpack --------------------------------------------------------------------------

// One warp per output word: lane l reads weight 32·word + l (coalesced) and the ballot is the word.
extern "C" __global__ void __launch_bounds__(THREADS)
    binary_pack(const float* __restrict__ w, uint32_t* __restrict__ bits, int rows, int cols) {
    const int words = (cols + 31) / 32;
    const uint64_t warp = (uint64_t)blockIdx.x * WARPS + threadIdx.x / 32;
    if (warp >= (uint64_t)rows * words) return;
    const int lane = threadIdx.x % 32;
    const uint64_t row = warp / words;
    const int col = (int)(warp % words) * 32 + lane;
    const bool negative = col < cols && w[row * cols + col] < 0.0f;
    const uint32_t word = __ballot_sync(0xffffffffu, negative);
    if (lane == 0) bits[warp] = word;
}

extern "C" __global__ void __launch_bounds__(THREADS)
    binary_unpack(const uint32_t* __restrict__ bits, float* __restrict__ signs, int rows, int cols) {
    const int words = (cols + 31) / 32;
    const uint64_t total = (uint64_t)rows * cols;
    for (uint64_t e = (uint64_t)blockIdx.x * THREADS + threadIdx.x; e < total; e += (uint64_t)gridDim.x * THREADS) {
        const uint64_t row = e / cols;
        const int col = (int)(e % cols);
        const uint32_t word = bits[row * words + col / 32];
        signs[e] = (word >> (col % 32)) & 1u ? -1.0f : 1.0f;
    }
}

// ---- GEMV: 1..16 tokens ---------------------------------------------------------------------
//
// Tile: a block owns 16·RG output rows (RG groups of 16, the mma's M; RG = 2, or 4 for 16 token
// slots on large n, where staging the tokens costs more than the rows) and all of k. The weights are
// mma operand A, converted in registers from the bits; the tokens (8 per token tile, zero-padded)
// are operand B. k is walked in phases of 4096: each warp owns one 512-wide super-chunk of a
// phase, where lane (g, t) loads 16 bytes (words 4t..4t+3 of the super-chunk) of rows g and g+8
// of each row group: 128-bit loads, every weight loaded once and used for all tokens.
//
// The k order inside an mma is free as long as A and B agree, so the bits are used where they
// lie: word 4t+i of a super-chunk feeds mma i·8+τ (τ = 0..7) through its pairs 2τ (the fragment's
// k = 2t, 2t+1) and 2τ+1 (k = 2t+8, 2t+9), each pair being bits (p, p+16). The staging step
// writes α·x (rounded to T) into shared memory in exactly that order, B-fragment-ready:
// u32 index ((((sc·4 + i)·8 + τ)·32 + lane)·TT + tt)·2 + r, half h, for physical k
// = 512·sc + 32·(4t + i) + 16·h + 2τ + r of token 8·tt + g.
// Pipeline: the next phase's bits are loaded into registers while this phase is staged and
// multiplied, so that every warp always has a phase of bits (32·RG bytes per lane) in flight.
// Traffic: the bits once (n·k/8 bytes), x and α, β once per block (L2).
namespace {

constexpr int GEMV_PHASE_K = 4096;
constexpr int GEMV_CHUNK_K = 512;

template <bool Vector>
__device__ __forceinline__ uint4 load_bits4(const uint32_t* __restrict__ bits, int row, int n, int word, int words) {
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (row >= n) return v;
    const uint32_t* p = bits + (uint64_t)row * words + word;
    if constexpr (Vector) {
        // words % 4 == 0, so a vector that starts inside the row ends inside it.
        if (word < words) v = __ldcs(reinterpret_cast<const uint4*>(p));
    } else {
        if (word + 0 < words) v.x = __ldcs(p + 0);
        if (word + 1 < words) v.y = __ldcs(p + 1);
        if (word + 2 < words) v.z = __ldcs(p + 2);
        if (word + 3 < words) v.w = __ldcs(p + 3);
    }
    return v;
}

__device__ __forceinline__ bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// 8 consecutive 16-bit floats (16-byte aligned) widened to f32.
template <typename T>
__device__ __forceinline__ void load8(const T* p, float* out) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const uint16_t lo = (uint16_t)(w[j] & 0xFFFFu), hi = (uint16_t)(w[j] >> 16);
        out[2 * j] = Half<T>::to_float(*reinterpret_cast<const T*>(&lo));
        out[2 * j + 1] = Half<T>::to_float(*reinterpret_cast<const T*>(&hi));
    }
}

// 8 consecutive f32 (32-byte aligned).
__device__ __forceinline__ void load8f(const float* p, float* out) {
    const float4 lo = *reinterpret_cast<const float4*>(p), hi = *reinterpret_cast<const float4*>(p + 4);
    out[0] = lo.x;
    out[1] = lo.y;
    out[2] = lo.z;
    out[3] = lo.w;
    out[4] = hi.x;
    out[5] = hi.y;
    out[6] = hi.z;
    out[7] = hi.w;
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

template <typename T, int TT, int RG, bool Vector>
__device__ __forceinline__ void binary_gemv(const T* __restrict__ x, const uint32_t* __restrict__ bits,
                                            const float* __restrict__ alpha, const float* __restrict__ beta,
                                            const float* __restrict__ bias, T* __restrict__ y, int m, int n, int k,
                                            int words) {
    extern __shared__ __align__(16) uint32_t gemv_shared[];
    __shared__ float shift_partial[WARPS][16];
    constexpr int TOKENS = 8 * TT;
    uint16_t* staged = reinterpret_cast<uint16_t*>(gemv_shared);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    constexpr int GEMV_ROWS = 16 * RG;
    const int row0 = blockIdx.x * GEMV_ROWS;

    // Token slots past m hold zeros for the whole kernel: clear all slots once (the first phase's
    // barrier orders this before any staging).
    for (int e = threadIdx.x; e < GEMV_PHASE_K * TOKENS * 2 / 16; e += THREADS) {
        reinterpret_cast<uint4*>(gemv_shared)[e] = make_uint4(0u, 0u, 0u, 0u);
    }
    const bool vector_stage = k % 8 == 0 && aligned16(x) && aligned16(alpha) && aligned16(beta);

    float acc[RG][TT][4];
#pragma unroll
    for (int rg = 0; rg < RG; ++rg)
#pragma unroll
        for (int tt = 0; tt < TT; ++tt)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[rg][tt][q] = 0.0f;
    float shift[TOKENS];
#pragma unroll
    for (int token = 0; token < TOKENS; ++token) shift[token] = 0.0f;

    // This warp's super-chunk of the phase at k0: 16 bytes of rows g and g+8 of both row groups.
    auto load_phase = [&](int k0, uint4 (&wa)[RG], uint4 (&wb)[RG]) {
        const int chunk_k = k0 + warp * GEMV_CHUNK_K;
        const bool active = chunk_k < k;
        const int word = chunk_k / 32 + 4 * t;
#pragma unroll
        for (int rg = 0; rg < RG; ++rg) {
            const int ra = row0 + rg * 16 + g;
            wa[rg] = active ? load_bits4<Vector>(bits, ra, n, word, words) : make_uint4(0u, 0u, 0u, 0u);
            wb[rg] = active ? load_bits4<Vector>(bits, ra + 8, n, word, words) : make_uint4(0u, 0u, 0u, 0u);
        }
    };
    uint4 wa[RG], wb[RG];
    load_phase(0, wa, wb);

    for (int k0 = 0; k0 < k; k0 += GEMV_PHASE_K) {
        const bool active = k0 + warp * GEMV_CHUNK_K < k;
        // The next phase's bits are in flight during this phase's staging and tensor-core work.
        uint4 next_a[RG], next_b[RG];
        load_phase(k0 + GEMV_PHASE_K, next_a, next_b);

        __syncthreads();  // the previous phase's fragments have been read
        // Stage α·x for the real tokens, 8 consecutive k per thread and step, accumulating β·x.
        // The 8 k of a step share their word and half (h); they are the pairs τ0 + q/2 (r = q%2).
        // α and β are loaded once per step for all the tokens.
        for (int e = threadIdx.x; e < GEMV_PHASE_K / 8; e += THREADS) {
            const int kk = e * 8, kg0 = k0 + kk;
            const int sc = kk / GEMV_CHUNK_K, kin = kk % GEMV_CHUNK_K, wd = kin / 32, b0 = kin % 32;
            const bool vector = vector_stage && kg0 + 8 <= k;
            float a[8], bt[8];
            if (vector) {
                load8f(alpha + kg0, a);
                load8f(beta + kg0, bt);
            } else {
#pragma unroll
                for (int q = 0; q < 8; ++q) {
                    const bool in = kg0 + q < k;
                    a[q] = in ? alpha[kg0 + q] : 0.0f;
                    bt[q] = in ? beta[kg0 + q] : 0.0f;
                }
            }
#pragma unroll
            for (int token = 0; token < TOKENS; ++token) {
                if (token >= m) break;
                const int tt = token / 8, gl = (token % 8) * 4 + wd / 4;
                const int base = ((((sc * 4 + wd % 4) * 8 + (b0 % 16) / 2) * 32 + gl) * TT + tt) * 2;
                float v[8];
                if (vector) {
                    load8<T>(x + (uint64_t)token * k + kg0, v);
                } else {
#pragma unroll
                    for (int q = 0; q < 8; ++q) {
                        v[q] = kg0 + q < k ? Half<T>::to_float(x[(uint64_t)token * k + kg0 + q]) : 0.0f;
                    }
                }
#pragma unroll
                for (int q = 0; q < 8; ++q) {
                    shift[token] = fmaf(bt[q], v[q], shift[token]);
                    const int index = base + (q / 2) * (32 * TT * 2) + (q % 2);
                    staged[index * 2 + b0 / 16] = Half<T>::bits(a[q] * v[q]);
                }
            }
        }
        __syncthreads();

        if (active) {
            const int sc = warp;
#pragma unroll
            for (int i = 0; i < 4; ++i) {
#pragma unroll
                for (int tau = 0; tau < 8; ++tau) {
                    uint32_t b[TT][2];
                    const int base = (((sc * 4 + i) * 8 + tau) * 32 + lane) * TT * 2;
                    if constexpr (TT == 2) {
                        const uint4 v = *reinterpret_cast<const uint4*>(gemv_shared + base);
                        b[0][0] = v.x;
                        b[0][1] = v.y;
                        b[TT - 1][0] = v.z;
                        b[TT - 1][1] = v.w;
                    } else {
                        const uint2 v = *reinterpret_cast<const uint2*>(gemv_shared + base);
                        b[0][0] = v.x;
                        b[0][1] = v.y;
                    }
#pragma unroll
                    for (int rg = 0; rg < RG; ++rg) {
                        const uint32_t w_a = word_of(wa[rg], i), w_b = word_of(wb[rg], i);
                        uint32_t a[4];
                        a[0] = sign_pair<T>(w_a, 2 * tau);
                        a[1] = sign_pair<T>(w_b, 2 * tau);
                        a[2] = sign_pair<T>(w_a, 2 * tau + 1);
                        a[3] = sign_pair<T>(w_b, 2 * tau + 1);
#pragma unroll
                        for (int tt = 0; tt < TT; ++tt) Half<T>::mma(acc[rg][tt], a, b[tt]);
                    }
                }
            }
        }
#pragma unroll
        for (int rg = 0; rg < RG; ++rg) {
            wa[rg] = next_a[rg];
            wb[rg] = next_b[rg];
        }
    }

    // The β term per token: warp sums, then the block's in shift_partial.
#pragma unroll
    for (int token = 0; token < TOKENS; ++token) {
        const float s = warp_sum(shift[token]);
        if (lane == 0) shift_partial[warp][token] = s;
    }
    __syncthreads();  // all fragments read: the staging area now holds the per-warp partial sums
    float* partial = reinterpret_cast<float*>(gemv_shared);  // [WARPS][32 rows][TOKENS]
#pragma unroll
    for (int rg = 0; rg < RG; ++rg) {
#pragma unroll
        for (int tt = 0; tt < TT; ++tt) {
            const int r = rg * 16 + g, c = tt * 8 + 2 * t;
            partial[(warp * GEMV_ROWS + r) * TOKENS + c] = acc[rg][tt][0];
            partial[(warp * GEMV_ROWS + r) * TOKENS + c + 1] = acc[rg][tt][1];
            partial[(warp * GEMV_ROWS + r + 8) * TOKENS + c] = acc[rg][tt][2];
            partial[(warp * GEMV_ROWS + r + 8) * TOKENS + c + 1] = acc[rg][tt][3];
        }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < GEMV_ROWS * TOKENS; e += THREADS) {
        const int token = e / GEMV_ROWS, r = e % GEMV_ROWS, row = row0 + r;
        if (token >= m || row >= n) continue;
        float sum = 0.0f, shift_sum = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
            sum += partial[(w * GEMV_ROWS + r) * TOKENS + token];
            shift_sum += shift_partial[w][token];
        }
        if (bias != nullptr) sum += bias[row];
        y[(uint64_t)token * n + row] = Half<T>::from_float(sum + shift_sum);
    }
}

}  // namespace

#define BINARY_GEMV(NAME, T, TT, RG, VECTOR)                                                                    \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                    \
        NAME(const T* __restrict__ x, const uint32_t* __restrict__ bits, const float* __restrict__ alpha,   \
             const float* __restrict__ beta, const float* __restrict__ bias, T* __restrict__ y, int m, int n, \
             int k, int words) {                                                                             \
        binary_gemv<T, TT, RG, VECTOR>(x, bits, alpha, beta, bias, y, m, n, k, words);                          \
    }

BINARY_GEMV(binary_gemv_bf16_t8, __nv_bfloat16, 1, 2, false)
BINARY_GEMV(binary_gemv_bf16_t8_vec, __nv_bfloat16, 1, 2, true)
BINARY_GEMV(binary_gemv_bf16_t16, __nv_bfloat16, 2, 2, false)
BINARY_GEMV(binary_gemv_bf16_t16_r64, __nv_bfloat16, 2, 4, false)
BINARY_GEMV(binary_gemv_bf16_t16_vec, __nv_bfloat16, 2, 2, true)
BINARY_GEMV(binary_gemv_bf16_t16_r64_vec, __nv_bfloat16, 2, 4, true)
BINARY_GEMV(binary_gemv_f16_t8, __half, 1, 2, false)
BINARY_GEMV(binary_gemv_f16_t8_vec, __half, 1, 2, true)
BINARY_GEMV(binary_gemv_f16_t16, __half, 2, 2, false)
BINARY_GEMV(binary_gemv_f16_t16_r64, __half, 2, 4, false)
BINARY_GEMV(binary_gemv_f16_t16_vec, __half, 2, 2, true)
BINARY_GEMV(binary_gemv_f16_t16_r64_vec, __half, 2, 4, true)

// ---- the β term for many tokens -------------------------------------------------------------

// One warp per token: shift[n] = Σ_j β_j x[n,j] in f32, lanes strided over j (fixed order).
template <typename T>
__device__ __forceinline__ void binary_token_shift(const T* __restrict__ x, const float* __restrict__ beta,
                                                   float* __restrict__ shift, int m, int k) {
    const int token = blockIdx.x * WARPS + threadIdx.x / 32;
    if (token >= m) return;
    const int lane = threadIdx.x % 32;
    float sum = 0.0f;
    for (int j = lane; j < k; j += 32) sum = fmaf(beta[j], Half<T>::to_float(x[(uint64_t)token * k + j]), sum);
    sum = warp_sum(sum);
    if (lane == 0) shift[token] = sum;
}

extern "C" __global__ void __launch_bounds__(THREADS)
    binary_token_shift_bf16(const __nv_bfloat16* __restrict__ x, const float* __restrict__ beta,
                            float* __restrict__ shift, int m, int k) {
    binary_token_shift<__nv_bfloat16>(x, beta, shift, m, k);
}

extern "C" __global__ void __launch_bounds__(THREADS)
    binary_token_shift_f16(const __half* __restrict__ x, const float* __restrict__ beta, float* __restrict__ shift,
                           int m, int k) {
    binary_token_shift<__half>(x, beta, shift, m, k);
}

// ---- GEMM: many tokens ----------------------------------------------------------------------
//
// Tile: 128 tokens x 128 output rows per block, k in steps of 32 (one bit word per row). 8 warps
// as 2 (64 tokens) x 4 (32 rows); each warp 4 x 4 mma m16n8k16 tiles, f32 accumulators.
// Operand A is x as it is (tokens x k); operand B is the expanded weight ±α_j, written by the
// block into shared memory as [row][k] (each thread expands 16 weights of one row per step:
// one bit word, 16 α, a sign flip of bf16(α)). Both tiles are padded to 40 elements per row so
// that ldmatrix reads them without bank conflicts. Two stages: the next step's x and bits are
// loaded into registers while the tensor cores work on the current one. The β term (shift, per
// token) and the bias are added in the epilogue.
// Traffic per block: its 128 token rows of x and 128 rows of bits once; k/32 barriers.
namespace {

constexpr int GEMM_TILE = 128;
constexpr int GEMM_K = 32;
constexpr int GEMM_PITCH = 40;

__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* address) {
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(address);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

template <typename T, bool Vector>
struct GemmLoads {
    uint4 x[2];
    uint32_t word;
    float alpha[16];

    __device__ __forceinline__ void load(const T* __restrict__ xs, const uint32_t* __restrict__ bits,
                                         const float* __restrict__ alpha_in, int token0, int row0, int k0, int m,
                                         int n, int k, int words) {
        const int tid = threadIdx.x;
#pragma unroll
        for (int q = 0; q < 2; ++q) {
            const int e = tid + q * THREADS;
            const int r = e / 4, c = (e % 4) * 8;
            const int token = token0 + r, kg = k0 + c;
            if constexpr (Vector) {
                // k % 8 == 0: a vector of 8 lies wholly inside or wholly outside the row.
                x[q] = (token < m && kg < k) ? *reinterpret_cast<const uint4*>(xs + (uint64_t)token * k + kg)
                                             : make_uint4(0u, 0u, 0u, 0u);
            } else {
                uint16_t h[8];
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    h[j] = (token < m && kg + j < k)
                               ? *reinterpret_cast<const uint16_t*>(xs + (uint64_t)token * k + kg + j)
                               : (uint16_t)0;
                }
                x[q] = make_uint4(h[0] | ((uint32_t)h[1] << 16), h[2] | ((uint32_t)h[3] << 16),
                                  h[4] | ((uint32_t)h[5] << 16), h[6] | ((uint32_t)h[7] << 16));
            }
        }
        const int r = tid / 2, half = tid % 2;
        const int row = row0 + r;
        word = row < n ? bits[(uint64_t)row * words + k0 / 32] : 0u;
        const int kb = k0 + 16 * half;
#pragma unroll
        for (int j = 0; j < 16; ++j) alpha[j] = kb + j < k ? alpha_in[kb + j] : 0.0f;
    }

    __device__ __forceinline__ void store(T* a_tile, T* b_tile) const {
        const int tid = threadIdx.x;
#pragma unroll
        for (int q = 0; q < 2; ++q) {
            const int e = tid + q * THREADS;
            const int r = e / 4, c = (e % 4) * 8;
            *reinterpret_cast<uint4*>(a_tile + r * GEMM_PITCH + c) = x[q];
        }
        const int r = tid / 2, half = tid % 2;
        uint32_t packed[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int b0 = 16 * half + 2 * j;
            const uint32_t lo = Half<T>::bits(alpha[2 * j]) ^ (((word >> b0) & 1u) << 15);
            const uint32_t hi = Half<T>::bits(alpha[2 * j + 1]) ^ (((word >> (b0 + 1)) & 1u) << 15);
            packed[j] = lo | (hi << 16);
        }
        uint4* dst = reinterpret_cast<uint4*>(b_tile + r * GEMM_PITCH + 16 * half);
        dst[0] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
        dst[1] = make_uint4(packed[4], packed[5], packed[6], packed[7]);
    }
};

template <typename T, bool Vector>
__device__ __forceinline__ void binary_gemm(const T* __restrict__ x, const uint32_t* __restrict__ bits,
                                            const float* __restrict__ alpha, const float* __restrict__ shift,
                                            const float* __restrict__ bias, T* __restrict__ y, int m, int n, int k,
                                            int words) {
    __shared__ __align__(16) T a_tile[2][GEMM_TILE * GEMM_PITCH];
    __shared__ __align__(16) T b_tile[2][GEMM_TILE * GEMM_PITCH];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int warp_m = warp / 4, warp_n = warp % 4;
    const int token0 = blockIdx.y * GEMM_TILE, row0 = blockIdx.x * GEMM_TILE;

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;

    GemmLoads<T, Vector> loads;
    loads.load(x, bits, alpha, token0, row0, 0, m, n, k, words);
    loads.store(a_tile[0], b_tile[0]);
    __syncthreads();

    for (int step = 0; step < words; ++step) {
        const int stage = step % 2;
        if (step + 1 < words) loads.load(x, bits, alpha, token0, row0, (step + 1) * GEMM_K, m, n, k, words);
#pragma unroll
        for (int kk = 0; kk < GEMM_K; kk += 16) {
            uint32_t a[4][4], b[4][2];
#pragma unroll
            for (int mt = 0; mt < 4; ++mt) {
                const int r = warp_m * 64 + mt * 16 + lane % 16;
                ldmatrix_x4(a[mt], &a_tile[stage][r * GEMM_PITCH + kk + (lane / 16) * 8]);
            }
#pragma unroll
            for (int np = 0; np < 2; ++np) {
                const int r = warp_n * 32 + np * 16 + lane % 8 + (lane / 16) * 8;
                uint32_t v[4];
                ldmatrix_x4(v, &b_tile[stage][r * GEMM_PITCH + kk + ((lane / 8) % 2) * 8]);
                b[2 * np][0] = v[0];
                b[2 * np][1] = v[1];
                b[2 * np + 1][0] = v[2];
                b[2 * np + 1][1] = v[3];
            }
#pragma unroll
            for (int mt = 0; mt < 4; ++mt)
#pragma unroll
                for (int nt = 0; nt < 4; ++nt) Half<T>::mma(acc[mt][nt], a[mt], b[nt]);
        }
        if (step + 1 < words) loads.store(a_tile[stage ^ 1], b_tile[stage ^ 1]);
        __syncthreads();
    }

    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int token = token0 + warp_m * 64 + mt * 16 + g + 8 * half;
            if (token >= m) continue;
            const float s = shift[token];
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
                for (int q = 0; q < 2; ++q) {
                    const int row = row0 + warp_n * 32 + nt * 8 + 2 * t + q;
                    if (row >= n) continue;
                    const float b = bias != nullptr ? bias[row] : 0.0f;
                    y[(uint64_t)token * n + row] = Half<T>::from_float(acc[mt][nt][2 * half + q] + s + b);
                }
            }
        }
    }
}

}  // namespace

#define BINARY_GEMM(NAME, T, VECTOR)                                                                          \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                      \
        NAME(const T* __restrict__ x, const uint32_t* __restrict__ bits, const float* __restrict__ alpha,     \
             const float* __restrict__ shift, const float* __restrict__ bias, T* __restrict__ y, int m, int n, \
             int k, int words) {                                                                               \
        binary_gemm<T, VECTOR>(x, bits, alpha, shift, bias, y, m, n, k, words);                               \
    }

BINARY_GEMM(binary_gemm_bf16, __nv_bfloat16, false)
BINARY_GEMM(binary_gemm_bf16_vec, __nv_bfloat16, true)
BINARY_GEMM(binary_gemm_f16, __half, false)
BINARY_GEMM(binary_gemm_f16_vec, __half, true)

// ---- training form: operands for cuBLASLt and the backward's small passes --------------------
//
// The forward is one GEMM y = A·Bᵀ over pitch = roundup(d_in + 4, 8) columns:
//   A = [α⊙x | r_hi r_lo | 1 1 | 0…] (tokens x pitch), B = [sign(W) | 1 1 | b_hi b_lo | 0…] (d_out x pitch),
// with r[n] = Σ_j β_j x[n,j] and the bias each split into a value of T and the rest, so that
// the f32 accumulator receives them to ~2^-16 relative (f16: ~2^-22) and y is rounded once.
// The backward's GEMM dY·B (without the bias columns) gives dY·sign(W) and, in column d_in, the
// row sums of dY. Every pass here is memory-bound and touches each element once.
namespace {

constexpr int TRAIN_CHUNK_ROWS = 64;

template <typename T>
__device__ __forceinline__ uint16_t half_bits(T v) {
    return *reinterpret_cast<const uint16_t*>(&v);
}

// v as a high part in T and the remainder in T: v ≈ hi + lo. Past T's range hi is ±inf and lo
// 0 (not inf - inf = NaN), as a rounded output would be.
template <typename T>
__device__ __forceinline__ void split(float v, uint16_t& hi, uint16_t& lo) {
    const T h = Half<T>::from_float(v);
    const float high = Half<T>::to_float(h);
    hi = half_bits(h);
    lo = isinf(high) ? (uint16_t)0 : Half<T>::bits(v - high);
}

template <typename T>
__device__ __forceinline__ uint16_t sign_bits(float w) {
    // sign(0) = 0, as torch.sign; NaN too, as the CPU path.
    return w > 0.0f ? Half<T>::bits(1.0f) : w < 0.0f ? Half<T>::bits(-1.0f) : (uint16_t)0;
}

// Thread (column pair q) of grid row y writes columns 2q, 2q+1 of rows y, y + gridDim.y, ...
// An input-major w is stored [cols, rows] (GPT-2's Conv1D): its reads stride by rows, once per
// call, while the writes stay coalesced.
template <typename T>
__device__ __forceinline__ void binary_train_signs(const float* __restrict__ w, const float* __restrict__ bias,
                                                   T* __restrict__ out, int rows, int cols, int pitch,
                                                   int input_major) {
    const int c0 = 2 * (blockIdx.x * THREADS + threadIdx.x);
    if (c0 >= pitch) return;
    const uint16_t one = Half<T>::bits(1.0f);
    for (int row = blockIdx.y; row < rows; row += gridDim.y) {
        uint16_t h[2];
#pragma unroll
        for (int q = 0; q < 2; ++q) {
            const int c = c0 + q;
            if (c < cols) {
                h[q] = sign_bits<T>(w[input_major ? (uint64_t)c * rows + row : (uint64_t)row * cols + c]);
            } else if (c < cols + 2) {
                h[q] = one;
            } else if (c < cols + 4 && bias != nullptr) {
                uint16_t hi, lo;
                split<T>(bias[row], hi, lo);
                h[q] = c == cols + 2 ? hi : lo;
            } else {
                h[q] = 0;
            }
        }
        reinterpret_cast<uint32_t*>(out + (uint64_t)row * pitch)[c0 / 2] = h[0] | ((uint32_t)h[1] << 16);
    }
}

// One block per token: α⊙x rounded to T, r = Σ β_j x_j in f32 (a fixed-order block sum), then
// the extra columns.
template <typename T>
__device__ __forceinline__ void binary_train_scale(const T* __restrict__ x, const float* __restrict__ alpha,
                                                   const float* __restrict__ beta, T* __restrict__ out, int cols,
                                                   int pitch) {
    __shared__ float partial[WARPS];
    const uint64_t token = blockIdx.x;
    const T* row = x + token * cols;
    uint16_t* dst = reinterpret_cast<uint16_t*>(out + token * pitch);
    float r = 0.0f;
    for (int c = threadIdx.x; c < cols; c += THREADS) {
        const float v = Half<T>::to_float(row[c]);
        r = fmaf(beta[c], v, r);
        dst[c] = Half<T>::bits(alpha[c] * v);
    }
    r = warp_sum(r);
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = r;
    __syncthreads();
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) total += partial[w];
    uint16_t hi, lo;
    split<T>(total, hi, lo);
    const uint16_t one = Half<T>::bits(1.0f);
    for (int c = cols + threadIdx.x; c < pitch; c += THREADS) {
        dst[c] = c == cols ? hi : c == cols + 1 ? lo : c < cols + 4 ? one : (uint16_t)0;
    }
}

// Thread = column j, grid row = chunk of TRAIN_CHUNK_ROWS tokens: dX = α_j·P + β_j·rowsum
// (added to dX's value in f32 and rounded once with `accumulate`; not written when dx is null),
// and the chunk's partial dα_j = Σ x·P, dβ_j = Σ x·rowsum, summed in token order.
template <typename T>
__device__ __forceinline__ void binary_train_dx(const float* __restrict__ products, const T* __restrict__ x,
                                                const float* __restrict__ alpha, const float* __restrict__ beta,
                                                T* __restrict__ dx, float* __restrict__ partial_alpha,
                                                float* __restrict__ partial_beta, int m, int cols, int pitch,
                                                int accumulate) {
    const int j = blockIdx.x * THREADS + threadIdx.x;
    if (j >= cols) return;
    const int n0 = blockIdx.y * TRAIN_CHUNK_ROWS;
    const int n1 = min(n0 + TRAIN_CHUNK_ROWS, m);
    const float a = alpha[j], b = beta[j];
    float da = 0.0f, db = 0.0f;
    for (int n = n0; n < n1; ++n) {
        const float* p_row = products + (uint64_t)n * pitch;
        const float p = p_row[j], sum = p_row[cols];
        const float v = Half<T>::to_float(x[(uint64_t)n * cols + j]);
        if (dx != nullptr) {
            T* out = dx + (uint64_t)n * cols + j;
            const float value = fmaf(a, p, b * sum);
            *out = Half<T>::from_float(accumulate ? Half<T>::to_float(*out) + value : value);
        }
        da = fmaf(v, p, da);
        db = fmaf(v, sum, db);
    }
    partial_alpha[(uint64_t)blockIdx.y * cols + j] = da;
    partial_beta[(uint64_t)blockIdx.y * cols + j] = db;
}

// Thread = column j, grid row = chunk of tokens: the chunk's column sum of y, in token order.
template <typename T>
__device__ __forceinline__ void binary_column_sums(const T* __restrict__ y, float* __restrict__ partial, int m,
                                                   int cols) {
    const int j = blockIdx.x * THREADS + threadIdx.x;
    if (j >= cols) return;
    const int n0 = blockIdx.y * TRAIN_CHUNK_ROWS;
    const int n1 = min(n0 + TRAIN_CHUNK_ROWS, m);
    float sum = 0.0f;
    for (int n = n0; n < n1; ++n) sum += Half<T>::to_float(y[(uint64_t)n * cols + j]);
    partial[(uint64_t)blockIdx.y * cols + j] = sum;
}

}  // namespace

#define BINARY_TRAIN(T, NAME)                                                                                      \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                          \
        binary_train_signs_##NAME(const float* __restrict__ w, const float* __restrict__ bias, T* __restrict__ out, \
                                  int rows, int cols, int pitch, int input_major) {                                \
        binary_train_signs<T>(w, bias, out, rows, cols, pitch, input_major);                                       \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                          \
        binary_train_scale_##NAME(const T* __restrict__ x, const float* __restrict__ alpha,                        \
                                  const float* __restrict__ beta, T* __restrict__ out, int cols, int pitch) {      \
        binary_train_scale<T>(x, alpha, beta, out, cols, pitch);                                                   \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(THREADS) binary_train_dx_##NAME(                                  \
        const float* __restrict__ products, const T* __restrict__ x, const float* __restrict__ alpha,              \
        const float* __restrict__ beta, T* __restrict__ dx, float* __restrict__ partial_alpha,                     \
        float* __restrict__ partial_beta, int m, int cols, int pitch, int accumulate) {                            \
        binary_train_dx<T>(products, x, alpha, beta, dx, partial_alpha, partial_beta, m, cols, pitch, accumulate); \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                          \
        binary_column_sums_##NAME(const T* __restrict__ y, float* __restrict__ partial, int m, int cols) {         \
        binary_column_sums<T>(y, partial, m, cols);                                                                \
    }

BINARY_TRAIN(__nv_bfloat16, bf16)
BINARY_TRAIN(__half, f16)

// out[j] = Σ_c partial[c][j] over the chunks in order (added to out[j] with `accumulate`).
extern "C" __global__ void __launch_bounds__(THREADS) binary_column_finish(const float* __restrict__ partial,
                                                                          float* __restrict__ out, int chunks,
                                                                          int cols, int accumulate) {
    const int j = blockIdx.x * THREADS + threadIdx.x;
    if (j >= cols) return;
    float sum = 0.0f;
    for (int c = 0; c < chunks; ++c) sum += partial[(uint64_t)c * cols + j];
    out[j] = accumulate ? out[j] + sum : sum;
}

// dw[r][c] = g[r][c]·α (added to dw with `accumulate`), α = alpha[c], or alpha[r] for an
// input-major [d_in, d_out] gradient. g may be dw itself (the in-place scale). Thread = column
// c of the rows its grid row strides over.
extern "C" __global__ void __launch_bounds__(THREADS)
    binary_weight_grad(float* dw, const float* g, const float* __restrict__ alpha, int rows, int cols,
                       int alpha_per_row, int accumulate) {
    const int c = blockIdx.x * THREADS + threadIdx.x;
    if (c >= cols) return;
    for (int row = blockIdx.y; row < rows; row += gridDim.y) {
        const uint64_t at = (uint64_t)row * cols + c;
        const float value = g[at] * alpha[alpha_per_row ? row : c];
        dw[at] = accumulate ? dw[at] + value : value;
    }
}

// ---- autoregressive distillation loss -------------------------------------------------------
//
// One block per row (one position's logits). First sweep: each thread keeps the running state of
// src/ops/binary.rs's RowStats over its strided elements (student max and sum of exponentials,
// teacher max and sum, and u = Σ e_T·(z_S − m_S)); warps and then the block merge the states.
// Second sweep: the gradient ((1−w)(p_S − p_T) + w(p_S − onehot))/R, written once; the row is
// read again from L2. The row's loss goes to row_loss; distill_loss_sum adds the rows in a fixed
// order. Traffic: both rows read twice (the second time mostly from L2), the gradient written.
namespace {

constexpr int DISTILL_THREADS = 512;

struct RowStats {
    float m_s, s_s, m_t, s_t, u;
};

__device__ __forceinline__ void push(RowStats& st, float zs, float zt) {
    if (zs > st.m_s) {
        if (st.s_t > 0.0f) st.u -= (zs - st.m_s) * st.s_t;
        st.s_s = st.s_s * expf(st.m_s - zs) + 1.0f;
        st.m_s = zs;
    } else {
        st.s_s += expf(zs - st.m_s);
    }
    if (zt == -INFINITY) return;
    if (zt > st.m_t) {
        const float scale = expf(st.m_t - zt);
        st.s_t = st.s_t * scale + 1.0f;
        st.u = st.u * scale + (zs - st.m_s);
        st.m_t = zt;
    } else {
        const float e = expf(zt - st.m_t);
        if (e > 0.0f) {
            st.s_t += e;
            st.u += e * (zs - st.m_s);
        }
    }
}

// The state of the union of two disjoint sets of elements.
__device__ __forceinline__ RowStats merge(const RowStats& a, const RowStats& b) {
    if (a.s_s == 0.0f) return b;
    if (b.s_s == 0.0f) return a;
    RowStats r;
    r.m_s = fmaxf(a.m_s, b.m_s);
    r.s_s = a.s_s * expf(a.m_s - r.m_s) + b.s_s * expf(b.m_s - r.m_s);
    if (a.s_t == 0.0f && b.s_t == 0.0f) {
        r.m_t = -INFINITY;
        r.s_t = 0.0f;
        r.u = 0.0f;
        return r;
    }
    r.m_t = fmaxf(a.m_t, b.m_t);
    // Each side's u re-centred on the common student maximum, then scaled to the common teacher one.
    const float fa = a.s_t > 0.0f ? expf(a.m_t - r.m_t) : 0.0f;
    const float fb = b.s_t > 0.0f ? expf(b.m_t - r.m_t) : 0.0f;
    const float ua = a.s_t > 0.0f ? a.u - (r.m_s - a.m_s) * a.s_t : 0.0f;
    const float ub = b.s_t > 0.0f ? b.u - (r.m_s - b.m_s) * b.s_t : 0.0f;
    r.s_t = a.s_t * fa + b.s_t * fb;
    r.u = ua * fa + ub * fb;
    return r;
}

__device__ __forceinline__ RowStats shuffle(const RowStats& s, int offset) {
    RowStats r;
    r.m_s = __shfl_xor_sync(0xffffffffu, s.m_s, offset);
    r.s_s = __shfl_xor_sync(0xffffffffu, s.s_s, offset);
    r.m_t = __shfl_xor_sync(0xffffffffu, s.m_t, offset);
    r.s_t = __shfl_xor_sync(0xffffffffu, s.s_t, offset);
    r.u = __shfl_xor_sync(0xffffffffu, s.u, offset);
    return r;
}

template <typename T>
__device__ __forceinline__ float load_float(const T* p) {
    if constexpr (sizeof(T) == 4) {
        return *reinterpret_cast<const float*>(p);
    } else {
        return Half<T>::to_float(*p);
    }
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
    if constexpr (sizeof(T) == 4) {
        return v;
    } else {
        return Half<T>::from_float(v);
    }
}

template <typename T>
__device__ __forceinline__ void distill_loss_rows(const T* __restrict__ student, const T* __restrict__ teacher,
                                                  const uint32_t* __restrict__ labels, T* __restrict__ grad,
                                                  float* __restrict__ row_loss, int vocab, float ce_weight,
                                                  float scale) {
    __shared__ RowStats partial[DISTILL_THREADS / 32];
    __shared__ RowStats total;
    const uint64_t row = blockIdx.x;
    const T* zs = student + row * vocab;
    const T* zt = teacher + row * vocab;
    RowStats st = {-INFINITY, 0.0f, -INFINITY, 0.0f, 0.0f};
    for (int c = threadIdx.x; c < vocab; c += DISTILL_THREADS) push(st, load_float(zs + c), load_float(zt + c));
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) st = merge(st, shuffle(st, offset));
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = st;
    __syncthreads();
    if (threadIdx.x == 0) {
        RowStats all = partial[0];
        for (int w = 1; w < DISTILL_THREADS / 32; ++w) all = merge(all, partial[w]);
        total = all;
    }
    __syncthreads();
    const RowStats all = total;
    const int label = labels != nullptr ? (int)labels[row] : -1;
    const float inv_s = 1.0f / all.s_s, inv_t = 1.0f / all.s_t;
    for (int c = threadIdx.x; c < vocab; c += DISTILL_THREADS) {
        const float p_s = expf(load_float(zs + c) - all.m_s) * inv_s;
        const float p_t = expf(load_float(zt + c) - all.m_t) * inv_t;
        const float hot = c == label ? 1.0f : 0.0f;
        grad[row * vocab + c] = from_float<T>(scale * ((1.0f - ce_weight) * (p_s - p_t) + ce_weight * (p_s - hot)));
    }
    if (threadIdx.x == 0) {
        const float log_s = logf(all.s_s);
        const float ce = label >= 0 ? log_s - (load_float(zs + label) - all.m_s) : 0.0f;
        row_loss[row] = (1.0f - ce_weight) * (log_s - all.u / all.s_t) + ce_weight * ce;
    }
}

}  // namespace

#define DISTILL_ROWS(NAME, T)                                                                                    \
    extern "C" __global__ void __launch_bounds__(DISTILL_THREADS, 1)                                             \
        NAME(const T* __restrict__ student, const T* __restrict__ teacher, const uint32_t* __restrict__ labels, \
             T* __restrict__ grad, float* __restrict__ row_loss, int rows, int vocab, float ce_weight,           \
             float scale) {                                                                                      \
        if ((int)blockIdx.x < rows)                                                                              \
            distill_loss_rows<T>(student, teacher, labels, grad, row_loss, vocab, ce_weight, scale);           \
    }

DISTILL_ROWS(distill_loss_rows_f32, float)
DISTILL_ROWS(distill_loss_rows_bf16, __nv_bfloat16)
DISTILL_ROWS(distill_loss_rows_f16, __half)

// loss[0] = scale · Σ row_loss, one block, each thread a strided sum, then a fixed tree.
extern "C" __global__ void __launch_bounds__(DISTILL_THREADS)
    distill_loss_sum(const float* __restrict__ row_loss, float* __restrict__ loss, int rows, float scale) {
    __shared__ float partial[DISTILL_THREADS / 32];
    float sum = 0.0f;
    for (int r = threadIdx.x; r < rows; r += DISTILL_THREADS) sum += row_loss[r];
    sum = warp_sum(sum);
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
        float all = 0.0f;
        for (int w = 0; w < DISTILL_THREADS / 32; ++w) all += partial[w];
        loss[0] = all * scale;
    }
}
