"""Small verify and markov_draft workload for compute-sanitizer (memcheck, racecheck);
bench/gpu_check.sh runs it as
    compute-sanitizer --tool memcheck python bench/sanitize_verify.py

Every case builds its inputs on the host and copies them to the device, so that
nearly all the device code the sanitizer watches is dspark's. Cases: draft logits given
or None, top-k/top-p (per-request mixes, including "off"), greedy and mixed
temperatures, a ragged layout with num_draft = 0, odd vocabularies (rows not 16-byte
aligned), a row view that starts one element in, NaN/inf logits, one V = 151936 case, and
out-of-range arguments (which the CUDA kernel must flag with num_accepted = -1 without
touching memory out of bounds). Each result is compared with dspark_ext.reference.verify
on the CPU. markov_draft cases: full mode on tensor cores (r = 256, bf16, odd Vd), the
SIMT path (fp32 weights, r = 48), candidate mode, d2t, and an out-of-range anchor and d2t
entries (-1 tokens, nothing read out of bounds); tokens are compared with
reference.markov_draft (agreement printed; the CUDA GEMM may round differently). A
difference is printed as MISMATCH (exit status 1 only with --strict: the
tests, not this script, judge correctness). The last line is "SANITIZE DONE" when every
case ran.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dspark_ext  # noqa: E402,F401  (registers torch.ops.dspark)
from dspark_ext import reference  # noqa: E402
from dspark_ext.ops import padded_target_offset, ragged_target_offset  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(batch, max_draft, vocab, dtype, *, draft_logits=True, num_draft=None, temperature=1.0, top_k=None,
          top_p=None, ragged=False, seed=0, poison=False):
    """Host-side verify arguments (CPU tensors)."""
    gen = torch.Generator().manual_seed(seed)
    num_draft = torch.full((batch,), max_draft, dtype=torch.int32) if num_draft is None else \
        torch.tensor(num_draft, dtype=torch.int32)
    padded = 3 * torch.randn(batch, max_draft + 1, vocab, generator=gen)
    draft = (padded[:, :max_draft] + 0.5 * torch.randn(batch, max_draft, vocab, generator=gen)).to(dtype)
    race = -torch.log(torch.empty(batch, max_draft, vocab).exponential_(generator=gen))
    tokens = (draft.float() + race).argmax(dim=-1)  # drafts drawn from the draft logits: many accepted
    if ragged:
        offsets = ragged_target_offset(num_draft)
        target = torch.cat([padded[b, :int(num_draft[b]) + 1] for b in range(batch)]).to(dtype)
    else:
        offsets = padded_target_offset(batch, max_draft)
        target = padded.reshape(-1, vocab).to(dtype)
    rows = target.shape[0]
    if poison:  # NaN and inf in the logits (NaN counts as -inf, +inf as the largest float)
        target[0, 1] = float("nan")
        target[-1, :] = float("-inf")
        target[min(1, rows - 1), 2] = float("inf")
        draft[0, 0, 3] = float("nan")
    temp = torch.as_tensor(temperature, dtype=torch.float32).expand(batch).contiguous()
    top_k = None if top_k is None else torch.as_tensor(top_k, dtype=torch.int32).expand(batch).contiguous()
    top_p = None if top_p is None else torch.as_tensor(top_p, dtype=torch.float32).expand(batch).contiguous()
    return [target, offsets, tokens, draft if draft_logits else None, num_draft, temp,
            torch.arange(batch, dtype=torch.int64) * 7919 + seed, torch.full((batch,), 3, dtype=torch.int64),
            top_k, top_p]


def to_device(args, device):
    return [None if a is None else a.to(device) for a in args]


def cases(large: bool):
    """(name, host arguments, expect_invalid) for every case."""
    yield "fp32 plain V=1000", build(4, 3, 1000, torch.float32), False
    yield "bf16 draft_logits=None V=1000", build(4, 3, 1000, torch.bfloat16, draft_logits=False), False
    yield "bf16 top-k/top-p mix V=1001", build(4, 3, 1001, torch.bfloat16, top_k=[0, 5, 50, 5000],
                                                top_p=[1.0, 0.5, 0.9, 0.99]), False
    yield "fp16 top-p only V=1003", build(3, 4, 1003, torch.float16, top_p=[0.8, 1.0, 0.3]), False
    yield "fp32 top-k only, no drafts logits V=999", build(3, 2, 999, torch.float32, draft_logits=False,
                                                           top_k=[1, 7, 0]), False
    yield "greedy and mixed temperatures V=1000", build(4, 3, 1000, torch.bfloat16,
                                                        temperature=[0.0, 0.7, 1.3, 0.0]), False
    yield "ragged num_draft [0,3,1,2] fp16 V=1002", build(4, 3, 1002, torch.float16, num_draft=[0, 3, 1, 2],
                                                          ragged=True), False
    yield "ragged greedy top-k/top-p V=1000", build(3, 4, 1000, torch.float32, num_draft=[2, 0, 4], ragged=True,
                                                    temperature=[0.0, 1.0, 0.5], top_k=[3, 0, 20],
                                                    top_p=[0.9, 0.5, 1.0]), False
    yield "NaN/inf logits bf16 V=1000", build(3, 3, 1000, torch.bfloat16, poison=True, top_p=[0.9, 1.0, 0.5]), False
    yield "batch 1 K=1 V=7", build(1, 1, 7, torch.float32), False
    # Rows that start one element past an aligned address (a view into a larger tensor).
    shifted = build(2, 3, 1000, torch.bfloat16)
    storage = torch.empty(shifted[0].numel() + 1, dtype=torch.bfloat16)
    storage[1:] = shifted[0].reshape(-1)
    shifted[0] = storage[1:].view(shifted[0].shape)
    yield "misaligned row view bf16 V=1000", shifted, False
    # Out-of-range arguments: num_draft > K, a draft id >= V, rows past the end.
    bad = build(4, 3, 1000, torch.float32)
    bad[4] = torch.tensor([3, 4, 3, 3], dtype=torch.int32)
    bad[2][2, 1] = 1000
    bad[1] = bad[1].clone()
    bad[1][3] = 4 * 4  # rows 16..19 of a 16-row tensor
    yield "out-of-range arguments (expect num_accepted = -1)", bad, True
    if large:
        yield "bf16 V=151936 top-p", build(2, 4, 151936, torch.bfloat16, top_k=[0, 64], top_p=[0.95, 0.9]), False
        yield "fp32 V=151936 plain", build(2, 4, 151936, torch.float32), False


def markov_build(batch, steps, vocab, rank, dtype, wdtype=None, target_vocab=None, seed=0):
    """Host-side markov_draft arguments: U, anchor, w1, w2, temperature, seed, offset, d2t."""
    gen = torch.Generator().manual_seed(seed)
    vt = target_vocab or vocab
    u = (2 * torch.randn(batch, steps, vocab, generator=gen)).to(dtype)
    w1 = (torch.randn(vt, rank, generator=gen) * 0.2).to(wdtype or dtype)
    w2 = torch.randn(vocab, rank, generator=gen).to(wdtype or dtype)
    temperature = torch.where(torch.arange(batch) % 3 == 0, 0.0, 0.9)
    d2t = None if target_vocab is None else torch.randperm(vt, generator=gen)[:vocab].contiguous()
    return [u, torch.randint(0, vt, (batch,), generator=gen), w1, w2, temperature,
            torch.randint(0, 2**62, (batch,), generator=gen), torch.arange(batch, dtype=torch.int64), d2t]


def markov_cases():
    yield "bf16 r=256 Vd=1001 B=20", markov_build(20, 4, 1001, 256, torch.bfloat16), None
    yield "fp16 r=64 Vd=4099 B=3 d2t", markov_build(3, 3, 4099, 64, torch.float16, target_vocab=5000), None
    yield "fp32 U, fp32 W r=48 (SIMT)", markov_build(5, 3, 777, 48, torch.float32), None
    yield "bf16 candidates c=16", markov_build(6, 4, 3000, 128, torch.bfloat16), 16
    bad = markov_build(4, 3, 500, 64, torch.bfloat16, target_vocab=600)
    bad[1][1] = 10**9  # anchor out of range
    bad[7][::2] = -5  # half of d2t out of range
    yield "out-of-range anchor and d2t", bad, None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-large", action="store_true", help="skip the V = 151936 cases")
    parser.add_argument("--strict", action="store_true", help="exit 1 on a mismatch with the reference")
    args = parser.parse_args()
    device = torch.device(args.device)
    failures, aborted = 0, False
    for name, host_args, expect_invalid in cases(not args.no_large):
        dev_args = to_device(host_args, device)
        try:
            out_tokens, num_accepted = torch.ops.dspark.verify(*dev_args)
            if device.type == "cuda":
                torch.cuda.synchronize()
        except RuntimeError as error:  # a clean argument error is allowed; a CUDA error is not
            message = str(error).split("\n")[0]
            if expect_invalid and "CUDA" not in message and "cuda" not in message:
                print(f"ok    {name}: raised {message}")
                continue
            print(f"ERROR {name}: {message}")
            failures += 1
            if "CUDA" in message or "cuda" in message:
                aborted = True  # the CUDA context may be unusable
                break
            continue
        out_tokens, num_accepted = out_tokens.cpu(), num_accepted.cpu()
        if expect_invalid:
            flagged = (num_accepted < 0).tolist()
            status = "ok   " if flagged[1] and flagged[2] and flagged[3] else "MISMATCH"
            print(f"{status} {name}: num_accepted = {num_accepted.tolist()}")
            failures += status != "ok   "
            continue
        ref_tokens, ref_accepted = reference.verify(*[None if a is None else a.contiguous() if a.dim() == 2 else a
                                                      for a in host_args])
        same = torch.equal(out_tokens, ref_tokens) and torch.equal(num_accepted, ref_accepted)
        print(f"{'ok   ' if same else 'MISMATCH'} {name}: num_accepted = {num_accepted.tolist()}"
              + ("" if same else f" (reference {ref_accepted.tolist()}, tokens {out_tokens.tolist()} vs "
                                 f"{ref_tokens.tolist()})"))
        failures += not same
    if not aborted:
        for name, host_args, num_candidates in markov_cases():
            try:
                tokens, _ = torch.ops.dspark.markov_draft(*to_device(host_args, device), num_candidates)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            except RuntimeError as error:
                print(f"ERROR markov {name}: {str(error).splitlines()[0]}")
                failures += 1
                aborted = "CUDA" in str(error) or "cuda" in str(error)
                if aborted:
                    break
                continue
            ref_tokens, _ = reference.markov_draft(*host_args, num_candidates=num_candidates)
            agree = float((tokens.cpu() == ref_tokens).double().mean())
            status = "ok   " if agree >= 0.9 else "MISMATCH"
            print(f"{status} markov {name}: token agreement with the reference {agree:.3f}")
            failures += status != "ok   "
    print(f"SANITIZE {'ABORTED' if aborted else 'DONE'}: {failures} case(s) with an error or a mismatch")
    return 1 if failures and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
