// Wavelet mixing (WaveletGPT): causal box-window averages per embedding coordinate, forward and
// backward (its adjoint, the same scan run from the end), plus the learnable-kernel variant.
// Two box-window kernels, chosen by ops::set_wavelet_kernel: segments (described here) and tiles
// (described where they start, further down).
//
// Box window, one pass: the sequence is cut into segments of S = 32 lanes x ROWS rows (256 for
// bf16/f16), and one warp takes one segment of 8 adjacent coordinates (one 16-byte vector of
// bf16/f16, two of f32). A lane loads its ROWS rows and the rows k_i back that leave the window,
// all before any arithmetic; the window sum then advances by the differences (a per-lane serial
// prefix and a warp shuffle scan). The window sum just before the segment comes from registers
// when k_i <= S (it is the sum of the leaving rows of the segment's first k_i positions) and,
// for longer windows, from the sums that earlier segments of the same coordinates publish in a
// scratch buffer. Sums stay at the window's magnitude and run over at most S rows, so long
// sequences lose no precision, and every sum has a fixed order: results are deterministic.
// Memory traffic: each element read once from HBM and written once; the leaving rows are k_i
// back and come from L2 for the windows the level rule produces. Coordinates that pass through
// are copied bit for bit.
//
// Learnable variant (kernel w_i of k_i taps): a direct FIR per output element, and the tap
// gradient as blocks over (32-coordinate group, tap) reducing over all rows in a fixed order.
// Correct and deterministic; not tuned (it is an option of the model, not its default).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

namespace {

// Two warps per block: each takes one segment of its own 8 coordinates; small blocks let the
// blocks that mix and those that only copy spread evenly over the multiprocessors.
constexpr int WARPS = 2;
constexpr int COORDS = 8;  // coordinates per warp
constexpr int WARP = 32;

// Rows per lane in a segment: 16-byte loads of 2-byte types, two per row for f32, with the same
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

// Coordinates that pass through, rows [begin, end): copied raw (bit for bit) without a residual,
// else x + residual rounded once.
template <typename T>
__device__ void copy_rows(const T* x, const T* residual, T* out, int begin, int end, int dim, int c0, bool vector) {
    for (int row = begin + threadIdx.x % WARP; row < end; row += WARP) {
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

// value * 1/div(t), with div(t) = k, or min(k, t+1) for the available-token divisor. The CPU twin
// rounds the same way: a correctly rounded reciprocal, then a multiply.
__device__ __forceinline__ float divide(float value, float inv_k, uint32_t k, int t, bool available) {
    return available && (uint32_t)t + 1u < k ? value * __frcp_rn((float)(t + 1)) : value * inv_k;
}

// Sum over the warp, the same on every lane and in a fixed order (deterministic).
__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
    for (int offset = WARP / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
    return value;
}

__device__ __forceinline__ uint32_t load_acquire(const uint32_t* address) {
    uint32_t value;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(value) : "l"(address) : "memory");
    return value;
}

__device__ __forceinline__ void store_release(uint32_t* address, uint32_t value) {
    asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(address), "r"(value) : "memory");
}

}  // namespace

// What segments publish for the segments after them, and the launch's block counters. Layout
// shared with src/ops/wavelet.rs.
struct WaveletScratch {
    float* sums;         // [sequence][group][segment][8]: each segment's sum of its values
    uint32_t* flags;     // [sequence][group][segment]: equals `epoch` once those sums are written
    uint32_t* counters;  // [0] block tickets, [1] finished blocks; both 0 between launches
    uint32_t epoch;      // this launch's number (never 0)
};

namespace {

// The values a window sees at scan position u (already divided, in the backward), one vector.
template <typename T, bool Reverse>
__device__ __forceinline__ void scan_values(const T* x, const T* residual, int u, int seq, int dim, int c0,
                                            bool vector, float inv_k, uint32_t k, bool available,
                                            float (&v)[COORDS]) {
    const int t = Reverse ? seq - 1 - u : u;
    load_values(x, residual, (size_t)t * dim + c0, c0, dim, vector, v);
    if (Reverse) {
#pragma unroll
        for (int c = 0; c < COORDS; ++c) v[c] = divide(v[c], inv_k, k, t, available);
    }
}

// One segment of S rows of 8 coordinates sharing window k, with 16-byte vectors: load the
// segment's rows and the rows leaving the window, publish the segment's sums if later segments
// need them (k > S), find the window sum just before the segment, then scan.
//
// The window before the segment is sum(v[t0-k .. t0-1]). Its first min(k, S) rows are exactly the
// leaving rows of the segment's first min(k, S) positions, already in registers; when k > S the
// rest, [t0-k+S, t0), is whole earlier segments (their published sums) plus, for k not a
// multiple of S, the tail of one segment read directly. Everything is summed in a fixed order.
template <typename T, bool Reverse, bool Residual>
__device__ void vector_segment(const T* x, const T* residual, T* out, uint32_t k, int seq, int dim, int c0,
                               bool available, int t0, const WaveletScratch& scratch, size_t slot0) {
    constexpr int ROWS = VECTOR_ROWS<T, Residual>;
    constexpr int S = WARP * ROWS;
    const int lane = threadIdx.x % WARP;
    const float inv_k = 1.0f / (float)k;

    float term[ROWS][COORDS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int u = t0 + lane * ROWS + r;
        if (u < seq) {
            scan_values<T, Reverse>(x, residual, u, seq, dim, c0, true, inv_k, k, available, term[r]);
        } else {
#pragma unroll
            for (int c = 0; c < COORDS; ++c) term[r][c] = 0.0f;
        }
    }
    float own[COORDS], before[COORDS];
#pragma unroll
    for (int c = 0; c < COORDS; ++c) own[c] = before[c] = 0.0f;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int u = t0 + lane * ROWS + r;
        const int gone = u - (int)k;
#pragma unroll
        for (int c = 0; c < COORDS; ++c) own[c] += term[r][c];
        // Rows past the sequence's end still have leaving rows inside it, which belong to the
        // window before the segment.
        if (gone >= 0 && gone < seq) {
            float leaving[COORDS];
            scan_values<T, Reverse>(x, residual, gone, seq, dim, c0, true, inv_k, k, available, leaving);
            const bool before_segment = u - t0 < (int)k;
#pragma unroll
            for (int c = 0; c < COORDS; ++c) {
                if (before_segment) before[c] += leaving[c];
                term[r][c] -= leaving[c];
            }
        }
    }
    const int segment = t0 / S;
    if (k > (uint32_t)S) {
#pragma unroll
        for (int c = 0; c < COORDS; ++c) own[c] = warp_sum(own[c]);
        if (lane == 0) {
            float4* sums = reinterpret_cast<float4*>(scratch.sums + (slot0 + segment) * COORDS);
            sums[0] = make_float4(own[0], own[1], own[2], own[3]);
            sums[1] = make_float4(own[4], own[5], own[6], own[7]);
            __threadfence();
            store_release(scratch.flags + slot0 + segment, scratch.epoch);
        }
    }
    float rest[COORDS];
#pragma unroll
    for (int c = 0; c < COORDS; ++c) rest[c] = 0.0f;
    if (k > (uint32_t)S && t0 > 0) {
        const int lo = max(0, t0 - (int)k + S);
        const int edge = min(t0, (lo + S - 1) / S * S);
        for (int u = lo + lane; u < edge; u += WARP) {
            float v[COORDS];
            scan_values<T, Reverse>(x, residual, u, seq, dim, c0, true, inv_k, k, available, v);
#pragma unroll
            for (int c = 0; c < COORDS; ++c) rest[c] += v[c];
        }
        for (int j = edge / S + lane; j < segment; j += WARP) {
            while (load_acquire(scratch.flags + slot0 + j) != scratch.epoch) __nanosleep(64);
            const float4* sums = reinterpret_cast<const float4*>(scratch.sums + (slot0 + j) * COORDS);
            const float4 a = __ldcg(sums), b = __ldcg(sums + 1);
            rest[0] += a.x; rest[1] += a.y; rest[2] += a.z; rest[3] += a.w;
            rest[4] += b.x; rest[5] += b.y; rest[6] += b.z; rest[7] += b.w;
        }
    }
    // Inclusive prefix of the differences over the lane's rows, then across lanes.
#pragma unroll
    for (int r = 1; r < ROWS; ++r)
#pragma unroll
        for (int c = 0; c < COORDS; ++c) term[r][c] += term[r - 1][c];
    float start[COORDS];
#pragma unroll
    for (int c = 0; c < COORDS; ++c) {
        float total = term[ROWS - 1][c];
#pragma unroll
        for (int offset = 1; offset < WARP; offset *= 2) {
            const float up = __shfl_up_sync(0xffffffffu, total, offset);
            if (lane >= offset) total += up;
        }
        start[c] = warp_sum(before[c]) + warp_sum(rest[c]) + (total - term[ROWS - 1][c]);
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int u = t0 + lane * ROWS + r;
        if (u >= seq) continue;
        const int t = Reverse ? seq - 1 - u : u;
        float result[COORDS];
#pragma unroll
        for (int c = 0; c < COORDS; ++c) {
            const float window = start[c] + term[r][c];
            result[c] = Reverse ? window : divide(window, inv_k, k, t, available);
        }
        store8(out + (size_t)t * dim + c0, pack8<T>(result));
    }
}

// The general segment: any mix of windows (pass-through included) and element-by-element loads
// (dims not a multiple of 8, or where the mixed range starts or ends inside a group of 8). Rare,
// so it favours simplicity: the window before the segment is read directly, and the segment is
// scanned in steps of 32 x ROWS rows.
template <typename T, bool Reverse, bool Residual>
__device__ void scalar_segment(const T* x, const T* residual, T* out, const uint32_t (&k)[COORDS], int seq, int dim,
                               int c0, bool available, int t0) {
    constexpr int ROWS = SCALAR_ROWS<T, Residual>;
    constexpr int S = WARP * VECTOR_ROWS<T, Residual>;
    const int lane = threadIdx.x % WARP;
    const int end = min(t0 + S, seq);
    float inv_k[COORDS], carry[COORDS];
#pragma unroll
    for (int c = 0; c < COORDS; ++c) inv_k[c] = 1.0f / (float)max(k[c], 1u);
    // The value at scan position u of coordinate c, divided in the backward.
    auto value = [&](int u, int c) {
        const int t = Reverse ? seq - 1 - u : u;
        const size_t at = (size_t)t * dim + c0 + c;
        float v = to_float(x[at]);
        if (residual != nullptr) v += to_float(residual[at]);
        return Reverse ? divide(v, inv_k[c], k[c], t, available) : v;
    };
#pragma unroll
    for (int c = 0; c < COORDS; ++c) {
        float sum = 0.0f;
        if (k[c] != 0 && c0 + c < dim)
            for (int u = max(0, t0 - (int)k[c]) + lane; u < t0; u += WARP) sum += value(u, c);
        carry[c] = warp_sum(sum);
    }
    for (int step = t0; step < end; step += WARP * ROWS) {
        float term[ROWS][COORDS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const int u = step + lane * ROWS + r;
#pragma unroll
            for (int c = 0; c < COORDS; ++c) {
                const bool mixed = u < end && k[c] != 0 && c0 + c < dim;
                term[r][c] = mixed ? value(u, c) : 0.0f;
                if (mixed && u - (int)k[c] >= 0) term[r][c] -= value(u - (int)k[c], c);
            }
        }
#pragma unroll
        for (int r = 1; r < ROWS; ++r)
#pragma unroll
            for (int c = 0; c < COORDS; ++c) term[r][c] += term[r - 1][c];
        float start[COORDS];
#pragma unroll
        for (int c = 0; c < COORDS; ++c) {
            float total = term[ROWS - 1][c];
#pragma unroll
            for (int offset = 1; offset < WARP; offset *= 2) {
                const float up = __shfl_up_sync(0xffffffffu, total, offset);
                if (lane >= offset) total += up;
            }
            start[c] = carry[c] + total - term[ROWS - 1][c];
            carry[c] += __shfl_sync(0xffffffffu, total, WARP - 1);
        }
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const int u = step + lane * ROWS + r;
            if (u >= end) continue;
            const int t = Reverse ? seq - 1 - u : u;
            const size_t at = (size_t)t * dim + c0;
#pragma unroll
            for (int c = 0; c < COORDS; ++c) {
                if (c0 + c >= dim) continue;
                if (k[c] == 0) {
                    out[at + c] = residual != nullptr ? from_float<T>(to_float(x[at + c]) + to_float(residual[at + c]))
                                                      : x[at + c];
                } else {
                    const float window = start[c] + term[r][c];
                    out[at + c] = from_float<T>(Reverse ? window : divide(window, inv_k[c], k[c], t, available));
                }
            }
        }
    }
}

// Blocks take tickets in the order they start and work on (segment, sequence, tile of 16
// coordinates) in ticket order, segments slowest: a segment that waits for the sums of earlier
// segments of its group waits only for blocks that have already started, and every warp
// publishes before it waits, so the waits always end.
template <typename T, bool Reverse, bool Residual>
__device__ void window_kernel(const T* x, const T* residual, T* out, const uint32_t* windows, int batch, int seq,
                              int dim, int vector_ok, int available, const WaveletScratch& scratch) {
    constexpr int S = WARP * VECTOR_ROWS<T, Residual>;
    __shared__ uint32_t ticket;
    if (threadIdx.x == 0) ticket = atomicAdd(scratch.counters, 1u);
    __syncthreads();
    const int groups = (dim + COORDS - 1) / COORDS;
    const int tiles = (groups + WARPS - 1) / WARPS;
    const int segments = (seq + S - 1) / S;
    const uint32_t per_segment = (uint32_t)batch * (uint32_t)tiles;
    const int segment = (int)(ticket / per_segment);
    const int sequence = (int)(ticket % per_segment) / tiles;
    const int group = (int)(ticket % tiles) * WARPS + threadIdx.x / WARP;
    const int c0 = group * COORDS;
    if (c0 < dim) {
        const size_t base = (size_t)sequence * seq * dim;
        const T* xs = x + base;
        const T* rs = Residual ? residual + base : nullptr;
        T* os = out + base;
        uint32_t k[COORDS];
        bool all_pass = true, uniform = c0 + COORDS <= dim;
#pragma unroll
        for (int c = 0; c < COORDS; ++c) {
            k[c] = c0 + c < dim ? windows[c0 + c] : 0u;
            all_pass = all_pass && k[c] == 0;
            uniform = uniform && k[c] == k[0];
        }
        const bool vector = vector_ok && c0 + COORDS <= dim;
        const int t0 = segment * S;
        if (all_pass) {
            copy_rows(xs, rs, os, t0, min(t0 + S, seq), dim, c0, vector);
        } else if (uniform && vector) {
            const size_t slot0 = ((size_t)sequence * groups + group) * segments;
            vector_segment<T, Reverse, Residual>(xs, rs, os, k[0], seq, dim, c0, available, t0, scratch, slot0);
        } else {
            scalar_segment<T, Reverse, Residual>(xs, rs, os, k, seq, dim, c0, available, t0);
        }
    }
    // The last block to finish puts the counters back to 0 for the next launch.
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        if (atomicAdd(scratch.counters + 1, 1u) == gridDim.x - 1) {
            scratch.counters[0] = 0;
            scratch.counters[1] = 0;
            __threadfence();
        }
    }
}

// ---- box window, tiles staged through shared memory ----------------------------------------
//
// One block walks one sequence for one strip of 64 coordinates (128-byte rows for bf16/f16,
// 256-byte rows for f32), from the first token to the last (the backward from the last to the
// first): no block waits for another. The walk goes in chunks of 8 KiB (64 rows of bf16, 32 of
// f32, half that with the residual, whose rows are staged beside x's). Chunks are copied into a
// ring of RING buffers with cp.async, DEPTH chunks ahead of the one being scanned (48 KiB in
// flight per block); the ring keeps the RING_BACK chunks before the current one, so a window of
// k <= RING_BACK chunk rows finds its leaving rows in shared memory. Longer windows re-read their
// leaving elements from global memory (recently read, so mostly from L2), each thread loading its
// own two chunks ahead into registers.
//
// Scan of a chunk: warp w takes rows [w·RPP, (w+1)·RPP) and lane q the coordinates 2q, 2q+1, so a
// warp reads and writes whole rows. Each thread forms the differences (value entering minus value
// leaving) of its rows and their prefix; the eight warps' totals are combined through shared
// memory in warp order, on top of the window sum carried from the previous chunk. Every sum has a
// fixed order (deterministic), and the carry is the window sum itself, never a running prefix of
// the whole sequence, so its magnitude stays that of the window.
//
// Strips whose coordinates all pass through are copied through the same pipeline; pass-through
// coordinates keep their bits (with the residual: x + residual rounded once).

constexpr int TILE_COORDS = 64;                   // coordinates per strip
constexpr int TILE_THREADS = 256;
constexpr int TILE_PARTS = TILE_THREADS / WARP;   // warps, each a run of rows of the chunk
constexpr int STAGE_BYTES = 8192;                 // one chunk (x and residual rows)
constexpr int DEPTH = 6;                          // chunks in flight
constexpr int RING_BACK = 6;                      // chunks kept behind the current one
constexpr int RING = RING_BACK + 1 + DEPTH;       // chunk buffers
constexpr int TOTALS_BYTES = TILE_PARTS * TILE_COORDS * 4;
// Dynamic shared memory of a tile block; src/ops/wavelet.rs passes the same number.
constexpr int TILE_SHARED_BYTES = RING * STAGE_BYTES + TOTALS_BYTES;
static_assert(TILE_SHARED_BYTES == 108544, "tile shared memory size shared with src/ops/wavelet.rs");

template <typename T, bool Residual>
struct TileShape {
    static constexpr int ROW_BYTES = TILE_COORDS * (int)sizeof(T);
    static constexpr int TILES = Residual ? 2 : 1;  // x, then the residual
    static constexpr int ROWS = STAGE_BYTES / (ROW_BYTES * TILES);
    static constexpr int RPP = ROWS / TILE_PARTS;  // rows per warp
    static constexpr int PIECES = ROW_BYTES / 16;  // 16-byte pieces per row
    static constexpr int RING_ROWS = RING_BACK * ROWS;  // longest window served by the ring
    static constexpr int VECTOR_LOADS = TILES * ROWS * PIECES / TILE_THREADS;
    static constexpr int ELEMENT_LOADS = TILES * ROWS * TILE_COORDS / TILE_THREADS;
    static_assert(RPP >= 1 && ROWS % TILE_PARTS == 0, "rows split evenly over the warps");
    static_assert(VECTOR_LOADS * TILE_THREADS == TILES * ROWS * PIECES, "pieces split evenly");
    static_assert(ELEMENT_LOADS * TILE_THREADS == TILES * ROWS * TILE_COORDS, "elements split evenly");
};

// Raw bits of one element, and of the two adjacent elements a lane handles.
template <typename T>
using Bits = typename std::conditional<sizeof(T) == 4, uint32_t, unsigned short>::type;
template <typename T>
using PairBits = typename std::conditional<sizeof(T) == 4, uint2, uint32_t>::type;

__device__ __forceinline__ uint32_t half_of(uint32_t pair, int h) { return h == 0 ? pair & 0xffffu : pair >> 16; }
__device__ __forceinline__ uint32_t half_of(uint2 pair, int h) { return h == 0 ? pair.x : pair.y; }

template <typename T> __device__ __forceinline__ float bits_value(uint32_t bits);
template <> __device__ __forceinline__ float bits_value<float>(uint32_t bits) { return __uint_as_float(bits); }
template <> __device__ __forceinline__ float bits_value<__nv_bfloat16>(uint32_t bits) { return __uint_as_float(bits << 16); }
template <> __device__ __forceinline__ float bits_value<__half>(uint32_t bits) { return half_bits_to_float(bits); }

template <typename T> __device__ __forceinline__ uint32_t value_bits(float v);
template <> __device__ __forceinline__ uint32_t value_bits<float>(float v) { return __float_as_uint(v); }
template <> __device__ __forceinline__ uint32_t value_bits<__nv_bfloat16>(float v) { return float_to_bf16_bits(v); }
template <> __device__ __forceinline__ uint32_t value_bits<__half>(float v) { return float_to_half_bits(v); }

__device__ __forceinline__ void make_pair(uint32_t& pair, uint32_t a, uint32_t b) { pair = a | (b << 16); }
__device__ __forceinline__ void make_pair(uint2& pair, uint32_t a, uint32_t b) { pair = make_uint2(a, b); }

__device__ __forceinline__ uint32_t shared_address(const void* p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

// 16 bytes from global to shared memory, asynchronously; with `valid` false it writes zeros and
// reads nothing (`source` must still be a mapped address).
__device__ __forceinline__ void copy_async16(void* destination, const void* source, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(destination)), "l"(source),
                 "r"(valid ? 16 : 0)
                 : "memory");
}

__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void copy_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void store_pair(uint32_t* p, uint32_t v) { __stcs(reinterpret_cast<unsigned int*>(p), v); }
__device__ __forceinline__ void store_pair(uint2* p, uint2 v) { __stcs(p, v); }

template <typename T, bool Reverse, bool Residual>
__device__ void tile_walk(const T* x, const T* residual, T* out, const uint32_t* windows, int seq, int dim, int c0,
                          bool vector, bool available, unsigned char* shared) {
    using S = TileShape<T, Residual>;
    using Pair = PairBits<T>;
    constexpr int ROWS = S::ROWS, RPP = S::RPP, TILES = S::TILES, ROW_BYTES = S::ROW_BYTES;
    const int lane = threadIdx.x % WARP, part = threadIdx.x / WARP;
    const int chunks = (seq + ROWS - 1) / ROWS;
    // The tensor staged as tile `tile`: x, then the residual.
    auto source = [&](int tile) { return Residual && tile != 0 ? residual : x; };
    float* totals = reinterpret_cast<float*>(shared + RING * STAGE_BYTES);

    // This lane's two coordinates (strip-relative 2·lane and 2·lane + 1); 0 also past `dim`.
    const int ca = 2 * lane;
    uint32_t k[2];
    float inv_k[2];
    bool far[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        k[h] = c0 + ca + h < dim ? windows[c0 + ca + h] : 0u;
        inv_k[h] = 1.0f / (float)max(k[h], 1u);
        far[h] = k[h] > (uint32_t)S::RING_ROWS;
    }
    const bool same = k[0] == k[1];
    const bool mixed = __syncthreads_or(k[0] != 0 || k[1] != 0);

    // Copies chunk n (scan positions n·ROWS ...) into its ring buffer: cp.async pieces, or element
    // by element where rows are not 16-byte aligned. Rows past the sequence and coordinates past
    // `dim` are zeros. Always commits a group, so that every thread counts the same groups.
    auto issue = [&](int n) {
        if (n < chunks) {
            unsigned char* buffer = shared + (n % RING) * STAGE_BYTES;
            if (vector) {
#pragma unroll
                for (int i = 0; i < S::VECTOR_LOADS; ++i) {
                    const int e = threadIdx.x + i * TILE_THREADS;
                    const int tile = e / (ROWS * S::PIECES), row = e / S::PIECES % ROWS, piece = e % S::PIECES;
                    const int u = n * ROWS + row, c = piece * (16 / (int)sizeof(T));
                    const bool valid = u < seq && c0 + c < dim;
                    const int t = Reverse ? seq - 1 - u : u;
                    const T* from = valid ? source(tile) + (size_t)t * dim + c0 + c : source(tile);
                    copy_async16(buffer + (tile * ROWS + row) * ROW_BYTES + piece * 16, from, valid);
                }
            } else {
                // Four loads in flight at a time: the element path is the rare case.
                constexpr int BATCH = 4;
                static_assert(S::ELEMENT_LOADS % BATCH == 0, "element loads in batches");
#pragma unroll 1
                for (int i0 = 0; i0 < S::ELEMENT_LOADS; i0 += BATCH) {
                    Bits<T> v[BATCH];
#pragma unroll
                    for (int i = 0; i < BATCH; ++i) {
                        const int e = threadIdx.x + (i0 + i) * TILE_THREADS;
                        const int tile = e / (ROWS * TILE_COORDS), row = e / TILE_COORDS % ROWS, c = e % TILE_COORDS;
                        const int u = n * ROWS + row;
                        const int t = Reverse ? seq - 1 - u : u;
                        const Bits<T>* from = reinterpret_cast<const Bits<T>*>(source(tile));
                        v[i] = u < seq && c0 + c < dim ? from[(size_t)t * dim + c0 + c] : Bits<T>(0);
                    }
#pragma unroll
                    for (int i = 0; i < BATCH; ++i) {
                        const int e = threadIdx.x + (i0 + i) * TILE_THREADS;
                        const int tile = e / (ROWS * TILE_COORDS), row = e / TILE_COORDS % ROWS, c = e % TILE_COORDS;
                        reinterpret_cast<Bits<T>*>(buffer + (tile * ROWS + row) * ROW_BYTES)[c] = v[i];
                    }
                }
            }
        }
        copy_async_commit();
    };

    // The leaving elements of this thread's rows of chunk n for its far coordinates, from global
    // memory into registers (raw bits; 0 where none is needed).
    auto fetch_far = [&](int n, uint32_t (&leaving)[RPP][TILES][2]) {
#pragma unroll
        for (int r = 0; r < RPP; ++r) {
            const int u = n * ROWS + part * RPP + r;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int g = u - (int)k[h];
                const bool need = far[h] && u < seq && g >= 0;
                const int tg = Reverse ? seq - 1 - g : g;
#pragma unroll
                for (int tile = 0; tile < TILES; ++tile) {
                    const Bits<T>* from = reinterpret_cast<const Bits<T>*>(source(tile));
                    leaving[r][tile][h] = need ? (uint32_t)from[(size_t)tg * dim + c0 + ca + h] : 0u;
                }
            }
        }
    };

    // The term a value contributes at token t: itself in the forward, divided by div(t) in the
    // backward (the adjoint divides before summing).
    auto term = [&](float v, int h, int t) {
        return Reverse ? divide(v, inv_k[h], k[h], t, available) : v;
    };

    // The value (x, plus the residual) of element (row, coordinate 2·lane + h) of a ring buffer.
    auto ring_value = [&](const unsigned char* buffer, int row, int h) {
        const Bits<T>* elements = reinterpret_cast<const Bits<T>*>(buffer + row * ROW_BYTES);
        float v = bits_value<T>(elements[ca + h]);
        if (Residual) v += bits_value<T>(reinterpret_cast<const Bits<T>*>(buffer + (ROWS + row) * ROW_BYTES)[ca + h]);
        return v;
    };
    // Both of this lane's values (x, plus the residual) of a row of a ring buffer, in one read each.
    auto ring_pair = [&](const unsigned char* buffer, int row, float (&v)[2]) {
        const Pair raw = *reinterpret_cast<const Pair*>(buffer + row * ROW_BYTES + lane * (int)sizeof(Pair));
        v[0] = bits_value<T>(half_of(raw, 0));
        v[1] = bits_value<T>(half_of(raw, 1));
        if (Residual) {
            const Pair res =
                *reinterpret_cast<const Pair*>(buffer + (ROWS + row) * ROW_BYTES + lane * (int)sizeof(Pair));
            v[0] += bits_value<T>(half_of(res, 0));
            v[1] += bits_value<T>(half_of(res, 1));
        }
    };

    float carry[2] = {0.0f, 0.0f};  // window sums at the end of the previous chunk

    auto step = [&](int n, uint32_t (&leaving)[RPP][TILES][2]) {
        issue(n + DEPTH);
        copy_async_wait<DEPTH>();
        __syncthreads();
        const unsigned char* buffer = shared + (n % RING) * STAGE_BYTES;
        // Ring buffers holding the chunk of the leaving row for each coordinate: the leaving row
        // of row `row` is row - (k mod ROWS) of chunk n - k/ROWS, or of the chunk before that.
        int now[2], before[2], shift[2];  // byte offsets of ring buffers, rows
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int back = (int)(min(k[h], (uint32_t)S::RING_ROWS) / ROWS);
            shift[h] = (int)(min(k[h], (uint32_t)S::RING_ROWS) % ROWS);
            now[h] = ((n - back + RING) % RING) * STAGE_BYTES;
            before[h] = ((n - back - 1 + 2 * RING) % RING) * STAGE_BYTES;
        }
        float diff[RPP][2];
#pragma unroll
        for (int r = 0; r < RPP; ++r) {
            const int row = part * RPP + r;
            const int u = n * ROWS + row;
            const int t = Reverse ? seq - 1 - u : u;
            diff[r][0] = diff[r][1] = 0.0f;
            if (!mixed) continue;
            float v[2];
            ring_pair(buffer, row, v);
            float gone[2] = {0.0f, 0.0f};
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int g = u - (int)k[h];
                if (k[h] == 0 || u >= seq || g < 0 || (h == 1 && same && !far[1])) continue;
                const int tg = Reverse ? seq - 1 - g : g;
                if (far[h]) {
                    float value = bits_value<T>(leaving[r][0][h]);
                    if (Residual) value += bits_value<T>(leaving[r][TILES - 1][h]);
                    gone[h] = term(value, h, tg);
                } else {
                    const unsigned char* held = shared + (row >= shift[h] ? now[h] : before[h]);
                    const int row_g = row >= shift[h] ? row - shift[h] : row - shift[h] + ROWS;
                    if (h == 0 && same) {
                        // Both coordinates share the window: one read of the pair.
                        float pair[2];
                        ring_pair(held, row_g, pair);
                        gone[0] = term(pair[0], 0, tg);
                        gone[1] = term(pair[1], 1, tg);
                    } else {
                        gone[h] = term(ring_value(held, row_g, h), h, tg);
                    }
                }
            }
#pragma unroll
            for (int h = 0; h < 2; ++h)
                diff[r][h] = k[h] != 0 && u < seq ? term(v[h], h, t) - gone[h] : 0.0f;
        }
        fetch_far(n + 2, leaving);
        float offset[2] = {0.0f, 0.0f};
        if (mixed) {
#pragma unroll
            for (int r = 1; r < RPP; ++r)
#pragma unroll
                for (int h = 0; h < 2; ++h) diff[r][h] += diff[r - 1][h];
            reinterpret_cast<float2*>(totals)[part * (TILE_COORDS / 2) + lane] =
                make_float2(diff[RPP - 1][0], diff[RPP - 1][1]);
            __syncthreads();
            // The window sum before this warp's rows: the carry plus the earlier warps' totals,
            // added in warp order; the new carry continues the same sum over all warps.
#pragma unroll
            for (int p = 0; p < TILE_PARTS; ++p) {
                if (p == part) {
                    offset[0] = carry[0];
                    offset[1] = carry[1];
                }
                const float2 total = reinterpret_cast<const float2*>(totals)[p * (TILE_COORDS / 2) + lane];
                carry[0] += total.x;
                carry[1] += total.y;
            }
        }
#pragma unroll
        for (int r = 0; r < RPP; ++r) {
            const int row = part * RPP + r;
            const int u = n * ROWS + row;
            if (u >= seq) continue;
            const int t = Reverse ? seq - 1 - u : u;
            // Pass-through coordinates: x's bits, or x + residual rounded once.
            Pair pass = *reinterpret_cast<const Pair*>(buffer + row * ROW_BYTES + lane * (int)sizeof(Pair));
            if (Residual && (k[0] == 0 || k[1] == 0)) {
                float v[2];
                ring_pair(buffer, row, v);
                make_pair(pass, value_bits<T>(v[0]), value_bits<T>(v[1]));
            }
            uint32_t bits[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const float window = offset[h] + diff[r][h];
                bits[h] = k[h] == 0 ? half_of(pass, h)
                                    : value_bits<T>(Reverse ? window : divide(window, inv_k[h], k[h], t, available));
            }
            T* to = out + (size_t)t * dim + c0 + ca;
            if (vector) {
                if (c0 + ca < dim) {
                    Pair result;
                    make_pair(result, bits[0], bits[1]);
                    store_pair(reinterpret_cast<Pair*>(to), result);
                }
            } else {
#pragma unroll
                for (int h = 0; h < 2; ++h)
                    if (c0 + ca + h < dim) reinterpret_cast<Bits<T>*>(to)[h] = (Bits<T>)bits[h];
            }
        }
    };

    uint32_t leaving_even[RPP][TILES][2], leaving_odd[RPP][TILES][2];
    fetch_far(0, leaving_even);
    fetch_far(1, leaving_odd);
#pragma unroll 1
    for (int n = 0; n < DEPTH; ++n) issue(n);
    // Two chunks per turn, so that each register set of far leaving elements has a fixed name.
#pragma unroll 1
    for (int n = 0; n < chunks; n += 2) {
        step(n, leaving_even);
        if (n + 1 < chunks) step(n + 1, leaving_odd);
    }
}

template <typename T, bool Reverse, bool Residual>
__device__ void tile_kernel(const T* x, const T* residual, T* out, const uint32_t* windows, int seq, int dim,
                            int vector, int available) {
    extern __shared__ uint4 tile_shared[];
    const unsigned strips = (unsigned)(dim + TILE_COORDS - 1) / TILE_COORDS;
    const unsigned sequence = blockIdx.x / strips;
    const int c0 = (int)(blockIdx.x % strips) * TILE_COORDS;
    const size_t base = (size_t)sequence * seq * dim;
    tile_walk<T, Reverse, Residual>(x + base, Residual ? residual + base : nullptr, out + base, windows, seq, dim, c0,
                                    vector != 0, available != 0, reinterpret_cast<unsigned char*>(tile_shared));
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
    extern "C" __global__ void __launch_bounds__(WARPS * WARP) wavelet_window_fwd_##NAME(                        \
        const T* x, T* out, const uint32_t* windows, int batch, int seq, int dim, int vector_ok, int available,  \
        WaveletScratch scratch) {                                                                                 \
        window_kernel<T, false, false>(x, nullptr, out, windows, batch, seq, dim, vector_ok, available, scratch); \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(WARPS * WARP) wavelet_window_fwd_residual_##NAME(               \
        const T* x, const T* residual, T* out, const uint32_t* windows, int batch, int seq, int dim,             \
        int vector_ok, int available, WaveletScratch scratch) {                                                   \
        window_kernel<T, false, true>(x, residual, out, windows, batch, seq, dim, vector_ok, available, scratch); \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(WARPS * WARP) wavelet_window_bwd_##NAME(                        \
        const T* d_out, T* d_x, const uint32_t* windows, int batch, int seq, int dim, int vector_ok,             \
        int available, WaveletScratch scratch) {                                                                  \
        window_kernel<T, true, false>(d_out, nullptr, d_x, windows, batch, seq, dim, vector_ok, available,       \
                                      scratch);                                                                   \
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

#define WAVELET_TILE_KERNELS(T, NAME)                                                                             \
    extern "C" __global__ void __launch_bounds__(TILE_THREADS, 2) wavelet_tiles_fwd_##NAME(                       \
        const T* x, T* out, const uint32_t* windows, int seq, int dim, int vector_ok, int available) {           \
        tile_kernel<T, false, false>(x, nullptr, out, windows, seq, dim, vector_ok, available);                   \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(TILE_THREADS, 2) wavelet_tiles_fwd_residual_##NAME(              \
        const T* x, const T* residual, T* out, const uint32_t* windows, int seq, int dim, int vector_ok,          \
        int available) {                                                                                          \
        tile_kernel<T, false, true>(x, residual, out, windows, seq, dim, vector_ok, available);                   \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(TILE_THREADS, 2) wavelet_tiles_bwd_##NAME(                       \
        const T* d_out, T* d_x, const uint32_t* windows, int seq, int dim, int vector_ok, int available) {       \
        tile_kernel<T, true, false>(d_out, nullptr, d_x, windows, seq, dim, vector_ok, available);                \
    }

WAVELET_TILE_KERNELS(float, f32)
WAVELET_TILE_KERNELS(__nv_bfloat16, bf16)
WAVELET_TILE_KERNELS(__half, f16)

WAVELET_KERNELS(float, f32)
WAVELET_KERNELS(__nv_bfloat16, bf16)
WAVELET_KERNELS(__half, f16)
