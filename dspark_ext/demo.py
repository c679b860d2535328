"""make demo: DSpark end to end on a model trained here.

    python -m dspark_ext.demo [--device cpu|cuda] [--retrain] [--out DIR]

1. Trains (first run) or loads (cached in $DSPARK_CACHE, default ~/.cache/dspark_ext):
   a byte-level BPE tokenizer and a small decoder-only target LM on the Python standard
   library's sources, then two DSpark drafters against the frozen target (one with the
   Markov head, one without: the baseline), then STS on held-out rounds.
2. Runs the whole round (backbone -> markov_draft -> confidence -> scheduler -> target
   -> verify -> commit) on held-out prompts and reports:
   * greedy: speculative output == target-only output on every prompt;
   * sampling: the first generated token over many seeds against the target's softmax
     (chi-square);
   * acceptance length with and without the Markov head (gamma = 7, same seeds);
   * calibration of survival (ECE) before and after STS;
   * tokens per unit of target cost for the load-aware scheduler and each fixed gamma,
     under the cost profile measured on this machine and under a saturated one;
   * wall-clock tokens/s, speculative vs target-only, at batch 1 and 16.
Writes demo_results.json and demo_results.png to --out (default: the working directory).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import time

import torch

from . import decode, sts
from .models import tokenizer as tok
from .models import train
from .models.drafter import DrafterConfig, DSparkDrafter
from .models.target import TargetConfig, TinyLM
from .scheduler import CostProfile, LoadAwareScheduler
from .stats import chi_square_p

CACHE_VERSION = "v2"
VOCAB = 2048
CORPUS_BYTES = 6_000_000  # the first train files (sorted) up to this many bytes
TARGET = TargetConfig(vocab_size=VOCAB, d_model=192, n_layers=4, n_heads=4, max_len=512)
TARGET_PLAN = train.TargetTraining(steps=800, batch=16, seq_len=128, lr=2e-3, warmup=40)
BLOCK = 7


def drafter_config(markov: bool) -> DrafterConfig:
    return DrafterConfig(vocab_size=VOCAB, target_d_model=TARGET.d_model, context_layers=(1, 3), d_model=192,
                         n_layers=1, n_heads=4, block=BLOCK, rank=64, markov=markov)


DRAFTER_PLAN = train.DrafterTraining(steps=600, sequences=8, seq_len=96, anchors=12, lr=2e-3, warmup=20)


# ---------------------------------------------------------------------------- training / cache
def prepare(device, retrain: bool, log, quick: bool = False) -> dict:
    global CORPUS_BYTES, TARGET_PLAN, DRAFTER_PLAN
    if quick:  # a smoke run of the pipeline: tiny corpus and training, results meaningless
        CORPUS_BYTES = 300_000
        TARGET_PLAN = dataclasses.replace(TARGET_PLAN, steps=30, batch=4)
        DRAFTER_PLAN = dataclasses.replace(DRAFTER_PLAN, steps=10, sequences=2)
    root = os.path.join(train.cache_dir(), CACHE_VERSION + ("-quick" if quick else ""))
    os.makedirs(root, exist_ok=True)
    timings = {}
    began = time.time()
    tok_path = os.path.join(root, "tokenizer.json")
    train_files, held_files = tok.stdlib_files()
    if retrain or not os.path.exists(tok_path):
        chosen, total = [], 0
        for path in train_files:
            if total >= CORPUS_BYTES:
                break
            chosen.append(path)
            total += os.path.getsize(path)
        log(f"training the tokenizer (BPE, {VOCAB} tokens) on {len(chosen)} stdlib files, {total / 1e6:.1f} MB")
        tokenizer = tok.train_tokenizer(chosen, VOCAB)
        tokenizer.save(tok_path)
        ids = train.encode_files(tokenizer, chosen)
        held = train.encode_files(tokenizer, held_files)
        torch.save({"train": ids, "held_out": held}, os.path.join(root, "ids.pt"))
    tokenizer = tok.load_tokenizer(tok_path)
    data = torch.load(os.path.join(root, "ids.pt"))
    timings["tokenizer_s"] = round(time.time() - began, 1)
    log(f"corpus: {data['train'].numel()} train tokens, {data['held_out'].numel()} held-out tokens")

    began = time.time()
    target_path = os.path.join(root, "target")
    if retrain or not os.path.exists(target_path + ".safetensors"):
        log(f"training the target ({TARGET.n_layers} layers, d = {TARGET.d_model}, {TARGET_PLAN.steps} steps)")
        target, info = train.train_target(TARGET, data["train"], TARGET_PLAN, device)
        info["held_out_loss"] = train.evaluate_target(target, data["held_out"])
        train.save_model(target, TARGET, target_path, training=info)
    target, target_meta = train.load_model(TinyLM, TargetConfig, target_path, device)
    timings["target_s"] = round(time.time() - began, 1)

    drafters = {}
    for markov in (True, False):
        began = time.time()
        name = "drafter_markov" if markov else "drafter_no_markov"
        path = os.path.join(root, name)
        if retrain or not os.path.exists(path + ".safetensors"):
            log(f"training the {'Markov' if markov else 'no-Markov'} drafter ({DRAFTER_PLAN.steps} steps)")
            drafter, info = train.train_drafter(target, drafter_config(markov), data["train"], DRAFTER_PLAN, device,
                                                desc=name)
            train.save_model(drafter, drafter.config, path, training=info)
        drafters[markov], _ = train.load_model(DSparkDrafter, DrafterConfig, path, device)
        timings[f"{name}_s"] = round(time.time() - began, 1)
    return {"tokenizer": tokenizer, "data": data, "target": target, "target_meta": target_meta,
            "drafters": drafters, "timings": timings, "root": root}


def held_out_prompts(ids: torch.Tensor, count: int, length: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length, (count,), generator=generator).tolist()
    return [ids[s:s + length].tolist() for s in starts]


# ---------------------------------------------------------------------------- measurements
def tokens_per_cost(result: decode.GenerationResult, profile: CostProfile) -> float:
    cost = sum(float(profile(n)) for n in result.round_tokens)
    return result.generated / cost


def measure_cost_profile(target, device, log) -> CostProfile:
    """Target step time against tokens scored, 16 requests sharing them (this machine)."""
    counts = [16, 32, 48, 64, 80, 96, 112, 128]

    @torch.no_grad()
    def step(n):
        cache = target.new_cache(16, device, max_len=64)
        cache.lengths[:] = 32  # a context as in the demo's rounds
        per = (n + 15) // 16
        target(torch.zeros(16, per, dtype=torch.int64, device=device), torch.full((16,), per, device=device), cache)

    profile = CostProfile.measure(step, counts, repeats=5, warmup=1, device=device)
    log("cost profile (this machine): " + ", ".join(f"{n}: {1e3 * float(profile(n)):.1f} ms" for n in counts))
    return profile


def run(args) -> dict:
    device = torch.device(args.device)
    log = print
    total_began = time.time()
    prep = prepare(device, args.retrain, log, args.quick)
    target, drafters, data = prep["target"], prep["drafters"], prep["data"]
    held = data["held_out"]
    results: dict = {"device": str(device), "timings": prep["timings"],
                     "target": {"config": dataclasses.asdict(TARGET), **prep["target_meta"].get("training", {})}}

    # STS: rounds of the Markov drafter on held-out prompts (gamma = 7, T = 1), half to fit,
    # half to evaluate.
    prompts = held_out_prompts(held, 48, 48, seed=1)
    record: list = []
    with_markov = decode.speculative_generate(target, drafters[True], prompts, 64, temperature=1.0, seed=7,
                                              record=record)
    without = decode.speculative_generate(target, drafters[False], prompts, 64, temperature=1.0, seed=7)
    logits = torch.cat([r["conf_logits"] for r in record])
    num_draft = torch.cat([r["num_draft"] for r in record]).to(torch.int64)
    accepted = torch.cat([r["accepted"] for r in record]).to(torch.int64)
    half = logits.shape[0] // 2
    temps = sts.fit_sts(logits[:half], accepted[:half], num_verified=num_draft[:half])
    results["sts_temperatures"] = [round(float(t), 4) for t in temps]
    eval_rounds = dict(conf_logits=logits[half:], accepted_len=accepted[half:], num_verified=num_draft[half:])
    results["sts_ece_before"] = float(sts.survival_ece(**eval_rounds))
    results["sts_ece_after"] = float(sts.survival_ece(**eval_rounds, temperatures=temps))
    for name, res in (("markov", with_markov), ("no_markov", without)):
        results[f"acceptance_length_{name}"] = res.drafts_accepted / max(1, res.verified_by_position[0])
        results.setdefault("acceptance_by_position", {})[name] = [
            a / max(1, v) for a, v in zip(res.accepted_by_position, res.verified_by_position)]

    # Greedy identity on held-out prompts. Both runs use a float64 copy of the models: in
    # float32 a logit of the target depends in its last bits on how many tokens a forward
    # scores, which can flip a near-tied argmax in either loop (a property of the model's
    # arithmetic, not of speculative decoding).
    greedy_prompts = held_out_prompts(held, 12, 32, seed=2)
    target64, drafter64 = copy.deepcopy(target).double(), copy.deepcopy(drafters[True]).double()
    spec = decode.speculative_generate(target64, drafter64, greedy_prompts, 48, temperature=0.0,
                                       sts_temperature=temps)
    plain = decode.target_generate(target64, greedy_prompts, 48, temperature=0.0)
    results["greedy_identical"] = spec.tokens == plain.tokens
    results["greedy_tokens_compared"] = sum(len(t) for t in plain.tokens)
    greedy_sample = spec.tokens[0]

    # Sampling: first token of one prompt over many seeds against the target's softmax.
    n = args.chi2_samples
    prompt = held_out_prompts(held, 1, 24, seed=3)[0]
    first = decode.speculative_generate(target, drafters[True], [prompt] * n, 1, temperature=1.0,
                                        seed=list(range(n)), sts_temperature=temps)
    with torch.no_grad():
        logits_t, _ = target(torch.tensor([prompt], device=device))
    probs = torch.softmax(logits_t[0, -1].double(), -1).cpu()
    counts = torch.bincount(torch.tensor([t[0] for t in first.tokens]), minlength=VOCAB)
    results["sampling_chi2_p"] = chi_square_p(counts, probs)
    results["sampling_chi2_samples"] = n

    # Scheduler against fixed gamma, under the measured and a saturated cost profile.
    measured = measure_cost_profile(target, device, log)
    saturated = CostProfile([1, 4096], [1.0, 4096.0], {"note": "cost proportional to tokens"})
    sched_prompts = held_out_prompts(held, 16, 32, seed=4)
    fixed = {g: decode.speculative_generate(target, drafters[True], sched_prompts, 40, temperature=1.0, seed=11,
                                            max_draft=g, sts_temperature=temps) for g in range(BLOCK + 1)}
    results["scheduler"] = {}
    for name, profile in (("measured", measured), ("saturated", saturated)):
        scheduler = LoadAwareScheduler(profile, max_draft=BLOCK)
        res = decode.speculative_generate(target, drafters[True], sched_prompts, 40, temperature=1.0, seed=11,
                                          scheduler=scheduler, sts_temperature=temps)
        results["scheduler"][name] = {
            "scheduler": tokens_per_cost(res, profile),
            "fixed": {str(g): tokens_per_cost(r, profile) for g, r in fixed.items()},
            "unit": "tokens per second of target time" if name == "measured" else "tokens per token scored",
        }

    # Wall clock, batch 1 and 16.
    for batch in (1, 16):
        wall_prompts = held_out_prompts(held, batch, 32, seed=5)
        scheduler = LoadAwareScheduler(measured, max_draft=BLOCK)
        spec = decode.speculative_generate(target, drafters[True], wall_prompts, 64, temperature=1.0, seed=3,
                                           scheduler=scheduler, sts_temperature=temps)
        plain = decode.target_generate(target, wall_prompts, 64, temperature=1.0, seed=3)
        results.setdefault("tokens_per_s_speculative", {})[f"batch_{batch}"] = spec.generated / spec.seconds
        results.setdefault("tokens_per_s_target_only", {})[f"batch_{batch}"] = plain.generated / plain.seconds
        results.setdefault("acceptance_length_wall_clock_runs", {})[f"batch_{batch}"] = spec.acceptance_length
    results["sample_text"] = prep["tokenizer"].decode(greedy_prompts[0]) + " ⟨generated:⟩ " + \
        prep["tokenizer"].decode(greedy_sample)
    results["total_s"] = round(time.time() - total_began, 1)
    return results


# ---------------------------------------------------------------------------- report
def report(results: dict) -> str:
    sched = results["scheduler"]
    lines = [
        "",
        "DSpark end to end (dspark_ext.demo)",
        f"  device {results['device']}; timings (s): {results['timings']}; total {results['total_s']} s",
        f"  target held-out loss: {results['target'].get('held_out_loss', float('nan')):.3f} nats/token",
        f"  greedy: speculative == target-only on {results['greedy_tokens_compared']} tokens: "
        f"{results['greedy_identical']}",
        f"  sampling: first token over {results['sampling_chi2_samples']} seeds vs the target's softmax: "
        f"chi-square p = {results['sampling_chi2_p']:.3f}",
        f"  acceptance length (gamma = 7, T = 1): Markov {results['acceptance_length_markov']:.3f}, "
        f"no Markov {results['acceptance_length_no_markov']:.3f} "
        f"({100 * (results['acceptance_length_markov'] / max(1e-9, results['acceptance_length_no_markov']) - 1):+.1f} %)",
        "  acceptance by position (Markov):    " + " ".join(f"{a:.2f}" for a in results["acceptance_by_position"]["markov"]),
        "  acceptance by position (no Markov): " + " ".join(f"{a:.2f}" for a in results["acceptance_by_position"]["no_markov"]),
        f"  survival ECE: {100 * results['sts_ece_before']:.2f} % before STS, {100 * results['sts_ece_after']:.2f} % after",
    ]
    for name in ("measured", "saturated"):
        s = sched[name]
        best = max(s["fixed"].items(), key=lambda kv: kv[1])
        lines.append(f"  {name} cost profile ({s['unit']}): scheduler {s['scheduler']:.4g}, best fixed gamma = "
                     f"{best[0]}: {best[1]:.4g}; fixed " + ", ".join(f"{g}: {v:.3g}" for g, v in s["fixed"].items()))
    for batch in (1, 16):
        lines.append(f"  batch {batch}: {results['tokens_per_s_speculative'][f'batch_{batch}']:.1f} tokens/s speculative "
                     f"(scheduler, measured profile), {results['tokens_per_s_target_only'][f'batch_{batch}']:.1f} "
                     f"target-only")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, style in (("markov", "o-"), ("no_markov", "s--")):
        values = results["acceptance_by_position"][name]
        axes[0].plot(range(len(values)), values, style, label=name.replace("_", " "))
    axes[0].set_xlabel("draft position k")
    axes[0].set_ylabel("acceptance rate given the earlier drafts")
    axes[0].set_title("acceptance per position (gamma = 7)")
    axes[0].legend()
    for ax, name in zip(axes[1:], ("measured", "saturated")):
        s = results["scheduler"][name]
        gammas = [int(g) for g in s["fixed"]]
        ax.plot(gammas, [s["fixed"][str(g)] for g in gammas], "o-", label="fixed gamma")
        ax.axhline(s["scheduler"], color="C3", label="load-aware scheduler")
        ax.set_xlabel("gamma (drafts verified per round)")
        ax.set_ylabel(s["unit"])
        ax.set_title(f"{name} cost profile")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--retrain", action="store_true", help="ignore the cache and train again")
    parser.add_argument("--chi2-samples", type=int, default=3000)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny training, meaningless numbers")
    parser.add_argument("--out", default=".")
    args = parser.parse_args(argv)
    if args.quick:
        args.chi2_samples = min(args.chi2_samples, 300)
    torch.manual_seed(0)
    results = run(args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "demo_results.json"), "w") as f:
        json.dump(results, f, indent=1)
    try:
        plot(results, os.path.join(args.out, "demo_results.png"))
    except Exception as error:  # noqa: BLE001  (the numbers matter more than the figure)
        print(f"demo: plot failed: {error!r}")
    print(report(results))
    print(f"\nwrote {os.path.join(args.out, 'demo_results.json')} and demo_results.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
