// Transposes a row-major (rows, cols) matrix of 16-bit elements (bf16 or f16: the bits move
// unchanged) into dst (cols, rows). The model's 2:4 layers use it to build both compressed copies
// of a weight (W_s along the input dimension, W_dpᵀ along the output dimension) from its one
// compute copy, which is stored in one of the two orientations.
//
// One block moves a 32x32 tile through shared memory, so that both the reads of a source row
// and the writes of a destination row are coalesced; the tile's rows are padded by one element
// against bank conflicts on the transposed read. Threads outside the matrix load and store
// nothing (the grid covers partial tiles at the edges).
#include <stdint.h>

namespace {

constexpr int TILE = 32;
constexpr int ROWS_PER_PASS = 8;

}  // namespace

extern "C" __global__ void __launch_bounds__(TILE * ROWS_PER_PASS)
    transpose16(const uint16_t* __restrict__ src, uint16_t* __restrict__ dst, int64_t rows, int64_t cols) {
    __shared__ uint16_t tile[TILE][TILE + 1];
    const int64_t col0 = (int64_t)blockIdx.x * TILE;
    const int64_t row0 = (int64_t)blockIdx.y * TILE;
    for (int r = threadIdx.y; r < TILE; r += ROWS_PER_PASS) {
        const int64_t row = row0 + r;
        const int64_t col = col0 + threadIdx.x;
        if (row < rows && col < cols) tile[r][threadIdx.x] = src[row * cols + col];
    }
    __syncthreads();
    // dst row j is source column col0 + j; its element i is source row row0 + i.
    for (int r = threadIdx.y; r < TILE; r += ROWS_PER_PASS) {
        const int64_t out_row = col0 + r;
        const int64_t out_col = row0 + threadIdx.x;
        if (out_row < cols && out_col < rows) dst[out_row * rows + out_col] = tile[threadIdx.x][r];
    }
}
