// CUDA kernel of confidence: the DSpark confidence head with STS and survival, one launch.
//
// One block per request, one warp per draft position: the warp dots [h_k; W1[prev_k]]
// with the head's weight (16-byte loads of h and the W1 row), adds the bias, divides by
// the STS temperature of position k and applies the sigmoid; then one thread forms the
// running product along K (survival). Semantics: dspark_ext/reference.py::confidence.
#pragma once

#include <cstdint>

#include "dspark/math.h"
#include "dspark/reduce.cuh"

namespace dspark {

constexpr int kConfidenceThreads = 256;

template <typename W>
struct ConfidenceParams {
  const int64_t* prev_tokens;   // [B, K]
  const W* weight;              // [d + r]
  const W* bias;                // [1]
  const float* sts_temperature; // [K] or nullptr
  float* conf;                  // [B, K]
  float* survival;              // [B, K]
  int64_t steps;                // K
  int64_t hidden;               // d
  int64_t rank;                 // r, 0 without W1
  int64_t vocab;                // Vt
};

// Sum over the warp of x[i] * w[i], i < n; every lane gets the result. Lane l owns the
// 16-byte chunks l, l + 32, ... of x whatever its alignment, so the summation order (and
// the result) does not depend on where the row lies in memory.
template <typename T, typename W>
__device__ __forceinline__ float warp_dot(const T* x, const W* w, int64_t n) {
  constexpr int kVec = RowChunks<T>::kVec;
  const int lane = threadIdx.x % 32;
  const int64_t num_chunks = (n + kVec - 1) / kVec;
  const int64_t full_chunks = n / kVec;
  const bool aligned = is_aligned16(x);
  float acc = 0.f;
  for (int64_t chunk = lane; chunk < num_chunks; chunk += 32) {
    float values[kVec];
    load_chunk(x, chunk, n, aligned && chunk < full_chunks, values);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const int64_t i = chunk * kVec + e;
      if (i < n) acc = fmaf(values[e], to_float(w[i]), acc);
    }
  }
  return warp_allreduce(acc);
}

template <typename T, typename W>
__global__ void __launch_bounds__(kConfidenceThreads) confidence_kernel(const T* __restrict__ hidden,
                                                                        const T* __restrict__ w1,
                                                                        ConfidenceParams<W> p) {
  const int64_t b = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  constexpr int kWarps = kConfidenceThreads / 32;
  for (int64_t k = warp; k < p.steps; k += kWarps) {
    const int64_t row = b * p.steps + k;
    float logit = warp_dot(hidden + row * p.hidden, p.weight, p.hidden);
    bool valid = true;
    if (w1 != nullptr) {
      const int64_t token = p.prev_tokens[row];
      valid = token >= 0 && token < p.vocab;
      // An out-of-range id cannot raise here without a host sync: its confidence is NaN.
      if (valid) logit += warp_dot(w1 + token * p.rank, p.weight + p.hidden, p.rank);
    }
    logit += to_float(p.bias[0]);
    if (p.sts_temperature != nullptr) logit /= p.sts_temperature[k];
    if (lane == 0) p.conf[row] = valid ? confidence_from_logit(logit) : NAN;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float running = 1.f;
    for (int64_t k = 0; k < p.steps; ++k) {
      running *= p.conf[b * p.steps + k];
      p.survival[b * p.steps + k] = running;
    }
  }
}

}  // namespace dspark
