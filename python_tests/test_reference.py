"""Tests of the building blocks of dspark_ext.reference (the executable spec).

Expected values come from DESIGN.md (Random123 known-answer vectors), from an
independent pure-Python Philox written here, from float64 math, or are worked by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from dspark_ext import reference as R

M32 = 0xFFFFFFFF
FLT_MAX = torch.finfo(torch.float32).max
NEG_INF = -float("inf")


# --------------------------------------------------------------------------- independent Philox
def py_philox(counter, key):
    """Philox-4x32-10 on Python ints (Salmon et al. 2011), independent of the reference."""
    c = [x & M32 for x in counter]
    k0, k1 = key[0] & M32, key[1] & M32
    for _ in range(10):
        p0 = 0xD2511F53 * c[0]
        p1 = 0xCD9E8D57 * c[2]
        hi0, lo0 = p0 >> 32, p0 & M32
        hi1, lo1 = p1 >> 32, p1 & M32
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
        k0 = (k0 + 0x9E3779B9) & M32
        k1 = (k1 + 0xBB67AE85) & M32
    return c


def py_word(seed, stream, position, offset, v):
    """The 32-bit word for vocabulary index v, built from DESIGN.md's counter layout."""
    seed &= (1 << 64) - 1
    offset &= (1 << 64) - 1
    counter = [v >> 2, (stream << 24) | position, offset & M32, offset >> 32]
    return py_philox(counter, (seed & M32, seed >> 32))[v & 3]


KAT = [  # DESIGN.md, "Random numbers" (Random123 philox4x32_10 known answers)
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32, M32, M32, M32), (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KAT, ids=["zeros", "ones", "pi"])
def test_philox_known_answers(counter, key, expected):
    out = R.philox4x32_10([torch.tensor(c, dtype=torch.int64) for c in counter],
                          tuple(torch.tensor(k, dtype=torch.int64) for k in key))
    assert [int(w) for w in out] == list(expected)
    assert py_philox(counter, key) == list(expected)  # the independent helper agrees too


def test_philox_broadcasts_and_matches_scalar():
    g = torch.Generator().manual_seed(1234)
    n = 64
    counters = [torch.randint(0, 1 << 32, (n,), generator=g, dtype=torch.int64) for _ in range(4)]
    keys = [torch.randint(0, 1 << 32, (n,), generator=g, dtype=torch.int64) for _ in range(2)]
    out = R.philox4x32_10(counters, tuple(keys))
    for i in range(n):
        expected = py_philox([int(c[i]) for c in counters], (int(keys[0][i]), int(keys[1][i])))
        assert [int(w[i]) for w in out] == expected
    for w in out:
        assert int(w.min()) >= 0 and int(w.max()) <= M32


# --------------------------------------------------------------------------- random_words
@pytest.mark.parametrize("stream", [R.STREAM_DRAFT, R.STREAM_ACCEPT, R.STREAM_RESAMPLE])
def test_random_words_layout(stream):
    seeds = [0, 1, -1, 2**63 - 1, -(2**63), 0x123456789ABCDEF, 7 << 32]
    offsets = [0, 5, -1, 2**40 + 3, 1 << 32, 99, 0xFFFFFFFF]
    positions = [0, 1, 7, 3, 0xFFFFFF, 2, 0]
    num = 11  # not a multiple of 4: the last group is partly used
    words = R.random_words(torch.tensor(seeds), stream, torch.tensor(positions), torch.tensor(offsets), num)
    assert words.shape == (len(seeds), num) and words.dtype == torch.int64
    for i, (s, p, o) in enumerate(zip(seeds, positions, offsets)):
        for v in range(num):
            assert int(words[i, v]) == py_word(s, stream, p, o, v), (i, v)


def test_random_words_int_position_and_distinct_streams():
    seed = torch.tensor([42, 43])
    offset = torch.tensor([3, 3])
    words = R.random_words(seed, R.STREAM_RESAMPLE, 4, offset, 6)
    for i, s in enumerate([42, 43]):
        assert [int(w) for w in words[i]] == [py_word(s, 2, 4, 3, v) for v in range(6)]
    # The streams, positions, offsets and both halves of seed and offset all change the words.
    base = R.random_words(torch.tensor([5]), 1, 0, torch.tensor([9]), 8)
    for other in (R.random_words(torch.tensor([5]), 2, 0, torch.tensor([9]), 8),
                  R.random_words(torch.tensor([5]), 1, 1, torch.tensor([9]), 8),
                  R.random_words(torch.tensor([5]), 1, 0, torch.tensor([9 + (1 << 32)]), 8),
                  R.random_words(torch.tensor([5 + (1 << 32)]), 1, 0, torch.tensor([9]), 8)):
        assert not torch.equal(base, other)


# --------------------------------------------------------------------------- uniforms, exponentials
def test_acceptance_uniform_range():
    words = torch.tensor([0, 0xFF, 0x100, 0x80000000, M32], dtype=torch.int64)
    u = R.acceptance_uniform(words)
    assert u.dtype == torch.float64
    assert float(u[0]) == 2.0**-25 and float(u[1]) == 2.0**-25  # the low 8 bits are dropped
    assert float(u[2]) == 1.5 * 2.0**-24
    assert float(u[3]) == 0.5 + 2.0**-25
    assert float(u[4]) == 1.0 - 2.0**-25
    assert bool(((u > 0) & (u < 1)).all())


def _exp_f64(x: int) -> float:
    if x < 2**31:
        return -math.log((x + 0.5) * 2.0**-32)
    return -math.log1p(-((2**32 - 1 - x) + 0.5) * 2.0**-32)


@pytest.mark.parametrize("word", [0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, M32, 0x12345678, 0xDEADBEEF])
def test_exponential_extremes(word):
    e = R.exponential(torch.tensor([word], dtype=torch.int64))
    assert e.dtype == torch.float32
    value = float(e[0])
    assert math.isfinite(value) and value > 0
    assert value == pytest.approx(_exp_f64(word), rel=2e-6)


def test_exponential_named_values():
    e = R.exponential(torch.tensor([0, 0x7FFFFFFF, 0x80000000, M32], dtype=torch.int64)).double()
    assert float(e[0]) == pytest.approx(33 * math.log(2), rel=1e-6)  # -log(2^-33)
    assert float(e[1]) == pytest.approx(math.log(2), rel=1e-6)
    assert float(e[2]) == pytest.approx(math.log(2), rel=1e-6)
    assert float(e[3]) == pytest.approx(2.0**-33, rel=1e-6)  # -log1p(-2^-33)


def test_exponential_monotone_and_distribution():
    g = torch.Generator().manual_seed(7)
    words = torch.randint(0, 1 << 32, (200_000,), generator=g, dtype=torch.int64)
    e = R.exponential(words)
    assert bool(torch.isfinite(e).all()) and bool((e > 0).all())
    # decreasing in the word (float32 rounding can only make neighbours equal)
    order = torch.argsort(words)
    assert bool((e[order][1:] <= e[order][:-1]).all())
    # Exp(1): mean 1, P(E > 1) = 1/e (200k samples: standard errors ~0.0022 and ~0.0011)
    assert float(e.double().mean()) == pytest.approx(1.0, abs=0.012)
    assert float((e > 1).double().mean()) == pytest.approx(math.exp(-1), abs=0.006)


def test_sanitize():
    y = R.sanitize(torch.tensor([float("nan"), float("inf"), -float("inf"), 1.5], dtype=torch.bfloat16))
    assert y.dtype == torch.float32
    assert y.tolist() == [NEG_INF, FLT_MAX / 2, NEG_INF, 1.5]
    big = R.sanitize(torch.tensor([3e38, -3e38, 1e38, -1e38]))
    # Only the top is clamped: x - max is then never NaN; a huge negative x - max is -inf.
    assert big.tolist() == [FLT_MAX / 2] + torch.tensor([-3e38, 1e38, -1e38]).tolist()


def test_exponential2_against_float64():
    """E' = -log2(u) (base-2 exponential) against float64 on edge words and a sample, and
    its stated range [1.68e-10, 32]: never 0 or inf."""
    gen = torch.Generator().manual_seed(5)
    sample = torch.randint(0, 2**32, (200000,), generator=gen, dtype=torch.int64)
    edges = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1], dtype=torch.int64)
    words = torch.cat([sample, edges])
    e = R.exponential2(words).double()
    low = words < 2**31
    comp = torch.where(low, words, 2**32 - 1 - words).double()
    f = comp * 2.0**-32 + 2.0**-33
    exact = torch.where(low, -torch.log2(f), -torch.log1p(-f) / math.log(2.0))
    rel = ((e - exact).abs() / exact).max().item()
    assert rel < 2e-7, rel
    assert e.min().item() > 1.6e-10 and e.max().item() <= 33.0
    # E' = E / ln 2: the same exponential as ``exponential`` up to rounding.
    ratio = (R.exponential2(words).double() * math.log(2.0)) / R.exponential(words).double()
    assert ((ratio - 1).abs() < 1e-6).all()


# --------------------------------------------------------------------------- filter_mask
def _mask(rows, top_k=None, top_p=None):
    y = torch.tensor(rows, dtype=torch.float32)
    k = None if top_k is None else torch.tensor(top_k, dtype=torch.int32)
    p = None if top_p is None else torch.tensor(top_p, dtype=torch.float32)
    return R.filter_mask(y, k, p).tolist()


T, F = True, False
ROW_K = [2.0, 1.0, 3.0, 1.0, NEG_INF, 0.0]  # sorted: 3 (i2), 2 (i0), 1 (i1, i3 tie), 0 (i5), -inf (i4)


def test_filter_top_k_hand_worked():
    assert _mask([ROW_K], top_k=[1]) == [[F, F, T, F, F, F]]
    assert _mask([ROW_K], top_k=[2]) == [[T, F, T, F, F, F]]
    # the 3rd largest value (1.0) is tied: both tied tokens are kept
    assert _mask([ROW_K], top_k=[3]) == [[T, T, T, T, F, F]]
    assert _mask([ROW_K], top_k=[4]) == [[T, T, T, T, F, F]]
    # the 6th largest is -inf: the threshold is -inf but -inf itself is never kept
    assert _mask([ROW_K], top_k=[5]) == [[T, T, T, T, F, T]]
    for off in (0, -3, 6, 7, 1000):  # 0 / negative / >= V mean off
        assert _mask([ROW_K], top_k=[off]) == [[T, T, T, T, F, T]], off
    assert _mask([ROW_K]) == [[T, T, T, T, F, T]]


def test_filter_top_k_with_inf_rows():
    assert _mask([[1.0, NEG_INF, NEG_INF, 0.0]], top_k=[3]) == [[T, F, F, T]]
    assert _mask([[NEG_INF] * 4], top_k=[2]) == [[F] * 4]
    assert _mask([[NEG_INF] * 4], top_p=[0.5]) == [[F] * 4]
    assert _mask([[NEG_INF] * 4], top_k=[1], top_p=[0.0]) == [[F] * 4]
    assert _mask([[FLT_MAX, 0.0, FLT_MAX, NEG_INF]], top_k=[1]) == [[T, F, T, F]]


PROBS = [0.15, 0.5, 0.05, 0.3]  # sorted 0.5 (i1), 0.3 (i3), 0.15 (i0), 0.05 (i2); mass before: 0, .5, .8, .95
ROW_P = [math.log(p) for p in PROBS]


@pytest.mark.parametrize("top_p,expected", [
    (0.49, [F, T, F, F]),
    (0.51, [F, T, F, T]),
    (0.79, [F, T, F, T]),
    (0.81, [T, T, F, T]),
    (0.94, [T, T, F, T]),
    (0.96, [T, T, T, T]),
    (0.999, [T, T, T, T]),
    (1.0, [T, T, T, T]),       # off
    (1.5, [T, T, T, T]),       # off
    (float("nan"), [T, T, T, T]),  # off
    (0.0, [F, T, F, F]),       # <= 0 keeps the most likely token
    (-2.0, [F, T, F, F]),
    (1e-6, [F, T, F, F]),
])
def test_filter_top_p_hand_worked(top_p, expected):
    assert _mask([ROW_P], top_p=[top_p]) == [expected]
    # logits shifted by a constant and a -inf token added: same decisions, -inf never kept
    assert _mask([[y + 3.0 for y in ROW_P] + [NEG_INF]], top_p=[top_p]) == [expected + [F]]


def test_filter_top_p_ties_and_max():
    # ties with the most likely token are kept even when top_p <= 0
    assert _mask([[1.0, 3.0, 3.0, 2.0]], top_p=[0.0]) == [[F, T, T, F]]
    # ties with the last kept token are kept: mass before the first 1.0 is below 0.1 only for i0
    assert _mask([[1.0, 1.0, 0.0]], top_p=[0.1]) == [[T, T, F]]


def test_filter_top_k_then_top_p():
    probs = [0.4, 0.3, 0.2, 0.1]
    row = [math.log(p) for p in probs]
    # top-p alone: mass before the 2nd token is 0.4 < 0.55 -> two tokens
    assert _mask([row], top_p=[0.55]) == [[T, T, F, F]]
    # top-p inside the top-2 set: mass before the 2nd is 4/7 = 0.571 >= 0.55 -> one token
    assert _mask([row], top_k=[2], top_p=[0.55]) == [[T, F, F, F]]
    assert _mask([row], top_k=[2], top_p=[0.6]) == [[T, T, F, F]]
    assert _mask([row], top_k=[3], top_p=[0.99]) == [[T, T, T, F]]
    # per-row parameters
    assert _mask([row, row, row], top_k=[0, 1, 4], top_p=[0.3, 1.0, 0.65]) == [
        [T, F, F, F], [T, F, F, F], [T, T, F, F]]
