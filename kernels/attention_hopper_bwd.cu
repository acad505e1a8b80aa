// Flash attention backward for Hopper (sm_90a): TMA loads into shared-memory rings that mbarriers
// hand between a producer warpgroup and two consumer warpgroups, every tile product on wgmma, the
// probabilities recomputed from the forward's log-sum-exp. bf16 and f16, head dims 64 and 128,
// masks none and causal, dense batches, GQA via the head mapping; src/ops/attention.rs runs every
// other call on the mma.sync backward of attention.cu.
//
// Three kernels, deterministic (no atomics, every sum in a fixed order):
// - prep: per (sequence, query head, query row padded to a multiple of 64) the log-sum-exp in
//   base 2 (+inf for rows past the sequence or rows that see nothing, so that every probability
//   is 0) and Δ = rowsum(dO ∘ O), in f32 arrays laid out (batch, head, padded row) so that the
//   dK/dV kernel copies 64 consecutive rows of each with one bulk copy.
// - dkv: one CTA per (128-key tile, key/value head, sequence). K and V stay in shared memory;
//   Q and dO tiles of 64 rows (with their log-sum-exp and Δ) stream through a ring, over every
//   query tile that can see the key tile and every query head of the group (GQA sums in the CTA).
//   Each consumer warpgroup owns 64 keys and keeps the transposed products, keys as rows:
//   Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ (wgmma, both operands in shared memory), Pᵀ = exp2(Sᵀ·scale − lse)
//   and dSᵀ = Pᵀ ∘ (dPᵀ − Δ) in registers, rounded to the input dtype as the A operand of
//   dV += Pᵀ·dO and dK += dSᵀ·Q (wgmma with A from registers, dO and Q read N-major through the
//   descriptor, so nothing is staged back to shared memory).
// - dq: one CTA per (128-query tile, query head, sequence). Q and dO stay in shared memory; K and
//   V tiles of 64 keys stream through a ring. Each consumer warpgroup owns 64 queries:
//   S = Q·Kᵀ and dP = dO·Vᵀ (wgmma from shared memory), dS = P ∘ (dP − Δ) in registers, and
//   dQ += dS·K (A from registers, K read N-major).
// The backward thus does 7 tile products where FlashAttention-3 does 5 (it accumulates dQ with
// atomics), in exchange for bitwise reproducible gradients.
//
// Shared memory: every tile is 64 rows × head_dim, stored as head_dim / 64 column blocks of
// 64 rows × 128 bytes with the 128-byte swizzle that TMA writes and wgmma reads (each block 1024
// bytes aligned). A 128-row resident operand is two such tiles, one per consumer warpgroup; the
// second is not loaded when it lies wholly past the sequence.
//
// Tensor maps (built by src/ops/attention.rs): 4-d (head_dim, heads, seq, batch), box (64, 1, 64,
// 1), 128-byte swizzle, zero fill out of bounds: rows past a sequence read as zeros and are never
// stored.
#include "common/hopper.cuh"

// Threads per CTA of the dkv and dq kernels: the producer warpgroup and two consumer warpgroups.
constexpr int SM90_BWD_THREADS = 384;
// Threads per CTA of the prep kernel (one warp per row).
constexpr int SM90_PREP_THREADS = 256;

// Layout shared with src/ops/attention.rs (#[repr(C)] HopperBwdParams).
struct HopperBwdParams {
    const void* out;
    const void* d_out;
    const float* lse;  // the forward's, natural log, (batch, seq_q, heads_q)
    float* lse2;       // (batch, heads_q, padded_q), base 2
    float* delta;      // (batch, heads_q, padded_q)
    void* d_q;
    void* d_k;
    void* d_v;
    int batch;
    int seq_q;
    int seq_k;
    int heads_q;
    int heads_kv;
    int padded_q;  // seq_q rounded up to a multiple of 64
    float scale;
    float scale_log2;  // softmax scale · log2(e): the softmax runs in base 2
    int causal;
};

namespace {

using namespace tessera;

constexpr float LOG2E = 1.4426950408889634f;

// One warp per padded row (grid-stride over `rows`); lanes stride over the head dimension, then a
// butterfly sum.
template <typename T, int D>
__device__ __forceinline__ void prep_rows(const HopperBwdParams& p) {
    const long long rows = (long long)p.batch * p.heads_q * p.padded_q;
    const long long warps = (long long)gridDim.x * (SM90_PREP_THREADS / 32);
    const int lane = threadIdx.x % 32;
    for (long long row = ((long long)blockIdx.x * SM90_PREP_THREADS + threadIdx.x) / 32; row < rows; row += warps) {
        const int i = (int)(row % p.padded_q);
        const long long bh = row / p.padded_q;
        const int h = (int)(bh % p.heads_q), b = (int)(bh / p.heads_q);
        float sum = 0.0f, lse2 = INFINITY;
        if (i < p.seq_q) {
            const size_t slot = ((size_t)b * p.seq_q + i) * p.heads_q + h;
            const T* o = static_cast<const T*>(p.out) + slot * D;
            const T* d_o = static_cast<const T*>(p.d_out) + slot * D;
#pragma unroll
            for (int e = lane; e < D; e += 32) sum += widen(o[e]) * widen(d_o[e]);
#pragma unroll
            for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
            const float l = p.lse[slot];
            lse2 = l == -INFINITY ? INFINITY : l * LOG2E;
        }
        if (lane == 0) {
            p.lse2[row] = lse2;
            p.delta[row] = sum;
        }
    }
}

}  // namespace

#define ATTENTION_SM90_PREP(NAME, T, D)                                                            \
    extern "C" __global__ void __launch_bounds__(SM90_PREP_THREADS)                                \
        attention_bwd_prep_sm90_##NAME(const HopperBwdParams p) {                                  \
        prep_rows<T, D>(p);                                                                        \
    }

ATTENTION_SM90_PREP(bf16_d64, __nv_bfloat16, 64)
ATTENTION_SM90_PREP(bf16_d128, __nv_bfloat16, 128)
ATTENTION_SM90_PREP(f16_d64, __half, 64)
ATTENTION_SM90_PREP(f16_d128, __half, 128)

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)

namespace {

constexpr int TILE = 64;                      // rows of every shared-memory tile
constexpr int BLOCK_BYTES = TILE * 128;       // one 64-row column block of a tile
constexpr int ROW_TILE = 128;                 // rows of a CTA's resident operand (2 tiles)

// acc (64 rows × D) += A (64 × 16, registers) · B (16 × D, N-major in shared memory).
template <typename T, int D>
__device__ __forceinline__ void rs_n(float (&acc)[D / 2], const uint32_t (&a)[4], uint64_t b) {
    if constexpr (D == 64) {
        Wgmma<T>::rs_n64(acc, a, b);
    } else {
        Wgmma<T>::rs_n128(acc, a, b);
    }
}

// out (64 × 64) = A (64 rows × D) · Bᵀ (64 rows × D), both K-major tiles in shared memory, their
// 64-column blocks BLOCK_BYTES apart.
template <typename T, int D>
__device__ __forceinline__ void ss_abt(float (&out)[32], uint32_t a, uint32_t b) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) Wgmma<T>::ss_n64(out, k_major(a, kk, BLOCK_BYTES), k_major(b, kk, BLOCK_BYTES), kk > 0);
}

// Stores a warpgroup's 64 × D accumulator times `scale` as rows of T: this thread's rows are
// `row[0]` and `row[1]` (skipped when not below `rows`), row r at dst + r · stride.
template <typename T, int D>
__device__ __forceinline__ void store_rows(T* dst, const float (&acc)[D / 2], const int (&row)[2], int rows,
                                           size_t stride, float scale, int c) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (row[r] >= rows) continue;
        T* const at = dst + (size_t)row[r] * stride;
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
            *reinterpret_cast<uint32_t*>(at + i * 8 + 2 * c) =
                pack<T>(acc[4 * i + 2 * r] * scale, acc[4 * i + 2 * r + 1] * scale);
        }
    }
}

// Loads `tiles` 64-row tiles of (h, b) in `map`, from row row0 on, to consecutive tiles at `dst`.
template <int D>
__device__ __forceinline__ void load_tiles(uint32_t dst, const TensorMap* map, uint64_t* bar, int h, int row0, int b,
                                           int tiles) {
    for (int tile = 0; tile < tiles; ++tile) {
#pragma unroll
        for (int cb = 0; cb < D / 64; ++cb) {
            tma_load_4d(dst + tile * (D / 64) * BLOCK_BYTES + cb * BLOCK_BYTES, map, bar, cb * 64, h, row0 + tile * TILE,
                     b);
        }
    }
}

// ---- dK and dV --------------------------------------------------------------------------------

template <typename T, int D, int STAGES>
__device__ __forceinline__ void attention_bwd_dkv_sm90(const TensorMap* map_q, const TensorMap* map_k,
                                                       const TensorMap* map_v, const TensorMap* map_do,
                                                       const HopperBwdParams& p) {
    constexpr uint32_t TILE_BYTES = TILE * D * 2;
    static_assert(D == 64 || D == 128, "head dims 64 and 128");

    __shared__ uint64_t full[STAGES];   // Q, dO, lse and Δ of the stage have landed
    __shared__ uint64_t empty[STAGES];  // both consumer warpgroups are done with the stage
    __shared__ uint64_t kv_full;
    __shared__ __align__(16) float stage_lse[STAGES][TILE];
    __shared__ __align__(16) float stage_delta[STAGES][TILE];
    extern __shared__ unsigned char dynamic_shared[];
    // The 128-byte swizzle repeats every 1024 bytes; TMA and the descriptors assume that alignment.
    const uint32_t base = (smem(dynamic_shared) + 1023) & ~1023u;
    const uint32_t sK = base;                         // 2 tiles: keys j0.., j0 + 64..
    const uint32_t sV = sK + 2 * TILE_BYTES;          // 2 tiles
    const uint32_t ring = sV + 2 * TILE_BYTES;        // stage s: Q at s · 2 · TILE_BYTES, dO after it

    // CTAs start in the order of (x, y): the grid's (key tile, head) pairs are dealt head-fastest,
    // so that under a causal mask every head's heaviest (first) key tiles start in the first wave.
    const long long pair = (long long)blockIdx.y * gridDim.x + blockIdx.x;
    const int kv = (int)(pair % gridDim.y), b = blockIdx.z;
    const int j0 = (int)(pair / gridDim.y) * ROW_TILE;
    const int group = p.heads_q / p.heads_kv;
    const int shift = p.seq_k - p.seq_q;  // position of query i is i + shift
    // The query rows that can see a key of this tile: causal needs i + shift ≥ j0.
    const long long row_lo = p.causal ? max(0ll, (long long)j0 - shift) : 0ll;
    const int first_tile = row_lo < p.seq_q ? (int)(row_lo / TILE) : 0;
    const int tiles_per_head = row_lo < p.seq_q ? (p.seq_q - 1) / TILE - first_tile + 1 : 0;
    const int count = tiles_per_head * group;

    if (threadIdx.x == 0) {
        ring_init(full, empty, 2 * 128);
        barrier_init(&kv_full, 1);
        barrier_init_fence();
    }
    __syncthreads();

    const int warpgroup = threadIdx.x / 128;
    if (warpgroup == 0) {
        // Producer: one thread issues the copies; the group keeps few registers. Nothing is
        // loaded when no query sees the tile, so that no copy outlives the CTA.
        registers_decrease<24>();
        if (threadIdx.x == 0 && count > 0) {
            // The second 64 keys are not loaded when they lie wholly past the sequence: their
            // warpgroup then computes on stale shared memory for keys that are never stored.
            const int halves = j0 + TILE < p.seq_k ? 2 : 1;
            barrier_arrive_expect(&kv_full, 2 * halves * TILE_BYTES);
            load_tiles<D>(sK, map_k, &kv_full, kv, j0, b, halves);
            load_tiles<D>(sV, map_v, &kv_full, kv, j0, b, halves);
            for (int n = 0; n < count; ++n) {
                const int s = n % STAGES;
                // The (n / STAGES)-th reuse of stage s waits for the consumers' release of the
                // previous one, phase n / STAGES - 1.
                if (n >= STAGES) barrier_wait(&empty[s], (uint32_t)(n / STAGES - 1) & 1);
                const int h = kv * group + n / tiles_per_head;
                const int i0 = (first_tile + n % tiles_per_head) * TILE;
                barrier_arrive_expect(&full[s], 2 * TILE_BYTES + 2 * TILE * 4);
                const uint32_t q_tile = ring + s * 2 * TILE_BYTES;
                load_tiles<D>(q_tile, map_q, &full[s], h, i0, b, 1);
                load_tiles<D>(q_tile + TILE_BYTES, map_do, &full[s], h, i0, b, 1);
                // i0 + 64 ≤ padded_q: the 64 rows lie inside the padded arrays.
                const size_t rows = ((size_t)b * p.heads_q + h) * p.padded_q + i0;
                bulk_load(stage_lse[s], p.lse2 + rows, TILE * 4, &full[s]);
                bulk_load(stage_delta[s], p.delta + rows, TILE * 4, &full[s]);
            }
        }
        return;
    }

    registers_increase<240>();
    const int t = threadIdx.x % 128, warp = t / 32, lane = t % 32, g = lane / 4, c = lane % 4;
    const int key0 = j0 + (warpgroup - 1) * TILE;  // this warpgroup's first key
    const int my_key[2] = {key0 + warp * 16 + g, key0 + warp * 16 + g + 8};
    const uint32_t k_tile = sK + (warpgroup - 1) * TILE_BYTES;
    const uint32_t v_tile = sV + (warpgroup - 1) * TILE_BYTES;

    float dk[D / 2], dv[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) dk[i] = dv[i] = 0.0f;

    if (count > 0) barrier_wait(&kv_full, 0);
    for (int n = 0; n < count; ++n) {
        const int s = n % STAGES;
        barrier_wait(&full[s], (uint32_t)(n / STAGES) & 1);
        const int i0 = (first_tile + n % tiles_per_head) * TILE;
        const uint32_t q_tile = ring + s * 2 * TILE_BYTES;
        const uint32_t do_tile = q_tile + TILE_BYTES;

        // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ: this warpgroup's 64 keys × the stage's 64 queries.
        float st[32], dpt[32];
        wgmma_fence();
        ss_abt<T, D>(st, k_tile, q_tile);
        ss_abt<T, D>(dpt, v_tile, do_tile);
        wgmma_commit();
        wgmma_wait<0>();
        fence_registers(st);
        fence_registers(dpt);

        // Pᵀ and dSᵀ; causal tiles where some key lies past some query's position hide those
        // pairs. Columns 16kk..16kk+15 are the k16 step kk of the products with dO and Q.
        const float* lse2 = stage_lse[s];
        const float* delta = stage_delta[s];
        const bool edge = p.causal && key0 + TILE - 1 > i0 + shift;
        uint32_t pa[TILE / 16][4], da[TILE / 16][4];
#pragma unroll
        for (int kk = 0; kk < TILE / 16; ++kk) {
            float w[8], ds[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const int col = 16 * kk + 8 * (e / 4) + 2 * c + (e & 1);
                float prob = exp2f(st[8 * kk + e] * p.scale_log2 - lse2[col]);
                if (edge && my_key[(e / 2) % 2] > i0 + col + shift) prob = 0.0f;
                w[e] = prob;
                ds[e] = prob * (dpt[8 * kk + e] - delta[col]);
            }
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                pa[kk][q] = pack<T>(w[2 * q], w[2 * q + 1]);
                da[kk][q] = pack<T>(ds[2 * q], ds[2 * q + 1]);
            }
        }

        // dV += Pᵀ·dO and dK += dSᵀ·Q, contracting over the stage's 64 queries.
        fence_registers(dv);
        fence_registers(dk);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < TILE / 16; ++kk) rs_n<T, D>(dv, pa[kk], mn_major(do_tile, kk, BLOCK_BYTES));
#pragma unroll
        for (int kk = 0; kk < TILE / 16; ++kk) rs_n<T, D>(dk, da[kk], mn_major(q_tile, kk, BLOCK_BYTES));
        wgmma_commit();
        wgmma_wait<0>();
        fence_registers(dv);
        fence_registers(dk);
        barrier_arrive(&empty[s]);
    }

    const size_t stride = (size_t)p.heads_kv * D;
    const size_t first = ((size_t)b * p.seq_k * p.heads_kv + kv) * D;
    store_rows<T, D>(static_cast<T*>(p.d_k) + first, dk, my_key, p.seq_k, stride, p.scale, c);
    store_rows<T, D>(static_cast<T*>(p.d_v) + first, dv, my_key, p.seq_k, stride, 1.0f, c);
}

// ---- dQ ---------------------------------------------------------------------------------------

template <typename T, int D, int STAGES>
__device__ __forceinline__ void attention_bwd_dq_sm90(const TensorMap* map_q, const TensorMap* map_k,
                                                      const TensorMap* map_v, const TensorMap* map_do,
                                                      const HopperBwdParams& p) {
    constexpr uint32_t TILE_BYTES = TILE * D * 2;
    static_assert(D == 64 || D == 128, "head dims 64 and 128");

    __shared__ uint64_t full[STAGES];   // K and V of the stage have landed
    __shared__ uint64_t empty[STAGES];  // both consumer warpgroups are done with the stage
    __shared__ uint64_t q_full;
    extern __shared__ unsigned char dynamic_shared[];
    const uint32_t base = (smem(dynamic_shared) + 1023) & ~1023u;
    const uint32_t sQ = base;                   // 2 tiles
    const uint32_t sdO = sQ + 2 * TILE_BYTES;   // 2 tiles
    const uint32_t ring = sdO + 2 * TILE_BYTES; // stage s: K at s · 2 · TILE_BYTES, V after it

    // The grid's (query tile, head) pairs are dealt head-fastest, and causal CTAs take the
    // longest (last) query tiles first, so that every head's heaviest tiles start in the first wave.
    const long long pair = (long long)blockIdx.y * gridDim.x + blockIdx.x;
    const int rank = (int)(pair / gridDim.y);
    const int m_block = p.causal ? (int)gridDim.x - 1 - rank : rank;
    const int m0 = m_block * ROW_TILE;
    const int h = (int)(pair % gridDim.y), b = blockIdx.z;
    const int kv = h / (p.heads_q / p.heads_kv);
    const long long shift = (long long)p.seq_k - p.seq_q;
    const int last_row = min(m0 + ROW_TILE, p.seq_q) - 1;
    const long long key_end = p.causal ? min((long long)p.seq_k, last_row + shift + 1) : (long long)p.seq_k;
    const int n_tiles = key_end > 0 ? (int)((key_end + TILE - 1) / TILE) : 0;

    if (threadIdx.x == 0) {
        ring_init(full, empty, 2 * 128);
        barrier_init(&q_full, 1);
        barrier_init_fence();
    }
    __syncthreads();

    const int warpgroup = threadIdx.x / 128;
    if (warpgroup == 0) {
        registers_decrease<24>();
        if (threadIdx.x == 0 && n_tiles > 0) {
            // As in the dK/dV kernel, rows wholly past the sequence are not loaded.
            const int halves = m0 + TILE < p.seq_q ? 2 : 1;
            barrier_arrive_expect(&q_full, 2 * halves * TILE_BYTES);
            load_tiles<D>(sQ, map_q, &q_full, h, m0, b, halves);
            load_tiles<D>(sdO, map_do, &q_full, h, m0, b, halves);
            for (int n = 0; n < n_tiles; ++n) {
                const int s = n % STAGES;
                if (n >= STAGES) barrier_wait(&empty[s], (uint32_t)(n / STAGES - 1) & 1);
                barrier_arrive_expect(&full[s], 2 * TILE_BYTES);
                const uint32_t k_tile = ring + s * 2 * TILE_BYTES;
                load_tiles<D>(k_tile, map_k, &full[s], kv, n * TILE, b, 1);
                load_tiles<D>(k_tile + TILE_BYTES, map_v, &full[s], kv, n * TILE, b, 1);
            }
        }
        return;
    }

    registers_increase<240>();
    const int t = threadIdx.x % 128, warp = t / 32, lane = t % 32, g = lane / 4, c = lane % 4;
    const int row0 = m0 + (warpgroup - 1) * TILE;  // this warpgroup's first query row
    const int my_row[2] = {row0 + warp * 16 + g, row0 + warp * 16 + g + 8};
    // Per row: the last key it sees (-1: none), lse in base 2 and Δ; and the last key that every
    // row of the warpgroup sees: tiles up to it need no mask.
    long long my_last[2];
    float lse2[2], delta[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const long long last = p.causal ? min((long long)p.seq_k - 1, my_row[r] + shift) : (long long)p.seq_k - 1;
        my_last[r] = max(-1ll, last);
        const size_t slot = ((size_t)b * p.heads_q + h) * p.padded_q + my_row[r];
        lse2[r] = my_row[r] < p.seq_q ? p.lse2[slot] : INFINITY;
        delta[r] = my_row[r] < p.seq_q ? p.delta[slot] : 0.0f;
    }
    const long long whole =
        max(-1ll, p.causal ? min((long long)p.seq_k - 1, row0 + shift) : (long long)p.seq_k - 1);
    const uint32_t q_tile = sQ + (warpgroup - 1) * TILE_BYTES;
    const uint32_t do_tile = sdO + (warpgroup - 1) * TILE_BYTES;

    float dq[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) dq[i] = 0.0f;

    if (n_tiles > 0) barrier_wait(&q_full, 0);
    for (int n = 0; n < n_tiles; ++n) {
        const int s = n % STAGES;
        barrier_wait(&full[s], (uint32_t)(n / STAGES) & 1);
        const uint32_t k_tile = ring + s * 2 * TILE_BYTES;
        const uint32_t v_tile = k_tile + TILE_BYTES;

        // S = Q·Kᵀ and dP = dO·Vᵀ: this warpgroup's 64 queries × the stage's 64 keys.
        float sc[32], dp[32];
        wgmma_fence();
        ss_abt<T, D>(sc, q_tile, k_tile);
        ss_abt<T, D>(dp, do_tile, v_tile);
        wgmma_commit();
        wgmma_wait<0>();
        fence_registers(sc);
        fence_registers(dp);

        // dS = P ∘ (dP − Δ); keys past a row's last visible one (the causal diagonal, and keys
        // past the sequence in its last tile) are hidden. Columns 16kk..16kk+15 are the k16 step
        // kk of dS·K.
        const int j0 = n * TILE;
        const bool edge = j0 + TILE - 1 > whole;
        uint32_t da[TILE / 16][4];
#pragma unroll
        for (int kk = 0; kk < TILE / 16; ++kk) {
            float ds[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const int r = (e / 2) % 2;
                float prob = exp2f(sc[8 * kk + e] * p.scale_log2 - lse2[r]);
                if (edge && j0 + 16 * kk + 8 * (e / 4) + 2 * c + (e & 1) > my_last[r]) prob = 0.0f;
                ds[e] = prob * (dp[8 * kk + e] - delta[r]);
            }
#pragma unroll
            for (int q = 0; q < 4; ++q) da[kk][q] = pack<T>(ds[2 * q], ds[2 * q + 1]);
        }

        // dQ += dS·K, contracting over the stage's 64 keys.
        fence_registers(dq);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < TILE / 16; ++kk) rs_n<T, D>(dq, da[kk], mn_major(k_tile, kk, BLOCK_BYTES));
        wgmma_commit();
        wgmma_wait<0>();
        fence_registers(dq);
        barrier_arrive(&empty[s]);
    }

    const size_t stride = (size_t)p.heads_q * D;
    const size_t first = ((size_t)b * p.seq_q * p.heads_q + h) * D;
    store_rows<T, D>(static_cast<T*>(p.d_q) + first, dq, my_row, p.seq_q, stride, p.scale, c);
}

}  // namespace

#define ATTENTION_BWD_SM90_BODY(KIND, T, D, STAGES) \
    attention_bwd_##KIND##_sm90<T, D, STAGES>(&map_q, &map_k, &map_v, &map_do, p);

#else

// The sm_80 and compute_80 images export the same entry points without a body: the host
// launches them only on a device that loads the sm_90a image.
#define ATTENTION_BWD_SM90_BODY(KIND, T, D, STAGES)

#endif

// Pipeline depth per head dim: 3 stages of 32 KiB (two 64-row tiles) at d128, 4 of 16 KiB at d64.
#define ATTENTION_BWD_SM90_KERNEL(KIND, NAME, T, D, STAGES)                                                    \
    extern "C" __global__ void __launch_bounds__(SM90_BWD_THREADS, 1) attention_bwd_##KIND##_sm90_##NAME(       \
        const __grid_constant__ tessera::TensorMap map_q, const __grid_constant__ tessera::TensorMap map_k,                      \
        const __grid_constant__ tessera::TensorMap map_v, const __grid_constant__ tessera::TensorMap map_do,                     \
        const HopperBwdParams p) {                                                                             \
        ATTENTION_BWD_SM90_BODY(KIND, T, D, STAGES)                                                            \
    }

ATTENTION_BWD_SM90_KERNEL(dkv, bf16_d64, __nv_bfloat16, 64, 4)
ATTENTION_BWD_SM90_KERNEL(dkv, bf16_d128, __nv_bfloat16, 128, 3)
ATTENTION_BWD_SM90_KERNEL(dkv, f16_d64, __half, 64, 4)
ATTENTION_BWD_SM90_KERNEL(dkv, f16_d128, __half, 128, 3)
ATTENTION_BWD_SM90_KERNEL(dq, bf16_d64, __nv_bfloat16, 64, 4)
ATTENTION_BWD_SM90_KERNEL(dq, bf16_d128, __nv_bfloat16, 128, 3)
ATTENTION_BWD_SM90_KERNEL(dq, f16_d64, __half, 64, 4)
ATTENTION_BWD_SM90_KERNEL(dq, f16_d128, __half, 128, 3)
