"""FlashInfer's pipeline (bench/flashinfer/fi_bench.cu's JSON) against dspark verify
(bench/bench_verify.py's verify_cuda.json), shape by shape.

    python bench/flashinfer/summarize.py FLASHINFER_JSON [VERIFY_JSON] [--table] [--batch 64]

Prints one line (bench/gpu_check.sh's summary of the flashinfer step): the FlashInfer
pipeline's median µs from bf16 logits at --batch for each mode, next to verify's op_us at
the same (mode, B, K, V, bf16) where VERIFY_JSON has it. --table adds a markdown table of
every shape. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def load_verify(path: str | None) -> dict:
    if not path or not os.path.exists(path):
        return {}
    with open(path) as f:
        records = json.load(f).get("records", [])
    return {(r["mode"], r["B"], r["K"], r["V"]): r["op_us"] for r in records
            if r.get("dtype") == "bf16" and r.get("layout", "padded") == "padded" and "op_us" in r}


def fmt(x) -> str:
    return "–" if x is None else f"{x:.1f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("flashinfer_json")
    parser.add_argument("verify_json", nargs="?")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args(argv)

    try:
        with open(args.flashinfer_json) as f:
            data = json.load(f)
    except (OSError, ValueError) as error:
        print(f"no FlashInfer results ({args.flashinfer_json}: {error})")
        return 1
    records = data["records"]
    ours = load_verify(args.verify_json)
    done = [r for r in records if "us" in r]
    version = data.get("info", {}).get("flashinfer_version", "?")

    parts = []
    for r in done:
        if r["B"] != args.batch:
            continue
        mine = ours.get((r["mode"], r["B"], r["K"], r["V"]))
        text = f"{r['mode']} {fmt(r['us'])}"
        if mine is not None:
            text += f" vs {fmt(mine)} ({r['us'] / mine:.2f}x)"
        parts.append(text)
    where = "vs dspark verify " if ours else "(no verify_cuda.json to compare) "
    line = (f"FlashInfer {version} pipeline {where}at B={args.batch}, µs from bf16 logits: "
            f"{', '.join(parts) or 'no measured shape'}; {len(done)}/{len(records)} shapes measured")
    errors = [r for r in records if str(r.get("skipped", "")).startswith("error")]
    if errors:
        line += f"; {len(errors)} errors, first: {errors[0]['skipped'][:120]}"
    print(line)

    if args.table:
        print()
        print(f"### FlashInfer {version} vs dspark verify (µs, median, L2 flushed; bf16 logits)")
        print()
        print("| mode | B | K | V | FlashInfer | FlashInfer from fp32 | verify | FlashInfer / verify "
              "| FlashInfer accepted |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in records:
            if "us" not in r:
                print(f"| {r['mode']} | {r['B']} | {r['K']} | {r['V']} | {r.get('skipped', '?')} | | | | |")
                continue
            mine = ours.get((r["mode"], r["B"], r["K"], r["V"]))
            ratio = "–" if mine is None else f"{r['us'] / mine:.2f}"
            print(f"| {r['mode']} | {r['B']} | {r['K']} | {r['V']} | {fmt(r['us'])} | "
                  f"{fmt(r.get('us_from_fp32'))} | {fmt(mine)} | {ratio} | {r.get('mean_accepted', 0):.2f} |")
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
