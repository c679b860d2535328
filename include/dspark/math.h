// Scalar math shared by the CPU kernels, the CUDA kernels and the C++ tests.
//
// Everything here is the random-number and sampling spec of DESIGN.md written once:
// Philox-4x32-10, the counter layout of the three streams, the acceptance uniform, the
// exponential used by the race, and the treatment of NaN/Inf logits. No torch includes,
// so kernels and tests can use it without pulling in ATen.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DSPARK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DSPARK_HOST_DEVICE inline
#endif

namespace dspark {

// Philox streams (the "stream" field of the counter).
enum RandomStream : uint32_t {
  kStreamDraft = 0,     // markov_draft sampling, position = step k
  kStreamAccept = 1,    // acceptance uniforms, v = 0, position = draft index j
  kStreamResample = 2,  // recovery (position = rejected j) and bonus (position = L_b)
};

struct Philox4 {
  uint32_t x[4];
};

DSPARK_HOST_DEVICE void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  lo = static_cast<uint32_t>(product);
  hi = static_cast<uint32_t>(product >> 32);
#endif
}

// The round keys of Philox-4x32-10 for one 64-bit key (low word first). Callers that draw
// many groups with one key compute them once (the unrolled kernels would otherwise
// recompute them per group).
struct PhiloxKeys {
  uint32_t k0[10];
  uint32_t k1[10];
};

DSPARK_HOST_DEVICE PhiloxKeys philox_keys(uint64_t seed) {
  PhiloxKeys keys;
  uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    keys.k0[round] = key0;
    keys.k1[round] = key1;
    key0 += 0x9E3779B9u;
    key1 += 0xBB67AE85u;
  }
  return keys;
}

// philox_keys for loops that reuse the keys over many groups (verify's row passes): on a
// GPU each key goes through an opaque move, so the compiler keeps the twenty keys in
// registers; left to it, it rematerialises them (seed + r W) where rounds use them, about
// nine uniform adds per group of four elements (2.25 instructions an element of the
// residual pass). The same values.
DSPARK_HOST_DEVICE PhiloxKeys philox_keys_held(uint64_t seed) {
  PhiloxKeys keys = philox_keys(seed);
#if defined(__CUDA_ARCH__)
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    asm("mov.b32 %0, %0;" : "+r"(keys.k0[round]));
    asm("mov.b32 %0, %0;" : "+r"(keys.k1[round]));
  }
#endif
  return keys;
}

// Philox-4x32 with 10 rounds (Salmon et al., SC'11; constants as in Random123).
DSPARK_HOST_DEVICE Philox4 philox4x32_10(Philox4 counter, const PhiloxKeys& keys) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kMul0, counter.x[0], hi0, lo0);
    mulhilo32(kMul1, counter.x[2], hi1, lo1);
    Philox4 next;
    next.x[0] = hi1 ^ counter.x[1] ^ keys.k0[round];
    next.x[1] = lo1;
    next.x[2] = hi0 ^ counter.x[3] ^ keys.k1[round];
    next.x[3] = lo0;
    counter = next;
  }
  return counter;
}

DSPARK_HOST_DEVICE Philox4 philox4x32_10(Philox4 counter, uint32_t key0, uint32_t key1) {
  return philox4x32_10(counter, philox_keys(static_cast<uint64_t>(key1) << 32 | key0));
}

// The four 32-bit words for vocabulary indices 4*group .. 4*group+3 of one
// (seed, stream, position, offset), with the seed's round keys (philox_keys(seed)). Word
// v & 3 of group v >> 2 belongs to index v.
DSPARK_HOST_DEVICE Philox4 random_group(const PhiloxKeys& keys, uint32_t stream, uint32_t position,
                                        uint64_t offset, uint32_t group) {
  Philox4 counter;
  counter.x[0] = group;
  counter.x[1] = (stream << 24) | (position & 0xFFFFFFu);
  counter.x[2] = static_cast<uint32_t>(offset);
  counter.x[3] = static_cast<uint32_t>(offset >> 32);
  return philox4x32_10(counter, keys);
}

DSPARK_HOST_DEVICE Philox4 random_group(uint64_t seed, uint32_t stream, uint32_t position,
                                        uint64_t offset, uint32_t group) {
  return random_group(philox_keys(seed), stream, position, offset, group);
}

DSPARK_HOST_DEVICE uint32_t random_word(uint64_t seed, uint32_t stream, uint32_t position,
                                        uint64_t offset, uint32_t v) {
  return random_group(seed, stream, position, offset, v >> 2).x[v & 3];
}

// Random words of one (seed, stream, position, offset) along the vocabulary. A caller
// that walks its indices in increasing order gets four of them from one Philox call.
struct RandomRow {
  uint64_t seed;
  uint64_t offset;
  uint32_t stream;
  uint32_t position;
  uint32_t cached_group = 0xFFFFFFFFu;
  Philox4 words;

  DSPARK_HOST_DEVICE RandomRow(uint64_t seed_, uint32_t stream_, uint32_t position_, uint64_t offset_)
      : seed(seed_), offset(offset_), stream(stream_), position(position_) {}

  DSPARK_HOST_DEVICE uint32_t word(int64_t v) {
    const uint32_t group = static_cast<uint32_t>(v >> 2);
    if (group != cached_group) {
      words = random_group(seed, stream, position, offset, group);
      cached_group = group;
    }
    // Selects instead of words.x[v & 3]: a run-time index would put the array in local memory.
    const uint32_t lane = static_cast<uint32_t>(v) & 3u;
    const uint32_t low = lane & 1u ? words.x[1] : words.x[0];
    const uint32_t high = lane & 1u ? words.x[3] : words.x[2];
    return lane & 2u ? high : low;
  }
};

// Acceptance uniform u = ((x >> 8) + 0.5) * 2^-24, in (0, 1). It needs 25 significant
// bits, so it is a double: float32 would round the largest value up to 1.
DSPARK_HOST_DEVICE double acceptance_uniform(uint32_t x) {
  return (static_cast<double>(x >> 8) + 0.5) * 0x1p-24;
}

// Accept draft x when u * p_draft(x) < p_target(x). In double the product of a 25-bit u
// and a 24-bit float is exact, so every implementation makes the same decision for the
// same probabilities.
DSPARK_HOST_DEVICE bool accept_draft(uint32_t x, float p_target, float p_draft) {
  return acceptance_uniform(x) * static_cast<double>(p_draft) < static_cast<double>(p_target);
}

// Standard exponential E = -log(u) from all 32 bits, never 0 and never inf. The upper
// half of the range goes through log1p of the complement so that E near 0 keeps its
// precision: E lies in [1.16e-10, 22.9].
DSPARK_HOST_DEVICE float exponential_from_bits(uint32_t x) {
  if (x < 0x80000000u) {
    const float u = (static_cast<float>(x) + 0.5f) * 0x1p-32f;
    return -logf(u);
  }
  const float w = (static_cast<float>(0xFFFFFFFFu - x) + 0.5f) * 0x1p-32f;
  return -log1pf(-w);
}

// Key of the exponential race in log space: argmax_v (y_v - log E_v) is a sample of
// softmax(y). Used by markov_draft.
DSPARK_HOST_DEVICE float race_key_log(float scaled_logit, uint32_t x) {
  return scaled_logit - logf(exponential_from_bits(x));
}

// Upper bound of -log(E) over all 32-bit words (E >= 1.16e-10, so -log E <= 22.88), with a
// margin for rounding: a race key never exceeds the scaled logit by more than this, which
// lets a race skip elements that trail the leader by more (tests_cpp/test_math.cpp checks it).
constexpr float kMaxRaceBonus = 23.0f;

// ---------------------------------------------------------------- verify's arithmetic
// verify works in base 2 (reference.py is the spec): per row the scale s = log2(e) / T is
// rounded once, a token's weight is exp2((x - m) * s), its probability weight * (1 / S)
// with the reciprocal of the row's mass S taken once, and the sampling races run in
// probability space, argmax_v weight_v / E'_v, with E' = E / ln 2 = -log2(u) the standard
// exponential in base-2 units (the constant factor changes no argmax).
constexpr float kLog2e = 1.44269504088896341f;

// s = log2(e) / T for T > 0, at most FLT_MAX (a tiny T would overflow to inf, and 0 * inf
// is NaN; FLT_MAX keeps (x - m) * s at 0 for the max and -inf or huge below it).
DSPARK_HOST_DEVICE float exp2_scale(float temperature) {
  const float s = kLog2e / temperature;
  return s > FLT_MAX ? FLT_MAX : s;
}

// The spec's E' = -log2(u) from a 32-bit word: for x < 2^31, u = (x + 0.5) * 2^-32 and
// E' = -log2(u); above, the complement w = (2^32 - 1 - x + 0.5) * 2^-32 keeps E' near 0
// precise: E' = -log1p(-w) * log2(e). E' lies in [1.68e-10, 33]: never 0 or inf.
inline float exponential2_spec(uint32_t x) {
  if (x < 0x80000000u) return -std::log2(std::fma(static_cast<float>(x), 0x1p-32f, 0x1p-33f));
  return -std::log1p(-std::fma(static_cast<float>(~x), 0x1p-32f, 0x1p-33f)) * kLog2e;
}

// Base-2 logarithm: one MUFU instruction on a GPU (absolute error about 2^-22), the
// accurate function elsewhere (the CUDA emulation, the C++ tests).
DSPARK_HOST_DEVICE float fast_log2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return std::log2(x);
#endif
}

// 2^x: one MUFU instruction on a GPU (relative error about 2^-22, results below 2^-126
// flushed to 0), the accurate function elsewhere.
DSPARK_HOST_DEVICE float fast_exp2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return std::exp2(x);
#endif
}

// a / b as a times the reciprocal of b: MUFU.RCP (rcp.approx.ftz, about 1 ulp) and a
// multiply on a GPU, a division elsewhere. For b in the normal range.
DSPARK_HOST_DEVICE float fast_divide(float a, float b) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(b));
  return a * r;
#else
  return a / b;
#endif
}

// E' of the kernels, without branches or library calls: the same u (or w) as the spec; the
// lower half is -log2(u) (u <= 1/2, so MUFU.LG2's absolute error is a relative one); the
// upper half is -log2(1 - w) = (2 / ln 2) atanh(t), t = w / (2 - w) <= 1/3, from its odd
// series to t^13 (truncation below 2^-25). Relative error against exponential2_spec below
// 2^-20 (tests_cpp/test_math.cpp measures it over a sample of all words).
DSPARK_HOST_DEVICE float exponential2_fast(uint32_t x) {
  const bool high = x >= 0x80000000u;
  const uint32_t folded = x ^ static_cast<uint32_t>(static_cast<int32_t>(x) >> 31);  // ~x in the upper half
  const float f = fmaf(static_cast<float>(folded), 0x1p-32f, 0x1p-33f);
  const float lower = -fast_log2(f);
  const float t = fast_divide(f, 2.f - f);
  const float t2 = t * t;
  float series = fmaf(t2, 1.f / 13.f, 1.f / 11.f);
  series = fmaf(t2, series, 1.f / 9.f);
  series = fmaf(t2, series, 1.f / 7.f);
  series = fmaf(t2, series, 1.f / 5.f);
  series = fmaf(t2, series, 1.f / 3.f);
  series = fmaf(t2, series, 1.f);
  const float upper = (2.f * kLog2e) * t * series;
  return high ? upper : lower;
}

// Largest logit magnitude kept: half the float range, so that x - max never overflows.
constexpr float kLogitLimit = 0x1.fffffep+126f;  // FLT_MAX / 2

// NaN counts as -inf; +inf and finite values above FLT_MAX/2 are clamped to FLT_MAX/2, so
// that x - max is never NaN (a row with +inf logits puts all its mass on them, shared
// evenly). On a GPU two min/max instructions (max.f32 returns the non-NaN operand, for
// signalling NaNs too); on a host libm's fmax may return a signalling NaN (and is a call),
// so selects.
DSPARK_HOST_DEVICE float sanitize_logit(float y) {
#if defined(__CUDA_ARCH__)
  return fminf(fmaxf(y, -INFINITY), kLogitLimit);
#else
  return y != y ? -INFINITY : (y > kLogitLimit ? kLogitLimit : y);  // not fminf: a libm call here
#endif
}

// sanitize_logit's upper clamp alone, NaN kept (one min.NaN on a GPU): for callers where
// a NaN propagates to a result that counts as no mass (the residual of verify).
DSPARK_HOST_DEVICE float clamp_logit_keep_nan(float y) {
#if defined(__CUDA_ARCH__)
  float out;
  asm("min.NaN.f32 %0, %1, %2;" : "=f"(out) : "f"(y), "f"(kLogitLimit));
  return out;
#else
  return y != y ? y : (y > kLogitLimit ? kLogitLimit : y);
#endif
}

// Sampling temperature: > 0 samples (+inf is clamped to FLT_MAX, where softmax(x / T) is
// uniform over the finite x); <= 0 or NaN means greedy, which callers test first.
DSPARK_HOST_DEVICE float sanitize_temperature(float t) { return t > FLT_MAX ? FLT_MAX : t; }

// Confidence head: sigmoid of the logit, with a NaN logit mapped to confidence 0 (such a
// draft is simply not verified, which costs throughput but never correctness).
DSPARK_HOST_DEVICE float confidence_from_logit(float logit) {
  if (logit != logit) return 0.f;
  return 1.f / (1.f + expf(-logit));
}

// Maps a float to an unsigned key with the same order (-inf lowest), for radix select.
DSPARK_HOST_DEVICE uint32_t ordered_key(float y) {
  uint32_t bits;
#if defined(__CUDA_ARCH__)
  bits = __float_as_uint(y);
#else
  __builtin_memcpy(&bits, &y, sizeof(bits));
#endif
  // Negative: all bits flipped; positive: the sign bit set. Two instructions, no branch.
  return bits ^ (static_cast<uint32_t>(static_cast<int32_t>(bits) >> 31) | 0x80000000u);
}

DSPARK_HOST_DEVICE float key_to_float(uint32_t key) {
  const uint32_t bits = (key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key;
  float y;
#if defined(__CUDA_ARCH__)
  y = __uint_as_float(bits);
#else
  __builtin_memcpy(&y, &bits, sizeof(y));
#endif
  return y;
}

// Greedy / race winner: larger key wins, ties go to the smaller index. An index of -1
// means "none yet" and loses to everything.
struct ArgMax {
  float key;
  int64_t index;
};

DSPARK_HOST_DEVICE bool beats(float key, int64_t index, const ArgMax& current) {
  if (index < 0) return false;
  if (current.index < 0) return true;
  return key > current.key || (key == current.key && index < current.index);
}

DSPARK_HOST_DEVICE ArgMax merge(const ArgMax& a, const ArgMax& b) {
  return beats(b.key, b.index, a) ? b : a;
}

}  // namespace dspark
