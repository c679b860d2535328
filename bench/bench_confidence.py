"""Microbenchmark of torch.ops.dspark.confidence against the PyTorch reference.

    python bench/bench_confidence.py [--device cpu|cuda] [--quick] [--out DIR]

For each (B, K, d) with r = 256, Vt = 151936, bfloat16 hidden states: the median time of
the op (cold cache, see bench/common.py), the bytes it must read (hidden, the gathered W1
rows, the weight), the effective bandwidth, the time of a copy of the same bytes, and the
speedup over dspark_ext.reference.confidence (torch eager). DESIGN.md target: one launch,
<= 10 us at B = 256, K = 8, d = 4096 on an H100/H200. Writes JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import dspark_ext  # noqa: E402,F401
from dspark_ext import ops, reference  # noqa: E402

RANK, VOCAB = 256, 151936


def make_inputs(batch, steps, hidden, dtype, device, generator):
    h = torch.randn(batch, steps, hidden, generator=generator).to(device, dtype)
    prev = torch.randint(0, VOCAB, (batch, steps), generator=generator).to(device)
    w1 = (torch.randn(VOCAB, RANK, generator=generator) * 0.05).to(device, dtype)
    weight = (torch.randn(hidden + RANK, generator=generator) * 0.02).to(device)
    bias = torch.zeros((), device=device)
    temps = torch.ones(steps, device=device)
    return h, prev, w1, weight, bias, temps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=os.path.join(common.REPO_ROOT, "bench", "out"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        shapes = [(b, 8, 4096) for b in (1, 8, 32, 64, 128, 256)] + [(256, 8, 7168), (256, 4, 4096)]
        reps, warmup = (20, 3) if args.quick else (50, 5)
    else:
        shapes = [(b, 8, 4096) for b in (1, 8, 32, 64)] if not args.quick else [(8, 8, 4096)]
        reps, warmup = 5, 1
    timer = common.ColdTimer(device)
    copies = common.CopyBaseline(timer)
    generator = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16
    records = []
    for batch, steps, hidden in shapes:
        inputs = make_inputs(batch, steps, hidden, dtype, device, generator)
        nbytes = (batch * steps * (hidden + RANK) * 2) + (hidden + RANK) * 4 + batch * steps * 8 * 3
        op_us = timer.median_us(lambda: ops.confidence(*inputs), reps, warmup)
        ref_us = timer.median_us(lambda: reference.confidence(*inputs), max(3, reps // 5), 1)
        copy_us = copies.time_us(nbytes, reps, warmup)
        records.append(dict(batch=batch, steps=steps, hidden=hidden, rank=RANK, dtype="bf16", bytes=nbytes,
                            op_us=op_us, reference_us=ref_us, copy_us=copy_us,
                            gbps=nbytes / (op_us * 1e3), speedup_vs_reference=ref_us / op_us))
    info = common.machine_info(device)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"confidence_{device.type}.json")
    with open(path, "w") as f:
        json.dump({"machine": info, "records": records}, f, indent=2)
    headers = ["B", "K", "d", "op µs", "reference µs", "speedup", "GB/s", "copy µs (same bytes)"]
    rows = [[r["batch"], r["steps"], r["hidden"], r["op_us"], r["reference_us"], r["speedup_vs_reference"],
             r["gbps"], r["copy_us"]] for r in records]
    print(f"confidence on {info['device_name']} (torch {info['torch']}, commit {info['git_commit']})")
    print(common.markdown_table(headers, rows))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        sel = [r for r in records if r["hidden"] == 4096 and r["steps"] == 8]
        ax.plot([r["batch"] for r in sel], [r["op_us"] for r in sel], "o-", label="dspark confidence")
        ax.plot([r["batch"] for r in sel], [r["reference_us"] for r in sel], "s--", label="torch reference")
        if device.type == "cuda":
            ax.axhline(10.0, color="gray", ls=":", label="target 10 µs")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch B (K = 8, d = 4096)")
        ax.set_ylabel("µs per call")
        ax.set_title(f"confidence on {info['device_name'][:40]}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, f"confidence_{device.type}.png"), dpi=120)
    except ImportError:
        print("matplotlib missing: no plot")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
