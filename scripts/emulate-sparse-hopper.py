#!/usr/bin/env python3
"""Emulates the index arithmetic of kernels/sparse_nm_hopper.cu (the sm_90a 2:4 sparse GEMM) on the
host and compares y with a direct product, on shapes that stress it: partial row CTAs (rows past n
in one slice or both), partial token tiles, one k-block and more k-blocks than pipeline stages,
bias and none, plain and accumulating epilogues.

Each piece is modelled from its own description, not from the kernel's code:
- the compressed format from src/ops/sparse.rs's documentation (stored order and metadata words);
- TMA: 2-d boxes with zero fill past the edges, x written with the 128-byte swizzle (16-byte chunk
  c of a 128-byte row r stored at chunk c ^ (r % 8), tiles 1024-byte aligned);
- wgmma.mma_async.sp.m64n128k32 from the PTX ISA: warp w of the warpgroup supplies rows
  16w..16w+15; register i of lane 4g + c holds the kept pair of row g + 8·(i % 2), 4-column chunk
  c + 4·(i // 2) of the k32 step; with selector `sel` the metadata of lane 4g + 2·sel + h covers
  chunks 4h..4h+3 of rows g (bits 0..15) and g + 8 (bits 16..31), 4 bits per chunk, idx0 in the
  low pair; an index pair with idx0 == idx1 is invalid; B through a K-major 128-byte-swizzled
  descriptor (start address, rows 128 bytes apart within groups of 8, groups 1024 bytes apart);
  D register 4i + j of lane 4g + c is row 16w + g + 8·(j // 2), column 8i + 2c + j % 2;
- the pipeline: the producer overwrites a stage as soon as both consumers have released it, and a
  wgmma reads its shared-memory operand B as late as it may (when the wait that completes its
  group returns), so a stage released too early shows up as a wrong result.

Values are small integers, so every sum is exact whatever the order.

    python3 scripts/emulate-sparse-hopper.py
"""
import random

import numpy as np

ROWS, TOKENS, STAGES, OUT_STRIDE = 256, 128, 4, 132
PLACEHOLDER_META = 0x44444444


# ---- the format (src/ops/sparse.rs) ---------------------------------------------------------


def stored_index(group, slot):
    c = 2 * group + slot
    block, u = c // 32, c % 32
    step, half, lane, e = u // 16, u % 16 // 8, u % 8 // 2, u % 2
    return block * 32 + lane * 8 + step * 4 + half * 2 + e


def meta_location(row, group, cols):
    col = 4 * group
    block, within = col // 64, col % 64
    step, half, j = within // 32, within % 32 // 16, within % 16 // 4
    lane = 4 * (row % 8) + 2 * step + half
    tile = row // 16 * (cols // 64) + block
    shift = (16 if row % 16 >= 8 else 0) + 4 * j
    return tile * 32 + lane, shift


def compress(w):
    n, k = w.shape
    values = np.zeros((n, k // 2), dtype=np.int64)
    meta = np.zeros(n // 16 * (k // 64) * 32, dtype=np.int64)
    for row in range(n):
        for group in range(k // 4):
            kept = [i for i in range(4) if w[row, 4 * group + i] != 0]
            assert len(kept) == 2
            values[row, stored_index(group, 0)] = w[row, 4 * group + kept[0]]
            values[row, stored_index(group, 1)] = w[row, 4 * group + kept[1]]
            word, shift = meta_location(row, group, k)
            meta[word] |= (kept[0] | kept[1] << 2) << shift
    return values, meta


# ---- TMA boxes ------------------------------------------------------------------------------


def x_slot(token, kk):
    """Element slot of (token row, column kk) in a 128-row, 128-byte-row tile with the swizzle."""
    linear = token * 128 + 2 * kk
    chunk = (linear >> 4) & 7
    physical = (linear & ~0x70) | ((chunk ^ ((linear >> 7) & 7)) << 4)
    return physical // 2


def load_stage(stage, b, row0, token0, x, values, meta, n, k):
    m = x.shape[0]
    blocks = k // 64
    stage["x"] = np.zeros(TOKENS * 64, dtype=np.int64)
    for j in range(TOKENS):
        for kk in range(64):
            token = token0 + j
            stage["x"][x_slot(j, kk)] = x[token, 64 * b + kk] if token < m else 0
    stage["values"] = np.zeros(ROWS * 32, dtype=np.int64)
    for r in range(ROWS):
        if row0 + r < n:
            stage["values"][r * 32 : r * 32 + 32] = values[row0 + r, 32 * b : 32 * b + 32]
    stage["meta"] = np.zeros(ROWS // 16 * 32, dtype=np.int64)
    for i in range(ROWS // 16):
        tile = row0 // 16 + i
        if tile < n // 16:
            at = (tile * blocks + b) * 32
            stage["meta"][i * 32 : i * 32 + 32] = meta[at : at + 32]
    stage["block"] = b


# ---- the kernel's consumer side ---------------------------------------------------------------


def registers(stage, slice_row, live):
    """The kernel's A registers (per lane: [step][4] pairs) and metadata word of one warp."""
    regs, words = [], []
    for lane in range(32):
        g, c = lane // 4, lane % 4
        unit = lambda r, u: (stage["values"][r * 64 // 2 + 2 * u], stage["values"][r * 64 // 2 + 2 * u + 1])
        lo = [unit(slice_row + g, 4 * c + q) for q in range(4)]
        hi = [unit(slice_row + g + 8, 4 * c + q) for q in range(4)]
        regs.append([[lo[0], hi[0], lo[1], hi[1]], [lo[2], hi[2], lo[3], hi[3]]])
        word = int(stage["meta"][slice_row // 16 * 32 + lane])
        words.append(word if live else PLACEHOLDER_META)
    return regs, words


def wgmma_sp(acc, warps, sel, stage, step_offset):
    """m64n128k32 per the ISA: warps[w] = (registers of step `sel`, metadata words); B read now."""
    a = np.zeros((64, 32), dtype=np.int64)
    for w, (regs, words) in enumerate(warps):
        for rr in range(16):
            g, upper = rr % 8, rr // 8
            for q in range(8):
                c, i = q % 4, 2 * (q // 4) + upper
                v0, v1 = regs[4 * g + c][i]
                word = words[4 * g + 2 * sel + q // 4]
                nibble = (word >> (16 * upper + 4 * (q % 4))) & 0xF
                idx0, idx1 = nibble & 3, nibble >> 2
                assert idx0 != idx1, f"invalid metadata {nibble:#06b} for row {16 * w + rr}"
                a[16 * w + rr, 4 * q + idx0] += v0
                a[16 * w + rr, 4 * q + idx1] += v1
    bmat = np.zeros((32, 128), dtype=np.int64)
    for j in range(128):
        for kk in range(32):
            # Descriptor: start + (j // 8) · 1024 + (j % 8) · 128 + 2·kk, swizzled by address bits.
            linear = step_offset + (j // 8) * 1024 + (j % 8) * 128 + 2 * kk
            chunk = (linear >> 4) & 7
            physical = (linear & ~0x70) | ((chunk ^ ((linear >> 7) & 7)) << 4)
            bmat[kk, j] = stage["x"][physical // 2]
    d = a @ bmat
    for w in range(4):
        for lane in range(32):
            g, c = lane // 4, lane % 4
            for i in range(16):
                for j in range(4):
                    acc[w][lane][4 * i + j] += d[16 * w + g + 8 * (j // 2), 8 * i + 2 * c + j % 2]


def run_cta(bx, by, x, values, meta, bias, y, n, k, accumulate):
    m = x.shape[0]
    row0, token0, blocks = bx * ROWS, by * TOKENS, k // 64
    ring = [dict() for _ in range(STAGES)]
    released = [[False, False] for _ in range(blocks)]
    issued = 0

    def produce():
        nonlocal issued
        # The producer waits for the release of the block that last used the stage.
        while issued < blocks and (issued < STAGES or all(released[issued - STAGES])):
            load_stage(ring[issued % STAGES], issued, row0, token0, x, values, meta, n, k)
            issued += 1

    # Accumulators per consumer: [slice][warp][lane][register].
    accs = [[[[[0] * 64 for _ in range(32)] for _ in range(4)] for _ in range(2)] for _ in range(2)]
    slice_rows = [[cw * 128 + sl * 64 for sl in range(2)] for cw in range(2)]
    pending = [[], []]  # per consumer: groups issued and not complete: (block, stage snapshot, warps)

    def complete(cw, group):
        b, warps_by_slice = group
        stage = ring[b % STAGES]
        assert stage["block"] == b, f"stage of block {b} overwritten by block {stage['block']} while read"
        for sl in range(2):
            for step in range(2):
                warps = [([lane[step] for lane in regs], words) for regs, words in warps_by_slice[sl]]
                wgmma_sp(accs[cw][sl], warps, step, stage, 64 * step)

    produce()
    for b in range(blocks):
        for cw in range(2):
            stage = ring[b % STAGES]
            assert issued > b and stage["block"] == b
            warps_by_slice = []
            for sl in range(2):
                warps = []
                for w in range(4):
                    slice_row = slice_rows[cw][sl] + 16 * w
                    warps.append(registers(stage, slice_row, row0 + slice_row < n))
                warps_by_slice.append(warps)
            pending[cw].append((b, warps_by_slice))
            # wait_group 1 after issuing block b (wait_group 0 after the last): the older group
            # completes, reading its B now, and its stage is released.
            keep = 0 if b == blocks - 1 else 1
            while len(pending[cw]) > keep:
                group = pending[cw].pop(0)
                complete(cw, group)
                released[group[0]][cw] = True
                produce()

    # Epilogue: f32 tile per consumer, transposed, then 16-byte chunks to y.
    for cw in range(2):
        tile = np.zeros(TOKENS * OUT_STRIDE)
        for sl in range(2):
            for w in range(4):
                slice_row = slice_rows[cw][sl] + 16 * w
                live = row0 + slice_row < n
                for lane in range(32):
                    g, c = lane // 4, lane % 4
                    bb = [0, 0]
                    if bias is not None and live:
                        bb = [bias[row0 + slice_row + g], bias[row0 + slice_row + g + 8]]
                    for i in range(16):
                        for j in range(4):
                            feature = sl * 64 + w * 16 + g + 8 * (j // 2)
                            token = 8 * i + 2 * c + j % 2
                            tile[token * OUT_STRIDE + feature] = accs[cw][sl][w][lane][4 * i + j] + bb[j // 2]
        feature0 = row0 + cw * 128
        for t in range(128):
            for it in range(TOKENS * 16 // 128):
                q = it * 128 + t
                token, chunk = q // 16, q % 16
                gt, feature = token0 + token, feature0 + chunk * 8
                if gt >= m or feature >= n:
                    continue
                v = tile[token * OUT_STRIDE + chunk * 8 : token * OUT_STRIDE + chunk * 8 + 8]
                if accumulate:
                    v = v + y[gt, feature : feature + 8]
                y[gt, feature : feature + 8] = v


def check(m, n, k, with_bias, accumulate, rng):
    w = np.zeros((n, k), dtype=np.int64)
    for row in range(n):
        for group in range(k // 4):
            for i in rng.sample(range(4), 2):
                w[row, 4 * group + i] = rng.choice([-3, -2, -1, 1, 2, 3])
    x = np.array([[rng.randint(-3, 3) for _ in range(k)] for _ in range(m)], dtype=np.int64)
    bias = np.array([rng.randint(-9, 9) for _ in range(n)], dtype=np.float64) if with_bias else None
    values, meta = compress(w)
    expected = (x @ w.T).astype(np.float64)
    if with_bias:
        expected += bias
    if accumulate:
        y0 = np.array([[rng.randint(-9, 9) for _ in range(n)] for _ in range(m)], dtype=np.float64)
        expected += y0
        y = y0.copy()
    else:
        y = np.full((m, n), np.nan)
    for bx in range((n + ROWS - 1) // ROWS):
        for by in range((m + TOKENS - 1) // TOKENS):
            run_cta(bx, by, x, values, meta, bias, y, n, k, accumulate)
    assert not np.isnan(y).any(), f"m={m} n={n} k={k}: outputs never written"
    bad = np.argwhere(y != expected)
    assert len(bad) == 0, f"m={m} n={n} k={k} bias={with_bias} accumulate={accumulate}: {len(bad)} wrong, first {bad[0]}"
    print(f"ok  m={m:4} n={n:4} k={k:4} bias={with_bias!s:5} accumulate={accumulate}")


def main():
    rng = random.Random(7)
    for m, n, k, with_bias, accumulate in [
        (65, 16, 64, True, False),  # one warp's rows in a CTA of 256, one k-block
        (130, 272, 320, False, False),  # a partial second CTA, more k-blocks than stages
        (128, 528, 128, True, True),  # rows past n in one slice of the last CTA's first consumer
        (300, 400, 576, True, False),  # 9 k-blocks: the ring wraps twice
        (70, 256, 64, False, True),  # exactly one CTA of rows
    ]:
        check(m, n, k, with_bias, accumulate, rng)


if __name__ == "__main__":
    main()
