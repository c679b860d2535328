"""Typed wrappers around torch.ops.dspark.*, their fake (meta) kernels, and layout helpers.

The fake kernels give torch.compile and CUDA-graph capture the output shapes without
running a kernel. Every op's semantics are specified by ``dspark_ext.reference``.
"""

from __future__ import annotations

import torch

from .reference import check_verify_values  # noqa: F401  (the value checks of the spec, with a sync)

__all__ = [
    "verify",
    "markov_draft",
    "markov_draft_",
    "confidence",
    "padded_target_offset",
    "ragged_target_offset",
    "check_verify_values",
]


# --------------------------------------------------------------------------- layouts
def padded_target_offset(batch: int, max_draft: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """target_offset for padded target logits [B, K+1, V] viewed as [B*(K+1), V]: b*(K+1)."""
    return torch.arange(batch, dtype=torch.int64, device=device) * (max_draft + 1)


def ragged_target_offset(num_draft: torch.Tensor) -> torch.Tensor:
    """target_offset for ragged target logits (only the L_b+1 verified rows of each request,
    concatenated): the exclusive prefix sum of num_draft + 1. [B] int32 -> [B] int64, on
    num_draft's device, with no host synchronisation."""
    rows = num_draft.to(torch.int64) + 1
    return torch.cumsum(rows, dim=0) - rows


# --------------------------------------------------------------------------- verify
def verify(target_logits: torch.Tensor, target_offset: torch.Tensor, draft_tokens: torch.Tensor,
           draft_logits: torch.Tensor | None, num_draft: torch.Tensor, temperature: torch.Tensor,
           seed: torch.Tensor, offset: torch.Tensor, top_k: torch.Tensor | None = None,
           top_p: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lossless speculative-sampling verification over the whole vocabulary.

    Args:
        target_logits: [Nt, V] float32/bfloat16/float16, last dim contiguous. Request b's
            num_draft[b] + 1 rows start at row target_offset[b] (padded or ragged layout,
            see ``padded_target_offset`` / ``ragged_target_offset``).
        target_offset: [B] int64.
        draft_tokens: [B, K] int64, target vocabulary.
        draft_logits: [B, K, V] (dtype of target_logits): the exact logits the drafts were
            sampled from (e.g. markov_draft's output), or None for deterministic drafts.
        num_draft: [B] int32, the number of drafts L_b in [0, K] to verify.
        temperature: [B] float32; <= 0 means greedy. Applies to target and draft.
        seed: [B] int64; offset: [B] int64, advanced by the caller every round.
        top_k: [B] int32 or None (0 = off); top_p: [B] float32 or None (1 = off). They
            filter the target distribution; the output is lossless with respect to it.

    Returns:
        out_tokens: [B, K+1] int64; out_tokens[b, :num_accepted[b] + 1] are the accepted
            drafts followed by the correction or bonus token, the rest is -1. The last
            token is -1 when the target distribution at that position has no mass.
        num_accepted: [B] int32. On CUDA, a request whose num_draft, target_offset or
            draft ids are out of range gets -1 here (the CPU kernel raises instead).
    """
    return torch.ops.dspark.verify(target_logits, target_offset, draft_tokens, draft_logits, num_draft,
                                   temperature, seed, offset, top_k, top_p)


@torch.library.register_fake("dspark::verify")
def _verify_fake(target_logits, target_offset, draft_tokens, draft_logits, num_draft, temperature, seed, offset,
                 top_k, top_p):
    torch._check(target_logits.dim() == 2, lambda: "verify: target_logits must be [Nt, V]")
    torch._check(draft_tokens.dim() == 2, lambda: "verify: draft_tokens must be [B, K]")
    batch, max_draft = draft_tokens.shape
    out_tokens = draft_tokens.new_empty((batch, max_draft + 1))
    num_accepted = num_draft.new_empty((batch,))
    return out_tokens, num_accepted


# --------------------------------------------------------------------------- markov_draft
def markov_draft(backbone_logits: torch.Tensor, anchor: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                 temperature: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor,
                 d2t: torch.Tensor | None = None, num_candidates: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused low-rank Markov correction and sampling of K draft steps.

    Args:
        backbone_logits: [B, K, Vd] U (float32/bfloat16/float16).
        anchor: [B] int64, last committed token (target vocabulary).
        w1: [Vt, r]; w2: [Vd, r] (contiguous), both float32/bfloat16/float16, same dtype.
        temperature: [B] float32 (<= 0 greedy); seed, offset: [B] int64.
        d2t: [Vd] int64 draft-to-target map or None (identity, Vd == Vt).
        num_candidates: None (full vocabulary) or c >= 1: each step corrects and samples
            only the top-c entries of U_k (chosen once, before the loop); z is -inf
            elsewhere.

    Returns:
        draft_tokens [B, K] int64 (target vocabulary) and draft_logits [B, K, Vd], the
        corrected logits z in U's dtype, exactly the distribution the drafts came from:
        pass them to ``verify`` as draft_logits (through d2t when Vd != Vt).

    Step k: z_k = U_k + W2 @ W1[x_{k-1}] (x_{-1} = anchor), then a sample of
    softmax(z_k / T) (argmax when T <= 0) with Philox stream 0 at position k.
    ``dspark_ext.reference.markov_draft`` is the specification.
    """
    return torch.ops.dspark.markov_draft(backbone_logits, anchor, w1, w2, temperature, seed, offset, d2t,
                                         num_candidates)


def markov_draft_(backbone_logits: torch.Tensor, anchor: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                  temperature: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor,
                  d2t: torch.Tensor | None = None, num_candidates: int | None = None) -> torch.Tensor:
    """In-place ``markov_draft``: writes z over backbone_logits, returns draft_tokens [B, K]."""
    return torch.ops.dspark.markov_draft_(backbone_logits, anchor, w1, w2, temperature, seed, offset, d2t,
                                          num_candidates)


@torch.library.register_fake("dspark::markov_draft")
def _markov_draft_fake(backbone_logits, anchor, w1, w2, temperature, seed, offset, d2t, num_candidates=None):
    torch._check(backbone_logits.dim() == 3, lambda: "markov_draft: backbone_logits must be [B, K, Vd]")
    batch, steps, _ = backbone_logits.shape
    return anchor.new_empty((batch, steps)), torch.empty_like(backbone_logits)


@torch.library.register_fake("dspark::markov_draft_")
def _markov_draft_inplace_fake(backbone_logits, anchor, w1, w2, temperature, seed, offset, d2t,
                               num_candidates=None):
    torch._check(backbone_logits.dim() == 3, lambda: "markov_draft_: backbone_logits must be [B, K, Vd]")
    batch, steps, _ = backbone_logits.shape
    return anchor.new_empty((batch, steps))


# --------------------------------------------------------------------------- confidence
def confidence(hidden: torch.Tensor, prev_tokens: torch.Tensor, w1: torch.Tensor | None, weight: torch.Tensor,
               bias: torch.Tensor, sts_temperature: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence head with Sequential Temperature Scaling and survival.

    Args:
        hidden: [B, K, d]; prev_tokens: [B, K] int64 (anchor, x_0 .. x_{K-2});
        w1: [Vt, r] or None; weight: [d + r] (or [d]); bias: [] or [1];
        sts_temperature: [K] float32 or None.

    Returns:
        conf [B, K] and survival [B, K] (cumulative product along K), float32.

    The kernels of this op come with a later issue; ``dspark_ext.reference.confidence``
    is its specification.
    """
    return torch.ops.dspark.confidence(hidden, prev_tokens, w1, weight, bias, sts_temperature)


@torch.library.register_fake("dspark::confidence")
def _confidence_fake(hidden, prev_tokens, w1, weight, bias, sts_temperature):
    torch._check(hidden.dim() == 3, lambda: "confidence: hidden must be [B, K, d]")
    batch, steps, _ = hidden.shape
    conf = hidden.new_empty((batch, steps), dtype=torch.float32)
    return conf, torch.empty_like(conf)
