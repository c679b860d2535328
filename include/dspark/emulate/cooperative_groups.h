// Stands in for the toolkit's <cooperative_groups.h> in the CUDA emulation (device.h):
// the parts the dspark kernels use, with their CUDA meaning.
//
// coalesced_threads() is the group of the lanes that happen to be converged at the call.
// CUDA promises no more than the calling thread, and lanes here do not run in lockstep,
// so it is exactly that: a group of one. Code that is correct for every grouping CUDA
// allows is correct for this one; code that assumes a full warp there is not.
//
// cluster_group (sm_90) has the toolkit's member names and signatures (static members,
// map_shared_rank(T*, int)), each with a trailing defaulted std::source_location, so that
// the runtime's reports name the kernel's line rather than this header's.
#pragma once

#include <source_location>

#include "dspark/emulate/device.h"

namespace cooperative_groups {

// A set of lanes of one warp (mask), seen from one of them.
class coalesced_group {
 public:
  explicit coalesced_group(unsigned mask) : mask_(mask) {}
  unsigned long long size() const { return static_cast<unsigned long long>(__builtin_popcount(mask_)); }
  unsigned long long num_threads() const { return size(); }
  // Rank of the caller: the number of member lanes below it.
  unsigned long long thread_rank() const {
    return static_cast<unsigned long long>(__builtin_popcount(mask_ & (::dspark::emulate::lane_bit() - 1u)));
  }
  unsigned get_mask() const { return mask_; }
  void sync() const { ::dspark::emulate::syncwarp(DSPARK_EMULATE_HERE, mask_); }

  // Lane of the group's rank-th member.
  int member_lane(unsigned rank) const {
    unsigned rest = mask_;
    for (unsigned i = 0; i < rank; ++i) rest &= rest - 1u;
    return rest == 0u ? -1 : __builtin_ctz(rest);
  }
  template <typename T>
  T shfl(T value, unsigned src_rank) const {
    const int lane = member_lane(src_rank);
    if (lane < 0) ::dspark::emulate::fail("coalesced_group::shfl: source rank out of range", DSPARK_EMULATE_HERE);
    return ::dspark::emulate::shuffle(DSPARK_EMULATE_HERE, ::dspark::emulate::ShuffleMode::kIndex, mask_, value, lane);
  }
  unsigned ballot(int predicate) const {
    const unsigned lanes = ::dspark::emulate::ballot(DSPARK_EMULATE_HERE, "coalesced_group::ballot", mask_, predicate != 0);
    // Bit i of the result is the member of rank i.
    unsigned bits = 0, rank = 0;
    for (int lane = 0; lane < 32; ++lane)
      if ((mask_ >> lane) & 1u) bits |= ((lanes >> lane) & 1u) << rank++;
    return bits;
  }
  bool any(int predicate) const { return ballot(predicate) != 0u; }
  bool all(int predicate) const { return ballot(predicate) == (size() == 32 ? 0xFFFFFFFFu : (1u << size()) - 1u); }

 private:
  unsigned mask_;
};

inline coalesced_group coalesced_threads() { return coalesced_group(::dspark::emulate::lane_bit()); }

// The members of `group` with the caller's label.
template <typename Label>
coalesced_group labeled_partition(const coalesced_group& group, Label label) {
  return coalesced_group(::dspark::emulate::match_any(DSPARK_EMULATE_HERE, group.get_mask(), label));
}

class thread_block {
 public:
  void sync() const { ::dspark::emulate::syncthreads(DSPARK_EMULATE_HERE); }
  unsigned long long size() const {
    const dim3 d = ::dspark::emulate::this_thread().block_dim;
    return static_cast<unsigned long long>(d.x) * d.y * d.z;
  }
  unsigned long long num_threads() const { return size(); }
  unsigned long long thread_rank() const { return ::dspark::emulate::this_thread().linear; }
};

inline thread_block this_thread_block() { return thread_block(); }

// The thread-block cluster of the calling block (runtime.h). Without clusters, a cluster of
// one block, as on a GPU.
class cluster_group {
  friend cluster_group this_cluster();
  cluster_group() = default;

  static ::dspark::emulate::Location at(const std::source_location& where) {
    return ::dspark::emulate::Location{where.file_name(), static_cast<int>(where.line())};
  }
  static unsigned int threads_per_block() {
    const dim3 d = ::dspark::emulate::this_thread().block_dim;
    return d.x * d.y * d.z;
  }

 public:
  // barrier.cluster.arrive + barrier.cluster.wait: every thread of the cluster.
  static void sync(std::source_location where = std::source_location::current()) {
    ::dspark::emulate::cluster_sync(at(where));
  }
  // The same offset in the dynamic shared memory of block `rank` of the cluster.
  template <typename T>
  static T* map_shared_rank(T* addr, int rank, std::source_location where = std::source_location::current()) {
    return static_cast<T*>(::dspark::emulate::map_shared_rank(addr, static_cast<unsigned>(rank), at(where)));
  }
  static unsigned int query_shared_rank(const void* addr,
                                        std::source_location where = std::source_location::current()) {
    return ::dspark::emulate::query_shared_rank(addr, at(where));
  }
  static dim3 block_index() {
    const uint3 b = ::dspark::emulate::this_thread().block_idx;
    const dim3 d = ::dspark::emulate::cluster_dims();
    return dim3(b.x % d.x, b.y % d.y, b.z % d.z);
  }
  static unsigned int block_rank() { return ::dspark::emulate::cluster_block_rank(); }
  static dim3 thread_index() {
    const ::dspark::emulate::ThreadInfo t = ::dspark::emulate::this_thread();
    const dim3 b = block_index();
    return dim3(b.x * t.block_dim.x + t.thread_idx.x, b.y * t.block_dim.y + t.thread_idx.y,
                b.z * t.block_dim.z + t.thread_idx.z);
  }
  static unsigned int thread_rank() {
    return block_rank() * threads_per_block() + ::dspark::emulate::this_thread().linear;
  }
  static dim3 dim_blocks() { return ::dspark::emulate::cluster_dims(); }
  static unsigned int num_blocks() {
    const dim3 d = ::dspark::emulate::cluster_dims();
    return d.x * d.y * d.z;
  }
  static dim3 dim_threads() {
    const dim3 d = ::dspark::emulate::cluster_dims();
    const dim3 b = ::dspark::emulate::this_thread().block_dim;
    return dim3(d.x * b.x, d.y * b.y, d.z * b.z);
  }
  static unsigned int num_threads() { return num_blocks() * threads_per_block(); }
  static unsigned int size() { return num_threads(); }
};

inline cluster_group this_cluster() { return cluster_group(); }

}  // namespace cooperative_groups
