// confidence on CUDA: the device path of csrc/confidence_launch.h with a <<<>>> launch.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include "../confidence_launch.h"

namespace dspark {
namespace {

std::tuple<at::Tensor, at::Tensor> confidence_cuda(const at::Tensor& hidden, const at::Tensor& prev_tokens,
                                                   const std::optional<at::Tensor>& w1, const at::Tensor& weight,
                                                   const at::Tensor& bias,
                                                   const std::optional<at::Tensor>& sts_temperature) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [stream](const char*, auto kernel, dim3 grid, dim3 block, auto... args) {
    kernel<<<grid, block, 0, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  return run_confidence_on_device(hidden, prev_tokens, w1, weight, bias, sts_temperature, launch);
}

}  // namespace

TORCH_LIBRARY_IMPL(dspark, CUDA, m) { m.impl("confidence", &confidence_cuda); }

}  // namespace dspark
