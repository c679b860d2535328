"""Load-aware draft scheduling for DSpark (paper Algorithm 1 and its production variant).

Every round, the scheduler turns the survival ``a[b, k]`` of the confidence head (the
probability that drafts 0..k of request b are all accepted) into verify lengths
``L[b]``: how many drafts of each request the target scores this round.

* ``CostProfile``: target step time against the number of tokens the target verifies in
  one step, measured once (``CostProfile.measure``) and saved as JSON.
* ``LoadAwareScheduler``: ``plan(survival [B, K]) -> L [B] int32`` on the device, with no
  host synchronisation, inside CUDA graphs too. Modes ``early_stop`` (Algorithm 1),
  ``capacity`` (production: capacity from the survival of two rounds earlier) and
  ``fixed``.

Throughput. With n drafts admitted, B requests verify B + n tokens (each request's anchor
plus its drafts) and the step yields ``tau(n) = B + sum of the n admitted survivals``
expected tokens (every request emits at least one token) at cost ``T(B + n)``:
``Theta(n) = tau(n) / T(B + n)``.
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


class CostProfile:
    """Target step time as a function of the number of tokens verified in the step.

    ``CostProfile(tokens, seconds)`` takes measured points (any order, distinct token
    counts, seconds > 0). The seconds are made non-decreasing in tokens by a running
    maximum (a step never gets cheaper with more tokens; measurement noise would
    otherwise create spurious throughput peaks). Between points the cost is linearly
    interpolated; past the last point it is extrapolated linearly with the slope of the
    last two points (0 with a single point); below the first point it is clamped to the
    first value (extrapolating downwards could reach 0 or below and a step costs at
    least what the smallest measured step costs).

    ``cost(n)``: n an int or float gives a float; n a tensor gives a tensor on n's
    device, of n's dtype if floating (else float32), computed there with no host
    synchronisation (the profile's own tensors are copied once per device and cached).
    """

    def __init__(self, tokens: Sequence[float], seconds: Sequence[float], metadata: dict | None = None):
        """Args:
            tokens: token counts of the measured points (distinct, >= 0).
            seconds: step time at each count (> 0, finite).
            metadata: optional dict kept with the profile (``save`` writes it).
        """
        tokens = [float(t) for t in tokens]
        seconds = [float(s) for s in seconds]
        if len(tokens) != len(seconds):
            raise ValueError(f"tokens ({len(tokens)}) and seconds ({len(seconds)}) must have the same length")
        if not tokens:
            raise ValueError("CostProfile needs at least one point")
        if not all(math.isfinite(t) and t >= 0 for t in tokens):
            raise ValueError(f"tokens must be finite and >= 0, got {tokens}")
        if not all(math.isfinite(s) and s > 0 for s in seconds):
            raise ValueError(f"seconds must be finite and > 0, got {seconds}")
        order = sorted(range(len(tokens)), key=tokens.__getitem__)
        tokens = [tokens[i] for i in order]
        seconds = [seconds[i] for i in order]
        if any(a == b for a, b in zip(tokens, tokens[1:])):
            raise ValueError(f"tokens must be distinct, got {tokens}")
        self.measured_seconds = list(seconds)
        monotone, best = [], 0.0
        for s in seconds:
            best = max(best, s)
            monotone.append(best)
        self.tokens = tokens
        self.seconds = monotone
        self.slopes = [(b - a) / (x1 - x0) for a, b, x0, x1 in zip(monotone, monotone[1:], tokens, tokens[1:])]
        self.slopes.append(self.slopes[-1] if self.slopes else 0.0)  # extrapolation slope past the last point
        self.metadata = dict(metadata or {})
        self._device_tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        points = ", ".join(f"{t:g}: {s:.4g}" for t, s in zip(self.tokens, self.seconds))
        return f"CostProfile({{{points}}})"

    # ------------------------------------------------------------------ evaluation
    def _scalar(self, n: float) -> float:
        if n <= self.tokens[0]:
            return self.seconds[0]
        i = min(bisect.bisect_right(self.tokens, n) - 1, len(self.tokens) - 1)
        return self.seconds[i] + (n - self.tokens[i]) * self.slopes[i]

    def _tables(self, device: torch.device):
        if device not in self._device_tables:
            table = torch.tensor([self.tokens, self.seconds, self.slopes], dtype=torch.float64)
            self._device_tables[device] = tuple(_to_device(table, device).unbind(0))
        return self._device_tables[device]

    def __call__(self, n):
        """Step time in seconds for n verified tokens.

        Args:
            n: int/float, or a tensor of token counts (any shape, any real dtype).

        Returns:
            float for a number; for a tensor, a tensor of n's shape on n's device (n's
            dtype if floating, else float32). Linear interpolation, linear
            extrapolation past the last point, clamped below the first point.
        """
        if not isinstance(n, torch.Tensor):
            return self._scalar(float(n))
        out_dtype = n.dtype if n.dtype.is_floating_point else torch.float32
        tokens, seconds, slopes = self._tables(n.device)
        x = n.to(torch.float64)
        i = (torch.searchsorted(tokens, x, right=True) - 1).clamp_(min=0)
        value = seconds[i] + (x - tokens[i]).clamp(min=0.0) * slopes[i]
        return value.to(out_dtype)

    # ------------------------------------------------------------------ measurement
    @classmethod
    def measure(cls, step_fn: Callable[[int], object], token_counts: Sequence[int], repeats: int = 5,
                warmup: int = 2, device: torch.device | str | None = None) -> "CostProfile":
        """Time ``step_fn(n)`` for every n in ``token_counts`` and keep the median.

        Args:
            step_fn: runs one target step verifying n tokens (its return value is ignored).
            token_counts: the n to measure (distinct).
            repeats: timed runs per n (median kept). warmup: untimed runs before them.
            device: "cuda" (default when a GPU is visible) times with CUDA events on the
                current stream, the device synchronised once per n after the timed runs
                (so step_fn must enqueue its work on the current CUDA stream); "cpu"
                times with time.perf_counter.

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
        return cls([int(n) for n in token_counts], medians, metadata)

    # ------------------------------------------------------------------ JSON
    def save(self, path: str | os.PathLike) -> None:
        """Write the profile as JSON: tokens, seconds (monotone), measured_seconds, the
        metadata (device, device_name, torch_version, date when measured) and, if absent
        from the metadata, the device name, torch version and date of saving."""
        record = {
            "device": "cpu",
            "device_name": device_name(torch.device("cpu")),
            "torch_version": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        record.update(self.metadata)
        record.update({"tokens": self.tokens, "seconds": self.seconds, "measured_seconds": self.measured_seconds})
        with open(path, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CostProfile":
        """Read a profile written by ``save`` (the measured seconds, made monotone again;
        every other key becomes ``metadata``)."""
        with open(path) as f:
            record = json.load(f)
        for key in ("tokens", "seconds"):
            if key not in record:
                raise ValueError(f"CostProfile.load: {path} has no '{key}' key")
        seconds = record.pop("measured_seconds", None) or record["seconds"]
        tokens = record.pop("tokens")
        record.pop("seconds")
        return cls(tokens, seconds, metadata=record)


class LoadAwareScheduler:
    """Chooses how many drafts of each request the target verifies this round.

    ``plan(survival)`` maps survival ``[B, K]`` to verify lengths ``[B]`` int32 on the same
    device, with no host synchronisation: only shapes are read on the host, so it can be
    captured in a CUDA graph (after one warm-up call with the same B, which builds the
    cached cost table; see below).

    Input conventions. survival is read as float32, NaN counts as 0 and values are
    clamped to [0, 1]. A survival is a cumulative product, hence non-increasing along K;
    the scheduler enforces this with a running minimum along K (a draft cannot be more
    likely to be accepted than the drafts before it, which it needs), so the drafts it
    admits always form a prefix of each request and the expected yield it optimises is
    the one of the drafts actually verified. For non-increasing inputs this changes
    nothing.

    Ordering. All B*K drafts are sorted by survival, highest first, with a stable sort of
    the row-major flattening: ties are broken by (request, position) order, so the result
    is deterministic and, within a request, position k is admitted before k+1.

    Modes:

    * ``early_stop`` (Algorithm 1, non-anticipating): admit drafts in sorted order while
      the throughput strictly increases, ``Theta(n+1) > Theta(n)``; stop at the first
      draft that does not improve it. On the device: sort, cumulative sum (float64),
      the mask ``improves[n] = a_(n+1) * T(B+n) > tau(n) * (T(B+n+1) - T(B+n))`` for
      n = 0..B*K-1 (the same test as ``Theta(n+1) > Theta(n)`` for T > 0, without a
      division, so exact on flat stretches of the cost: any a > 0 is admitted there),
      admitted = the length of its leading run of True (``cumprod(improves).sum()``),
      then ``L[b]`` = the number of request b's drafts among the admitted ones.
    * ``capacity`` (production): admit the top-C drafts by current survival, with C the
      global argmax over n = 0..B*K of ``Theta(n) = (B + S_n) / T(B+n)`` (the first
      maximum; S_n the sum of the n best survivals) computed on the survival
      passed two ``plan`` calls earlier. The first two calls use ``early_stop``. The
      history (the C of the last two calls, -1 before the first) lives on the device and
      is updated in place, so graph replays advance it. C is a number of drafts; when the
      batch changes size it is clamped to the current B*K (no rescaling).
    * ``fixed``: ``min(fixed_len, K)`` for every request.

    The cost table ``T(B + n), n = 0..B*K`` is evaluated on the host once per (device, B)
    and copied to the device (pinned, non-blocking), then cached (up to 64 batch sizes,
    least recently used dropped). Capture a CUDA graph only after a warm-up ``plan`` with
    the captured batch size.
    """

    _CACHE_SIZE = 64

    def __init__(self, cost: CostProfile, max_draft: int, mode: str = "early_stop", fixed_len: int | None = None):
        """Args:
            cost: the target's CostProfile (seconds against verified tokens).
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
    def _cost_table(self, device: torch.device, batch: int):
        """Cached device tables for batch size B (M = B*K drafts), all float64 except positions:
        cost [M+1] = T(B+n), n = 0..M; cost_lo [M] = T(B+n) and dcost [M] = T(B+n+1) - T(B+n),
        n = 0..M-1; b_dcost [M] = B * dcost; positions [M] int64 = 0..M-1."""
        key = (device, batch)
        entry = self._tables.get(key)
        if entry is None:
            num = batch * self.max_draft
            counts = torch.arange(batch, batch + num + 1, dtype=torch.float64)
            values = torch.as_tensor(self.cost(counts)).to(torch.float64)
            if values.shape != counts.shape or not bool(torch.isfinite(values).all()) or not bool((values > 0).all()):
                raise ValueError(f"cost must be finite and > 0 for {batch}..{batch + num} tokens")
            dcost = values[1:] - values[:-1]
            table = _to_device(torch.cat([values, dcost, batch * dcost]), device)
            cost = table[:num + 1]
            entry = (cost, cost[:-1], table[num + 1:2 * num + 1], table[2 * num + 1:],
                     torch.arange(num, device=device))
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

    # ------------------------------------------------------------------ plan
    def plan(self, survival: torch.Tensor) -> torch.Tensor:
        """Verify lengths for one round.

        Args:
            survival: [B, K] float (float32 expected), K == max_draft; survival[b, k] is
                the probability that drafts 0..k of request b are all accepted.

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
        if self.mode == "fixed":
            return torch.full((batch,), min(self.fixed_len, max_draft), dtype=torch.int32, device=device)
        num = batch * max_draft
        if num == 0:
            return torch.zeros(batch, dtype=torch.int32, device=device)

        cost, cost_lo, dcost, b_dcost, positions = self._cost_table(device, batch)
        s = torch.nan_to_num(survival.float(), nan=0.0).clamp_(0.0, 1.0)
        s = torch.cummin(s, dim=1).values
        values, order = torch.sort(s.view(-1), descending=True, stable=True)
        cum = torch.cumsum(F.pad(values, (1, 0)), dim=0, dtype=torch.float64)  # cum[n] = sum of the n best
        # Admitting draft n+1 (index n) improves Theta iff
        #   values[n] * T(B+n) > tau(n) * (T(B+n+1) - T(B+n)),  tau(n) = B + cum[n].
        improves = values * cost_lo > torch.addcmul(b_dcost, cum[:-1], dcost)
        early = torch.cumprod(improves, dim=0).sum()  # length of the leading run of improvements

        if self.mode == "capacity":
            history = self._history(device)
            capacity_now = torch.argmax((cum + batch) / cost)  # first maximum of Theta(0..M)
            oldest = history[0]
            admitted = torch.where(oldest >= 0, oldest, early).clamp_(max=num)
            oldest.copy_(history[1])
            history[1].copy_(capacity_now)
        else:
            admitted = early

        chosen = torch.empty(num, dtype=torch.bool, device=device)
        chosen.scatter_(0, order, positions < admitted)
        return chosen.view(batch, max_draft).sum(dim=1, dtype=torch.int32)
