// Host-side pieces shared by the CPU and CUDA distance kernels (docs/math.md §7).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

namespace distillkit {

enum class PointwiseOp : int { L1 = 0, L2 = 1, SmoothL1 = 2 };

constexpr double kCorrelationEps = 1e-8;

// Same shape, floating, same device, fp64 paired with fp64; `dims` < 0 skips
// the rank check. Throws ValueError naming the argument.
void check_distance_inputs(const at::Tensor& student, const at::Tensor& teacher, int64_t dims);

PointwiseOp parse_pointwise_op(c10::string_view op);

void check_correlation_distance_backward_args(const at::Tensor& grad_rows,
                                              const at::Tensor& stats,
                                              const at::Tensor& student);

}  // namespace distillkit
