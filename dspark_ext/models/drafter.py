"""The DSpark drafter of the demo (DESIGN.md, "DSpark in one page"): a parallel block
backbone, the vanilla Markov head in markov_draft's weight layout and the confidence head
in confidence's layout, plus the paper's training loss.

Backbone (DFlash-style): the input block is the anchor (the last committed token) followed
by K mask tokens, at positions len .. len + K after a request's committed context. One or
two transformer layers; in each, the block attends to itself (both directions) and to the
request's context features: the target's hidden states of the committed tokens at chosen
layers, concatenated and projected to the drafter's width. The K mask positions give U
[B, K, V] (draft logits) and h [B, K, d] in one pass.

Markov head: W1 = ``w1.weight`` [Vt, r], W2 = ``w2.weight`` [Vd, r] (nn.Linear(r, Vd)),
z_k = U_k + W2 · W1[x_{k-1}], x_{-1} the anchor: exactly what torch.ops.dspark.markov_draft
computes. Confidence head: ``confidence.weight`` [1, d + r] and bias [1]:
c_k = sigmoid(w · [h_k; W1[x_{k-1}]] + b), what torch.ops.dspark.confidence computes.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.nn import functional as F

from .target import RMSNorm, rotary


@dataclasses.dataclass
class DrafterConfig:
    vocab_size: int = 2048          # Vt = Vd here (no reduced draft vocabulary)
    target_d_model: int = 256
    context_layers: tuple[int, ...] = (1, 3)  # target layers whose hidden states are the context
    d_model: int = 256
    n_layers: int = 1
    n_heads: int = 4
    block: int = 7                  # K drafts per round
    rank: int = 64                  # Markov rank r (a multiple of 32: markov_draft's tensor-core path)
    markov: bool = True             # False: the "no Markov" baseline (z = U)
    rope_base: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class DraftLayer(nn.Module):
    """Block queries over [context features; block], pre-norm, with an MLP."""

    def __init__(self, config: DrafterConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.norm = RMSNorm(d)
        self.context_norm = RMSNorm(d)
        self.q = nn.Linear(d, d, bias=False)
        self.kv = nn.Linear(d, 2 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.mlp_norm = RMSNorm(d)
        self.up = nn.Linear(d, 4 * d, bias=False)
        self.down = nn.Linear(4 * d, d, bias=False)

    def forward(self, x, context, block_pos, context_pos, mask):
        batch, steps, d = x.shape
        h, dh = self.config.n_heads, self.config.head_dim
        xn = self.norm(x)
        source = torch.cat([self.context_norm(context), xn], dim=1)
        q = self.q(xn).view(batch, steps, h, dh).transpose(1, 2)
        k, v = (t.view(batch, -1, h, dh).transpose(1, 2) for t in self.kv(source).split(d, dim=-1))
        q = rotary(q, block_pos, self.config.rope_base)
        k = rotary(k, torch.cat([context_pos, block_pos], dim=1), self.config.rope_base)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.out(attn.transpose(1, 2).reshape(batch, steps, d))
        return x + self.down(F.gelu(self.up(self.mlp_norm(x))))


class DSparkDrafter(nn.Module):
    def __init__(self, config: DrafterConfig):
        super().__init__()
        self.config = config
        d, v = config.d_model, config.vocab_size
        self.embed = nn.Embedding(v, d)
        self.mask_embed = nn.Parameter(torch.zeros(d))
        self.context_proj = nn.Linear(len(config.context_layers) * config.target_d_model, d, bias=False)
        self.layers = nn.ModuleList(DraftLayer(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(d)
        self.lm_head = nn.Linear(d, v, bias=False)
        self.w1 = nn.Embedding(v, config.rank)             # W1 [Vt, r]
        self.w2 = nn.Linear(config.rank, v, bias=False)    # W2 = w2.weight [Vd, r]
        self.confidence = nn.Linear(d + config.rank, 1)     # weight [1, d + r], bias [1]
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
        nn.init.zeros_(self.w2.weight)  # the correction starts at 0: z = U
        nn.init.normal_(self.mask_embed, std=0.02)

    def context_features(self, hidden: list[torch.Tensor]) -> torch.Tensor:
        """The drafter's context from the target's per-layer hidden states [B, T, d_t]: the
        chosen layers concatenated (projected inside ``backbone``)."""
        return torch.cat([hidden[i] for i in self.config.context_layers], dim=-1)

    def backbone(self, anchor: torch.Tensor, context: torch.Tensor, context_len: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """U [B, K, V] and h [B, K, d] from the anchor [B], the context features [B, C, f]
        (request b's first context_len[b] rows are its committed tokens' features)."""
        cfg = self.config
        batch, length = context.shape[0], context.shape[1]
        device = anchor.device
        x = torch.cat([self.embed(anchor).unsqueeze(1),
                       self.mask_embed.expand(batch, cfg.block, -1)], dim=1)  # [B, K+1, d]
        ctx = self.context_proj(context)
        context_pos = torch.arange(length, device=device).expand(batch, length)
        block_pos = context_len.view(-1, 1) + torch.arange(cfg.block + 1, device=device)
        visible = torch.arange(length, device=device).view(1, -1) < context_len.view(-1, 1)  # [B, C]
        mask = torch.cat([visible, torch.ones(batch, cfg.block + 1, dtype=torch.bool, device=device)], dim=1)
        mask = mask.view(batch, 1, 1, -1)
        for layer in self.layers:
            x = layer(x, ctx, block_pos, context_pos, mask)
        h = self.norm(x[:, 1:])
        return self.lm_head(h), h

    def markov_logits(self, backbone_logits: torch.Tensor, prev_tokens: torch.Tensor) -> torch.Tensor:
        """z = U + W2 · W1[prev] for given previous tokens [B, K] (anchor, x_0 .. x_{K-2})."""
        if not self.config.markov:
            return backbone_logits
        return backbone_logits + self.w2(self.w1(prev_tokens))

    def confidence_logits(self, h: torch.Tensor, prev_tokens: torch.Tensor) -> torch.Tensor:
        """w · [h_k; W1[prev_k]] + b, [B, K] (the confidence head before the sigmoid)."""
        return self.confidence(torch.cat([h, self.w1(prev_tokens)], dim=-1)).squeeze(-1)

    def confidence_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight [d + r], bias [1]) in torch.ops.dspark.confidence's layout."""
        return self.confidence.weight.reshape(-1), self.confidence.bias.reshape(1)


def position_weights(block: int, device=None) -> torch.Tensor:
    """The paper's per-position loss weights exp(-k / 4), k = 0 .. K-1."""
    return torch.exp(-torch.arange(block, dtype=torch.float32, device=device) / 4.0)


def dspark_loss(draft_logits: torch.Tensor, confidence_logits: torch.Tensor, target_probs: torch.Tensor,
                labels: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The paper's drafter loss, per position weighted by exp(-k/4) and averaged:
    0.1 x cross-entropy(z_k, label_k) + 0.9 x ||softmax(z_k) - p_t,k||_1
    + 1.0 x BCE(sigmoid(conf_k), c*_k), with c*_k = 1 - ||p_d,k - p_t,k||_1 / 2 (the
    probability that the target accepts draft k; no gradient through it).

    draft_logits [N, K, V] (Markov-corrected z), confidence_logits [N, K], target_probs
    [N, K, V], labels [N, K] int64, valid [N, K] bool (positions past a sequence's end off).
    Returns the loss and its three parts (floats, for logging).
    """
    n, block, _ = draft_logits.shape
    weights = position_weights(block, draft_logits.device).expand(n, block)
    if valid is not None:
        weights = weights * valid.to(weights.dtype)
    norm = weights.sum().clamp(min=1e-12)
    log_pd = F.log_softmax(draft_logits.float(), dim=-1)
    p_d = log_pd.exp()
    ce = F.nll_loss(log_pd.reshape(n * block, -1), labels.reshape(-1).clamp(min=0), reduction="none").view(n, block)
    l1 = (p_d - target_probs.float()).abs().sum(-1)
    c_star = (1.0 - 0.5 * l1).clamp(0.0, 1.0).detach()
    bce = F.binary_cross_entropy_with_logits(confidence_logits.float(), c_star, reduction="none")
    parts = {name: float(((value * weights).sum() / norm).detach())
             for name, value in (("ce", ce), ("l1", l1), ("bce", bce))}
    loss = ((0.1 * ce + 0.9 * l1 + 1.0 * bce) * weights).sum() / norm
    return loss, parts

