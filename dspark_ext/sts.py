"""Sequential Temperature Scaling (STS) for the DSpark confidence head.

The confidence head gives, per request b and draft position k, a raw logit
``l[b, k] = w . [h_k; W1[x_{k-1}]] + b`` (``torch.ops.dspark.confidence`` run with
``sts_temperature=None``, then ``torch.logit(conf)``, or the head's pre-sigmoid output).
With per-position temperatures ``T[k]`` the conditional acceptance probability is
``c_k = sigmoid(l_k / T_k)`` and the survival ``a_k = prod_{i <= k} c_i`` is the
probability that drafts 0..k are all accepted. The observed label of ``a_k`` is
``accepted_len > k``.

STS (DESIGN.md, "Confidence head") picks ``T_0, T_1, ...`` in order: for position k,
with the earlier temperatures fixed, a 1-D grid search over ``T_k`` minimises the
expected calibration error (ECE, equal-width bins) of ``a_k`` against its label.

Two fitters:

* ``fit_sts``: offline, on a held-out set of rounds ``[N, K]``; all grid points of one
  position are evaluated in one vectorised pass.
* ``OnlineSTS``: per-position, per-candidate-temperature, per-bin statistics kept on
  the device as exponential moving averages; ``update`` never synchronises with the
  host, so it can run inside the decoding loop (and inside a CUDA graph).

Conventions: ECE bins are ``[i/nb, (i+1)/nb)`` with the last one closed at 1 (a
probability p falls in bin ``min(floor(p * nb), nb - 1)``); ECE is
``sum_bins (n_bin / N) |mean p - mean label| = sum_bins |sum p - sum label| / N``.
NaN confidence logits count as ``-inf`` (confidence 0). The default grid is
``2 ** linspace(-3, 3, 61)`` (0.125 .. 8, ratio 2^0.1 ~ 7 % between neighbours, T = 1
exactly on the grid). Ties in the search (equal ECE) go to the temperature closest to 1
on a log scale, so a position without data keeps T = 1.

Censoring: when only ``num_verified[b] = L_b`` drafts were verified, both fitters (given
the optional ``num_verified``) use position k of round b only if ``k < L_b``. A position
``k >= L_b`` after an observed rejection does have a known label (0), but keeping those
while dropping the unobserved ones (after an all-accepted prefix) would select on the
outcome and bias the fit towards 0; the rule ``k < L_b`` depends only on what was
verified (chosen from the features, never from the outcome), so it keeps the fit
unbiased.
"""

from __future__ import annotations

import datetime
import json
import math
import os

import torch

__all__ = [
    "DEFAULT_NUM_BINS",
    "default_grid",
    "survival_from_logits",
    "survival_ece",
    "expected_calibration_error",
    "fit_sts",
    "save_sts",
    "load_sts",
    "OnlineSTS",
]

DEFAULT_NUM_BINS = 15
_TIE_RTOL = 1e-6  # ECE values within this relative tolerance of the minimum count as ties


def default_grid(num: int = 61, low: float = 0.125, high: float = 8.0,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Log-spaced candidate temperatures: [num] float32 from ``low`` to ``high``.

    The default (61 points over [1/8, 8]) has T = 1 exactly and a ratio of 2^0.1 between
    neighbours.
    """
    if num < 2 or not 0 < low < high:
        raise ValueError(f"default_grid: need num >= 2 and 0 < low < high, got {num}, {low}, {high}")
    exponents = torch.linspace(math.log2(low), math.log2(high), num, dtype=torch.float64)
    return torch.exp2(exponents).to(torch.float32).to(device)


def _check_grid(grid: torch.Tensor | None, device) -> torch.Tensor:
    if grid is None:
        return default_grid(device=device)
    grid = torch.as_tensor(grid, dtype=torch.float32, device=device).reshape(-1)
    if grid.numel() == 0:
        raise ValueError("grid must hold at least one temperature")
    if not bool((grid > 0).all()):  # host check, on the small grid only (construction time)
        raise ValueError("grid: every temperature must be > 0")
    return grid


def _sanitize_logits(conf_logits: torch.Tensor) -> torch.Tensor:
    """float32 (float64 stays float64) copy with NaN -> -inf."""
    logits = conf_logits if conf_logits.dtype == torch.float64 else conf_logits.float()
    return torch.where(torch.isnan(logits), torch.full_like(logits, -float("inf")), logits)


def survival_from_logits(conf_logits: torch.Tensor, temperatures: torch.Tensor | None = None) -> torch.Tensor:
    """Survival ``a[b, k] = prod_{i <= k} sigmoid(l[b, i] / T[i])``.

    Args:
        conf_logits: [N, K] float (raw confidence-head logits, before temperature).
        temperatures: [K] float32 or None (all ones).

    Returns:
        [N, K] float32 (float64 if conf_logits is float64), the same formula as
        ``dspark_ext.reference.confidence``'s survival.
    """
    if conf_logits.dim() != 2:
        raise ValueError(f"conf_logits must be [N, K], got shape {tuple(conf_logits.shape)}")
    logits = _sanitize_logits(conf_logits)
    if temperatures is not None:
        temperatures = torch.as_tensor(temperatures, device=logits.device).to(logits.dtype).reshape(-1)
        if temperatures.shape[0] != logits.shape[1]:
            raise ValueError(f"temperatures must be [{logits.shape[1]}], got {tuple(temperatures.shape)}")
        logits = logits / temperatures
    return torch.cumprod(torch.sigmoid(logits), dim=1)


def _bin_index(prob: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Equal-width bin of each probability: min(floor(p * nb), nb - 1), int64, p clamped to [0, 1]."""
    return (prob.clamp(0.0, 1.0) * num_bins).to(torch.int64).clamp_(max=num_bins - 1)


def expected_calibration_error(prob: torch.Tensor, label: torch.Tensor, num_bins: int = DEFAULT_NUM_BINS,
                               weight: torch.Tensor | None = None) -> torch.Tensor:
    """Expected calibration error with ``num_bins`` equal-width bins over [0, 1].

    Args:
        prob: [..., N] float, predicted probabilities (clamped to [0, 1]).
        label: [N] or [..., N] bool/int/float, the outcomes (0 or 1), broadcast to prob.
        num_bins: number of equal-width bins (15 by default).
        weight: optional [N] or [..., N] float weights (e.g. a 0/1 mask of known labels),
            broadcast to prob.

    Returns:
        float64 tensor of shape ``prob.shape[:-1]`` (0-d for a 1-D prob):
        ``sum_bins |sum_{i in bin} w_i (p_i - y_i)| / sum_i w_i`` (0 when the weights
        sum to 0). Leading dimensions are independent problems (e.g. a grid of
        temperatures), computed in one pass. No host synchronisation.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    prob = prob.to(torch.float64)
    label = torch.as_tensor(label, device=prob.device).to(torch.float64)
    prob, label = torch.broadcast_tensors(prob, label)
    if weight is None:
        weight = torch.ones_like(prob)
    else:
        weight = torch.broadcast_to(torch.as_tensor(weight, device=prob.device).to(torch.float64), prob.shape)
    lead = prob.shape[:-1]
    rows = int(math.prod(lead))
    p2 = prob.reshape(rows, -1)
    bins = _bin_index(p2, num_bins) + (torch.arange(rows, device=prob.device) * num_bins).unsqueeze(1)
    diff = (weight.reshape(rows, -1) * (p2 - label.reshape(rows, -1)))
    sums = torch.zeros(rows * num_bins, dtype=torch.float64, device=prob.device)
    sums.scatter_add_(0, bins.reshape(-1), diff.reshape(-1))
    total = weight.reshape(rows, -1).sum(dim=1)
    ece = sums.reshape(rows, num_bins).abs().sum(dim=1) / total.clamp(min=torch.finfo(torch.float64).tiny)
    return ece.reshape(lead)


def _known_mask(accepted_len: torch.Tensor, num_verified: torch.Tensor | None, max_draft: int) -> torch.Tensor | None:
    """[N, K] bool: the (round, position) pairs used, k < num_verified (None = all)."""
    if num_verified is None:
        return None
    positions = torch.arange(max_draft, device=accepted_len.device).unsqueeze(0)
    return positions < num_verified.to(torch.int64).unsqueeze(1)


def _pick(ece: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Index of the smallest ECE along the last dim, ties to the grid point closest to T = 1.

    ece: [..., G]; grid: [G]. Returns [...] int64. No host synchronisation.
    """
    best = ece.amin(dim=-1, keepdim=True)
    ties = ece <= best + _TIE_RTOL * best.abs() + 1e-15
    distance = torch.log(grid.to(ece.dtype)).abs().expand_as(ece)
    return torch.where(ties, distance, torch.full_like(distance, float("inf"))).argmin(dim=-1)


def _check_fit_args(conf_logits, accepted_len, num_verified):
    if conf_logits.dim() != 2:
        raise ValueError(f"conf_logits must be [N, K], got shape {tuple(conf_logits.shape)}")
    n, _ = conf_logits.shape
    if tuple(accepted_len.shape) != (n,):
        raise ValueError(f"accepted_len must be [{n}], got shape {tuple(accepted_len.shape)}")
    if num_verified is not None and tuple(num_verified.shape) != (n,):
        raise ValueError(f"num_verified must be [{n}], got shape {tuple(num_verified.shape)}")
    if accepted_len.dtype.is_floating_point or accepted_len.dtype == torch.bool:
        raise ValueError(f"accepted_len must be an integer tensor, got {accepted_len.dtype}")


def fit_sts(conf_logits: torch.Tensor, accepted_len: torch.Tensor, num_bins: int = DEFAULT_NUM_BINS,
            grid: torch.Tensor | None = None, num_verified: torch.Tensor | None = None) -> torch.Tensor:
    """Offline Sequential Temperature Scaling by grid search on the ECE of survival.

    Args:
        conf_logits: [N, K] float, raw confidence logits of N held-out rounds.
        accepted_len: [N] integer, number of drafts the target accepted in each round.
        num_bins: ECE bins (15).
        grid: [G] candidate temperatures (default ``default_grid()``: 61 points, 1/8..8).
        num_verified: optional [N] integer, drafts verified per round: positions
            k >= num_verified[n] are ignored (see the module docstring on censoring);
            None means all K positions were verified.

    Returns:
        temperatures [K] float32 on conf_logits' device. For k = 0..K-1 in order,
        ``T_k = argmin_{T in grid} ECE(prefix_k * sigmoid(l_k / T), accepted_len > k)``
        with ``prefix_k = prod_{i<k} sigmoid(l_i / T_i)`` (the temperatures already
        chosen). All G candidates of a position are scored in one pass ([G, N] float64).
        Equal ECE goes to the candidate closest to T = 1.
    """
    _check_fit_args(conf_logits, accepted_len, num_verified)
    device = conf_logits.device
    grid = _check_grid(grid, device)
    logits = _sanitize_logits(conf_logits).to(torch.float64)
    n, max_draft = logits.shape
    known = _known_mask(accepted_len, num_verified, max_draft)
    labels = accepted_len.to(torch.int64).unsqueeze(1) > torch.arange(max_draft, device=device).unsqueeze(0)
    grid64 = grid.to(torch.float64).unsqueeze(1)  # [G, 1]
    temperatures = torch.ones(max_draft, dtype=torch.float32, device=device)
    prefix = torch.ones(n, dtype=torch.float64, device=device)
    for k in range(max_draft):
        candidates = prefix.unsqueeze(0) * torch.sigmoid(logits[:, k].unsqueeze(0) / grid64)  # [G, N]
        ece = expected_calibration_error(candidates, labels[:, k], num_bins,
                                         weight=None if known is None else known[:, k])
        choice = _pick(ece, grid)
        temperatures[k] = grid[choice]
        prefix = prefix * torch.sigmoid(logits[:, k] / grid[choice].to(torch.float64))
    return temperatures


def survival_ece(conf_logits: torch.Tensor, accepted_len: torch.Tensor, temperatures: torch.Tensor | None = None,
                 num_verified: torch.Tensor | None = None, num_bins: int = DEFAULT_NUM_BINS) -> torch.Tensor:
    """ECE of survival over every known (round, position) pair of held-out rounds: the
    survival ``a[n, k]`` (``survival_from_logits(conf_logits, temperatures)``) against the
    outcome ``accepted_len[n] > k``, positions k >= num_verified[n] ignored (the labels
    and censoring of ``fit_sts``). Returns a float64 0-d tensor."""
    _check_fit_args(conf_logits, accepted_len, num_verified)
    max_draft = conf_logits.shape[1]
    survival = survival_from_logits(conf_logits, temperatures)
    positions = torch.arange(max_draft, device=conf_logits.device).unsqueeze(0)
    labels = accepted_len.to(torch.int64).unsqueeze(1) > positions
    known = _known_mask(accepted_len, num_verified, max_draft)
    return expected_calibration_error(survival.reshape(-1), labels.reshape(-1), num_bins,
                                      weight=None if known is None else known.reshape(-1))


def save_sts(path: str | os.PathLike, temperatures: torch.Tensor | list[float], **metadata) -> None:
    """Write STS temperatures as JSON.

    Args:
        path: output file.
        temperatures: [K] tensor or list of floats.
        **metadata: extra JSON-serialisable keys (e.g. ``num_bins``, ``ece_before``,
            ``ece_after``, ``num_rounds``, ``model``).

    The file holds ``{"sts_temperatures": [K floats], "max_draft": K, "date": ISO date,
    "torch_version": ..., **metadata}``.
    """
    values = [float(t) for t in torch.as_tensor(temperatures).reshape(-1).tolist()]
    if not all(math.isfinite(t) and t > 0 for t in values):
        raise ValueError(f"save_sts: temperatures must be finite and > 0, got {values}")
    record = {
        "sts_temperatures": values,
        "max_draft": len(values),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
    }
    record.update(metadata)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")


def load_sts(path: str | os.PathLike, device: torch.device | str | None = None) -> torch.Tensor:
    """Read temperatures written by ``save_sts``: returns [K] float32 on ``device`` (CPU by default).

    Raises ValueError when the key ``sts_temperatures`` is missing or holds a value
    that is not a positive finite number.
    """
    with open(path) as f:
        record = json.load(f)
    if "sts_temperatures" not in record:
        raise ValueError(f"load_sts: {path} has no 'sts_temperatures' key")
    values = [float(t) for t in record["sts_temperatures"]]
    if not all(math.isfinite(t) and t > 0 for t in values):
        raise ValueError(f"load_sts: {path}: temperatures must be finite and > 0, got {values}")
    return torch.tensor(values, dtype=torch.float32, device=device)


class OnlineSTS:
    """Online Sequential Temperature Scaling with per-bin exponential moving averages.

    Design. For every position k, every candidate temperature ``grid[g]`` and every ECE
    bin, the object keeps on the device exponential moving averages of three sums over
    the rounds seen: the weight (count), the predicted survival and the label, in one
    float32 tensor ``stats`` of shape [3, K, G, num_bins]. The candidate survival of
    position k is ``prefix_k * sigmoid(l_k / grid[g])`` where the prefix
    ``prod_{i<k} sigmoid(l_i / T*_i)`` uses the *live* temperatures ``T*``: for each
    earlier position, the current ECE argmin of its own statistics (recomputed on the
    device at the start of every ``update``, no host round trip). This is the
    sequential rule of ``fit_sts`` run continuously: once positions < k settle, the
    statistics of position k are those of a batch fit with those temperatures; while
    an earlier temperature moves, the rounds gathered with the old one fade out of the
    average with the decay (time constant ``1 / (1 - decay)`` updates). Since ECE is
    ``sum_bins |sum p - sum y| / sum w``, refitting needs only these sums: ``refit`` is
    a [K, G, nb] reduction and an argmin, no pass over past data.

    Memory: 3 * K * G * num_bins floats (K = 8, 61 points, 15 bins: 88 KB). Update cost:
    one [G, B, K] elementwise pass and one scatter-add.

    Each ``update`` multiplies the statistics by ``decay`` and adds the batch's sums
    (weights per update call, whatever the batch size). ``temperatures`` is a persistent
    [K] device tensor that only ``refit`` changes, in place, so a CUDA graph that
    captured it (e.g. the confidence op's ``sts_temperature``) sees the new values.
    """

    def __init__(self, max_draft: int, num_bins: int = DEFAULT_NUM_BINS, decay: float = 0.99,
                 grid: torch.Tensor | None = None, device: torch.device | str | None = None):
        """Args:
            max_draft: K, positions per round.
            num_bins: ECE bins (15).
            decay: EMA factor in (0, 1] applied per ``update`` (1 = plain sums).
            grid: [G] candidate temperatures (default ``default_grid()``).
            device: where the statistics live (default CPU; ``to`` moves them).
        """
        if max_draft < 1:
            raise ValueError(f"max_draft must be >= 1, got {max_draft}")
        if num_bins < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must lie in (0, 1], got {decay}")
        self.max_draft = max_draft
        self.num_bins = num_bins
        self.decay = float(decay)
        self.grid = _check_grid(grid, device)
        num_grid = self.grid.shape[0]
        self.stats = torch.zeros(3, max_draft, num_grid, num_bins, dtype=torch.float32, device=self.grid.device)
        self._temperatures = torch.ones(max_draft, dtype=torch.float32, device=self.grid.device)
        self._positions = torch.arange(max_draft, device=self.grid.device)
        # flat index of (position k, grid point g, bin 0) in one [K * G * nb] plane
        self._base = ((torch.arange(max_draft, device=self.grid.device).reshape(1, 1, max_draft) * num_grid
                       + torch.arange(num_grid, device=self.grid.device).reshape(num_grid, 1, 1)) * num_bins)

    @property
    def device(self) -> torch.device:
        return self.stats.device

    def to(self, device: torch.device | str) -> "OnlineSTS":
        """Move the statistics and temperatures to ``device`` (returns self)."""
        self.grid = self.grid.to(device)
        self.stats = self.stats.to(device)
        self._temperatures = self._temperatures.to(device)
        self._positions = self._positions.to(device)
        self._base = self._base.to(device)
        return self

    def reset(self) -> None:
        """Forget all statistics and set the temperatures back to 1 (in place)."""
        self.stats.zero_()
        self._temperatures.fill_(1.0)

    def position_ece(self) -> torch.Tensor:
        """Current ECE estimate of every position at every candidate: [K, G] float32, no sync."""
        count, sum_prob, sum_label = self.stats.unbind(0)
        total = count.sum(dim=-1)
        return (sum_prob - sum_label).abs().sum(dim=-1) / total.clamp(min=torch.finfo(torch.float32).tiny)

    def live_temperatures(self) -> torch.Tensor:
        """The per-position ECE argmin of the current statistics: [K] float32 (a new tensor), no sync.

        Ties (e.g. a position without data) go to the candidate closest to T = 1.
        """
        return self.grid[_pick(self.position_ece(), self.grid)]

    @property
    def temperatures(self) -> torch.Tensor:
        """The temperatures of the last ``refit`` (ones before): [K] float32, a persistent tensor."""
        return self._temperatures

    def update(self, conf_logits: torch.Tensor, accepted_len: torch.Tensor,
               num_verified: torch.Tensor | None = None) -> None:
        """Fold one batch of rounds into the statistics, on the device, with no host synchronisation.

        Args:
            conf_logits: [B, K] float, raw confidence logits (before temperature).
            accepted_len: [B] integer, accepted drafts per round.
            num_verified: optional [B] integer, drafts verified per round (positions
                k >= num_verified[b] are ignored, see the module docstring).

        Only shapes are checked on the host; values never are (no .item(), no nonzero,
        no data-dependent branch), so this can be captured in a CUDA graph once the
        object lives on the graph's device.
        """
        if conf_logits.dim() != 2 or conf_logits.shape[1] != self.max_draft:
            raise ValueError(f"conf_logits must be [B, {self.max_draft}], got shape {tuple(conf_logits.shape)}")
        batch = conf_logits.shape[0]
        if tuple(accepted_len.shape) != (batch,):
            raise ValueError(f"accepted_len must be [{batch}], got shape {tuple(accepted_len.shape)}")
        if num_verified is not None and tuple(num_verified.shape) != (batch,):
            raise ValueError(f"num_verified must be [{batch}], got shape {tuple(num_verified.shape)}")
        if conf_logits.device != self.device:
            raise ValueError(f"conf_logits is on {conf_logits.device}, the statistics on {self.device}")
        logits = _sanitize_logits(conf_logits).float()
        live = self.live_temperatures()  # [K]
        conf = torch.sigmoid(logits / live)
        prefix = torch.cumprod(torch.cat([torch.ones_like(conf[:, :1]), conf[:, :-1]], dim=1), dim=1)  # [B, K]
        candidates = prefix.unsqueeze(0) * torch.sigmoid(logits.unsqueeze(0) / self.grid.reshape(-1, 1, 1))
        labels = (accepted_len.to(torch.int64).unsqueeze(1) > self._positions).float()  # [B, K]
        known = _known_mask(accepted_len, num_verified, self.max_draft)
        weight = torch.ones_like(labels) if known is None else known.float()
        index = self._base + _bin_index(candidates, self.num_bins)  # [G, B, K]
        plane = self.stats[0].numel()
        src = torch.stack([weight.expand_as(candidates), candidates * weight, (labels * weight).expand_as(candidates)])
        index3 = index.unsqueeze(0) + (torch.arange(3, device=self.device) * plane).reshape(3, 1, 1, 1)
        batch_sums = torch.zeros(3 * plane, dtype=torch.float32, device=self.device)
        batch_sums.scatter_add_(0, index3.reshape(-1), src.reshape(-1))
        self.stats.mul_(self.decay).add_(batch_sums.view_as(self.stats))

    def refit(self) -> torch.Tensor:
        """Set ``temperatures`` (in place) to the live per-position ECE argmin and return it.

        Returns the persistent [K] float32 tensor. This implementation does not
        synchronise with the host either; callers may still treat it as a point where
        synchronisation is allowed (e.g. to log ``temperatures.tolist()``).
        """
        self._temperatures.copy_(self.live_temperatures())
        return self._temperatures
