// Argument checks shared by the ops' launchers (csrc/*_args.h). Metadata only: no device
// values are read, so the checks cost no host synchronisation. Messages name the op and
// the argument at fault.
#pragma once

#include <torch/library.h>
#include <torch/types.h>

namespace dspark {

inline bool is_float_type(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

// A 1-D argument of `length` values of `dtype`, contiguous, on `device` (the device of the
// op's main tensor, named `like`).
inline void check_vector(const char* op, const at::Tensor& t, const char* name, int64_t length, at::ScalarType dtype,
                         const at::Device& device, const char* like) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == length, op, ": ", name, " must have shape [", length, "], got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, " like ", like, ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

}  // namespace dspark
