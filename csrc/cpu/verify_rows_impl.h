// Implementation of verify_rows.h for one instruction set: include after defining
// CPU_CAPABILITY (ATen's name of the set) and DSPARK_ROWS_NS (the namespace of this copy)
// and including <ATen/cpu/vec/vec.h>.
#include <ATen/cpu/vec/functional.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "dspark/math.h"
#include "verify_rows.h"

namespace dspark::cpu_rows::DSPARK_ROWS_NS {
namespace {

using Vec = at::vec::Vectorized<float>;

// sanitize on a vector: NaN -> -inf, +inf and > FLT_MAX/2 -> FLT_MAX/2.
inline Vec sanitize_vec(Vec y) {
  y = Vec::blendv(y, Vec(-INFINITY), y.isnan());
  return at::vec::minimum(y, Vec(kLogitLimit));  // no NaN left
}

// sanitize_logit, written out (no shared inline function in a per-instruction-set file).
inline float sanitize_one(float x) { return x != x ? -INFINITY : (x > kLogitLimit ? kLogitLimit : x); }

// Widening to float32 without c10's inline conversions, whose copies compiled for AVX2
// could be picked by the linker for the rest of the library (bfloat16 is the top half of
// a float; half goes through F16C with AVX2/AVX-512).
inline float widen_one(float x) { return x; }
inline float widen_one(c10::BFloat16 x) {
  uint32_t wide = static_cast<uint32_t>(reinterpret_cast<const uint16_t&>(x)) << 16;
  float out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}
inline float widen_one(c10::Half x) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  return _cvtsh_ss(reinterpret_cast<const uint16_t&>(x));
#else
  return static_cast<float>(x);
#endif
}

// The Vec::size() values of a row at p, widened and sanitised.
inline Vec load_sanitized(const float* p) { return sanitize_vec(Vec::loadu(p)); }

inline Vec load_sanitized(const c10::BFloat16* p) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i raw = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return sanitize_vec(Vec(_mm512_castsi512_ps(_mm512_slli_epi32(raw, 16))));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i raw = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return sanitize_vec(Vec(_mm256_castsi256_ps(_mm256_slli_epi32(raw, 16))));
#else
  alignas(64) float wide[Vec::size()];
  for (int l = 0; l < Vec::size(); ++l) wide[l] = widen_one(p[l]);
  return sanitize_vec(Vec::loadu(wide));
#endif
}

inline Vec load_sanitized(const c10::Half* p) {
#if defined(CPU_CAPABILITY_AVX512)
  return sanitize_vec(Vec(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))));
#elif defined(CPU_CAPABILITY_AVX2)
  return sanitize_vec(Vec(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
#else
  alignas(64) float wide[Vec::size()];
  for (int l = 0; l < Vec::size(); ++l) wide[l] = widen_one(p[l]);
  return sanitize_vec(Vec::loadu(wide));
#endif
}

// out[v] = sanitize(float(in[v])), returning the max (in may be out for float32).
template <typename scalar_t>
float sanitize(const scalar_t* in, int64_t n, float* out) {
  Vec best(-INFINITY);
  int64_t v = 0;
  for (; v + Vec::size() <= n; v += Vec::size()) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    // The pass waits on the row's loads (the first read of it): 4 KB ahead, 37 % faster
    // at B = 32, V = 151936 bf16 on an AVX-512 Xeon (bench/RESULTS.md).
    _mm_prefetch(reinterpret_cast<const char*>(in + v) + 4096, _MM_HINT_T0);
#endif
    const Vec y = load_sanitized(in + v);
    y.store(out + v);
    best = at::vec::maximum(best, y);
  }
  float m = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, best);
  for (; v < n; ++v) {
    out[v] = sanitize_one(widen_one(in[v]));
    m = out[v] > m ? out[v] : m;
  }
  return m;
}

// 2^x for x <= 0 (the weights' exponents), where the instruction set has vector integers:
// x = n + f with n = round(x), |f| <= 1/2; 2^f by a degree-6 polynomial (near-minimax,
// relative error 1.9e-9 before the float32 rounding of its Horner steps: within 2 ulp,
// as the GPU's ex2.approx), 2^n from its exponent bits. x < -126.5 (and -inf) gives 0:
// results below 2^-126 flush, as the GPU's ex2.approx.ftz does. NaN stays NaN. About a
// third of the instructions of Sleef's exp2 (u10), which spends them on the full range.
inline Vec exp2_nonpositive(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  const Vec n = at::vec::maximum(x.round(), Vec(-127.f));
  const Vec f = x - n;
  Vec p(0x1.41d332p-13f);
  p = at::vec::fmadd(p, f, Vec(0x1.5f456ap-10f));
  p = at::vec::fmadd(p, f, Vec(0x1.3b2dbcp-7f));
  p = at::vec::fmadd(p, f, Vec(0x1.c6aed4p-5f));
  p = at::vec::fmadd(p, f, Vec(0x1.ebfbdap-3f));
  p = at::vec::fmadd(p, f, Vec(0x1.62e430p-1f));
  p = at::vec::fmadd(p, f, Vec(1.f));
#if defined(CPU_CAPABILITY_AVX512)
  const Vec two_n(_mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23)));
#else
  const Vec two_n(_mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23)));
#endif
  return Vec::blendv(p * two_n, Vec(0.f), x < Vec(-126.5f));
#else
  return x.exp2();  // the portable copy: libm, lane by lane
#endif
}

// w[v] = exp2((x[v] - m) * s) if x[v] >= threshold else 0, x sanitised; returns the sum of
// w (per-lane partial sums in chunk order, then the tail).
float weights(const float* x, int64_t n, float m, float s, float threshold, float* w) {
  const Vec vm(m), vs(s), vt(threshold), zero(0.f);
  Vec sum(0.f);
  int64_t v = 0;
  for (; v + Vec::size() <= n; v += Vec::size()) {
    const Vec y = Vec::loadu(x + v);
    const Vec e = exp2_nonpositive((y - vm) * vs);
    const Vec kept = Vec::blendv(zero, e, y >= vt);
    kept.store(w + v);
    sum = sum + kept;
  }
  float total = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, sum);
  for (; v < n; ++v) {
    w[v] = x[v] >= threshold ? std::exp2((x[v] - m) * s) : 0.f;
    total += w[v];
  }
  return total;
}

// r[v] = max(w_t[v] * inv_t - w_d[v] * inv_d, 0) (w_d = nullptr: 0); returns about the sum.
float residual(const float* wt, float inv_t, const float* wd, float inv_d, int64_t n, float* r) {
  const Vec vt(inv_t), vd(inv_d), zero(0.f);
  Vec sum(0.f);
  int64_t v = 0;
  for (; v + Vec::size() <= n; v += Vec::size()) {
    const Vec p_target = Vec::loadu(wt + v) * vt;
    const Vec p_draft = wd != nullptr ? Vec::loadu(wd + v) * vd : zero;
    const Vec out = at::vec::maximum(p_target - p_draft, zero);
    out.store(r + v);
    sum = sum + out;
  }
  float total = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, sum);
  for (; v < n; ++v) {
    const float p_draft = wd != nullptr ? wd[v] * inv_d : 0.f;
    const float difference = wt[v] * inv_t - p_draft;
    r[v] = difference > 0.f ? difference : 0.f;
    total += r[v];
  }
  return total;
}

constexpr int kRaceGroups = 16;               // Philox calls per block
constexpr int kRaceBlock = 4 * kRaceGroups;   // elements per block

// Philox-4x32-10 (math.h's philox4x32_10) on kRaceGroups consecutive groups at once;
// words[4 i + k] is word k of group first_group + i. With AVX-512, the sixteen groups in
// one vector per word, with AVX2 eight (the 32x32->64-bit products by vpmuludq on the even
// and the odd lanes); otherwise in structure-of-arrays form for the compiler.
#if defined(CPU_CAPABILITY_AVX512)
inline void mulhilo16(__m512i x, __m512i multiplier, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(x, multiplier);                        // lanes 0, 2, ...
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), multiplier);  // lanes 1, 3, ...
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

void philox_block(uint32_t first_group, uint32_t key0, uint32_t key1, uint32_t c1, uint32_t c2, uint32_t c3,
                  uint32_t* words) {
  static_assert(kRaceGroups == 16, "sixteen groups per vector");
  const __m512i m0 = _mm512_set1_epi64(0xD2511F53u), m1 = _mm512_set1_epi64(0xCD9E8D57u);
  __m512i x0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(first_group)),
                                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  __m512i x1 = _mm512_set1_epi32(static_cast<int>(c1)), x2 = _mm512_set1_epi32(static_cast<int>(c2));
  __m512i x3 = _mm512_set1_epi32(static_cast<int>(c3));
  uint32_t k0 = key0, k1 = key1;
  for (int round = 0; round < 10; ++round) {
    __m512i hi0, lo0, hi1, lo1;
    mulhilo16(x0, m0, hi0, lo0);
    mulhilo16(x2, m1, hi1, lo1);
    x0 = _mm512_xor_si512(_mm512_xor_si512(hi1, x1), _mm512_set1_epi32(static_cast<int>(k0)));
    x1 = lo1;
    x2 = _mm512_xor_si512(_mm512_xor_si512(hi0, x3), _mm512_set1_epi32(static_cast<int>(k1)));
    x3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  // Word k of group i is lane i of x_k: transpose to group-major order. Within each
  // 128-bit lane j, u_m holds group 4 j + m; then the 128-bit lanes are transposed.
  const __m512i t0 = _mm512_unpacklo_epi32(x0, x1), t1 = _mm512_unpackhi_epi32(x0, x1);
  const __m512i t2 = _mm512_unpacklo_epi32(x2, x3), t3 = _mm512_unpackhi_epi32(x2, x3);
  const __m512i u0 = _mm512_unpacklo_epi64(t0, t2), u1 = _mm512_unpackhi_epi64(t0, t2);
  const __m512i u2 = _mm512_unpacklo_epi64(t1, t3), u3 = _mm512_unpackhi_epi64(t1, t3);
  const __m512i v0 = _mm512_shuffle_i32x4(u0, u1, 0x44), v1 = _mm512_shuffle_i32x4(u2, u3, 0x44);
  const __m512i v2 = _mm512_shuffle_i32x4(u0, u1, 0xEE), v3 = _mm512_shuffle_i32x4(u2, u3, 0xEE);
  _mm512_storeu_si512(words, _mm512_shuffle_i32x4(v0, v1, 0x88));       // groups 0-3
  _mm512_storeu_si512(words + 16, _mm512_shuffle_i32x4(v0, v1, 0xDD));  // groups 4-7
  _mm512_storeu_si512(words + 32, _mm512_shuffle_i32x4(v2, v3, 0x88));  // groups 8-11
  _mm512_storeu_si512(words + 48, _mm512_shuffle_i32x4(v2, v3, 0xDD));  // groups 12-15
}
#elif defined(CPU_CAPABILITY_AVX2)
inline void mulhilo8(__m256i x, __m256i multiplier, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(x, multiplier);                         // lanes 0, 2, 4, 6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), multiplier);   // lanes 1, 3, 5, 7
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

void philox_block(uint32_t first_group, uint32_t key0, uint32_t key1, uint32_t c1, uint32_t c2, uint32_t c3,
                  uint32_t* words) {
  static_assert(kRaceGroups % 8 == 0, "eight groups per vector");
  const __m256i m0 = _mm256_set1_epi64x(0xD2511F53u), m1 = _mm256_set1_epi64x(0xCD9E8D57u);
  for (int g = 0; g < kRaceGroups; g += 8) {
    __m256i x0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(first_group + g)),
                                  _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256i x1 = _mm256_set1_epi32(static_cast<int>(c1)), x2 = _mm256_set1_epi32(static_cast<int>(c2));
    __m256i x3 = _mm256_set1_epi32(static_cast<int>(c3));
    uint32_t k0 = key0, k1 = key1;
    for (int round = 0; round < 10; ++round) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo8(x0, m0, hi0, lo0);
      mulhilo8(x2, m1, hi1, lo1);
      x0 = _mm256_xor_si256(_mm256_xor_si256(hi1, x1), _mm256_set1_epi32(static_cast<int>(k0)));
      x1 = lo1;
      x2 = _mm256_xor_si256(_mm256_xor_si256(hi0, x3), _mm256_set1_epi32(static_cast<int>(k1)));
      x3 = lo0;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    alignas(32) uint32_t lanes[4][8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[0]), x0);
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[1]), x1);
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[2]), x2);
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[3]), x3);
    for (int i = 0; i < 8; ++i)
      for (int k = 0; k < 4; ++k) words[4 * (g + i) + k] = lanes[k][i];
  }
}
#else
void philox_block(uint32_t first_group, uint32_t key0, uint32_t key1, uint32_t c1, uint32_t c2, uint32_t c3,
                  uint32_t* words) {
  uint32_t x0[kRaceGroups], x1[kRaceGroups], x2[kRaceGroups], x3[kRaceGroups];
  for (int i = 0; i < kRaceGroups; ++i) {
    x0[i] = first_group + static_cast<uint32_t>(i);
    x1[i] = c1;
    x2[i] = c2;
    x3[i] = c3;
  }
  for (int round = 0; round < 10; ++round) {
    for (int i = 0; i < kRaceGroups; ++i) {
      const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * x0[i];
      const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * x2[i];
      x0[i] = static_cast<uint32_t>(p1 >> 32) ^ x1[i] ^ key0;
      x1[i] = static_cast<uint32_t>(p1);
      x2[i] = static_cast<uint32_t>(p0 >> 32) ^ x3[i] ^ key1;
      x3[i] = static_cast<uint32_t>(p0);
    }
    key0 += 0x9E3779B9u;
    key1 += 0xBB67AE85u;
  }
  for (int i = 0; i < kRaceGroups; ++i) {
    words[4 * i] = x0[i];
    words[4 * i + 1] = x1[i];
    words[4 * i + 2] = x2[i];
    words[4 * i + 3] = x3[i];
  }
}
#endif

// E' of kRaceBlock words (math.h's exponential2_spec, vectorised).
void exponential2_block(const uint32_t* words, float* out) {
  float f[kRaceBlock];
  for (int i = 0; i < kRaceBlock; ++i) {
    const uint32_t folded = words[i] ^ static_cast<uint32_t>(static_cast<int32_t>(words[i]) >> 31);
    f[i] = static_cast<float>(static_cast<int32_t>(folded)) * 0x1p-32f + 0x1p-33f;  // folded < 2^31
  }
  const Vec log2e(kLog2e), zero(0.f);
  for (int i = 0; i < kRaceBlock; i += Vec::size()) {
    const Vec x = Vec::loadu(f + i);
    const Vec lower = zero - x.log2();
    const Vec upper = (zero - (zero - x).log1p()) * log2e;
    // Lanes whose word is below 2^31 take -log2(u).
    alignas(64) float low_mask[Vec::size()];
    for (int l = 0; l < Vec::size(); ++l) {
      uint32_t all = words[i + l] < 0x80000000u ? 0xFFFFFFFFu : 0u;
      std::memcpy(&low_mask[l], &all, sizeof(float));
    }
    Vec::blendv(upper, lower, Vec::loadu(low_mask)).store(out + i);
  }
}

// The exhaustive race over every element (64 at a time, E' vectorised).
int64_t race_all(const float* w, int64_t n, uint32_t key0, uint32_t key1, uint32_t c1, uint32_t c2, uint32_t c3) {
  float best = 0.f;  // a zero weight never wins
  int64_t best_index = -1;
  alignas(64) uint32_t words[kRaceBlock];
  alignas(64) float energy[kRaceBlock];
  for (int64_t start = 0; start < n; start += kRaceBlock) {
    const int64_t count = std::min<int64_t>(kRaceBlock, n - start);
    philox_block(static_cast<uint32_t>(start >> 2), key0, key1, c1, c2, c3, words);
    exponential2_block(words, energy);
    for (int64_t i = 0; i < count; ++i) {
      const float key = w[start + i] / energy[i];
      if (key > best) {  // increasing order: ties keep the smaller index
        best = key;
        best_index = start + i;
      }
    }
  }
  return best_index;
}

// E' of one word, exactly as exponential2_spec (written out: no shared inline function in
// a per-instruction-set file).
float exponential2_one(uint32_t x) {
  if (x < 0x80000000u) return -std::log2(static_cast<float>(x) * 0x1p-32f + 0x1p-33f);
  return -std::log1p(-(static_cast<float>(~x) * 0x1p-32f + 0x1p-33f)) * kLog2e;
}

int64_t race(const float* w, int64_t n, float total, uint64_t seed, uint32_t stream, uint32_t position,
             uint64_t offset) {
  const uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
  const uint32_t c1 = (stream << 24) | (position & 0xFFFFFFu);
  const uint32_t c2 = static_cast<uint32_t>(offset), c3 = static_cast<uint32_t>(offset >> 32);
  const float tau = total * (1.f / 64.f);
  if (!(tau > 0.f) || !std::isfinite(tau)) return race_all(w, n, key0, key1, c1, c2, c3);
  // Candidates: E' < w / tau is possible. Lower half (x < 2^31): E' >= 1, so w > tau.
  // Upper half: E' >= w' = (~x + 0.5) 2^-32 > ~x 2^-32 (as -log1p(-w') >= w' and
  // log2(e) > 1), so ~x < w 2^32 / tau; with a margin for the rounding of the bound.
  const float upper_scale = 0x1p32f / tau * (1.f + 0x1p-16f);
  float best = 0.f;
  int64_t best_index = -1;
  alignas(64) uint32_t words[kRaceBlock];
  for (int64_t start = 0; start < n; start += kRaceBlock) {
    const int64_t count = std::min<int64_t>(kRaceBlock, n - start);
    philox_block(static_cast<uint32_t>(start >> 2), key0, key1, c1, c2, c3, words);
    const auto visit = [&](int64_t i) {
      const float key = w[start + i] / exponential2_one(words[i]);
      if (key > best) {  // increasing order: ties keep the smaller index
        best = key;
        best_index = start + i;
      }
    };
    int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    // Eight candidate tests at once, without branches (the words are random).
    const __m256 vtau = _mm256_set1_ps(tau), vscale = _mm256_set1_ps(upper_scale);
    for (; i + 8 <= count; i += 8) {
      const __m256i x = _mm256_load_si256(reinterpret_cast<const __m256i*>(words + i));
      const __m256 weight = _mm256_loadu_ps(w + start + i);
      const __m256 high = _mm256_castsi256_ps(_mm256_srai_epi32(x, 31));  // all ones for x >= 2^31
      const __m256 complement = _mm256_cvtepi32_ps(_mm256_xor_si256(x, _mm256_set1_epi32(-1)));
      const __m256 lower_ok = _mm256_cmp_ps(weight, vtau, _CMP_GT_OQ);
      const __m256 upper_ok = _mm256_cmp_ps(complement, _mm256_mul_ps(weight, vscale), _CMP_LT_OQ);
      unsigned mask = static_cast<unsigned>(_mm256_movemask_ps(_mm256_blendv_ps(lower_ok, upper_ok, high)));
      while (mask) {
        visit(i + __builtin_ctz(mask));
        mask &= mask - 1;
      }
    }
#endif
    for (; i < count; ++i) {
      const uint32_t x = words[i];
      const float weight = w[start + i];
      const bool candidate = x < 0x80000000u ? weight > tau : static_cast<float>(~x) < weight * upper_scale;
      if (candidate) visit(i);  // otherwise its key is at most tau
    }
  }
  if (best > tau) return best_index;          // the winner is a candidate: exact
  return race_all(w, n, key0, key1, c1, c2, c3);  // probability 2^-64 (or no mass)
}

}  // namespace

const RowKernels kKernels{DSPARK_ROWS_NAME, &sanitize<float>, &sanitize<c10::BFloat16>, &sanitize<c10::Half>,
                          &weights, &residual, &race};

}  // namespace dspark::cpu_rows::DSPARK_ROWS_NS
