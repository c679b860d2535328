"""Demo: one verification round on a synthetic batch, then an empirical losslessness check.

    python -m dspark_ext.kernel_demo [--device cpu|cuda] [--batch 8] [--max-draft 5] [--vocab 32000]

Part 1 drafts K tokens per request from a draft distribution close to the target's,
verifies them with torch.ops.dspark.verify and prints the emitted tokens and acceptance
statistics. Part 2 repeats one small request 200 000 times with different seeds and
compares the distribution of the first emitted token with the target distribution
(chi-square test and total-variation distance). Part 3 scores drafts with the confidence
head, turns survival into verify lengths with the load-aware scheduler (paper Algorithm 1)
for an idle and a saturated target, and prints how many drafts each would verify.
"""

from __future__ import annotations

import argparse
import time

import torch

import dspark_ext
from dspark_ext import ops


def synthetic_round(batch: int, max_draft: int, vocab: int, device: str, dtype: torch.dtype, generator: torch.Generator):
    """Target logits [B*(K+1), V] (padded layout) and drafts sampled from a perturbed copy."""
    target = torch.randn(batch, max_draft + 1, vocab, generator=generator) * 3.0
    draft = target[:, :max_draft] + 0.3 * torch.randn(batch, max_draft, vocab, generator=generator)
    temperature = torch.full((batch,), 0.8)
    temperature[0] = 0.0  # request 0 decodes greedily
    probs = torch.softmax(draft / temperature.clamp(min=1e-6).view(-1, 1, 1), dim=-1)
    draft_tokens = torch.multinomial(probs.reshape(-1, vocab), 1, generator=generator).reshape(batch, max_draft)
    draft_tokens[0] = draft[0].argmax(-1)
    return dict(
        target_logits=target.reshape(-1, vocab).to(device, dtype),
        target_offset=ops.padded_target_offset(batch, max_draft, device),
        draft_tokens=draft_tokens.to(device),
        draft_logits=draft.to(device, dtype),
        num_draft=torch.full((batch,), max_draft, dtype=torch.int32, device=device),
        temperature=temperature.to(device),
        seed=torch.arange(batch, dtype=torch.int64, device=device) + 1234,
        offset=torch.zeros(batch, dtype=torch.int64, device=device),
    )


def part_one(args) -> None:
    gen = torch.Generator().manual_seed(0)
    inputs = synthetic_round(args.batch, args.max_draft, args.vocab, args.device, torch.bfloat16, gen)
    out_tokens, num_accepted = ops.verify(**inputs)
    if args.device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        ops.verify(**inputs)
    if args.device == "cuda":
        torch.cuda.synchronize()
    per_call = (time.perf_counter() - start) / 10
    print(f"== one round: B={args.batch}, K={args.max_draft}, V={args.vocab}, bf16, device={args.device}")
    for b in range(args.batch):
        n = int(num_accepted[b])
        mode = "greedy" if b == 0 else "T=0.8 "
        print(f"  request {b} ({mode}) drafts {inputs['draft_tokens'][b].tolist()}")
        print(f"      accepted {n}, emitted {out_tokens[b, :n + 1].tolist()}")
    mean = num_accepted.float().mean().item()
    print(f"  mean accepted drafts {mean:.2f} of {args.max_draft}; tokens per round {mean + 1:.2f}; "
          f"verify {per_call * 1e6:.0f} us per call")


def part_two(args) -> None:
    from scipy import stats

    samples, vocab, max_draft = 200_000, 24, 2
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(max_draft + 1, vocab, generator=gen) * 1.5
    draft = target[:max_draft] + torch.randn(max_draft, vocab, generator=gen)
    temperature = 0.9
    p_target = torch.softmax(target[0].double() / temperature, -1)
    p_draft = torch.softmax(draft.double() / temperature, -1)
    draft_tokens = torch.stack([torch.multinomial(p_draft[k], samples, replacement=True, generator=gen)
                                for k in range(max_draft)], dim=1)
    device = args.device
    out_tokens, num_accepted = ops.verify(
        target.repeat(samples, 1).to(device), ops.padded_target_offset(samples, max_draft, device),
        draft_tokens.to(device), draft.repeat(samples, 1, 1).to(device),
        torch.full((samples,), max_draft, dtype=torch.int32, device=device),
        torch.full((samples,), temperature, device=device),
        torch.arange(samples, dtype=torch.int64, device=device), torch.zeros(samples, dtype=torch.int64, device=device))
    first = out_tokens[:, 0].cpu()
    counts = torch.bincount(first, minlength=vocab).double()
    expected = p_target * samples
    chi2, p_value = stats.chisquare(counts.numpy(), expected.numpy())
    tv = 0.5 * (counts / samples - p_target).abs().sum().item()
    draft_only_tv = 0.5 * (p_draft[0] - p_target).abs().sum().item()
    print(f"== losslessness: {samples} rounds, V={vocab}, T={temperature}")
    print(f"  draft acceptance at position 0: {(num_accepted > 0).float().mean().item():.3f} "
          f"(theory {1 - draft_only_tv:.3f})")
    print(f"  first emitted token vs target: total variation {tv:.4f}, chi-square p = {p_value:.3f}")
    print(f"  (the draft distribution alone is at total variation {draft_only_tv:.3f} from the target)")
    print("  " + ("PASS: matches the target distribution" if p_value > 1e-3 else "FAIL: distribution differs"))


def part_three(args) -> None:
    """Confidence head -> survival -> load-aware verify lengths, on an idle and a busy target."""
    from dspark_ext.scheduler import CostProfile, LoadAwareScheduler

    gen = torch.Generator().manual_seed(2)
    batch, max_draft, hidden, rank, vocab = 64, 7, 256, 32, 1000
    device = args.device
    h = torch.randn(batch, max_draft, hidden, generator=gen)
    prev = torch.randint(0, vocab, (batch, max_draft), generator=gen)
    w1 = torch.randn(vocab, rank, generator=gen) * 0.3
    weight = torch.randn(hidden + rank, generator=gen) * 0.08
    bias = torch.tensor(1.5)
    sts_temperature = torch.linspace(1.0, 1.6, max_draft)
    move = [t.to(device) for t in (h, prev, w1, weight, bias, sts_temperature)]
    conf, survival = ops.confidence(*move)
    # Two made-up target cost curves (seconds against tokens verified in one step): a
    # GPU with idle capacity (flat up to 512 tokens) and a saturated one (20 ms + 0.1 ms
    # per token).
    idle = CostProfile([1, 512, 1024], [0.010, 0.010, 0.018])
    busy = CostProfile([1, 1024], [0.0201, 0.1224])
    print(f"== scheduling: B={batch}, K={max_draft}, mean confidence {conf.mean().item():.2f}, "
          f"mean survival at k=K-1 {survival[:, -1].mean().item():.2f}")
    for name, cost in (("idle target", idle), ("saturated target", busy)):
        lengths = LoadAwareScheduler(cost, max_draft, mode="early_stop").plan(survival)
        verified = int(lengths.sum())
        expected = batch + float(sum(survival[b, :int(lengths[b])].sum() for b in range(batch)))
        print(f"  {name:17s}: verify {verified:3d} drafts (mean L {lengths.float().mean().item():.2f}); "
              f"expected tokens {expected:.1f} for {batch + verified} target tokens")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if dspark_ext.cuda_available() else "cpu")
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--max-draft", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    part_one(args)
    part_two(args)
    part_three(args)


if __name__ == "__main__":
    main()
