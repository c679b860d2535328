"""Tests of dspark_ext.sts: survival formula, ECE, offline and online Sequential Temperature
Scaling, JSON round trip.

Synthetic miscalibrated data: per round and position, a true logit z_k ~ N(1.5, 1.5^2)
gives the true conditional acceptance probability sigmoid(z_k); the head reports
l_k = s_k * z_k with s_k = 3 (overconfident) or 0.4 (underconfident). Labels are drawn
sequentially: accepted_len = the first k whose Bernoulli(sigmoid(z_k)) fails (K if none).
The ideal temperatures are therefore T_k = s_k.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from dspark_ext import reference
from dspark_ext import sts



def cuda_test(fn):
    """Marks a CUDA-only test (``-m "not cuda"`` deselects it); skips it without a GPU."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")(fn))

SCALES = [3.0, 0.4, 3.0, 0.4]


# Graph nodes that mean a device value was read on the host (or a data-dependent shape).
from host_sync import one_thread, traced  # noqa: E402,F401  (one_thread: autouse fixture)


def synthetic(n: int, scales: list[float], seed: int, mu: float = 1.5, sd: float = 1.5):
    """(reported logits [n, K] float32, accepted_len [n] int64, true survival [n, K] float64)."""
    gen = torch.Generator().manual_seed(seed)
    k = len(scales)
    z = torch.randn(n, k, generator=gen, dtype=torch.float64) * sd + mu
    p = torch.sigmoid(z)
    ok = torch.rand(n, k, generator=gen, dtype=torch.float64) < p
    accepted_len = torch.cumprod(ok.to(torch.int64), dim=1).sum(dim=1)
    logits = (z * torch.tensor(scales, dtype=torch.float64)).float()
    return logits, accepted_len, torch.cumprod(p, dim=1)


def labels_of(accepted_len: torch.Tensor, k: int) -> torch.Tensor:
    return accepted_len.unsqueeze(1) > torch.arange(k).unsqueeze(0)


def position_ece(logits, accepted_len, temperatures=None) -> list[float]:
    survival = sts.survival_from_logits(logits, temperatures)
    labels = labels_of(accepted_len, logits.shape[1])
    return [float(sts.expected_calibration_error(survival[:, k], labels[:, k])) for k in range(logits.shape[1])]


@pytest.fixture(scope="module")
def data():
    fit = synthetic(20000, SCALES, seed=1)
    held_out = synthetic(50000, SCALES, seed=2)
    return fit, held_out


# --------------------------------------------------------------------------- survival / ECE
@pytest.mark.parametrize("with_w1", [False, True])
def test_survival_matches_reference_confidence(with_w1):
    gen = torch.Generator().manual_seed(0)
    batch, k, d, vocab, rank = 5, 6, 16, 50, 8
    hidden = torch.randn(batch, k, d, generator=gen)
    prev = torch.randint(0, vocab, (batch, k), generator=gen)
    w1 = torch.randn(vocab, rank, generator=gen) if with_w1 else None
    weight = torch.randn(d + (rank if with_w1 else 0), generator=gen) * 0.5
    bias = torch.tensor([0.3])
    temps = torch.tensor([0.5, 1.0, 2.0, 3.0, 0.25, 1.5])
    conf, survival = reference.confidence(hidden, prev, w1, weight, bias, temps)
    features = hidden if w1 is None else torch.cat([hidden, w1[prev]], dim=-1)
    logits = features @ weight + bias
    torch.testing.assert_close(sts.survival_from_logits(logits, temps), survival, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sts.survival_from_logits(logits, None),
                               reference.confidence(hidden, prev, w1, weight, bias, None)[1], rtol=1e-6, atol=1e-7)


def test_survival_nan_counts_as_minus_inf():
    logits = torch.tensor([[2.0, float("nan"), 1.0]])
    out = sts.survival_from_logits(logits)
    assert out[0, 0] == pytest.approx(1 / (1 + math.exp(-2.0)))
    assert out[0, 1] == 0.0 and out[0, 2] == 0.0


def test_ece_hand_worked():
    # 15 bins of width 1/15: 0.1 -> bin 1, 0.9 -> bin 13, 0.95 -> bin 14, 1.0 -> bin 14 (last, closed).
    # bin 1: |0.1 + 0.1 - (0 + 1)| = 0.8; bin 13: |0.9 - 1| = 0.1; bin 14: |0.95 + 1.0 - 2| = 0.05.
    prob = torch.tensor([0.1, 0.1, 0.9, 0.95, 1.0])
    label = torch.tensor([0, 1, 1, 1, 1])
    assert float(sts.expected_calibration_error(prob, label)) == pytest.approx(0.95 / 5, abs=1e-6)
    # 2 bins: [0, .5): |0.2 - 1| = 0.8; [.5, 1]: |2.85 - 3| = 0.15
    assert float(sts.expected_calibration_error(prob, label, num_bins=2)) == pytest.approx(0.95 / 5, abs=1e-6)
    # one bin is |mean p - mean y|
    assert float(sts.expected_calibration_error(prob, label, num_bins=1)) == pytest.approx(abs(3.05 - 4) / 5)


def test_ece_batched_and_weighted():
    gen = torch.Generator().manual_seed(3)
    prob = torch.rand(7, 300, generator=gen)
    label = torch.rand(300, generator=gen) < 0.6
    batched = sts.expected_calibration_error(prob, label)
    assert batched.shape == (7,) and batched.dtype == torch.float64
    for g in range(7):
        assert float(batched[g]) == pytest.approx(float(sts.expected_calibration_error(prob[g], label)), abs=1e-12)
    mask = torch.rand(300, generator=gen) < 0.5
    weighted = sts.expected_calibration_error(prob[0], label, weight=mask)
    subset = sts.expected_calibration_error(prob[0][mask], label[mask])
    assert float(weighted) == pytest.approx(float(subset), abs=1e-12)


def test_survival_ece_pools_known_positions():
    """survival_ece = the ECE of all (round, position) survivals against accepted_len > k,
    censored positions (k >= num_verified) left out."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(200, 5, generator=gen)
    accepted = torch.randint(0, 6, (200,), generator=gen)
    verified = torch.randint(0, 6, (200,), generator=gen)
    temps = torch.tensor([0.5, 1.0, 2.0, 1.5, 0.8])
    survival = torch.cumprod(torch.sigmoid(logits / temps), dim=1)
    k = torch.arange(5)
    labels = accepted.unsqueeze(1) > k
    known = k < verified.unsqueeze(1)
    expected = sts.expected_calibration_error(survival[known], labels[known])
    got = sts.survival_ece(logits, accepted, temps, verified)
    assert float(got) == pytest.approx(float(expected), abs=1e-6)
    # A censored position's logit does not matter.
    poked = logits.clone()
    poked[~known] = 50.0
    assert float(sts.survival_ece(poked, accepted, temps, verified)) == pytest.approx(float(got), abs=1e-12)
    # Without num_verified every position counts.
    everything = sts.expected_calibration_error(survival.reshape(-1), labels.reshape(-1))
    assert float(sts.survival_ece(logits, accepted, temps)) == pytest.approx(float(everything), abs=1e-6)


# --------------------------------------------------------------------------- fit_sts
def test_fit_sts_calibrates_synthetic_data(data):
    (logits, accepted_len, _), (held_logits, held_len, _) = data
    before = position_ece(held_logits, held_len)
    temps = sts.fit_sts(logits, accepted_len)
    after = position_ece(held_logits, held_len, temps)
    print(f"\nSTS held-out ECE per position before: {[f'{100 * e:.2f}%' for e in before]} "
          f"(mean {100 * sum(before) / len(before):.2f}%)")
    print(f"STS held-out ECE per position after:  {[f'{100 * e:.2f}%' for e in after]} "
          f"(mean {100 * sum(after) / len(after):.2f}%), T = {[round(t, 3) for t in temps.tolist()]}")
    assert temps.shape == (len(SCALES),) and temps.dtype == torch.float32
    assert sum(before) / len(before) > 0.05 and max(before) > 0.05
    assert max(after) < 0.02
    # the ideal temperatures are the scales
    for t, s in zip(temps.tolist(), SCALES):
        assert abs(math.log(t / s)) < math.log(1.2), (temps, SCALES)


def test_fit_sts_is_sequential_grid_argmin(data):
    # Position 1 alone, by brute force over the grid with T_0 fixed to the fitted value.
    (logits, accepted_len, _), _ = data
    logits, accepted_len = logits[:4000], accepted_len[:4000]
    grid = sts.default_grid(25)
    temps = sts.fit_sts(logits, accepted_len, grid=grid)
    labels = labels_of(accepted_len, logits.shape[1])
    scores = []
    for t in grid.tolist():
        trial = temps.clone()
        trial[1] = t
        survival = sts.survival_from_logits(logits, trial)
        scores.append(float(sts.expected_calibration_error(survival[:, 1], labels[:, 1])))
    assert float(temps[1]) == pytest.approx(grid[min(range(len(scores)), key=scores.__getitem__)].item())
    assert len(sts.default_grid()) >= 49 and float(sts.default_grid().min()) == pytest.approx(0.125)
    assert float(sts.default_grid().max()) == pytest.approx(8.0) and 1.0 in sts.default_grid().tolist()


def test_fit_sts_ties_go_to_one():
    # sigmoid(0 / T) = 1/2 for every T: every candidate has the same ECE.
    logits = torch.zeros(100, 3)
    accepted_len = torch.randint(0, 4, (100,), generator=torch.Generator().manual_seed(0))
    assert sts.fit_sts(logits, accepted_len).tolist() == [1.0, 1.0, 1.0]


def test_fit_sts_calibrated_input_keeps_t_near_one():
    logits, accepted_len, _ = synthetic(20000, [1.0, 1.0, 1.0], seed=5)
    temps = sts.fit_sts(logits, accepted_len)
    assert all(abs(math.log(t)) < math.log(1.25) for t in temps.tolist()), temps


def test_fit_sts_censoring():
    # Rounds that verified only L drafts say nothing about k >= L when all L were accepted.
    # Treating those as rejections (the naive labels) biases T; num_verified removes them.
    # L is drawn independently of the outcome, as a scheduler draws it from the features.
    logits, accepted_len, _ = synthetic(20000, SCALES, seed=7)
    held_logits, held_len, _ = synthetic(30000, SCALES, seed=8)
    verified = torch.randint(1, len(SCALES) + 1, (20000,), generator=torch.Generator().manual_seed(9))
    observed = torch.minimum(accepted_len, verified)
    masked = sts.fit_sts(logits, observed, num_verified=verified)
    naive = sts.fit_sts(logits, observed)
    ece_masked, ece_naive = position_ece(held_logits, held_len, masked), position_ece(held_logits, held_len, naive)
    # (a quarter of the rounds reach position 3, so its estimate is noisier: 2.5 %)
    assert max(ece_masked) < 0.025, ece_masked
    assert max(ece_naive) > 0.10, ece_naive
    # all verified: num_verified changes nothing
    full = torch.full((20000,), len(SCALES))
    assert torch.equal(sts.fit_sts(logits[:3000], accepted_len[:3000], num_verified=full[:3000]),
                       sts.fit_sts(logits[:3000], accepted_len[:3000]))


def test_fit_sts_rejects_bad_arguments():
    with pytest.raises(ValueError, match="conf_logits"):
        sts.fit_sts(torch.zeros(4), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="accepted_len"):
        sts.fit_sts(torch.zeros(4, 2), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="grid"):
        sts.fit_sts(torch.zeros(4, 2), torch.zeros(4, dtype=torch.int64), grid=torch.tensor([1.0, -1.0]))


# --------------------------------------------------------------------------- JSON
def test_save_load_round_trip(tmp_path):
    path = tmp_path / "sts.json"
    temps = torch.tensor([3.0314, 0.4061, 1.0, 0.4353])
    sts.save_sts(path, temps, num_bins=15, ece_before=0.07)
    record = json.loads(path.read_text())
    assert record["sts_temperatures"] == pytest.approx(temps.tolist())
    assert record["max_draft"] == 4 and record["num_bins"] == 15 and "date" in record and "torch_version" in record
    loaded = sts.load_sts(path)
    assert loaded.dtype == torch.float32 and torch.equal(loaded, temps)
    path.write_text(json.dumps({"temperatures": [1.0]}))
    with pytest.raises(ValueError, match="sts_temperatures"):
        sts.load_sts(path)
    with pytest.raises(ValueError):
        sts.save_sts(path, [1.0, 0.0])


# --------------------------------------------------------------------------- OnlineSTS
def test_online_first_update_bookkeeping():
    # Starting from empty statistics the live temperatures are all 1, so the sums of the
    # grid point T = 1 are those of the plain survival: its ECE must match the batch ECE.
    logits, accepted_len, _ = synthetic(3000, SCALES, seed=11)
    online = sts.OnlineSTS(len(SCALES), decay=0.9)
    assert online.temperatures.tolist() == [1.0] * len(SCALES)
    online.update(logits, accepted_len)
    count, sum_prob, sum_label = online.stats.unbind(0)
    torch.testing.assert_close(count.sum(-1), torch.full((len(SCALES), len(online.grid)), 3000.0))
    labels = labels_of(accepted_len, len(SCALES))
    torch.testing.assert_close(sum_label.sum(-1)[:, 0], labels.sum(0).float())
    one = online.grid.tolist().index(1.0)
    expected = torch.tensor(position_ece(logits, accepted_len), dtype=torch.float32)
    torch.testing.assert_close(online.position_ece()[:, one], expected, rtol=1e-4, atol=1e-6)
    # sum of predicted survival at T = 1
    torch.testing.assert_close(sum_prob[:, one].sum(-1), sts.survival_from_logits(logits).sum(0), rtol=1e-4, atol=1e-3)
    # decay: one more update scales the old sums by 0.9
    before = online.stats.clone()
    online.update(logits[:0], accepted_len[:0])
    torch.testing.assert_close(online.stats, before * 0.9)


def test_online_refit_matches_batch_fit(data):
    (logits, accepted_len, _), (held_logits, held_len, _) = data
    batch_temps = sts.fit_sts(logits, accepted_len)
    online = sts.OnlineSTS(len(SCALES), decay=0.99)
    persistent = online.temperatures
    gen = torch.Generator().manual_seed(4)
    for _ in range(4):  # 4 passes over the data in batches of 500 (160 updates)
        perm = torch.randperm(logits.shape[0], generator=gen)
        for start in range(0, logits.shape[0], 500):
            idx = perm[start:start + 500]
            online.update(logits[idx], accepted_len[idx])
    temps = online.refit()
    assert temps is persistent  # updated in place
    ece = position_ece(held_logits, held_len, temps)
    print(f"\nOnlineSTS T = {[round(t, 3) for t in temps.tolist()]}, batch fit T = "
          f"{[round(t, 3) for t in batch_temps.tolist()]}, held-out ECE {[f'{100 * e:.2f}%' for e in ece]}")
    # within two grid steps (ratio 2^0.2) of the batch fit
    assert torch.all(torch.log2(temps / batch_temps).abs() <= 0.2 + 1e-4), (temps, batch_temps)
    assert max(ece) < 0.02


def test_online_rejects_bad_shapes():
    online = sts.OnlineSTS(3)
    with pytest.raises(ValueError, match="conf_logits"):
        online.update(torch.zeros(2, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="accepted_len"):
        online.update(torch.zeros(2, 3), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="decay"):
        sts.OnlineSTS(3, decay=0.0)


def test_online_update_traces_as_one_graph():
    # CPU proxy for "no host synchronisation" (see traced).
    logits, accepted_len, _ = synthetic(768, SCALES, seed=12)
    online, eager = sts.OnlineSTS(len(SCALES)), sts.OnlineSTS(len(SCALES))
    verified = torch.full((256,), 3)
    compiled = traced(online.update)
    for start in range(0, 768, 256):
        compiled(logits[start:start + 256], accepted_len[start:start + 256], verified)
        eager.update(logits[start:start + 256], accepted_len[start:start + 256], verified)
    torch.testing.assert_close(online.stats, eager.stats)
    assert torch.equal(online.refit(), eager.refit())


def assert_stats_close(online, ref):
    """Position 0 does not depend on the live temperatures: same sums. Later positions may
    differ if a near-tie between grid points resolved differently; their counts may not."""
    stats = online.stats.cpu()
    torch.testing.assert_close(stats[:, 0], ref.stats[:, 0], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(stats[0].sum(-1), ref.stats[0].sum(-1), rtol=1e-5, atol=1e-3)


@cuda_test
def test_online_update_never_syncs_on_cuda():
    logits, accepted_len, _ = synthetic(4096, SCALES, seed=13)
    online = sts.OnlineSTS(len(SCALES), device="cuda")
    ref = sts.OnlineSTS(len(SCALES))
    logits_cuda, len_cuda = logits.cuda(), accepted_len.cuda()
    verified = torch.full((4096,), len(SCALES), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for start in range(0, 4096, 512):
            online.update(logits_cuda[start:start + 512], len_cuda[start:start + 512],
                          num_verified=verified[start:start + 512])
        temps = online.refit()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for start in range(0, 4096, 512):
        ref.update(logits[start:start + 512], accepted_len[start:start + 512])
    assert_stats_close(online, ref)
    # float atomics may reorder sums: allow one grid step where two candidates nearly tie
    assert torch.all(torch.log2(temps.cpu() / ref.refit()).abs() <= 0.1 + 1e-4)


@cuda_test
def test_online_update_in_cuda_graph():
    logits, accepted_len, _ = synthetic(1024, SCALES, seed=14)
    online = sts.OnlineSTS(len(SCALES), device="cuda")
    static_logits, static_len = logits[:256].cuda(), accepted_len[:256].cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        online.update(static_logits, static_len)  # warm-up
    torch.cuda.current_stream().wait_stream(side)
    online.reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        online.update(static_logits, static_len)
    ref = sts.OnlineSTS(len(SCALES))
    for start in range(0, 1024, 256):
        static_logits.copy_(logits[start:start + 256])
        static_len.copy_(accepted_len[start:start + 256])
        graph.replay()
        ref.update(logits[start:start + 256], accepted_len[start:start + 256])
    torch.cuda.synchronize()
    assert_stats_close(online, ref)
