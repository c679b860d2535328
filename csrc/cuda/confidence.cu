// confidence on CUDA: checks, dtype dispatch and the single launch of include/dspark/confidence.cuh.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include "../confidence_args.h"
#include "dspark/confidence.cuh"

namespace dspark {
namespace {

template <typename T, typename W>
void launch_confidence(const at::Tensor& hidden, const std::optional<at::Tensor>& w1, const at::Tensor& weight,
                       const at::Tensor& bias, const at::Tensor& prev_tokens,
                       const std::optional<at::Tensor>& sts_temperature, const ConfidenceShape& shape,
                       at::Tensor& conf, at::Tensor& survival) {
  ConfidenceParams<W> params;
  params.prev_tokens = prev_tokens.data_ptr<int64_t>();
  params.weight = reinterpret_cast<const W*>(weight.data_ptr());
  params.bias = reinterpret_cast<const W*>(bias.data_ptr());
  params.sts_temperature = sts_temperature.has_value() ? sts_temperature->data_ptr<float>() : nullptr;
  params.conf = conf.data_ptr<float>();
  params.survival = survival.data_ptr<float>();
  params.steps = shape.steps;
  params.hidden = shape.hidden;
  params.rank = shape.rank;
  params.vocab = shape.vocab;
  const T* w1_ptr = w1.has_value() ? reinterpret_cast<const T*>(w1->data_ptr()) : nullptr;
  confidence_kernel<T, W><<<static_cast<unsigned>(shape.batch), kConfidenceThreads, 0,
                            c10::cuda::getCurrentCUDAStream()>>>(reinterpret_cast<const T*>(hidden.data_ptr()),
                                                                 w1_ptr, params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void dispatch_weight(const at::Tensor& hidden, const std::optional<at::Tensor>& w1, const at::Tensor& weight,
                     const at::Tensor& bias, const at::Tensor& prev_tokens,
                     const std::optional<at::Tensor>& sts_temperature, const ConfidenceShape& shape,
                     at::Tensor& conf, at::Tensor& survival) {
  if (weight.scalar_type() == at::kFloat)
    launch_confidence<T, float>(hidden, w1, weight, bias, prev_tokens, sts_temperature, shape, conf, survival);
  else
    launch_confidence<T, T>(hidden, w1, weight, bias, prev_tokens, sts_temperature, shape, conf, survival);
}

std::tuple<at::Tensor, at::Tensor> confidence_cuda(const at::Tensor& hidden, const at::Tensor& prev_tokens,
                                                   const std::optional<at::Tensor>& w1, const at::Tensor& weight,
                                                   const at::Tensor& bias,
                                                   const std::optional<at::Tensor>& sts_temperature) {
  const ConfidenceShape shape = check_confidence_args(hidden, prev_tokens, w1, weight, bias, sts_temperature);
  TORCH_CHECK(shape.batch < (int64_t{1} << 31), "confidence: batch size must be below 2^31");
  const c10::cuda::CUDAGuard guard(hidden.device());
  auto conf = at::empty({shape.batch, shape.steps}, hidden.options().dtype(at::kFloat));
  auto survival = at::empty_like(conf);
  if (shape.batch == 0 || shape.steps == 0) return {conf, survival};
  switch (hidden.scalar_type()) {
    case at::kFloat:
      dispatch_weight<float>(hidden, w1, weight, bias, prev_tokens, sts_temperature, shape, conf, survival);
      break;
    case at::kBFloat16:
      dispatch_weight<__nv_bfloat16>(hidden, w1, weight, bias, prev_tokens, sts_temperature, shape, conf, survival);
      break;
    case at::kHalf:
      dispatch_weight<__half>(hidden, w1, weight, bias, prev_tokens, sts_temperature, shape, conf, survival);
      break;
    default:
      TORCH_CHECK(false, "confidence: unsupported hidden dtype ", hidden.scalar_type());
  }
  return {conf, survival};
}

}  // namespace

TORCH_LIBRARY_IMPL(dspark, CUDA, m) { m.impl("confidence", &confidence_cuda); }

}  // namespace dspark
