"""One vLLM engine run for test_vllm_engine.py (a separate process per configuration, since
vLLM loads its plugins once per process): ``python vllm_run.py MODEL_DIR OUT_JSON``.

Runs, on the tiny local Llama in MODEL_DIR with n-gram speculative decoding:
greedy requests, many seeded sampling requests, one seeded request twice, and (when the
dspark plugin is on) one request with logprobs, which must fall back to vLLM's sampler.
Writes the generated token ids and timings to OUT_JSON.
"""

import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: quicker start on 2 cores
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

GREEDY_PROMPTS = [
    [1, 5, 6, 7, 5, 6, 7, 5, 6],
    [1, 9, 9, 9, 9],
    [1, 10, 11, 12, 13, 10, 11, 12],
    [1, 20, 21, 20, 21, 20],
    [1, 30, 31, 32, 33, 34, 35],
    [1, 40, 41, 42, 40, 41, 43, 40, 41],
]
SAMPLING_PROMPT = [1, 5, 6, 7, 5, 6, 7, 5, 6]
SAMPLING_RUNS = 600
SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


def main(model_dir: str, out_path: str) -> None:
    start = time.time()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model_dir, skip_tokenizer_init=True, dtype="float32", max_model_len=256, enforce_eager=True,
              seed=0, speculative_config=SPEC, max_num_seqs=128)
    started = time.time() - start

    def run(prompts, params):
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    result = {"engine_start_s": started}
    result["greedy"] = run(GREEDY_PROMPTS, SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True))
    # Unseeded requests: the engine's seed=0 makes the run repeatable.
    sampling = SamplingParams(temperature=1.0, max_tokens=5, ignore_eos=True)
    result["sampling"] = run([SAMPLING_PROMPT] * SAMPLING_RUNS, sampling)
    seeded = SamplingParams(temperature=0.8, max_tokens=24, ignore_eos=True, seed=77)
    result["seeded"] = [run(GREEDY_PROMPTS[:3], seeded), run(GREEDY_PROMPTS[:3], seeded)]
    if os.environ.get("DSPARK_VLLM_VERIFY") == "1":
        # (vLLM 0.32's own CPU rejection sampler fails with top-k during speculative decoding,
        # so this case runs with the plugin only.)
        filtered = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, max_tokens=24, ignore_eos=True, seed=78)
        result["seeded_filtered"] = [run(GREEDY_PROMPTS[:3], filtered), run(GREEDY_PROMPTS[:3], filtered)]
        result["logprobs"] = run(GREEDY_PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                                                                   logprobs=1))
    result["total_s"] = time.time() - start
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
