// Unit test of the CUDA emulation (include/dspark/emulate/, csrc/emulate/runtime.cpp),
// without torch: small kernels written in CUDA syntax whose results are known, the
// error reports of the misuses a GPU would hang or misbehave on, and the mma.sync
// fragments against CuTe's layouts. Built and run by `make emulate` / `make emulate-tsan`
// under the sanitizers (CMake option DSPARK_EMULATE).
#include "dspark/emulate/device.h"
// (device.h first: the headers below are kernel headers)
#include <cooperative_groups.h>

#include "dspark/mma.cuh"
#include "dspark/reduce.cuh"

#include "check.h"

#include <cstdio>
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

int main() {
  test_blocks_and_barriers();
  test_shuffles();
  test_votes();
  test_atomics_and_groups();
  test_shared_memory_is_private_per_block();
  test_errors();
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
