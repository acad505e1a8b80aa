#!/usr/bin/env python3
"""Emulates the index arithmetic of kernels/wavelet.cu's tile kernel (design 4) on the host and
compares it with a direct window sum, for the shapes and windows that stress it: windows around
the ring's reach and the chunk size, leaving rows from the ring and from global memory, partial
chunks, partial and pass-through strips, forward and backward, both divisors, with and without
the residual. Each ring buffer is overwritten as soon as the kernel issues its copy (the earliest
the asynchronous copy can land), so a leaving row read after its buffer was reused shows up as a
wrong result. Values are small integers, so every sum is exact whatever the order.

    python3 scripts/emulate-wavelet-tiles.py
"""
import random

TILE_COORDS, PARTS, STAGE_BYTES, DEPTH, RING_BACK = 64, 8, 8192, 6, 6
RING = RING_BACK + 1 + DEPTH


def shape(size, residual):
    row_bytes = TILE_COORDS * size
    tiles = 2 if residual else 1
    rows = STAGE_BYTES // (row_bytes * tiles)
    return rows, rows // PARTS, RING_BACK * rows


def divisor(k, t, available):
    return t + 1 if available and t + 1 < k else k


def walk(x, r, windows, seq, dim, c0, size, reverse, available):
    """One block: returns {(t, c): value} for the strip's coordinates, as the kernel computes."""
    rows, rpp, ring_rows = shape(size, r is not None)
    chunks = (seq + rows - 1) // rows
    value = lambda t, c: x[t][c] + (r[t][c] if r is not None else 0)
    ring = [None] * RING  # buffer -> (chunk, {(row, c): value})
    out = {}

    def issue(n):
        if n < chunks:
            data = {}
            for row in range(rows):
                u = n * rows + row
                for c in range(TILE_COORDS):
                    valid = u < seq and c0 + c < dim
                    t = seq - 1 - u if reverse else u
                    data[(row, c)] = value(t, c0 + c) if valid else 0
            ring[n % RING] = (n, data)

    def fetch_far(n, k, far):
        leaving = {}
        for part in range(PARTS):
            for lane in range(32):
                for rr in range(rpp):
                    u = n * rows + part * rpp + rr
                    for h in range(2):
                        g = u - k[lane][h]
                        need = far[lane][h] and u < seq and g >= 0
                        tg = seq - 1 - g if reverse else g
                        leaving[(part, lane, rr, h)] = value(tg, c0 + 2 * lane + h) if need else 0
        return leaving

    k = [[windows[c0 + 2 * lane + h] if c0 + 2 * lane + h < dim else 0 for h in range(2)] for lane in range(32)]
    far = [[k[lane][h] > ring_rows for h in range(2)] for lane in range(32)]
    mixed = any(k[lane][h] for lane in range(32) for h in range(2))
    term = lambda v, kk, t: v / divisor(kk, t, available) if reverse else v
    carry = [[0.0, 0.0] for _ in range(32)]
    sets = [fetch_far(0, k, far), fetch_far(1, k, far)]
    for n in range(DEPTH):
        issue(n)
    for n in range(chunks):
        issue(n + DEPTH)
        leaving = sets[n % 2]
        held_chunk, buffer = ring[n % RING]
        assert held_chunk == n
        diffs = {}
        for part in range(PARTS):
            for lane in range(32):
                back = [min(k[lane][h], ring_rows) // rows for h in range(2)]
                shift = [min(k[lane][h], ring_rows) % rows for h in range(2)]
                now = [(n - back[h] + RING) % RING for h in range(2)]
                before = [(n - back[h] - 1 + 2 * RING) % RING for h in range(2)]
                for rr in range(rpp):
                    row = part * rpp + rr
                    u = n * rows + row
                    t = seq - 1 - u if reverse else u
                    v = [buffer[(row, 2 * lane + h)] for h in range(2)]
                    for h in range(2):
                        gone = 0
                        g = u - k[lane][h]
                        if k[lane][h] and u < seq and g >= 0:
                            tg = seq - 1 - g if reverse else g
                            if far[lane][h]:
                                gone = term(leaving[(part, lane, rr, h)], k[lane][h], tg)
                            else:
                                which = now[h] if row >= shift[h] else before[h]
                                row_g = row - shift[h] if row >= shift[h] else row - shift[h] + rows
                                held, data = ring[which]
                                assert held * rows + row_g == g, (held, row_g, g)
                                gone = term(data[(row_g, 2 * lane + h)], k[lane][h], tg)
                        d = term(v[h], k[lane][h], t) - gone if k[lane][h] and u < seq else 0
                        diffs[(part, lane, rr, h)] = d
        sets[n % 2] = fetch_far(n + 2, k, far)
        for lane in range(32):
            for h in range(2):
                totals = []
                for part in range(PARTS):
                    s = 0
                    for rr in range(rpp):
                        s += diffs[(part, lane, rr, h)]
                        diffs[(part, lane, rr, h)] = s
                    totals.append(s)
                offsets = []
                for part in range(PARTS):
                    offsets.append(carry[lane][h])
                    carry[lane][h] += totals[part]
                for part in range(PARTS):
                    for rr in range(rpp):
                        row = part * rpp + rr
                        u = n * rows + row
                        c = c0 + 2 * lane + h
                        if u >= seq or c >= dim:
                            continue
                        t = seq - 1 - u if reverse else u
                        kk = k[lane][h]
                        if kk == 0 or not mixed:
                            out[(t, c)] = value(t, c)
                        else:
                            w = offsets[part] + diffs[(part, lane, rr, h)]
                            out[(t, c)] = w if reverse else w / divisor(kk, t, available)
    return out


def reference(x, r, windows, seq, dim, reverse, available):
    value = lambda t, c: x[t][c] + (r[t][c] if r is not None else 0)
    out = {}
    for c in range(dim):
        k = windows[c]
        for t in range(seq):
            if k == 0:
                out[(t, c)] = value(t, c)
            elif reverse:
                out[(t, c)] = sum(value(s, c) / divisor(k, s, available) for s in range(t, min(seq, t + k)))
            else:
                out[(t, c)] = sum(value(s, c) for s in range(max(0, t - k + 1), t + 1)) / divisor(k, t, available)
    return out


def main():
    rng = random.Random(7)
    kinds = [95, 96, 97, 127, 128, 129, 191, 192, 193, 383, 384, 385, 1000, 1099, 1100, 1101, 2, 15, 16, 17, 63, 64, 65, 1]
    cases = 0
    for seq, dim, first, count in [(1100, 136, 0, 120), (1100, 75, 3, 70), (1, 64, 0, 64), (17, 8, 0, 8), (383, 64, 0, 64)]:
        windows = [0] * dim
        for j in range(count):
            windows[first + j] = kinds[j // 2 % len(kinds)] if j < count // 2 else kinds[j % len(kinds)]
        for size in (2, 4):
            for residual in (False, True):
                for reverse in (False, True):
                    if reverse and residual:
                        continue
                    available = rng.random() < 0.5
                    x = [[rng.randint(-8, 8) for _ in range(dim)] for _ in range(seq)]
                    r = [[rng.randint(-8, 8) for _ in range(dim)] for _ in range(seq)] if residual else None
                    expected = reference(x, r, windows, seq, dim, reverse, available)
                    got = {}
                    for c0 in range(0, dim, TILE_COORDS):
                        got.update(walk(x, r, windows, seq, dim, c0, size, reverse, available))
                    assert set(got) == set(expected), "not every element written"
                    bad = [key for key in expected if abs(got[key] - expected[key]) > 1e-9 * max(1, abs(expected[key]))]
                    assert not bad, f"seq {seq} dim {dim} size {size} residual {residual} reverse {reverse}: {bad[:5]}"
                    cases += 1
    print(f"{cases} cases: the tile kernel's indexing matches the direct window sums")


if __name__ == "__main__":
    main()
