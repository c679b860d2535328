// mma.sync.m16n8k16 (fp32 accumulate) in the CUDA emulation: a warp collective in which
// every lane contributes its A, B and C fragments and receives its D fragment, with the
// fragment positions of dspark/mma.cuh (PTX ISA). Products of bf16/fp16 values are exact
// in float; the sum of the 16 products and C is formed in double and rounded once. A
// tensor core's internal accumulation order and rounding are unspecified, so the last
// bit of D may differ from a GPU's.
#pragma once

#include <cstdint>
#include <cstring>

#include "dspark/emulate/device.h"

namespace dspark::emulate {

template <typename T>
float mma_element_to_float(uint16_t bits) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    __nv_bfloat16_raw raw;
    raw.x = bits;
    return __bfloat162float(__nv_bfloat16(raw));
  } else {
    __half_raw raw;
    raw.x = bits;
    return __half2float(__half(raw));
  }
}

template <typename T>
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  struct Fragments {
    uint32_t a[4];
    uint32_t b[2];
    float c[4];
  };
  Fragments mine;
  std::memcpy(mine.a, a, sizeof(mine.a));
  std::memcpy(mine.b, b, sizeof(mine.b));
  std::memcpy(mine.c, c, sizeof(mine.c));
  Fragments all[32];
  warp_exchange("mma.sync.m16n8k16", 0xFFFFFFFFu, &mine, sizeof(Fragments), all, /*orders_memory=*/false,
                DSPARK_EMULATE_HERE);
  float A[16][16], B[16][8], C[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    for (int e = 0; e < 8; ++e) {
      const TilePosition p = mma_a_position(lane, e);
      A[p.row][p.col] = mma_element_to_float<T>(static_cast<uint16_t>(all[lane].a[e / 2] >> (16 * (e % 2))));
    }
    for (int e = 0; e < 4; ++e) {
      const TilePosition p = mma_b_position(lane, e);
      B[p.row][p.col] = mma_element_to_float<T>(static_cast<uint16_t>(all[lane].b[e / 2] >> (16 * (e % 2))));
      const TilePosition q = mma_c_position(lane, e);
      C[q.row][q.col] = all[lane].c[e];
    }
  }
  const int lane = static_cast<int>(this_thread().lane);
  for (int e = 0; e < 4; ++e) {
    const TilePosition p = mma_c_position(lane, e);
    double sum = C[p.row][p.col];
    for (int k = 0; k < 16; ++k) sum += static_cast<double>(A[p.row][k]) * static_cast<double>(B[k][p.col]);
    d[e] = static_cast<float>(sum);
  }
}

}  // namespace dspark::emulate
