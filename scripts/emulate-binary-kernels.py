#!/usr/bin/env python3
"""Checks the index arithmetic of kernels/binary.cu without a GPU: the GEMV (bits as mma operand A,
alpha*x staged in shared memory in the bit order) and the GEMM (x and +-alpha tiles read by
ldmatrix.x4) are replayed lane by lane in numpy with the PTX fragment layouts of
mma.m16n8k16 and ldmatrix, and compared with a direct product. Keep it in step with the kernels."""
# reduction) in numpy, for one block, and compares with a direct computation.
import numpy as np
rng = np.random.default_rng(1)
PHASE_K, CHUNK, THREADS, WARPS = 4096, 512, 256, 8

def sign_pair(w, p):
    # returns (low sign, high sign) as ±1: bits p and p+16, 1 = negative
    return (-1.0 if (w >> p) & 1 else 1.0, -1.0 if (w >> (p + 16)) & 1 else 1.0)

def run_gemv(m, n, k, TT, RG=2):
    TOKENS = 8 * TT
    words = (k + 31) // 32
    x = rng.uniform(-1, 1, (m, k)); alpha = rng.uniform(0.5, 1.5, k); beta = rng.uniform(-.5, .5, k)
    W = rng.uniform(-1, 1, (n, k)); S = np.where(W < 0, -1.0, 1.0)
    bits = np.zeros((n, words), dtype=np.uint64)
    for i in range(n):
        for j in range(k):
            if W[i, j] < 0: bits[i, j // 32] |= np.uint64(1 << (j % 32))
    bits = bits.astype(np.uint32)
    y = np.full((m, n), np.nan)
    ROWS = 16 * RG
    for block in range((n + ROWS - 1) // ROWS):
        row0 = block * ROWS
        staged = np.zeros(PHASE_K * TOKENS)  # u16 slots as floats
        acc = np.zeros((WARPS, 32, RG, TT, 4))
        shift = np.zeros(TOKENS)
        for k0 in range(0, k, PHASE_K):
            # staging
            for token in range(min(m, TOKENS)):
                for e in range(PHASE_K // 8):
                    kk = e * 8; kg0 = k0 + kk
                    sc, kin = kk // CHUNK, kk % CHUNK; wd, b0 = kin // 32, kin % 32
                    tt, gl = token // 8, (token % 8) * 4 + wd // 4
                    base = ((((sc * 4 + wd % 4) * 8 + (b0 % 16) // 2) * 32 + gl) * TT + tt) * 2
                    for q in range(8):
                        kg = kg0 + q
                        v = x[token, kg] if kg < k else 0.0
                        a = alpha[kg] if kg < k else 0.0
                        bt = beta[kg] if kg < k else 0.0
                        shift[token] += bt * v
                        index = base + (q // 2) * (32 * TT * 2) + (q % 2)
                        staged[index * 2 + b0 // 16] = a * v
            # compute
            for warp in range(WARPS):
                chunk_k = k0 + warp * CHUNK
                if chunk_k >= k: continue
                def load(row, word):
                    out = []
                    for d in range(4):
                        out.append(int(bits[row, word + d]) if row < n and word + d < words else 0)
                    return out
                for i in range(4):
                    for tau in range(8):
                        # per lane regs
                        A = np.zeros((RG, 16, 16)); B = np.zeros((TT, 16, 8))
                        for lane in range(32):
                            g, t = lane // 4, lane % 4
                            base = (((warp * 4 + i) * 8 + tau) * 32 + lane) * TT * 2
                            for tt in range(TT):
                                r0 = (staged[(base + tt * 2) * 2], staged[(base + tt * 2) * 2 + 1])
                                r1 = (staged[(base + tt * 2 + 1) * 2], staged[(base + tt * 2 + 1) * 2 + 1])
                                B[tt, 2 * t, g], B[tt, 2 * t + 1, g] = r0
                                B[tt, 2 * t + 8, g], B[tt, 2 * t + 9, g] = r1
                            word = chunk_k // 32 + 4 * t
                            for rg in range(RG):
                                ra = row0 + rg * 16 + g
                                wa = load(ra, word)[i]; wb = load(ra + 8, word)[i]
                                a0 = sign_pair(wa, 2 * tau); a1 = sign_pair(wb, 2 * tau)
                                a2 = sign_pair(wa, 2 * tau + 1); a3 = sign_pair(wb, 2 * tau + 1)
                                A[rg, g, 2 * t], A[rg, g, 2 * t + 1] = a0
                                A[rg, g + 8, 2 * t], A[rg, g + 8, 2 * t + 1] = a1
                                A[rg, g, 2 * t + 8], A[rg, g, 2 * t + 9] = a2
                                A[rg, g + 8, 2 * t + 8], A[rg, g + 8, 2 * t + 9] = a3
                        for rg in range(RG):
                            for tt in range(TT):
                                D = A[rg] @ B[tt]
                                for lane in range(32):
                                    g, t = lane // 4, lane % 4
                                    acc[warp, lane, rg, tt] += [D[g, 2 * t], D[g, 2 * t + 1], D[g + 8, 2 * t], D[g + 8, 2 * t + 1]]
        partial = np.zeros((WARPS, ROWS, TOKENS))
        for warp in range(WARPS):
            for lane in range(32):
                g, t = lane // 4, lane % 4
                for rg in range(RG):
                    for tt in range(TT):
                        r, c = rg * 16 + g, tt * 8 + 2 * t
                        partial[warp, r, c], partial[warp, r, c + 1], partial[warp, r + 8, c], partial[warp, r + 8, c + 1] = acc[warp, lane, rg, tt]
        for token in range(m):
            for r in range(ROWS):
                row = row0 + r
                if row < n:
                    y[token, row] = partial[:, r, token].sum() + shift[token]
    ref = (x * alpha) @ S.T + (x @ beta)[:, None]
    err = np.abs(y - ref).max()
    print(f"gemv m={m} n={n} k={k} TT={TT} RG={RG}: max err {err:.2e}")
    assert err < 1e-9

TILE, KS, PITCH = 128, 32, 40

def ldmatrix_x4(tile, addr_of_lane):
    # addr_of_lane(l) -> (row, col) start of the 8-element row that lane l points at
    regs = np.zeros((32, 4, 2))
    for j in range(4):
        rows = [addr_of_lane(8 * j + r) for r in range(8)]
        for lane in range(32):
            r, c = rows[lane // 4]
            regs[lane, j] = tile[r, c + 2 * (lane % 4)], tile[r, c + 2 * (lane % 4) + 1]
    return regs

def run_gemm(m, n, k):
    words = (k + 31) // 32
    x = rng.uniform(-1, 1, (m, k)); alpha = rng.uniform(0.5, 1.5, k); W = rng.uniform(-1, 1, (n, k))
    bits = np.zeros((n, words), dtype=np.int64)
    for i in range(n):
        for j in range(k):
            if W[i, j] < 0: bits[i, j // 32] |= 1 << (j % 32)
    shift = rng.uniform(-1, 1, m)
    y = np.full((m, n), np.nan)
    for by in range((m + TILE - 1) // TILE):
        for bx in range((n + TILE - 1) // TILE):
            token0, row0 = by * TILE, bx * TILE
            acc = np.zeros((8, 32, 4, 4, 4))
            for step in range(words):
                k0 = step * KS
                a_tile = np.zeros((TILE, PITCH)); b_tile = np.zeros((TILE, PITCH))
                for tid in range(256):
                    for q in range(2):
                        e = tid + q * 256; r, c = e // 4, (e % 4) * 8
                        for j in range(8):
                            tok, kg = token0 + r, k0 + c + j
                            a_tile[r, c + j] = x[tok, kg] if tok < m and kg < k else 0
                    r, half = tid // 2, tid % 2
                    row = row0 + r
                    word = bits[row, k0 // 32] if row < n else 0
                    kb = k0 + 16 * half
                    for j in range(16):
                        a = alpha[kb + j] if kb + j < k else 0
                        s = -1 if (word >> (16 * half + j)) & 1 else 1
                        b_tile[r, 16 * half + j] = s * a
                for warp in range(8):
                    wm, wn = warp // 4, warp % 4
                    for kk in (0, 16):
                        afr = [ldmatrix_x4(a_tile, lambda l, mt=mt: (wm * 64 + mt * 16 + l % 16, kk + (l // 16) * 8)) for mt in range(4)]
                        bfr = []
                        for np_ in range(2):
                            v = ldmatrix_x4(b_tile, lambda l: (wn * 32 + np_ * 16 + l % 8 + (l // 16) * 8, kk + ((l // 8) % 2) * 8))
                            bfr.append(v[:, 0:2]); bfr.append(v[:, 2:4])
                        for mt in range(4):
                            A = np.zeros((16, 16))
                            for lane in range(32):
                                g, t = lane // 4, lane % 4
                                A[g, 2*t:2*t+2] = afr[mt][lane, 0]; A[g+8, 2*t:2*t+2] = afr[mt][lane, 1]
                                A[g, 2*t+8:2*t+10] = afr[mt][lane, 2]; A[g+8, 2*t+8:2*t+10] = afr[mt][lane, 3]
                            for nt in range(4):
                                B = np.zeros((16, 8))
                                for lane in range(32):
                                    g, t = lane // 4, lane % 4
                                    B[2*t:2*t+2, g] = bfr[nt][lane, 0]; B[2*t+8:2*t+10, g] = bfr[nt][lane, 1]
                                D = A @ B
                                for lane in range(32):
                                    g, t = lane // 4, lane % 4
                                    acc[warp, lane, mt, nt] += [D[g, 2*t], D[g, 2*t+1], D[g+8, 2*t], D[g+8, 2*t+1]]
            for warp in range(8):
                wm, wn = warp // 4, warp % 4
                for lane in range(32):
                    g, t = lane // 4, lane % 4
                    for mt in range(4):
                        for half in range(2):
                            tok = token0 + wm * 64 + mt * 16 + g + 8 * half
                            if tok >= m: continue
                            for nt in range(4):
                                for q in range(2):
                                    row = row0 + wn * 32 + nt * 8 + 2 * t + q
                                    if row < n: y[tok, row] = acc[warp, lane, mt, nt, 2 * half + q] + shift[tok]
    S = np.where(W < 0, -1.0, 1.0)
    ref = (x * alpha) @ S.T + shift[:, None]
    err = np.abs(y - ref).max(); print(f"gemm m={m} n={n} k={k}: max err {err:.2e}"); assert err < 1e-9



if __name__ == "__main__":
    run_gemv(1, 40, 70, 1)
    run_gemv(3, 33, 600, 1)
    run_gemv(11, 17, 4096 + 300, 2)
    run_gemv(16, 100, 700, 2, 4)
    run_gemm(20, 9, 40)
    run_gemm(130, 140, 72)
