"""The reference decoding loop with tiny random models (seconds): greedy identity with the
target alone, per-request cache roll-back, losslessness of the whole loop (chi-square at
significance 1e-3 on the first two tokens over many seeds), requests finishing at
different steps, the scheduler in the loop."""

import math

import pytest
import torch

from dspark_ext import decode
from dspark_ext.models.drafter import DrafterConfig, DSparkDrafter
from dspark_ext.models.target import TargetConfig, TinyLM
from dspark_ext.scheduler import CostProfile, LoadAwareScheduler
from dspark_ext.stats import chi_square_p

ALPHA = 1e-3


def tiny_models(vocab, seed=0, markov=True, block=4, scale=1.0):
    """A random double-precision target and drafter (double: the target's logits for a token
    do not depend on how many tokens the forward scored, up to far below float32)."""
    torch.manual_seed(seed)
    target = TinyLM(TargetConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, max_len=96)).double().eval()
    with torch.no_grad():
        target.head.weight.mul_(scale)  # scale > 1: peakier target distributions
    drafter = DSparkDrafter(DrafterConfig(vocab_size=vocab, target_d_model=32, context_layers=(0, 1), d_model=32,
                                          n_layers=1, n_heads=4, block=block, rank=32, markov=markov))
    with torch.no_grad():
        torch.nn.init.normal_(drafter.w2.weight, std=0.3)
    return target, drafter.double().eval()


PROMPTS = [[1, 2, 3, 4], [5], [2, 2, 1, 0, 3, 3, 1]]


class BiasedDrafter(DSparkDrafter):
    """A random drafter plus a fixed bias on U towards the target's most frequent greedy
    tokens, so that greedy drafts are accepted often enough to exercise the commit path."""

    def backbone(self, anchor, context, context_len):
        u, h = super().backbone(anchor, context, context_len)
        return u + self.bias, h


def biased(target, drafter):
    plain = decode.target_generate(target, PROMPTS, 20, temperature=0.0)
    counts = torch.bincount(torch.tensor(sum(plain.tokens, [])), minlength=target.config.vocab_size)
    drafter.__class__ = BiasedDrafter
    drafter.bias = (8.0 * counts / counts.sum()).double()
    return drafter


@pytest.mark.parametrize("markov", [True, False])
def test_greedy_identical_to_target_and_caches_agree(markov):
    target, drafter = tiny_models(vocab=6, markov=markov, scale=40.0)
    drafter = biased(target, drafter)
    spec = decode.speculative_generate(target, drafter, PROMPTS, [12, 9, 15], temperature=0.0)
    plain = decode.target_generate(target, PROMPTS, [12, 9, 15], temperature=0.0)
    assert spec.tokens == plain.tokens
    assert [len(t) for t in spec.tokens] == [12, 9, 15]
    assert spec.drafts_accepted > 0 and spec.drafts_accepted < spec.drafts_verified, \
        "the test needs both accepted and rejected drafts to exercise the roll-back"
    assert spec.rounds < plain.rounds
    # The speculative run's cache holds exactly the plain run's entries for the committed
    # tokens (its last round may have accepted drafts beyond max_new_tokens: longer is fine).
    assert bool((spec.cache.lengths >= plain.cache.lengths).all())
    for b, length in enumerate(plain.cache.lengths.tolist()):
        torch.testing.assert_close(spec.cache.keys[:, b, :, :length], plain.cache.keys[:, b, :, :length])
        torch.testing.assert_close(spec.cache.values[:, b, :, :length], plain.cache.values[:, b, :, :length])


@torch.no_grad()
def _target_pair_probs(target, prompt, temperature, top_k=None):
    """Exact joint distribution of the first two sampled tokens under the target alone."""
    def dist(tokens):
        logits, _ = target(torch.tensor([tokens]))
        x = logits[0, -1].double() / temperature
        if top_k is not None:
            kth = torch.topk(x, top_k).values[-1]
            x = torch.where(x >= kth, x, torch.full_like(x, -math.inf))
        return torch.softmax(x, -1)

    first = dist(prompt)
    vocab = first.numel()
    joint = torch.stack([first[a] * dist(prompt + [a]) for a in range(vocab)])
    return joint.reshape(-1)


@pytest.mark.parametrize("top_k", [None, 4])
def test_lossless_first_two_tokens(top_k):
    """Speculative sampling through the whole loop (markov_draft, confidence, verify, cache
    roll-back) draws the first two tokens from the target's joint distribution."""
    vocab, n, temp = 7, 4000, 0.9
    target, drafter = tiny_models(vocab=vocab, seed=3, scale=6.0)
    prompt = [1, 4, 2]
    result = decode.speculative_generate(target, drafter, [prompt] * n, 2, temperature=temp, top_k=top_k,
                                         seed=list(range(n)))
    pairs = torch.tensor([t[0] * vocab + t[1] for t in result.tokens])
    probs = _target_pair_probs(target, prompt, temp, top_k)
    p = chi_square_p(torch.bincount(pairs, minlength=vocab * vocab), probs)
    rate = result.drafts_accepted / result.drafts_verified
    print(f"\n[loop lossless top_k={top_k}] p = {p:.4f}, draft acceptance {rate:.3f}")
    assert 0.1 < rate < 0.95, "the test needs a mix of accepted and rejected drafts"
    assert p > ALPHA


def test_requests_finish_independently():
    target, drafter = tiny_models(vocab=6, scale=40.0)
    drafter = biased(target, drafter)
    plain = decode.target_generate(target, PROMPTS, 30, temperature=0.0)
    eos = plain.tokens[2][4]  # request 2 meets it at its fifth token (others may too)
    spec = decode.speculative_generate(target, drafter, PROMPTS, [3, 30, 30], temperature=0.0, eos_id=eos)
    for b, tokens in enumerate(spec.tokens):
        full = plain.tokens[b]
        stop = full.index(eos) + 1 if eos in full else len(full)
        assert tokens == full[:min(stop, [3, 30, 30][b])]
    assert len({len(t) for t in spec.tokens}) > 1, "the requests should stop at different steps"
    assert any(t and t[-1] == eos for t in spec.tokens), "at least one request stops at EOS"


def test_scheduler_in_the_loop():
    """A saturated cost profile verifies fewer drafts than an idle one; both are lossless in
    greedy mode (identical to the target)."""
    target, drafter = tiny_models(vocab=6, scale=40.0)
    drafter = biased(target, drafter)
    plain = decode.target_generate(target, PROMPTS, 10, temperature=0.0)
    flat = CostProfile([1, 64], [1.0, 1.0])
    steep = CostProfile([1, 64], [1.0, 64.0])
    verified = []
    for cost in (flat, steep):
        scheduler = LoadAwareScheduler(cost, max_draft=4)
        spec = decode.speculative_generate(target, drafter, PROMPTS, 10, temperature=0.0, scheduler=scheduler)
        assert spec.tokens == plain.tokens
        verified.append(spec.drafts_verified / spec.rounds)
    assert verified[1] < verified[0]


def test_argument_errors():
    target, drafter = tiny_models(vocab=6)
    with pytest.raises(ValueError, match="non-empty"):
        decode.speculative_generate(target, drafter, [[1], []], 3)
    with pytest.raises(ValueError, match="temperature must be"):
        decode.speculative_generate(target, drafter, [[1], [2]], 3, temperature=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="max_draft"):
        decode.speculative_generate(target, drafter, [[1]], 3, max_draft=9)
