"""The executable specification of every dspark op, in plain PyTorch.

Each function here computes exactly what the C++ and CUDA kernels compute, with the
same random numbers (Philox-4x32-10, the counter layout of DESIGN.md), so tests can
compare tokens one for one. Clarity comes first; loops over the vocabulary are avoided
so the reference stays usable at real vocabulary sizes.

Conventions shared by all ops (DESIGN.md, "Common rules"):

* logits are read as float32; NaN counts as -inf, +inf and x > FLT_MAX/2 are clamped to
  FLT_MAX/2; temperature +inf is clamped to FLT_MAX;
* at temperature T the distribution is softmax(x / T). verify computes it in base 2, with
  cheap per-element arithmetic that the kernels can follow at memory speed: per row the
  scale s = log2(e) / T (float32, rounded once, at most FLT_MAX), per token the weight
  w = exp2((x - max) * s), the row's mass S = sum w and its reciprocal once, p = w * (1 / S);
  markov_draft still uses exp((x - max) / T);
* temperature <= 0 (or NaN) means greedy: argmax, ties to the smallest index;
* sampling is an exponential race. verify: argmax_v (w_v / E'_v) over a weight vector w
  (exp2 weights, or the residual), E' = -log2(u) from ``exponential2``; markov_draft:
  argmax_v ((x_v - max) / T - log E_v), E = -log(u) from ``exponential``;
* a distribution with no mass emits the token -1.

The CUDA kernels compute exp2, log2 and reciprocals with the GPU's approximate
instructions (relative error about 2^-22) and sum in their own order, so they choose the
same tokens as this spec except, rarely, where two keys or an acceptance test fall
within such an error of each other; tests measure the agreement.
"""

from __future__ import annotations

import torch

__all__ = [
    "STREAM_DRAFT",
    "STREAM_ACCEPT",
    "STREAM_RESAMPLE",
    "philox4x32_10",
    "random_words",
    "acceptance_uniform",
    "exponential",
    "exponential2",
    "exp2_scale",
    "sanitize",
    "sanitize_temperature",
    "filter_mask",
    "relative_logits",
    "check_verify_values",
    "verify",
    "markov_draft",
    "select_candidates",
    "draft_choice",
    "confidence",
]

STREAM_DRAFT = 0
STREAM_ACCEPT = 1
STREAM_RESAMPLE = 2

_MASK32 = 0xFFFFFFFF
_FLT_MAX = torch.finfo(torch.float32).max


# --------------------------------------------------------------------------- Philox
def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) words of the 64-bit product of the constant ``a`` and uint32 values ``b``.

    torch has no uint64 arithmetic, so the product is split into 16-bit halves of ``a``;
    every partial product stays below 2^49 and fits a signed int64.
    """
    a_lo, a_hi = a & 0xFFFF, a >> 16
    lo_part = b * a_lo
    hi_part = b * a_hi
    lo = (lo_part + ((hi_part & 0xFFFF) << 16)) & _MASK32
    hi = (hi_part + (lo_part >> 16)) >> 16
    return hi, lo


def philox4x32_10(counter: list[torch.Tensor], key: tuple[torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
    """Philox-4x32-10 on int64 tensors holding uint32 values (broadcasting).

    ``counter`` is four tensors, ``key`` two; returns the four output words.
    """
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & _MASK32 for c in counter)
    k0, k1 = (torch.as_tensor(k, dtype=torch.int64) & _MASK32 for k in key)
    for _ in range(10):
        hi0, lo0 = _mulhilo32(0xD2511F53, c0)
        hi1, lo1 = _mulhilo32(0xCD9E8D57, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + 0x9E3779B9) & _MASK32
        k1 = (k1 + 0xBB67AE85) & _MASK32
    return [c0, c1, c2, c3]


def _split64(value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Low and high 32-bit words of int64 values (two's complement for negatives)."""
    value = value.to(torch.int64)
    return value & _MASK32, (value >> 32) & _MASK32


def random_words(seed: torch.Tensor, stream: int, position: torch.Tensor, offset: torch.Tensor,
                 num: int) -> torch.Tensor:
    """32-bit random words for vocabulary indices 0..num-1, as int64 in [0, 2^32).

    seed, position, offset: [N] int64 (position may be int). Returns [N, num].
    Counter = (v >> 2, (stream << 24) | position, low32(offset), high32(offset)),
    key = (low32(seed), high32(seed)), word v & 3.
    """
    seed = torch.as_tensor(seed, dtype=torch.int64).reshape(-1, 1)
    offset = torch.as_tensor(offset, dtype=torch.int64).reshape(-1, 1)
    position = torch.as_tensor(position, dtype=torch.int64).reshape(-1, 1)
    groups = torch.arange((num + 3) // 4, dtype=torch.int64, device=seed.device).reshape(1, -1)
    key0, key1 = _split64(seed)
    off_lo, off_hi = _split64(offset)
    c1 = (stream << 24) | (position & 0xFFFFFF)
    words = philox4x32_10([groups, c1, off_lo, off_hi], (key0, key1))
    words = torch.broadcast_tensors(*words)
    return torch.stack(words, dim=-1).reshape(seed.shape[0], groups.shape[1] * 4)[:, :num]


def acceptance_uniform(words: torch.Tensor) -> torch.Tensor:
    """u = ((x >> 8) + 0.5) * 2^-24 as float64 (25 significant bits: exact, never 0 or 1)."""
    return ((words >> 8).to(torch.float64) + 0.5) * 2.0**-24


def exponential(words: torch.Tensor) -> torch.Tensor:
    """Standard exponential E = -log(u) from 32-bit words, float32, never 0 or inf.

    For x < 2^31: u = (float(x) + 0.5) * 2^-32, E = -log(u). For x >= 2^31 the
    complement keeps the precision near E = 0: E = -log1p(-(float(2^32-1-x) + 0.5) * 2^-32).
    """
    low = words < 0x80000000
    comp = torch.where(low, words, _MASK32 - words)
    w = (comp.to(torch.float32) + 0.5) * 2.0**-32
    return torch.where(low, -torch.log(w), -torch.log1p(-w))


def exponential2(words: torch.Tensor) -> torch.Tensor:
    """E' = E / ln 2 = -log2(u), the standard exponential in base-2 units (verify's races),
    float32 from 32-bit words, never 0 or inf: E' in [1.68e-10, 33].

    For x < 2^31: u = float(x) * 2^-32 + 2^-33 (the product is exact, so one rounding),
    E' = -log2(u). For x >= 2^31 the complement c = 2^32 - 1 - x keeps E' near 0 precise:
    w = float(c) * 2^-32 + 2^-33, E' = -log1p(-w) * float32(log2(e)).
    """
    low = words < 0x80000000
    comp = torch.where(low, words, _MASK32 - words)
    f = comp.to(torch.float32) * 2.0**-32 + 2.0**-33
    return torch.where(low, -torch.log2(f), -torch.log1p(-f) * LOG2E)


LOGIT_LIMIT = _FLT_MAX / 2
LOG2E = torch.tensor(1.4426950408889634, dtype=torch.float32).item()


def exp2_scale(temperature: torch.Tensor) -> torch.Tensor:
    """Per-row scale s = log2(e) / T in float32 (T > 0), at most FLT_MAX."""
    s = torch.tensor(LOG2E, dtype=torch.float32, device=temperature.device) / temperature.float()
    return torch.clamp(s, max=_FLT_MAX)


def sanitize(logits: torch.Tensor) -> torch.Tensor:
    """float32 copy with NaN -> -inf, and +inf and values above FLT_MAX/2 clamped to
    FLT_MAX/2: x - max is then never NaN."""
    y = logits.float()
    y = torch.where(torch.isnan(y), torch.full_like(y, -float("inf")), y)
    return torch.clamp(y, max=LOGIT_LIMIT)


def sanitize_temperature(temperature):
    """Sampling temperature with +inf clamped to FLT_MAX (<= 0 and NaN stay: greedy)."""
    if torch.is_tensor(temperature):
        return torch.where(temperature > _FLT_MAX, torch.full_like(temperature, _FLT_MAX), temperature)
    return _FLT_MAX if temperature > _FLT_MAX else temperature


# --------------------------------------------------------------------------- filters
def filter_mask(x: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
                temperature: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of the tokens kept by top-k then top-p, row-wise.

    x: [N, V] sanitized float32 logits; temperature: [N] (> 0) or None for 1; top_k [N]
    int, top_p [N] float, or None. The token probabilities are softmax(x / T).

    top-k keeps v iff fewer than k tokens have a strictly larger logit (ties at the
    boundary are all kept); k <= 0 or k >= V means off. top-p (masses exp2((x - m) * s),
    s = exp2_scale(T)) then keeps v iff the
    probability mass, within the top-k set, of the tokens strictly more likely than v is
    below top_p times the mass of the set; the most likely tokens are always kept and
    top_p >= 1 (or NaN) means off. Both are thresholds: the mask is x >= tau per row.
    Tokens with x = -inf are never kept.
    """
    n, vocab = x.shape
    keep = x > -float("inf")
    if top_k is None and top_p is None:
        return keep
    sorted_x, _ = torch.sort(x, dim=-1, descending=True)
    tau = torch.full((n,), -float("inf"), dtype=torch.float32, device=x.device)
    if top_k is not None:
        k = top_k.to(torch.int64)
        k_on = (k > 0) & (k < vocab)
        kth = sorted_x.gather(1, (k.clamp(1, vocab) - 1).unsqueeze(1)).squeeze(1)
        tau = torch.where(k_on, kth, tau)
    if top_p is not None:
        p = top_p.float()
        p_on = p < 1.0  # False for NaN as well
        temp = torch.ones(n, device=x.device) if temperature is None else temperature.float()
        m = sorted_x[:, :1]
        in_set = (sorted_x >= tau.unsqueeze(1)) & (sorted_x > -float("inf"))
        q = torch.where(in_set, torch.exp2((sorted_x - m) * exp2_scale(temp).unsqueeze(1)),
                        torch.zeros_like(sorted_x))
        total = q.sum(dim=1)
        mass_before = torch.cumsum(q, dim=1) - q  # mass of the entries sorted before
        below = (mass_before < (p * total).unsqueeze(1)) & in_set
        # Tokens tied with a kept token are kept too, so the cut is at the value of the
        # last sorted entry whose preceding mass is below the limit (entry 0 always is).
        last = (below.sum(dim=1) - 1).clamp(min=0)
        tau_p = sorted_x.gather(1, last.unsqueeze(1)).squeeze(1)
        tau = torch.where(p_on, torch.maximum(tau, tau_p), tau)
    return keep & (x >= tau.unsqueeze(1))


def relative_logits(x: torch.Tensor, keep: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """(x_v - m) / T over the kept tokens (-inf elsewhere), m the row max over kept (0 if none).

    Subtracting the max before dividing keeps every value <= 0: no overflow at tiny T, and
    several +inf logits (sanitized to the largest float) tie at 0 instead of losing the
    random part of the race key.
    """
    m = torch.where(keep, x, torch.full_like(x, -float("inf"))).amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    if not torch.is_tensor(temperature):
        temperature = torch.tensor(temperature, dtype=torch.float32, device=x.device)
    rel = (x - m) / temperature.float().reshape(temperature.shape + (1,) * (x.dim() - temperature.dim()))
    return torch.where(keep, rel, torch.full_like(rel, -float("inf")))


def exp2_weights(x: torch.Tensor, keep: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """w_v = exp2((x_v - m) * s) over the kept tokens (0 elsewhere), m the row max over kept
    (0 if none), s [N] the per-row exp2_scale. The max has weight 1, so a row with a kept
    token has mass >= 1; several +inf logits (sanitized to FLT_MAX/2) tie at weight 1."""
    m = torch.where(keep, x, torch.full_like(x, -float("inf"))).amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp2((x - m) * scale.reshape(-1, 1))
    return torch.where(keep, w, torch.zeros_like(w))


def _probabilities(weights: torch.Tensor) -> torch.Tensor:
    """p_v = w_v * (1 / S), S the row's mass, its reciprocal rounded once; all 0 if S = 0."""
    total = weights.sum(dim=1, keepdim=True)
    inverse = 1.0 / total.clamp(min=torch.finfo(torch.float32).tiny)
    return torch.where(total > 0, weights * inverse, torch.zeros_like(weights))


def _argmax_or_none(keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Row argmax of keys over valid entries, ties to the smallest index, -1 if none."""
    masked = torch.where(valid, keys, torch.full_like(keys, -float("inf")))
    best = masked.amax(dim=1, keepdim=True)
    hit = valid & (masked == best)
    vocab = keys.shape[1]
    idx = torch.arange(vocab, device=keys.device).expand_as(keys)
    first = torch.where(hit, idx, torch.full_like(idx, vocab)).amin(dim=1)
    return torch.where(first < vocab, first, torch.full_like(first, -1))


# --------------------------------------------------------------------------- verify
def _check_verify_args(target_logits, target_offset, draft_tokens, draft_logits, num_draft,
                       temperature, seed, offset, top_k, top_p):
    if target_logits.dim() != 2:
        raise ValueError(f"target_logits must be [Nt, V], got shape {tuple(target_logits.shape)}")
    if draft_tokens.dim() != 2:
        raise ValueError(f"draft_tokens must be [B, K], got shape {tuple(draft_tokens.shape)}")
    batch, max_draft = draft_tokens.shape
    vocab = target_logits.shape[1]
    for name, tensor in (("target_offset", target_offset), ("num_draft", num_draft),
                         ("temperature", temperature), ("seed", seed), ("offset", offset),
                         ("top_k", top_k), ("top_p", top_p)):
        if tensor is not None and tuple(tensor.shape) != (batch,):
            raise ValueError(f"{name} must have shape [{batch}], got {tuple(tensor.shape)}")
    if draft_logits is not None and tuple(draft_logits.shape) != (batch, max_draft, vocab):
        raise ValueError(f"draft_logits must be [{batch}, {max_draft}, {vocab}], got {tuple(draft_logits.shape)}")
    check_verify_values(target_logits, target_offset, draft_tokens, num_draft)


def check_verify_values(target_logits: torch.Tensor, target_offset: torch.Tensor, draft_tokens: torch.Tensor,
                        num_draft: torch.Tensor) -> None:
    """Raise ValueError for out-of-range num_draft, target_offset or draft ids.

    The CPU kernel always checks these; the CUDA kernel cannot without a host
    synchronisation, so it marks such a request with num_accepted = -1 instead. Call this
    (it synchronises) when debugging CUDA inputs.
    """
    max_draft = draft_tokens.shape[1]
    rows, vocab = target_logits.shape
    lengths = num_draft.to(torch.int64)
    bad = (lengths < 0) | (lengths > max_draft)
    if bool(bad.any()):
        b = int(bad.nonzero()[0])
        raise ValueError(f"verify: num_draft[{b}] = {int(lengths[b])} is outside [0, K={max_draft}]")
    bad = (target_offset < 0) | (target_offset > rows - 1 - lengths)  # no int64 overflow
    if bool(bad.any()):
        b = int(bad.nonzero()[0])
        raise ValueError(f"verify: target_offset[{b}] = {int(target_offset[b])} with num_draft {int(lengths[b])} "
                         f"needs rows beyond target_logits ({rows} rows)")
    used = torch.arange(max_draft, device=draft_tokens.device).unsqueeze(0) < lengths.unsqueeze(1)
    bad = used & ((draft_tokens < 0) | (draft_tokens >= vocab))
    if bool(bad.any()):
        b, j = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"verify: draft_tokens[{b}, {j}] = {int(draft_tokens[b, j])} is outside the vocabulary "
                         f"[0, {vocab})")


def verify(target_logits: torch.Tensor, target_offset: torch.Tensor, draft_tokens: torch.Tensor,
           draft_logits: torch.Tensor | None, num_draft: torch.Tensor, temperature: torch.Tensor,
           seed: torch.Tensor, offset: torch.Tensor, top_k: torch.Tensor | None = None,
           top_p: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lossless speculative sampling (the spec of ``torch.ops.dspark.verify``).

    Args:
        target_logits: [Nt, V]; request b's rows are target_offset[b] .. + num_draft[b].
        target_offset: [B] int64.
        draft_tokens: [B, K] int64, target vocabulary.
        draft_logits: [B, K, V] logits the drafts were sampled from, or None for
            deterministic drafts (p_d is one-hot on the draft).
        num_draft: [B] int32, L_b in [0, K].
        temperature, seed, offset: [B] float32 / int64 / int64.
        top_k, top_p: [B] int32 / float32 or None; they filter the target distribution.

    Returns:
        out_tokens [B, K+1] int64 (-1 padded) and num_accepted [B] int32.

    Per request with L = num_draft[b], row j of the target is x = sanitize(t_j).
    Sampling (T > 0): with s = exp2_scale(T), p_t = filtered softmax(x / T), computed as
    w = exp2((x - m) * s) over the kept tokens (m their max) and p = w * (1 / S), S = sum w;
    p_d likewise from the draft row (unfiltered, same T, one-hot if draft_logits is None).
    Draft j is accepted iff u_j * p_d(x_j) < p_t(x_j) (float64, u_j from stream 1 at
    position j). At the first rejection j the token is the race argmax_v r_v / E'_v over
    r = max(0, p_t - p_d), r > 0 (stream 2, position j); if r has no mass it falls back to
    the target race. If all L are accepted, the bonus is the race argmax_v w_v / E'_v over
    the kept tokens of row L with w_v > 0 (stream 2, position L).
    Greedy (T <= 0): accept while x_j == argmax(t_j), then emit argmax. A row with no
    mass emits -1, which ends the request's tokens.
    """
    _check_verify_args(target_logits, target_offset, draft_tokens, draft_logits, num_draft,
                       temperature, seed, offset, top_k, top_p)
    batch, max_draft = draft_tokens.shape
    vocab = target_logits.shape[1]
    device = target_logits.device
    out_tokens = torch.full((batch, max_draft + 1), -1, dtype=torch.int64, device=device)
    num_accepted = torch.zeros(batch, dtype=torch.int32, device=device)
    for b in range(batch):
        length = int(num_draft[b])
        start = int(target_offset[b])
        rows = target_logits[start:start + length + 1]  # [L+1, V]
        drafts = draft_tokens[b, :length]
        temp = sanitize_temperature(float(temperature[b]))
        rows = sanitize(rows)
        if not temp > 0.0:
            target_best = _argmax_or_none(rows, rows > -float("inf"))
            accepted = 0
            while accepted < length and int(drafts[accepted]) == int(target_best[accepted]):
                accepted += 1
            emitted = int(target_best[accepted])
        else:
            temp_t = torch.tensor(temp, dtype=torch.float32, device=device)
            keep = filter_mask(
                rows,
                None if top_k is None else top_k[b].expand(length + 1),
                None if top_p is None else top_p[b].expand(length + 1),
                temp_t.expand(length + 1),
            )
            scale = exp2_scale(temp_t.expand(length + 1))
            w_t = exp2_weights(rows, keep, scale)
            p_t = _probabilities(w_t)
            if draft_logits is None:
                p_d = torch.zeros(length, vocab, dtype=torch.float32, device=device)
                p_d[torch.arange(length, device=device), drafts] = 1.0
            else:
                x_d = sanitize(draft_logits[b, :length])
                p_d = _probabilities(exp2_weights(x_d, x_d > -float("inf"), scale[:length]))
            positions = torch.arange(length, device=device)
            u_words = random_words(seed[b].expand(length), STREAM_ACCEPT, positions, offset[b].expand(length), 1)[:, 0]
            u = acceptance_uniform(u_words)
            pt_x = p_t[positions, drafts].double()
            pd_x = p_d[positions, drafts].double()
            accept = u * pd_x < pt_x
            rejected = (~accept).nonzero()
            accepted = int(rejected[0]) if rejected.numel() else length
            words = random_words(seed[b:b + 1], STREAM_RESAMPLE, accepted, offset[b:b + 1], vocab)[0]
            energy = exponential2(words)  # one E' per token, shared by both races below
            # Races in probability space: argmax_v weight_v / E'_v over positive weights.
            target_choice = int(_argmax_or_none((w_t[accepted] / energy).unsqueeze(0),
                                                (w_t[accepted] > 0).unsqueeze(0))[0])
            if accepted < length:
                residual = torch.clamp(p_t[accepted] - p_d[accepted], min=0.0)
                emitted = int(_argmax_or_none((residual / energy).unsqueeze(0),
                                              (residual > 0).unsqueeze(0))[0])
                if emitted < 0:
                    emitted = target_choice
            else:
                emitted = target_choice
        out_tokens[b, :accepted] = drafts[:accepted]
        out_tokens[b, accepted] = emitted
        num_accepted[b] = accepted
    return out_tokens, num_accepted


# --------------------------------------------------------------------------- markov_draft
def select_candidates(backbone_logits: torch.Tensor, num_candidates: int) -> torch.Tensor:
    """Candidate mask [B, K, Vd] of markov_draft's candidate mode: per (request, position)
    the ``num_candidates`` largest entries of sanitize(U_k), ties to the smaller index (all
    entries when num_candidates >= Vd)."""
    y = sanitize(backbone_logits)
    draft_vocab = y.shape[-1]
    if num_candidates >= draft_vocab:
        return torch.ones_like(y, dtype=torch.bool)
    # A stable descending sort keeps tied entries in index order.
    order = torch.sort(y, dim=-1, descending=True, stable=True).indices[..., :num_candidates]
    mask = torch.zeros_like(y, dtype=torch.bool)
    return mask.scatter_(-1, order, True)


def draft_choice(z: torch.Tensor, temperature: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor,
                 step: int) -> torch.Tensor:
    """The draft id markov_draft's step ``step`` draws from the stored logits z [B, Vd]:
    argmax of sanitize(z) if T <= 0, else the race argmax_v ((y_v - max y) / T - log E_v)
    with Philox stream 0 at position ``step``; -1 where no entry is finite."""
    y = sanitize(z)
    greedy = ~(temperature > 0)
    finite = y > -float("inf")
    scaled = relative_logits(y, finite, torch.where(greedy, torch.ones_like(temperature),
                                                    sanitize_temperature(temperature)))
    words = random_words(seed, STREAM_DRAFT, step, offset, y.shape[1])
    keys = torch.where(greedy.unsqueeze(1), y, scaled - torch.log(exponential(words)))
    return _argmax_or_none(keys, finite)


def markov_draft(backbone_logits: torch.Tensor, anchor: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                 temperature: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor,
                 d2t: torch.Tensor | None = None, num_candidates: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-rank Markov correction and sampling (the spec of ``torch.ops.dspark.markov_draft``).

    Args:
        backbone_logits: [B, K, Vd] U, float32/bfloat16/float16.
        anchor: [B] int64, the last committed token (target vocabulary).
        w1: [Vt, r] embedding over the target vocabulary.
        w2: [Vd, r] (nn.Linear(r, Vd).weight layout).
        temperature, seed, offset: [B] float32 / int64 / int64.
        d2t: [Vd] int64 draft-to-target id map, or None for the identity (Vd == Vt).
        num_candidates: None for the full vocabulary, or c >= 1: candidate mode.

    Returns:
        draft_tokens [B, K] int64 (target vocabulary) and draft_logits [B, K, Vd] (dtype of U).

    Step k: z_k = round(U_k + W2 @ W1[x_{k-1}]) in U's dtype (float32 arithmetic),
    x_{-1} = anchor. The token is drawn from the stored z_k: greedy argmax if T <= 0, else
    the race argmax_v ((z_v - max z) / T - log E_v) with stream 0 at position k over the draft
    vocabulary, then mapped through d2t. A step with no mass emits -1; every later step of
    that request emits -1 too and stores U uncorrected. Ids outside [0, Vt) (an anchor, or a
    d2t entry of a chosen token) make the request emit -1 from that step on the same way:
    the CPU kernel raises for them instead, the CUDA kernel (which cannot raise without a
    host synchronisation) follows this rule.

    Candidate mode (num_candidates = c): before the loop, the top-c entries of each
    sanitize(U_k) are chosen (ties to the smaller index, see ``select_candidates``); z_k is
    computed as above on them and is -inf everywhere else, so the race runs over the
    candidates only. c >= Vd is the full mode.
    """
    if backbone_logits.dim() != 3:
        raise ValueError(f"backbone_logits must be [B, K, Vd], got {tuple(backbone_logits.shape)}")
    if num_candidates is not None and num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1 (or None), got {num_candidates}")
    batch, steps, draft_vocab = backbone_logits.shape
    target_vocab = w1.shape[0]
    if w2.shape[0] != draft_vocab or w2.shape[1] != w1.shape[1]:
        raise ValueError(f"w2 must be [{draft_vocab}, {w1.shape[1]}], got {tuple(w2.shape)}")
    if d2t is None and draft_vocab != target_vocab:
        raise ValueError(f"without d2t the draft vocabulary ({draft_vocab}) must be the target vocabulary "
                         f"({target_vocab})")
    device = backbone_logits.device
    candidates = None if num_candidates is None else select_candidates(backbone_logits, num_candidates)
    tokens = torch.full((batch, steps), -1, dtype=torch.int64, device=device)
    z_all = torch.empty_like(backbone_logits)
    prev = anchor.to(torch.int64).clone()
    alive = (prev >= 0) & (prev < target_vocab)
    for k in range(steps):
        safe_prev = prev.clamp(0, target_vocab - 1)
        # W2 @ W1[x]^T as one [Vd, r] x [r, B] float32 product (the CPU kernel makes the same call).
        correction = (w2.float() @ w1[safe_prev].float().t()).t()  # [B, Vd]
        correction = torch.where(alive.unsqueeze(1), correction, torch.zeros_like(correction))
        z = backbone_logits[:, k].float() + correction
        if candidates is not None:
            z = torch.where(candidates[:, k], z, torch.full_like(z, -float("inf")))
        z = z.to(backbone_logits.dtype)
        z_all[:, k] = z
        choice = draft_choice(z, temperature, seed, offset, k)
        mapped = choice if d2t is None else torch.where(choice >= 0, d2t[choice.clamp(min=0)], choice)
        valid = alive & (mapped >= 0) & (mapped < target_vocab)
        mapped = torch.where(valid, mapped, torch.full_like(mapped, -1))
        tokens[:, k] = mapped
        alive = alive & (mapped >= 0)
        prev = mapped
    return tokens, z_all


# --------------------------------------------------------------------------- confidence
def confidence(hidden: torch.Tensor, prev_tokens: torch.Tensor, w1: torch.Tensor | None, weight: torch.Tensor,
               bias: torch.Tensor, sts_temperature: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence head with STS and survival (the spec of ``torch.ops.dspark.confidence``).

    Args:
        hidden: [B, K, d] float32/bfloat16/float16.
        prev_tokens: [B, K] int64: anchor, x_0 .. x_{K-2}.
        w1: [Vt, r] or None (the head then sees h only).
        weight: [d + r] (or [d] when w1 is None); bias: [] or [1].
        sts_temperature: [K] float32 or None (all ones).

    Returns:
        conf [B, K] = sigmoid((weight . [h_k; W1[prev_k]] + bias) / T_k) (0 where that is NaN) and
        survival [B, K] = cumulative product of conf along K, both float32.
    """
    features = hidden.float()
    if w1 is not None:
        features = torch.cat([features, w1[prev_tokens].float()], dim=-1)
    logit = features @ weight.float() + bias.float().reshape(())
    if sts_temperature is not None:
        logit = logit / sts_temperature.float()
    # A NaN logit (NaN in the hidden state) gives confidence 0: that draft is not verified,
    # which costs throughput but never correctness.
    conf = torch.nan_to_num(torch.sigmoid(logit), nan=0.0)
    return conf, torch.cumprod(conf, dim=1)
