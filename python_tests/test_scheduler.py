"""Tests of dspark_ext.scheduler: CostProfile and LoadAwareScheduler (paper Algorithm 1,
the capacity variant, fixed lengths; engine batches with draft cost, prefill tokens,
CUDA-graph padding and token caps; online refinement of the profile).

Expected values are worked by hand in the comments, come from ``algorithm1`` below, a
plain-Python transcription of Algorithm 1 that keeps the admitted set of drafts
explicitly, or from ``brute_force``, which searches every vector of verify lengths.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import random
import time

import pytest
import torch

from dspark_ext.scheduler import CostProfile, LoadAwareScheduler


def cuda_test(fn):
    """Marks a CUDA-only test (``-m "not cuda"`` deselects it); skips it without a GPU."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")(fn))


# Graph nodes that mean a device value was read on the host (or a data-dependent shape).
from host_sync import one_thread, traced  # noqa: E402,F401  (one_thread: autouse fixture)


# --------------------------------------------------------------------------- Python Algorithm 1
def sorted_drafts(survival: list[list[float]]) -> list[tuple[float, int, int]]:
    """Drafts (value, b, k) sorted by value, highest first, ties by (b, k); survival is
    sanitised (NaN -> 0, clamped to [0, 1]) and made non-increasing along k as documented.
    Values are first rounded to float32, the precision plan() receives."""
    survival = torch.tensor(survival, dtype=torch.float32).tolist()
    drafts = []
    for b, row in enumerate(survival):
        running = 1.0
        for k, value in enumerate(row):
            value = 0.0 if value != value else min(max(value, 0.0), 1.0)
            running = min(running, value)
            drafts.append((running, b, k))
    return sorted(drafts, key=lambda d: (-d[0], d[1], d[2]))


def throughputs(drafts, batch: int, cost) -> list[float]:
    """Theta(n) = (B + sum of the n best) / cost(B + n), n = 0..len(drafts)."""
    theta, tau = [batch / cost(batch)], float(batch)
    for n, (value, _, _) in enumerate(drafts):
        tau += value
        theta.append(tau / cost(batch + n + 1))
    return theta


def lengths_of(admitted, batch: int, max_draft: int) -> list[int]:
    """Per-request count of the admitted drafts, after checking that they form prefixes."""
    taken = {(b, k) for _, b, k in admitted}
    lengths = [sum((b, k) in taken for k in range(max_draft)) for b in range(batch)]
    assert taken == {(b, k) for b in range(batch) for k in range(lengths[b])}, "admitted drafts are not prefixes"
    return lengths


def algorithm1(survival: list[list[float]], cost) -> list[int]:
    """Early stop: admit in sorted order while Theta strictly increases."""
    drafts = sorted_drafts(survival)
    theta = throughputs(drafts, len(survival), cost)
    n = 0
    while n < len(drafts) and theta[n + 1] > theta[n]:
        n += 1
    return lengths_of(drafts[:n], len(survival), len(survival[0]))


def global_capacity(survival: list[list[float]], cost) -> int:
    """C = the first argmax of Theta over n = 0..B*K."""
    theta = throughputs(sorted_drafts(survival), len(survival), cost)
    return max(range(len(theta)), key=lambda n: (theta[n], -n))


def capacity_sequence(survivals: list[list[list[float]]], cost) -> list[list[int]]:
    """Mode capacity over a sequence of calls: early stop twice, then top-C by current
    survival with C from two calls earlier, clamped to the current B*K."""
    out = []
    for i, survival in enumerate(survivals):
        if i < 2:
            out.append(algorithm1(survival, cost))
            continue
        capacity = min(global_capacity(survivals[i - 2], cost), len(survival) * len(survival[0]))
        out.append(lengths_of(sorted_drafts(survival)[:capacity], len(survival), len(survival[0])))
    return out


def plan_list(scheduler: LoadAwareScheduler, survival) -> list[int]:
    out = scheduler.plan(torch.tensor(survival, dtype=torch.float32))
    assert out.dtype == torch.int32 and out.shape == (len(survival),)
    return out.tolist()


AFFINE = CostProfile([0, 10], [1.0, 2.0])  # cost(n) = 1 + 0.1 n for every n >= 0


# --------------------------------------------------------------------------- CostProfile
def test_cost_profile_running_max_and_sorting():
    cost = CostProfile([8, 1, 2, 4], [1.4, 1.0, 0.9, 1.5])
    assert cost.tokens == [1.0, 2.0, 4.0, 8.0]
    assert cost.measured_seconds == [1.0, 0.9, 1.5, 1.4]
    assert cost.seconds == [1.0, 1.0, 1.5, 1.5]  # running max
    assert cost(3) == pytest.approx(1.25)
    assert cost(6) == pytest.approx(1.5)


def test_cost_profile_interpolation_and_extrapolation():
    cost = CostProfile([2, 4, 8], [1.0, 2.0, 3.0])
    # below the first point: clamped to the first value
    assert cost(0) == 1.0 and cost(1.5) == 1.0 and cost(2) == 1.0
    # interpolation: 1 + (3 - 2) * 0.5; 2 + (6 - 4) * 0.25
    assert cost(3) == pytest.approx(1.5) and cost(6) == pytest.approx(2.5) and cost(4.5) == pytest.approx(2.125)
    # extrapolation with the slope of the last two points, 0.25 per token
    assert cost(12) == pytest.approx(4.0) and cost(100) == pytest.approx(3.0 + 92 * 0.25)
    n = torch.tensor([0, 2, 3, 6, 12, 100])
    expected = torch.tensor([1.0, 1.0, 1.5, 2.5, 4.0, 26.0])
    out = cost(n)
    assert out.dtype == torch.float32 and out.device == n.device
    torch.testing.assert_close(out, expected)
    out64 = cost(n.double().reshape(2, 3))
    assert out64.dtype == torch.float64 and out64.shape == (2, 3)
    torch.testing.assert_close(out64, expected.double().reshape(2, 3))
    assert isinstance(cost(5), float)
    single = CostProfile([16], [0.5])
    assert single(1) == 0.5 and single(1000) == 0.5
    torch.testing.assert_close(single(torch.tensor([1.0, 1000.0])), torch.tensor([0.5, 0.5]))


def test_cost_profile_rejects_bad_points():
    with pytest.raises(ValueError, match="distinct"):
        CostProfile([1, 1], [1.0, 2.0])
    with pytest.raises(ValueError, match="seconds"):
        CostProfile([1, 2], [1.0, 0.0])
    with pytest.raises(ValueError, match="same length"):
        CostProfile([1, 2], [1.0])
    with pytest.raises(ValueError):
        CostProfile([], [])


def test_cost_profile_save_load_round_trip(tmp_path):
    cost = CostProfile([1, 2, 4, 8], [1.0, 0.9, 1.5, 2.5], metadata={"model": "toy"})
    path = tmp_path / "cost.json"
    cost.save(path)
    record = json.loads(path.read_text())
    for key in ("device_name", "torch_version", "date", "tokens", "seconds", "measured_seconds"):
        assert key in record, key
    assert record["model"] == "toy" and record["seconds"] == [1.0, 1.0, 1.5, 2.5]
    loaded = CostProfile.load(path)
    assert loaded.tokens == cost.tokens and loaded.seconds == cost.seconds
    assert loaded.measured_seconds == cost.measured_seconds and loaded.metadata["model"] == "toy"
    for n in (0, 3, 5, 20):
        assert loaded(n) == cost(n)


def test_cost_profile_measure_cpu():
    calls = []

    def step(n: int) -> None:
        calls.append(n)
        time.sleep(0.002 * n)

    cost = CostProfile.measure(step, [1, 4, 8], repeats=3, warmup=1, device="cpu")
    assert calls == [1] * 4 + [4] * 4 + [8] * 4
    assert cost.measured_seconds[0] < cost.measured_seconds[1] < cost.measured_seconds[2]
    assert cost.measured_seconds[2] >= 0.016
    assert cost.metadata["timer"] == "perf_counter" and len(cost.metadata["raw_seconds"]["8"]) == 3


@cuda_test
def test_cost_profile_measure_cuda():
    cycles = 200_000

    def step(n: int) -> None:
        torch.cuda._sleep(cycles * n)

    cost = CostProfile.measure(step, [1, 4, 16], repeats=5, warmup=2, device="cuda")
    assert cost.metadata["timer"] == "cuda_events"
    assert cost.measured_seconds[0] < cost.measured_seconds[1] < cost.measured_seconds[2]


# --------------------------------------------------------------------------- Algorithm 1
def test_flat_cost_verifies_everything():
    # T constant: admitting any draft with survival > 0 raises tau at equal cost.
    cost = CostProfile([1, 4096], [0.02, 0.02])
    gen = torch.Generator().manual_seed(0)
    survival = torch.cumprod(torch.rand(16, 7, generator=gen) * 0.7 + 0.05, dim=1)
    for mode in ("early_stop", "capacity"):
        scheduler = LoadAwareScheduler(cost, 7, mode)
        for _ in range(3):
            assert scheduler.plan(survival).tolist() == [7] * 16


def test_proportional_cost_verifies_nothing():
    # T(m) = c m: Theta(0) = B / (c B) = 1/c; one draft with survival a < 1 gives
    # (B + a) / (c (B + 1)) < 1/c, so nothing is admitted. c = 0.25 keeps the arithmetic
    # exact, so survival a = 1 (equal Theta, not a strict increase) is admitted neither.
    cost = CostProfile([1, 2], [0.25, 0.5])
    survival = torch.tensor([[1.0, 0.99, 0.5], [0.999, 0.9, 0.1], [1.0, 1.0, 1.0]])
    for mode in ("early_stop", "capacity"):
        scheduler = LoadAwareScheduler(cost, 3, mode)
        for _ in range(3):
            assert scheduler.plan(survival).tolist() == [0, 0, 0]


def test_affine_cost_hand_worked():
    # B = 2, K = 3, cost(n) = 1 + 0.1 n. Survival: request 0 [0.9, 0.6, 0.3], request 1
    # [0.8, 0.2, 0.1]. Sorted: 0.9 (0,0), 0.8 (1,0), 0.6 (0,1), 0.3 (0,2), 0.2 (1,1), 0.1 (1,2).
    #   n = 0: tau = 2.0, cost(2) = 1.2, Theta = 1.6667
    #   n = 1: tau = 2.9, cost(3) = 1.3, Theta = 2.2308  (up: admit (0,0))
    #   n = 2: tau = 3.7, cost(4) = 1.4, Theta = 2.6429  (up: admit (1,0))
    #   n = 3: tau = 4.3, cost(5) = 1.5, Theta = 2.8667  (up: admit (0,1))
    #   n = 4: tau = 4.6, cost(6) = 1.6, Theta = 2.8750  (up: admit (0,2))
    #   n = 5: tau = 4.8, cost(7) = 1.7, Theta = 2.8235  (down: stop)
    # Admitted: (0,0), (0,1), (0,2), (1,0) -> L = [3, 1].
    survival = [[0.9, 0.6, 0.3], [0.8, 0.2, 0.1]]
    assert [round(AFFINE(n), 12) for n in (2, 7)] == [1.2, 1.7]
    theta = throughputs(sorted_drafts(survival), 2, AFFINE)
    assert theta[:6] == pytest.approx([2 / 1.2, 2.9 / 1.3, 3.7 / 1.4, 4.3 / 1.5, 4.6 / 1.6, 4.8 / 1.7])
    assert plan_list(LoadAwareScheduler(AFFINE, 3, "early_stop"), survival) == [3, 1]
    assert algorithm1(survival, AFFINE) == [3, 1]


def test_early_stop_is_non_anticipating():
    # cost: 1 s up to 4 tokens, 2 s from 5 tokens on (tokens [1, 4, 5, 16], seconds [1, 1, 2, 2]).
    # B = 2, K = 4; sorted survival .95 (0,0) .92 (1,0) .90 (0,1) .88 (1,1) .85 (0,2) .82 (1,2) .80 (0,3) .78 (1,3)
    #   Theta: n=0: 2/1 = 2; n=1: 2.95/1 = 2.95; n=2: 3.87/1 = 3.87; n=3: 4.77/2 = 2.385 (dip: stop)
    #          n=4: 2.825; n=5: 3.25; n=6: 3.66; n=7: 4.06; n=8: 8.9/2 = 4.45 (global maximum)
    # early_stop stops at the dip: L = [1, 1]; the global argmax (capacity) takes all 8.
    cost = CostProfile([1, 4, 5, 16], [1.0, 1.0, 2.0, 2.0])
    survival = [[0.95, 0.90, 0.85, 0.80], [0.92, 0.88, 0.82, 0.78]]
    theta = throughputs(sorted_drafts(survival), 2, cost)
    assert theta[3] < theta[2] < theta[8] and max(theta) == theta[8]
    assert plan_list(LoadAwareScheduler(cost, 4, "early_stop"), survival) == [1, 1]
    capacity = LoadAwareScheduler(cost, 4, "capacity")
    assert [plan_list(capacity, survival) for _ in range(4)] == [[1, 1], [1, 1], [4, 4], [4, 4]]


def test_ties_broken_by_request_then_position():
    # Every survival 0.5; cost 1 s up to 5 tokens, 10 s at 6: with B = 2 exactly 3 drafts
    # fit (Theta(3) = 3.5 / 1, Theta(4) = 4 / 10). Ties in (b, k) order: (0,0), (0,1), (0,2).
    cost = CostProfile([2, 5, 6], [1.0, 1.0, 10.0])
    assert plan_list(LoadAwareScheduler(cost, 3, "early_stop"), [[0.5] * 3, [0.5] * 3]) == [3, 0]
    # request 1 first when it is strictly better at position 0 only; then ties again by (b, k)
    assert plan_list(LoadAwareScheduler(cost, 3, "early_stop"), [[0.5] * 3, [0.6, 0.5, 0.5]]) == [2, 1]


def test_non_monotone_survival_still_gives_prefixes():
    # Same cost: 3 drafts admitted. Request 0 [0.2, 0.9, 0.9] is read as [0.2, 0.2, 0.2]
    # (running minimum), so the three drafts of request 1 win: L = [0, 3]. Without the
    # running minimum the top 3 would be (0,1), (0,2), (1,0): not a prefix of request 0.
    cost = CostProfile([2, 5, 6], [1.0, 1.0, 10.0])
    survival = [[0.2, 0.9, 0.9], [0.8, 0.7, 0.6]]
    assert plan_list(LoadAwareScheduler(cost, 3, "early_stop"), survival) == [0, 3]
    # Random unsorted rows with many ties. Survival in multiples of 1/8 and costs with
    # dyadic values and slopes keep every Theta exact, so exact ties in Theta compare
    # equal in the Python reference and in plan (no admission on a tie).
    gen = random.Random(5)
    costs = (CostProfile([0, 8], [1.0, 2.0]), CostProfile([1, 5, 7, 31], [1.0, 1.5, 2.5, 5.5]))
    for _ in range(60):
        batch, max_draft = gen.randint(1, 5), gen.randint(1, 5)
        survival = [[gen.randint(0, 8) / 8 for _ in range(max_draft)] for _ in range(batch)]
        for cost in costs:
            assert plan_list(LoadAwareScheduler(cost, max_draft, "early_stop"), survival) == algorithm1(survival, cost)


def random_cost(gen: random.Random) -> CostProfile:
    points = sorted(gen.sample(range(1, 40), gen.randint(1, 5)))
    seconds, value = [], gen.uniform(0.5, 2.0)
    for _ in points:
        seconds.append(value)
        value += gen.choice([0.0, 0.0, gen.uniform(0.0, 0.3), gen.uniform(0.5, 2.0)])
    return CostProfile(points, seconds)


def random_survival(gen: random.Random, batch: int, max_draft: int) -> list[list[float]]:
    rows = []
    for _ in range(batch):
        value, row = 1.0, []
        for _ in range(max_draft):
            value *= gen.uniform(0.2, 1.0)
            row.append(value)
        rows.append(row)
    return rows


def test_early_stop_matches_python_algorithm1():
    gen = random.Random(0)
    seen = set()
    for _ in range(300):
        batch, max_draft = gen.randint(1, 6), gen.randint(1, 5)
        cost, survival = random_cost(gen), random_survival(gen, batch, max_draft)
        expected = algorithm1(survival, cost)
        assert plan_list(LoadAwareScheduler(cost, max_draft, "early_stop"), survival) == expected
        seen.add("none" if sum(expected) == 0 else "all" if sum(expected) == batch * max_draft else "some")
    assert seen == {"none", "all", "some"}  # the cases exercise every regime


def test_capacity_matches_python_reference_across_batch_sizes():
    gen = random.Random(1)
    for _ in range(60):
        max_draft = gen.randint(1, 5)
        cost = random_cost(gen)
        survivals = [random_survival(gen, gen.randint(1, 6), max_draft) for _ in range(5)]
        scheduler = LoadAwareScheduler(cost, max_draft, "capacity")
        assert [plan_list(scheduler, s) for s in survivals] == capacity_sequence(survivals, cost)


def test_capacity_uses_survival_of_two_calls_earlier():
    # cost(n) = 1 + 0.1 n, B = 2, K = 3.
    # call 0, s_a = the hand-worked case: early stop [3, 1]; global argmax C_a = 4.
    # call 1, s_b = [[.5, .1, .05], [.4, .1, .01]]: Theta 1.667, 1.923, 2.071, 2.0 -> early stop
    #         at 2: [1, 1]; C_b = 2 (Theta(2) = 2.071 is the maximum).
    # call 2, s_c = [[.99, .98, .97], [.5, .4, .3]] with C_a = 4: top 4 = request 0's three and
    #         (1,0) -> [3, 1] (early stop on s_c would give [3, 2]: Theta rises to n = 5).
    # call 3, s_c again with C_b = 2: [2, 0].
    s_a = [[0.9, 0.6, 0.3], [0.8, 0.2, 0.1]]
    s_b = [[0.5, 0.1, 0.05], [0.4, 0.1, 0.01]]
    s_c = [[0.99, 0.98, 0.97], [0.5, 0.4, 0.3]]
    assert global_capacity(s_a, AFFINE) == 4 and global_capacity(s_b, AFFINE) == 2
    assert algorithm1(s_c, AFFINE) == [3, 2]
    scheduler = LoadAwareScheduler(AFFINE, 3, "capacity")
    assert [plan_list(scheduler, s) for s in (s_a, s_b, s_c, s_c)] == [[3, 1], [1, 1], [3, 1], [2, 0]]
    scheduler.reset()  # history forgotten: early stop again
    assert plan_list(scheduler, s_c) == [3, 2]


def test_capacity_clamped_when_batch_shrinks():
    # C_a = 4 from a B = 2 round; two calls later B = 1 (3 drafts): C = min(4, 3) = 3.
    # Early stop on [[.9, .2, .1]] would stop at 2: Theta 0.909, 1.583, 1.615, 1.571.
    scheduler = LoadAwareScheduler(AFFINE, 3, "capacity")
    plan_list(scheduler, [[0.9, 0.6, 0.3], [0.8, 0.2, 0.1]])
    plan_list(scheduler, [[0.5, 0.1, 0.05], [0.4, 0.1, 0.01]])
    assert algorithm1([[0.9, 0.2, 0.1]], AFFINE) == [2]
    assert plan_list(scheduler, [[0.9, 0.2, 0.1]]) == [3]


def test_fixed_mode():
    scheduler = LoadAwareScheduler(AFFINE, 4, "fixed", fixed_len=3)
    out = scheduler.plan(torch.rand(5, 4))
    assert out.dtype == torch.int32 and out.tolist() == [3] * 5
    assert LoadAwareScheduler(AFFINE, 4, "fixed", fixed_len=9).plan(torch.rand(2, 4)).tolist() == [4, 4]
    assert LoadAwareScheduler(AFFINE, 4, "fixed", fixed_len=0).plan(torch.rand(2, 4)).tolist() == [0, 0]


def test_nan_and_out_of_range_survival():
    # NaN -> 0 and values clamped to [0, 1]: [[nan, .9, .9], [1.5, .8, -1]] reads as
    # [[0, 0, 0], [1, .8, 0]]; with a flat cost every draft with survival > 0 is taken.
    cost = CostProfile([1, 100], [1.0, 1.0])
    survival = torch.tensor([[float("nan"), 0.9, 0.9], [1.5, 0.8, -1.0]])
    assert LoadAwareScheduler(cost, 3).plan(survival).tolist() == [0, 2]
    assert LoadAwareScheduler(cost, 3).plan(survival.double()).tolist() == [0, 2]
    # Survival 1.5 read as 1: with T(m) = m / 4, admitting a = 1 leaves Theta equal (no
    # admission); unclamped, (1 + 1.5) / (2 / 4) > 1 / (1 / 4) would admit it.
    proportional = CostProfile([1, 2], [0.25, 0.5])
    assert LoadAwareScheduler(proportional, 2).plan(torch.tensor([[1.5, 1.2]])).tolist() == [0]


def test_plan_validates_and_handles_empty():
    scheduler = LoadAwareScheduler(AFFINE, 3)
    with pytest.raises(ValueError, match="max_draft"):
        scheduler.plan(torch.rand(2, 4))
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        scheduler.plan(torch.rand(6))
    with pytest.raises(ValueError, match="mode"):
        LoadAwareScheduler(AFFINE, 3, "greedy")
    with pytest.raises(ValueError, match="fixed_len"):
        LoadAwareScheduler(AFFINE, 3, "fixed")
    assert scheduler.plan(torch.rand(0, 3)).shape == (0,)


@pytest.mark.parametrize("mode", ["early_stop", "capacity", "fixed"])
def test_plan_traces_as_one_graph(mode):
    # CPU proxy for "no host synchronisation" (see traced). The capacity history must also
    # advance across calls of the compiled function.
    cost = CostProfile([1, 20, 40], [1.0, 1.2, 3.0])
    gen = random.Random(3)
    survivals = [torch.tensor(random_survival(gen, 4, 5)) for _ in range(4)]
    scheduler = LoadAwareScheduler(cost, 5, mode, fixed_len=2)
    scheduler.plan(survivals[0])  # warm-up: cost table
    scheduler.reset()
    compiled = traced(scheduler.plan)
    eager = LoadAwareScheduler(cost, 5, mode, fixed_len=2)
    assert [compiled(s).tolist() for s in survivals] == [eager.plan(s).tolist() for s in survivals]


# --------------------------------------------------------------------------- engine cost model
def test_capture_sizes_make_a_step_function():
    # Points 4: 1.0, 8: 1.0, 12: 1.5, 16: 2.0, 24: 4.0, 40: 6.0; captured sizes 4, 8, 16 (limit 16).
    # At or below 16: the value at the next captured size (12 is not captured: 9..16 cost 2.0).
    # Above 16: points above only, so 17..24 cost the value at 24 (4.0), then 4 + (n - 24) / 8.
    cost = CostProfile([4, 8, 12, 16, 24, 40], [1.0, 1.0, 1.5, 2.0, 4.0, 6.0], capture_sizes=[16, 4, 8])
    assert cost.capture_sizes == [4, 8, 16] and cost.limit == 16
    expected = {0: 1.0, 1: 1.0, 4: 1.0, 5: 1.0, 8: 1.0, 9: 2.0, 12: 2.0, 16: 2.0, 17: 4.0, 20: 4.0, 24: 4.0,
                32: 5.0, 40: 6.0, 48: 7.0}
    assert {n: cost(n) for n in expected} == expected
    n = torch.tensor(list(expected), dtype=torch.float64)
    assert cost(n).tolist() == list(expected.values())
    # A captured size that was not measured gets the interpolated value (and becomes a point).
    cost = CostProfile([2, 10], [1.0, 2.0], capture_sizes=[4, 6])
    assert cost.tokens == [2.0, 4.0, 6.0, 10.0]
    assert [cost(n) for n in (1, 3, 4, 5, 6, 7, 10)] == [1.25, 1.25, 1.25, 1.5, 1.5, 2.0, 2.0]
    # No point above the limit: the profile is extrapolated from its last points.
    cost = CostProfile([2, 4], [1.0, 2.0], capture_sizes=[2, 4])
    assert [cost(n) for n in (3, 4, 5, 8)] == [2.0, 2.0, 2.5, 4.0]


def test_draft_cost():
    cost = CostProfile([1, 100], [1.0, 1.0], draft_requests=[8, 1, 32], draft_seconds=[0.3, 0.1, 0.2])
    assert cost.has_draft_cost and cost.draft_requests == [1.0, 8.0, 32.0]
    assert cost.draft_seconds == [0.1, 0.3, 0.3]  # running max
    assert [cost.draft(r) for r in (0, 1, 4.5, 8, 64)] == [0.1, 0.1, 0.2, 0.3, 0.3]
    assert cost.draft(torch.tensor([4.5, 64.0])).tolist() == pytest.approx([0.2, 0.3])
    plain = CostProfile([1, 100], [1.0, 1.0])
    assert not plain.has_draft_cost and plain.draft(5) == 0.0 and plain.draft(torch.tensor([5.0])).tolist() == [0.0]
    with pytest.raises(ValueError, match="both"):
        CostProfile([1], [1.0], draft_requests=[1])


def test_record_moves_toward_observations_and_stays_monotone():
    cost = CostProfile([1, 64, 128], [1.0, 2.0, 3.0], window=5)
    errors = []
    for _ in range(5):
        cost.record(64, 2.6)
        errors.append(abs(cost.measured_seconds[1] - 2.6))
    # median of [2.0, 2.6] = 2.3, then 2.6 from the third value on: the estimate moves toward
    # the observations and reaches them.
    assert errors[0] == pytest.approx(0.3) and errors[1:] == [0.0] * 4
    assert cost(64) == 2.6 and cost(96) == pytest.approx(2.8)
    # One slow step does not move the median.
    cost.record(64, 50.0)
    assert cost(64) == 2.6
    # Observations that make a smaller count slower than a larger one: the running maximum keeps
    # the curve monotone, the estimate itself is kept.
    for _ in range(5):
        cost.record(1, 4.0)
    assert cost.measured_seconds == [4.0, 2.6, 3.0] and cost.seconds == [4.0, 4.0, 4.0]
    assert all(a <= b for a, b in zip(cost.seconds, cost.seconds[1:]))
    # An observation between points goes to the nearest one, scaled by the profile's ratio:
    # cost = [1, 64: 2, 128: 4]; 5 s at 100 tokens (profile 3.125) -> 5 * 4 / 3.125 = 6.4 at 128.
    cost = CostProfile([1, 64, 128], [1.0, 2.0, 4.0], window=1)
    cost.record([100], [5.0])
    assert cost.measured_seconds == [1.0, 2.0, pytest.approx(6.4)]
    with pytest.raises(ValueError, match="seconds"):
        cost.record(10, 0.0)
    with pytest.raises(ValueError, match="draft"):
        cost.record_draft(4, 0.1)


def test_record_buckets_by_padded_size():
    # limit 16: 5 tokens ran as 8, observed at the point 8 itself; 20 tokens go to the points
    # above the limit (24, 40), never to 16.
    cost = CostProfile([4, 8, 16, 24, 40], [1.0, 1.0, 2.0, 4.0, 6.0], capture_sizes=[4, 8, 16], window=1)
    cost.record(5, 1.5)
    assert cost.measured_seconds == [1.0, 1.5, 2.0, 4.0, 6.0]
    assert cost(5) == 1.5 and cost(4) == 1.0
    cost.record(20, 5.0)  # nearest point above the limit: 24; profile there = at 20 (4.0): 5.0
    assert cost.measured_seconds == [1.0, 1.5, 2.0, 5.0, 6.0]
    cost.record(17, 3.0)  # nearest above: 24 again
    assert cost.measured_seconds[3] == 3.0 and cost.seconds[3] == 3.0
    # draft observations
    cost = CostProfile([1], [1.0], draft_requests=[1, 64], draft_seconds=[0.1, 0.2], window=1)
    cost.record_draft(64, 0.4)
    assert cost.draft_seconds == [0.1, 0.4] and cost.draft(64) == 0.4


def test_record_reaches_device_tables_in_place():
    cost = CostProfile([1, 64, 128], [1.0, 2.0, 3.0], window=1, draft_requests=[1, 8], draft_seconds=[0.1, 0.2])
    n = torch.tensor([64.0, 96.0])
    assert cost(n).tolist() == [2.0, 2.5]
    tokens = torch.tensor([0, 64, 96, 128, 200])
    # + draft 0.2; past 128 the slope of the last two points, 1/64: 3 + 72/64 at 200
    assert cost.step_costs(8, tokens).tolist() == pytest.approx([1.2, 2.2, 2.7, 3.2, 4.325])
    tables = cost._verify.device_tables(n.device)[1]
    cost.record(64, 2.4)
    cost.record_draft(8, 0.5)
    assert cost(n).tolist() == pytest.approx([2.4, 2.7]) and cost.draft(torch.tensor([8.0])).tolist() == [0.5]
    assert cost._verify.device_tables(n.device)[1] is tables  # same storage, rewritten
    # 64: 2.4, slope past 128 now 0.6 / 64; draft 0.5
    assert cost.step_costs(8, tokens).tolist() == pytest.approx([1.5, 2.9, 3.2, 3.5, 3.0 + 72 * 0.6 / 64 + 0.5])
    # past the dense table (the last point): linear with the last slope
    steep = CostProfile([1, 10], [1.0, 2.0])
    assert steep.step_costs(3, torch.tensor([10, 19, 1000])).tolist() == pytest.approx([2.0, 3.0, 2.0 + 990 / 9])


def test_save_load_keeps_capture_draft_and_observations(tmp_path):
    cost = CostProfile([4, 8, 24], [1.0, 1.2, 3.0], {"model": "toy"}, capture_sizes=[4, 8, 16],
                       draft_requests=[1, 32], draft_seconds=[0.1, 0.3], window=4)
    cost.record([5, 6, 30], [1.5, 1.6, 3.5])
    cost.record_draft(20, 0.5)
    path = tmp_path / "cost.json"
    cost.save(path)
    loaded = CostProfile.load(path)
    assert loaded.metadata["model"] == "toy" and loaded.capture_sizes == [4, 8, 16] and loaded.window == 4
    assert loaded.tokens == cost.tokens and loaded.seconds == cost.seconds
    assert loaded.measured_seconds == cost.measured_seconds and loaded.draft_seconds == cost.draft_seconds
    for n in (0, 3, 5, 9, 16, 17, 24, 100):
        assert loaded(n) == cost(n)
    # the windows came back too: the same observation moves both the same way
    for profile in (cost, loaded):
        profile.record(7, 0.9)
        profile.record_draft(2, 0.05)
    assert loaded.measured_seconds == cost.measured_seconds and loaded.draft_seconds == cost.draft_seconds
    assert "observations" not in loaded.metadata and "capture_sizes" not in loaded.metadata


# --------------------------------------------------------------------------- engine batches
def test_mixed_batch_hand_worked():
    # B = 3: requests 0, 1 decode, request 2 is in prefill (6 tokens this step, emits nothing):
    # base_tokens = 2 + 6 = 8. Verify cost 4: 1.0, 8: 1.0, 12: 1.5, 16: 2.0, captured 4, 8, 12, 16.
    # Sorted emitting drafts: .9 (0,0), .8 (0,1), .7 (1,0), .2 (1,1); request 2's .99 never counts.
    #   no draft cost: n = 0: 8 tokens, T = 1.0, tau = 2, Theta = 2; n = 1: 9 tokens pad to 12,
    #   T = 1.5, Theta = 2.9 / 1.5 = 1.93: stop, L = [0, 0, 0] (interpolating, T(9) = 1.125 and
    #   Theta = 2.58 would admit it).
    #   draft cost 1.0: Theta 2/2 = 1.0, 2.9/2.5 = 1.16, 3.7/2.5 = 1.48, 4.4/2.5 = 1.76, 4.6/2.5 = 1.84:
    #   all four, L = [2, 2, 0]; with max_tokens = 10 (room 2): L = [2, 0, 0].
    survival = torch.tensor([[0.9, 0.8], [0.7, 0.2], [0.99, 0.99]])
    emitting = torch.tensor([True, True, False])
    points = ([4, 8, 12, 16], [1.0, 1.0, 1.5, 2.0])
    plain = CostProfile(*points, capture_sizes=[4, 8, 12, 16])
    drafted = CostProfile(*points, capture_sizes=[4, 8, 12, 16], draft_requests=[1, 64], draft_seconds=[1.0, 1.0])
    for mode in ("early_stop", "capacity"):
        assert LoadAwareScheduler(plain, 2, mode).plan(survival, 8, emitting).tolist() == [0, 0, 0]
        assert LoadAwareScheduler(CostProfile(*points), 2, mode).plan(survival, 8, emitting).tolist() == [2, 1, 0]
        assert LoadAwareScheduler(drafted, 2, mode).plan(survival, 8, emitting).tolist() == [2, 2, 0]
        assert LoadAwareScheduler(drafted, 2, mode).plan(survival, torch.tensor(8), emitting,
                                                         torch.tensor(10)).tolist() == [2, 0, 0]
    # fixed: emitting requests only, and in batch order under the cap
    fixed = LoadAwareScheduler(plain, 2, "fixed", fixed_len=2)
    assert fixed.plan(survival, 8, emitting).tolist() == [2, 2, 0]
    assert fixed.plan(survival, 8, emitting, max_tokens=11).tolist() == [2, 1, 0]
    assert fixed.plan(survival, torch.tensor(8), None, torch.tensor(7)).tolist() == [0, 0, 0]


def reference_cost(points, seconds, capture=None, draft=None):
    """The documented step cost, written from the CostProfile doc (not from its code):
    (requests, tokens) -> draft(requests) + verify(padded tokens)."""
    def curve(xs, ys):
        pairs = sorted(zip(xs, ys))
        xs = [float(x) for x, _ in pairs]
        ys = list(itertools.accumulate((y for _, y in pairs), max))

        def value(x):
            if x <= xs[0]:
                return ys[0]
            if x >= xs[-1]:
                slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if len(xs) > 1 else 0.0
                return ys[-1] + (x - xs[-1]) * slope
            j = max(i for i in range(len(xs)) if xs[i] <= x)
            return ys[j] + (x - xs[j]) * (ys[j + 1] - ys[j]) / (xs[j + 1] - xs[j])
        return value

    verify = curve(points, seconds)
    draft_cost = curve(*draft) if draft else (lambda r: 0.0)

    def step(requests, tokens):
        if capture:
            if tokens <= max(capture):
                tokens = min(c for c in capture if c >= tokens)
            else:
                tokens = max([tokens] + [min((x for x in points if x > max(capture)), default=tokens)])
        return draft_cost(requests) + verify(tokens)
    return step


def brute_force(survival, step, base, emitting, max_tokens):
    """Every vector of verify lengths (0 for non-emitting requests): for each total n the
    best expected yield and its vector; Theta*(n) = (E + best S(n)) / step(B, base + n).
    Returns (vectors by n, Theta* by n, early-stop n, first argmax n)."""
    rows = torch.tensor(survival, dtype=torch.float32).tolist()
    rows = [list(itertools.accumulate(row, min)) for row in rows]
    batch, max_draft = len(rows), len(rows[0])
    emit = sum(emitting)
    limit = emit * max_draft if max_tokens is None else min(emit * max_draft, max(0, max_tokens - base))
    best = {}
    for lengths in itertools.product(*[range(max_draft + 1) if e else [0] for e in emitting]):
        n = sum(lengths)
        if n > limit:
            continue
        gain = sum(sum(row[:length]) for row, length in zip(rows, lengths))
        if n not in best or gain > best[n][0]:
            best[n] = (gain, list(lengths))
    theta = [(emit + best[n][0]) / step(batch, base + n) for n in range(limit + 1)]
    early = 0
    while early < limit and theta[early + 1] > theta[early]:
        early += 1
    first_max = max(range(limit + 1), key=lambda n: (theta[n], -n))
    return [best[n][1] for n in range(limit + 1)], theta, early, first_max


def random_engine_case(gen: random.Random):
    """A random engine step and cost: small B and K, survival, prefill tokens, emitting
    requests, a cap, and a monotone-or-not cost with optional padding and draft cost."""
    batch, max_draft = gen.randint(1, 4), gen.randint(1, 4)
    prefill = gen.choice([0, 0, gen.randint(1, 30)])
    emitting = [gen.random() < 0.8 for _ in range(batch)]
    base = sum(emitting) + prefill
    max_tokens = gen.choice([None, None, base + gen.randint(0, batch * max_draft), gen.randint(0, base)])
    points = sorted(gen.sample(range(1, 60), gen.randint(1, 6)))
    seconds, value = [], gen.uniform(0.5, 2.0)
    for _ in points:
        seconds.append(value + gen.choice([0.0, -0.2]))  # occasionally non-monotone: running max
        value += gen.choice([0.0, gen.uniform(0.0, 0.3), gen.uniform(0.1, 0.6), gen.uniform(0.5, 2.0)])
    capture = sorted(gen.sample([1, 2, 4, 8, 16, 24, 32, 48], gen.randint(1, 5))) if gen.random() < 0.6 else None
    draft = None
    if gen.random() < 0.5:
        requests = sorted(gen.sample(range(1, 8), gen.randint(1, 3)))
        draft = (requests, [gen.uniform(0.05, 2.0) for _ in requests])
    profile = CostProfile(points, seconds, capture_sizes=capture,
                          draft_requests=draft and draft[0], draft_seconds=draft and draft[1])
    case = dict(survival=random_survival(gen, batch, max_draft), base=base, emitting=emitting,
                max_tokens=max_tokens, as_tensors=gen.random() < 0.5)
    return profile, reference_cost(points, seconds, capture, draft), case


def plan_case(scheduler: LoadAwareScheduler, case) -> list[int]:
    emitting = torch.tensor(case["emitting"])
    base, cap = case["base"], case["max_tokens"]
    if case["as_tensors"]:
        base, cap = torch.tensor(base), None if cap is None else torch.tensor(cap)
    out = scheduler.plan(torch.tensor(case["survival"]), base, emitting, cap)
    assert out.dtype == torch.int32
    return out.tolist()


BRUTE_FORCE_CASES = 400
BRUTE_FORCE_SEQUENCES = 120


def test_early_stop_matches_brute_force_on_engine_batches():
    gen = random.Random(11)
    seen = collections.Counter()
    for _ in range(BRUTE_FORCE_CASES):
        profile, step, case = random_engine_case(gen)
        vectors, theta, early, _ = brute_force(case["survival"], step, case["base"], case["emitting"],
                                               case["max_tokens"])
        # the profile evaluates the documented cost
        for n in range(len(theta) + 2):
            tokens = case["base"] + n
            assert profile(tokens) + profile.draft(len(case["emitting"])) == pytest.approx(
                step(len(case["emitting"]), tokens), rel=1e-12)
        assert plan_case(LoadAwareScheduler(profile, len(case["survival"][0]), "early_stop"), case) == vectors[early]
        seen["compared"] += 1
        room = None if case["max_tokens"] is None else case["max_tokens"] - case["base"]
        binds = room is not None and room < sum(case["emitting"]) * len(case["survival"][0])
        seen["cap binds" if binds else "cap does not bind"] += 1
        seen["padded" if profile.capture_sizes else "unpadded"] += 1
        seen["draft cost" if profile.has_draft_cost else "no draft cost"] += 1
        seen["none" if early == 0 else "all" if early == len(theta) - 1 else "some"] += 1
        seen["prefill" if case["base"] > sum(case["emitting"]) else "decode only"] += 1
    print(f"early_stop vs brute force: {dict(seen)}")
    assert seen["compared"] == BRUTE_FORCE_CASES
    assert min(seen[k] for k in ("cap binds", "cap does not bind", "padded", "unpadded", "draft cost", "no draft cost", "none", "all",
                                 "some", "prefill", "decode only")) >= 20


def test_capacity_matches_brute_force_on_engine_batches():
    # Per sequence: one cost, four calls with their own batch, base, emitting and cap. Call i
    # admits the best min(C_(i-2), room_i, emitting drafts_i) drafts, C the first argmax.
    gen = random.Random(12)
    compared = differs = 0
    for _ in range(BRUTE_FORCE_SEQUENCES):
        profile, step, first = random_engine_case(gen)
        max_draft = len(first["survival"][0])
        cases = [first]
        while len(cases) < 4:
            _, _, case = random_engine_case(gen)
            if len(case["survival"][0]) == max_draft:
                cases.append(case)
        scheduler = LoadAwareScheduler(profile, max_draft, "capacity")
        capacities = []
        for i, case in enumerate(cases):
            vectors, _, early, first_max = brute_force(case["survival"], step, case["base"], case["emitting"],
                                                       case["max_tokens"])
            expected = vectors[early] if i < 2 else vectors[min(capacities[i - 2], len(vectors) - 1)]
            assert plan_case(scheduler, case) == expected
            capacities.append(first_max)
            compared += 1
            differs += expected != vectors[early]
    print(f"capacity vs brute force: {compared} calls in {BRUTE_FORCE_SEQUENCES} sequences, "
          f"{differs} of them differ from early stop")
    assert compared == 4 * BRUTE_FORCE_SEQUENCES and differs >= 50


@pytest.mark.parametrize("mode", ["early_stop", "capacity"])
def test_admitted_drafts_are_prefixes_and_the_best_ones(mode):
    # Unsorted rows (read with a running minimum), random emitting sets, prefill and caps:
    # the admitted drafts are the top sum(L) emitting drafts and a prefix of every request.
    gen = random.Random(13)
    for _ in range(60):
        batch, max_draft = gen.randint(1, 8), gen.randint(1, 6)
        survival = torch.tensor([[gen.uniform(0.0, 1.0) for _ in range(max_draft)] for _ in range(batch)])
        emitting = torch.tensor([gen.random() < 0.7 for _ in range(batch)])
        base = int(emitting.sum()) + gen.randint(0, 20)
        cost = random_cost(gen)
        scheduler = LoadAwareScheduler(cost, max_draft, mode)
        for _ in range(3):
            cap = gen.choice([None, base + gen.randint(0, batch * max_draft)])
            lengths = scheduler.plan(survival, base, emitting, cap).tolist()
            read = torch.cummin(survival, dim=1).values.tolist()
            admitted = [read[b][k] for b in range(batch) for k in range(lengths[b])]
            rest = [read[b][k] for b in range(batch) for k in range(lengths[b], max_draft) if emitting[b]]
            assert all(lengths[b] == 0 for b in range(batch) if not emitting[b])
            assert not admitted or not rest or min(admitted) >= max(rest)
            assert cap is None or base + sum(lengths) <= cap


@pytest.mark.parametrize("mode", ["early_stop", "capacity", "fixed"])
def test_non_emitting_requests_get_nothing(mode):
    # Flat cost: every emitting draft is admitted, no non-emitting one even with survival 1.
    cost = CostProfile([1, 4096], [0.02, 0.02], draft_requests=[1], draft_seconds=[0.01])
    survival = torch.tensor([[1.0, 1.0, 1.0], [0.5, 0.4, 0.3], [1.0, 1.0, 1.0], [0.9, 0.1, 0.0]])
    emitting = torch.tensor([False, True, False, True])
    scheduler = LoadAwareScheduler(cost, 3, mode, fixed_len=3)
    for _ in range(3):
        assert scheduler.plan(survival, 40, emitting).tolist() == [0, 3, 0, 2 if mode != "fixed" else 3]
    assert scheduler.plan(survival, 40, torch.zeros(4, dtype=torch.bool)).tolist() == [0, 0, 0, 0]


def test_plan_validates_engine_arguments():
    scheduler = LoadAwareScheduler(AFFINE, 3)
    survival = torch.rand(2, 3)
    with pytest.raises(ValueError, match="emitting"):
        scheduler.plan(survival, emitting=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="emitting"):
        scheduler.plan(survival, emitting=torch.ones(2))
    with pytest.raises(ValueError, match="base_tokens"):
        scheduler.plan(survival, base_tokens=torch.tensor([4]))
    with pytest.raises(ValueError, match="max_tokens"):
        scheduler.plan(survival, max_tokens=2.5)
    # a cap below the base tokens admits nothing
    assert scheduler.plan(torch.ones(2, 3), 10, None, 4).tolist() == [0, 0]


@pytest.mark.parametrize("mode", ["early_stop", "capacity", "fixed"])
def test_engine_plan_traces_as_one_graph(mode):
    # base_tokens, emitting and max_tokens as tensors: still no host read; and a record
    # into the profile reaches the compiled function once an eager call (or refresh) has
    # rewritten the tables in place.
    cost = CostProfile([1, 8, 16, 40, 80], [1.0, 1.0, 1.3, 3.0, 5.0], capture_sizes=[4, 8, 16],
                       draft_requests=[1, 8], draft_seconds=[0.2, 0.4], window=1)
    gen = random.Random(4)
    calls = [(torch.tensor(random_survival(gen, 4, 5)), torch.tensor(gen.randint(4, 30)),
              torch.tensor([gen.random() < 0.75 for _ in range(4)]), torch.tensor(gen.randint(10, 40)))
             for _ in range(4)]
    scheduler = LoadAwareScheduler(cost, 5, mode, fixed_len=2)
    scheduler.plan(*calls[0])  # warm-up: tables
    scheduler.reset()
    compiled = traced(scheduler.plan)
    eager = LoadAwareScheduler(cost, 5, mode, fixed_len=2)
    assert [compiled(*c).tolist() for c in calls] == [eager.plan(*c).tolist() for c in calls]
    cost.record([20, 30, 16], [9.0, 9.0, 6.0])
    cost.refresh("cpu")
    scheduler.reset()
    eager.reset()
    assert [compiled(*c).tolist() for c in calls] == [eager.plan(*c).tolist() for c in calls]


# --------------------------------------------------------------------------- CUDA
def _cuda_cases():
    gen = random.Random(2)
    cost = random_cost(gen)
    while cost(64) == cost(1):  # want a load-dependent cost
        cost = random_cost(gen)
    survivals = [torch.tensor(random_survival(gen, 8, 4)) for _ in range(6)]
    return cost, survivals


@cuda_test
@pytest.mark.parametrize("mode", ["early_stop", "capacity", "fixed"])
def test_plan_cuda_matches_cpu_without_sync(mode):
    cost, survivals = _cuda_cases()
    cpu = LoadAwareScheduler(cost, 4, mode, fixed_len=2)
    gpu = LoadAwareScheduler(cost, 4, mode, fixed_len=2)
    gpu.plan(survivals[0].cuda())  # warm-up: builds the cached cost table on the device
    gpu.reset()
    cost(torch.arange(1, 3, device="cuda"))  # warm-up: the profile's tables on the device
    inputs = [s.cuda() for s in survivals]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [gpu.plan(s) for s in inputs]
        costs = cost(torch.arange(1, 50, device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(o.device.type == "cuda" and o.dtype == torch.int32 for o in outs)
    assert [o.tolist() for o in outs] == [cpu.plan(s).tolist() for s in survivals]
    torch.testing.assert_close(costs.cpu(), cost(torch.arange(1, 50)))


@cuda_test
@pytest.mark.parametrize("mode", ["early_stop", "capacity", "fixed"])
def test_plan_in_cuda_graph(mode):
    cost, survivals = _cuda_cases()
    scheduler = LoadAwareScheduler(cost, 4, mode, fixed_len=3)
    static = survivals[0].cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            scheduler.plan(static)  # warm-up (cost table, capacity state)
    torch.cuda.current_stream().wait_stream(side)
    scheduler.reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = scheduler.plan(static)
    replayed = []
    for s in survivals:
        static.copy_(s)
        graph.replay()
        replayed.append(out.clone())
    torch.cuda.synchronize()
    eager = LoadAwareScheduler(cost, 4, mode, fixed_len=3)
    assert [r.tolist() for r in replayed] == [eager.plan(s).tolist() for s in survivals]


def _cuda_engine_calls(batch: int = 8, max_draft: int = 4, count: int = 6):
    gen = random.Random(6)
    cost = CostProfile([1, 16, 32, 64, 96, 160], [1.0, 1.1, 1.3, 2.0, 3.0, 5.0], capture_sizes=[8, 16, 32, 64],
                       draft_requests=[1, 8, 64], draft_seconds=[0.1, 0.2, 0.6], window=1)
    calls = [(torch.tensor(random_survival(gen, batch, max_draft)), torch.tensor(gen.randint(batch, 60)),
              torch.tensor([gen.random() < 0.75 for _ in range(batch)]), torch.tensor(gen.randint(20, 100)))
             for _ in range(count)]
    return cost, calls


@cuda_test
@pytest.mark.parametrize("mode", ["early_stop", "capacity", "fixed"])
def test_engine_plan_cuda_matches_cpu_without_sync(mode):
    cost, calls = _cuda_engine_calls()
    gpu_calls = [tuple(t.cuda() for t in call) for call in calls]
    gpu = LoadAwareScheduler(cost, 4, mode, fixed_len=2)
    gpu.plan(*gpu_calls[0])  # warm-up: the scheduler's and the profile's tables on the device
    gpu.reset()
    cost.record([40, 100], [2.5, 4.0])  # refreshed in place by the next plan, without a sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [gpu.plan(*call) for call in gpu_calls]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu = LoadAwareScheduler(cost, 4, mode, fixed_len=2)
    assert [o.tolist() for o in outs] == [cpu.plan(*call).tolist() for call in calls]


@cuda_test
@pytest.mark.parametrize("mode", ["early_stop", "capacity", "fixed"])
def test_engine_plan_in_cuda_graph(mode):
    # base_tokens, emitting and max_tokens change between replays (static tensors), and a
    # record into the profile reaches the replays after cost.refresh on the replay stream.
    cost, calls = _cuda_engine_calls()
    static = tuple(t.cuda() for t in calls[0])
    scheduler = LoadAwareScheduler(cost, 4, mode, fixed_len=3)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            scheduler.plan(*static)  # warm-up (tables, capacity state)
    torch.cuda.current_stream().wait_stream(side)
    scheduler.reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = scheduler.plan(*static)
    eager = LoadAwareScheduler(cost, 4, mode, fixed_len=3)
    for step in range(2):
        replayed = []
        for call in calls:
            for target, value in zip(static, call):
                target.copy_(value)
            graph.replay()
            replayed.append(out.clone())
        torch.cuda.synchronize()
        assert [r.tolist() for r in replayed] == [eager.plan(*call).tolist() for call in calls]
        cost.record([40, 100, 12], [2.5, 4.5, 1.4])  # then refresh before the second pass
        cost.refresh("cuda")
        scheduler.reset()
        eager.reset()
