// Argument checks of confidence shared by the CPU and CUDA launchers; metadata only.
#pragma once

#include <torch/library.h>
#include <torch/types.h>

#include <optional>

#include "args.h"

namespace dspark {

struct ConfidenceShape {
  int64_t batch;
  int64_t steps;   // K
  int64_t hidden;  // d
  int64_t rank;    // r (0 when w1 is None)
  int64_t vocab;   // Vt (0 when w1 is None)
};

inline ConfidenceShape check_confidence_args(const at::Tensor& hidden, const at::Tensor& prev_tokens,
                                             const std::optional<at::Tensor>& w1, const at::Tensor& weight,
                                             const at::Tensor& bias,
                                             const std::optional<at::Tensor>& sts_temperature) {
  TORCH_CHECK(hidden.dim() == 3, "confidence: hidden must be [B, K, d], got ", hidden.sizes());
  TORCH_CHECK(is_float_type(hidden.scalar_type()), "confidence: hidden must be float32, bfloat16 or float16, got ",
              hidden.scalar_type());
  TORCH_CHECK(hidden.is_contiguous(), "confidence: hidden must be contiguous");
  ConfidenceShape shape{hidden.size(0), hidden.size(1), hidden.size(2), 0, 0};
  const auto device = hidden.device();
  TORCH_CHECK(prev_tokens.dim() == 2 && prev_tokens.size(0) == shape.batch && prev_tokens.size(1) == shape.steps,
              "confidence: prev_tokens must be [B, K] = [", shape.batch, ", ", shape.steps, "], got ",
              prev_tokens.sizes());
  TORCH_CHECK(prev_tokens.scalar_type() == at::kLong, "confidence: prev_tokens must be int64, got ",
              prev_tokens.scalar_type());
  TORCH_CHECK(prev_tokens.device() == device, "confidence: prev_tokens must be on ", device, ", got ",
              prev_tokens.device());
  TORCH_CHECK(prev_tokens.is_contiguous(), "confidence: prev_tokens must be contiguous");
  if (w1.has_value()) {
    TORCH_CHECK(w1->dim() == 2, "confidence: w1 must be [Vt, r], got ", w1->sizes());
    TORCH_CHECK(w1->scalar_type() == hidden.scalar_type(), "confidence: w1 must have the dtype of hidden (",
                hidden.scalar_type(), "), got ", w1->scalar_type());
    TORCH_CHECK(w1->device() == device, "confidence: w1 must be on ", device, ", got ", w1->device());
    TORCH_CHECK(w1->is_contiguous(), "confidence: w1 must be contiguous");
    shape.vocab = w1->size(0);
    shape.rank = w1->size(1);
  }
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == shape.hidden + shape.rank, "confidence: weight must be [",
              shape.hidden + shape.rank, "] (d", w1.has_value() ? " + r" : "", "), got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == hidden.scalar_type(),
              "confidence: weight must be float32 or the dtype of hidden, got ", weight.scalar_type());
  TORCH_CHECK(weight.device() == device, "confidence: weight must be on ", device, ", got ", weight.device());
  TORCH_CHECK(weight.is_contiguous(), "confidence: weight must be contiguous");
  TORCH_CHECK(bias.numel() == 1 && bias.dim() <= 1, "confidence: bias must be [] or [1], got ", bias.sizes());
  TORCH_CHECK(bias.scalar_type() == weight.scalar_type(), "confidence: bias must have the dtype of weight (",
              weight.scalar_type(), "), got ", bias.scalar_type());
  TORCH_CHECK(bias.device() == device, "confidence: bias must be on ", device, ", got ", bias.device());
  if (sts_temperature.has_value()) {
    TORCH_CHECK(sts_temperature->dim() == 1 && sts_temperature->size(0) == shape.steps,
                "confidence: sts_temperature must be [K] = [", shape.steps, "], got ", sts_temperature->sizes());
    TORCH_CHECK(sts_temperature->scalar_type() == at::kFloat, "confidence: sts_temperature must be float32, got ",
                sts_temperature->scalar_type());
    TORCH_CHECK(sts_temperature->device() == device, "confidence: sts_temperature must be on ", device, ", got ",
                sts_temperature->device());
    TORCH_CHECK(sts_temperature->is_contiguous(), "confidence: sts_temperature must be contiguous");
  }
  return shape;
}

}  // namespace dspark
