// markov_draft on CUDA: the device path of csrc/markov_launch.h with <<<>>> launches.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include "../markov_launch.h"

namespace dspark {
namespace {

template <typename... Args>
at::Tensor markov_cuda(const char* op, const at::Tensor& backbone_logits, at::Tensor& z, Args&&... args) {
  const c10::cuda::CUDAGuard guard(backbone_logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [stream](const char*, auto kernel, dim3 grid, dim3 block, auto... params) {
    kernel<<<grid, block, 0, stream>>>(params...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  // Tile kernel grid: four blocks per SM (two resident at a time, 128 registers per thread).
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, backbone_logits.get_device()));
  return run_markov_on_device(op, backbone_logits, z, std::forward<Args>(args)..., int64_t{4} * sm_count, launch);
}

std::tuple<at::Tensor, at::Tensor> markov_draft_cuda(const at::Tensor& backbone_logits, const at::Tensor& anchor,
                                                     const at::Tensor& w1, const at::Tensor& w2,
                                                     const at::Tensor& temperature, const at::Tensor& seed,
                                                     const at::Tensor& offset, const std::optional<at::Tensor>& d2t,
                                                     std::optional<int64_t> num_candidates) {
  at::Tensor z = at::empty_like(backbone_logits, at::MemoryFormat::Contiguous);
  at::Tensor tokens = markov_cuda("markov_draft", backbone_logits, z, anchor, w1, w2, temperature, seed, offset, d2t,
                                  num_candidates);
  return {tokens, z};
}

at::Tensor markov_draft_inplace_cuda(at::Tensor& backbone_logits, const at::Tensor& anchor, const at::Tensor& w1,
                                     const at::Tensor& w2, const at::Tensor& temperature, const at::Tensor& seed,
                                     const at::Tensor& offset, const std::optional<at::Tensor>& d2t,
                                     std::optional<int64_t> num_candidates) {
  return markov_cuda("markov_draft_", backbone_logits, backbone_logits, anchor, w1, w2, temperature, seed, offset,
                     d2t, num_candidates);
}

}  // namespace

TORCH_LIBRARY_IMPL(dspark, CUDA, m) {
  m.impl("markov_draft", &markov_draft_cuda);
  m.impl("markov_draft_", &markov_draft_inplace_cuda);
}

}  // namespace dspark
