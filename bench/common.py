"""Shared helpers for the dspark_ext microbenchmarks: machine description, cold-cache
timing (CUDA events or a host clock), the device-to-device copy baseline and a memory
check. Imported by bench/bench_*.py, which run as scripts from the repository root.

Conventions (DESIGN.md, "Performance targets"):
- every timed run starts with a cold last-level cache: a buffer of about twice its size
  (at least 256 MB on CUDA) is overwritten before each run, outside the timed region;
- a time is the median of the timed runs, in microseconds;
- the copy baseline is ``dst.copy_(src)`` over as many bytes as the op reads, timed the
  same way. Its bandwidth counts bytes read plus bytes written (2 x bytes / time), the
  convention of a device-to-device copy measurement.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from dspark_ext.scheduler import device_name

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 1 << 20

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


# --------------------------------------------------------------------------- machine
def cpu_model() -> str:
    return device_name(torch.device("cpu"))


def git_commit() -> str | None:
    """Short commit of the repository (None when git or the .git folder is absent).
    DSPARK_COMMIT overrides it, for copies of the tree without .git."""
    if os.environ.get("DSPARK_COMMIT"):
        return os.environ["DSPARK_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def last_level_cache_bytes(device: torch.device) -> int:
    """L2 size of the GPU, or the largest CPU cache level found in sysfs (0 if unknown)."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0))
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = [e for e in os.listdir(base) if e.startswith("index")]
    except OSError:
        return 0
    for entry in entries:
        try:
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KMG")) * scale)
        except (OSError, ValueError):
            continue
    return best


def machine_info(device: torch.device) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "hostname": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),  # other work on the machine skews CPU timings
        "device_type": device.type,
        "last_level_cache_bytes": last_level_cache_bytes(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({
            "device_name": props.name,
            "compute_capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "device_memory_bytes": props.total_memory,
        })
    else:
        info["device_name"] = info["cpu_model"]
    return info


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages of the host (None where unknown)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


# --------------------------------------------------------------------------- timing
class ColdTimer:
    """Times a callable with the last-level cache flushed before every run.

    CUDA: one pair of events per run around the callable only; the flush (a memset of
    ``flush_bytes``) is queued just before, so it also keeps the GPU busy while the host
    enqueues the timed work. CPU: time.perf_counter around the callable.
    """

    def __init__(self, device: torch.device):
        self.device = device
        cache = last_level_cache_bytes(device)
        floor = 256 * MB if device.type == "cuda" else 64 * MB
        self.flush_bytes = max(floor, 2 * cache)
        self._flush_buffer = torch.empty(self.flush_bytes, dtype=torch.uint8, device=device)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def flush(self) -> None:
        self._flush_buffer.zero_()

    def run(self, fn, reps: int, warmup: int) -> list[float]:
        """Run fn warmup times, then reps cold timed runs; returns the times in µs."""
        for _ in range(warmup):
            fn()
        self.sync()
        if self.device.type == "cuda":
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            for start, end in zip(starts, ends):
                self.flush()
                start.record()
                fn()
                end.record()
            self.sync()
            return [start.elapsed_time(end) * 1e3 for start, end in zip(starts, ends)]
        times = []
        for _ in range(reps):
            self.flush()
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e6)
        return times

    def median_us(self, fn, reps: int, warmup: int) -> float:
        return statistics.median(self.run(fn, reps, warmup))


def wall_time_us(fn, device: torch.device) -> float:
    """One run of fn on a host clock, the device synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    begin = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - begin) * 1e6


class CopyBaseline:
    """Median time of dst.copy_(src) over n bytes, cold cache, memoised by n."""

    def __init__(self, timer: ColdTimer):
        self.timer = timer
        self._cache: dict[int, float] = {}

    def time_us(self, nbytes: int, reps: int, warmup: int) -> float:
        if nbytes not in self._cache:
            device = self.timer.device
            src = torch.empty(nbytes, dtype=torch.uint8, device=device)
            src.random_(0, 256)  # never time on zeros
            dst = torch.empty_like(src)
            self._cache[nbytes] = self.timer.median_us(lambda: dst.copy_(src), reps, warmup)
            del src, dst
            if device.type == "cuda":
                torch.cuda.empty_cache()
        return self._cache[nbytes]


def copy_bandwidth_gbps(nbytes: int, copy_us: float) -> float:
    """Bandwidth of a copy of nbytes, counting bytes read and written."""
    return 2.0 * nbytes / (copy_us * 1e3)


# --------------------------------------------------------------------------- output
def markdown_table(headers: list[str], rows: list[list]) -> str:
    def cell(value):
        if value is None:
            return "–"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, out_dir: str, device: torch.device, info: dict, summary: dict, records: list,
                  plot, title: str, table: str) -> None:
    """Write ``<name>_<device>.json`` (machine, summary, records) and ``.png`` (``plot(path)``;
    a failed plot must not lose the measurements) under out_dir, and print the title, the
    markdown table and the summary line to stdout."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, f"{name}_{device.type}.json")
    png_path = os.path.join(out_dir, f"{name}_{device.type}.png")
    with open(json_path, "w") as f:
        json.dump({"benchmark": name, "machine": info, "summary": summary, "records": records}, f, indent=1)
    try:
        plot(png_path)
    except Exception as error:  # noqa: BLE001
        print(f"bench_{name}: plot failed: {error!r}", file=sys.stderr)
    print(f"### {title}\n")
    print(table)
    print()
    print("summary: " + json.dumps(summary))
    print(f"bench_{name}: wrote {json_path} and {png_path} in {info['elapsed_s']} s", file=sys.stderr)
