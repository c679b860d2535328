// Argument checks of verify shared by the CPU and CUDA launchers. Every message names
// the argument at fault. Only metadata is read here (no device values), so the checks
// cost no host synchronisation.
#pragma once

#include <torch/library.h>
#include <torch/types.h>

#include <optional>

#include "args.h"

namespace dspark {

struct VerifyShape {
  int64_t batch;
  int64_t max_draft;
  int64_t vocab;
  int64_t rows;
};

inline VerifyShape check_verify_args(const at::Tensor& target_logits, const at::Tensor& target_offset,
                                     const at::Tensor& draft_tokens,
                                     const std::optional<at::Tensor>& draft_logits,
                                     const at::Tensor& num_draft, const at::Tensor& temperature,
                                     const at::Tensor& seed, const at::Tensor& offset,
                                     const std::optional<at::Tensor>& top_k,
                                     const std::optional<at::Tensor>& top_p) {
  TORCH_CHECK(target_logits.dim() == 2, "verify: target_logits must be [Nt, V], got ", target_logits.sizes());
  const auto dtype = target_logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "verify: target_logits must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(target_logits.stride(1) == 1 && (target_logits.size(0) <= 1 ||
                                               target_logits.stride(0) >= target_logits.size(1)),
              "verify: target_logits must have a contiguous last dimension (vocabulary)");
  TORCH_CHECK(draft_tokens.dim() == 2, "verify: draft_tokens must be [B, K], got ", draft_tokens.sizes());
  VerifyShape shape{draft_tokens.size(0), draft_tokens.size(1), target_logits.size(1), target_logits.size(0)};
  TORCH_CHECK(shape.vocab > 0 && shape.vocab < (int64_t{1} << 31),
              "verify: target_logits vocabulary size must be in [1, 2^31), got ", shape.vocab);
  TORCH_CHECK(shape.max_draft < (int64_t{1} << 24), "verify: draft_tokens K must be below 2^24");
  const auto device = target_logits.device();
  TORCH_CHECK(draft_tokens.scalar_type() == at::kLong, "verify: draft_tokens must be int64, got ",
              draft_tokens.scalar_type());
  TORCH_CHECK(draft_tokens.device() == device, "verify: draft_tokens must be on ", device,
              " like target_logits, got ", draft_tokens.device());
  TORCH_CHECK(draft_tokens.is_contiguous(), "verify: draft_tokens must be contiguous");
  if (draft_logits.has_value()) {
    const auto& d = *draft_logits;
    TORCH_CHECK(d.dim() == 3 && d.size(0) == shape.batch && d.size(1) == shape.max_draft &&
                    d.size(2) == shape.vocab,
                "verify: draft_logits must be [B, K, V] = [", shape.batch, ", ", shape.max_draft, ", ",
                shape.vocab, "], got ", d.sizes());
    TORCH_CHECK(d.scalar_type() == dtype, "verify: draft_logits must have the dtype of target_logits (",
                dtype, "), got ", d.scalar_type());
    TORCH_CHECK(d.device() == device, "verify: draft_logits must be on ", device, ", got ", d.device());
    TORCH_CHECK(d.is_contiguous(), "verify: draft_logits must be contiguous");
  }
  check_vector("verify", target_offset, "target_offset", shape.batch, at::kLong, device, "target_logits");
  check_vector("verify", num_draft, "num_draft", shape.batch, at::kInt, device, "target_logits");
  check_vector("verify", temperature, "temperature", shape.batch, at::kFloat, device, "target_logits");
  check_vector("verify", seed, "seed", shape.batch, at::kLong, device, "target_logits");
  check_vector("verify", offset, "offset", shape.batch, at::kLong, device, "target_logits");
  if (top_k.has_value()) check_vector("verify", *top_k, "top_k", shape.batch, at::kInt, device, "target_logits");
  if (top_p.has_value()) check_vector("verify", *top_p, "top_p", shape.batch, at::kFloat, device, "target_logits");
  return shape;
}

}  // namespace dspark
