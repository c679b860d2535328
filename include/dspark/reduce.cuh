// Block-level building blocks shared by the dspark CUDA kernels: row iteration with
// 16-byte loads, argmax, and block-wide reductions. No torch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

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

// The kVec values of T held in 16 loaded bytes, as floats.
template <typename T>
__device__ __forceinline__ void unpack_chunk(const uint4& raw, float (&out)[RowChunks<T>::kVec]) {
  constexpr int kVec = RowChunks<T>::kVec;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    // bf16 is the high half of a float: the low element of a word is the word shifted
    // left, the high one the word masked, one instruction each (the generic path below
    // extracts the high half first, two instructions).
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      out[2 * w] = __uint_as_float(words[w] << 16);
      out[2 * w + 1] = __uint_as_float(words[w] & 0xFFFF0000u);
    }
  } else {
    // The 16 loaded bytes as kVec values of T: a copy, not a T* into `raw`, which would
    // read a uint4 object through another type (undefined; g++ -O2 then drops the load).
    T values[kVec];
    memcpy(static_cast<void*>(values), &raw, sizeof(raw));
#pragma unroll
    for (int e = 0; e < kVec; ++e) out[e] = to_float(values[e]);
  }
}

// The running maximum of 16-byte chunks of T, NaN skipped (NaN only when every value is),
// not sanitized: sanitize_logit is monotone, so sanitize_logit of this max is the max of
// the sanitized values. 16-bit types keep a packed pair (max.bf16x2 / max.f16x2 return the
// non-NaN operand, like fmaxf), folding a chunk's four words in four instructions: half an
// instruction a value where unpacking and fmaxf take two.
template <typename T>
struct ChunkMax {
  static constexpr bool kPacked = !std::is_same_v<T, float>;
  using Pair = std::conditional_t<std::is_same_v<T, __half>, __half2, __nv_bfloat162>;
  uint32_t pair = std::is_same_v<T, __half> ? 0xFC00FC00u : 0xFF80FF80u;  // -inf, -inf
  float value = -INFINITY;

  __device__ __forceinline__ static uint32_t max2(uint32_t a, uint32_t b) {
    Pair x, y;
    memcpy(static_cast<void*>(&x), &a, sizeof(a));
    memcpy(static_cast<void*>(&y), &b, sizeof(b));
    const Pair m = __hmax2(x, y);
    uint32_t out;
    memcpy(&out, static_cast<const void*>(&m), sizeof(out));
    return out;
  }
  // A chunk's four words folded into one packed pair (16-bit types) or float.
  __device__ __forceinline__ static uint32_t fold_pairs(const uint4& raw) {
    return max2(max2(raw.x, raw.y), max2(raw.z, raw.w));
  }
  __device__ __forceinline__ static float fold_floats(const uint4& raw) {
    return fmaxf(fmaxf(__uint_as_float(raw.x), __uint_as_float(raw.y)),
                 fmaxf(__uint_as_float(raw.z), __uint_as_float(raw.w)));
  }
  __device__ __forceinline__ void add(const uint4& raw) {
    if constexpr (kPacked) {
      pair = max2(pair, fold_pairs(raw));
    } else {
      value = fmaxf(value, fold_floats(raw));
    }
  }
  __device__ __forceinline__ void add(float x) { value = fmaxf(value, x); }
  __device__ __forceinline__ static float pair_max(uint32_t pair) {
    T halves[2];
    memcpy(static_cast<void*>(halves), &pair, sizeof(pair));
    return fmaxf(to_float(halves[0]), to_float(halves[1]));
  }
  __device__ __forceinline__ float get() const {
    if constexpr (kPacked) {
      return fmaxf(value, pair_max(pair));
    } else {
      return value;
    }
  }
};

// The largest value of one chunk (see ChunkMax; without its running -inf start, which the
// compiler cannot drop: fmaxf(-inf, NaN) is -inf).
template <typename T>
__device__ __forceinline__ float chunk_max(const uint4& raw) {
  using M = ChunkMax<T>;
  if constexpr (M::kPacked) {
    return M::pair_max(M::fold_pairs(raw));
  } else {
    return M::fold_floats(raw);
  }
}

template <typename T>
__device__ __forceinline__ void load_chunk(const T* row, int64_t chunk, int64_t vocab, bool vector_load,
                                           float (&out)[RowChunks<T>::kVec]) {
  constexpr int kVec = RowChunks<T>::kVec;
  if (vector_load) {
    unpack_chunk<T>(__ldg(reinterpret_cast<const uint4*>(row) + chunk), out);
  } else {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const int64_t v = chunk * kVec + e;
      out[e] = v < vocab ? to_float(row[v]) : 0.f;
    }
  }
}

__device__ __forceinline__ bool is_aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

// Programmatic dependent launch (sm_90). A kernel launched as a dependent (the launchers'
// `dependent`) may start before the previous kernel of the stream has finished: its
// grid_dependency_wait() returns once that kernel has completed and its writes are
// visible, so it precedes every access to what the previous kernel writes. The previous
// kernel's allow_dependents() lets the dependent's blocks be scheduled once every one of
// its own blocks has run it (so they only take what is left of the GPU; without it, when
// its blocks exit). Both are no-ops before sm_90, for a kernel not launched as a
// dependent, and in the emulation (whose launches run one after another).
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

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

__device__ __forceinline__ ArgMax combine(ArgMax a, ArgMax b) { return merge(a, b); }
__device__ __forceinline__ float combine(float a, float b) { return a + b; }

__device__ __forceinline__ float shfl_xor(float v, int mask) { return __shfl_xor_sync(0xFFFFFFFFu, v, mask); }
__device__ __forceinline__ unsigned long long shfl_xor(unsigned long long v, int mask) {
  return __shfl_xor_sync(0xFFFFFFFFu, v, mask);
}
__device__ __forceinline__ ArgMax shfl_xor(ArgMax v, int mask) {
  return {shfl_xor(v.key, mask), static_cast<int64_t>(__shfl_xor_sync(0xFFFFFFFFu, static_cast<long long>(v.index), mask))};
}

template <typename T, typename Combine>
__device__ __forceinline__ T warp_allreduce(T value, Combine&& combine_fn) {
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) value = combine_fn(value, shfl_xor(value, mask));
  return value;
}

template <typename T>
__device__ __forceinline__ T warp_allreduce(T value) {
  return warp_allreduce(value, [](T a, T b) { return combine(a, b); });
}

// The first step of both block reductions: each warp reduces by shuffles and its lane 0
// publishes the result into `partial` (kThreads / 32 entries of shared memory), readable
// by every thread until the next call with the same `partial`.
template <int kThreads, typename T, typename Combine>
__device__ __forceinline__ const T* warp_partials(T value, Combine&& combine_fn, T* partial) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block size must be a multiple of 32");
  value = warp_allreduce(value, combine_fn);
  __syncthreads();  // partial[] may still be read by a previous call
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = value;
  __syncthreads();
  return partial;
}

// Reduction over the block, result in every thread. The combination order is fixed by
// the thread layout, so the result is the same run after run. kThreads is the block size;
// `scratch` is kThreads / 32 entries of shared memory (a kernel launched in clusters has
// no static __shared__, see verify_filter_kernel).
template <int kThreads, typename T, typename Combine>
__device__ __forceinline__ T block_allreduce(T value, Combine&& combine_fn, T* scratch) {
  const T* partial = warp_partials<kThreads>(value, combine_fn, scratch);
  T total = partial[0];
#pragma unroll
  for (int w = 1; w < kThreads / 32; ++w) total = combine_fn(total, partial[w]);
  return total;
}

template <int kThreads, typename T, typename Combine>
__device__ __forceinline__ T block_allreduce(T value, Combine&& combine_fn) {
  __shared__ T partial[kThreads / 32];
  return block_allreduce<kThreads>(value, combine_fn, partial);
}

// Reduction over the block with the result in thread 0 only: warp 0 reduces the warps'
// partials by shuffles too, instead of every thread combining them. Fixed order, like
// block_allreduce.
template <int kThreads, typename T, typename Combine>
__device__ __forceinline__ T block_reduce(T value, Combine&& combine_fn) {
  constexpr int kWarps = kThreads / 32;
  static_assert((kWarps & (kWarps - 1)) == 0, "block size must be a power-of-two number of warps");
  __shared__ T scratch[kWarps];
  const T* partial = warp_partials<kThreads>(value, combine_fn, scratch);
  if (threadIdx.x < 32) {
    value = partial[threadIdx.x % kWarps];
#pragma unroll
    for (int mask = kWarps / 2; mask > 0; mask >>= 1) value = combine_fn(value, shfl_xor(value, mask));
  }
  return value;
}

// The same with combine(a, b) of the type (sum of floats, argmax).
template <int kThreads, typename T>
__device__ __forceinline__ T block_allreduce(T value) {
  return block_allreduce<kThreads>(value, [](T a, T b) { return combine(a, b); });
}

}  // namespace dspark
