"""Benchmark of dspark_ext.scheduler.LoadAwareScheduler.plan: time per round.

Run from the repository root:
    PYTHONPATH=. python bench/bench_scheduler.py --device cpu
    python bench/bench_scheduler.py --device cuda [--batches 1 256] [--reps 2000] [--out DIR]
    python bench/bench_scheduler.py --device cpu --mixed-only [--no-compile]

Points: B in {1, 8, 32, 64, 128, 256}, K = 8, modes early_stop / capacity / fixed.
Input: survival = cumulative product along K of U(0.5, 1) (seeded), float32 on the device;
cost profile (synthetic, shape of a real target): 10 ms flat up to 512 verified tokens,
then linear to 80 ms at 4096 tokens, so plans are neither "verify all" nor "verify none".

Mixed-batch case (an engine step): B = 256, K = 8, of which 8 requests are in prefill with
a 256-token chunk each (2048 prefill tokens, emitting nothing), so base_tokens =
248 + 2048; max_tokens = 4096 (room for 1800 of the 1984 drafts); the same verify profile
with CUDA-graph capture sizes 1, 2, 4, 8, 16, ..., 512 (step 8 from 8) and a draft cost of
2 ms at 1 request to 4 ms at 256. base_tokens, emitting and max_tokens are device
tensors (the no-sync path). Variants: CPU eager and torch.compile (inductor, compiled
once before timing), CUDA eager and graph replay.

Timing (warm caches: the scheduler's inputs are tiny and stay cached in practice):
- CPU: time.perf_counter around each plan call; median of --reps runs after --warmup.
- CUDA, "eager": a pair of CUDA events around each plan call (the GPU timeline from the
  first to the last kernel of the call, which includes waiting for the host to launch
  them: for launch-bound work like this, that is the latency a decoding loop sees).
- CUDA, "graph": the plan captured once in a CUDA graph, events around graph.replay().
The median is reported in µs. DESIGN.md target: <= 50 µs per plan at B = 256 on a GPU.

Writes DIR/scheduler_<device>.json (machine info, date, git commit) and
DIR/scheduler_<device>.png, prints a markdown table on stdout (progress on stderr).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (bench/common.py)

sys.path.insert(0, common.REPO_ROOT)
from dspark_ext.scheduler import MODES, CostProfile, LoadAwareScheduler  # noqa: E402

BATCHES = (1, 8, 32, 64, 128, 256)
MAX_DRAFT = 8
TARGET_US = 50.0
TARGET_BATCH = 256


def bench_cost() -> CostProfile:
    """10 ms up to 512 tokens, then linear to 80 ms at 4096 tokens."""
    return CostProfile([1, 512, 4096], [0.010, 0.010, 0.080], metadata={"synthetic": True})


def mixed_cost() -> CostProfile:
    """bench_cost with capture sizes up to 512 and a draft cost (2 ms at 1 request, 4 ms at 256)."""
    capture = [1, 2, 4] + list(range(8, 513, 8))
    return CostProfile([1, 512, 4096], [0.010, 0.010, 0.080], metadata={"synthetic": True}, capture_sizes=capture,
                       draft_requests=[1, 256], draft_seconds=[0.002, 0.004])


MIXED_BATCH, MIXED_PREFILL_REQUESTS, MIXED_CHUNK, MIXED_MAX_TOKENS = 256, 8, 256, 4096


def mixed_arguments(device: torch.device, seed: int) -> tuple:
    """(survival, base_tokens, emitting, max_tokens) of the mixed-batch case, on the device."""
    survival = make_survival(MIXED_BATCH, device, seed)
    emitting = torch.ones(MIXED_BATCH, dtype=torch.bool)
    emitting[::MIXED_BATCH // MIXED_PREFILL_REQUESTS] = False  # requests 0, 32, ... are in prefill
    decoding = MIXED_BATCH - MIXED_PREFILL_REQUESTS
    base = torch.tensor(decoding + MIXED_PREFILL_REQUESTS * MIXED_CHUNK)
    return survival, base.to(device), emitting.to(device), torch.tensor(MIXED_MAX_TOKENS).to(device)


def make_survival(batch: int, device: torch.device, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + batch)
    conf = torch.rand(batch, MAX_DRAFT, generator=gen) * 0.5 + 0.5
    return torch.cumprod(conf, dim=1).to(device)


def time_cpu(fn, reps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        begin = time.perf_counter()
        fn()
        times.append((time.perf_counter() - begin) * 1e6)
    return times


def time_cuda(fn, reps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) * 1e3 for start, end in events]


def capture(scheduler: LoadAwareScheduler, *arguments: torch.Tensor):
    """(graph, output) of one plan captured in a CUDA graph, after warm-up on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            scheduler.plan(*arguments)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = scheduler.plan(*arguments)
    return graph, out


def run_point(batch: int, mode: str, device: torch.device, args, mixed: bool = False) -> list[dict]:
    if mixed:
        arguments = mixed_arguments(device, args.seed)
        scheduler = LoadAwareScheduler(mixed_cost(), MAX_DRAFT, mode, fixed_len=4)
    else:
        arguments = (make_survival(batch, device, args.seed),)
        scheduler = LoadAwareScheduler(bench_cost(), MAX_DRAFT, mode, fixed_len=4)
    lengths = scheduler.plan(*arguments)
    base = {"case": "mixed" if mixed else "grid", "B": batch, "K": MAX_DRAFT, "mode": mode,
            "mean_len": float(lengths.float().mean()), "drafts": int(lengths.sum())}
    records = []
    if device.type == "cpu":
        times = time_cpu(lambda: scheduler.plan(*arguments), args.reps, args.warmup)
        records.append(dict(base, variant="eager", us=statistics.median(times), us_min=min(times), reps=len(times)))
        if mixed and args.compile:
            scheduler.reset()
            compiled = torch.compile(scheduler.plan)
            begin = time.perf_counter()
            compiled(*arguments)
            compile_s = time.perf_counter() - begin
            times = time_cpu(lambda: compiled(*arguments), args.reps, args.warmup)
            scheduler.reset()
            eager = LoadAwareScheduler(mixed_cost(), MAX_DRAFT, mode, fixed_len=4)
            same = all(torch.equal(compiled(*arguments), eager.plan(*arguments)) for _ in range(3))
            records.append(dict(base, variant="compiled", us=statistics.median(times), us_min=min(times),
                                reps=len(times), compile_s=round(compile_s, 1), compiled_matches_eager=same))
        return records
    times = time_cuda(lambda: scheduler.plan(*arguments), args.reps, args.warmup)
    records.append(dict(base, variant="eager", us=statistics.median(times), us_min=min(times), reps=len(times)))
    # host wall time per call, many calls back to back (throughput of the launch path)
    torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(args.reps):
        scheduler.plan(*arguments)
    torch.cuda.synchronize()
    records[-1]["host_us_per_call"] = (time.perf_counter() - begin) * 1e6 / args.reps
    graph, out = capture(scheduler, *arguments)
    times = time_cuda(graph.replay, args.reps, args.warmup)
    torch.cuda.synchronize()
    record = dict(base, variant="graph", us=statistics.median(times), us_min=min(times), reps=len(times))
    record["graph_matches_eager"] = (mode == "capacity") or bool(torch.equal(out, lengths))
    records.append(record)
    return records


def table(records: list[dict]) -> str:
    records = [r for r in records if r["case"] == "grid"]
    if not records:
        return ""
    variants = sorted({r["variant"] for r in records}, key=["eager", "graph"].index)
    headers = ["B", "K"] + [f"{mode} {v} µs" for mode in MODES for v in variants] + ["mean L (early_stop)"]
    rows = []
    for batch in sorted({r["B"] for r in records}):
        row = [batch, MAX_DRAFT]
        for mode in MODES:
            for variant in variants:
                hit = [r for r in records if r["B"] == batch and r["mode"] == mode and r["variant"] == variant]
                row.append(hit[0]["us"] if hit else None)
        early = [r for r in records if r["B"] == batch and r["mode"] == "early_stop"]
        row.append(early[0]["mean_len"] if early else None)
        rows.append(row)
    return common.markdown_table(headers, rows)


def mixed_table(records: list[dict]) -> str:
    records = [r for r in records if r["case"] == "mixed"]
    if not records:
        return ""
    headers = ["mode", "variant", "µs (median)", "µs (min)", "drafts admitted", "mean L"]
    rows = [[r["mode"], r["variant"], r["us"], r["us_min"], r["drafts"], r["mean_len"]] for r in records]
    return (f"Mixed batch: B = {MIXED_BATCH}, K = {MAX_DRAFT}, {MIXED_PREFILL_REQUESTS} requests in prefill "
            f"({MIXED_PREFILL_REQUESTS * MIXED_CHUNK} prefill tokens), max_tokens = {MIXED_MAX_TOKENS}, "
            f"capture sizes up to 512, draft cost\n\n" + common.markdown_table(headers, rows))


def plot(records: list[dict], info: dict, path: str, device: torch.device) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    styles = {"eager": "-", "graph": "--"}
    colors = {"early_stop": "tab:blue", "capacity": "tab:orange", "fixed": "tab:green"}
    for mode in MODES:
        for variant in styles:
            points = sorted((r["B"], r["us"]) for r in records
                            if r["case"] == "grid" and r["mode"] == mode and r["variant"] == variant)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], styles[variant], color=colors[mode],
                        marker="o", markersize=4, label=f"{mode} ({variant})")
    if device.type == "cuda":
        ax.axhline(TARGET_US, color="tab:red", linestyle=":", linewidth=1, label=f"target {TARGET_US:g} µs")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size B (K = 8)")
    ax.set_ylabel("µs per plan (median)")
    ax.set_title(f"LoadAwareScheduler.plan on {info['device_name']} ({info['date'][:10]}, "
                 f"{info.get('git_commit') or 'no commit'})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--reps", type=int, default=None, help="timed runs per point (cuda 2000, cpu 300)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (cuda 50, cpu 20)")
    parser.add_argument("--threads", type=int, default=None, help="CPU: torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mixed-only", action="store_true", help="only the mixed-batch case")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="CPU: skip the torch.compile variant of the mixed-batch case")
    parser.add_argument("--out", default=os.path.join(common.REPO_ROOT, "bench", "out"))
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_scheduler: no CUDA device visible", file=sys.stderr)
        return 2
    cuda = device.type == "cuda"
    if args.reps is None:
        args.reps = 2000 if cuda else 300
    if args.warmup is None:
        args.warmup = 50 if cuda else 20
    if args.threads:
        torch.set_num_threads(args.threads)

    info = common.machine_info(device)
    info["load_average_start"] = common.load_average()
    batches = [] if args.mixed_only else args.batches
    print(f"bench_scheduler: {len(batches) * len(args.modes)} + {len(args.modes)} mixed points on {info['device_name']} "
          f"(torch {info['torch']}, commit {info['git_commit']}, {torch.get_num_threads()} threads)", file=sys.stderr)
    records = []
    begin = time.perf_counter()
    points = [(batch, mode, False) for batch in batches for mode in args.modes]
    points += [(MIXED_BATCH, mode, True) for mode in args.modes]
    for batch, mode, mixed in points:
        for record in run_point(batch, mode, device, args, mixed):
            records.append(record)
            print(f"{'mixed ' if mixed else ''}B={batch} {mode} {record['variant']}: {record['us']:.1f} µs",
                  file=sys.stderr)
    info["elapsed_s"] = round(time.perf_counter() - begin, 1)
    info["load_average_end"] = common.load_average()
    info["settings"] = {k: v for k, v in vars(args).items() if k != "out"}
    info["cost_profile"] = {"tokens": bench_cost().tokens, "seconds": bench_cost().seconds}
    info["mixed_cost_profile"] = {"capture_sizes": mixed_cost().capture_sizes,
                                  "draft_requests": mixed_cost().draft_requests,
                                  "draft_seconds": mixed_cost().draft_seconds}

    summary = {}
    at_target = [r for r in records if r["B"] == TARGET_BATCH and r["case"] == "grid"]
    mixed = [r for r in records if r["case"] == "mixed"]
    if mixed:
        summary["mixed_us"] = {f"{r['mode']}/{r['variant']}": r["us"] for r in mixed}
    if at_target:
        summary["us_at_B256"] = {f"{r['mode']}/{r['variant']}": r["us"] for r in at_target}
        if cuda:
            best = {m: min(r["us"] for r in at_target if r["mode"] == m) for m in {r["mode"] for r in at_target}}
            summary[f"meets <= {TARGET_US:g} us at B = {TARGET_BATCH} (best variant)"] = {
                m: us <= TARGET_US for m, us in best.items()}

    common.write_results("scheduler", args.out, device, info, summary, records,
                         lambda path: plot(records, info, path, device),
                         f"LoadAwareScheduler.plan on {info['device_name']} — torch {info['torch']}, commit "
                         f"{info['git_commit']}, {info['date']}, {torch.get_num_threads()} threads",
                         "\n\n".join(t for t in (table(records), mixed_table(records)) if t))
    return 0


if __name__ == "__main__":
    sys.exit(main())
