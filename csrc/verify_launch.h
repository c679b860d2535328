// The device path of verify, shared by the CUDA launcher (csrc/cuda/verify.cu) and the
// CUDA emulation (csrc/emulate/verify.cpp): argument checks, outputs and workspace, the
// kernel parameters, dtype dispatch and the two launches of include/dspark/verify.cuh.
// `launch(name, kernel, grid, block, args...)` runs one kernel: <<<grid, block, 0, stream>>>
// on a GPU, dspark::emulate::launch in the emulation; `launch.cluster(name, kernel, grid,
// block, cluster, dynamic_shared_bytes, args...)` runs one in thread-block clusters, and
// `launch.cluster_shared_limit(kernel)` is the dynamic shared memory a block of it may have
// (0: no clusters for it here); `launch.dependent(...)`, as `launch(...)`, runs a kernel
// that may start before the previous one has finished (programmatic dependent launch on
// sm_90, see grid_dependency_wait; a plain launch elsewhere). Include after the kernel's toolchain
// (CUDA or dspark/emulate/device.h).
#pragma once

#include "verify_args.h"
#include "dspark/verify.cuh"

namespace dspark {

template <typename T, typename Launch>
void launch_verify_kernels(const T* target, const std::optional<at::Tensor>& draft_logits, VerifyParams params,
                           Launch&& launch) {
  const unsigned batch = static_cast<unsigned>(params.batch), slices = static_cast<unsigned>(params.slices);
  const unsigned rows = static_cast<unsigned>(params.max_draft + 1);
  const dim3 slice_grid(batch, slices, rows);
  const dim3 finish_grid(batch, slices);
  const dim3 block(kVerifyThreads);
  // Top-k/top-p rows go to the cluster kernel where the device runs it and a row fits on chip.
  const bool filters = params.top_k != nullptr || params.top_p != nullptr;
  const size_t filter_bytes = filter_shared_bytes<T>(params.vocab);
  params.filter_in_cluster = filters && filter_bytes <= launch.cluster_shared_limit(verify_filter_kernel<T>);
  const auto filter = [&] {
    if (params.filter_in_cluster)
      launch.cluster("verify_filter_kernel", verify_filter_kernel<T>, dim3(batch * kFilterCluster, rows), block,
                     dim3(kFilterCluster), filter_bytes, target, params);
  };
  if (draft_logits.has_value()) {
    const T* draft = reinterpret_cast<const T*>(draft_logits->data_ptr());
    launch("verify_slices_kernel", verify_slices_kernel<T, true>, slice_grid, block, target, draft, params);
    filter();
    launch.dependent("verify_finish_kernel", verify_finish_kernel<T, true>, finish_grid, block, target, draft, params);
  } else {
    launch("verify_slices_kernel", verify_slices_kernel<T, false>, slice_grid, block, target, nullptr, params);
    filter();
    launch.dependent("verify_finish_kernel", verify_finish_kernel<T, false>, finish_grid, block, target, nullptr,
                     params);
  }
}

template <typename Launch>
std::tuple<at::Tensor, at::Tensor> run_verify_on_device(
    const at::Tensor& target_logits, const at::Tensor& target_offset, const at::Tensor& draft_tokens,
    const std::optional<at::Tensor>& draft_logits, const at::Tensor& num_draft, const at::Tensor& temperature,
    const at::Tensor& seed, const at::Tensor& offset, const std::optional<at::Tensor>& top_k,
    const std::optional<at::Tensor>& top_p, Launch&& launch) {
  const VerifyShape shape = check_verify_args(target_logits, target_offset, draft_tokens, draft_logits, num_draft,
                                              temperature, seed, offset, top_k, top_p);
  TORCH_CHECK(shape.max_draft + 1 <= 65535, "verify: draft_tokens K must be below 65535 on CUDA");
  TORCH_CHECK(shape.batch * kFilterCluster < (int64_t{1} << 31), "verify: batch size must be below 2^28 on CUDA");
  const int64_t slices = (shape.vocab + kVerifySlice - 1) / kVerifySlice;
  TORCH_CHECK(slices <= 65535, "verify: vocabulary size ", shape.vocab, " is above the CUDA limit ",
              int64_t{65535} * kVerifySlice);
  auto out_tokens = at::empty({shape.batch, shape.max_draft + 1}, draft_tokens.options());
  auto num_accepted = at::empty({shape.batch}, num_draft.options());
  if (shape.batch == 0) return {out_tokens, num_accepted};
  // Partials passed from the first launch to the second, one allocation (caching
  // allocator: no cudaMalloc in steady state, capturable in a CUDA graph).
  const int64_t partial_bytes = shape.batch * (shape.max_draft + 1) * slices * int64_t{sizeof(VerifyPartial)};
  const int64_t residual_bytes = shape.batch * slices * int64_t{sizeof(ResidualPartial)};
  auto workspace = at::empty({partial_bytes + residual_bytes + shape.batch * int64_t{sizeof(uint32_t)}},
                             target_logits.options().dtype(at::kByte));
  uint8_t* bytes = workspace.data_ptr<uint8_t>();

  VerifyParams params;
  params.target_offset = target_offset.data_ptr<int64_t>();
  params.draft_tokens = draft_tokens.data_ptr<int64_t>();
  params.num_draft = num_draft.data_ptr<int32_t>();
  params.temperature = temperature.data_ptr<float>();
  params.seed = seed.data_ptr<int64_t>();
  params.offset = offset.data_ptr<int64_t>();
  params.top_k = top_k.has_value() ? top_k->data_ptr<int32_t>() : nullptr;
  params.top_p = top_p.has_value() ? top_p->data_ptr<float>() : nullptr;
  params.out_tokens = out_tokens.data_ptr<int64_t>();
  params.num_accepted = num_accepted.data_ptr<int32_t>();
  params.partials = reinterpret_cast<VerifyPartial*>(bytes);
  params.residuals = reinterpret_cast<ResidualPartial*>(bytes + partial_bytes);
  params.finished = reinterpret_cast<uint32_t*>(bytes + partial_bytes + residual_bytes);
  params.slices = static_cast<int32_t>(slices);
  params.batch = shape.batch;
  params.max_draft = shape.max_draft;
  params.vocab = shape.vocab;
  params.rows = shape.rows;
  params.target_stride = target_logits.stride(0);
  params.filter_in_cluster = 0;  // decided per dtype by launch_verify_kernels

  const void* target = target_logits.data_ptr();
  switch (target_logits.scalar_type()) {
    case at::kFloat:
      launch_verify_kernels(static_cast<const float*>(target), draft_logits, params, launch);
      break;
    case at::kBFloat16:
      launch_verify_kernels(static_cast<const __nv_bfloat16*>(target), draft_logits, params, launch);
      break;
    case at::kHalf:
      launch_verify_kernels(static_cast<const __half*>(target), draft_logits, params, launch);
      break;
    default: TORCH_CHECK(false, "verify: unsupported target_logits dtype ", target_logits.scalar_type());
  }
  return {out_tokens, num_accepted};
}

}  // namespace dspark
