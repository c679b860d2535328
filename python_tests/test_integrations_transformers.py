"""dspark_ext.integrations.transformers: assisted generation in transformers verified by
torch.ops.dspark.verify, with a tiny random Llama target and assistant written here.

Sources of truth, none of them the code under test: transformers' own greedy decoding of
the target alone; the target's exact next-token distributions (one forward over every
prefix), for chi-square tests at ALPHA with fixed seeds.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.generation import utils as generation_utils  # noqa: E402

from dspark_ext.integrations import transformers as adapter  # noqa: E402
from dspark_ext.stats import chi_square_p  # noqa: E402

ALPHA = 1e-4  # a correct implementation fails one chi-square test with probability ALPHA
VOCAB = 12


def tiny_llama(seed: int, layers: int) -> "transformers.LlamaForCausalLM":
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, bos_token_id=0, eos_token_id=None,
                                      pad_token_id=VOCAB - 1, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper next-token distributions than the default init gives
        model.lm_head.weight.mul_(40.0)
    return model


@pytest.fixture(scope="module")
def models():
    target, assistant = tiny_llama(1, 2), tiny_llama(2, 1)
    assistant.generation_config.num_assistant_tokens = 3
    assistant.generation_config.num_assistant_tokens_schedule = "constant"
    assistant.generation_config.assistant_confidence_threshold = 0.0
    return target, assistant


SAMPLING = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)


def test_signature_matches_the_installed_transformers():
    assert list(inspect.signature(adapter.speculative_sampling).parameters) == \
        list(inspect.signature(generation_utils._speculative_sampling).parameters)
    assert transformers.__version__ in adapter.TESTED_TRANSFORMERS_VERSIONS


def test_context_manager_installs_and_restores(monkeypatch):
    original = generation_utils._speculative_sampling
    with adapter.dspark_speculative_sampling():
        assert generation_utils._speculative_sampling is adapter.speculative_sampling
        with adapter.dspark_speculative_sampling():
            assert generation_utils._speculative_sampling is adapter.speculative_sampling
        assert generation_utils._speculative_sampling is adapter.speculative_sampling
    assert generation_utils._speculative_sampling is original

    def other(candidate_input_ids, candidate_logits, new_logits):
        raise AssertionError("not called")

    monkeypatch.setattr(generation_utils, "_speculative_sampling", other)
    with pytest.raises(RuntimeError, match="tested with transformers"):
        with adapter.dspark_speculative_sampling():
            pass
    assert generation_utils._speculative_sampling is other


def test_ensemble_weight_falls_back(monkeypatch):
    seen = []

    def theirs(candidate_input_ids, candidate_logits, candidate_length, new_logits, assistant_ensemble_weight=None):
        seen.append(assistant_ensemble_weight)
        return "theirs"

    monkeypatch.setattr(generation_utils, "_speculative_sampling", theirs)
    logits = torch.zeros(1, 2, VOCAB)
    with adapter.dspark_speculative_sampling():
        result = generation_utils._speculative_sampling(torch.tensor([[3, 4, 5]]), logits[:, :1], 1, logits,
                                                        assistant_ensemble_weight=0.5)
    assert result == "theirs" and seen == [0.5]


def test_argument_errors():
    ids, q, p = torch.tensor([[1, 2, 3]]), torch.zeros(1, 2, VOCAB), torch.zeros(1, 3, VOCAB)
    with pytest.raises(ValueError, match="candidate_input_ids"):
        adapter.speculative_sampling(ids.repeat(2, 1), q, 2, p)
    with pytest.raises(ValueError, match="new_logits"):
        adapter.speculative_sampling(ids, q, 2, p[:, :2])
    with pytest.raises(ValueError, match="candidate_logits"):
        adapter.speculative_sampling(ids, q[:, :, :5], 2, p)


def test_function_is_lossless():
    # Direct calls: drafts drawn from q; the first returned token follows p row 0 and, when
    # draft 0 was accepted, the second follows p row 1.
    samples, length = 30_000, 2
    gen = torch.Generator().manual_seed(5)
    q_logits = torch.randn(1, length, VOCAB, generator=gen) * 1.5
    p_logits = torch.randn(1, length + 1, VOCAB, generator=gen) * 1.5
    q = torch.softmax(q_logits[0].double(), dim=-1)
    p = torch.softmax(p_logits[0].double(), dim=-1)
    drafts = torch.stack([torch.multinomial(q[j], samples, replacement=True, generator=gen)
                          for j in range(length)], dim=1)
    torch.manual_seed(11)
    first, second = [], []
    for i in range(samples):
        ids = torch.cat([torch.tensor([7, 8]), drafts[i]]).unsqueeze(0)
        valid, n_matches = adapter.speculative_sampling(ids, q_logits, length, p_logits)
        assert valid.dtype == torch.int64 and valid.shape == (1, int(n_matches) + 1)
        assert n_matches.dim() == 0 and 0 <= int(n_matches) <= length
        assert valid[0, :int(n_matches)].tolist() == drafts[i, :int(n_matches)].tolist()
        first.append(int(valid[0, 0]))
        if int(n_matches) >= 1:
            second.append(int(valid[0, 1]))
    assert chi_square_p(np.bincount(first, minlength=VOCAB), p[0].numpy()) > ALPHA
    assert chi_square_p(np.bincount(second, minlength=VOCAB), p[1].numpy()) > ALPHA


# (Token VOCAB - 1 is the pad token; prompts avoid it so that no position is masked.)
PROMPTS = [[0, 3, 5, 3, 5, 3], [0, 7, 1, 1, 2], [0, 9, 9, 9, 4, 9, 9], [0, 2, 6, 10, 4]]


def test_top_k_1_sampling_equals_target_greedy(models):
    # With top_k = 1 the target's processed distribution is one-hot on its argmax, so the
    # assisted output verified by our op must be the target's own greedy output.
    target, assistant = models
    before = dict(adapter.stats)
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        length = dict(attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16)
        expected = target.generate(ids, do_sample=False, **length)
        torch.manual_seed(0)
        with adapter.dspark_speculative_sampling():
            got = target.generate(ids, assistant_model=assistant, do_sample=True, top_k=1, **length)
        assert got.tolist() == expected.tolist(), f"prompt {prompt}"
    verified = adapter.stats["verified"] - before["verified"]
    accepted = adapter.stats["accepted"] - before["accepted"]
    assert adapter.stats["calls"] > before["calls"]
    assert 0 < accepted < verified, f"want accepted and rejected drafts, got {accepted} of {verified}"


def test_generate_is_lossless(models):
    # The first three generated tokens of many seeded runs against their exact marginals.
    target, assistant = models
    prompt = torch.tensor([[0, 4, 8]])
    with torch.no_grad():
        p1 = torch.softmax(target(prompt).logits[0, -1].double(), dim=-1)
        prefixes = torch.cat([prompt.repeat(VOCAB, 1), torch.arange(VOCAB).unsqueeze(1)], dim=1)
        p2_given = torch.softmax(target(prefixes).logits[:, -1].double(), dim=-1)        # [x1, x2]
        p2 = p1 @ p2_given
        prefixes3 = torch.cat([prefixes.repeat_interleave(VOCAB, 0), torch.arange(VOCAB).repeat(VOCAB).unsqueeze(1)],
                              dim=1)
        p3_given = torch.softmax(target(prefixes3).logits[:, -1].double(), dim=-1)      # [x1*V + x2, x3]
        joint12 = (p1.unsqueeze(1) * p2_given).reshape(-1)
        p3 = joint12 @ p3_given
    runs = 1000
    tokens = np.zeros((runs, 3), dtype=np.int64)
    with adapter.dspark_speculative_sampling():
        for seed in range(runs):
            torch.manual_seed(seed)
            out = target.generate(prompt, attention_mask=torch.ones_like(prompt), assistant_model=assistant,
                                  max_new_tokens=3, min_new_tokens=3, **SAMPLING)
            tokens[seed] = out[0, 3:6].numpy()
    for position, probs in enumerate((p1, p2, p3)):
        p_value = chi_square_p(np.bincount(tokens[:, position], minlength=VOCAB), probs.numpy())
        assert p_value > ALPHA, f"generated token {position}: p = {p_value:.2e}"
