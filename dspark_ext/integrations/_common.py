"""Helpers shared by the engine adapters."""

from __future__ import annotations

import torch

# Odd 64-bit constant (2^64 / golden ratio) as a signed int64: request b of a batch seeded
# with one scalar s gets the Philox key s + b * _SEED_STRIDE (mod 2^64), so the requests of
# one call draw independent streams, as engines that take a single seed expect.
_SEED_STRIDE = 0x9E3779B97F4A7C15 - (1 << 64)


def per_request_seed(seed: int, batch: int, device) -> torch.Tensor:
    """[batch] int64 seeds derived from one integer seed (request b: seed + b * stride, wrapping)."""
    index = torch.arange(batch, dtype=torch.int64, device=device)
    return torch.as_tensor(seed, dtype=torch.int64, device=device) + index * _SEED_STRIDE


def random_seed(generator: torch.Generator | None, device) -> int:
    """A 63-bit seed drawn from ``generator`` (or torch's default generator): advances it, so
    successive calls draw fresh random numbers, and torch.manual_seed makes them repeatable."""
    gen_device = generator.device if generator is not None else "cpu"
    value = torch.randint(0, 2**63 - 1, (1,), generator=generator, device=gen_device, dtype=torch.int64)
    return int(value)


def probs_to_logits(probs: torch.Tensor) -> torch.Tensor:
    """log p in float32 (-inf where p = 0): verify at temperature 1 samples softmax(log p) = p / sum p."""
    return torch.log(probs.float())


def leading_valid(draft_ids: torch.Tensor) -> torch.Tensor:
    """[B] int32: per row, the number of ids before the first negative (placeholder) id."""
    return (draft_ids >= 0).to(torch.int32).cumprod(dim=1).sum(dim=1, dtype=torch.int32)
