// markov_draft on the CPU. Per step k:
//   1. the correction W2 · W1[x_{k-1}]ᵀ for all requests as one ATen GEMM in float32
//      ([Vd, r] x [r, B], the same call as dspark_ext/reference.py makes, so the tokens
//      are identical to the reference's; this orientation streams W2 once, with B short
//      columns, and is the faster one for small B);
//   2. one fused pass per request (parallel over requests): z = round(U + correction) to
//      U's dtype, stored; the row max; then the exponential race (Philox stream 0,
//      position k) or the greedy argmax over the stored z, and the map through d2t.
// Candidate mode selects the top-c entries of every U_k before the loop; the pass then
// writes -inf outside them and races over them only (the GEMM still covers the whole row,
// as in the reference).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "../markov_args.h"
#include "dspark/math.h"

namespace dspark {
namespace {

// Raises for ids the CUDA kernel would turn into -1 tokens (reference.markov_draft).
void check_markov_values(const at::Tensor& anchor, const std::optional<at::Tensor>& d2t, const MarkovShape& s) {
  const int64_t* a = anchor.data_ptr<int64_t>();
  for (int64_t b = 0; b < s.batch; ++b)
    TORCH_CHECK(a[b] >= 0 && a[b] < s.target_vocab, "markov_draft: anchor[", b, "] = ", a[b],
                " is outside the target vocabulary [0, Vt=", s.target_vocab, ")");
  if (!d2t.has_value()) return;
  const int64_t* map = d2t->data_ptr<int64_t>();
  for (int64_t v = 0; v < s.draft_vocab; ++v)
    TORCH_CHECK(map[v] >= 0 && map[v] < s.target_vocab, "markov_draft: d2t[", v, "] = ", map[v],
                " is outside the target vocabulary [0, Vt=", s.target_vocab, ")");
}

// Candidate indices [B * K][c], ascending: the c largest sanitize(U_k), ties to the smaller index.
template <typename T>
std::vector<int32_t> select_candidates(const T* u, const MarkovShape& s) {
  const int64_t c = s.candidates;
  std::vector<int32_t> out(static_cast<size_t>(s.batch * s.steps * c));
  at::parallel_for(0, s.batch * s.steps, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> y(static_cast<size_t>(s.draft_vocab));
    std::vector<int32_t> order(static_cast<size_t>(s.draft_vocab));
    for (int64_t row = begin; row < end; ++row) {
      const T* u_row = u + row * s.draft_vocab;
      for (int64_t v = 0; v < s.draft_vocab; ++v) y[v] = sanitize_logit(static_cast<float>(u_row[v]));
      std::iota(order.begin(), order.end(), 0);
      const auto before = [&](int32_t a, int32_t b) { return y[a] > y[b] || (y[a] == y[b] && a < b); };
      std::nth_element(order.begin(), order.begin() + (c - 1), order.end(), before);
      std::sort(order.begin(), order.begin() + c);
      std::copy(order.begin(), order.begin() + c, out.begin() + row * c);
    }
  });
  return out;
}

template <typename T>
void markov_loop(const at::Tensor& backbone_logits, at::Tensor& z_out, const at::Tensor& anchor, const at::Tensor& w1,
                 const at::Tensor& w2, const at::Tensor& temperature, const at::Tensor& seed,
                 const at::Tensor& offset, const std::optional<at::Tensor>& d2t, const MarkovShape& s,
                 int64_t* tokens) {
  const T* u = backbone_logits.data_ptr<T>();
  T* z = z_out.data_ptr<T>();  // may alias u (markov_draft_): each element is read before it is written
  const int64_t* map = d2t.has_value() ? d2t->data_ptr<int64_t>() : nullptr;
  const float* temps = temperature.data_ptr<float>();
  const int64_t* seeds = seed.data_ptr<int64_t>();
  const int64_t* offsets = offset.data_ptr<int64_t>();
  const int64_t c = s.candidates;
  const std::vector<int32_t> candidates = c > 0 ? select_candidates(u, s) : std::vector<int32_t>();

  // The GEMM operands as the reference forms them: float32 copies (W2 converted once per
  // call, W1 only for the B rows a step needs).
  const at::Tensor w2f = w2.to(at::kFloat);
  // The W1 row of each request's step: the anchor, then the previous token; -1 once dead
  // (anchors are checked in range before).
  std::vector<int64_t> prev(anchor.data_ptr<int64_t>(), anchor.data_ptr<int64_t>() + s.batch);
  at::Tensor rows = at::empty({s.batch}, anchor.options());

  for (int64_t k = 0; k < s.steps; ++k) {
    int64_t* row_ids = rows.data_ptr<int64_t>();
    for (int64_t b = 0; b < s.batch; ++b) row_ids[b] = prev[b] >= 0 ? prev[b] : 0;  // dead: any row, zeroed below
    const at::Tensor correction = at::matmul(w2f, w1.index_select(0, rows).to(at::kFloat).t()).contiguous();  // [Vd, B]
    const float* corr = correction.data_ptr<float>();
    const int64_t corr_stride = s.batch;

    at::parallel_for(0, s.batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> y(static_cast<size_t>(c > 0 ? c : s.draft_vocab));
      std::vector<T> values(y.size());
      for (int64_t b = begin; b < end; ++b) {
        const int64_t row = b * s.steps + k;
        const T* u_row = u + row * s.draft_vocab;
        T* z_row = z + row * s.draft_vocab;
        const float* corr_col = corr + b;  // element v at corr_col[v * corr_stride]
        const bool live = prev[b] >= 0;
        const int32_t* cand = c > 0 ? candidates.data() + row * c : nullptr;
        const int64_t count = c > 0 ? c : s.draft_vocab;
        // z (kept in `values`), its sanitized float value y and the max, by position in the
        // candidate list (full mode: by vocabulary index).
        float row_max = -INFINITY;
        for (int64_t i = 0; i < count; ++i) {
          const int64_t v = cand ? cand[i] : i;
          values[i] = static_cast<T>(static_cast<float>(u_row[v]) + (live ? corr_col[v * corr_stride] : 0.f));
          y[i] = sanitize_logit(static_cast<float>(values[i]));
          row_max = std::max(row_max, y[i]);
        }
        if (cand) {  // every U value is read before z (which may be U) is written
          std::fill(z_row, z_row + s.draft_vocab, static_cast<T>(-INFINITY));
          for (int64_t i = 0; i < count; ++i) z_row[cand[i]] = values[i];
        } else {
          std::copy(values.begin(), values.end(), z_row);
        }
        int64_t choice = -1;
        const float temp = temps[b];
        if (!(temp > 0.f)) {
          float best = -INFINITY;
          for (int64_t i = 0; i < count; ++i)
            if (y[i] > best) best = y[i], choice = cand ? cand[i] : i;
        } else if (row_max > -INFINITY) {
          const float t = sanitize_temperature(temp);
          RandomRow random(static_cast<uint64_t>(seeds[b]), kStreamDraft, static_cast<uint32_t>(k),
                           static_cast<uint64_t>(offsets[b]));
          ArgMax best{-INFINITY, -1};
          for (int64_t i = 0; i < count; ++i) {
            if (y[i] == -INFINITY) continue;
            const int64_t v = cand ? cand[i] : i;
            const float relative = (y[i] - row_max) / t;
            // Exact pruning: the key is at most relative + kMaxRaceBonus, so an element below
            // the leader by more than that cannot win; its random word is not needed.
            if (best.index >= 0 && relative + kMaxRaceBonus < best.key) continue;
            const float key = race_key_log(relative, random.word(v));
            if (beats(key, v, best)) best = {key, v};
          }
          choice = best.index;
        }
        int64_t token = choice;
        if (choice >= 0 && map != nullptr) token = map[choice];
        if (!live) token = -1;
        tokens[row] = token;
        prev[b] = token;
      }
    });
  }
}

at::Tensor markov_into(const char* op, const at::Tensor& backbone_logits, at::Tensor& z, const at::Tensor& anchor,
                       const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& temperature,
                       const at::Tensor& seed, const at::Tensor& offset, const std::optional<at::Tensor>& d2t,
                       std::optional<int64_t> num_candidates) {
  const MarkovShape shape =
      check_markov_args(op, backbone_logits, anchor, w1, w2, temperature, seed, offset, d2t, num_candidates);
  TORCH_CHECK(backbone_logits.device().is_cpu(), op, ": the CPU kernel needs CPU tensors");
  check_markov_values(anchor, d2t, shape);
  auto tokens = at::empty({shape.batch, shape.steps}, anchor.options());
  if (shape.batch == 0 || shape.steps == 0) return tokens;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, backbone_logits.scalar_type(), "markov_draft_cpu", [&] {
    markov_loop<scalar_t>(backbone_logits, z, anchor, w1, w2, temperature, seed, offset, d2t, shape,
                          tokens.data_ptr<int64_t>());
  });
  return tokens;
}

std::tuple<at::Tensor, at::Tensor> markov_draft_cpu(const at::Tensor& backbone_logits, const at::Tensor& anchor,
                                                    const at::Tensor& w1, const at::Tensor& w2,
                                                    const at::Tensor& temperature, const at::Tensor& seed,
                                                    const at::Tensor& offset, const std::optional<at::Tensor>& d2t,
                                                    std::optional<int64_t> num_candidates) {
  at::Tensor z = at::empty_like(backbone_logits, at::MemoryFormat::Contiguous);
  at::Tensor tokens = markov_into("markov_draft", backbone_logits, z, anchor, w1, w2, temperature, seed, offset, d2t,
                                  num_candidates);
  return {tokens, z};
}

at::Tensor markov_draft_inplace_cpu(at::Tensor& backbone_logits, const at::Tensor& anchor, const at::Tensor& w1,
                                    const at::Tensor& w2, const at::Tensor& temperature, const at::Tensor& seed,
                                    const at::Tensor& offset, const std::optional<at::Tensor>& d2t,
                                    std::optional<int64_t> num_candidates) {
  return markov_into("markov_draft_", backbone_logits, backbone_logits, anchor, w1, w2, temperature, seed, offset,
                     d2t, num_candidates);
}

}  // namespace

TORCH_LIBRARY_IMPL(dspark, CPU, m) {
  m.impl("markov_draft", &markov_draft_cpu);
  m.impl("markov_draft_", &markov_draft_inplace_cpu);
}

}  // namespace dspark
