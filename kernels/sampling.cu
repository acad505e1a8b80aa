// Sampling the next token from each row of logits: greedy (temperature 0), or temperature with
// optional top-k and top-p, with one uniform number per row from a counter-based generator
// (SplitMix64 of seed, offset and row), so that the CPU (src/ops/sampling.rs) draws the same
// number and, up to the rounding of f32 sums, the same token.
//
// One block per row. The kept set is a threshold on the logits, found without sorting:
// - top-k: the largest order key K with count(key >= K) >= k (32 passes of a binary search over
//   the u32 keys that order the f32 logits; exact integer counts), so ties at the k-th value are
//   all kept;
// - top-p: the smallest key K with mass(key > K) < top_p * mass(all kept by top-k) (32 more
//   passes), i.e. every token whose strictly more probable tokens hold less than top_p.
// Then the kept mass S is summed, and the token is the first kept index (in index order) whose
// running sum exceeds u * S (a chunked block scan), or the last kept index if rounding leaves
// none. Probabilities are e_i = exp((x_i - max) / temperature) in f32, never normalised; their
// sums are f64, so that over a large vocabulary the running sum is exact enough that the CPU's
// sequential f64 sum picks the same token but for a boundary within rounding of the draw.
// Each pass re-reads the row (L1/L2-resident for one row per block); sampling is a
// once-per-generated-token cost, latency- not bandwidth-bound.
#include "common/nn.cuh"

namespace {

constexpr int THREADS = 512;

__device__ __forceinline__ uint64_t splitmix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Uniform in [0, 1) with 24 random bits; must match sampling_uniform in src/ops/sampling.rs.
__device__ __forceinline__ float row_uniform(uint64_t seed, uint64_t offset, uint64_t row) {
    const uint64_t bits = splitmix64(splitmix64(seed ^ splitmix64(offset)) ^ row) >> 40;
    return (float)bits * (1.0f / 16777216.0f);
}

// Maps f32 to u32 so that unsigned order is float order.
__device__ __forceinline__ uint32_t order_key(float x) {
    const uint32_t bits = __float_as_uint(x);
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__device__ __forceinline__ uint32_t block_sum_u32(uint32_t x, uint32_t* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
    __syncthreads();
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = lane < THREADS / 32 ? scratch[lane] : 0u;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
}

__device__ __forceinline__ uint32_t block_max_u32(uint32_t x, uint32_t* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x = max(x, __shfl_xor_sync(0xffffffffu, x, offset));
    __syncthreads();
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = lane < THREADS / 32 ? scratch[lane] : 0u;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x = max(x, __shfl_xor_sync(0xffffffffu, x, offset));
    return x;
}

__device__ __forceinline__ double block_sum_f64(double x, double* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
    __syncthreads();
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = lane < THREADS / 32 ? scratch[lane] : 0.0;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
}

struct Best {
    float value;
    uint32_t index;
};

// Larger value wins; on equal values the lower index.
__device__ __forceinline__ Best better(Best a, Best b) {
    if (b.value > a.value || (b.value == a.value && b.index < a.index)) return b;
    return a;
}

__device__ __forceinline__ Best block_argmax(Best v, float* values, uint32_t* indices) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        v = better(v, Best{__shfl_xor_sync(0xffffffffu, v.value, offset), __shfl_xor_sync(0xffffffffu, v.index, offset)});
    }
    __syncthreads();
    if (lane == 0) {
        values[warp] = v.value;
        indices[warp] = v.index;
    }
    __syncthreads();
    v = lane < THREADS / 32 ? Best{values[lane], indices[lane]} : Best{__int_as_float(0xff800000), 0xffffffffu};
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        v = better(v, Best{__shfl_xor_sync(0xffffffffu, v.value, offset), __shfl_xor_sync(0xffffffffu, v.index, offset)});
    }
    return v;
}

template <typename T>
__device__ void sample_rows(const T* __restrict__ logits, uint32_t* __restrict__ out, int rows, int vocab,
                            float temperature, int top_k, float top_p, uint64_t seed, uint64_t offset) {
    __shared__ float reduce_f[32];
    __shared__ double reduce_d[32];
    __shared__ uint32_t reduce_u[32];
    __shared__ uint32_t found;
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* x = logits + (int64_t)row * vocab;
        // The max (and, for greedy, the token).
        Best best = {__int_as_float(0xff800000), 0xffffffffu};
        for (int i = threadIdx.x; i < vocab; i += THREADS) best = better(best, Best{tessera::to_float(x[i]), (uint32_t)i});
        best = block_argmax(best, reduce_f, reduce_u);
        if (temperature == 0.0f) {
            if (threadIdx.x == 0) out[row] = best.index < (uint32_t)vocab ? best.index : 0u;
            continue;
        }
        const float max = best.value, inv_t = 1.0f / temperature;
        uint32_t kept = 0;  // the smallest key kept
        if (top_k > 0 && top_k < vocab) {
            uint32_t lo = 0, hi = 0xffffffffu;
            while (lo < hi) {
                const uint32_t mid = lo + (uint32_t)(((uint64_t)hi - lo + 1) / 2);  // no u32 wrap at hi - lo = 2^32 - 1
                uint32_t count = 0;
                for (int i = threadIdx.x; i < vocab; i += THREADS) count += order_key(tessera::to_float(x[i])) >= mid;
                count = block_sum_u32(count, reduce_u);
                if (count >= (uint32_t)top_k) lo = mid; else hi = mid - 1;
            }
            kept = lo;
        }
        if (top_p < 1.0f) {
            double total = 0.0;
            for (int i = threadIdx.x; i < vocab; i += THREADS) {
                const float v = tessera::to_float(x[i]);
                if (order_key(v) >= kept) total += (double)expf((v - max) * inv_t);
            }
            total = block_sum_f64(total, reduce_d);
            const double limit = (double)top_p * total;
            uint32_t lo = kept, hi = 0xffffffffu;
            while (lo < hi) {
                const uint32_t mid = lo + (hi - lo) / 2;
                double above = 0.0;
                for (int i = threadIdx.x; i < vocab; i += THREADS) {
                    const float v = tessera::to_float(x[i]);
                    const uint32_t key = order_key(v);
                    if (key > mid && key >= kept) above += (double)expf((v - max) * inv_t);
                }
                above = block_sum_f64(above, reduce_d);
                if (above < limit) hi = mid; else lo = mid + 1;
            }
            kept = lo;
        }
        // The kept mass, and the last kept index as the fallback.
        double mass = 0.0;
        uint32_t last = 0;
        for (int i = threadIdx.x; i < vocab; i += THREADS) {
            const float v = tessera::to_float(x[i]);
            if (order_key(v) >= kept) {
                mass += (double)expf((v - max) * inv_t);
                last = (uint32_t)i;
            }
        }
        mass = block_sum_f64(mass, reduce_d);
        last = block_max_u32(last, reduce_u);
        const double target = (double)row_uniform(seed, offset, (uint64_t)row) * mass;
        if (threadIdx.x == 0) found = 0xffffffffu;
        double carry = 0.0;
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        for (int start = 0; start < vocab; start += THREADS) {
            const int i = start + threadIdx.x;
            double w = 0.0;
            bool in_set = false;
            if (i < vocab) {
                const float v = tessera::to_float(x[i]);
                in_set = order_key(v) >= kept;
                if (in_set) w = (double)expf((v - max) * inv_t);
            }
            // Inclusive scan over the block: within warps, then over warp totals.
            double scan = w;
#pragma unroll
            for (int offset_lane = 1; offset_lane < 32; offset_lane <<= 1) {
                const double up = __shfl_up_sync(0xffffffffu, scan, offset_lane);
                if (lane >= offset_lane) scan += up;
            }
            __syncthreads();
            if (lane == 31) reduce_d[warp] = scan;
            __syncthreads();
            double before = 0.0, chunk = 0.0;
            for (int k = 0; k < THREADS / 32; ++k) {
                if (k < warp) before += reduce_d[k];
                chunk += reduce_d[k];
            }
            const double running = carry + before + scan;
            if (in_set && running > target) atomicMin(&found, (uint32_t)i);
            __syncthreads();
            if (found != 0xffffffffu) break;
            carry += chunk;
        }
        if (threadIdx.x == 0) out[row] = found != 0xffffffffu ? found : last;
        __syncthreads();
    }
}

}  // namespace

#define SAMPLING_KERNELS(T, NAME)                                                                              \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                     \
        sample_##NAME(const T* logits, uint32_t* out, int rows, int vocab, float temperature, int top_k,       \
                      float top_p, uint64_t seed, uint64_t offset) {                                           \
        sample_rows<T>(logits, out, rows, vocab, temperature, top_k, top_p, seed, offset);                     \
    }

SAMPLING_KERNELS(float, f32)
SAMPLING_KERNELS(__nv_bfloat16, bf16)
SAMPLING_KERNELS(__half, f16)
