"""torch.ops.dspark.confidence: parity with the reference, errors, NaN, opcheck, CUDA graph.

The `device` and `cuda_device` fixtures come from conftest.py (CUDA runs skip with the reason)."""

import pytest
import torch

from dspark_ext import ops, reference

# Absolute tolerance on conf/survival (probabilities) per dtype of hidden: the kernels and
# the reference both accumulate in float32, in different orders.
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}


def make_inputs(batch=6, steps=5, hidden=96, rank=16, vocab=50, dtype=torch.float32, with_w1=True,
                weight_dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, steps, hidden, generator=gen).to(dtype)
    prev = torch.randint(0, vocab, (batch, steps), generator=gen)
    w1 = (torch.randn(vocab, rank, generator=gen) * 0.5).to(dtype) if with_w1 else None
    weight = (torch.randn(hidden + (rank if with_w1 else 0), generator=gen) * 0.2).to(weight_dtype)
    bias = torch.tensor(0.3).to(weight_dtype)
    temps = torch.rand(steps, generator=gen) + 0.5
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return [move(h), move(prev), move(w1), move(weight), move(bias), move(temps)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_w1", [True, False])
@pytest.mark.parametrize("weight_dtype", ["float32", "same"])
def test_parity_with_reference(device, dtype, with_w1, weight_dtype):
    wdt = torch.float32 if weight_dtype == "float32" else dtype
    args = make_inputs(dtype=dtype, with_w1=with_w1, weight_dtype=wdt, device=device)
    conf, survival = ops.confidence(*args)
    ref_conf, ref_survival = reference.confidence(*[None if a is None else a.cpu() for a in args])
    assert conf.dtype == torch.float32 and conf.shape == (6, 5)
    torch.testing.assert_close(conf.cpu(), ref_conf, atol=ATOL[dtype], rtol=0)
    torch.testing.assert_close(survival.cpu(), ref_survival, atol=ATOL[dtype], rtol=0)


def test_formula_against_float64(device):
    """Independent check of the formula (not via reference.py), in float64."""
    h, prev, w1, weight, bias, temps = make_inputs(device=device)
    conf, survival = ops.confidence(h, prev, w1, weight, bias, temps)
    feats = torch.cat([h.double(), w1.double()[prev]], dim=-1)
    logit = (feats @ weight.double() + bias.double()) / temps.double()
    expected = 1.0 / (1.0 + torch.exp(-logit))
    torch.testing.assert_close(conf.double(), expected, atol=2e-6, rtol=0)
    expected_survival = torch.ones_like(expected[:, 0])
    for k in range(expected.shape[1]):
        expected_survival = expected_survival * expected[:, k]
        torch.testing.assert_close(survival[:, k].double(), expected_survival, atol=2e-6, rtol=0)


def test_no_sts_means_temperature_one(device):
    args = make_inputs(device=device)
    ones = torch.ones_like(args[5])
    a = ops.confidence(*args[:5], None)
    b = ops.confidence(*args[:5], ones)
    torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)


def test_batch_invariance(device):
    args = make_inputs(batch=9, device=device)
    full, _ = ops.confidence(*args)
    for b in (0, 4, 8):
        single, _ = ops.confidence(args[0][b:b + 1].contiguous(), args[1][b:b + 1].contiguous(), *args[2:])
        assert torch.equal(single[0], full[b])


def test_nan_and_inf_hidden(device):
    h, prev, w1, weight, bias, temps = make_inputs(device=device)
    h[1, 2, 0] = float("nan")
    h[2, 0, :] = 0
    h[2, 0, 0] = float("inf")
    weight[0] = 1.0  # +inf * 1 -> logit +inf -> confidence 1
    conf, survival = ops.confidence(h, prev, w1, weight, bias, temps)
    assert conf[1, 2] == 0.0, "a NaN logit gives confidence 0"
    assert torch.all(survival[1, 2:] == 0.0)
    assert conf[2, 0] == 1.0
    assert not torch.isnan(conf).any() and not torch.isnan(survival).any()


def test_errors_name_the_argument():
    h, prev, w1, weight, bias, temps = make_inputs()
    with pytest.raises(RuntimeError, match="hidden"):
        ops.confidence(h[0], prev, w1, weight, bias, temps)
    with pytest.raises(RuntimeError, match="hidden"):
        ops.confidence(h.double(), prev, w1.double(), weight, bias, temps)
    with pytest.raises(RuntimeError, match="prev_tokens"):
        ops.confidence(h, prev.int(), w1, weight, bias, temps)
    with pytest.raises(RuntimeError, match="prev_tokens"):
        ops.confidence(h, prev[:, :3], w1, weight, bias, temps)
    with pytest.raises(RuntimeError, match="w1"):
        ops.confidence(h, prev, w1.half(), weight, bias, temps)
    with pytest.raises(RuntimeError, match="weight"):
        ops.confidence(h, prev, w1, weight[:-1], bias, temps)
    with pytest.raises(RuntimeError, match="weight"):
        ops.confidence(h, prev, None, weight, bias, temps)  # [d + r] given without w1
    with pytest.raises(RuntimeError, match="bias"):
        ops.confidence(h, prev, w1, weight, torch.zeros(2), temps)
    with pytest.raises(RuntimeError, match="bias"):
        ops.confidence(h, prev, w1, weight, bias.double(), temps)
    with pytest.raises(RuntimeError, match="sts_temperature"):
        ops.confidence(h, prev, w1, weight, bias, temps[:-1])
    with pytest.raises(RuntimeError, match="sts_temperature"):
        ops.confidence(h, prev, w1, weight, bias, temps.double())
    bad = prev.clone()
    bad[3, 1] = w1.shape[0]
    with pytest.raises(RuntimeError, match=r"prev_tokens\[3, 1\]"):
        ops.confidence(h, bad, w1, weight, bias, temps)


def test_opcheck(device):
    for with_w1 in (True, False):
        args = make_inputs(with_w1=with_w1, device=device)
        torch.library.opcheck(torch.ops.dspark.confidence.default, tuple(args))
        torch.library.opcheck(torch.ops.dspark.confidence.default, tuple(args[:5]) + (None,))


def test_torch_compile_fullgraph_cpu():
    args = make_inputs()
    compiled = torch.compile(lambda *a: ops.confidence(*a), fullgraph=True, backend="eager")
    got = compiled(*args)
    want = ops.confidence(*args)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_cuda_graph_and_cpu_agreement(cuda_device):
    static = make_inputs(batch=32, steps=8, hidden=256, rank=32, dtype=torch.bfloat16, device=cuda_device)
    ops.confidence(*static)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        conf, survival = ops.confidence(*static)
    fresh = make_inputs(batch=32, steps=8, hidden=256, rank=32, dtype=torch.bfloat16, device=cuda_device, seed=5)
    for dst, src in zip(static, fresh):
        if dst is not None:
            dst.copy_(src)
    graph.replay()
    eager = ops.confidence(*fresh)
    assert torch.equal(conf, eager[0]) and torch.equal(survival, eager[1])
    cpu = ops.confidence(*[None if a is None else a.cpu() for a in fresh])
    torch.testing.assert_close(conf.cpu(), cpu[0], atol=1e-4, rtol=0)


def test_out_of_range_token(device, cuda_semantics):
    """The CPU kernel raises naming the id; a CUDA kernel (no host sync) gives NaN confidence
    there, and NaN survival from that position on."""
    args = make_inputs(device=device)
    args[1][2, 3] = -1
    if not cuda_semantics:
        with pytest.raises(RuntimeError, match=r"prev_tokens\[2, 3\]"):
            ops.confidence(*args)
        return
    conf, survival = ops.confidence(*args)
    assert torch.isnan(conf[2, 3]) and not torch.isnan(conf[0]).any() and not torch.isnan(conf[2, :3]).any()
    assert torch.isnan(survival[2, 3:]).all()
