// matmul_into on every backend without a kernel of its own (CUDA, Meta):
// ATen's matmuls (matmul_into.h).
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include "matmul_into.h"

namespace distillkit {
namespace {

void matmul_into_composite(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                           bool accumulate) {
  check_matmul_into_args(out, a, b);
  matmul_into_aten(out, a, b, accumulate);
}

}  // namespace

void matmul_into_aten(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                      bool accumulate) {
  at::Tensor o = out;  // the out= overloads take a non-const reference
  if (a.scalar_type() == out.scalar_type()) {
    if (accumulate) {
      at::addmm_out(o, out, a, b);
    } else {
      at::mm_out(o, a, b);
    }
  } else if (accumulate) {
    o.add_(at::mm(a, b));
  } else {
    o.copy_(at::mm(a, b));
  }
}

void check_matmul_into_args(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  DK_CHECK_DIM(a, "a", 2);
  DK_CHECK_DIM(b, "b", 2);
  DK_CHECK_DIM(out, "out", 2);
  DK_CHECK(a.scalar_type() == b.scalar_type(), "a and b must have the same dtype (got ",
           a.scalar_type(), " and ", b.scalar_type(), ")");
  DK_CHECK_FLOATING(a, "a");
  DK_CHECK(out.scalar_type() == a.scalar_type() ||
               (out.scalar_type() == at::kFloat &&
                (a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kHalf)),
           "out must have the operands' dtype, or be fp32 for bf16 / fp16 operands (got ",
           out.scalar_type(), " for ", a.scalar_type(), ")");
  DK_CHECK(a.size(1) == b.size(0), "a (M, K) and b (K, N) must agree in K (got shapes ",
           a.sizes(), " and ", b.sizes(), ")");
  DK_CHECK(out.size(0) == a.size(0) && out.size(1) == b.size(1), "out must have shape (",
           a.size(0), ", ", b.size(1), ") (got ", out.sizes(), ")");
  DK_CHECK_SAME_DEVICE(a, "a", out, "out");
  DK_CHECK_SAME_DEVICE(b, "b", out, "out");
}

TORCH_LIBRARY_IMPL(distillkit, CompositeExplicitAutograd, m) {
  m.impl("matmul_into", &matmul_into_composite);
}

}  // namespace distillkit
