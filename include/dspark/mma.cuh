// The tensor-core tile product of the dspark kernels: D = A * B + C for one warp-wide
// m16n8k16 tile, A and B in bf16 or fp16, C and D in fp32, through CuTe's MMA atoms
// SM80_16x8x16_F32BF16BF16F32_TN / SM80_16x8x16_F32F16F16F32_TN (PTX mma.sync.aligned
// .m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32, sm_80 and newer; the CUDA build needs
// the nvidia-cutlass headers).
//
// Per-thread fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point
// type"), with group = lane / 4 and pair = lane % 4:
//   A (16 x 16, row major): a[r] packs elements e = 2r, 2r+1 (low half first) at
//       row = group + 8 * ((e >> 1) & 1), col = 2 * pair + (e & 1) + 8 * (e >> 2)
//   B (16 x 8, column major): b[r] packs elements e = 2r, 2r+1 at
//       row = 2 * pair + (e & 1) + 8 * (e >> 1), col = group
//   C, D (16 x 8): c[e] at row = group + 8 * (e >> 1), col = 2 * pair + (e & 1)
// The functions below give those positions, so a kernel can fill fragments from any
// layout. In the CUDA emulation (dspark/emulate/device.h) mma_m16n8k16 is a warp
// collective with the same fragments; that #if is the only place that differs.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "dspark/math.h"

namespace dspark {

struct TilePosition {
  int row;
  int col;
};

// Element e (0..7) of the A fragment of `lane`.
DSPARK_HOST_DEVICE TilePosition mma_a_position(int lane, int e) {
  return {lane / 4 + 8 * ((e >> 1) & 1), 2 * (lane % 4) + (e & 1) + 8 * (e >> 2)};
}
// Element e (0..3) of the B fragment of `lane`.
DSPARK_HOST_DEVICE TilePosition mma_b_position(int lane, int e) {
  return {2 * (lane % 4) + (e & 1) + 8 * (e >> 1), lane / 4};
}
// Element e (0..3) of the C / D fragment of `lane`.
DSPARK_HOST_DEVICE TilePosition mma_c_position(int lane, int e) {
  return {lane / 4 + 8 * (e >> 1), 2 * (lane % 4) + (e & 1)};
}

}  // namespace dspark

#if defined(DSPARK_EMULATE)
#include "dspark/emulate/mma.h"
#elif defined(__CUDACC__)
#include <cute/arch/mma_sm80.hpp>  // CuTe's SM80 16x8x16 atoms (nvidia-cutlass headers)
#endif

namespace dspark {

// T is __nv_bfloat16 or __half. All 32 lanes of the warp call it together.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                             const float (&c)[4]) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>, "mma_m16n8k16: bf16 or fp16");
#if defined(DSPARK_EMULATE)
  emulate::mma_m16n8k16<T>(d, a, b, c);
#elif defined(__CUDA_ARCH__)
  static_assert(__CUDA_ARCH__ >= 800, "mma_m16n8k16 needs sm_80 or newer");
  using Atom = std::conditional_t<std::is_same_v<T, __nv_bfloat16>, cute::SM80_16x8x16_F32BF16BF16F32_TN,
                                  cute::SM80_16x8x16_F32F16F16F32_TN>;
  Atom::fma(d[0], d[1], d[2], d[3], a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], c[2], c[3]);
#endif
}

}  // namespace dspark
