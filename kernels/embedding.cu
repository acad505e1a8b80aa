// Token and learned position embeddings: forward gather-and-add, and the deterministic backward
// scatter-add into the tables.
//
// Forward (embedding_fwd_*): one block per token; its threads stride the row, reading the
// token's row of the token table and the position's row of the position table (optional) and
// writing their f32 sum rounded to the table dtype; 16-byte vectors when aligned. A token at or
// beyond the vocabulary (validation cannot read device tokens without a synchronisation) writes
// a row of NaN. Traffic: two row reads and one row write per token.
//
// Backward: no float atomics. The host groups the batch's positions by token (a stable counting
// sort: EmbeddingGradPlan in src/ops/embedding.rs); embedding_bwd_tokens gives each (distinct
// token, 256 columns) pair one block whose threads each own a column and add the gradient rows of
// that token's positions in position order, then add the sum into the f32 table gradient. The
// position table's gradient (embedding_bwd_positions) gives each (position, column) one thread
// that adds the batch's rows in batch order. Every sum has a fixed order: bit-identical runs.
#include "common/nn.cuh"

namespace {

constexpr int THREADS = 256;
constexpr int UNROLL = 8;

template <typename T, int VEC>
__device__ void embedding_fwd(const uint32_t* __restrict__ tokens, const T* __restrict__ wte,
                              const T* __restrict__ wpe, T* __restrict__ out, int count, int seq, int vocab,
                              int width) {
    for (int n = blockIdx.x; n < count; n += gridDim.x) {
        const uint32_t token = tokens[n];
        const int t = n % seq;
        T* row = out + (int64_t)n * width;
        if (token >= (uint32_t)vocab) {
            for (int c = threadIdx.x; c < width; c += THREADS) row[c] = tessera::from_float<T>(__int_as_float(0x7fc00000));
            continue;
        }
        const T* e = wte + (int64_t)token * width;
        const T* p = wpe + (int64_t)t * width;
        for (int c = threadIdx.x * VEC; c < width; c += THREADS * VEC) {
            float v[VEC], q[VEC];
            tessera::load_floats<T, VEC>(e + c, v);
            if (wpe != nullptr) {
                tessera::load_floats<T, VEC>(p + c, q);
#pragma unroll
                for (int k = 0; k < VEC; ++k) v[k] += q[k];
            }
            tessera::store_floats<T, VEC>(row + c, v);
        }
    }
}

// plan: starts[segments + 1], then tokens[segments], then positions[count] (u32), as laid out by
// EmbeddingGradPlan. d_wte is f32 and accumulated into.
template <typename T>
__device__ void embedding_bwd_tokens(const T* __restrict__ d_out, const uint32_t* __restrict__ starts,
                                     const uint32_t* __restrict__ segment_tokens,
                                     const uint32_t* __restrict__ positions, float* __restrict__ d_wte,
                                     int segments, int width) {
    const int c = blockIdx.y * THREADS + threadIdx.x;
    if (c >= width) return;
    for (int segment = blockIdx.x; segment < segments; segment += gridDim.x) {
        const uint32_t begin = starts[segment], end = starts[segment + 1];
        float sum = 0.0f;
        uint32_t i = begin;
        // Eight loads in flight before their (in-order) adds: a frequent token's long list is
        // bound by memory latency, not by the additions.
        for (; i + UNROLL <= end; i += UNROLL) {
            float v[UNROLL];
#pragma unroll
            for (int k = 0; k < UNROLL; ++k) v[k] = tessera::to_float(d_out[(int64_t)positions[i + k] * width + c]);
#pragma unroll
            for (int k = 0; k < UNROLL; ++k) sum += v[k];
        }
        for (; i < end; ++i) sum += tessera::to_float(d_out[(int64_t)positions[i] * width + c]);
        d_wte[(int64_t)segment_tokens[segment] * width + c] += sum;
    }
}

// d_wpe[t, c] += sum over b of d_out[b, t, c], for t < seq.
template <typename T>
__device__ void embedding_bwd_positions(const T* __restrict__ d_out, float* __restrict__ d_wpe, int batch, int seq,
                                        int width) {
    const int64_t total = (int64_t)seq * width;
    for (int64_t i = blockIdx.x * (int64_t)THREADS + threadIdx.x; i < total; i += (int64_t)gridDim.x * THREADS) {
        float sum = 0.0f;
        for (int b = 0; b < batch; ++b) sum += tessera::to_float(d_out[(int64_t)b * total + i]);
        d_wpe[i] += sum;
    }
}

}  // namespace

#define EMBEDDING_KERNELS(T, NAME)                                                                              \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                      \
        embedding_fwd_##NAME(const uint32_t* tokens, const T* wte, const T* wpe, T* out, int count, int seq,    \
                             int vocab, int width) {                                                            \
        embedding_fwd<T, 1>(tokens, wte, wpe, out, count, seq, vocab, width);                                   \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                      \
        embedding_fwd_vec_##NAME(const uint32_t* tokens, const T* wte, const T* wpe, T* out, int count,         \
                                 int seq, int vocab, int width) {                                               \
        embedding_fwd<T, tessera::vector_width<T>()>(tokens, wte, wpe, out, count, seq, vocab, width);          \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                      \
        embedding_bwd_tokens_##NAME(const T* d_out, const uint32_t* starts, const uint32_t* segment_tokens,     \
                                    const uint32_t* positions, float* d_wte, int segments, int width) {         \
        embedding_bwd_tokens<T>(d_out, starts, segment_tokens, positions, d_wte, segments, width);              \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                      \
        embedding_bwd_positions_##NAME(const T* d_out, float* d_wpe, int batch, int seq, int width) {           \
        embedding_bwd_positions<T>(d_out, d_wpe, batch, seq, width);                                            \
    }

EMBEDDING_KERNELS(float, f32)
EMBEDDING_KERNELS(__nv_bfloat16, bf16)
EMBEDDING_KERNELS(__half, f16)
