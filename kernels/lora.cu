// Fused LoRA: the adapter half of Y = X·Wᵀ + s_a·(X·A_aᵀ)·B_aᵀ and of its backward, for batches
// where each token row names its adapter, plus merge/unmerge and VeLoRA's compress/rebuild. The
// base product runs in cuBLASLt: in the forward the expand accumulates onto it (the shrink having
// run beside it on a second stream); in the backward it accumulates (beta = 1) onto dX.
//
// Rows arrive grouped by the host: `order` lists rows by adapter, `tiles` cuts it into runs of at
// most TILE_ROWS rows of one adapter (adapter, first, rows), `segments` gives each adapter's run
// (first, rows). Adapters are padded: A is (count, R, K_a) and B is (count, N_b, R) with R the
// padded rank; adapter a uses ranks below ranks[a] and scales by scales[a].
//
// lora_shrink: per 256-wide chunk c of the reduction, P_c[row, j] = Σ_{k in c} In[row, k]·M_a[j, k]
//   (f32, zero for j >= rank); T = Σ_c P_c is summed in chunk order by the kernels that read it, so
//   results are deterministic. One block per (tile, chunk): the tile's input chunk is staged in
//   shared memory (read once from memory), then each warp takes ranks j, w + 8, ...: a lane loads
//   8 elements of M_a's row (independent loads), dots them with each tile row, and a warp
//   reduction finishes each sum. M_a[j, k] is at j·m_j + k·m_k, so the same kernel reads A
//   (forward, dA) and B (dY·B in the backward).
// lora_expand: Out[row, n] = (Out[row, n] +) s_a·Σ_j T[row, j]·M_a[n, j] (+ bias[n]), one thread per
//   n holding M_a[n, 0..rank) in registers across the tile's rows; T rows, summed from the
//   shrink's per-chunk partials, come from shared memory.
// lora_adapter_grad: G_a[p, q] = s_a·Σ_{rows of a} P[row, p]·Q[row, q] with Q the f32 narrow
//   operand (T or dY·B, rank columns): one thread per wide index, rank sums in registers, rows
//   summed in order (deterministic). Writes every element, zero for unused adapters and ranks.
// lora_merge: W[o, k] += sign·s_a·Σ_j B_a[o, j]·A_a[j, k], one thread per weight element.
// velora_compress / velora_rebuild: one thread per sub-token / per element.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace {

constexpr int WARP = 32;
constexpr int MAX_RANK = 64;
constexpr int TILE_ROWS = 16;
constexpr int SHRINK_WARPS = 8;
constexpr int K_PER_LANE = 8;
constexpr int K_CHUNK = WARP * K_PER_LANE;  // reduction elements per shrink block
constexpr int EXPAND_THREADS = 128;
constexpr int GRAD_THREADS = 128;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// The routing table and the adapters' ranks and scales, as laid out by src/ops/lora.rs.
struct Routing {
    const uint32_t* order;     // rows by adapter
    const uint32_t* tiles;     // 3 words per tile: adapter, first position in order, rows
    const uint32_t* segments;  // 2 words per adapter up to the largest id: first, rows
    int segment_count;
};

struct AdapterTable {
    const uint32_t* ranks;  // count words, then count f32 scales
    int count;
    __device__ __forceinline__ int rank(int a) const { return static_cast<int>(ranks[a]); }
    __device__ __forceinline__ float scale(int a) const { return __uint_as_float(ranks[count + a]); }
};

template <typename T>
__device__ void shrink(const T* __restrict__ in, const T* __restrict__ m, float* __restrict__ partials,
                       Routing routing, AdapterTable table, int m_rows, int k_len, int padded_rank,
                       long long m_adapter, int m_j, int m_k) {
    __shared__ float x_tile[TILE_ROWS][K_CHUNK];
    const uint32_t* tile = routing.tiles + 3 * blockIdx.x;
    const int adapter = static_cast<int>(tile[0]);
    const int first = static_cast<int>(tile[1]);
    const int rows = static_cast<int>(tile[2]);
    const int k0 = blockIdx.y * K_CHUNK;
    const int rank = table.rank(adapter);
    for (int i = threadIdx.x; i < TILE_ROWS * K_CHUNK; i += blockDim.x) {
        const int r = i / K_CHUNK, k = k0 + i % K_CHUNK;
        float value = 0.0f;
        if (r < rows && k < k_len) value = to_float(in[static_cast<long long>(routing.order[first + r]) * k_len + k]);
        x_tile[r][i % K_CHUNK] = value;
    }
    __syncthreads();
    const int warp = threadIdx.x / WARP;
    const int lane = threadIdx.x % WARP;
    // This chunk's sums go to partials[chunk][row][j]; the row of lane r is the tile's row r.
    const long long row = lane < rows ? static_cast<long long>(routing.order[first + lane]) : 0;
    float* out = partials + (static_cast<long long>(blockIdx.y) * m_rows + row) * padded_rank;
    const T* m_adapter_base = m + adapter * m_adapter;
    for (int j = warp; j < padded_rank; j += SHRINK_WARPS) {
        if (j >= rank) {
            if (lane < rows) out[j] = 0.0f;
            continue;
        }
        float weight[K_PER_LANE];
#pragma unroll
        for (int e = 0; e < K_PER_LANE; ++e) {
            const int k = k0 + lane + WARP * e;
            weight[e] = k < k_len ? to_float(m_adapter_base[static_cast<long long>(j) * m_j + static_cast<long long>(k) * m_k]) : 0.0f;
        }
        float mine = 0.0f;  // lane r keeps the sum of tile row r
#pragma unroll
        for (int r = 0; r < TILE_ROWS; ++r) {
            if (r >= rows) break;  // uniform over the block
            float sum = 0.0f;
#pragma unroll
            for (int e = 0; e < K_PER_LANE; ++e) sum = fmaf(x_tile[r][lane + WARP * e], weight[e], sum);
#pragma unroll
            for (int offset = WARP / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
            if (lane == r) mine = sum;
        }
        if (lane < rows) out[j] = mine;
    }
}

// T[row, j] for j below `rank`, summed over the chunks of `partials` in chunk order.
__device__ __forceinline__ float sum_partials(const float* __restrict__ partials, int chunks, int m_rows,
                                              int padded_rank, long long row, int j) {
    // Independent loads: unrolled so that several are in flight (the partials come from L2).
    float sum = 0.0f;
#pragma unroll 8
    for (int c = 0; c < chunks; ++c) sum += partials[(static_cast<long long>(c) * m_rows + row) * padded_rank + j];
    return sum;
}

template <typename T>
__device__ void expand(const float* __restrict__ partials, int chunks, const T* __restrict__ m,
                       const T* __restrict__ bias, T* __restrict__ out, int accumulate, Routing routing,
                       AdapterTable table, int m_rows, int n_len, int padded_rank, long long m_adapter, int m_n,
                       int m_j) {
    __shared__ float tile_t[TILE_ROWS][MAX_RANK];
    const uint32_t* tile = routing.tiles + 3 * blockIdx.x;
    const int adapter = static_cast<int>(tile[0]);
    const int first = static_cast<int>(tile[1]);
    const int rows = static_cast<int>(tile[2]);
    const int rank = table.rank(adapter);
    const float scale = table.scale(adapter);
    // This thread's column of M_a first, so that its loads are in flight while T is summed.
    const int n = blockIdx.y * EXPAND_THREADS + threadIdx.x;
    const bool active = n < n_len;
    const T* mn = m + adapter * m_adapter + static_cast<long long>(active ? n : 0) * m_n;
    float weight[MAX_RANK];
#pragma unroll
    for (int j = 0; j < MAX_RANK; ++j) weight[j] = active && j < rank ? to_float(mn[static_cast<long long>(j) * m_j]) : 0.0f;
    for (int i = threadIdx.x; i < rows * MAX_RANK; i += blockDim.x) {
        const int r = i / MAX_RANK, j = i % MAX_RANK;
        tile_t[r][j] = j < rank ? scale * sum_partials(partials, chunks, m_rows, padded_rank, routing.order[first + r], j) : 0.0f;
    }
    __syncthreads();
    if (!active) return;
    const float b = bias != nullptr ? to_float(bias[n]) : 0.0f;
    for (int r = 0; r < rows; ++r) {
        T* target = out + static_cast<long long>(routing.order[first + r]) * n_len + n;
        float sum = accumulate ? to_float(*target) + b : b;
#pragma unroll
        for (int j = 0; j < MAX_RANK; ++j) sum = fmaf(tile_t[r][j], weight[j], sum);
        *target = from_float<T>(sum);
    }
}

template <typename T>
__device__ void adapter_grad(const T* __restrict__ p, const float* __restrict__ partials, int chunks,
                             T* __restrict__ g, Routing routing, AdapterTable table, int m_rows, int p_len,
                             int padded_rank, long long g_adapter, int g_p, int g_j) {
    __shared__ float q_tile[TILE_ROWS][MAX_RANK];
    const int adapter = blockIdx.y;
    const int w = blockIdx.x * GRAD_THREADS + threadIdx.x;
    const int rank = table.rank(adapter);
    const float scale = table.scale(adapter);
    int first = 0, rows = 0;
    if (adapter < routing.segment_count) {
        first = static_cast<int>(routing.segments[2 * adapter]);
        rows = static_cast<int>(routing.segments[2 * adapter + 1]);
    }
    float acc[MAX_RANK];
#pragma unroll
    for (int j = 0; j < MAX_RANK; ++j) acc[j] = 0.0f;
    // The adapter's rows, TILE_ROWS at a time: their narrow operand staged in shared memory.
    for (int start = 0; start < rows; start += TILE_ROWS) {
        const int count = min(TILE_ROWS, rows - start);
        __syncthreads();
        for (int i = threadIdx.x; i < count * MAX_RANK; i += blockDim.x) {
            const int r = i / MAX_RANK, j = i % MAX_RANK;
            q_tile[r][j] = j < rank ? sum_partials(partials, chunks, m_rows, padded_rank, routing.order[first + start + r], j) : 0.0f;
        }
        __syncthreads();
        if (w < p_len) {
            for (int r = 0; r < count; ++r) {
                const float pv = to_float(p[static_cast<long long>(routing.order[first + start + r]) * p_len + w]);
#pragma unroll
                for (int j = 0; j < MAX_RANK; ++j) acc[j] = fmaf(pv, q_tile[r][j], acc[j]);
            }
        }
    }
    if (w >= p_len) return;
    T* gw = g + adapter * g_adapter + static_cast<long long>(w) * g_p;
#pragma unroll
    for (int j = 0; j < MAX_RANK; ++j) {
        if (j < padded_rank) gw[static_cast<long long>(j) * g_j] = from_float<T>(scale * acc[j]);
    }
}

template <typename T>
__device__ void merge(T* __restrict__ w, const T* __restrict__ a, const T* __restrict__ b, int d_out, int d_in,
                      int padded_rank, int rank, float signed_scale) {
    const long long total = static_cast<long long>(d_out) * d_in;
    for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < total;
         i += static_cast<long long>(gridDim.x) * blockDim.x) {
        const long long o = i / d_in, k = i % d_in;
        float delta = 0.0f;
        for (int j = 0; j < rank; ++j) delta = fmaf(to_float(b[o * padded_rank + j]), to_float(a[j * static_cast<long long>(d_in) + k]), delta);
        w[i] = from_float<T>(fmaf(signed_scale, delta, to_float(w[i])));
    }
}

template <typename T>
__device__ void velora_compress(const T* __restrict__ x, const float* __restrict__ v, T* __restrict__ z,
                                long long sub_tokens, int sub) {
    for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < sub_tokens;
         i += static_cast<long long>(gridDim.x) * blockDim.x) {
        const T* chunk = x + i * sub;
        float dot = 0.0f;
        for (int u = 0; u < sub; ++u) dot = fmaf(to_float(chunk[u]), v[u], dot);
        z[i] = from_float<T>(dot);
    }
}

template <typename T>
__device__ void velora_rebuild(const T* __restrict__ z, const float* __restrict__ v, T* __restrict__ x,
                               long long total, int sub) {
    for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < total;
         i += static_cast<long long>(gridDim.x) * blockDim.x) {
        x[i] = from_float<T>(to_float(z[i / sub]) * v[i % sub]);
    }
}

}  // namespace

#define LORA_KERNELS(T, SUFFIX)                                                                              \
    extern "C" __global__ void __launch_bounds__(SHRINK_WARPS * WARP) lora_shrink_##SUFFIX(                 \
        const T* in, const T* m, float* partials, Routing routing, AdapterTable table, int m_rows, int k_len, \
        int padded_rank, long long m_adapter, int m_j, int m_k) {                                            \
        shrink<T>(in, m, partials, routing, table, m_rows, k_len, padded_rank, m_adapter, m_j, m_k);         \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(EXPAND_THREADS) lora_expand_##SUFFIX(                       \
        const float* partials, int chunks, const T* m, const T* bias, T* out, int accumulate,                \
        Routing routing, AdapterTable table, int m_rows, int n_len, int padded_rank, long long m_adapter,    \
        int m_n, int m_j) {                                                                                  \
        expand<T>(partials, chunks, m, bias, out, accumulate, routing, table, m_rows, n_len, padded_rank,    \
                  m_adapter, m_n, m_j);                                                                      \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(GRAD_THREADS) lora_adapter_grad_##SUFFIX(                   \
        const T* p, const float* partials, int chunks, T* g, Routing routing, AdapterTable table, int m_rows, \
        int p_len, int padded_rank, long long g_adapter, int g_p, int g_j) {                                 \
        adapter_grad<T>(p, partials, chunks, g, routing, table, m_rows, p_len, padded_rank, g_adapter, g_p,  \
                        g_j);                                                                                \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(256) lora_merge_##SUFFIX(                                   \
        T* w, const T* a, const T* b, int d_out, int d_in, int padded_rank, int rank, float signed_scale) {  \
        merge<T>(w, a, b, d_out, d_in, padded_rank, rank, signed_scale);                                     \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(256) velora_compress_##SUFFIX(                              \
        const T* x, const float* v, T* z, long long sub_tokens, int sub) {                                   \
        velora_compress<T>(x, v, z, sub_tokens, sub);                                                        \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(256) velora_rebuild_##SUFFIX(                               \
        const T* z, const float* v, T* x, long long total, int sub) {                                        \
        velora_rebuild<T>(z, v, x, total, sub);                                                              \
    }

LORA_KERNELS(float, f32)
LORA_KERNELS(__nv_bfloat16, bf16)
LORA_KERNELS(__half, f16)
