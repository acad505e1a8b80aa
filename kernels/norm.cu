// LayerNorm and RMSNorm, each optionally fused with the residual add before it, forward and
// backward, for f32, bf16 and f16 activations (weight and bias of the same dtype; statistics
// and parameter gradients in f32).
//
// Forward (norm_fwd_*): one warp per row, 8 rows per 256-thread block. The warp reads the row
// (x, plus the residual when fused, whose rounded sum it writes out) and accumulates its mean
// (of the values minus the row's first one), reads it again for the variance about that mean
// (two-pass: no cancellation), and a third time
// to write y = (s - mean) * rstd * weight (+ bias). The second and third reads hit L1/L2: HBM
// traffic is one read of each input and one write of each output. RMSNorm skips the mean
// (stored as 0) and uses rstd = 1 / sqrt(mean(s^2) + eps).
//
// Backward (norm_bwd_*): a block owns a contiguous chunk of rows and walks them one at a time,
// its threads striding the columns. Per row: two block sums (of dy*w and dy*w*xhat), then
// d_input = rstd * (dy*w - mean(dy*w) - xhat * mean(dy*w*xhat)) (+ d_skip), the mean term
// dropped for RMSNorm. Each thread also adds dy*xhat and dy into the block's per-column partials
// in shared memory (2 * width floats); a thread always owns the same columns, so no atomics are
// needed. At the end the block writes its partials to global scratch, and norm_bwd_params sums
// the blocks' partials per column in block order: the parameter gradients are bit-identical from
// run to run.
#include "common/nn.cuh"

namespace {

constexpr int FWD_THREADS = 256;
constexpr int FWD_ROWS_PER_BLOCK = FWD_THREADS / 32;
constexpr int BWD_THREADS = 256;
constexpr int PARAM_THREADS = 256;

template <typename T, int VEC, bool RESIDUAL, bool RMS>
__device__ void norm_fwd(const T* __restrict__ x, const T* __restrict__ residual, T* __restrict__ sum_out,
                         const T* __restrict__ weight, const T* __restrict__ bias, T* __restrict__ out,
                         float* __restrict__ mean_out, float* __restrict__ rstd_out, int rows, int width, float eps) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * FWD_ROWS_PER_BLOCK + (threadIdx.x >> 5);
    if (row >= rows) return;
    const int64_t base = (int64_t)row * width;
    // The values normalised: x, or the rounded sum x + residual once it is written.
    const T* s = RESIDUAL ? sum_out + base : x + base;
    // LayerNorm sums x - x[0]: terms of the row's spread, not its offset, so that a row far
    // from zero keeps its mean's digits.
    float shift = 0.0f;
    if constexpr (!RMS) {
        shift = tessera::to_float(x[base]);
        if constexpr (RESIDUAL) shift = tessera::to_float(tessera::from_float<T>(shift + tessera::to_float(residual[base])));
    }
    float total = 0.0f;
    for (int c = lane * VEC; c < width; c += 32 * VEC) {
        float v[VEC];
        tessera::load_floats<T, VEC>(x + base + c, v);
        if constexpr (RESIDUAL) {
            float r[VEC];
            tessera::load_floats<T, VEC>(residual + base + c, r);
#pragma unroll
            for (int k = 0; k < VEC; ++k) v[k] = tessera::to_float(tessera::from_float<T>(v[k] + r[k]));
            tessera::store_floats<T, VEC>(sum_out + base + c, v);
        }
#pragma unroll
        for (int k = 0; k < VEC; ++k) total += RMS ? v[k] * v[k] : v[k] - shift;
    }
    total = tessera::warp_sum(total);
    float mean = 0.0f, rstd;
    if constexpr (RMS) {
        rstd = rsqrtf(total / (float)width + eps);
    } else {
        mean = shift + total / (float)width;
        float squares = 0.0f;
        for (int c = lane * VEC; c < width; c += 32 * VEC) {
            float v[VEC];
            tessera::load_floats<T, VEC>(s + c, v);
#pragma unroll
            for (int k = 0; k < VEC; ++k) squares += (v[k] - mean) * (v[k] - mean);
        }
        squares = tessera::warp_sum(squares);
        rstd = rsqrtf(squares / (float)width + eps);
    }
    for (int c = lane * VEC; c < width; c += 32 * VEC) {
        float v[VEC], w[VEC], b[VEC];
        tessera::load_floats<T, VEC>(s + c, v);
        tessera::load_floats<T, VEC>(weight + c, w);
        if (bias != nullptr) {
            tessera::load_floats<T, VEC>(bias + c, b);
        } else {
#pragma unroll
            for (int k = 0; k < VEC; ++k) b[k] = 0.0f;
        }
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[k] = (v[k] - mean) * rstd * w[k] + b[k];
        tessera::store_floats<T, VEC>(out + base + c, v);
    }
    if (lane == 0) {
        mean_out[row] = mean;
        rstd_out[row] = rstd;
    }
}

template <typename T, int VEC, bool RMS>
__device__ void norm_bwd(const T* __restrict__ d_out, const T* __restrict__ d_skip, const T* __restrict__ input,
                         const T* __restrict__ weight, const float* __restrict__ mean_in,
                         const float* __restrict__ rstd_in, T* __restrict__ d_input, float* __restrict__ partials,
                         int rows, int width, int rows_per_block) {
    extern __shared__ float shared[];
    float* d_weight = shared;         // [width]
    float* d_bias = shared + width;   // [width]
    __shared__ float reduce[64];
    for (int c = threadIdx.x; c < 2 * width; c += blockDim.x) shared[c] = 0.0f;
    __syncthreads();
    const int first = blockIdx.x * rows_per_block;
    const int last = min(first + rows_per_block, rows);
    for (int row = first; row < last; ++row) {
        const int64_t base = (int64_t)row * width;
        const float mean = mean_in[row], rstd = rstd_in[row];
        float2 sums = make_float2(0.0f, 0.0f);
        for (int c = threadIdx.x * VEC; c < width; c += blockDim.x * VEC) {
            float dy[VEC], s[VEC], w[VEC];
            tessera::load_floats<T, VEC>(d_out + base + c, dy);
            tessera::load_floats<T, VEC>(input + base + c, s);
            tessera::load_floats<T, VEC>(weight + c, w);
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                const float xhat = (s[k] - mean) * rstd, dyw = dy[k] * w[k];
                sums.x += dyw;
                sums.y += dyw * xhat;
                d_weight[c + k] += dy[k] * xhat;
                d_bias[c + k] += dy[k];
            }
        }
        sums = tessera::block_sum2(sums, reduce);
        const float mean_dyw = RMS ? 0.0f : sums.x / (float)width;
        const float mean_dyw_xhat = sums.y / (float)width;
        for (int c = threadIdx.x * VEC; c < width; c += blockDim.x * VEC) {
            float dy[VEC], s[VEC], w[VEC], skip[VEC];
            tessera::load_floats<T, VEC>(d_out + base + c, dy);
            tessera::load_floats<T, VEC>(input + base + c, s);
            tessera::load_floats<T, VEC>(weight + c, w);
            if (d_skip != nullptr) {
                tessera::load_floats<T, VEC>(d_skip + base + c, skip);
            } else {
#pragma unroll
                for (int k = 0; k < VEC; ++k) skip[k] = 0.0f;
            }
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                const float xhat = (s[k] - mean) * rstd;
                s[k] = rstd * (dy[k] * w[k] - mean_dyw - xhat * mean_dyw_xhat) + skip[k];
            }
            tessera::store_floats<T, VEC>(d_input + base + c, s);
        }
    }
    __syncthreads();
    float* mine = partials + (int64_t)blockIdx.x * 2 * width;
    for (int c = threadIdx.x; c < 2 * width; c += blockDim.x) mine[c] = shared[c];
}

}  // namespace

// d_weight[c] (and d_bias[c] when given) = (accumulate ? old : 0) + sum over blocks, in block
// order, of the blocks' partials.
extern "C" __global__ void __launch_bounds__(PARAM_THREADS)
    norm_bwd_params(const float* __restrict__ partials, int blocks, int width, float* __restrict__ d_weight,
                    float* __restrict__ d_bias, int accumulate) {
    const int c = blockIdx.x * PARAM_THREADS + threadIdx.x;
    if (c >= width) return;
    float w = 0.0f, b = 0.0f;
    for (int block = 0; block < blocks; ++block) {
        w += partials[(int64_t)block * 2 * width + c];
        b += partials[(int64_t)block * 2 * width + width + c];
    }
    d_weight[c] = accumulate ? d_weight[c] + w : w;
    if (d_bias != nullptr) d_bias[c] = accumulate ? d_bias[c] + b : b;
}

#define NORM_FWD(T, NAME, VEC, VNAME, RESIDUAL, RNAME, RMS, KNAME)                                             \
    extern "C" __global__ void __launch_bounds__(FWD_THREADS) KNAME##_fwd##RNAME##VNAME##_##NAME(               \
        const T* x, const T* residual, T* sum_out, const T* weight, const T* bias, T* out, float* mean,         \
        float* rstd, int rows, int width, float eps) {                                                          \
        norm_fwd<T, VEC, RESIDUAL, RMS>(x, residual, sum_out, weight, bias, out, mean, rstd, rows, width, eps); \
    }

#define NORM_BWD(T, NAME, VEC, VNAME, RMS, KNAME)                                                              \
    extern "C" __global__ void __launch_bounds__(BWD_THREADS) KNAME##_bwd##VNAME##_##NAME(                     \
        const T* d_out, const T* d_skip, const T* input, const T* weight, const float* mean, const float* rstd, \
        T* d_input, float* partials, int rows, int width, int rows_per_block) {                                \
        norm_bwd<T, VEC, RMS>(d_out, d_skip, input, weight, mean, rstd, d_input, partials, rows, width,        \
                              rows_per_block);                                                                 \
    }

// Names: layer_norm_fwd[_residual][_vec]_<dtype>, rms_norm_bwd[_vec]_<dtype>, ...
#define NORM_KERNELS_FOR(T, NAME, RMS, KNAME)                                        \
    NORM_FWD(T, NAME, 1, , false, , RMS, KNAME)                                      \
    NORM_FWD(T, NAME, tessera::vector_width<T>(), _vec, false, , RMS, KNAME)         \
    NORM_FWD(T, NAME, 1, , true, _residual, RMS, KNAME)                              \
    NORM_FWD(T, NAME, tessera::vector_width<T>(), _vec, true, _residual, RMS, KNAME) \
    NORM_BWD(T, NAME, 1, , RMS, KNAME)                                               \
    NORM_BWD(T, NAME, tessera::vector_width<T>(), _vec, RMS, KNAME)

#define NORM_KERNELS(T, NAME)                      \
    NORM_KERNELS_FOR(T, NAME, false, layer_norm) \
    NORM_KERNELS_FOR(T, NAME, true, rms_norm)

NORM_KERNELS(float, f32)
NORM_KERNELS(__nv_bfloat16, bf16)
NORM_KERNELS(__half, f16)
