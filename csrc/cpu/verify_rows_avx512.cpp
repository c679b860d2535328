// verify's CPU row kernels for x86-64 CPUs with AVX-512 (F, BW, VL, DQ): ATen's AVX-512
// Vectorized (16 lanes; Sleef's log2/log1p), 512-bit Philox, the candidate code of the
// AVX2 copy (256-bit). Switched on for this file only, like verify_rows_avx2.cpp; row_kernels()
// calls it only where the CPU has AVX-512.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // _mm512_undefined_ps in GCC 12
// The pragma enables the instructions but not the feature macros, which sleef.h and ATen's
// vec headers test before declaring their 256-bit functions; set them for this file.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include <ATen/cpu/vec/vec.h>

#include "verify_rows.h"

#define DSPARK_ROWS_NS avx512
#define DSPARK_ROWS_NAME "avx512"
#include "verify_rows_impl.h"
#pragma GCC diagnostic pop
#pragma GCC pop_options

// Sleef's routines come from libtorch_cpu, which exports them in the torch releases we
// know; weak references keep this library loadable where one does not, and then
// row_kernels() does not pick this copy.
#pragma weak Sleef_exp2f16_u10
#pragma weak Sleef_log2f16_u10
#pragma weak Sleef_log1pf16_u10

namespace dspark::cpu_rows {
const RowKernels& avx512_row_kernels() { return avx512::kKernels; }
bool avx512_sleef_linked() {
  return &Sleef_exp2f16_u10 != nullptr && &Sleef_log2f16_u10 != nullptr && &Sleef_log1pf16_u10 != nullptr;
}
}  // namespace dspark::cpu_rows

#else
#include "verify_rows.h"

namespace dspark::cpu_rows {
const RowKernels& avx512_row_kernels() { return avx2_row_kernels(); }
bool avx512_sleef_linked() { return false; }
}  // namespace dspark::cpu_rows
#endif
