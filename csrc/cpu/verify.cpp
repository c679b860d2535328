// verify on the CPU: lossless speculative sampling, parallel over requests.
//
// Each request walks its rows in order and stops at the first rejection, so rows after
// it are never read. The arithmetic follows dspark_ext/reference.py step for step.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

#include "../verify_args.h"
#include "dspark/math.h"
#include "verify_rows.h"

namespace dspark {
namespace {

constexpr float kNegInf = -INFINITY;

// A target (or draft) row after sanitising, filtering and normalisation at temperature T,
// in the spec's base-2 arithmetic: s = log2(e) / T, w_v = exp2((x_v - m) * s) over the
// kept tokens, p_v = w_v * (1 / S).
struct RowDistribution {
  std::vector<float> logits;  // [V] x_v = sanitize(logit_v)
  float mass = 0.f;           // S = sum over kept of w_v
  float inverse_mass = 0.f;   // 1 / S (0 if S = 0)
  std::vector<float> weights; // [V] w_v if kept (x_v >= the filter's threshold), else 0

  float prob(int64_t v) const { return weights[v] * inverse_mass; }
};

// Threshold of top-k then top-p on x (see reference.filter_mask): the smallest kept value.
float filter_threshold(const std::vector<float>& x, float scale, int32_t top_k, float top_p) {
  const int64_t vocab = static_cast<int64_t>(x.size());
  const bool k_on = top_k > 0 && top_k < vocab;
  const bool p_on = top_p < 1.0f;  // false for NaN
  if (!k_on && !p_on) return kNegInf;
  std::vector<float> sorted_x(x);
  float threshold = kNegInf;
  int64_t candidates = vocab;
  if (k_on) {
    std::nth_element(sorted_x.begin(), sorted_x.begin() + (top_k - 1), sorted_x.end(), std::greater<float>());
    threshold = sorted_x[top_k - 1];
    candidates = std::partition(sorted_x.begin(), sorted_x.end(), [&](float value) { return value >= threshold; }) -
                 sorted_x.begin();
  }
  if (!p_on) return threshold;
  sorted_x.resize(candidates);
  std::sort(sorted_x.begin(), sorted_x.end(), std::greater<float>());
  if (sorted_x.empty() || sorted_x[0] == kNegInf) return threshold;
  // Masses are summed in double (a float sum in descending order drops the tail once it
  // is large); the limit and the comparison are rounded to float as in the spec.
  const float row_max = sorted_x[0];
  double total = 0.0;
  for (float value : sorted_x) total += value > kNegInf ? std::exp2((value - row_max) * scale) : 0.f;
  const float limit = top_p * static_cast<float>(total);
  // The cut is at the last sorted entry whose preceding mass is below the limit; the
  // first entry always qualifies, so the most likely tokens are always kept.
  double before = 0.0;
  float cut = sorted_x[0];
  for (float value : sorted_x) {
    if (!(static_cast<float>(before) < limit) || value == kNegInf) break;
    cut = value;
    before += std::exp2((value - row_max) * scale);
  }
  return std::max(threshold, cut);
}

// The row passes are vectorised (verify_rows.h): sanitise (and the max) into a float32
// copy, then the weights and their sum from it; the top-k/top-p threshold in between sorts
// a copy of it. (Reading the raw row twice instead, max then weights, widens and sanitises
// every element twice: measured slower for bf16 on an AVX-512 CPU, with Sleef's exp2 and
// again with the polynomial one.)
template <typename scalar_t>
void build_distribution(const scalar_t* logits, int64_t vocab, float scale, int32_t top_k, float top_p,
                        RowDistribution& dist) {
  dist.logits.resize(vocab);
  // The max of the row is kept by any filter, so it is the max over the kept tokens.
  const float row_max = cpu_rows::sanitize_row(logits, vocab, dist.logits.data());
  const float threshold = filter_threshold(dist.logits, scale, top_k, top_p);
  dist.weights.resize(vocab);
  dist.mass = cpu_rows::row_kernels().weights(dist.logits.data(), vocab, row_max > kNegInf ? row_max : 0.f, scale,
                                              threshold, dist.weights.data());
  dist.inverse_mass = dist.mass > 0.f ? 1.f / dist.mass : 0.f;
}

// double is rejected by the argument checks; this keeps AT_DISPATCH's instantiation valid.
void build_distribution(const double*, int64_t, float, int32_t, float, RowDistribution&) {
  TORCH_CHECK(false, "verify: float64 logits are not supported");
}

// Race argmax_v w_v / E'_v over the kept tokens with w_v > 0; -1 if none.
int64_t target_race(const RowDistribution& target, uint64_t seed, uint32_t position, uint64_t offset) {
  return cpu_rows::row_kernels().race(target.weights.data(), static_cast<int64_t>(target.weights.size()),
                                      target.mass, seed, kStreamResample, position, offset);
}

template <typename scalar_t>
int64_t greedy_argmax(const scalar_t* logits, int64_t vocab) {
  ArgMax best{kNegInf, -1};
  for (int64_t v = 0; v < vocab; ++v) {
    const float y = sanitize_logit(static_cast<float>(logits[v]));
    if (y > kNegInf && beats(y, v, best)) best = {y, v};
  }
  return best.index;
}

struct RequestParams {
  int64_t length;
  const int64_t* drafts;  // [K]
  float temperature;
  uint64_t seed;
  uint64_t offset;
  int32_t top_k;
  float top_p;
};

// Returns the number of accepted drafts; writes out[0 .. accepted].
template <typename scalar_t>
int32_t verify_request(const scalar_t* target_rows,  // [L+1, V] (row stride = vocab)
                       int64_t target_stride, const scalar_t* draft_rows,  // [K, V] or nullptr
                       int64_t vocab, const RequestParams& request, int64_t* out) {
  const int64_t length = request.length;
  int64_t accepted = 0;
  int64_t emitted = -1;
  if (!(request.temperature > 0.f)) {
    for (;; ++accepted) {
      const int64_t best = greedy_argmax(target_rows + accepted * target_stride, vocab);
      if (accepted < length && best >= 0 && request.drafts[accepted] == best) continue;
      emitted = best;
      break;
    }
  } else {
    // Per-thread buffers, kept across calls: no allocation (and no page faults) per row.
    thread_local RowDistribution target, draft;
    thread_local std::vector<float> residual;
    const float scale = exp2_scale(request.temperature);
    for (; accepted < length; ++accepted) {
      const int64_t token = request.drafts[accepted];
      build_distribution(target_rows + accepted * target_stride, vocab, scale, request.top_k, request.top_p,
                         target);
      float p_draft = 1.f;
      if (draft_rows != nullptr) {
        build_distribution(draft_rows + accepted * vocab, vocab, scale, 0, 1.f, draft);
        p_draft = draft.prob(token);
      }
      const uint32_t word = random_word(request.seed, kStreamAccept, static_cast<uint32_t>(accepted),
                                        request.offset, 0);
      if (accept_draft(word, target.prob(token), p_draft)) continue;
      // First rejection: race over the residual max(0, p_t - p_d), E' once per token.
      residual.resize(vocab);
      float residual_mass = cpu_rows::row_kernels().residual(
          target.weights.data(), target.inverse_mass, draft_rows != nullptr ? draft.weights.data() : nullptr,
          draft.inverse_mass, vocab, residual.data());
      if (draft_rows == nullptr) {  // one-hot draft: p_d = 1 at the draft token
        residual_mass -= residual[token];
        residual[token] = std::max(target.prob(token) - 1.f, 0.f);
        residual_mass += residual[token];
      }
      const int64_t winner = cpu_rows::row_kernels().race(residual.data(), vocab, residual_mass, request.seed,
                                                          kStreamResample, static_cast<uint32_t>(accepted),
                                                          request.offset);
      emitted = winner >= 0 ? winner
                            : target_race(target, request.seed, static_cast<uint32_t>(accepted), request.offset);
      break;
    }
    if (accepted == length) {
      build_distribution(target_rows + length * target_stride, vocab, scale, request.top_k, request.top_p,
                         target);
      emitted = target_race(target, request.seed, static_cast<uint32_t>(length), request.offset);
    }
  }
  for (int64_t j = 0; j < accepted; ++j) out[j] = request.drafts[j];
  out[accepted] = emitted;
  return static_cast<int32_t>(accepted);
}

// Values that only the CPU can check without a device synchronisation.
void check_verify_values(const VerifyShape& shape, const int64_t* target_offset, const int32_t* num_draft,
                         const int64_t* draft_tokens) {
  for (int64_t b = 0; b < shape.batch; ++b) {
    const int64_t length = num_draft[b];
    TORCH_CHECK(length >= 0 && length <= shape.max_draft, "verify: num_draft[", b, "] = ", length,
                " is outside [0, K=", shape.max_draft, "]");
    // Compared without adding to target_offset, which could overflow.
    TORCH_CHECK(target_offset[b] >= 0 && target_offset[b] <= shape.rows - length - 1, "verify: target_offset[", b,
                "] = ", target_offset[b], " with num_draft ", length, " needs rows beyond target_logits (",
                shape.rows, " rows)");
    for (int64_t j = 0; j < length; ++j) {
      const int64_t token = draft_tokens[b * shape.max_draft + j];
      TORCH_CHECK(token >= 0 && token < shape.vocab, "verify: draft_tokens[", b, ", ", j, "] = ", token,
                  " is outside the vocabulary [0, ", shape.vocab, ")");
    }
  }
}

std::tuple<at::Tensor, at::Tensor> verify_cpu(const at::Tensor& target_logits, const at::Tensor& target_offset,
                                              const at::Tensor& draft_tokens,
                                              const std::optional<at::Tensor>& draft_logits,
                                              const at::Tensor& num_draft, const at::Tensor& temperature,
                                              const at::Tensor& seed, const at::Tensor& offset,
                                              const std::optional<at::Tensor>& top_k,
                                              const std::optional<at::Tensor>& top_p) {
  const VerifyShape shape = check_verify_args(target_logits, target_offset, draft_tokens, draft_logits, num_draft,
                                              temperature, seed, offset, top_k, top_p);
  auto out_tokens = at::full({shape.batch, shape.max_draft + 1}, -1, draft_tokens.options());
  auto num_accepted = at::zeros({shape.batch}, num_draft.options());
  const int64_t* offsets = target_offset.data_ptr<int64_t>();
  const int32_t* lengths = num_draft.data_ptr<int32_t>();
  const int64_t* drafts = draft_tokens.data_ptr<int64_t>();
  check_verify_values(shape, offsets, lengths, drafts);
  const float* temperatures = temperature.data_ptr<float>();
  const int64_t* seeds = seed.data_ptr<int64_t>();
  const int64_t* round_offsets = offset.data_ptr<int64_t>();
  const int32_t* top_ks = top_k.has_value() ? top_k->data_ptr<int32_t>() : nullptr;
  const float* top_ps = top_p.has_value() ? top_p->data_ptr<float>() : nullptr;
  int64_t* out = out_tokens.data_ptr<int64_t>();
  int32_t* accepted = num_accepted.data_ptr<int32_t>();
  const int64_t row_stride = target_logits.stride(0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, target_logits.scalar_type(), "verify_cpu", [&] {
    const scalar_t* target = target_logits.data_ptr<scalar_t>();
    const scalar_t* draft = draft_logits.has_value() ? draft_logits->data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, shape.batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const RequestParams request{lengths[b],
                                    drafts + b * shape.max_draft,
                                    sanitize_temperature(temperatures[b]),
                                    static_cast<uint64_t>(seeds[b]),
                                    static_cast<uint64_t>(round_offsets[b]),
                                    top_ks ? top_ks[b] : 0,
                                    top_ps ? top_ps[b] : 1.f};
        accepted[b] = verify_request<scalar_t>(
            target + offsets[b] * row_stride, row_stride,
            draft ? draft + b * shape.max_draft * shape.vocab : nullptr, shape.vocab, request,
            out + b * (shape.max_draft + 1));
      }
    });
  });
  return {out_tokens, num_accepted};
}

}  // namespace

TORCH_LIBRARY_IMPL(dspark, CPU, m) { m.impl("verify", &verify_cpu); }

}  // namespace dspark
