// Argument checks of markov_draft shared by the CPU and CUDA launchers. Every message
// names the argument at fault. Only metadata is read (no device values): no host sync.
#pragma once

#include <torch/library.h>
#include <torch/types.h>

#include <optional>

#include "args.h"

namespace dspark {

struct MarkovShape {
  int64_t batch;         // B
  int64_t steps;         // K
  int64_t draft_vocab;   // Vd
  int64_t target_vocab;  // Vt
  int64_t rank;          // r
  int64_t candidates;    // c; 0 = full vocabulary (also when num_candidates >= Vd)
};

inline MarkovShape check_markov_args(const char* op, const at::Tensor& backbone_logits, const at::Tensor& anchor,
                                     const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& temperature,
                                     const at::Tensor& seed, const at::Tensor& offset,
                                     const std::optional<at::Tensor>& d2t, std::optional<int64_t> num_candidates) {
  TORCH_CHECK(backbone_logits.dim() == 3, op, ": backbone_logits must be [B, K, Vd], got ", backbone_logits.sizes());
  TORCH_CHECK(is_float_type(backbone_logits.scalar_type()), op,
              ": backbone_logits must be float32, bfloat16 or float16, got ", backbone_logits.scalar_type());
  TORCH_CHECK(backbone_logits.is_contiguous(), op, ": backbone_logits must be contiguous");
  TORCH_CHECK(w1.dim() == 2, op, ": w1 must be [Vt, r], got ", w1.sizes());
  TORCH_CHECK(w2.dim() == 2, op, ": w2 must be [Vd, r], got ", w2.sizes());
  TORCH_CHECK(is_float_type(w1.scalar_type()), op, ": w1 must be float32, bfloat16 or float16, got ", w1.scalar_type());
  TORCH_CHECK(w2.scalar_type() == w1.scalar_type(), op, ": w2 must have the dtype of w1 (", w1.scalar_type(),
              "), got ", w2.scalar_type());
  MarkovShape shape{backbone_logits.size(0), backbone_logits.size(1), backbone_logits.size(2), w1.size(0),
                    w1.size(1), 0};
  TORCH_CHECK(w2.size(0) == shape.draft_vocab && w2.size(1) == shape.rank, op, ": w2 must be [Vd, r] = [",
              shape.draft_vocab, ", ", shape.rank, "] (Vd from backbone_logits, r from w1), got ", w2.sizes());
  TORCH_CHECK(shape.rank > 0, op, ": the rank r (w1.size(1)) must be positive");
  TORCH_CHECK(shape.target_vocab > 0, op, ": w1 must have at least one row");
  TORCH_CHECK(shape.draft_vocab > 0 && shape.draft_vocab < (int64_t{1} << 31), op,
              ": the draft vocabulary Vd must be in [1, 2^31), got ", shape.draft_vocab);
  TORCH_CHECK(shape.target_vocab < (int64_t{1} << 31), op, ": the target vocabulary Vt must be below 2^31");
  TORCH_CHECK(shape.steps < (int64_t{1} << 24), op, ": K must be below 2^24 (the Philox position field)");
  TORCH_CHECK(w2.is_contiguous(), op, ": w2 must be contiguous ([Vd, r] row major)");
  TORCH_CHECK(w1.is_contiguous(), op, ": w1 must be contiguous ([Vt, r] row major)");
  const auto device = backbone_logits.device();
  TORCH_CHECK(w1.device() == device, op, ": w1 must be on ", device, " like backbone_logits, got ", w1.device());
  TORCH_CHECK(w2.device() == device, op, ": w2 must be on ", device, " like backbone_logits, got ", w2.device());
  check_vector(op, anchor, "anchor", shape.batch, at::kLong, device, "backbone_logits");
  check_vector(op, temperature, "temperature", shape.batch, at::kFloat, device, "backbone_logits");
  check_vector(op, seed, "seed", shape.batch, at::kLong, device, "backbone_logits");
  check_vector(op, offset, "offset", shape.batch, at::kLong, device, "backbone_logits");
  if (d2t.has_value()) {
    check_vector(op, *d2t, "d2t", shape.draft_vocab, at::kLong, device, "backbone_logits");
  } else {
    TORCH_CHECK(shape.draft_vocab == shape.target_vocab, op, ": without d2t the draft vocabulary (Vd = ",
                shape.draft_vocab, ") must be the target vocabulary (Vt = w1.size(0) = ", shape.target_vocab, ")");
  }
  if (num_candidates.has_value()) {
    TORCH_CHECK(*num_candidates >= 1, op, ": num_candidates must be >= 1 (or None), got ", *num_candidates);
    shape.candidates = *num_candidates < shape.draft_vocab ? *num_candidates : 0;
  }
  return shape;
}

}  // namespace dspark
