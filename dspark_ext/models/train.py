"""Training of the demo's models: the tokenizer and the target LM on the Python standard
library's sources, then the DSpark drafter against the frozen target. Seeded; progress
bars with the loss; the GPU when present. Results are cached under ``cache_dir()``
(``$DSPARK_CACHE``, default ``~/.cache/dspark_ext``) so later runs load in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import torch
from torch.nn import functional as F

from . import tokenizer as tok
from .drafter import DrafterConfig, DSparkDrafter, dspark_loss
from .target import TargetConfig, TinyLM


def cache_dir() -> str:
    path = os.environ.get("DSPARK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dspark_ext")
    os.makedirs(path, exist_ok=True)
    return path


def progress(iterable, desc: str, total: int | None = None):
    """tqdm when installed, else the plain iterable."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, dynamic_ncols=True, mininterval=1.0)


# ---------------------------------------------------------------------------- data
def encode_files(tokenizer, files: list[str]) -> torch.Tensor:
    """All files' token ids in one int64 tensor, each file followed by EOS (id 0)."""
    eos = tokenizer.token_to_id(tok.EOS)
    texts = [tok.read_text(path) for path in files]
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(texts):
        ids.extend(encoding.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def sample_windows(ids: torch.Tensor, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """`batch` random windows of `length` tokens from the corpus, [batch, length]."""
    starts = torch.randint(0, ids.numel() - length, (batch,), generator=generator)
    return torch.stack([ids[s:s + length] for s in starts.tolist()])


# ---------------------------------------------------------------------------- target
@dataclasses.dataclass
class TargetTraining:
    steps: int = 1500
    batch: int = 24
    seq_len: int = 128
    lr: float = 2e-3
    warmup: int = 50
    seed: int = 0


def cosine_lr(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress_ = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_)))


def train_target(config: TargetConfig, ids: torch.Tensor, plan: TargetTraining, device) -> tuple[TinyLM, dict]:
    """Next-token cross-entropy on random windows of the corpus (AdamW, cosine schedule)."""
    torch.manual_seed(plan.seed)
    generator = torch.Generator().manual_seed(plan.seed)
    model = TinyLM(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=plan.lr, betas=(0.9, 0.95), weight_decay=0.1)
    began = time.time()
    bar = progress(range(plan.steps), "target", plan.steps)
    loss_ema = None
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, plan.steps, plan.warmup, plan.lr)
        window = sample_windows(ids, plan.batch, plan.seq_len + 1, generator).to(device)
        logits, _ = model(window[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, config.vocab_size), window[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        value = loss.item()
        loss_ema = value if loss_ema is None else 0.95 * loss_ema + 0.05 * value
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss_ema:.3f}")
    model.eval()
    return model, {"final_loss": loss_ema, "seconds": round(time.time() - began, 1)}


@torch.no_grad()
def evaluate_target(model: TinyLM, ids: torch.Tensor, batch: int = 16, seq_len: int = 128, windows: int = 64,
                    seed: int = 1) -> float:
    """Mean next-token cross-entropy (nats) on random windows of held-out ids."""
    generator = torch.Generator().manual_seed(seed)
    device = model.embed.weight.device
    total, count = 0.0, 0
    for _ in range(max(1, windows // batch)):
        window = sample_windows(ids, batch, seq_len + 1, generator).to(device)
        logits, _ = model(window[:, :-1])
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))) * batch
        count += batch
    return total / count


# ---------------------------------------------------------------------------- drafter
@dataclasses.dataclass
class DrafterTraining:
    steps: int = 600
    sequences: int = 8        # windows per step
    seq_len: int = 96
    anchors: int = 12         # anchor positions per window
    lr: float = 2e-3
    warmup: int = 30
    seed: int = 0


@torch.no_grad()
def drafter_examples(target: TinyLM, drafter_config: DrafterConfig, window: torch.Tensor,
                     anchors_per_window: int, generator: torch.Generator) -> dict:
    """Training examples from target forwards over windows [S, L]: for anchor position a,
    the context is the target's features of tokens 0 .. a-1, the anchor token a, the labels
    tokens a+1 .. a+K, the target distributions at positions a .. a+K-1 and the previous
    tokens a .. a+K-1 (teacher forcing)."""
    block = drafter_config.block
    seqs, length = window.shape
    logits, hidden = target(window)
    features = torch.cat([hidden[i] for i in drafter_config.context_layers], dim=-1)  # [S, L, f]
    probs = torch.softmax(logits.float(), dim=-1)
    anchor_pos = torch.randint(1, length - block - 1, (seqs, anchors_per_window), generator=generator)
    anchor_pos = anchor_pos.to(window.device)
    rows = torch.arange(seqs, device=window.device).unsqueeze(1).expand_as(anchor_pos).reshape(-1)
    a = anchor_pos.reshape(-1)
    k = torch.arange(block, device=window.device)
    return {
        "context": features[rows],                        # [N, L, f] (rows >= a are masked)
        "context_len": a,
        "anchor": window[rows, a],
        "prev": window[rows.unsqueeze(1), a.unsqueeze(1) + k],          # tokens a .. a+K-1
        "labels": window[rows.unsqueeze(1), a.unsqueeze(1) + k + 1],    # tokens a+1 .. a+K
        "target_probs": probs[rows.unsqueeze(1), a.unsqueeze(1) + k],   # p_t at a .. a+K-1
    }


def drafter_forward(drafter: DSparkDrafter, ex: dict):
    u, h = drafter.backbone(ex["anchor"], ex["context"], ex["context_len"])
    z = drafter.markov_logits(u, ex["prev"])
    conf = drafter.confidence_logits(h, ex["prev"])
    return z, conf


def train_drafter(target: TinyLM, config: DrafterConfig, ids: torch.Tensor, plan: DrafterTraining, device,
                  desc: str = "drafter") -> tuple[DSparkDrafter, dict]:
    """The paper's loss (models.drafter.dspark_loss) against the frozen target."""
    torch.manual_seed(plan.seed)
    generator = torch.Generator().manual_seed(plan.seed)
    drafter = DSparkDrafter(config).to(device)
    if config.d_model == target.config.d_model:
        with torch.no_grad():  # start from the target's token embedding
            drafter.embed.weight.copy_(target.embed.weight)
    optimizer = torch.optim.AdamW(drafter.parameters(), lr=plan.lr, betas=(0.9, 0.95), weight_decay=0.05)
    began = time.time()
    bar = progress(range(plan.steps), desc, plan.steps)
    ema: dict[str, float] = {}
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, plan.steps, plan.warmup, plan.lr)
        window = sample_windows(ids, plan.sequences, plan.seq_len, generator).to(device)
        ex = drafter_examples(target, config, window, plan.anchors, generator)
        z, conf = drafter_forward(drafter, ex)
        loss, parts = dspark_loss(z, conf, ex["target_probs"], ex["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        optimizer.step()
        for key, value in {"loss": loss.item(), **parts}.items():
            ema[key] = value if key not in ema else 0.95 * ema[key] + 0.05 * value
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{ema['loss']:.3f}", l1=f"{ema['l1']:.3f}")
    drafter.eval()
    return drafter, {**{f"final_{k}": v for k, v in ema.items()}, "seconds": round(time.time() - began, 1)}


# ---------------------------------------------------------------------------- cache
def save_model(model, config, path: str, **metadata) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, path + ".safetensors")
    with open(path + ".json", "w") as f:
        json.dump({"config": dataclasses.asdict(config), **metadata}, f, indent=1)


def load_model(cls, config_cls, path: str, device):
    from safetensors.torch import load_file

    with open(path + ".json") as f:
        meta = json.load(f)
    config = config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()})
    model = cls(config)
    model.load_state_dict(load_file(path + ".safetensors"))
    return model.to(device).eval(), meta
