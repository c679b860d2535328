// Unit test of the CUDA emulation (include/dspark/emulate/, csrc/emulate/runtime.cpp),
// without torch: small kernels written in CUDA syntax whose results are known, the
// error reports of the misuses a GPU would hang or misbehave on, and the mma.sync
// fragments against CuTe's layouts. Built and run by `make emulate` / `make emulate-tsan`
// under the sanitizers (CMake option DSPARK_EMULATE).
//
// What a sanitizer reports (it ends the process) or the watchdog (it ends the process too)
// is tested in a child process: this program run again with `--child NAME`, its output
// searched for the report.
#include "dspark/emulate/device.h"
// (device.h first: the headers below are kernel headers)
#include <cooperative_groups.h>

#include "dspark/cluster.cuh"
#include "dspark/mma.cuh"
#include "dspark/reduce.cuh"

#include "check.h"

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

namespace emu = dspark::emulate;
namespace cg = cooperative_groups;

namespace {

using dspark_test::check;

// The message of the Error a launch throws, or "" if it runs to the end.
template <typename Launch>
std::string error_of(Launch&& launch) {
  try {
    launch();
  } catch (const emu::Error& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& text, const char* part) { return text.find(part) != std::string::npos; }

// ------------------------------------------------------------------ kernels
// Block sum of the thread ids through shared memory, one result per block, 3-D grid.
__global__ void block_sum_kernel(int* out) {
  __shared__ int partial[8];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int value = static_cast<int>(threadIdx.x) + 1000 * static_cast<int>(blockIdx.x + gridDim.x * blockIdx.y);
  for (int mask = 16; mask > 0; mask >>= 1) value += __shfl_xor_sync(0xFFFFFFFFu, value, mask);
  if (lane == 0) partial[warp] = value;
  __syncthreads();
  if (threadIdx.x == 0) {
    int total = 0;
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) total += partial[w];
    out[blockIdx.x + gridDim.x * blockIdx.y] = total;
  }
}

__global__ void block_allreduce_kernel(float* out) {
  const float total = dspark::block_allreduce<256>(static_cast<float>(threadIdx.x));
  const dspark::ArgMax best = dspark::block_allreduce<256>(
      dspark::ArgMax{static_cast<float>(threadIdx.x % 100), static_cast<int64_t>(threadIdx.x)});
  out[threadIdx.x] = total;
  out[256 + threadIdx.x] = static_cast<float>(best.index);
}

// Every shuffle mode and width: out[mode][lane] for one warp.
__global__ void shuffle_kernel(int* out, int width, int operand) {
  const int lane = threadIdx.x;
  const int value = 100 + lane;
  out[0 * 32 + lane] = __shfl_sync(0xFFFFFFFFu, value, operand, width);
  out[1 * 32 + lane] = __shfl_up_sync(0xFFFFFFFFu, value, operand, width);
  out[2 * 32 + lane] = __shfl_down_sync(0xFFFFFFFFu, value, operand, width);
  out[3 * 32 + lane] = __shfl_xor_sync(0xFFFFFFFFu, value, operand, width);
  const long long wide = (static_cast<long long>(lane) << 40) | lane;
  out[4 * 32 + lane] = static_cast<int>(__shfl_xor_sync(0xFFFFFFFFu, wide, 1) >> 40);
}

__global__ void vote_kernel(unsigned* out) {
  const unsigned lane = threadIdx.x;
  out[lane] = __ballot_sync(0xFFFFFFFFu, lane % 3 == 0);
  out[32 + lane] = __any_sync(0xFFFFFFFFu, lane == 7) ? 1u : 0u;
  out[64 + lane] = __all_sync(0xFFFFFFFFu, lane < 31) ? 1u : 0u;
  out[96 + lane] = __match_any_sync(0xFFFFFFFFu, lane / 8);
  // Two disjoint half-warp collectives at once.
  const unsigned half = lane < 16 ? 0x0000FFFFu : 0xFFFF0000u;
  out[128 + lane] = __shfl_sync(half, lane, lane < 16 ? 3 : 20);
}

__global__ void atomic_kernel(unsigned long long* total, unsigned* counts) {
  __shared__ unsigned histogram[4];
  if (threadIdx.x < 4) histogram[threadIdx.x] = 0;
  __syncthreads();
  atomicAdd(&histogram[threadIdx.x % 4], 1u);
  atomicAdd(total, static_cast<unsigned long long>(threadIdx.x));
  const cg::coalesced_group peers = cg::labeled_partition(cg::coalesced_threads(), threadIdx.x % 4);
  if (peers.thread_rank() == 0) atomicAdd(&counts[8 + threadIdx.x % 4], static_cast<unsigned>(peers.size()));
  __syncthreads();
  if (threadIdx.x < 4) counts[4 * blockIdx.x + threadIdx.x] = histogram[threadIdx.x];
}

// The threadfence reduction: every block writes its partial, fences, counts itself in;
// the last block to count reads all the partials (under ThreadSanitizer: no race).
__global__ void fence_reduction_kernel(unsigned* partials, unsigned* finished, unsigned* sum) {
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = blockIdx.x + 1;
    __threadfence();
    if (atomicAdd(finished, 1u) == gridDim.x - 1) {
      __threadfence();
      unsigned total = 0;
      for (unsigned b = 0; b < gridDim.x; ++b) total += static_cast<const volatile unsigned*>(partials)[b];
      *sum = total;
    }
  }
}

__global__ void shared_garbage_kernel(unsigned* out) {
  __shared__ unsigned never_written[2];
  if (threadIdx.x == 0) out[blockIdx.x] = never_written[blockIdx.x % 2];
  __syncthreads();
  if (threadIdx.x == 0) never_written[blockIdx.x % 2] = 7;  // the next block must not see it
}

__global__ void missed_barrier_kernel(int skip) {
  if (static_cast<int>(threadIdx.x) == skip) return;
  __syncthreads();
}

__global__ void divergent_barrier_kernel() {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

__global__ void missed_shuffle_kernel(int skip, int* out) {
  int value = static_cast<int>(threadIdx.x);
  if (static_cast<int>(threadIdx.x) != skip) value += __shfl_xor_sync(0xFFFFFFFFu, value, 1);
  __syncthreads();
  out[threadIdx.x] = value;
}

__global__ void lane_outside_mask_kernel() { (void)__shfl_sync(0x0000FFFFu, 1, 0); }

__global__ void partial_warp_kernel() { (void)__shfl_xor_sync(0xFFFFFFFFu, 1, 1); }

__global__ void mismatched_collective_kernel() {
  if (threadIdx.x % 2 == 0) (void)__shfl_xor_sync(0xFFFFFFFFu, 1, 1);
  else (void)__shfl_down_sync(0xFFFFFFFFu, 1, 1);
}

// dspark::load_chunk with 16-byte vector loads and element loads: out[i] = row[i].
template <typename T>
__global__ void load_chunk_kernel(const T* row, int64_t vocab, float* out) {
  constexpr int kVec = dspark::RowChunks<T>::kVec;
  const int64_t chunk = threadIdx.x;
  float values[kVec];
  dspark::load_chunk(row, chunk, vocab, (chunk + 1) * kVec <= vocab, values);
  for (int e = 0; e < kVec; ++e)
    if (chunk * kVec + e < vocab) out[chunk * kVec + e] = values[e];
}

// One m16n8k16 product: A [16,16] row major, B [16,8] (k, n) row major, C/D [16,8].
template <typename T>
__global__ void mma_kernel(const T* a, const T* b, const float* c, float* d) {
  const int lane = threadIdx.x;
  auto pack = [](T low, T high) {
    uint16_t lo, hi;
    std::memcpy(&lo, &low, 2);
    std::memcpy(&hi, &high, 2);
    return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  };
  uint32_t fa[4], fb[2];
  float fc[4], fd[4];
  for (int r = 0; r < 4; ++r) {
    const dspark::TilePosition p0 = dspark::mma_a_position(lane, 2 * r), p1 = dspark::mma_a_position(lane, 2 * r + 1);
    fa[r] = pack(a[p0.row * 16 + p0.col], a[p1.row * 16 + p1.col]);
  }
  for (int r = 0; r < 2; ++r) {
    const dspark::TilePosition p0 = dspark::mma_b_position(lane, 2 * r), p1 = dspark::mma_b_position(lane, 2 * r + 1);
    fb[r] = pack(b[p0.row * 8 + p0.col], b[p1.row * 8 + p1.col]);
  }
  for (int e = 0; e < 4; ++e) {
    const dspark::TilePosition p = dspark::mma_c_position(lane, e);
    fc[e] = c[p.row * 8 + p.col];
  }
  dspark::mma_m16n8k16<T>(fd, fa, fb, fc);
  for (int e = 0; e < 4; ++e) {
    const dspark::TilePosition p = dspark::mma_c_position(lane, e);
    d[p.row * 8 + p.col] = fd[e];
  }
}

// ------------------------------------------------------------------ cluster kernels
// Every block writes its rank into its dynamic shared memory; after cluster.sync() every
// thread reads every block's word through map_shared_rank. Eight results per thread.
__global__ void cluster_exchange_kernel(unsigned* out) {
  cg::cluster_group cluster = cg::this_cluster();
  DSPARK_DYNAMIC_SHARED(unsigned, words);
  const unsigned rank = cluster.block_rank();
  const unsigned t = threadIdx.x;
  words[t] = 1000 * rank + t;
  cluster.sync();
  unsigned ok = 1, sum = 0;
  for (unsigned r = 0; r < cluster.num_blocks(); ++r) {
    const unsigned* remote = cluster.map_shared_rank(words, r);
    ok &= remote[t] == 1000 * r + t && cluster.query_shared_rank(remote) == r;
    sum += remote[(t + r) % blockDim.x];
  }
  const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  unsigned* o = out + 8 * (block * blockDim.x + t);
  const dim3 index = cluster.block_index(), dims = cluster.dim_blocks();
  o[0] = ok;
  o[1] = rank;
  o[2] = sum;
  o[3] = index.x + 10 * index.y + 100 * index.z;
  o[4] = dims.x + 10 * dims.y + 100 * dims.z;
  o[5] = cluster.thread_rank();
  o[6] = cluster.num_threads();
  o[7] = cluster.num_blocks();
  cluster.sync();  // no block exits while another may still read its memory
}

// __syncthreads in a cluster is the block's barrier: block 0 passes two of them while block
// 1 passes one elsewhere (one cluster-wide barrier would be divergent, or never complete).
__global__ void block_barrier_in_cluster_kernel(unsigned* out) {
  cg::cluster_group cluster = cg::this_cluster();
  DSPARK_DYNAMIC_SHARED(unsigned, words);
  const unsigned t = threadIdx.x;
  if (cluster.block_rank() == 0) {
    words[t] = t;
    __syncthreads();
    const unsigned next = words[(t + 1) % blockDim.x];
    __syncthreads();
    out[t] = next;
  } else {
    __syncthreads();
    out[blockDim.x + t] = 7;
  }
}

__global__ void missed_cluster_sync_kernel(unsigned skip_rank) {
  cg::cluster_group cluster = cg::this_cluster();
  if (cluster.block_rank() == skip_rank) return;  // the whole block skips the barrier
  cluster.sync();
}

__global__ void divergent_cluster_sync_kernel() {
  cg::cluster_group cluster = cg::this_cluster();
  if (cluster.block_rank() == 0)
    cluster.sync();
  else
    cluster.sync();
}

__global__ void bad_rank_kernel(int rank) {
  cg::cluster_group cluster = cg::this_cluster();
  DSPARK_DYNAMIC_SHARED(unsigned, words);
  if (cluster.block_rank() == 1 && threadIdx.x == 3) (void)cluster.map_shared_rank(words, rank);
  cluster.sync();
}

__global__ void static_address_kernel() {
  __shared__ unsigned never_mapped[4];
  cg::cluster_group cluster = cg::this_cluster();
  if (threadIdx.x == 0) (void)cluster.map_shared_rank(never_mapped, 0);
  cluster.sync();
}

// Static __shared__ in a cluster kernel: one copy for the cluster's blocks in the emulation.
__global__ void static_shared_cluster_kernel(unsigned* out) {
  __shared__ unsigned shared_value;
  cg::cluster_group cluster = cg::this_cluster();
  if (threadIdx.x == 0) shared_value = 100 + cluster.block_rank();
  cluster.sync();
  if (threadIdx.x == 0) out[blockIdx.x] = shared_value;
  cluster.sync();
}

// Dynamic shared memory as the block finds it: garbage, 16-byte aligned, its own.
__global__ void dynamic_garbage_kernel(unsigned* out, int words_count) {
  DSPARK_DYNAMIC_SHARED(unsigned, words);
  cg::cluster_group cluster = cg::this_cluster();
  if (threadIdx.x == 0) {
    unsigned garbage = 1;
    for (int i = 0; i < words_count; ++i) garbage &= words[i] == 0xFFFFFFFFu;
    out[4 * blockIdx.x] = garbage;
    out[4 * blockIdx.x + 1] = static_cast<unsigned>(reinterpret_cast<uintptr_t>(words) % 16);
    out[4 * blockIdx.x + 2] = cluster.block_rank() + 10 * cluster.num_blocks();
    for (int i = 0; i < words_count; ++i) words[i] = 7;  // no other block may see it
  }
  __syncthreads();
  if (threadIdx.x == blockDim.x - 1) out[4 * blockIdx.x + 3] = words[words_count - 1];
}

// The largest dynamic shared memory CUDA allows, in the largest portable cluster.
__global__ void largest_shared_kernel(unsigned* out, int bytes) {
  cg::cluster_group cluster = cg::this_cluster();
  DSPARK_DYNAMIC_SHARED(unsigned char, memory);
  if (threadIdx.x == 0) memory[bytes - 1] = static_cast<unsigned char>(cluster.block_rank());
  cluster.sync();
  if (threadIdx.x == 0) {
    const unsigned char* next = cluster.map_shared_rank(memory, (cluster.block_rank() + 1) % cluster.num_blocks());
    out[blockIdx.x] = next[bytes - 1];
  }
  cluster.sync();
}

// redux.sync over the groups of equal values __match_any_sync found (each lane with its own
// group's mask, all at the same place), and over half warps.
__global__ void reduce_kernel(unsigned* out) {
  const unsigned lane = threadIdx.x;
  const unsigned peers = __match_any_sync(0xFFFFFFFFu, lane % 3);
  out[lane] = __reduce_add_sync(peers, lane);
  out[32 + lane] = static_cast<unsigned>(__reduce_min_sync(peers, static_cast<int>(lane) - 20));
  out[64 + lane] = static_cast<unsigned>(__reduce_max_sync(peers, static_cast<int>(lane) - 20));
  out[96 + lane] = __reduce_max_sync(peers, lane * 0x10000001u);  // unsigned order
  out[128 + lane] = __reduce_add_sync(0xFFFFFFFFu, 0x80000000u + lane);  // wraps
  out[160 + lane] = __reduce_and_sync(peers, ~(1u << lane));
  out[192 + lane] = __reduce_or_sync(peers, 1u << lane);
  out[224 + lane] = __reduce_xor_sync(peers, lane);
  const unsigned half = lane < 16 ? 0x0000FFFFu : 0xFFFF0000u;
  out[256 + lane] = static_cast<unsigned>(__reduce_add_sync(half, static_cast<int>(lane) - 100));
}

// For the child processes: what a sanitizer or the watchdog reports.
// Block 1 has exited when block 0 (after a barrier: block 1 runs meanwhile) reads its memory.
__global__ void read_after_exit_kernel(unsigned* out) {
  cg::cluster_group cluster = cg::this_cluster();
  DSPARK_DYNAMIC_SHARED(unsigned, words);
  words[threadIdx.x] = threadIdx.x;
  if (cluster.block_rank() == 1) return;
  __syncthreads();
  if (threadIdx.x == 0) out[0] = cluster.map_shared_rank(words, 1)[5];
}

__global__ void overrun_kernel(unsigned* out, int bytes) {
  DSPARK_DYNAMIC_SHARED(unsigned char, memory);
  if (threadIdx.x == 0) out[0] = static_cast<const volatile unsigned char*>(memory)[bytes];
}

// Block 1 reads block 0's word without a cluster barrier after block 0's write.
__global__ void dsmem_race_kernel(unsigned* out) {
  cg::cluster_group cluster = cg::this_cluster();
  DSPARK_DYNAMIC_SHARED(unsigned, words);
  if (cluster.block_rank() == 0 && threadIdx.x == 0) words[0] = 1;
  if (cluster.block_rank() == 1 && threadIdx.x == 0) out[0] = cluster.map_shared_rank(words, 0)[0];
  cluster.sync();
}

// A thread of block 3 (cluster 1) waits for a value no one writes: on a GPU a hang.
__global__ void spin_kernel() {
  DSPARK_DYNAMIC_SHARED(unsigned, words);
  if (blockIdx.x == 3 && threadIdx.x == 0)
    while (static_cast<const volatile unsigned*>(words)[0] != 12345u) {
    }
}

// ------------------------------------------------------------------ tests
void test_blocks_and_barriers() {
  std::vector<int> out(6, -1);
  emu::launch("block_sum_kernel", block_sum_kernel, dim3(3, 2), dim3(256), out.data());
  bool ok = true;
  for (int b = 0; b < 6; ++b) ok &= out[b] == 255 * 256 / 2 + 1000 * b * 256;
  check(ok, "block sum over a 3x2 grid (shuffles, shared memory, __syncthreads)", "out[0]=%d out[5]=%d", out[0],
        out[5]);

  std::vector<float> reduced(512, -1.f);
  emu::launch("block_allreduce_kernel", block_allreduce_kernel, dim3(1), dim3(256), reduced.data());
  bool all_total = true, all_best = true;
  for (int t = 0; t < 256; ++t) {
    all_total &= reduced[t] == 255.f * 256.f / 2.f;
    all_best &= reduced[256 + t] == 99.f;  // key 99 first reached by thread 99 (ties: smaller index)
  }
  check(all_total && all_best, "dspark::block_allreduce (sum and ArgMax) in every thread", "total %f best %f",
        reduced[0], reduced[256]);
}

void test_shuffles() {
  for (int width : {32, 16, 8, 4}) {
    for (int operand : {0, 1, 3, 5, 19}) {
      std::vector<int> out(5 * 32, -1);
      emu::launch("shuffle_kernel", shuffle_kernel, dim3(1), dim3(32), out.data(), width, operand);
      bool ok = true;
      for (int lane = 0; lane < 32; ++lane) {
        const int base = lane - lane % width;  // first lane of the segment
        const int b = operand & 31;
        const int index = base + b % width;
        const int up = lane - b >= base ? lane - b : lane;
        const int down = lane + b < base + width ? lane + b : lane;
        const int x = lane ^ b;
        const int xor_source = x < base + width ? x : lane;  // CUDA: a lane of a later segment reads itself
        ok &= out[lane] == 100 + index;
        ok &= out[32 + lane] == 100 + up;
        ok &= out[64 + lane] == 100 + down;
        ok &= out[96 + lane] == 100 + xor_source;
        ok &= out[128 + lane] == (lane ^ 1);
      }
      char name[96];
      std::snprintf(name, sizeof(name), "shuffles idx/up/down/xor, width %d, operand %d", width, operand);
      check(ok, name, "lane 5: %d %d %d %d", out[5], out[37], out[69], out[101]);
    }
  }
}

void test_votes() {
  std::vector<unsigned> out(160, 0);
  emu::launch("vote_kernel", vote_kernel, dim3(1), dim3(32), out.data());
  unsigned ballot = 0;
  for (unsigned lane = 0; lane < 32; lane += 3) ballot |= 1u << lane;
  bool ok = true;
  for (unsigned lane = 0; lane < 32; ++lane) {
    ok &= out[lane] == ballot && out[32 + lane] == 1u && out[64 + lane] == 0u;
    ok &= out[96 + lane] == 0xFFu << (8 * (lane / 8));
    ok &= out[128 + lane] == (lane < 16 ? 3u : 20u);
  }
  check(ok, "ballot, any, all, match_any, two half-warp shuffles at once", "ballot %x match %x half %u", out[0], out[96],
        out[128]);
}

void test_atomics_and_groups() {
  unsigned long long total = 0;
  std::vector<unsigned> counts(12, 0);
  emu::launch("atomic_kernel", atomic_kernel, dim3(2), dim3(128), &total, counts.data());
  bool ok = total == 2ull * (127 * 128 / 2);
  for (int i = 0; i < 4; ++i) ok &= counts[i] == 32u && counts[4 + i] == 32u && counts[8 + i] == 64u;
  check(ok, "atomicAdd on shared and global memory; labeled_partition of coalesced_threads", "total %llu c0 %u g0 %u",
        total, counts[0], counts[8]);
}

void test_threadfence_reduction() {
  std::vector<unsigned> partials(64, 0);
  unsigned finished = 0, sum = 0;
  emu::launch("fence_reduction_kernel", fence_reduction_kernel, dim3(64), dim3(32), partials.data(), &finished, &sum);
  check(sum == 64u * 65u / 2u && finished == 64u, "threadfence reduction: the last block reads every partial",
        "sum %u finished %u", sum, finished);
}

void test_shared_memory_is_private_per_block() {
  std::vector<unsigned> out(4, 0);
  emu::launch("shared_garbage_kernel", shared_garbage_kernel, dim3(2), dim3(64), out.data());
#if defined(__SANITIZE_THREAD__)
  const unsigned expected = 0u;  // thread_local storage of a new OS thread (device.h)
#else
  const unsigned expected = 0xFFFFFFFFu;  // the garbage fill of the shared-memory section
#endif
  check(out[0] == expected && out[1] == expected,
        "__shared__ memory is new at the start of every block (no value of the previous block)", "%x %x %x %x",
        out[0], out[1], out[2], out[3]);
}

void test_errors() {
  std::string e = error_of([] { emu::launch("missed_barrier_kernel", missed_barrier_kernel, dim3(2), dim3(64), 17); });
  check(contains(e, "missed_barrier_kernel") && contains(e, "deadlock") && contains(e, "exited: 17") &&
            contains(e, "__syncthreads at test_emulate.cpp"),
        "a thread that misses __syncthreads: deadlock reported with kernel, block and places", "%s", e.c_str());

  e = error_of([] { emu::launch("divergent_barrier_kernel", divergent_barrier_kernel, dim3(1), dim3(64)); });
  check(contains(e, "divergent barrier"), "__syncthreads at two places: divergent barrier", "%s", e.c_str());

  std::vector<int> out(64);
  e = error_of([&] { emu::launch("missed_shuffle_kernel", missed_shuffle_kernel, dim3(1), dim3(64), 5, out.data()); });
  check(contains(e, "missed_shuffle_kernel") && contains(e, "deadlock") && contains(e, "__shfl_xor_sync(mask 0xffffffff)"),
        "a lane that skips a full-mask shuffle: deadlock reported", "%s", e.c_str());

  e = error_of([&] { emu::launch("missed_shuffle_kernel", missed_shuffle_kernel, dim3(1), dim3(64), -1, out.data()); });
  check(e.empty() && out[4] == 9 && out[5] == 9, "the same kernel without the skip runs", "%s", e.c_str());

  e = error_of([] { emu::launch("lane_outside_mask_kernel", lane_outside_mask_kernel, dim3(1), dim3(32)); });
  check(contains(e, "not in its member mask"), "a lane calling a shuffle whose mask excludes it", "%s", e.c_str());

  e = error_of([] { emu::launch("partial_warp_kernel", partial_warp_kernel, dim3(1), dim3(48)); });
  check(contains(e, "do not exist"), "a full-mask shuffle in a partial warp", "%s", e.c_str());

  e = error_of([] { emu::launch("mismatched_collective_kernel", mismatched_collective_kernel, dim3(1), dim3(32)); });
  check(contains(e, "same collective"), "lanes at two different collectives", "%s", e.c_str());

  e = error_of([] { emu::launch("missed_barrier_kernel", missed_barrier_kernel, dim3(1), dim3(2048), 0); });
  check(contains(e, "1024"), "a block of more than 1024 threads is refused", "%s", e.c_str());

  // The runtime is usable again after an error.
  std::vector<int> sums(6, -1);
  emu::launch("block_sum_kernel", block_sum_kernel, dim3(3, 2), dim3(256), sums.data());
  check(sums[0] == 255 * 256 / 2, "launches work after a failed launch", "out[0]=%d", sums[0]);
}

// ------------------------------------------------------------------ cluster tests
void test_clusters() {
  // Grid (4,2,2) in clusters (2,1,2): four clusters of four blocks, rank x + 2 z.
  const dim3 grid(4, 2, 2), cluster(2, 1, 2), block(64);
  std::vector<unsigned> out(16 * 64 * 8, 0xDEADu);
  emu::launch_cluster("cluster_exchange_kernel", cluster_exchange_kernel, grid, block, cluster, 64 * sizeof(unsigned),
                      out.data());
  bool ok = true;
  int first_bad = -1;
  for (unsigned z = 0; z < 2; ++z)
    for (unsigned y = 0; y < 2; ++y)
      for (unsigned x = 0; x < 4; ++x)
        for (unsigned t = 0; t < 64; ++t) {
          const unsigned b = x + 4 * (y + 2 * z);
          const unsigned* o = &out[8 * (b * 64 + t)];
          const unsigned rank = x % 2 + 2 * (z % 2);
          unsigned sum = 0;
          for (unsigned r = 0; r < 4; ++r) sum += 1000 * r + (t + r) % 64;
          const bool good = o[0] == 1u && o[1] == rank && o[2] == sum && o[3] == x % 2 + 100 * (z % 2) &&
                            o[4] == 2 + 10 + 200 && o[5] == rank * 64 + t && o[6] == 256 && o[7] == 4;
          if (!good && first_bad < 0) first_bad = static_cast<int>(b * 64 + t);
          ok &= good;
        }
  check(ok, "cluster (2,1,2) of a (4,2,2) grid: ranks, cluster.sync(), map_shared_rank reads of every block, "
            "query_shared_rank, block_index, dim_blocks, thread_rank, num_threads, num_blocks",
        "first bad thread %d: ok %u rank %u sum %u index %u dims %u", first_bad,
        first_bad < 0 ? 0 : out[8 * first_bad], first_bad < 0 ? 0 : out[8 * first_bad + 1],
        first_bad < 0 ? 0 : out[8 * first_bad + 2], first_bad < 0 ? 0 : out[8 * first_bad + 3],
        first_bad < 0 ? 0 : out[8 * first_bad + 4]);

  std::vector<unsigned> barrier_out(128, 0);
  std::string e = error_of([&] {
    emu::launch_cluster("block_barrier_in_cluster_kernel", block_barrier_in_cluster_kernel, dim3(2), dim3(64), dim3(2),
                        64 * sizeof(unsigned), barrier_out.data());
  });
  bool barrier_ok = e.empty();
  for (unsigned t = 0; t < 64; ++t) barrier_ok &= barrier_out[t] == (t + 1) % 64 && barrier_out[64 + t] == 7u;
  check(barrier_ok, "__syncthreads in a cluster waits for the block only (blocks at different barriers)", "%s",
        e.c_str());

  for (unsigned cluster_x : {1u, 2u}) {
    std::vector<unsigned> g(16, 0);
    emu::launch_cluster("dynamic_garbage_kernel", dynamic_garbage_kernel, dim3(4), dim3(32), dim3(cluster_x), 20,
                        g.data(), 5);
    bool fresh = true;
    for (unsigned b = 0; b < 4; ++b)
      fresh &= g[4 * b] == 1u && g[4 * b + 1] == 0u && g[4 * b + 2] == b % cluster_x + 10 * cluster_x &&
               g[4 * b + 3] == 7u;
    char name[160];
    std::snprintf(name, sizeof(name),
                  "dynamic shared memory, clusters of %u: 0xFF garbage at the start of every block, 16-byte "
                  "aligned, a block's own",
                  cluster_x);
    check(fresh, name, "block 1: garbage %u align %u rank %u last %u", g[4], g[5], g[6], g[7]);
  }

  std::vector<unsigned> largest(8, 99);
  e = error_of([&] {
    emu::launch_cluster("largest_shared_kernel", largest_shared_kernel, dim3(8), dim3(32), dim3(8),
                        emu::kMaxDynamicSharedBytes, largest.data(), static_cast<int>(emu::kMaxDynamicSharedBytes));
  });
  bool largest_ok = e.empty();
  for (unsigned b = 0; b < 8; ++b) largest_ok &= largest[b] == (b + 1) % 8;
  check(largest_ok, "227 KiB of dynamic shared memory in each block of a cluster of 8", "%s out[0]=%u", e.c_str(),
        largest[0]);

  std::vector<unsigned> static_out(2, 0);
  e = error_of([&] {
    emu::launch_cluster("static_shared_cluster_kernel", static_shared_cluster_kernel, dim3(2), dim3(32), dim3(1), 0,
                        static_out.data());
  });
  check(e.empty() && static_out[0] == 100u && static_out[1] == 100u,
        "static __shared__ in a launch with clusters of one block is fine", "%s", e.c_str());
}

void test_cluster_errors() {
  std::string e = error_of([] {
    emu::launch_cluster("missed_cluster_sync_kernel", missed_cluster_sync_kernel, dim3(4), dim3(64), dim3(2), 0, 1u);
  });
  check(contains(e, "missed_cluster_sync_kernel, cluster (0,0,0) of blocks (0,0,0) to (1,0,0)") &&
            contains(e, "deadlock") && contains(e, "block (1,0,0) exited: 0,1,") &&
            contains(e, "block (0,0,0) waiting at cluster_sync at test_emulate.cpp:"),
        "a block that skips cluster.sync(): deadlock reported with the cluster, its blocks and places", "%s",
        e.c_str());

  e = error_of([] {
    emu::launch_cluster("divergent_cluster_sync_kernel", divergent_cluster_sync_kernel, dim3(2), dim3(32), dim3(2), 0);
  });
  check(contains(e, "divergent barrier") && contains(e, "block (1,0,0)") && contains(e, "cluster_sync at"),
        "cluster.sync() at two places: divergent barrier", "%s", e.c_str());

  e = error_of([] {
    emu::launch_cluster("bad_rank_kernel", bad_rank_kernel, dim3(2), dim3(32), dim3(2), 16, 2);
  });
  check(contains(e, "rank 2, but the cluster has 2 blocks") && contains(e, "block (1,0,0)") &&
            contains(e, "thread (3,0,0)") && contains(e, "map_shared_rank at test_emulate.cpp:"),
        "map_shared_rank to a rank outside the cluster", "%s", e.c_str());
  e = error_of([] {
    emu::launch_cluster("bad_rank_kernel", bad_rank_kernel, dim3(2), dim3(32), dim3(2), 16, -1);
  });
  check(contains(e, "rank -1, but the cluster has 2 blocks"), "map_shared_rank to rank -1", "%s", e.c_str());

  e = error_of([] {
    emu::launch_cluster("static_address_kernel", static_address_kernel, dim3(2), dim3(32), dim3(2), 64);
  });
  check(contains(e, "not in the block's dynamic shared memory") && contains(e, "static __shared__"),
        "map_shared_rank of a static __shared__ variable is refused", "%s", e.c_str());

#if !defined(__SANITIZE_THREAD__)
  std::vector<unsigned> out(4, 0);
  e = error_of([&] {
    emu::launch_cluster("static_shared_cluster_kernel", static_shared_cluster_kernel, dim3(4), dim3(32), dim3(2), 0,
                        out.data());
  });
  check(contains(e, "static_shared_cluster_kernel, cluster (0,0,0)") &&
            contains(e, "static __shared__ memory was written in a launch with clusters of 2 blocks") &&
            contains(e, "DSPARK_DYNAMIC_SHARED"),
        "static __shared__ written in a cluster kernel is an Error", "%s", e.c_str());
#endif

  e = error_of([] { emu::launch_cluster("spin_kernel", spin_kernel, dim3(3), dim3(32), dim3(2), 0); });
  check(contains(e, "grid (3,1,1) is not a multiple of the cluster (2,1,1)"),
        "a grid that is not a multiple of the cluster is refused", "%s", e.c_str());
  e = error_of([] { emu::launch_cluster("spin_kernel", spin_kernel, dim3(9), dim3(32), dim3(9), 0); });
  check(contains(e, "invalid cluster (9,1,1) of 9 blocks"), "a cluster of 9 blocks is refused", "%s", e.c_str());
  e = error_of([] { emu::launch_cluster("spin_kernel", spin_kernel, dim3(6, 3), dim3(32), dim3(3, 3), 0); });
  check(contains(e, "invalid cluster (3,3,1) of 9 blocks"), "a cluster of 3x3 blocks is refused", "%s", e.c_str());
  e = error_of([] { emu::launch_cluster("spin_kernel", spin_kernel, dim3(2), dim3(32), dim3(0, 1, 1), 0); });
  check(contains(e, "invalid cluster (0,1,1)"), "a cluster of 0 blocks is refused", "%s", e.c_str());
  e = error_of([] {
    emu::launch_cluster("spin_kernel", spin_kernel, dim3(2), dim3(32), dim3(2), emu::kMaxDynamicSharedBytes + 1);
  });
  check(contains(e, "232449 bytes of dynamic shared memory") && contains(e, "at most 232448"),
        "more than 227 KiB of dynamic shared memory is refused", "%s", e.c_str());

  // The runtime is usable again after these errors.
  std::vector<unsigned> g(8, 0);
  emu::launch_cluster("dynamic_garbage_kernel", dynamic_garbage_kernel, dim3(2), dim3(32), dim3(2), 8, g.data(), 2);
  check(g[0] == 1u && g[4] == 1u && g[7] == 7u, "cluster launches work after failed ones", "%u %u %u", g[0], g[4],
        g[7]);
}

void test_reduce() {
  std::vector<unsigned> out(288, 0);
  emu::launch("reduce_kernel", reduce_kernel, dim3(1), dim3(32), out.data());
  bool ok = true;
  for (unsigned lane = 0; lane < 32; ++lane) {
    unsigned sum = 0, mask = 0, xor_all = 0, max_u = 0;
    int min_i = 1 << 30, max_i = -(1 << 30);
    for (unsigned l = lane % 3; l < 32; l += 3) {
      sum += l;
      mask |= 1u << l;
      xor_all ^= l;
      max_u = std::max(max_u, l * 0x10000001u);
      min_i = std::min(min_i, static_cast<int>(l) - 20);
      max_i = std::max(max_i, static_cast<int>(l) - 20);
    }
    unsigned wrapped = 0;
    for (unsigned l = 0; l < 32; ++l) wrapped += 0x80000000u + l;
    const int half = lane < 16 ? (0 + 15) * 16 / 2 - 1600 : (16 + 31) * 16 / 2 - 1600;
    ok &= out[lane] == sum && static_cast<int>(out[32 + lane]) == min_i && static_cast<int>(out[64 + lane]) == max_i;
    ok &= out[96 + lane] == max_u && out[128 + lane] == wrapped && out[160 + lane] == ~mask;
    ok &= out[192 + lane] == mask && out[224 + lane] == xor_all && static_cast<int>(out[256 + lane]) == half;
  }
  check(ok, "__reduce_{add,min,max,and,or,xor}_sync over the groups of __match_any_sync (disjoint masks at one place), "
            "int and unsigned, wrapping sum, half warps",
        "lane 4: add %u min %d max %d umax %x wrap %x and %x or %x xor %u half %d", out[4],
        static_cast<int>(out[36]), static_cast<int>(out[68]), out[100], out[132], out[164], out[196], out[228],
        static_cast<int>(out[260]));
}

// Runs this program with --child `mode` (after `env`, shell words); its exit status and
// output (stdout and stderr).
struct ChildResult {
  int status;
  std::string output;
};

ChildResult run_child(const char* mode, const char* env = "") {
  char self[4096];
  const ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (n <= 0) return {-1, "readlink /proc/self/exe failed"};
  self[n] = '\0';
  const std::string command = std::string(env) + " '" + self + "' --child " + mode + " 2>&1";
  FILE* pipe = popen(command.c_str(), "r");
  if (!pipe) return {-1, "popen failed"};
  std::string output;
  char buffer[4096];
  for (std::size_t got; (got = std::fread(buffer, 1, sizeof(buffer), pipe)) > 0;) output.append(buffer, got);
  const int status = pclose(pipe);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status), output};
}

// The tail of a child's output, for a failure message.
std::string tail(const std::string& text) { return text.size() > 1500 ? text.substr(text.size() - 1500) : text; }

int child_main(const std::string& mode) {
  std::vector<unsigned> out(64, 0);
  if (mode == "read-after-exit")
    emu::launch_cluster("read_after_exit_kernel", read_after_exit_kernel, dim3(2), dim3(32), dim3(2), 128, out.data());
  else if (mode == "overrun")
    emu::launch_cluster("overrun_kernel", overrun_kernel, dim3(1), dim3(32), dim3(1), 100, out.data(), 100);
  else if (mode == "dsmem-race")
    emu::launch_cluster("dsmem_race_kernel", dsmem_race_kernel, dim3(2), dim3(32), dim3(2), 16, out.data());
  else if (mode == "static-shared")
    emu::launch_cluster("static_shared_cluster_kernel", static_shared_cluster_kernel, dim3(2), dim3(32), dim3(2), 0,
                        out.data());
  else if (mode == "spin")
    emu::launch_cluster("spin_kernel", spin_kernel, dim3(4), dim3(32), dim3(2), 16);
  else
    std::printf("unknown child mode %s\n", mode.c_str());
  std::printf("child %s: finished without a report\n", mode.c_str());
  return 0;
}

void test_reports_in_child_processes() {
#if defined(__SANITIZE_ADDRESS__)
  ChildResult r = run_child("read-after-exit");
  check(r.status != 0 && contains(r.output, "use-after-poison") && contains(r.output, "read_after_exit_kernel"),
        "AddressSanitizer: reading the dynamic shared memory of a block of the cluster that has exited",
        "status %d\n%s", r.status, tail(r.output).c_str());
  r = run_child("overrun");
  check(r.status != 0 && contains(r.output, "heap-buffer-overflow") && contains(r.output, "100-byte region") &&
            contains(r.output, "overrun_kernel"),
        "AddressSanitizer: reading past the end of dynamic shared memory", "status %d\n%s", r.status,
        tail(r.output).c_str());
#endif
#if defined(__SANITIZE_THREAD__)
  ChildResult r = run_child("dsmem-race");
  check(r.status != 0 && contains(r.output, "ThreadSanitizer: data race") && contains(r.output, "dsmem_race_kernel"),
        "ThreadSanitizer: a distributed shared memory read without cluster.sync() after the write is a race",
        "status %d\n%s", r.status, tail(r.output).c_str());
  r = run_child("static-shared");
  check(r.status != 0 && contains(r.output, "ThreadSanitizer: data race") &&
            contains(r.output, "static_shared_cluster_kernel"),
        "ThreadSanitizer: static __shared__ written by the blocks of a cluster is reported (one copy)", "status %d\n%s",
        r.status, tail(r.output).c_str());
#endif
  const ChildResult spin = run_child("spin", "DSPARK_EMULATE_TIMEOUT_S=1");
  check(spin.status == 124 && contains(spin.output, "kernel spin_kernel ran longer than 1 s") &&
            contains(spin.output, "cluster (1,0,0), block (3,0,0), thread 0"),
        "the watchdog ends a spinning cluster kernel and names the cluster, block and thread", "status %d\n%s",
        spin.status, tail(spin.output).c_str());
}

template <typename T>
void test_load_chunk(const char* name, T (*convert)(float)) {
  constexpr int kVocab = 61;  // 7 full chunks of 8 halves / 15 of 4 floats, then a partial one
  alignas(16) T row[64];
  std::vector<float> out(kVocab, -1.f);
  for (int i = 0; i < kVocab; ++i) row[i] = convert(static_cast<float>(i) - 20.5f);
  const int chunks = (kVocab + dspark::RowChunks<T>::kVec - 1) / dspark::RowChunks<T>::kVec;
  emu::launch("load_chunk_kernel", load_chunk_kernel<T>, dim3(1), dim3(chunks), static_cast<const T*>(row),
              static_cast<int64_t>(kVocab), out.data());
  bool ok = true;
  for (int i = 0; i < kVocab; ++i) ok &= out[i] == static_cast<float>(i) - 20.5f;
  check(ok, name, "out[0]=%f out[60]=%f", out[0], out[60]);
}

// CuTe's (thread, value) -> coordinate layouts of SM80_16x8x16_F32BF16BF16F32_TN
// (cute/atom/mma_traits_sm80.hpp): ALayout ((4,8),(2,2,2)):((32,1),(16,8,128)) over the
// column-major (M=16, K=16) tile, BLayout ((4,8),(2,2)):((16,1),(8,64)) over (N=8, K=16),
// CLayout ((4,8),(2,2)):((32,1),(16,8)) over (M=16, N=8). Thread t = t0 + 4 t1, value
// v = v0 + 2 v1 (+ 4 v2). An independent statement of the PTX fragment tables.
int cute_offset(int lane, int value, const int (&thread_stride)[2], const int (&value_stride)[3]) {
  return (lane % 4) * thread_stride[0] + (lane / 4) * thread_stride[1] + (value % 2) * value_stride[0] +
         ((value / 2) % 2) * value_stride[1] + (value / 4) * value_stride[2];
}

void test_mma_fragments_match_cute() {
  bool ok = true;
  for (int lane = 0; lane < 32; ++lane) {
    for (int e = 0; e < 8; ++e) {
      const int offset = cute_offset(lane, e, {32, 1}, {16, 8, 128});
      const dspark::TilePosition p = dspark::mma_a_position(lane, e);
      ok &= p.row == offset % 16 && p.col == offset / 16;
    }
    for (int e = 0; e < 4; ++e) {
      const int b = cute_offset(lane, e, {16, 1}, {8, 64, 0});
      const dspark::TilePosition pb = dspark::mma_b_position(lane, e);
      ok &= pb.col == b % 8 && pb.row == b / 8;  // (n, k) column major: n + 8 k
      const int c = cute_offset(lane, e, {32, 1}, {16, 8, 0});
      const dspark::TilePosition pc = dspark::mma_c_position(lane, e);
      ok &= pc.row == c % 16 && pc.col == c / 16;
    }
  }
  check(ok, "mma.m16n8k16 fragment positions equal CuTe's SM80 16x8x16 layouts");
}

template <typename T>
void test_mma(const char* name, T (*convert)(float)) {
  std::vector<T> a(256), b(128);
  std::vector<float> af(256), bf(128), c(128), d(128, -1.f);
  for (int i = 0; i < 256; ++i) af[i] = static_cast<float>((i * 37) % 11 - 5) * 0.25f;
  for (int i = 0; i < 128; ++i) bf[i] = static_cast<float>((i * 13) % 7 - 3) * 0.5f;
  for (int i = 0; i < 128; ++i) c[i] = static_cast<float>(i % 5) - 2.f;
  for (int i = 0; i < 256; ++i) a[i] = convert(af[i]);
  for (int i = 0; i < 128; ++i) b[i] = convert(bf[i]);
  emu::launch("mma_kernel", mma_kernel<T>, dim3(1), dim3(32), a.data(), b.data(), c.data(), d.data());
  bool ok = true;
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 8; ++n) {
      float want = c[m * 8 + n];
      for (int k = 0; k < 16; ++k) want += af[m * 16 + k] * bf[k * 8 + n];  // exact: small multiples of 1/8
      ok &= d[m * 8 + n] == want;
    }
  check(ok, name, "d[0]=%f d[127]=%f", d[0], d[127]);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 3 && std::strcmp(argv[1], "--child") == 0) return child_main(argv[2]);
  test_blocks_and_barriers();
  test_shuffles();
  test_votes();
  test_atomics_and_groups();
  test_threadfence_reduction();
  test_shared_memory_is_private_per_block();
  test_errors();
  test_clusters();
  test_cluster_errors();
  test_reduce();
  test_reports_in_child_processes();
  test_load_chunk<float>("load_chunk float: 16-byte loads give the row's values", [](float x) { return x; });
  test_load_chunk<__nv_bfloat16>("load_chunk bf16: 16-byte loads give the row's values",
                                 [](float x) { return __float2bfloat16(x); });
  test_load_chunk<__half>("load_chunk f16: 16-byte loads give the row's values", [](float x) { return __float2half(x); });
  test_mma_fragments_match_cute();
  test_mma<__nv_bfloat16>("emulated mma.sync m16n8k16 bf16 -> f32 equals the matrix product",
                          [](float x) { return __float2bfloat16(x); });
  test_mma<__half>("emulated mma.sync m16n8k16 f16 -> f32 equals the matrix product",
                   [](float x) { return __float2half(x); });
  return dspark_test::summary("test_emulate");
}
