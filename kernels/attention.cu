// Flash attention for sm_80+ (mma.sync.m16n8k16, bf16/f16 operands, f32 accumulation): forward
// with an online softmax per query tile, and a deterministic backward that recomputes the
// probabilities from the log-sum-exp (a dK/dV pass over key tiles and a separate dQ pass over query
// tiles, so that no gradient is ever accumulated with atomics). The S×S score matrix never leaves
// registers.
//
// Tiles: a CTA is 4 warps; each warp owns 16 rows of the CTA's tile (queries in the forward and
// the dQ pass, keys in the dK/dV pass). Head dimensions are padded to DP (64, 128 or 256): the
// copies zero-fill the columns past the real head_dim, so that one instantiation serves every
// multiple of 8 up to DP (64 and 128 run unpadded). Shared-memory rows are DP + 8 elements long,
// which puts the 8 rows of every ldmatrix in different banks.
//
// Pipeline: the streamed operand (K/V in the forward and dQ pass, Q/dO in the dK/dV pass) is
// double-buffered with cp.async: the next tile's copy is in flight while the current one is
// multiplied. Memory traffic: the forward reads Q once and each visible K/V tile once per query
// tile; masks skip the key tiles that no row of the query tile can see (that is what makes the
// sliding window and the Λ mask cheaper than causal attention), and only tiles on a mask edge pay
// for the per-element test.
//
// Positions are aligned bottom-right: query i of a sequence with sq queries and sk keys sits at
// position i + sk - sq. Rows that see no key produce zeros and a log-sum-exp of -inf.
#include <type_traits>

#include "common/mma.cuh"

namespace {

constexpr int THREADS = 128;
constexpr int WARPS = THREADS / 32;
constexpr int ROWS = 16 * WARPS;  // rows of a CTA's own tile
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

enum MaskKind : int { MASK_NONE = 0, MASK_CAUSAL = 1, MASK_WINDOW = 2, MASK_LAMBDA = 3 };

// Which pairs a pass sees under LM-Infinite's distance ceiling D: all of them (no ceiling), those
// within it (p − j ≤ D: rotated query and key), or those beyond it (p − j > D: the query rotated
// to D, the key un-rotated).
enum Branch : int { BRANCH_ALL = 0, BRANCH_ROT = 1, BRANCH_LIM = 2 };

}  // namespace

// Layout shared with src/ops/attention.rs (#[repr(C)] AttentionParams).
struct AttentionParams {
    const void* q;
    const void* k;
    const void* v;
    void* out;
    float* lse;
    const void* d_out;
    float* delta;
    void* d_q;
    void* d_k;
    void* d_v;
    const int* cu_q;  // null: dense batch, sequence b at b * seq_q
    const int* cu_k;
    int batch;
    int seq_q;
    int seq_k;
    int heads_q;
    int heads_kv;
    int head_dim;
    float scale;
    float scale_log2;  // scale * log2(e): the softmax runs in base 2
    int mask_kind;
    int left;
    int right;
    int global;
    int window;
    int padding;
    // The ceiling instantiations' fields, last so that the others' layout is unchanged.
    int ceiling;        // D
    int branch;         // the backward pass's Branch
    const void* q_lim;  // R(D)·q, rounded to the input dtype (forward)
    const void* k_raw;  // the un-rotated keys (forward)
};

namespace {

struct Sequence {
    int q_start, sq, k_start, sk;
};

__device__ __forceinline__ Sequence sequence(const AttentionParams& p, int b) {
    Sequence s;
    if (p.cu_q != nullptr) {
        s.q_start = p.cu_q[b];
        s.sq = p.cu_q[b + 1] - s.q_start;
        s.k_start = p.cu_k[b];
        s.sk = p.cu_k[b + 1] - s.k_start;
    } else {
        s.q_start = b * p.seq_q;
        s.sq = p.seq_q;
        s.k_start = b * p.seq_k;
        s.sk = p.seq_k;
    }
    return s;
}

__device__ __forceinline__ bool visible(const AttentionParams& p, long long pos, long long j) {
    switch (p.mask_kind) {
        case MASK_CAUSAL: return j <= pos;
        case MASK_WINDOW: return j >= pos - p.left && j <= pos + p.right;
        case MASK_LAMBDA: return j <= pos && (pos - j < p.window || j < p.global);
        default: return true;
    }
}

// Whether every key j_lo..=j_hi (all below sk) is visible from every position p_lo..=p_hi.
__device__ __forceinline__ bool fully_visible(const AttentionParams& p, long long p_lo, long long p_hi, long long j_lo,
                                              long long j_hi, int sk) {
    if (j_hi >= sk) return false;
    switch (p.mask_kind) {
        case MASK_CAUSAL: return j_hi <= p_lo;
        case MASK_WINDOW: return j_lo >= p_hi - p.left && j_hi <= p_lo + p.right;
        case MASK_LAMBDA: return j_hi <= p_lo && (j_hi < p.global || p_hi - j_lo < p.window);
        default: return true;
    }
}

// The key tiles (of `tile` keys, aligned to multiples of it) that positions p_lo..=p_hi may see:
// at most two runs (the Λ mask's global run and its local run), never overlapping.
struct KeyTiles {
    int first0, count0, first1, count1;
    __device__ __forceinline__ int count() const { return count0 + count1; }
    __device__ __forceinline__ int at(int n) const { return n < count0 ? first0 + n : first1 + (n - count0); }
};

__device__ __forceinline__ KeyTiles key_tiles(const AttentionParams& p, long long p_lo, long long p_hi, int sk,
                                              int tile, int branch = BRANCH_ALL) {
    long long lo0 = 0, hi0 = sk, lo1 = 0, hi1 = 0;
    switch (p.mask_kind) {
        case MASK_CAUSAL: hi0 = p_hi + 1; break;
        case MASK_WINDOW:
            lo0 = p_lo - p.left;
            hi0 = p_hi + p.right + 1;
            break;
        case MASK_LAMBDA:
            hi0 = min((long long)p.global, p_hi + 1);
            lo1 = p_lo - p.window + 1;
            hi1 = p_hi + 1;
            break;
        default: break;
    }
    if (branch == BRANCH_ROT) {
        // Within the ceiling: j ≥ p − D.
        lo0 = max(lo0, p_lo - p.ceiling);
        lo1 = max(lo1, p_lo - p.ceiling);
    } else if (branch == BRANCH_LIM) {
        // Beyond it: j < p − D, among the keys the mask can show that far away. The Λ mask's local
        // keys (p − j < window) never are when D ≥ window − 1, nor the window mask's (p − j ≤ left)
        // when D ≥ left.
        hi0 = min(hi0, p_hi - p.ceiling);
        hi1 = min(hi1, p_hi - p.ceiling);
        if (p.mask_kind == MASK_LAMBDA && p.ceiling >= p.window - 1) hi1 = lo1;
        if (p.mask_kind == MASK_WINDOW && p.ceiling >= p.left) hi0 = lo0;
    }
    lo0 = max(0ll, min(lo0, (long long)sk));
    hi0 = max(lo0, min(hi0, (long long)sk));
    lo1 = max(0ll, min(lo1, (long long)sk));
    hi1 = max(lo1, min(hi1, (long long)sk));
    KeyTiles t;
    t.first0 = (int)(lo0 / tile);
    const int end0 = hi0 > lo0 ? (int)((hi0 + tile - 1) / tile) : 0;
    t.count0 = hi0 > lo0 ? end0 - t.first0 : 0;
    t.first1 = max((int)(lo1 / tile), end0);
    t.count1 = hi1 > lo1 ? max(0, (int)((hi1 + tile - 1) / tile) - t.first1) : 0;
    return t;
}

// Whether the pair (position pos, key j) belongs to `branch`.
__device__ __forceinline__ bool in_branch(const AttentionParams& p, int branch, long long pos, long long j) {
    return branch == BRANCH_LIM ? pos - j > p.ceiling : pos - j <= p.ceiling;
}

// Whether every pair of positions p_lo..=p_hi and keys j_lo..=j_hi belongs to `branch`.
__device__ __forceinline__ bool branch_full(const AttentionParams& p, int branch, long long p_lo, long long p_hi,
                                            long long j_lo, long long j_hi) {
    return branch == BRANCH_LIM ? p_lo - j_hi > p.ceiling : p_hi - j_lo <= p.ceiling;
}

// Copies `TILE_ROWS` rows (of which the first `valid_rows` exist) of DP columns (of which the first
// `head_dim` exist) into shared memory, zero-filling the rest. Row r is at src + r * stride.
template <int TILE_ROWS, int DP, typename T>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int valid_rows, size_t stride, int head_dim) {
    constexpr int CHUNKS = DP / 8;
    for (int n = threadIdx.x; n < TILE_ROWS * CHUNKS; n += THREADS) {
        const int r = n / CHUNKS, c = n % CHUNKS;
        const bool valid = r < valid_rows && c * 8 < head_dim;
        const T* from = valid ? src + (size_t)r * stride + c * 8 : src;
        tessera::cp_async_16(dst + r * (DP + 8) + c * 8, from, valid);
    }
}

// acc (16 x N) += A (the warp's 16 rows, row-major in shared memory) · Bᵀ (N rows, row-major),
// contracting over DP columns.
template <typename T, int DP, int N>
__device__ __forceinline__ void gemm_abt(float (&acc)[N / 8][4], const T* a, const T* b, int lane) {
    constexpr int S = DP + 8;
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) {
        uint32_t af[4];
        tessera::ldmatrix_x4(af, a + (lane % 16) * S + kk * 16 + (lane / 16) * 8);
#pragma unroll
        for (int np = 0; np < N / 16; ++np) {
            uint32_t bf[4];
            tessera::ldmatrix_x4(bf, b + (np * 16 + (lane % 8) + (lane / 16) * 8) * S + kk * 16 + ((lane / 8) % 2) * 8);
            tessera::MmaOp<T>::run(acc[2 * np], af, bf[0], bf[1]);
            tessera::MmaOp<T>::run(acc[2 * np + 1], af, bf[2], bf[3]);
        }
    }
}

// acc (16 x DP) += P (16 x N, in accumulator registers, rounded to T) · B (N rows of DP columns,
// row-major in shared memory).
template <typename T, int DP, int N>
__device__ __forceinline__ void gemm_pb(float (&acc)[DP / 8][4], const float (&pr)[N / 8][4], const T* b, int lane) {
    constexpr int S = DP + 8;
#pragma unroll
    for (int kk = 0; kk < N / 16; ++kk) {
        const uint32_t af[4] = {
            tessera::MmaOp<T>::pack(pr[2 * kk][0], pr[2 * kk][1]),
            tessera::MmaOp<T>::pack(pr[2 * kk][2], pr[2 * kk][3]),
            tessera::MmaOp<T>::pack(pr[2 * kk + 1][0], pr[2 * kk + 1][1]),
            tessera::MmaOp<T>::pack(pr[2 * kk + 1][2], pr[2 * kk + 1][3]),
        };
#pragma unroll
        for (int np = 0; np < DP / 16; ++np) {
            uint32_t bf[4];
            tessera::ldmatrix_x4_trans(bf, b + (kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * S + np * 16 + (lane / 16) * 8);
            tessera::MmaOp<T>::run(acc[2 * np], af, bf[0], bf[1]);
            tessera::MmaOp<T>::run(acc[2 * np + 1], af, bf[2], bf[3]);
        }
    }
}

template <int N>
__device__ __forceinline__ void zero(float (&acc)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
}

__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Two adjacent output elements: rounded to T, or kept in f32 (the ceiling's partial gradients).
template <typename T>
__device__ __forceinline__ void store_pair(T* dst, float lo, float hi) {
    *reinterpret_cast<uint32_t*>(dst) = tessera::MmaOp<T>::pack(lo, hi);
}

__device__ __forceinline__ void store_pair(float* dst, float lo, float hi) {
    *reinterpret_cast<float2*>(dst) = make_float2(lo, hi);
}

// Stores the warp's 16 x DP accumulator times `scale` (row 0 is global row `row0`, of which
// `valid_rows` exist) into rows of `stride` elements, columns below head_dim.
template <typename Out, int DP>
__device__ __forceinline__ void store_rows(Out* dst, const float (&acc)[DP / 8][4], const float (&row_scale)[2],
                                           int valid_rows, size_t stride, int head_dim, int lane) {
    const int g = lane / 4, c = lane % 4;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int r = g + half * 8;
        if (r >= valid_rows) continue;
#pragma unroll
        for (int nt = 0; nt < DP / 8; ++nt) {
            const int col = nt * 8 + 2 * c;
            if (col < head_dim) {
                store_pair(dst + (size_t)r * stride + col, acc[nt][2 * half] * row_scale[half],
                           acc[nt][2 * half + 1] * row_scale[half]);
            }
        }
    }
}

// ---- forward ---------------------------------------------------------------------------------

// With CEILING, the key tiles are visited in two runs that share one online softmax: first those
// holding pairs beyond the ceiling (scored with q_lim against the un-rotated keys), then those
// holding pairs within it (q_rot against k_rot); a tile straddling the boundary is visited once in
// each run, every pair counted in exactly one of them.
template <typename T, int DP, int BN, bool CEILING>
__device__ __forceinline__ void attention_fwd(const AttentionParams& p) {
    constexpr int S = DP + 8;
    extern __shared__ __align__(16) unsigned char shared[];
    T* sQ = reinterpret_cast<T*>(shared);
    T* sK = sQ + ROWS * S;
    T* sV = sK + 2 * BN * S;
    T* sQlim = sV + 2 * BN * S;  // only with CEILING

    const Sequence s = sequence(p, blockIdx.z);
    const int h = blockIdx.y, i0 = blockIdx.x * ROWS;
    if (i0 >= s.sq) return;
    const int kv = h / (p.heads_q / p.heads_kv);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
    const int rows_here = min(ROWS, s.sq - i0);
    const long long shift = (long long)s.sk - s.sq;
    const long long p_lo = i0 + shift, p_hi = i0 + rows_here - 1 + shift;
    const KeyTiles tiles = key_tiles(p, p_lo, p_hi, s.sk, BN, CEILING ? BRANCH_ROT : BRANCH_ALL);
    const KeyTiles beyond = key_tiles(p, p_lo, p_hi, s.sk, BN, BRANCH_LIM);
    // Steps: n < n_beyond visit beyond.at(n) in the ceiling branch, the rest tiles.at(n - n_beyond).
    const int n_beyond = CEILING ? beyond.count() : 0;
    const int steps = n_beyond + tiles.count();
    auto tile_of = [&](int n) { return CEILING && n < n_beyond ? beyond.at(n) : tiles.at(n - n_beyond); };
    const size_t q_stride = (size_t)p.heads_q * p.head_dim, kv_stride = (size_t)p.heads_kv * p.head_dim;
    const size_t q_offset = ((size_t)(s.q_start + i0) * p.heads_q + h) * p.head_dim;
    const size_t kv_offset = ((size_t)s.k_start * p.heads_kv + kv) * p.head_dim;
    const T* k = static_cast<const T*>(p.k) + kv_offset;
    const T* v = static_cast<const T*>(p.v) + kv_offset;

    load_tile<ROWS, DP>(sQ, static_cast<const T*>(p.q) + q_offset, rows_here, q_stride, p.head_dim);
    if constexpr (CEILING) {
        load_tile<ROWS, DP>(sQlim, static_cast<const T*>(p.q_lim) + q_offset, rows_here, q_stride, p.head_dim);
    }
    tessera::cp_async_commit();
    auto load_kv = [&](int n, int buffer) {
        const int j0 = tile_of(n) * BN;
        const T* keys = CEILING && n < n_beyond ? static_cast<const T*>(p.k_raw) + kv_offset : k;
        load_tile<BN, DP>(sK + buffer * BN * S, keys + (size_t)j0 * kv_stride, s.sk - j0, kv_stride, p.head_dim);
        load_tile<BN, DP>(sV + buffer * BN * S, v + (size_t)j0 * kv_stride, s.sk - j0, kv_stride, p.head_dim);
        tessera::cp_async_commit();
    };
    if (steps > 0) load_kv(0, 0);

    float acc_o[DP / 8][4];
    zero(acc_o);
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};
    const long long my_pos[2] = {i0 + warp * 16 + g + shift, i0 + warp * 16 + g + 8 + shift};

    for (int n = 0; n < steps; ++n) {
        const int buffer = n & 1;
        if (n + 1 < steps) {
            load_kv(n + 1, buffer ^ 1);
            tessera::cp_async_wait<1>();
        } else {
            tessera::cp_async_wait<0>();
        }
        __syncthreads();
        const int branch = !CEILING ? BRANCH_ALL : n < n_beyond ? BRANCH_LIM : BRANCH_ROT;
        float acc_s[BN / 8][4];
        zero(acc_s);
        gemm_abt<T, DP, BN>(acc_s, (branch == BRANCH_LIM ? sQlim : sQ) + warp * 16 * S, sK + buffer * BN * S, lane);

        const int j0 = tile_of(n) * BN;
        bool full = fully_visible(p, p_lo, p_hi, j0, j0 + BN - 1, s.sk);
        if constexpr (CEILING) full = full && branch_full(p, branch, p_lo, p_hi, j0, j0 + BN - 1);
        float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = j0 + nt * 8 + 2 * c + (e & 1);
                float x = acc_s[nt][e] * p.scale_log2;
                if (!full && (j >= s.sk || !visible(p, my_pos[e / 2], j) ||
                              (CEILING && !in_branch(p, branch, my_pos[e / 2], j)))) {
                    x = -INFINITY;
                }
                acc_s[nt][e] = x;
                tile_max[e / 2] = fmaxf(tile_max[e / 2], x);
            }
        }
        float reference[2], rescale[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float new_max = fmaxf(row_max[r], quad_max(tile_max[r]));
            // A row that has seen nothing yet keeps -inf; subtracting 0 then keeps its terms at 0.
            reference[r] = new_max == -INFINITY ? 0.0f : new_max;
            rescale[r] = exp2f(row_max[r] - reference[r]);
            row_max[r] = new_max;
            row_sum[r] *= rescale[r];
        }
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float w = exp2f(acc_s[nt][e] - reference[e / 2]);
                acc_s[nt][e] = w;
                row_sum[e / 2] += w;
            }
        }
#pragma unroll
        for (int nt = 0; nt < DP / 8; ++nt) {
            acc_o[nt][0] *= rescale[0];
            acc_o[nt][1] *= rescale[0];
            acc_o[nt][2] *= rescale[1];
            acc_o[nt][3] *= rescale[1];
        }
        gemm_pb<T, DP, BN>(acc_o, acc_s, sV + buffer * BN * S, lane);
        __syncthreads();
    }
    tessera::cp_async_wait<0>();

    float inverse[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        row_sum[r] = quad_sum(row_sum[r]);
        inverse[r] = row_sum[r] > 0.0f ? 1.0f / row_sum[r] : 0.0f;
    }
    const int warp_row = i0 + warp * 16;
    T* out = static_cast<T*>(p.out) + ((size_t)(s.q_start + warp_row) * p.heads_q + h) * p.head_dim;
    store_rows<T, DP>(out, acc_o, inverse, s.sq - warp_row, q_stride, p.head_dim, lane);
    if (c == 0) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int i = warp_row + g + r * 8;
            if (i < s.sq) {
                p.lse[(size_t)(s.q_start + i) * p.heads_q + h] =
                    row_sum[r] > 0.0f ? (row_max[r] + log2f(row_sum[r])) * LN2 : -INFINITY;
            }
        }
    }
}

// ---- backward: Δ = rowsum(dO ∘ O) -----------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void attention_bwd_delta(const AttentionParams& p, long long total_rows) {
    const long long warp = ((long long)blockIdx.x * THREADS + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    if (warp >= total_rows) return;
    const T* o = static_cast<const T*>(p.out) + (size_t)warp * p.head_dim;
    const T* d_o = static_cast<const T*>(p.d_out) + (size_t)warp * p.head_dim;
    float sum = 0.0f;
    for (int e = lane; e < p.head_dim; e += 32) sum += (float)o[e] * (float)d_o[e];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (lane == 0) p.delta[warp] = sum;
}

// ---- backward: dQ, one CTA per query tile, over its visible key tiles -------------------------------
// With CEILING the pass sees only the pairs of p.branch (q and k are that branch's operands) and
// writes its partial gradient in f32, to be rotated back and summed with the other branch's.

template <typename T, int DP, int BN, bool CEILING>
__device__ __forceinline__ void attention_bwd_dq(const AttentionParams& p) {
    constexpr int S = DP + 8;
    extern __shared__ __align__(16) unsigned char shared[];
    T* sQ = reinterpret_cast<T*>(shared);
    T* sdO = sQ + ROWS * S;
    T* sK = sdO + ROWS * S;
    T* sV = sK + 2 * BN * S;

    const Sequence s = sequence(p, blockIdx.z);
    const int h = blockIdx.y, i0 = blockIdx.x * ROWS;
    if (i0 >= s.sq) return;
    const int kv = h / (p.heads_q / p.heads_kv);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
    const int rows_here = min(ROWS, s.sq - i0);
    const long long shift = (long long)s.sk - s.sq;
    const long long p_lo = i0 + shift, p_hi = i0 + rows_here - 1 + shift;
    const int branch = CEILING ? p.branch : BRANCH_ALL;
    const KeyTiles tiles = key_tiles(p, p_lo, p_hi, s.sk, BN, branch);
    const size_t q_stride = (size_t)p.heads_q * p.head_dim, kv_stride = (size_t)p.heads_kv * p.head_dim;
    const size_t q_offset = ((size_t)(s.q_start + i0) * p.heads_q + h) * p.head_dim;
    const T* k = static_cast<const T*>(p.k) + ((size_t)s.k_start * p.heads_kv + kv) * p.head_dim;
    const T* v = static_cast<const T*>(p.v) + ((size_t)s.k_start * p.heads_kv + kv) * p.head_dim;

    load_tile<ROWS, DP>(sQ, static_cast<const T*>(p.q) + q_offset, rows_here, q_stride, p.head_dim);
    load_tile<ROWS, DP>(sdO, static_cast<const T*>(p.d_out) + q_offset, rows_here, q_stride, p.head_dim);
    tessera::cp_async_commit();
    auto load_kv = [&](int n, int buffer) {
        const int j0 = tiles.at(n) * BN;
        load_tile<BN, DP>(sK + buffer * BN * S, k + (size_t)j0 * kv_stride, s.sk - j0, kv_stride, p.head_dim);
        load_tile<BN, DP>(sV + buffer * BN * S, v + (size_t)j0 * kv_stride, s.sk - j0, kv_stride, p.head_dim);
        tessera::cp_async_commit();
    };
    if (tiles.count() > 0) load_kv(0, 0);

    // Per row: the log-sum-exp in base 2 (+inf for a row that sees nothing, so that every
    // probability is 0) and Δ.
    float lse2[2], delta[2];
    const long long my_pos[2] = {i0 + warp * 16 + g + shift, i0 + warp * 16 + g + 8 + shift};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int i = i0 + warp * 16 + g + r * 8;
        const size_t slot = (size_t)(s.q_start + i) * p.heads_q + h;
        const float l = i < s.sq ? p.lse[slot] : -INFINITY;
        lse2[r] = l == -INFINITY ? INFINITY : l * LOG2E;
        delta[r] = i < s.sq ? p.delta[slot] : 0.0f;
    }

    float acc_dq[DP / 8][4];
    zero(acc_dq);
    for (int n = 0; n < tiles.count(); ++n) {
        const int buffer = n & 1;
        if (n + 1 < tiles.count()) {
            load_kv(n + 1, buffer ^ 1);
            tessera::cp_async_wait<1>();
        } else {
            tessera::cp_async_wait<0>();
        }
        __syncthreads();
        float acc_s[BN / 8][4], acc_dp[BN / 8][4];
        zero(acc_s);
        zero(acc_dp);
        gemm_abt<T, DP, BN>(acc_s, sQ + warp * 16 * S, sK + buffer * BN * S, lane);
        gemm_abt<T, DP, BN>(acc_dp, sdO + warp * 16 * S, sV + buffer * BN * S, lane);
        const int j0 = tiles.at(n) * BN;
        bool full = fully_visible(p, p_lo, p_hi, j0, j0 + BN - 1, s.sk);
        if constexpr (CEILING) full = full && branch_full(p, branch, p_lo, p_hi, j0, j0 + BN - 1);
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = j0 + nt * 8 + 2 * c + (e & 1);
                const bool seen = full || (j < s.sk && visible(p, my_pos[e / 2], j) &&
                                           (!CEILING || in_branch(p, branch, my_pos[e / 2], j)));
                const float prob = seen ? exp2f(acc_s[nt][e] * p.scale_log2 - lse2[e / 2]) : 0.0f;
                acc_s[nt][e] = prob * (acc_dp[nt][e] - delta[e / 2]);
            }
        }
        gemm_pb<T, DP, BN>(acc_dq, acc_s, sK + buffer * BN * S, lane);
        __syncthreads();
    }
    tessera::cp_async_wait<0>();

    const int warp_row = i0 + warp * 16;
    const float scale[2] = {p.scale, p.scale};
    using Out = std::conditional_t<CEILING, float, T>;
    Out* d_q = static_cast<Out*>(p.d_q) + ((size_t)(s.q_start + warp_row) * p.heads_q + h) * p.head_dim;
    store_rows<Out, DP>(d_q, acc_dq, scale, s.sq - warp_row, q_stride, p.head_dim, lane);
}

// ---- backward: dK and dV, one CTA per key tile of one key/value head, over the query tiles of
// every query head of its group that can see it; with CEILING, of p.branch only, as the dQ pass ----

template <typename T, int DP, int BM, bool DO_DV, bool DO_DK, bool CEILING>
__device__ __forceinline__ void attention_bwd_dkv(const AttentionParams& p) {
    constexpr int S = DP + 8;
    extern __shared__ __align__(16) unsigned char shared[];
    T* sK = reinterpret_cast<T*>(shared);
    T* sV = sK + ROWS * S;
    T* sQ = sV + ROWS * S;
    T* sdO = sQ + 2 * BM * S;
    float* sLse = reinterpret_cast<float*>(sdO + 2 * BM * S);
    float* sDelta = sLse + 2 * BM;

    const Sequence s = sequence(p, blockIdx.z);
    const int kv = blockIdx.y, j0 = blockIdx.x * ROWS;
    if (j0 >= s.sk) return;
    const int group = p.heads_q / p.heads_kv;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
    const int keys_here = min(ROWS, s.sk - j0);
    const long long shift = (long long)s.sk - s.sq;
    const size_t q_stride = (size_t)p.heads_q * p.head_dim, kv_stride = (size_t)p.heads_kv * p.head_dim;
    const size_t kv_offset = ((size_t)(s.k_start + j0) * p.heads_kv + kv) * p.head_dim;

    // The query rows that can see some key of this tile, in tiles of BM.
    long long pos_lo = -(1ll << 62), pos_hi = 1ll << 62;
    const long long j_lo = j0, j_hi = j0 + keys_here - 1;
    switch (p.mask_kind) {
        case MASK_CAUSAL: pos_lo = j_lo; break;
        case MASK_WINDOW:
            pos_lo = j_lo - p.right;
            pos_hi = j_hi + p.left;
            break;
        case MASK_LAMBDA:
            pos_lo = j_lo;
            if (j_lo >= p.global) pos_hi = j_hi + p.window - 1;
            break;
        default: break;
    }
    const int branch = CEILING ? p.branch : BRANCH_ALL;
    bool none = false;
    if (branch == BRANCH_ROT) {
        // Within the ceiling: p ≤ j + D.
        pos_hi = min(pos_hi, j_hi + p.ceiling);
    } else if (branch == BRANCH_LIM) {
        // Beyond it: p > j + D, where the mask shows such pairs at all (see key_tiles).
        pos_lo = max(pos_lo, j_lo + p.ceiling + 1);
        none = (p.mask_kind == MASK_LAMBDA && p.ceiling >= p.window - 1 && j_lo >= p.global) ||
               (p.mask_kind == MASK_WINDOW && p.ceiling >= p.left);
    }
    const long long row_lo = max(0ll, pos_lo - shift), row_hi = min((long long)s.sq - 1, pos_hi - shift);
    // Both bounds stay below 2^33 (positions and D are below 2^31): the tile numbers fit an int.
    const int first_tile = (int)(row_lo / BM);
    const int tiles_per_head = !none && row_hi >= row_lo ? (int)(row_hi / BM) - first_tile + 1 : 0;
    const int count = tiles_per_head * group;

    load_tile<ROWS, DP>(sK, static_cast<const T*>(p.k) + kv_offset, keys_here, kv_stride, p.head_dim);
    load_tile<ROWS, DP>(sV, static_cast<const T*>(p.v) + kv_offset, keys_here, kv_stride, p.head_dim);
    tessera::cp_async_commit();
    auto load_q = [&](int n, int buffer) {
        const int h = kv * group + n / tiles_per_head;
        const int i0 = (first_tile + n % tiles_per_head) * BM;
        const size_t offset = ((size_t)(s.q_start + i0) * p.heads_q + h) * p.head_dim;
        load_tile<BM, DP>(sQ + buffer * BM * S, static_cast<const T*>(p.q) + offset, s.sq - i0, q_stride, p.head_dim);
        load_tile<BM, DP>(sdO + buffer * BM * S, static_cast<const T*>(p.d_out) + offset, s.sq - i0, q_stride,
                          p.head_dim);
        tessera::cp_async_commit();
        for (int r = threadIdx.x; r < BM; r += THREADS) {
            const int i = i0 + r;
            const size_t slot = (size_t)(s.q_start + i) * p.heads_q + h;
            const float l = i < s.sq ? p.lse[slot] : -INFINITY;
            sLse[buffer * BM + r] = l == -INFINITY ? INFINITY : l * LOG2E;
            sDelta[buffer * BM + r] = i < s.sq ? p.delta[slot] : 0.0f;
        }
    };
    if (count > 0) load_q(0, 0);

    float acc_dk[DO_DK ? DP / 8 : 1][4], acc_dv[DO_DV ? DP / 8 : 1][4];
    zero(acc_dk);
    zero(acc_dv);
    const long long my_key[2] = {j0 + warp * 16 + g, j0 + warp * 16 + g + 8};
    for (int n = 0; n < count; ++n) {
        const int buffer = n & 1;
        if (n + 1 < count) {
            load_q(n + 1, buffer ^ 1);
            tessera::cp_async_wait<1>();
        } else {
            tessera::cp_async_wait<0>();
        }
        __syncthreads();
        const int i0 = (first_tile + n % tiles_per_head) * BM;
        const T* q_tile = sQ + buffer * BM * S;
        const T* do_tile = sdO + buffer * BM * S;
        const float* lse2 = sLse + buffer * BM;
        const float* delta = sDelta + buffer * BM;
        // Sᵀ (the warp's 16 keys x BM queries) and, for dK, dPᵀ = V·dOᵀ.
        float acc_s[BM / 8][4], acc_dp[DO_DK ? BM / 8 : 1][4];
        zero(acc_s);
        gemm_abt<T, DP, BM>(acc_s, sK + warp * 16 * S, q_tile, lane);
        if constexpr (DO_DK) {
            zero(acc_dp);
            gemm_abt<T, DP, BM>(acc_dp, sV + warp * 16 * S, do_tile, lane);
        }
        const long long q_lo = i0 + shift, q_hi = i0 + BM - 1 + shift;
        bool full = fully_visible(p, q_lo, q_hi, j_lo, j_hi, s.sk);
        if constexpr (CEILING) full = full && branch_full(p, branch, q_lo, q_hi, j_lo, j_hi);
#pragma unroll
        for (int nt = 0; nt < BM / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int col = nt * 8 + 2 * c + (e & 1);
                const bool seen = full || (visible(p, i0 + col + shift, my_key[e / 2]) &&
                                           (!CEILING || in_branch(p, branch, i0 + col + shift, my_key[e / 2])));
                const float prob = seen ? exp2f(acc_s[nt][e] * p.scale_log2 - lse2[col]) : 0.0f;
                acc_s[nt][e] = prob;
                if constexpr (DO_DK) acc_dp[nt][e] = prob * (acc_dp[nt][e] - delta[col]);
            }
        }
        if constexpr (DO_DV) gemm_pb<T, DP, BM>(acc_dv, acc_s, do_tile, lane);
        if constexpr (DO_DK) gemm_pb<T, DP, BM>(acc_dk, acc_dp, q_tile, lane);
        __syncthreads();
    }
    tessera::cp_async_wait<0>();

    const int warp_key = j0 + warp * 16;
    const size_t offset = ((size_t)(s.k_start + warp_key) * p.heads_kv + kv) * p.head_dim;
    using Out = std::conditional_t<CEILING, float, T>;
    if constexpr (DO_DK) {
        const float scale[2] = {p.scale, p.scale};
        store_rows<Out, DP>(static_cast<Out*>(p.d_k) + offset, acc_dk, scale, s.sk - warp_key, kv_stride, p.head_dim,
                            lane);
    }
    if constexpr (DO_DV) {
        const float one[2] = {1.0f, 1.0f};
        store_rows<Out, DP>(static_cast<Out*>(p.d_v) + offset, acc_dv, one, s.sk - warp_key, kv_stride, p.head_dim,
                            lane);
    }
}

// ---- the ceiling's backward: out = round(a + b), the two branches' f32 partial gradients --------

__device__ __forceinline__ __nv_bfloat16 round_to(float x, __nv_bfloat16) { return __float2bfloat16_rn(x); }
__device__ __forceinline__ __half round_to(float x, __half) { return __float2half_rn(x); }

// `quads` groups of 4 elements (every tensor here holds rows of a multiple of 8 elements, and the
// allocations are 16-byte aligned), grid-stride.
template <typename T>
__device__ __forceinline__ void attention_ceiling_sum(const float* a, const float* b, T* out, long long quads) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long n = (long long)blockIdx.x * blockDim.x + threadIdx.x; n < quads; n += stride) {
        const float4 x = reinterpret_cast<const float4*>(a)[n];
        const float4 y = reinterpret_cast<const float4*>(b)[n];
        T* o = out + 4 * n;
        o[0] = round_to(x.x + y.x, T());
        o[1] = round_to(x.y + y.y, T());
        o[2] = round_to(x.z + y.z, T());
        o[3] = round_to(x.w + y.w, T());
    }
}

}  // namespace

// Key tiles: 64 keys up to head dimension 128, 32 beyond (registers). The dK/dV pass streams
// query tiles of 32; at DP = 256 it runs twice (dV, then dK) because both accumulators would not
// fit in registers together. The `ceiling` kernels serve LM-Infinite's distance ceiling; the others
// are compiled without any of its code.
#define ATTENTION_KERNELS(SUFFIX, T, DP, BN)                                                                    \
    extern "C" __global__ void __launch_bounds__(THREADS) attention_fwd_##SUFFIX(AttentionParams p) {           \
        attention_fwd<T, DP, BN, false>(p);                                                                      \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(THREADS) attention_bwd_dq_##SUFFIX(AttentionParams p) {        \
        attention_bwd_dq<T, DP, BN, false>(p);                                                                   \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(THREADS) attention_fwd_ceiling_##SUFFIX(AttentionParams p) {   \
        attention_fwd<T, DP, BN, true>(p);                                                                       \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(THREADS) attention_bwd_dq_ceiling_##SUFFIX(AttentionParams p) { \
        attention_bwd_dq<T, DP, BN, true>(p);                                                                    \
    }

#define ATTENTION_DKV_KERNEL(SUFFIX, T, DP, DO_DV, DO_DK)                                                       \
    extern "C" __global__ void __launch_bounds__(THREADS) attention_bwd_dkv_##SUFFIX(AttentionParams p) {       \
        attention_bwd_dkv<T, DP, 32, DO_DV, DO_DK, false>(p);                                                    \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(THREADS) attention_bwd_dkv_ceiling_##SUFFIX(AttentionParams p) { \
        attention_bwd_dkv<T, DP, 32, DO_DV, DO_DK, true>(p);                                                     \
    }

#define ATTENTION_DTYPE(NAME, T)                                                                                 \
    ATTENTION_KERNELS(NAME##_d64, T, 64, 64)                                                                     \
    ATTENTION_KERNELS(NAME##_d128, T, 128, 64)                                                                   \
    ATTENTION_KERNELS(NAME##_d256, T, 256, 32)                                                                   \
    ATTENTION_DKV_KERNEL(NAME##_d64, T, 64, true, true)                                                          \
    ATTENTION_DKV_KERNEL(NAME##_d128, T, 128, true, true)                                                        \
    ATTENTION_DKV_KERNEL(dv_##NAME##_d256, T, 256, true, false)                                                  \
    ATTENTION_DKV_KERNEL(dk_##NAME##_d256, T, 256, false, true)                                                  \
    extern "C" __global__ void __launch_bounds__(THREADS) attention_bwd_delta_##NAME(AttentionParams p, long long rows) { \
        attention_bwd_delta<T>(p, rows);                                                                         \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                        \
        attention_ceiling_sum_##NAME(const float* a, const float* b, T* out, long long quads) {                  \
        attention_ceiling_sum<T>(a, b, out, quads);                                                              \
    }

ATTENTION_DTYPE(bf16, __nv_bfloat16)
ATTENTION_DTYPE(f16, __half)
