// GELU (tanh approximation) and SwiGLU, forward and backward, for f32, bf16 and f16 tensors.
//
// Elementwise and memory-bound: each thread handles one 16-byte vector (4 f32 or 8 bf16/f16
// elements) per grid-stride step when every pointer is 16-byte aligned and the length is a
// multiple of the vector (VEC = vector_width<T>()), one element otherwise (VEC = 1). All
// arithmetic is f32; traffic is one read and one write per element (forward), two reads and one
// write (backward). SwiGLU reads its input as rows of [gate | up], each half `width` wide; a block walks
// rows (grid-stride), its threads the columns of a row.
#include "common/nn.cuh"

namespace {

constexpr int THREADS = 256;
constexpr float GELU_K0 = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float GELU_K1 = 0.044715f;

__device__ __forceinline__ float gelu(float x) {
    const float u = GELU_K0 * (x + GELU_K1 * x * x * x);
    return 0.5f * x * (1.0f + tanhf(u));
}

__device__ __forceinline__ float gelu_grad(float x) {
    const float u = GELU_K0 * (x + GELU_K1 * x * x * x);
    const float t = tanhf(u);
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * GELU_K0 * (1.0f + 3.0f * GELU_K1 * x * x);
}

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

template <typename T, int VEC>
__device__ void gelu_fwd(const T* __restrict__ x, T* __restrict__ out, int64_t n) {
    const int64_t vectors = n / VEC;
    for (int64_t v = blockIdx.x * (int64_t)THREADS + threadIdx.x; v < vectors; v += (int64_t)gridDim.x * THREADS) {
        float a[VEC];
        tessera::load_floats<T, VEC>(x + v * VEC, a);
#pragma unroll
        for (int i = 0; i < VEC; ++i) a[i] = gelu(a[i]);
        tessera::store_floats<T, VEC>(out + v * VEC, a);
    }
}

template <typename T, int VEC>
__device__ void gelu_bwd(const T* __restrict__ x, const T* __restrict__ d_out, T* __restrict__ d_x, int64_t n) {
    const int64_t vectors = n / VEC;
    for (int64_t v = blockIdx.x * (int64_t)THREADS + threadIdx.x; v < vectors; v += (int64_t)gridDim.x * THREADS) {
        float a[VEC], g[VEC];
        tessera::load_floats<T, VEC>(x + v * VEC, a);
        tessera::load_floats<T, VEC>(d_out + v * VEC, g);
#pragma unroll
        for (int i = 0; i < VEC; ++i) a[i] = g[i] * gelu_grad(a[i]);
        tessera::store_floats<T, VEC>(d_x + v * VEC, a);
    }
}

// out[r, j] = silu(x[r, j]) * x[r, width + j] for j < width.
template <typename T, int VEC>
__device__ void swiglu_fwd(const T* __restrict__ x, T* __restrict__ out, int64_t rows, int64_t width) {
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x)
    for (int64_t j = (int64_t)threadIdx.x * VEC; j < width; j += (int64_t)THREADS * VEC) {
        float gate[VEC], up[VEC];
        tessera::load_floats<T, VEC>(x + r * 2 * width + j, gate);
        tessera::load_floats<T, VEC>(x + r * 2 * width + width + j, up);
#pragma unroll
        for (int i = 0; i < VEC; ++i) gate[i] = gate[i] * sigmoid(gate[i]) * up[i];
        tessera::store_floats<T, VEC>(out + r * width + j, gate);
    }
}

// d_gate = d_out * up * silu'(gate), d_up = d_out * silu(gate), with
// silu'(g) = s * (1 + g * (1 - s)) and s = sigmoid(g).
template <typename T, int VEC>
__device__ void swiglu_bwd(const T* __restrict__ x, const T* __restrict__ d_out, T* __restrict__ d_x, int64_t rows,
                           int64_t width) {
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x)
    for (int64_t j = (int64_t)threadIdx.x * VEC; j < width; j += (int64_t)THREADS * VEC) {
        float gate[VEC], up[VEC], g[VEC], d_gate[VEC], d_up[VEC];
        tessera::load_floats<T, VEC>(x + r * 2 * width + j, gate);
        tessera::load_floats<T, VEC>(x + r * 2 * width + width + j, up);
        tessera::load_floats<T, VEC>(d_out + r * width + j, g);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
            const float s = sigmoid(gate[i]);
            d_gate[i] = g[i] * up[i] * s * (1.0f + gate[i] * (1.0f - s));
            d_up[i] = g[i] * gate[i] * s;
        }
        tessera::store_floats<T, VEC>(d_x + r * 2 * width + j, d_gate);
        tessera::store_floats<T, VEC>(d_x + r * 2 * width + width + j, d_up);
    }
}

}  // namespace

// Kernel names: <op>_<dtype> (one element per step) and <op>_vec_<dtype> (16-byte vectors).
#define ACTIVATION_KERNELS(T, NAME)                                                                               \
    extern "C" __global__ void __launch_bounds__(THREADS) gelu_fwd_##NAME(const T* x, T* out, int64_t n) {       \
        gelu_fwd<T, 1>(x, out, n);                                                                                \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(THREADS) gelu_fwd_vec_##NAME(const T* x, T* out, int64_t n) {   \
        gelu_fwd<T, tessera::vector_width<T>()>(x, out, n);                                                       \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                        \
        gelu_bwd_##NAME(const T* x, const T* d_out, T* d_x, int64_t n) {                                          \
        gelu_bwd<T, 1>(x, d_out, d_x, n);                                                                         \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                        \
        gelu_bwd_vec_##NAME(const T* x, const T* d_out, T* d_x, int64_t n) {                                      \
        gelu_bwd<T, tessera::vector_width<T>()>(x, d_out, d_x, n);                                                \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                        \
        swiglu_fwd_##NAME(const T* x, T* out, int64_t rows, int64_t width) {                                      \
        swiglu_fwd<T, 1>(x, out, rows, width);                                                                    \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                        \
        swiglu_fwd_vec_##NAME(const T* x, T* out, int64_t rows, int64_t width) {                                  \
        swiglu_fwd<T, tessera::vector_width<T>()>(x, out, rows, width);                                           \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                        \
        swiglu_bwd_##NAME(const T* x, const T* d_out, T* d_x, int64_t rows, int64_t width) {                      \
        swiglu_bwd<T, 1>(x, d_out, d_x, rows, width);                                                             \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                        \
        swiglu_bwd_vec_##NAME(const T* x, const T* d_out, T* d_x, int64_t rows, int64_t width) {                  \
        swiglu_bwd<T, tessera::vector_width<T>()>(x, d_out, d_x, rows, width);                                    \
    }

ACTIVATION_KERNELS(float, f32)
ACTIVATION_KERNELS(__nv_bfloat16, bf16)
ACTIVATION_KERNELS(__half, f16)
