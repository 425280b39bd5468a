// matmul_into (csrc/ops.cpp): out = a b, or out += a b, where out may be wider
// than the operands (fp32 for bf16 / fp16). Shared by the CPU kernel
// (cpu/matmul_into.cpp) and the composite one (matmul_into.cpp).
#pragma once
#include <ATen/core/Tensor.h>

#include "checks.h"

namespace distillkit {

void check_matmul_into_args(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b);

// With ATen's matmuls, on checked arguments: straight into out (beta = 1 when
// accumulating) for operands of out's dtype; else the product in the
// operands' dtype (rounded once), then copied or added in out's.
void matmul_into_aten(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                      bool accumulate);

}  // namespace distillkit
