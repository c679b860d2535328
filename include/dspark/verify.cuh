// CUDA kernels of verify: lossless speculative sampling over the whole vocabulary.
//
// Two launches, no host synchronisation:
//  1. verify_rows_kernel, one block per (request b, position j <= L_b): one pass over
//     target row j (online max and sum; for j = L_b also the race for the bonus token)
//     and, for j < L_b, over draft row j; decides acceptance of draft j on its own and
//     stores the row statistics. Top-k / top-p rows add a radix select of the threshold.
//  2. verify_finish_kernel, one block per request: finds the first rejection and, if
//     there is one, makes the single extra pass over that row pair to draw the residual.
// The semantics are those of dspark_ext/reference.py.
#pragma once

#include <cooperative_groups.h>

#include <cstdint>

#include "dspark/math.h"
#include "dspark/reduce.cuh"

namespace dspark {

namespace cg = cooperative_groups;

constexpr int kVerifyThreads = 512;

// Per (request, position) results of the first kernel.
struct VerifyRowStats {
  float target_max;   // m over the kept tokens of the target row
  float target_mass;  // S = sum over kept of exp((x - m) / T); 0 for an empty distribution
  float threshold;    // kept iff x >= threshold (top-k/top-p), -inf when unfiltered
  float draft_max;
  float draft_mass;
  int32_t accepted;   // sampling: draft j passed u * p_d < p_t
  int32_t token;      // greedy: argmax of row j; sampling, j = L: the bonus token
  int32_t padding;
};

struct VerifyParams {
  const int64_t* target_offset;  // [B]
  const int64_t* draft_tokens;   // [B, K]
  const int32_t* num_draft;      // [B]
  const float* temperature;      // [B]
  const int64_t* seed;           // [B]
  const int64_t* offset;         // [B]
  const int32_t* top_k;          // [B] or nullptr
  const float* top_p;            // [B] or nullptr
  int64_t* out_tokens;           // [B, K+1]
  int32_t* num_accepted;         // [B]
  VerifyRowStats* stats;         // [B, K+1] workspace
  int64_t batch;
  int64_t max_draft;             // K
  int64_t vocab;                 // V
  int64_t rows;                  // Nt
  int64_t target_stride;         // elements between target rows
};

// The CUDA kernel cannot raise without a host synchronisation, so a request whose
// values are out of range is skipped and reported with num_accepted = -1.
__device__ __forceinline__ bool request_is_valid(const VerifyParams& p, int64_t b) {
  const int64_t length = p.num_draft[b];
  if (length < 0 || length > p.max_draft) return false;
  const int64_t first_row = p.target_offset[b];
  if (first_row < 0 || first_row > p.rows - length - 1) return false;  // no int64 overflow
  for (int64_t j = 0; j < length; ++j) {
    const int64_t token = p.draft_tokens[b * p.max_draft + j];
    if (token < 0 || token >= p.vocab) return false;
  }
  return true;
}

// ---------------------------------------------------------------- radix threshold select
// Finds the smallest finite value t of x = sanitize(row), among those >= floor, such
// that the elements strictly above t satisfy a limit: fewer than `count_limit` of them
// (top-k), or (mass mode) their mass below `mass_fraction` of the mass of all candidates
// (top-p; the row maximum always qualifies), the mass of x being exp((x - max) / T).
// Four passes of 8-bit digits over the order-preserving key of x, counts and masses in
// shared-memory histograms. Masses are fixed point (see mass_scale_exponent) so that
// atomic accumulation is exact and the result deterministic.
struct RadixState {
  uint32_t count[256];
  unsigned long long mass[256];
  uint32_t prefix;
  uint32_t above_count;
  unsigned long long above_mass;
  unsigned long long total_mass;
  int chosen;
};

// Fixed-point scale 2^s of the masses (each <= 1): as fine as possible while the sum of V
// of them stays below 2^63, so tokens far below the max still count (s >= 32 for V < 2^31).
__device__ __forceinline__ int mass_scale_exponent(int64_t vocab) {
  return 63 - (64 - __clzll(static_cast<long long>(vocab)));
}

__device__ __forceinline__ unsigned long long fixed_mass(float x, float row_max, float temperature, int scale) {
  return __float2ull_rn(ldexpf(expf((x - row_max) / temperature), scale));
}

template <typename T>
__device__ float radix_threshold(const T* row, int64_t vocab, float temperature, float row_max, float floor,
                                 bool mass_mode, int64_t count_limit, float mass_fraction, RadixState& st) {
  const int scale = mass_scale_exponent(vocab);
  if (threadIdx.x == 0) {
    st.prefix = 0;
    st.above_count = 0;
    st.above_mass = 0;
  }
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) {
      st.count[i] = 0;
      st.mass[i] = 0;
    }
    __syncthreads();
    const uint64_t prefix_high = static_cast<uint64_t>(st.prefix) >> (shift + 8);
    for_each_element(row, vocab, [&](int64_t, float x) {
      const float y = sanitize_logit(x);
      if (y == -INFINITY || y < floor) return;
      const uint32_t key = ordered_key(y);
      if ((static_cast<uint64_t>(key) >> (shift + 8)) != prefix_high) return;
      const int digit = (key >> shift) & 0xFF;
      // Real logits fall into few top-level digits: one count atomic per distinct digit
      // of the converged lanes instead of one per lane (warp-aggregated atomics).
      const cg::coalesced_group peers = cg::labeled_partition(cg::coalesced_threads(), digit);
      if (peers.thread_rank() == 0) atomicAdd(&st.count[digit], static_cast<uint32_t>(peers.size()));
      if (mass_mode) atomicAdd(&st.mass[digit], fixed_mass(y, row_max, temperature, scale));
    });
    __syncthreads();
    if (threadIdx.x < 32) {
      // Lane l owns digits 255-8l .. 248-8l (descending); scan lanes from the top.
      const int lane = threadIdx.x;
      uint32_t lane_count = 0;
      unsigned long long lane_mass = 0;
      for (int i = 0; i < 8; ++i) {
        lane_count += st.count[255 - 8 * lane - i];
        lane_mass += st.mass[255 - 8 * lane - i];
      }
      uint32_t incl_count = lane_count;
      unsigned long long incl_mass = lane_mass;
      for (int delta = 1; delta < 32; delta <<= 1) {
        const uint32_t c = __shfl_up_sync(0xFFFFFFFFu, incl_count, delta);
        const unsigned long long m = __shfl_up_sync(0xFFFFFFFFu, incl_mass, delta);
        if (lane >= delta) {
          incl_count += c;
          incl_mass += m;
        }
      }
      if (shift == 24) {
        // The first level sees every candidate: their mass is the top-p reference.
        const unsigned long long total = __shfl_sync(0xFFFFFFFFu, incl_mass, 31);
        if (lane == 0) st.total_mass = total;
      }
      __syncwarp();
      // The limit is rounded as the spec rounds it: float32 top_p times the float32 total.
      const float mass_limit = mass_fraction * static_cast<float>(ldexp(static_cast<double>(st.total_mass), -scale));
      uint32_t run_count = st.above_count + incl_count - lane_count;
      unsigned long long run_mass = st.above_mass + incl_mass - lane_mass;
      int candidate = 256;
      uint32_t cand_count = 0;
      unsigned long long cand_mass = 0;
      for (int i = 0; i < 8; ++i) {
        const int digit = 255 - 8 * lane - i;
        if (st.count[digit] > 0) {
          const bool ok = mass_mode ? (run_count == 0 ||
                                       static_cast<float>(ldexp(static_cast<double>(run_mass), -scale)) < mass_limit)
                                    : (static_cast<int64_t>(run_count) < count_limit);
          if (!ok) break;
          candidate = digit;
          cand_count = run_count;
          cand_mass = run_mass;
        }
        run_count += st.count[digit];
        run_mass += st.mass[digit];
      }
      // The lowest qualifying digit over all lanes (qualifying digits form a top range).
      int best = candidate;
      for (int mask = 16; mask > 0; mask >>= 1) best = min(best, __shfl_xor_sync(0xFFFFFFFFu, best, mask));
      if (best < 256 && candidate == best) {
        st.chosen = best;
        st.above_count = cand_count;
        st.above_mass = cand_mass;
        st.prefix |= static_cast<uint32_t>(best) << shift;
      }
      if (best == 256 && lane == 0) st.chosen = 256;  // unreachable for a non-empty row
    }
    __syncthreads();
    if (st.chosen == 256) break;  // unreachable for a non-empty row
  }
  const float threshold = st.chosen == 256 ? -INFINITY : key_to_float(st.prefix);
  __syncthreads();  // every thread has read st before a later call resets it
  return threshold;
}

// ---------------------------------------------------------------- kernel 1: rows
template <typename T, bool kHasDraft>
__global__ void __launch_bounds__(kVerifyThreads, 2) verify_rows_kernel(const T* __restrict__ target_logits,
                                                                     const T* __restrict__ draft_logits,
                                                                     VerifyParams p) {
  const int64_t b = blockIdx.x;
  const int64_t j = blockIdx.y;
  const int64_t length = p.num_draft[b];
  if (j > length || !request_is_valid(p, b)) return;  // uniform over the block
  const T* target_row = target_logits + (p.target_offset[b] + j) * p.target_stride;
  const float temperature = sanitize_temperature(p.temperature[b]);
  VerifyRowStats result{};
  result.threshold = -INFINITY;
  result.token = -1;

  if (!(temperature > 0.f)) {
    ArgMax best{-INFINITY, -1};
    for_each_element(target_row, p.vocab, [&](int64_t v, float x) {
      const float y = sanitize_logit(x);
      if (y > -INFINITY && beats(y, v, best)) best = {y, v};
    });
    best = block_allreduce<kVerifyThreads>(best);
    if (threadIdx.x == 0) {
      result.token = static_cast<int32_t>(best.index);
      p.stats[b * (p.max_draft + 1) + j] = result;
    }
    return;
  }

  const int64_t top_k = p.top_k ? p.top_k[b] : 0;
  const float top_p = p.top_p ? p.top_p[b] : 1.f;
  const bool k_on = top_k > 0 && top_k < p.vocab;
  const bool p_on = top_p < 1.f;
  const bool filtered = k_on || p_on;
  const bool bonus = j == length;
  const uint64_t seed = static_cast<uint64_t>(p.seed[b]);
  const uint64_t round_offset = static_cast<uint64_t>(p.offset[b]);

  // Pass over the target row: softmax statistics and, unfiltered, the bonus race. The
  // race key (x - m) / T - log E needs the row max m, not known until the pass ends, so
  // each thread keys against its running max and shifts its best key when that grows.
  SoftmaxStats target{-INFINITY, 0.f, temperature};
  ArgMax race{-INFINITY, -1};
  RandomRow random(seed, kStreamResample, static_cast<uint32_t>(length), round_offset);
  const bool race_now = bonus && !filtered;
  for_each_element(target_row, p.vocab, [&](int64_t v, float raw) {  // sass budget: plain row pass
    const float x = sanitize_logit(raw);
    if (race_now && x > -INFINITY) {
      const float running_max = fmaxf(target.max, x);
      if (running_max > target.max && race.index >= 0) race.key += (target.max - running_max) / temperature;
      const float key = race_key_log((x - running_max) / temperature, random.word(v));
      if (beats(key, v, race)) race = {key, v};
    }
    target.add(x);
  });
  const float thread_max = target.max;
  target = block_allreduce<kVerifyThreads>(target);
  if (race_now && race.index >= 0) race.key += (thread_max - target.max) / temperature;
  float threshold = -INFINITY;
  float mass = target.sum;
  if (filtered && target.max > -INFINITY) {
    __shared__ RadixState radix;
    if (k_on) threshold = radix_threshold(target_row, p.vocab, temperature, target.max, -INFINITY, false, top_k, 0.f, radix);
    if (p_on) threshold = radix_threshold(target_row, p.vocab, temperature, target.max, threshold, true, 0, top_p, radix);
    // Mass of the kept tokens and, for the bonus position, the race among them.
    float kept_mass = 0.f;
    for_each_element(target_row, p.vocab, [&](int64_t v, float raw) {
      const float x = sanitize_logit(raw);
      if (x == -INFINITY || x < threshold) return;
      const float relative = (x - target.max) / temperature;
      kept_mass += expf(relative);
      if (bonus) {
        const float key = race_key_log(relative, random.word(v));
        if (beats(key, v, race)) race = {key, v};
      }
    });
    mass = block_allreduce<kVerifyThreads>(kept_mass);
  }
  const float row_max = target.max > -INFINITY ? target.max : 0.f;
  result.target_max = row_max;
  result.target_mass = mass;
  result.threshold = threshold;

  if (bonus) {
    race = block_allreduce<kVerifyThreads>(race);
    result.token = static_cast<int32_t>(race.index);
  } else {
    const int64_t token = p.draft_tokens[b * p.max_draft + j];
    const float x_token = sanitize_logit(to_float(target_row[token]));
    const float p_target = (mass > 0.f && x_token > -INFINITY && x_token >= threshold)
                               ? expf((x_token - row_max) / temperature) / mass : 0.f;
    float p_draft = 1.f;
    if constexpr (kHasDraft) {
      const T* draft_row = draft_logits + (b * p.max_draft + j) * p.vocab;
      SoftmaxStats draft{-INFINITY, 0.f, temperature};
      for_each_element(draft_row, p.vocab, [&](int64_t, float raw) { draft.add(sanitize_logit(raw)); });
      draft = block_allreduce<kVerifyThreads>(draft);
      const float draft_max = draft.max > -INFINITY ? draft.max : 0.f;
      const float x_draft = sanitize_logit(to_float(draft_row[token]));
      p_draft = (draft.sum > 0.f && x_draft > -INFINITY) ? expf((x_draft - draft_max) / temperature) / draft.sum : 0.f;
      result.draft_max = draft_max;
      result.draft_mass = draft.sum;
    }
    const uint32_t word = random_word(seed, kStreamAccept, static_cast<uint32_t>(j), round_offset, 0);
    result.accepted = accept_draft(word, p_target, p_draft) ? 1 : 0;
  }
  if (threadIdx.x == 0) p.stats[b * (p.max_draft + 1) + j] = result;
}

// ---------------------------------------------------------------- kernel 2: finish
template <typename T, bool kHasDraft>
__global__ void __launch_bounds__(kVerifyThreads, 2) verify_finish_kernel(const T* __restrict__ target_logits,
                                                                       const T* __restrict__ draft_logits,
                                                                       VerifyParams p) {
  const int64_t b = blockIdx.x;
  const int64_t width = p.max_draft + 1;
  int64_t* out = p.out_tokens + b * width;
  if (!request_is_valid(p, b)) {
    for (int64_t j = threadIdx.x; j < width; j += blockDim.x) out[j] = -1;
    if (threadIdx.x == 0) p.num_accepted[b] = -1;
    return;
  }
  const int64_t length = p.num_draft[b];
  const float temperature = sanitize_temperature(p.temperature[b]);
  const bool greedy = !(temperature > 0.f);
  const VerifyRowStats* stats = p.stats + b * width;
  const int64_t* drafts = p.draft_tokens + b * p.max_draft;

  // First rejected position (length if none); every thread computes it, K is small.
  int64_t accepted = 0;
  while (accepted < length &&
         (greedy ? (stats[accepted].token >= 0 && drafts[accepted] == stats[accepted].token)
                 : stats[accepted].accepted != 0))
    ++accepted;

  int64_t emitted = stats[accepted].token;  // greedy argmax, or the bonus token
  if (!greedy && accepted < length) {
    const VerifyRowStats row = stats[accepted];
    const int64_t token = drafts[accepted];
    const T* target_row = target_logits + (p.target_offset[b] + accepted) * p.target_stride;
    RandomRow random(static_cast<uint64_t>(p.seed[b]), kStreamResample, static_cast<uint32_t>(accepted),
                     static_cast<uint64_t>(p.offset[b]));
    ArgMax residual_race{-INFINITY, -1};
    ArgMax target_race{-INFINITY, -1};  // used only if the residual has no mass
    auto visit = [&](int64_t v, float raw_target, float raw_draft) {
      const float x = sanitize_logit(raw_target);
      const bool kept = x > -INFINITY && x >= row.threshold;
      const float relative = (x - row.target_max) / temperature;
      const float p_target = (kept && row.target_mass > 0.f) ? expf(relative) / row.target_mass : 0.f;
      float p_draft;
      if constexpr (kHasDraft) {
        const float x_draft = sanitize_logit(raw_draft);
        p_draft = (row.draft_mass > 0.f && x_draft > -INFINITY)
                      ? expf((x_draft - row.draft_max) / temperature) / row.draft_mass : 0.f;
      } else {
        p_draft = v == token ? 1.f : 0.f;
      }
      const float residual = fmaxf(p_target - p_draft, 0.f);
      if (!(residual > 0.f) && !kept) return;
      const uint32_t word = random.word(v);
      if (residual > 0.f) {
        const float key = race_key_prob(residual, word);
        if (beats(key, v, residual_race)) residual_race = {key, v};
      }
      if (kept) {
        const float key = race_key_log(relative, word);
        if (beats(key, v, target_race)) target_race = {key, v};
      }
    };
    if constexpr (kHasDraft) {
      // sass budget: residual pass (the call below)
      for_each_pair(target_row, draft_logits + (b * p.max_draft + accepted) * p.vocab, p.vocab, visit);
    } else {
      for_each_element(target_row, p.vocab, [&](int64_t v, float raw) { visit(v, raw, 0.f); });
    }
    residual_race = block_allreduce<kVerifyThreads>(residual_race);
    target_race = block_allreduce<kVerifyThreads>(target_race);
    emitted = residual_race.index >= 0 ? residual_race.index : target_race.index;
  }
  for (int64_t j = threadIdx.x; j < width; j += blockDim.x)
    out[j] = j < accepted ? drafts[j] : (j == accepted ? emitted : -1);
  if (threadIdx.x == 0) p.num_accepted[b] = static_cast<int32_t>(accepted);
}

}  // namespace dspark
