// confidence on the CPU: [h_k; W1[prev_k]] . weight + bias, STS temperature, sigmoid,
// running product along K. Parallel over requests.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "../confidence_args.h"
#include "dspark/math.h"

namespace dspark {
namespace {

template <typename T, typename W>
float dot(const T* x, const W* w, int64_t n) {
  float acc = 0.f;
  for (int64_t i = 0; i < n; ++i) acc += static_cast<float>(x[i]) * static_cast<float>(w[i]);
  return acc;
}

template <typename T, typename W>
void confidence_loop(const at::Tensor& hidden, const std::optional<at::Tensor>& w1, const at::Tensor& weight,
                     const at::Tensor& bias, const at::Tensor& prev_tokens,
                     const std::optional<at::Tensor>& sts_temperature, const ConfidenceShape& shape, float* conf,
                     float* survival) {
  const T* h = hidden.data_ptr<T>();
  const T* w1_ptr = w1.has_value() ? w1->data_ptr<T>() : nullptr;
  const W* w = weight.data_ptr<W>();
  const float b0 = static_cast<float>(bias.data_ptr<W>()[0]);
  const int64_t* prev = prev_tokens.data_ptr<int64_t>();
  const float* temps = sts_temperature.has_value() ? sts_temperature->data_ptr<float>() : nullptr;
  at::parallel_for(0, shape.batch, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      float running = 1.f;
      for (int64_t k = 0; k < shape.steps; ++k) {
        const int64_t row = b * shape.steps + k;
        float logit = dot(h + row * shape.hidden, w, shape.hidden);
        if (w1_ptr != nullptr) logit += dot(w1_ptr + prev[row] * shape.rank, w + shape.hidden, shape.rank);
        logit += b0;
        if (temps != nullptr) logit /= temps[k];
        conf[row] = confidence_from_logit(logit);
        running *= conf[row];
        survival[row] = running;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> confidence_cpu(const at::Tensor& hidden, const at::Tensor& prev_tokens,
                                                  const std::optional<at::Tensor>& w1, const at::Tensor& weight,
                                                  const at::Tensor& bias,
                                                  const std::optional<at::Tensor>& sts_temperature) {
  const ConfidenceShape shape = check_confidence_args(hidden, prev_tokens, w1, weight, bias, sts_temperature);
  if (w1.has_value()) {
    const int64_t* prev = prev_tokens.data_ptr<int64_t>();
    for (int64_t i = 0; i < shape.batch * shape.steps; ++i)
      TORCH_CHECK(prev[i] >= 0 && prev[i] < shape.vocab, "confidence: prev_tokens[", i / shape.steps, ", ",
                  i % shape.steps, "] = ", prev[i], " is outside [0, Vt=", shape.vocab, ")");
  }
  auto conf = at::empty({shape.batch, shape.steps}, hidden.options().dtype(at::kFloat));
  auto survival = at::empty_like(conf);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "confidence_cpu", [&] {
    using T = scalar_t;
    if (weight.scalar_type() == at::kFloat)
      confidence_loop<T, float>(hidden, w1, weight, bias, prev_tokens, sts_temperature, shape,
                                conf.data_ptr<float>(), survival.data_ptr<float>());
    else
      confidence_loop<T, T>(hidden, w1, weight, bias, prev_tokens, sts_temperature, shape, conf.data_ptr<float>(),
                            survival.data_ptr<float>());
  });
  return {conf, survival};
}

}  // namespace

TORCH_LIBRARY_IMPL(dspark, CPU, m) { m.impl("confidence", &confidence_cpu); }

}  // namespace dspark
