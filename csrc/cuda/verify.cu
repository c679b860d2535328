// verify on CUDA: the device path of csrc/verify_launch.h with <<<>>> launches.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include "../verify_launch.h"

namespace dspark {
namespace {

std::tuple<at::Tensor, at::Tensor> verify_cuda(const at::Tensor& target_logits, const at::Tensor& target_offset,
                                               const at::Tensor& draft_tokens,
                                               const std::optional<at::Tensor>& draft_logits,
                                               const at::Tensor& num_draft, const at::Tensor& temperature,
                                               const at::Tensor& seed, const at::Tensor& offset,
                                               const std::optional<at::Tensor>& top_k,
                                               const std::optional<at::Tensor>& top_p) {
  const c10::cuda::CUDAGuard guard(target_logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [stream](const char*, auto kernel, dim3 grid, dim3 block, auto... args) {
    kernel<<<grid, block, 0, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  return run_verify_on_device(target_logits, target_offset, draft_tokens, draft_logits, num_draft, temperature, seed,
                              offset, top_k, top_p, launch);
}

}  // namespace

TORCH_LIBRARY_IMPL(dspark, CUDA, m) { m.impl("verify", &verify_cuda); }

}  // namespace dspark
