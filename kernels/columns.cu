// Copies a block of columns between two row-major matrices with the same number of rows:
// dst[r, dst_start + j] = src[r, src_start + j] for j < width. The model uses it to split a
// fused projection's output into its parts (queries, keys, values) and to join parts into one
// operand (SwiGLU's [gate | up]); its backward is the same copy the other way.
//
// The host picks the widest unit (16, 8, 4, 2 or 1 bytes) that divides every byte offset and row
// length, so that rows whose sizes are multiples of 8 bf16 elements move in 16-byte accesses.
// One thread moves one unit; pure bandwidth: each byte is read once and written once.
#include <stdint.h>

namespace {

template <typename Unit>
__device__ __forceinline__ void copy_units(const Unit* src, Unit* dst, uint64_t rows, uint64_t width,
                                           uint64_t src_stride, uint64_t dst_stride) {
    const uint64_t total = rows * width;
    for (uint64_t i = blockIdx.x * uint64_t(blockDim.x) + threadIdx.x; i < total;
         i += uint64_t(gridDim.x) * blockDim.x) {
        const uint64_t row = i / width;
        const uint64_t column = i - row * width;
        dst[row * dst_stride + column] = src[row * src_stride + column];
    }
}

}  // namespace

// Offsets, strides and width are in units of the kernel's access size, already applied to the
// pointers' column starts by the host.
#define COPY_COLUMNS(NAME, UNIT)                                                                        \
    extern "C" __global__ void __launch_bounds__(256) NAME(const UNIT* src, UNIT* dst, uint64_t rows, \
                                                            uint64_t width, uint64_t src_stride,        \
                                                            uint64_t dst_stride) {                      \
        copy_units<UNIT>(src, dst, rows, width, src_stride, dst_stride);                               \
    }

COPY_COLUMNS(copy_columns_16, uint4)
COPY_COLUMNS(copy_columns_8, uint2)
COPY_COLUMNS(copy_columns_4, uint32_t)
COPY_COLUMNS(copy_columns_2, uint16_t)
COPY_COLUMNS(copy_columns_1, uint8_t)
