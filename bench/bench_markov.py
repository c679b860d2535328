"""Microbenchmark of torch.ops.dspark.markov_draft against the PyTorch reference.

    python bench/bench_markov.py [--device cpu|cuda] [--quick] [--no-compile] [--out DIR]

For each (Vd, B) with K = 7, r = 256, bfloat16 U/W1/W2, half the requests sampled
(T = 0.8) and half greedy, in full mode and in candidate mode (c = 64): the median time of
one call (cold cache, see bench/common.py) and per step (/ K), the bytes a step must move
(full: W2 read + U read + z written; candidate: U read + z written + the B x c gathered
W2 rows), the time of a device copy moving the same bytes (a copy of half of them: it
reads and writes), their ratio, and the speedup over dspark_ext.reference.markov_draft
in eager mode and under torch.compile. DESIGN.md targets (H100/H200): full mode, per step
<= 1.25x the copy; >= 5x the eager reference at B = 64, Vd = 151936; candidate mode
(c = 64) <= 1.25x reading U_k and writing z_k. CPU: >= 2x the eager reference at
Vd = 32000, B = 8. Writes JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import dspark_ext  # noqa: E402,F401
from dspark_ext import ops, reference  # noqa: E402

RANK, STEPS, CANDIDATES = 256, 7, 64


def make_inputs(batch, vocab, device, generator, dtype=torch.bfloat16):
    """Backbone logits shaped like an LM's (a few large, most far below), DSpark-sized weights."""
    u = (torch.randn(batch, STEPS, vocab, generator=generator) * 3.0 - 4.0).to(device, dtype)
    anchor = torch.randint(0, vocab, (batch,), generator=generator).to(device)
    w1 = (torch.randn(vocab, RANK, generator=generator) * 0.06).to(device, dtype)
    w2 = (torch.randn(vocab, RANK, generator=generator) * 0.06).to(device, dtype)
    temperature = torch.where(torch.arange(batch) % 2 == 0, 0.8, 0.0).to(device)
    seed = torch.randint(0, 2**62, (batch,), generator=generator).to(device)
    offset = torch.arange(batch, dtype=torch.int64).to(device)
    return u, anchor, w1, w2, temperature, seed, offset, None


def step_bytes(batch, vocab, candidates):
    """Bytes one step moves (2-byte elements)."""
    if candidates is None:
        return 2 * (vocab * RANK + 2 * batch * vocab)
    return 2 * (2 * batch * vocab + batch * candidates * RANK)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a few shapes, fewer repeats")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile reference")
    parser.add_argument("--out", default=os.path.join(common.REPO_ROOT, "bench", "out"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    started = time.time()
    if device.type == "cuda":
        if args.quick:
            shapes = [(151936, b) for b in (1, 64, 128)]
        else:
            shapes = [(v, b) for v in (32000, 129280, 151936, 163840) for b in (1, 8, 32, 64, 128, 256)]
        reps, warmup, ref_reps = (10, 2, 3) if args.quick else (30, 3, 5)
    else:
        shapes = [(32000, 8)] if args.quick else [(32000, b) for b in (1, 8, 32)] + [(151936, 8)]
        reps, warmup, ref_reps = (3, 1, 2) if args.quick else (5, 1, 3)
    timer = common.ColdTimer(device)
    copies = common.CopyBaseline(timer)
    generator = torch.Generator().manual_seed(0)
    compiled = None
    if not args.no_compile:
        compiled = torch.compile(reference.markov_draft, dynamic=False)
    records = []
    for vocab, batch in shapes:
        inputs = make_inputs(batch, vocab, device, generator)
        for candidates in (None, CANDIDATES):
            def run_op():
                return ops.markov_draft(*inputs, num_candidates=candidates)

            def run_ref():
                return reference.markov_draft(*inputs, num_candidates=candidates)

            op_us = timer.median_us(run_op, reps, warmup)
            ref_us = timer.median_us(run_ref, ref_reps, 1)
            compile_us = None
            if compiled is not None:
                try:
                    compile_us = timer.median_us(lambda: compiled(*inputs, num_candidates=candidates), ref_reps, 1)
                except Exception as error:  # noqa: BLE001  (a compile failure must not lose the rest)
                    print(f"bench_markov: torch.compile of the reference failed: {error!r}", file=sys.stderr)
                    compiled = None
            nbytes = step_bytes(batch, vocab, candidates)
            copy_us = copies.time_us(nbytes // 2, reps, warmup)
            step_us = op_us / STEPS
            records.append(dict(
                vocab=vocab, batch=batch, steps=STEPS, rank=RANK, dtype="bf16",
                mode="full" if candidates is None else f"candidates-{candidates}",
                step_bytes=nbytes, op_us=op_us, step_us=step_us, copy_us=copy_us,
                step_vs_copy=step_us / copy_us, gbps=nbytes / (step_us * 1e3),
                reference_us=ref_us, speedup_vs_reference=ref_us / op_us,
                compiled_reference_us=compile_us,
                speedup_vs_compiled=None if compile_us is None else compile_us / op_us))
            print(f"  Vd={vocab} B={batch} {records[-1]['mode']}: op {op_us:.0f} µs, reference {ref_us:.0f} µs",
                  file=sys.stderr)
        del inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()

    info = common.machine_info(device)
    info["elapsed_s"] = round(time.time() - started, 1)

    def pick(vocab, batch, mode):
        return next((r for r in records if r["vocab"] == vocab and r["batch"] == batch and r["mode"] == mode), None)

    summary = {}
    if device.type == "cuda":
        target = pick(151936, 128, "full")
        if target:
            summary["full_step_vs_copy_B128_V151936"] = round(target["step_vs_copy"], 3)
        target = pick(151936, 64, "full")
        if target:
            summary["full_speedup_vs_eager_B64_V151936"] = round(target["speedup_vs_reference"], 2)
        target = pick(151936, 64, f"candidates-{CANDIDATES}")
        if target:
            summary["candidate_step_vs_copy_B64_V151936"] = round(target["step_vs_copy"], 3)
    else:
        target = pick(32000, 8, "full")
        if target:
            summary["cpu_speedup_vs_eager_B8_V32000"] = round(target["speedup_vs_reference"], 2)

    headers = ["Vd", "B", "mode", "call µs", "step µs", "step MB", "copy µs", "step/copy", "eager ref µs",
               "× eager", "compiled ref µs", "× compiled"]
    rows = [[r["vocab"], r["batch"], r["mode"], r["op_us"], r["step_us"], r["step_bytes"] / 1e6, r["copy_us"],
             r["step_vs_copy"], r["reference_us"], r["speedup_vs_reference"], r["compiled_reference_us"],
             r["speedup_vs_compiled"]] for r in records]

    def plot(path):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for mode, marker in (("full", "o-"), (f"candidates-{CANDIDATES}", "s-")):
            for vocab in sorted({r["vocab"] for r in records}):
                sel = [r for r in records if r["vocab"] == vocab and r["mode"] == mode]
                if sel:
                    ax.plot([r["batch"] for r in sel], [r["step_vs_copy"] for r in sel], marker,
                            label=f"{mode} Vd={vocab}")
        ax.axhline(1.25, color="gray", ls=":", label="target 1.25× copy")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"batch B (K = {STEPS}, r = {RANK}, bf16)")
        ax.set_ylabel("step time / copy of the step's bytes")
        ax.set_title(f"markov_draft on {info['device_name'][:40]}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)

    title = f"markov_draft on {info['device_name']} (torch {info['torch']}, commit {info['git_commit']})"
    common.write_results("markov", args.out, device, info, summary, records, plot, title,
                         common.markdown_table(headers, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
