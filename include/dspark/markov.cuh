// CUDA kernels of markov_draft: the low-rank Markov correction z_k = U_k + W2 · W1[x_{k-1}]
// and the sampling of x_k from z_k, for K sequential steps, with no host synchronisation.
//
// Full vocabulary: two launches per step.
//  1. markov_tile_kernel: the vocabulary is cut into tiles of kMarkovTileV draft ids, and
//     each block takes tiles blockIdx.x, + gridDim.x, ... For each tile it computes the
//     [B, r] x [r, 128] product (W1 rows of every request's previous token against the
//     tile's W2 rows) on tensor cores (markov_tile_product: CuTe's
//     SM80_16x8x16_F32BF16BF16F32_TN atom, mma.sync m16n8k16), 16 requests at a time, adds
//     U, rounds to U's dtype, stores z and runs the exponential race (or the argmax) over
//     the tile. Each request's leader over the block's tiles stays in shared memory; one
//     MarkovBest per (request, block) goes to memory at the end. W2 is read once per step,
//     U once, z written once; the leaders are 16 bytes per request and block.
//  2. markov_pick_kernel, one warp per request: the race winner over the blocks' leaders,
//     mapped through d2t; it is the step's token and names the W1 row of the next step.
// Why two launches and not one persistent kernel: the next step needs every tile's
// result, i.e. a grid-wide barrier. A cooperative launch would tie the grid size to the
// number of resident blocks and could not run in the CUDA emulation (which runs blocks one
// after another); the last-block-done pattern would put the reduction of B x tiles
// leaders on a single SM. The pick kernel is a few microseconds, and no host sync happens.
//
// The race needs the row max m (keys are (y - m) / T - log E). A tile knows only its own
// max, so each tile (and each block across its tiles) compares keys relative to the max it
// has seen, and the pick kernel scores every block's leader with the exact key of the
// spec. The token is then the spec's except when two keys of one tile are within a rounding
// error of each other (a few ulp; the tests see 100 % agreement on their inputs).
//
// Candidate mode (num_candidates = c < Vd): markov_select_kernel picks the top-c entries
// of every U_k once (a radix select, then an ordered compaction; ties to the smaller id),
// keeps their U values and fills z with -inf; markov_candidates_kernel then runs all K
// steps of one request in one block (c dot products of length r per step, no W2 stream).
//
// The semantics are those of dspark_ext/reference.py (markov_draft).
#pragma once

#include <cstdint>

#include "dspark/math.h"
#include "dspark/mma.cuh"
#include "dspark/reduce.cuh"
#include "dspark/verify.cuh"  // radix_threshold

namespace dspark {

constexpr int kMarkovThreads = 256;  // 8 warps
constexpr int kMarkovTileV = 128;    // draft ids per tile: 16 per warp
constexpr int kMarkovChunk = 16;     // requests per tensor-core row block (m16)
constexpr int kMarkovMaxMmaRank = 256;
constexpr int kMarkovSimtRankChunk = 64;
constexpr int kMarkovSelectThreads = 512;
// Up to this batch size a block keeps every request's leader in shared memory across its
// tiles (16 KB); above it the launcher gives each tile its own block.
constexpr int kMarkovMaxResident = 1024;

// A race leader: of one request over the tiles of one block.
struct MarkovBest {
  float max;        // max of the finite y the leader was chosen among (-inf: none)
  float y;          // the leader's logit (sanitized z)
  float neg_log_e;  // its -log E (0 for greedy requests)
  int32_t index;    // its draft id, -1: none
};

template <typename T, typename W>
struct MarkovParams {
  const T* u;                 // [B, K, Vd]
  T* z;                       // [B, K, Vd] (may be u: in place)
  const W* w1;                // [Vt, r]
  const W* w2;                // [Vd, r]
  const int64_t* anchor;      // [B]
  const float* temperature;   // [B]
  const int64_t* seed;        // [B]
  const int64_t* offset;      // [B]
  const int64_t* d2t;         // [Vd] or nullptr
  int64_t* tokens;            // [B, K]
  int64_t* prev;              // [B] workspace: the W1 row of the step (-1: dead request)
  MarkovBest* leaders;        // [B, slots] workspace (full mode)
  int32_t* cand_index;        // [B, K, c] workspace (candidate mode)
  float* cand_value;          // [B, K, c] workspace: U, then y (candidate mode)
  int64_t batch;
  int64_t steps;
  int64_t draft_vocab;
  int64_t target_vocab;
  int64_t rank;
  int64_t candidates;         // c (candidate mode)
  int64_t tiles;              // ceil(Vd / kMarkovTileV)
  int64_t slots;              // leaders per request: the tile kernel's grid size
  int64_t step;               // k (full mode kernels)
};

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// The W1 row of request b's first step: its anchor, or -1 (dead) when out of range.
template <typename T, typename W>
__device__ __forceinline__ int64_t anchor_row(const MarkovParams<T, W>& p, int64_t b) {
  const int64_t a = p.anchor[b];
  return a >= 0 && a < p.target_vocab ? a : -1;
}

// The W1 row of request b at the current step of the full-mode kernels: the anchor's at
// step 0, else the previous token as the pick kernel left it; -1 for a dead request.
template <typename T, typename W>
__device__ __forceinline__ int64_t markov_row(const MarkovParams<T, W>& p, int64_t b) {
  return p.step > 0 ? p.prev[b] : anchor_row(p, b);
}

// ---------------------------------------------------------------- the tile product
// acc[i][j] = W1[row_i] . W2[v0 + j] for the 16 requests of a chunk (row_i < 0: 0) and the
// 128 ids of a tile. Tensor-core version: W in bf16/fp16, r a multiple of 32 up to 256.
//
// The r axis is permuted inside each pair of k-steps (the sum does not depend on the
// order of its terms), so that a thread's fragments are 16 contiguous bytes of a row:
// thread (group g, pair p) of k-steps 2s, 2s+1 holds r = 32s + 8p .. 32s + 8p + 7, the
// first four in k-step 2s (slots 2p, 2p+1, 8+2p, 9+2p), the last four in k-step 2s+1.
// A (16 x 16, requests x r) comes from the chunk's W1 rows staged in shared memory, B
// (16 x 8, r x ids) from W2 rows held in registers for the whole tile.
// Shared row padding (W elements): a row of 256 + 32 bf16 is 144 words, so rows g and g + 1
// fall on opposite halves of the 32 banks and a quarter-warp's 16-byte reads never conflict.
constexpr int kMarkovAPad = 32;

template <typename W>
struct MarkovTileFragments {
  uint4 b[2][kMarkovMaxMmaRank / 32];  // [n-tile][k-step pair]
};

template <typename W>
__device__ __forceinline__ void load_w2_fragments(const W* w2, int64_t draft_vocab, int64_t rank, int64_t v0,
                                                  MarkovTileFragments<W>& f) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int group = lane / 4, pair = lane % 4;
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
    const int64_t v = v0 + warp * 16 + nt * 8 + group;
#pragma unroll
    for (int s = 0; s < kMarkovMaxMmaRank / 32; ++s) {
      if (s < rank / 32 && v < draft_vocab)
        f.b[nt][s] = __ldg(reinterpret_cast<const uint4*>(w2 + v * rank + 32 * s + 8 * pair));
      else
        f.b[nt][s] = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

template <typename W>
__device__ __forceinline__ void markov_tile_product(const W* a_rows, int a_stride, int64_t rank,
                                                    const MarkovTileFragments<W>& f,
                                                    float (*acc)[kMarkovTileV + 4]) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int group = lane / 4, pair = lane % 4;
  float d[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
  for (int s = 0; s < kMarkovMaxMmaRank / 32; ++s) {
    if (s < rank / 32) {
      const uint4 top = *reinterpret_cast<const uint4*>(a_rows + group * a_stride + 32 * s + 8 * pair);
      const uint4 bottom = *reinterpret_cast<const uint4*>(a_rows + (group + 8) * a_stride + 32 * s + 8 * pair);
      const uint32_t a_even[4] = {top.x, bottom.x, top.y, bottom.y};
      const uint32_t a_odd[4] = {top.z, bottom.z, top.w, bottom.w};
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const uint32_t b_even[2] = {f.b[nt][s].x, f.b[nt][s].y};
        const uint32_t b_odd[2] = {f.b[nt][s].z, f.b[nt][s].w};
        mma_m16n8k16<W>(d[nt], a_even, b_even, d[nt]);
        mma_m16n8k16<W>(d[nt], a_odd, b_odd, d[nt]);
      }
    }
  }
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const TilePosition at = mma_c_position(lane, e);
      acc[at.row][warp * 16 + nt * 8 + at.col] = d[nt][e];
    }
}

// The slower path for any W dtype and rank: plain float FMAs, r in chunks staged in shared
// memory, each thread 8 consecutive ids of one request (in r order: deterministic).
template <typename T, typename W>
__device__ __forceinline__ void markov_tile_product_simt(const MarkovParams<T, W>& p, const int64_t (&rows)[kMarkovChunk],
                                                         int64_t v0, float (*acc)[kMarkovTileV + 4]) {
  __shared__ float a_chunk[kMarkovChunk][kMarkovSimtRankChunk];
  const int i = threadIdx.x / 16, seg = threadIdx.x % 16;
  float sum[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int64_t r0 = 0; r0 < p.rank; r0 += kMarkovSimtRankChunk) {
    __syncthreads();  // the previous chunk is used up
    for (int e = threadIdx.x; e < kMarkovChunk * kMarkovSimtRankChunk; e += blockDim.x) {
      const int row = e / kMarkovSimtRankChunk, col = e % kMarkovSimtRankChunk;
      a_chunk[row][col] = rows[row] >= 0 && r0 + col < p.rank ? to_float(p.w1[rows[row] * p.rank + r0 + col]) : 0.f;
    }
    __syncthreads();
    const int64_t width = p.rank - r0 < kMarkovSimtRankChunk ? p.rank - r0 : kMarkovSimtRankChunk;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int64_t v = v0 + seg * 8 + j;
      if (v >= p.draft_vocab) continue;
      const W* w2_row = p.w2 + v * p.rank + r0;
      for (int64_t c = 0; c < width; ++c) sum[j] = fmaf(a_chunk[i][c], to_float(w2_row[c]), sum[j]);
    }
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) acc[i][seg * 8 + j] = sum[j];
}

// ---------------------------------------------------------------- the race over a tile
// -log E of a word: the random part of a race key (race_key_log with a zero logit).
__device__ __forceinline__ float race_bonus(uint32_t word) { return race_key_log(0.f, word); }

// Leader order: larger key, then smaller index; index -1 loses.
__device__ __forceinline__ bool leads(float key, int32_t index, float other_key, int32_t other_index) {
  if (index < 0) return false;
  if (other_index < 0) return true;
  return key > other_key || (key == other_key && index < other_index);
}

// The race key of a leader relative to the max m (greedy: the logit itself).
// The spec's key, with the division: the pick kernel's final choice among leaders.
__device__ __forceinline__ float leader_key(const MarkovBest& x, float row_max, bool greedy, float temperature) {
  return greedy ? x.y : (x.y - row_max) / temperature + x.neg_log_e;
}

// Inside the tile kernel, leaders are chosen with keys scaled by 1/T, a multiplication
// instead of a division per element and per comparison: this only changes which of two
// keys within an ulp of each other leads (the tile-local max already may), and every
// block's leader is scored with the exact key above.
__device__ __forceinline__ float leader_key_scaled(const MarkovBest& x, float row_max, bool greedy, float inv_t) {
  return greedy ? x.y : (x.y - row_max) * inv_t + x.neg_log_e;
}

// The leader of two leaders, keys compared relative to the larger of their maxima.
__device__ __forceinline__ MarkovBest combine_leaders(MarkovBest x, const MarkovBest& o, bool greedy, float inv_t) {
  const float m = fmaxf(x.max, o.max);
  if (leads(leader_key_scaled(o, m, greedy, inv_t), o.index, leader_key_scaled(x, m, greedy, inv_t), x.index)) {
    x.y = o.y;
    x.neg_log_e = o.neg_log_e;
    x.index = o.index;
  }
  x.max = m;
  return x;
}

// 16 lanes (one request's row of the tile) elect their leader; every lane gets it.
__device__ __forceinline__ MarkovBest elect16(MarkovBest x, bool greedy, float inv_t) {
#pragma unroll
  for (int mask = 8; mask > 0; mask >>= 1) {
    MarkovBest o;
    o.max = __shfl_xor_sync(0xFFFFFFFFu, x.max, mask);
    o.y = __shfl_xor_sync(0xFFFFFFFFu, x.y, mask);
    o.neg_log_e = __shfl_xor_sync(0xFFFFFFFFu, x.neg_log_e, mask);
    o.index = __shfl_xor_sync(0xFFFFFFFFu, x.index, mask);
    x = combine_leaders(x, o, greedy, inv_t);
  }
  return x;
}

// 8 ids from v (a multiple of 8) as float: 16-byte chunks of reduce.cuh's load_chunk.
template <typename T>
__device__ __forceinline__ void load8(const T* row, int64_t v, int64_t vocab, bool vector_ok, float (&out)[8]) {
  constexpr int kVec = RowChunks<T>::kVec;
#pragma unroll
  for (int q = 0; q < 8 / kVec; ++q) {
    float part[kVec];
    load_chunk(row, v / kVec + q, vocab, vector_ok && v + 8 <= vocab, part);
#pragma unroll
    for (int e = 0; e < kVec; ++e) out[q * kVec + e] = part[e];
  }
}

template <typename T>
__device__ __forceinline__ void store8(T* row, int64_t v, int64_t vocab, bool vector_ok, const T (&values)[8]) {
  if (vector_ok && v + 8 <= vocab) {
#pragma unroll
    for (int q = 0; q < static_cast<int>(sizeof(values) / 16); ++q) {
      uint4 raw;
      memcpy(&raw, reinterpret_cast<const char*>(values) + 16 * q, 16);
      reinterpret_cast<uint4*>(row + v)[q] = raw;
    }
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j)
      if (v + j < vocab) row[v + j] = values[j];
  }
}

// z for 8 ids of one request, stored, and the tile's leader of that request, merged into
// the block's leader of the request (`resident`, or written out when there is none).
template <typename T, typename W>
__device__ __forceinline__ void markov_tile_epilogue(const MarkovParams<T, W>& p, int64_t tile, int64_t chunk0,
                                                     const int64_t (&rows)[kMarkovChunk],
                                                     const float (*acc)[kMarkovTileV + 4], MarkovBest* resident) {
  const int i = threadIdx.x / 16, seg = threadIdx.x % 16;
  const int64_t b = chunk0 + i;
  const int64_t v = tile * kMarkovTileV + seg * 8;
  const bool active = b < p.batch;
  const float temperature = active ? p.temperature[b] : 0.f;
  const bool greedy = !(temperature > 0.f);
  const float inv_t = greedy ? 1.f : 1.f / sanitize_temperature(temperature);
  MarkovBest mine{-INFINITY, 0.f, 0.f, -1};
  float y[8];
  if (active) {
    const int64_t offset = (b * p.steps + p.step) * p.draft_vocab;
    const T* u_row = p.u + offset;
    T* z_row = p.z + offset;
    const bool vector_ok = is_aligned16(u_row) && is_aligned16(z_row);
    float u[8];
    load8(u_row, v, p.draft_vocab, vector_ok, u);
    const bool live = rows[i] >= 0;
    T z[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      z[j] = from_float<T>(u[j] + (live ? acc[i][seg * 8 + j] : 0.f));
      y[j] = v + j < p.draft_vocab ? sanitize_logit(to_float(z[j])) : -INFINITY;
      mine.max = fmaxf(mine.max, y[j]);
    }
    store8(z_row, v, p.draft_vocab, vector_ok, z);
  }
  // The tile max of this request (16 lanes), then keys relative to it.
  float tile_max = mine.max;
#pragma unroll
  for (int mask = 8; mask > 0; mask >>= 1) tile_max = fmaxf(tile_max, __shfl_xor_sync(0xFFFFFFFFu, tile_max, mask));
  if (active && tile_max > -INFINITY) {
    const uint64_t seed = static_cast<uint64_t>(p.seed[b]), offset = static_cast<uint64_t>(p.offset[b]);
    float best_key = -INFINITY;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      Philox4 words{};
      if (!greedy)
        words = random_group(seed, kStreamDraft, static_cast<uint32_t>(p.step), offset,
                             static_cast<uint32_t>((v >> 2) + half));
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int j = 4 * half + q;
        if (y[j] == -INFINITY) continue;
        const float bonus = greedy ? 0.f : race_bonus(words.x[q]);
        const float key = greedy ? y[j] : (y[j] - tile_max) * inv_t + bonus;
        if (leads(key, static_cast<int32_t>(v + j), best_key, mine.index)) {
          best_key = key;
          mine.y = y[j];
          mine.neg_log_e = bonus;
          mine.index = static_cast<int32_t>(v + j);
        }
      }
    }
  }
  mine.max = tile_max;
  mine = elect16(mine, greedy, inv_t);
  if (active && seg == 0) {
    // Request b's entry is only ever touched by this thread (row i of every chunk).
    if (resident != nullptr) resident[b] = combine_leaders(resident[b], mine, greedy, inv_t);
    else p.leaders[b * p.slots + blockIdx.x] = mine;
  }
}

// ---------------------------------------------------------------- kernel 1: tiles
// kMma: the tensor-core product (W bf16/fp16, r % 32 == 0, r <= 256), else the SIMT one.
template <typename T, typename W, bool kMma>
__global__ void __launch_bounds__(kMarkovThreads, 2) markov_tile_kernel(MarkovParams<T, W> p) {
  __shared__ float acc[kMarkovChunk][kMarkovTileV + 4];
  __shared__ int64_t rows[kMarkovChunk];
  constexpr int kAStride = kMma ? kMarkovMaxMmaRank + kMarkovAPad : 1;
  // The chunk's W1 rows, stored and read as 16-byte words only (W is just the unit of the
  // offsets); raw words also keep __shared__ free of constructors.
  __shared__ uint4 a_words[kMma ? kMarkovChunk * kAStride * sizeof(W) / 16 : 1];
  W* const a_rows = reinterpret_cast<W*>(a_words);
  __shared__ MarkovBest resident_leaders[kMarkovMaxResident];
  // Blocks with several tiles keep their leaders here (the launcher gives every tile its
  // own block when B > kMarkovMaxResident, and then they are written out per tile).
  MarkovBest* const resident = p.batch <= kMarkovMaxResident ? resident_leaders : nullptr;
  if (resident != nullptr)
    for (int64_t b = threadIdx.x; b < p.batch; b += blockDim.x) resident[b] = MarkovBest{-INFINITY, 0.f, 0.f, -1};
  for (int64_t tile = blockIdx.x; tile < p.tiles; tile += gridDim.x) {
    const int64_t v0 = tile * kMarkovTileV;
    MarkovTileFragments<W> fragments;
    if constexpr (kMma) load_w2_fragments(p.w2, p.draft_vocab, p.rank, v0, fragments);
    for (int64_t chunk0 = 0; chunk0 < p.batch; chunk0 += kMarkovChunk) {
      __syncthreads();  // rows, a_rows and acc of the previous chunk are used up
      if (threadIdx.x < kMarkovChunk) {
        const int64_t b = chunk0 + threadIdx.x;
        rows[threadIdx.x] = b < p.batch ? markov_row(p, b) : -1;
      }
      __syncthreads();
      if constexpr (kMma) {
        // Stage the chunk's W1 rows (zeros for dead or absent requests), 16 bytes a thread.
        constexpr int kVec = 16 / sizeof(W);
        const int per_row = static_cast<int>(p.rank) / kVec;
        for (int e = threadIdx.x; e < kMarkovChunk * per_row; e += blockDim.x) {
          const int row = e / per_row, col = (e % per_row) * kVec;
          uint4 value = make_uint4(0u, 0u, 0u, 0u);
          if (rows[row] >= 0) value = __ldg(reinterpret_cast<const uint4*>(p.w1 + rows[row] * p.rank + col));
          *reinterpret_cast<uint4*>(a_rows + row * kAStride + col) = value;
        }
        __syncthreads();
        markov_tile_product(a_rows, kAStride, p.rank, fragments, acc);
      } else {
        markov_tile_product_simt(p, rows, v0, acc);
      }
      __syncthreads();
      markov_tile_epilogue(p, tile, chunk0, rows, acc, resident);
    }
  }
  if (resident != nullptr) {
    __syncthreads();
    for (int64_t b = threadIdx.x; b < p.batch; b += blockDim.x) p.leaders[b * p.slots + blockIdx.x] = resident[b];
  }
}

// ---------------------------------------------------------------- kernel 2: the pick
// One warp per request: the winner over the blocks' leaders with the exact key, the token
// through d2t, the W1 row of the next step.
template <typename T, typename W>
__global__ void __launch_bounds__(kMarkovThreads) markov_pick_kernel(MarkovParams<T, W> p) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * (kMarkovThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (b >= p.batch) return;  // whole warps leave together
  const float temperature = p.temperature[b];
  const bool greedy = !(temperature > 0.f);
  const float t = sanitize_temperature(temperature);
  const MarkovBest* leaders = p.leaders + b * p.slots;
  float row_max = -INFINITY;
  for (int64_t i = lane; i < p.slots; i += 32) row_max = fmaxf(row_max, leaders[i].max);
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) row_max = fmaxf(row_max, __shfl_xor_sync(0xFFFFFFFFu, row_max, mask));
  ArgMax best{-INFINITY, -1};
  for (int64_t i = lane; i < p.slots; i += 32) {
    const MarkovBest x = leaders[i];
    if (x.index >= 0) best = merge(best, ArgMax{leader_key(x, row_max, greedy, t), x.index});
  }
  best = warp_allreduce(best);
  if (lane != 0) return;
  const bool live = markov_row(p, b) >= 0;
  int64_t token = best.index;
  if (token >= 0 && p.d2t != nullptr) token = p.d2t[token];
  if (!live || token < 0 || token >= p.target_vocab) token = -1;
  p.tokens[b * p.steps + p.step] = token;
  p.prev[b] = token;
}

// ---------------------------------------------------------------- candidate mode
// Exclusive prefix sums of three counters over the block, in thread order; totals too.
struct Count3 {
  int32_t above, tie, low;
};

template <int kThreads>
__device__ __forceinline__ Count3 block_exclusive_scan(Count3 value, Count3& total) {
  __shared__ Count3 warp_sums[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  Count3 incl = value;
#pragma unroll
  for (int delta = 1; delta < 32; delta <<= 1) {
    const int32_t a = __shfl_up_sync(0xFFFFFFFFu, incl.above, delta);
    const int32_t t = __shfl_up_sync(0xFFFFFFFFu, incl.tie, delta);
    const int32_t l = __shfl_up_sync(0xFFFFFFFFu, incl.low, delta);
    if (lane >= delta) {
      incl.above += a;
      incl.tie += t;
      incl.low += l;
    }
  }
  __syncthreads();  // warp_sums may still be read by a previous call
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  Count3 before{0, 0, 0};
  total = Count3{0, 0, 0};
  for (int w = 0; w < kThreads / 32; ++w) {
    const Count3 s = warp_sums[w];
    if (w < warp) {
      before.above += s.above;
      before.tie += s.tie;
      before.low += s.low;
    }
    total.above += s.above;
    total.tie += s.tie;
    total.low += s.low;
  }
  return Count3{before.above + incl.above - value.above, before.tie + incl.tie - value.tie,
                before.low + incl.low - value.low};
}

// One block per (request, position): the top-c ids of sanitize(U_k), ties to the smaller
// id. A radix select gives the c-th largest value t and the count of values above it; one
// ordered pass then keeps everything above t, the first ties at t and, when fewer than c
// values are finite, the first -inf entries. Their U values are kept, then z_k = -inf.
template <typename T, typename W>
__global__ void __launch_bounds__(kMarkovSelectThreads) markov_select_kernel(MarkovParams<T, W> p) {
  __shared__ RadixState st;
  const int64_t row = blockIdx.x;  // b * K + k
  const T* u_row = p.u + row * p.draft_vocab;
  const int64_t c = p.candidates;
  const float threshold = radix_threshold(u_row, p.draft_vocab, 1.f, 0.f, -INFINITY, false, c, 0.f, st);
  // radix_threshold leaves the count strictly above t and, at its last digit, the ties.
  const int64_t above = threshold == -INFINITY ? 0 : st.above_count;
  const int64_t ties = threshold == -INFINITY ? p.draft_vocab : st.count[st.chosen];
  const int64_t take_ties = ties < c - above ? ties : c - above;
  const int64_t take_low = c - above - take_ties;  // -inf entries (only when t is the lowest finite value)
  int32_t* out_index = p.cand_index + row * c;
  float* out_value = p.cand_value + row * c;
  Count3 base{0, 0, 0};
  const int64_t per_round = static_cast<int64_t>(blockDim.x) * 4;
  for (int64_t start = 0; start < p.draft_vocab; start += per_round) {
    const int64_t v0 = start + threadIdx.x * 4;
    float x[4], y[4];
    Count3 mine{0, 0, 0};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      x[j] = v0 + j < p.draft_vocab ? to_float(u_row[v0 + j]) : -INFINITY;
      y[j] = v0 + j < p.draft_vocab ? sanitize_logit(x[j]) : NAN;  // NaN: outside the row, in no class
      mine.above += y[j] > threshold;
      mine.tie += threshold != -INFINITY && y[j] == threshold;
      mine.low += y[j] == -INFINITY;
    }
    Count3 total;
    Count3 rank = block_exclusive_scan<kMarkovSelectThreads>(mine, total);
    rank.above += base.above;
    rank.tie += base.tie;
    rank.low += base.low;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      int64_t slot = -1;
      if (y[j] > threshold) {
        slot = rank.above++;
      } else if (threshold != -INFINITY && y[j] == threshold) {
        if (rank.tie < take_ties) slot = above + rank.tie;
        ++rank.tie;
      } else if (y[j] == -INFINITY) {
        // With t = -inf every entry is a tie at -inf: take the first c.
        const int64_t limit = threshold == -INFINITY ? c : take_low;
        if (rank.low < limit) slot = (threshold == -INFINITY ? 0 : above + take_ties) + rank.low;
        ++rank.low;
      }
      if (slot >= 0) {
        out_index[slot] = static_cast<int32_t>(v0 + j);
        out_value[slot] = x[j];
      }
    }
    base.above += total.above;
    base.tie += total.tie;
    base.low += total.low;
  }
  __syncthreads();  // every U value of the row is read before z (which may be U) is filled
  T* z_row = p.z + row * p.draft_vocab;
  const T neg_inf = from_float<T>(-INFINITY);
  for (int64_t v = threadIdx.x; v < p.draft_vocab; v += blockDim.x) z_row[v] = neg_inf;
}

// One block per request, all K steps: z on the c candidates (a warp per dot product of
// length r, lanes over r then a fixed xor tree), then the race over them with the exact
// row max, the token through d2t.
template <typename T, typename W>
__global__ void __launch_bounds__(kMarkovThreads) markov_candidates_kernel(MarkovParams<T, W> p) {
  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  constexpr int kWarps = kMarkovThreads / 32;
  const int64_t c = p.candidates;
  const float temperature = p.temperature[b];
  const bool greedy = !(temperature > 0.f);
  const float t = sanitize_temperature(temperature);
  int64_t row = anchor_row(p, b);
  for (int64_t k = 0; k < p.steps; ++k) {
    const int64_t base = (b * p.steps + k) * c;
    const int32_t* index = p.cand_index + base;
    float* value = p.cand_value + base;  // U on entry, y after the first pass
    T* z_row = p.z + (b * p.steps + k) * p.draft_vocab;
    ArgMax top{-INFINITY, -1};  // the max y (ties to the smaller position; only .key is used)
    for (int64_t i = warp; i < c; i += kWarps) {
      const int64_t v = index[i];
      float dot = 0.f;
      if (row >= 0) {
        const W* w1_row = p.w1 + row * p.rank;
        const W* w2_row = p.w2 + v * p.rank;
        for (int64_t r = lane; r < p.rank; r += 32) dot = fmaf(to_float(w1_row[r]), to_float(w2_row[r]), dot);
#pragma unroll
        for (int mask = 16; mask > 0; mask >>= 1) dot += __shfl_xor_sync(0xFFFFFFFFu, dot, mask);
      }
      const float u = value[i];
      __syncwarp();  // every lane has read value[i] before lane 0 overwrites it
      const T z = from_float<T>(u + (row >= 0 ? dot : 0.f));
      const float y = sanitize_logit(to_float(z));
      if (lane == 0) {
        z_row[v] = z;
        value[i] = y;
      }
      top = merge(top, ArgMax{y, y == -INFINITY ? -1 : i});
    }
    const float row_max = block_allreduce<kMarkovThreads>(top).key;  // also orders the value[] writes
    ArgMax best{-INFINITY, -1};
    if (row_max > -INFINITY) {
      RandomRow random(static_cast<uint64_t>(p.seed[b]), kStreamDraft, static_cast<uint32_t>(k),
                       static_cast<uint64_t>(p.offset[b]));
      for (int64_t i = threadIdx.x; i < c; i += kMarkovThreads) {
        const float y = value[i];
        if (y == -INFINITY) continue;
        const int64_t v = index[i];
        const float key = greedy ? y : race_key_log((y - row_max) / t, random.word(v));
        best = merge(best, ArgMax{key, v});
      }
    }
    best = block_allreduce<kMarkovThreads>(best);
    int64_t token = best.index;
    if (token >= 0 && p.d2t != nullptr) token = p.d2t[token];
    if (row < 0 || token < 0 || token >= p.target_vocab) token = -1;
    if (threadIdx.x == 0) p.tokens[b * p.steps + k] = token;
    row = token;
  }
}

}  // namespace dspark
