// verify's CPU row kernels for x86-64 CPUs with AVX2 and FMA: ATen's AVX2 Vectorized
// (Sleef's log2f8/log1pf8_u10, exported by libtorch_cpu). The instruction set is switched on for
// this file only (#pragma GCC target), so the library still loads on any x86-64 CPU;
// row_kernels() calls this copy only where the CPU has AVX2, FMA and F16C.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
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
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include <ATen/cpu/vec/vec.h>

#include "verify_rows.h"

#define DSPARK_ROWS_NS avx2
#define DSPARK_ROWS_NAME "avx2"
#include "verify_rows_impl.h"
#pragma GCC diagnostic pop
#pragma GCC pop_options

// Sleef's routines come from libtorch_cpu, which exports them in the torch releases we
// know; weak references keep this library loadable where one does not, and then
// row_kernels() does not pick this copy.
#pragma weak Sleef_exp2f8_u10
#pragma weak Sleef_log2f8_u10
#pragma weak Sleef_log1pf8_u10

namespace dspark::cpu_rows {
const RowKernels& avx2_row_kernels() { return avx2::kKernels; }
bool avx2_sleef_linked() {
  return &Sleef_exp2f8_u10 != nullptr && &Sleef_log2f8_u10 != nullptr && &Sleef_log1pf8_u10 != nullptr;
}
}  // namespace dspark::cpu_rows

#else
#include "verify_rows.h"

namespace dspark::cpu_rows {
const RowKernels& avx2_row_kernels() { return default_row_kernels(); }
bool avx2_sleef_linked() { return false; }
}  // namespace dspark::cpu_rows
#endif
