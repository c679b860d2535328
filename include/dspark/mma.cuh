// The tensor-core tile product of the dspark kernels: D = A * B + C for one warp-wide
// m16n8k16 tile, A and B in bf16 or fp16, C and D in fp32 (PTX mma.sync.aligned.m16n8k16
// .row.col.f32.{bf16,f16}.{bf16,f16}.f32, sm_80 and newer; CuTe's
// SM80_16x8x16_F32BF16BF16F32_TN / SM80_16x8x16_F32F16F16F32_TN atoms issue the same
// instruction with the same registers).
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
// collective with the same fragments; that #if is the only line that differs.
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
#endif

namespace dspark {

// T is __nv_bfloat16 or __half. All 32 lanes of the warp call it together.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                             const float (&c)[4]) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>, "mma_m16n8k16: bf16 or fp16");
#if defined(DSPARK_EMULATE)
  emulate::mma_m16n8k16<T>(d, a, b, c);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  }
#elif defined(__CUDA_ARCH__)
  static_assert(sizeof(T) == 0, "mma_m16n8k16 needs sm_80 or newer");
#endif
}

}  // namespace dspark
