"""transformers' assisted generation, verified by ``torch.ops.dspark.verify``.

``model.generate(..., assistant_model=assistant, do_sample=True)`` accepts or rejects the
assistant's candidates in ``transformers.generation.utils._speculative_sampling``. This
module provides a drop-in for that function and a context manager that installs it::

    from dspark_ext.integrations.transformers import dspark_speculative_sampling
    with dspark_speculative_sampling():
        out = model.generate(**inputs, assistant_model=assistant, do_sample=True)

Tested with transformers 5.19.0, whose signature is
``(candidate_input_ids, candidate_logits, candidate_length, new_logits,
assistant_ensemble_weight=None)``; installing it into a version with another signature
raises instead of patching. Both logits transformers hands over are already processed by
its logits processors (temperature, top-k, top-p, ...), so ``verify`` runs at temperature 1
on them and is lossless with respect to exactly the distribution transformers would sample.

Differences from transformers' own function:

* random numbers come from dspark's Philox streams: each call draws a fresh seed from
  torch's default generator, so ``torch.manual_seed`` still makes ``generate`` repeatable,
  but the tokens differ from transformers' for the same seed (equally distributed);
* ``assistant_ensemble_weight`` (a lossy relaxation) and devices other than CPU and CUDA
  fall back to transformers' function, with a one-time log line;
* with ``do_sample=False`` transformers never calls this function (it compares argmaxes
  itself), so greedy assisted generation is unchanged.
"""

from __future__ import annotations

import contextlib
import inspect
import logging

import torch

from ._common import random_seed

__all__ = ["speculative_sampling", "dspark_speculative_sampling", "TESTED_TRANSFORMERS_VERSIONS"]

TESTED_TRANSFORMERS_VERSIONS = ("5.19.0",)

logger = logging.getLogger(__name__)
_original = None  # transformers' function, set while installed (the fallback)
_fallback_logged: set[str] = set()
# What went through verify since import: calls, drafts verified, drafts accepted.
stats = {"calls": 0, "verified": 0, "accepted": 0}


def _fallback(reason: str, *args, **kwargs):
    if reason not in _fallback_logged:
        _fallback_logged.add(reason)
        logger.warning("dspark_ext: transformers' own speculative sampling is used because %s", reason)
    original = _original
    if original is None:
        from transformers.generation import utils
        original = utils._speculative_sampling
    return original(*args, **kwargs)


def speculative_sampling(candidate_input_ids: torch.Tensor, candidate_logits: torch.Tensor, candidate_length: int,
                         new_logits: torch.Tensor, assistant_ensemble_weight: float | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for ``transformers.generation.utils._speculative_sampling`` (5.19 signature).

    Args:
        candidate_input_ids: [1, cur_len + candidate_length] int64: the sequence with the
            assistant's candidates at its end.
        candidate_logits: [1, candidate_length, V]: the assistant's processed scores the
            candidates were sampled from.
        candidate_length: the number of candidates L.
        new_logits: [1, L + 1, V] float32: the target's processed logits at the L candidate
            positions and the bonus position.
        assistant_ensemble_weight: must be None for this path (otherwise transformers'
            function runs).

    Returns:
        valid_tokens [1, n + 1] int64 (the n accepted candidates and the correction or bonus
        token) and n_matches, a 0-d int64 tensor n, as transformers' function does.
    """
    args = (candidate_input_ids, candidate_logits, candidate_length, new_logits)
    if assistant_ensemble_weight is not None:
        return _fallback("assistant_ensemble_weight is set (not lossless; dspark's verify does not support it)",
                         *args, assistant_ensemble_weight=assistant_ensemble_weight)
    if new_logits.device.type not in ("cpu", "cuda"):
        return _fallback(f"dspark has no kernels for device {new_logits.device.type}", *args)
    if candidate_input_ids.dim() != 2 or candidate_input_ids.shape[0] != 1:
        raise ValueError(f"candidate_input_ids must be [1, seq_len] (assisted generation has batch size 1), "
                         f"got {tuple(candidate_input_ids.shape)}")
    length = int(candidate_length)
    if not 0 <= length <= candidate_input_ids.shape[1]:
        raise ValueError(f"candidate_length = {length} is outside [0, {candidate_input_ids.shape[1]}]")
    if new_logits.dim() != 3 or tuple(new_logits.shape[:2]) != (1, length + 1):
        raise ValueError(f"new_logits must be [1, candidate_length + 1 = {length + 1}, V], got {tuple(new_logits.shape)}")
    vocab = new_logits.shape[2]
    if tuple(candidate_logits.shape) != (1, length, vocab):
        raise ValueError(f"candidate_logits must be [1, candidate_length = {length}, V = {vocab}] like new_logits, "
                         f"got {tuple(candidate_logits.shape)}")
    device = new_logits.device
    drafts = candidate_input_ids[:, candidate_input_ids.shape[1] - length:].to(device=device, dtype=torch.int64)
    target_logits = new_logits[0].float().contiguous()
    seed = torch.tensor([random_seed(None, device)], dtype=torch.int64, device=device)
    out_tokens, num_accepted = torch.ops.dspark.verify(
        target_logits, torch.zeros(1, dtype=torch.int64, device=device), drafts,
        candidate_logits.to(device=device, dtype=torch.float32).contiguous(),
        torch.full((1,), length, dtype=torch.int32, device=device),
        torch.ones(1, dtype=torch.float32, device=device), seed,
        torch.zeros(1, dtype=torch.int64, device=device), None, None)
    n_matches = num_accepted[0].to(torch.int64)
    accepted = int(n_matches)
    stats["calls"] += 1
    stats["verified"] += length
    stats["accepted"] += accepted
    return out_tokens[:, :accepted + 1], n_matches


@contextlib.contextmanager
def dspark_speculative_sampling():
    """Within the block, transformers' assisted generation verifies with dspark's op.

    Raises RuntimeError (and patches nothing) if the installed transformers'
    ``_speculative_sampling`` has another signature than the one this module implements.
    """
    global _original
    from transformers.generation import utils

    theirs = inspect.signature(utils._speculative_sampling)
    ours = inspect.signature(speculative_sampling)
    if list(theirs.parameters) != list(ours.parameters):
        import transformers
        raise RuntimeError(
            f"dspark_ext: transformers {transformers.__version__} has _speculative_sampling{theirs}; this adapter "
            f"implements {ours} (tested with transformers {', '.join(TESTED_TRANSFORMERS_VERSIONS)})")
    previous, previous_original = utils._speculative_sampling, _original
    if previous is not speculative_sampling:  # (a nested block keeps the outer fallback)
        _original = previous
    utils._speculative_sampling = speculative_sampling
    try:
        yield
    finally:
        utils._speculative_sampling = previous
        _original = previous_original
