// Block-level building blocks shared by the dspark CUDA kernels: row iteration with
// 16-byte loads, online softmax statistics, argmax, and block-wide reductions. No torch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#include "dspark/math.h"

namespace dspark {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// Rows are split into chunks of 16 bytes (kVec elements, a multiple of 4 so one Philox
// group never straddles two threads); chunk i belongs to thread i % blockDim.x, and each
// thread visits its chunks in increasing order. The mapping depends only on element
// indices, not on the row's alignment, so float sums come out the same for a request
// wherever its row lies (batch invariance). Aligned full chunks use one 16-byte load.
template <typename T>
struct RowChunks {
  static constexpr int kVec = 16 / sizeof(T);
};

template <typename T>
__device__ __forceinline__ void load_chunk(const T* row, int64_t chunk, int64_t vocab, bool vector_load,
                                           float (&out)[RowChunks<T>::kVec]) {
  constexpr int kVec = RowChunks<T>::kVec;
  if (vector_load) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row) + chunk);
    // The 16 loaded bytes as kVec values of T: a copy, not a T* into `raw`, which would
    // read a uint4 object through another type (undefined; g++ -O2 then drops the load).
    T values[kVec];
    memcpy(static_cast<void*>(values), &raw, sizeof(raw));
#pragma unroll
    for (int e = 0; e < kVec; ++e) out[e] = to_float(values[e]);
  } else {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const int64_t v = chunk * kVec + e;
      out[e] = v < vocab ? to_float(row[v]) : 0.f;
    }
  }
}

__device__ __forceinline__ bool is_aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

// Calls fn(v, value) for every element v of a row. Two chunks per iteration, both loads
// issued before either is used, to keep more bytes in flight.
template <typename T, typename Fn>
__device__ __forceinline__ void for_each_element(const T* row, int64_t vocab, Fn&& fn) {
  constexpr int kVec = RowChunks<T>::kVec;
  const int64_t num_chunks = (vocab + kVec - 1) / kVec;
  const int64_t full_chunks = vocab / kVec;
  const bool aligned = is_aligned16(row);
  const int64_t stride = blockDim.x;
  for (int64_t first = threadIdx.x; first < num_chunks; first += 2 * stride) {
    const int64_t second = first + stride;
    const bool has_second = second < num_chunks;
    float a[kVec], b[kVec];
    load_chunk(row, first, vocab, aligned && first < full_chunks, a);
    if (has_second) load_chunk(row, second, vocab, aligned && second < full_chunks, b);
#pragma unroll
    for (int e = 0; e < kVec; ++e)
      if (first * kVec + e < vocab) fn(first * kVec + e, a[e]);
    if (has_second) {
#pragma unroll
      for (int e = 0; e < kVec; ++e)
        if (second * kVec + e < vocab) fn(second * kVec + e, b[e]);
    }
  }
}

// Same for two rows of equal length read side by side (target and draft of one position).
template <typename T, typename Fn>
__device__ __forceinline__ void for_each_pair(const T* row_a, const T* row_b, int64_t vocab, Fn&& fn) {
  constexpr int kVec = RowChunks<T>::kVec;
  const int64_t num_chunks = (vocab + kVec - 1) / kVec;
  const int64_t full_chunks = vocab / kVec;
  const bool aligned_a = is_aligned16(row_a), aligned_b = is_aligned16(row_b);
  for (int64_t chunk = threadIdx.x; chunk < num_chunks; chunk += blockDim.x) {
    float a[kVec], b[kVec];
    load_chunk(row_a, chunk, vocab, aligned_a && chunk < full_chunks, a);
    load_chunk(row_b, chunk, vocab, aligned_b && chunk < full_chunks, b);
#pragma unroll
    for (int e = 0; e < kVec; ++e)
      if (chunk * kVec + e < vocab) fn(chunk * kVec + e, a[e], b[e]);
  }
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
      sum = (max == -INFINITY ? 0.f : sum * expf((max - x) / temperature)) + 1.f;
      max = x;
    } else {
      sum += expf((x - max) / temperature);
    }
  }
};

__device__ __forceinline__ SoftmaxStats combine(SoftmaxStats a, SoftmaxStats b) {
  if (a.max == -INFINITY) return {b.max, b.sum, a.temperature};
  if (b.max == -INFINITY) return a;
  const float m = fmaxf(a.max, b.max);
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
