"""Load-aware draft scheduling for DSpark (paper Algorithm 1 and its production variant).

Every round, the scheduler turns the survival ``a[b, k]`` of the confidence head (the
probability that drafts 0..k of request b are all accepted) into verify lengths
``L[b]``: how many drafts of each request the target scores this round.

* ``CostProfile``: the cost of one engine step. The target's verify time against the
  number of tokens the step computes (optionally a step function over CUDA-graph capture
  sizes), plus an optional draft time against the number of requests. Measured once
  (``CostProfile.measure`` or your engine's profiler), refined online from the timings of
  real steps (``record``, ``record_draft``), saved as JSON.
* ``LoadAwareScheduler``: ``plan(survival [B, K], base_tokens, emitting, max_tokens) ->
  L [B] int32`` on the device, with no host synchronisation, inside CUDA graphs too.
  Modes ``early_stop`` (Algorithm 1), ``capacity`` (production: capacity from the
  survival of two rounds earlier) and ``fixed``.

Throughput. A step runs B requests; ``base_tokens`` of its tokens are not drafts (each
decoding request's anchor, plus the chunks of requests still in prefill; B when every
request decodes). With n drafts admitted it costs ``T(n) = draft_cost(B) +
verify_cost(base_tokens + n)`` and yields ``tau(n) = E + S_n`` expected tokens, E the
number of requests that sample this step (each emits at least one token; a request in
prefill emits none) and S_n the sum of the n admitted survivals: ``Theta(n) = tau(n) /
T(n)``.
"""

from __future__ import annotations

import bisect
import collections
import datetime
import json
import math
import os
import platform
import statistics
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["CostProfile", "LoadAwareScheduler", "MODES", "device_name"]

MODES = ("early_stop", "capacity", "fixed")


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo (else the platform's processor name)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name


def _to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small CPU tensor to ``device`` without a host synchronisation (pinned,
    non-blocking on CUDA). Must not run during CUDA-graph capture: callers cache the
    result and build it on a warm-up call."""
    if device.type == "cuda":
        return values.pin_memory().to(device, non_blocking=True)
    return values.to(device)


def _may_refresh(device: torch.device) -> bool:
    """Whether device tables may be rewritten now: not while torch.compile traces (the
    tables are then graph inputs, refreshed by eager calls between rounds) and not while
    the current CUDA stream is being captured (the copy would be recorded, replaying
    stale host data)."""
    if torch.compiler.is_compiling():
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _numbers(name: str, values) -> list[float]:
    """Host numbers from a number, a sequence or a CPU tensor, as floats."""
    if isinstance(values, torch.Tensor):
        if values.device.type != "cpu":
            raise ValueError(f"{name} must be host numbers (reading a device tensor would synchronise)")
        return [float(v) for v in values.reshape(-1).tolist()]
    if isinstance(values, (int, float)):
        return [float(values)]
    return [float(v) for v in values]


class _Curve:
    """A monotone piecewise-linear function of a count, from measured points, refined online.

    Each point keeps a window of its last ``window`` observations (the measured value
    counts as the first); its estimate is their median, and the curve's values are the
    running maximum of the estimates. Linear between points, linear past the last point
    with the slope of the last two (0 with one point), clamped to the first value below
    the first point. Device copies are refreshed in place (see ``device_tables``).
    """

    def __init__(self, name: str, xs: Sequence[float], ys: Sequence[float], window: int):
        xs = [float(x) for x in xs]
        ys = [float(y) for y in ys]
        if len(xs) != len(ys):
            raise ValueError(f"{name}: points ({len(xs)}) and seconds ({len(ys)}) must have the same length")
        if not xs:
            raise ValueError(f"{name}: CostProfile needs at least one point")
        if not all(math.isfinite(x) and x >= 0 for x in xs):
            raise ValueError(f"{name}: points must be finite and >= 0, got {xs}")
        if not all(math.isfinite(y) and y > 0 for y in ys):
            raise ValueError(f"{name}: seconds must be finite and > 0, got {ys}")
        order = sorted(range(len(xs)), key=xs.__getitem__)
        self.xs = [xs[i] for i in order]
        if any(a == b for a, b in zip(self.xs, self.xs[1:])):
            raise ValueError(f"{name}: points must be distinct, got {self.xs}")
        self.window = window
        self.observations = [collections.deque([ys[i]], maxlen=window) for i in order]
        self.version = 0
        self._device: dict[torch.device, list] = {}
        self._rebuild()

    def _rebuild(self) -> None:
        self.estimates = [statistics.median(o) for o in self.observations]
        self.ys, best = [], 0.0
        for y in self.estimates:
            best = max(best, y)
            self.ys.append(best)
        self.slopes = [(b - a) / (x1 - x0) for a, b, x0, x1 in zip(self.ys, self.ys[1:], self.xs, self.xs[1:])]
        self.slopes.append(self.slopes[-1] if self.slopes else 0.0)  # extrapolation slope past the last point

    def insert(self, x: float) -> None:
        """Add a point at x with the curve's current value there (the function is unchanged)."""
        if x in self.xs:
            return
        value = self.scalar(x)
        i = bisect.bisect(self.xs, x)
        self.xs.insert(i, x)
        self.observations.insert(i, collections.deque([value], maxlen=self.window))
        self._rebuild()

    def scalar(self, x: float) -> float:
        if x <= self.xs[0]:
            return self.ys[0]
        i = bisect.bisect_right(self.xs, x) - 1
        return self.ys[i] + (x - self.xs[i]) * self.slopes[i]

    def observe(self, i: int, y: float) -> None:
        self.observations[i].append(y)
        self._rebuild()
        self.version += 1

    def device_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(xs [P], table [P, 3] = (x, y, slope)), float64 on ``device``, cached.

        After ``observe`` the cached table is rewritten in place by a copy enqueued on the
        current stream (non-blocking, from a fresh pinned buffer that the caching host
        allocator keeps until the copy has run), unless ``_may_refresh`` says no: work
        already enqueued reads the old values, later work the new ones, and the addresses
        stay those captured in CUDA graphs. The number of points never changes after
        construction, so the shapes stay fixed too."""
        entry = self._device.get(device)
        if entry is None:
            table = torch.tensor([self.xs, self.ys, self.slopes], dtype=torch.float64).T.contiguous()
            table = _to_device(table, device)
            entry = self._device[device] = [table[:, 0].contiguous(), table, self.version]
        elif entry[2] != self.version and _may_refresh(device):
            fresh = torch.tensor([self.xs, self.ys, self.slopes], dtype=torch.float64).T.contiguous()
            if device.type == "cuda":
                fresh = fresh.pin_memory()
            entry[1].copy_(fresh, non_blocking=True)
            entry[2] = self.version
        return entry[0], entry[1]

    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        """The curve at x (float64 tensor), on x's device, no host synchronisation."""
        xs, table = self.device_tables(x.device)
        i = (torch.searchsorted(xs, x, right=True) - 1).clamp_(min=0)
        point = table[i]
        return point[..., 1] + (x - point[..., 0]).clamp(min=0.0) * point[..., 2]


class CostProfile:
    """The cost of one engine step: target verify time against the tokens it computes,
    plus an optional draft time against the number of requests.

    ``CostProfile(tokens, seconds)`` takes measured points of the verify time (any order,
    distinct token counts, seconds > 0). The seconds are made non-decreasing in tokens by
    a running maximum (a step never gets cheaper with more tokens; measurement noise would
    otherwise create spurious throughput peaks). Between points the cost is linearly
    interpolated; past the last point it is extrapolated linearly with the slope of the
    last two points (0 with a single point); below the first point it is clamped to the
    first value (extrapolating downwards could reach 0 or below and a step costs at
    least what the smallest measured step costs).

    CUDA-graph capture sizes (``capture_sizes``): an engine pads a step of n tokens up to
    the next captured size when n is at most the largest one (``limit``), so there the
    cost is a step function, ``cost(n) = profile(next captured size >= n)``: interpolating
    between captured sizes would invent marginal costs that do not exist. Capture sizes
    that were not measured become points with the profile's value there (which changes
    nothing), so that ``record`` can refine them. Above ``limit`` nothing pads and the
    cost is continuous, interpolated between the points above ``limit`` only (crossing
    the limit loses the graphs, a real jump): from ``limit`` to the first point above it
    the cost is that point's value; with no point above ``limit`` the profile is
    extrapolated from its last points.

    Draft time (``draft_requests``, ``draft_seconds``): the same kind of curve against the
    number of requests (interpolated, no padding: a plan only reads it at its batch size).
    Without it the draft cost is 0.

    Online refinement (``record``, ``record_draft``): each point keeps its last ``window``
    observations, the measured value counting as the first; its estimate is their median
    (robust to the occasional slow step, e.g. a host stall), and the running maximum
    keeps the curve monotone. An observation at n tokens goes to one point: the padded
    size when n <= limit (the step that actually ran); otherwise the nearest point (above
    ``limit`` if any is), scaled by the profile's ratio between the two,
    ``seconds * cost(point) / cost(n)``.

    ``cost(n)``: n an int or float gives a float; n a tensor gives a tensor on n's
    device, of n's dtype if floating (else float32), computed there with no host
    synchronisation (the profile's tables are copied once per device and cached; after
    ``record`` they are rewritten in place on the next eager evaluation, see
    ``refresh``). ``draft(r)`` likewise for r requests; ``step_costs(r, tokens)`` is
    both at once for integer token counts, from a dense table (the scheduler's path).

    Attributes: ``tokens`` (sorted points), ``seconds`` (monotone), ``measured_seconds``
    (each point's estimate before the running maximum), ``capture_sizes``,
    ``draft_requests``/``draft_seconds`` (None without a draft cost), ``metadata``.
    """

    def __init__(self, tokens: Sequence[float], seconds: Sequence[float], metadata: dict | None = None, *,
                 capture_sizes: Sequence[int] | None = None, draft_requests: Sequence[float] | None = None,
                 draft_seconds: Sequence[float] | None = None, window: int = 16):
        """Args:
            tokens: token counts of the measured verify points (distinct, >= 0).
            seconds: verify step time at each count (> 0, finite).
            metadata: optional dict kept with the profile (``save`` writes it).
            capture_sizes: token counts with a captured CUDA graph (distinct, > 0), or None.
            draft_requests, draft_seconds: measured draft time against the number of
                requests (both or neither).
            window: observations per point kept by ``record`` (>= 1).
        """
        if int(window) < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = int(window)
        self._verify = _Curve("tokens", tokens, seconds, self.window)
        self.capture_sizes: list[int] | None = None
        self._first_above = None  # first point above the capture limit
        if capture_sizes is not None:
            sizes = sorted(int(c) for c in capture_sizes)
            if not sizes or sizes[0] < 1 or len(set(sizes)) != len(sizes):
                raise ValueError(f"capture_sizes must be distinct and >= 1, got {list(capture_sizes)}")
            for size in sizes:
                self._verify.insert(float(size))
            self.capture_sizes = sizes
            above = [x for x in self._verify.xs if x > sizes[-1]]
            self._first_above = above[0] if above else None
        if (draft_requests is None) != (draft_seconds is None):
            raise ValueError("give both draft_requests and draft_seconds, or neither")
        self._draft = None if draft_requests is None else _Curve("draft_requests", draft_requests, draft_seconds,
                                                                 self.window)
        self.metadata = dict(metadata or {})
        self._capture_tables: dict[torch.device, torch.Tensor] = {}
        self._dense_tables: dict[torch.device, list] = {}

    # ------------------------------------------------------------------ attributes
    @property
    def tokens(self) -> list[float]:
        return self._verify.xs

    @property
    def seconds(self) -> list[float]:
        return self._verify.ys

    @property
    def measured_seconds(self) -> list[float]:
        return self._verify.estimates

    @property
    def slopes(self) -> list[float]:
        return self._verify.slopes

    @property
    def has_draft_cost(self) -> bool:
        return self._draft is not None

    @property
    def draft_requests(self) -> list[float] | None:
        return None if self._draft is None else self._draft.xs

    @property
    def draft_seconds(self) -> list[float] | None:
        return None if self._draft is None else self._draft.ys

    @property
    def limit(self) -> int | None:
        """The largest capture size (None without capture sizes)."""
        return None if self.capture_sizes is None else self.capture_sizes[-1]

    def __repr__(self) -> str:
        points = ", ".join(f"{t:g}: {s:.4g}" for t, s in zip(self.tokens, self.seconds))
        extra = "" if self.capture_sizes is None else f", limit={self.limit}"
        if self._draft is not None:
            extra += ", draft={" + ", ".join(f"{r:g}: {s:.4g}" for r, s in zip(self._draft.xs, self._draft.ys)) + "}"
        return f"CostProfile({{{points}}}{extra})"

    # ------------------------------------------------------------------ evaluation
    def _padded(self, n: float) -> float:
        """Where the profile is read for n tokens: the next capture size at or below the
        limit, else n (but not below the first point above the limit)."""
        if self.capture_sizes is None:
            return n
        if n <= self.capture_sizes[-1]:
            return float(self.capture_sizes[bisect.bisect_left(self.capture_sizes, n)])
        return n if self._first_above is None else max(n, self._first_above)

    def __call__(self, n):
        """Verify step time in seconds for n tokens.

        Args:
            n: int/float, or a tensor of token counts (any shape, any real dtype).

        Returns:
            float for a number; for a tensor, a tensor of n's shape on n's device (n's
            dtype if floating, else float32). See the class doc for the shape of the
            function (interpolation, padding, clamping, extrapolation).
        """
        if not isinstance(n, torch.Tensor):
            return self._verify.scalar(self._padded(float(n)))
        out_dtype = n.dtype if n.dtype.is_floating_point else torch.float32
        x = n.to(torch.float64)
        if self.capture_sizes is not None:
            sizes = self._capture_tables.get(n.device)
            if sizes is None:
                sizes = self._capture_tables[n.device] = _to_device(
                    torch.tensor(self.capture_sizes, dtype=torch.float64), n.device)
            index = torch.searchsorted(sizes, x).clamp_(max=len(self.capture_sizes) - 1)
            above = x if self._first_above is None else x.clamp(min=self._first_above)
            x = torch.where(x <= self.capture_sizes[-1], sizes[index], above)
        return self._verify.evaluate(x).to(out_dtype)

    def draft(self, requests):
        """Draft time in seconds for a step with ``requests`` requests (0 without a draft
        cost). A number gives a float, a tensor a tensor (as ``__call__``)."""
        if not isinstance(requests, torch.Tensor):
            return 0.0 if self._draft is None else self._draft.scalar(float(requests))
        out_dtype = requests.dtype if requests.dtype.is_floating_point else torch.float32
        if self._draft is None:
            return torch.zeros(requests.shape, dtype=out_dtype, device=requests.device)
        return self._draft.evaluate(requests.to(torch.float64)).to(out_dtype)

    def refresh(self, device: torch.device | str) -> None:
        """Bring the cached tables on ``device`` up to date after ``record`` (eager calls
        do this themselves; call it between replays of a captured CUDA graph, on the stream
        that replays it). No host synchronisation."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())  # tensors' devices carry an index
        self._verify.device_tables(device)
        if self._draft is not None:
            self._draft.device_tables(device)
        if device in self._dense_tables:
            self._dense(device, 0)

    def step_costs(self, requests: int, tokens: torch.Tensor) -> torch.Tensor:
        """``draft(requests) + self(tokens)`` for integer token counts, the scheduler's
        fast path: one gather from a dense device table of the verify cost at 0..N tokens
        (N = the last point or the capture limit, whichever is larger; linear past N) and,
        with a draft cost, of the draft cost at 0..R requests (R >= requests; a larger
        ``requests`` rebuilds it, so warm up before capturing a graph). The table is
        refreshed in place after ``record`` like the others.

        Args:
            requests: the step's number of requests (host int).
            tokens: int64 tensor of token counts (any shape).

        Returns:
            float64 tensor of tokens' shape on tokens' device.
        """
        table, last = self._dense(tokens.device, requests)
        cost = table[tokens.clamp(max=last)] + (tokens - last).clamp(min=0) * table[last + 1]
        if self._draft is not None:
            cost = cost + table[last + 2 + requests]
        return cost

    def _dense_host(self, requests: int) -> torch.Tensor:
        """[verify(0..N), slope past N, draft(0..R)] float64 on the host."""
        last = int(math.ceil(max(self.tokens[-1], self.limit or 0)))
        parts = [self(torch.arange(last + 1, dtype=torch.float64)), torch.tensor([self.slopes[-1]], dtype=torch.float64)]
        if self._draft is not None:
            parts.append(self.draft(torch.arange(requests + 1, dtype=torch.float64)))
        return torch.cat(parts)

    def _dense(self, device: torch.device, requests: int) -> tuple[torch.Tensor, int]:
        version = (self._verify.version, 0 if self._draft is None else self._draft.version)
        last = int(math.ceil(max(self.tokens[-1], self.limit or 0)))
        entry = self._dense_tables.get(device)
        drafts = 0 if entry is None else entry[0].numel() - last - 2  # requests 0..drafts - 1 in the table
        if entry is None or (self._draft is not None and requests >= drafts):
            wanted = max(requests, int(math.ceil(self._draft.xs[-1])) if self._draft is not None else 0, 1024)
            entry = self._dense_tables[device] = [_to_device(self._dense_host(wanted), device), version]
        elif entry[1] != version and _may_refresh(device):
            fresh = self._dense_host(drafts - 1)
            entry[0].copy_(fresh.pin_memory() if device.type == "cuda" else fresh, non_blocking=True)
            entry[1] = version
        return entry[0], last

    # ------------------------------------------------------------------ online update
    def record(self, tokens, seconds) -> None:
        """Fold observed verify step times into the profile (see the class doc).

        Args:
            tokens: the step's token count (not padded), or a sequence of them (host numbers).
            seconds: the observed step time(s), > 0.
        """
        for n, s in zip(*self._observations("tokens", tokens, seconds)):
            curve = self._verify
            if self.capture_sizes is not None and n <= self.capture_sizes[-1]:
                curve.observe(curve.xs.index(self._padded(n)), s)
                continue
            candidates = range(len(curve.xs))
            if self._first_above is not None:
                candidates = [i for i in candidates if curve.xs[i] > self.capture_sizes[-1]]
            self._observe_nearest(curve, candidates, n, s, self)

    def record_draft(self, requests, seconds) -> None:
        """Fold observed draft times into the draft curve (as ``record``, without padding).

        Args:
            requests: the step's number of requests, or a sequence of them (host numbers).
            seconds: the observed draft time(s), > 0.
        """
        if self._draft is None:
            raise ValueError("record_draft: this profile has no draft cost (give draft_requests/draft_seconds)")
        for r, s in zip(*self._observations("requests", requests, seconds)):
            self._observe_nearest(self._draft, range(len(self._draft.xs)), r, s, self._draft.scalar)

    @staticmethod
    def _observations(name: str, counts, seconds) -> tuple[list[float], list[float]]:
        counts, seconds = _numbers(name, counts), _numbers("seconds", seconds)
        if len(counts) != len(seconds):
            raise ValueError(f"{name} ({len(counts)}) and seconds ({len(seconds)}) must have the same length")
        if not all(math.isfinite(c) and c >= 0 for c in counts):
            raise ValueError(f"{name} must be finite and >= 0, got {counts}")
        if not all(math.isfinite(s) and s > 0 for s in seconds):
            raise ValueError(f"seconds must be finite and > 0, got {seconds}")
        return counts, seconds

    @staticmethod
    def _observe_nearest(curve: _Curve, candidates, n: float, seconds: float, cost: Callable[[float], float]) -> None:
        """The observation at n, scaled by cost(point) / cost(n) to the nearest candidate
        point (ties: the larger)."""
        i = min(candidates, key=lambda j: (abs(curve.xs[j] - n), -curve.xs[j]))
        curve.observe(i, seconds if curve.xs[i] == n else seconds * cost(curve.xs[i]) / cost(n))

    # ------------------------------------------------------------------ measurement
    @classmethod
    def measure(cls, step_fn: Callable[[int], object], token_counts: Sequence[int], repeats: int = 5,
                warmup: int = 2, device: torch.device | str | None = None,
                capture_sizes: Sequence[int] | None = None) -> "CostProfile":
        """Time ``step_fn(n)`` for every n in ``token_counts`` and keep the median.

        Args:
            step_fn: runs one target step verifying n tokens (its return value is ignored).
            token_counts: the n to measure (distinct).
            repeats: timed runs per n (median kept). warmup: untimed runs before them.
            device: "cuda" (default when a GPU is visible) times with CUDA events on the
                current stream, the device synchronised once per n after the timed runs
                (so step_fn must enqueue its work on the current CUDA stream); "cpu"
                times with time.perf_counter.
            capture_sizes: the engine's CUDA-graph capture sizes (see the class doc);
                measure at them and at a few counts above the largest.

        Returns:
            A CostProfile (running max applied) whose ``metadata`` holds the device, its
            name, the torch version, the date, repeats, warmup and every raw time.
        """
        if repeats < 1 or warmup < 0:
            raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        use_events = device.type == "cuda"
        medians, raw = [], {}
        for n in token_counts:
            n = int(n)
            for _ in range(warmup):
                step_fn(n)
            if use_events:
                torch.cuda.synchronize(device)
                events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                          for _ in range(repeats)]
                for start, end in events:
                    start.record()
                    step_fn(n)
                    end.record()
                torch.cuda.synchronize(device)
                times = [start.elapsed_time(end) * 1e-3 for start, end in events]
            else:
                times = []
                for _ in range(repeats):
                    begin = time.perf_counter()
                    step_fn(n)
                    times.append(time.perf_counter() - begin)
            raw[str(n)] = times
            medians.append(statistics.median(times))
        metadata = {
            "device": str(device),
            "device_name": device_name(device),
            "torch_version": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "timer": "cuda_events" if use_events else "perf_counter",
            "repeats": repeats,
            "warmup": warmup,
            "raw_seconds": raw,
        }
        return cls([int(n) for n in token_counts], medians, metadata, capture_sizes=capture_sizes)


    # ------------------------------------------------------------------ JSON
    _KEYS = ("tokens", "seconds", "measured_seconds", "capture_sizes", "draft_requests", "draft_seconds",
             "draft_measured_seconds", "window", "observations")

    def save(self, path: str | os.PathLike) -> None:
        """Write the profile as JSON: tokens, seconds (monotone), measured_seconds (the
        estimates), capture_sizes, the draft curve, the window and every point's recorded
        observations, the metadata (device, device_name, torch_version, date when
        measured) and, if absent from the metadata, the device name, torch version and
        date of saving."""
        record = {
            "device": "cpu",
            "device_name": device_name(torch.device("cpu")),
            "torch_version": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        record.update(self.metadata)
        record.update({"tokens": self.tokens, "seconds": self.seconds, "measured_seconds": self.measured_seconds,
                       "capture_sizes": self.capture_sizes, "window": self.window,
                       "observations": {"verify": [list(o) for o in self._verify.observations]}})
        if self._draft is not None:
            record.update({"draft_requests": self._draft.xs, "draft_seconds": self._draft.ys,
                           "draft_measured_seconds": self._draft.estimates})
            record["observations"]["draft"] = [list(o) for o in self._draft.observations]
        with open(path, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CostProfile":
        """Read a profile written by ``save`` (the estimates and observations as saved,
        made monotone again; every other key becomes ``metadata``)."""
        with open(path) as f:
            record = json.load(f)
        for key in ("tokens", "seconds"):
            if key not in record:
                raise ValueError(f"CostProfile.load: {path} has no '{key}' key")
        fields = {key: record.pop(key, None) for key in cls._KEYS}
        draft = fields["draft_requests"] is not None
        profile = cls(fields["tokens"], fields["measured_seconds"] or fields["seconds"], metadata=record,
                      capture_sizes=fields["capture_sizes"], window=fields["window"] or 16,
                      draft_requests=fields["draft_requests"] if draft else None,
                      draft_seconds=(fields["draft_measured_seconds"] or fields["draft_seconds"]) if draft else None)
        observations = fields["observations"] or {}
        for curve, saved in ((profile._verify, observations.get("verify")), (profile._draft, observations.get("draft"))):
            if curve is not None and saved is not None:
                if len(saved) != len(curve.xs):
                    raise ValueError(f"CostProfile.load: {path} has {len(saved)} observation windows "
                                     f"for {len(curve.xs)} points")
                curve.observations = [collections.deque(o, maxlen=curve.window) for o in saved]
                curve._rebuild()
        return profile


class LoadAwareScheduler:
    """Chooses how many drafts of each request the target verifies this round.

    ``plan(survival, base_tokens, emitting, max_tokens)`` maps survival ``[B, K]`` to
    verify lengths ``[B]`` int32 on the same device, with no host synchronisation: only
    shapes are read on the host, so it can be captured in a CUDA graph (after one warm-up
    call with the same B, which builds the cached tables; see below). Pass
    ``base_tokens`` and ``max_tokens`` as 0-dim device tensors when they change from
    step to step under a captured graph (Python ints are baked into it).

    Input conventions. survival is read as float32, NaN counts as 0 and values are
    clamped to [0, 1]. A survival is a cumulative product, hence non-increasing along K;
    the scheduler enforces this with a running minimum along K (a draft cannot be more
    likely to be accepted than the drafts before it, which it needs), so the drafts it
    admits always form a prefix of each request and the expected yield it optimises is
    the one of the drafts actually verified. For non-increasing inputs this changes
    nothing. Requests with ``emitting`` False get L = 0 and add no yield.

    Ordering. All drafts of emitting requests are sorted by survival, highest first, with
    a stable sort of the row-major flattening: ties are broken by (request, position)
    order, so the result is deterministic and, within a request, position k is admitted
    before k+1.

    Cost and yield of n admitted drafts (module doc): ``T(n) = draft_cost(B) +
    verify_cost(base_tokens + n)``, ``tau(n) = E + S_n``. ``max_tokens`` caps
    ``base_tokens + n``: at most ``room = max(0, max_tokens - base_tokens)`` drafts, in
    every mode (the cap is a hard limit, e.g. the logits a step can hold). It counts the
    step's real tokens: the padded size it is priced at may exceed it.

    Modes:

    * ``early_stop`` (Algorithm 1, non-anticipating): admit drafts in sorted order while
      the throughput strictly increases, ``Theta(n+1) > Theta(n)``, and n < room; stop at
      the first draft that does not improve it. On the device: sort, cumulative sum
      (float64), the mask ``improves[n] = a_(n+1) * T(n) > tau(n) * (T(n+1) - T(n))`` for
      n = 0..B*K-1 (the same test as ``Theta(n+1) > Theta(n)`` for T > 0, without a
      division, so exact on flat stretches of the cost, e.g. within a padded size: any
      a > 0 is admitted there), admitted = the length of its leading run of True
      (``cumprod(improves).sum()``), then ``L[b]`` = the number of request b's drafts
      among the admitted ones.
    * ``capacity`` (production): admit the top-C drafts by current survival, with C the
      global argmax over n = 0..min(B*K, room) of ``Theta(n)`` (the first maximum)
      computed two ``plan`` calls earlier, with that call's survival, base tokens,
      emitting requests and cap. The first two calls use ``early_stop``. The history (the
      C of the last two calls, -1 before the first) lives on the device and is updated in
      place, so graph replays advance it. C is a number of drafts; it is clamped to the
      current B*K and room (no rescaling when the batch changes).
    * ``fixed``: ``min(fixed_len, K)`` for every emitting request; under a cap, requests
      in batch order until room is used up.

    The cost of the counts ``base_tokens + 0..B*K`` is gathered on every call from the
    profile's dense device table (``CostProfile.step_costs``), so a ``record`` into the
    profile reaches the next eager ``plan`` (the table is rewritten in place, no host
    synchronisation); a captured graph sees it after ``cost.refresh(device)`` between
    replays. ``cost`` may also be any callable that maps a float64 tensor of token counts
    to seconds (> 0, non-decreasing) on the same device without a host synchronisation
    (then there is no draft cost). Per (device, B) the scheduler caches the counts
    0..B*K (up to 64 batch sizes, least recently used dropped). Capture a CUDA graph only
    after a warm-up ``plan`` with the captured batch size.
    """

    _CACHE_SIZE = 64

    def __init__(self, cost: CostProfile, max_draft: int, mode: str = "early_stop", fixed_len: int | None = None):
        """Args:
            cost: the engine's CostProfile (seconds against verified tokens, draft cost).
            max_draft: K, drafts per request (survival must be [B, K]).
            mode: "early_stop", "capacity" or "fixed".
            fixed_len: verify length of mode "fixed" (required there, >= 0).
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if max_draft < 0:
            raise ValueError(f"max_draft must be >= 0, got {max_draft}")
        if mode == "fixed":
            if fixed_len is None or int(fixed_len) < 0:
                raise ValueError(f"mode 'fixed' needs fixed_len >= 0, got {fixed_len}")
        if not callable(cost):
            raise ValueError("cost must be a CostProfile (or a callable on token counts)")
        self.cost = cost
        self.max_draft = int(max_draft)
        self.mode = mode
        self.fixed_len = None if fixed_len is None else int(fixed_len)
        self._tables: collections.OrderedDict = collections.OrderedDict()
        self._state: dict[torch.device, torch.Tensor] = {}

    # ------------------------------------------------------------------ cached tables
    def _batch_tables(self, device: torch.device, batch: int):
        """Cached per (device, B), M = B*K: counts [M+1] int64 = 0..M and its view
        positions [M] = 0..M-1."""
        key = (device, batch)
        entry = self._tables.get(key)
        if entry is None:
            counts = torch.arange(batch * self.max_draft + 1, device=device)
            entry = (counts[:-1], counts)
            self._tables[key] = entry
            if len(self._tables) > self._CACHE_SIZE:
                self._tables.popitem(last=False)
        else:
            self._tables.move_to_end(key)
        return entry

    def _history(self, device: torch.device) -> torch.Tensor:
        """Device state of mode capacity: C of the last two calls, [2] int64, oldest first;
        -1 = no call yet (then early_stop is used)."""
        if device not in self._state:
            self._state[device] = torch.full((2,), -1, dtype=torch.int64, device=device)
        return self._state[device]

    def reset(self) -> None:
        """Forget the capacity history (the next two calls use early_stop again), in place."""
        for history in self._state.values():
            history.fill_(-1)

    def _step_cost(self, requests: int, tokens: torch.Tensor) -> torch.Tensor:
        """T = draft_cost(requests) + verify_cost(tokens), float64 on tokens' device."""
        if isinstance(self.cost, CostProfile):
            return self.cost.step_costs(requests, tokens)
        return self.cost(tokens.to(torch.float64)).to(torch.float64)

    # ------------------------------------------------------------------ plan
    def plan(self, survival: torch.Tensor, base_tokens: int | torch.Tensor | None = None,
             emitting: torch.Tensor | None = None, max_tokens: int | torch.Tensor | None = None) -> torch.Tensor:
        """Verify lengths for one round.

        Args:
            survival: [B, K] float (float32 expected), K == max_draft; survival[b, k] is
                the probability that drafts 0..k of request b are all accepted.
            base_tokens: the step's tokens that are not drafts: one anchor per decoding
                request plus the prefill chunks scheduled in the same step. A Python int
                or a 0-dim tensor on survival's device (any real dtype). Default B.
            emitting: [B] bool on survival's device, the requests that sample a token this
                step (a request whose prefill is not finished emits nothing): the others
                get L = 0 and add no yield. Default all.
            max_tokens: cap on base_tokens + admitted drafts (int or 0-dim tensor on
                survival's device). Default none.

        Returns:
            [B] int32 on survival's device: L[b] in [0, K]; request b verifies its
            drafts 0..L[b]-1. No host synchronisation.
        """
        if survival.dim() != 2:
            raise ValueError(f"survival must be [B, K], got shape {tuple(survival.shape)}")
        if not survival.dtype.is_floating_point:
            raise ValueError(f"survival must be a floating tensor, got {survival.dtype}")
        batch, max_draft = survival.shape
        if max_draft != self.max_draft:
            raise ValueError(f"survival must be [B, {self.max_draft}] (max_draft), got shape {tuple(survival.shape)}")
        device = survival.device
        base = batch if base_tokens is None else _scalar_argument("base_tokens", base_tokens, device)
        room = None
        if max_tokens is not None:
            room = _scalar_argument("max_tokens", max_tokens, device) - base
            room = max(room, 0) if isinstance(room, int) else room.clamp(min=0).to(torch.int64)
        if emitting is not None:
            if not isinstance(emitting, torch.Tensor) or emitting.dtype != torch.bool or emitting.shape != (batch,):
                raise ValueError(f"emitting must be a [B] = [{batch}] bool tensor")
            if emitting.device != device:
                raise ValueError(f"emitting must be on {device}, got {emitting.device}")
        if self.mode == "fixed":
            return self._fixed(batch, device, emitting, room)
        num = batch * max_draft
        if num == 0:
            return torch.zeros(batch, dtype=torch.int32, device=device)

        positions, counts = self._batch_tables(device, batch)
        s = torch.nan_to_num(survival.float(), nan=0.0).clamp_(0.0, 1.0)
        s = torch.cummin(s, dim=1).values
        if emitting is not None:
            s = s.masked_fill(~emitting.unsqueeze(1), -1.0)  # sorted after every real draft
        values, order = torch.sort(s.view(-1), descending=True, stable=True)
        gains = values if emitting is None else values.clamp(min=0.0)
        cum = torch.cumsum(F.pad(gains, (1, 0)), dim=0, dtype=torch.float64)  # cum[n] = sum of the n best
        tau = cum + (batch if emitting is None else emitting.sum())  # tau(n), n = 0..M
        if isinstance(base, torch.Tensor) and base.dtype != torch.int64:
            base = base.to(torch.int64)
        cost = self._step_cost(batch, counts + base)  # T(n), n = 0..M
        # Admitting draft n+1 (index n) improves Theta iff values[n] * T(n) > tau(n) * (T(n+1) - T(n)).
        # A non-emitting draft (value -1) never does: T > 0 and T is non-decreasing.
        improves = values * cost[:-1] > tau[:-1] * (cost[1:] - cost[:-1])
        if room is not None:
            improves &= positions < room
        early = torch.cumprod(improves, dim=0).sum()  # length of the leading run of improvements

        if self.mode == "capacity":
            history = self._history(device)
            theta = tau / cost
            if room is not None:
                theta = theta.masked_fill(counts > room, -math.inf)
            capacity_now = torch.argmax(theta)  # first maximum of Theta(0..min(M, room))
            oldest = history[0]
            admitted = torch.where(oldest >= 0, oldest, early).clamp_(max=num)
            if isinstance(room, torch.Tensor):
                admitted = torch.minimum(admitted, room)
            elif room is not None:
                admitted = admitted.clamp_(max=room)
            oldest.copy_(history[1])
            history[1].copy_(capacity_now)
        else:
            admitted = early

        keep = positions < admitted
        if emitting is not None:
            keep &= values >= 0
        chosen = torch.empty(num, dtype=torch.bool, device=device)
        chosen.scatter_(0, order, keep)
        return chosen.view(batch, max_draft).sum(dim=1, dtype=torch.int32)

    def _fixed(self, batch: int, device: torch.device, emitting, room) -> torch.Tensor:
        length = min(self.fixed_len, self.max_draft)
        lengths = torch.full((batch,), length, dtype=torch.int32, device=device)
        if emitting is not None:
            lengths = lengths.masked_fill(~emitting, 0)
        if room is None:
            return lengths
        before = torch.cumsum(lengths, dim=0) - lengths  # drafts of the requests before b
        return torch.minimum(lengths, (room - before).clamp(min=0)).to(torch.int32)


def _scalar_argument(name: str, value, device: torch.device):
    """A Python int, or a 0-dim tensor on ``device`` (checked on the host: shape and device only)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{name} must be an int or a 0-dim tensor, got shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} must be on {device}, got {value.device}")
        if value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"{name} must be a real number, got {value.dtype}")
        return value
    if isinstance(value, bool) or int(value) != value:
        raise ValueError(f"{name} must be an int or a 0-dim tensor, got {value!r}")
    return int(value)
