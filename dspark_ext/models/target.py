"""A tiny decoder-only target LM for the demo and the end-to-end tests.

RMSNorm, rotary positions, attention through ``torch.nn.functional.scaled_dot_product_attention``
and a batched KV cache that keeps one length per request, so that the requests of one batch
can each take a different number of new tokens in a forward and roll back independently
(speculative decoding commits a different number of drafts per request).

The model's interface (``TargetModel`` below) is all the decoding loop uses, so another
model can be plugged in by implementing it.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F


@dataclasses.dataclass
class TargetConfig:
    vocab_size: int = 2048
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    max_len: int = 512
    rope_base: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class KVCache:
    """Keys and values of every layer for B requests, [layers, B, heads, max_len, head_dim],
    and ``lengths`` [B] int64: request b's cache holds positions 0 .. lengths[b] - 1.

    Entries at or beyond a request's length are never attended to, so rolling back is only
    ``lengths[b] = n`` (``truncate``); later forwards overwrite the stale entries.
    """

    def __init__(self, config: TargetConfig, batch: int, device, dtype=torch.float32, max_len: int | None = None):
        self.max_len = max_len or config.max_len
        shape = (config.n_layers, batch, config.n_heads, self.max_len, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch, dtype=torch.int64, device=device)

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    def truncate(self, lengths: torch.Tensor) -> None:
        """Roll every request back to ``lengths`` [B] (each <= its current length)."""
        self.lengths = torch.minimum(self.lengths, lengths.to(self.lengths))


class TargetModel(Protocol):
    """What the decoding loop needs from a target model.

    ``forward(tokens, num_new, cache)``: tokens [B, T] int64, of which the first num_new[b]
    of row b are real (the rest padding); they are appended to request b's cache at
    positions cache.lengths[b] .. + num_new[b] - 1, and cache.lengths grows by num_new.
    Returns logits [B, T, V] (row t predicts the token after tokens[b, t]) and the hidden
    states of every layer, a list of [B, T, d] (the drafter's context features)."""

    config: TargetConfig

    def new_cache(self, batch: int, device=None) -> KVCache: ...

    def forward(self, tokens: torch.Tensor, num_new: torch.Tensor, cache: KVCache
                ) -> tuple[torch.Tensor, list[torch.Tensor]]: ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary position embedding of x [B, H, T, Dh] at positions [B, T] (rotate-half form)."""
    half = x.shape[-1] // 2
    freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angle = positions.to(torch.float32).unsqueeze(-1) * freq  # [B, T, half]
    cos, sin = angle.cos().unsqueeze(1).to(x.dtype), angle.sin().unsqueeze(1).to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Block(nn.Module):
    def __init__(self, config: TargetConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.attn_norm = RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.mlp_norm = RMSNorm(d)
        self.up = nn.Linear(d, 4 * d, bias=False)
        self.down = nn.Linear(4 * d, d, bias=False)

    def forward(self, x, positions, layer, cache: KVCache | None, write_index, attend_mask):
        batch, steps, d = x.shape
        h, dh = self.config.n_heads, self.config.head_dim
        q, k, v = self.qkv(self.attn_norm(x)).split(d, dim=-1)
        q, k, v = (t.view(batch, steps, h, dh).transpose(1, 2) for t in (q, k, v))
        q = rotary(q, positions, self.config.rope_base)
        k = rotary(k, positions, self.config.rope_base)
        if cache is not None:
            # Scatter the new keys/values to their positions (padding rows go to a scratch
            # slot past every length, which the mask hides), then attend over the cache.
            idx = write_index.view(batch, 1, steps, 1).expand(batch, h, steps, dh)
            cache.keys[layer].scatter_(2, idx, k.to(cache.keys.dtype))
            cache.values[layer].scatter_(2, idx, v.to(cache.values.dtype))
            k, v = cache.keys[layer].to(q.dtype), cache.values[layer].to(q.dtype)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=attend_mask)
        x = x + self.out(attn.transpose(1, 2).reshape(batch, steps, d))
        return x + self.down(F.gelu(self.up(self.mlp_norm(x))))


class TinyLM(nn.Module):
    """The demo's target: a pre-norm decoder-only transformer (see the module doc)."""

    def __init__(self, config: TargetConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def new_cache(self, batch: int, device=None, max_len: int | None = None) -> KVCache:
        device = device or self.embed.weight.device
        return KVCache(self.config, batch, device, self.embed.weight.dtype, max_len)

    def forward(self, tokens: torch.Tensor, num_new: torch.Tensor | None = None, cache: KVCache | None = None
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits [B, T, V] and per-layer hidden states; see ``TargetModel``. Without a cache
        the T tokens of every row are one causal sequence starting at position 0."""
        batch, steps = tokens.shape
        device = tokens.device
        t = torch.arange(steps, device=device)
        if cache is None:
            positions = t.expand(batch, steps)
            write_index = None
            attend_mask = torch.ones(steps, steps, dtype=torch.bool, device=device).tril()
        else:
            if num_new is None:
                num_new = torch.full((batch,), steps, dtype=torch.int64, device=device)
            num_new = num_new.to(device=device, dtype=torch.int64)
            start = cache.lengths
            if bool(((start + num_new) > cache.max_len - 1).any()):
                raise ValueError(f"KV cache full: max_len {cache.max_len} (one slot is scratch)")
            positions = start.unsqueeze(1) + t  # [B, T]
            valid = t.unsqueeze(0) < num_new.unsqueeze(1)
            write_index = torch.where(valid, positions, torch.full_like(positions, cache.max_len - 1))
            slots = torch.arange(cache.max_len, device=device)
            # Query t of request b sees the cache up to its own position (causal), never the scratch slot.
            attend_mask = (slots.view(1, 1, -1) <= positions.unsqueeze(-1)) & (slots < cache.max_len - 1)
            attend_mask = attend_mask.unsqueeze(1)  # [B, 1, T, max_len]
        x = self.embed(tokens)
        hidden = []
        for layer, block in enumerate(self.blocks):
            x = block(x, positions, layer, cache, write_index, attend_mask)
            hidden.append(x)
        if cache is not None:
            cache.lengths = cache.lengths + num_new
        return self.head(self.norm(x)), hidden


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

