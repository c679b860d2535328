// The CUDA kernels of verify, confidence and markov_draft, run on the CPU by the CUDA
// emulation (include/dspark/emulate/), as torch.ops.dspark_emulated.*: the same device path as csrc/cuda/*.cu (csrc/*_launch.h) with CPU tensors standing for device
// memory. A test-only library (make emulate), never part of the installed package; the
// tests route torch.ops.dspark.* on CPU tensors to it (python_tests/emulation.py).
#include <torch/library.h>
#include <torch/types.h>

#include <cstdlib>
#include <string>

#include "dspark/emulate/device.h"
// (device.h before the kernel headers)
#include "../confidence_launch.h"
#include "../markov_launch.h"
#include "../verify_launch.h"

namespace dspark {
namespace {

// Runs a kernel in the emulation; its errors (deadlock, divergent barrier, ...) become
// RuntimeErrors naming the kernel. Cluster launches as on an sm_90 GPU (227 KiB of dynamic
// shared memory a block); DSPARK_EMULATE_NO_CLUSTERS=1 makes the device one without
// clusters, so that tests reach the kernels' fallback paths too.
struct EmulatedLaunch {
  template <typename Kernel, typename... Args>
  void operator()(const char* name, Kernel kernel, dim3 grid, dim3 block, Args... args) const {
    emulate::launch(name, kernel, grid, block, args...);
  }

  // Launches run one after another here: a dependent launch is a plain one.
  template <typename Kernel, typename... Args>
  void dependent(const char* name, Kernel kernel, dim3 grid, dim3 block, Args... args) const {
    (*this)(name, kernel, grid, block, args...);
  }

  template <typename Kernel>
  size_t cluster_shared_limit(Kernel) const {
    const char* off = std::getenv("DSPARK_EMULATE_NO_CLUSTERS");
    return off != nullptr && std::string(off) == "1" ? 0 : size_t{227} * 1024;
  }

  template <typename Kernel, typename... Args>
  void cluster(const char* name, Kernel kernel, dim3 grid, dim3 block, dim3 cluster_dim, size_t shared_bytes,
               Args... args) const {
    emulate::launch_cluster(name, kernel, grid, block, cluster_dim, shared_bytes, args...);
  }
};
constexpr EmulatedLaunch emulated_launch{};

std::tuple<at::Tensor, at::Tensor> verify_emulated(const at::Tensor& target_logits, const at::Tensor& target_offset,
                                                   const at::Tensor& draft_tokens,
                                                   const std::optional<at::Tensor>& draft_logits,
                                                   const at::Tensor& num_draft, const at::Tensor& temperature,
                                                   const at::Tensor& seed, const at::Tensor& offset,
                                                   const std::optional<at::Tensor>& top_k,
                                                   const std::optional<at::Tensor>& top_p) {
  TORCH_CHECK(target_logits.device().is_cpu(), "verify (emulated CUDA): tensors must be on the CPU");
  return run_verify_on_device(target_logits, target_offset, draft_tokens, draft_logits, num_draft, temperature, seed,
                              offset, top_k, top_p, emulated_launch);
}

std::tuple<at::Tensor, at::Tensor> confidence_emulated(const at::Tensor& hidden, const at::Tensor& prev_tokens,
                                                       const std::optional<at::Tensor>& w1, const at::Tensor& weight,
                                                       const at::Tensor& bias,
                                                       const std::optional<at::Tensor>& sts_temperature) {
  TORCH_CHECK(hidden.device().is_cpu(), "confidence (emulated CUDA): tensors must be on the CPU");
  return run_confidence_on_device(hidden, prev_tokens, w1, weight, bias, sts_temperature, emulated_launch);
}

// markov_draft's tile kernel grid in the emulation: small, so that blocks take several tiles.
constexpr int64_t kEmulatedTileBlocks = 3;

std::tuple<at::Tensor, at::Tensor> markov_draft_emulated(const at::Tensor& backbone_logits, const at::Tensor& anchor,
                                                         const at::Tensor& w1, const at::Tensor& w2,
                                                         const at::Tensor& temperature, const at::Tensor& seed,
                                                         const at::Tensor& offset,
                                                         const std::optional<at::Tensor>& d2t,
                                                         std::optional<int64_t> num_candidates) {
  TORCH_CHECK(backbone_logits.device().is_cpu(), "markov_draft (emulated CUDA): tensors must be on the CPU");
  at::Tensor z = at::empty_like(backbone_logits, at::MemoryFormat::Contiguous);
  at::Tensor tokens = run_markov_on_device("markov_draft", backbone_logits, z, anchor, w1, w2, temperature, seed,
                                           offset, d2t, num_candidates, kEmulatedTileBlocks, emulated_launch);
  return {tokens, z};
}

at::Tensor markov_draft_inplace_emulated(at::Tensor backbone_logits, const at::Tensor& anchor, const at::Tensor& w1,
                                         const at::Tensor& w2, const at::Tensor& temperature, const at::Tensor& seed,
                                         const at::Tensor& offset, const std::optional<at::Tensor>& d2t,
                                         std::optional<int64_t> num_candidates) {
  TORCH_CHECK(backbone_logits.device().is_cpu(), "markov_draft_ (emulated CUDA): tensors must be on the CPU");
  return run_markov_on_device("markov_draft_", backbone_logits, backbone_logits, anchor, w1, w2, temperature, seed,
                              offset, d2t, num_candidates, kEmulatedTileBlocks, emulated_launch);
}

}  // namespace

TORCH_LIBRARY(dspark_emulated, m) {
  m.def("verify", &verify_emulated);
  m.def("confidence", &confidence_emulated);
  m.def("markov_draft(Tensor backbone_logits, Tensor anchor, Tensor w1, Tensor w2, Tensor temperature, "
        "Tensor seed, Tensor offset, Tensor? d2t, int? num_candidates=None) -> (Tensor, Tensor)",
        &markov_draft_emulated);
  m.def("markov_draft_(Tensor(a!) backbone_logits, Tensor anchor, Tensor w1, Tensor w2, Tensor temperature, "
        "Tensor seed, Tensor offset, Tensor? d2t, int? num_candidates=None) -> Tensor",
        &markov_draft_inplace_emulated);
}

}  // namespace dspark
