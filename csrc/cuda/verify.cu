// verify on CUDA: checks, dtype dispatch and the two launches of include/dspark/verify.cuh.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include "../verify_args.h"
#include "dspark/verify.cuh"

namespace dspark {
namespace {

template <typename T, bool kHasDraft>
void launch(const T* target, const T* draft, const VerifyParams& params, cudaStream_t stream) {
  const dim3 row_grid(static_cast<unsigned>(params.batch), static_cast<unsigned>(params.max_draft + 1));
  verify_rows_kernel<T, kHasDraft><<<row_grid, kVerifyThreads, 0, stream>>>(target, draft, params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  verify_finish_kernel<T, kHasDraft><<<static_cast<unsigned>(params.batch), kVerifyThreads, 0, stream>>>(
      target, draft, params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_for_dtype(const at::Tensor& target_logits, const std::optional<at::Tensor>& draft_logits,
                      const VerifyParams& params, cudaStream_t stream) {
  const T* target = reinterpret_cast<const T*>(target_logits.data_ptr());
  if (draft_logits.has_value())
    launch<T, true>(target, reinterpret_cast<const T*>(draft_logits->data_ptr()), params, stream);
  else
    launch<T, false>(target, nullptr, params, stream);
}

std::tuple<at::Tensor, at::Tensor> verify_cuda(const at::Tensor& target_logits, const at::Tensor& target_offset,
                                               const at::Tensor& draft_tokens,
                                               const std::optional<at::Tensor>& draft_logits,
                                               const at::Tensor& num_draft, const at::Tensor& temperature,
                                               const at::Tensor& seed, const at::Tensor& offset,
                                               const std::optional<at::Tensor>& top_k,
                                               const std::optional<at::Tensor>& top_p) {
  const VerifyShape shape = check_verify_args(target_logits, target_offset, draft_tokens, draft_logits, num_draft,
                                              temperature, seed, offset, top_k, top_p);
  TORCH_CHECK(shape.batch < (int64_t{1} << 31), "verify: batch size must be below 2^31");
  TORCH_CHECK(shape.max_draft + 1 <= 65535, "verify: draft_tokens K must be below 65535 on CUDA");
  const c10::cuda::CUDAGuard guard(target_logits.device());
  auto out_tokens = at::empty({shape.batch, shape.max_draft + 1}, draft_tokens.options());
  auto num_accepted = at::empty({shape.batch}, num_draft.options());
  if (shape.batch == 0) return {out_tokens, num_accepted};
  // Row statistics passed from the first launch to the second (caching allocator:
  // no cudaMalloc in steady state, capturable in a CUDA graph).
  auto workspace = at::empty({shape.batch * (shape.max_draft + 1) * static_cast<int64_t>(sizeof(VerifyRowStats))},
                             target_logits.options().dtype(at::kByte));

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
  params.stats = reinterpret_cast<VerifyRowStats*>(workspace.data_ptr());
  params.batch = shape.batch;
  params.max_draft = shape.max_draft;
  params.vocab = shape.vocab;
  params.rows = shape.rows;
  params.target_stride = target_logits.stride(0);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  switch (target_logits.scalar_type()) {
    case at::kFloat: launch_for_dtype<float>(target_logits, draft_logits, params, stream); break;
    case at::kBFloat16: launch_for_dtype<__nv_bfloat16>(target_logits, draft_logits, params, stream); break;
    case at::kHalf: launch_for_dtype<__half>(target_logits, draft_logits, params, stream); break;
    default: TORCH_CHECK(false, "verify: unsupported target_logits dtype ", target_logits.scalar_type());
  }
  return {out_tokens, num_accepted};
}

}  // namespace

TORCH_LIBRARY_IMPL(dspark, CUDA, m) { m.impl("verify", &verify_cuda); }

}  // namespace dspark
