// The pass/fail bookkeeping shared by the C++ test programs in tests_cpp/: one line per
// check, a summary, and the exit status.
#pragma once

#include <cstdarg>
#include <cstdio>

namespace dspark_test {

inline int passed = 0;
inline int failed = 0;

// Records one check. `detail_fmt` (printf format) is printed on failure only.
inline void check(bool ok, const char* name, const char* detail_fmt = "", ...) {
  if (ok) {
    ++passed;
    std::printf("PASS  %s\n", name);
    return;
  }
  ++failed;
  char detail[1024];
  va_list args;
  va_start(args, detail_fmt);
  std::vsnprintf(detail, sizeof(detail), detail_fmt, args);
  va_end(args);
  std::printf("FAIL  %s: %s\n", name, detail);
}

// Prints the summary line; the program's exit status (1 if any check failed).
inline int summary(const char* program) {
  std::printf("\n%s: %d passed, %d failed\n", program, passed, failed);
  return failed == 0 ? 0 : 1;
}

}  // namespace dspark_test
