"""dspark_ext.integrations.flashinfer.chain_speculative_sampling: FlashInfer's conventions
(shapes, int32 -1 padded output, counts added in place) and losslessness.

Sources of truth, none of them the code under test: FlashInfer's documented example and
hand-worked cases where every decision is certain; distributions computed here in float64
(chi-square and binomial tests at a stated significance level, fixed seeds).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dspark_ext.integrations.flashinfer import chain_speculative_sampling
from dspark_ext.stats import chi_square_p

from conftest import requires_cuda

ALPHA = 1e-4  # a correct implementation fails one statistical test with probability ALPHA
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=requires_cuda)]


def _tensor(values, device, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_documented_example(device, seed):
    # FlashInfer's docstring example: draft 2 has p = 0.6 > q = 0.3 (always accepted), draft 1
    # has p = 0 (always rejected) and the residual max(0, p - q) is all on token 0.
    draft_probs = _tensor([[[0.1, 0.2, 0.3, 0.4], [0.2, 0.3, 0.4, 0.1]]], device)
    draft_ids = _tensor([[2, 1]], device, torch.int32)
    target_probs = _tensor([[[0.0, 0.1, 0.6, 0.3], [1.0, 0.0, 0.0, 0.0], [0.7, 0.1, 0.1, 0.1]]], device)
    out, accepted, emitted = chain_speculative_sampling(draft_probs, draft_ids, target_probs, seed=seed)
    assert out.dtype == torch.int32 and out.device.type == device
    assert out.cpu().tolist() == [[2, 0, -1]]
    assert accepted.dtype == torch.int32 and accepted.cpu().tolist() == [1]
    assert emitted.dtype == torch.int32 and emitted.cpu().tolist() == [1]


@pytest.mark.parametrize("device", DEVICES)
def test_counts_added_in_place(device):
    # Request 0: both drafts certain to be accepted (target one-hot on them), bonus row one-hot on 3.
    # Request 1: draft 0 certain to be rejected (p = 0) but draft 1 would pass on its own:
    #   accepted (independent) = 1, emitted = 0, output = residual token then -1.
    one_hot = lambda v: [1.0 if i == v else 0.0 for i in range(4)]  # noqa: E731
    draft_probs = _tensor([[one_hot(1), one_hot(2)], [[0.0, 0.5, 0.5, 0.0], one_hot(3)]], device)
    draft_ids = _tensor([[1, 2], [1, 3]], device, torch.int32)
    target_probs = _tensor([[one_hot(1), one_hot(2), one_hot(3)],
                            [[0.0, 0.0, 0.0, 1.0], one_hot(3), one_hot(0)]], device)
    accepted_in = _tensor([10, 20], device, torch.int32)
    emitted_in = _tensor([30, 40], device, torch.int32)
    out, accepted, emitted = chain_speculative_sampling(draft_probs, draft_ids, target_probs, accepted_in,
                                                        emitted_in, seed=7, offset=3)
    assert accepted is accepted_in and emitted is emitted_in
    assert out.cpu().tolist() == [[1, 2, 3], [3, -1, -1]]
    assert accepted.cpu().tolist() == [12, 21]
    assert emitted.cpu().tolist() == [32, 40]


def test_placeholder_draft_ends_the_drafts():
    # Draft 0 certain to be accepted; -1 ends the drafts, so token 1 comes from target row 1.
    draft_probs = torch.tensor([[[0.0, 1.0, 0.0], [1 / 3, 1 / 3, 1 / 3]]])
    target_probs = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]])
    out, accepted, emitted = chain_speculative_sampling(draft_probs, torch.tensor([[1, -1]], dtype=torch.int32),
                                                        target_probs, seed=0)
    assert out.tolist() == [[1, 2, -1]]
    assert accepted.tolist() == [1] and emitted.tolist() == [1]


def _random_case(batch, num_spec, vocab, seed):
    gen = torch.Generator().manual_seed(seed)
    draft_probs = torch.softmax(torch.randn(batch, num_spec, vocab, generator=gen), dim=-1)
    target_probs = torch.softmax(torch.randn(batch, num_spec + 1, vocab, generator=gen), dim=-1)
    draft_ids = torch.multinomial(draft_probs.reshape(-1, vocab), 1, generator=gen).reshape(batch, num_spec)
    return draft_probs, draft_ids.to(torch.int32), target_probs


def test_seed_offset_and_generator():
    draft_probs, draft_ids, target_probs = _random_case(64, 3, 50, seed=0)
    first = chain_speculative_sampling(draft_probs, draft_ids, target_probs, seed=5, offset=1)[0]
    again = chain_speculative_sampling(draft_probs, draft_ids, target_probs, seed=5, offset=1)[0]
    assert torch.equal(first, again)
    other = chain_speculative_sampling(draft_probs, draft_ids, target_probs, seed=5, offset=2)[0]
    assert not torch.equal(first, other)
    # Per-request seeds as a tensor: request b with seed s_b gives the same as a batch of one.
    seeds = torch.arange(64, dtype=torch.int64) * 3 + 11
    batch = chain_speculative_sampling(draft_probs, draft_ids, target_probs, seed=seeds, offset=4)[0]
    single = chain_speculative_sampling(draft_probs[9:10], draft_ids[9:10], target_probs[9:10],
                                        seed=seeds[9:10], offset=4)[0]
    assert torch.equal(batch[9:10], single)
    # Without a seed: drawn from the generator, repeatable through it, fresh on each call.
    run = lambda gen: chain_speculative_sampling(draft_probs, draft_ids, target_probs, generator=gen)[0]  # noqa: E731
    gen = torch.Generator().manual_seed(3)
    a, b = run(gen), run(gen)
    assert not torch.equal(a, b)
    gen.manual_seed(3)
    assert torch.equal(run(gen), a)


@pytest.mark.parametrize("name, change, message", [
    ("draft_probs", lambda a: {**a, "draft_probs": a["draft_probs"][0]}, "draft_probs must be"),
    ("draft_token_ids", lambda a: {**a, "draft_token_ids": a["draft_token_ids"][:, :1]}, "draft_token_ids must be"),
    ("draft_token_ids dtype", lambda a: {**a, "draft_token_ids": a["draft_token_ids"].float()}, "draft_token_ids must"),
    ("target_probs", lambda a: {**a, "target_probs": a["target_probs"][:, :2]}, "target_probs must be"),
    ("accepted", lambda a: {**a, "maybe_output_accepted_token_num": torch.zeros(3, dtype=torch.int32)},
     "maybe_output_accepted_token_num"),
    ("emitted", lambda a: {**a, "maybe_output_emitted_draft_token_num": torch.zeros(2)},
     "maybe_output_emitted_draft_token_num"),
    ("seed", lambda a: {**a, "seed": torch.zeros(5, dtype=torch.int64)}, "seed must be"),
])
def test_errors_name_the_argument(name, change, message):
    draft_probs, draft_ids, target_probs = _random_case(2, 2, 5, seed=1)
    args = dict(draft_probs=draft_probs, draft_token_ids=draft_ids, target_probs=target_probs)
    with pytest.raises(ValueError, match=message):
        chain_speculative_sampling(**change(args))


def test_lossless_chi_square():
    # One fixed case repeated over N requests (distinct per-request seeds): drafts drawn from
    # q, then output position 0 must follow the target row 0, and position 1 (given draft 0
    # was accepted, i.e. output[0] == draft 0) the target row 1.
    samples, vocab, num_spec = 200_000, 8, 2
    gen = torch.Generator().manual_seed(2024)
    q = torch.softmax(torch.randn(num_spec, vocab, generator=gen) * 1.5, dim=-1).double()
    p = torch.softmax(torch.randn(num_spec + 1, vocab, generator=gen) * 1.5, dim=-1).double()
    draft_ids = torch.stack([torch.multinomial(q[j], samples, replacement=True, generator=gen)
                             for j in range(num_spec)], dim=1).to(torch.int32)
    out, accepted, emitted = chain_speculative_sampling(
        q.float().expand(samples, -1, -1), draft_ids, p.float().expand(samples, -1, -1), seed=99)
    out = out.long()
    assert chi_square_p(np.bincount(out[:, 0].numpy(), minlength=vocab), p[0].numpy()) > ALPHA
    took_first = out[:, 0] == draft_ids[:, 0].long()
    assert torch.equal(took_first, emitted >= 1)
    second = out[took_first, 1]
    assert chi_square_p(np.bincount(second.numpy(), minlength=vocab), p[1].numpy()) > ALPHA
    # The independent acceptance count: position j passes with probability sum_v min(p_j, q_j).
    rate = torch.minimum(p[:num_spec], q).sum(dim=1)
    expected = float(rate.sum()) * samples
    variance = float((rate * (1 - rate)).sum()) * samples
    z = (float(accepted.double().sum()) - expected) / math.sqrt(variance)
    assert abs(z) < 3.9, f"accepted count z = {z:.2f} (two-sided alpha 1e-4)"
