// Wavelet mixing (WaveletGPT): causal box-window averages per embedding coordinate, forward and
// backward (its adjoint, the same scan run from the end), plus the learnable-kernel variant.
//
// Box window, one pass: a block of 2 warps covers 16 coordinates of one sequence; each warp owns
// 8 adjacent coordinates (one 16-byte vector of bf16/f16, two of f32) and walks the sequence in
// steps of 32 lanes x ROWS rows. A lane loads its ROWS rows, and the row k_i steps back that
// leaves the window, all before any arithmetic; the window sum then advances by the differences
// (a per-lane serial prefix, a warp shuffle scan across lanes, and an f32 carry between steps).
// The carry stays at the window's magnitude, never at the prefix sum's, so long sequences lose
// no precision to cancellation. Memory traffic: each element read once from HBM and written
// once; the lagged re-read is k_i rows back, which the L2 still holds for the windows the level
// rule produces (a few MB in all). Coordinates that pass through are copied bit for bit.
//
// Learnable variant (kernel w_i of k_i taps): a direct FIR per output element, and the tap
// gradient as blocks over (32-coordinate group, tap) reducing over all rows in a fixed order.
// Correct and deterministic; not tuned (it is an option of the model, not its default).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace {

// Two warps per block, so that the blocks holding mixed coordinates and those only copying
// spread evenly over the multiprocessors (each warp owns a whole sequence of its coordinates).
constexpr int WARPS = 2;
constexpr int COORDS = 8;  // coordinates per warp
constexpr int WARP = 32;

// Rows per lane per step: 16-byte loads of 2-byte types, two per row for f32, with the same
// bytes in flight per lane.
template <typename T>
constexpr int ROWS_PER_LANE = sizeof(T) == 4 ? 4 : 8;
// With a residual every row is two loads: half the rows keep the same bytes in flight.
template <typename T, bool Residual>
constexpr int VECTOR_ROWS = ROWS_PER_LANE<T> / (Residual ? 2 : 1);
// Element-by-element loads (dims not a multiple of 8, groups of mixed windows) take 8 registers
// per row where a vector takes 4: half the rows.
template <typename T, bool Residual>
constexpr int SCALAR_ROWS = VECTOR_ROWS<T, Residual> > 1 ? VECTOR_ROWS<T, Residual> / 2 : 1;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// Eight adjacent elements as raw words, unpacked and packed by bit operations so that nothing
// takes a register's address (which would move it to local memory).
template <typename T>
struct Raw8 {
    uint4 word[sizeof(T) / 2];  // one 16-byte word for 2-byte types, two for f32
};

template <typename T>
__device__ __forceinline__ Raw8<T> load8(const T* p) {
    Raw8<T> raw;
#pragma unroll
    for (int w = 0; w < (int)(sizeof(T) / 2); ++w) raw.word[w] = reinterpret_cast<const uint4*>(p)[w];
    return raw;
}

template <typename T>
__device__ __forceinline__ void store8(T* p, const Raw8<T>& raw) {
#pragma unroll
    for (int w = 0; w < (int)(sizeof(T) / 2); ++w) __stcs(reinterpret_cast<uint4*>(p) + w, raw.word[w]);
}

__device__ __forceinline__ uint32_t lane_of(const uint4& w, int i) {
    return i == 0 ? w.x : i == 1 ? w.y : i == 2 ? w.z : w.w;
}

__device__ __forceinline__ void set_lane(uint4& w, int i, uint32_t v) {
    if (i == 0) w.x = v; else if (i == 1) w.y = v; else if (i == 2) w.z = v; else w.w = v;
}

__device__ __forceinline__ float half_bits_to_float(uint32_t bits) {
    return __half2float(__ushort_as_half((unsigned short)bits));
}

__device__ __forceinline__ uint32_t float_to_half_bits(float v) { return __half_as_ushort(__float2half_rn(v)); }

__device__ __forceinline__ uint32_t float_to_bf16_bits(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

__device__ __forceinline__ void unpack8(const Raw8<float>& raw, float (&v)[COORDS]) {
#pragma unroll
    for (int c = 0; c < COORDS; ++c) v[c] = __uint_as_float(lane_of(raw.word[c / 4], c % 4));
}

__device__ __forceinline__ void unpack8(const Raw8<__nv_bfloat16>& raw, float (&v)[COORDS]) {
#pragma unroll
    for (int c = 0; c < COORDS; ++c) {
        const uint32_t word = lane_of(raw.word[0], c / 2);
        v[c] = __uint_as_float(c % 2 == 0 ? word << 16 : word & 0xffff0000u);
    }
}

__device__ __forceinline__ void unpack8(const Raw8<__half>& raw, float (&v)[COORDS]) {
#pragma unroll
    for (int c = 0; c < COORDS; ++c) {
        const uint32_t word = lane_of(raw.word[0], c / 2);
        v[c] = half_bits_to_float(c % 2 == 0 ? word & 0xffffu : word >> 16);
    }
}

template <typename T> __device__ __forceinline__ Raw8<T> pack8(const float (&v)[COORDS]);

template <>
__device__ __forceinline__ Raw8<float> pack8<float>(const float (&v)[COORDS]) {
    Raw8<float> raw;
#pragma unroll
    for (int c = 0; c < COORDS; ++c) set_lane(raw.word[c / 4], c % 4, __float_as_uint(v[c]));
    return raw;
}

template <>
__device__ __forceinline__ Raw8<__nv_bfloat16> pack8<__nv_bfloat16>(const float (&v)[COORDS]) {
    Raw8<__nv_bfloat16> raw;
#pragma unroll
    for (int i = 0; i < 4; ++i)
        set_lane(raw.word[0], i, float_to_bf16_bits(v[2 * i]) | (float_to_bf16_bits(v[2 * i + 1]) << 16));
    return raw;
}

template <>
__device__ __forceinline__ Raw8<__half> pack8<__half>(const float (&v)[COORDS]) {
    Raw8<__half> raw;
#pragma unroll
    for (int i = 0; i < 4; ++i)
        set_lane(raw.word[0], i, float_to_half_bits(v[2 * i]) | (float_to_half_bits(v[2 * i + 1]) << 16));
    return raw;
}

// The value the window sees at (row, c): x, plus the residual when the forward is fused with it.
template <typename T>
__device__ __forceinline__ void load_values(const T* x, const T* residual, size_t at, int c0, int dim,
                                            bool vector, float (&v)[COORDS]) {
    if (vector) {
        unpack8(load8(x + at), v);
        if (residual != nullptr) {
            float r[COORDS];
            unpack8(load8(residual + at), r);
#pragma unroll
            for (int c = 0; c < COORDS; ++c) v[c] += r[c];
        }
    } else {
#pragma unroll
        for (int c = 0; c < COORDS; ++c) {
            const bool inside = c0 + c < dim;
            v[c] = inside ? to_float(x[at + c]) : 0.0f;
            if (residual != nullptr && inside) v[c] += to_float(residual[at + c]);
        }
    }
}

// Coordinates that pass through: copied raw (bit for bit) without a residual, else x + residual
// rounded once.
template <typename T>
__device__ void copy_group(const T* x, const T* residual, T* out, int seq, int dim, int c0, bool vector) {
    for (int row = threadIdx.x % WARP; row < seq; row += WARP) {
        const size_t at = (size_t)row * dim + c0;
        if (vector && residual == nullptr) {
            store8(out + at, load8(x + at));
        } else {
            float v[COORDS];
            load_values(x, residual, at, c0, dim, vector, v);
            if (vector) {
                store8(out + at, pack8<T>(v));
            } else {
#pragma unroll
                for (int c = 0; c < COORDS; ++c)
                    if (c0 + c < dim) out[at + c] = residual != nullptr ? from_float<T>(v[c]) : x[at + c];
            }
        }
    }
}

// value / div(t): a multiply by the window's reciprocal, except where the available-token divisor
// is still below k (the first k-1 tokens), which divides. The CPU twin rounds the same way.
__device__ __forceinline__ float divide(float value, float inv_k, uint32_t k, int t, bool available) {
    return available && (uint32_t)t + 1u < k ? value / (float)(t + 1) : value * inv_k;
}

// The box-window scan of one warp's 8 coordinates over one sequence. Forward: out[t] = W[t]/div(t)
// with W[t] = sum of v over (t-k, t]. Reverse (the backward): the same over the reversed sequence
// of v[t]/div(t), undivided after.
template <typename T, bool Reverse, bool Residual, int ROWS>
__device__ void scan_group(const T* x, const T* residual, T* out, const uint32_t (&k)[COORDS], int seq, int dim,
                           int c0, bool vector, bool available) {
    if (!Residual) residual = nullptr;
    const int lane = threadIdx.x % WARP;
    float carry[COORDS], inv_k[COORDS];
#pragma unroll
    for (int c = 0; c < COORDS; ++c) {
        carry[c] = 0.0f;
        inv_k[c] = 1.0f / (float)max(k[c], 1u);
    }

    for (int step = 0; step < seq; step += WARP * ROWS) {
        // Difference terms: the value entering the window minus the one leaving it.
        float term[ROWS][COORDS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const int u = step + lane * ROWS + r;  // position along the scan
            const int t = Reverse ? seq - 1 - u : u;
            if (u < seq) {
                load_values(x, residual, (size_t)t * dim + c0, c0, dim, vector, term[r]);
            } else {
#pragma unroll
                for (int c = 0; c < COORDS; ++c) term[r][c] = 0.0f;
            }
        }
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const int u = step + lane * ROWS + r;
            const int t = Reverse ? seq - 1 - u : u;
            if (Reverse && u < seq) {
#pragma unroll
                for (int c = 0; c < COORDS; ++c) term[r][c] = divide(term[r][c], inv_k[c], k[c], t, available);
            }
            // The values leaving the window, k steps back along the scan: one vector when the
            // 8 coordinates share their window (vector implies that), else one by one.
            if (vector) {
                const int gone_u = u - (int)k[0];
                if (u < seq && gone_u >= 0) {
                    const int gone = Reverse ? seq - 1 - gone_u : gone_u;
                    float leaving[COORDS];
                    load_values(x, residual, (size_t)gone * dim + c0, c0, dim, true, leaving);
#pragma unroll
                    for (int c = 0; c < COORDS; ++c)
                        term[r][c] -= Reverse ? divide(leaving[c], inv_k[c], k[c], gone, available) : leaving[c];
                }
            } else {
#pragma unroll
                for (int c = 0; c < COORDS; ++c) {
                    const int gone_u = u - (int)k[c];
                    if (u < seq && c0 + c < dim && gone_u >= 0) {
                        const int gone = Reverse ? seq - 1 - gone_u : gone_u;
                        const size_t at = (size_t)gone * dim + c0 + c;
                        float v = to_float(x[at]);
                        if (residual != nullptr) v += to_float(residual[at]);
                        term[r][c] -= Reverse ? divide(v, inv_k[c], k[c], gone, available) : v;
                    }
                }
            }
        }
        // Inclusive prefix over the lane's rows, then across lanes.
#pragma unroll
        for (int r = 1; r < ROWS; ++r)
#pragma unroll
            for (int c = 0; c < COORDS; ++c) term[r][c] += term[r - 1][c];
        float before[COORDS];
#pragma unroll
        for (int c = 0; c < COORDS; ++c) {
            float total = term[ROWS - 1][c];
#pragma unroll
            for (int offset = 1; offset < WARP; offset *= 2) {
                const float up = __shfl_up_sync(0xffffffffu, total, offset);
                if (lane >= offset) total += up;
            }
            before[c] = carry[c] + total - term[ROWS - 1][c];
            carry[c] += __shfl_sync(0xffffffffu, total, WARP - 1);
        }
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const int u = step + lane * ROWS + r;
            if (u >= seq) continue;
            const int t = Reverse ? seq - 1 - u : u;
            float result[COORDS];
#pragma unroll
            for (int c = 0; c < COORDS; ++c) {
                const float window = before[c] + term[r][c];
                result[c] = Reverse ? window : divide(window, inv_k[c], k[c], t, available);
            }
            const size_t at = (size_t)t * dim + c0;
            if (vector) {
                store8(out + at, pack8<T>(result));
            } else {
#pragma unroll
                for (int c = 0; c < COORDS; ++c)
                    if (c0 + c < dim) out[at + c] = from_float<T>(result[c]);
            }
        }
    }
}

// A group whose coordinates have different windows, some perhaps 0: rare (only where the mixed
// range starts or ends inside a group of 8). Pass-through coordinates are copied first, then the
// scan runs with their window treated as 1 and their output written back over by the copy.
template <typename T, bool Reverse, bool Residual>
__device__ void mixed_group(const T* x, const T* residual, T* out, const uint32_t (&k)[COORDS], int seq, int dim,
                            int c0, bool available) {
    uint32_t scan_k[COORDS];
#pragma unroll
    for (int c = 0; c < COORDS; ++c) scan_k[c] = k[c] == 0 ? 1u : k[c];
    scan_group<T, Reverse, Residual, SCALAR_ROWS<T, Residual>>(x, residual, out, scan_k, seq, dim, c0, false,
                                                              available);
    __syncwarp();
    for (int row = threadIdx.x % WARP; row < seq; row += WARP) {
        const size_t at = (size_t)row * dim + c0;
#pragma unroll
        for (int c = 0; c < COORDS; ++c) {
            if (k[c] != 0 || c0 + c >= dim) continue;
            out[at + c] = residual != nullptr ? from_float<T>(to_float(x[at + c]) + to_float(residual[at + c])) : x[at + c];
        }
    }
}

template <typename T, bool Reverse, bool Residual>
__device__ void window_kernel(const T* x, const T* residual, T* out, const uint32_t* windows, int seq, int dim,
                              int vector_ok, int available) {
    // Blocks run over (sequence, tile of WARPS x 8 coordinates), tiles fastest.
    const int groups = (dim + COORDS - 1) / COORDS;
    const int tiles = (groups + WARPS - 1) / WARPS;
    const int batch_index = blockIdx.x / tiles;
    const int c0 = ((blockIdx.x % tiles) * WARPS + threadIdx.x / WARP) * COORDS;
    if (c0 >= dim) return;  // whole warps leave; the kernel has no block-wide barrier
    const size_t base = (size_t)batch_index * seq * dim;
    x += base;
    out += base;
    if (Residual) residual += base; else residual = nullptr;

    uint32_t k[COORDS];
    bool all_pass = true, uniform = c0 + COORDS <= dim;
#pragma unroll
    for (int c = 0; c < COORDS; ++c) {
        k[c] = c0 + c < dim ? windows[c0 + c] : 0u;
        all_pass = all_pass && k[c] == 0;
        uniform = uniform && k[c] == k[0];
    }
    const bool vector = vector_ok && c0 + COORDS <= dim;
    if (all_pass) {
        copy_group(x, residual, out, seq, dim, c0, vector);
    } else if (uniform) {
        if (vector) {
            scan_group<T, Reverse, Residual, VECTOR_ROWS<T, Residual>>(x, residual, out, k, seq, dim, c0, true,
                                                                      available);
        } else {
            scan_group<T, Reverse, Residual, SCALAR_ROWS<T, Residual>>(x, residual, out, k, seq, dim, c0, false,
                                                                      available);
        }
    } else {
        mixed_group<T, Reverse, Residual>(x, residual, out, k, seq, dim, c0, available);
    }
}

// ---- learnable variant -------------------------------------------------------------------

// out[t] = sum_u w[u] * x[t-u] (forward) or sum_u w[u] * x[t+u] (backward); one thread per
// element, consecutive threads on consecutive coordinates.
template <typename T, bool Reverse>
__device__ void fir_kernel(const T* x, const float* taps, T* out, const uint32_t* windows, const uint32_t* offsets,
                           int batch, int seq, int dim) {
    const size_t total = (size_t)batch * seq * dim;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const int c = (int)(i % dim);
        const int t = (int)((i / dim) % seq);
        const uint32_t k = windows[c];
        if (k == 0) {
            out[i] = x[i];
            continue;
        }
        const float* w = taps + offsets[c];
        const size_t row0 = i - (size_t)t * dim;  // (b, 0, c)
        float sum = 0.0f;
        for (uint32_t u = 0; u < k; ++u) {
            const int s = Reverse ? t + (int)u : t - (int)u;
            if (s < 0 || s >= seq) break;
            sum += w[u] * to_float(x[row0 + (size_t)s * dim]);
        }
        out[i] = from_float<T>(sum);
    }
}

constexpr int TAP_COORDS = 32;  // coordinates per tap-gradient block (one per lane)
constexpr int TAP_WARPS = 8;    // warps striding over the rows of one tap

// d_taps[offset_c + u] = sum over (b, t >= u) of d_out[b,t,c] * x[b,t-u,c]. Block (group, taps):
// lanes on coordinates, warps striding over rows, then a fixed-order sum over warps.
template <typename T>
__device__ void tap_gradient_kernel(const T* d_out, const T* x, float* d_taps, const uint32_t* windows,
                                    const uint32_t* offsets, int batch, int seq, int dim, uint32_t max_window) {
    __shared__ float partial[TAP_WARPS][TAP_COORDS];
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const int c = blockIdx.x * TAP_COORDS + lane;
    const uint32_t k = c < dim ? windows[c] : 0u;
    // Taps u = blockIdx.y, blockIdx.y + gridDim.y, ...: the grid's y extent is capped.
    for (uint32_t u = blockIdx.y; u < max_window; u += gridDim.y) {
        float sum = 0.0f;
        if (u < k && (int)u < seq) {
            const long long rows = seq - (int)u;
            for (long long row = warp; row < batch * rows; row += TAP_WARPS) {
                const long long b = row / rows, t = u + row % rows;
                const size_t at = ((size_t)b * seq + t) * dim + c;
                sum += to_float(d_out[at]) * to_float(x[at - (size_t)u * dim]);
            }
        }
        partial[warp][lane] = sum;
        __syncthreads();
        if (warp == 0 && u < k) {
            float total = 0.0f;
#pragma unroll
            for (int w = 0; w < TAP_WARPS; ++w) total += partial[w][lane];
            d_taps[offsets[c] + u] = total;
        }
        __syncthreads();
    }
}

}  // namespace

#define WAVELET_KERNELS(T, NAME)                                                                                  \
    extern "C" __global__ void __launch_bounds__(WARPS * WARP, 1) wavelet_window_fwd_##NAME(                     \
        const T* x, T* out, const uint32_t* windows, int seq, int dim, int vector_ok, int available) {           \
        window_kernel<T, false, false>(x, nullptr, out, windows, seq, dim, vector_ok, available);                 \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(WARPS * WARP, 1) wavelet_window_fwd_residual_##NAME(            \
        const T* x, const T* residual, T* out, const uint32_t* windows, int seq, int dim, int vector_ok,         \
        int available) {                                                                                          \
        window_kernel<T, false, true>(x, residual, out, windows, seq, dim, vector_ok, available);                 \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(WARPS * WARP, 1) wavelet_window_bwd_##NAME(                     \
        const T* d_out, T* d_x, const uint32_t* windows, int seq, int dim, int vector_ok, int available) {       \
        window_kernel<T, true, false>(d_out, nullptr, d_x, windows, seq, dim, vector_ok, available);             \
    }                                                                                                             \
    extern "C" __global__ void wavelet_fir_fwd_##NAME(const T* x, const float* taps, T* out,                    \
                                                      const uint32_t* windows, const uint32_t* offsets,          \
                                                      int batch, int seq, int dim) {                             \
        fir_kernel<T, false>(x, taps, out, windows, offsets, batch, seq, dim);                                   \
    }                                                                                                             \
    extern "C" __global__ void wavelet_fir_bwd_##NAME(const T* d_out, const float* taps, T* d_x,                \
                                                      const uint32_t* windows, const uint32_t* offsets,          \
                                                      int batch, int seq, int dim) {                             \
        fir_kernel<T, true>(d_out, taps, d_x, windows, offsets, batch, seq, dim);                                \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(TAP_WARPS * WARP) wavelet_tap_grad_##NAME(                       \
        const T* d_out, const T* x, float* d_taps, const uint32_t* windows, const uint32_t* offsets, int batch,  \
        int seq, int dim, uint32_t max_window) {                                                                  \
        tap_gradient_kernel<T>(d_out, x, d_taps, windows, offsets, batch, seq, dim, max_window);                 \
    }

WAVELET_KERNELS(float, f32)
WAVELET_KERNELS(__nv_bfloat16, bf16)
WAVELET_KERNELS(__half, f16)
