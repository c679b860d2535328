// The device path of markov_draft, shared by the CUDA launcher (csrc/cuda/markov.cu) and
// the CUDA emulation (csrc/emulate/ops.cpp): checks, outputs and workspace, parameters,
// dtype dispatch and the launches of include/dspark/markov.cuh. `launch(name, kernel,
// grid, block, args...)` runs one kernel (see verify_launch.h).
#pragma once

#include <algorithm>

#include "markov_args.h"
#include "dspark/markov.cuh"

namespace dspark {

// The tensor-core path needs bf16/fp16 weights, r a multiple of 32 up to 256 and
// 16-byte aligned W1/W2; everything else takes the SIMT path.
inline bool markov_uses_mma(const at::Tensor& w1, const at::Tensor& w2, int64_t rank) {
  const bool half_type = w1.scalar_type() == at::kBFloat16 || w1.scalar_type() == at::kHalf;
  const auto aligned = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; };
  return half_type && rank % 32 == 0 && rank <= kMarkovMaxMmaRank && aligned(w1) && aligned(w2);
}

template <typename T, typename W, typename Launch>
void launch_markov_kernels(MarkovParams<T, W> params, bool use_mma, Launch&& launch) {
  if (params.candidates > 0) {
    const dim3 select_grid(static_cast<unsigned>(params.batch * params.steps));
    launch("markov_select_kernel", markov_select_kernel<T, W>, select_grid, dim3(kMarkovSelectThreads), params);
    launch("markov_candidates_kernel", markov_candidates_kernel<T, W>, dim3(static_cast<unsigned>(params.batch)),
           dim3(kMarkovThreads), params);
    return;
  }
  const dim3 tile_grid(static_cast<unsigned>(params.slots));
  const dim3 pick_grid(static_cast<unsigned>((params.batch + kMarkovThreads / 32 - 1) / (kMarkovThreads / 32)));
  for (int64_t k = 0; k < params.steps; ++k) {
    params.step = k;
    if constexpr (std::is_same_v<W, float>) {
      launch("markov_tile_kernel", markov_tile_kernel<T, W, false>, tile_grid, dim3(kMarkovThreads), params);
    } else {
      if (use_mma)
        launch("markov_tile_kernel", markov_tile_kernel<T, W, true>, tile_grid, dim3(kMarkovThreads), params);
      else
        launch("markov_tile_kernel", markov_tile_kernel<T, W, false>, tile_grid, dim3(kMarkovThreads), params);
    }
    launch("markov_pick_kernel", markov_pick_kernel<T, W>, pick_grid, dim3(kMarkovThreads), params);
  }
}

// Writes z into `z` (which may be backbone_logits: the in-place variant) and returns the
// tokens. `max_tile_blocks` bounds the tile kernel's grid (a few waves of the GPU's SMs);
// below it every tile gets its own block. Ids out of range (anchor, d2t entries) make the request emit -1 from that step
// on, as reference.markov_draft specifies: the kernels cannot raise without a host sync.
template <typename Launch>
at::Tensor run_markov_on_device(const char* op, const at::Tensor& backbone_logits, at::Tensor& z,
                                const at::Tensor& anchor, const at::Tensor& w1, const at::Tensor& w2,
                                const at::Tensor& temperature, const at::Tensor& seed, const at::Tensor& offset,
                                const std::optional<at::Tensor>& d2t, std::optional<int64_t> num_candidates,
                                int64_t max_tile_blocks, Launch&& launch) {
  const MarkovShape shape =
      check_markov_args(op, backbone_logits, anchor, w1, w2, temperature, seed, offset, d2t, num_candidates);
  TORCH_CHECK(shape.batch < (int64_t{1} << 31), op, ": batch size must be below 2^31");
  auto tokens = at::empty({shape.batch, shape.steps}, anchor.options());
  if (shape.batch == 0 || shape.steps == 0) return tokens;
  const int64_t tiles = (shape.draft_vocab + kMarkovTileV - 1) / kMarkovTileV;
  // Blocks keep their requests' leaders in shared memory across tiles up to
  // kMarkovMaxResident requests; beyond, one block per tile writes them out.
  const int64_t slots = shape.batch <= kMarkovMaxResident ? std::min(tiles, std::max<int64_t>(max_tile_blocks, 1))
                                                          : tiles;
  TORCH_CHECK(shape.candidates == 0 || shape.batch * shape.steps < (int64_t{1} << 31), op,
              ": B x K must be below 2^31 in candidate mode");

  // Workspace from the caching allocator (no cudaMalloc in steady state; graph-capturable).
  const auto bytes = backbone_logits.options().dtype(at::kByte);
  const int64_t leader_bytes = shape.candidates > 0 ? 0 : shape.batch * slots * int64_t{sizeof(MarkovBest)};
  const int64_t cand_bytes = shape.batch * shape.steps * shape.candidates * int64_t{sizeof(int32_t) + sizeof(float)};
  at::Tensor workspace = at::empty({shape.batch * int64_t{sizeof(int64_t)} + leader_bytes + cand_bytes}, bytes);
  uint8_t* ws = workspace.data_ptr<uint8_t>();

  const bool use_mma = markov_uses_mma(w1, w2, shape.rank);
  const int64_t cand_count = shape.batch * shape.steps * shape.candidates;

  const auto run = [&](auto u_tag, auto w_tag) {
    using T = decltype(u_tag);
    using W = decltype(w_tag);
    MarkovParams<T, W> p;
    p.u = reinterpret_cast<const T*>(backbone_logits.data_ptr());
    p.z = reinterpret_cast<T*>(z.data_ptr());
    p.w1 = reinterpret_cast<const W*>(w1.data_ptr());
    p.w2 = reinterpret_cast<const W*>(w2.data_ptr());
    p.anchor = anchor.data_ptr<int64_t>();
    p.temperature = temperature.data_ptr<float>();
    p.seed = seed.data_ptr<int64_t>();
    p.offset = offset.data_ptr<int64_t>();
    p.d2t = d2t.has_value() ? d2t->data_ptr<int64_t>() : nullptr;
    p.tokens = tokens.data_ptr<int64_t>();
    p.prev = reinterpret_cast<int64_t*>(ws);
    p.leaders = reinterpret_cast<MarkovBest*>(ws + shape.batch * sizeof(int64_t));
    p.cand_index = reinterpret_cast<int32_t*>(ws + shape.batch * sizeof(int64_t) + leader_bytes);
    p.cand_value = reinterpret_cast<float*>(ws + shape.batch * sizeof(int64_t) + leader_bytes +
                                            cand_count * sizeof(int32_t));
    p.batch = shape.batch;
    p.steps = shape.steps;
    p.draft_vocab = shape.draft_vocab;
    p.target_vocab = shape.target_vocab;
    p.rank = shape.rank;
    p.candidates = shape.candidates;
    p.tiles = tiles;
    p.slots = slots;
    p.step = 0;
    launch_markov_kernels(p, use_mma, launch);
  };
  const auto with_u = [&](auto u_tag) {
    switch (w1.scalar_type()) {
      case at::kFloat: run(u_tag, float{}); break;
      case at::kBFloat16: run(u_tag, __nv_bfloat16{}); break;
      case at::kHalf: run(u_tag, __half{}); break;
      default: TORCH_CHECK(false, op, ": unsupported w1 dtype ", w1.scalar_type());
    }
  };
  switch (backbone_logits.scalar_type()) {
    case at::kFloat: with_u(float{}); break;
    case at::kBFloat16: with_u(__nv_bfloat16{}); break;
    case at::kHalf: with_u(__half{}); break;
    default: TORCH_CHECK(false, op, ": unsupported backbone_logits dtype ", backbone_logits.scalar_type());
  }
  return tokens;
}

}  // namespace dspark
