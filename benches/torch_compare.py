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


RUNNERS = {"copy": torch_copy, "matmul": torch_matmul, "adamw": torch_adamw, "wavelet": torch_wavelet}
RUNNERS["binary"] = torch_binary


def compare(report, generator):
    """Runs PyTorch on every case of a tessera report; returns the cases with "torch" filled in."""
    warmup, iterations = report["warmup"], report["iterations"]
    for case in report["results"]:
        anchor = RUNNERS[case["kind"]](case, warmup, iterations, generator)
        case["torch"] = anchor
        case["speedup_vs_torch"] = anchor["ms"] / case["ms"]
        torch.cuda.empty_cache()
    return report["results"]


def print_table(report, rows):
    print(f"\n{report['device']} ({report['kernel_image']}), torch {torch.__version__}, medians of {report['iterations']} runs")
    print(f"{'case':<46} {'tessera ms':>10} {'torch ms':>10} {'tessera':>12} {'torch':>12} {'speedup':>8}")
    for case in rows:
        unit, key = ("TFLOP/s", "tflops") if "tflops" in case else ("GB/s", "gbps")
        print(
            f"{case['name']:<46} {case['ms']:>10.3f} {case['torch']['ms']:>10.3f} "
            f"{case[key]:>7.1f} {unit:<4} {case['torch'][key]:>7.1f} {unit:<4} {case['speedup_vs_torch']:>7.3f}x"
        )


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
        ratios = sorted(r["results"][index]["speedup_vs_torch"] for r in reports)
        summary.append({
            "name": case["name"],
            "tessera_ms": statistics.median(r["results"][index]["ms"] for r in reports),
            "torch_ms": statistics.median(r["results"][index]["torch"]["ms"] for r in reports),
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


if __name__ == "__main__":
    main()
