"""Benchmark of torch.ops.dspark.verify: effective bandwidth, fraction of a copy, and
speed-up over the PyTorch reference (dspark_ext.reference.verify).

Run from the repository root:
    PYTHONPATH=. python bench/bench_verify.py --device cpu
    python bench/bench_verify.py --device cuda [--quick] [--out DIR]
    python bench/bench_verify.py --device cuda --shapes 64:7:151936:bf16:plain 8:4:32000:fp32:greedy

Each point is padded target logits [B, K+1, V] with draft logits [B, K, V] and
num_draft = K for every request. Inputs: target logits ~ logit_scale * N(0, 1), draft
logits = target rows 0..K-1 + noise * N(0, 1), stored in the point's dtype; draft tokens
drawn from the stored draft logits at the point's temperature (greedy: their argmax).
Modes: plain (T = 1, no filter), topk_topp (top_k = 50, top_p = 0.9), topp (top_p = 0.9
only), greedy (T = 0).

Effective bytes are the fewest bytes the op must move: every target row, every draft row
(not in greedy mode, which needs no draft distribution) and the small per-request
tensors. GB/s = bytes / median time. The copy baseline copies as many bytes; its
bandwidth counts read + write (bench/common.py), so
    frac_copy_bw    = op GB/s / copy GB/s            (DESIGN.md target: >= 0.85)
    copy_time_ratio = copy time / op time = 2 * frac_copy_bw.
Writes DIR/verify_<device>.json and DIR/verify_<device>.png and prints a markdown table
on stdout (progress goes to stderr).
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
import dspark_ext  # noqa: E402
from dspark_ext import reference  # noqa: E402
from dspark_ext.ops import padded_target_offset  # noqa: E402

MODES = {
    # mode: (temperature, top_k, top_p); None = the argument is not passed
    "plain": (1.0, None, None),
    "topk_topp": (1.0, 50, 0.9),
    "topp": (1.0, None, 0.9),
    "greedy": (0.0, None, None),
}
VOCABS = (32000, 129280, 151936, 163840)
TARGET_ELEMENTS = 32 * 2**20  # DESIGN.md: >= 85 % of copy bandwidth from B*(K+1)*V >= 32 M
TARGET_FRAC = 0.85
TARGET_SPEEDUP = 10.0
TARGET_FILTER_SLOWDOWN = 3.0


# --------------------------------------------------------------------------- grids
def cuda_grid(quick: bool) -> list[tuple]:
    if quick:
        # plain, filtered and greedy at B in {1, 8, 64, 256} (the targets: >= 85 % of copy
        # bandwidth plain at B = 64, <= 25 us at B = 1, filtered <= 1.5x plain, greedy >= 90 %)
        return [(b, 7, 151936, "bf16", mode) for mode in ("plain", "topk_topp", "greedy") for b in (1, 8, 64, 256)]
    grid = [(b, 7, v, "bf16", "plain") for v in VOCABS for b in (1, 8, 32, 64, 128, 256)]
    grid += [(b, 7, v, "fp32", "plain") for v in (32000, 151936) for b in (1, 32, 128, 256)]
    grid += [(b, k, 151936, "bf16", "plain") for k in (4, 8) for b in (1, 32, 128, 256)]
    for mode in ("topk_topp", "greedy"):
        grid += [(b, 7, v, "bf16", mode) for v in (32000, 151936) for b in (1, 8, 64, 256)]
    grid += [(b, 7, 151936, "bf16", "topp") for b in (1, 64, 256)]
    grid += [(64, 7, 151936, "fp32", mode) for mode in ("topk_topp", "greedy")]
    return grid


def cpu_grid(quick: bool) -> list[tuple]:
    if quick:
        return [(8, 4, 32000, "fp32", "plain"), (8, 4, 32000, "bf16", "topk_topp"),
                (8, 4, 151936, "fp32", "greedy")]
    return [(b, 4, v, dtype, mode) for mode in ("plain", "topk_topp", "greedy") for dtype in ("fp32", "bf16")
            for v in (32000, 151936) for b in (1, 8, 32)]


def parse_shape(text: str) -> tuple:
    """B:K:V[:dtype[:mode]], e.g. 64:7:151936:bf16:plain."""
    parts = text.split(":")
    if not 3 <= len(parts) <= 5:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not B:K:V[:dtype[:mode]]")
    batch, max_draft, vocab = (int(p) for p in parts[:3])
    dtype = parts[3] if len(parts) > 3 else "bf16"
    mode = parts[4] if len(parts) > 4 else "plain"
    if dtype not in common.DTYPES:
        raise argparse.ArgumentTypeError(f"dtype {dtype!r} is not one of {sorted(common.DTYPES)}")
    if mode not in MODES:
        raise argparse.ArgumentTypeError(f"mode {mode!r} is not one of {sorted(MODES)}")
    return batch, max_draft, vocab, dtype, mode


# --------------------------------------------------------------------------- inputs
def input_bytes(batch: int, max_draft: int, vocab: int, dtype: torch.dtype, mode: str) -> int:
    """Fewest bytes verify must move for a padded point (see the module docstring)."""
    elt = torch.empty((), dtype=dtype).element_size()
    temperature, top_k, top_p = MODES[mode]
    total = batch * (max_draft + 1) * vocab * elt  # target rows
    if temperature > 0:
        total += batch * max_draft * vocab * elt  # draft rows
    total += batch * max_draft * 8  # draft_tokens
    total += batch * (8 + 4 + 4 + 8 + 8)  # target_offset, num_draft, temperature, seed, offset
    total += batch * ((4 if top_k is not None else 0) + (4 if top_p is not None else 0))
    total += batch * (max_draft + 1) * 8 + batch * 4  # outputs
    return total


def make_inputs(batch: int, max_draft: int, vocab: int, dtype: torch.dtype, mode: str, device: torch.device,
                args) -> tuple:
    """The verify arguments for one point, generated on the device in chunks of requests."""
    temperature, top_k, top_p = MODES[mode]
    gen = torch.Generator(device=device).manual_seed(args.seed)
    target = torch.empty(batch, max_draft + 1, vocab, dtype=dtype, device=device)
    draft = torch.empty(batch, max_draft, vocab, dtype=dtype, device=device)
    tokens = torch.empty(batch, max_draft, dtype=torch.int64, device=device)
    chunk = max(1, (16 * 2**20) // ((max_draft + 1) * vocab))
    for start in range(0, batch, chunk):
        stop = min(batch, start + chunk)
        rows = torch.randn(stop - start, max_draft + 1, vocab, generator=gen, device=device).mul_(args.logit_scale)
        target[start:stop] = rows
        noise = torch.randn(stop - start, max_draft, vocab, generator=gen, device=device)
        draft[start:stop] = rows[:, :max_draft].add_(noise.mul_(args.noise))
        del rows
        stored = draft[start:stop].float()  # sample from exactly the stored logits
        if temperature > 0:
            race = noise.exponential_(generator=gen).log_().neg_()  # -log E, E ~ Exp(1)
            tokens[start:stop] = (stored / temperature + race).argmax(dim=-1)
        else:
            tokens[start:stop] = stored.argmax(dim=-1)
        del stored, noise
    full = lambda value, dt: torch.full((batch,), value, dtype=dt, device=device)  # noqa: E731
    return (
        target.view(batch * (max_draft + 1), vocab),
        padded_target_offset(batch, max_draft, device=device),
        tokens,
        draft,
        full(max_draft, torch.int32),
        full(temperature, torch.float32),
        torch.arange(batch, dtype=torch.int64, device=device) + args.seed,
        full(12345, torch.int64),
        None if top_k is None else full(top_k, torch.int32),
        None if top_p is None else full(top_p, torch.float32),
    )


def first_request(inputs: tuple, max_draft: int) -> tuple:
    """The same arguments restricted to request 0 (to calibrate the reference's cost)."""
    target, offset_rows, tokens, draft, num_draft, temperature, seed, offset, top_k, top_p = inputs
    one = lambda t: None if t is None else t[:1]  # noqa: E731
    return (target[:max_draft + 1], offset_rows[:1], tokens[:1], one(draft), num_draft[:1], temperature[:1],
            seed[:1], offset[:1], one(top_k), one(top_p))


# --------------------------------------------------------------------------- reference
class ReferenceTimer:
    """Times dspark_ext.reference.verify where it is affordable.

    The reference loops over requests in Python, so its cost is about B times that of
    one request: one request is timed first (per V, K, dtype, mode) and a point is
    skipped when the prediction exceeds --ref-limit seconds or the remaining
    --ref-budget. Fewer repeats than the op; the median is reported.
    """

    def __init__(self, device: torch.device, limit_s: float, budget_s: float, reps: int):
        self.device = device
        self.limit_s = limit_s
        self.budget_s = budget_s
        self.reps = reps
        self.spent_s = 0.0
        self.per_request_us: dict[tuple, float] = {}

    def _run(self, inputs) -> tuple[float, tuple]:
        """One reference run: (µs, its outputs); the time counts against the budget."""
        result = []
        elapsed_us = common.wall_time_us(lambda: result.append(reference.verify(*inputs)), self.device)
        self.spent_s += elapsed_us * 1e-6
        return elapsed_us, result[0]

    def measure(self, key: tuple, inputs: tuple, batch: int, max_draft: int):
        """Returns (median µs or None, repeats, skip reason or None, reference outputs)."""
        if self.reps <= 0:
            return None, 0, "disabled (--no-ref)", None
        if key not in self.per_request_us:
            one = first_request(inputs, max_draft)
            self._run(one)  # warm-up
            self.per_request_us[key] = self._run(one)[0]
        predicted_s = self.per_request_us[key] * batch * 1e-6
        if predicted_s > self.limit_s:
            return None, 0, f"predicted {predicted_s:.1f} s > limit {self.limit_s:g} s", None
        remaining = self.budget_s - self.spent_s
        if predicted_s > remaining:
            return None, 0, f"reference time budget ({self.budget_s:g} s) spent", None
        reps = max(1, min(self.reps, int(remaining / max(predicted_s, 1e-6)), int(self.limit_s / max(predicted_s, 1e-6))))
        runs = [self._run(inputs) for _ in range(reps)]
        return statistics.median(t for t, _ in runs), reps, None, runs[-1][1]


# --------------------------------------------------------------------------- one point
def run_point(shape: tuple, device: torch.device, timer: common.ColdTimer, copies: common.CopyBaseline,
              refs: ReferenceTimer, args) -> dict:
    batch, max_draft, vocab, dtype_name, mode = shape
    dtype = common.DTYPES[dtype_name]
    temperature, top_k, top_p = MODES[mode]
    elt = torch.empty((), dtype=dtype).element_size()
    nbytes = input_bytes(batch, max_draft, vocab, dtype, mode)
    record = {
        "B": batch, "K": max_draft, "V": vocab, "dtype": dtype_name, "mode": mode, "layout": "padded",
        "draft_logits": True, "num_draft": max_draft, "temperature": temperature, "top_k": top_k, "top_p": top_p,
        "logit_scale": args.logit_scale, "noise": args.noise, "seed": args.seed,
        "elements": batch * (max_draft + 1) * vocab, "bytes": nbytes,
    }
    logits_bytes = (2 * max_draft + 1) * batch * vocab * elt
    generation_bytes = 3 * 4 * 16 * 2**20  # float32 temporaries of one chunk
    needed = max(2 * nbytes, logits_bytes + generation_bytes + 4 * (max_draft + 1) * vocab * 4)
    free = common.free_memory_bytes(device)
    if needed > 0.9 * free:
        record["skipped"] = f"needs ~{needed / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
        return record

    # The copy first, so that its buffers and the inputs are never alive together.
    copy_us = copies.time_us(nbytes, args.reps, args.warmup)
    inputs = make_inputs(batch, max_draft, vocab, dtype, mode, device, args)  # greedy too passes draft_logits

    op = lambda: torch.ops.dspark.verify(*inputs)  # noqa: E731
    reps = args.reps
    if device.type == "cpu":  # keep the CPU grid short: about --cpu-seconds per point
        once = common.wall_time_us(op, device)
        reps = max(3, min(args.reps, int(args.cpu_seconds * 1e6 / max(once, 1.0))))
    times = timer.run(op, reps, args.warmup)
    out_tokens, num_accepted = op()
    op_us = statistics.median(times)
    op_gbps = nbytes / (op_us * 1e3)
    copy_gbps = common.copy_bandwidth_gbps(nbytes, copy_us)
    record.update({
        "op_us": op_us, "op_us_min": min(times), "op_us_max": max(times), "op_reps": reps,
        "op_gbps": op_gbps, "copy_us": copy_us, "copy_gbps": copy_gbps,
        "frac_copy_bw": op_gbps / copy_gbps, "copy_time_ratio": copy_us / op_us,
        "mean_accepted": float(num_accepted.float().mean()),
        "invalid_requests": int((num_accepted < 0).sum()),
    })

    ref_us, ref_reps, ref_skip, ref_out = refs.measure((vocab, max_draft, dtype_name, mode), inputs, batch, max_draft)
    record.update({"ref_us": ref_us, "ref_reps": ref_reps, "ref_skipped": ref_skip,
                   "speedup": None if ref_us is None else ref_us / op_us})
    if ref_out is not None:
        record["matches_reference"] = bool(torch.equal(ref_out[0], out_tokens) and torch.equal(ref_out[1], num_accepted))
    else:
        record["matches_reference"] = None
    if device.type == "cuda":
        record["meets_bw_target"] = (record["frac_copy_bw"] >= TARGET_FRAC
                                     if record["elements"] >= TARGET_ELEMENTS else None)
    del inputs, out_tokens, num_accepted, ref_out
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record


# --------------------------------------------------------------------------- report
def summarize(records: list[dict], device: torch.device) -> dict:
    done = [r for r in records if "op_us" in r]
    large = [r for r in done if r["elements"] >= TARGET_ELEMENTS]
    summary = {
        "points": len(records), "measured": len(done), "skipped": len(records) - len(done),
        "copy_gbps_large_median": statistics.median([r["copy_gbps"] for r in large]) if large else None,
        "frac_copy_bw_large_min": min(r["frac_copy_bw"] for r in large) if large else None,
        "speedup_min": min((r["speedup"] for r in done if r["speedup"] is not None), default=None),
        "reference_mismatches": sum(1 for r in done if r.get("matches_reference") is False),
    }
    plain = {(r["B"], r["K"], r["V"], r["dtype"]): r["op_us"] for r in done if r["mode"] == "plain"}
    filtered = [(r["op_us"] / plain[key], r) for r in done if r["mode"] in ("topk_topp", "topp")
                for key in [(r["B"], r["K"], r["V"], r["dtype"])] if key in plain]
    summary["filter_slowdown_max"] = max((s for s, _ in filtered), default=None)
    for slowdown, r in filtered:
        r["slowdown_vs_plain"] = slowdown
    if device.type == "cuda":
        summary["targets"] = {
            f"frac_copy_bw >= {TARGET_FRAC} at B*(K+1)*V >= 32M": None if not large else all(
                r["frac_copy_bw"] >= TARGET_FRAC for r in large),
            f"speedup >= {TARGET_SPEEDUP:g}x vs reference": None if summary["speedup_min"] is None else
            summary["speedup_min"] >= TARGET_SPEEDUP,
            f"top-k/top-p <= {TARGET_FILTER_SLOWDOWN:g}x plain": None if summary["filter_slowdown_max"] is None else
            summary["filter_slowdown_max"] <= TARGET_FILTER_SLOWDOWN,
        }
    return summary


def table(records: list[dict]) -> str:
    headers = ["B", "K", "V", "dtype", "mode", "B(K+1)V (M)", "MB", "op µs", "GB/s", "copy GB/s (r+w)",
               "% copy BW", "t_copy/t_op", "ref ms", "speedup", "vs plain", "accepted", "= ref"]
    rows = []
    order = lambda r: (list(MODES).index(r["mode"]), r["dtype"], r["K"], r["V"], r["B"])  # noqa: E731
    for r in sorted(records, key=order):
        if "op_us" not in r:
            rows.append([r["B"], r["K"], r["V"], r["dtype"], r["mode"], r["elements"] / 2**20, r["bytes"] / 1e6,
                         f"skipped: {r['skipped']}"] + [None] * 9)
            continue
        match = {True: "yes", False: "NO", None: None}[r.get("matches_reference")]
        rows.append([r["B"], r["K"], r["V"], r["dtype"], r["mode"], r["elements"] / 2**20, r["bytes"] / 1e6,
                     r["op_us"], r["op_gbps"], r["copy_gbps"], 100 * r["frac_copy_bw"], r["copy_time_ratio"],
                     None if r["ref_us"] is None else r["ref_us"] / 1e3, r["speedup"], r.get("slowdown_vs_plain"),
                     r["mean_accepted"], match])
    return common.markdown_table(headers, rows)


def plot(records: list[dict], summary: dict, info: dict, path: str, device: torch.device) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    done = [r for r in records if "op_us" in r]
    if not done:
        return
    markers = {"plain": "o", "topk_topp": "s", "topp": "D", "greedy": "^"}
    vocabs = sorted({r["V"] for r in done})
    colors = {v: plt.cm.tab10(i % 10) for i, v in enumerate(vocabs)}
    fig, ax = plt.subplots(figsize=(11, 5.5))
    series: dict[tuple, list[dict]] = {}
    for r in done:
        series.setdefault((r["V"], r["K"], r["dtype"], r["mode"]), []).append(r)
    for (vocab, _, dtype, mode), points in series.items():
        points.sort(key=lambda r: r["elements"])
        ax.plot([r["elements"] for r in points], [r["op_gbps"] for r in points], color=colors[vocab],
                marker=markers[mode], linestyle="-" if dtype != "fp32" else "--", linewidth=1, markersize=5,
                alpha=0.85)
    ax.scatter([r["elements"] for r in done], [r["copy_gbps"] for r in done], color="0.6", marker="x", s=14,
               zorder=0)
    copy_ref = summary["copy_gbps_large_median"] or statistics.median(r["copy_gbps"] for r in done)
    ax.axhline(copy_ref, color="0.3", linestyle=":", linewidth=1)
    if device.type == "cuda":
        ax.axhline(TARGET_FRAC * copy_ref, color="tab:red", linestyle="--", linewidth=1)
        ax.axvline(TARGET_ELEMENTS, color="tab:red", linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("B·(K+1)·V elements")
    ax.set_ylabel("effective GB/s")
    title = f"dspark verify on {info['device_name']} ({info['date'][:10]}, {info.get('git_commit') or 'no commit'})"
    ax.set_title(title, fontsize=10)
    handles = [Line2D([], [], color=colors[v], label=f"V = {v}") for v in vocabs]
    handles += [Line2D([], [], color="k", marker=markers[m], linestyle="", label=m)
                for m in markers if any(r["mode"] == m for r in done)]
    handles += [Line2D([], [], color="k", linestyle="--", label="fp32 (dashed)"),
                Line2D([], [], color="0.6", marker="x", linestyle="", label="copy, same bytes (r+w)"),
                Line2D([], [], color="0.3", linestyle=":", label=f"copy BW {copy_ref:.0f} GB/s")]
    if device.type == "cuda":
        handles.append(Line2D([], [], color="tab:red", linestyle="--", label=f"{TARGET_FRAC:.0%} of copy (target)"))
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a handful of points (GPU check)")
    parser.add_argument("--out", default=os.path.join(common.REPO_ROOT, "bench", "out"))
    parser.add_argument("--shapes", nargs="+", type=parse_shape, metavar="B:K:V[:dtype[:mode]]",
                        help="replace the grid; dtype in fp32/bf16/fp16, mode in " + "/".join(MODES))
    parser.add_argument("--reps", type=int, default=None, help="timed runs per point (cuda 20, quick 10; cpu <= 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (cuda 3, cpu 1)")
    parser.add_argument("--cpu-seconds", type=float, default=0.5, help="CPU: aim for about this long per point")
    parser.add_argument("--no-ref", action="store_true", help="do not time the PyTorch reference")
    parser.add_argument("--ref-reps", type=int, default=None, help="reference repeats (cuda 3, cpu 2; quick 1)")
    parser.add_argument("--ref-limit", type=float, default=None, help="skip the reference where one run would "
                        "take longer than this many seconds (cuda 10, cpu 5)")
    parser.add_argument("--ref-budget", type=float, default=None, help="seconds for all reference runs "
                        "(cuda 60, cpu 30, quick 15)")
    parser.add_argument("--threads", type=int, default=None, help="CPU: torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--logit-scale", type=float, default=3.0)
    parser.add_argument("--noise", type=float, default=1.0, help="std of draft logits minus target logits")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            print("bench_verify: no CUDA device visible", file=sys.stderr)
            return 2
        if not torch._C._dispatch_has_kernel_for_dispatch_key("dspark::verify", "CUDA"):
            print("bench_verify: dspark::verify has no CUDA kernel in this build of dspark_ext "
                  f"({dspark_ext._C.__file__})", file=sys.stderr)
            return 3
    if args.reps is None:
        args.reps = (10 if args.quick else 20) if cuda else 5
    if args.warmup is None:
        args.warmup = 3 if cuda else 1
    if args.ref_reps is None:
        args.ref_reps = 1 if args.quick else (3 if cuda else 2)
    if args.no_ref:
        args.ref_reps = 0
    if args.ref_budget is None:
        args.ref_budget = 15.0 if args.quick else (60.0 if cuda else 30.0)
    if args.ref_limit is None:
        args.ref_limit = 10.0 if cuda else 5.0
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = args.shapes or (cuda_grid(args.quick) if cuda else cpu_grid(args.quick))
    # Smallest first, so that the reference's time budget covers every mode's small points.
    shapes = sorted(shapes, key=lambda s: input_bytes(s[0], s[1], s[2], common.DTYPES[s[3]], s[4]))

    info = common.machine_info(device)
    timer = common.ColdTimer(device)
    info["flush_bytes"] = timer.flush_bytes
    copies = common.CopyBaseline(timer)
    refs = ReferenceTimer(device, args.ref_limit, args.ref_budget, args.ref_reps)
    print(f"bench_verify: {len(shapes)} points on {info['device_name']} (torch {info['torch']}, "
          f"commit {info['git_commit']}), flush {timer.flush_bytes >> 20} MiB", file=sys.stderr)

    records = []
    begin = time.perf_counter()
    for i, shape in enumerate(shapes):
        try:
            record = run_point(shape, device, timer, copies, refs, args)
        except torch.OutOfMemoryError as error:
            record = dict(zip(("B", "K", "V", "dtype", "mode"), shape), skipped=f"out of memory: {error}".split("\n")[0])
            record["elements"] = shape[0] * (shape[1] + 1) * shape[2]
            record["bytes"] = input_bytes(shape[0], shape[1], shape[2], common.DTYPES[shape[3]], shape[4])
            torch.cuda.empty_cache()
        records.append(record)
        if "op_us" in record:
            ref = "–" if record["ref_us"] is None else f"{record['ref_us'] / 1e3:.1f} ms"
            print(f"[{i + 1}/{len(shapes)}] {shape}: {record['op_us']:.1f} µs, {record['op_gbps']:.1f} GB/s, "
                  f"{100 * record['frac_copy_bw']:.0f}% copy BW, ref {ref} ({time.perf_counter() - begin:.0f} s)",
                  file=sys.stderr)
        else:
            print(f"[{i + 1}/{len(shapes)}] {shape}: skipped ({record['skipped']})", file=sys.stderr)

    summary = summarize(records, device)
    info["elapsed_s"] = round(time.perf_counter() - begin, 1)
    info["load_average_end"] = common.load_average()
    info["reference_seconds"] = round(refs.spent_s, 1)
    info["settings"] = {k: v for k, v in vars(args).items() if k not in ("shapes", "out")}
    common.write_results("verify", args.out, device, info, summary, records,
                         lambda path: plot(records, summary, info, path, device),
                         f"verify on {info['device_name']} — torch {info['torch']}, commit {info['git_commit']}, "
                         f"{info['date']}", table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
