"""FlashInfer's ``chain_speculative_sampling``, computed by ``torch.ops.dspark.verify``.

Code written for ``flashinfer.sampling.chain_speculative_sampling`` runs unchanged on
dspark's kernels, on the CPU as well as on CUDA::

    from dspark_ext.integrations.flashinfer import chain_speculative_sampling

The arguments, shapes, dtypes and return convention are FlashInfer's (checked against the
API of FlashInfer 0.6); what differs:

* random numbers come from dspark's Philox streams (DESIGN.md), not FlashInfer's, so the
  same seed gives other (equally distributed) tokens than FlashInfer would;
* the kernels are always deterministic (``deterministic`` is accepted and ignored);
* a negative draft id is a placeholder: it and the drafts after it are not verified, and
  the request emits a token from the target row at that position (FlashInfer has no such
  convention);
* probabilities are turned into logits (log p) for ``verify``, which renormalises each
  row: a row that sums to s != 1 counts as p / s.
"""

from __future__ import annotations

import torch

from .. import ops
from .. import reference
from ._common import leading_valid, per_request_seed, probs_to_logits, random_seed

__all__ = ["chain_speculative_sampling"]

_FLOAT_TYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT_TYPES = (torch.int32, torch.int64)


def _check_args(draft_probs, draft_token_ids, target_probs, accepted_out, emitted_out, seed, offset):
    if draft_probs.dim() != 3:
        raise ValueError(f"draft_probs must be (batch_size, num_speculate_tokens, vocab_size), "
                         f"got shape {tuple(draft_probs.shape)}")
    batch, num_spec, vocab = draft_probs.shape
    if draft_probs.dtype not in _FLOAT_TYPES:
        raise ValueError(f"draft_probs must be float32/bfloat16/float16, got {draft_probs.dtype}")
    if tuple(draft_token_ids.shape) != (batch, num_spec):
        raise ValueError(f"draft_token_ids must be ({batch}, {num_spec}) like draft_probs, "
                         f"got {tuple(draft_token_ids.shape)}")
    if draft_token_ids.dtype not in _INT_TYPES:
        raise ValueError(f"draft_token_ids must be int32 or int64, got {draft_token_ids.dtype}")
    if tuple(target_probs.shape) != (batch, num_spec + 1, vocab):
        raise ValueError(f"target_probs must be ({batch}, {num_spec + 1}, {vocab}) "
                         f"(one row more than draft_probs), got {tuple(target_probs.shape)}")
    if target_probs.dtype not in _FLOAT_TYPES:
        raise ValueError(f"target_probs must be float32/bfloat16/float16, got {target_probs.dtype}")
    device = draft_probs.device
    for name, tensor in (("draft_token_ids", draft_token_ids), ("target_probs", target_probs)):
        if tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device}, draft_probs on {device}")
    for name, tensor in (("maybe_output_accepted_token_num", accepted_out),
                         ("maybe_output_emitted_draft_token_num", emitted_out)):
        if tensor is None:
            continue
        if tuple(tensor.shape) != (batch,) or tensor.dtype not in _INT_TYPES or tensor.device != device:
            raise ValueError(f"{name} must be an int32 (or int64) tensor of shape ({batch},) on {device}, "
                             f"got {tensor.dtype} {tuple(tensor.shape)} on {tensor.device}")
    for name, value in (("seed", seed), ("offset", offset)):
        if torch.is_tensor(value) and (value.dim() > 1 or (value.dim() == 1 and value.shape[0] != batch)):
            raise ValueError(f"{name} must be an int, a 0-d tensor or a ({batch},) tensor, "
                             f"got shape {tuple(value.shape)}")


def _seed_tensor(seed, batch: int, device) -> torch.Tensor:
    if torch.is_tensor(seed) and seed.dim() == 1:
        return seed.to(device=device, dtype=torch.int64)
    return per_request_seed(int(seed), batch, device)


def _offset_tensor(offset, batch: int, device) -> torch.Tensor:
    if torch.is_tensor(offset) and offset.dim() == 1:
        return offset.to(device=device, dtype=torch.int64)
    return torch.full((batch,), int(offset), dtype=torch.int64, device=device)


def _row_prob(probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """probs[b, j, ids[b, j]] / sum_v probs[b, j, v] in float64 ([B, K])."""
    probs = probs.double()
    picked = probs.gather(2, ids.clamp(min=0).unsqueeze(2)).squeeze(2)
    return picked / probs.sum(dim=2).clamp(min=torch.finfo(torch.float64).tiny)


def _independent_accepts(draft_probs, target_probs, draft_ids, num_draft, num_accepted, seed, offset):
    """[B] int32: drafts that pass u_j * q(x_j) < p(x_j) each on its own (FlashInfer's
    ``output_accepted_token_num``), with verify's uniforms u_j (Philox stream 1, position j).
    The op's own decisions stand for positions up to its first rejection, so the two counts
    agree there even where float rounding could tip a comparison."""
    batch, num_spec = draft_ids.shape
    device = draft_ids.device
    positions = torch.arange(num_spec, dtype=torch.int64, device=device)
    words = reference.random_words(seed.repeat_interleave(num_spec), reference.STREAM_ACCEPT,
                                   positions.repeat(batch), offset.repeat_interleave(num_spec), 1)
    uniform = reference.acceptance_uniform(words).reshape(batch, num_spec)
    accept = uniform * _row_prob(draft_probs, draft_ids) < _row_prob(target_probs[:, :num_spec], draft_ids)
    accepted = num_accepted.to(torch.int64).unsqueeze(1)
    accept = torch.where(positions < accepted, torch.ones_like(accept), accept)
    accept = torch.where(positions == accepted, torch.zeros_like(accept), accept)
    accept &= positions < num_draft.to(torch.int64).unsqueeze(1)
    return accept.sum(dim=1, dtype=torch.int32)


def chain_speculative_sampling(
    draft_probs: torch.Tensor,
    draft_token_ids: torch.Tensor,
    target_probs: torch.Tensor,
    maybe_output_accepted_token_num: torch.Tensor | None = None,
    maybe_output_emitted_draft_token_num: torch.Tensor | None = None,
    deterministic: bool = True,
    generator: torch.Generator | None = None,
    seed: int | torch.Tensor | None = None,
    offset: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chain speculative sampling with FlashInfer's interface, on ``torch.ops.dspark.verify``.

    Args:
        draft_probs: (batch_size, num_speculate_tokens, vocab_size) float32 (bf16/fp16 too):
            the distributions the drafts were sampled from.
        draft_token_ids: (batch_size, num_speculate_tokens) int32 (or int64). A negative
            id ends that request's drafts (a dspark extension).
        target_probs: (batch_size, num_speculate_tokens + 1, vocab_size): the target's
            distributions at every draft position plus the bonus position.
        maybe_output_accepted_token_num: (batch_size,) int32 or None. If given, the number of
            drafts that pass the acceptance test each on its own (not stopping at the first
            rejection) is added to it in place.
        maybe_output_emitted_draft_token_num: (batch_size,) int32 or None. If given, the
            number of drafts emitted (the accepted prefix, without the final token) is added
            to it in place.
        deterministic: accepted for compatibility; dspark's kernels are always deterministic.
        generator: draws the seed when ``seed`` is None (torch's default generator if None).
        seed: int, or a (batch_size,) int64 tensor of per-request seeds. An int s seeds
            request b with s + b * 0x9E3779B97F4A7C15 (mod 2^64).
        offset: int or (batch_size,) int64 tensor, the Philox counter offset (default 0);
            advance it between calls that reuse a seed.

    Returns:
        output_token_ids: (batch_size, num_speculate_tokens + 1) int32: the accepted drafts,
            then the correction or bonus token, then -1 padding.
        output_accepted_token_num, output_emitted_draft_token_num: (batch_size,) int32, the
            tensors passed in (updated in place) or new ones holding the counts.
    """
    _check_args(draft_probs, draft_token_ids, target_probs, maybe_output_accepted_token_num,
                maybe_output_emitted_draft_token_num, seed, offset)
    batch, num_spec, vocab = draft_probs.shape
    device = draft_probs.device
    if seed is None:
        seed = random_seed(generator, device)
    seed_t = _seed_tensor(seed, batch, device)
    offset_t = _offset_tensor(0 if offset is None else offset, batch, device)

    draft_ids = draft_token_ids.to(torch.int64)
    num_draft = leading_valid(draft_ids)
    target_logits = probs_to_logits(target_probs).reshape(batch * (num_spec + 1), vocab)
    out_tokens, num_accepted = torch.ops.dspark.verify(
        target_logits, ops.padded_target_offset(batch, num_spec, device=device), draft_ids,
        probs_to_logits(draft_probs), num_draft, torch.ones(batch, dtype=torch.float32, device=device),
        seed_t, offset_t, None, None)

    accepted_out = maybe_output_accepted_token_num
    if accepted_out is None:
        accepted_out = torch.zeros(batch, dtype=torch.int32, device=device)
    emitted_out = maybe_output_emitted_draft_token_num
    if emitted_out is None:
        emitted_out = torch.zeros(batch, dtype=torch.int32, device=device)
    accepted_out += _independent_accepts(draft_probs, target_probs, draft_ids, num_draft, num_accepted,
                                         seed_t, offset_t).to(accepted_out.dtype)
    emitted_out += num_accepted.to(emitted_out.dtype)
    return out_tokens.to(torch.int32), accepted_out, emitted_out
