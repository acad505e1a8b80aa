#!/usr/bin/env python3
"""Runs PyTorch on exactly the cases a `tessera bench --json` report holds, timed the same way
(CUDA events around each run after a warm-up, median of the runs, the same input rotation), and
prints one table of tessera beside PyTorch. Writes the combined report with --out.

    python3 benches/torch_compare.py --tessera tessera.json --out combined.json

With --tessera-bin, it runs the tessera benchmark itself and PyTorch in turns, several rounds,
and reports the median ratio with its spread: for differences of a few percent, where the card's
clock moves more than that between two runs.

    python3 benches/torch_compare.py --tessera-bin tessera --only matmul --rounds 5
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile

import torch

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def time_ms(work, warmup, iterations):
    for i in range(warmup):
        work(i)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iterations)]
    for i, (start, end) in enumerate(events):
        start.record()
        work(i)
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def uniform(shape, dtype, low, high, generator):
    return torch.empty(shape, dtype=torch.float32, device="cuda").uniform_(low, high, generator=generator).to(dtype)


def torch_copy(case, warmup, iterations, generator):
    n = case["bytes"] // 4
    source = uniform((n,), torch.float32, -1, 1, generator)
    target = torch.empty_like(source)
    ms = time_ms(lambda i: target.copy_(source), warmup, iterations)
    return {"ms": ms, "gbps": 2 * case["bytes"] / (ms * 1e6), "what": "Tensor.copy_"}


def torch_matmul(case, warmup, iterations, generator):
    dtype = DTYPES[case["dtype"]]
    m, n, k, sets = case["m"], case["n"], case["k"], case["input_sets"]
    inputs = [(uniform((m, k), dtype, -1, 1, generator), uniform((k, n), dtype, -1, 1, generator)) for _ in range(sets)]
    out = torch.empty((m, n), dtype=dtype, device="cuda")

    def work(i):
        a, b = inputs[i % sets]
        torch.matmul(a, b, out=out)

    ms = time_ms(work, warmup, iterations)
    return {"ms": ms, "tflops": 2 * m * n * k / (ms * 1e9), "what": "torch.matmul (cuBLAS)"}


def torch_adamw(case, warmup, iterations, generator):
    params, copies = [], []
    for n in case["sizes"]:
        p = torch.nn.Parameter(uniform((n,), torch.float32, -1, 1, generator))
        # PyTorch's fused AdamW needs gradients of the parameter's dtype: f32 here in every case.
        p.grad = uniform((n,), torch.float32, -1e-2, 1e-2, generator)
        params.append(p)
        if case["bf16_copy"]:
            copies.append(torch.empty((n,), dtype=torch.bfloat16, device="cuda"))
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, fused=True)

    def work(i):
        optimizer.step()
        for p, c in zip(params, copies):
            c.copy_(p.detach())

    ms = time_ms(work, warmup, iterations)
    what = "torch.optim.AdamW(fused=True), f32 grads"
    if copies:
        what += ", then bf16 copy_"
    return {"ms": ms, "gbps": case["params"] * 28 / (ms * 1e6), "what": what}


def torch_wavelet(case, warmup, iterations, generator):
    """Eager PyTorch: a prefix sum in f32 and a gather of the sum k steps back, per coordinate."""
    batch, seq, dim, sets = case["batch"], case["seq"], case["dim"], case["input_sets"]
    k = torch.tensor(case["windows"], device="cuda")
    mixed = k > 0
    kf = k.clamp(min=1).float()
    t = torch.arange(seq, device="cuda")
    # Index into the zero-padded prefix sum: C[t+1] - C[t+1-k] is the window ending at t.
    lagged = (t[:, None] + 1 - k[None, :]).clamp(min=0).expand(batch, seq, dim)
    inputs = [uniform((batch, seq, dim), torch.bfloat16, -1, 1, generator) for _ in range(sets)]
    backward = case["direction"] == "backward"

    def work(i):
        x = inputs[i % sets]
        values = x.float() / kf if backward else x.float()
        if backward:  # the adjoint: the same window over the reversed sequence
            values = values.flip(1)
        prefix = torch.nn.functional.pad(values.cumsum(1), (0, 0, 1, 0))
        window = prefix[:, 1:] - prefix.gather(1, lagged)
        if backward:
            window = window.flip(1)
        else:
            window = window / kf
        return torch.where(mixed, window.to(torch.bfloat16), x)

    ms = time_ms(work, warmup, iterations)
    return {"ms": ms, "gbps": 4 * batch * seq * dim / (ms * 1e6), "what": "eager PyTorch: cumsum + gather"}


def torch_columns(case, warmup, iterations, generator):
    """torch.split of the fused output, each part made contiguous (what a model must do)."""
    rows, part, sets = case["rows"], case["part"], case["input_sets"]
    inputs = [uniform((rows, 3 * part), torch.bfloat16, -1, 1, generator) for _ in range(sets)]

    def work(i):
        return [p.contiguous() for p in inputs[i % sets].split(part, dim=1)]

    ms = time_ms(work, warmup, iterations)
    return {"ms": ms, "gbps": 4 * rows * 3 * part / (ms * 1e6), "what": "torch.split + contiguous"}


class Gpt2(torch.nn.Module):
    """A straightforward GPT-2 (pre-norm, fused qkv, SDPA, tanh GELU, tied head), as a user
    would write it."""

    def __init__(self, c):
        super().__init__()
        nn = torch.nn
        self.c = c
        self.wte = nn.Embedding(c["vocab"], c["width"])
        self.wpe = nn.Embedding(c["context"], c["width"])
        self.blocks = nn.ModuleList()
        for _ in range(c["layers"]):
            block = nn.Module()
            block.ln_1 = nn.LayerNorm(c["width"], eps=c["norm_eps"])
            block.c_attn = nn.Linear(c["width"], 3 * c["width"])
            block.c_proj = nn.Linear(c["width"], c["width"])
            block.ln_2 = nn.LayerNorm(c["width"], eps=c["norm_eps"])
            block.c_fc = nn.Linear(c["width"], c["ffn_width"])
            block.mlp_proj = nn.Linear(c["ffn_width"], c["width"])
            self.blocks.append(block)
        self.ln_f = nn.LayerNorm(c["width"], eps=c["norm_eps"])

    def forward(self, idx, targets):
        F = torch.nn.functional
        b, t = idx.shape
        heads, width = self.c["heads"], self.c["width"]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for block in self.blocks:
            q, k, v = block.c_attn(block.ln_1(x)).split(width, dim=2)
            q, k, v = (z.view(b, t, heads, width // heads).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + block.c_proj(y.transpose(1, 2).reshape(b, t, width))
            x = x + block.mlp_proj(F.gelu(block.c_fc(block.ln_2(x)), approximate="tanh"))
        logits = self.ln_f(x) @ self.wte.weight.t()
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


def torch_train(case, warmup, iterations, generator):
    """GPT-2 training steps (bf16 autocast, SDPA, fused AdamW, grad-norm clipping), eager and
    under torch.compile; the eager model is the anchor, the compiled one is reported beside it."""
    c, batch, seq = case["config"], case["batch"], case["seq"]
    tokens = torch.randint(0, c["vocab"], (batch, seq + 1), device="cuda", generator=generator)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    results = {}
    for mode in ("eager", "compiled"):
        torch.manual_seed(0)
        model = Gpt2(c).cuda()
        optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
        step_model = torch.compile(model) if mode == "compiled" else model

        def work(i):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = step_model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()  # tessera reads its loss back every step too

        ms = time_ms(work, max(warmup, 3), min(iterations, 10))
        results[mode] = ms
        del model, optimizer, step_model
        torch.cuda.empty_cache()
    flops = case["flops_per_token"] * batch * seq
    ms = results["eager"]
    return {
        "ms": ms,
        "tflops": flops / (ms * 1e9),
        "tokens_per_s": batch * seq / (ms * 1e-3),
        "compiled_ms": results["compiled"],
        "compiled_tokens_per_s": batch * seq / (results["compiled"] * 1e-3),
        "compiled_tflops": flops / (results["compiled"] * 1e9),
        "what": f"PyTorch eager (torch.compile: {results['compiled']:.1f} ms, "
        f"{batch * seq / (results['compiled'] * 1e-3) / 1e3:.0f}k tokens/s)",
    }


def torch_sparse(case, warmup, iterations, generator):
    """cuSPARSELt through torch.sparse.to_sparse_semi_structured, and dense F.linear (cuBLAS) on
    the same 2:4 weights; the cuSPARSELt time is the anchor, the dense one rides along."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = False
    dtype = DTYPES[case["dtype"]]
    m, n, k, sets = case["m"], case["n"], case["k"], case["input_sets"]
    mask = torch.tensor([True, True, False, False], device="cuda").tile(n, k // 4)
    weights = [uniform((n, k), dtype, -1, 1, generator) * mask for _ in range(sets)]
    inputs = [uniform((m, k), dtype, -1, 1, generator) for _ in range(sets)]
    linear = torch.nn.functional.linear
    dense_ms = time_ms(lambda i: linear(inputs[i % sets], weights[i % sets]), warmup, iterations)
    result = {"dense_ms": dense_ms, "dense_tflops": 2 * m * n * k / (dense_ms * 1e9)}
    try:
        sparse = [to_sparse_semi_structured(w) for w in weights]
        ms = time_ms(lambda i: linear(inputs[i % sets], sparse[i % sets]), warmup, iterations)
        result.update({"ms": ms, "what": "F.linear on to_sparse_semi_structured (cuSPARSELt)"})
    except Exception as error:  # cuSPARSELt refuses some shapes (one token): report, do not stop
        result.update({"ms": float("nan"), "what": f"cuSPARSELt failed: {error}".splitlines()[0]})
    result["tflops"] = 2 * m * n * k / (result["ms"] * 1e9)
    result["gbps"] = float("nan")
    return result


def torch_sparse_step(case, warmup, iterations, generator):
    """The dense twin of one linear layer's training step in PyTorch: forward, dX, dW, db."""
    dtype = DTYPES[case["dtype"]]
    m, d = case["m"], case["d"]
    w = uniform((d, d), dtype, -1, 1, generator)
    b = uniform((d,), dtype, -1, 1, generator)
    x = uniform((m, d), dtype, -1, 1, generator)
    dy = uniform((m, d), dtype, -1, 1, generator)

    def work(i):
        torch.nn.functional.linear(x, w, b)
        torch.matmul(dy, w)
        torch.matmul(dy.t(), x)
        dy.sum(0)

    ms = time_ms(work, warmup, iterations)
    return {"ms": ms, "tflops": 6 * m * d * d / (ms * 1e9), "what": "dense F.linear + two matmuls + sum (cuBLAS)"}




def torch_lora(case, warmup, iterations, generator):
    """Unfused eager PyTorch: x @ W.T + s * (x @ A.T) @ B.T; with several adapters, each row's A and
    B gathered by its id and applied with batched matmuls."""
    dtype = DTYPES[case["dtype"]]
    m, d, r, count, sets, s = case["m"], case["d"], case["rank"], case["adapters"], case["input_sets"], case["scale"]
    ids = torch.arange(m, device="cuda") % count
    inputs = [
        (
            uniform((m, d), dtype, -1, 1, generator),
            uniform((d, d), dtype, -0.02, 0.02, generator),
            uniform((count, r, d), dtype, -0.02, 0.02, generator),
            uniform((count, d, r), dtype, -0.02, 0.02, generator),
        )
        for _ in range(sets)
    ]

    def base(i):
        x, w, _, _ = inputs[i % sets]
        return x @ w.T

    def work(i):
        x, w, a, b = inputs[i % sets]
        if count == 1:
            return x @ w.T + s * (x @ a[0].T) @ b[0].T
        t = torch.bmm(a[ids], x[:, :, None])  # (m, r, 1)
        return x @ w.T + s * torch.bmm(b[ids], t)[:, :, 0]

    base_ms = time_ms(base, warmup, iterations)
    ms = time_ms(work, warmup, iterations)
    what = "eager x@W.T + s*(x@A.T)@B.T" if count == 1 else "eager x@W.T + s*bmm(B[ids], bmm(A[ids], x))"
    return {
        "ms": ms,
        "base_ms": base_ms,
        "overhead_pct": 100 * (ms / base_ms - 1),
        "tflops": 2 * m * d * d / (ms * 1e9),
        "what": what,
    }


_FLEX = {}


def flex_attend(case):
    """Compiled flex_attention with the case's mask (causal window, or Λ = global + window)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "compiled" not in _FLEX:
        _FLEX["compiled"] = torch.compile(flex_attention)
    window, global_ = case["window"], case["global"]

    def sliding(b, h, q, kv):
        return (q >= kv) & (q - kv < window)

    def lam(b, h, q, kv):
        return (q >= kv) & ((q - kv < window) | (kv < global_))

    mask_mod = {"window": sliding, "lambda": lam}[case["mask"]]
    block_mask = create_block_mask(mask_mod, None, None, case["seq"], case["seq"], device="cuda")
    compiled = _FLEX["compiled"]
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


def torch_attention(case, warmup, iterations, generator):
    """SDPA's flash (FA2) and cuDNN backends on the dense masks, compiled flex_attention on the
    window and Λ masks; the anchor is the fastest of them."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, s, h, d = case["batch"], case["seq"], case["heads"], case["head_dim"]
    warmup, iterations = case.get("warmup", warmup), case.get("iterations", iterations)
    backward = case["direction"] == "fwd+bwd"
    q, k, v = (uniform((b, h, s, d), torch.bfloat16, -1, 1, generator).requires_grad_(backward) for _ in range(3))
    d_out = uniform((b, h, s, d), torch.bfloat16, -1, 1, generator)
    causal = case["mask"] != "none"

    def timed(attend):
        def work(i):
            out = attend(q, k, v)
            if backward:
                torch.autograd.grad(out, (q, k, v), d_out)

        return time_ms(work, warmup, iterations)

    backends = {}
    if case["mask"] in ("none", "causal"):
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            def sdpa(q, k, v, backend=backend):
                with sdpa_kernel(backend):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

            try:
                backends[name] = timed(sdpa)
            except RuntimeError as e:
                print(f"torch_compare: SDPA {name} failed on {case['name']}: {e}", file=sys.stderr)
    if case["mask"] in ("window", "lambda"):
        backends["flex"] = timed(flex_attend(case))
    flop = case["tflops"] * case["ms"] * 1e9
    best = min(backends, key=backends.get)
    return {
        "ms": backends[best],
        "tflops": flop / (backends[best] * 1e9),
        "what": best,
        "backends": {name: {"ms": ms, "tflops": flop / (ms * 1e9)} for name, ms in backends.items()},
    }


RUNNERS = {
    "copy": torch_copy,
    "matmul": torch_matmul,
    "adamw": torch_adamw,
    "wavelet": torch_wavelet,
    "columns": torch_columns,
    "train": torch_train,
    "sparse": torch_sparse,
    "sparse_step": torch_sparse_step,
    "lora": torch_lora,
    "attention": torch_attention,
}


def backward_timer(output, inputs, grad, warmup, iterations):
    """Times only the backward of a graph built once: autograd.grad with the graph retained."""
    return time_ms(lambda i: torch.autograd.grad(output, inputs, grad, retain_graph=True), warmup, iterations)


def torch_activation(case, warmup, iterations, generator):
    rows, width, sets = case["rows"], case["width"], case["input_sets"]
    swiglu = case["op"] == "swiglu"
    in_width = 2 * width if swiglu else width
    xs = [uniform((rows, in_width), torch.bfloat16, -3, 3, generator) for _ in range(sets)]
    d_out = uniform((rows, width), torch.bfloat16, -1, 1, generator)
    F = torch.nn.functional

    def forward(x):
        if swiglu:
            gate, up = x.chunk(2, dim=-1)
            return F.silu(gate) * up
        return F.gelu(x, approximate="tanh")

    if case["direction"] == "forward":
        ms = time_ms(lambda i: forward(xs[i % sets]), warmup, iterations)
        what = "F.silu(gate) * up" if swiglu else "F.gelu(approximate='tanh')"
    else:
        x = xs[0].clone().requires_grad_(True)
        ms = backward_timer(forward(x), [x], d_out, warmup, iterations)
        what = "autograd backward of " + ("F.silu(gate) * up" if swiglu else "F.gelu(approximate='tanh')")
    return {"ms": ms, "gbps": case["bytes"] / (ms * 1e6), "what": what}


def torch_norm(case, warmup, iterations, generator):
    rows, width, sets = case["rows"], case["width"], case["input_sets"]
    F = torch.nn.functional
    layer = case["norm"] == "layer_norm"
    weight = uniform((width,), torch.bfloat16, 0.5, 1.5, generator)
    bias = uniform((width,), torch.bfloat16, -0.5, 0.5, generator) if layer else None
    inputs = [(uniform((rows, width), torch.bfloat16, -2, 2, generator), uniform((rows, width), torch.bfloat16, -2, 2, generator)) for _ in range(sets)]

    def forward(x, residual):
        s = x + residual if residual is not None else x
        if layer:
            return F.layer_norm(s, (width,), weight, bias, 1e-5)
        return F.rms_norm(s, (width,), weight, 1e-5)

    name = "F.layer_norm" if layer else "F.rms_norm"
    if case["direction"] == "forward":
        residual = case["residual"]
        ms = time_ms(lambda i: forward(inputs[i % sets][0], inputs[i % sets][1] if residual else None), warmup, iterations)
        what = ("x + residual, then " if residual else "") + name
    else:
        x = inputs[0][0].clone().requires_grad_(True)
        weight.requires_grad_(True)
        params = [x, weight] + ([bias.requires_grad_(True)] if layer else [])
        d_out = uniform((rows, width), torch.bfloat16, -1, 1, generator)
        ms = backward_timer(forward(x, None), params, d_out, warmup, iterations)
        what = "autograd backward of " + name
    return {"ms": ms, "gbps": case["bytes"] / (ms * 1e6), "what": what}


def torch_cross_entropy(case, warmup, iterations, generator):
    rows, vocab = case["rows"], case["vocab"]
    logits = uniform((rows, vocab), torch.bfloat16, -4, 4, generator).requires_grad_(True)
    targets = torch.tensor([(r * 2654435761) % vocab for r in range(rows)], device="cuda")
    F = torch.nn.functional

    def work(i):
        loss = F.cross_entropy(logits, targets)
        return torch.autograd.grad(loss, [logits])

    ms = time_ms(work, warmup, iterations)
    return {"ms": ms, "gbps": case["bytes"] / (ms * 1e6), "what": "F.cross_entropy forward + autograd backward"}


def embedding_tokens(count, vocab):
    """The tokens of src/bin/tessera/bench/embedding.rs: a Zipf-like law from a hash."""
    out = []
    for i in range(count):
        h = ((i * 0x9E3779B97F4A7C15) % (1 << 64) >> 11) / float(1 << 53)
        out.append(min(int(vocab ** h) - 1, vocab - 1))
    return out


def torch_embedding(case, warmup, iterations, generator):
    batch, seq, vocab, width = case["batch"], case["seq"], case["vocab"], case["width"]
    tokens = torch.tensor(embedding_tokens(batch * seq, vocab), device="cuda").view(batch, seq)
    wte = uniform((vocab, width), torch.bfloat16, -0.1, 0.1, generator)
    wpe = uniform((1024, width), torch.bfloat16, -0.1, 0.1, generator)
    F = torch.nn.functional

    def forward(wte, wpe):
        return F.embedding(tokens, wte) + wpe[:seq]

    if case["direction"] == "forward":
        ms = time_ms(lambda i: forward(wte, wpe), warmup, iterations)
        what = "F.embedding(tokens, wte) + wpe[:seq]"
    else:
        wte.requires_grad_(True)
        wpe.requires_grad_(True)
        d_out = uniform((batch, seq, width), torch.bfloat16, -1, 1, generator)
        ms = backward_timer(forward(wte, wpe), [wte, wpe], d_out, warmup, iterations)
        what = "autograd backward of F.embedding + wpe (bf16 table gradients)"
    return {"ms": ms, "gbps": case["bytes"] / (ms * 1e6), "what": what}


def torch_grad_norm(case, warmup, iterations, generator):
    params = []
    for n in case["sizes"]:
        p = torch.nn.Parameter(torch.empty((n,), device="cuda"))
        p.grad = uniform((n,), torch.float32, -1e-3, 1e-3, generator)
        params.append(p)
    grads = [p.grad for p in params]
    if case["clip"]:
        ms = time_ms(lambda i: torch.nn.utils.clip_grad_norm_(params, case["max_norm"], foreach=True), warmup, iterations)
        what = "torch.nn.utils.clip_grad_norm_(foreach=True)"
    else:
        ms = time_ms(lambda i: torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))), warmup, iterations)
        what = "torch._foreach_norm + vector_norm"
    return {"ms": ms, "gbps": case["bytes"] / (ms * 1e6), "what": what}


def torch_sampling(case, warmup, iterations, generator):
    rows, vocab = case["rows"], case["vocab"]
    logits = uniform((rows, vocab), torch.bfloat16, -8, 8, generator)

    def work(i):
        if case["greedy"]:
            return logits.argmax(dim=-1)
        scores = logits.float() / case["temperature"]
        kth = torch.topk(scores, case["top_k"]).values[..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
        ordered, index = torch.sort(scores, descending=True)
        probs = ordered.softmax(dim=-1)
        remove = probs.cumsum(dim=-1) - probs >= case["top_p"]
        scores = scores.scatter(-1, index, ordered.masked_fill(remove, float("-inf")))
        return torch.multinomial(scores.softmax(dim=-1), 1)

    ms = time_ms(work, warmup, iterations)
    what = "argmax" if case["greedy"] else "Hugging Face-style top-k, top-p (sort), multinomial"
    return {"ms": ms, "gbps": rows * vocab * 2 / (ms * 1e6), "what": what}


RUNNERS.update({"activation": torch_activation, "norm": torch_norm, "cross_entropy": torch_cross_entropy})
RUNNERS.update({"embedding": torch_embedding, "grad_norm": torch_grad_norm, "sampling": torch_sampling})


def torch_binary(case, warmup, iterations, generator):
    """The dense bf16 layer the binary one replaces: x @ W.T through cuBLAS, on the same shape."""
    m, n, k, sets = case["m"], case["n"], case["k"], case["input_sets"]
    # Dense weights are 16x the packed bytes: rotate over enough of them to leave L2 behind.
    sets = max(1, min(8, -(-(256 << 20) // (2 * n * k + 2 * m * k))))
    inputs = [(uniform((m, k), torch.bfloat16, -1, 1, generator), uniform((n, k), torch.bfloat16, -0.03, 0.03, generator))
              for _ in range(sets)]
    out = torch.empty((m, n), dtype=torch.bfloat16, device="cuda")

    def work(i):
        x, w = inputs[i % sets]
        torch.matmul(x, w.t(), out=out)

    ms = time_ms(work, warmup, iterations)
    return {"ms": ms, "tflops": 2 * m * n * k / (ms * 1e9), "what": "torch.matmul bf16 x @ W.T (cuBLAS)"}


RUNNERS["binary"] = torch_binary


def torch_lora_sparse(case, warmup, iterations, generator):
    """LoRA over a 2:4 sparse base, unfused: F.linear on to_sparse_semi_structured (cuSPARSELt)
    plus s * (x @ A.T) @ B.T; the sparse linear alone and dense F.linear ride along. Where
    cuSPARSELt refuses the shape (one token), the anchor is NaN with the reason."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = False
    dtype = DTYPES[case["dtype"]]
    m, d, r, sets, s = case["m"], case["d"], case["rank"], case["input_sets"], case["scale"]
    mask = torch.tensor([True, True, False, False], device="cuda").tile(d, d // 4)
    inputs = [
        (
            uniform((m, d), dtype, -1, 1, generator),
            uniform((d, d), dtype, -0.02, 0.02, generator) * mask,
            uniform((r, d), dtype, -0.02, 0.02, generator),
            uniform((d, r), dtype, -0.02, 0.02, generator),
        )
        for _ in range(sets)
    ]
    linear = torch.nn.functional.linear
    dense_ms = time_ms(lambda i: linear(inputs[i % sets][0], inputs[i % sets][1]), warmup, iterations)
    result = {"dense_base_ms": dense_ms}
    try:
        sparse = [to_sparse_semi_structured(w) for _, w, _, _ in inputs]

        def work(i):
            x, _, a, b = inputs[i % sets]
            return linear(x, sparse[i % sets]) + s * (x @ a.T) @ b.T

        base_ms = time_ms(lambda i: linear(inputs[i % sets][0], sparse[i % sets]), warmup, iterations)
        ms = time_ms(work, warmup, iterations)
        result.update(
            {
                "ms": ms,
                "base_ms": base_ms,
                "overhead_pct": 100 * (ms / base_ms - 1),
                "what": "F.linear on to_sparse_semi_structured (cuSPARSELt) + s*(x@A.T)@B.T, eager",
            }
        )
    except Exception as error:  # cuSPARSELt refuses some shapes (one token): report, do not stop
        reason = f"cuSPARSELt failed: {error}".splitlines()[0]
        result.update({"ms": float("nan"), "base_ms": float("nan"), "overhead_pct": float("nan"), "what": reason})
    result["vs_dense_base_pct"] = 100 * (result["ms"] / dense_ms - 1)
    result["tflops"] = 2 * m * d * d / (result["ms"] * 1e9)
    return result


RUNNERS["lora_sparse"] = torch_lora_sparse


def torch_generate(case, warmup, iterations, generator):
    """Hugging Face transformers' GPT2LMHeadModel.generate with its key/value cache
    (use_cache=True), greedy, bf16, random weights of the case's shape: one prefill of the prompts
    and a decode step per further token, as tessera's case. Without transformers installed the
    import fails and compare() reports why there is no anchor."""
    import transformers

    c, batch, new = case["config"], case["batch"], case["new_tokens"]
    config = transformers.GPT2Config(
        vocab_size=c["vocab"], n_positions=c["context"], n_embd=c["width"], n_layer=c["layers"],
        n_head=c["heads"], n_inner=c["ffn_width"], layer_norm_epsilon=c["norm_eps"],
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).to(device="cuda", dtype=torch.bfloat16).eval()
    prompts = torch.randint(0, c["vocab"], (batch, case["prompt"]), device="cuda", generator=generator)
    mask = torch.ones_like(prompts)

    def work(i):
        with torch.no_grad():
            out = model.generate(prompts, attention_mask=mask, max_new_tokens=new, do_sample=False, use_cache=True)
        assert out.shape[1] == case["prompt"] + new, out.shape

    ms = time_ms(work, max(warmup, 1), min(iterations, 5))
    return {
        "ms": ms,
        "tokens_per_s": batch * new / (ms * 1e-3),
        "tflops": case["tflops"] * case["ms"] / ms,
        "what": f"transformers {transformers.__version__} GPT2LMHeadModel.generate, use_cache=True, greedy",
    }


RUNNERS["generate"] = torch_generate


def torch_train_sparse(case, warmup, iterations, generator):
    """The anchor of the 2:4 (SLoPe) GPT-2 training step: PyTorch's dense eager step of the same
    model (bf16 autocast, SDPA, fused AdamW), since PyTorch has no 2:4 training step of its own
    (its semi-structured tensors cover the forward GEMM only)."""
    c, batch, seq = case["config"], case["batch"], case["seq"]
    tokens = torch.randint(0, c["vocab"], (batch, seq + 1), device="cuda", generator=generator)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    torch.manual_seed(0)
    model = Gpt2(c).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

    def work(i):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()

    ms = time_ms(work, max(warmup, 3), min(iterations, 10))
    del model, optimizer
    torch.cuda.empty_cache()
    flops = case["flops_per_token"] * batch * seq
    return {
        "ms": ms,
        "tflops": flops / (ms * 1e9),
        "tokens_per_s": batch * seq / (ms * 1e-3),
        "what": "PyTorch eager, dense (no 2:4 training step in PyTorch)",
    }


RUNNERS["train_sparse"] = torch_train_sparse


def torch_train_hopper(case, warmup, iterations, generator):
    """The anchor of the GPT-2 step with tessera's sm_90a attention kernels: PyTorch's eager step
    of the same model (the `train` row has the torch.compile one beside it)."""
    result = torch_train_sparse(case, warmup, iterations, generator)
    result["what"] = "PyTorch eager (SDPA, fused AdamW)"
    return result


RUNNERS["train_hopper"] = torch_train_hopper


def torch_binary_train(case, warmup, iterations, generator):
    """The dense bf16 layer's GEMMs on the binary training case's shape: x @ W.T forward;
    dY @ W and dY.T @ x (f32 out) backward, through cuBLAS."""
    m, n, k = case["m"], case["n"], case["k"]
    x = uniform((m, k), torch.bfloat16, -1, 1, generator)
    w = uniform((n, k), torch.bfloat16, -0.05, 0.05, generator)
    dy = uniform((m, n), torch.bfloat16, -1, 1, generator)
    y = torch.empty((m, n), dtype=torch.bfloat16, device="cuda")
    dx = torch.empty((m, k), dtype=torch.bfloat16, device="cuda")
    if case["direction"] == "forward":
        ms = time_ms(lambda i: torch.matmul(x, w.t(), out=y), warmup, iterations)
        return {"ms": ms, "tflops": 2 * m * n * k / (ms * 1e9), "what": "torch.matmul bf16 x @ W.T (cuBLAS)"}

    try:  # torch.mm's out_dtype (bf16 operands, f32 output) is recent
        torch.mm(dy.t(), x, out_dtype=torch.float32)
        grad_w, what = (lambda: torch.mm(dy.t(), x, out_dtype=torch.float32)), "dY.T @ x (f32 out)"
    except (TypeError, RuntimeError):
        grad_w, what = (lambda: torch.matmul(dy.t(), x)), "dY.T @ x (bf16 out)"

    def work(i):
        torch.matmul(dy, w, out=dx)
        grad_w()

    ms = time_ms(work, warmup, iterations)
    return {"ms": ms, "tflops": 4 * m * n * k / (ms * 1e9), "what": f"dY @ W and {what}, cuBLAS"}


def torch_distill(case, warmup, iterations, generator):
    """Eager distillation loss: softmax of the teacher, log_softmax of the student (in f32), the
    cross-entropy against the teacher's probabilities, mixed with the next-token loss when the
    case's ce_weight > 0; forward + autograd backward to the student's logits."""
    rows, vocab, w = case["rows"], case["vocab"], case["ce_weight"]
    student = uniform((rows, vocab), torch.bfloat16, -4, 4, generator).requires_grad_(True)
    teacher = uniform((rows, vocab), torch.bfloat16, -4, 4, generator)
    labels = torch.tensor([(r * 2654435761) % vocab for r in range(rows)], device="cuda")
    F = torch.nn.functional

    def work(i):
        with torch.no_grad():
            p_t = F.softmax(teacher.float(), dim=-1)
        log_p = F.log_softmax(student.float(), dim=-1)
        loss = -(p_t * log_p).sum(dim=-1).mean()
        if w > 0:
            loss = (1 - w) * loss + w * F.nll_loss(log_p, labels)
        return torch.autograd.grad(loss, [student])

    ms = time_ms(work, warmup, iterations)
    return {"ms": ms, "gbps": case["bytes"] / (ms * 1e6), "what": "softmax / log_softmax (f32) KL + CE mix, forward + autograd backward"}


RUNNERS["binary_train"] = torch_binary_train
RUNNERS["distill"] = torch_distill


def torch_attention_ceiling(case, warmup, iterations, generator):
    """LM-Infinite's distance ceiling D with the Λ mask: RoPE (rotate-half, base 1e4) in eager
    PyTorch, then two compiled flex_attention passes, one over the pairs within D (R(i)q against
    R(j)k) and one over those beyond it (R(D)q against the raw keys), merged by their
    log-sum-exp."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "compiled" not in _FLEX:
        _FLEX["compiled"] = torch.compile(flex_attention)
    compiled = _FLEX["compiled"]
    b, s, h, d = case["batch"], case["seq"], case["heads"], case["head_dim"]
    window, global_, ceiling = case["window"], case["global"], case["ceiling"]
    warmup, iterations = case.get("warmup", warmup), case.get("iterations", iterations)
    backward = case["direction"] == "fwd+bwd"
    q, k, v = (uniform((b, h, s, d), torch.bfloat16, -1, 1, generator).requires_grad_(backward) for _ in range(3))
    d_out = uniform((b, h, s, d), torch.bfloat16, -1, 1, generator)
    theta = 1e4 ** (-torch.arange(0, d, 2, device="cuda", dtype=torch.float64) / d)

    def rotate(x, positions):
        angles = positions[:, None].double() * theta[None, :]
        cos, sin = angles.cos().float(), angles.sin().float()
        x1, x2 = x[..., : d // 2].float(), x[..., d // 2 :].float()
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).to(x.dtype)

    def within(b_, h_, i, j):
        return (i >= j) & ((i - j < window) | (j < global_)) & (i - j <= ceiling)

    def beyond(b_, h_, i, j):
        return (i >= j) & ((i - j < window) | (j < global_)) & (i - j > ceiling)

    masks = [create_block_mask(mod, None, None, s, s, device="cuda") for mod in (within, beyond)]
    positions = torch.arange(s, device="cuda")
    at_ceiling = torch.full((s,), ceiling, device="cuda")

    def attend():
        q_rot, k_rot, q_lim = rotate(q, positions), rotate(k, positions), rotate(q, at_ceiling)
        out_a, lse_a = compiled(q_rot, k_rot, v, block_mask=masks[0], return_lse=True)
        out_b, lse_b = compiled(q_lim, k, v, block_mask=masks[1], return_lse=True)
        top = torch.maximum(lse_a, lse_b)
        w_a, w_b = (lse_a - top).exp()[..., None], (lse_b - top).exp()[..., None]
        return ((out_a.float() * w_a + out_b.float() * w_b) / (w_a + w_b)).to(q.dtype)

    def work(i):
        out = attend()
        if backward:
            torch.autograd.grad(out, (q, k, v), d_out)

    ms = time_ms(work, warmup, iterations)
    flop = case["tflops"] * case["ms"] * 1e9
    return {"ms": ms, "tflops": flop / (ms * 1e9), "what": "eager RoPE + 2 compiled flex_attention passes, merged"}


def torch_sltrain(case, warmup, iterations, generator):
    """The reference SLTrain layer in eager PyTorch: W = c·B@A with s scattered onto a random
    support of the case's density, F.linear, and autograd for x, A, B, s and the bias."""
    dtype = DTYPES[case["dtype"]]
    m, d, r = case["m"], case["d"], case["rank"]
    nnz = int(case["density"] * d * d)
    scale = case["alpha"] / r
    idx = torch.randperm(d * d, device="cuda", generator=generator)[:nnz].sort().values
    a = uniform((r, d), dtype, -0.02, 0.02, generator).requires_grad_()
    b = uniform((d, r), dtype, -0.05, 0.05, generator).requires_grad_()
    s = uniform((nnz,), dtype, -0.02, 0.02, generator).requires_grad_()
    bias = uniform((d,), dtype, -0.02, 0.02, generator).requires_grad_()
    x = uniform((m, d), dtype, -1, 1, generator).requires_grad_()
    dy = uniform((m, d), dtype, -1, 1, generator)

    def work(i):
        w = (scale * (b @ a)).flatten().scatter_add(0, idx, s).view(d, d)
        y = torch.nn.functional.linear(x, w, bias)
        torch.autograd.grad(y, (x, a, b, s, bias), dy)

    ms = time_ms(work, warmup, iterations)
    return {"ms": ms, "tflops": 6 * m * d * d / (ms * 1e9), "what": "eager c*B@A + scatter_add(s), F.linear, autograd"}


RUNNERS.update({"attention_ceiling": torch_attention_ceiling, "sltrain": torch_sltrain})


def compare(report, generator):
    """Runs PyTorch on every case of a tessera report; returns the cases with "torch" filled in.
    A case without a PyTorch counterpart, or whose PyTorch run fails, keeps its tessera numbers
    and says why it has no anchor, so that one broken anchor does not lose the whole table."""
    warmup, iterations = report["warmup"], report["iterations"]
    rows = []
    for case in report["results"]:
        runner = RUNNERS.get(case["kind"])
        if runner is None:
            case["torch_error"] = f"no PyTorch runner for kind {case['kind']!r}"
            continue
        try:
            anchor = runner(case, warmup, iterations, generator)
        except Exception as error:  # an anchor that cannot run is reported, not fatal
            case["torch_error"] = f"{type(error).__name__}: {error}"
            print(f"torch_compare: {case['name']}: {case['torch_error']}", file=sys.stderr)
            continue
        finally:
            torch.cuda.empty_cache()
        case["torch"] = anchor
        case["speedup_vs_torch"] = anchor["ms"] / case["ms"]
        rows.append(case)
    return rows


def print_table(report, rows):
    print(f"\n{report['device']} ({report['kernel_image']}), torch {torch.__version__}, medians of {report['iterations']} runs")
    print(f"{'case':<46} {'tessera ms':>10} {'torch ms':>10} {'tessera':>12} {'torch':>12} {'speedup':>8}")
    for case in rows:
        unit, key = ("TFLOP/s", "tflops") if "tflops" in case else ("GB/s", "gbps")
        print(
            f"{case['name']:<46} {case['ms']:>10.3f} {case['torch']['ms']:>10.3f} "
            f"{case[key]:>7.1f} {unit:<4} {case['torch'][key]:>7.1f} {unit:<4} {case['speedup_vs_torch']:>7.3f}x"
        )


def print_backends(rows):
    """TFLOP/s of each PyTorch backend beside tessera's, for the cases that ran several."""
    rows = [case for case in rows if "backends" in case.get("torch", {})]
    if not rows:
        return
    names = sorted({name for case in rows for name in case["torch"]["backends"]})
    print(f"\n{'case (TFLOP/s)':<46} {'tessera':>8} " + " ".join(f"{n:>8}" for n in names))
    for case in rows:
        cells = [case["torch"]["backends"].get(n, {}).get("tflops") for n in names]
        print(f"{case['name']:<46} {case['tflops']:>8.1f} " + " ".join("       -" if c is None else f"{c:>8.1f}" for c in cells))


def alternate(binary, only, rounds, generator):
    """tessera and PyTorch taking turns, `rounds` times, so that clock and thermal drift fall on
    both sides alike; returns every round's report and the per-case median of the ratios."""
    reports = []
    with tempfile.TemporaryDirectory() as folder:
        for round_index in range(rounds):
            path = os.path.join(folder, f"round{round_index}.json")
            command = [binary, "bench", "--json", path] + (["--only", only] if only else [])
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            with open(path) as f:
                report = json.load(f)
            compare(report, generator)
            reports.append(report)
    summary = []
    for index, case in enumerate(reports[0]["results"]):
        measured = [r["results"][index] for r in reports if "speedup_vs_torch" in r["results"][index]]
        if not measured:
            continue
        ratios = sorted(m["speedup_vs_torch"] for m in measured)
        summary.append({
            "name": case["name"],
            "tessera_ms": statistics.median(m["ms"] for m in measured),
            "torch_ms": statistics.median(m["torch"]["ms"] for m in measured),
            "speedup_median": statistics.median(ratios),
            "speedup_min": ratios[0],
            "speedup_max": ratios[-1],
        })
    return reports, summary


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tessera", help="JSON written by `tessera bench --json`")
    parser.add_argument("--tessera-bin", help="a tessera binary: run its bench and PyTorch in turns (--rounds)")
    parser.add_argument("--rounds", type=int, default=5, help="turns each, with --tessera-bin")
    parser.add_argument("--only", help="op kinds to bench, with --tessera-bin (e.g. matmul)")
    parser.add_argument("--out", help="where to write the combined JSON")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("torch_compare: PyTorch sees no CUDA device")
    if (args.tessera is None) == (args.tessera_bin is None):
        sys.exit("torch_compare: give either --tessera FILE or --tessera-bin BINARY")
    generator = torch.Generator(device="cuda").manual_seed(0)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    meta = {"version": torch.__version__, "device": torch.cuda.get_device_name()}

    if args.tessera_bin:
        reports, summary = alternate(args.tessera_bin, args.only, args.rounds, generator)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"date": stamp, "torch": meta, "summary": summary, "rounds": reports}, f, indent=2)
        print(f"\n{reports[0]['device']}, torch {torch.__version__}: tessera and PyTorch in {args.rounds} alternating rounds")
        print(f"{'case':<46} {'tessera ms':>10} {'torch ms':>10} {'speedup median':>15} {'min':>7} {'max':>7}")
        for row in summary:
            print(
                f"{row['name']:<46} {row['tessera_ms']:>10.3f} {row['torch_ms']:>10.3f} "
                f"{row['speedup_median']:>14.3f}x {row['speedup_min']:>6.3f}x {row['speedup_max']:>6.3f}x"
            )
        return

    with open(args.tessera) as f:
        report = json.load(f)
    rows = compare(report, generator)
    report["torch"] = meta
    report["date"] = stamp
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    print_table(report, rows)
    print_backends(rows)


if __name__ == "__main__":
    main()


def torch_attention_decode(case, warmup, iterations, generator):
    """SDPA of one query per head against the whole cache (the last query sees every key)."""
    batch, heads, d, keys = case["batch"], case["heads"], case["head_dim"], case["keys"]
    q = uniform((batch, heads, 1, d), torch.bfloat16, -1, 1, generator)
    k = uniform((batch, heads, keys, d), torch.bfloat16, -1, 1, generator)
    v = uniform((batch, heads, keys, d), torch.bfloat16, -1, 1, generator)

    def work(i):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    ms = time_ms(work, warmup, iterations)
    return {"ms": ms, "gbps": 4 * keys * batch * heads * d / (ms * 1e6), "what": "F.scaled_dot_product_attention, 1 query"}


RUNNERS["attention_decode"] = torch_attention_decode
