// verify on CUDA: the device path of csrc/verify_launch.h with <<<>>> launches.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include "../verify_launch.h"

namespace dspark {
namespace {

// The launches of csrc/verify_launch.h on the current stream.
struct CudaLaunch {
  cudaStream_t stream;

  template <typename Kernel, typename... Args>
  void operator()(const char*, Kernel kernel, dim3 grid, dim3 block, Args... args) const {
    kernel<<<grid, block, 0, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // A kernel whose blocks may be scheduled before the previous kernel of the stream has
  // finished (cudaLaunchAttributeProgrammaticStreamSerialization; the kernel calls
  // grid_dependency_wait before it reads what that kernel wrote): the launch latency and the
  // previous kernel's last wave overlap. A plain launch before sm_90.
  template <typename... Params, typename... Args>
  void dependent(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, Args... args) const {
    int device = 0, major = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    // The kernel's griddepcontrol.wait exists only in code compiled for sm_90 or later
    // (PTX of an older architecture, JIT-compiled here, has none: then a plain launch).
    cudaFuncAttributes attributes{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
    if (major < 9 || attributes.ptxVersion < 90) return (*this)(name, kernel, grid, block, args...);
    cudaLaunchAttribute attribute{};
    attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute.val.programmaticStreamSerializationAllowed = 1;
    launch_ex(attribute, kernel, grid, block, 0, args...);
  }

  // Dynamic shared memory a block of `kernel` may have in a cluster launch: 0 where the
  // device has no clusters or the kernel was not compiled for sm_90 or later (PTX of an
  // older architecture, JIT-compiled here, would trap).
  template <typename... Params>
  size_t cluster_shared_limit(void (*kernel)(Params...)) const {
    int device = 0, clusters = 0, optin = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&clusters, cudaDevAttrClusterLaunch, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    cudaFuncAttributes attributes{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
    if (!clusters || attributes.ptxVersion < 90) return 0;  // the code's architecture, not the device's
    return static_cast<size_t>(optin) - attributes.sharedSizeBytes;
  }

  template <typename... Params, typename... Args>
  void cluster(const char*, void (*kernel)(Params...), dim3 grid, dim3 block, dim3 cluster_dim, size_t shared_bytes,
               Args... args) const {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(shared_bytes)));
    cudaLaunchAttribute attribute{};
    attribute.id = cudaLaunchAttributeClusterDimension;
    attribute.val.clusterDim.x = cluster_dim.x;
    attribute.val.clusterDim.y = cluster_dim.y;
    attribute.val.clusterDim.z = cluster_dim.z;
    launch_ex(attribute, kernel, grid, block, shared_bytes, args...);
  }

  // cudaLaunchKernelEx on the stream with one launch attribute.
  template <typename... Params, typename... Args>
  void launch_ex(const cudaLaunchAttribute& attribute, void (*kernel)(Params...), dim3 grid, dim3 block,
                 size_t shared_bytes, Args... args) const {
    cudaLaunchAttribute attributes[1] = {attribute};
    cudaLaunchConfig_t config{};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = shared_bytes;
    config.stream = stream;
    config.attrs = attributes;
    config.numAttrs = 1;
    C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, args...));
  }
};

std::tuple<at::Tensor, at::Tensor> verify_cuda(const at::Tensor& target_logits, const at::Tensor& target_offset,
                                               const at::Tensor& draft_tokens,
                                               const std::optional<at::Tensor>& draft_logits,
                                               const at::Tensor& num_draft, const at::Tensor& temperature,
                                               const at::Tensor& seed, const at::Tensor& offset,
                                               const std::optional<at::Tensor>& top_k,
                                               const std::optional<at::Tensor>& top_p) {
  const c10::cuda::CUDAGuard guard(target_logits.device());
  return run_verify_on_device(target_logits, target_offset, draft_tokens, draft_logits, num_draft, temperature, seed,
                              offset, top_k, top_p, CudaLaunch{c10::cuda::getCurrentCUDAStream()});
}

}  // namespace

TORCH_LIBRARY_IMPL(dspark, CUDA, m) { m.impl("verify", &verify_cuda); }

}  // namespace dspark
