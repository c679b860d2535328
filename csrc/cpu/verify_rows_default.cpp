// verify's CPU row kernels for any x86/ARM CPU: ATen's portable Vectorized (element-wise
// libm exp2). See verify_rows.h.
#include <ATen/cpu/vec/vec.h>

#include <cstdlib>
#include <cstring>

#include "verify_rows.h"

#define DSPARK_ROWS_NS portable
#define DSPARK_ROWS_NAME "portable"
#include "verify_rows_impl.h"

namespace dspark::cpu_rows {

const RowKernels& default_row_kernels() { return portable::kKernels; }

const RowKernels& row_kernels() {
  static const RowKernels& chosen = [] () -> const RowKernels& {
    // DSPARK_CPU_KERNELS=portable (or avx2) forces that copy (tests compare them).
    const char* forced = std::getenv("DSPARK_CPU_KERNELS");
    if (forced != nullptr && std::strcmp(forced, "portable") == 0) return default_row_kernels();
#if defined(__x86_64__) && defined(__GNUC__)
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c") && avx2_sleef_linked();
    if (avx2 && avx512_sleef_linked() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        !(forced != nullptr && std::strcmp(forced, "avx2") == 0))
      return avx512_row_kernels();
    if (avx2) return avx2_row_kernels();
#endif
    return default_row_kernels();
  }();
  return chosen;
}

}  // namespace dspark::cpu_rows
