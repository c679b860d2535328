// The device path of confidence, shared by the CUDA launcher (csrc/cuda/confidence.cu)
// and the CUDA emulation (csrc/emulate/confidence.cpp): checks, outputs, parameters, dtype
// dispatch and the single launch of include/dspark/confidence.cuh. `launch(name, kernel,
// grid, block, args...)` runs the kernel (see verify_launch.h).
#pragma once

#include "confidence_args.h"
#include "dspark/confidence.cuh"

namespace dspark {

template <typename T, typename W, typename Launch>
void launch_confidence_kernel(const at::Tensor& hidden, const std::optional<at::Tensor>& w1, const at::Tensor& weight,
                              const at::Tensor& bias, const at::Tensor& prev_tokens,
                              const std::optional<at::Tensor>& sts_temperature, const ConfidenceShape& shape,
                              at::Tensor& conf, at::Tensor& survival, Launch&& launch) {
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
  launch("confidence_kernel", confidence_kernel<T, W>, dim3(static_cast<unsigned>(shape.batch)),
         dim3(kConfidenceThreads), reinterpret_cast<const T*>(hidden.data_ptr()), w1_ptr, params);
}

template <typename T, typename Launch>
void dispatch_confidence_weight(const at::Tensor& hidden, const std::optional<at::Tensor>& w1, const at::Tensor& weight,
                                const at::Tensor& bias, const at::Tensor& prev_tokens,
                                const std::optional<at::Tensor>& sts_temperature, const ConfidenceShape& shape,
                                at::Tensor& conf, at::Tensor& survival, Launch&& launch) {
  if (weight.scalar_type() == at::kFloat)
    launch_confidence_kernel<T, float>(hidden, w1, weight, bias, prev_tokens, sts_temperature, shape, conf, survival,
                                       launch);
  else
    launch_confidence_kernel<T, T>(hidden, w1, weight, bias, prev_tokens, sts_temperature, shape, conf, survival,
                                   launch);
}

template <typename Launch>
std::tuple<at::Tensor, at::Tensor> run_confidence_on_device(const at::Tensor& hidden, const at::Tensor& prev_tokens,
                                                            const std::optional<at::Tensor>& w1,
                                                            const at::Tensor& weight, const at::Tensor& bias,
                                                            const std::optional<at::Tensor>& sts_temperature,
                                                            Launch&& launch) {
  const ConfidenceShape shape = check_confidence_args(hidden, prev_tokens, w1, weight, bias, sts_temperature);
  TORCH_CHECK(shape.batch < (int64_t{1} << 31), "confidence: batch size must be below 2^31");
  auto conf = at::empty({shape.batch, shape.steps}, hidden.options().dtype(at::kFloat));
  auto survival = at::empty_like(conf);
  if (shape.batch == 0 || shape.steps == 0) return {conf, survival};
  switch (hidden.scalar_type()) {
    case at::kFloat:
      dispatch_confidence_weight<float>(hidden, w1, weight, bias, prev_tokens, sts_temperature, shape, conf, survival,
                                        launch);
      break;
    case at::kBFloat16:
      dispatch_confidence_weight<__nv_bfloat16>(hidden, w1, weight, bias, prev_tokens, sts_temperature, shape, conf,
                                                survival, launch);
      break;
    case at::kHalf:
      dispatch_confidence_weight<__half>(hidden, w1, weight, bias, prev_tokens, sts_temperature, shape, conf, survival,
                                         launch);
      break;
    default:
      TORCH_CHECK(false, "confidence: unsupported hidden dtype ", hidden.scalar_type());
  }
  return {conf, survival};
}

}  // namespace dspark
