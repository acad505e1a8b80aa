// Flash attention forward for Hopper (sm_90a): TMA loads into a shared-memory ring that mbarriers
// hand between a producer warp and two consumer warpgroups, S = Q·Kᵀ and O += P·V on wgmma, the
// online softmax in registers. bf16 and f16, head dims 64 and 128, every mask (none, causal,
// sliding window, Λ) without RoPE inside, dense and packed (varlen) batches, GQA via the head
// mapping; src/ops/attention.rs runs every other call (RoPE inside, the distance ceiling, other
// head dims; and, until a GPU run has measured this kernel, every call by default) on the
// mma.sync kernels of attention.cu.
//
// CTA: 3 warpgroups (384 threads). Warpgroup 0 is the producer: one thread issues every TMA copy
// (Q once, then K and V per key tile) and the group gives its registers to the consumers
// (setmaxnreg). Warpgroups 1 and 2 each own 64 of the CTA's 128 query rows and run the same loop
// over the key tiles: S (64 x 128) = Q·Kᵀ with both operands in shared memory, mask, online
// softmax, P rounded to the input dtype in registers, O += P·V with P from registers (the RS form
// of wgmma), then release the stage to the producer. Two of FlashAttention-3's schedules overlap
// the softmax with the tensor cores: within a warpgroup, tile n's S = Q·Kᵀ is issued together
// with tile n - 1's P·V, and tile n's softmax runs while that P·V completes (O is rescaled
// after it); between the warpgroups, named barriers hand a turn back and forth so that each
// issues its two GEMMs while the other runs its softmax (ping-pong).
//
// Shared memory: every tile is stored as head_dim / 64 column blocks of rows × 128 bytes with the
// 128-byte swizzle that TMA writes and wgmma reads (each block 1024-byte aligned): Q 128 rows,
// then STAGES × (K 128 rows, V 128 rows). A consumer holds two stages at once (V of tile n - 1,
// K and V of tile n); the producer fills the others ahead of it.
//
// Masks: the producer and the consumers derive the same list of key tiles from the CTA's query
// positions (bottom-right aligned, as in attention.cu): at most two runs of tiles, the Λ mask's
// global run and its local run, so that the tiles between the global tokens and the window are
// never loaded. Each thread turns its two rows' visibility into a band lo..=hi plus the keys
// below global_end (the Λ mask's global tokens); a tile that some row of the warp cannot see
// whole is masked element by element, the others are not tested. CTAs run the heaviest query
// tiles first: the last ones for causal and Λ, and for a window whose left side is at least its
// right one (the first tiles lose the keys before 0, the last ones those past the end); the first
// ones otherwise.
//
// Memory traffic: Q is read once per CTA, each visible K/V tile once per CTA. Rows past the
// sequence and keys past it are never stored or seen: dense batches are 4-d tensor maps whose
// out-of-bounds rows TMA fills with zeros. Packed (varlen) batches are one sequence of all tokens
// to TMA, so a box that crosses a sequence's end reads the next sequence's rows: its query rows
// are computed and never stored, its keys are masked like keys past the end, and the consumers
// zero the V rows past the end of such a tile (the two consumer warpgroups meet on a named
// barrier before either multiplies by it), so that a non-finite value in a neighbouring sequence
// cannot reach this one through 0 · ∞.
//
// Tensor maps (built by src/ops/attention.rs): 4-d (head_dim, heads, seq, batch), box (64, 1,
// 128, 1), 128-byte swizzle, zero fill out of bounds; packed batches as (head_dim, heads, total,
// 1).
#include "common/hopper.cuh"

// Threads per CTA: the producer warpgroup and two consumer warpgroups.
constexpr int SM90_THREADS = 384;

// Layout shared with src/ops/attention.rs (#[repr(C)] HopperParams).
struct HopperParams {
    void* out;
    float* lse;
    const int* cu_q;  // null: a dense batch, every sequence seq_q queries and seq_k keys
    const int* cu_k;
    int seq_q;
    int seq_k;
    int heads_q;
    int heads_kv;
    float scale_log2;  // softmax scale · log2(e): the softmax runs in base 2
    int mask_kind;     // MaskKind
    int left;          // window mask
    int right;
    int global;  // Λ mask
    int window;
};

enum MaskKind : int { MASK_NONE = 0, MASK_CAUSAL = 1, MASK_WINDOW = 2, MASK_LAMBDA = 3 };

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)

namespace {

constexpr int BM = 128;  // query rows per CTA (64 per consumer warpgroup)
constexpr int BN = 128;  // keys per tile
constexpr float LN2 = 0.6931471805599453f;

using namespace tessera;

__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// ---- masks ----------------------------------------------------------------------------------

// The key tiles of BN keys that query positions p_lo..=p_hi may see, in at most two runs that
// never overlap (the Λ mask's global tiles, then its local ones); n counts through both.
struct KeyTiles {
    int first0, count0, first1, count1;
    __device__ __forceinline__ int count() const { return count0 + count1; }
    __device__ __forceinline__ int at(int n) const { return n < count0 ? first0 + n : first1 + (n - count0); }
};

__device__ __forceinline__ KeyTiles key_tiles(const HopperParams& p, long long p_lo, long long p_hi, int sk) {
    long long lo0 = 0, hi0 = sk, lo1 = 0, hi1 = 0;  // key ranges [lo, hi)
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
    lo0 = max(0ll, min(lo0, (long long)sk));
    hi0 = max(lo0, min(hi0, (long long)sk));
    lo1 = max(0ll, min(lo1, (long long)sk));
    hi1 = max(lo1, min(hi1, (long long)sk));
    KeyTiles t;
    t.first0 = (int)(lo0 / BN);
    const int end0 = hi0 > lo0 ? (int)((hi0 + BN - 1) / BN) : 0;
    t.count0 = hi0 > lo0 ? end0 - t.first0 : 0;
    // The local run starts after the global run's last tile, which it may share.
    t.first1 = max((int)(lo1 / BN), end0);
    t.count1 = hi1 > lo1 ? max(0, (int)((hi1 + BN - 1) / BN) - t.first1) : 0;
    return t;
}

// The keys a query position sees: lo..=hi, and every key below global_end (the Λ mask's global
// tokens), all within 0..sk.
struct RowKeys {
    int lo, hi, global_end;
    __device__ __forceinline__ bool sees(int j) const { return (j >= lo && j <= hi) || j < global_end; }
    // Whether it sees every key of j0..j0 + BN - 1.
    __device__ __forceinline__ bool sees_tile(int j0) const {
        return (lo <= j0 && hi >= j0 + BN - 1) || global_end >= j0 + BN;
    }
};

__device__ __forceinline__ RowKeys row_keys(const HopperParams& p, long long pos, int sk) {
    long long lo = 0, hi = (long long)sk - 1, global_end = 0;
    switch (p.mask_kind) {
        case MASK_CAUSAL: hi = min(hi, pos); break;
        case MASK_WINDOW:
            lo = pos - p.left;
            hi = min(hi, pos + p.right);
            break;
        case MASK_LAMBDA:
            lo = pos - p.window + 1;
            hi = min(hi, pos);
            global_end = min((long long)p.global, pos + 1);
            break;
        default: break;
    }
    RowKeys r;
    r.lo = (int)max(0ll, min(lo, (long long)sk));
    r.hi = (int)max(-1ll, hi);
    r.global_end = (int)max(0ll, min(global_end, (long long)sk));
    return r;
}

}  // namespace

// ---- the kernel ---------------------------------------------------------------------------------

namespace {

template <typename T, int D, int STAGES>
__device__ __forceinline__ void attention_fwd_sm90(const TensorMap* map_q, const TensorMap* map_k,
                                                   const TensorMap* map_v, const HopperParams& p) {
    constexpr int BLOCKS = D / 64;  // 128-byte column blocks per row
    constexpr uint32_t Q_BYTES = BM * D * 2;
    constexpr uint32_t KV_BYTES = BN * D * 2;  // one K or V tile
    static_assert(D == 64 || D == 128, "head dims 64 and 128");

    __shared__ uint64_t full[STAGES];   // K and V of the stage have landed
    __shared__ uint64_t empty[STAGES];  // both consumer warpgroups are done with the stage
    __shared__ uint64_t q_full;
    extern __shared__ unsigned char dynamic_shared[];
    // The 128-byte swizzle repeats every 1024 bytes; TMA and the descriptors assume that alignment.
    unsigned char* const sQ = reinterpret_cast<unsigned char*>(
        (reinterpret_cast<uintptr_t>(dynamic_shared) + 1023) & ~static_cast<uintptr_t>(1023));
    unsigned char* const sKV = sQ + Q_BYTES;  // stage s: K at s · 2 · KV_BYTES, V after it

    // The heaviest query tiles first (see the header).
    const bool last_first = p.mask_kind == MASK_CAUSAL || p.mask_kind == MASK_LAMBDA ||
                            (p.mask_kind == MASK_WINDOW && p.left >= p.right);
    const int m_block = last_first ? (int)gridDim.x - 1 - (int)blockIdx.x : (int)blockIdx.x;
    const int m0 = m_block * BM;
    const int h = blockIdx.y, b = blockIdx.z;
    // The sequence's first token and length; to TMA a packed batch is one sequence of all tokens
    // (batch coordinate 0), a dense batch one sequence per batch coordinate.
    const bool packed = p.cu_q != nullptr;
    const int q_start = packed ? p.cu_q[b] : b * p.seq_q;
    const int sq = packed ? p.cu_q[b + 1] - q_start : p.seq_q;
    const int k_start = packed ? p.cu_k[b] : b * p.seq_k;
    const int sk = packed ? p.cu_k[b + 1] - k_start : p.seq_k;
    const int q_row = packed ? q_start + m0 : m0, k_row = packed ? k_start : 0, tma_batch = packed ? 0 : b;
    // Uniform across the CTA: a packed batch's grid covers its longest sequence.
    if (m0 >= sq) return;
    const int kv = h / (p.heads_q / p.heads_kv);
    const long long shift = (long long)sk - sq;  // position of query i is i + shift
    const int last_row = min(m0 + BM, sq) - 1;
    const KeyTiles tiles = key_tiles(p, m0 + shift, last_row + shift, sk);
    const int n_tiles = tiles.count();

    if (threadIdx.x == 0) {
        ring_init(full, empty, 2 * 128);
        barrier_init(&q_full, 1);
        barrier_init_fence();
    }
    __syncthreads();

    const int warpgroup = threadIdx.x / 128;
    if (warpgroup == 0) {
        // Producer: one thread issues the copies; the group keeps few registers.
        registers_decrease<24>();
        if (threadIdx.x == 0) {
            barrier_arrive_expect(&q_full, Q_BYTES);
#pragma unroll
            for (int cb = 0; cb < BLOCKS; ++cb) tma_load_4d(smem(sQ + cb * BM * 128), map_q, &q_full, cb * 64, h, q_row, tma_batch);
            for (int n = 0; n < n_tiles; ++n) {
                const int s = n % STAGES;
                // The (n / STAGES)-th reuse of stage s waits for the consumers' release of the
                // previous one, phase n / STAGES - 1.
                if (n >= STAGES) barrier_wait(&empty[s], (uint32_t)(n / STAGES - 1) & 1);
                barrier_arrive_expect(&full[s], 2 * KV_BYTES);
                unsigned char* const k_tile = sKV + s * 2 * KV_BYTES;
                unsigned char* const v_tile = k_tile + KV_BYTES;
                const int j_row = k_row + tiles.at(n) * BN;
#pragma unroll
                for (int cb = 0; cb < BLOCKS; ++cb) {
                    tma_load_4d(smem(k_tile + cb * BN * 128), map_k, &full[s], cb * 64, kv, j_row, tma_batch);
                    tma_load_4d(smem(v_tile + cb * BN * 128), map_v, &full[s], cb * 64, kv, j_row, tma_batch);
                }
            }
        }
        return;
    }

    registers_increase<240>();
    const int t = threadIdx.x % 128, warp = t / 32, lane = t % 32, g = lane / 4, c = lane % 4;
    const int row0 = m0 + (warpgroup - 1) * 64;  // this warpgroup's first query row
    const int my_row[2] = {row0 + warp * 16 + g, row0 + warp * 16 + g + 8};
    // The keys each of this thread's rows sees (rows past the sequence included: they are
    // computed and never stored).
    const RowKeys keys[2] = {row_keys(p, my_row[0] + shift, sk), row_keys(p, my_row[1] + shift, sk)};
    const uint32_t q_address = smem(sQ) + (warpgroup - 1) * 64 * 128;

    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.0f;
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};

    // Turns on the tensor cores (named barriers 2 and 3, 256 threads: this warpgroup's 128 wait,
    // the other's 128 arrive): warpgroup 1 issues its GEMMs first; each then hands the turn over
    // as soon as its GEMMs are issued, so that its softmax runs while the other's GEMMs do.
    // Warpgroup 2 grants the first turn, and warpgroup 1 takes one more turn after its loop, so
    // that every arrival is waited for.
    auto take_turn = [&]() {
        if (warpgroup == 1) {
            named_sync<2, 256>();
        } else {
            named_sync<3, 256>();
        }
    };
    auto pass_turn = [&]() {
        if (warpgroup == 1) {
            named_arrive<3, 256>();
        } else {
            named_arrive<2, 256>();
        }
    };

    // A tile whose rows from sk on belong to the next sequence of a packed batch: zero them in V
    // (each of the 256 consumer threads a share of the 16-byte chunks; a row of a column block is
    // 128 contiguous bytes whatever the swizzle), make the stores visible to wgmma, and wait for
    // the other consumer warpgroup's share.
    auto zero_tail = [&](int stage, int j0) {
        if (packed && j0 + BN > sk) {
            constexpr int CHUNKS = BLOCKS * BN * 8;
            unsigned char* const v_tile = sKV + stage * 2 * KV_BYTES + KV_BYTES;
            const int first = (sk - j0) * 8;  // the first chunk of row sk - j0 in each block
            for (int u = (int)threadIdx.x - 128; u < CHUNKS; u += 256) {
                if (u % (BN * 8) >= first) *reinterpret_cast<uint4*>(v_tile + u * 16) = make_uint4(0, 0, 0, 0);
            }
            fence_proxy_async();
            named_sync<1, 256>();
        }
    };

    // S = Q·Kᵀ for the key tile of stage `stage`: D / 16 steps of k16; step kk is 32 bytes into
    // column block kk / 4.
    auto issue_s = [&](float (&sc)[BN / 2], int stage) {
        const uint32_t k_address = smem(sKV) + stage * 2 * KV_BYTES;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            Wgmma<T>::ss_n128(sc, k_major(q_address, kk, BM * 128), k_major(k_address, kk, BN * 128), kk > 0);
        }
        wgmma_commit();
    };
    // O += P·V for the V tile of stage `stage`: BN / 16 steps of k16 over 16 keys (2048 bytes)
    // each; V is N-major, its 64-column blocks BN · 128 bytes apart (leading byte offset), 8-key
    // groups 1024 apart.
    auto issue_pv = [&](const uint32_t (&pa)[BN / 16][4], int stage) {
        const uint32_t v_address = smem(sKV) + stage * 2 * KV_BYTES + KV_BYTES;
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            const uint64_t v_desc = mn_major(v_address, kk, BN * 128);
            if constexpr (D == 64) {
                Wgmma<T>::rs_n64(o, pa[kk], v_desc);
            } else {
                Wgmma<T>::rs_n128(o, pa[kk], v_desc);
            }
        }
        wgmma_commit();
    };
    // The online softmax of the scores of the tile at key j0: scale, and on a tile that some row
    // of the warp cannot see whole, hide each row's invisible keys (the test is warp-uniform so
    // that the warp stays converged); then sc holds the unnormalised probabilities, and O must
    // be multiplied by `rescale`.
    auto softmax = [&](float (&sc)[BN / 2], int j0, float (&rescale)[2]) {
#pragma unroll
        for (int i = 0; i < BN / 2; ++i) sc[i] *= p.scale_log2;
        if (__any_sync(0xffffffffu, !(keys[0].sees_tile(j0) && keys[1].sees_tile(j0)))) {
#pragma unroll
            for (int i = 0; i < BN / 8; ++i) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    if (!keys[e / 2].sees(j0 + i * 8 + 2 * c + (e & 1))) sc[4 * i + e] = -INFINITY;
                }
            }
        }
        float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int i = 0; i < BN / 8; ++i) {
            tile_max[0] = fmaxf(tile_max[0], fmaxf(sc[4 * i], sc[4 * i + 1]));
            tile_max[1] = fmaxf(tile_max[1], fmaxf(sc[4 * i + 2], sc[4 * i + 3]));
        }
        float reference[2];
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
        for (int i = 0; i < BN / 2; ++i) {
            sc[i] = exp2f(sc[i] - reference[(i / 2) % 2]);
            row_sum[(i / 2) % 2] += sc[i];
        }
    };
    // P rounded to the input dtype: score columns 16kk..16kk+15 are the k16 step kk of P·V, in
    // mma.sync's A layout.
    auto pack_p = [&](uint32_t (&pa)[BN / 16][4], const float (&sc)[BN / 2]) {
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            pa[kk][0] = pack<T>(sc[8 * kk + 0], sc[8 * kk + 1]);
            pa[kk][1] = pack<T>(sc[8 * kk + 2], sc[8 * kk + 3]);
            pa[kk][2] = pack<T>(sc[8 * kk + 4], sc[8 * kk + 5]);
            pa[kk][3] = pack<T>(sc[8 * kk + 6], sc[8 * kk + 7]);
        }
    };

    // Tile n's S is computed while tile n - 1's P·V runs, and its softmax while that P·V
    // finishes: P (tile n - 1, read by the tensor cores) and the scores (tile n) live in separate
    // registers, and O is rescaled only once its P·V has completed. The consumer thus holds two
    // stages at once (V of n - 1, K and V of n), which is why the ring has at least 3. The first
    // tile, which has no P·V before it, is peeled off the loop, so that every wgmma in the loop
    // is issued unconditionally.
    barrier_wait(&q_full, 0);
    if (n_tiles > 0) {
        if (warpgroup == 2) named_arrive<2, 256>();
        uint32_t pa[BN / 16][4];
        {
            barrier_wait(&full[0], 0);
            const int j0 = tiles.at(0) * BN;
            zero_tail(0, j0);
            float sc[BN / 2];
            take_turn();
            wgmma_fence();
            issue_s(sc, 0);
            pass_turn();
            wgmma_wait<0>();
            fence_registers(sc);
            float rescale[2];
            softmax(sc, j0, rescale);  // O is still 0: no rescale
            pack_p(pa, sc);
        }
        for (int n = 1; n < n_tiles; ++n) {
            const int s = n % STAGES;
            barrier_wait(&full[s], (uint32_t)(n / STAGES) & 1);
            const int j0 = tiles.at(n) * BN;
            zero_tail(s, j0);
            float sc[BN / 2];
            take_turn();
            fence_registers(o);
            wgmma_fence();
            issue_s(sc, s);
            issue_pv(pa, (n - 1) % STAGES);
            pass_turn();
            wgmma_wait<1>();  // S; the P·V committed after it may still run
            fence_registers(sc);
            float rescale[2];
            softmax(sc, j0, rescale);
            // Tile n - 1's P·V is done: its stage goes back to the producer, and P and O are
            // free to change.
            wgmma_wait<0>();
            fence_registers(o);
            fence_registers(pa);
            barrier_arrive(&empty[(n - 1) % STAGES]);
#pragma unroll
            for (int i = 0; i < D / 8; ++i) {
                o[4 * i + 0] *= rescale[0];
                o[4 * i + 1] *= rescale[0];
                o[4 * i + 2] *= rescale[1];
                o[4 * i + 3] *= rescale[1];
            }
            pack_p(pa, sc);
        }
        // The last tile's P·V, outside the turns.
        fence_registers(o);
        wgmma_fence();
        issue_pv(pa, (n_tiles - 1) % STAGES);
        wgmma_wait<0>();
        fence_registers(o);
        fence_registers(pa);
        barrier_arrive(&empty[(n_tiles - 1) % STAGES]);
        if (warpgroup == 1) named_sync<2, 256>();
    }

    T* const out = static_cast<T*>(p.out);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const float sum = quad_sum(row_sum[r]);
        if (my_row[r] >= sq) continue;
        const float inverse = sum > 0.0f ? 1.0f / sum : 0.0f;
        const size_t slot = ((size_t)q_start + my_row[r]) * p.heads_q + h;
        T* const dst = out + slot * D;
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
            *reinterpret_cast<uint32_t*>(dst + i * 8 + 2 * c) =
                pack<T>(o[4 * i + 2 * r] * inverse, o[4 * i + 2 * r + 1] * inverse);
        }
        if (c == 0) p.lse[slot] = sum > 0.0f ? (row_max[r] + log2f(sum)) * LN2 : -INFINITY;
    }
}

}  // namespace

#define ATTENTION_SM90_BODY(T, D, STAGES) attention_fwd_sm90<T, D, STAGES>(&map_q, &map_k, &map_v, p);

#else

// The sm_80 and compute_80 images export the same entry points without a body: the host
// launches them only on a device that loads the sm_90a image.
#define ATTENTION_SM90_BODY(T, D, STAGES)

#endif

// Pipeline depth per head dim: 3 stages of 64 KiB (K and V) at d128 (with Q's 32 KiB, 225 KiB of
// the 227 a CTA may have), 4 of 32 KiB at d64.
#define ATTENTION_SM90_KERNEL(NAME, T, D, STAGES)                                                              \
    extern "C" __global__ void __launch_bounds__(SM90_THREADS, 1)                                                       \
        attention_fwd_sm90_##NAME(const __grid_constant__ tessera::TensorMap map_q,                          \
                                  const __grid_constant__ tessera::TensorMap map_k,                          \
                                  const __grid_constant__ tessera::TensorMap map_v, const HopperParams p) {            \
        ATTENTION_SM90_BODY(T, D, STAGES)                                                                      \
    }

ATTENTION_SM90_KERNEL(bf16_d64, __nv_bfloat16, 64, 4)
ATTENTION_SM90_KERNEL(bf16_d128, __nv_bfloat16, 128, 3)
ATTENTION_SM90_KERNEL(f16_d64, __half, 64, 4)
ATTENTION_SM90_KERNEL(f16_d128, __half, 128, 3)
