// Sparsity (src/ops/sparse.rs, spdf.rs, sltrain.rs): 2:4 and 1:2 magnitude pruning, the
// compressed format that mma.sp reads (compress, decompress, SLoPe's double-pruned transpose, the
// gather of a dense gradient at the kept positions), two sparse GEMMs y = x·W_sᵀ + bias (+ y when
// `accumulate`: another op's term written into y first, added in the epilogue) on the
// sparse tensor cores (mma.sp.m16n8k32, bf16 and f16, f32 accumulation): one for few tokens that
// reads the compressed weight once, one for many tokens that is math-bound; and the element
// kernels of SPDF (a static bitmask applied in place) and SLTrain (scatter-add and gather on a
// fixed support), with the bias gradient.
//
// The format (documented in full in src/ops/sparse.rs): values (rows, cols/2) with each 64-column
// block of a row in tensor-core order, so that lane 4g+t loads its A registers of both k-steps of
// the block with one 16-byte load per row (g and g+8); metadata u32, 32 words per 16x64 tile, word
// 4g+2s+h being lane 4g+2s+h's metadata register for k-step s (sparsity selector s).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace {

constexpr int WARP = 32;
constexpr int COL_BLOCK = 64;     // logical columns per format block (two k-steps of 32)
constexpr int TILE_WORDS = 32;    // metadata words per 16x64 tile
constexpr int ELEMENT_THREADS = 256;

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }

template <typename T> __device__ __forceinline__ uint16_t bits_of(T v) { return *reinterpret_cast<const uint16_t*>(&v); }
template <typename T> __device__ __forceinline__ T of_bits(uint16_t b) { return *reinterpret_cast<const T*>(&b); }

// The tie rule's key: |w|'s bit pattern, larger = larger magnitude (NaN above infinity).
template <typename T> __device__ __forceinline__ uint32_t magnitude_key(T v) { return bits_of(v) & 0x7FFFu; }
template <> __device__ __forceinline__ uint32_t magnitude_key<float>(float v) { return __float_as_uint(v) & 0x7FFFFFFFu; }

template <typename T> __device__ __forceinline__ T zero() { return of_bits<T>(0); }
template <> __device__ __forceinline__ float zero<float>() { return 0.0f; }

// Bit i set when element i of `count` keys is kept: fewer than `keep` others beat it, j beating i
// when its key is larger, or equal with j < i.
__device__ __forceinline__ uint32_t kept_mask(const uint32_t* keys, int count, int keep) {
    uint32_t kept = 0;
    for (int i = 0; i < count; ++i) {
        int beaten_by = 0;
        for (int j = 0; j < count; ++j) {
            beaten_by += (keys[j] > keys[i]) || (keys[j] == keys[i] && j < i);
        }
        if (beaten_by < keep) kept |= 1u << i;
    }
    return kept;
}

// How a group of 4 chooses its two positions.
constexpr int PICK_NONZERO = 0;  // the non-zeros, completed with the lowest free positions
constexpr int PICK_24 = 1;       // the 2 largest magnitudes
constexpr int PICK_12 = 2;       // the larger of each pair

template <typename T>
__device__ __forceinline__ uint32_t pick_mask(const T (&v)[4], int pick) {
    uint32_t keys[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) keys[i] = magnitude_key(v[i]);
    if (pick == PICK_24) return kept_mask(keys, 4, 2);
    if (pick == PICK_12) return kept_mask(keys, 2, 1) | (kept_mask(keys + 2, 2, 1) << 2);
    uint32_t kept = 0;
    if (pick == PICK_NONZERO) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            if (keys[i] != 0 && __popc(kept) < 2) kept |= 1u << i;
        }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        if (__popc(kept) < 2 && !(kept & (1u << i))) kept |= 1u << i;
    }
    return kept;
}

// The nibble idx0 | idx1 << 2 of a mask with two bits set.
__device__ __forceinline__ uint32_t nibble_of(uint32_t kept) {
    const uint32_t first = __ffs(kept) - 1;
    const uint32_t second = __ffs(kept & ~(1u << first)) - 1;
    return first | (second << 2);
}

// v[i] for a run-time i < 4, by selects (an indexed register array would live in local memory).
template <typename T>
__device__ __forceinline__ T element(const T (&v)[4], uint32_t i) {
    return i == 0 ? v[0] : i == 1 ? v[1] : i == 2 ? v[2] : v[3];
}

// Where kept value `slot` of group `group` of a row sits among the row's stored values.
__device__ __forceinline__ int64_t stored_index(int64_t group, int slot) {
    const int64_t c = 2 * group + slot;
    const int64_t block = c / 32;
    const int u = (int)(c % 32);
    const int step = u / 16, half = (u % 16) / 8, lane = (u % 8) / 2, e = u % 2;
    return block * 32 + lane * 8 + step * 4 + half * 2 + e;
}

// What one metadata word covers: word w of a (rows, cols) matrix is lane (w % 32) of tile w / 32;
// it holds 4 groups of row `row0` (low bits) and 4 of row `row0 + 8` (high bits), the groups
// starting at column `col0`.
struct WordSpan {
    int64_t row0;
    int64_t col0;
};

__device__ __forceinline__ WordSpan word_span(int64_t word, int64_t cols) {
    const int64_t tile = word / TILE_WORDS;
    const int lane = (int)(word % TILE_WORDS);
    const int g = lane / 4, s = (lane % 4) / 2, h = lane % 2;
    const int64_t tiles_per_row = cols / COL_BLOCK;
    return WordSpan{(tile / tiles_per_row) * 16 + g, (tile % tiles_per_row) * COL_BLOCK + 32 * s + 16 * h};
}

// The metadata nibble of group `group` of `row`.
__device__ __forceinline__ uint32_t nibble_at(const uint32_t* meta, int64_t row, int64_t group, int64_t cols) {
    const int64_t col = 4 * group;
    const int64_t block = col / COL_BLOCK;
    const int within = (int)(col % COL_BLOCK);
    const int step = within / 32, half = (within % 32) / 16, j = (within % 16) / 4;
    const int lane = 4 * (int)(row % 8) + 2 * step + half;
    const int64_t tile = (row / 16) * (cols / COL_BLOCK) + block;
    const int shift = ((row % 16) >= 8 ? 16 : 0) + 4 * j;
    return (meta[tile * TILE_WORDS + lane] >> shift) & 0xFu;
}

// ---- pruning and the format: one thread per metadata word (8 groups, 16 kept values) ----------

// Dense N:M pruning (2:4 or 1:2: keep M/2 of M), one thread per group.
template <typename T, int M>
__device__ void prune_dense(const T* __restrict__ w, T* __restrict__ out, int64_t groups) {
    for (int64_t gi = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; gi < groups; gi += (int64_t)gridDim.x * blockDim.x) {
        uint32_t keys[M];
        T v[M];
#pragma unroll
        for (int i = 0; i < M; ++i) {
            v[i] = w[gi * M + i];
            keys[i] = magnitude_key(v[i]);
        }
        const uint32_t kept = kept_mask(keys, M, M / 2);
#pragma unroll
        for (int i = 0; i < M; ++i) out[gi * M + i] = (kept >> i) & 1 ? v[i] : zero<T>();
    }
}

// Compress a dense (rows, cols) matrix: values and metadata, each word's 8 groups by one thread.
template <typename T>
__device__ void compress(const T* __restrict__ w, T* __restrict__ values, uint32_t* __restrict__ meta, int64_t rows,
                         int64_t cols, int pick) {
    const int64_t words = rows / 16 * (cols / COL_BLOCK) * TILE_WORDS;
    for (int64_t word = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; word < words;
         word += (int64_t)gridDim.x * blockDim.x) {
        const WordSpan span = word_span(word, cols);
        uint32_t bits = 0;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int64_t row = span.row0 + 8 * r;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int64_t col = span.col0 + 4 * j;
                T v[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) v[i] = w[row * cols + col + i];
                const uint32_t nibble = nibble_of(pick_mask(v, pick));
                const int64_t group = col / 4;
                T* stored = values + row * (cols / 2);
                stored[stored_index(group, 0)] = element(v, nibble & 3);
                stored[stored_index(group, 1)] = element(v, nibble >> 2);
                bits |= nibble << (16 * r + 4 * j);
            }
        }
        meta[word] = bits;
    }
}

template <typename T>
__device__ void decompress(const T* __restrict__ values, const uint32_t* __restrict__ meta, T* __restrict__ out,
                           int64_t rows, int64_t cols) {
    const int64_t words = rows / 16 * (cols / COL_BLOCK) * TILE_WORDS;
    for (int64_t word = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; word < words;
         word += (int64_t)gridDim.x * blockDim.x) {
        const WordSpan span = word_span(word, cols);
        const uint32_t bits = meta[word];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int64_t row = span.row0 + 8 * r;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int64_t col = span.col0 + 4 * j;
                const uint32_t nibble = (bits >> (16 * r + 4 * j)) & 0xFu;
                const T* stored = values + row * (cols / 2);
                const T first = stored[stored_index(col / 4, 0)], second = stored[stored_index(col / 4, 1)];
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    out[row * cols + col + i] = i == (int)(nibble & 3)    ? first
                                                : i == (int)(nibble >> 2) ? second
                                                                          : of_bits<T>(0);
                }
            }
        }
    }
}

// W_dpᵀ (cols, rows) from W_s (rows, cols): output row c, group q holds W_s[4q..4q+4][c], pruned
// 2:4 by magnitude. Each thread owns one output metadata word.
template <typename T>
__device__ void double_prune(const T* __restrict__ values, const uint32_t* __restrict__ meta,
                             T* __restrict__ out_values, uint32_t* __restrict__ out_meta, int64_t rows, int64_t cols) {
    const int64_t out_rows = cols, out_cols = rows;
    const int64_t words = out_rows / 16 * (out_cols / COL_BLOCK) * TILE_WORDS;
    for (int64_t word = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; word < words;
         word += (int64_t)gridDim.x * blockDim.x) {
        const WordSpan span = word_span(word, out_cols);
        uint32_t bits = 0;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int64_t c = span.row0 + 8 * r;  // a column of W_s
            const int64_t in_group = c / 4;
            const uint32_t position = (uint32_t)(c % 4);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int64_t first_row = span.col0 + 4 * j;  // rows of W_s
                T v[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int64_t row = first_row + i;
                    const uint32_t nibble = nibble_at(meta, row, in_group, cols);
                    const T* stored = values + row * (cols / 2);
                    v[i] = (nibble & 3) == position    ? stored[stored_index(in_group, 0)]
                           : (nibble >> 2) == position ? stored[stored_index(in_group, 1)]
                                                       : of_bits<T>(0);
                }
                const uint32_t nibble = nibble_of(pick_mask(v, PICK_24));
                const int64_t group = first_row / 4;
                T* stored = out_values + c * (out_cols / 2);
                stored[stored_index(group, 0)] = element(v, nibble & 3);
                stored[stored_index(group, 1)] = element(v, nibble >> 2);
                bits |= nibble << (16 * r + 4 * j);
            }
        }
        out_meta[word] = bits;
    }
}

// d_values (f32, the layout of values) = the dense (rows, cols) gradient g at the kept positions.
template <typename T>
__device__ void gather(const T* __restrict__ g, const uint32_t* __restrict__ meta, float* __restrict__ d_values,
                       int64_t rows, int64_t cols) {
    const int64_t words = rows / 16 * (cols / COL_BLOCK) * TILE_WORDS;
    for (int64_t word = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; word < words;
         word += (int64_t)gridDim.x * blockDim.x) {
        const WordSpan span = word_span(word, cols);
        const uint32_t bits = meta[word];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int64_t row = span.row0 + 8 * r;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int64_t col = span.col0 + 4 * j;
                const uint32_t nibble = (bits >> (16 * r + 4 * j)) & 0xFu;
                float* stored = d_values + row * (cols / 2);
                stored[stored_index(col / 4, 0)] = to_float(g[row * cols + col + (nibble & 3)]);
                stored[stored_index(col / 4, 1)] = to_float(g[row * cols + col + (nibble >> 2)]);
            }
        }
    }
}

// d_bias[j] = Σ_i dy[i, j] in f32. Block: 32 columns (one per lane, 64-byte coalesced rows) x 8
// warps, warp w summing rows w, w+8, ... into 4 independent partial sums; the warps' sums are
// added in warp order (deterministic). Grid: one block per 32 columns.
constexpr int BIAS_WARPS = 8;

template <typename T>
__device__ void bias_grad(const T* __restrict__ dy, float* __restrict__ d_bias, int64_t m, int64_t n) {
    __shared__ float partial[BIAS_WARPS][WARP];
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const int64_t col = (int64_t)blockIdx.x * WARP + lane;
    float sum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (col < n) {
        int64_t i = warp;
        for (; i + 3 * BIAS_WARPS < m; i += 4 * BIAS_WARPS) {
#pragma unroll
            for (int u = 0; u < 4; ++u) sum[u] += to_float(dy[(i + u * BIAS_WARPS) * n + col]);
        }
        for (; i < m; i += BIAS_WARPS) sum[0] += to_float(dy[i * n + col]);
    }
    partial[warp][lane] = (sum[0] + sum[1]) + (sum[2] + sum[3]);
    __syncthreads();
    if (warp == 0 && col < n) {
        float total = 0.0f;
#pragma unroll
        for (int w = 0; w < BIAS_WARPS; ++w) total += partial[w][lane];
        d_bias[col] = total;
    }
}

// ---- SPDF's static mask and SLTrain's fixed support -------------------------------------------

// Zeroes the entries of a (rows, cols) matrix whose bit is clear in a row-major bitmask of
// `words_per_row` u32 words per row (bit col % 32 of word col / 32; 1 = kept).
template <typename T>
__device__ void mask_apply(T* __restrict__ t, const uint32_t* __restrict__ bits, int64_t rows, int64_t cols,
                           int64_t words_per_row) {
    const int64_t total = rows * cols;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t row = i / cols, col = i % cols;
        if (!((bits[row * words_per_row + col / 32] >> (col % 32)) & 1u)) t[i] = zero<T>();
    }
}

// w[idx[i]] += s[i] for distinct flat indices (no two threads touch one element).
template <typename T>
__device__ void scatter_add(T* __restrict__ w, const T* __restrict__ s, const uint32_t* __restrict__ idx, int64_t nnz) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < nnz; i += (int64_t)gridDim.x * blockDim.x) {
        const uint32_t at = idx[i];
        w[at] = from_float<T>(to_float(w[at]) + to_float(s[i]));
    }
}

// ds[i] = g[idx[i]].
template <typename T>
__device__ void gather_flat(const T* __restrict__ g, T* __restrict__ ds, const uint32_t* __restrict__ idx, int64_t nnz) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < nnz; i += (int64_t)gridDim.x * blockDim.x) {
        ds[i] = g[idx[i]];
    }
}

// out[i] = values[i] rounded to T (SLTrain's 2:4 ds, from the f32 gradient on the support).
template <typename T>
__device__ void round_flat(const float* __restrict__ values, T* __restrict__ out, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        out[i] = from_float<T>(values[i]);
    }
}

// ---- the sparse tensor-core GEMM --------------------------------------------------------------

// d += A·B for one 16x8x32 tile: A 2:4-sparse (16x32, two kept of every 4), B 32x8; metadata
// from the lanes that `Selector` names (0: lanes 4g, 4g+1; 1: lanes 4g+2, 4g+3).
template <typename T, int Selector>
__device__ __forceinline__ void mma_sp(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4], uint32_t e);

template <>
__device__ __forceinline__ void mma_sp<__nv_bfloat16, 0>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                                                         uint32_t e) {
    asm("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
}
template <>
__device__ __forceinline__ void mma_sp<__nv_bfloat16, 1>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                                                         uint32_t e) {
    asm("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x1;"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
}
template <>
__device__ __forceinline__ void mma_sp<__half, 0>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                                                  uint32_t e) {
    asm("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
}
template <>
__device__ __forceinline__ void mma_sp<__half, 1>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                                                  uint32_t e) {
    asm("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x1;"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
}

// Both k-steps of one 64-column block for one 16-row tile and one 8-token tile: `lo` and `hi` are
// the lane's 16-byte loads of rows g and g+8, `b` the B registers of step 0 then step 1.
template <typename T>
__device__ __forceinline__ void mma_block(float (&d)[4], const uint4& lo, const uint4& hi, const uint32_t (&b)[8],
                                          uint32_t e) {
    const uint32_t a0[4] = {lo.x, hi.x, lo.y, hi.y};
    const uint32_t a1[4] = {lo.z, hi.z, lo.w, hi.w};
    const uint32_t b0[4] = {b[0], b[1], b[2], b[3]};
    const uint32_t b1[4] = {b[4], b[5], b[6], b[7]};
    mma_sp<T, 0>(d, a0, b0, e);
    mma_sp<T, 1>(d, a1, b1, e);
}

// Few tokens (m <= 8·TOKEN_TILES <= 64), memory-bound: the compressed weight is read once.
// Block: 8 warps on ROW_TILES 16-row tiles of W_s (two while the partial sums fit in 32 KiB of
// shared memory, so that each x fragment serves two tiles), warp w taking the 64-column blocks
// w, w+8, ...; the next block's 16-byte value loads and metadata words are in flight while the
// current one is multiplied. B (x, at most 64 rows: L2-resident) is read straight from global
// memory, one 32-bit pair of k per register, zero past the last token. The 8 warps' partial sums
// meet in shared memory and are added in warp order (deterministic). Traffic: the weight's 9/16
// of dense bytes once, x once per block (from L2), y once.
constexpr int SMALL_WARPS = 8;


template <typename T, int TOKEN_TILES>
__device__ void gemm_small(const uint4* __restrict__ values, const uint32_t* __restrict__ meta, const T* __restrict__ x,
                           const T* __restrict__ bias, T* __restrict__ y, int m, int n, int k, int accumulate) {
    constexpr int ROW_TILES = TOKEN_TILES <= 4 ? 2 : 1;
    __shared__ float partial[SMALL_WARPS][ROW_TILES][TOKEN_TILES][4][WARP];
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int g = lane / 4, t = lane % 4;
    const int first_tile = blockIdx.x * ROW_TILES;
    const int tiles = min(ROW_TILES, n / 16 - first_tile);
    const int blocks = k / COL_BLOCK;
    // A row of values is k bytes: k/16 units of 16 bytes, 4 per 64-column block, lane t's the t-th.
    const int64_t row_units = k / 16;
    const uint4* lo_row[ROW_TILES];
    const uint4* hi_row[ROW_TILES];
    const uint32_t* meta_tile[ROW_TILES];
#pragma unroll
    for (int rt = 0; rt < ROW_TILES; ++rt) {
        const int tile = min(first_tile + rt, n / 16 - 1);
        lo_row[rt] = values + (int64_t)(tile * 16 + g) * row_units + t;
        hi_row[rt] = values + (int64_t)(tile * 16 + g + 8) * row_units + t;
        meta_tile[rt] = meta + (int64_t)tile * blocks * TILE_WORDS + lane;
    }

    float acc[ROW_TILES][TOKEN_TILES][4];
#pragma unroll
    for (int rt = 0; rt < ROW_TILES; ++rt) {
#pragma unroll
        for (int tt = 0; tt < TOKEN_TILES; ++tt) {
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[rt][tt][i] = 0.0f;
        }
    }
    uint4 lo[ROW_TILES], hi[ROW_TILES];
    uint32_t e[ROW_TILES];
    int block = warp;
#pragma unroll
    for (int rt = 0; rt < ROW_TILES; ++rt) {
        const bool live = block < blocks && rt < tiles;
        lo[rt] = live ? __ldcs(lo_row[rt] + 4 * block) : make_uint4(0, 0, 0, 0);
        hi[rt] = live ? __ldcs(hi_row[rt] + 4 * block) : make_uint4(0, 0, 0, 0);
        e[rt] = live ? __ldcs(meta_tile[rt] + block * TILE_WORDS) : 0u;
    }
    for (; block < blocks; block += SMALL_WARPS) {
        const int next = block + SMALL_WARPS;
        uint4 next_lo[ROW_TILES], next_hi[ROW_TILES];
        uint32_t next_e[ROW_TILES];
#pragma unroll
        for (int rt = 0; rt < ROW_TILES; ++rt) {
            const bool live = next < blocks && rt < tiles;
            next_lo[rt] = live ? __ldcs(lo_row[rt] + 4 * next) : make_uint4(0, 0, 0, 0);
            next_hi[rt] = live ? __ldcs(hi_row[rt] + 4 * next) : make_uint4(0, 0, 0, 0);
            next_e[rt] = live ? __ldcs(meta_tile[rt] + next * TILE_WORDS) : 0u;
        }
#pragma unroll
        for (int tt = 0; tt < TOKEN_TILES; ++tt) {
            const int token = tt * 8 + g;
            uint32_t b[8];
            const uint32_t* x_row = reinterpret_cast<const uint32_t*>(x + (int64_t)min(token, m - 1) * k);
            const int base = (block * COL_BLOCK) / 2 + t;  // in pairs of k
#pragma unroll
            for (int i = 0; i < 8; ++i) b[i] = token < m ? __ldg(x_row + base + 4 * i) : 0u;
#pragma unroll
            for (int rt = 0; rt < ROW_TILES; ++rt) {
                // A tile past n has no valid metadata: skip it (uniform across the warp).
                if (rt < tiles) mma_block<T>(acc[rt][tt], lo[rt], hi[rt], b, e[rt]);
            }
        }
#pragma unroll
        for (int rt = 0; rt < ROW_TILES; ++rt) {
            lo[rt] = next_lo[rt];
            hi[rt] = next_hi[rt];
            e[rt] = next_e[rt];
        }
    }
#pragma unroll
    for (int rt = 0; rt < ROW_TILES; ++rt) {
#pragma unroll
        for (int tt = 0; tt < TOKEN_TILES; ++tt) {
#pragma unroll
            for (int i = 0; i < 4; ++i) partial[warp][rt][tt][i][lane] = acc[rt][tt][i];
        }
    }
    __syncthreads();
    // Output (row r of the block, token j): tile r / 16, accumulator i = 2·(r % 16 >= 8) + j % 2
    // of lane 4·(r % 8) + (j % 8) / 2 in token tile j / 8.
    for (int idx = threadIdx.x; idx < ROW_TILES * 16 * 8 * TOKEN_TILES; idx += SMALL_WARPS * WARP) {
        const int r = idx % (ROW_TILES * 16), j = idx / (ROW_TILES * 16);
        const int rt = r / 16, within = r % 16;
        if (j >= m || rt >= tiles) continue;
        const int i = 2 * (within >= 8) + j % 2, src = 4 * (within % 8) + (j % 8) / 2, tt = j / 8;
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < SMALL_WARPS; ++w) sum += partial[w][rt][tt][i][src];
        const int row = (first_tile + rt) * 16 + within;
        if (bias != nullptr) sum += to_float(bias[row]);
        T* out = y + (int64_t)j * n + row;
        if (accumulate) sum += to_float(*out);
        *out = from_float<T>(sum);
    }
}

// Many tokens, math-bound. Block tile: 128 rows of W_s x 128 tokens, k in blocks of 64, a
// STAGES-deep cp.async pipeline in dynamic shared memory (values 8 KiB, metadata 1 KiB, x 16 KiB
// per stage). 8 warps as 2 (rows) x 4 (tokens), each 64 rows x 32 tokens: 4x4 accumulator tiles,
// 32 mma.sp per k-block. A comes from shared memory with one 16-byte load per row (the format's
// order; rows of 64 bytes, so a quarter-warp's 8 loads cover 128 contiguous bytes: no bank
// conflict); B with ldmatrix.x4 from x rows of 128 bytes whose 16-byte chunks are XOR-swizzled by
// the row, so that 8 rows at one k hit 8 different banks. Out-of-range rows and tokens are
// zero-filled by cp.async and not stored.
constexpr int BIG_ROWS = 128, BIG_TOKENS = 128, BIG_WARPS = 8, STAGES = 3;
constexpr int STAGE_VALUE_BYTES = BIG_ROWS * 64;
constexpr int STAGE_META_BYTES = BIG_ROWS / 16 * TILE_WORDS * 4;
constexpr int STAGE_X_BYTES = BIG_TOKENS * COL_BLOCK * 2;
constexpr int STAGE_BYTES = STAGE_VALUE_BYTES + STAGE_META_BYTES + STAGE_X_BYTES;

__device__ __forceinline__ void cp_async16(uint32_t smem, const void* global, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem), "l"(global), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t smem) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem));
}

// Queues one k-block of the block tile into a stage. Rows past n read a valid row tile (never
// stored; metadata must hold valid codes); tokens past m are zero-filled (never stored either).
__device__ __forceinline__ void load_stage(uint32_t stage, const uint8_t* values, const uint32_t* meta, const uint8_t* x,
                                           int row0, int token0, int block, int m, int n, int k) {
    constexpr int THREADS = BIG_WARPS * WARP;
    const int tid = threadIdx.x;
    const int blocks = k / COL_BLOCK;
    // Values: 128 rows x 4 units of 16 bytes.
#pragma unroll
    for (int i = 0; i < BIG_ROWS * 4 / THREADS; ++i) {
        const int u = tid + i * THREADS;
        const int r = u / 4, c = u % 4;
        const uint8_t* src = values + (int64_t)min(row0 + r, n - 1) * k + block * 64 + c * 16;
        cp_async16(stage + r * 64 + c * 16, src, true);
    }
    // Metadata: 8 row tiles x 128 bytes.
    if (tid < BIG_ROWS / 16 * 8) {
        const int tile = tid / 8, c = tid % 8;
        const int row_tile = min(row0 / 16 + tile, n / 16 - 1);
        const uint32_t* src = meta + ((int64_t)row_tile * blocks + block) * TILE_WORDS + c * 4;
        cp_async16(stage + STAGE_VALUE_BYTES + tile * 128 + c * 16, src, true);
    }
    // x: 128 tokens x 8 chunks of 16 bytes, chunk c of token r stored at chunk c ^ (r % 8).
#pragma unroll
    for (int i = 0; i < BIG_TOKENS * 8 / THREADS; ++i) {
        const int u = tid + i * THREADS;
        const int r = u / 8, c = u % 8;
        const int token = token0 + r;
        const uint8_t* src = x + ((int64_t)min(token, m - 1) * k + block * COL_BLOCK) * 2 + c * 16;
        cp_async16(stage + STAGE_VALUE_BYTES + STAGE_META_BYTES + r * 128 + ((c ^ (r % 8)) * 16), src, token < m);
    }
}

template <typename T>
__device__ void gemm_big(const uint8_t* __restrict__ values, const uint32_t* __restrict__ meta,
                         const uint8_t* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y, int m, int n,
                         int k, int accumulate) {
    extern __shared__ __align__(128) uint8_t shared[];
    const uint32_t smem = (uint32_t)__cvta_generic_to_shared(shared);
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int g = lane / 4, t = lane % 4;
    const int warp_row = (warp / 4) * 64, warp_token = (warp % 4) * 32;
    const int row0 = blockIdx.x * BIG_ROWS, token0 = blockIdx.y * BIG_TOKENS;
    const int blocks = k / COL_BLOCK;

    float acc[4][4][4];
#pragma unroll
    for (int a = 0; a < 4; ++a) {
#pragma unroll
        for (int b = 0; b < 4; ++b) {
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[a][b][i] = 0.0f;
        }
    }

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < blocks) load_stage(smem + s * STAGE_BYTES, values, meta, x, row0, token0, s, m, n, k);
        cp_async_commit();
    }
    for (int block = 0; block < blocks; ++block) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        const int ahead = block + STAGES - 1;
        if (ahead < blocks) {
            load_stage(smem + (ahead % STAGES) * STAGE_BYTES, values, meta, x, row0, token0, ahead, m, n, k);
        }
        cp_async_commit();

        const uint8_t* stage = shared + (block % STAGES) * STAGE_BYTES;
        const uint32_t stage_smem = smem + (block % STAGES) * STAGE_BYTES;
        uint4 lo[4], hi[4];
        uint32_t e[4];
#pragma unroll
        for (int rt = 0; rt < 4; ++rt) {
            const int r = warp_row + rt * 16 + g;
            lo[rt] = *reinterpret_cast<const uint4*>(stage + r * 64 + t * 16);
            hi[rt] = *reinterpret_cast<const uint4*>(stage + (r + 8) * 64 + t * 16);
            e[rt] = *reinterpret_cast<const uint32_t*>(stage + STAGE_VALUE_BYTES + ((warp_row / 16 + rt) * TILE_WORDS + lane) * 4);
        }
#pragma unroll
        for (int tt = 0; tt < 4; ++tt) {
            // Lane L addresses row L % 8 of matrix L / 8: token warp_token + 8tt + L % 8, k chunk
            // 4·step + L / 8.
            const int r = warp_token + tt * 8 + lane % 8;
            uint32_t b[8];
            uint32_t b_step[4];
#pragma unroll
            for (int step = 0; step < 2; ++step) {
                const int chunk = (4 * step + lane / 8) ^ (r % 8);
                ldmatrix_x4(b_step, stage_smem + STAGE_VALUE_BYTES + STAGE_META_BYTES + r * 128 + chunk * 16);
#pragma unroll
                for (int i = 0; i < 4; ++i) b[4 * step + i] = b_step[i];
            }
#pragma unroll
            for (int rt = 0; rt < 4; ++rt) mma_block<T>(acc[rt][tt], lo[rt], hi[rt], b, e[rt]);
        }
    }
    cp_async_wait<0>();

    // Accumulator i of lane (g, t) in tile (rt, tt): row + g + 8·(i / 2), token 8tt + 2t + i % 2.
#pragma unroll
    for (int rt = 0; rt < 4; ++rt) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int row = row0 + warp_row + rt * 16 + g + 8 * half;
            if (row >= n) continue;
            const float b = bias != nullptr ? to_float(bias[row]) : 0.0f;
#pragma unroll
            for (int tt = 0; tt < 4; ++tt) {
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    const int token = token0 + warp_token + tt * 8 + 2 * t + i;
                    if (token >= m) continue;
                    T* out = y + (int64_t)token * n + row;
                    const float value = acc[rt][tt][2 * half + i] + b;
                    *out = from_float<T>(accumulate ? value + to_float(*out) : value);
                }
            }
        }
    }
}

}  // namespace

#define ELEMENT_KERNELS(T, NAME)                                                                                     \
    extern "C" __global__ void __launch_bounds__(ELEMENT_THREADS)                                                  \
        sparse_prune24_##NAME(const T* w, T* out, int64_t groups) {                                                \
        prune_dense<T, 4>(w, out, groups);                                                                         \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(ELEMENT_THREADS)                                                  \
        sparse_prune12_##NAME(const T* w, T* out, int64_t groups) {                                                \
        prune_dense<T, 2>(w, out, groups);                                                                         \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(BIAS_WARPS * WARP) sparse_bias_grad_##NAME(                       \
        const T* dy, float* d_bias, int64_t m, int64_t n) {                                                        \
        bias_grad<T>(dy, d_bias, m, n);                                                                            \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(ELEMENT_THREADS) spdf_mask_apply_##NAME(                          \
        T* t, const uint32_t* bits, int64_t rows, int64_t cols, int64_t words_per_row) {                           \
        mask_apply<T>(t, bits, rows, cols, words_per_row);                                                         \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(ELEMENT_THREADS)                                                  \
        sltrain_scatter_add_##NAME(T* w, const T* s, const uint32_t* idx, int64_t nnz) {                           \
        scatter_add<T>(w, s, idx, nnz);                                                                            \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(ELEMENT_THREADS)                                                  \
        sltrain_gather_##NAME(const T* g, T* ds, const uint32_t* idx, int64_t nnz) {                               \
        gather_flat<T>(g, ds, idx, nnz);                                                                           \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(ELEMENT_THREADS)                                                  \
        sltrain_round_##NAME(const float* values, T* out, int64_t n) {                                             \
        round_flat<T>(values, out, n);                                                                             \
    }

#define SPARSE_KERNELS(T, NAME)                                                                                    \
    extern "C" __global__ void __launch_bounds__(ELEMENT_THREADS) sparse24_compress_##NAME(                        \
        const T* w, T* values, uint32_t* meta, int64_t rows, int64_t cols, int pick) {                             \
        compress<T>(w, values, meta, rows, cols, pick);                                                            \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(ELEMENT_THREADS) sparse24_decompress_##NAME(                      \
        const T* values, const uint32_t* meta, T* out, int64_t rows, int64_t cols) {                               \
        decompress<T>(values, meta, out, rows, cols);                                                              \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(ELEMENT_THREADS) sparse24_double_prune_##NAME(                    \
        const T* values, const uint32_t* meta, T* out_values, uint32_t* out_meta, int64_t rows, int64_t cols) {    \
        double_prune<T>(values, meta, out_values, out_meta, rows, cols);                                           \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(ELEMENT_THREADS) sparse24_gather_##NAME(                          \
        const T* g, const uint32_t* meta, float* d_values, int64_t rows, int64_t cols) {                           \
        gather<T>(g, meta, d_values, rows, cols);                                                                  \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(SMALL_WARPS * WARP) sparse24_gemm_small1_##NAME(                  \
        const uint4* values, const uint32_t* meta, const T* x, const T* bias, T* y, int m, int n, int k,            \
        int accumulate) {                                                                                          \
        gemm_small<T, 1>(values, meta, x, bias, y, m, n, k, accumulate);                                           \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(SMALL_WARPS * WARP) sparse24_gemm_small2_##NAME(                  \
        const uint4* values, const uint32_t* meta, const T* x, const T* bias, T* y, int m, int n, int k,            \
        int accumulate) {                                                                                          \
        gemm_small<T, 2>(values, meta, x, bias, y, m, n, k, accumulate);                                           \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(SMALL_WARPS * WARP) sparse24_gemm_small4_##NAME(                  \
        const uint4* values, const uint32_t* meta, const T* x, const T* bias, T* y, int m, int n, int k,            \
        int accumulate) {                                                                                          \
        gemm_small<T, 4>(values, meta, x, bias, y, m, n, k, accumulate);                                           \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(SMALL_WARPS * WARP) sparse24_gemm_small8_##NAME(                  \
        const uint4* values, const uint32_t* meta, const T* x, const T* bias, T* y, int m, int n, int k,            \
        int accumulate) {                                                                                          \
        gemm_small<T, 8>(values, meta, x, bias, y, m, n, k, accumulate);                                           \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(BIG_WARPS * WARP) sparse24_gemm_##NAME(                           \
        const uint8_t* values, const uint32_t* meta, const uint8_t* x, const T* bias, T* y, int m, int n, int k,   \
        int accumulate) {                                                                                          \
        gemm_big<T>(values, meta, x, bias, y, m, n, k, accumulate);                                                \
    }

ELEMENT_KERNELS(float, f32)
ELEMENT_KERNELS(__nv_bfloat16, bf16)
ELEMENT_KERNELS(__half, f16)
SPARSE_KERNELS(__nv_bfloat16, bf16)
SPARSE_KERNELS(__half, f16)
