"""The demo's target LM (per-request KV cache, roll-back) and tokenizer training."""

import os

import pytest
import torch

from dspark_ext.models import TargetConfig, TinyLM
from dspark_ext.models import tokenizer as tok

CONFIG = TargetConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_len=64)


def model(seed=0):
    torch.manual_seed(seed)
    m = TinyLM(CONFIG)
    m.eval()
    return m


def tokens(batch, steps, seed=1):
    return torch.randint(0, CONFIG.vocab_size, (batch, steps), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_incremental_decoding_matches_full_forward():
    m = model()
    x = tokens(3, 12)
    full, full_hidden = m(x)
    cache = m.new_cache(3)
    pieces = [(0, 5), (5, 6), (6, 12)]  # a prefill, one token, then six at once
    out, hid = [], []
    for a, b in pieces:
        logits, hidden = m(x[:, a:b], torch.full((3,), b - a), cache)
        out.append(logits)
        hid.append(hidden[-1])
    torch.testing.assert_close(torch.cat(out, 1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(hid, 1), full_hidden[-1], atol=1e-5, rtol=1e-5)
    assert cache.lengths.tolist() == [12, 12, 12]


@torch.no_grad()
def test_ragged_new_tokens_per_request():
    """Requests of one batch take different numbers of new tokens (padding after them)."""
    m = model()
    x = tokens(3, 10)
    cache = m.new_cache(3)
    m(x[:, :4], torch.tensor([4, 4, 4]), cache)
    num_new = torch.tensor([1, 5, 3])
    logits, _ = m(x[:, 4:9], num_new, cache)
    assert cache.lengths.tolist() == [5, 9, 7]
    for b in range(3):
        n = int(num_new[b])
        expected, _ = m(x[b:b + 1, :4 + n])
        torch.testing.assert_close(logits[b, :n], expected[0, 4:4 + n], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_roll_back_per_request():
    """Truncating one request's cache and appending other tokens equals a fresh run."""
    m = model()
    x = tokens(2, 10, seed=2)
    y = tokens(2, 3, seed=3)
    cache = m.new_cache(2)
    m(x[:, :8], None, cache)
    cache.truncate(torch.tensor([5, 8]))  # request 0 rejects its last three
    logits, _ = m(y, torch.tensor([3, 2]), cache)
    assert cache.lengths.tolist() == [8, 10]
    expected0, _ = m(torch.cat([x[:1, :5], y[:1]], 1))
    torch.testing.assert_close(logits[0], expected0[0, 5:8], atol=1e-5, rtol=1e-5)
    expected1, _ = m(torch.cat([x[1:, :8], y[1:, :2]], 1))
    torch.testing.assert_close(logits[1, :2], expected1[0, 8:10], atol=1e-5, rtol=1e-5)


def test_cache_full_is_an_error():
    m = model()
    cache = m.new_cache(1, max_len=8)
    with pytest.raises(ValueError, match="KV cache full"):
        m(tokens(1, 8), None, cache)


def test_stdlib_split_is_stable_and_disjoint():
    train, held_out = tok.stdlib_files()
    assert len(train) > 100 and len(held_out) > 10
    assert not set(train) & set(held_out)
    assert 0.05 < len(held_out) / (len(train) + len(held_out)) < 0.15
    assert (train, held_out) == tok.stdlib_files()


def test_tokenizer_training_round_trips(tmp_path):
    pytest.importorskip("tokenizers")
    train, held_out = tok.stdlib_files()
    files = [f for f in train + held_out
             if os.path.basename(f) in ("textwrap.py", "bisect.py", "heapq.py", "colorsys.py")]
    assert len(files) == 4
    tokenizer = tok.train_tokenizer(files, vocab_size=400)
    assert tokenizer.get_vocab_size() == 400
    assert tokenizer.token_to_id(tok.EOS) == 0
    text = "def wrap(text, width=70):\n    return [line.strip() for line in text]  # ünïcode\n"
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode()) * 0.8, "BPE merges should shorten code text"
    path = tmp_path / "tok.json"
    tokenizer.save(str(path))
    assert tok.load_tokenizer(str(path)).encode(text).ids == ids


# ---------------------------------------------------------------------------- drafter
from dspark_ext import ops  # noqa: E402
from dspark_ext.models.drafter import DrafterConfig, DSparkDrafter, dspark_loss, position_weights  # noqa: E402

DRAFT = DrafterConfig(vocab_size=97, target_d_model=32, context_layers=(0, 1), d_model=32, n_layers=2, n_heads=4,
                      block=5, rank=32)


def drafter(markov=True, seed=0):
    torch.manual_seed(seed)
    d = DSparkDrafter(DrafterConfig(**{**DRAFT.__dict__, "markov": markov}))
    torch.nn.init.normal_(d.w2.weight, std=0.5)  # a non-zero Markov correction
    return d.eval()


@torch.no_grad()
def test_drafter_backbone_shapes_and_context_masking():
    d = drafter()
    context = torch.randn(3, 9, 64)
    lengths = torch.tensor([9, 4, 1])
    anchor = torch.tensor([1, 2, 3])
    u, h = d.backbone(anchor, context, lengths)
    assert u.shape == (3, 5, 97) and h.shape == (3, 5, 32)
    # Context rows past a request's length do not matter; rows before it do.
    poked = context.clone()
    poked[1, 4:] = 100.0
    u2, _ = d.backbone(anchor, poked, lengths)
    torch.testing.assert_close(u2, u)
    poked[1, 3] = 100.0
    u3, _ = d.backbone(anchor, poked, lengths)
    assert not torch.allclose(u3[1], u[1])
    # Each request is independent of the others (batch invariance of the backbone).
    u4, _ = d.backbone(anchor[1:2], context[1:2, :4], lengths[1:2])
    torch.testing.assert_close(u4[0], u[1], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_markov_and_confidence_heads_match_the_ops():
    """The heads' weight layouts are the ops': markov_draft (greedy) and confidence agree."""
    d = drafter()
    u, h = d.backbone(torch.tensor([5, 6]), torch.randn(2, 7, 64), torch.tensor([7, 3]))
    temperature = torch.zeros(2)
    seed = torch.zeros(2, dtype=torch.int64)
    tokens, z = ops.markov_draft(u.contiguous(), torch.tensor([5, 6]), d.w1.weight.contiguous(),
                                 d.w2.weight.contiguous(), temperature, seed, seed)
    prev = torch.cat([torch.tensor([[5], [6]]), tokens[:, :-1]], dim=1)
    torch.testing.assert_close(z, d.markov_logits(u, prev), atol=1e-5, rtol=1e-5)
    assert torch.equal(tokens, z.argmax(-1))
    weight, bias = d.confidence_weights()
    conf, _ = ops.confidence(h.contiguous(), prev, d.w1.weight, weight.contiguous(), bias, None)
    torch.testing.assert_close(conf, torch.sigmoid(d.confidence_logits(h, prev)), atol=1e-6, rtol=1e-5)
    assert torch.equal(drafter(markov=False).markov_logits(u, prev), u)


def test_dspark_loss_terms():
    torch.manual_seed(0)
    n, k, v = 4, 5, 11
    logits = torch.randn(n, k, v)
    p_t = torch.softmax(torch.randn(n, k, v), -1)
    labels = torch.randint(0, v, (n, k))
    conf = torch.randn(n, k)
    loss, parts = dspark_loss(logits, conf, p_t, labels)
    w = position_weights(k)
    assert torch.allclose(w, torch.exp(-torch.arange(k) / 4.0))
    log_pd = torch.log_softmax(logits, -1)
    ce = -log_pd.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    l1 = (log_pd.exp() - p_t).abs().sum(-1)
    c_star = 1 - l1 / 2
    bce = -(c_star * torch.log(torch.sigmoid(conf)) + (1 - c_star) * torch.log(1 - torch.sigmoid(conf)))
    expected = ((0.1 * ce + 0.9 * l1 + bce) * w).sum() / (w.sum() * n)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    assert abs(parts["l1"] - float((l1 * w).sum() / (w.sum() * n))) < 1e-5
    # A draft equal to the target has no L1 term and c* = 1.
    _, parts_same = dspark_loss(torch.log(p_t), torch.full((n, k), 30.0), p_t, labels)
    assert parts_same["l1"] < 1e-5 and parts_same["bce"] < 1e-5
    # Invalid positions do not count.
    valid = torch.ones(n, k, dtype=torch.bool)
    valid[:, 3:] = False
    masked, _ = dspark_loss(logits, conf, p_t, labels, valid)
    head, _ = dspark_loss(logits[:, :3], conf[:, :3], p_t[:, :3], labels[:, :3])
    torch.testing.assert_close(masked, head)
