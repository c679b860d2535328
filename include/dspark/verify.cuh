// CUDA kernels of verify: lossless speculative sampling over the whole vocabulary.
//
// Rows are cut into slices of kVerifySlice elements, a size that does not depend on the
// batch (so a request's arithmetic is the same at every B: batch invariance), and every
// slice is a block, so that B = 1 fills the GPU as well as B = 256. Two launches (three
// with top-k/top-p), no host synchronisation:
//  1. verify_slices_kernel, grid (B, slices, K+1): the block of (b, slice, j <= L_b) loads
//     its slice of target row j (and of draft row j < L_b) into registers and reduces it
//     to one VerifyPartial: the slice max and base-2 mass, and for the bonus row the race
//     winner; greedy rows the argmax. Top-k/top-p target rows are left to
//  1b. verify_filter_kernel (sm_90, launched only when top_k or top_p is given): one
//     thread-block cluster per row holds the row in shared memory, so the radix select of
//     the threshold reads it from memory once; it writes the row's result as its slice-0
//     partial. Where clusters are unavailable (or the row does not fit on chip), kernel 1's
//     slice-0 block handles such a row whole, reading it once per radix pass.
//  2. verify_finish_kernel, grid (B, slices): every block merges its request's partials in
//     a fixed order (a few hundred bytes from L2), decides the acceptances and finds the
//     first rejection; if there is one, each block races over its slice of the rejected
//     row pair (the residual) and the last block to finish merges the slices' winners in
//     slice order and writes the outputs.
// The per-element arithmetic is the spec's (dspark_ext/reference.py) in base 2: a weight
// is fast_exp2((x - m) * s) with s = log2(e) / T per row, a race key weight / E' with E'
// from exponential2_fast, no division per element, 32-bit indices inside a row.
#pragma once

#include <cooperative_groups.h>

#include <cstdint>

#include "dspark/cluster.cuh"
#include "dspark/math.h"
#include "dspark/reduce.cuh"

namespace dspark {

namespace cg = cooperative_groups;

constexpr int kVerifyThreads = 256;
constexpr int kVerifySlice = 8192;  // elements of one slice: 32 a thread for every dtype

// One (request, row j, slice) of the first kernel.
struct VerifyPartial {
  float target_max;  // max of the slice's kept x (-inf if none)
  float target_sum;  // sum over them of exp2((x - target_max) * s)
  float draft_max;
  float draft_sum;
  float key;         // greedy: the argmax's value; bonus row: the race's best w / E', w relative to target_max
  int32_t index;     // greedy: argmax; bonus row: race winner; -1 if none
  float threshold;   // top-k/top-p row (slice 0): kept iff x >= threshold; -inf otherwise
  int32_t padding;
};

struct ResidualPartial {
  float key;
  int32_t index;
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
  VerifyPartial* partials;       // [B, K+1, slices] workspace
  ResidualPartial* residuals;    // [B, slices] workspace
  uint32_t* finished;            // [B] blocks of the second kernel done (zeroed by the first)
  int64_t batch;
  int64_t max_draft;             // K
  int64_t vocab;                 // V (< 2^31)
  int64_t rows;                  // Nt
  int64_t target_stride;         // elements between target rows
  int32_t slices;                // ceil(V / kVerifySlice)
  int32_t filter_in_cluster;     // top-k/top-p target rows: verify_filter_kernel (else slice 0 of kernel 1)
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
// (top-p; the row maximum always qualifies), the mass of x being exp2((x - max) * s).
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

// round(exp2((x - max) s) 2^scale), with unit = 2^scale as a float (an exact scaling).
__device__ __forceinline__ unsigned long long fixed_mass(float x, float row_max, float exp2_scale_, float unit) {
  return __float2ull_rn(fast_exp2((x - row_max) * exp2_scale_) * unit);
}

// The top-p limit, rounded as the spec rounds it: float32 top_p times the float32 total;
// and a fixed-point mass in the same units, for comparisons with it.
__device__ __forceinline__ float fixed_to_float(unsigned long long mass, int scale) {
  return static_cast<float>(ldexp(static_cast<double>(mass), -scale));
}
__device__ __forceinline__ float top_p_limit(float mass_fraction, unsigned long long total, int scale) {
  return mass_fraction * fixed_to_float(total, scale);
}

// One level of the radix select, by warp 0 once st.count / st.mass hold the level's
// histogram (digit (key >> shift) & 255 of the candidates): chooses the lowest digit that
// still satisfies the limit and appends it to st.prefix (st.chosen = 256: none). The top-p
// reference mass is the candidates' (first level) unless total_given (st.total_mass set).
__device__ __forceinline__ void radix_choose(RadixState& st, int shift, bool mass_mode, int64_t count_limit,
                                             float mass_fraction, int scale, bool total_given = false) {
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
  if (shift == 24 && !total_given) {
    // The first level sees every candidate: their mass is the top-p reference.
    const unsigned long long total = __shfl_sync(0xFFFFFFFFu, incl_mass, 31);
    if (lane == 0) st.total_mass = total;
  }
  __syncwarp();
  const float mass_limit = top_p_limit(mass_fraction, st.total_mass, scale);
  uint32_t run_count = st.above_count + incl_count - lane_count;
  unsigned long long run_mass = st.above_mass + incl_mass - lane_mass;
  int candidate = 256;
  uint32_t cand_count = 0;
  unsigned long long cand_mass = 0;
  for (int i = 0; i < 8; ++i) {
    const int digit = 255 - 8 * lane - i;
    if (st.count[digit] > 0) {
      const bool ok = mass_mode ? (run_count == 0 || fixed_to_float(run_mass, scale) < mass_limit)
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

template <typename T>
__device__ float radix_threshold(const T* row, int64_t vocab, float exp2_scale_, float row_max, float floor,
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
      if (mass_mode) atomicAdd(&st.mass[digit], fixed_mass(y, row_max, exp2_scale_, ldexpf(1.f, scale)));
    });
    __syncthreads();
    if (threadIdx.x < 32) radix_choose(st, shift, mass_mode, count_limit, mass_fraction, scale);
    __syncthreads();
    if (st.chosen == 256) break;  // unreachable for a non-empty row
  }
  const float threshold = st.chosen == 256 ? -INFINITY : key_to_float(st.prefix);
  __syncthreads();  // every thread has read st before a later call resets it
  return threshold;
}

// ---------------------------------------------------------------- slices
// A thread's part of one slice: kChunks chunks of 16 bytes, chunk i of the thread being
// slice chunk threadIdx.x + i * kVerifyThreads (coalesced), sanitized, -inf past the row.
template <typename T>
struct Slice {
  static constexpr int kVec = RowChunks<T>::kVec;
  static constexpr int kChunks = kVerifySlice / (kVec * kVerifyThreads);
  static_assert(kChunks * kVec * kVerifyThreads == kVerifySlice, "a slice is whole chunks of every thread");
  float x[kChunks][kVec];

  // Index in the row of element e of chunk i.
  __device__ __forceinline__ static int index(int slice, int i, int e) {
    return (slice * (kVerifySlice / kVec) + threadIdx.x + i * kVerifyThreads) * kVec + e;
  }
  // index(slice, i, e) - index(slice, 0, 0): a constant in unrolled code.
  __device__ __forceinline__ static constexpr int offset(int i, int e) { return i * kVerifyThreads * kVec + e; }

  // All loads are issued before any value is used. kFull: the slice lies inside the row
  // and the row is 16-byte aligned (every slice but a row's last, for real vocabularies),
  // so every chunk is one 16-byte load; otherwise element by element, -inf past the row.
  // kSanitize = false: the values as they are (NaN and +inf left for the caller).
  template <bool kFull, bool kSanitize = true>
  __device__ __forceinline__ void load(const T* row, int vocab, int slice) {
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int first = index(slice, i, 0);
      if constexpr (kFull) {
        load_chunk(row, first / kVec, vocab, true, x[i]);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) x[i][e] = first + e < vocab ? to_float(row[first + e]) : -INFINITY;
      }
      if constexpr (kSanitize)
#pragma unroll
        for (int e = 0; e < kVec; ++e) x[i][e] = sanitize_logit(x[i][e]);
    }
  }

  // Whether load<true> applies to this slice of this row.
  __device__ __forceinline__ static bool full(const T* row, int vocab, int slice) {
    return is_aligned16(row) && (slice + 1) * kVerifySlice <= vocab;
  }

  __device__ __forceinline__ float max() const {
    float m = -INFINITY;
#pragma unroll
    for (int i = 0; i < kChunks; ++i)
#pragma unroll
      for (int e = 0; e < kVec; ++e) m = fmaxf(m, x[i][e]);
    return m;
  }
};

// Max, base-2 mass and race leader of a set of elements; the leader's key is relative to
// `max` like the mass. Merged by block_reduce (fixed order) and across slices.
struct MassStats {
  float max;
  float sum;
  float key;
  int32_t index;
};

__device__ __forceinline__ MassStats merge_mass(MassStats a, MassStats b, float scale) {
  if (b.max == -INFINITY) return a;
  if (a.max == -INFINITY) return b;
  const float m = fmaxf(a.max, b.max);
  const float fa = fast_exp2((a.max - m) * scale), fb = fast_exp2((b.max - m) * scale);
  const float ka = a.key * fa, kb = b.key * fb;
  const bool b_wins = b.index >= 0 && (a.index < 0 || kb > ka || (kb == ka && b.index < a.index));
  return {m, a.sum * fa + b.sum * fb, b_wins ? kb : ka, b_wins ? b.index : a.index};
}

// Max and base-2 mass only (rows without a race): a cheaper merge for the reductions.
struct Mass {
  float max;
  float sum;
};

__device__ __forceinline__ Mass merge_mass(Mass a, Mass b, float scale) {
  if (b.max == -INFINITY) return a;
  if (a.max == -INFINITY) return b;
  const float m = fmaxf(a.max, b.max);
  return {m, a.sum * fast_exp2((a.max - m) * scale) + b.sum * fast_exp2((b.max - m) * scale)};
}

__device__ __forceinline__ Mass shfl_xor(Mass v, int mask) { return {shfl_xor(v.max, mask), shfl_xor(v.sum, mask)}; }

__device__ __forceinline__ MassStats shfl_xor(MassStats v, int mask) {
  return {shfl_xor(v.max, mask), shfl_xor(v.sum, mask), shfl_xor(v.key, mask), __shfl_xor_sync(0xFFFFFFFFu, v.index, mask)};
}

// ---------------------------------------------------------------- the race, pruned
// A thread's race argmax r / E' (ties to the smaller index) over its elements, with E'
// computed only for the few elements that can matter. An element can reach a key B only
// if E' <= r / B, and E' = -log2(u) >= (1 - u) log2(e) with 1 - u = (~c + 1/2) 2^-32 (c
// its Philox word), so only if (2^32 - 1 - c) bound <= r with bound = B 2^-32 / ln(2),
// i.e. c bound + r >= (2^32 - 1) bound: one FFMA and a compare. The test takes bound
// 2^-8 smaller (far more than the 2^-20 of the keys) and the cut 1024 bound lower (more
// than the rounding of float(c), of the FFMA and of the cut, all within 640 bound).
// B is the best key of the warp so far (so the lanes' r must share one base): the warp
// evaluates eight elements exactly (race_group, out of line, per four) only when one of
// its lanes has a candidate among them, and then refreshes B. A skipped element has a key
// below B, so the block's winner is that of the exhaustive race over the same keys. The
// test is three instructions an element (no clamping of r: a negative or NaN r fails it);
// the exact evaluation runs for about H(4) = 2.1 of a warp's four steps (a new record
// among the warp's keys).
struct RaceLeader {
  float key;      // the thread's best key (0 while none: a zero r never wins)
  int32_t index;  // -1 while none
  float bound;    // warp-uniform B 2^-32 / (ln(2) (1 + 2^-8)); 0 while B = 0 (see race_bound)
  float cut;      // (2^32 - 1024) bound: candidate iff c bound + r >= cut (r >= 0 while B = 0)
};

__device__ __forceinline__ RaceLeader race_start() { return {0.f, -1, 0.f, 0.f}; }

// The test's bound and cut for B = max(best, the B so far) (B never decreases: a seed
// from another thread may exceed the warp's own best). A bound below the normal range
// (B below about 2^-94) is not used: rounded as a subnormal it can exceed the 2^-8
// margin, and the element holding B would fail its own test; bound 0 admits every r >= 0.
__device__ __forceinline__ RaceLeader race_bound(RaceLeader leader, float best) {
  const float bound = best * (0x1p-32f / (0.69314718f * (1.f + 0x1p-8f)));
  leader.bound = fmaxf(leader.bound, bound >= 0x1p-126f ? bound : 0.f);
  leader.cut = (0x1p32f - 1024.f) * leader.bound;
  return leader;
}

__device__ __forceinline__ bool race_candidate(float r, uint32_t word, const RaceLeader& leader) {
  return fmaf(static_cast<float>(word), leader.bound, r) >= leader.cut;
}

// The exact keys of the candidates of a group of four consecutive elements (first, ...,
// first + 3) of r (unclamped: the key is of max(r, 0); the element `one_hot`, if in the
// group, has r - 1: the one-hot draft), then the warp's B. Called by the whole warp.
__device__ __noinline__ inline RaceLeader race_group(RaceLeader leader, float r0, float r1, float r2, float r3,
                                                     uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, int first,
                                                     int one_hot) {
  const float r[4] = {r0, r1, r2, r3};
  const uint32_t c[4] = {c0, c1, c2, c3};
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    if (!race_candidate(r[e], c[e], leader)) continue;
    const float residual = fmaxf(first + e == one_hot ? r[e] - 1.f : r[e], 0.f);
    const float key = fast_divide(residual, exponential2_fast(c[e]));
    if (key > leader.key) {  // increasing order within the thread: ties keep the first
      leader.key = key;
      leader.index = first + e;
    }
  }
  float warp_best = leader.key;
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) warp_best = fmaxf(warp_best, shfl_xor(warp_best, mask));
  return race_bound(leader, warp_best);
}

// The seed of B at a warp's first race step (where B = 0 admits every element): of each
// lane's eight elements, the one whose key can be largest (r / (~c + 1/2) largest: the
// bound of the test), evaluated exactly (the key race_group computes for it, bit for bit),
// and B = their maximum over the warp. The element holding it is a candidate at every B up
// to its key, so it is evaluated and the winner's key is at least B. One exact key a lane
// instead of eight; race_group then evaluates only the few elements above the seed.
__device__ __forceinline__ RaceLeader race_seed(RaceLeader leader, const float (&r)[2][4], const Philox4 (&words)[2],
                                                const int (&first)[2], int one_hot) {
  float best_bound = 0.f, best_residual = 0.f;
  uint32_t best_word = 0u;
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float residual = fmaxf(first[h] + e == one_hot ? r[h][e] - 1.f : r[h][e], 0.f);  // NaN: 0
      // The choice need not be exact (any element gives a valid seed): 2^32 - c in float.
      const float bound = fast_divide(residual, 0x1p32f - static_cast<float>(words[h].x[e]));
      if (bound > best_bound) {
        best_bound = bound;
        best_residual = residual;
        best_word = words[h].x[e];
      }
    }
  float seed = best_bound > 0.f ? fast_divide(best_residual, exponential2_fast(best_word)) : 0.f;
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) seed = fmaxf(seed, shfl_xor(seed, mask));
  return race_bound(leader, seed);
}

// Two groups of four consecutive elements (first[h], ...) of every lane of the warp (all
// lanes call it): one vote for the eight.
// kSeed (the warp's first step): B is seeded first (race_seed), inside the voted branch,
// so the seed's code is the rare path's too.
template <bool kSeed = false>
__device__ __forceinline__ RaceLeader race_step(RaceLeader leader, const float (&r)[2][4], const Philox4 (&words)[2],
                                                const int (&first)[2], int one_hot = -1) {
  bool any = false;
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int e = 0; e < 4; ++e) any |= race_candidate(r[h][e], words[h].x[e], leader);
  if (__any_sync(0xFFFFFFFFu, any)) {
    if constexpr (kSeed) leader = race_seed(leader, r, words, first, one_hot);
#pragma unroll
    for (int h = 0; h < 2; ++h)
      leader = race_group(leader, r[h][0], r[h][1], r[h][2], r[h][3], words[h].x[0], words[h].x[1], words[h].x[2],
                          words[h].x[3], first[h], one_hot);
  }
  return leader;
}

// The thread's part of a slice of a row: its max, its mass and, with kRace, its race argmax
// w / E' (stream 2, position `position`): one Philox call per 4 elements, E' once per element.
template <bool kRace, bool kFull, typename T>
__device__ __forceinline__ MassStats slice_mass(const T* row, int vocab, int slice, float scale, uint64_t seed,
                                                uint32_t position, uint64_t round_offset) {
  constexpr int kVec = Slice<T>::kVec;
  Slice<T> s;
  s.template load<kFull>(row, vocab, slice);
  float m = s.max();
  // The race compares keys across the warp (race_step's bound), so with kRace the weights
  // of every lane are relative to the warp's max (the mass and key merge at any base).
  if constexpr (kRace)
#pragma unroll
    for (int mask = 16; mask > 0; mask >>= 1) m = fmaxf(m, shfl_xor(m, mask));
  const float base = m == -INFINITY ? 0.f : m;
  float sum[2] = {0.f, 0.f};  // two chains of additions, a fixed order
  RaceLeader leader = race_start();
  constexpr int kGroups = Slice<T>::kChunks * kVec / 4;  // groups of four elements a thread
  static_assert(kGroups % 2 == 0, "race steps of two groups");
  [[maybe_unused]] const int first_index = Slice<T>::index(slice, 0, 0);  // a multiple of 4
  [[maybe_unused]] PhiloxKeys keys;
  if constexpr (kRace) keys = philox_keys_held(seed);
#pragma unroll
  for (int q = 0; q < kGroups; q += 2) {
    float w[2][4];
    [[maybe_unused]] Philox4 words[2];
    [[maybe_unused]] int first[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int i = (q + h) / (kVec / 4), g = (q + h) % (kVec / 4) * 4;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        w[h][e] = fast_exp2((s.x[i][g + e] - base) * scale);
        sum[e & 1] += w[h][e];
      }
      if constexpr (kRace) {
        first[h] = first_index + Slice<T>::offset(i, g);
        words[h] = random_group(keys, kStreamResample, position, round_offset,
                                static_cast<uint32_t>(first_index >> 2) + Slice<T>::offset(i, g) / 4);
      }
    }
    if constexpr (kRace) leader = q == 0 ? race_step<true>(leader, w, words, first) : race_step(leader, w, words, first);
  }
  return {m, sum[0] + sum[1], leader.key, leader.index};
}

// A row's last (partial) slice or an unaligned row: out of line, so that the kernels'
// hot code is the full-slice path.
template <bool kRace, typename T>
__device__ __noinline__ MassStats slice_mass_partial(const T* row, int vocab, int slice, float scale, uint64_t seed,
                                                     uint32_t position, uint64_t round_offset) {
  return slice_mass<kRace, false>(row, vocab, slice, scale, seed, position, round_offset);
}

template <bool kRace, typename T>
__device__ __forceinline__ MassStats slice_mass(const T* row, int vocab, int slice, float scale, uint64_t seed,
                                                uint32_t position, uint64_t round_offset) {
  return Slice<T>::full(row, vocab, slice)
             ? slice_mass<kRace, true>(row, vocab, slice, scale, seed, position, round_offset)
             : slice_mass_partial<kRace>(row, vocab, slice, scale, seed, position, round_offset);
}

// Greedy: the thread's argmax of its part of a slice (ties to the smaller index).
template <bool kFull, typename T>
__device__ __forceinline__ ArgMax slice_argmax(const T* row, int vocab, int slice) {
  Slice<T> s;
  s.template load<kFull>(row, vocab, slice);
  float best = -INFINITY;
  int best_index = -1;
#pragma unroll
  for (int i = 0; i < Slice<T>::kChunks; ++i)
#pragma unroll
    for (int e = 0; e < Slice<T>::kVec; ++e)
      if (s.x[i][e] > best) {
        best = s.x[i][e];
        best_index = Slice<T>::index(slice, i, e);
      }
  return {best, best_index};
}

template <typename T>
__device__ __noinline__ ArgMax slice_argmax_partial(const T* row, int vocab, int slice) {
  return slice_argmax<false>(row, vocab, slice);
}

template <typename T>
__device__ __forceinline__ ArgMax slice_argmax(const T* row, int vocab, int slice) {
  return Slice<T>::full(row, vocab, slice) ? slice_argmax<true>(row, vocab, slice)
                                           : slice_argmax_partial(row, vocab, slice);
}

// The kept mass of a filtered row and, for the bonus row (race), the race among the kept
// tokens: element v with logit x >= threshold adds w = 2^((x - max) s) and races with the
// key w / E' of word v of the resample stream. A thread's part; the caller reduces.
struct KeptRace {
  float threshold, row_max, scale;
  bool race;
  RandomRow random;
  float kept_mass = 0.f;
  ArgMax best{0.f, -1};

  __device__ __forceinline__ void add(int64_t v, float raw) {
    const float x = sanitize_logit(raw);
    if (x == -INFINITY || x < threshold) return;
    const float w = fast_exp2((x - row_max) * scale);
    kept_mass += w;
    if (race) {
      const float key = fast_divide(w, exponential2_fast(random.word(v)));
      if (key > best.key) best = {key, v};
    }
  }
};

// A top-k/top-p row, whole, by one block: online max and mass, the radix select of the
// threshold, then the kept mass and, for the bonus row, the race among the kept tokens.
template <typename T>
__device__ MassStats filtered_row(const T* row, int64_t vocab, float scale, int64_t top_k, float top_p, bool race,
                                  uint64_t seed, uint32_t position, uint64_t round_offset, float& threshold) {
  float thread_max = -INFINITY;
  for_each_element(row, vocab, [&](int64_t, float raw) { thread_max = fmaxf(thread_max, sanitize_logit(raw)); });
  const float row_max = block_allreduce<kVerifyThreads>(thread_max, [](float a, float b) { return fmaxf(a, b); });
  threshold = -INFINITY;
  if (row_max == -INFINITY) return {-INFINITY, 0.f, 0.f, -1};
  __shared__ RadixState radix;
  const bool k_on = top_k > 0 && top_k < vocab;
  if (k_on) threshold = radix_threshold(row, vocab, scale, row_max, -INFINITY, false, top_k, 0.f, radix);
  if (top_p < 1.f) threshold = radix_threshold(row, vocab, scale, row_max, threshold, true, 0, top_p, radix);
  KeptRace kept{threshold, row_max, scale, race, RandomRow(seed, kStreamResample, position, round_offset)};
  for_each_element(row, vocab, [&](int64_t v, float raw) { kept.add(v, raw); });
  const float kept_mass = block_allreduce<kVerifyThreads>(kept.kept_mass);
  const ArgMax best = block_allreduce<kVerifyThreads>(kept.best);
  return {row_max, kept_mass, best.key, static_cast<int32_t>(best.index)};
}

// ---------------------------------------------------------------- filtered rows, read once
// verify_filter_kernel: a top-k/top-p target row is handled by one thread-block cluster of
// kFilterCluster blocks (sm_90). Block r copies elements [r P, r P + P) of the row into its
// shared memory (P = filter_portion(V)), so the row is read from memory once; the radix
// select of the threshold then runs on chip: every pass builds per-warp 32-bit histograms of
// the block's portion, each block adds them into its block histogram, and every block
// sums the cluster's block histograms (distributed shared memory, integers: the sum is
// exact in any order) and chooses the same digit. Last, each block sums the kept mass of
// its portion and (bonus row) races over it; block 0 merges the blocks' results in rank
// order and writes them as the row's slice-0 partial.
constexpr int kFilterCluster = 8;
constexpr int kFilterWarps = kVerifyThreads / 32;
static_assert(kVerifyThreads == 256, "one histogram bin a thread");

// Elements of a row a block of the cluster holds: a multiple of 8 (16 bytes of bf16/fp16,
// 32 of float), so every block's portion starts 16-byte aligned in an aligned row.
__host__ __device__ constexpr int64_t filter_portion(int64_t vocab) {
  return ((vocab + kFilterCluster - 1) / kFilterCluster + 7) / 8 * 8;
}

struct FilterShared {
  uint32_t warp_count[kFilterWarps][256];  // a pass's per-warp histograms
  uint32_t warp_mass_low[kFilterWarps][256];  // fixed-point masses, 64 bits as two words
  uint32_t warp_mass_high[kFilterWarps][256];
  uint32_t block_count[2][256];  // the block's histogram of a pass, read by the cluster; two
  unsigned long long block_mass[2][256];  // buffers, so that one cluster barrier a pass suffices
  RadixState radix;  // the cluster's histogram and the selection (the same in every block)
  uint32_t block_above;  // the block's candidates above the chosen prefix's bucket
  uint32_t block_fits;   // they and the bucket's fit in the candidate list
  uint32_t list_size;    // keys in the candidate list
  float block_max;    // the block's max, read by the cluster
  MassStats results[kFilterCluster];  // in block 0: every block's kept mass and race winner
  // Read by the other blocks of the cluster, each written once (see filter_list_above):
  float block_guess;   // the block's bound for the top-k guess
  unsigned long long block_total;  // the block's fixed-point mass (top-p alone)
  float block_moments[2];          // and its sums of w t, w t^2 (t = (x - max) s, w = 2^t)
  uint32_t listed[2];  // per guess: elements >= it in the block (the list holds the first `capacity`)
  unsigned long long listed_mass[2];  // their fixed-point mass (top-p alone)
  float warp_guess[kFilterWarps];
  float scratch_float[kFilterWarps];
  ArgMax scratch_argmax[kFilterWarps];
  unsigned long long scratch_mass[kFilterWarps];
};

// The candidate list of a block: once the radix select has narrowed the candidates to few,
// the ordered keys of those with key >= the prefix chosen so far (the bucket and everything
// above it, so a later top-p select over x >= the top-k threshold finds all of its
// candidates there too) are written to shared memory during the next pass, and the passes
// after it read the list instead of the portion. Capacity: a quarter of the portion.
__host__ __device__ constexpr int64_t filter_list_capacity(int64_t vocab) { return filter_portion(vocab) / 4; }

// Dynamic shared memory of verify_filter_kernel: FilterShared, the portion, the list.
template <typename T>
__host__ __device__ constexpr size_t filter_shared_bytes(int64_t vocab) {
  return (sizeof(FilterShared) + 15) / 16 * 16 + static_cast<size_t>(filter_portion(vocab)) * sizeof(T) +
         static_cast<size_t>(filter_list_capacity(vocab)) * sizeof(uint32_t);
}

// Where a pass reads its elements: the block's portion (size < 0) or its candidate list.
template <typename T>
struct FilterSource {
  const T* data;
  int n;          // elements of the portion
  uint32_t* list;
  int capacity;   // of the list
  int size;       // keys in the list; -1 while there is none
};

// Appends `key` (lanes with keep) to the block's candidate list with one shared atomic a
// warp; every append is counted in sh.list_size, the list holds the first `capacity`.
// Warp-uniform call: the ballot needs every lane.
template <typename T>
__device__ __forceinline__ void list_append(const FilterSource<T>& source, FilterShared& sh, bool keep,
                                            uint32_t key) {
  const int lane = threadIdx.x % 32;
  const unsigned keepers = __ballot_sync(0xFFFFFFFFu, keep);
  if (keepers == 0u) return;
  const int first = __ffs(static_cast<int>(keepers)) - 1;
  uint32_t slot = 0;
  if (lane == first) slot = atomicAdd(&sh.list_size, static_cast<uint32_t>(__popc(keepers)));
  slot = __shfl_sync(0xFFFFFFFFu, slot, first) + __popc(keepers & ((1u << lane) - 1u));
  if (keep && slot < static_cast<uint32_t>(source.capacity)) source.list[slot] = key;
}

// One radix level over the block's elements: the per-warp histograms of the digit
// (key >> shift) & 255 of the candidates (x >= floor, key matching st.prefix above the
// digit), with their fixed-point masses in mass mode. The lanes of a warp with the same
// digit count once (match), so a warp's count bins take one atomic per distinct digit;
// a 64-bit mass goes in as two 32-bit atomic adds (native on sm_90, where 64-bit shared
// atomic adds are compare-and-swap loops), the carry of the low word into the high.
// build: also appends the keys >= list_bound (x >= floor) to the list.
template <bool kFromList, typename T>
__device__ __forceinline__ void filter_histogram(const FilterSource<T>& source, FilterShared& sh, int shift,
                                                 float floor, bool mass_mode, float row_max, float exp2_scale_,
                                                 int scale, bool build, uint32_t list_bound) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int i = lane; i < 256; i += 32) {
    sh.warp_count[warp][i] = 0;
    sh.warp_mass_low[warp][i] = 0;
    sh.warp_mass_high[warp][i] = 0;
  }
  __syncwarp();
  // Candidates: x >= floor and x > -inf (x is sanitized: x >= -FLT_MAX), key bits above the
  // digit equal to the prefix chosen so far.
  const float lowest = fmaxf(floor, -FLT_MAX);
  const uint32_t high_mask = shift == 24 ? 0u : ~0u << (shift + 8);
  const uint32_t high_prefix = sh.radix.prefix & high_mask;
  const float unit = ldexpf(1.f, scale);
  const int n = kFromList ? source.size : source.n;
#pragma unroll 2
  for (int base = 0; base < n; base += kVerifyThreads) {  // uniform trip count: the block's n
    const int i = base + static_cast<int>(threadIdx.x);
    float y;
    uint32_t key;
    if constexpr (kFromList) {
      key = i < n ? source.list[i] : 0u;  // key 0 is below -inf's: never a candidate
      y = key_to_float(key);
    } else {
      y = i < n ? sanitize_logit(to_float(source.data[i])) : -INFINITY;
      key = ordered_key(y);
    }
    const bool eligible = y >= lowest;
    const bool candidate = eligible && (key & high_mask) == high_prefix;
    const int digit = candidate ? static_cast<int>((key >> shift) & 0xFF) : 256;
    const unsigned peers = __match_any_sync(0xFFFFFFFFu, digit);
    const bool leader = (peers & ((1u << lane) - 1u)) == 0u;
    if (candidate && leader) atomicAdd(&sh.warp_count[warp][digit], static_cast<uint32_t>(__popc(peers)));
    if (mass_mode && candidate) {
      // Each lane adds its own mass (a group sum would take one redux per distinct digit of
      // the warp): the low word, then the high word with the carry the low add produced.
      // The sum of all masses is below 2^63 (mass_scale_exponent), so nothing overflows.
      const unsigned long long m = fixed_mass(y, row_max, exp2_scale_, unit);
      const uint32_t low = static_cast<uint32_t>(m);
      const uint32_t old = atomicAdd(&sh.warp_mass_low[warp][digit], low);
      const uint32_t high = static_cast<uint32_t>(m >> 32) + static_cast<uint32_t>(old + low < old);
      if (high != 0u) atomicAdd(&sh.warp_mass_high[warp][digit], high);
    }
    // Uniform; every key fits (block_fits counted them before).
    if (!kFromList && build) list_append(source, sh, eligible && key >= list_bound, key);
  }
}

// The radix select of filtered_row's radix_threshold, over the cluster's portions (and
// candidate lists, once built). given_total: the top-p reference mass when the candidates
// are not all of the set it is over (0: theirs; a non-empty row's mass is >= 2^scale > 0).
template <typename T>
__device__ float filter_threshold(FilterSource<T>& source, FilterShared& sh, float exp2_scale_, float row_max,
                                  float floor, bool mass_mode, int64_t count_limit, float mass_fraction,
                                  int64_t vocab, unsigned long long given_total = 0) {
  cg::cluster_group cluster = cg::this_cluster();
  const int scale = mass_scale_exponent(vocab);
  RadixState& st = sh.radix;
  if (threadIdx.x == 0) {
    st.prefix = 0;
    st.above_count = 0;
    st.above_mass = 0;
    st.total_mass = given_total;
    sh.block_above = 0;
    sh.block_fits = 0;
    sh.list_size = 0;
  }
  __syncthreads();
  int buffer = 0;
  for (int shift = 24; shift >= 0; shift -= 8, buffer ^= 1) {
    // The list is built in the pass after the one whose candidates (and those above) fit.
    const bool build = source.size < 0 && sh.block_fits;
    const uint32_t list_bound = st.prefix;  // the chosen digits, lower bits 0
    if (source.size >= 0)
      filter_histogram<true>(source, sh, shift, floor, mass_mode, row_max, exp2_scale_, scale, false, 0u);
    else
      filter_histogram<false>(source, sh, shift, floor, mass_mode, row_max, exp2_scale_, scale, build, list_bound);
    __syncthreads();
    if (build) source.size = static_cast<int>(sh.list_size);
    const int bin = threadIdx.x;
    uint32_t count = 0;
    unsigned long long mass = 0;
#pragma unroll
    for (int w = 0; w < kFilterWarps; ++w) {
      count += sh.warp_count[w][bin];
      mass += static_cast<unsigned long long>(sh.warp_mass_high[w][bin]) << 32 | sh.warp_mass_low[w][bin];
    }
    sh.block_count[buffer][bin] = count;
    sh.block_mass[buffer][bin] = mass;
    cluster.sync();  // every block's histogram is complete (and the previous level's reads done)
    count = 0;
    mass = 0;
    for (unsigned r = 0; r < kFilterCluster; ++r) {
      count += cluster.map_shared_rank(&sh.block_count[buffer][0], r)[bin];
      mass += cluster.map_shared_rank(&sh.block_mass[buffer][0], r)[bin];
    }
    st.count[bin] = count;
    st.mass[bin] = mass;
    __syncthreads();
    if (threadIdx.x < 32) {
      radix_choose(st, shift, mass_mode, count_limit, mass_fraction, scale, given_total != 0);
      __syncwarp();
      if (source.size < 0 && st.chosen < 256) {
        // This block's candidates above the chosen bucket, and whether they and the
        // bucket's would fit in the list (the keys >= the new prefix).
        uint32_t above = 0;
        for (int d = st.chosen + 1 + threadIdx.x; d < 256; d += 32) above += sh.block_count[buffer][d];
        for (int mask = 16; mask > 0; mask >>= 1) above += __shfl_xor_sync(0xFFFFFFFFu, above, mask);
        if (threadIdx.x == 0) {
          sh.block_above += above;
          sh.block_fits =
              sh.block_above + sh.block_count[buffer][st.chosen] <= static_cast<uint32_t>(source.capacity);
        }
      }
    }
    __syncthreads();
    if (st.chosen == 256) break;  // unreachable for a non-empty row; the same in every block
  }
  const float threshold = st.chosen == 256 ? -INFINITY : key_to_float(st.prefix);
  __syncthreads();  // every thread has read st before a later call resets it
  return threshold;
}

// ---------------------------------------------------------------- the guessed list
// The radix passes over a whole portion cost about 30 (count) to 45 (mass) instructions an
// element; a filtered row need not pay them. A bound g <= the threshold is guessed from
// what the row's first reads give, every block lists its elements >= g in one cheap pass
// (a max over each 16-byte chunk, and the list code only where a warp has an element that
// high), and the radix select runs over the lists alone when they are known to hold every
// token the filter can keep. Known, not hoped: the kernel checks it exactly; else (and
// when a list overflows) it takes the radix passes over the portions.
//  - top-k (k <= 64 * 32): each warp's j-th largest thread maximum, j = ceil(k / 64),
//    and g their minimum over the cluster's 64 warps. Every warp has j elements >= g,
//    so the row has at least 64 j >= k of them: the k-th largest value is >= g.
//  - top-p alone: one pass gives Z, the fixed-point mass of the row, and the first two
//    moments of t = (x - max) s under the masses. First guess: t = mean - (z_p + 1/2) sd
//    (z_p the normal quantile of p: exact for normal logits, whose mass-tilted law is
//    normal too); if its list misses mass, the safe one: the elements of mass below
//    eps = (1 - p) Z / (2 V) weigh at most (1 - p) Z / 2, so g = max + log2(eps) / s
//    always covers. The check: the listed mass reaches the limit p Z (with the rounding
//    the select compares with), so every token below g has a mass before it that is too
//    large to keep it. A list that overflows ends the guessing (a lower g lists more).
// The select over the lists is exact: every listed element has all the elements above it
// listed, so its count or mass before it is the row's.
constexpr int kFilterGuessRanks = kFilterCluster * kFilterWarps;  // warps of a cluster

// v sorted across the warp, lane l holding the l-th largest (bitonic network).
__device__ __forceinline__ float warp_sort_descending(float v) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int size = 2; size <= 32; size <<= 1) {
#pragma unroll
    for (int stride = size / 2; stride > 0; stride >>= 1) {
      const float other = __shfl_xor_sync(0xFFFFFFFFu, v, stride);
      // Lanes of a descending run (lane & size == 0, all of them in the last merge) keep
      // the larger value at the lower lane.
      const bool larger = ((lane & stride) == 0) == ((lane & size) == 0);
      v = larger ? fmaxf(v, other) : fminf(v, other);
    }
  }
  return v;
}

// The block's elements >= guess into its candidate list (keys; sh.listed counts them all,
// the list takes the first `capacity`), their fixed-point mass into sh.listed_mass when
// `mass`. Warp-uniform trip counts: the ballots need every lane.
template <typename T>
__device__ void filter_list_above(FilterSource<T>& source, FilterShared& sh, int attempt, float guess, bool mass,
                                  float row_max, float exp2_scale_, float unit) {
  constexpr int kVec = RowChunks<T>::kVec;
  unsigned long long listed_mass = 0;
  if (threadIdx.x == 0) sh.list_size = 0;
  __syncthreads();
  const auto list = [&](float x) {
    const float y = sanitize_logit(x);
    const bool keep = y >= guess;  // guess is finite: -inf is never listed
    list_append(source, sh, keep, ordered_key(y));
    if (keep && mass) listed_mass += fixed_mass(y, row_max, exp2_scale_, unit);
  };
  const int chunks = source.n / kVec;
  const uint4* vec = reinterpret_cast<const uint4*>(source.data);
  for (int base = 0; base < chunks; base += kVerifyThreads) {
    const int c = base + static_cast<int>(threadIdx.x);
    const bool inside = c < chunks;
    const uint4 raw = vec[inside ? c : 0];  // chunk 0 stands in for the lanes past the end
    // Unsanitized: +inf >= guess as its clamp is; NaN is skipped and never listed.
    const float top = chunk_max<T>(raw);
    if (__any_sync(0xFFFFFFFFu, inside && top >= guess)) {
      float x[kVec];
      unpack_chunk<T>(raw, x);
#pragma unroll
      for (int e = 0; e < kVec; ++e) list(inside ? x[e] : -INFINITY);
    }
  }
  for (int base = chunks * kVec; base < source.n; base += kVerifyThreads) {  // < kVec elements
    const int i = base + static_cast<int>(threadIdx.x);
    list(i < source.n ? to_float(source.data[i]) : -INFINITY);
  }
  if (mass)
    listed_mass = block_allreduce<kVerifyThreads>(
        listed_mass, [](unsigned long long a, unsigned long long c) { return a + c; }, sh.scratch_mass);
  __syncthreads();  // list_size complete
  if (threadIdx.x == 0) {
    sh.listed[attempt] = sh.list_size;
    sh.listed_mass[attempt] = listed_mass;
  }
}

// The normal distribution's p-quantile for p < 1 (Abramowitz and Stegun 26.2.23, error
// below 4.5e-4); -inf for p <= 0.
__device__ __forceinline__ float normal_quantile(float p) {
  if (!(p > 0.f)) return -INFINITY;
  const float q = p < 0.5f ? p : 1.f - p;
  const float t = sqrtf(-2.f * logf(q));
  const float z = t - (2.515517f + t * (0.802853f + t * 0.010328f)) /
                          (1.f + t * (1.432788f + t * (0.189269f + t * 0.001308f)));
  return p < 0.5f ? -z : z;
}

// The fixed-point mass of the block's portion (every element: -inf adds 0), and the sums
// of w t and w t^2 (t = (x - max) s, w = 2^t; t clamped at -128, where w is 0), for the
// top-p guess. Results in every thread.
struct PortionMass {
  unsigned long long mass;
  float moment1, moment2;
};

template <typename T>
__device__ PortionMass portion_mass(const FilterSource<T>& source, FilterShared& sh, float row_max,
                                    float exp2_scale_, float unit) {
  constexpr int kVec = RowChunks<T>::kVec;
  const int full_chunks = source.n / kVec;
  const uint4* vec = reinterpret_cast<const uint4*>(source.data);
  unsigned long long mass = 0;
  float moment1 = 0.f, moment2 = 0.f;
  const auto add = [&](float raw) {
    // fixed_mass's t = (sanitize_logit(x) - max) s without the sanitize: t <= 0 for every
    // sanitized x (max is the row's), and x above the clamp or +inf gives t > 0 where the
    // clamped value gives 0 (then max is the clamp); NaN gives NaN where -inf gives -inf.
    // Both clamps of t below restore those; t <= -128 has w = 0 either way (the
    // exponential flushes below 2^-126; w * unit rounds to 0 on a host too).
    const float t = fminf(fmaxf((raw - row_max) * exp2_scale_, -128.f), 0.f);
    const float w = fast_exp2(t);
    mass += __float2ull_rn(w * unit);  // fixed_mass
    const float wt = w * t;
    moment1 += wt;
    moment2 = fmaf(wt, t, moment2);
  };
#pragma unroll 2
  for (int c = threadIdx.x; c < full_chunks; c += kVerifyThreads) {
    float x[kVec];
    unpack_chunk<T>(vec[c], x);
#pragma unroll
    for (int e = 0; e < kVec; ++e) add(x[e]);
  }
  for (int i = full_chunks * kVec + threadIdx.x; i < source.n; i += kVerifyThreads) add(to_float(source.data[i]));
  const auto sum = [](float a, float c) { return a + c; };
  return {block_allreduce<kVerifyThreads>(mass, [](unsigned long long a, unsigned long long c) { return a + c; },
                                          sh.scratch_mass),
          block_allreduce<kVerifyThreads>(moment1, sum, sh.scratch_float),
          block_allreduce<kVerifyThreads>(moment2, sum, sh.scratch_float)};
}

// Grid (kFilterCluster * B, K + 1), clusters of kFilterCluster blocks along x: the cluster
// of (b, j) handles target row j of request b if b samples with top-k or top-p. Launched
// after verify_slices_kernel, which leaves these rows' target fields empty.
template <typename T>
__global__ void __launch_bounds__(kVerifyThreads) verify_filter_kernel(const T* __restrict__ target_logits,
                                                                    VerifyParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // the host launches it only on devices with clusters
#else
  allow_dependents();  // the finish kernel's blocks may be scheduled (they wait for this one)
  cg::cluster_group cluster = cg::this_cluster();
  const unsigned rank = cluster.block_rank();
  const int64_t b = blockIdx.x / kFilterCluster;
  const int64_t j = blockIdx.y;
  // Every condition below is the same for the whole cluster, which returns together.
  const int64_t length = p.num_draft[b];
  if (j > length || !request_is_valid(p, b)) return;
  const float temperature = sanitize_temperature(p.temperature[b]);
  if (!(temperature > 0.f)) return;
  const int64_t top_k = p.top_k ? p.top_k[b] : 0;
  const float top_p = p.top_p ? p.top_p[b] : 1.f;
  const bool k_on = top_k > 0 && top_k < p.vocab;
  if (!k_on && !(top_p < 1.f)) return;

  DSPARK_DYNAMIC_SHARED(unsigned char, shared_bytes);
  FilterShared& sh = *reinterpret_cast<FilterShared*>(shared_bytes);
  T* data = reinterpret_cast<T*>(shared_bytes + (sizeof(FilterShared) + 15) / 16 * 16);
  const int64_t portion = filter_portion(p.vocab);
  const int64_t start = static_cast<int64_t>(rank) * portion;
  const int n = static_cast<int>(max(int64_t{0}, min(portion, p.vocab - start)));
  FilterSource<T> source{data, n, reinterpret_cast<uint32_t*>(data + portion),
                         static_cast<int>(filter_list_capacity(p.vocab)), -1};
  const T* row = target_logits + (p.target_offset[b] + j) * p.target_stride + start;

  // The portion into shared memory, 16 bytes at a time where the row allows, and its max.
  // The max unsanitized (ChunkMax: packed for 16-bit types), sanitized once.
  constexpr int kVec = RowChunks<T>::kVec;
  ChunkMax<T> running;
  const int chunks = is_aligned16(row) ? n / kVec : 0;
#pragma unroll 4
  for (int c = threadIdx.x; c < chunks; c += kVerifyThreads) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row) + c);
    reinterpret_cast<uint4*>(data)[c] = raw;
    running.add(raw);
  }
  for (int i = chunks * kVec + threadIdx.x; i < n; i += kVerifyThreads) {
    data[i] = row[i];
    running.add(to_float(row[i]));
  }
  const float thread_max = sanitize_logit(running.get());
  // The top-k guess (see filter_list_above): this warp's j-th largest thread maximum.
  // Guesses only where every thread holds a chunk of the row (V >= 16384 bf16 / 8192 float):
  // shorter rows are cheap for the radix passes, and the top-k guess needs all warps' maxima.
  const bool long_row = portion >= int64_t{kVerifyThreads} * kVec;
  const bool guess_k = long_row && k_on && top_k > 1 && top_k <= int64_t{kFilterGuessRanks} * 32;  // k = 1: the max
  if (guess_k) {
    const int nth = static_cast<int>((top_k + kFilterGuessRanks - 1) / kFilterGuessRanks);
    const float warp_guess = __shfl_sync(0xFFFFFFFFu, warp_sort_descending(thread_max), nth - 1);
    if (threadIdx.x % 32 == 0) sh.warp_guess[threadIdx.x / 32] = warp_guess;
  }
  const auto max_of = [](float a, float c) { return fmaxf(a, c); };
  const float block_max = block_allreduce<kVerifyThreads>(thread_max, max_of, sh.scratch_float);  // and barriers
  if (threadIdx.x == 0) {
    sh.block_max = block_max;
    float block_guess = guess_k ? INFINITY : -INFINITY;  // -inf: no guess
    for (int w = 0; guess_k && w < kFilterWarps; ++w) block_guess = fminf(block_guess, sh.warp_guess[w]);
    sh.block_guess = block_guess;
  }
  cluster.sync();  // the blocks' maxima and guesses (and the portions: block barrier included)
  float row_max = -INFINITY;
  float guess = INFINITY;
  for (unsigned r = 0; r < kFilterCluster; ++r) {
    const FilterShared* other = cluster.map_shared_rank(&sh, r);
    row_max = fmaxf(row_max, other->block_max);
    guess = fminf(guess, other->block_guess);
  }

  float threshold = -INFINITY;
  const float scale = exp2_scale(temperature);
  const bool bonus = j == length;
  MassStats mine{row_max, 0.f, 0.f, -1};
  if (row_max != -INFINITY) {
    const int mass_exponent = mass_scale_exponent(p.vocab);
    const float unit = ldexpf(1.f, mass_exponent);
    if (k_on && top_k == 1) {
      // The max and its ties: top-p keeps all of this set (its most likely tokens).
      threshold = row_max;
    } else {
      unsigned long long total = 0;
      float fallback_guess = -INFINITY;  // a second, lower guess (top-p alone)
      if (!k_on && long_row) {  // top-p alone: the row's mass, the reference of the limit and of the guesses
        const PortionMass block = portion_mass(source, sh, row_max, scale, unit);
        if (threadIdx.x == 0) {
          sh.block_total = block.mass;
          sh.block_moments[0] = block.moment1;
          sh.block_moments[1] = block.moment2;
        }
        cluster.sync();
        float moment1 = 0.f, moment2 = 0.f;
        for (unsigned r = 0; r < kFilterCluster; ++r) {  // rank order
          const FilterShared* other = cluster.map_shared_rank(&sh, r);
          total += other->block_total;
          moment1 += other->block_moments[0];
          moment2 += other->block_moments[1];
        }
        const float z = fixed_to_float(total, mass_exponent);  // >= 1: the max weighs 1
        const float eps = (1.f - top_p) * z / (2.f * static_cast<float>(p.vocab));
        const float safe = fminf(row_max, row_max + fast_log2(eps) / scale);  // -inf if eps underflows
        const float mean = moment1 / z;
        const float sd = sqrtf(fmaxf(moment2 / z - mean * mean, 0.f));
        const float normal = fminf(row_max, row_max + (mean - (normal_quantile(top_p) + 0.5f) * sd) / scale);
        guess = normal > safe ? normal : safe;  // a NaN sd (top_p <= 0, sd 0) gives the max: right
        fallback_guess = normal > safe ? safe : -INFINITY;
      }
      for (int attempt = 0; attempt < 2 && guess > -INFINITY; ++attempt) {  // the same in every block
        filter_list_above(source, sh, attempt, guess, !k_on, row_max, scale, unit);
        cluster.sync();  // every block's count and mass of its elements >= guess
        uint64_t listed = 0;
        unsigned long long listed_mass = 0;
        bool fits = true;
        for (unsigned r = 0; r < kFilterCluster; ++r) {
          const FilterShared* other = cluster.map_shared_rank(&sh, r);
          listed += other->listed[attempt];
          listed_mass += other->listed_mass[attempt];
          fits = fits && other->listed[attempt] <= static_cast<uint32_t>(source.capacity);
        }
        // (The top-k guess always covers, by construction; checked all the same.)
        const bool covered = k_on ? listed >= static_cast<uint64_t>(top_k)
                                  : fixed_to_float(listed_mass, mass_exponent) >= top_p_limit(top_p, total, mass_exponent);
        if (fits && covered) {
          source.size = static_cast<int>(sh.listed[attempt]);
          break;
        }
        guess = fits ? fallback_guess : -INFINITY;  // a list too long: a lower guess lists more
      }
      if (k_on) threshold = filter_threshold(source, sh, scale, row_max, -INFINITY, false, top_k, 0.f, p.vocab);
      if (top_p < 1.f)
        threshold = filter_threshold(source, sh, scale, row_max, threshold, true, 0, top_p, p.vocab, k_on ? 0ull : total);
    }
    // The kept mass and, for the bonus row, the race among the kept tokens; a chunk none of
    // whose elements reaches the threshold costs its max only.
    KeptRace kept{threshold, row_max, scale, bonus,
                  RandomRow(static_cast<uint64_t>(p.seed[b]), kStreamResample, static_cast<uint32_t>(length),
                            static_cast<uint64_t>(p.offset[b]))};
    const auto keep = [&](int i, float raw) { kept.add(start + i, raw); };
    const int full_chunks = n / kVec;
    for (int base = 0; base < full_chunks; base += kVerifyThreads) {  // warp-uniform trip count (the vote)
      const int c = base + static_cast<int>(threadIdx.x);
      const bool inside = c < full_chunks;
      const uint4 raw = reinterpret_cast<const uint4*>(data)[inside ? c : 0];
      // Unsanitized, as in filter_list_above; -inf is never kept.
      if (__any_sync(0xFFFFFFFFu, inside && chunk_max<T>(raw) >= threshold)) {
        float x[kVec];
        unpack_chunk<T>(raw, x);
#pragma unroll
        for (int e = 0; e < kVec; ++e) keep(c * kVec + e, inside ? x[e] : -INFINITY);
      }
    }
    for (int i = full_chunks * kVec + threadIdx.x; i < n; i += kVerifyThreads) keep(i, to_float(data[i]));
    const float kept_mass =
        block_allreduce<kVerifyThreads>(kept.kept_mass, [](float a, float c) { return a + c; }, sh.scratch_float);
    const ArgMax best =
        block_allreduce<kVerifyThreads>(kept.best, [](ArgMax a, ArgMax c) { return merge(a, c); }, sh.scratch_argmax);
    mine = {row_max, kept_mass, best.key, static_cast<int32_t>(best.index)};
  }
  // Each block's result into block 0's shared memory (a distributed shared memory store),
  // then one barrier: it makes them visible to block 0, and no block exits before the
  // others are done reading its shared memory (the last radix level's histograms). Block 0
  // then reads only its own.
  if (threadIdx.x == 0) cluster.map_shared_rank(&sh.results[0], 0)[rank] = mine;
  cluster.sync();
  if (rank == 0 && threadIdx.x == 0) {
    float kept_mass = 0.f;
    ArgMax best{0.f, -1};
    for (unsigned r = 0; r < kFilterCluster; ++r) {  // rank order: the same sum at every B
      const MassStats q = sh.results[r];
      kept_mass += q.sum;
      best = merge(best, ArgMax{q.key, q.index});
    }
    VerifyPartial& out = p.partials[(b * (p.max_draft + 1) + j) * p.slices];
    out.target_max = row_max;
    out.target_sum = kept_mass;
    out.key = best.key;
    out.index = static_cast<int32_t>(best.index);
    out.threshold = threshold;
  }
#endif
}

// ---------------------------------------------------------------- kernel 1: slices
template <typename T, bool kHasDraft>
__global__ void __launch_bounds__(kVerifyThreads) verify_slices_kernel(const T* __restrict__ target_logits,
                                                                    const T* __restrict__ draft_logits,
                                                                    VerifyParams p) {
  allow_dependents();  // the finish kernel's blocks may be scheduled (they wait for this one)
  const int64_t b = blockIdx.x;
  const int slice = blockIdx.y;
  const int64_t j = blockIdx.z;
  if (slice == 0 && j == 0 && threadIdx.x == 0) p.finished[b] = 0;  // before the second launch
  const int64_t length = p.num_draft[b];
  if (j > length || !request_is_valid(p, b)) return;  // uniform over the block
  const int vocab = static_cast<int>(p.vocab);
  const T* target_row = target_logits + (p.target_offset[b] + j) * p.target_stride;
  const float temperature = sanitize_temperature(p.temperature[b]);
  VerifyPartial out{-INFINITY, 0.f, -INFINITY, 0.f, 0.f, -1, -INFINITY, 0};

  if (!(temperature > 0.f)) {
    const ArgMax thread_best = slice_argmax(target_row, vocab, slice);  // sass budget: greedy pass (32 elements a thread)
    // sass budget: slice reduction (32 elements a thread)
    const ArgMax best = block_reduce<kVerifyThreads>(thread_best, [](ArgMax a, ArgMax c) { return merge(a, c); });
    out.key = best.key;
    out.index = static_cast<int32_t>(best.index);
  } else {
    const float scale = exp2_scale(temperature);
    const auto merge = [scale](MassStats a, MassStats c) { return merge_mass(a, c, scale); };
    const auto merge_plain = [scale](Mass a, Mass c) { return merge_mass(a, c, scale); };
    const int64_t top_k = p.top_k ? p.top_k[b] : 0;
    const float top_p = p.top_p ? p.top_p[b] : 1.f;
    const bool filtered = (top_k > 0 && top_k < p.vocab) || top_p < 1.f;
    const bool bonus = j == length;
    const uint64_t seed = static_cast<uint64_t>(p.seed[b]);
    const uint64_t round_offset = static_cast<uint64_t>(p.offset[b]);
    MassStats t{-INFINITY, 0.f, 0.f, -1};
    if (filtered) {
      if (slice == 0 && !p.filter_in_cluster)
        t = filtered_row(target_row, p.vocab, scale, top_k, top_p, bonus, seed, static_cast<uint32_t>(length),
                         round_offset, out.threshold);
    } else {
      if (bonus) {
        // sass budget: bonus row pass (32 elements a thread)
        t = slice_mass<true>(target_row, vocab, slice, scale, seed, static_cast<uint32_t>(length), round_offset);
        t = block_reduce<kVerifyThreads>(t, merge);  // sass budget: slice reduction (32 elements a thread)
      } else {
        t = slice_mass<false>(target_row, vocab, slice, scale, 0, 0, 0);  // sass budget: plain row pass (32 elements a thread)
        // sass budget: slice reduction (32 elements a thread)
        const Mass m = block_reduce<kVerifyThreads>(Mass{t.max, t.sum}, merge_plain);
        t = {m.max, m.sum, 0.f, -1};
      }
    }
    out.target_max = t.max;
    out.target_sum = t.sum;
    out.key = t.key;
    out.index = t.index;
    if (kHasDraft && !bonus) {
      const T* draft_row = draft_logits + (b * p.max_draft + j) * p.vocab;
      const MassStats d_thread = slice_mass<false>(draft_row, vocab, slice, scale, 0, 0, 0);  // sass budget: draft row pass (32 elements a thread)
      // sass budget: slice reduction (32 elements a thread)
      const Mass d = block_reduce<kVerifyThreads>(Mass{d_thread.max, d_thread.sum}, merge_plain);
      out.draft_max = d.max;
      out.draft_sum = d.sum;
    }
  }
  if (threadIdx.x == 0) p.partials[(b * (p.max_draft + 1) + j) * p.slices + slice] = out;
}

// ---------------------------------------------------------------- kernel 2: finish
// What the decision hands to the residual pass.
struct VerifyDecision {
  int32_t accepted;   // number of accepted drafts
  int32_t emitted;    // greedy or bonus token; -2: the residual race decides
  float target_max;   // of the rejected row
  float target_inverse_mass;
  float threshold;
  float draft_max;
  float draft_inverse_mass;
};

// Row j's partials merged in slice order (target mass, draft mass, greedy argmax or bonus winner).
__device__ __forceinline__ void merge_row(const VerifyPartial* row, int slices, bool greedy, float scale,
                                          MassStats& target, MassStats& draft, ArgMax& best, float& threshold) {
  target = {-INFINITY, 0.f, 0.f, -1};
  draft = {-INFINITY, 0.f, 0.f, -1};
  best = {-INFINITY, -1};
  threshold = -INFINITY;
  for (int s = 0; s < slices; ++s) {
    const VerifyPartial q = row[s];
    if (greedy) {
      if (q.index >= 0 && beats(q.key, q.index, best)) best = {q.key, q.index};
    } else {
      target = merge_mass(target, {q.target_max, q.target_sum, q.key, q.index}, scale);
      draft = merge_mass(draft, {q.draft_max, q.draft_sum, 0.f, -1}, scale);
      threshold = fmaxf(threshold, q.threshold);
    }
  }
}

// p of token x under a merged row: w * (1 / S) over the kept tokens.
__device__ __forceinline__ float token_probability(float x, float row_max, float inverse_mass, float threshold,
                                                   float scale) {
  return (x > -INFINITY && x >= threshold) ? fast_exp2((x - row_max) * scale) * inverse_mass : 0.f;
}

// Warp 0 decides for request b: lane l takes rows l, l + 32, ...; the result goes to
// `decision` (shared memory).
template <typename T, bool kHasDraft>
__device__ __forceinline__ void decide(const T* target_logits, const T* draft_logits, const VerifyParams& p, int64_t b,
                                       bool greedy, float scale, VerifyDecision& decision) {
  const int lane = threadIdx.x;
  const int64_t length = p.num_draft[b];
  const int64_t* drafts = p.draft_tokens + b * p.max_draft;
  for (int64_t base = 0; base <= length; base += 32) {
    const int64_t j = base + lane;
    bool rejected = false;
    VerifyDecision mine{static_cast<int32_t>(j), -2, 0.f, 0.f, -INFINITY, 0.f, 0.f};
    if (j <= length) {
      MassStats t, d;
      ArgMax best;
      float threshold;
      merge_row(p.partials + (b * (p.max_draft + 1) + j) * p.slices, p.slices, greedy, scale, t, d, best, threshold);
      if (greedy) {
        rejected = j < length && !(best.index >= 0 && best.index == drafts[j]);
        mine.emitted = static_cast<int32_t>(best.index);
      } else if (j == length) {
        mine.emitted = t.index;  // the bonus race's winner
      } else {
        const int64_t token = drafts[j];
        const T* target_row = target_logits + (p.target_offset[b] + j) * p.target_stride;
        mine.target_max = t.max > -INFINITY ? t.max : 0.f;
        mine.target_inverse_mass = t.sum > 0.f ? 1.f / t.sum : 0.f;
        mine.threshold = threshold;
        const float p_target = token_probability(sanitize_logit(to_float(target_row[token])), mine.target_max,
                                                 mine.target_inverse_mass, threshold, scale);
        float p_draft = 1.f;
        if constexpr (kHasDraft) {
          mine.draft_max = d.max > -INFINITY ? d.max : 0.f;
          mine.draft_inverse_mass = d.sum > 0.f ? 1.f / d.sum : 0.f;
          p_draft = token_probability(sanitize_logit(to_float(draft_logits[(b * p.max_draft + j) * p.vocab + token])),
                                      mine.draft_max, mine.draft_inverse_mass, -INFINITY, scale);
        }
        const uint32_t word = random_word(static_cast<uint64_t>(p.seed[b]), kStreamAccept, static_cast<uint32_t>(j),
                                          static_cast<uint64_t>(p.offset[b]), 0);
        rejected = !accept_draft(word, p_target, p_draft);
      }
    }
    const unsigned ballot = __ballot_sync(0xFFFFFFFFu, rejected);
    const int64_t first = ballot ? base + __ffs(static_cast<int>(ballot)) - 1 : length;
    if (first < base + 32 && j == first) decision = mine;  // the first rejection, or row L
    if (first < base + 32) break;  // uniform: every lane saw the same ballot
  }
}

// The thread's residual race over its part of a slice of the rejected row pair j:
// argmax r / E' over r = max(0, p_t - p_d) > 0, stream 2 at position j. kFiltered: the
// target keeps only x >= threshold (top-k/top-p); without a draft row p_d is one-hot at
// the draft token (race_group subtracts it).
template <typename T, bool kHasDraft, bool kFiltered, bool kFull>
__device__ __forceinline__ ArgMax residual_slice(const T* target_row, const T* draft_row, int vocab, int slice,
                                                 int token, uint64_t seed, uint64_t round_offset, float scale,
                                                 const VerifyDecision& my) {
  using S = Slice<T>;
  constexpr int kVec = S::kVec;
  S target;
  target.template load<kFull, false>(target_row, vocab, slice);  // NaN stays NaN (see below)
  [[maybe_unused]] S draft;
  if constexpr (kHasDraft) draft.template load<kFull>(draft_row, vocab, slice);
  const uint32_t position = static_cast<uint32_t>(my.accepted);
  RaceLeader leader = race_start();
  constexpr int kGroups = S::kChunks * kVec / 4;  // groups of four elements a thread
  static_assert(kGroups % 2 == 0, "race steps of two groups");
  const int first_index = S::index(slice, 0, 0);  // a multiple of 4
  const PhiloxKeys keys = philox_keys_held(seed);
#pragma unroll
  for (int q = 0; q < kGroups; q += 2) {
    float r[2][4];  // p_t - p_d, unclamped (race_candidate and race_group clamp)
    Philox4 words[2];
    int first[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int i = (q + h) / (kVec / 4), g = (q + h) % (kVec / 4) * 4;
      first[h] = first_index + S::offset(i, g);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        // sanitize's clamp of +inf to FLT_MAX/2, keeping NaN: a NaN logit gives a NaN r,
        // which fails race_candidate and counts as 0 in race_group (p_t = 0, as sanitize's
        // -inf would give; in the filtered case x >= threshold is false for it).
        const float x = clamp_logit_keep_nan(target.x[i][g + e]);
        float d_target = (x - my.target_max) * scale;
        if constexpr (kFiltered) d_target = x >= my.threshold ? d_target : -INFINITY;
        const float p_target = fast_exp2(d_target) * my.target_inverse_mass;
        if constexpr (kHasDraft) {
          r[h][e] = p_target - fast_exp2((draft.x[i][g + e] - my.draft_max) * scale) * my.draft_inverse_mass;
        } else {
          r[h][e] = p_target;
        }
      }
      words[h] = random_group(keys, kStreamResample, position, round_offset,
                              static_cast<uint32_t>(first_index >> 2) + S::offset(i, g) / 4);
    }
    leader = q == 0 ? race_step<true>(leader, r, words, first, kHasDraft ? -1 : token)
                    : race_step(leader, r, words, first, kHasDraft ? -1 : token);
  }
  return {leader.key, leader.index};
}

template <typename T, bool kHasDraft, bool kFiltered>
__device__ __noinline__ ArgMax residual_slice_partial(const T* target_row, const T* draft_row, int vocab, int slice,
                                                      int token, uint64_t seed, uint64_t round_offset, float scale,
                                                      VerifyDecision my) {
  return residual_slice<T, kHasDraft, kFiltered, false>(target_row, draft_row, vocab, slice, token, seed,
                                                        round_offset, scale, my);
}

template <typename T, bool kHasDraft, bool kFiltered>
__device__ __forceinline__ ArgMax residual_slice(const T* target_row, const T* draft_row, int vocab, int slice,
                                                 int token, uint64_t seed, uint64_t round_offset, float scale,
                                                 const VerifyDecision& my) {
  const bool full = Slice<T>::full(target_row, vocab, slice) && (!kHasDraft || is_aligned16(draft_row));
  return full ? residual_slice<T, kHasDraft, kFiltered, true>(target_row, draft_row, vocab, slice, token, seed,
                                                              round_offset, scale, my)
              : residual_slice_partial<T, kHasDraft, kFiltered>(target_row, draft_row, vocab, slice, token, seed,
                                                                round_offset, scale, my);
}

template <typename T, bool kHasDraft>
__global__ void __launch_bounds__(kVerifyThreads) verify_finish_kernel(const T* __restrict__ target_logits,
                                                                    const T* __restrict__ draft_logits,
                                                                    VerifyParams p) {
  // Launched as a dependent: everything below reads the previous launches' partials.
  grid_dependency_wait();
  const int64_t b = blockIdx.x;
  const int slice = blockIdx.y;
  const int64_t width = p.max_draft + 1;
  int64_t* out = p.out_tokens + b * width;
  if (!request_is_valid(p, b)) {
    if (slice == 0) {
      for (int64_t j = threadIdx.x; j < width; j += blockDim.x) out[j] = -1;
      if (threadIdx.x == 0) p.num_accepted[b] = -1;
    }
    return;
  }
  const float temperature = sanitize_temperature(p.temperature[b]);
  const bool greedy = !(temperature > 0.f);
  const float scale = greedy ? 1.f : exp2_scale(temperature);
  __shared__ VerifyDecision decision;
  if (threadIdx.x < 32) decide<T, kHasDraft>(target_logits, draft_logits, p, b, greedy, scale, decision);
  __syncthreads();
  const VerifyDecision my = decision;
  const int64_t* drafts = p.draft_tokens + b * p.max_draft;
  const auto write_outputs = [&](int64_t emitted) {
    for (int64_t j = threadIdx.x; j < width; j += blockDim.x)
      out[j] = j < my.accepted ? drafts[j] : (j == my.accepted ? emitted : -1);
    if (threadIdx.x == 0) p.num_accepted[b] = my.accepted;
  };
  if (my.emitted != -2) {
    if (slice == 0) write_outputs(my.emitted);
    return;
  }

  // The residual race over this block's slice of the rejected row pair.
  const int vocab = static_cast<int>(p.vocab);
  const int64_t j = my.accepted;
  const int64_t token = drafts[j];
  const T* target_row = target_logits + (p.target_offset[b] + j) * p.target_stride;
  const uint64_t seed = static_cast<uint64_t>(p.seed[b]);
  const uint64_t round_offset = static_cast<uint64_t>(p.offset[b]);
  {
    const T* draft_row = kHasDraft ? draft_logits + (b * p.max_draft + j) * p.vocab : nullptr;
    ArgMax thread_best;
    if (my.threshold == -INFINITY) {
      // sass budget: residual pass (32 elements a thread)
      thread_best = residual_slice<T, kHasDraft, false>(target_row, draft_row, vocab, slice, static_cast<int>(token),
                                                        seed, round_offset, scale, my);
    } else {
      // sass budget: filtered residual pass (32 elements a thread)
      thread_best = residual_slice<T, kHasDraft, true>(target_row, draft_row, vocab, slice, static_cast<int>(token),
                                                       seed, round_offset, scale, my);
    }
    // sass budget: slice reduction (32 elements a thread)
    const ArgMax winner = block_reduce<kVerifyThreads>(thread_best, [](ArgMax a, ArgMax c) { return merge(a, c); });
    if (threadIdx.x == 0) {
      p.residuals[b * p.slices + slice] = {winner.key, static_cast<int32_t>(winner.index)};
      __threadfence();  // the partial is visible before the count says so
    }
  }
  __shared__ bool last;
  if (threadIdx.x == 0) last = atomicAdd(&p.finished[b], 1u) == static_cast<uint32_t>(p.slices) - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();  // orders the reads of the other blocks' partials after the count
  // The last block: merge the slices' winners in slice order.
  ArgMax winner{0.f, -1};
  const volatile ResidualPartial* residuals = p.residuals + b * p.slices;  // written by other blocks
  for (int s = 0; s < p.slices; ++s) {
    const float key = residuals[s].key;
    const int32_t index = residuals[s].index;
    if (index >= 0 && (winner.index < 0 || key > winner.key)) winner = {key, index};
  }
  if (winner.index < 0) {
    // No residual mass (p_t <= p_d everywhere, a rounding case): the target race over the
    // kept tokens of the rejected row, by this block alone.
    KeptRace kept{my.threshold, my.target_max, scale, true,
                  RandomRow(seed, kStreamResample, static_cast<uint32_t>(j), round_offset)};
    for_each_element(target_row, p.vocab, [&](int64_t v, float raw) { kept.add(v, raw); });
    winner = block_allreduce<kVerifyThreads>(kept.best);
  }
  write_outputs(winner.index);
}

}  // namespace dspark
