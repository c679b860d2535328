// The row kernels of the CPU verify: sanitising a row to float32 (and its max), its base-2
// weights exp2((x - m) * s) (and their sum), the residual of a row pair and the race,
// vectorised with ATen's at::vec::Vectorized (exp2 by a polynomial and Sleef's log2/log1p
// under AVX2/AVX-512). Compiled
// once per instruction set (verify_rows_default.cpp, verify_rows_avx2.cpp,
// verify_rows_avx512.cpp); row_kernels() picks the best the CPU has, once. The results of
// one machine do not depend on the batch (each row is reduced alone, in a fixed order), so
// verify stays batch-invariant.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace dspark::cpu_rows {

struct RowKernels {
  const char* name;
  // out[v] = sanitize(float(in[v])) for v < n (in may be out); returns max over v of out[v]
  // (-inf if n = 0).
  float (*sanitize_f32)(const float* in, int64_t n, float* out);
  float (*sanitize_bf16)(const c10::BFloat16* in, int64_t n, float* out);
  float (*sanitize_f16)(const c10::Half* in, int64_t n, float* out);
  // w[v] = exp2((x[v] - m) * s) if x[v] >= threshold, else 0 (x = -inf gives 0), x
  // sanitised; returns the sum of w.
  float (*weights)(const float* x, int64_t n, float m, float s, float threshold, float* w);
  // r[v] = max(w_t[v] * inv_t - w_d[v] * inv_d, 0) (w_d = nullptr: a zero draft
  // distribution); returns the sum of r (in a vector-dependent order: a hint, see race).
  float (*residual)(const float* w_t, float inv_t, const float* w_d, float inv_d, int64_t n, float* r);
  // The race of verify: argmax_v w[v] / E'_v over w[v] > 0 (ties to the smaller v), E' =
  // exponential2_spec of the Philox words of (seed, stream, position, offset); -1 if none.
  // `total` is (about) the sum of w. Exact, with a shortcut: the winning key exceeds
  // tau = total / 64 except with probability 2^-64, and an element can only exceed tau if
  // a cheap bound of its E' (from the raw word) allows it, so E' is computed for those few
  // candidates only; if no key exceeds tau, the race is run again over every element.
  // Philox is vectorised (eight groups per AVX2 vector).
  int64_t (*race)(const float* w, int64_t n, float total, uint64_t seed, uint32_t stream, uint32_t position,
                  uint64_t offset);
};

const RowKernels& default_row_kernels();
const RowKernels& avx2_row_kernels();
const RowKernels& avx512_row_kernels();
bool avx2_sleef_linked();    // Sleef's 256-bit routines resolved at load time
bool avx512_sleef_linked();  // the 512-bit ones
const RowKernels& row_kernels();

inline float sanitize_row(const float* in, int64_t n, float* out) { return row_kernels().sanitize_f32(in, n, out); }
inline float sanitize_row(const c10::BFloat16* in, int64_t n, float* out) {
  return row_kernels().sanitize_bf16(in, n, out);
}
inline float sanitize_row(const c10::Half* in, int64_t n, float* out) { return row_kernels().sanitize_f16(in, n, out); }

}  // namespace dspark::cpu_rows
