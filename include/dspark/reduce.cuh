// Block-level building blocks shared by the dspark CUDA kernels: row iteration with
// 16-byte loads, online softmax statistics, argmax, and block-wide reductions. No torch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "dspark/math.h"

namespace dspark {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// Calls fn(v, value) for every element v of a row, each thread taking 16-byte vectors
// (a multiple of 4 elements, so one Philox group never straddles two threads) when the
// row is aligned, scalars otherwise. The row is streamed: read once, not kept in cache.
template <typename T, typename Fn>
__device__ __forceinline__ void for_each_element(const T* row, int64_t vocab, Fn&& fn) {
  constexpr int kVec = 16 / sizeof(T);
  int64_t scalar_begin = 0;
  if ((reinterpret_cast<uintptr_t>(row) & 15) == 0) {
    const int64_t num_vec = vocab / kVec;
    const uint4* vec_row = reinterpret_cast<const uint4*>(row);
    for (int64_t i = threadIdx.x; i < num_vec; i += blockDim.x) {
      const uint4 raw = __ldcs(vec_row + i);
      const T* values = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int e = 0; e < kVec; ++e) fn(i * kVec + e, to_float(values[e]));
    }
    scalar_begin = num_vec * kVec;
  }
  for (int64_t v = scalar_begin + threadIdx.x; v < vocab; v += blockDim.x) fn(v, to_float(row[v]));
}

// Same for two rows of equal length read side by side (target and draft of one position).
template <typename T, typename Fn>
__device__ __forceinline__ void for_each_pair(const T* row_a, const T* row_b, int64_t vocab, Fn&& fn) {
  constexpr int kVec = 16 / sizeof(T);
  int64_t scalar_begin = 0;
  if (((reinterpret_cast<uintptr_t>(row_a) | reinterpret_cast<uintptr_t>(row_b)) & 15) == 0) {
    const int64_t num_vec = vocab / kVec;
    const uint4* vec_a = reinterpret_cast<const uint4*>(row_a);
    const uint4* vec_b = reinterpret_cast<const uint4*>(row_b);
    for (int64_t i = threadIdx.x; i < num_vec; i += blockDim.x) {
      const uint4 raw_a = __ldcs(vec_a + i);
      const uint4 raw_b = __ldcs(vec_b + i);
      const T* values_a = reinterpret_cast<const T*>(&raw_a);
      const T* values_b = reinterpret_cast<const T*>(&raw_b);
#pragma unroll
      for (int e = 0; e < kVec; ++e) fn(i * kVec + e, to_float(values_a[e]), to_float(values_b[e]));
    }
    scalar_begin = num_vec * kVec;
  }
  for (int64_t v = scalar_begin + threadIdx.x; v < vocab; v += blockDim.x)
    fn(v, to_float(row_a[v]), to_float(row_b[v]));
}

// Online softmax statistics at temperature T: the max m of the finite x seen and the sum
// of exp((x - m) / T). Subtracting before dividing keeps every exponent <= 0.
struct SoftmaxStats {
  float max;
  float sum;
  float temperature;

  __device__ __forceinline__ void add(float x) {
    if (x == -INFINITY) return;
    if (x > max) {
      sum = sum * expf((max - x) / temperature) + 1.f;
      max = x;
    } else {
      sum += expf((x - max) / temperature);
    }
  }
};

__device__ __forceinline__ SoftmaxStats combine(SoftmaxStats a, SoftmaxStats b) {
  const float m = fmaxf(a.max, b.max);
  if (m == -INFINITY) return {m, 0.f, a.temperature};
  return {m, a.sum * expf((a.max - m) / a.temperature) + b.sum * expf((b.max - m) / a.temperature), a.temperature};
}

__device__ __forceinline__ ArgMax combine(ArgMax a, ArgMax b) { return merge(a, b); }
__device__ __forceinline__ float combine(float a, float b) { return a + b; }

__device__ __forceinline__ float shfl_xor(float v, int mask) { return __shfl_xor_sync(0xFFFFFFFFu, v, mask); }
__device__ __forceinline__ SoftmaxStats shfl_xor(SoftmaxStats v, int mask) {
  return {shfl_xor(v.max, mask), shfl_xor(v.sum, mask), v.temperature};
}
__device__ __forceinline__ ArgMax shfl_xor(ArgMax v, int mask) {
  return {shfl_xor(v.key, mask), static_cast<int64_t>(__shfl_xor_sync(0xFFFFFFFFu, static_cast<long long>(v.index), mask))};
}

template <typename T>
__device__ __forceinline__ T warp_allreduce(T value) {
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) value = combine(value, shfl_xor(value, mask));
  return value;
}

// Reduction over the block, result in every thread. The combination order is fixed by
// the thread layout, so the result is the same run after run. kThreads is the block size.
template <int kThreads, typename T>
__device__ __forceinline__ T block_allreduce(T value) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block size must be a multiple of 32");
  constexpr int kWarps = kThreads / 32;
  __shared__ T partial[kWarps];
  value = warp_allreduce(value);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // partial[] may still be read by a previous call
  if (lane == 0) partial[warp] = value;
  __syncthreads();
  T total = partial[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) total = combine(total, partial[w]);
  return total;
}

}  // namespace dspark
