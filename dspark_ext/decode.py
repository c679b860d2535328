"""The reference DSpark decoding loop, on the device, with the ops.

One round for a batch of requests:
  drafter backbone (anchor + context features -> U, h)
  -> torch.ops.dspark.markov_draft (K drafts and their exact distributions z)
  -> torch.ops.dspark.confidence (survival per draft)
  -> LoadAwareScheduler.plan (how many drafts each request verifies; all K without one)
  -> one target forward over every request's anchor + chosen drafts (KV cache, one length
     per request)
  -> torch.ops.dspark.verify (accepted drafts + one corrected or bonus token)
  -> commit: keep the anchor and the accepted drafts in the target's cache and the
     drafter's context, roll the rest back per request; the emitted token is the next anchor.

``target_generate`` is the plain baseline with the same sampling: each step is a verify
with no drafts, i.e. a draw from the target's filtered softmax. The loop synchronises
with the host once per round, to hand out the committed tokens and stop finished
requests; the ops themselves never do.

Models plug in through two small protocols: ``dspark_ext.models.target.TargetModel``
(``new_cache(batch)``, ``forward(tokens, num_new, cache) -> (logits, hidden per layer)``)
and ``Drafter`` below.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Protocol, Sequence

import torch

from . import ops


class Drafter(Protocol):
    """What the loop needs from a drafter (dspark_ext.models.drafter.DSparkDrafter is one).

    ``config.block`` (K) and ``config.markov``; ``context_features(hidden)``: the target's
    per-layer hidden states [B, T, d_t] -> features [B, T, f]; ``backbone(anchor,
    context, context_len) -> (U [B, K, V], h [B, K, d])``; ``w1.weight`` [Vt, r],
    ``w2.weight`` [Vd, r] (markov_draft's layout) and ``confidence_weights() -> (weight
    [d + r], bias [1])`` (confidence's layout)."""

    config: object

    def context_features(self, hidden: list[torch.Tensor]) -> torch.Tensor: ...

    def backbone(self, anchor: torch.Tensor, context: torch.Tensor, context_len: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def confidence_weights(self) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]            # generated ids per request (the prompt excluded)
    drafts_verified: int = 0
    drafts_accepted: int = 0
    verified_by_position: list[int] = dataclasses.field(default_factory=list)
    accepted_by_position: list[int] = dataclasses.field(default_factory=list)
    round_tokens: list[int] = dataclasses.field(default_factory=list)  # tokens scored per round
    seconds: float = 0.0
    cache: object = None               # the target's KV cache at the end (for inspection)

    @property
    def rounds(self) -> int:
        """Target forwards after the prefill."""
        return len(self.round_tokens)

    @property
    def target_tokens(self) -> int:
        """Tokens the target scored after the prefill."""
        return sum(self.round_tokens)

    @property
    def acceptance_length(self) -> float:
        """Mean accepted drafts per request-round that verified at least one draft."""
        return self.drafts_accepted / max(1, self.verified_by_position[0] if self.verified_by_position else 0)

    @property
    def generated(self) -> int:
        return sum(len(t) for t in self.tokens)


def _per_request(value, batch: int, dtype, device, name: str) -> torch.Tensor | None:
    if value is None:
        return None
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"{name} must be a scalar or have one value per request ({batch}), got {tuple(t.shape)}")
    return t.contiguous()


class _Batch:
    """Per-request state shared by both loops: sampling parameters, the target's cache,
    the anchor and the generated tokens."""

    def __init__(self, target, prompts, max_new_tokens, temperature, top_k, top_p, seed, eos_id, cache_len):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompts must be a non-empty list of non-empty token lists")
        self.device = next(target.parameters()).device
        self.batch = len(prompts)
        b = self.batch
        self.temperature = _per_request(temperature, b, torch.float32, self.device, "temperature")
        self.top_k = _per_request(top_k, b, torch.int32, self.device, "top_k")
        self.top_p = _per_request(top_p, b, torch.float32, self.device, "top_p")
        seeds = torch.as_tensor(seed, dtype=torch.int64)
        if seeds.dim() == 0:
            seeds = seeds * 1_000_003 + torch.arange(b)  # distinct streams per request
        self.seed = _per_request(seeds, b, torch.int64, self.device, "seed")
        self.offset = torch.zeros(b, dtype=torch.int64, device=self.device)
        self.max_new = [int(m) for m in (max_new_tokens if isinstance(max_new_tokens, Sequence)
                                         else [max_new_tokens] * b)]
        self.eos_id = eos_id
        self.tokens: list[list[int]] = [[] for _ in range(b)]
        self.active = [m > 0 for m in self.max_new]
        longest = max(len(p) for p in prompts)
        self.cache = target.new_cache(b, self.device, max_len=cache_len or (longest + max(self.max_new) + 64))
        # Prefill: every prompt but its last token, which becomes the first anchor.
        lengths = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        self.prefill_hidden = None
        if int(lengths.max()) > 0:
            padded = torch.zeros(b, int(lengths.max()), dtype=torch.int64, device=self.device)
            for i, p in enumerate(prompts):
                padded[i, :len(p) - 1] = torch.tensor(p[:-1], dtype=torch.int64)
            _, self.prefill_hidden = target(padded, lengths, self.cache)
        self.prefill_lengths = lengths
        self.anchor = torch.tensor([p[-1] for p in prompts], dtype=torch.int64, device=self.device)

    def advance(self, out_tokens: torch.Tensor, num_accepted: torch.Tensor, taking: torch.Tensor
                ) -> tuple[list[int], list[bool]]:
        """End of a round: append each active request's accepted drafts and emitted token
        (host side), make the emitted token the next anchor and advance the random offset.
        Returns num_accepted and the active flags of the round as host lists."""
        emitted = out_tokens.gather(1, num_accepted.clamp(min=0).to(torch.int64).unsqueeze(1)).squeeze(1)
        self.anchor = torch.where(taking, emitted.clamp(min=0), self.anchor)
        self.offset += 1
        out, acc, take = out_tokens.tolist(), num_accepted.tolist(), taking.tolist()
        for b in range(self.batch):
            if not take[b]:
                continue
            for token in out[b][:acc[b] + 1]:
                if token < 0 or len(self.tokens[b]) >= self.max_new[b]:
                    self.active[b] = False
                    break
                self.tokens[b].append(token)
                if token == self.eos_id or len(self.tokens[b]) >= self.max_new[b]:
                    self.active[b] = False
                    break
        return acc, take

    def active_mask(self) -> torch.Tensor:
        return torch.tensor(self.active, dtype=torch.bool, device=self.device)


@torch.no_grad()
def target_generate(target, prompts: list[list[int]], max_new_tokens, temperature=0.0, top_k=None, top_p=None,
                    seed=0, eos_id: int | None = None, cache_len: int | None = None) -> GenerationResult:
    """Plain autoregressive decoding with the target; each token drawn by ops.verify with no
    drafts (the target's softmax at the request's temperature, top-k/top-p applied)."""
    began = time.perf_counter()
    state = _Batch(target, prompts, max_new_tokens, temperature, top_k, top_p, seed, eos_id, cache_len)
    b = state.batch
    no_drafts = torch.zeros(b, 0, dtype=torch.int64, device=state.device)
    zero = torch.zeros(b, dtype=torch.int32, device=state.device)
    offsets = ops.padded_target_offset(b, 0, state.device)
    result = GenerationResult(tokens=state.tokens)
    while any(state.active):
        active = state.active_mask()
        logits, _ = target(state.anchor.unsqueeze(1), active.to(torch.int64), state.cache)
        out, acc = ops.verify(logits[:, 0].float().contiguous(), offsets, no_drafts, None, zero,
                              state.temperature, state.seed, state.offset, state.top_k, state.top_p)
        _, taken = state.advance(out, acc, active)
        result.round_tokens.append(sum(taken))
    result.seconds = time.perf_counter() - began
    result.cache = state.cache
    return result


@torch.no_grad()
def speculative_generate(target, drafter, prompts: list[list[int]], max_new_tokens, temperature=0.0, top_k=None,
                         top_p=None, seed=0, scheduler=None, max_draft: int | None = None,
                         sts_temperature: torch.Tensor | None = None, eos_id: int | None = None,
                         cache_len: int | None = None, record: list | None = None) -> GenerationResult:
    """DSpark speculative decoding (see the module doc). ``scheduler``: a
    LoadAwareScheduler (its ``plan(survival)`` gives the verify lengths), or None to verify
    ``max_draft`` drafts (default K) every round. Lossless: with the same seeds the output
    distribution is the target's (greedy: the same tokens as ``target_generate``).
    ``record``: a list that receives, per round, the active requests' raw confidence logits
    [n, K] (before STS), drafts verified [n] and drafts accepted [n] (for fitting STS)."""
    began = time.perf_counter()
    state = _Batch(target, prompts, max_new_tokens, temperature, top_k, top_p, seed, eos_id, cache_len)
    b, device = state.batch, state.device
    block = drafter.config.block
    max_draft = block if max_draft is None else int(max_draft)
    if not 0 <= max_draft <= block:
        raise ValueError(f"max_draft must be in [0, K={block}], got {max_draft}")
    w1 = drafter.w1.weight.float().contiguous()
    w2 = drafter.w2.weight.float().contiguous() if drafter.config.markov else torch.zeros_like(
        drafter.w2.weight, dtype=torch.float32)
    weight, bias = (t.float().contiguous() for t in drafter.confidence_weights())
    sts = None if sts_temperature is None else sts_temperature.to(device, torch.float32).contiguous()

    # The drafter's context: target features of every committed token, per request.
    cap = state.cache.max_len
    features = None
    feat_len = state.prefill_lengths.clone()
    if state.prefill_hidden is not None:
        first = drafter.context_features(state.prefill_hidden)
        features = torch.zeros(b, cap, first.shape[-1], dtype=first.dtype, device=device)
        features[:, :first.shape[1]] = first
    offsets_padded = ops.padded_target_offset(b, block, device)
    positions = torch.arange(block + 1, device=device)
    result = GenerationResult(tokens=state.tokens, verified_by_position=[0] * block,
                              accepted_by_position=[0] * block)
    while any(state.active):
        active = state.active_mask()
        if features is None:  # every prompt had one token: an empty context
            features = torch.zeros(b, cap, drafter.context_proj.in_features, device=device)
        u, h = drafter.backbone(state.anchor, features[:, :max(1, int(feat_len.max()))], feat_len)
        u = u.float().contiguous()
        draft_tokens, draft_logits = ops.markov_draft(u, state.anchor, w1, w2, state.temperature, state.seed,
                                                      state.offset)
        prev = torch.cat([state.anchor.unsqueeze(1), draft_tokens[:, :-1].clamp(min=0)], dim=1)
        _, survival = ops.confidence(h.float().contiguous(), prev, w1, weight, bias, sts)
        if scheduler is not None:
            num_draft = scheduler.plan(survival).to(torch.int32)
        else:
            num_draft = torch.full((b,), max_draft, dtype=torch.int32, device=device)
        # No drafts past a dead draft (-1), past the cache, or for finished requests.
        usable = (draft_tokens >= 0).to(torch.int32).cumprod(dim=1).sum(dim=1).to(torch.int32)
        room = (cap - 2 - state.cache.lengths).clamp(min=0).to(torch.int32)
        num_draft = torch.minimum(torch.minimum(num_draft.clamp(max=max_draft), usable), room)
        num_draft = torch.where(active, num_draft, torch.zeros_like(num_draft)).contiguous()
        # One target forward over anchor + chosen drafts of every request.
        tokens_in = torch.cat([state.anchor.unsqueeze(1), draft_tokens.clamp(min=0)], dim=1)
        old_len = state.cache.lengths.clone()
        num_new = torch.where(active, num_draft.to(torch.int64) + 1, torch.zeros_like(old_len))
        logits, hidden = target(tokens_in, num_new, state.cache)
        target_logits = logits.float().reshape(b * (block + 1), -1).contiguous()
        out, acc = ops.verify(target_logits, offsets_padded, draft_tokens, draft_logits, num_draft,
                              state.temperature, state.seed, state.offset, state.top_k, state.top_p)
        # Commit: the anchor and the accepted drafts stay (cache and context), the rest rolls back.
        keep = torch.where(active, acc.to(torch.int64) + 1, torch.zeros_like(old_len))
        state.cache.truncate(old_len + keep)
        new_features = drafter.context_features(hidden)
        write = positions.unsqueeze(0) < keep.unsqueeze(1)
        index = torch.where(write, feat_len.unsqueeze(1) + positions, torch.full_like(write, cap - 1, dtype=torch.int64))
        features.scatter_(1, index.unsqueeze(-1).expand(-1, -1, features.shape[-1]), new_features.to(features.dtype))
        feat_len = feat_len + keep
        accepted, taken = state.advance(out, acc, active)
        # Statistics (host side).
        if record is not None:
            record.append({"conf_logits": drafter.confidence_logits(h, prev)[active].float().cpu(),
                           "num_draft": num_draft[active].cpu(), "accepted": acc[active].cpu()})
        lengths = num_draft.tolist()
        for i in range(b):
            if not taken[i]:
                continue
            result.drafts_verified += lengths[i]
            result.drafts_accepted += accepted[i]
            for k in range(lengths[i]):
                result.verified_by_position[k] += 1
                result.accepted_by_position[k] += int(k < accepted[i])
        result.round_tokens.append(int(num_new.sum()))
    result.seconds = time.perf_counter() - began
    result.cache = state.cache
    return result
