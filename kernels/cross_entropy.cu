// Softmax cross-entropy over the vocabulary fused with its gradient: one block per row reads the
// row's logits once for an online max and sum of exponentials (f32), writes the row's loss
// (logsumexp - logit[target]), then reads the row again to write the gradient
// (softmax - onehot) * scale, over the logits themselves or into a separate tensor. No
// probability tensor is ever stored. Traffic per row: 2 reads and 1 write of the logits (the
// second read is often an L2 hit), or 1 read without the gradient.
//
// Three launches: cross_entropy_count (one block) counts the rows that are not ignored and
// stores the gradient's scale, grad_scale / count; the row kernel; cross_entropy_mean (one
// block) sums the per-row losses in a fixed order and divides by the count. Every reduction has
// a fixed order, so results are bit-identical run to run.
//
// A target that is neither the ignore index nor below the vocabulary size makes its row's loss
// and gradient NaN (validation cannot read device targets without a synchronisation).
#include "common/nn.cuh"

namespace {

constexpr int MAX_THREADS = 1024;

// Layout shared with src/ops/cross_entropy.rs: written by cross_entropy_count.
struct CrossEntropyScratch {
    float scale;     // grad_scale / count, 0 when every row is ignored
    uint32_t count;  // rows not ignored
};

// Online softmax state: the running max and the sum of exp(x - max).
struct MaxSum {
    float max;
    float sum;
};

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
    const float m = fmaxf(a.max, b.max);
    if (m == __int_as_float(0xff800000)) return {m, 0.0f};
    return {m, a.sum * expf(a.max - m) + b.sum * expf(b.max - m)};
}

__device__ __forceinline__ MaxSum add(MaxSum a, float x) {
    // A -inf logit (a masked token) adds nothing, also while the running max is still -inf.
    if (x <= a.max) return {a.max, a.max == __int_as_float(0xff800000) ? a.sum : a.sum + expf(x - a.max)};
    return {x, a.sum * expf(a.max - x) + 1.0f};
}

__device__ __forceinline__ MaxSum block_max_sum(MaxSum v, float* scratch) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        MaxSum other = {__shfl_xor_sync(0xffffffffu, v.max, offset), __shfl_xor_sync(0xffffffffu, v.sum, offset)};
        v = combine(v, other);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) {
        scratch[2 * warp] = v.max;
        scratch[2 * warp + 1] = v.sum;
    }
    __syncthreads();
    v = lane < warps ? MaxSum{scratch[2 * lane], scratch[2 * lane + 1]} : MaxSum{__int_as_float(0xff800000), 0.0f};
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        MaxSum other = {__shfl_xor_sync(0xffffffffu, v.max, offset), __shfl_xor_sync(0xffffffffu, v.sum, offset)};
        v = combine(v, other);
    }
    return v;
}

__device__ __forceinline__ bool ignored(uint32_t target, uint32_t ignore_index, int has_ignore) {
    return has_ignore && target == ignore_index;
}

// `logits` and `grad` may be the same array (the gradient written in place), so neither is
// __restrict__; each element is read before it is written, by the same thread, and the reads of
// the first pass end at a block barrier before the first write.
template <typename T, int VEC>
__device__ void cross_entropy_rows(const T* logits, T* grad, const uint32_t* __restrict__ targets,
                                   float* __restrict__ losses, const CrossEntropyScratch* __restrict__ scratch,
                                   int rows, int vocab, uint32_t ignore_index, int has_ignore) {
    __shared__ float reduce[64];
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* x = logits + (int64_t)row * vocab;
        const uint32_t target = targets[row];
        const bool skip = ignored(target, ignore_index, has_ignore);
        const bool valid = !skip && target < (uint32_t)vocab;
        MaxSum state = {__int_as_float(0xff800000), 0.0f};
        for (int i = threadIdx.x * VEC; i < vocab; i += blockDim.x * VEC) {
            float v[VEC];
            tessera::load_floats<T, VEC>(x + i, v);
#pragma unroll
            for (int k = 0; k < VEC; ++k) state = add(state, v[k]);
        }
        const float target_logit = valid ? tessera::to_float(x[target]) : 0.0f;
        state = block_max_sum(state, reduce);
        // Differences from the max are exact in f32 for logits of any size; adding the max
        // back (logsumexp itself) would round away the low digits of large logits.
        const float log_sum = logf(state.sum);
        const float nan = __int_as_float(0x7fc00000);
        if (threadIdx.x == 0) losses[row] = skip ? 0.0f : (valid ? (state.max - target_logit) + log_sum : nan);
        if (grad != nullptr) {
            const float scale = skip ? 0.0f : (valid ? scratch->scale : nan);
            T* g = grad + (int64_t)row * vocab;
            for (int i = threadIdx.x * VEC; i < vocab; i += blockDim.x * VEC) {
                float v[VEC];
                tessera::load_floats<T, VEC>(x + i, v);
#pragma unroll
                for (int k = 0; k < VEC; ++k) {
                    const float p = expf((v[k] - state.max) - log_sum);
                    v[k] = (p - ((uint32_t)(i + k) == target ? 1.0f : 0.0f)) * scale;
                }
                tessera::store_floats<T, VEC>(g + i, v);
            }
        }
        __syncthreads();  // the reduction scratch is reused by the next row
    }
}

__device__ __forceinline__ uint32_t block_sum_u32(uint32_t x, uint32_t* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = lane < warps ? scratch[lane] : 0u;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
}

}  // namespace

extern "C" __global__ void __launch_bounds__(MAX_THREADS)
    cross_entropy_count(const uint32_t* __restrict__ targets, int rows, uint32_t ignore_index, int has_ignore,
                        float grad_scale, CrossEntropyScratch* __restrict__ scratch) {
    __shared__ uint32_t reduce[32];
    uint32_t count = 0;
    for (int r = threadIdx.x; r < rows; r += blockDim.x) count += ignored(targets[r], ignore_index, has_ignore) ? 0u : 1u;
    count = block_sum_u32(count, reduce);
    if (threadIdx.x == 0) {
        scratch->count = count;
        scratch->scale = count > 0 ? grad_scale / (float)count : 0.0f;
    }
}

// The mean over the rows not ignored (ignored rows hold 0); NaN when all are ignored (0 / 0),
// as PyTorch's mean reduction gives.
extern "C" __global__ void __launch_bounds__(MAX_THREADS)
    cross_entropy_mean(const float* __restrict__ losses, int rows, const CrossEntropyScratch* __restrict__ scratch,
                       float* __restrict__ mean) {
    __shared__ float reduce[32];
    float sum = 0.0f;
    for (int r = threadIdx.x; r < rows; r += blockDim.x) sum += losses[r];
    sum = tessera::block_sum(sum, reduce);
    if (threadIdx.x == 0) *mean = sum / (float)scratch->count;
}

#define CROSS_ENTROPY_KERNELS(T, NAME)                                                                        \
    extern "C" __global__ void __launch_bounds__(MAX_THREADS)                                                \
        cross_entropy_rows_##NAME(const T* logits, T* grad, const uint32_t* targets, float* losses,           \
                                  const CrossEntropyScratch* scratch, int rows, int vocab, uint32_t ignore_index, \
                                  int has_ignore) {                                                           \
        cross_entropy_rows<T, 1>(logits, grad, targets, losses, scratch, rows, vocab, ignore_index, has_ignore); \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(MAX_THREADS)                                                \
        cross_entropy_rows_vec_##NAME(const T* logits, T* grad, const uint32_t* targets, float* losses,       \
                                      const CrossEntropyScratch* scratch, int rows, int vocab,                \
                                      uint32_t ignore_index, int has_ignore) {                                \
        cross_entropy_rows<T, tessera::vector_width<T>()>(logits, grad, targets, losses, scratch, rows, vocab, \
                                                          ignore_index, has_ignore);                          \
    }

CROSS_ENTROPY_KERNELS(float, f32)
CROSS_ENTROPY_KERNELS(__nv_bfloat16, bf16)
CROSS_ENTROPY_KERNELS(__half, f16)
