// The CUDA language as the dspark kernel headers use it, for a host C++ compiler: include
// this before a kernel header (dspark/verify.cuh, ...) and the header compiles unmodified
// as host code; dspark::emulate::launch then runs a kernel on the CPU (runtime.h).
//
// Put include/dspark/emulate first on the include path: its cooperative_groups.h stands in
// for the toolkit's. fp16/bf16 are the toolkit's own host implementations (cuda_fp16.h,
// cuda_bf16.h), vector types come from vector_types.h.
//
// What is not emulated: timing, warp lockstep (lanes run one after another between
// collectives, so code that relies on implicit warp-synchronous execution is not checked
// the way a GPU would break it), the GPU's weak memory model beyond the ordering rules in
// runtime.h, and the last-bit results of device math functions (expf, logf, ... here are
// glibc's; CUDA's are within 1-2 ulp of them, and nvcc contracts a * b + c into fma where
// g++ on x86-64 does not).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>

#include "dspark/emulate/runtime.h"

#define DSPARK_EMULATE 1

// ---------------------------------------------------------------- keywords
// cuda_fp16.h's host path defines __device__, __global__, __host__ and __shared__ as
// nothing. A __shared__ variable is a static variable:
//  * ThreadSanitizer build: `static thread_local`. Block b runs on block worker b % 2 (an OS
//    thread, runtime.cpp), so blocks that run one after another never share the memory,
//    and its accesses from different blocks are not reported as races. It keeps the values
//    of the worker's previous block (zero at first) instead of garbage;
//  * otherwise: a static variable in one ELF section, which the runtime fills with garbage
//    (0xFF bytes: NaN, -1) at the start of every block, like the uninitialised shared memory
//    of a GPU (blocks run one after another, so each sees the section as its own).
// Either way there is one copy per block worker, not per block: the blocks of a thread-block
// cluster, which run together, would share it. A kernel launched with clusters of more than
// one block (launch_cluster) must not use static __shared__ variables, nor call functions
// that do: its shared memory is dynamic shared memory (DSPARK_DYNAMIC_SHARED in
// dspark/cluster.cuh), one per block, which map_shared_rank reaches across the cluster. The
// runtime reports a write to static __shared__ memory in such a launch as an Error (under
// ThreadSanitizer the blocks' accesses to the one copy usually show up as data races).
#undef __shared__
#if defined(__SANITIZE_THREAD__)
#define __shared__ static thread_local
#else
#define __shared__ static __attribute__((section("dspark_shared")))
#endif
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#ifndef __noinline__
#define __noinline__ __attribute__((noinline))
#endif

// ---------------------------------------------------------------- built-in variables
#define threadIdx (::dspark::emulate::this_thread().thread_idx)
#define blockIdx (::dspark::emulate::this_thread().block_idx)
#define blockDim (::dspark::emulate::this_thread().block_dim)
#define gridDim (::dspark::emulate::this_thread().grid_dim)
#define warpSize 32

// ---------------------------------------------------------------- barriers and warp collectives
#define __syncthreads() ::dspark::emulate::syncthreads(DSPARK_EMULATE_HERE)
#define __syncwarp(...) ::dspark::emulate::syncwarp(DSPARK_EMULATE_HERE __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_sync(...) ::dspark::emulate::shuffle(DSPARK_EMULATE_HERE, ::dspark::emulate::ShuffleMode::kIndex, __VA_ARGS__)
#define __shfl_up_sync(...) ::dspark::emulate::shuffle(DSPARK_EMULATE_HERE, ::dspark::emulate::ShuffleMode::kUp, __VA_ARGS__)
#define __shfl_down_sync(...) \
  ::dspark::emulate::shuffle(DSPARK_EMULATE_HERE, ::dspark::emulate::ShuffleMode::kDown, __VA_ARGS__)
#define __shfl_xor_sync(...) ::dspark::emulate::shuffle(DSPARK_EMULATE_HERE, ::dspark::emulate::ShuffleMode::kXor, __VA_ARGS__)
#define __ballot_sync(mask, predicate) ::dspark::emulate::ballot(DSPARK_EMULATE_HERE, "__ballot_sync", mask, predicate)
#define __any_sync(mask, predicate) (::dspark::emulate::ballot(DSPARK_EMULATE_HERE, "__any_sync", mask, predicate) != 0u)
#define __all_sync(mask, predicate) \
  (::dspark::emulate::ballot(DSPARK_EMULATE_HERE, "__all_sync", mask, !(predicate)) == 0u)
#define __match_any_sync(mask, value) ::dspark::emulate::match_any(DSPARK_EMULATE_HERE, mask, value)
// redux.sync (sm_80): the lanes of mask get the sum/min/max (unsigned or int, CUDA's two
// overloads) or the bitwise and/or/xor (unsigned) of their values.
#define __reduce_add_sync(...) \
  ::dspark::emulate::reduce_sync(DSPARK_EMULATE_HERE, ::dspark::emulate::ReduceOp::kAdd, __VA_ARGS__)
#define __reduce_min_sync(...) \
  ::dspark::emulate::reduce_sync(DSPARK_EMULATE_HERE, ::dspark::emulate::ReduceOp::kMin, __VA_ARGS__)
#define __reduce_max_sync(...) \
  ::dspark::emulate::reduce_sync(DSPARK_EMULATE_HERE, ::dspark::emulate::ReduceOp::kMax, __VA_ARGS__)
#define __reduce_and_sync(...) \
  ::dspark::emulate::reduce_bits_sync(DSPARK_EMULATE_HERE, ::dspark::emulate::ReduceOp::kAnd, __VA_ARGS__)
#define __reduce_or_sync(...) \
  ::dspark::emulate::reduce_bits_sync(DSPARK_EMULATE_HERE, ::dspark::emulate::ReduceOp::kOr, __VA_ARGS__)
#define __reduce_xor_sync(...) \
  ::dspark::emulate::reduce_bits_sync(DSPARK_EMULATE_HERE, ::dspark::emulate::ReduceOp::kXor, __VA_ARGS__)

namespace dspark::emulate {

inline unsigned lane_bit() { return 1u << this_thread().lane; }

inline void check_member(unsigned mask, const char* what, Location where) {
  if ((mask & lane_bit()) == 0u)
    fail(std::string(what) + ": the calling lane is not in its member mask (undefined on a GPU)", where);
}

inline void syncwarp(Location where, unsigned mask = 0xFFFFFFFFu) {
  check_member(mask, "__syncwarp", where);
  warp_exchange("__syncwarp", mask, nullptr, 0, nullptr, /*orders_memory=*/true, where);
}

enum class ShuffleMode { kIndex, kUp, kDown, kXor };

// The PTX shfl.sync rule (PTX ISA, "shfl.sync"): with c = ((32 - width) << 8) | clamp,
// segmask = c[12:8], lanes read from lane j computed per mode, or keep their own value
// when j falls outside their segment of `width` lanes.
template <typename T>
T shuffle(Location where, ShuffleMode mode, unsigned mask, T value, int operand, int width = 32) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffle of a type CUDA cannot shuffle");
  const char* what = mode == ShuffleMode::kIndex ? "__shfl_sync"
                     : mode == ShuffleMode::kUp  ? "__shfl_up_sync"
                     : mode == ShuffleMode::kDown ? "__shfl_down_sync" : "__shfl_xor_sync";
  check_member(mask, what, where);
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    fail(std::string(what) + ": width must be a power of two in [1, 32]", where);
  T all[32];
  warp_exchange(what, mask, &value, sizeof(T), all, /*orders_memory=*/false, where);
  const int lane = static_cast<int>(this_thread().lane);
  const int segmask = (32 - width) & 31;
  const int clamp = mode == ShuffleMode::kUp ? 0 : 31;
  const int max_lane = (lane & segmask) | (clamp & ~segmask);
  const int min_lane = lane & segmask;
  const int b = operand & 31;
  int source = lane;
  bool in_range = false;
  switch (mode) {
    case ShuffleMode::kUp: source = lane - b; in_range = source >= max_lane; break;
    case ShuffleMode::kDown: source = lane + b; in_range = source <= max_lane; break;
    case ShuffleMode::kXor: source = lane ^ b; in_range = source <= max_lane; break;
    case ShuffleMode::kIndex: source = min_lane | (b & ~segmask); in_range = source <= max_lane; break;
  }
  if (!in_range) source = lane;
  if ((mask & (1u << source)) == 0u)
    fail(std::string(what) + ": reads lane " + std::to_string(source) + ", which is not in the member mask", where);
  return all[source];
}

inline unsigned ballot(Location where, const char* what, unsigned mask, bool predicate) {
  check_member(mask, what, where);
  bool all[32];
  warp_exchange(what, mask, &predicate, sizeof(bool), all, /*orders_memory=*/false, where);
  unsigned bits = 0;
  for (int lane = 0; lane < 32; ++lane)
    if ((mask >> lane) & 1u) bits |= static_cast<unsigned>(all[lane]) << lane;
  return bits;
}

template <typename T>
unsigned match_any(Location where, unsigned mask, T value) {
  static_assert(std::is_integral_v<T> && sizeof(T) <= 8, "__match_any_sync takes 32- or 64-bit integers");
  check_member(mask, "__match_any_sync", where);
  T all[32];
  warp_exchange("__match_any_sync", mask, &value, sizeof(T), all, /*orders_memory=*/false, where);
  unsigned bits = 0;
  for (int lane = 0; lane < 32; ++lane)
    if (((mask >> lane) & 1u) && all[lane] == value) bits |= 1u << lane;
  return bits;
}

enum class ReduceOp { kAdd, kMin, kMax, kAnd, kOr, kXor };

// redux.sync: every lane of mask gets op over the values of the lanes of mask. Lanes of
// disjoint masks may reduce at the same place at the same time (each group its own
// meeting, as after __match_any_sync). The sum wraps modulo 2^32, as on a GPU.
template <typename T>
T reduce_lanes(Location where, ReduceOp op, unsigned mask, T value) {
  static_assert(std::is_same_v<T, unsigned> || std::is_same_v<T, int>);
  const char* what = op == ReduceOp::kAdd   ? "__reduce_add_sync"
                     : op == ReduceOp::kMin ? "__reduce_min_sync"
                     : op == ReduceOp::kMax ? "__reduce_max_sync"
                     : op == ReduceOp::kAnd ? "__reduce_and_sync"
                     : op == ReduceOp::kOr  ? "__reduce_or_sync"
                                            : "__reduce_xor_sync";
  check_member(mask, what, where);
  T all[32];
  warp_exchange(what, mask, &value, sizeof(T), all, /*orders_memory=*/false, where);
  T result = value;    // min, max, and, or: the caller's value is one of the operands
  unsigned wrapped = 0;  // add, xor: in unsigned arithmetic (an int sum may wrap)
  for (int lane = 0; lane < 32; ++lane) {
    if (((mask >> lane) & 1u) == 0u) continue;
    const T x = all[lane];
    switch (op) {
      case ReduceOp::kAdd: wrapped += static_cast<unsigned>(x); break;
      case ReduceOp::kXor: wrapped ^= static_cast<unsigned>(x); break;
      case ReduceOp::kMin: result = x < result ? x : result; break;
      case ReduceOp::kMax: result = result < x ? x : result; break;
      case ReduceOp::kAnd: result &= x; break;
      case ReduceOp::kOr: result |= x; break;
    }
  }
  return op == ReduceOp::kAdd || op == ReduceOp::kXor ? static_cast<T>(wrapped) : result;
}

// CUDA's overloads: unsigned and int for add/min/max (another integer type converts as it
// would there, or is ambiguous as there), unsigned only for and/or/xor.
inline unsigned reduce_sync(Location where, ReduceOp op, unsigned mask, unsigned value) {
  return reduce_lanes<unsigned>(where, op, mask, value);
}
inline int reduce_sync(Location where, ReduceOp op, unsigned mask, int value) {
  return reduce_lanes<int>(where, op, mask, value);
}
inline unsigned reduce_bits_sync(Location where, ReduceOp op, unsigned mask, unsigned value) {
  return reduce_lanes<unsigned>(where, op, mask, value);
}

// Runs kernel(args...) on grid x block, converting the arguments to the kernel's parameter
// types as a <<<grid, block>>> launch does. No dynamic shared memory, no streams: the
// launch is synchronous. Throws Error.
template <typename... Params, typename... Args>
void launch(const char* kernel_name, void (*kernel)(Params...), dim3 grid, dim3 block, Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "wrong number of kernel arguments");
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  run_kernel(kernel_name, grid, block, [&] { std::apply(kernel, params); });
}

// The same in thread-block clusters of shape `cluster` with dynamic_shared_bytes of dynamic
// shared memory a block: cudaLaunchKernelEx with cudaLaunchAttributeClusterDimension (or a
// <<<grid, block, bytes>>> launch, with cluster (1,1,1)). runtime.h has the rules; CUDA's
// launch errors (grid not a multiple of the cluster, more than 8 blocks a cluster, more
// than 227 KiB) are Errors.
template <typename... Params, typename... Args>
void launch_cluster(const char* kernel_name, void (*kernel)(Params...), dim3 grid, dim3 block, dim3 cluster,
                    std::size_t dynamic_shared_bytes, Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "wrong number of kernel arguments");
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  run_kernel(kernel_name, grid, block, cluster, dynamic_shared_bytes, [&] { std::apply(kernel, params); });
}

}  // namespace dspark::emulate

// ---------------------------------------------------------------- atomics
// Relaxed, like CUDA's atomics: they order nothing else (ThreadSanitizer sees them as atomic).
template <typename T>
inline T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value, std::memory_order_relaxed);
}
template <typename T>
inline T atomicSub(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_sub(value, std::memory_order_relaxed);
}
template <typename T>
inline T atomicExch(T* address, T value) {
  return std::atomic_ref<T>(*address).exchange(value, std::memory_order_relaxed);
}
template <typename T>
inline T atomicCAS(T* address, T compare, T value) {
  std::atomic_ref<T>(*address).compare_exchange_strong(compare, value, std::memory_order_relaxed);
  return compare;  // the old value either way
}
template <typename T, typename Op>
inline T atomic_update(T* address, Op op) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load(std::memory_order_relaxed);
  while (!ref.compare_exchange_weak(old, op(old), std::memory_order_relaxed)) {
  }
  return old;
}
template <typename T>
inline T atomicMax(T* address, T value) {
  return atomic_update(address, [value](T old) { return old < value ? value : old; });
}
template <typename T>
inline T atomicMin(T* address, T value) {
  return atomic_update(address, [value](T old) { return value < old ? value : old; });
}
template <typename T>
inline T atomicAnd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_and(value, std::memory_order_relaxed);
}
template <typename T>
inline T atomicOr(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_or(value, std::memory_order_relaxed);
}
template <typename T>
inline T atomicXor(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_xor(value, std::memory_order_relaxed);
}

// ---------------------------------------------------------------- loads and intrinsics
template <typename T>
inline T __ldg(const T* address) {
  return *address;  // a typed load: UBSan checks its alignment (16 bytes for uint4)
}

inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32);
}
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}

template <typename To, typename From>
inline To emulate_bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From));
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}
inline unsigned __float_as_uint(float x) { return emulate_bit_cast<unsigned>(x); }
inline int __float_as_int(float x) { return emulate_bit_cast<int>(x); }
inline float __uint_as_float(unsigned x) { return emulate_bit_cast<float>(x); }
inline float __int_as_float(int x) { return emulate_bit_cast<float>(x); }
inline long long __double_as_longlong(double x) { return emulate_bit_cast<long long>(x); }
inline double __longlong_as_double(long long x) { return emulate_bit_cast<double>(x); }

// Float to integer with PTX cvt.rni semantics: round to nearest even, saturate to the
// destination range, NaN to 0 (a plain C++ cast would be undefined there).
template <typename I>
inline I emulate_float_to_int_rn(double x) {
  if (x != x) return 0;
  const double r = std::nearbyint(x);
  if (r <= static_cast<double>(std::numeric_limits<I>::min())) return std::numeric_limits<I>::min();
  if (r >= static_cast<double>(std::numeric_limits<I>::max())) return std::numeric_limits<I>::max();
  return static_cast<I>(r);
}
inline unsigned long long __float2ull_rn(float x) { return emulate_float_to_int_rn<unsigned long long>(x); }
inline long long __float2ll_rn(float x) { return emulate_float_to_int_rn<long long>(x); }
inline unsigned __float2uint_rn(float x) { return emulate_float_to_int_rn<unsigned>(x); }
inline int __float2int_rn(float x) { return emulate_float_to_int_rn<int>(x); }

// IEEE round-to-nearest arithmetic (what CUDA's __f*_rn intrinsics promise).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.f / a; }
inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }
inline float __saturatef(float x) { return x != x ? 0.f : (x < 0.f ? 0.f : (x > 1.f ? 1.f : x)); }
// Fast approximations on a GPU; here the accurate functions (a different last bit).
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }

// __threadfence: a full fence, and for ThreadSanitizer (which ignores standalone fences) a
// release and an acquire on one sync object, so that the threadfence-reduction pattern
// (write; fence; atomic count | atomic count; fence; read what the others wrote) orders the
// write before the read, as the fence and the atomic do on a GPU.
namespace dspark::emulate {
void thread_fence();
}
inline void __threadfence() { ::dspark::emulate::thread_fence(); }
inline void __threadfence_block() {}
inline void __threadfence_cluster() { ::dspark::emulate::thread_fence(); }

// CUDA's min/max overloads of device code, for any pair of arithmetic types (floats as
// fminf/fmaxf: a NaN operand loses).
template <typename A, typename B,
          typename = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) return std::fmin(static_cast<C>(a), static_cast<C>(b));
  else return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <typename A, typename B,
          typename = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) return std::fmax(static_cast<C>(a), static_cast<C>(b));
  else return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}
