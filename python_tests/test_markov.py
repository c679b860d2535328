"""torch.ops.dspark.markov_draft / markov_draft_: parity with the reference, the sampled
distributions, losslessness through verify, errors, NaN/Inf, invariances, opcheck,
torch.compile and CUDA graphs, in full and candidate mode.

The `device` fixture (conftest.py) runs each test on the CPU kernel, on the CUDA kernel when
a GPU is present, and on the CUDA kernel under the emulation (`make emulate`).

How parity is judged. The CPU kernel makes the reference's own GEMM call, so its tokens and
z are identical to the reference's. The CUDA kernel sums the correction on tensor cores in
another order, so its z may differ from the reference's in the last bit; each step is
therefore checked given the kernel's own history ("replay"): z_k against
round(U_k + W2 · W1[x_{k-1}]) within the rounding of U's dtype, and the token against the
spec's draw from the kernel's own z_k (reference.draft_choice), which must agree for every
greedy request and for >= 99.9 % of the sampled ones. Statistical tests use a significance
level of 1e-3 with fixed seeds.
"""

import math

import pytest
import torch

import emulation
from dspark_ext import ops, reference
from dspark_ext.stats import chi_square_p

ALPHA = 1e-3  # significance level of the chi-square tests
SAMPLING_AGREEMENT = 0.999
# |z - z_ref| <= ATOL + RTOL * |z_ref|: one unit in the last place of U's dtype, plus float32 sums.
TOLERANCE = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (1e-3, 2**-7), torch.float16: (1e-3, 2**-10)}


def make_inputs(batch=5, steps=4, vocab=300, rank=32, dtype=torch.bfloat16, wdtype=None, target_vocab=None,
                seed=0, greedy_fraction=0.3, scale=2.0, device="cpu"):
    """U, anchor, w1, w2, temperature, seed, offset, d2t (None unless target_vocab is given)."""
    gen = torch.Generator().manual_seed(seed)
    vt = target_vocab or vocab
    u = (torch.randn(batch, steps, vocab, generator=gen) * scale).to(dtype)
    anchor = torch.randint(0, vt, (batch,), generator=gen)
    w1 = (torch.randn(vt, rank, generator=gen) / math.sqrt(rank) * 2).to(wdtype or dtype)
    w2 = (torch.randn(vocab, rank, generator=gen)).to(wdtype or dtype)
    temperature = torch.rand(batch, generator=gen) * 1.5 + 0.2
    temperature[torch.rand(batch, generator=gen) < greedy_fraction] = 0.0
    seeds = torch.randint(-(2**62), 2**62, (batch,), generator=gen)
    offsets = torch.randint(0, 2**40, (batch,), generator=gen)
    d2t = None if target_vocab is None else torch.randperm(vt, generator=gen)[:vocab].contiguous()
    args = [u, anchor, w1, w2, temperature, seeds, offsets, d2t]
    return [None if a is None else a.to(device) for a in args]


def cpu(args):
    return [None if a is None or not torch.is_tensor(a) else a.cpu() for a in args]


def replay(args, tokens, z, num_candidates=None):
    """Per-step check of a kernel's output given its own history (see the module doc).

    Returns (z_ok, greedy agreement, sampled agreement, sampled count) over the live steps."""
    u, anchor, w1, w2, temperature, seeds, offsets, d2t = cpu(args)
    tokens, z = tokens.cpu(), z.cpu()
    batch, steps, vocab = u.shape
    vt = w1.shape[0]
    candidates = None if num_candidates is None else reference.select_candidates(u, num_candidates)
    atol, rtol = TOLERANCE[u.dtype]
    prev = anchor.clone()
    alive = (prev >= 0) & (prev < vt)
    greedy = ~(temperature > 0)
    agree_g, agree_s, count_g, count_s = 0, 0, 0, 0
    z_ok = True
    for k in range(steps):
        correction = (w2.float() @ w1[prev.clamp(0, vt - 1)].float().t()).t()
        expected = u[:, k].float() + torch.where(alive.unsqueeze(1), correction, torch.zeros_like(correction))
        if candidates is not None:
            expected = torch.where(candidates[:, k], expected, torch.full_like(expected, -math.inf))
        expected = expected.to(u.dtype).float()
        got = z[:, k].float()
        both_inf = torch.isinf(expected) & (expected == got)
        close = ((got - expected).abs() <= atol + rtol * expected.abs()) | both_inf
        close |= torch.isnan(expected) & torch.isnan(got)
        z_ok &= bool(close.all())
        choice = reference.draft_choice(z[:, k], temperature, seeds, offsets, k)
        mapped = choice if d2t is None else torch.where(choice >= 0, d2t[choice.clamp(min=0)], choice)
        mapped = torch.where(alive & (mapped >= 0) & (mapped < vt), mapped, torch.full_like(mapped, -1))
        same = mapped == tokens[:, k]
        agree_g += int((same & greedy).sum())
        count_g += int(greedy.sum())
        agree_s += int((same & ~greedy).sum())
        count_s += int((~greedy).sum())
        prev = tokens[:, k]  # the kernel's own history
        alive = alive & (prev >= 0)
    return z_ok, (agree_g, count_g), (agree_s, count_s)


def assert_replay(args, tokens, z, num_candidates=None, exact=False):
    z_ok, (ag, ng), (as_, ns) = replay(args, tokens, z, num_candidates)
    assert z_ok, "z differs from round(U + W2 . W1[previous token]) beyond the dtype's rounding"
    assert ag == ng, f"greedy tokens differ from the argmax of the kernel's z: {ng - ag} of {ng}"
    if exact:
        assert as_ == ns, f"sampled tokens differ from the spec's draw: {ns - as_} of {ns}"
    else:
        assert as_ >= SAMPLING_AGREEMENT * ns, f"sampled tokens differ from the spec's draw: {ns - as_} of {ns}"


# (batch, steps, vocab, rank, dtype, wdtype, target_vocab, num_candidates)
CASES = {
    "bf16": (6, 4, 300, 32, torch.bfloat16, None, None, None),
    "bf16-r64-B1": (1, 5, 1000, 64, torch.bfloat16, None, None, None),
    "bf16-r256-B20": (20, 3, 515, 256, torch.bfloat16, None, None, None),
    "fp16-r128": (9, 3, 640, 128, torch.float16, None, None, None),
    "fp32": (5, 3, 257, 32, torch.float32, None, None, None),
    "fp32-U-bf16-W": (5, 3, 200, 64, torch.float32, torch.bfloat16, None, None),
    "bf16-U-fp32-W": (5, 3, 200, 64, torch.bfloat16, torch.float32, None, None),
    "bf16-r48-simt": (7, 3, 333, 48, torch.bfloat16, None, None, None),
    "bf16-B1040": (1040, 2, 200, 32, torch.bfloat16, None, None, None),  # above the shared-memory leaders
    "d2t": (6, 4, 300, 32, torch.bfloat16, None, 900, None),
    "cand-8": (6, 4, 300, 32, torch.bfloat16, None, None, 8),
    "cand-1": (4, 3, 300, 32, torch.float32, None, None, 1),
    "cand-50-d2t": (5, 4, 400, 64, torch.float16, None, 700, 50),
    "cand-ge-vocab": (3, 2, 100, 32, torch.bfloat16, None, None, 100),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_parity(device, name):
    batch, steps, vocab, rank, dtype, wdtype, vt, c = CASES[name]
    args = make_inputs(batch, steps, vocab, rank, dtype, wdtype, vt, seed=hash(name) % 1000, device=device)
    tokens, z = ops.markov_draft(*args, num_candidates=c)
    assert tokens.shape == (batch, steps) and tokens.dtype == torch.int64
    assert z.shape == (batch, steps, vocab) and z.dtype == dtype
    ref_tokens, ref_z = reference.markov_draft(*cpu(args), num_candidates=c)
    if device == "cpu" and not emulation.active():
        # The CPU kernel is the reference's arithmetic: identical tokens and z.
        assert torch.equal(tokens, ref_tokens)
        assert torch.equal(z.float().nan_to_num(), ref_z.float().nan_to_num())
    else:
        assert_replay(args, tokens, z, c)
        agree = (tokens.cpu() == ref_tokens).double().mean()
        assert agree >= 0.9, f"only {agree:.3f} of the tokens match the reference"


@pytest.mark.no_emulation("statistical: 20000 requests; the replay parity tests cover the emulated kernel")
@pytest.mark.parametrize("num_candidates", [None, 5])
def test_parity_many_requests(device, num_candidates):
    """>= 99.9 % sampled agreement and every greedy token, on 2000 requests x 4 steps."""
    args = make_inputs(2000, 4, 700, 64, torch.bfloat16, seed=11, device=device)
    tokens, z = ops.markov_draft(*args, num_candidates=num_candidates)
    assert_replay(args, tokens, z, num_candidates, exact=device == "cpu")
    ref_tokens, _ = reference.markov_draft(*cpu(args), num_candidates=num_candidates)
    agree = float((tokens.cpu() == ref_tokens).double().mean())
    print(f"\n[markov parity {device} c={num_candidates}] token agreement with the reference {agree:.5f}")
    assert agree >= SAMPLING_AGREEMENT


@pytest.mark.no_emulation("statistical: 30000 requests")
@pytest.mark.parametrize("num_candidates", [None, 6])
def test_step_distributions_chi_square(device, num_candidates):
    """Each step's token, given the previous one, follows softmax(z_k / T) of the stored z
    (candidate mode: of the truncated z)."""
    n, steps, vocab, temp = 30000, 2, 12, 0.8
    gen = torch.Generator().manual_seed(5)
    u = (torch.randn(1, steps, vocab, generator=gen) * 1.5).expand(n, -1, -1).contiguous()
    w1 = torch.randn(vocab, 8, generator=gen) * 0.5
    w2 = torch.randn(vocab, 8, generator=gen)
    anchor = torch.full((n,), 3, dtype=torch.int64)
    seeds = torch.arange(n, dtype=torch.int64) * 7919 + 17
    offsets = torch.zeros(n, dtype=torch.int64)
    temperature = torch.full((n,), temp)
    args = [t.to(device) for t in (u, anchor, w1, w2, temperature, seeds, offsets)] + [None]
    tokens, z = ops.markov_draft(*args, num_candidates=num_candidates)
    tokens, z = tokens.cpu(), z.cpu()
    p_values = []
    # Step 0: every request has the same z_0.
    probs0 = torch.softmax(z[0, 0].float() / temp, dim=0)
    p_values.append(chi_square_p(torch.bincount(tokens[:, 0], minlength=vocab), probs0))
    # Step 1, given x_0 = t (z_1 depends on it): the three most frequent t.
    for t in torch.bincount(tokens[:, 0], minlength=vocab).argsort(descending=True)[:3].tolist():
        rows = (tokens[:, 0] == t).nonzero().flatten()
        probs1 = torch.softmax(z[rows[0], 1].float() / temp, dim=0)
        assert torch.equal(z[rows, 1], z[rows[0], 1].expand(len(rows), -1)), "z_1 depends only on x_0"
        p_values.append(chi_square_p(torch.bincount(tokens[rows, 1], minlength=vocab), probs1))
    if num_candidates is not None:
        assert int((z[0, 0] > -math.inf).sum()) == num_candidates
        assert bool((probs0[z[0, 0] == -math.inf] == 0).all())
    print(f"\n[markov chi-square {device} c={num_candidates}] p-values {[round(p, 4) for p in p_values]}")
    # Bonferroni over the four tests.
    assert min(p_values) > ALPHA / len(p_values), f"p-values {p_values}"


@pytest.mark.no_emulation("statistical: 40000 requests")
@pytest.mark.parametrize("num_candidates", [None, 7])
def test_lossless_through_verify(device, num_candidates):
    """Drafts from markov_draft, verified against a target with verify given markov_draft's z:
    the first emitted token follows the target's softmax (speculative sampling is lossless)."""
    n, steps, vocab, temp = 40000, 3, 10, 1.0
    gen = torch.Generator().manual_seed(8)
    u = (torch.randn(1, steps, vocab, generator=gen) * 1.5).expand(n, -1, -1).contiguous()
    w1 = torch.randn(vocab, 8, generator=gen) * 0.5
    w2 = torch.randn(vocab, 8, generator=gen)
    anchor = torch.full((n,), 2, dtype=torch.int64)
    temperature = torch.full((n,), temp)
    seeds = torch.arange(n, dtype=torch.int64) * 104729 + 3
    offsets = torch.arange(n, dtype=torch.int64)
    args = [t.to(device) for t in (u, anchor, w1, w2, temperature, seeds, offsets)] + [None]
    drafts, z = ops.markov_draft(*args, num_candidates=num_candidates)
    # A target whose first row does not depend on the drafts: the emitted first token must
    # follow softmax(target row 0 / T) exactly.
    target_rows = torch.randn(steps + 1, vocab, generator=gen) * 1.2
    target = target_rows.unsqueeze(0).expand(n, -1, -1).reshape(n * (steps + 1), vocab).to(device)
    target_offset = torch.arange(n, dtype=torch.int64, device=device) * (steps + 1)
    num_draft = torch.full((n,), steps, dtype=torch.int32, device=device)
    out, accepted = ops.verify(target, target_offset, drafts, z, num_draft, temperature.to(device),
                               seeds.to(device) + 1, offsets.to(device), None, None)
    first = out[:, 0].cpu()
    probs = torch.softmax(target_rows[0] / temp, dim=0)
    p = chi_square_p(torch.bincount(first, minlength=vocab), probs)
    rate = float(accepted.float().mean())
    print(f"\n[markov -> verify {device} c={num_candidates}] p = {p:.4f}, mean accepted {rate:.3f}")
    assert rate > 0.2, "the test needs some accepted drafts to mean anything"
    assert p > ALPHA


@pytest.mark.parametrize("num_candidates", [None, 4])
def test_determinism_and_batch_invariance(device, num_candidates):
    args = make_inputs(12, 3, 400, 64, torch.bfloat16, seed=3, device=device)
    a = ops.markov_draft(*args, num_candidates=num_candidates)
    b = ops.markov_draft(*args, num_candidates=num_candidates)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    rows = torch.tensor([7, 2, 9], device=device)
    sub = [t if t is None or t.dim() == 0 or t.shape[0] != 12 else t[rows] for t in args]
    sub[2], sub[3] = args[2], args[3]  # weights are shared
    c = ops.markov_draft(*sub, num_candidates=num_candidates)
    assert torch.equal(c[0], a[0][rows]) and torch.equal(c[1], a[1][rows])


@pytest.mark.parametrize("num_candidates", [None, 9])
def test_in_place_variant(device, num_candidates):
    args = make_inputs(4, 3, 300, 32, torch.float16, seed=4, device=device)
    tokens, z = ops.markov_draft(*args, num_candidates=num_candidates)
    u = args[0].clone()
    tokens2 = ops.markov_draft_(u, *args[1:], num_candidates=num_candidates)
    assert torch.equal(tokens, tokens2)
    assert torch.equal(u.float().nan_to_num(), z.float().nan_to_num())


def test_candidates_ge_vocab_is_full_mode(device):
    args = make_inputs(3, 3, 150, 32, torch.bfloat16, seed=6, device=device)
    full = ops.markov_draft(*args)
    for c in (150, 10**6):
        same = ops.markov_draft(*args, num_candidates=c)
        assert torch.equal(full[0], same[0]) and torch.equal(full[1], same[1])


def test_candidate_selection_ties_to_smaller_index(device):
    """Ties at the c-th value keep the smallest ids; fewer than c finite entries add -inf ones."""
    u = torch.full((2, 1, 40), -math.inf)
    u[0, 0, [3, 8, 15, 21, 30]] = 1.0  # five tied values, c = 3: ids 3, 8, 15
    u[0, 0, 35] = 2.0
    u[1, 0, [5, 6]] = 0.5  # two finite, c = 3: plus the first -inf id (0)
    u[1, 0, 7] = float("nan")
    w1 = torch.zeros(40, 4)
    w2 = torch.zeros(40, 4)
    args = [u, torch.tensor([0, 1]), w1, w2, torch.zeros(2), torch.zeros(2, dtype=torch.int64),
            torch.zeros(2, dtype=torch.int64), None]
    args = [None if a is None else a.to(device) for a in args]
    tokens, z = ops.markov_draft(*args, num_candidates=3)
    finite0 = (z[0, 0] > -math.inf).nonzero().flatten().tolist()
    assert finite0 == [3, 8, 35]
    assert (z[1, 0] > -math.inf).nonzero().flatten().tolist() == [5, 6]
    assert tokens[:, 0].tolist() == [35, 5]
    mask = reference.select_candidates(u, 3)
    assert mask[0, 0].nonzero().flatten().tolist() == [3, 8, 35]
    assert mask[1, 0].nonzero().flatten().tolist() == [0, 5, 6]


def test_greedy_hand_worked(device):
    """Vd = 4, r = 1: z_k = U_k + W2 * W1[x_{k-1}], worked out by hand."""
    u = torch.tensor([[[0.0, 1.0, 0.5, 0.0], [2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.1]]])
    w1 = torch.tensor([[0.0], [1.0], [-1.0], [2.0]])
    w2 = torch.tensor([[1.0], [0.0], [2.0], [-1.0]])
    # step 0: x_-1 = 0, W1 = 0 -> z = U_0, argmax 1. step 1: W1[1] = 1 -> z = [3, 0, 2, -1] -> 0.
    # step 2: W1[0] = 0 -> z = U_2 -> 3.
    args = [u, torch.tensor([0]), w1, w2, torch.zeros(1), torch.zeros(1, dtype=torch.int64),
            torch.zeros(1, dtype=torch.int64), None]
    tokens, z = ops.markov_draft(*[None if a is None else a.to(device) for a in args])
    assert tokens.tolist() == [[1, 0, 3]]
    assert z[0, 1].tolist() == [3.0, 0.0, 2.0, -1.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_inf_and_dead_requests(device, dtype):
    """NaN counts as -inf, +inf wins, a step with no finite entry emits -1 and the request
    stays dead (U stored uncorrected) afterwards."""
    args = make_inputs(4, 3, 200, 32, dtype, seed=9, greedy_fraction=0.0, device="cpu")
    u = args[0]
    u[0, 0, 10] = float("inf")
    u[1, 0, ::3] = float("nan")
    u[2, 0, :] = -math.inf  # dead from step 0
    u[3, 1, :] = float("nan")  # dead from step 1
    args = [None if a is None else a.to(device) for a in args]
    tokens, z = ops.markov_draft(*args)
    tokens, z = tokens.cpu(), z.cpu()
    assert tokens[0, 0] == 10
    assert tokens[2].tolist() == [-1, -1, -1] and tokens[3, 1:].tolist() == [-1, -1]
    assert torch.equal(z[2, 1:].float(), u[2, 1:].float())  # uncorrected once dead
    assert tokens[1, 0] >= 0 and tokens[1, 0] % 3 != 0
    ref_tokens, _ = reference.markov_draft(*cpu(args))
    assert torch.equal(tokens[2:], ref_tokens[2:]) and tokens[0, 0] == ref_tokens[0, 0]


def test_out_of_range_ids(device, cuda_semantics):
    """The CPU kernel raises naming the argument; the CUDA kernel emits -1 from that step on
    (reference.markov_draft's rule) and reads nothing out of bounds."""
    args = make_inputs(3, 3, 100, 32, torch.bfloat16, target_vocab=150, seed=2, device="cpu")
    args[1][1] = 150  # anchor out of range
    args[7][:] = torch.where(torch.arange(100) % 2 == 0, args[7], torch.full_like(args[7], 10**6))
    dev_args = [None if a is None else a.to(device) for a in args]
    if not cuda_semantics:
        with pytest.raises(RuntimeError, match=r"anchor\[1\] = 150"):
            ops.markov_draft(*dev_args)
        dev_args[1] = args[1].clamp(max=149).to(device)
        with pytest.raises(RuntimeError, match=r"d2t\[1\] = 1000000"):
            ops.markov_draft(*dev_args)
        return
    tokens, z = ops.markov_draft(*dev_args)
    assert tokens.cpu()[1].tolist() == [-1, -1, -1]
    assert_replay(dev_args, tokens, z)  # odd draft ids (bad d2t entries) end a request with -1


ERRORS = {
    "U-2d": (lambda a: a.__setitem__(0, a[0][:, 0]), "backbone_logits must be"),
    "U-int": (lambda a: a.__setitem__(0, a[0].to(torch.int32)), "backbone_logits must be float32"),
    "U-noncontiguous": (lambda a: a.__setitem__(0, a[0].transpose(0, 1)), "backbone_logits must be contiguous"),
    "w2-shape": (lambda a: a.__setitem__(3, a[3][:-1]), "w2 must be"),
    "w2-noncontiguous": (lambda a: a.__setitem__(3, a[3].t().contiguous().t()), "w2 must be contiguous"),
    "w-dtype-mismatch": (lambda a: a.__setitem__(3, a[3].float()), "w2 must have the dtype of w1"),
    "anchor-dtype": (lambda a: a.__setitem__(1, a[1].int()), "anchor must be"),
    "anchor-shape": (lambda a: a.__setitem__(1, a[1][:-1]), "anchor must have shape"),
    "temperature-dtype": (lambda a: a.__setitem__(4, a[4].double()), "temperature must be"),
    "seed-shape": (lambda a: a.__setitem__(5, a[5][:1]), "seed must have shape"),
    "offset-dtype": (lambda a: a.__setitem__(6, a[6].float()), "offset must be"),
    "d2t-missing": (lambda a: a.__setitem__(2, a[2][:-1]), "without d2t"),
    "d2t-shape": (lambda a: a.__setitem__(7, torch.zeros(3, dtype=torch.int64, device=a[0].device)), "d2t must"),
}


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_argument_errors(device, name):
    args = make_inputs(3, 2, 50, 16, torch.bfloat16, device=device)
    mutate, message = ERRORS[name]
    mutate(args)
    with pytest.raises(RuntimeError, match=message):
        ops.markov_draft(*args)


def test_num_candidates_error(device):
    args = make_inputs(2, 2, 50, 16, torch.bfloat16, device=device)
    with pytest.raises(RuntimeError, match="num_candidates must be >= 1"):
        ops.markov_draft(*args, num_candidates=0)


def test_empty(device):
    for batch, steps in ((0, 3), (2, 0)):
        args = make_inputs(max(batch, 1), max(steps, 1), 50, 16, torch.bfloat16, device=device)
        args[0] = args[0][:batch, :steps].contiguous()
        for i in (1, 4, 5, 6):
            args[i] = args[i][:batch]
        tokens, z = ops.markov_draft(*args)
        assert tokens.shape == (batch, steps) and z.shape == (batch, steps, 50)


@pytest.mark.no_emulation("opcheck runs the op many times; test_parity covers the emulated kernel")
@pytest.mark.parametrize("num_candidates", [None, 5])
def test_opcheck(device, num_candidates):
    args = make_inputs(3, 2, 130, 32, torch.bfloat16, target_vocab=200, device=device)
    torch.library.opcheck(torch.ops.dspark.markov_draft.default, tuple(args), {"num_candidates": num_candidates})
    torch.library.opcheck(torch.ops.dspark.markov_draft_.default, (args[0].clone(), *args[1:]),
                          {"num_candidates": num_candidates})


@pytest.mark.no_emulation("torch.compile of the op; the op itself is covered by test_parity")
def test_torch_compile_fullgraph(device):
    args = make_inputs(3, 2, 130, 32, torch.bfloat16, device=device)

    @torch.compile(fullgraph=True, backend="eager" if device == "cpu" else "inductor")
    def draft(u, anchor, w1, w2, temperature, seed, offset):
        tokens, z = torch.ops.dspark.markov_draft(u * 1.0, anchor, w1, w2, temperature, seed, offset, None, 4)
        return tokens + 0, z

    tokens, z = draft(*args[:7])
    expected = ops.markov_draft(*args, num_candidates=4)
    assert torch.equal(tokens, expected[0]) and torch.equal(z, expected[1])


def test_cuda_graph_capture(cuda_device):
    args = make_inputs(8, 4, 1000, 256, torch.bfloat16, device=cuda_device)
    for c in (None, 16):
        expected = ops.markov_draft(*args, num_candidates=c)
        static_u = args[0].clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            ops.markov_draft(static_u, *args[1:], num_candidates=c)  # warm-up outside the graph
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            tokens, z = ops.markov_draft(static_u, *args[1:], num_candidates=c)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(tokens, expected[0]) and torch.equal(z, expected[1])


@pytest.mark.parametrize("shape", [(64, 7, 32000, 256), (1, 7, 151936, 256), (130, 3, 5000, 128)])
def test_cuda_large_shapes(cuda_device, shape):
    """Production-like shapes on the GPU, replayed against the spec step by step."""
    batch, steps, vocab, rank = shape
    args = make_inputs(batch, steps, vocab, rank, torch.bfloat16, seed=batch, device=cuda_device)
    for c in (None, 64):
        tokens, z = ops.markov_draft(*args, num_candidates=c)
        assert_replay(args, tokens, z, c)
